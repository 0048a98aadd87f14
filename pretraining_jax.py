"""Masked-LM pretraining on JAX: what `KERAS_BACKEND=jax python run_pretraining.py ...` runs.

The same command, flags, run folder and resume rules as the TensorFlow trainer in run_pretraining.py,
with no TensorFlow imported (GPU and TPU machines with only JAX). Shared with TensorFlow, one owner each:
  flags and their checks       run_pretraining.define_flags / check_config_and_files
  the loss                     run_pretraining.mlm_sums (keras.ops)
  schedule and update rules    optimization.py (keras.ops; here through optimizer.stateless_apply)
  the model and its weights    modeling.py (keras.ops; weights saved with modeling.save_weights)
  input position on resume     pretraining_input.input_state / check_resume_input
  the run folder               model_folder.write (bert_config.json, vocab.txt, model_info.json)
Only what is backend-specific lives here: the jitted step, its sharding over the local devices, the
checkpoint files (train state + safetensors weights instead of tf.train.Checkpoint), and the
TensorBoard writer (tensorboard's own, TF-free).

How one step runs (MaskedLMTrainer.train_step, one XLA computation):
  batch:    [G, ...] = --train_batch_size sequences, sharded over a 1-D mesh of every local device
            (weights, optimizer slots and seeds replicated); records masked at training time are
            masked here, on the device, from (seed, stream position)
  micro:    [k, G/k, ...] for k = --gradient_accumulation_steps; micro-batch i takes the i-th slice
            of every device's rows, as each TF replica splits its own batch
            loss and gradients summed over the k micro-batches (lax.scan)
  reduce:   XLA's partitioner sums the gradient and the masked-LM sums over devices (one all-reduce)
            / number of masked positions in the global batch -> gradient of Google's mean loss
            clip the global norm (Google's order), then the optimizer's rule (stateless_apply)
  dropout:  Keras' seed-generator states are carried through the step as non-trainable state
            (model.stateless_call), saved in each checkpoint, so a resumed run draws the same masks.
"""

import glob
import io
import json
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import keras
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import file_output
import modeling
import optimization
import pretraining_records
import run_pretraining
import train_utils

UsageError = train_utils.UsageError
_MODEL_INPUTS = run_pretraining._MODEL_INPUTS
_EPSILON = run_pretraining._EPSILON
TRAIN_STATE = ".train_state.npz"     # ckpt-N.train_state.npz: optimizer slots, step, dropout seeds
WEIGHTS = ".weights.safetensors"     # ckpt-N.weights.safetensors: the model (Google names), last


