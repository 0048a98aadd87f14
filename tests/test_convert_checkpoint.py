"""convert_checkpoint.py: HF/UER folders and Google TF1 checkpoints in and out, exactly.

Round trips must be bit-identical; a folder saved by transformers' own save_pretrained must give
transformers' logits here; broken inputs must fail with the file and tensor named and leave no
output folder behind.
"""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import (  # noqa: E402
    LABELS,
    VOCAB,
    hf_logits,
    leftovers,
    make_checkpoint_dir,
    our_logits,
    padded_batch,
    tiny_config,
    write_vocab,
)

import convert_checkpoint  # noqa: E402
import export_to_pytorch  # noqa: E402
import modeling  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def weights_of(model):
    return {w.google_name: w.variable.numpy() for w in modeling.name_table(model)}


def load_ours(path, task, num_labels=None, hidden_act="gelu"):
    config = modeling.BertConfig.from_json_file(os.path.join(path, "bert_config.json"))
    assert config.hidden_act == hidden_act
    return convert_checkpoint.load_checkpoint_fully(path, config, task, num_labels)


def hf_folder(path, hf_class, seed, **config_overrides):
    """A transformers model with random init, written by its own save_pretrained + our vocab.txt."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=40, **config_overrides)
    model = getattr(transformers, hf_class)(config).eval()
    with torch.no_grad():  # HF initialises LayerNorm to (1, 0) and biases to 0; make every tensor count
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path)
    write_vocab(path)
    return model


@pytest.mark.parametrize("task", ["mlm", "classifier"])
def test_ours_to_hf_to_ours_is_bit_identical(tmp_path, task):
    original = make_checkpoint_dir(str(tmp_path / "ckpt"), task, seed=1)
    ckpt = str(tmp_path / "ckpt")
    export_to_pytorch.export_checkpoint(ckpt, os.path.join(ckpt, "bert_config.json"),
                                        os.path.join(ckpt, "vocab.txt"), str(tmp_path / "hf"), task,
                                        LABELS.get(task))
    convert_checkpoint.hf_to_tf2(str(tmp_path / "hf"), str(tmp_path / "back"))
    labels = LABELS.get(task)
    back = load_ours(str(tmp_path / "back"), task, len(labels) if labels else None)
    expected, got = weights_of(original), weights_of(back)
    assert sorted(expected) == sorted(got)
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name
    with open(tmp_path / "back" / "model_info.json", encoding="utf-8") as f:
        assert json.load(f) == {"do_lower_case": True, "task": task, "labels": labels}
    with open(tmp_path / "back" / "vocab.txt", encoding="utf-8") as f:
        assert f.read().split("\n")[:-1] == VOCAB


@pytest.mark.parametrize("task", ["mlm", "qa"])
def test_ours_to_google_tf1_to_ours_is_bit_identical_with_google_names(tmp_path, task):
    ckpt = str(tmp_path / "ckpt")
    original = make_checkpoint_dir(ckpt, task, seed=2)
    google = str(tmp_path / "google")
    convert_checkpoint.tf2_to_google(ckpt, os.path.join(ckpt, "bert_config.json"),
                                     os.path.join(ckpt, "vocab.txt"), google, task)
    assert sorted(os.listdir(google)) == ["bert_config.json", "bert_model.ckpt.data-00000-of-00001",
                                          "bert_model.ckpt.index", "model_info.json", "vocab.txt"]
    # Read back as TF1 code would: a plain name -> tensor bundle with exactly the table's names.
    reader = tf.train.load_checkpoint(os.path.join(google, "bert_model.ckpt"))
    table = weights_of(original)
    assert sorted(reader.get_variable_to_shape_map()) == sorted(table)
    assert "bert/encoder/layer_1/attention/self/query/kernel" in table
    for name, value in table.items():
        assert np.array_equal(reader.get_tensor(name), value), name
    with open(os.path.join(google, "bert_config.json"), encoding="utf-8") as f:
        assert json.load(f) == tiny_config().to_dict()

    back_dir = str(tmp_path / "back")
    convert_checkpoint.google_to_tf2(google,  # the released-folder form: .../bert_model.ckpt inside
                                     os.path.join(google, "bert_config.json"),
                                     os.path.join(google, "vocab.txt"), back_dir)
    got = weights_of(load_ours(back_dir, task))
    for name, value in table.items():
        assert np.array_equal(got[name], value), name


@pytest.mark.parametrize("hf_class,task,weights_file", [
    ("BertForMaskedLM", "mlm", "model.safetensors"),
    ("BertForSequenceClassification", "classifier", "model.safetensors"),
    ("BertForTokenClassification", "ner", "pytorch_model.bin"),
])
def test_save_pretrained_folder_gives_transformers_logits_here(tmp_path, hf_class, task, weights_file):
    folder = str(tmp_path / "hf")
    hf_model = hf_folder(folder, hf_class, seed=3, num_labels=3)  # default hidden_act: exact "gelu"
    if weights_file == "pytorch_model.bin":  # older / UER-converted folders
        torch.save(hf_model.state_dict(), os.path.join(folder, weights_file))
        os.remove(os.path.join(folder, "model.safetensors"))
    convert_checkpoint.hf_to_tf2(folder, str(tmp_path / "ours"))
    ours = load_ours(str(tmp_path / "ours"), task, 3 if task != "mlm" else None, hidden_act="gelu_exact")
    ids, mask, segments = padded_batch()
    expected, got = hf_logits(hf_model, task, ids, mask, segments), our_logits(ours, task, ids, mask, segments)
    if task == "ner":
        expected, got = expected[mask.astype(bool)], got[mask.astype(bool)]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_load_model_gives_the_task_model_a_folder_holds_with_its_labels(tmp_path):
    """One loader for every consumer: the folder says its labels; asking for another head fails."""
    original = make_checkpoint_dir(str(tmp_path / "clf"), "classifier", seed=3)
    model, found = convert_checkpoint.load_model(str(tmp_path / "clf"), "classifier")
    assert type(model) is modeling.TASK_MODELS["classifier"] and found.labels == LABELS["classifier"]
    for name, value in weights_of(original).items():
        np.testing.assert_array_equal(weights_of(model)[name], value, err_msg=name)
    with pytest.raises(ValueError, match=r"--init_checkpoint=.*clf: holds a classifier model, not a qa model"):
        convert_checkpoint.load_model(str(tmp_path / "clf"), "qa", flag="--init_checkpoint")


def test_pooler_of_a_pretraining_folder_reaches_a_classifier(tmp_path):
    """bert-base-chinese style folders (BertForPreTraining: pooler + NSP) keep their pooler."""
    folder = str(tmp_path / "hf")
    hf_model = hf_folder(folder, "BertForPreTraining", seed=4)
    convert_checkpoint.hf_to_tf2(folder, str(tmp_path / "ours"))
    config = modeling.BertConfig.from_json_file(str(tmp_path / "ours" / "bert_config.json"))
    classifier = modeling.build_model(modeling.BertClassifier(config, 2))
    report = modeling.load_pretrained(classifier, str(tmp_path / "ours"))
    assert report.newly_initialized == ["output_weights", "output_bias"]
    pooler = hf_model.bert.pooler.dense
    assert np.array_equal(classifier.bert.pooler.kernel.numpy(), pooler.weight.detach().numpy().T)
    assert np.array_equal(classifier.bert.pooler.bias.numpy(), pooler.bias.detach().numpy())
    # ... and goes back out to Google's format with it (an erf-GELU model: only when approximating).
    args = (str(tmp_path / "ours"), str(tmp_path / "ours" / "bert_config.json"),
            str(tmp_path / "ours" / "vocab.txt"), str(tmp_path / "google"))
    with pytest.raises(ValueError, match="hidden_act 'gelu_exact' .* pass --approximate_gelu"):
        convert_checkpoint.tf2_to_google(*args)
    assert not os.path.exists(tmp_path / "google")
    convert_checkpoint.tf2_to_google(*args, approximate_gelu=True)
    reader = tf.train.load_checkpoint(str(tmp_path / "google" / "bert_model.ckpt"))
    assert np.array_equal(reader.get_tensor("bert/pooler/dense/bias"), pooler.bias.detach().numpy())
    with open(tmp_path / "google" / "bert_config.json", encoding="utf-8") as f:
        assert json.load(f)["hidden_act"] == "gelu"  # the one Google's modeling.py accepts


def test_old_spellings_gamma_beta_and_no_bert_prefix_are_understood(tmp_path):
    """pytorch-pretrained-bert era files: LayerNorm.gamma/beta; BertModel files lack "bert."."""
    folder = str(tmp_path / "hf")
    hf_model = hf_folder(folder, "BertModel", seed=5)
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in hf_model.state_dict().items()}
    assert "embeddings.LayerNorm.gamma" in state
    os.remove(os.path.join(folder, "model.safetensors"))
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    convert_checkpoint.hf_to_tf2(folder, str(tmp_path / "ours"))
    config = modeling.BertConfig.from_json_file(str(tmp_path / "ours" / "bert_config.json"))
    encoder = modeling.BertEncoder(config)
    encoder({"input_ids": tf.zeros([1, 4], tf.int32)})
    modeling.load_pretrained(encoder, str(tmp_path / "ours"))
    ids, mask, segments = padded_batch()
    got = encoder({"input_ids": ids, "input_mask": mask, "segment_ids": segments})["sequence_output"].numpy()
    with torch.no_grad():
        expected = hf_model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                            token_type_ids=torch.from_numpy(segments).long()).last_hidden_state.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=0)


# ---- bad input: a clear error naming file and tensor, and no output folder ----

def _drop_tensor(folder):
    from safetensors.numpy import load_file, save_file
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    del state["bert.encoder.layer.1.output.dense.weight"]
    save_file(state, path, metadata={"format": "pt"})
    return r"model\.safetensors.*bert\.encoder\.layer\.1\.output\.dense\.weight.*missing"


def _short_vocab(folder):
    write_vocab(folder, VOCAB[:-3])
    return rf"vocab\.txt.*{len(VOCAB) - 3} tokens.*config\.json.*vocab_size={len(VOCAB)}"


def _gpt2_config(folder):
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    return r"config\.json.*model_type 'gpt2' is not BERT"


def _truncated_safetensors(folder):
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    # the last tensor in the file's data section is the one cut short
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    last = max(header, key=lambda k: header[k]["data_offsets"][1])
    return rf"model\.safetensors.*corrupt.*tensor {last.replace('.', '[.]')}.*truncated"


def _garbage_header(folder):
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage")
    return r"model\.safetensors.*corrupt safetensors file: header is not JSON"


@pytest.mark.parametrize("breaker", [_drop_tensor, _short_vocab, _gpt2_config, _truncated_safetensors,
                                     _garbage_header])
def test_broken_folder_is_refused_by_name_and_leaves_no_output(tmp_path, breaker):
    folder = str(tmp_path / "hf")
    hf_folder(folder, "BertForMaskedLM", seed=6)
    message = breaker(folder)
    out = str(tmp_path / "ours")
    with pytest.raises(ValueError, match=message):
        convert_checkpoint.hf_to_tf2(folder, out)
    assert not os.path.exists(out) and not leftovers(str(tmp_path), "ours")


def test_untied_decoder_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file
    folder = str(tmp_path / "hf")
    hf_folder(folder, "BertForMaskedLM", seed=7)
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"] + 1
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="cls.predictions.decoder.weight differs from the word embeddings"):
        convert_checkpoint.hf_to_tf2(folder, str(tmp_path / "ours"))


def test_google_checkpoint_with_a_missing_tensor_is_refused(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    model = make_checkpoint_dir(ckpt, "mlm", seed=8)
    names = [w.google_name for w in modeling.name_table(model) if "layer_1/intermediate" not in w.google_name]
    values = [w.variable for w in modeling.name_table(model) if w.google_name in names]
    os.makedirs(tmp_path / "google")
    prefix = str(tmp_path / "google" / "bert_model.ckpt")
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names), tensors=values)
    with pytest.raises(ValueError, match="bert/encoder/layer_1/intermediate/dense/kernel.*missing"):
        convert_checkpoint.google_to_tf2(prefix, os.path.join(ckpt, "bert_config.json"),
                                         os.path.join(ckpt, "vocab.txt"), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_command_line_reports_a_bad_folder_in_one_line_without_traceback(tmp_path):
    folder = str(tmp_path / "hf")
    hf_folder(folder, "BertForMaskedLM", seed=9)
    _gpt2_config(folder)
    bad = subprocess.run([sys.executable, os.path.join(REPO, "convert_checkpoint.py"), "--mode=hf_to_tf2",
                          f"--input={folder}", f"--output_dir={tmp_path / 'ours'}"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "config.json: model_type 'gpt2' is not BERT" in bad.stderr
    assert not os.path.exists(tmp_path / "ours")


def test_a_separate_decoder_bias_is_the_one_used_as_in_transformers(tmp_path):
    """Old files carry cls.predictions.decoder.bias; if it differs, transformers unties and uses it."""
    from safetensors.numpy import load_file, save_file
    folder = str(tmp_path / "hf")
    hf_folder(folder, "BertForMaskedLM", seed=10)
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"] + 1.5
    save_file(state, path, metadata={"format": "pt"})
    hf_model = transformers.BertForMaskedLM.from_pretrained(folder).eval()
    convert_checkpoint.hf_to_tf2(folder, str(tmp_path / "ours"))
    ours = load_ours(str(tmp_path / "ours"), "mlm", hidden_act="gelu_exact")
    ids, mask, segments = padded_batch()
    np.testing.assert_allclose(our_logits(ours, "mlm", ids, mask, segments),
                               hf_logits(hf_model, "mlm", ids, mask, segments), atol=1e-4, rtol=0)


def _missing_shard(folder):
    """A sharded index (as save_pretrained writes for big models) naming a shard that is not there."""
    os.rename(os.path.join(folder, "model.safetensors"), os.path.join(folder, "model-00001-of-00002.safetensors"))
    from safetensors import safe_open
    with safe_open(os.path.join(folder, "model-00001-of-00002.safetensors"), "np") as f:
        names = sorted(f.keys())
    weight_map = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return r"model\.safetensors\.index\.json: names shard model-00002-of-00002\.safetensors, which is missing"


def test_sharded_index_naming_a_missing_shard_is_refused(tmp_path):
    folder = str(tmp_path / "hf")
    hf_folder(folder, "BertForMaskedLM", seed=11)
    message = _missing_shard(folder)
    with pytest.raises(ValueError, match=message):
        convert_checkpoint.hf_to_tf2(folder, str(tmp_path / "ours"))
    assert not os.path.exists(tmp_path / "ours") and not leftovers(str(tmp_path), "ours")


def test_transformers5_folder_without_vocab_txt_imports(tmp_path):
    """save_pretrained of transformers 5: config.json, model.safetensors, tokenizer.json, no vocab.txt."""
    folder = str(tmp_path / "hf")
    hf_model = hf_folder(folder, "BertForMaskedLM", seed=12)
    # The fast tokenizer writes tokenizer.json (transformers 5's BertTokenizer is the fast one).
    fast = getattr(transformers, "BertTokenizerFast", transformers.BertTokenizer)
    tokenizer = fast(os.path.join(folder, "vocab.txt"), do_lower_case=False)
    os.remove(os.path.join(folder, "vocab.txt"))
    tokenizer.save_pretrained(folder)
    if os.path.exists(os.path.join(folder, "vocab.txt")):  # transformers 4 still writes it
        os.remove(os.path.join(folder, "vocab.txt"))
    assert "tokenizer.json" in os.listdir(folder)
    convert_checkpoint.hf_to_tf2(folder, str(tmp_path / "ours"))
    with open(tmp_path / "ours" / "vocab.txt", encoding="utf-8") as f:
        assert f.read().split("\n")[:-1] == VOCAB
    with open(tmp_path / "ours" / "model_info.json", encoding="utf-8") as f:
        assert json.load(f)["do_lower_case"] is False  # from the tokenizer's own settings
    ours = load_ours(str(tmp_path / "ours"), "mlm", hidden_act="gelu_exact")
    ids, mask, segments = padded_batch()
    np.testing.assert_allclose(our_logits(ours, "mlm", ids, mask, segments),
                               hf_logits(hf_model, "mlm", ids, mask, segments), atol=1e-4, rtol=0)


def run_cli(*args):
    """convert_checkpoint's command line in-process: (flags parsed as the script does) -> run()."""
    from absl import flags
    fv = flags.FlagValues()
    convert_checkpoint.define_flags(fv)
    fv(["convert_checkpoint.py", *args])
    return convert_checkpoint.run(fv)


