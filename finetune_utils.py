"""What run_classifier.py, run_ner.py and run_cmrc.py share.

* `tokenize_with_offsets`: the FullTokenizer's tokens plus, for each token, the characters of the
  original text it came from (NER and QA must map token predictions back to character spans).
* `doc_windows` / `max_context_window`: sliding windows over a long token sequence, and which window
  gives a token the most context (Google's run_squad rule; NER uses it too).
* Flags (Google's names) <-> a plain options object, so tests call `run(opts)` without absl flags.
* Building a task model from `bert_config.json` + `--init_checkpoint`, the Keras fit loop that
  evaluates on dev after every epoch and keeps the best checkpoint in `output_dir/best/`, and the
  one-line metrics JSON.
"""

import dataclasses
import json
import math
import os

import keras
import numpy as np
import tensorflow as tf
from absl import flags, logging

import modeling
import optimization
import train_utils

# ---------------------------------------------------------------------------------------------------
# Tokens with character offsets
# ---------------------------------------------------------------------------------------------------


def tokenize_with_offsets(tokenizer, text):
    """`tokenizer.tokenize(text)` and each token's character span [start, end) in `text`.

    The spans follow tokenization.FullTokenizer.tokenize_with_offsets, the one owner of this rule.
    """
    return tokenizer.tokenize_with_offsets(text)


# ---------------------------------------------------------------------------------------------------
# Sliding windows
# ---------------------------------------------------------------------------------------------------


def doc_windows(num_tokens, window, stride):
    """(start, length) windows of at most `window` tokens, starting every `stride` tokens, covering all.

    doc_windows(10, 4, 3) -> [(0, 4), (3, 4), (6, 4)]; an empty sequence still gets one empty window.
    """
    if window <= 0:
        raise ValueError(f"no room for document tokens (window={window}); raise --max_seq_length")
    windows, start = [], 0
    while True:
        length = min(window, num_tokens - start)
        windows.append((start, length))
        if start + length >= num_tokens:
            return windows
        start += min(stride, length)


def max_context_window(windows, position):
    """Index of the window in which token `position` has the most context (Google's run_squad score:
    min(left, right) context + 0.01 * window length; the first such window wins ties)."""
    best, best_score = None, None
    for i, (start, length) in enumerate(windows):
        if not start <= position < start + length:
            continue
        score = min(position - start, start + length - 1 - position) + 0.01 * length
        if best_score is None or score > best_score:
            best, best_score = i, score
    return best


# ---------------------------------------------------------------------------------------------------
# Options and flags
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FinetuneOptions:
    """Options every task script has; field names are the flag names (Google's where it had them)."""
    output_dir: str
    bert_config_file: str
    vocab_file: str
    data_dir: str = ""
    train_file: str = ""
    dev_file: str = ""
    test_file: str = ""
    init_checkpoint: str = ""
    do_lower_case: bool = True
    do_train: bool = False
    do_eval: bool = False
    do_predict: bool = False
    max_seq_length: int = 128
    train_batch_size: int = 32
    eval_batch_size: int = 64
    learning_rate: float = 5e-5
    num_train_epochs: float = 3.0
    max_train_steps: int = 0
    warmup_proportion: float = 0.1
    weight_decay: float = 0.01
    strategy: str = "auto"
    seed: int = 12345
    mixed_precision: bool = False
    jit_compile: bool = False


def define_common_flags(defaults=None):
    """Defines the FinetuneOptions flags. Call from a script's `__main__` only (importing a script,
    as tests do, then defines no flags, so several scripts can be imported in one process)."""
    defaults = dict(defaults or {})
    helps = {
        "output_dir": "Where checkpoints (best/), predictions and eval_results.json go.",
        "bert_config_file": "bert_config.json of the model (Google's format).",
        "vocab_file": "WordPiece vocab the model was trained with.",
        "data_dir": "Folder with the task's files; --train_file/--dev_file/--test_file override names.",
        "train_file": "Training file (relative to --data_dir unless absolute).",
        "dev_file": "Dev file, evaluated after each epoch; never falls back to the test file.",
        "test_file": "File to predict for --do_predict.",
        "init_checkpoint": "Our TF2 checkpoint (dir or prefix) or a Google TF1 bert_model.ckpt; "
                           "empty = random init (tests only).",
        "do_lower_case": "Lower-case input (True for Google's Chinese vocab).",
        "do_train": "Fine-tune on the train file.", "do_eval": "Evaluate on the dev file.",
        "do_predict": "Write predictions for the test file.",
        "max_seq_length": "Tokens per sequence including [CLS]/[SEP].",
        "train_batch_size": "Training batch size.", "eval_batch_size": "Eval/predict batch size.",
        "learning_rate": "Peak AdamW learning rate.", "num_train_epochs": "Epochs (may be fractional).",
        "max_train_steps": "If > 0, stop after this many steps (for smoke tests).",
        "warmup_proportion": "Share of steps with linear warmup.", "weight_decay": "AdamW decay.",
        "strategy": "auto|tpu|mirrored|multi_worker|one_device.", "seed": "Random seed.",
        "mixed_precision": "Keras mixed_bfloat16 policy.", "jit_compile": "XLA-compile train/eval steps.",
    }
    fields = {field.name: field for field in dataclasses.fields(FinetuneOptions)}
    assert sorted(n for names in FLAG_GROUPS.values() for n in names) == sorted(fields)
    for title, names in FLAG_GROUPS.items():
        with train_utils.flag_group(title):
            for name in names:
                field = fields[name]
                default = defaults.get(name, field.default)
                if default is dataclasses.MISSING:
                    default = None
                define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
                          float: flags.DEFINE_float, str: flags.DEFINE_string}[field.type]
                define(name, default, helps[name])
    train_utils.require_flags("output_dir", "bert_config_file", "vocab_file")


