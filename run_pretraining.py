"""Masked-LM pretraining of Chinese BERT / RoBERTa-wwm from TFRecords (TF2 / Keras 3).

The TF2 counterpart of google-research/bert's run_pretraining.py, with its flag names:

    python run_pretraining.py --input_file='data/wiki_*.tfrecord' --output_dir=out \
        --bert_config_file=resources/bert_config_L12_H768.json --vocab_file=vocab.txt --do_train \
        --do_eval --train_batch_size=256 --max_seq_length=128 --max_predictions_per_seq=20 \
        --num_train_steps=100000 --num_warmup_steps=10000 --learning_rate=1e-4

Rerunning the same command resumes from the last `output_dir/ckpt-N`, at the same position in the
input, so a preempted job neither repeats nor skips batches. `output_dir` is a self-describing model
folder (checkpoints, bert_config.json, vocab.txt, model_info.json) that fill_mask.py,
export_to_pytorch.py and every --init_checkpoint accept alone. `KERAS_BACKEND=jax python
run_pretraining.py <the same flags>` trains on JAX without TensorFlow (pretraining_jax.py).

How one step runs (the same code under every tf.distribute strategy):
  input:    one deterministic tf.data pipeline per worker/host, positioned by the global step,
            hands each replica its own batch [B_replica, ...] (static shapes)
  replica:  [k, B_micro, ...] for k = --gradient_accumulation_steps
            loss and gradients summed over the k micro-batches (a pure function of the weights)
            ONE all-reduce of (gradient sums, masked-LM sums) over replicas
            / number of masked positions in the global batch -> gradient of Google's mean loss
            clip the global norm of that gradient (Google's order), then the optimizer's update rule
  compiled: the whole replica step is one XLA computation on one device, TPUs and GPUs; only under
            MirroredStrategy over CPU devices is the update left outside XLA (see `_compile_mode`).
  host:     --steps_per_loop steps per call; checkpoints every --save_checkpoints_steps.

Longer than our ~600-line aim (~750): the flags (Google's), their checks, the TF trainer and the driver
stay together so one file answers "what does this flag do"; the input stream lives in
pretraining_input.py and the JAX run in pretraining_jax.py.
"""

import dataclasses
import json
import math
import os
import time

import train_utils  # first: it hides TensorFlow's C++ start-up lines

# isort: split

import keras
import numpy as np
from absl import flags, logging

import file_output
import modeling
import multi_worker
import optimization
import pretraining_records

UsageError = train_utils.UsageError
if keras.backend.backend() == "tensorflow":  # KERAS_BACKEND=jax: pretraining_jax.py, no TensorFlow
    import tensorflow as tf

    import pretraining_input

    # The per-replica input pipelines (in pretraining_input, beside the state they resume from).
    train_dataset_fn, eval_dataset_fn = pretraining_input.train_dataset_fn, pretraining_input.eval_dataset_fn


def define_flags(fv=flags.FLAGS):
    """Declares the flags on `fv` (a FlagValues); tests parse an argv of their own with it."""
    # Google's flag names and defaults where Google had the flag.
    with train_utils.flag_group("Data", fv) as group:
        group.string("input_file", None, "Comma-separated globs of pretraining TFRecords.")
        group.string("eval_input_file", None, "Records for --do_eval (default: --input_file, as Google).")
        group.integer("max_seq_length", 128, "Sequence length of the records.")
        group.integer("max_predictions_per_seq", 20, "Masked positions per sequence in the records.")
        group.float("masked_lm_prob", 0.10, "Share of tokens to predict, for records masked at training "
               "time (create_pretraining_data.py --dynamic_masking); static records keep theirs.")
        group.integer("shuffle_buffer_size", 1000, "Records per shuffle window (records are shuffled "
                "within consecutive windows of this size, by draws from --seed and position).")
        group.boolean("check_input_files", True, "Read every record once before training (CRC, count "
                "against the .meta.json) so bad data fails before step 1.")
    with train_utils.flag_group("Model and checkpoints", fv) as group:
        group.string("bert_config_file", None, "bert_config.json of the model to train.")
        group.string("vocab_file", None, "vocab.txt the records were made with; copied into "
               "--output_dir so the folder is self-describing (checked against the records' "
               "vocab_sha256). Without it, output_dir gets no vocab.txt (a warning says so).")
        group.boolean("do_lower_case", None, "Lower-casing of the tokenizer that made the records, "
                "written to output_dir/model_info.json (default: from the records' .meta.json, "
                "else true as Google's Chinese models).")
        group.string("init_checkpoint", None, "Starting weights (ours or a Google TF1 bert_model.ckpt); "
               "ignored when output_dir already holds a checkpoint to resume.")
        group.string("output_dir", None, "Checkpoints (ckpt-N), bert_config.json, vocab.txt, "
               "TensorBoard logs.")
        group.integer("save_checkpoints_steps", 1000, "Checkpoint every this many steps.")
        group.integer("keep_checkpoint_max", 5, "Checkpoints to keep.")
    with train_utils.flag_group("Training", fv) as group:
        group.boolean("do_train", False, "Train.")
        group.integer("train_batch_size", 32, "Global batch (all replicas x accumulation steps).")
        group.integer("gradient_accumulation_steps", 1, "Micro-batches per optimizer update.")
        group.float("learning_rate", 5e-5, "Peak learning rate.")
        group.integer("num_train_steps", 100000, "Optimizer updates in total.")
        group.integer("num_warmup_steps", 10000, "Linear warmup updates.")
        group.enum("optimizer", "adamw", ["adamw", "lamb"], "LAMB for very large batches.")
        group.float("beta_2", 0.98, "Adam/LAMB beta_2 (0.98 as in roberta_zh).")
        group.float("weight_decay", 0.01, "Decoupled weight decay (not on LayerNorm/bias).")
        group.float("clip_norm", 1.0, "Clip the global norm of the batch gradient to this (0: off).")
        group.integer("seed", 12345, "Seed for initialisation, shuffling and dropout.")
    with train_utils.flag_group("Evaluation", fv) as group:
        group.boolean("do_eval", False, "Evaluate masked-LM loss/accuracy; prints one JSON line.")
        group.integer("eval_batch_size", 8, "Global eval batch.")
        group.integer("max_eval_steps", 100, "Maximum eval batches.")
    with train_utils.flag_group("Hardware: TPU, GPUs, CPU", fv) as group:
        group.enum("strategy", "auto", list(train_utils.STRATEGIES),
                   "auto: a TPU if --tpu_name is given or this is a Cloud TPU VM, "
                   "multi-worker from TF_CONFIG, all GPUs, else one device.")
        group.boolean("use_tpu", False, "Same as --strategy=tpu.")
        group.string("tpu_name", None, "'local' on a Cloud TPU VM (the default there); a TPU Node's "
               "name or grpc:// address.")
        group.string("tpu_zone", None, "GCE zone of a TPU Node (optional).")
        group.string("gcp_project", None, "GCP project of a TPU Node (optional).")
        group.integer("iterations_per_loop", 1000, "Steps per host call (Google's name).")
        group.integer("steps_per_loop", None, "Same as --iterations_per_loop (the TF2 name).")
        group.boolean("mixed_precision", False, "bfloat16 compute on TPUs and on GPUs that support it "
                "(compute capability >= 8.0); ignored with a warning elsewhere.")
        group.boolean("jit_compile", True, "Compile the train step with XLA.")
        group.boolean("skip_padding", True, "Compute each batch's real tokens and predictions, not its "
                      "padding (same loss and gradients; dropout masks differ). False: every position.")
    if fv is flags.FLAGS:
        train_utils.require_flags("input_file", "bert_config_file", "output_dir")


