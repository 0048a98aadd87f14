"""Weights without TensorFlow checkpoints: modeling.save_weights (safetensors keyed by Google names,
the format of JAX run folders) and HuggingFace folders, both read by modeling.load_pretrained, so
run_classifier.py, export_to_pytorch.py and fill_mask.py take such folders with no extra flag."""

import json
import os

import numpy as np
import pytest
from helpers import randomize, run_export, tiny_config, write_vocab

import convert_checkpoint
import export_to_pytorch
import fill_mask
import model_folder
import modeling


def _equal_weights(a, b, names=None):
    b_values = modeling.weights_by_google_name(b)
    for name, value in modeling.weights_by_google_name(a).items():
        if names is None or name in names:
            np.testing.assert_array_equal(value, b_values[name], err_msg=name)


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _safetensors_folder(folder, model, task, labels=None, step=3, max_shard_bytes=None):
    """A JAX-style run folder: bert_config.json, vocab.txt, model_info.json, ckpt-N.weights.safetensors."""
    os.makedirs(folder, exist_ok=True)
    vocab = write_vocab(os.path.dirname(os.path.abspath(folder)))
    model_folder.write(folder, config=model.config, vocab_file=vocab, do_lower_case=True, task=task,
                       labels=labels)
    modeling.save_weights(model, os.path.join(folder, f"ckpt-{step}.weights.safetensors"), max_shard_bytes)
    return folder


def test_save_weights_round_trips_as_one_file_and_as_shards_no_bigger_than_asked(tmp_path):
    model = randomize(modeling.make_task_model(tiny_config(), "mlm"), seed=1)
    [one] = modeling.save_weights(model, tmp_path / "one.weights.safetensors")
    from safetensors.numpy import load_file
    assert set(load_file(one)) == {w.google_name for w in modeling.name_table(model)}

    limit = 40_000  # the word embeddings (39 x 64 floats = 10 kB) fit; the [128, 64] kernels split
    written = modeling.save_weights(model, tmp_path / "sharded.weights.safetensors", max_shard_bytes=limit)
    index = _read_json(written[-1])
    assert written[-1].endswith("sharded.weights.safetensors.index.json") and len(written) > 3
    assert all(os.path.getsize(p) <= limit for p in written[:-1])
    assert set(index["weight_map"].values()) == {os.path.basename(p) for p in written[:-1]}

    small = modeling.save_weights(model, tmp_path / "rows.weights.safetensors", max_shard_bytes=6_000)
    assert all(os.path.getsize(p) <= 6_000 for p in small[:-1])
    assert any(":rows" in key for key in _read_json(small[-1])["weight_map"])

    for path in (one, tmp_path / "sharded.weights.safetensors", tmp_path / "rows.weights.safetensors"):
        fresh = modeling.make_task_model(tiny_config(), "mlm")
        report = modeling.load_pretrained(fresh, path)
        assert report.newly_initialized == [] and report.unused == []
        _equal_weights(model, fresh)


def test_find_checkpoint_takes_the_newest_complete_save_and_a_tf_checkpoint_first(tmp_path):
    model = modeling.make_task_model(tiny_config(), "mlm")
    modeling.save_weights(model, tmp_path / "ckpt-2.weights.safetensors")
    written = modeling.save_weights(model, tmp_path / "ckpt-10.weights.safetensors", max_shard_bytes=40_000)
    assert model_folder.find_checkpoint(str(tmp_path))[:2] == (
        "safetensors", str(tmp_path / "ckpt-10.weights.safetensors"))
    os.remove(written[-1])  # shards without their index: a save killed before it completed
    assert model_folder.find_checkpoint(str(tmp_path))[1] == str(tmp_path / "ckpt-2.weights.safetensors")
    convert_checkpoint.save_tf2_checkpoint(model, model.config, write_vocab(str(tmp_path)), str(tmp_path))
    assert model_folder.find_checkpoint(str(tmp_path))[:2] == ("tf2", str(tmp_path / "ckpt-1"))