class MaskedLMTrainer:
    """The jitted train and eval steps of a BertPretrainer, data-parallel over `devices`.

    State is a pytree {"trainable", "non_trainable", "optimizer"}: lists of arrays in the order of
    model.trainable_variables, model.non_trainable_variables and optimizer.variables. The model and
    optimizer objects only describe the computation; their variables are written back by `to_model`
    (for saving). `prepare` / `eval_prepare`: optional jittable batch -> model tensors, run inside
    the train / eval step (on-device masking of records masked at training time).
    """

    def __init__(self, model, optimizer, global_batch, accumulation_steps=1, clip_norm=1.0,
                 mixed_precision=False, devices=None, prepare=None, eval_prepare=None):
        self.model, self.optimizer = model, optimizer
        self.prepare, self.eval_prepare = prepare, eval_prepare
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self.global_batch, self.k, self.clip_norm = global_batch, accumulation_steps, clip_norm
        if global_batch % (len(self.devices) * accumulation_steps):
            raise ValueError(f"global batch {global_batch} is not divisible by devices "
                             f"({len(self.devices)}) x accumulation steps ({accumulation_steps})")
        compute = model.dtype_policy.compute_dtype
        if compute != ("bfloat16" if mixed_precision else "float32"):
            raise ValueError(f"mixed_precision={mixed_precision}, but the model computes in "
                             f"{compute}: build it under the matching Keras dtype policy")
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        self.mesh = Mesh(np.array(self.devices), ("batch",))
        self.replicated = NamedSharding(self.mesh, P())
        self.sharded = NamedSharding(self.mesh, P("batch"))           # [G, ...] rows over devices
        self._micro_sharding = NamedSharding(self.mesh, P(None, "batch"))  # [k, G/k, ...]
        self.train_step = jax.jit(self._train_step, in_shardings=(self.replicated, self.sharded),
                                  out_shardings=self.replicated, donate_argnums=0)
        self.eval_step = jax.jit(self._eval_step, in_shardings=(self.replicated, self.sharded),
                                 out_shardings=self.replicated)

    # -- state ----------------------------------------------------------------------------------

    def init_state(self):
        """The current values of the model's and optimizer's variables, as replicated arrays.

        Host copies first: the train step donates its input state, which must never be the buffers
        the Keras variables still hold."""
        state = {"trainable": [np.asarray(v.value) for v in self.model.trainable_variables],
                 "non_trainable": [np.asarray(v.value) for v in self.model.non_trainable_variables],
                 "optimizer": [np.asarray(v.value) for v in self.optimizer.variables]}
        return jax.device_put(state, self.replicated)

    def step_of(self, state):
        """The number of optimizer updates in `state` (the optimizer's `iterations`)."""
        index = next(i for i, v in enumerate(self.optimizer.variables)
                     if v is self.optimizer.iterations)
        return int(state["optimizer"][index])

    def to_model(self, state):
        """Writes `state` into the model's and optimizer's Keras variables (host copies)."""
        host = jax.device_get(state)
        for variables, values in ((self.model.trainable_variables, host["trainable"]),
                                  (self.model.non_trainable_variables, host["non_trainable"]),
                                  (self.optimizer.variables, host["optimizer"])):
            for variable, value in zip(variables, values):
                variable.assign(np.asarray(value))

    # -- the step -------------------------------------------------------------------------------

    def _sums(self, trainable, non_trainable, batch, training):
        """-> ([loss_sum, correct_sum, weight_sum], new non-trainable values) of one micro-batch."""
        logits, non_trainable = self.model.stateless_call(
            trainable, non_trainable, {k: batch[k] for k in _MODEL_INPUTS}, training=training)
        sums = run_pretraining.mlm_sums(logits, batch["masked_lm_ids"], batch["masked_lm_weights"])
        return jnp.stack(sums), non_trainable

    def _micro_batches(self, x):
        """[G, ...] -> [k, G/k, ...]: micro-batch i is the i-th of k slices of every device's rows,
        so no row changes device."""
        d, k = len(self.devices), self.k
        x = x.reshape((d, k, x.shape[0] // (d * k)) + x.shape[1:])     # [D, k, G/(Dk), ...]
        x = jnp.swapaxes(x, 0, 1).reshape((k, -1) + x.shape[3:])       # [k, G/k, ...]
        return jax.lax.with_sharding_constraint(x, self._micro_sharding)

    def _train_step(self, state, batch):
        trainable, non_trainable = state["trainable"], state["non_trainable"]
        if self.prepare is not None:
            batch = self.prepare(batch)
        micro = {name: self._micro_batches(batch[name])
                 for name in _MODEL_INPUTS + ("masked_lm_ids", "masked_lm_weights")}

        def loss_sum(trainable, non_trainable, micro_batch):
            sums, non_trainable = self._sums(trainable, non_trainable, micro_batch, training=True)
            return sums[0], (sums, non_trainable)

        grad_fn = jax.grad(loss_sum, has_aux=True)

        def accumulate(carry, micro_batch):
            grads, sums, non_trainable = carry
            new_grads, (new_sums, non_trainable) = grad_fn(trainable, non_trainable, micro_batch)
            return (jax.tree.map(jnp.add, grads, new_grads), sums + new_sums, non_trainable), None

        zeros = ([jnp.zeros_like(v) for v in trainable], jnp.zeros([3], "float32"), non_trainable)
        (grads, sums, non_trainable), _ = jax.lax.scan(accumulate, zeros, micro)
        denominator = sums[2] + _EPSILON
        grads = [g / denominator for g in grads]            # gradient of the global mean loss
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in grads))
        if self.clip_norm > 0:  # Google: clip the global norm of the whole batch's gradient
            grads = [g * (self.clip_norm / jnp.maximum(grad_norm, self.clip_norm)) for g in grads]
        # The learning rate of this update: the schedule at the optimizer's current step.
        with keras.StatelessScope(state_mapping=list(zip(self.optimizer.variables,
                                                         state["optimizer"]))):
            learning_rate = jnp.asarray(self.optimizer.learning_rate, "float32")
        trainable, optimizer_variables = self.optimizer.stateless_apply(
            state["optimizer"], grads, trainable)
        metrics = {"loss": sums[0] / denominator, "masked_lm_accuracy": sums[1] / denominator,
                   "grad_norm": grad_norm, "learning_rate": learning_rate}
        return ({"trainable": trainable, "non_trainable": non_trainable,
                 "optimizer": optimizer_variables}, metrics)

    def _eval_step(self, state, batch):
        """-> [loss_sum, correct_sum, weight_sum] over the global batch."""
        if self.eval_prepare is not None:
            batch = self.eval_prepare(batch)
        sums, _ = self._sums(state["trainable"], state["non_trainable"], batch, training=False)
        return sums