def parse_flags(argv):
    """argv (without the program name) -> a FlagValues with this script's flags; for tests."""
    fv = flags.FlagValues()
    define_flags(fv)
    fv(["run_pretraining.py"] + list(argv))
    return fv


class TrainingDivergedError(UsageError):
    """The loss became NaN or inf (reported as one line: lower the learning rate, then resume)."""


# ------------------------------------------------------------------------------------------------
# The step: the trainer owns the gradients (accumulation, all-reduce, scaling, clipping)
# ------------------------------------------------------------------------------------------------

def mlm_sums(logits, masked_lm_ids, masked_lm_weights):
    """Weighted sums over masked positions: (loss_sum, correct_sum, weight_sum), each a scalar.

    logits [B, P, V] float32; masked_lm_ids [B, P]; masked_lm_weights [B, P] (1 real, 0 padding).
    Sums rather than means, so micro-batches and replicas combine exactly into the mean over the
    global batch: loss = sum(loss_sum) / sum(weight_sum), as in Google's masked_lm loss.
    In keras.ops: the TensorFlow trainer here and the JAX one (pretraining_jax.py) both call it.
    """
    ops = keras.ops
    # One pass over the vocabulary serves the loss and the accuracy: the log-softmax's max also
    # says whether the label won (a separate argmax cost ~2% of the step on a CPU).
    logits = ops.cast(logits, "float32")
    shifted = logits - ops.stop_gradient(ops.max(logits, -1, keepdims=True))      # [B, P, V]
    label = ops.take_along_axis(
        shifted, ops.expand_dims(ops.cast(masked_lm_ids, "int32"), -1), -1)[..., 0]  # [B, P]
    cross_entropy = ops.log(ops.sum(ops.exp(shifted), -1)) - label                 # [B, P]
    correct = ops.cast(label >= 0, "float32")  # the label has the largest logit   # [B, P]
    masked_lm_weights = ops.cast(masked_lm_weights, "float32")
    return (ops.sum(masked_lm_weights * cross_entropy),
            ops.sum(masked_lm_weights * correct),
            ops.sum(masked_lm_weights))


# ------------------------------------------------------------------------------------------------
# Packing: the step computes the tokens and predictions a batch has, not its padding
# ------------------------------------------------------------------------------------------------
#
# Records leave padding: sequences end before max_seq_length (at seq 128 the generator's records
# hold ~97 real tokens on average) and hold fewer real predictions than slots. The trainer hands
# the model the real ones only, in fixed sizes chosen from a sample of the records (`packed_sizes`):
# the encoder's token-wise layers on K real tokens (modeling.TokenLayout), the MLM head on the real
# predictions. A micro-batch with more than fits takes the unpacked branch; either way the loss,
# accuracy and gradients are those of the padded batch (padding is masked out of attention and
# has weight 0 in the loss); only the dropout masks differ, being drawn over other shapes.

def _real_first(real, kept):
    """real: bool [T] -> (index int32 [kept], valid bool [kept]): the indices of the True entries
    in order, then of the False ones (distinct: a partial permutation); valid marks the True."""
    ops = keras.ops
    total = real.shape[0]
    index = ops.arange(total, dtype="int32")
    key = ops.sort(ops.where(real, index, total + index))[:kept]  # real: index, else total + index
    valid = key < total
    return ops.where(valid, key, key - total), valid


def pack_tokens(input_mask, kept):
    """input_mask [B, S] -> packed_tokens int32 [kept]: the real tokens' indices into the
    flattened [B*S] batch, then padding tokens' (modeling.TokenLayout's input)."""
    return _real_first(keras.ops.reshape(input_mask > 0, [-1]), kept)[0]


