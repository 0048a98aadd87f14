"""Masked-LM pretraining of Chinese BERT / RoBERTa-wwm from TFRecords (TF2 / Keras 3).

The TF2 counterpart of google-research/bert's run_pretraining.py, with its flag names:

    python run_pretraining.py --input_file='data/wiki_*.tfrecord' --output_dir=out \
        --bert_config_file=resources/bert_config_L12_H768.json --do_train --do_eval \
        --train_batch_size=256 --max_seq_length=128 --max_predictions_per_seq=20 \
        --num_train_steps=100000 --num_warmup_steps=10000 --learning_rate=1e-4

Rerunning the same command resumes from the last `output_dir/ckpt-N`, including the position in
the input, so a preempted job neither repeats nor skips batches.

How one step runs (the same code under every tf.distribute strategy):
  host:     next(iterator) -> this worker's batch [B_worker, ...]     (iterator state is checkpointed)
  replica:  slice of the batch [B_replica, ...] -> [k, B_micro, ...] for k = accumulation steps
            `_loss_and_grads`: a pure function of the variable *values* (jit-compiled with XLA)
              loops over the k micro-batches, sums masked-LM loss numerators and their gradients
            all-reduce the sums over replicas -> gradient of the global weighted-mean loss
            optimizer.apply (outside XLA)
XLA only ever sees tensors, never the (mirrored) variables: compiling code that touches variables
fails under MirroredStrategy ("resource ... on a different device").
"""

import json
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags, logging

import modeling
import optimization
import pretraining_records
import train_utils


def define_flags(fv=flags.FLAGS):
    """Defines the flags on `fv` (a FlagValues); separate so tests can parse an argv of their own."""
    def string(name, default, text):
        flags.DEFINE_string(name, default, text, flag_values=fv)

    def integer(name, default, text):
        flags.DEFINE_integer(name, default, text, flag_values=fv)

    def boolean(name, default, text):
        flags.DEFINE_bool(name, default, text, flag_values=fv)

    def number(name, default, text):
        flags.DEFINE_float(name, default, text, flag_values=fv)

    # Google's flag names and defaults where Google had the flag.
    with train_utils.flag_group("Data", fv):
        string("input_file", None, "Comma-separated globs of pretraining TFRecords.")
        string("eval_input_file", None, "Records for --do_eval (default: --input_file, as Google).")
        integer("max_seq_length", 128, "Sequence length of the records.")
        integer("max_predictions_per_seq", 20, "Masked positions per sequence in the records.")
        number("masked_lm_prob", 0.10, "Share of tokens to predict, for records masked at training "
               "time (create_pretraining_data.py --dynamic_masking); static records keep theirs.")
        integer("shuffle_buffer_size", 1000, "Records in the shuffle buffer (saved in checkpoints).")
        boolean("check_input_files", True, "Read every record once before training (CRC, count "
                "against the .meta.json) so bad data fails before step 1.")
    with train_utils.flag_group("Model and checkpoints", fv):
        string("bert_config_file", None, "bert_config.json of the model to train.")
        string("init_checkpoint", None, "Starting weights (ours or a Google TF1 bert_model.ckpt); "
               "ignored when output_dir already holds a checkpoint to resume.")
        string("output_dir", None, "Checkpoints (ckpt-N), bert_config.json, TensorBoard logs.")
        integer("save_checkpoints_steps", 1000, "Checkpoint every this many steps.")
        integer("keep_checkpoint_max", 5, "Checkpoints to keep.")
    with train_utils.flag_group("Training", fv):
        boolean("do_train", False, "Train.")
        integer("train_batch_size", 32, "Global batch (all replicas x accumulation steps).")
        integer("gradient_accumulation_steps", 1, "Micro-batches per optimizer update.")
        number("learning_rate", 5e-5, "Peak learning rate.")
        integer("num_train_steps", 100000, "Optimizer updates in total.")
        integer("num_warmup_steps", 10000, "Linear warmup updates.")
        flags.DEFINE_enum("optimizer", "adamw", ["adamw", "lamb"], "LAMB for very large batches.",
                          flag_values=fv)
        number("beta_2", 0.98, "Adam/LAMB beta_2 (0.98 as in roberta_zh).")
        number("weight_decay", 0.01, "Decoupled weight decay (not on LayerNorm/bias).")
        integer("seed", 12345, "Seed for initialisation, shuffling and dropout.")
    with train_utils.flag_group("Evaluation", fv):
        boolean("do_eval", False, "Evaluate masked-LM loss/accuracy; prints one JSON line.")
        integer("eval_batch_size", 8, "Global eval batch.")
        integer("max_eval_steps", 100, "Maximum eval batches.")
    with train_utils.flag_group("Hardware: TPU, GPUs, CPU", fv):
        flags.DEFINE_enum("strategy", "auto", list(train_utils.STRATEGIES),
                          "auto: TPU if --tpu_name, multi-worker from TF_CONFIG, all GPUs, else one "
                          "device.", flag_values=fv)
        boolean("use_tpu", False, "Same as --strategy=tpu.")
        string("tpu_name", None, "TPU name or grpc:// address.")
        string("tpu_zone", None, "GCE zone of the TPU (optional).")
        string("gcp_project", None, "GCP project of the TPU (optional).")
        integer("iterations_per_loop", 1000, "Steps per host call (one compiled loop).")
        boolean("mixed_precision", False, "bfloat16 compute on TPUs and on GPUs that support it "
                "(compute capability >= 8.0); ignored with a warning elsewhere.")
        boolean("jit_compile", True, "Compile the forward/backward pass with XLA.")
    if fv is flags.FLAGS:
        train_utils.require_flags("input_file", "bert_config_file", "output_dir")


