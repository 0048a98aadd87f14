"""run_classifier.py: readers for every task layout and their errors, the usual file names in
--data_dir and the task aliases of Google/roberta_zh/CLUE, skipped rows counted, metrics on a
hand-worked case, the predictions file, the one-line errors, the stall warning, TFDS (mocked, offline),
ram:// paths, and end-to-end runs: THUCNews titles and roberta_zh's LCQMC command verbatim (slow)."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import TINY_CLASSIFIER, classifier_config, write_pair_data, write_text, write_tf1_checkpoint

import finetuning
import run_classifier
from train_utils import UsageError


def _opts(**values):
    return finetuning.parse_flags(run_classifier.define_flags, **values)


def _spec(task="generic", **flags):
    return run_classifier.task_spec(_opts(task_name=task, **flags))


def _read(path, spec, require_label=True):
    return run_classifier.read_examples(path, spec, require_label)


def _cli(repo_root, *args):
    return subprocess.run([sys.executable, str(repo_root / "run_classifier.py"), *args], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


# ------------------------------------------------------------------------------------------ reading


def test_headerless_pair_tsv_like_lcqmc(tmp_path):
    path = write_text(tmp_path, "dev.tsv", "今天天气好\t天气不错\t1\n你好\t再见\t0\n")
    examples, skipped = _read(path, _spec("lcqmc"))
    assert [(e.guid, e.text_a, e.text_b, e.label) for e in examples] == [
        ("0", "今天天气好", "天气不错", "1"), ("1", "你好", "再见", "0")]
    assert not skipped and examples[1].where.endswith("dev.tsv:2")


def test_a_header_line_in_a_headerless_lcqmc_file_is_not_an_example(tmp_path):
    path = write_text(tmp_path, "train.txt", "text_a\ttext_b\tlabel\n你好\t再见\t0\n")
    examples, _ = _read(path, _spec("lcqmc"))
    assert [(e.text_a, e.label) for e in examples] == [("你好", "0")]


def test_header_names_the_columns_in_any_order_and_csv_quotes_work(tmp_path):
    tsv = write_text(tmp_path, "train.tsv", "label\ttext_a\n1\t好评\n0\t差评\n")
    examples, _ = _read(tsv, _spec("chnsenticorp"))
    assert [(e.text_a, e.label) for e in examples] == [("好评", "1"), ("差评", "0")]
    csv_path = write_text(tmp_path, "news.csv", 'title,topic\n"股市,大涨",finance\n足球赛,sports\n')
    spec = _spec(text_a_column="title", label_column="topic")
    examples, _ = _read(csv_path, spec)
    assert [(e.text_a, e.text_b, e.label) for e in examples] == [("股市,大涨", None, "finance"),
                                                               ("足球赛", None, "sports")]
    assert run_classifier.label_list(spec, examples) == ["finance", "sports"]


def test_rows_without_a_gold_label_are_skipped_and_counted_not_made_a_class(tmp_path):
    ocnli = write_text(tmp_path, "ocnli.json",
                   '{"sentence1": "前提", "sentence2": "假设", "label": "entailment", "id": 7}\n'
                   '{"sentence1": "前提", "sentence2": "假设", "label": "-", "id": 8}\n'
                   '{"sentence1": "前提", "sentence2": "假设", "label": null, "id": 9}\n'
                   '{"sentence1": "前提", "sentence2": "假设二", "label": "neutral", "id": 10}\n')
    examples, skipped = _read(ocnli, _spec("ocnli"))
    assert [(e.guid, e.label) for e in examples] == [("7", "entailment"), ("10", "neutral")]
    assert sum(skipped.values()) == 2
    generic = write_text(tmp_path, "g.csv", "text_a,label\n好,pos\n坏,\n差,neg\n")
    examples, skipped = _read(generic, _spec())
    assert run_classifier.label_list(_spec(), examples) == ["neg", "pos"]  # "" is not a class
    assert list(skipped.values()) == [1]


def test_numeric_labels_sort_numerically():
    examples = [run_classifier.Example("0", "x", None, x) for x in ("10", "9", "100", "9")]
    assert run_classifier.label_list(_spec("thucnews"), examples) == ["9", "10", "100"]


@pytest.mark.parametrize("text, message", [
    ("a\tb\t1\nonly_one_column\t0\n", r"missing.tsv:2: missing column 2"),
    ("", r"missing.tsv: no examples"),
])
def test_bad_rows_name_file_and_line(tmp_path, text, message):
    path = write_text(tmp_path, "missing.tsv", text)
    with pytest.raises(UsageError, match=message):
        _read(path, _spec("lcqmc"))


def test_bad_header_rows_and_json_shapes_name_file_and_line(tmp_path):
    with pytest.raises(UsageError, match=r"ragged.tsv:2: 1 columns, the header has 2"):
        _read(write_text(tmp_path, "ragged.tsv", "label\ttext_a\n1\n"), _spec("chnsenticorp"))
    with pytest.raises(UsageError, match=r"cols.tsv:2: missing column 'text_a'"):
        _read(write_text(tmp_path, "cols.tsv", "label\tsentence\n1\t好\n"), _spec("chnsenticorp"))
    with pytest.raises(UsageError, match=r"list.json:2: a JSON object \{...\} expected, got a list"):
        _read(write_text(tmp_path, "list.json", '{"sentence": "a", "label": "1"}\n["b", "1"]\n'), _spec("tnews"))
    with pytest.raises(UsageError, match=r"nested.json:1: 'sentence' is a dict"):
        _read(write_text(tmp_path, "nested.json", '{"sentence": {"a": 1}, "label": "1"}\n'), _spec("tnews"))
    (tmp_path / "gbk.tsv").write_bytes("标签\t文本\n".encode("gbk"))
    with pytest.raises(UsageError, match=r"gbk.tsv:1: not UTF-8"):
        _read(str(tmp_path / "gbk.tsv"), _spec("chnsenticorp"))


# ------------------------------------------------------------------- task names and usual file names


@pytest.mark.parametrize("alias, task", [("lcqmc_pair", "lcqmc"), ("LCQMC", "lcqmc"), ("cmnli", "ocnli"),
                                         ("bq_corpus", "bq"), ("xnli", "xnli")])
def test_task_names_of_google_roberta_zh_and_clue_are_accepted(alias, task):
    assert _spec(alias) == _spec(task)


def test_unknown_task_name_lists_the_known_ones():
    with pytest.raises(UsageError, match=r"--task_name='mrpc' is not one of .*lcqmc_pair"):
        _spec("mrpc")


@pytest.mark.parametrize("task, names", [
    ("lcqmc", ("train.txt", "dev.txt", "test.txt")),  # LCQMC's release
    ("lcqmc", ("train.tsv", "dev.tsv", "test.tsv")),  # Google-style folders
    ("tnews", ("train.json", "dev.json", "test.json")),  # CLUE
    ("xnli", ("multinli/multinli.train.zh.tsv", "xnli.dev.tsv", "xnli.test.tsv")),  # Google's XNLI
])
def test_data_dir_finds_each_split_by_its_usual_name(tmp_path, task, names):
    for name in names:
        write_text(tmp_path, name, "x\n")
    opts = _opts(task_name=task, data_dir=str(tmp_path), do_train=True, do_eval=True, do_predict=True)
    classifier = run_classifier.ClassifierTask(opts)
    classifier.check()
    assert classifier.find_files() == {s: str(tmp_path / n) for s, n in zip(("train", "dev", "test"), names)}


def test_dev_never_falls_back_to_test(tmp_path):
    for name in ("train.txt", "test.txt"):
        write_text(tmp_path, name, "a\tb\t1\n")
    classifier = run_classifier.ClassifierTask(_opts(task_name="lcqmc", data_dir=str(tmp_path), do_eval=True))
    classifier.check()
    with pytest.raises(UsageError, match=r"--do_eval: none of dev.txt, dev.tsv in --data_dir=.*--dev_file"):
        classifier.find_files()


def test_google_xnli_layout_reads_the_chinese_rows_and_its_label_names(tmp_path):
    train = write_text(tmp_path, "multinli/multinli.train.zh.tsv", "premise\thypo\tlabel\n他来了\t他在\tcontradictory\n")
    dev = write_text(tmp_path, "xnli.dev.tsv", "language\tgold_label\tsentence1\tsentence2\n"
                 "en\tneutral\tHe came\tHe is\nzh\tentailment\t他来了\t他在\n")
    spec = _spec("xnli")
    assert [(e.text_a, e.label) for e in _read(train, spec)[0]] == [("他来了", "contradiction")]
    assert [(e.text_b, e.label) for e in _read(dev, spec)[0]] == [("他在", "entailment")]


# ------------------------------------------------------------------------------------------ metrics


def test_accuracy_and_macro_f1_by_hand():
    # class 0: tp 1 fp 1 fn 1 -> F1 1/2; class 1: tp 2 fp 1 fn 0 -> 4/5; class 2: tp 0 -> 0.
    m = run_classifier.classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0])
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_pairs_are_truncated_longest_first_within_max_seq_length(google_vocab):
    import tokenization

    tokenizer = tokenization.FullTokenizer(str(google_vocab))
    ex = run_classifier.Example("0", "一二三四五六七八九十", "甲乙", "1")
    features, labels = run_classifier.convert_examples([ex], {"0": 0, "1": 1}, 10, tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(features["input_ids"][0].tolist())
    assert tokens == ["[CLS]", "一", "二", "三", "四", "五", "[SEP]", "甲", "乙", "[SEP]"]
    assert features["segment_ids"][0].tolist() == [0] * 7 + [1] * 3 and labels.tolist() == [1]


def test_prediction_file_has_one_row_per_example_in_order():
    examples = [run_classifier.Example(str(i), "x", None, None) for i in (5, 3, 9)]
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    lines = run_classifier.format_predictions(examples, probs, ["neg", "pos"]).splitlines()
    assert lines[0] == "id\tlabel\tprob_neg\tprob_pos"
    assert [x.split("\t")[:2] for x in lines[1:]] == [["5", "neg"], ["3", "pos"], ["9", "neg"]]


def test_stall_warning_names_the_cause_and_google_s_learning_rate_range():
    flat = [0.70, 0.69, 0.70, 0.69, 0.70, 0.69, 0.70, 0.69]
    warning = finetuning.stall_warning(flat, learning_rate=2e-4)
    assert "has not moved from its starting value 0.7000" in warning
    assert "--learning_rate=0.0002 is likely too high" in warning and "2e-5..5e-5" in warning
    assert "too low" in finetuning.stall_warning(flat, learning_rate=1e-7)
    assert finetuning.stall_warning(flat[:4] + [float("nan")] * 4, 1.0)  # diverged counts too
    assert finetuning.stall_warning([0.7, 0.7, 0.6, 0.5, 0.4, 0.3, 0.3, 0.2], 2e-4) is None
    assert finetuning.stall_warning(flat[:3], 2e-4) is None  # too few steps to tell


# ----------------------------------------------------------------------------- runs: errors, outputs


def _run_args(tmp_path, google_vocab, **values):
    base = dict(task_name="lcqmc_pair", data_dir=str(tmp_path / "data"), vocab_file=str(google_vocab),
                bert_config_file=classifier_config(tmp_path), output_dir=str(tmp_path / "out"), max_seq_length=16,
                train_batch_size=8, learning_rate=1e-3, num_train_epochs=1, warmup_proportion=0.0)
    base.update(values)
    return base


def test_a_failing_run_leaves_an_existing_output_dir_byte_identical(tmp_path, google_vocab):
    write_pair_data(tmp_path / "data")
    write_text(tmp_path / "data", "dev.txt", "甲\t乙\t1\n甲\t乙\t2\n")  # label 2 is not an LCQMC label
    out = tmp_path / "out"
    write_text(out, "eval_results.json", "earlier run\n")
    with pytest.raises(UsageError, match=r"dev.txt:2: unknown label '2'"):
        run_classifier.run(_opts(**_run_args(tmp_path, google_vocab, do_train=True, do_eval=True)))
    assert sorted(os.listdir(out)) == ["eval_results.json"]
    assert (out / "eval_results.json").read_text(encoding="utf-8") == "earlier run\n"


@pytest.mark.parametrize("change, message", [
    ({"output_dir": "FILE"}, r"--output_dir=.*out.txt is an existing file"),
    ({"vocab_file": "DIR"}, r"--vocab_file=.* is a directory"),
    ({"learning_rate": -1e-5}, r"--learning_rate must be a positive number"),
    ({"max_seq_length": 4}, r"--max_seq_length=4 must be in \[8, 512\]"),
    ({"bert_config_file": None}, r"--bert_config_file needed: no --init_checkpoint"),
    ({"strategy": "tpu"}, r"--strategy=tpu needs --tpu_name"),
    ({"labels": "0,0"}, r"labels repeat: 0,0"),
    ({"warmup_proportion": 1.5}, r"--warmup_proportion must be in \[0, 1\)"),
])
def test_flags_that_cannot_be_right_are_one_line_errors_before_anything_is_written(
        tmp_path, google_vocab, change, message):
    write_pair_data(tmp_path / "data")
    args = _run_args(tmp_path, google_vocab, do_train=True, do_eval=True)
    write_text(tmp_path, "out.txt", "keep me\n")
    for key, value in change.items():
        args[key] = {"FILE": str(tmp_path / "out.txt"), "DIR": str(tmp_path)}.get(value, value)
        if value is None:
            del args[key]
    with pytest.raises(UsageError, match=message):
        run_classifier.run(_opts(**args))
    assert not (tmp_path / "out").exists() and (tmp_path / "out.txt").read_text() == "keep me\n"


def test_a_directory_where_a_prediction_file_goes_is_refused_before_training(tmp_path, google_vocab):
    write_pair_data(tmp_path / "data")
    (tmp_path / "out" / "test_predictions.tsv").mkdir(parents=True)
    with pytest.raises(UsageError, match=r"test_predictions.tsv is a directory"):
        run_classifier.run(_opts(**_run_args(tmp_path, google_vocab, do_train=True, do_predict=True)))
    assert os.listdir(tmp_path / "out") == ["test_predictions.tsv"]


def test_train_eval_predict_on_ram_filesystem_and_best_is_a_model_folder(tmp_path, google_vocab, caplog):
    """gs:// works through tf.io.gfile; TF's ram:// filesystem stands in for it here. --mixed_precision
    is decided as in pretraining: ignored with a warning on a CPU."""
    import tensorflow as tf

    write_pair_data(tmp_path / "data")
    ram = f"ram://ft-{os.getpid()}"
    for name in ("train.txt", "dev.txt", "test.txt"):
        tf.io.gfile.copy(str(tmp_path / "data" / name), f"{ram}/data/{name}", overwrite=True)
    tf.io.gfile.copy(str(google_vocab), f"{ram}/vocab.txt", overwrite=True)
    metrics = run_classifier.run(_opts(**_run_args(
        tmp_path, google_vocab, data_dir=f"{ram}/data", vocab_file=f"{ram}/vocab.txt", output_dir=f"{ram}/out",
        do_train=True, do_eval=True, do_predict=True, max_train_steps=3, mixed_precision=True)))
    assert "--mixed_precision ignored" in caplog.text
    assert metrics["n"] == 32 and metrics["split"] == "dev.txt"
    rows = tf.io.gfile.GFile(f"{ram}/out/test_predictions.tsv").read().splitlines()
    assert len(rows) == 6 and rows[0] == "id\tlabel\tprob_0\tprob_1"
    info = json.loads(tf.io.gfile.GFile(f"{ram}/out/best/model_info.json").read())
    assert info["task"] == "classifier" and info["labels"] == ["0", "1"] and info["do_lower_case"] is True
    assert tf.io.gfile.exists(f"{ram}/out/best/vocab.txt") and tf.io.gfile.exists(f"{ram}/out/best/bert_config.json")
    # Training again into the same output_dir would replace the model in best/: refused.
    before = tf.io.gfile.GFile(f"{ram}/out/best/checkpoint").read()
    with pytest.raises(UsageError, match=r"best already holds a fine-tuned model"):
        run_classifier.run(_opts(**_run_args(tmp_path, google_vocab, data_dir=f"{ram}/data",
                                             vocab_file=f"{ram}/vocab.txt", output_dir=f"{ram}/out", do_train=True)))
    assert tf.io.gfile.GFile(f"{ram}/out/best/checkpoint").read() == before


def test_predict_alone_reuses_best_of_a_relative_output_dir(tmp_path, google_vocab, monkeypatch):
    write_pair_data(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    run_classifier.run(_opts(**_run_args(tmp_path, google_vocab, data_dir="data", output_dir="out",
                                         do_train=True, max_train_steps=2)))
    # No --init_checkpoint, config or vocab: out/best/ (a relative folder) describes the model.
    run_classifier.run(_opts(task_name="lcqmc", data_dir="data", output_dir="out", do_predict=True,
                             max_seq_length=16))
    assert len((tmp_path / "out" / "test_predictions.tsv").read_text(encoding="utf-8").splitlines()) == 6


def _xnli_mock(builder, split=None, **kwargs):
    """Chinese XNLI-shaped examples for tfds.testing.mock_data (premise: Translation, hypothesis:
    TranslationVariableLanguages, label: ClassLabel), so nothing is downloaded."""
    import tensorflow as tf

    texts = [("他今天来了", "他来了", 0), ("天在下雨", "天是晴的", 2), ("我买了书", "我有书", 0),
             ("她在唱歌", "她很开心", 1)] * 4
    langs = ["en", "zh"]
    return tf.data.Dataset.from_generator(
        lambda: ({"premise": {"zh": p, "en": "x"}, "label": y,
                  "hypothesis": {"language": langs, "translation": ["x", h]}} for p, h, y in texts),
        output_signature={"premise": {"zh": tf.TensorSpec((), tf.string), "en": tf.TensorSpec((), tf.string)},
                          "label": tf.TensorSpec((), tf.int64),
                          "hypothesis": {"language": tf.TensorSpec((None,), tf.string),
                                         "translation": tf.TensorSpec((None,), tf.string)}})


def test_tfds_xnli_chinese_fields_fine_tune_offline(tmp_path, google_vocab):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(as_dataset_fn=_xnli_mock):
        metrics = run_classifier.run(_opts(
            tfds_name="xnli", do_train=True, do_eval=True, vocab_file=str(google_vocab),
            bert_config_file=classifier_config(tmp_path), output_dir=str(tmp_path / "out"), max_seq_length=16,
            train_batch_size=8, max_train_steps=2))
    assert metrics["n"] == 16 and metrics["split"] == "validation"
    info = json.loads((tmp_path / "out" / "best" / "model_info.json").read_text(encoding="utf-8"))
    assert info["labels"] == ["entailment", "neutral", "contradiction"]  # the ClassLabel's order


@pytest.mark.slow
@pytest.mark.parametrize("learning_rate, stalls", [(50.0, True), (1e-3, False)])
def test_a_stalled_first_epoch_is_reported_with_a_learning_rate(tmp_path, google_vocab, caplog,
                                                                 learning_rate, stalls):
    write_pair_data(tmp_path / "data", n=512)  # 64 steps of 8
    run_classifier.run(_opts(**_run_args(tmp_path, google_vocab, do_train=True, learning_rate=learning_rate)))
    history = json.loads((tmp_path / "out" / "train_history.json").read_text(encoding="utf-8"))
    assert history["epochs"][0]["loss_stalled"] is stalls
    logged = "has not moved from its starting value" in caplog.text
    assert logged is stalls and (not stalls or "is likely too high" in caplog.text)


@pytest.mark.slow
def test_command_line_errors_are_one_line_without_traceback(tmp_path, repo_root, google_vocab):
    bad = write_text(tmp_path, "train.tsv", "甲\t乙\t1\n甲\t乙\t2\n")
    proc = _cli(repo_root, "--task_name=lcqmc", f"--train_file={bad}", "--do_train=true",
                f"--vocab_file={google_vocab}", f"--bert_config_file={classifier_config(tmp_path)}",
                f"--output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"run_classifier.py: error: {bad}:2: unknown label '2'" in proc.stderr.splitlines()[-1]


@pytest.mark.slow
def test_roberta_zh_lcqmc_command_runs_verbatim_with_only_paths_and_sizes_changed(tmp_path, repo_root,
                                                                                 google_vocab):
    """The command from brightmart/roberta_zh's README, with a TF1 (Google-named) checkpoint prefix."""
    import modeling

    base, data = tmp_path / "roberta_zh_large", tmp_path / "lcqmc"
    write_pair_data(data, n=96)
    base.mkdir()
    (base / "vocab.txt").write_bytes(google_vocab.read_bytes())
    config = modeling.BertConfig.from_dict(TINY_CLASSIFIER)
    config.to_json_file(str(base / "bert_config_large.json"))
    write_tf1_checkpoint(config, str(base / "roberta_zh_large_model.ckpt"))
    proc = subprocess.run(
        f"cd {tmp_path} && {sys.executable} {repo_root / 'run_classifier.py'} --task_name=lcqmc_pair "
        f"--do_train=true --do_eval=true --data_dir={data} --vocab_file={base}/vocab.txt "
        f"--bert_config_file={base}/bert_config_large.json --init_checkpoint={base}/roberta_zh_large_model.ckpt "
        f"--max_seq_length=16 --train_batch_size=16 --learning_rate=2e-5 --num_train_epochs=1 "
        f"--output_dir=./checkpoint_lcqmc", shell=True, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Loaded" in proc.stderr and "roberta_zh_large_model.ckpt" in proc.stderr
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["n"] == 48 and metrics["split"] == "dev.txt"
    # best/ describes itself: what export_to_pytorch.py --checkpoint=.../best reads, with no other flag.
    import model_folder

    folder = model_folder.resolve(str(tmp_path / "checkpoint_lcqmc" / "best"))
    assert (folder.task, folder.labels, folder.do_lower_case) == ("classifier", ["0", "1"], True)
    assert folder.checkpoint.endswith("ckpt-1") and os.path.dirname(folder.vocab_file) == os.path.dirname(
        folder.bert_config_file) == str(tmp_path / "checkpoint_lcqmc" / "best")
    export = subprocess.run(
        [sys.executable, str(repo_root / "export_to_pytorch.py"), f"--checkpoint={tmp_path}/checkpoint_lcqmc/best",
         f"--output_dir={tmp_path}/hf_lcqmc"], capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert export.returncode == 0, export.stderr[-2000:]
    hf_config = json.loads((tmp_path / "hf_lcqmc" / "config.json").read_text(encoding="utf-8"))
    assert hf_config["architectures"] == ["BertForSequenceClassification"]
    assert hf_config["id2label"] == {"0": "0", "1": "1"}


@pytest.mark.slow
def test_classifier_trains_end_to_end_and_beats_the_majority_class(tmp_path, shared_data, google_vocab):
    t0 = time.time()
    lines = (shared_data / "thucnews_title" / "dev.txt").read_text(encoding="utf-8").splitlines()
    write_text(tmp_path, "train.txt", "\n".join(lines[:4000]) + "\n")
    write_text(tmp_path, "dev.txt", "\n".join(lines[-600:]) + "\n")
    write_text(tmp_path, "test.txt", "\n".join(x.split("\t")[0] for x in lines[-600:-500]) + "\n")  # no labels
    metrics = run_classifier.run(_opts(
        output_dir=str(tmp_path / "out"), vocab_file=str(google_vocab),
        bert_config_file=classifier_config(tmp_path, hidden_size=128, num_hidden_layers=2, intermediate_size=512),
        task_name="thucnews", data_dir=str(tmp_path), do_train=True, do_eval=True, do_predict=True,
        max_seq_length=32, train_batch_size=32, learning_rate=3e-4, num_train_epochs=2))
    print(f"thucnews slice: {metrics}, {time.time() - t0:.0f}s")
    assert metrics["accuracy"] > metrics["majority_baseline_accuracy"] + 0.15
    rows = (tmp_path / "out" / "test_predictions.tsv").read_text(encoding="utf-8").splitlines()
    assert rows[0].split("\t") == ["id", "label"] + [f"prob_{i}" for i in range(10)]
    assert len(rows) == 101 and [r.split("\t")[0] for r in rows[1:3]] == ["0", "1"]
    history = json.loads((tmp_path / "out" / "train_history.json").read_text(encoding="utf-8"))["epochs"]
    assert metrics["accuracy"] == pytest.approx(max(h["accuracy"] for h in history))
    # Evaluating the kept model folder alone (no config/vocab flags) reproduces the score.
    again = run_classifier.run(_opts(task_name="thucnews", init_checkpoint=str(tmp_path / "out" / "best"),
                                     dev_file=str(tmp_path / "dev.txt"), do_eval=True, max_seq_length=32,
                                     output_dir=str(tmp_path / "eval_again")))
    assert again["accuracy"] == pytest.approx(metrics["accuracy"])


def test_explicit_labels_win_over_placeholder_names_when_only_evaluating(tmp_path, google_vocab):
    """A model fine-tuned in transformers without id2label imports as LABEL_0, LABEL_1 (see
    test_convert_checkpoint); evaluating it on 0/1 data needs --labels=0,1, which must win."""
    write_pair_data(tmp_path / "data")
    run_classifier.run(_opts(**_run_args(tmp_path, google_vocab, do_train=True, max_train_steps=2)))
    info_path = tmp_path / "out" / "best" / "model_info.json"
    info = json.loads(info_path.read_text(encoding="utf-8"))
    info_path.write_text(json.dumps(dict(info, labels=["LABEL_0", "LABEL_1"])), encoding="utf-8")
    evaluate = dict(task_name="lcqmc", data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "out"),
                    max_seq_length=16, do_eval=True)
    with pytest.raises(UsageError, match=r"dev.txt:1: unknown label '0' .*placeholder names: pass --labels"):
        run_classifier.run(_opts(**evaluate))
    with pytest.raises(UsageError, match=r"--labels=a,b,c names 3 labels but the model folder's head has 2"):
        run_classifier.run(_opts(labels="a,b,c", **evaluate))
    assert not (tmp_path / "out" / "eval_results.json").exists()
    metrics = run_classifier.run(_opts(labels="0,1", **evaluate))
    assert metrics["n"] == 32
    run_classifier.run(_opts(labels="0,1", do_predict=True, **dict(evaluate, do_eval=False,
                                                                   output_dir=str(tmp_path / "out"))))
    rows = (tmp_path / "out" / "test_predictions.tsv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "id\tlabel\tprob_0\tprob_1"