# --help headings of the FinetuneOptions flags.
FLAG_GROUPS = {
    "Data": ("data_dir", "train_file", "dev_file", "test_file", "max_seq_length", "do_lower_case"),
    "Model and checkpoints": ("bert_config_file", "vocab_file", "init_checkpoint", "output_dir"),
    "What to run": ("do_train", "do_eval", "do_predict"),
    "Training": ("train_batch_size", "eval_batch_size", "learning_rate", "num_train_epochs",
                 "max_train_steps", "warmup_proportion", "weight_decay", "seed"),
    "Hardware": ("strategy", "mixed_precision", "jit_compile"),
}


def options_from_flags(cls):
    """Builds an options dataclass `cls` from the absl FLAGS of the same names."""
    values = {f.name: flags.FLAGS[f.name].value for f in dataclasses.fields(cls)}
    return cls(**values)


def resolve_path(opts, name):
    """`opts.<name>` joined to --data_dir when relative; '' stays ''."""
    path = getattr(opts, name)
    if path and opts.data_dir and not os.path.isabs(path):
        path = os.path.join(opts.data_dir, path)
    if path and not os.path.isfile(path):
        raise ValueError(f"--{name}: file not found: {path}")
    return path


def check_options(opts):
    """Flag checks that fail before any model is built."""
    if not (opts.do_train or opts.do_eval or opts.do_predict):
        raise ValueError("at least one of --do_train, --do_eval, --do_predict must be set")
    for action, name in (("do_train", "train_file"), ("do_eval", "dev_file"), ("do_predict", "test_file")):
        if getattr(opts, action) and not getattr(opts, name):
            raise ValueError(f"--{action} needs --{name}")
    if opts.max_seq_length > 512 or opts.max_seq_length < 8:
        raise ValueError(f"--max_seq_length={opts.max_seq_length} must be in [8, 512]")


# ---------------------------------------------------------------------------------------------------
# Model, training loop, metrics output
# ---------------------------------------------------------------------------------------------------


def setup_runtime(opts):
    """Seed, precision policy and distribution strategy. Returns the strategy."""
    train_utils.set_seed(opts.seed)
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if opts.mixed_precision else "float32")
    return train_utils.make_strategy(opts.strategy)


def build_task_model(opts, strategy, make_model):
    """Creates `make_model(config)` under `strategy`, builds its variables, loads the init checkpoint.

    The init checkpoint is --init_checkpoint, else output_dir/best/ from an earlier --do_train run
    (so `--do_predict` alone reuses the fine-tuned model), else random init.
    """
    config = modeling.BertConfig.from_json_file(opts.bert_config_file)
    config.to_json_file(os.path.join(opts.output_dir, "bert_config.json"))  # beside best/, for exporters
    with strategy.scope():
        model = make_model(config)
        modeling.build_model(model, seq_len=8)
    init = opts.init_checkpoint
    best_dir = os.path.join(opts.output_dir, "best")
    if not init and not opts.do_train and os.path.isdir(best_dir):
        init = best_dir
    if init:
        modeling.load_pretrained(model, init)  # logs what it loaded and which heads are new
    else:
        logging.warning("no --init_checkpoint: training from a RANDOM initialisation")
    return model


class ProgressCallback(keras.callbacks.Callback):
    """A ProgressLogger line (steps, rate, ETA, loss) every few seconds; stops at `total_steps` so
    fractional epochs and --max_train_steps work with whole-epoch `fit` calls."""

    def __init__(self, total_steps):
        super().__init__()
        self.total_steps = total_steps
        self.step = 0
        self.progress = train_utils.ProgressLogger(total_steps, unit="steps", name="train")

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        loss = float((logs or {}).get("loss", float("nan")))
        self.progress.update(1, force=self.step == self.total_steps, loss=loss)
        if self.step >= self.total_steps:
            self.model.stop_training = True