def parse_flags(argv):
    """argv (without the program name) -> a FlagValues with this script's flags; for tests."""
    fv = flags.FlagValues()
    define_flags(fv)
    fv(["run_pretraining.py"] + list(argv))
    return fv


UsageError = train_utils.UsageError  # bad flags, config or data: one line, before anything is written


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or inf."""


# ------------------------------------------------------------------------------------------------
# Input: records -> checks -> tf.data pipeline
# ------------------------------------------------------------------------------------------------

def make_dataset(files, batch_size, seq_len, max_pred, is_training, seed,
                 num_workers=1, worker_index=0, shuffle_buffer_size=1000, masked_lm_prob=0.10):
    """This worker's batches: dict of int32 [batch_size, S] / [batch_size, P], float32 weights.

    Training: files sharded over workers, shuffled, repeated, interleaved, records shuffled with a
    fixed seed (the iterator's state, shuffle buffer included, goes into the checkpoint).
    Eval: files in order, once; the last batch is padded with zero-weight rows so every batch has
    the same shape and the padding does not count.
    """
    shard_records = num_workers > 1 and len(files) < num_workers
    if num_workers > 1 and not shard_records:
        files = files[worker_index::num_workers]
    d = tf.data.Dataset.from_tensor_slices(files)
    if is_training:
        d = d.shuffle(len(files), seed=seed).repeat()
        d = d.interleave(tf.data.TFRecordDataset, cycle_length=min(4, len(files)),
                         num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if shard_records:
            d = d.shard(num_workers, worker_index)
        d = d.shuffle(shuffle_buffer_size, seed=seed)
    else:
        d = tf.data.TFRecordDataset(d)
        if shard_records:
            d = d.shard(num_workers, worker_index)
    # Each record's index in this worker's stream: kinds that draw masks in tf.data key them by it.
    d = d.enumerate().batch(batch_size, drop_remainder=is_training)
    parse_records = pretraining_records.make_parser(
        pretraining_records.read_info(files), seq_len, max_pred, seed=seed,
        masked_lm_prob=masked_lm_prob, training=is_training)

    def parse(position, serialized):
        batch = parse_records(position, serialized)
        if not is_training:
            pad = batch_size - tf.shape(serialized)[0]
            batch = {k: tf.pad(v, [[0, pad], [0, 0]]) for k, v in batch.items()}
            batch = {k: tf.ensure_shape(v, [batch_size, None]) for k, v in batch.items()}
        return batch

    return d.map(parse, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


# ------------------------------------------------------------------------------------------------
# The step: loss and gradients as a pure (XLA-compiled) function; all-reduce and update outside
# ------------------------------------------------------------------------------------------------

def mlm_sums(logits, masked_lm_ids, masked_lm_weights):
    """Weighted sums over masked positions: (loss_sum, correct_sum, weight_sum), each a scalar.

    logits [B, P, V] float32; masked_lm_ids [B, P]; masked_lm_weights [B, P] (1 real, 0 padding).
    Sums rather than means, so micro-batches and replicas combine exactly into the mean over the
    global batch: loss = sum(loss_sum) / sum(weight_sum), as in Google's masked_lm loss.
    """
    cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=masked_lm_ids, logits=logits)                                      # [B, P]
    correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), masked_lm_ids),
                      tf.float32)                                                  # [B, P]
    return (tf.reduce_sum(masked_lm_weights * cross_entropy),
            tf.reduce_sum(masked_lm_weights * correct),
            tf.reduce_sum(masked_lm_weights))


_MODEL_INPUTS = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions")
_EPSILON = 1e-5  # Google's denominator guard for batches without masked positions


class MaskedLMTrainer:
    """Compiled train/eval steps for a BertPretrainer under any tf.distribute strategy.

    Every call takes this worker's batch (a plain tensor dict from a local tf.data iterator, so the
    iterator can be checkpointed); each replica slices its rows out by replica id.
    """

    def __init__(self, model, optimizer, strategy, per_replica_batch, accumulation_steps=1,
                 per_replica_eval_batch=1, local_replicas=1, jit_compile=True):
        self.model, self.optimizer, self.strategy = model, optimizer, strategy
        self.per_replica_batch = per_replica_batch
        self.accumulation_steps = accumulation_steps
        self.per_replica_eval_batch = per_replica_eval_batch
        self.local_replicas = local_replicas
        self._loss_and_grads_fn = tf.function(self._loss_and_grads, jit_compile=jit_compile)
        self._eval_sums_fn = tf.function(self._eval_sums, jit_compile=jit_compile)
        self.train_loop = tf.function(self._train_loop)
        self.eval_step = tf.function(self._eval_step)

    # -- pure functions of the variable values (safe to compile under every strategy) -----------

    def _loss_and_grads(self, trainable, non_trainable, batch):
        """Sums over k micro-batches. batch: dict of [k, B_micro, ...].

        Returns (grads of loss_sum per trainable variable, [loss_sum, correct_sum, weight_sum],
        new non-trainable values (the dropout seed states)).
        """

        def micro_batch(i, non_trainable):
            micro = {name: t[i] for name, t in batch.items()}                    # [B_micro, ...]
            with tf.GradientTape() as tape:
                tape.watch(trainable)
                logits, non_trainable = self.model.stateless_call(
                    trainable, non_trainable, {k: micro[k] for k in _MODEL_INPUTS}, training=True)
                loss_sum, correct, weight = mlm_sums(
                    logits, micro["masked_lm_ids"], micro["masked_lm_weights"])
            grads = tape.gradient(loss_sum, trainable)
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

    def _eval_sums(self, trainable, non_trainable, batch):
        logits, _ = self.model.stateless_call(
            trainable, non_trainable, {k: batch[k] for k in _MODEL_INPUTS}, training=False)
        return tf.stack(mlm_sums(logits, batch["masked_lm_ids"], batch["masked_lm_weights"]))

    # -- replica functions ----------------------------------------------------------------------

    def _my_rows(self, batch, rows):
        """This replica's `rows` rows of the worker batch."""
        context = tf.distribute.get_replica_context()
        start = (context.replica_id_in_sync_group % self.local_replicas) * rows
        return {k: tf.ensure_shape(v[start:start + rows], [rows] + v.shape[1:])
                for k, v in batch.items()}

    def _values(self):
        return ([v.value for v in self.model.trainable_variables],
                [v.value for v in self.model.non_trainable_variables])

    def _replica_train_step(self, batch):
        k = self.accumulation_steps
        micro = self.per_replica_batch // k
        batch = {name: tf.reshape(t, [k, micro] + t.shape[1:])                     # [k, B_micro, ...]
                 for name, t in self._my_rows(batch, self.per_replica_batch).items()}
        trainable, non_trainable = self._values()
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync
        # Mirrored seed states would give every replica the same dropout masks; shift each
        # replica's counter into its own range for the call, and back before storing the state.
        offsets = [self._seed_offset(v, context.replica_id_in_sync_group)
                   for v in self.model.non_trainable_variables]
        non_trainable = [v + o for v, o in zip(non_trainable, offsets)]
        grads, sums, new_non_trainable = self._loss_and_grads_fn(trainable, non_trainable, batch)
        new_non_trainable = [v - o for v, o in zip(new_non_trainable, offsets)]

        if replicas > 1:
            grads, sums = context.all_reduce(tf.distribute.ReduceOp.SUM, (grads, sums))
        denominator = sums[2] + _EPSILON
        grads = [g / denominator for g in grads]          # gradient of the global mean loss
        grad_norm = tf.linalg.global_norm(grads)
        learning_rate = tf.convert_to_tensor(self.optimizer.learning_rate)
        # The optimizer sums what the replicas hand it (it all-reduces before clipping), so each
        # replica hands over an equal share; exact for power-of-two replica counts.
        self.optimizer.apply([g * (1.0 / replicas) for g in grads] if replicas > 1 else grads,
                             self.model.trainable_variables)
        self._assign_non_trainable(new_non_trainable)
        return {"loss": sums[0] / denominator, "masked_lm_accuracy": sums[1] / denominator,
                "grad_norm": grad_norm, "learning_rate": tf.cast(learning_rate, tf.float32)}

    @staticmethod
    def _seed_offset(variable, replica_id):
        """[0, replica_id * 2^31] for a Keras seed-generator state [seed, counter], else 0."""
        if "seed_generator" not in variable.path or tuple(variable.shape) != (2,):
            return tf.zeros((), variable.dtype)
        step = tf.cast(replica_id, variable.dtype) * tf.constant(1 << 31, variable.dtype)
        return tf.stack([tf.zeros((), variable.dtype), step])

    def _assign_non_trainable(self, values):
        """Writes back the dropout seed states (their aggregation is NONE: update per replica)."""
        variables = [v.value for v in self.model.non_trainable_variables]
        if not variables:
            return

        def update(strategy, values):
            for variable, value in zip(variables, values):
                strategy.extended.update(variable, lambda var, x: var.assign(x), args=(value,),
                                         group=False)

        tf.distribute.get_replica_context().merge_call(update, args=(values,))

    def _replica_eval_step(self, batch):
        trainable, non_trainable = self._values()
        sums = self._eval_sums_fn(trainable, non_trainable,
                                  self._my_rows(batch, self.per_replica_eval_batch))
        context = tf.distribute.get_replica_context()
        if context.num_replicas_in_sync > 1:
            sums = context.all_reduce(tf.distribute.ReduceOp.SUM, sums)
        return sums

    # -- host calls -----------------------------------------------------------------------------

    def _first_replica(self, value):
        return self.strategy.experimental_local_results(value)[0]  # all replicas hold the same

    def _train_loop(self, iterator, num_steps):
        """Runs up to `num_steps` steps; stops early on a non-finite loss.

        Returns (mean metrics over the steps run, last learning rate, steps run, all finite).
        """
        totals = {k: tf.constant(0.0) for k in ("loss", "masked_lm_accuracy", "grad_norm")}
        learning_rate = tf.constant(0.0)
        steps, finite = tf.constant(0), tf.constant(True)
        while steps < num_steps and finite:
            metrics = self.strategy.run(self._replica_train_step, args=(next(iterator),))
            metrics = {k: self._first_replica(v) for k, v in metrics.items()}
            finite = tf.math.is_finite(metrics["loss"]) & tf.math.is_finite(metrics["grad_norm"])
            totals = {k: totals[k] + metrics[k] for k in totals}
            learning_rate = metrics["learning_rate"]
            steps += 1
        means = {k: v / tf.cast(tf.maximum(steps, 1), tf.float32) for k, v in totals.items()}
        return means, learning_rate, steps, finite

    def _eval_step(self, batch):
        """-> [loss_sum, correct_sum, weight_sum] over the global batch."""
        return self._first_replica(self.strategy.run(self._replica_eval_step, args=(batch,)))