# ------------------------------------------------------------------------------------------------
# Checkpoints: ckpt-N.train_state.npz (first), then ckpt-N.weights.safetensors (last, atomically)
# ------------------------------------------------------------------------------------------------

def _saved_steps(output_dir):
    """Steps of the complete saves in output_dir (their weights file exists), ascending."""
    steps = []
    for path in glob.glob(os.path.join(output_dir, "ckpt-*" + WEIGHTS)):
        match = re.fullmatch(r"ckpt-(\d+)" + re.escape(WEIGHTS), os.path.basename(path))
        if match and os.path.exists(os.path.join(output_dir, f"ckpt-{match.group(1)}{TRAIN_STATE}")):
            steps.append(int(match.group(1)))
    return sorted(steps)


def _remove_partial_saves(output_dir):
    """What a kill during a save leaves: temp files, and a train state whose weights never came."""
    complete = set(_saved_steps(output_dir))
    for path in glob.glob(os.path.join(output_dir, "ckpt-*")):
        name = os.path.basename(path)
        state = re.fullmatch(r"ckpt-(\d+)" + re.escape(TRAIN_STATE), name)
        if ".tmp-" in name or (state and int(state.group(1)) not in complete):
            logging.warning("removing %s, left by a run killed while saving", path)
            os.remove(path)


def _seed_variables(model):
    """Indices into model.non_trainable_variables of the states that are not weights (Keras'
    dropout seed generators): saved in the train state, since the weights file holds weights only."""
    weights = {id(w) for w in model.weights}
    return [i for i, v in enumerate(model.non_trainable_variables) if id(v) not in weights]


def save(trainer, state, output_dir, keep):
    """Writes ckpt-N (N = the state's step) and deletes the oldest beyond `keep`."""
    step = trainer.step_of(state)
    trainer.to_model(state)
    model, optimizer = trainer.model, trainer.optimizer
    arrays = {"step": np.int64(step),
              "optimizer_paths": np.array([v.path for v in optimizer.variables])}
    arrays.update({f"optimizer/{i}": np.asarray(v.value) for i, v in enumerate(optimizer.variables)})
    arrays.update({f"seeds/{i}": np.asarray(model.non_trainable_variables[i].value)
                   for i in _seed_variables(model)})
    base = os.path.join(output_dir, f"ckpt-{step}")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    file_output.atomic_write(base + TRAIN_STATE, buffer.getvalue())  # temp name, then a rename
    modeling.save_weights(model, base + WEIGHTS)  # atomic: its presence completes the save
    logging.info("saved %s", base)
    for old in _saved_steps(output_dir)[:-keep]:
        for suffix in (WEIGHTS, TRAIN_STATE):  # weights first: what is left reads as incomplete
            os.remove(os.path.join(output_dir, f"ckpt-{old}{suffix}"))


