"""The README is a test: its tutorial commands run as written, on tiny data, in README order.

The commands are the ```bash blocks of README.md's section "The workflow" (data -> pretrain ->
two-phase -> fine-tune -> export -> fill-mask -> convert). Each runs in one fresh working folder that
holds the files the README assumes the user has, with only these substitutions:

1. Files the user brings are made tiny at the README's own paths: `corpus/*.txt` (this repo's
   resources/corpus), `vocab.txt` (resources/vocab.txt), `raw/news_zh_%d.txt`, `lcqmc/{train,dev}.tsv`,
   `cluener2020/{train,dev}.json`, `cmrc2018/{train,dev}.json` (made from corpus sentences), and `bert_config.json` / `resources/bert_config_L12_H768.json`
   (a 2-layer, 64-wide BERT over that vocab). `some_hf_chinese_bert/` is the folder exported above.
2. Sizes: the flags in SIZES get small values; `create_pretrain_data.sh 1 10` converts files 1..2.
3. `python X.py` runs this repo's X.py with this interpreter; `bash X.sh` this repo's X.sh; an
   optional `[--flag]` in brackets is left out; an alternative example whose --output_file an
   earlier command already wrote writes under alt/ instead.
Lines that skip_reason() names are not run, each for the reason it gives (elided flags, Google
Cloud, machine set-up such as pip or gcloud).
"""

import importlib.util
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
README = REPO / "README.md"

SIZES = {"--train_batch_size": "4", "--eval_batch_size": "4", "--num_train_steps": "3",
         "--num_warmup_steps": "1", "--num_train_epochs": "1", "--dupe_factor": "1", "--num_workers": "1",
         "--save_checkpoints_steps": "3", "--iterations_per_loop": "1", "--max_eval_steps": "2"}


def skip_reason(line):
    """Why a README line is not run here, or None. The rules, in order."""
    first = line.split()[0]
    if " ..." in line:
        return "elides flags (...)"
    if "gs://" in line or "--use_tpu" in line:
        return "needs Google Cloud (a gs:// bucket, a TPU)"
    if first not in ("python", "bash") and not re.match(r"^[A-Z_]+=", first):
        return f"sets up a machine ({first}), not a pipeline step"
    if "--runner=DirectRunner" in line and importlib.util.find_spec("apache_beam") is None:
        return "needs the beam extra (pip install -e '.[beam]')"
    return None


TINY_CONFIG = ('{"vocab_size": %d, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, '
               '"intermediate_size": 128, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, '
               '"attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2, '
               '"initializer_range": 0.02}\n')


def readme_commands(text=None):
    """[(env, argv, source line)] of the ```bash blocks in the section "The workflow", in order."""
    text = README.read_text(encoding="utf-8") if text is None else text
    section = text[text.index("## The workflow"):]
    section = section[:section.index("\n## ", 3)]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s+)#(\s.*)?$", "", line).strip()  # a comment line or a trailing one
            if line:
                commands.append(line)
    return commands


