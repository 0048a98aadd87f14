"""model_folder.py: the run-folder contract (write / resolve) for our, Google's and HF folders."""

import json
import os

import pytest
import tensorflow as tf

import model_folder
import modeling
import train_utils

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "中", "国", "##a"]


def _config():
    return modeling.BertConfig(vocab_size=len(VOCAB), hidden_size=8, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=16, max_position_embeddings=16)


def _vocab(folder):
    path = os.path.join(folder, "source_vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in VOCAB))
    return path


def _fake_tf2_checkpoint(folder, step=3):
    """A real (tiny) object-graph checkpoint: ckpt-N + the `checkpoint` state file."""
    ckpt = tf.train.Checkpoint(v=tf.Variable([1.0]))
    tf.train.CheckpointManager(ckpt, folder, max_to_keep=2).save(checkpoint_number=step)


def test_write_then_resolve_gives_back_every_field(tmp_path):
    run = tmp_path / "run"
    _fake_tf2_checkpoint(str(run), step=7)
    model_folder.write(run, config=_config(), vocab_file=_vocab(tmp_path), do_lower_case=False,
                       task="classifier", labels=["neg", "pos"])
    assert sorted(os.listdir(run)) == ["bert_config.json", "checkpoint", "ckpt-7.data-00000-of-00001",
                                       "ckpt-7.index", "model_info.json", "vocab.txt"]
    found = model_folder.resolve(str(run))
    assert found.checkpoint == os.path.join(str(run), "ckpt-7") and found.kind == "tf2"
    assert modeling.BertConfig.from_json_file(found.bert_config_file) == _config()
    assert open(found.vocab_file, encoding="utf-8").read().split() == VOCAB
    assert (found.do_lower_case, found.task, found.labels) == (False, "classifier", ["neg", "pos"])
    # A ckpt-N prefix resolves to the same folder and files.
    assert model_folder.resolve(found.checkpoint) == found


def test_explicit_flags_win_over_the_folder(tmp_path):
    run = tmp_path / "run"
    _fake_tf2_checkpoint(str(run))
    model_folder.write(run, config=_config(), vocab_file=_vocab(tmp_path), do_lower_case=True)
    other = tmp_path / "other_config.json"
    other.write_text(_config().to_json_string())
    found = model_folder.resolve(str(run), bert_config_file=str(other), vocab_file=_vocab(tmp_path))
    assert found.bert_config_file == str(other)
    assert found.vocab_file == _vocab(tmp_path)


def test_missing_pieces_name_the_flag_that_supplies_them(tmp_path):
    run = tmp_path / "run"
    _fake_tf2_checkpoint(str(run))
    with pytest.raises(train_utils.UsageError, match="no bert_config.json .*--bert_config_file"):
        model_folder.resolve(str(run))
    (run / "bert_config.json").write_text(_config().to_json_string())
    with pytest.raises(train_utils.UsageError, match="no vocab.txt .*--vocab_file"):
        model_folder.resolve(str(run))
    with pytest.raises(train_utils.UsageError, match="holds no model"):
        model_folder.resolve(str(tmp_path))
    with pytest.raises(train_utils.UsageError, match="--vocab_file=.*not a file"):
        model_folder.resolve(str(run), vocab_file=str(tmp_path))  # a directory is not a vocab


def test_unreadable_checkpoint_state_is_an_error_not_an_empty_folder(tmp_path):
    run = tmp_path / "run"
    _fake_tf2_checkpoint(str(run))
    model_folder.write(run, config=_config(), vocab_file=_vocab(tmp_path), do_lower_case=True)
    (run / "checkpoint").write_text("garbage {{{")
    with pytest.raises(train_utils.UsageError, match="checkpoint is unreadable"):
        model_folder.resolve(str(run))
    # Without a state file the newest ckpt-N is found by name.
    os.remove(run / "checkpoint")
    assert model_folder.resolve(str(run)).checkpoint.endswith("ckpt-3")


def test_folders_written_before_the_contract_still_resolve(tmp_path):
    """Fine-tuning used to write bert_config.json and labels.json / ner_tags.json beside best/."""
    out = tmp_path / "lcqmc"
    _fake_tf2_checkpoint(str(out / "best"))
    (out / "bert_config.json").write_text(_config().to_json_string())
    (out / "labels.json").write_text(json.dumps(["0", "1"]))
    found = model_folder.resolve(str(out / "best"), vocab_file=_vocab(tmp_path))
    assert found.bert_config_file == str(out / "bert_config.json")
    assert (found.task, found.labels) == ("classifier", ["0", "1"])
    os.remove(out / "labels.json")
    (out / "ner_tags.json").write_text(json.dumps(["O", "B-LOC"]))
    found = model_folder.resolve(str(out / "best"), vocab_file=_vocab(tmp_path))
    assert (found.task, found.labels) == ("ner", ["O", "B-LOC"])


def test_google_tf1_folder(tmp_path):
    folder = tmp_path / "chinese_L-12_H-768_A-12"
    folder.mkdir()
    tf.raw_ops.SaveV2(prefix=str(folder / "bert_model.ckpt"), tensor_names=["bert/x"],
                      shape_and_slices=[""], tensors=[tf.constant([1.0])])
    (folder / "bert_config.json").write_text(_config().to_json_string())
    os.rename(_vocab(tmp_path), folder / "vocab.txt")
    found = model_folder.resolve(str(folder))
    assert (found.kind, found.checkpoint, found.task) == ("tf1", str(folder / "bert_model.ckpt"), None)
    assert model_folder.resolve(str(folder / "bert_model.ckpt")).kind == "tf1"


def _hf_folder(tmp_path, hidden_act="gelu"):
    """A transformers-5 style folder: config.json, model.safetensors, tokenizer.json, no vocab.txt."""
    folder = tmp_path / "hf"
    folder.mkdir()
    config = dict(_config().to_dict(), hidden_act=hidden_act, model_type="bert",
                  architectures=["BertForSequenceClassification"], id2label={"0": "neg", "1": "pos"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    tokenizer = {"normalizer": {"type": "BertNormalizer", "lowercase": False},
                 "model": {"type": "WordPiece", "vocab": {t: i for i, t in enumerate(VOCAB)}}}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    return folder


def test_transformers5_folder_gets_its_vocab_from_tokenizer_json(tmp_path):
    folder = _hf_folder(tmp_path)
    found = model_folder.resolve(str(folder))
    assert (found.kind, found.task, found.labels, found.do_lower_case) == ("hf", "classifier", ["neg", "pos"], False)
    assert open(found.vocab_file, encoding="utf-8").read().split() == VOCAB
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors", "tokenizer.json"]  # untouched
    # HF "gelu" is the erf GELU: the config translates to our "gelu_exact", never to tanh "gelu".
    assert modeling.BertConfig.from_json_file(found.bert_config_file).hidden_act == "gelu_exact"


def test_write_and_resolve_through_a_gfile_filesystem():
    """gs:// goes through tf.io.gfile; TF's in-memory ram:// filesystem stands in for it."""
    run = "ram://model_folder_test/run"
    tf.io.gfile.makedirs(run)
    with tf.io.gfile.GFile("ram://model_folder_test/vocab.txt", "w") as f:
        f.write("".join(t + "\n" for t in VOCAB))
    tf.raw_ops.SaveV2(prefix=run + "/bert_model.ckpt", tensor_names=["bert/x"], shape_and_slices=[""],
                      tensors=[tf.constant([1.0])])
    model_folder.write(run, config=_config(), vocab_file="ram://model_folder_test/vocab.txt",
                       do_lower_case=True, task="mlm")
    found = model_folder.resolve(run)
    assert (found.kind, found.task, found.vocab_file) == ("tf1", "mlm", run + "/vocab.txt")


def test_write_refuses_a_vocab_that_does_not_fit_the_config(tmp_path):
    bad = tmp_path / "vocab.txt"
    bad.write_text("[PAD]\n[UNK]\n")
    with pytest.raises(train_utils.UsageError, match="2 tokens, but the bert config says vocab_size=8"):
        model_folder.write(tmp_path / "run", config=_config(), vocab_file=str(bad), do_lower_case=True)
    assert not (tmp_path / "run").exists()


def test_relative_and_moved_folders_resolve(tmp_path, monkeypatch):
    """A relative --checkpoint (the README's out/pretrain), and a folder copied elsewhere."""
    run = tmp_path / "out" / "pretrain"
    _fake_tf2_checkpoint(str(run), step=5)
    model_folder.write(run, config=_config(), vocab_file=_vocab(tmp_path), do_lower_case=True)
    monkeypatch.chdir(tmp_path)
    assert model_folder.resolve("out/pretrain").checkpoint == os.path.join("out", "pretrain", "ckpt-5")
    state = (run / "checkpoint").read_text()
    (run / "checkpoint").write_text(state.replace('"ckpt-5"', '"/elsewhere/old_run/ckpt-5"'))
    assert "/elsewhere/" in (run / "checkpoint").read_text()
    assert model_folder.resolve(str(run)).checkpoint == os.path.join(str(run), "ckpt-5")


def test_one_state_file_reader_serves_model_folders_and_resume(tmp_path):
    """model_folder.latest_checkpoint reads the state file for both; only a missing state file with
    checkpoints left differs: a reader takes the newest ckpt-N, a resume refuses (a fresh
    CheckpointManager would save over them)."""
    import pretraining_input
    run = tmp_path / "run"
    _fake_tf2_checkpoint(str(run), step=5)
    want = os.path.join(str(run), "ckpt-5")
    assert model_folder.latest_checkpoint(str(run)) == pretraining_input.latest_checkpoint(str(run)) == want
    # Moved folder: an absolute name of the old place is found beside the state file, by both.
    state = (run / "checkpoint").read_text()
    (run / "checkpoint").write_text(state.replace('"ckpt-5"', '"/elsewhere/old_run/ckpt-5"'))
    assert model_folder.latest_checkpoint(str(run)) == pretraining_input.latest_checkpoint(str(run)) == want
    (run / "checkpoint").write_text('model_checkpoint_path: "ckpt-9"\n')
    for read in (model_folder.latest_checkpoint, pretraining_input.latest_checkpoint):
        with pytest.raises(train_utils.UsageError, match=r"names .*ckpt-9, which is not there"):
            read(str(run))
    os.remove(run / "checkpoint")
    assert model_folder.latest_checkpoint(str(run)) == want
    with pytest.raises(train_utils.UsageError, match=r"checkpoint is missing but .* holds ckpt-5"):
        pretraining_input.latest_checkpoint(str(run))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert model_folder.latest_checkpoint(str(empty)) is None
    assert pretraining_input.latest_checkpoint(str(empty)) is None