def pack_predictions(batch, seq_len, width):
    """The batch's real predictions (weight > 0) moved to the front of `width` slots per sequence.

    batch: the model's tensors with masked_lm_* [B, P]; returns them with masked_lm_* [B, width],
    the real predictions first (row by row), then padding. A prediction may move to another
    sequence's row: its position is stored as (b_from * S + p) - b_to * S, which the MLM head's
    gather (b_to * S + position, into the flattened [B*S, H]) turns back into its own token.
    """
    ops = keras.ops
    positions, ids, weights = (batch[k] for k in ("masked_lm_positions", "masked_lm_ids",
                                                  "masked_lm_weights"))
    rows, slots = positions.shape
    row_start = ops.arange(rows, dtype="int32")[:, None] * seq_len                       # [B, 1]
    source, valid = _real_first(ops.reshape(weights > 0, [-1]), rows * width)           # [B*width]

    def move(x):  # [B, P] -> [B, width], the kept predictions' values, 0 in padding
        moved = ops.take(ops.reshape(x, [-1]), source)
        return ops.reshape(ops.where(valid, moved, ops.zeros((), moved.dtype)), [rows, width])

    packed = dict(batch)
    packed["masked_lm_positions"] = move(ops.cast(positions, "int32") + row_start) - row_start
    packed["masked_lm_ids"] = move(ids)
    packed["masked_lm_weights"] = move(weights)
    return packed


# How far above its mean a micro-batch's count of real tokens (or predictions) may go before it
# takes the unpacked branch, in standard deviations of that count: few do (1 of 428 static and
# none of 214 dynamic micro-batches of 32 in one pass over the speed benchmark's records), and the
# packed size is within ~12% of the mean. (Seq 128, batch 32: 2.5 packs 3,486 of 4,096 tokens,
# +13-20% on the step; 4 would pack 3,705, under the 1/8 worth a second branch.)
PACKING_MARGIN = 2.5


def packed_sizes(sequence_stats, rows):
    """-> (real tokens, prediction slots per sequence) to compute for micro-batches of `rows`
    sequences, each None for all of them.

    sequence_stats: {"input_mask": (mean, std), "masked_lm_weights": (mean, std)} of the real
    tokens and predictions per sequence (pretraining_input.sample_sequence_stats), or None.
    Each size is rows x mean + PACKING_MARGIN deviations of the micro-batch's sum.
    """
    if sequence_stats is None:
        return None, None

    def size(key):
        mean, std = sequence_stats[key]
        return rows * mean + PACKING_MARGIN * math.sqrt(rows) * std

    return math.ceil(size("input_mask")), max(1, math.ceil(size("masked_lm_weights") / rows))


_MODEL_INPUTS = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions")
_EPSILON = 1e-5  # Google's denominator guard for batches without masked positions


def _compile_mode(strategy, jit_compile):
    """"whole": the replica step is one XLA computation; "tpu": TPUStrategy compiles it anyway;
    "split": only the loss/gradient function is XLA, the all-reduce and update run outside;
    "none": --jit_compile=false.

    "split" exists for one case: MirroredStrategy (or multi-worker) with several replicas on CPU
    devices, where XLA code that touches the mirrored variables fails ("resource ... replica_1 ...
    on a different device", DESIGN 9.3). GPUs and one device compile the whole step, as Keras'
    model.fit does.
    """
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "tpu"
    if not jit_compile:
        return "none"
    if strategy.num_replicas_in_sync > 1 and any(
            "CPU" in d.upper() for d in strategy.extended.worker_devices):
        return "split"
    return "whole"


