"""BERT (post-LayerNorm, as in google-research/bert) for Chinese pretraining and fine-tuning, in Keras 3.

Reading guide, top to bottom:
  1. `BertConfig`     reads and writes Google's `bert_config.json`.
  2. Layers           embeddings, self-attention, transformer layer, the encoder (`BertEncoder`);
                      `TokenLayout` when a caller asks for the real tokens only (packing).
  3. Models           `BertPretrainer` (masked LM, decoder tied to the word embeddings) and the
                      fine-tuning heads `BertClassifier`, `BertTokenClassifier`, `BertSpanQA`.
  4. Names            `name_table`: every weight -> its Google TF1 name and its HuggingFace name.
  5. Checkpoints      `make_checkpoint` (our TF2 format, keyed by Google names), `save_weights`
                      (backend-free safetensors, keyed by Google names) and `load_pretrained` (those,
                      Google/brightmart TF1 `bert_model.ckpt` and HuggingFace folders).

Dimension legend used in shape comments:
  B batch size       S sequence length     H hidden size        N attention heads
  D size per head    I intermediate size   P masked positions   V vocabulary size   C labels

Outputs of every model are float32, also under the "mixed_bfloat16" Keras policy (variables stay
float32, matmuls run in bfloat16). The layers use keras.ops only, so the same model (names, weights,
logits) runs under KERAS_BACKEND=tensorflow and KERAS_BACKEND=jax; TensorFlow is imported only by
the TF checkpoint functions in section 5.

Longer than our ~600-line aim (~720) on purpose: like google-research/bert's modeling.py it holds the
config, layers, models, name table and checkpoint rules in one file read top to bottom, because the
layer names *are* the checkpoint format.
"""

import collections
import functools
import json
import math
import os
import re

import keras
import numpy as np
from absl import logging
from keras import ops

import file_output
import model_folder

# ------------------------------------------------------------------------------------------------
# 1. Configuration
# ------------------------------------------------------------------------------------------------

# Google's field -> (type, default). `vocab_size` has no default: a config without it is a mistake.
_CONFIG_FIELDS = collections.OrderedDict([
    ("vocab_size", (int, None)),
    ("hidden_size", (int, 768)),
    ("num_hidden_layers", (int, 12)),
    ("num_attention_heads", (int, 12)),
    ("intermediate_size", (int, 3072)),
    ("hidden_act", (str, "gelu")),
    ("hidden_dropout_prob", (float, 0.1)),
    ("attention_probs_dropout_prob", (float, 0.1)),
    ("max_position_embeddings", (int, 512)),
    ("type_vocab_size", (int, 2)),
    ("initializer_range", (float, 0.02)),
])

# "gelu" is Google's tanh approximation, so Google checkpoints reproduce; HuggingFace calls it
# "gelu_new" (accepted here as an alias) and uses "gelu" for the exact erf form, our "gelu_exact".
_ACTIVATIONS = {
    "gelu": lambda x: keras.activations.gelu(x, approximate=True),
    "gelu_new": lambda x: keras.activations.gelu(x, approximate=True),
    "gelu_exact": lambda x: keras.activations.gelu(x, approximate=False),
    "relu": keras.activations.relu,
}
# Our hidden_act -> the HuggingFace `hidden_act` that computes the same function (for exporters).
HF_HIDDEN_ACT = {"gelu": "gelu_new", "gelu_new": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}
# HF hidden_act -> ours (the inverse of HF_HIDDEN_ACT, for importers).
HIDDEN_ACT_FROM_HF = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact",
                      "relu": "relu"}
LAYER_NORM_EPS = 1e-12


