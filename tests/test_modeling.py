"""modeling.py: config I/O, the encoder and heads, the name table, checkpoints, and parity with
HuggingFace transformers (the correctness oracle: same weights through the table -> same logits)."""

import json
import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO_ROOT, RESOURCES

import modeling

try:  # only the parity tests need the PyTorch peer; every other test here runs without it
    import torch
    import transformers
except ImportError:
    torch = transformers = None
needs_transformers = pytest.mark.skipif(torch is None, reason="torch and transformers are not installed")


def small_config(**overrides):
    fields = dict(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=128, max_position_embeddings=64)
    fields.update(overrides)
    return modeling.BertConfig(**fields)


def randomize(model, seed=0):
    """Gives every weight (biases, LayerNorm too) distinct random values, so parity means something."""
    rng = np.random.RandomState(seed)
    for w in modeling.name_table(model):
        scale = 0.2 if ("LayerNorm" in w.google_name or "bias" in w.google_name) else 0.05
        value = rng.normal(0.0, scale, w.variable.shape).astype(np.float32)
        if w.google_name.endswith("gamma"):
            value += 1.0
        w.variable.assign(value)
    return model


def random_batch(config, batch=3, seq=16, positions=5, seed=1):
    rng = np.random.RandomState(seed)
    input_mask = np.ones((batch, seq), np.int32)
    input_mask[1, 11:] = 0  # padding in two of the three rows
    input_mask[2, 4:] = 0
    segment_ids = np.zeros((batch, seq), np.int32)
    segment_ids[:, seq // 2:] = 1
    return {
        "input_ids": rng.randint(0, config.vocab_size, (batch, seq)).astype(np.int32) * input_mask,
        "input_mask": input_mask,
        "segment_ids": segment_ids * input_mask,
        "masked_lm_positions": rng.randint(0, 4, (batch, positions)).astype(np.int32),
    }


def to_hf(model, hf_class, **hf_kwargs):
    """A transformers model with our weights, copied through the name table."""
    c = model.config
    hf_config = transformers.BertConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        hidden_act=modeling.HF_HIDDEN_ACT[c.hidden_act], hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, max_position_embeddings=c.max_position_embeddings,
        type_vocab_size=c.type_vocab_size, layer_norm_eps=1e-12, **hf_kwargs)
    hf_config._attn_implementation = "eager"
    hf = hf_class(hf_config).eval()
    state = {}
    for w in modeling.name_table(model):
        value = w.variable.numpy()
        state[w.hf_name] = torch.from_numpy(np.ascontiguousarray(value.T if w.transpose else value))
    result = hf.load_state_dict(state, strict=False)
    # Only the tied decoder may be absent from our table; our pooler is extra where HF's task class
    # has none (transformers itself ignores a pooler on load there, as in Google's checkpoints).
    assert set(result.unexpected_keys) <= ({"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
                                           if not hasattr(hf, "bert") or hf.bert.pooler is None else set())
    assert set(result.missing_keys) <= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    return hf


def hf_inputs(batch):
    return dict(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                attention_mask=torch.tensor(batch["input_mask"], dtype=torch.long),
                token_type_ids=torch.tensor(batch["segment_ids"], dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# BertConfig
# ---------------------------------------------------------------------------------------------

def test_config_reads_google_json_and_writes_back_unknown_keys(tmp_path):
    google = {"attention_probs_dropout_prob": 0.1, "directionality": "bidi", "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02,
              "intermediate_size": 3072, "max_position_embeddings": 512, "num_attention_heads": 12,
              "num_hidden_layers": 12, "pooler_fc_size": 768, "pooler_num_fc_layers": 3,
              "type_vocab_size": 2, "vocab_size": 21128}
    path = tmp_path / "bert_config.json"
    path.write_text(json.dumps(google))
    config = modeling.BertConfig.from_json_file(path)
    assert config.num_hidden_layers == 12 and config.vocab_size == 21128
    assert config.extra == {"directionality": "bidi", "pooler_fc_size": 768, "pooler_num_fc_layers": 3}
    config.to_json_file(tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text()) == google
    assert modeling.BertConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 99}, "'hidden_size' = 99 must be a multiple of num_attention_heads"),
    ({"hidden_act": "swish"}, "'hidden_act' = 'swish' is not one of"),
    ({"num_hidden_layers": "12"}, "'num_hidden_layers' = '12' must be of type int"),
    ({"hidden_dropout_prob": 1.5}, "'hidden_dropout_prob' = 1.5 must be in [0, 1)"),
    ({"vocab_size": None}, "'vocab_size' is required"),
])
def test_config_bad_value_is_an_error_naming_file_and_field(tmp_path, change, message):
    d = small_config().to_dict()
    d.update(change)
    d = {k: v for k, v in d.items() if v is not None}
    path = tmp_path / "bad_config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError) as error:
        modeling.BertConfig.from_json_file(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_config_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "vocab_size": 10,\n  oops\n}')
    with pytest.raises(ValueError, match=r"broken\.json:3: not valid JSON"):
        modeling.BertConfig.from_json_file(path)