def substitute(line):
    """The README line -> (env, argv) to run, by the rules in the module docstring."""
    line = re.sub(r"\s\[--[^\]]*\]", "", line)  # optional parts: [--flag=value]
    words = shlex.split(line)
    env = {}
    while words and re.match(r"^[A-Z_]+=", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if words[0] == "python":
        words[0] = sys.executable
        if words[1].endswith(".py"):
            words[1] = str(REPO / words[1])
    elif words[0] == "bash":
        words[1] = str(REPO / words[1])
        if words[2:4] == ["1", "10"]:
            words[3] = "2"
    out = []
    for word in words:
        flag = word.split("=", 1)[0]
        if flag in SIZES and "=" in word:
            word = f"{flag}={SIZES[flag]}"
        out.append(word.replace("some_hf_chinese_bert/", "hf_lcqmc"))
    return env, out


def make_user_files(work):
    """The files the README assumes the user has, tiny, at the README's paths."""
    shutil.copytree(REPO / "resources" / "corpus", work / "corpus")
    shutil.copy(REPO / "resources" / "vocab.txt", work / "vocab.txt")
    n_vocab = sum(1 for _ in open(work / "vocab.txt", encoding="utf-8"))
    (work / "resources").mkdir()
    for path in (work / "bert_config.json", work / "resources" / "bert_config_L12_H768.json"):
        path.write_text(TINY_CONFIG % n_vocab)
    corpus = sorted((work / "corpus").glob("*.txt"))
    (work / "raw").mkdir()
    for i, path in enumerate(corpus[:2], 1):
        shutil.copy(path, work / "raw" / f"news_zh_{i}.txt")
    sentences = [s for p in corpus for s in p.read_text(encoding="utf-8").splitlines() if len(s) > 4]
    (work / "lcqmc").mkdir()
    rows = [f"{a}\t{b}\t{int(k % 3 == 0)}\n" for k, (a, b) in enumerate(zip(sentences[0::2], sentences[1::2]))]
    (work / "lcqmc" / "train.tsv").write_text("".join(rows[:24]), encoding="utf-8")
    (work / "lcqmc" / "dev.tsv").write_text("".join(rows[24:36]), encoding="utf-8")
    # CLUENER2020 JSON lines (the first two characters tagged as a location) and CMRC2018 SQuAD JSON
    # (the answer: the first two characters of the context).
    ner = [json.dumps({"text": s, "label": {"address": {s[:2]: [[0, 1]]}}}, ensure_ascii=False) + "\n"
           for s in sentences[:36]]
    (work / "cluener2020").mkdir()
    (work / "cluener2020" / "train.json").write_text("".join(ner[:24]), encoding="utf-8")
    (work / "cluener2020" / "dev.json").write_text("".join(ner[24:]), encoding="utf-8")
    (work / "cmrc2018").mkdir()
    for name, part in (("train.json", sentences[:24]), ("dev.json", sentences[24:36])):
        qas = [{"context": s, "qas": [{"id": f"{name}-{i}", "question": "开头是什么？",
                                       "answers": [{"text": s[:2], "answer_start": 0}]}]}
               for i, s in enumerate(part)]
        (work / "cmrc2018" / name).write_text(json.dumps({"data": [{"paragraphs": qas}]}, ensure_ascii=False),
                                              encoding="utf-8")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{README line: CompletedProcess or skip reason}, every command run in order in one folder."""
    work = tmp_path_factory.mktemp("readme")
    make_user_files(work)
    results, written = {}, set()
    for line in readme_commands():
        reason = skip_reason(line)
        if reason:
            results[line] = reason
            continue
        env, argv = substitute(line)
        for i, word in enumerate(argv):  # an alternative example of an output already made
            if word.startswith("--output_file="):
                if word in written:
                    argv[i] = "--output_file=alt/" + word.split("=", 1)[1]
                written.add(word)
        results[line] = subprocess.run(argv, cwd=work, env=dict(os.environ, **env), capture_output=True,
                                       text=True, timeout=900)
    return results


def test_the_tutorial_section_is_found_and_each_rule_is_used():
    commands = readme_commands()
    scripts = " ".join(commands)
    for stage in ("create_pretraining_data.py", "create_pretrain_data.sh", "run_pretraining.py",
                  "--init_checkpoint=out/p128", "run_classifier.py", "export_to_pytorch.py",
                  "fill_mask.py", "convert_checkpoint.py"):
        assert stage in scripts, f"the README tutorial lost its {stage} command"
    assert skip_reason("python run_pretraining.py --do_train --input_file=x ...") == "elides flags (...)"
    assert substitute("python fill_mask.py --checkpoint=x [--segmenter=rjieba] --num_train_steps=100")[1] == \
        [sys.executable, str(REPO / "fill_mask.py"), "--checkpoint=x", "--num_train_steps=3"]


@pytest.mark.slow
@pytest.mark.parametrize("line", readme_commands(), ids=lambda line: " ".join(line.split()[:3])[:60])
def test_readme_command_runs(runs, line):
    result = runs[line]
    if isinstance(result, str):
        pytest.skip(result)
    assert result.returncode == 0, (f"README command failed (exit {result.returncode}):\n  {line}\n"
                                    f"{result.stderr[-3000:]}")