class MaskedLMTrainer:
    """Train and eval steps for a BertPretrainer under any tf.distribute strategy.

    The one owner of gradients: micro-batch accumulation, the single all-reduce, the division by
    the number of masked positions and the global-norm clip happen here, in Google's order; the
    optimizer (optimization.py) only contributes its schedule and `update_step` rule.
    Each call of `train_loop` takes a distributed iterator of per-replica batches.
    """

    def __init__(self, model, optimizer, strategy, per_replica_batch, accumulation_steps=1,
                 clip_norm=1.0, jit_compile=True, sequence_stats=None):
        self.model, self.optimizer, self.strategy = model, optimizer, strategy
        self.packed_tokens, self.packed_width = packed_sizes(
            sequence_stats, per_replica_batch // accumulation_steps)
        self.per_replica_batch = per_replica_batch
        self.accumulation_steps = accumulation_steps
        self.clip_norm = clip_norm
        self.mode = _compile_mode(strategy, jit_compile)
        inner_jit = self.mode == "split"
        self._grads_fn = tf.function(self._loss_and_grads, jit_compile=inner_jit)
        self._eval_fn = tf.function(self._eval_sums, jit_compile=inner_jit)
        whole = self.mode == "whole"
        self._train_step_fn = tf.function(self._replica_train_step, jit_compile=whole)
        self._eval_step_fn = tf.function(self._replica_eval_step, jit_compile=whole)
        self.train_loop = tf.function(self._train_loop)
        # Non-trainable variables a forward pass updates (Keras' seed states), not frozen weights.
        frozen = {id(w) for w in model.non_trainable_weights}
        self._is_state = [id(v) not in frozen for v in model.non_trainable_variables]
        self.eval_step = tf.function(self._eval_step)

    # -- pure functions of the variable values --------------------------------------------------

    def _loss_and_grads(self, trainable, non_trainable, batch):
        """Sums over k micro-batches. batch: dict of [k, B_micro, ...].

        Returns (grads of loss_sum per trainable variable, [loss_sum, correct_sum, weight_sum],
        new non-trainable values (the dropout seed states)).
        """

        def micro_batch(i, non_trainable):
            micro = {name: t[i] for name, t in batch.items()}                    # [B_micro, ...]
            packed, fits = self._pack(micro)
            if packed is None:
                return grads_of(micro, non_trainable)
            return tf.cond(fits, lambda: grads_of(packed, non_trainable),
                           lambda: grads_of(micro, non_trainable))

        def grads_of(micro, non_trainable):
            with tf.GradientTape() as tape:
                tape.watch(trainable)
                logits, non_trainable = self.model.stateless_call(
                    trainable, non_trainable,
                    {k: micro[k] for k in _MODEL_INPUTS + ("packed_tokens",) if k in micro},
                    training=True)
                loss_sum, correct, weight = mlm_sums(
                    logits, micro["masked_lm_ids"], micro["masked_lm_weights"])
            grads = tape.gradient(loss_sum, trainable)
            # Embedding gathers give IndexedSlices with repeated rows: dense, so norms and sums
            # are those of the gradient (the update is dense anyway).
            grads = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
                     for g, v in zip(grads, trainable)]
            return grads, tf.stack([loss_sum, correct, weight]), list(non_trainable)

        if self.accumulation_steps == 1:
            return micro_batch(0, non_trainable)

        def accumulate(i, grads, sums, non_trainable):
            new_grads, new_sums, non_trainable = micro_batch(i, non_trainable)
            return (i + 1, [a + b for a, b in zip(grads, new_grads)], sums + new_sums,
                    non_trainable)

        _, grads, sums, non_trainable = tf.while_loop(
            lambda i, *_: i < self.accumulation_steps, accumulate,
            (tf.constant(0), [tf.zeros_like(v) for v in trainable], tf.zeros([3]),
             list(non_trainable)))
        return grads, sums, non_trainable

    def packing(self, rows, seq_len, slots):
        """-> (real tokens, prediction slots per sequence) a micro-batch of [rows, seq_len] with
        `slots` prediction slots is packed to, each None where packing would save less than 1/8
        of the work (not worth a second compiled branch)."""
        tokens, width = self.packed_tokens, self.packed_width
        return (tokens if tokens and 8 * tokens <= 7 * rows * seq_len else None,
                width if width and 8 * width <= 7 * slots else None)

    def _pack(self, micro):
        """-> (the micro-batch packed (module comment "Packing"), whether its real tokens and
        predictions fit), or (None, None) when it is not packed."""
        rows, seq_len = micro["input_ids"].shape
        tokens, width = self.packing(rows, seq_len, micro["masked_lm_weights"].shape[1])
        if tokens is None and width is None:
            return None, None
        packed, fits = dict(micro), tf.constant(True)
        if tokens is not None:
            fits &= tf.reduce_sum(tf.cast(micro["input_mask"] > 0, tf.int32)) <= tokens
            packed["packed_tokens"] = pack_tokens(micro["input_mask"], tokens)
        if width is not None:
            fits &= tf.reduce_sum(tf.cast(micro["masked_lm_weights"] > 0, tf.int32)) <= rows * width
            packed = pack_predictions(packed, seq_len, width)
        return packed, fits

    def _eval_sums(self, trainable, non_trainable, batch):
        logits, _ = self.model.stateless_call(
            trainable, non_trainable, {k: batch[k] for k in _MODEL_INPUTS}, training=False)
        return tf.stack(mlm_sums(logits, batch["masked_lm_ids"], batch["masked_lm_weights"]))

    # -- replica functions ----------------------------------------------------------------------

    def _values(self):
        return ([v.value for v in self.model.trainable_variables],
                [v.value for v in self.model.non_trainable_variables])

    def _replica_train_step(self, batch):
        """batch: this replica's dict of [B_replica, ...] -> metrics of the global batch."""
        k = self.accumulation_steps
        batch = {name: tf.reshape(t, [k, self.per_replica_batch // k] + t.shape[1:])
                 for name, t in batch.items()}                                     # [k, B_micro, ...]
        trainable, non_trainable = self._values()
        context = tf.distribute.get_replica_context()
        # Mirrored seed states would give every replica the same dropout masks; shift each
        # replica's counter into its own range for the call, and back before storing the state.
        offsets = [self._seed_offset(v, context.replica_id_in_sync_group,
                                     context.num_replicas_in_sync)
                   for v in self.model.non_trainable_variables]
        non_trainable = [v + o for v, o in zip(non_trainable, offsets)]
        grads, sums, new_non_trainable = self._grads_fn(trainable, non_trainable, batch)
        # Only the seed states change in a step: frozen weights (the pooler) are not copied back.
        new_state = [v - o for v, o, changes in zip(new_non_trainable, offsets, self._is_state)
                     if changes]

        if context.num_replicas_in_sync > 1:  # the one all-reduce of the step
            grads, sums = context.all_reduce(tf.distribute.ReduceOp.SUM, (grads, sums))
        denominator = sums[2] + _EPSILON
        grads = [g / denominator for g in grads]          # gradient of the global mean loss
        if self.clip_norm > 0:  # Google: clip the global norm of the whole batch's gradient
            grads, grad_norm = tf.clip_by_global_norm(grads, self.clip_norm)
        else:
            grad_norm = tf.linalg.global_norm(grads)
        learning_rate = tf.cast(self.optimizer.learning_rate, tf.float32)
        context.merge_call(self._update, args=(grads, new_state))
        return {"loss": sums[0] / denominator, "masked_lm_accuracy": sums[1] / denominator,
                "grad_norm": grad_norm, "learning_rate": learning_rate}

    def _update(self, strategy, grads, state):
        """Cross-replica: the optimizer's rule on every variable copy, with its replica's (equal)
        reduced gradient; the dropout seed states (aggregation NONE) per replica; step + 1."""
        learning_rate = self.optimizer.learning_rate
        for variable, grad in zip(self.model.trainable_variables, grads):
            strategy.extended.update(
                variable.value, lambda var, g: self.optimizer.update_step(g, var, learning_rate),
                args=(grad,), group=False)
        state_variables = [v for v, changes in zip(self.model.non_trainable_variables,
                                                   self._is_state) if changes]
        for variable, value in zip(state_variables, state):
            strategy.extended.update(variable.value, lambda var, x: var.assign(x), args=(value,),
                                     group=False)
        self.optimizer.iterations.assign_add(1)

    @staticmethod
    def _seed_offset(variable, replica_id, num_replicas):
        """[0, replica_id * (modeling.SEED_MODULUS // num_replicas)] for a Keras seed-generator state
        [seed, counter], else 0: each replica's counters get their own part of the int32 range.
        (A multiple of 2^31 would be +2 after the modulo: replica 1 would reuse replica 0's masks
        two draws later.)"""
        if "seed_generator" not in variable.path or tuple(variable.shape) != (2,):
            return tf.zeros((), variable.dtype)
        part = tf.constant(modeling.SEED_MODULUS // num_replicas, variable.dtype)
        return tf.stack([tf.zeros((), variable.dtype), tf.cast(replica_id, variable.dtype) * part])

    def _replica_eval_step(self, batch):
        trainable, non_trainable = self._values()
        sums = self._eval_fn(trainable, non_trainable, batch)
        context = tf.distribute.get_replica_context()
        if context.num_replicas_in_sync > 1:
            sums = context.all_reduce(tf.distribute.ReduceOp.SUM, sums)
        return sums

    # -- host calls -----------------------------------------------------------------------------

    def _first_replica(self, value):
        return self.strategy.experimental_local_results(value)[0]  # all replicas hold the same

    def _train_loop(self, iterator, num_steps):
        """Runs up to `num_steps` steps (one host call); stops early on a non-finite loss.

        Returns (mean metrics over the steps run, last learning rate, steps run, all finite).
        """
        totals = {k: tf.constant(0.0) for k in ("loss", "masked_lm_accuracy", "grad_norm")}
        learning_rate = tf.constant(0.0)
        steps, finite = tf.constant(0), tf.constant(True)
        while steps < num_steps and finite:
            metrics = self.strategy.run(self._train_step_fn, args=(next(iterator),))
            metrics = {k: self._first_replica(v) for k, v in metrics.items()}
            finite = tf.math.is_finite(metrics["loss"]) & tf.math.is_finite(metrics["grad_norm"])
            totals = {k: totals[k] + metrics[k] for k in totals}
            learning_rate = metrics["learning_rate"]
            steps += 1
        means = {k: v / tf.cast(tf.maximum(steps, 1), tf.float32) for k, v in totals.items()}
        return means, learning_rate, steps, finite

    def _eval_step(self, iterator):
        """-> [loss_sum, correct_sum, weight_sum] over the global batch."""
        return self._first_replica(self.strategy.run(self._eval_step_fn, args=(next(iterator),)))


# ------------------------------------------------------------------------------------------------
# Driver: checks, run folder, training state
# ------------------------------------------------------------------------------------------------

# Google's bert_config.json fields; a pretraining config must spell out every one (a silent default
# of 12 layers would be an expensive surprise).
CONFIG_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "hidden_act", "hidden_dropout_prob",
                 "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
                 "initializer_range")


def load_config(path):
    """--bert_config_file -> modeling.BertConfig; UsageError naming the file and field."""
    if not path:
        raise UsageError("--bert_config_file is required")
    try:
        config = modeling.BertConfig.from_json_file(path)
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except ValueError as e:
        raise UsageError(str(e)) from None
    missing = [field for field in CONFIG_FIELDS if field not in raw]
    if missing:
        raise UsageError(f"{path}: field '{missing[0]}' is missing (a pretraining config must set "
                         f"all of {', '.join(CONFIG_FIELDS)})")
    return config


def check_flags(opts):
    """Every flag that can be wrong on its own fails here, before anything is read or built."""
    if not (opts.do_train or opts.do_eval):
        raise UsageError("at least one of --do_train or --do_eval must be set")
    if not opts.output_dir:
        raise UsageError("--output_dir is required")
    for name in ("train_batch_size", "eval_batch_size", "num_train_steps", "save_checkpoints_steps",
                 "iterations_per_loop", "gradient_accumulation_steps", "max_eval_steps",
                 "max_seq_length", "max_predictions_per_seq", "keep_checkpoint_max",
                 "shuffle_buffer_size"):
        if getattr(opts, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(opts, name)}")
    if opts.steps_per_loop is not None:
        if opts.steps_per_loop < 1:
            raise UsageError(f"--steps_per_loop must be >= 1, got {opts.steps_per_loop}")
        if opts["iterations_per_loop"].present and opts.iterations_per_loop != opts.steps_per_loop:
            raise UsageError(f"--steps_per_loop={opts.steps_per_loop} and --iterations_per_loop="
                             f"{opts.iterations_per_loop} disagree; give one of them")
    if not 0 < opts.masked_lm_prob <= 1:  # also false for NaN
        raise UsageError(f"--masked_lm_prob={opts.masked_lm_prob} must be in (0, 1]")
    if not (math.isfinite(opts.clip_norm) and opts.clip_norm >= 0):
        raise UsageError(f"--clip_norm must be a finite number >= 0, got {opts.clip_norm}")
    if opts.do_train:
        if opts.num_warmup_steps < 0:
            raise UsageError(f"--num_warmup_steps must be >= 0, got {opts.num_warmup_steps}")
        if opts.num_warmup_steps > opts.num_train_steps:
            raise UsageError(f"--num_warmup_steps={opts.num_warmup_steps} > --num_train_steps="
                             f"{opts.num_train_steps}: warmup must end within training")
        try:  # the schedule owns the remaining rules (a positive, finite learning rate)
            optimization.WarmupPolynomialDecay(opts.learning_rate, opts.num_train_steps,
                                               opts.num_warmup_steps)
        except ValueError as e:
            raise UsageError(f"--{e}") from None


def _check_output_dir(output_dir, config):
    """UsageError if output_dir is not a folder or holds a run of a different model (never overwrite it)."""
    fs = file_output.fs(output_dir)  # tf.io.gfile, or the standard library for local paths (JAX)
    if fs.exists(output_dir) and not fs.isdir(output_dir):
        raise UsageError(f"--output_dir={output_dir} is a file, not a folder; choose another --output_dir")
    path = os.path.join(output_dir, "bert_config.json")
    if fs.exists(path):
        existing = modeling.BertConfig.from_json_file(path)
        if existing.to_dict() != config.to_dict():
            diff = sorted(k for k in set(existing.to_dict()) | set(config.to_dict())
                          if existing.to_dict().get(k) != config.to_dict().get(k))
            raise UsageError(f"{path} differs from --bert_config_file in {', '.join(diff)}: "
                             "--output_dir holds another model's run; use a new --output_dir")


def _worker_info(strategy):
    """-> (num_workers, worker_index, is_chief) for this process."""
    local_replicas = len(strategy.extended.worker_devices)
    num_workers = max(1, strategy.num_replicas_in_sync // local_replicas)
    resolver = getattr(strategy, "cluster_resolver", None)
    if num_workers == 1 or resolver is None or not getattr(resolver, "task_type", None):
        return 1, 0, True
    cluster = resolver.cluster_spec().as_dict()
    order = [(job, i) for job in ("chief", "worker") for i in range(len(cluster.get(job, [])))]
    index = order.index((resolver.task_type, resolver.task_id))
    return num_workers, index, index == 0


@dataclasses.dataclass
class _Plan:
    """What `_check` established about a run before anything is built or written."""
    config: modeling.BertConfig
    train_files: list
    eval_files: list
    counts: dict             # records per file: the input position is counted in records
    strategy: object
    num_workers: int
    worker_index: int
    is_chief: bool
    resume_from: str         # the checkpoint to resume, or None
    input_state: dict        # what a later resume must find again (None without --do_train)
    vocab_file: str
    do_lower_case: bool


def run(opts):
    """Trains and/or evaluates as the flags in `opts` say; returns the eval metrics (or {}).

    check (everything that can be wrong, before anything is built or written) -> build (model,
    optimizer, checkpoint, resumed or initial weights) -> the run folder -> train -> evaluate.
    """
    plan = _check(opts)
    trainer, manager = _build(opts, plan)
    if plan.is_chief:  # the folder describes itself from the first step on (a killed run's too)
        _write_run_folder(opts, plan)
    if opts.do_train:
        _train(opts, trainer, _train_iterator(opts, plan, trainer), manager, plan.is_chief,
               opts.steps_per_loop or opts.iterations_per_loop)
    if opts.do_eval:
        return _evaluate(opts, trainer, plan.eval_files, [plan.counts[p] for p in plan.eval_files],
                         plan.num_workers)
    return {}


def check_config_and_files(opts):
    """-> (config, train_files, eval_files) after the checks both backends share: the flags alone,
    the bert config, the record files' names."""
    check_flags(opts)
    config = load_config(opts.bert_config_file)
    if opts.max_seq_length > config.max_position_embeddings:
        raise UsageError(f"--max_seq_length={opts.max_seq_length} > max_position_embeddings="
                         f"{config.max_position_embeddings} of {opts.bert_config_file}")
    train_files = pretraining_records.record_files(opts.input_file) if opts.do_train else []
    eval_files = (pretraining_records.record_files(
        opts.eval_input_file or opts.input_file,
        "--eval_input_file" if opts.eval_input_file else "--input_file") if opts.do_eval else [])
    return config, train_files, eval_files


def _check(opts):
    """Every flag, file and folder that can be wrong, checked before anything is built or written."""
    config, train_files, eval_files = check_config_and_files(opts)

    strategy = train_utils.make_strategy("tpu" if opts.use_tpu else opts.strategy, tpu=opts.tpu_name,
                                         tpu_zone=opts.tpu_zone, gcp_project=opts.gcp_project)
    replicas = strategy.num_replicas_in_sync
    num_workers, worker_index, is_chief = _worker_info(strategy)
    k = opts.gradient_accumulation_steps
    if opts.train_batch_size % (replicas * k):
        raise UsageError(f"--train_batch_size={opts.train_batch_size} is not divisible by replicas "
                         f"({replicas}) x --gradient_accumulation_steps ({k})")
    if opts.eval_batch_size % replicas:
        raise UsageError(f"--eval_batch_size={opts.eval_batch_size} is not divisible by the "
                         f"{replicas} replicas")
    counts = {}
    for path in dict.fromkeys(train_files + eval_files):  # unique, training files first
        info = pretraining_records.check_records(path, opts.max_seq_length,
                                                 opts.max_predictions_per_seq, config.vocab_size,
                                                 full_scan=opts.check_input_files)
        counts[path] = info.meta.get("num_instances") or pretraining_input.count_records(path)
    pretraining_input.check_kind_flags(opts, train_files, eval_files)
    _check_output_dir(opts.output_dir, config)
    file_output.check_writable(opts.output_dir)  # a read-only file system: named before any work
    resume_from = (pretraining_input.latest_checkpoint(opts.output_dir) if tf.io.gfile.isdir(opts.output_dir)
                   else None)
    state = None
    if opts.do_train:
        state = pretraining_input.input_state(opts, train_files, num_workers)
        if resume_from:
            pretraining_input.check_resume_input(opts.output_dir, state)
        for i in range(num_workers):
            _, _, per_epoch = pretraining_input.pipeline_files(
                train_files, [counts[p] for p in train_files], num_workers, i)
            if per_epoch < opts.train_batch_size // num_workers:
                raise UsageError(f"--input_file has {per_epoch} records for worker {i}, fewer than "
                                 f"one batch ({opts.train_batch_size // num_workers})")
    vocab_file, do_lower_case = pretraining_input.vocab_and_casing(opts, train_files or eval_files)
    if resume_from is None and opts.do_eval and not opts.do_train and not opts.init_checkpoint:
        raise UsageError(f"--do_eval alone: no checkpoint in {opts.output_dir} "
                         "and no --init_checkpoint")
    logging.info("strategy %s: %d replica(s), %d worker(s); global batch %d = %d per replica x %d "
                 "replicas x %d accumulation steps", type(strategy).__name__, replicas, num_workers,
                 opts.train_batch_size, opts.train_batch_size // (replicas * k), replicas, k)
    return _Plan(config, train_files, eval_files, counts, strategy, num_workers, worker_index, is_chief,
                 resume_from, state, vocab_file, do_lower_case)


def _build(opts, plan):
    """-> (trainer, checkpoint manager): the model and optimizer under the strategy, their weights
    resumed from the run folder or loaded from --init_checkpoint."""
    train_utils.set_seed(opts.seed)
    train_utils.set_precision(opts.mixed_precision, plan.strategy)
    with plan.strategy.scope():
        model = modeling.build_model(modeling.BertPretrainer(plan.config), seq_len=8)
        # Clipping is the trainer's (Google's order, after the all-reduce): none in the optimizer.
        optimizer = optimization.create_optimizer(
            opts.learning_rate if opts.do_train else 1.0, max(opts.num_train_steps, 1),
            opts.num_warmup_steps if opts.do_train else 0, optimizer_type=opts.optimizer,
            weight_decay=opts.weight_decay, beta_2=opts.beta_2, clip_norm=0)
        optimizer.build(model.trainable_variables)
    stats = (pretraining_input.sample_sequence_stats(
        plan.train_files, _parser(opts, plan.train_files, training=True))
        if opts.do_train and opts.skip_padding else None)
    trainer = MaskedLMTrainer(model, optimizer, plan.strategy,
                              per_replica_batch=opts.train_batch_size // plan.strategy.num_replicas_in_sync,
                              accumulation_steps=opts.gradient_accumulation_steps,
                              clip_norm=opts.clip_norm, jit_compile=opts.jit_compile,
                              sequence_stats=stats)
    logging.info("train step compiled: %s", trainer.mode)
    if stats is not None:
        rows = trainer.per_replica_batch // trainer.accumulation_steps
        slots = pretraining_records.predictions_in_use(
            pretraining_records.read_info(plan.train_files), opts.max_seq_length,
            opts.max_predictions_per_seq)
        tokens, width = trainer.packing(rows, opts.max_seq_length, slots)
        plan_text = (f"a micro-batch of {rows} computes {tokens or 'all'} of its "
                     f"{rows * opts.max_seq_length} tokens and {width or 'all'} of {slots} prediction "
                     "slots per sequence (one with more real ones: all)" if tokens or width else
                     "too little padding to skip: every position computed")
        logging.info("per sequence in the first records: %.1f +- %.1f real tokens, %.1f +- %.1f "
                     "predictions; %s", *stats["input_mask"], *stats["masked_lm_weights"], plan_text)
    trackables = {"optimizer": optimizer}
    if model.non_trainable_variables:  # dropout seed states: resume draws the same masks
        trackables["dropout_seeds"] = list(model.non_trainable_variables)
    checkpoint = modeling.make_checkpoint(model, **trackables)
    # Every worker saves (TF's multi-worker rule); only the chief's copies are kept, the others go to
    # a local folder removed at exit, so the run folder is the same as a one-worker run's.
    ckpt_dir = (opts.output_dir if plan.is_chief
                else multi_worker.worker_dir(opts.output_dir, plan.worker_index))
    manager = tf.train.CheckpointManager(checkpoint, ckpt_dir,
                                         max_to_keep=opts.keep_checkpoint_max if plan.is_chief else 1)
    if plan.resume_from:
        pretraining_input.restore(checkpoint, plan.resume_from)
        logging.info("resumed from %s at step %d", plan.resume_from, int(optimizer.iterations.numpy()))
    elif opts.init_checkpoint:
        try:
            modeling.load_pretrained(model, opts.init_checkpoint)
        except ValueError as e:  # modeling names the path, the flag is ours to name
            raise UsageError(f"--init_checkpoint: {e}") from None
    return trainer, manager


def _write_run_folder(opts, plan):
    """bert_config.json, vocab.txt, model_info.json and the input state, beside the checkpoints."""
    tf.io.gfile.makedirs(opts.output_dir)
    pretraining_input.remove_partial_saves(opts.output_dir)
    pretraining_input.write_run_folder(opts.output_dir, plan.config, plan.vocab_file, plan.do_lower_case)
    if opts.do_train:
        pretraining_input.write_json(os.path.join(opts.output_dir, pretraining_input.INPUT_STATE),
                                     plan.input_state)


def _train_iterator(opts, plan, trainer):
    """The distributed iterator of per-replica batches, positioned at the restored step."""
    step = int(trainer.optimizer.iterations.numpy())
    dataset_fn = pretraining_input.train_dataset_fn(
        plan.train_files, [plan.counts[p] for p in plan.train_files],
        opts.train_batch_size // plan.strategy.num_replicas_in_sync, opts.seed, opts.shuffle_buffer_size,
        step, _parser(opts, plan.train_files, training=True))
    return iter(plan.strategy.distribute_datasets_from_function(dataset_fn))


def _parser(opts, files, training):
    """(positions [B], serialized [B]) -> the model's tensors, by the records' own parser."""
    return pretraining_records.make_parser(
        pretraining_records.read_info(files), opts.max_seq_length, opts.max_predictions_per_seq,
        seed=opts.seed, masked_lm_prob=opts.masked_lm_prob, training=training)


HOST_CALL_SECONDS = 30.0  # longest a host call may run: progress shows at least this often


def _train(opts, trainer, iterator, manager, is_chief, steps_per_loop):
    step = int(trainer.optimizer.iterations.numpy())
    if step >= opts.num_train_steps:
        logging.info("already trained to step %d >= --num_train_steps=%d", step, opts.num_train_steps)
        return
    writer = (tf.summary.create_file_writer(os.path.join(opts.output_dir, "train")) if is_chief
              else tf.summary.create_noop_writer())
    progress = train_utils.ProgressLogger(total=opts.num_train_steps, unit="steps", name="pretrain",
                                          start=step)
    seconds_per_step = None  # measured on the last host call; unknown before the first
    window = None  # the summary point being summed up
    while step < opts.num_train_steps:
        # One summary point per --iterations_per_loop steps; windows end on checkpoint boundaries,
        # so saves happen exactly every N steps. A host call lasts at most ~HOST_CALL_SECONDS (one
        # step first, while it compiles), so a slow device shows progress whatever the loop size;
        # the points, the input stream and the updates do not depend on how calls are cut.
        if window is None:
            next_save = (step // opts.save_checkpoints_steps + 1) * opts.save_checkpoints_steps
            window = dict(end=step + min(steps_per_loop, opts.num_train_steps - step, next_save - step),
                          steps=0, seconds=0.0, loss=0.0, masked_lm_accuracy=0.0, grad_norm=0.0)
        n = min(window["end"] - step,
                1 if seconds_per_step is None else max(1, int(HOST_CALL_SECONDS / seconds_per_step)))
        start = time.perf_counter()
        try:
            means, learning_rate, ran, finite = trainer.train_loop(iterator, tf.constant(n))
        except tf.errors.OpError as e:
            if isinstance(e, tf.errors.DataLossError) or "Key: " in e.message:  # not our records
                raise pretraining_input.bad_records_error(opts, opts.input_file, f"near step {step}", e) from None
            lost = multi_worker.lost_peer_error(
                e, trainer.strategy, f"stopped at step {step}; rerun the same command on every "
                f"worker to {_resume_point(opts.output_dir)}")
            if lost:
                raise lost from None
            raise
        ran, elapsed = int(ran), time.perf_counter() - start
        seconds_per_step = elapsed / max(ran, 1)
        if not bool(finite):
            last = manager.latest_checkpoint or "none written yet"
            raise TrainingDivergedError(
                f"loss became NaN/inf at step {step + ran}; stopped without saving. Last good "
                f"checkpoint: {last}. Lower --learning_rate or check the data, then rerun to resume.")
        step += ran
        for name, value in means.items():
            window[name] += float(value) * ran
        window["steps"] += ran
        window["seconds"] += elapsed
        progress.update(ran, force=step >= opts.num_train_steps, loss=float(means["loss"]),
                        acc=float(means["masked_lm_accuracy"]),
                        seq_per_s=ran * opts.train_batch_size / elapsed)
        if step < window["end"]:
            continue
        metrics = {name: window[name] / window["steps"] for name in means}
        metrics["learning_rate"] = float(learning_rate)
        metrics["sequences_per_second"] = window["steps"] * opts.train_batch_size / window["seconds"]
        window = None
        with writer.as_default(step=step):
            for name, value in metrics.items():
                tf.summary.scalar(name, value)
        writer.flush()
        if step % opts.save_checkpoints_steps == 0 or step >= opts.num_train_steps:
            pretraining_input.save_checkpoint(manager, step)  # a failed save leaves no ckpt-N_temp/
            logging.info("saved %s", manager.latest_checkpoint)


def _resume_point(output_dir):
    """'resume from ckpt-N' by the chief's checkpoint state file (the one every worker resumes from,
    whichever worker asks), or 'start again' when it names none."""
    try:
        newest = pretraining_input.latest_checkpoint(output_dir)
    except UsageError:  # the rerun's own checks will say what is wrong with it
        newest = None
    return f"resume from {os.path.basename(newest)}" if newest else "start again (no checkpoint yet)"


def _evaluate(opts, trainer, files, counts, num_workers):
    """Masked-LM loss/accuracy/perplexity over at most --max_eval_steps batches; prints JSON."""
    strategy = trainer.strategy
    per_replica = opts.eval_batch_size // strategy.num_replicas_in_sync
    per_pipeline = opts.eval_batch_size // num_workers
    steps = min(opts.max_eval_steps, max(
        -(-pretraining_input.pipeline_files(files, counts, num_workers, i)[2] // per_pipeline)
        for i in range(num_workers)))
    iterator = iter(strategy.distribute_datasets_from_function(
        pretraining_input.eval_dataset_fn(files, counts, per_replica, steps,
                               _parser(opts, files, training=False))))
    sums = np.zeros(3)
    for i in range(steps):
        try:
            sums += trainer.eval_step(iterator).numpy()
        except tf.errors.OpError as e:
            if isinstance(e, tf.errors.DataLossError) or "Key: " in e.message:  # as in _train
                raise pretraining_input.bad_records_error(opts, opts.eval_input_file or opts.input_file,
                                               f"in eval batch {i}", e) from None
            lost = multi_worker.lost_peer_error(  # a peer lost mid-evaluation: as in training
                e, strategy, f"stopped while evaluating at step {int(trainer.optimizer.iterations.numpy())}; "
                f"rerun the same command on every worker to {_resume_point(opts.output_dir)}")
            if lost:
                raise lost from None
            raise
    loss = sums[0] / (sums[2] + _EPSILON)
    result = {"masked_lm_loss": float(loss),
              "masked_lm_accuracy": float(sums[1] / (sums[2] + _EPSILON)),
              "perplexity": float(math.exp(min(loss, 700.0))),
              "global_step": int(trainer.optimizer.iterations.numpy())}
    print(json.dumps(result), flush=True)
    return result


EXAMPLE = ("python run_pretraining.py --do_train --do_eval --input_file=/tmp/records/train.tfrecord "
           "--bert_config_file=resources/bert_config_tiny.json --vocab_file=resources/vocab.txt "
           "--output_dir=/tmp/pretrain --train_batch_size=32 --num_train_steps=1000 "
           "--num_warmup_steps=100 --learning_rate=1e-3")


def main(argv):
    del argv
    if keras.backend.backend() == "jax":  # the same flags, trained by pretraining_jax.py
        import pretraining_jax

        pretraining_jax.run(flags.FLAGS)
    elif keras.backend.backend() == "tensorflow":
        run(flags.FLAGS)
    else:
        raise UsageError(f"KERAS_BACKEND={keras.backend.backend()}: run_pretraining.py trains on "
                         "tensorflow or jax")


if __name__ == "__main__":
    train_utils.run_script(main, __doc__, EXAMPLE, define_flags)