class BertConfig:
    """Hyper-parameters of a BERT model, in the fields and JSON layout of Google's `bert_config.json`.

    Keys we do not know (e.g. `directionality`, `pooler_*` from Google's files) are kept in `.extra`
    and written back unchanged. A missing or bad value raises ValueError naming the source and field.

    >>> config = BertConfig(vocab_size=21128, hidden_size=128, num_hidden_layers=2,
    ...                     num_attention_heads=2, intermediate_size=512)
    """

    def __init__(self, vocab_size=None, _source="BertConfig", **kwargs):
        values = dict(kwargs, vocab_size=vocab_size)
        for field, (kind, default) in _CONFIG_FIELDS.items():
            value = values.pop(field, default)
            if value is None:
                raise ValueError(f"{_source}: field '{field}' is required")
            setattr(self, field, _check_type(value, kind, field, _source))
        self.extra = values
        self._validate(_source)

    def _validate(self, source):
        def fail(field, why):
            raise ValueError(f"{source}: field '{field}' = {getattr(self, field)!r} {why}")

        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                      "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            if getattr(self, field) < 1:
                fail(field, "must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            fail("hidden_size", f"must be a multiple of num_attention_heads ({self.num_attention_heads})")
        if self.hidden_act not in _ACTIVATIONS:
            fail("hidden_act", f"is not one of {sorted(_ACTIVATIONS)}")
        for field in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, field) < 1.0:
                fail(field, "must be in [0, 1)")
        if self.initializer_range <= 0:
            fail("initializer_range", "must be > 0")

    @classmethod
    def from_dict(cls, d, source="<dict>"):
        """Google's fields; a transformers config.json (it names a model_type) is translated."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if "model_type" in d or "architectures" in d:
            d = _bert_fields_from_hf(d, source)
        return cls(_source=source, **d)

    @classmethod
    def from_json_file(cls, path):
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except OSError as e:
            raise ValueError(f"{path}: cannot read bert config ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        return cls.from_dict(d, source=path)

    def to_dict(self):
        d = {field: getattr(self, field) for field in _CONFIG_FIELDS}
        d.update(self.extra)
        return d

    def to_json_string(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    def to_json_file(self, path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def __eq__(self, other):
        return isinstance(other, BertConfig) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"BertConfig({self.to_dict()})"


def _bert_fields_from_hf(hf, path):
    """Google bert_config.json fields from a transformers config.json dict; ValueError naming `path`.

    HF's "gelu" is the exact erf GELU (our "gelu_exact"); HF's "gelu_new" is Google's tanh "gelu".
    """
    model_type, architectures = hf.get("model_type"), hf.get("architectures") or []
    if model_type is None and not any(a.startswith("Bert") for a in architectures):
        raise ValueError(f"{path}: no model_type and architectures {architectures} are not BERT")
    if model_type not in (None, "bert"):
        raise ValueError(f"{path}: model_type {model_type!r} is not BERT; only model_type 'bert' "
                         f"(Google/UER/HF Chinese BERT and RoBERTa-wwm folders) can be imported")
    act = hf.get("hidden_act", "gelu")
    if act not in HIDDEN_ACT_FROM_HF:
        raise ValueError(f"{path}: hidden_act {act!r} is not supported; expected one of "
                         f"{sorted(HIDDEN_ACT_FROM_HF)}")
    if abs(hf.get("layer_norm_eps", LAYER_NORM_EPS) - LAYER_NORM_EPS) > 1e-15:
        raise ValueError(f"{path}: layer_norm_eps {hf['layer_norm_eps']} differs from BERT's 1e-12, "
                         f"which our model uses")
    if hf.get("position_embedding_type", "absolute") != "absolute" or hf.get("is_decoder"):
        raise ValueError(f"{path}: only encoder BERTs with absolute position embeddings are supported")
    out = {}
    for name, (_, default) in _CONFIG_FIELDS.items():
        if name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            default = None  # transformers' defaults are not a Chinese model's: the file must say
        if name not in hf and default is None:
            raise ValueError(f"{path}: field {name!r} is missing")
        out[name] = hf.get(name, default)
    out["hidden_act"] = HIDDEN_ACT_FROM_HF[act]
    return out


def _check_type(value, kind, field, source):
    # JSON has no int/float distinction we can trust (2 vs 2.0), but a bool or a string is a mistake.
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{source}: field '{field}' = {value!r} must be of type {kind.__name__}")
    return value


# ------------------------------------------------------------------------------------------------
# 2. Layers. Sub-layer names follow Google's variable scopes, so the table in section 4 reads easily.
# ------------------------------------------------------------------------------------------------

def _initializer(config):
    return keras.initializers.TruncatedNormal(stddev=config.initializer_range)


def _layer_norm(name):
    return keras.layers.LayerNormalization(epsilon=1e-12, name=name)


# Keras' dropout turns its int64 seed state into int32 seeds by floormod with this (the trainer gives
# each replica its own part of this range, run_pretraining.MaskedLMTrainer._seed_offset).
SEED_MODULUS = 2**31 - 2

_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's step between counters: 2^64 / golden ratio, odd


def _mix64(z):
    """SplitMix64's output function (Steele, Lea & Flood 2014; Stafford's "mix13"): uint64 -> uint64,
    a bijection in which every input bit flips about half the output bits."""
    import tensorflow as tf
    for shift, multiplier in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(shift, tf.uint64)))
        z = z * tf.constant(multiplier, tf.uint64)
    return tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(31, tf.uint64)))


def splitmix64_bits(seed, shape):
    """int64 [2] seed -> uint32 `shape`: the high halves of the first n outputs of SplitMix64 from
    the state mix(mix(seed[0]) + seed[1]). Element i is mix(key + (i + 1) * gamma), a function of its
    own index only, so XLA computes it inside the fusion that consumes it, with no tensor of random
    numbers in memory. SplitMix64 passes BigCrush (it is Java's SplittableRandom). Two calls' streams
    of n elements overlap only when their keys differ by d * gamma with |d| < n: odds of about
    2n / 2^64 for a pair (n is ~2^21 for the largest activation at L4/H256, batch 32)."""
    import tensorflow as tf
    seed = tf.bitcast(tf.cast(seed, tf.int64), tf.uint64)
    key = _mix64(_mix64(seed[0]) + seed[1])
    index = tf.bitcast(tf.range(1, tf.reduce_prod(shape) + 1, dtype=tf.int64),
                       tf.uint64)
    state = key + index * tf.constant(_GOLDEN_GAMMA, tf.uint64)
    high = tf.cast(tf.bitwise.right_shift(_mix64(state), tf.constant(32, tf.uint64)), tf.uint32)
    return tf.reshape(high, shape)


class Dropout(keras.layers.Dropout):
    """keras.layers.Dropout; under TensorFlow, with masks hashed from each element's index.

    Random numbers were most of dropout's cost on a CPU: with Keras' TF dropout (one float per
    element, TF's "auto_select" generator, which XLA compiles into a slow loop of its own) dropout
    was ~17% of the L4/H256 train step on our 2-core CPU, with one Philox word per two elements
    ~11%; hashed (`splitmix64_bits`), XLA folds the mask into the surrounding element-wise work and
    the step runs as fast as without dropout (README, "Measured here"). Each element is dropped when
    its 32 random bits are below round(rate * 2^32). One seed-generator draw per call, as Keras;
    other masks than Keras'. The JAX backend keeps Keras' dropout (no uint64 without jax x64).
    """

    def call(self, inputs, training=False):
        if not (training and self.rate > 0) or keras.backend.backend() != "tensorflow":
            return super().call(inputs, training=training)
        import tensorflow as tf
        bits = splitmix64_bits(self.seed_generator.next(), tf.shape(inputs, out_type=tf.int64))
        keep = bits >= tf.constant(round(self.rate * 2**32), tf.uint32)
        return tf.where(keep, inputs * (1.0 / (1.0 - self.rate)), tf.zeros_like(inputs))


class Embeddings(keras.layers.Layer):
    """word + position + token-type embeddings, then LayerNorm and dropout ("bert/embeddings")."""

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.layer_norm = _layer_norm("LayerNorm")
        self.dropout = Dropout(config.hidden_dropout_prob)

    def build(self, input_shape):
        c, init = self.config, _initializer(self.config)
        self.word_embeddings = self.add_weight(
            name="word_embeddings", shape=(c.vocab_size, c.hidden_size), initializer=init)
        self.token_type_embeddings = self.add_weight(
            name="token_type_embeddings", shape=(c.type_vocab_size, c.hidden_size), initializer=init)
        self.position_embeddings = self.add_weight(
            name="position_embeddings", shape=(c.max_position_embeddings, c.hidden_size),
            initializer=init)
        self.layer_norm.build((None, None, c.hidden_size))

    def call(self, input_ids, segment_ids, training=False):
        seq_len = input_ids.shape[1]
        if seq_len is not None and seq_len > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {seq_len} > max_position_embeddings "
                             f"{self.config.max_position_embeddings} of the bert config")
        seq_len = ops.shape(input_ids)[1]
        x = (ops.take(self.word_embeddings, input_ids, axis=0)             # [B, S, H]
             + ops.take(self.token_type_embeddings, segment_ids, axis=0)   # [B, S, H]
             + self.position_embeddings[:seq_len])                         # [S, H], broadcast
        x = self.layer_norm(ops.cast(x, self.compute_dtype))
        return self.dropout(x, training=training)


class TokenLayout:
    """The tokens an encoder call computes in its token-wise layers, when not all of them.

    tokens: int32 [K], distinct indices into the flattened [B*S] batch (the trainer lists the
    real tokens, so padding costs nothing: run_pretraining.pack_tokens). Dense layers, LayerNorm
    and dropout then run on [K, H]; attention runs on [B, S, H], the tokens not listed being
    zeros there (they are padding: the attention bias hides them as keys, their own outputs are
    never read).
    """

    def __init__(self, tokens, batch, seq_len):
        self.tokens, self.shape = tokens, (batch, seq_len)
        k = ops.shape(tokens)[0]
        listed = ops.scatter(tokens[:, None], ops.arange(1, k + 1, dtype="int32"),
                             (batch * seq_len,))                                     # [B*S]
        self.slot = ops.where(listed > 0, listed - 1, k)  # row of each token; k: a zero row

    def pack(self, x):
        """[B, S, X] -> [K, X]"""
        return ops.take(ops.reshape(x, (-1, x.shape[-1])), self.tokens, axis=0)

    def unpack(self, x):
        """[K, X] -> [B, S, X], zeros at the tokens not listed"""
        rows = ops.concatenate([x, ops.zeros((1, x.shape[-1]), x.dtype)], axis=0)    # [K+1, X]
        return ops.reshape(ops.take(rows, self.slot, axis=0), self.shape + (x.shape[-1],))


class SelfAttention(keras.layers.Layer):
    """Multi-head self-attention + output projection + residual + LayerNorm ("layer_i/attention")."""

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        c, init = config, _initializer(config)
        self.num_heads = c.num_attention_heads
        self.head_size = c.hidden_size // c.num_attention_heads
        self.query = keras.layers.Dense(c.hidden_size, kernel_initializer=init, name="query")
        self.key = keras.layers.Dense(c.hidden_size, kernel_initializer=init, name="key")
        self.value = keras.layers.Dense(c.hidden_size, kernel_initializer=init, name="value")
        self.probs_dropout = Dropout(c.attention_probs_dropout_prob)
        self.output_dense = keras.layers.Dense(c.hidden_size, kernel_initializer=init, name="dense")
        self.output_dropout = Dropout(c.hidden_dropout_prob)
        self.output_norm = _layer_norm("LayerNorm")

    def _split_heads(self, x):
        # ops.shape gives dynamic sizes for the unknown dims under tf.function, static ones on JAX.
        return ops.reshape(x, ops.shape(x)[:2] + (self.num_heads, self.head_size))  # [B, S, N, D]

    def call(self, x, attention_bias, training=False, layout=None):
        """x: [B, S, H] (or [K, H] with a TokenLayout); attention_bias: [B, 1, 1, S], 0 for real
        tokens and -10000 for padding."""
        full = layout.unpack if layout is not None else lambda t: t  # [K, H] -> [B, S, H]
        q = self._split_heads(full(self.query(x)))                    # [B, S, N, D]
        k = self._split_heads(full(self.key(x)))                      # [B, S, N, D]
        v = self._split_heads(full(self.value(x)))                    # [B, S, N, D]
        scores = ops.einsum("bfnd,btnd->bnft", q, k)                  # [B, N, S(from), S(to)]
        # Softmax in float32: under bfloat16 the -10000 bias and large logits lose too much precision.
        scores = ops.cast(scores, "float32") * (1.0 / math.sqrt(self.head_size))
        scores += ops.cast(attention_bias, "float32")  # Keras casts float inputs to the policy dtype
        probs = ops.cast(ops.softmax(scores, axis=-1), self.compute_dtype)
        probs = self.probs_dropout(probs, training=training)
        context = ops.einsum("bnft,btnd->bfnd", probs, v)             # [B, S, N, D]
        context = ops.reshape(context, ops.shape(context)[:2] + (-1,))  # [B, S, H]
        if layout is not None:
            context = layout.pack(context)                            # [K, H]
        out = self.output_dropout(self.output_dense(context), training=training)
        return self.output_norm(x + out)                              # [B, S, H] or [K, H]


class TransformerLayer(keras.layers.Layer):
    """One post-LN encoder block: attention, then feed-forward H -> I -> H with residual + LayerNorm."""

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        c, init = config, _initializer(config)
        self.attention = SelfAttention(c, name="attention")
        self.intermediate = keras.layers.Dense(
            c.intermediate_size, activation=_ACTIVATIONS[c.hidden_act], kernel_initializer=init,
            name="intermediate")
        self.output_dense = keras.layers.Dense(c.hidden_size, kernel_initializer=init, name="output")
        self.output_dropout = Dropout(c.hidden_dropout_prob)
        self.output_norm = _layer_norm("LayerNorm")

    def call(self, x, attention_bias, training=False, layout=None):
        """x: [B, S, H], or [K, H] with a TokenLayout (shapes below: [B, S] or [K])."""
        x = self.attention(x, attention_bias, training=training, layout=layout)  # [B, S, H]
        h = self.intermediate(x)                                      # [B, S, I]
        h = self.output_dropout(self.output_dense(h), training=training)  # [B, S, H]
        return self.output_norm(x + h)                                # [B, S, H]


class BertEncoder(keras.layers.Layer):
    """The BERT backbone ("bert/..." in Google checkpoints).

    call(dict(input_ids [B,S] int, input_mask [B,S] int (1 = real token, optional),
              segment_ids [B,S] int (optional), packed_tokens [K] int (optional: TokenLayout)),
         training)
      -> dict(sequence_output [B,S,H] float32, pooled_output [B,H] float32)

    Every encoder holds the pooler (dense + tanh over [CLS]), as Google's checkpoints do and as
    keras-hub's BertBackbone and transformers' BertModel expect, so every checkpoint and export
    carries one. Only a model that uses it (`train_pooler`: the classifier) trains it; elsewhere it
    is frozen and passes unchanged from the init checkpoint to the export (for a model pretrained
    here it stays as initialised: MLM-only pretraining has no loss that reaches it).
    """

    def __init__(self, config, train_pooler=False, name="bert", **kwargs):
        super().__init__(name=name, **kwargs)
        self.config = config
        self.embeddings = Embeddings(config, name="embeddings")
        self.encoder_layers = [TransformerLayer(config, name=f"layer_{i}")
                               for i in range(config.num_hidden_layers)]
        self.pooler = keras.layers.Dense(config.hidden_size, activation="tanh",
                                         kernel_initializer=_initializer(config), name="pooler")
        self.pooler.trainable = train_pooler

    @property
    def word_embeddings(self):
        """The [V, H] word embedding variable, shared with the masked-LM decoder."""
        return self.embeddings.word_embeddings

    def call(self, inputs, training=False):
        input_ids = ops.cast(inputs["input_ids"], "int32")                           # [B, S]
        input_mask = inputs.get("input_mask")
        input_mask = ops.ones_like(input_ids) if input_mask is None else input_mask
        segment_ids = inputs.get("segment_ids")
        segment_ids = ops.zeros_like(input_ids) if segment_ids is None else segment_ids
        # Additive mask: 0 where attending is allowed, -10000 on padding keys (Google's choice).
        mask = ops.cast(input_mask, "float32")[:, None, None, :]                     # [B, 1, 1, S]
        attention_bias = (1.0 - mask) * -10000.0

        x = self.embeddings(input_ids, ops.cast(segment_ids, "int32"), training=training)
        packed_tokens = inputs.get("packed_tokens")  # [K]: compute only these (TokenLayout)
        layout = None
        if packed_tokens is not None:
            layout = TokenLayout(ops.cast(packed_tokens, "int32"), *ops.shape(input_ids))
            x = layout.pack(x)                                                        # [K, H]
        for layer in self.encoder_layers:
            x = layer(x, attention_bias, training=training, layout=layout)            # [B, S, H]
        if layout is not None:
            x = layout.unpack(x)                                                      # [B, S, H]
        # Computed also where unused, so the pooler is built; tf.function and jit prune it there.
        return {"sequence_output": ops.cast(x, "float32"),                            # [B, S, H]
                "pooled_output": ops.cast(self.pooler(x[:, 0]), "float32")}           # [B, H]


class OutputProjection(keras.layers.Layer):
    """x @ W^T + b with W stored [C, H], the layout of Google's `output_weights` and HF's Linear."""

    def __init__(self, config, units, **kwargs):
        super().__init__(**kwargs)
        self.config, self.units = config, units

    def build(self, input_shape):
        self.output_weights = self.add_weight(
            name="output_weights", shape=(self.units, self.config.hidden_size),
            initializer=_initializer(self.config))
        self.output_bias = self.add_weight(name="output_bias", shape=(self.units,),
                                           initializer="zeros")

    def call(self, x):
        logits = ops.matmul(x, ops.transpose(self.output_weights)) + self.output_bias  # [..., C]
        return ops.cast(logits, "float32")


class MaskedLMHead(keras.layers.Layer):
    """Google's "cls/predictions": dense + act + LayerNorm, then logits against the word embeddings."""

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.transform = keras.layers.Dense(
            config.hidden_size, activation=_ACTIVATIONS[config.hidden_act],
            kernel_initializer=_initializer(config), name="transform")
        self.layer_norm = _layer_norm("LayerNorm")

    def build(self, input_shape):
        self.output_bias = self.add_weight(name="output_bias", shape=(self.config.vocab_size,),
                                           initializer="zeros")

    def call(self, sequence_output, positions, word_embeddings):
        """sequence_output [B,S,H], positions [B,P] -> logits [B,P,V] float32.

        positions[b, p] names token b * S + positions[b, p] of the flattened batch, which is
        usually row b's own token; the trainer packs predictions across rows this way
        (run_pretraining.pack_predictions), so values outside [0, S) are meant."""
        # Gather first: the V-wide matmul then costs P instead of S rows per sequence. Google's
        # gather_indexes: flatten the batch and offset each row's positions by b * S.
        batch, seq_len, hidden = ops.shape(sequence_output)
        offsets = ops.arange(batch, dtype="int32")[:, None] * seq_len                # [B, 1]
        flat = ops.reshape(sequence_output, (-1, hidden))                            # [B*S, H]
        x = ops.take(flat, ops.cast(positions, "int32") + offsets, axis=0)           # [B, P, H]
        x = self.layer_norm(self.transform(ops.cast(x, self.compute_dtype)))         # [B, P, H]
        table = ops.cast(word_embeddings, self.compute_dtype)                        # [V, H]
        logits = (ops.matmul(x, ops.transpose(table))
                  + ops.cast(self.output_bias, self.compute_dtype))                  # [B, P, V]
        return ops.cast(logits, "float32")


# ------------------------------------------------------------------------------------------------
# 3. Models. Each has `.bert` (the encoder) and `.config`.
# ------------------------------------------------------------------------------------------------

class BertPretrainer(keras.Model):
    """Masked LM only (no next-sentence head, as in RoBERTa).

    call(dict(input_ids, input_mask, segment_ids, masked_lm_positions [B,P])) -> mlm_logits [B,P,V]
    """

    def __init__(self, config, name="bert_pretrainer", **kwargs):
        super().__init__(name=name, **kwargs)
        self.config = config
        self.bert = BertEncoder(config)
        self.mlm = MaskedLMHead(config, name="predictions")

    def call(self, inputs, training=False):
        sequence_output = self.bert(inputs, training=training)["sequence_output"]
        return self.mlm(sequence_output, inputs["masked_lm_positions"],
                        word_embeddings=self.bert.word_embeddings)


class BertClassifier(keras.Model):
    """Sequence (pair) classification on the pooled [CLS] vector -> logits [B, C] float32."""

    def __init__(self, config, num_labels, name="bert_classifier", **kwargs):
        super().__init__(name=name, **kwargs)
        self.config, self.num_labels = config, num_labels
        self.bert = BertEncoder(config, train_pooler=True)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.classifier = OutputProjection(config, num_labels, name="classifier")

    def call(self, inputs, training=False):
        pooled = self.bert(inputs, training=training)["pooled_output"]               # [B, H]
        return self.classifier(self.dropout(pooled, training=training))              # [B, C]


class BertTokenClassifier(keras.Model):
    """Per-token classification (NER tags) -> logits [B, S, C] float32."""

    def __init__(self, config, num_labels, name="bert_token_classifier", **kwargs):
        super().__init__(name=name, **kwargs)
        self.config, self.num_labels = config, num_labels
        self.bert = BertEncoder(config)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.classifier = OutputProjection(config, num_labels, name="classifier")

    def call(self, inputs, training=False):
        x = self.bert(inputs, training=training)["sequence_output"]                  # [B, S, H]
        return self.classifier(self.dropout(x, training=training))                   # [B, S, C]


class BertSpanQA(keras.Model):
    """Extractive QA (SQuAD / CMRC2018) -> (start_logits [B,S], end_logits [B,S]) float32."""

    def __init__(self, config, name="bert_span_qa", **kwargs):
        super().__init__(name=name, **kwargs)
        self.config = config
        self.bert = BertEncoder(config)
        self.qa_outputs = OutputProjection(config, 2, name="qa_outputs")

    def call(self, inputs, training=False):
        x = self.bert(inputs, training=training)["sequence_output"]                  # [B, S, H]
        logits = self.qa_outputs(x)                                                  # [B, S, 2]
        return logits[..., 0], logits[..., 1]


# The model class of each task name (model_folder.TASKS; run folders say theirs in model_info.json).
TASK_MODELS = {"mlm": BertPretrainer, "classifier": BertClassifier, "ner": BertTokenClassifier,
               "qa": BertSpanQA}


def make_task_model(config, task, num_labels=None):
    """A built model for `task` (mlm | classifier | ner | qa); classifier and ner need num_labels."""
    if task not in TASK_MODELS:
        raise ValueError(f"task {task!r} is not one of {', '.join(TASK_MODELS)}")
    if task in ("classifier", "ner"):
        if not num_labels:
            raise ValueError(f"task {task} needs the number of labels")
        return build_model(TASK_MODELS[task](config, num_labels))
    return build_model(TASK_MODELS[task](config))


def build_model(model, seq_len=8):
    """Creates all variables of `model` with one symbolic call (shapes only: nothing is computed,
    so no backend compiles anything); returns the model."""
    names = ["input_ids", "input_mask", "segment_ids"]
    dummy = {name: keras.KerasTensor((1, seq_len), dtype="int32") for name in names}
    if isinstance(model, BertPretrainer):
        dummy["masked_lm_positions"] = keras.KerasTensor((1, 1), dtype="int32")
    model(dummy, training=False)
    return model


# ------------------------------------------------------------------------------------------------
# 4. The one table of weight names: ours <-> Google TF1 <-> HuggingFace.
# ------------------------------------------------------------------------------------------------

# transpose=True where HuggingFace stores the matrix as [out, in] (torch Linear) and we as [in, out].
WeightName = collections.namedtuple("WeightName", "variable google_name hf_name transpose")


def _dense_rows(dense, google, hf, n_in, n_out):
    return [(dense.kernel, f"{google}/kernel", f"{hf}.weight", True, (n_in, n_out)),
            (dense.bias, f"{google}/bias", f"{hf}.bias", False, (n_out,))]


def _norm_rows(norm, google, hf, h):
    return [(norm.gamma, f"{google}/gamma", f"{hf}.weight", False, (h,)),
            (norm.beta, f"{google}/beta", f"{hf}.bias", False, (h,))]


def _encoder_rows(bert):
    c = bert.config
    h, i_size = c.hidden_size, c.intermediate_size
    emb = bert.embeddings
    rows = [
        (emb.word_embeddings, "bert/embeddings/word_embeddings",
         "bert.embeddings.word_embeddings.weight", False, (c.vocab_size, h)),
        (emb.token_type_embeddings, "bert/embeddings/token_type_embeddings",
         "bert.embeddings.token_type_embeddings.weight", False, (c.type_vocab_size, h)),
        (emb.position_embeddings, "bert/embeddings/position_embeddings",
         "bert.embeddings.position_embeddings.weight", False, (c.max_position_embeddings, h)),
    ] + _norm_rows(emb.layer_norm, "bert/embeddings/LayerNorm", "bert.embeddings.LayerNorm", h)
    for i, layer in enumerate(bert.encoder_layers):
        g, f = f"bert/encoder/layer_{i}", f"bert.encoder.layer.{i}"
        att = layer.attention
        for part in ("query", "key", "value"):
            rows += _dense_rows(getattr(att, part), f"{g}/attention/self/{part}",
                                f"{f}.attention.self.{part}", h, h)
        rows += _dense_rows(att.output_dense, f"{g}/attention/output/dense",
                            f"{f}.attention.output.dense", h, h)
        rows += _norm_rows(att.output_norm, f"{g}/attention/output/LayerNorm",
                           f"{f}.attention.output.LayerNorm", h)
        rows += _dense_rows(layer.intermediate, f"{g}/intermediate/dense",
                            f"{f}.intermediate.dense", h, i_size)
        rows += _dense_rows(layer.output_dense, f"{g}/output/dense", f"{f}.output.dense", i_size, h)
        rows += _norm_rows(layer.output_norm, f"{g}/output/LayerNorm", f"{f}.output.LayerNorm", h)
    rows += _dense_rows(bert.pooler, "bert/pooler/dense", "bert.pooler.dense", h, h)
    return rows


def name_table(model):
    """[WeightName(variable, google_name, hf_name, transpose)] for every weight of a built model.

    Accepts a BertEncoder or any of the models above. Each variable's shape is checked against the
    shape the config implies, so a table that drifted from the layers fails here, naming the tensor.
    """
    bert = model if isinstance(model, BertEncoder) else model.bert
    if not bert.built:
        raise ValueError(f"{model.name} has no variables yet; call modeling.build_model(model) first")
    c = bert.config
    rows = _encoder_rows(bert)
    if isinstance(model, BertPretrainer):
        rows += _dense_rows(model.mlm.transform, "cls/predictions/transform/dense",
                            "cls.predictions.transform.dense", c.hidden_size, c.hidden_size)
        rows += _norm_rows(model.mlm.layer_norm, "cls/predictions/transform/LayerNorm",
                           "cls.predictions.transform.LayerNorm", c.hidden_size)
        # The decoder weight is the word embedding table; HF keeps only `cls.predictions.bias`.
        rows.append((model.mlm.output_bias, "cls/predictions/output_bias", "cls.predictions.bias",
                     False, (c.vocab_size,)))
    elif isinstance(model, (BertClassifier, BertTokenClassifier, BertSpanQA)):
        if isinstance(model, BertSpanQA):
            head, google, hf, units = model.qa_outputs, "cls/squad/output", "qa_outputs", 2
        else:
            head, google, hf, units = model.classifier, "output", "classifier", model.num_labels
        rows += [(head.output_weights, f"{google}_weights", f"{hf}.weight", False,
                  (units, c.hidden_size)),
                 (head.output_bias, f"{google}_bias", f"{hf}.bias", False, (units,))]
    table = []
    for variable, google_name, hf_name, transpose, shape in rows:
        if tuple(variable.shape) != shape:
            raise ValueError(f"weight '{google_name}' has shape {tuple(variable.shape)}, "
                             f"but the bert config implies {shape}")
        table.append(WeightName(variable, google_name, hf_name, transpose))
    n_weights = len(model.weights)
    if n_weights != len(table):
        raise ValueError(f"{model.name} has {n_weights} weights but the name table maps "
                         f"{len(table)}; update modeling.name_table")
    return table


# ------------------------------------------------------------------------------------------------
# 5. Checkpoints: our TF2 checkpoints and Google TF1 ones (TensorFlow, imported when used), our
#    backend-free safetensors files (JAX runs), HuggingFace folders. One loader for all of them.
# ------------------------------------------------------------------------------------------------

LoadReport = collections.namedtuple("LoadReport", "loaded newly_initialized unused")

# Names in a checkpoint that are training state, not model weights.
_OPTIMIZER_STATE = re.compile(r"(^|/)(adam_[mv]|lamb_[mv]|Momentum)$|^global_step$")
# Encoder weights must come from the checkpoint; anything else (pooler, heads) may start fresh.
_REQUIRED = re.compile(r"^bert/(embeddings|encoder)/")
# Model-weight names as they appear at the top of one of our TF2 checkpoints.
_WEIGHT_NAME = re.compile(r"^(bert|cls)/|^output_(weights|bias)$")
_TF2_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


def _tf2_name(key):
    # tf.train.Checkpoint escapes object names: "." -> "..", "/" -> ".S"; undo that.
    escaped = key[:-len(_TF2_SUFFIX)]
    return re.sub(r"\.(.)", lambda m: "/" if m.group(1) == "S" else m.group(1), escaped)


def make_checkpoint(model, **extra_trackables):
    """tf.train.Checkpoint holding `model`'s weights under their Google names, plus the extras.

    Keying by Google name (rather than Keras' object paths) lets a pretraining checkpoint restore into
    a classifier and back, and keeps the file readable with tf.train.list_variables.
    Use with tf.train.CheckpointManager, e.g. make_checkpoint(model, optimizer=opt, step=step).
    TensorFlow backend only (the JAX backend saves with `save_weights`).
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel  (the TF-only format)

    weights = {w.google_name: w.variable for w in name_table(model)}
    clash = set(weights) & set(extra_trackables)
    if clash:
        raise ValueError(f"extra trackable names clash with weight names: {sorted(clash)}")
    return tf.train.Checkpoint(**weights, **extra_trackables)


def weights_by_google_name(model):
    """{google_name: float32 numpy array in Google's layout} of a built model, on any backend."""
    return {w.google_name: np.asarray(w.variable.numpy(), np.float32) for w in name_table(model)}


def save_weights(model, path, max_shard_bytes=None):
    """Writes the weights of a built model to `path` (*.safetensors), keyed by Google names.

    The backend-free format of JAX run folders (`ckpt-N.weights.safetensors`), read back by
    load_pretrained on either backend; with max_shard_bytes, files of at most that size and an
    index written last (model_folder.write_safetensors). Returns the paths written.
    """
    return model_folder.write_safetensors(path, weights_by_google_name(model), max_shard_bytes)


# The readers below return {name: get}: names are Google's where the model has such a weight, and
# get() reads that one tensor, in Google's layout, when load_pretrained copies it.

def _tf_checkpoint_tensors(prefix):
    """Our TF2 checkpoint (top-level objects named by Google names) or a Google TF1 one."""
    tf = file_output.import_tensorflow(f"{prefix}.index")

    try:
        reader = tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as e:
        raise ValueError(f"{prefix}.index: unreadable checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]})") from None
    shapes = reader.get_variable_to_shape_map()
    if "_CHECKPOINTABLE_OBJECT_GRAPH" in shapes:  # ours
        available = {_tf2_name(k): k for k in shapes if k.endswith(_TF2_SUFFIX) and
                     "/" not in k[:-len(_TF2_SUFFIX)]}
        available = {n: k for n, k in available.items() if _WEIGHT_NAME.search(n)}
    else:  # TF1 name-based: the key is the variable name
        available = {k: k for k in shapes if not _OPTIMIZER_STATE.search(k)}

    def get(key, name):
        try:
            return reader.get_tensor(key)
        except (IndexError, tf.errors.OpError) as e:  # a truncated or damaged .data-* shard
            raise ValueError(f"{prefix}.data-*: cannot read tensor '{name}' ({type(e).__name__}: "
                             f"{str(e).splitlines()[0]}); the checkpoint is truncated or "
                             f"damaged") from None
    return {name: functools.partial(get, key, name) for name, key in available.items()}


def _hf_tensors(folder, model):
    """A HuggingFace folder, read by each weight's hf_name and transposed where the table says.

    The reader (model.safetensors, sharded, or pytorch_model.bin through torch) and HF's spellings
    are convert_checkpoint's, which imports TensorFlow: HF folders load on the TensorFlow backend.
    """
    file_output.import_tensorflow(folder)
    import convert_checkpoint  # pylint: disable=import-outside-toplevel  (avoids an import cycle)

    hf = convert_checkpoint.HFFolder(folder)
    names = {n: n for n in hf.names()}
    if "cls.predictions.decoder.bias" in hf:  # transformers uses the decoder's own bias if present
        names["cls.predictions.bias"] = names.pop("cls.predictions.decoder.bias")
    names.pop("cls.predictions.decoder.weight", None)  # tied to the word embeddings
    tensors = {}
    for w in name_table(model):
        stored = names.pop(w.hf_name, None)
        if stored is not None:
            tensors[w.google_name] = lambda s=stored, t=w.transpose: hf.get(s).T if t else hf.get(s)
    tensors.update(dict.fromkeys(names))  # no such weight in `model`: reported as unused
    return tensors


def load_pretrained(model, path):
    """Copies checkpoint weights into a built `model` -> LoadReport(loaded, newly_initialized, unused).

    `path`: a model folder (its newest ckpt-N, bert_model.ckpt or ckpt-N.weights.safetensors, by
    model_folder.find_checkpoint), one of our TF2 checkpoint prefixes, a Google/brightmart TF1
    prefix, a file of `save_weights`, or a HuggingFace folder. Optimizer slots and global_step are
    skipped. A missing encoder tensor or any shape mismatch raises ValueError naming the tensor;
    missing pooler/head weights keep their fresh initialisation and are logged.
    """
    kind, source, _ = model_folder.find_checkpoint(os.fspath(path), flag=None)
    if kind == "hf":
        tensors = _hf_tensors(source, model)
    elif kind == "safetensors":
        tensors = model_folder.read_safetensors(source)
    else:
        tensors = _tf_checkpoint_tensors(source)
    loaded, fresh = [], []
    for w in name_table(model):
        get = tensors.pop(w.google_name, None)
        if get is None:
            if _REQUIRED.search(w.google_name):
                raise ValueError(f"{source}: tensor '{w.google_name}' is missing from the checkpoint")
            fresh.append(w.google_name)
            continue
        value = get()
        if tuple(value.shape) != tuple(w.variable.shape):
            raise ValueError(f"{source}: tensor '{w.google_name}' has shape {tuple(value.shape)} "
                             f"in the checkpoint, but the model expects {tuple(w.variable.shape)}")
        w.variable.assign(value.astype(np.float32, copy=False))
        loaded.append(w.google_name)
    unused = sorted(tensors)
    logging.info("Loaded %d tensors from %s", len(loaded), source)
    if fresh:
        logging.info("Newly initialised (not in the checkpoint): %s", ", ".join(fresh))
    if unused:
        logging.info("In the checkpoint but unused by %s: %s", model.name, ", ".join(unused))
    return LoadReport(loaded, fresh, unused)