def test_a_damaged_index_or_file_is_an_error_naming_it(tmp_path):
    model = modeling.make_task_model(tiny_config(), "mlm")
    written = modeling.save_weights(model, tmp_path / "w.weights.safetensors", max_shard_bytes=40_000)
    os.remove(written[0])
    with pytest.raises(ValueError, match=r"w.weights-00001-of-.*safetensors: unreadable safetensors file"):
        modeling.load_pretrained(model, tmp_path / "w.weights.safetensors")
    (tmp_path / "x.weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ValueError, match=r"x.weights.safetensors: unreadable safetensors file"):
        modeling.load_pretrained(model, tmp_path / "x.weights.safetensors")


def test_a_safetensors_folder_exports_and_fills_masks_like_the_tf_checkpoint(tmp_path):
    model = randomize(modeling.make_task_model(tiny_config(), "mlm"), seed=2)
    folder = _safetensors_folder(str(tmp_path / "run"), model, "mlm", max_shard_bytes=40_000)
    result = run_export(f"--checkpoint={folder}", f"--output_dir={tmp_path}/hf")
    assert result.returncode == 0, result.stderr
    from_hf = modeling.make_task_model(tiny_config(), "mlm")
    assert modeling.load_pretrained(from_hf, tmp_path / "hf").newly_initialized == []
    _equal_weights(model, from_hf)
    text = "中国的首都是[MASK][MASK]。"
    loaded, tokenizer = fill_mask.load_masked_lm(folder)
    assert fill_mask.fill_masks(loaded, tokenizer, text, 3) == fill_mask.fill_masks(model, tokenizer, text, 3)


def test_an_hf_folder_is_accepted_as_init_checkpoint_with_the_same_weights(tmp_path):
    """Issue 20 item 8: no import step; encoder from the HF folder, the new head fresh."""
    mlm = randomize(modeling.make_task_model(tiny_config(), "mlm"), seed=3)
    hf_dir = export_to_pytorch.export_model(mlm, "mlm", write_vocab(str(tmp_path)), str(tmp_path / "hf"))
    classifier = modeling.make_task_model(tiny_config(), "classifier", num_labels=3)
    report = modeling.load_pretrained(classifier, hf_dir)
    assert report.newly_initialized == ["output_weights", "output_bias"]
    assert sorted(report.unused) == [  # in the folder's own (HF) names
        "cls.predictions.bias", "cls.predictions.transform.LayerNorm.bias",
        "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.dense.weight"]
    _equal_weights(mlm, classifier, {w.google_name for w in modeling.name_table(classifier.bert)})


@pytest.mark.slow  # three fine-tuning runs, ~60 s
def test_run_classifier_evaluates_the_same_model_from_tf_safetensors_and_hf_folders(tmp_path):
    from helpers import write_pair_data

    import finetuning
    import run_classifier
    labels = ["0", "1"]
    model = randomize(modeling.make_task_model(tiny_config(), "classifier", num_labels=2), seed=4)
    tf_dir = str(tmp_path / "tf")
    convert_checkpoint.save_tf2_checkpoint(model, model.config, write_vocab(str(tmp_path)), tf_dir, labels)
    st_dir = _safetensors_folder(str(tmp_path / "st"), model, "classifier", labels)
    hf_dir = export_to_pytorch.export_model(model, "classifier", os.path.join(tf_dir, "vocab.txt"),
                                            str(tmp_path / "hf"), labels)
    write_pair_data(tmp_path / "data", n=16)
    outputs = []
    for folder in (tf_dir, st_dir, hf_dir):
        out = str(tmp_path / f"eval_{os.path.basename(folder)}")
        metrics = run_classifier.run(finetuning.parse_flags(run_classifier.define_flags, task_name="lcqmc_pair", data_dir=str(tmp_path / "data"),
                                           init_checkpoint=folder, do_eval=True, do_predict=True,
                                           max_seq_length=16, output_dir=out))
        with open(os.path.join(out, "test_predictions.tsv"), encoding="utf-8") as f:
            outputs.append((metrics["accuracy"], f.read()))
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]