def restore(trainer, output_dir, step):
    """Loads ckpt-`step` into the trainer's model and optimizer variables; UsageError naming the
    file when it is damaged or another model's."""
    model, optimizer = trainer.model, trainer.optimizer
    base = os.path.join(output_dir, f"ckpt-{step}")
    fix = (f"delete {base}{WEIGHTS} and {base}{TRAIN_STATE} to resume from the save before, or use "
           "a new --output_dir")
    try:
        modeling.load_pretrained(model, base + WEIGHTS)
        with np.load(base + TRAIN_STATE) as saved:
            paths = [str(p) for p in saved["optimizer_paths"]]
            if paths != [v.path for v in optimizer.variables]:
                raise ValueError("its optimizer state is another optimizer's (--optimizer differs?)")
            for i, variable in enumerate(optimizer.variables):
                variable.assign(saved[f"optimizer/{i}"])
            for i in _seed_variables(model):
                model.non_trainable_variables[i].assign(saved[f"seeds/{i}"])
            if int(saved["step"]) != step or int(np.asarray(optimizer.iterations.value)) != step:
                raise ValueError(f"it holds step {int(saved['step'])}")
    except Exception as e:  # truncated or foreign files fail in many ways  # noqa: BLE001
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot resume from {base} ({detail}): {fix}") from None
    logging.info("resumed from %s at step %d", base, step)


# ------------------------------------------------------------------------------------------------
# The run: run_pretraining.py's command under KERAS_BACKEND=jax
# ------------------------------------------------------------------------------------------------

# TensorFlow's device flags: what they choose is fixed under JAX (every local device, compiled).
_TF_ONLY_FLAGS = ("strategy", "use_tpu", "tpu_name", "tpu_zone", "gcp_project", "jit_compile",
                  "skip_padding")


def _check_backend_flags(opts):
    workers = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {}).get("worker", [])
    if opts.strategy == "multi_worker" or len(workers) > 1 or jax.process_count() > 1:
        raise UsageError("several hosts (--strategy=multi_worker, TF_CONFIG, or a multi-host JAX "
                         "runtime) are trained by the TensorFlow backend only; under "
                         "KERAS_BACKEND=jax one process trains on every device of its host")
    given = [f"--{name}" for name in _TF_ONLY_FLAGS if opts[name].present]
    if given:
        logging.warning("%s ignored under KERAS_BACKEND=jax: the step is always compiled, "
                        "data-parallel over every local device, and computes the padding too",
                        ", ".join(given))
    for name in ("output_dir", "init_checkpoint"):
        if opts[name].value and "://" in opts[name].value:
            raise UsageError(f"--{name}={opts[name].value}: remote paths need TensorFlow's file "
                             "system; under KERAS_BACKEND=jax give a local (or mounted) folder")


def _set_precision(use_bf16, devices):
    """--mixed_precision under JAX, the rule of train_utils.set_precision: bfloat16 compute on TPUs
    and on GPUs of compute capability >= 8.0, else a warning and float32. -> whether bf16 is on."""
    keras.mixed_precision.set_global_policy("float32")
    if not use_bf16:
        return False
    if all(d.platform == "tpu" or (d.platform == "gpu" and
                                   float(getattr(d, "compute_capability", 0) or 0) >= 8)
           for d in devices):
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        logging.info("mixed precision: bfloat16 compute, float32 variables")
        return True
    logging.warning("--mixed_precision ignored: no TPU or bf16-capable GPU "
                    "(bf16 is slower than fp32 on CPUs)")
    return False


def _prepare_fns(opts, info):
    """(train, eval) functions that mask records masked at training time, on the device; (None,
    None) for records masked when written."""
    if info.kind == pretraining_records.STATIC:
        return None, None
    import jax_masking

    options = jax_masking.options(info, opts.masked_lm_prob, opts.max_predictions_per_seq)

    def make(seed):  # evaluation: one fixed mask per sequence for every run, as on TensorFlow
        return lambda batch: jax_masking.mask_batch(batch, seed, **options)

    return make(opts.seed), make(pretraining_records.EVAL_MASK_SEED)


class _Scalars:
    """TensorBoard scalars under output_dir/train, by tensorboard's own TF-free writer."""

    def __init__(self, logdir):
        try:
            from tensorboard.summary import Writer
        except ImportError:
            logging.warning("the tensorboard package is not installed: no TensorBoard scalars in %s "
                            "(the progress lines carry the same figures)", logdir)
            self.writer = None
        else:
            self.writer = Writer(logdir)

    def write(self, step, metrics):
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()