# ------------------------------------------------------------------------------------------------
# Driver
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


def _worker_info(strategy):
    """-> (num_workers, worker_index, is_chief, local_replicas) for this process."""
    local_replicas = len(strategy.extended.worker_devices)
    num_workers = max(1, strategy.num_replicas_in_sync // local_replicas)
    resolver = getattr(strategy, "cluster_resolver", None)
    if num_workers == 1 or resolver is None or not getattr(resolver, "task_type", None):
        return 1, 0, True, strategy.num_replicas_in_sync
    cluster = resolver.cluster_spec().as_dict()
    order = [(job, i) for job in ("chief", "worker") for i in range(len(cluster.get(job, [])))]
    index = order.index((resolver.task_type, resolver.task_id))
    return num_workers, index, index == 0, local_replicas


def _set_precision(use_bf16, strategy):
    if not use_bf16:
        return
    supported = isinstance(strategy, tf.distribute.TPUStrategy)
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        supported |= details.get("compute_capability", (0,))[0] >= 8
    if supported:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        logging.info("mixed precision: bfloat16 compute, float32 variables")
    else:
        logging.warning("--mixed_precision ignored: no TPU or bf16-capable GPU "
                        "(bf16 is slower than fp32 on CPUs)")


def _check_output_dir(output_dir, config):
    """UsageError if output_dir holds a run of a different model (never overwrite it)."""
    path = os.path.join(output_dir, "bert_config.json")
    if tf.io.gfile.exists(path):
        existing = modeling.BertConfig.from_json_file(path)
        if existing.to_dict() != config.to_dict():
            diff = sorted(k for k in set(existing.to_dict()) | set(config.to_dict())
                          if existing.to_dict().get(k) != config.to_dict().get(k))
            raise UsageError(f"{path} differs from --bert_config_file in {', '.join(diff)}: "
                             "--output_dir holds another model's run; use a new --output_dir")


def run(opts):
    """Trains and/or evaluates as the flags in `opts` say; returns the eval metrics (or {})."""


    # 1. Everything that can be checked is checked before anything is built or written.
    if not (opts.do_train or opts.do_eval):
        raise UsageError("at least one of --do_train or --do_eval must be set")
    if not opts.output_dir:
        raise UsageError("--output_dir is required")
    for name in ("train_batch_size", "eval_batch_size", "num_train_steps", "save_checkpoints_steps",
                 "iterations_per_loop", "gradient_accumulation_steps", "max_eval_steps",
                 "max_seq_length", "max_predictions_per_seq", "keep_checkpoint_max"):
        if getattr(opts, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(opts, name)}")
    config = load_config(opts.bert_config_file)
    if opts.max_seq_length > config.max_position_embeddings:
        raise UsageError(f"--max_seq_length={opts.max_seq_length} > max_position_embeddings="
                         f"{config.max_position_embeddings} of {opts.bert_config_file}")
    train_files = pretraining_records.record_files(opts.input_file) if opts.do_train else []
    eval_files = (pretraining_records.record_files(
        opts.eval_input_file or opts.input_file,
        "--eval_input_file" if opts.eval_input_file else "--input_file") if opts.do_eval else [])

    strategy = train_utils.make_strategy("tpu" if opts.use_tpu else opts.strategy, tpu=opts.tpu_name,
                                         tpu_zone=opts.tpu_zone, gcp_project=opts.gcp_project)
    replicas = strategy.num_replicas_in_sync
    num_workers, worker_index, is_chief, local_replicas = _worker_info(strategy)
    k = opts.gradient_accumulation_steps
    if opts.train_batch_size % (replicas * k):
        raise UsageError(f"--train_batch_size={opts.train_batch_size} is not divisible by replicas "
                         f"({replicas}) x --gradient_accumulation_steps ({k})")
    if opts.eval_batch_size % replicas:
        raise UsageError(f"--eval_batch_size={opts.eval_batch_size} is not divisible by the "
                         f"{replicas} replicas")
    for path in dict.fromkeys(train_files + eval_files):  # unique, training files first
        pretraining_records.check_records(path, opts.max_seq_length, opts.max_predictions_per_seq,
                                          config.vocab_size, full_scan=opts.check_input_files)
    _check_output_dir(opts.output_dir, config)
    if opts.do_train:
        optimization.WarmupPolynomialDecay(opts.learning_rate, opts.num_train_steps,
                                           opts.num_warmup_steps)  # validates the step counts
    logging.info("strategy %s: %d replica(s), %d worker(s); global batch %d = %d per replica x %d "
                 "replicas x %d accumulation steps", type(strategy).__name__, replicas, num_workers,
                 opts.train_batch_size, opts.train_batch_size // (replicas * k), replicas, k)

    # 2. Model, optimizer, input, checkpoint.
    train_utils.set_seed(opts.seed)
    _set_precision(opts.mixed_precision, strategy)
    with strategy.scope():
        model = modeling.build_model(modeling.BertPretrainer(config), seq_len=8)
        optimizer = optimization.create_optimizer(
            opts.learning_rate, opts.num_train_steps, opts.num_warmup_steps,
            optimizer_type=opts.optimizer, weight_decay=opts.weight_decay, beta_2=opts.beta_2)
        optimizer.build(model.trainable_variables)
    trainer = MaskedLMTrainer(
        model, optimizer, strategy, per_replica_batch=opts.train_batch_size // replicas,
        accumulation_steps=k, per_replica_eval_batch=opts.eval_batch_size // replicas,
        local_replicas=local_replicas, jit_compile=opts.jit_compile)

    trackables = {"optimizer": optimizer}
    if model.non_trainable_variables:  # dropout seed states: resume draws the same masks
        trackables["dropout_seeds"] = list(model.non_trainable_variables)
    iterator = None
    if opts.do_train:
        dataset = make_dataset(train_files, opts.train_batch_size // num_workers, opts.max_seq_length,
                               opts.max_predictions_per_seq, True, opts.seed, num_workers,
                               worker_index, opts.shuffle_buffer_size, opts.masked_lm_prob)
        iterator = iter(dataset)
        trackables["train_input"] = iterator
    checkpoint = modeling.make_checkpoint(model, **trackables)
    # Workers other than the chief keep their own checkpoints: each has its own input position.
    ckpt_dir = (opts.output_dir if is_chief
                else os.path.join(opts.output_dir, "workers", f"worker-{worker_index}"))
    manager = tf.train.CheckpointManager(checkpoint, ckpt_dir, max_to_keep=opts.keep_checkpoint_max)
    if manager.latest_checkpoint:
        try:
            checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        except (tf.errors.OpError, AssertionError, ValueError) as e:
            raise UsageError(f"cannot resume from {manager.latest_checkpoint} (were --input_file or "
                             f"the batch size changed?): {str(e).splitlines()[0]}") from None
        logging.info("resumed from %s at step %d", manager.latest_checkpoint,
                     int(optimizer.iterations.numpy()))
    elif opts.init_checkpoint:
        try:
            modeling.load_pretrained(model, opts.init_checkpoint)
        except ValueError as e:
            raise UsageError(str(e)) from None
    elif opts.do_eval and not opts.do_train:
        raise UsageError(f"--do_eval alone: no checkpoint in {opts.output_dir} "
                         "and no --init_checkpoint")

    tf.io.gfile.makedirs(opts.output_dir)
    config_path = os.path.join(opts.output_dir, "bert_config.json")
    if is_chief and not tf.io.gfile.exists(config_path):
        config.to_json_file(config_path)

    if opts.do_train:
        _train(opts, trainer, iterator, manager, is_chief)
    if opts.do_eval:
        return _evaluate(opts, trainer, eval_files, num_workers, worker_index)
    return {}


def _train(opts, trainer, iterator, manager, is_chief):
    step = int(trainer.optimizer.iterations.numpy())
    if step >= opts.num_train_steps:
        logging.info("already trained to step %d >= --num_train_steps=%d", step, opts.num_train_steps)
        return
    writer = (tf.summary.create_file_writer(os.path.join(opts.output_dir, "train")) if is_chief
              else tf.summary.create_noop_writer())
    progress = train_utils.ProgressLogger(total=opts.num_train_steps, unit="steps", name="pretrain",
                                          start=step)
    while step < opts.num_train_steps:
        # Host calls end on checkpoint boundaries, so saves happen exactly every N steps.
        next_save = (step // opts.save_checkpoints_steps + 1) * opts.save_checkpoints_steps
        n = min(opts.iterations_per_loop, opts.num_train_steps - step, next_save - step)
        start = time.perf_counter()
        try:
            means, learning_rate, ran, finite = trainer.train_loop(iterator, tf.constant(n))
        except tf.errors.OpError as e:
            if isinstance(e, tf.errors.DataLossError) or "Key: " in e.message:  # not our records
                raise UsageError(f"bad input record near step {step}: "
                                 f"{e.message.splitlines()[0]}") from None
            raise
        ran, elapsed = int(ran), time.perf_counter() - start
        if not bool(finite):
            last = manager.latest_checkpoint or "none written yet"
            raise TrainingDivergedError(
                f"loss became NaN/inf at step {step + ran}; stopped without saving. Last good "
                f"checkpoint: {last}. Lower --learning_rate or check the data, then rerun to resume.")
        step += ran
        metrics = {k: float(v) for k, v in means.items()}
        metrics["learning_rate"] = float(learning_rate)
        metrics["sequences_per_second"] = ran * opts.train_batch_size / elapsed
        with writer.as_default(step=step):
            for name, value in metrics.items():
                tf.summary.scalar(name, value)
        writer.flush()
        progress.update(ran, force=step >= opts.num_train_steps, loss=metrics["loss"],
                        acc=metrics["masked_lm_accuracy"], seq_per_s=metrics["sequences_per_second"])
        if step % opts.save_checkpoints_steps == 0 or step >= opts.num_train_steps:
            manager.save(checkpoint_number=step)
            logging.info("saved %s", manager.latest_checkpoint)


def _evaluate(opts, trainer, files, num_workers, worker_index):
    """Masked-LM loss/accuracy/perplexity over at most --max_eval_steps batches; prints JSON."""
    sums = np.zeros(3)
    dataset = make_dataset(files, opts.eval_batch_size // num_workers, opts.max_seq_length,
                           opts.max_predictions_per_seq, False, opts.seed, num_workers, worker_index,
                           masked_lm_prob=opts.masked_lm_prob)
    for batch in dataset.take(opts.max_eval_steps):
        sums += trainer.eval_step(batch).numpy()
    loss = sums[0] / (sums[2] + _EPSILON)
    result = {"masked_lm_loss": float(loss),
              "masked_lm_accuracy": float(sums[1] / (sums[2] + _EPSILON)),
              "perplexity": float(math.exp(min(loss, 700.0))),
              "global_step": int(trainer.optimizer.iterations.numpy())}
    print(json.dumps(result), flush=True)
    return result


EXAMPLE = ("python run_pretraining.py --do_train --do_eval --input_file=/tmp/records/train.tfrecord "
           "--bert_config_file=resources/bert_config_tiny.json --output_dir=/tmp/pretrain "
           "--train_batch_size=32 --num_train_steps=1000 --num_warmup_steps=100 --learning_rate=1e-3")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        run(flags.FLAGS)
    except (UsageError, TrainingDivergedError) as e:
        raise SystemExit(f"run_pretraining.py: error: {e}") from None


if __name__ == "__main__":
    define_flags()
    train_utils.run_script(main, __doc__, EXAMPLE)
