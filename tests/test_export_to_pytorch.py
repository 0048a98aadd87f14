"""export_to_pytorch.py: our checkpoints -> HuggingFace folders that transformers loads offline.

Tiny models (L=2, H=64, 4 heads, a 40-token vocab written here) with random weights, so every
tensor matters; transformers models are built from the exported folder only (no hub access).
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

try:
    import torch
    import transformers
except ImportError:
    torch = transformers = None
pytestmark = pytest.mark.skipif(transformers is None, reason="needs torch + transformers (.[export])")

from helpers import (  # noqa: E402
    LABELS,
    VOCAB,
    hf_logits,
    leftovers,
    make_checkpoint_dir,
    our_logits,
    padded_batch,
    run_export,
    write_vocab,
)

import export_to_pytorch  # noqa: E402
import fill_mask  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_CLASSES = {"mlm": "BertForMaskedLM", "classifier": "BertForSequenceClassification",
              "ner": "BertForTokenClassification", "qa": "BertForQuestionAnswering"}
# Both GELU variants are exercised: our "gelu" (tanh) must become HF "gelu_new", "gelu_exact" HF "gelu".
HIDDEN_ACT = {"mlm": "gelu", "classifier": "gelu_exact", "ner": "gelu", "qa": "gelu_exact"}


# ---- fixtures ----

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{task: (our model, checkpoint dir, exported HF dir)} for the four heads."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for seed, task in enumerate(HF_CLASSES):
        ckpt = str(root / f"ckpt_{task}")
        model = make_checkpoint_dir(ckpt, task, seed, HIDDEN_ACT[task])
        hf_dir = str(root / f"hf_{task}")
        export_to_pytorch.export_checkpoint(ckpt, os.path.join(ckpt, "bert_config.json"),
                                            os.path.join(ckpt, "vocab.txt"), hf_dir, task,
                                            LABELS.get(task), pytorch_bin=task in ("mlm", "classifier"))
        out[task] = (model, ckpt, hf_dir)
    return out


# ---- tests ----

@pytest.mark.parametrize("task", list(HF_CLASSES))
def test_config_json_names_bert_architecture_labels_and_gelu_variant(exported, task):
    with open(os.path.join(exported[task][2], "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["model_type"] == "bert"
    assert config["architectures"] == [HF_CLASSES[task]]
    assert config["hidden_act"] == {"gelu": "gelu_new", "gelu_exact": "gelu"}[HIDDEN_ACT[task]]
    if task in LABELS:
        assert config["id2label"] == {str(i): label for i, label in enumerate(LABELS[task])}
        assert config["label2id"] == {label: i for i, label in enumerate(LABELS[task])}
    else:
        assert "id2label" not in config
    files = set(os.listdir(exported[task][2]))
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json",
            "special_tokens_map.json"} <= files


POOLER = {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}


@pytest.mark.parametrize("task", list(HF_CLASSES))
def test_safetensors_holds_what_save_pretrained_writes_plus_the_pooler(exported, task, tmp_path):
    from safetensors import safe_open
    hf_dir = exported[task][2]
    reference = getattr(transformers, HF_CLASSES[task])(transformers.AutoConfig.from_pretrained(hf_dir))
    reference.save_pretrained(tmp_path)
    with safe_open(os.path.join(hf_dir, "model.safetensors"), "np") as ours, \
            safe_open(os.path.join(tmp_path, "model.safetensors"), "np") as theirs:
        assert ours.metadata() == {"format": "pt"}
        names = sorted(ours.keys())
        # Every export carries the pooler; transformers' MLM/NER/QA classes have none and ignore it.
        assert set(names) == set(theirs.keys()) | POOLER
        for name in theirs.keys():
            assert ours.get_slice(name).get_shape() == theirs.get_slice(name).get_shape(), name
    if task == "mlm":  # L=2: 5 embedding + 2 x 16 layer + 2 pooler + 5 head tensors; tied decoder left out
        assert len(names) == 44 and not any("decoder" in k for k in names)


@pytest.mark.parametrize("task", list(HF_CLASSES))
def test_every_export_has_the_models_own_pooler_and_bert_model_reproduces_it(exported, task):
    """BertModel (and keras-hub) need bert.pooler.*; loading it must not draw a random pooler."""
    model, _, hf_dir = exported[task]
    bert = transformers.BertModel.from_pretrained(hf_dir).eval()
    np.testing.assert_array_equal(bert.pooler.dense.weight.detach().numpy(), model.bert.pooler.kernel.numpy().T)
    ids, mask, segments = padded_batch()
    with torch.no_grad():
        theirs = bert(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                      token_type_ids=torch.from_numpy(segments).long()).pooler_output.numpy()
    ours = model.bert({"input_ids": ids, "input_mask": mask, "segment_ids": segments})["pooled_output"]
    np.testing.assert_allclose(theirs, ours.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("task", list(HF_CLASSES))
def test_logits_match_transformers_on_a_padded_batch(exported, task):
    model, _, hf_dir = exported[task]
    hf_model = getattr(transformers, HF_CLASSES[task]).from_pretrained(hf_dir).eval()
    ids, mask, segments = padded_batch()
    ours, theirs = our_logits(model, task, ids, mask, segments), hf_logits(hf_model, task, ids, mask, segments)
    assert ours.shape == theirs.shape
    if task in ("ner", "qa"):  # per-token outputs: compare the real tokens
        real = mask.astype(bool)
        ours, theirs = (ours[real], theirs[real]) if task == "ner" else (ours[:, real], theirs[:, real])
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_fill_mask_pipeline_top_token_equals_ours(exported):
    model, ckpt, hf_dir = exported["mlm"]
    tokenizer = fill_mask.load_masked_lm(ckpt)[1]
    pipe = transformers.pipeline("fill-mask", model=hf_dir, top_k=3)
    for text in ("中国的首都是[MASK]京。", "我爱[MASK]们"):
        theirs = pipe(text)
        ours = fill_mask.fill_masks(model, tokenizer, text, top_k=3)[0]
        assert theirs[0]["token_str"] == ours[0][0]
        np.testing.assert_allclose([c["score"] for c in theirs], [s for _, s in ours], atol=1e-4)


def test_classification_pipelines_run_offline_with_our_label_names(exported):
    text_pipe = transformers.pipeline("text-classification", model=exported["classifier"][2])
    assert text_pipe("我爱北京")[0]["label"] in LABELS["classifier"]
    token_pipe = transformers.pipeline("token-classification", model=exported["ner"][2])
    entities = token_pipe("我爱北京")
    assert [e["word"] for e in entities if e["entity"] != "O"] == [e["word"] for e in entities]
    assert {e["entity"] for e in entities} <= set(LABELS["ner"])
    assert all(len(e["word"]) == 1 and e["end"] - e["start"] == 1 for e in entities)  # per character


def test_question_answering_runs_from_the_folder(exported):
    hf_dir = exported["qa"][2]
    if "question-answering" in transformers.pipelines.get_supported_tasks():
        pipe = transformers.pipeline("question-answering", model=hf_dir)
        answer = pipe(question="首都", context="中国的首都是北京。")
        assert answer["answer"] in "中国的首都是北京。"
        return
    # transformers 5 removed the question-answering pipeline; do what it did with the folder's
    # tokenizer and model: encode the pair, pick the best span in the context.
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf_model = transformers.AutoModelForQuestionAnswering.from_pretrained(hf_dir).eval()
    context = "中国的首都是北京。"
    enc = tokenizer("首都", context, return_tensors="pt", return_offsets_mapping=True)
    offsets = enc.pop("offset_mapping")[0]
    with torch.no_grad():
        out = hf_model(**enc)
    in_context = torch.tensor([s == 1 for s in enc.sequence_ids(0)])
    start = int(torch.where(in_context, out.start_logits[0], -1e9).argmax())
    end = start + int(torch.where(in_context, out.end_logits[0], -1e9)[start:start + 5].argmax())
    assert context[int(offsets[start][0]):int(offsets[end][1])] in context
    assert tokenizer.convert_ids_to_tokens(enc["input_ids"][0])[:4] == ["[CLS]", "首", "都", "[SEP]"]


@pytest.mark.parametrize("task", ["mlm", "classifier"])
def test_pytorch_bin_holds_the_same_tensors_as_safetensors_plus_the_tied_decoder(exported, task):
    """As transformers 4's save_pretrained(safe_serialization=False) writes it: the MLM decoder keys
    are the tied tensors themselves (UER-py's converter reads cls.predictions.decoder.weight)."""
    from safetensors.numpy import load_file
    hf_dir = exported[task][2]
    bin_state = torch.load(os.path.join(hf_dir, "pytorch_model.bin"), weights_only=True)
    st_state = load_file(os.path.join(hf_dir, "model.safetensors"))
    tied = set(export_to_pytorch.TIED_DECODER) if task == "mlm" else set()
    assert sorted(bin_state) == sorted(set(st_state) | tied)
    for name, value in st_state.items():
        assert np.array_equal(bin_state[name].numpy(), value), name
    for name in tied:
        source = bin_state[export_to_pytorch.TIED_DECODER[name]]
        assert bin_state[name].data_ptr() == source.data_ptr()  # one storage, as torch.save of a tied model
    if task == "mlm":  # and transformers loads it with nothing missing or unexpected
        folder = os.path.join(os.path.dirname(hf_dir), "bin_only")
        os.makedirs(folder, exist_ok=True)
        for name in ("config.json", "pytorch_model.bin"):
            with open(os.path.join(hf_dir, name), "rb") as a, open(os.path.join(folder, name), "wb") as b:
                b.write(a.read())
        _, info = transformers.BertForPreTraining.from_pretrained(folder, output_loading_info=True)
        assert set(info["missing_keys"]) <= {"cls.seq_relationship.weight", "cls.seq_relationship.bias"}
        assert not info["unexpected_keys"]


def test_exporting_a_head_the_checkpoint_lacks_fails_and_leaves_nothing(exported, tmp_path):
    _, ckpt, _ = exported["mlm"]
    out = str(tmp_path / "hf")
    with pytest.raises(ValueError, match="output_weights"):
        export_to_pytorch.export_checkpoint(ckpt, os.path.join(ckpt, "bert_config.json"),
                                            os.path.join(ckpt, "vocab.txt"), out, "classifier", ["x", "y"])
    assert not os.path.exists(out) and not leftovers(str(tmp_path), "hf")


def test_vocab_that_disagrees_with_the_config_is_refused(exported, tmp_path):
    _, ckpt, _ = exported["mlm"]
    short_vocab = write_vocab(str(tmp_path), VOCAB[:-1])
    with pytest.raises(ValueError, match=re.escape(short_vocab) + f".*{len(VOCAB) - 1} tokens.*vocab_size={len(VOCAB)}"):
        export_to_pytorch.export_checkpoint(ckpt, os.path.join(ckpt, "bert_config.json"), short_vocab,
                                            str(tmp_path / "hf"), "mlm")
    assert not os.path.exists(tmp_path / "hf")


def test_a_failure_while_writing_removes_the_temp_folder(exported, tmp_path, monkeypatch):
    model, ckpt, _ = exported["classifier"]

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_to_pytorch, "write_tokenizer_files", broken)
    with pytest.raises(OSError, match="disk full"):
        export_to_pytorch.export_model(model, "classifier", os.path.join(ckpt, "vocab.txt"),
                                       str(tmp_path / "hf"), LABELS["classifier"])
    assert os.listdir(tmp_path) == []