def run(opts):
    """run_pretraining.run under JAX: trains and/or evaluates as the flags say; returns the eval
    metrics (or {})."""
    import pretraining_input
    import record_reader

    # 1. Everything that can be checked is checked before anything is built or written.
    config, train_files, eval_files = run_pretraining.check_config_and_files(opts)
    _check_backend_flags(opts)
    devices = jax.local_devices()
    k = opts.gradient_accumulation_steps
    if opts.train_batch_size % (len(devices) * k):
        raise UsageError(f"--train_batch_size={opts.train_batch_size} is not divisible by devices "
                         f"({len(devices)}) x --gradient_accumulation_steps ({k})")
    if opts.eval_batch_size % len(devices):
        raise UsageError(f"--eval_batch_size={opts.eval_batch_size} is not divisible by the "
                         f"{len(devices)} devices")
    counts = {}
    shape = {"seq_len": opts.max_seq_length, "max_pred": opts.max_predictions_per_seq,
             "vocab_size": config.vocab_size}
    for path in dict.fromkeys(train_files + eval_files):  # unique, training files first
        info = record_reader.check_file(path, opts.max_seq_length, opts.max_predictions_per_seq,
                                        config.vocab_size, full_scan=opts.check_input_files)
        counts[path] = info.meta.get("num_instances") or record_reader.count_records(path)
    run_pretraining._check_output_dir(opts.output_dir, config)
    if glob.glob(os.path.join(opts.output_dir, "ckpt-*.index")):
        raise UsageError(f"--output_dir={opts.output_dir} holds TensorFlow checkpoints: resume it "
                         "on the TensorFlow backend, or start a new --output_dir with "
                         f"--init_checkpoint={opts.output_dir}")
    saved = _saved_steps(opts.output_dir) if os.path.isdir(opts.output_dir) else []
    if opts.do_train:
        input_state = pretraining_input.input_state(opts, train_files, 1)
        if saved:
            pretraining_input.check_resume_input(opts.output_dir, input_state)
    vocab_file, do_lower_case = pretraining_input.vocab_and_casing(opts, train_files or eval_files)
    if not saved and opts.do_eval and not opts.do_train and not opts.init_checkpoint:
        raise UsageError(f"--do_eval alone: no checkpoint in {opts.output_dir} "
                         "and no --init_checkpoint")
    logging.info("JAX on %d %s device(s); global batch %d = %d per device x %d devices x %d "
                 "accumulation steps", len(devices), devices[0].platform, opts.train_batch_size,
                 opts.train_batch_size // (len(devices) * k), len(devices), k)

    # 2. Model, optimizer, state.
    train_utils.set_seed(opts.seed)
    bf16 = _set_precision(opts.mixed_precision, devices)
    model = modeling.build_model(modeling.BertPretrainer(config), seq_len=8)
    # Clipping is the trainer's (Google's order, after the reduction): none in the optimizer.
    optimizer = optimization.create_optimizer(
        opts.learning_rate if opts.do_train else 1.0, max(opts.num_train_steps, 1),
        opts.num_warmup_steps if opts.do_train else 0, optimizer_type=opts.optimizer,
        weight_decay=opts.weight_decay, beta_2=opts.beta_2, clip_norm=0)
    optimizer.build(model.trainable_variables)
    if not saved and opts.init_checkpoint:
        try:
            modeling.load_pretrained(model, opts.init_checkpoint)
        except ValueError as e:  # modeling names the path, the flag is ours to name
            raise UsageError(f"--init_checkpoint: {e}") from None
    info = pretraining_records.read_info(train_files or eval_files)
    prepare, eval_prepare = _prepare_fns(opts, info)
    trainer = MaskedLMTrainer(model, optimizer, opts.train_batch_size, accumulation_steps=k,
                              clip_norm=opts.clip_norm, mixed_precision=bf16, devices=devices,
                              prepare=prepare, eval_prepare=eval_prepare)
    if saved:
        restore(trainer, opts.output_dir, saved[-1])
    state = trainer.init_state()

    # 3. The run folder describes itself from the first step on (a killed run's folder too).
    os.makedirs(opts.output_dir, exist_ok=True)
    _remove_partial_saves(opts.output_dir)
    pretraining_input.write_run_folder(opts.output_dir, config, vocab_file, do_lower_case)
    if opts.do_train:
        pretraining_input.write_json(os.path.join(opts.output_dir, pretraining_input.INPUT_STATE), input_state)
        step = trainer.step_of(state)
        batches = record_reader.train_batches(
            train_files, [counts[p] for p in train_files], opts.train_batch_size, opts.seed,
            opts.shuffle_buffer_size, step, pretraining_records.read_info(train_files), **shape)
        state = _train(opts, trainer, state, batches)
    if opts.do_eval:
        return _evaluate(opts, trainer, state, eval_files, [counts[p] for p in eval_files], shape)
    return {}


def _train(opts, trainer, state, batches):
    step = trainer.step_of(state)
    if step >= opts.num_train_steps:
        logging.info("already trained to step %d >= --num_train_steps=%d", step, opts.num_train_steps)
        return state
    scalars = _Scalars(os.path.join(opts.output_dir, "train"))
    progress = train_utils.ProgressLogger(total=opts.num_train_steps, unit="steps", name="pretrain",
                                          start=step)
    steps_per_loop = opts.steps_per_loop or opts.iterations_per_loop
    while step < opts.num_train_steps:
        # Host loops end on checkpoint boundaries, so saves happen exactly every N steps.
        next_save = (step // opts.save_checkpoints_steps + 1) * opts.save_checkpoints_steps
        n = min(steps_per_loop, opts.num_train_steps - step, next_save - step)
        start = time.perf_counter()
        history = []
        for _ in range(n):  # dispatched asynchronously: the host reads the next batch meanwhile
            state, metrics = trainer.train_step(state, next(batches))
            history.append(metrics)
        history = jax.device_get(history)
        elapsed = time.perf_counter() - start
        for i, metrics in enumerate(history):
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                last = _saved_steps(opts.output_dir)
                last = f"ckpt-{last[-1]}" if last else "none written yet"
                raise run_pretraining.TrainingDivergedError(
                    f"loss became NaN/inf at step {step + i + 1}; stopped without saving. Last "
                    f"good checkpoint: {last}. Lower --learning_rate or check the data, then "
                    "rerun to resume.")
        step += n
        means = {name: float(np.mean([m[name] for m in history]))
                 for name in ("loss", "masked_lm_accuracy", "grad_norm")}
        means["learning_rate"] = float(history[-1]["learning_rate"])
        means["sequences_per_second"] = n * opts.train_batch_size / elapsed
        scalars.write(step, means)
        progress.update(n, force=step >= opts.num_train_steps, loss=means["loss"],
                        acc=means["masked_lm_accuracy"], seq_per_s=means["sequences_per_second"])
        if step % opts.save_checkpoints_steps == 0 or step >= opts.num_train_steps:
            save(trainer, state, opts.output_dir, opts.keep_checkpoint_max)
    return state


def _evaluate(opts, trainer, state, files, counts, shape):
    """Masked-LM loss/accuracy/perplexity over at most --max_eval_steps batches; prints the JSON
    line of run_pretraining._evaluate."""
    import record_reader

    steps = min(opts.max_eval_steps, -(-sum(counts) // opts.eval_batch_size))
    sums = np.zeros(3)
    for batch in record_reader.eval_batches(files, counts, opts.eval_batch_size, steps,
                                            pretraining_records.read_info(files), **shape):
        sums += np.asarray(trainer.eval_step(state, batch), np.float64)
    loss = sums[0] / (sums[2] + _EPSILON)
    result = {"masked_lm_loss": float(loss),
              "masked_lm_accuracy": float(sums[1] / (sums[2] + _EPSILON)),
              "perplexity": float(math.exp(min(loss, 700.0))),
              "global_step": trainer.step_of(state)}
    print(json.dumps(result), flush=True)
    return result