def tree(folder):
    return {os.path.join(r, n): open(os.path.join(r, n), "rb").read()
            for r, _, files in os.walk(folder) for n in files}


def test_a_model_folder_alone_converts_both_ways(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    original = make_checkpoint_dir(ckpt, "classifier", seed=13)
    run_cli("--mode=tf2_to_google", f"--input={ckpt}", f"--output_dir={tmp_path / 'google'}")
    run_cli("--mode=google_to_tf2", f"--input={tmp_path / 'google'}", f"--output_dir={tmp_path / 'back'}")
    with open(tmp_path / "back" / "model_info.json", encoding="utf-8") as f:
        assert json.load(f) == {"do_lower_case": True, "task": "classifier", "labels": LABELS["classifier"]}
    back = load_ours(str(tmp_path / "back"), "classifier", len(LABELS["classifier"]))
    for name, value in weights_of(original).items():
        assert np.array_equal(weights_of(back)[name], value), name


def _truncate_data(ckpt, tmp_path):
    data = [n for n in os.listdir(ckpt) if ".data-" in n][0]
    with open(os.path.join(ckpt, data), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(ckpt, data)) // 2)
    return [f"--input={ckpt}"], r"ckpt-1\.data-\*: cannot read tensor .*truncated or damaged"


@pytest.mark.parametrize("case", ["truncated_data", "vocab_is_a_directory", "output_is_the_input",
                                  "erf_gelu_to_google"])
def test_bad_input_is_one_usage_error_and_changes_nothing(tmp_path, case):
    ckpt = str(tmp_path / "ckpt")
    make_checkpoint_dir(ckpt, "mlm", seed=14, hidden_act="gelu_exact" if case == "erf_gelu_to_google" else "gelu")
    args, message = {
        "truncated_data": lambda: _truncate_data(ckpt, tmp_path),
        "vocab_is_a_directory": lambda: ([f"--input={ckpt}", f"--vocab_file={tmp_path}"],
                                         f"--vocab_file={tmp_path}: not a file"),
        "output_is_the_input": lambda: ([f"--input={ckpt}", "--overwrite"], "holds the input"),
        "erf_gelu_to_google": lambda: ([f"--input={ckpt}"], "hidden_act 'gelu_exact' .* --approximate_gelu"),
    }[case]()
    output = ckpt if case == "output_is_the_input" else str(tmp_path / "google")
    before = tree(str(tmp_path))
    with pytest.raises(ValueError, match=message):
        run_cli("--mode=tf2_to_google", *args, f"--output_dir={output}")
    assert tree(str(tmp_path)) == before and not leftovers(str(tmp_path), "google")


def test_explicit_labels_replace_transformers_placeholder_names_on_import(tmp_path):
    """A classifier fine-tuned in transformers without id2label says LABEL_0, LABEL_1: --labels wins."""
    hf_folder(str(tmp_path / "hf"), "BertForSequenceClassification", seed=21)
    run_cli("--mode=hf_to_tf2", f"--input={tmp_path / 'hf'}", f"--output_dir={tmp_path / 'plain'}")
    with open(tmp_path / "plain" / "model_info.json", encoding="utf-8") as f:
        assert json.load(f)["labels"] == ["LABEL_0", "LABEL_1"]
    run_cli("--mode=hf_to_tf2", f"--input={tmp_path / 'hf'}", "--labels=0,1", f"--output_dir={tmp_path / 'named'}")
    with open(tmp_path / "named" / "model_info.json", encoding="utf-8") as f:
        assert json.load(f)["labels"] == ["0", "1"]
    # Back out to Google's layout, renamed again: explicit names win there too.
    run_cli("--mode=tf2_to_google", f"--input={tmp_path / 'named'}", "--labels=neg,pos",
            f"--output_dir={tmp_path / 'google'}", "--approximate_gelu")
    with open(tmp_path / "google" / "model_info.json", encoding="utf-8") as f:
        assert json.load(f)["labels"] == ["neg", "pos"]


@pytest.mark.parametrize("mode, hf_class, labels, message", [
    ("hf_to_tf2", "BertForSequenceClassification", "a,b,c", r"--labels names 3 labels but .*config.json has 2"),
    ("hf_to_tf2", "BertForMaskedLM", "0,1", r"--labels: .*config.json holds a mlm model, which has no labels"),
    ("tf2_to_google", "BertForSequenceClassification", "a,b,c", r"--labels names 3 labels but .* has 2"),
])
def test_labels_that_do_not_fit_the_head_are_refused_and_nothing_is_written(tmp_path, mode, hf_class, labels,
                                                                            message):
    hf_folder(str(tmp_path / "hf"), hf_class, seed=22)
    source = tmp_path / "hf"
    if mode == "tf2_to_google":
        run_cli("--mode=hf_to_tf2", f"--input={source}", f"--output_dir={tmp_path / 'ours'}")
        source = tmp_path / "ours"
    before = tree(str(tmp_path))
    with pytest.raises(ValueError, match=message):
        run_cli(f"--mode={mode}", f"--input={source}", f"--labels={labels}", f"--output_dir={tmp_path / 'out'}",
                "--approximate_gelu")
    assert tree(str(tmp_path)) == before and not leftovers(str(tmp_path), "out")