def test_existing_output_dir_is_kept_unless_overwrite(exported, tmp_path):
    model, ckpt, _ = exported["qa"]
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    vocab = os.path.join(ckpt, "vocab.txt")
    with pytest.raises(ValueError, match="--overwrite"):
        export_to_pytorch.export_model(model, "qa", vocab, str(out))
    assert (out / "keep.txt").read_text() == "mine"
    export_to_pytorch.export_model(model, "qa", vocab, str(out), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert not leftovers(str(tmp_path), "hf")


def snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return out


def test_command_line_needs_only_the_model_folder(exported, tmp_path):
    """config, vocab, task and labels come from the folder (model_info.json); the umask is honoured."""
    _, ckpt, reference_dir = exported["classifier"]
    out = str(tmp_path / "hf")
    result = run_export(f"--checkpoint={ckpt}", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    with open(os.path.join(out, "model.safetensors"), "rb") as a, \
            open(os.path.join(reference_dir, "model.safetensors"), "rb") as b:
        assert a.read() == b.read()
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700


def test_folder_written_before_the_contract_exports(exported, tmp_path):
    """Old fine-tuning output: best/ckpt-N, bert_config.json and labels.json (a JSON list) one level up."""
    _, ckpt, reference_dir = exported["classifier"]
    run = tmp_path / "lcqmc"
    os.makedirs(run / "best")
    for name in os.listdir(ckpt):
        if name.startswith(("ckpt-", "checkpoint")):
            with open(os.path.join(ckpt, name), "rb") as a, open(run / "best" / name, "wb") as b:
                b.write(a.read())
    (run / "bert_config.json").write_bytes(open(os.path.join(ckpt, "bert_config.json"), "rb").read())
    (run / "labels.json").write_text(json.dumps(LABELS["classifier"]))
    result = run_export(f"--checkpoint={run / 'best'}", f"--vocab_file={ckpt}/vocab.txt",
                        f"--output_dir={tmp_path / 'hf'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert snapshot(tmp_path / "hf")["model.safetensors"] == snapshot(reference_dir)["model.safetensors"]


@pytest.mark.parametrize("case", ["output_is_the_source", "missing_folder", "vocab_is_a_directory"])
def test_bad_command_lines_get_one_line_and_change_nothing(exported, tmp_path, case):
    _, ckpt, _ = exported["mlm"]
    before = snapshot(ckpt)
    args, message = {
        "output_is_the_source": ([f"--checkpoint={ckpt}", f"--output_dir={ckpt}", "--overwrite"],
                                 f"--output_dir={ckpt} holds the input"),
        "missing_folder": ([f"--checkpoint={tmp_path}/nowhere", f"--output_dir={tmp_path}/hf"],
                           f"--checkpoint={tmp_path}/nowhere: no checkpoint there"),
        "vocab_is_a_directory": ([f"--checkpoint={ckpt}", f"--vocab_file={tmp_path}", f"--output_dir={tmp_path}/hf"],
                                 f"--vocab_file={tmp_path}: not a file"),
    }[case]
    result = run_export(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("export_to_pytorch.py: error: ") and message in last, last
    assert snapshot(ckpt) == before and not os.path.exists(tmp_path / "hf")


def test_temp_folders_of_a_killed_export_are_removed_by_the_next(exported, tmp_path):
    model, ckpt, _ = exported["qa"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that no longer runs
    stale = tmp_path / f".hf.tmp-{dead}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".hf.tmp-{os.getpid()}-xyz"  # a run still in progress: left alone
    live.mkdir()
    export_to_pytorch.export_model(model, "qa", os.path.join(ckpt, "vocab.txt"), str(tmp_path / "hf"))
    assert not stale.exists() and live.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["hf", live.name])


@pytest.mark.parametrize("do_lower_case", [True, False])
def test_exported_tokenizer_gives_our_token_ids(exported, tmp_path, do_lower_case):
    import tokenization
    model, ckpt, _ = exported["ner"]
    vocab = os.path.join(ckpt, "vocab.txt")
    out = export_to_pytorch.export_model(model, "ner", vocab, str(tmp_path / "hf"), LABELS["ner"],
                                         do_lower_case=do_lower_case)
    ours = tokenization.FullTokenizer(vocab, do_lower_case=do_lower_case)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    for text in ("我爱Hello北京abc", "HELLO 大学生，a b"):
        expected = ours.convert_tokens_to_ids(["[CLS]"] + ours.tokenize(text) + ["[SEP]"])
        assert theirs(text)["input_ids"] == expected, text