def test_shipped_configs_cover_every_size_with_heads_of_64():
    for layers in (2, 4, 6, 8, 10, 12):
        for hidden in (128, 256, 512, 768):
            c = modeling.BertConfig.from_json_file(RESOURCES / f"bert_config_L{layers}_H{hidden}.json")
            assert (c.num_hidden_layers, c.hidden_size) == (layers, hidden)
            assert c.num_attention_heads == hidden // 64 and c.intermediate_size == 4 * hidden
            assert c.vocab_size == 21128 and c.max_position_embeddings == 512
    large = modeling.BertConfig.from_json_file(RESOURCES / "bert_config_large.json")
    assert (large.num_hidden_layers, large.hidden_size, large.num_attention_heads) == (24, 1024, 16)
    base = modeling.BertConfig.from_json_file(RESOURCES / "bert_config_base.json")
    assert (base.num_hidden_layers, base.hidden_size, base.num_attention_heads) == (12, 768, 12)
    tiny = modeling.BertConfig.from_json_file(RESOURCES / "bert_config_tiny.json")
    with open(RESOURCES / "vocab.txt", encoding="utf-8") as f:
        assert tiny.vocab_size == sum(1 for _ in f)


# ---------------------------------------------------------------------------------------------
# Encoder and heads
# ---------------------------------------------------------------------------------------------

def test_outputs_have_documented_shapes_and_float32():
    c = small_config()
    batch = random_batch(c)
    assert modeling.build_model(modeling.BertPretrainer(c))(batch).shape == (3, 5, c.vocab_size)
    classifier = modeling.build_model(modeling.BertClassifier(c, num_labels=3))
    assert classifier(batch).shape == (3, 3)
    assert modeling.build_model(modeling.BertTokenClassifier(c, num_labels=7))(batch).shape == (3, 16, 7)
    start, end = modeling.build_model(modeling.BertSpanQA(c))(batch)
    assert start.shape == end.shape == (3, 16) and start.dtype == tf.float32
    outputs = classifier.bert(batch)
    assert outputs["sequence_output"].shape == (3, 16, 64)
    assert outputs["pooled_output"].shape == (3, 64)


def test_every_model_holds_a_pooler_and_only_the_classifier_trains_it():
    """Google's checkpoints, keras-hub and BertModel expect a pooler; only a classifier's loss reaches it."""
    c = small_config()
    for model, trained in [(modeling.BertPretrainer(c), False), (modeling.BertClassifier(c, 2), True),
                           (modeling.BertTokenClassifier(c, 2), False), (modeling.BertSpanQA(c), False)]:
        names = {w.google_name for w in modeling.name_table(modeling.build_model(model))}
        assert {"bert/pooler/dense/kernel", "bert/pooler/dense/bias"} <= names, model.name
        trainable = {id(v) for v in model.trainable_variables}
        assert (id(model.bert.pooler.kernel) in trainable) == trained, model.name


def test_make_task_model_builds_each_tasks_class():
    c = small_config()
    for task, cls in modeling.TASK_MODELS.items():
        model = modeling.make_task_model(c, task, num_labels=3)
        assert type(model) is cls and model.built and modeling.name_table(model)
    assert modeling.make_task_model(c, "ner", num_labels=5).num_labels == 5
    with pytest.raises(ValueError, match="task classifier needs the number of labels"):
        modeling.make_task_model(c, "classifier")
    with pytest.raises(ValueError, match="task 'nsp' is not one of mlm, classifier, ner, qa"):
        modeling.make_task_model(c, "nsp")