def masked_sparse_ce(y_true, y_pred):
    """Mean cross-entropy over positions whose label is >= 0 (labels -1 are ignored).

    y_true: [B] or [B, S] int; y_pred: [..., C] float32 logits. Returns a scalar.
    """
    y_true = tf.cast(y_true, tf.int32)
    weights = tf.cast(y_true >= 0, tf.float32)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.maximum(y_true, 0), logits=tf.cast(y_pred, tf.float32))
    loss = tf.reduce_sum(ce * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)
    # Under a multi-replica strategy Keras sums the replicas' gradients; its built-in losses divide by
    # the replica count for that (scale_loss_for_distribution), so this one does too.
    replica = tf.distribute.get_replica_context()
    if replica is not None and replica.num_replicas_in_sync > 1:
        loss /= replica.num_replicas_in_sync
    return loss


def make_dataset(features, labels=None, batch_size=32, shuffle=False, seed=0, drop_remainder=False):
    """tf.data over numpy feature arrays (dict of [N, S] int32) and optional labels ([N] / [N, S] or a
    tuple of such)."""
    data = features if labels is None else (features, labels)
    ds = tf.data.Dataset.from_tensor_slices(data)
    if shuffle:
        ds = ds.shuffle(len(next(iter(features.values()))), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def train_and_keep_best(model, opts, strategy, train_ds, num_examples, loss, evaluate, key):
    """Fine-tunes `model` with AdamW, evaluating after each epoch and keeping the best checkpoint.

    Args:
      train_ds: batched, shuffled tf.data of (features, labels), one epoch.
      num_examples: training sequences per epoch (for the step count).
      loss: a Keras loss (or list, one per output).
      evaluate: callable() -> metrics dict on dev, or None for no dev set (then the last epoch is kept).
      key: the metric that decides "best" (higher is better).
    Returns the best dev metrics (or {}), after restoring the best weights into `model`.
    """
    steps_per_epoch = max(1, num_examples // opts.train_batch_size)
    total_steps = max(1, int(math.ceil(steps_per_epoch * opts.num_train_epochs)))
    if opts.max_train_steps > 0:
        total_steps = min(total_steps, opts.max_train_steps)
    epochs = int(math.ceil(total_steps / steps_per_epoch))
    logging.info("training: %d examples, batch %d, %d steps (%d epochs of %d)", num_examples,
                 opts.train_batch_size, total_steps, epochs, steps_per_epoch)
    with strategy.scope():
        optimizer = optimization.create_optimizer(
            opts.learning_rate, total_steps, int(total_steps * opts.warmup_proportion),
            weight_decay=opts.weight_decay)
        model.compile(optimizer=optimizer, loss=loss, jit_compile=opts.jit_compile)

    best_dir = os.path.join(opts.output_dir, "best")
    manager = tf.train.CheckpointManager(modeling.make_checkpoint(model), best_dir, max_to_keep=1)
    history = []
    best = {}

    class KeepBest(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            metrics = evaluate() if evaluate else {}
            metrics = dict(metrics, epoch=epoch + 1, train_loss=float((logs or {}).get("loss", 0.0)))
            history.append(metrics)
            logging.info("epoch %d dev: %s", epoch + 1, json.dumps(metrics, ensure_ascii=False))
            if not best or evaluate is None or metrics[key] > best[key]:
                best.clear()
                best.update(metrics)
                manager.save()

    model.fit(train_ds.repeat(), epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=0, shuffle=False,
              callbacks=[ProgressCallback(total_steps), KeepBest()])
    modeling.make_checkpoint(model).restore(manager.latest_checkpoint).expect_partial()
    with open(os.path.join(opts.output_dir, "train_history.json"), "w", encoding="utf-8") as f:
        json.dump(history, f, ensure_ascii=False, indent=1)
    return best if evaluate else {}


def predict_batches(model, features, batch_size):
    """Runs `model` in inference mode over numpy features; returns its output(s) as numpy.

    Output: [N, ...] array, or a tuple of them for multi-output models (QA).
    """
    ds = make_dataset(features, batch_size=batch_size)
    return model.predict(ds, verbose=0)


def write_metrics(opts, metrics, name="eval_results.json"):
    """Writes metrics to output_dir/<name> and prints them as one JSON line on stdout."""
    line = json.dumps(metrics, ensure_ascii=False, sort_keys=True)
    with open(os.path.join(opts.output_dir, name), "w", encoding="utf-8") as f:
        f.write(line + "\n")
    print(line, flush=True)


def pad_features(rows, max_seq_length):
    """[(input_ids, segment_ids)] -> dict(input_ids, input_mask, segment_ids) of [N, S] int32."""
    n = len(rows)
    out = {k: np.zeros((n, max_seq_length), np.int32) for k in ("input_ids", "input_mask", "segment_ids")}
    for i, (ids, segs) in enumerate(rows):
        out["input_ids"][i, :len(ids)] = ids
        out["input_mask"][i, :len(ids)] = 1
        out["segment_ids"][i, :len(segs)] = segs
    return out