def test_padding_does_not_change_outputs_of_real_tokens():
    c = small_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = randomize(modeling.build_model(modeling.BertPretrainer(c)))
    batch = random_batch(c)
    short = {k: v[:1, :10] for k, v in batch.items() if k != "masked_lm_positions"}
    padded = {k: np.pad(v, [(0, 0), (0, 6)]) for k, v in short.items()}
    a = model.bert(short)["sequence_output"].numpy()
    b = model.bert(padded)["sequence_output"].numpy()[:, :10]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_an_encoder_given_its_real_tokens_computes_only_those_with_the_same_outputs():
    """packed_tokens (TokenLayout): token-wise layers on the listed tokens only; the real
    tokens' outputs are those of the padded call, the tokens not listed come out as zeros."""
    c = small_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = randomize(modeling.build_model(modeling.BertPretrainer(c)))
    batch = {k: v for k, v in random_batch(c).items() if k != "masked_lm_positions"}  # [3, 16]
    batch["input_mask"] = (np.arange(16)[None, :] < np.array([[16], [5], [11]])).astype(np.int32)
    real = np.flatnonzero(batch["input_mask"].reshape(-1))                            # 32 tokens
    padding = np.flatnonzero(batch["input_mask"].reshape(-1) == 0)[:4]
    expected = model.bert(batch)["sequence_output"].numpy().reshape(48, -1)
    for tokens in (real, np.concatenate([real, padding])):  # padding may be listed too
        got = model.bert(dict(batch, packed_tokens=tokens))["sequence_output"].numpy().reshape(48, -1)
        np.testing.assert_allclose(got[real], expected[real], atol=1e-5)
        unlisted = np.setdiff1d(np.arange(48), tokens)
        assert (got[unlisted] == 0).all()


def test_mlm_gathers_masked_positions_and_decodes_with_the_word_embeddings():
    c = small_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = randomize(modeling.build_model(modeling.BertPretrainer(c)))
    batch = random_batch(c, seq=12)
    all_positions = dict(batch, masked_lm_positions=np.tile(np.arange(12, dtype=np.int32), (3, 1)))
    every = model(all_positions).numpy()                                      # [B, S, V]
    picked = model(batch).numpy()                                             # [B, P, V]
    expected = np.take_along_axis(every, batch["masked_lm_positions"][:, :, None], axis=1)
    np.testing.assert_allclose(picked, expected, atol=1e-5)
    # Tied decoder: no separate [H, V] matrix, and the logits follow the embedding table.
    assert all(tuple(w.shape) != (c.hidden_size, c.vocab_size) for w in model.weights)
    x = model.mlm.layer_norm(model.mlm.transform(
        tf.gather(model.bert(batch)["sequence_output"], batch["masked_lm_positions"], batch_dims=1)))
    manual = x.numpy() @ model.bert.word_embeddings.numpy().T + model.mlm.output_bias.numpy()
    np.testing.assert_allclose(picked, manual, atol=1e-4)


def test_dropout_is_active_only_in_training():
    c = small_config(hidden_dropout_prob=0.3)
    model = modeling.build_model(modeling.BertClassifier(c, 2))
    batch = random_batch(c)
    np.testing.assert_array_equal(model(batch).numpy(), model(batch, training=False).numpy())
    assert not np.allclose(model(batch, training=True).numpy(), model(batch).numpy())


@pytest.mark.parametrize("shape", [(8, 128, 256), (3, 5, 7)])
def test_dropout_drops_its_rate_scales_the_rest_and_draws_new_masks_each_call(shape):
    layer = modeling.Dropout(0.1, seed=7)
    x = tf.ones(shape)
    first, second = (layer(x, training=True).numpy() for _ in range(2))
    kept = first != 0
    np.testing.assert_allclose(first[kept], 1 / 0.9, rtol=1e-6)
    tolerance = 4 * math.sqrt(0.1 * 0.9 / kept.size) + 1e-4  # 4 sigma of a binomial share
    assert abs(1 - kept.mean() - 0.1) < tolerance
    assert (first != second).any()  # the seed generator moved on
    np.testing.assert_array_equal(layer(x).numpy(), x.numpy())  # inference: identity
    # The same seed state gives the same masks (what resumed runs and replicas rely on).
    again = modeling.Dropout(0.1, seed=7)
    np.testing.assert_array_equal(again(x, training=True).numpy(), first)


def _splitmix64_reference(seed, n):
    """SplitMix64 in Python integers, as splitmix64_bits documents it: high 32 bits of n outputs."""
    mask = 2**64 - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)
    key = mix((mix(seed[0] & mask) + (seed[1] & mask)) & mask)
    return [mix((key + i * 0x9E3779B97F4A7C15) & mask) >> 32 for i in range(1, n + 1)]


def test_dropout_bits_are_splitmix64_in_eager_and_under_xla():
    # The generator's published first output from state 0 (state + gamma, mixed).
    gamma = tf.constant(0x9E3779B97F4A7C15, tf.uint64)
    assert int(modeling._mix64(gamma).numpy()) == 0xE220A8397B1DCDAF
    seed = tf.constant([7, -3], tf.int64)  # a negative counter: the seed's bits, not its value
    expected = np.array(_splitmix64_reference([7, -3], 2 * 3 * 5), np.uint32).reshape(2, 3, 5)
    shape = tf.constant([2, 3, 5], tf.int64)
    np.testing.assert_array_equal(modeling.splitmix64_bits(seed, shape).numpy(), expected)
    compiled = tf.function(modeling.splitmix64_bits, jit_compile=True)
    np.testing.assert_array_equal(compiled(seed, shape).numpy(), expected)
    # Every bit is a fair coin over 2^16 draws, and the next counter gives other bits.
    bits = modeling.splitmix64_bits(seed, tf.constant([65536], tf.int64)).numpy()
    ones = (bits[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    assert np.all(np.abs(ones.mean(0) - 0.5) < 4 * 0.5 / 256)  # 4 sigma
    other = modeling.splitmix64_bits(tf.constant([7, -2], tf.int64), tf.constant([65536], tf.int64))
    assert np.mean(bits == other.numpy()) < 1e-3


def test_mixed_bfloat16_policy_keeps_float32_variables_and_outputs():
    c = small_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    batch = random_batch(c)
    reference = randomize(modeling.build_model(modeling.BertPretrainer(c)))
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = modeling.build_model(modeling.BertPretrainer(c))
        for ours, theirs in zip(modeling.name_table(model), modeling.name_table(reference)):
            ours.variable.assign(theirs.variable)
        logits = model(batch)
        assert all(v.dtype == "float32" for v in model.weights)
        start, _ = modeling.build_model(modeling.BertSpanQA(c))(batch)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert logits.dtype == tf.float32 and start.dtype == tf.float32
    expected = reference(batch).numpy()
    assert np.abs(logits.numpy() - expected).max() < 0.1 * np.abs(expected).max()


def test_sequence_longer_than_position_table_is_a_clear_error():
    c = small_config(max_position_embeddings=8)
    model = modeling.build_model(modeling.BertClassifier(c, 2))
    with pytest.raises(ValueError, match="sequence length 9 > max_position_embeddings 8"):
        model({"input_ids": np.zeros((1, 9), np.int32)})


# ---------------------------------------------------------------------------------------------
# Name table and parity with transformers
# ---------------------------------------------------------------------------------------------

def test_name_table_has_designs_google_names():
    c = small_config(num_hidden_layers=1)
    model = modeling.build_model(modeling.BertPretrainer(c))
    names = [w.google_name for w in modeling.name_table(model)]
    layer = "bert/encoder/layer_0"
    expected = (
        ["bert/embeddings/word_embeddings", "bert/embeddings/token_type_embeddings",
         "bert/embeddings/position_embeddings", "bert/embeddings/LayerNorm/gamma",
         "bert/embeddings/LayerNorm/beta"]
        + [f"{layer}/attention/self/{p}/{k}" for p in ("query", "key", "value") for k in ("kernel", "bias")]
        + [f"{layer}/attention/output/dense/kernel", f"{layer}/attention/output/dense/bias",
           f"{layer}/attention/output/LayerNorm/gamma", f"{layer}/attention/output/LayerNorm/beta",
           f"{layer}/intermediate/dense/kernel", f"{layer}/intermediate/dense/bias",
           f"{layer}/output/dense/kernel", f"{layer}/output/dense/bias",
           f"{layer}/output/LayerNorm/gamma", f"{layer}/output/LayerNorm/beta",
           "bert/pooler/dense/kernel", "bert/pooler/dense/bias",
           "cls/predictions/transform/dense/kernel", "cls/predictions/transform/dense/bias",
           "cls/predictions/transform/LayerNorm/gamma", "cls/predictions/transform/LayerNorm/beta",
           "cls/predictions/output_bias"])
    assert names == expected
    qa = {w.google_name: w for w in modeling.name_table(modeling.build_model(modeling.BertSpanQA(c)))}
    assert tuple(qa["cls/squad/output_weights"].variable.shape) == (2, c.hidden_size)
    assert qa["cls/squad/output_weights"].hf_name == "qa_outputs.weight"
    head = {w.google_name: w for w in
            modeling.name_table(modeling.build_model(modeling.BertClassifier(c, 5)))}
    assert tuple(head["output_weights"].variable.shape) == (5, c.hidden_size)
    assert head["output_bias"].hf_name == "classifier.bias"


@pytest.mark.parametrize("overrides", [
    dict(),                                                              # H=64, 2 heads, gelu (tanh)
    dict(vocab_size=300, hidden_size=96, num_attention_heads=4, intermediate_size=200,
         num_hidden_layers=3, hidden_act="gelu_exact"),                  # D=24, erf gelu
], ids=["H64_L2_gelu", "H96_L3_gelu_exact"])
@needs_transformers
def test_encoder_and_mlm_logits_equal_transformers(overrides):
    c = small_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **overrides)
    model = randomize(modeling.build_model(modeling.BertPretrainer(c)))
    hf = to_hf(model, transformers.BertForMaskedLM)
    batch = random_batch(c)
    with torch.no_grad():
        out = hf(**hf_inputs(batch), output_hidden_states=True)
    np.testing.assert_allclose(model.bert(batch)["sequence_output"].numpy(),
                               out.hidden_states[-1].numpy(), atol=1e-4)
    expected = np.take_along_axis(out.logits.numpy(), batch["masked_lm_positions"][:, :, None], axis=1)
    np.testing.assert_allclose(model(batch).numpy(), expected, atol=1e-4)


@needs_transformers
def test_task_heads_equal_transformers():
    c = small_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    batch = random_batch(c)
    ours = randomize(modeling.build_model(modeling.BertClassifier(c, num_labels=3)))
    hf = to_hf(ours, transformers.BertForSequenceClassification, num_labels=3)
    with torch.no_grad():
        np.testing.assert_allclose(ours(batch).numpy(), hf(**hf_inputs(batch)).logits.numpy(), atol=1e-4)

    ours = randomize(modeling.build_model(modeling.BertTokenClassifier(c, num_labels=5)))
    hf = to_hf(ours, transformers.BertForTokenClassification, num_labels=5)
    with torch.no_grad():
        np.testing.assert_allclose(ours(batch).numpy(), hf(**hf_inputs(batch)).logits.numpy(), atol=1e-4)

    ours = randomize(modeling.build_model(modeling.BertSpanQA(c)))
    hf = to_hf(ours, transformers.BertForQuestionAnswering)
    start, end = ours(batch)
    with torch.no_grad():
        out = hf(**hf_inputs(batch))
    np.testing.assert_allclose(start.numpy(), out.start_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(end.numpy(), out.end_logits.numpy(), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def write_tf1_checkpoint(prefix, tensors):
    """A name-based checkpoint as Google's TF1 code wrote it: a Saver over variables named by scope."""
    with tf.Graph().as_default():
        variables = [tf.compat.v1.Variable(value, name=name) for name, value in tensors.items()]
        saver = tf.compat.v1.train.Saver(variables)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(prefix))


def google_checkpoint_tensors(config, seed=3):
    """What bert_model.ckpt holds: encoder + pooler + MLM + NSP heads, adam slots and global_step."""
    source = randomize(modeling.build_model(modeling.BertClassifier(config, 2)), seed)
    tensors = {w.google_name: w.variable.numpy() for w in modeling.name_table(source)
               if not w.google_name.startswith("output_")}
    pretrainer = randomize(modeling.build_model(modeling.BertPretrainer(config)), seed + 1)
    tensors.update({w.google_name: w.variable.numpy() for w in modeling.name_table(pretrainer)
                    if w.google_name.startswith("cls/")})
    tensors["cls/seq_relationship/output_weights"] = np.zeros((2, config.hidden_size), np.float32)
    tensors["cls/seq_relationship/output_bias"] = np.zeros((2,), np.float32)
    tensors["bert/embeddings/word_embeddings/adam_m"] = np.ones((config.vocab_size, config.hidden_size),
                                                                np.float32)
    tensors["bert/embeddings/word_embeddings/adam_v"] = np.ones((config.vocab_size, config.hidden_size),
                                                                np.float32)
    tensors["global_step"] = np.int64(1000)
    return tensors


def test_google_tf1_checkpoint_loads_into_pretrainer_and_classifier(tmp_path):
    c = small_config()
    tensors = google_checkpoint_tensors(c)
    write_tf1_checkpoint(tmp_path / "bert_model.ckpt", tensors)

    pretrainer = modeling.build_model(modeling.BertPretrainer(c))
    report = modeling.load_pretrained(pretrainer, tmp_path / "bert_model.ckpt")
    assert report.newly_initialized == []
    assert set(report.unused) == {"cls/seq_relationship/output_weights", "cls/seq_relationship/output_bias"}
    for w in modeling.name_table(pretrainer):
        np.testing.assert_array_equal(w.variable.numpy(), tensors[w.google_name], err_msg=w.google_name)

    classifier = modeling.build_model(modeling.BertClassifier(c, 3))
    report = modeling.load_pretrained(classifier, tmp_path)  # a directory works too
    assert report.newly_initialized == ["output_weights", "output_bias"]
    np.testing.assert_array_equal(classifier.bert.pooler.kernel.numpy(), tensors["bert/pooler/dense/kernel"])


def test_missing_or_misshaped_tensor_is_an_error_naming_it(tmp_path):
    c = small_config()
    tensors = google_checkpoint_tensors(c)
    del tensors["bert/encoder/layer_1/attention/self/key/kernel"]
    write_tf1_checkpoint(tmp_path / "missing" / "bert_model.ckpt", tensors)
    model = modeling.build_model(modeling.BertPretrainer(c))
    with pytest.raises(ValueError, match="'bert/encoder/layer_1/attention/self/key/kernel' is missing"):
        modeling.load_pretrained(model, tmp_path / "missing" / "bert_model.ckpt")

    bigger_vocab = modeling.build_model(modeling.BertPretrainer(small_config(vocab_size=130)))
    write_tf1_checkpoint(tmp_path / "full" / "bert_model.ckpt", google_checkpoint_tensors(c))
    with pytest.raises(ValueError, match=r"'bert/embeddings/word_embeddings' has shape \(120, 64\) "
                                         r"in the checkpoint, but the model expects \(130, 64\)"):
        modeling.load_pretrained(bigger_vocab, tmp_path / "full")
    with pytest.raises(ValueError, match="no checkpoint there"):
        modeling.load_pretrained(model, tmp_path / "nowhere" / "ckpt-1")


def test_pretraining_checkpoint_restores_into_classifier_with_new_head_reported(tmp_path):
    c = small_config()
    pretrainer = randomize(modeling.build_model(modeling.BertPretrainer(c)))
    step = tf.Variable(7, dtype=tf.int64)
    manager = tf.train.CheckpointManager(modeling.make_checkpoint(pretrainer, step=step),
                                         tmp_path, max_to_keep=2)
    manager.save()
    keys = {name for name, _ in tf.train.list_variables(manager.latest_checkpoint)}
    assert "bert.Sencoder.Slayer_1.Sattention.Sself.Squery.Skernel/.ATTRIBUTES/VARIABLE_VALUE" in keys

    classifier = modeling.build_model(modeling.BertClassifier(c, 4))
    report = modeling.load_pretrained(classifier, tmp_path)
    assert report.newly_initialized == ["output_weights", "output_bias"]
    # The pretrainer's (untrained) pooler travels with the encoder, so every model has the same one.
    np.testing.assert_array_equal(classifier.bert.pooler.kernel.numpy(), pretrainer.bert.pooler.kernel.numpy())
    assert sorted(report.unused) == sorted(w.google_name for w in modeling.name_table(pretrainer)
                                           if w.google_name.startswith("cls/"))
    np.testing.assert_array_equal(classifier.bert.word_embeddings.numpy(),
                                  pretrainer.bert.word_embeddings.numpy())

    # Resuming: the same checkpoint restores exactly into a fresh pretrainer, extras included.
    fresh = modeling.build_model(modeling.BertPretrainer(c))
    fresh_step = tf.Variable(0, dtype=tf.int64)
    modeling.make_checkpoint(fresh, step=fresh_step).restore(manager.latest_checkpoint).assert_consumed()
    assert int(fresh_step.numpy()) == 7
    for a, b in zip(modeling.name_table(fresh), modeling.name_table(pretrainer)):
        np.testing.assert_array_equal(a.variable.numpy(), b.variable.numpy())


def test_classifier_checkpoint_restores_into_encoder_of_token_classifier(tmp_path):
    c = small_config()
    classifier = randomize(modeling.build_model(modeling.BertClassifier(c, 3)))
    prefix = modeling.make_checkpoint(classifier).save(str(tmp_path / "ckpt"))
    tagger = modeling.build_model(modeling.BertTokenClassifier(c, 3))
    report = modeling.load_pretrained(tagger, prefix)
    # Both heads are called output_weights/output_bias in Google's scripts, so the shapes decide.
    assert report.newly_initialized == [] and report.unused == []


def test_stateless_call_under_xla_matches_eager_call():
    # run_pretraining compiles a pure function of the variable values (XLA cannot touch mirrored
    # variables), so the model must honour Keras' stateless_call.
    c = small_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = randomize(modeling.build_model(modeling.BertPretrainer(c)))
    batch = random_batch(c)
    shifted = [v.value + 0.01 for v in model.trainable_variables]

    frozen = [v.value for v in model.non_trainable_variables]  # the pooler, unused by the MLM

    @tf.function(jit_compile=True)
    def logits_from_values(trainable, batch):
        logits, _ = model.stateless_call(trainable, frozen, batch, training=False)
        return logits

    expected = model(batch).numpy()
    np.testing.assert_allclose(logits_from_values(model.trainable_variables, batch), expected, atol=1e-4)
    moved = logits_from_values(shifted, batch).numpy()
    assert np.abs(moved - expected).max() > 1e-3  # the values passed in are the ones used
    np.testing.assert_array_equal(model(batch).numpy(), expected)  # and the variables are untouched


# ---------------------------------------------------------------------------------------------
# tf.function, XLA and MirroredStrategy (a subprocess: logical devices must be set before TF starts)
# ---------------------------------------------------------------------------------------------

_STRATEGY_SCRIPT = textwrap.dedent("""
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import modeling
    c = modeling.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
    rng = np.random.RandomState(0)
    batch = {"input_ids": rng.randint(0, 50, (4, 8)).astype(np.int32),
             "input_mask": np.ones((4, 8), np.int32), "segment_ids": np.zeros((4, 8), np.int32),
             "masked_lm_positions": rng.randint(0, 8, (4, 2)).astype(np.int32)}
    single = modeling.build_model(modeling.BertPretrainer(c))
    expected = single(batch).numpy()
    xla = tf.function(lambda b: single(b), jit_compile=True)(batch).numpy()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = modeling.build_model(modeling.BertPretrainer(c))
    for a, b in zip(modeling.name_table(model), modeling.name_table(single)):
        a.variable.assign(b.variable.numpy())
    dist = strategy.experimental_distribute_values_from_function(
        lambda ctx: {k: v[ctx.replica_id_in_sync_group * 2:][:2] for k, v in batch.items()})
    out = tf.function(lambda d: strategy.run(model, args=(d,)))(dist)
    mirrored = np.concatenate([t.numpy() for t in strategy.experimental_local_results(out)])
    print("DIFFS", np.abs(xla - expected).max(), np.abs(mirrored - expected).max())
""")


def test_model_runs_under_xla_and_mirrored_strategy_with_same_logits():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", _STRATEGY_SCRIPT], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    xla_diff, mirrored_diff = map(float, result.stdout.split("DIFFS")[1].split())
    assert xla_diff < 1e-4 and mirrored_diff < 1e-5
