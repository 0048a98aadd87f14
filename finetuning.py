"""What run_classifier.py, run_ner.py and run_cmrc.py share: one command line and one driver.

* `tokenize_with_offsets`: the FullTokenizer's tokens plus, for each token, the characters of the
  original text it came from (NER and QA must map token predictions back to character spans).
* `doc_windows` / `max_context_window`: sliding windows over a long token sequence, and which window
  gives a token the most context (Google's run_squad rule; NER uses it too).
* `define_flags`: the flags every task script has (Google's names), declared once.
* `run(opts, task)`: the one fine-tuning driver. A task script supplies a `Task` (how to read its
  files, which model head, how to encode, score and write predictions); the driver does the rest:
  finds train/dev/test in `--data_dir` by the task's usual names, resolves the model folder behind
  `--init_checkpoint`, checks everything before writing anything, trains with AdamW, evaluates on dev
  after each epoch, keeps the best model in `output_dir/best/` as a self-describing model folder
  (checkpoint, bert_config.json, vocab.txt, model_info.json with the task and labels), warns when the
  loss does not move, and prints one metrics JSON line (with every counted skip).

Files are read and written through tf.io.gfile, so `gs://` paths work (tests use `ram://`).
"""

import json
import math
import os
import tempfile
import types

import keras
import numpy as np
import tensorflow as tf
from absl import flags, logging

import file_output
import model_folder
import modeling
import multi_worker
import optimization
import tokenization
import train_utils
from train_utils import UsageError

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
# Command line
# ---------------------------------------------------------------------------------------------------


def define_flags(fv, max_seq_length=128):
    """The flags every task script has, on FlagValues `fv`; Google's names (and booleans as
    `--do_train=true`). A script's own `define_flags(fv)` calls this, then adds its group."""
    with train_utils.flag_group("Data", fv) as group:
        group.string("data_dir", None, "Folder with the task's files, found by their usual names "
               "(see the task above); --train_file/--dev_file/--test_file override them.")
        group.string("train_file", None, "Training file (relative to --data_dir unless absolute).")
        group.string("dev_file", None, "Dev file, evaluated after each epoch; never falls back to test.")
        group.string("test_file", None, "File to predict for --do_predict.")
        group.integer("max_seq_length", max_seq_length, "Tokens per sequence including [CLS]/[SEP].")
        group.boolean("do_lower_case", None, "Lower-case input (default: the model folder's setting, "
               "else true as Google's Chinese vocab; pretraining's default is the records' setting, the "
               "same rule one step earlier).")
    with train_utils.flag_group("Model and checkpoints", fv) as group:
        group.string("init_checkpoint", None, "Starting weights: a model folder (ours, Google's) or "
               "a checkpoint prefix such as .../bert_model.ckpt; its bert_config.json and vocab.txt "
               "are used when the two flags below are not given. Empty: random init.")
        group.string("bert_config_file", None, "bert_config.json (default: the model folder's).")
        group.string("vocab_file", None, "WordPiece vocab (default: the model folder's vocab.txt).")
        group.string("output_dir", None, "Where best/ (the fine-tuned model folder), predictions "
               "and eval_results.json go.")
    with train_utils.flag_group("What to run", fv) as group:
        group.boolean("do_train", False, "Fine-tune on the train file.")
        group.boolean("do_eval", False, "Evaluate on the dev file.")
        group.boolean("do_predict", False, "Write predictions for the test file.")
    with train_utils.flag_group("Training", fv) as group:
        group.integer("train_batch_size", 32, "Training batch size.")
        group.integer("eval_batch_size", 64, "Eval batch size.")
        group.integer("predict_batch_size", 64, "Predict batch size (Google's flag).")
        group.float("learning_rate", 5e-5, "Peak AdamW learning rate (Google: 2e-5..5e-5 from a "
               "pretrained --init_checkpoint).")
        group.float("num_train_epochs", 3.0, "Epochs (may be fractional).")
        group.integer("max_train_steps", 0, "If > 0, stop after this many steps (smoke tests).")
        group.float("warmup_proportion", 0.1, "Share of steps with linear warmup.")
        group.float("weight_decay", 0.01, "AdamW decoupled weight decay.")
        group.integer("seed", 12345, "Random seed.")
    with train_utils.flag_group("Hardware: TPU, GPUs, CPU", fv) as group:
        group.enum("strategy", "auto", list(train_utils.STRATEGIES), "auto: TPU if --tpu_name, "
                   "multi-worker from TF_CONFIG, all GPUs, else one device.")
        group.boolean("use_tpu", False, "Same as --strategy=tpu (Google's flag).")
        group.string("tpu_name", None, "TPU name or grpc:// address.")
        group.string("tpu_zone", None, "GCE zone of the TPU (optional).")
        group.string("gcp_project", None, "GCP project of the TPU (optional).")
        group.boolean("mixed_precision", False, "bfloat16 compute on TPUs and bf16-capable GPUs; "
               "ignored with a warning elsewhere (as in pretraining).")
        group.boolean("jit_compile", False, "XLA-compile the train/predict steps. Off by default, "
               "unlike pretraining's one fixed-shape step: Keras' fit compiles every batch shape it meets "
               "(the last partial batch, evaluation, prediction) anew, which short fine-tuning runs do not "
               "win back.")
    if fv is flags.FLAGS:
        train_utils.require_flags("output_dir")


def parse_flags(define, argv=(), **values):
    """A FlagValues with a script's flags (`define(fv)`) parsed from argv and `name=value` pairs."""
    fv = flags.FlagValues()
    define(fv)
    args = [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]
    fv(["prog"] + list(argv) + args)
    return fv


def check_flags(opts, config):
    """Flag values that can't be right, reported before anything is read or built."""
    if not (opts.do_train or opts.do_eval or opts.do_predict):
        raise UsageError("at least one of --do_train, --do_eval, --do_predict must be set")
    if not 8 <= opts.max_seq_length <= config.max_position_embeddings:
        raise UsageError(f"--max_seq_length={opts.max_seq_length} must be in [8, "
                         f"{config.max_position_embeddings}] (max_position_embeddings of the config)")
    for name in ("train_batch_size", "eval_batch_size", "predict_batch_size"):
        if opts[name].value < 1:
            raise UsageError(f"--{name} must be >= 1, got {opts[name].value}")
    if opts.do_train:
        if not (math.isfinite(opts.learning_rate) and opts.learning_rate > 0):
            raise UsageError(f"--learning_rate must be a positive number, got {opts.learning_rate}")
        if not (opts.num_train_epochs > 0 and math.isfinite(opts.num_train_epochs)):
            raise UsageError(f"--num_train_epochs must be > 0, got {opts.num_train_epochs}")
        if not 0 <= opts.warmup_proportion < 1:
            raise UsageError(f"--warmup_proportion must be in [0, 1), got {opts.warmup_proportion}")
        if opts.max_train_steps < 0:
            raise UsageError(f"--max_train_steps must be >= 0, got {opts.max_train_steps}")


# ---------------------------------------------------------------------------------------------------
# Files: found in --data_dir, read and written through tf.io.gfile
# ---------------------------------------------------------------------------------------------------

SPLITS = (("train", "do_train"), ("dev", "do_eval"), ("test", "do_predict"))


def find_files(opts, file_names):
    """{split: path} for the splits the run needs.

    An explicit --<split>_file wins (joined to --data_dir when relative); otherwise the first of the
    task's usual names `file_names[split]` that exists in --data_dir. Dev never falls back to test.
    """
    paths = {}
    for split, action in SPLITS:
        if not opts[action].value:
            continue
        flag, given = f"{split}_file", opts[f"{split}_file"].value
        if given:
            path = given if (not opts.data_dir or os.path.isabs(given) or "://" in given) else \
                os.path.join(opts.data_dir, given)
            if not tf.io.gfile.exists(path) or tf.io.gfile.isdir(path):
                raise UsageError(f"--{flag}: no such file: {path}")
        elif opts.data_dir:
            names = file_names.get(split, ())
            found = [os.path.join(opts.data_dir, n) for n in names
                     if tf.io.gfile.exists(os.path.join(opts.data_dir, n))]
            if not found:
                raise UsageError(f"--{action}: none of {', '.join(names) or '(no usual names)'} in "
                                 f"--data_dir={opts.data_dir}; name the file with --{flag}")
            path = found[0]
        else:
            raise UsageError(f"--{action} needs --{flag} or a --data_dir holding it")
        paths[split] = path
    return paths


def read_text(path):
    """The whole UTF-8 text of `path` (a leading BOM dropped); UsageError naming file and line when
    it is not UTF-8 or not a file."""
    if tf.io.gfile.isdir(path):
        raise UsageError(f"{path} is a directory, not a file")
    with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: not UTF-8 (byte {e.start}); convert the file, e.g. "
                         f"`iconv -f GBK -t UTF-8`") from None


def json_lines(path):
    """Yields (line_number, object) for each non-blank line of a JSON-lines file; UsageError naming
    path:line for a line that is not JSON or not a JSON object."""
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n}: not a JSON line ({e.msg})") from None
        if not isinstance(record, dict):
            raise UsageError(f"{path}:{n}: a JSON object {{...}} expected, got a {type(record).__name__}")
        yield n, record


write_text = file_output.atomic_write  # one owner of "temp name, fsync, rename"


def check_outputs(output_dir, names):
    """UsageError unless output_dir can hold the run: not a file, and none of the files the run will
    write (`names`) is a directory; a fine-tuned model already in best/ is never overwritten."""
    if tf.io.gfile.exists(output_dir) and not tf.io.gfile.isdir(output_dir):
        raise UsageError(f"--output_dir={output_dir} is an existing file; name a folder")
    for name in names:
        if tf.io.gfile.isdir(os.path.join(output_dir, name)):
            raise UsageError(f"{os.path.join(output_dir, name)} is a directory; the run writes a file "
                             f"there: move it or use another --output_dir")


def make_tokenizer(vocab_file, do_lower_case):
    """FullTokenizer over `vocab_file` (a local copy first for gs:// and other remote paths)."""
    if tf.io.gfile.isdir(vocab_file):
        raise UsageError(f"--vocab_file={vocab_file} is a directory; name the vocab.txt inside it")
    if not tf.io.gfile.exists(vocab_file):
        raise UsageError(f"--vocab_file={vocab_file}: no such file")
    if "://" in vocab_file:
        local = os.path.join(tempfile.mkdtemp(prefix="vocab-"), "vocab.txt")
        tf.io.gfile.copy(vocab_file, local)
        vocab_file = local
    try:
        return tokenization.FullTokenizer(vocab_file, do_lower_case=do_lower_case)
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"--vocab_file={vocab_file}: {e}") from None


# ---------------------------------------------------------------------------------------------------
# The task interface and the driver
# ---------------------------------------------------------------------------------------------------


class Task:
    """What a task script gives `run`; the driver sets `opts`, `tokenizer`, `labels` and `model`.

    kind: the model_folder task ("classifier", "ner", "qa"; export_to_pytorch's --task), which also
      picks the model (modeling.make_task_model, with len(labels) outputs where there are labels).
    key: the dev metric that picks the best epoch (higher is better).
    file_names: {split: usual file names in --data_dir, first found wins}.
    prediction_files: files it writes into output_dir (checked before training).
    loss: None for masked_sparse_ce, or a list (one per output).
    Methods: check() flag checks; find_files() {split: path}; read(path, split) -> (examples, Counter
    of skipped items by reason); label_list(train) label names in id order (None without labels);
    validate(data) check the splits against self.labels; train_data(examples)
    -> (features dict of [N, S] int32, y); evaluate(examples, output_dir=None) dev metrics (writing
    the dev predictions when output_dir is given); predict(examples, output_dir) -> file written.
    """
    kind = key = loss = None
    file_names = {}
    prediction_files = ()

    def __init__(self, opts):
        self.opts = opts
        self.tokenizer = self.labels = self.model = None

    def check(self):
        pass

    def find_files(self):
        return find_files(self.opts, self.file_names)

    def label_list(self, train):
        return None

    def validate(self, data):
        pass


def run(opts, task):
    """Train / evaluate / predict as `opts` (a parsed FlagValues) asks, for `task` (a Task).

    Every check that can fail (flags, model folder, vocab, data files, output paths) runs before
    anything is written. Returns the dev metrics (or {}).
    """
    task.opts = opts
    resolved = resolve_model(opts)
    config = load_config(resolved.bert_config_file)
    check_flags(opts, config)
    task.check()
    paths = task.find_files()
    if not opts.output_dir:
        raise UsageError("--output_dir is required")
    check_outputs(opts.output_dir, ("eval_results.json", "train_history.json") + task.prediction_files)
    best_dir = os.path.join(opts.output_dir, "best")
    if opts.do_train and tf.io.gfile.exists(os.path.join(best_dir, "checkpoint")):
        raise UsageError(f"{best_dir} already holds a fine-tuned model; use a new --output_dir "
                         "(or delete it) so it is not overwritten")
    do_lower_case = next(v for v in (opts.do_lower_case, resolved.do_lower_case, True) if v is not None)
    task.tokenizer = make_tokenizer(resolved.vocab_file, do_lower_case)
    if len(task.tokenizer.vocab) != config.vocab_size:
        raise UsageError(f"vocab {resolved.vocab_file} has {len(task.tokenizer.vocab)} tokens but "
                         f"vocab_size={config.vocab_size} in {resolved.bert_config_file}: they do not match")

    data, skipped = {}, {}
    for split, path in paths.items():
        data[split], skips = task.read(path, split)
        if skips:
            skipped[split] = dict(skips)
            for reason, n in sorted(skips.items()):
                logging.warning("%s: skipped %d (%s)", path, n, reason)
    task.labels = choose_labels(opts, task, data.get("train"), resolved)
    task.validate(data)

    strategy = train_utils.make_strategy("tpu" if opts.use_tpu else opts.strategy, tpu=opts.tpu_name,
                                         tpu_zone=opts.tpu_zone, gcp_project=opts.gcp_project)
    train_utils.set_seed(opts.seed)
    train_utils.set_precision(opts.mixed_precision, strategy)
    with strategy.scope():
        task.model = modeling.make_task_model(config, task.kind, len(task.labels) if task.labels else None)
    if resolved.checkpoint:
        try:
            report = modeling.load_pretrained(task.model, resolved.checkpoint)  # logs loaded / new tensors
        except ValueError as e:
            raise UsageError(f"--init_checkpoint: {e}") from None
        untrained = [n for n in report.newly_initialized if "pooler" not in n]
        if untrained and not opts.do_train:  # evaluating or predicting with a random task head
            raise UsageError(f"--init_checkpoint={resolved.checkpoint} has no trained {task.kind} head "
                             f"({', '.join(untrained)} not in it): --do_eval/--do_predict without "
                             "--do_train need a fine-tuned model, e.g. output_dir/best of a training run")
    else:
        logging.warning("no --init_checkpoint: training from a RANDOM initialisation")

    # On a cluster (TF_CONFIG) every worker trains; only the chief writes into --output_dir.
    chief = multi_worker.is_chief(strategy)
    try:
        if chief:
            tf.io.gfile.makedirs(opts.output_dir)
    except tf.errors.OpError as e:
        raise UsageError(f"--output_dir={opts.output_dir}: cannot create it ({e.message})") from None
    dev = data.get("dev")
    if opts.do_train:
        features, y = task.train_data(data["train"])
        train(task, strategy, features, y, dev, config, resolved, do_lower_case, skipped)
    metrics = {}
    if dev is not None:
        metrics = dict(task.evaluate(dev, opts.output_dir if chief else None),
                       split=os.path.basename(paths["dev"]))
        if skipped:
            metrics["skipped"] = skipped
        if chief:
            write_text(os.path.join(opts.output_dir, "eval_results.json"),
                       json.dumps(metrics, ensure_ascii=False, sort_keys=True) + "\n")
        print(json.dumps(metrics, ensure_ascii=False, sort_keys=True), flush=True)
    if "test" in data and chief:
        out = task.predict(data["test"], opts.output_dir)
        logging.info("wrote %d predictions to %s", len(data["test"]), out)
    return metrics


def resolve_model(opts):
    """The model to start from: --init_checkpoint, else (without --do_train) output_dir/best/ of an
    earlier run, else random init from --bert_config_file/--vocab_file. Explicit flags win over
    the folder's files."""
    init = opts.init_checkpoint
    best = os.path.join(opts.output_dir or "", "best")
    if not init and not opts.do_train and opts.output_dir and tf.io.gfile.exists(os.path.join(best, "checkpoint")):
        init = best
    if init:
        return model_folder.resolve(init, bert_config_file=opts.bert_config_file, vocab_file=opts.vocab_file,
                                    flag="--init_checkpoint")
    missing = [f"--{n}" for n in ("bert_config_file", "vocab_file") if not opts[n].value]
    if missing:
        raise UsageError(f"{' and '.join(missing)} needed: no --init_checkpoint folder to take them from")
    return types.SimpleNamespace(checkpoint=None, bert_config_file=opts.bert_config_file,
                                 vocab_file=opts.vocab_file, do_lower_case=None, task=None, labels=None)


def load_config(path):
    if tf.io.gfile.isdir(path) or not tf.io.gfile.exists(path):
        raise UsageError(f"--bert_config_file={path}: not a file")
    try:
        return modeling.BertConfig.from_dict(json.loads(read_text(path)), source=path)
    except ValueError as e:
        raise UsageError(f"--bert_config_file={path}: {e}") from None


def choose_labels(opts, task, train, resolved):
    """The label names in id order: a training run takes the task's (or --labels, or the train
    file's); evaluating or predicting takes the model folder's, which fixed the head's order, unless
    --labels names them (a model fine-tuned elsewhere may call them LABEL_0, LABEL_1, ...)."""
    explicit = "labels" in opts and opts["labels"].value
    if opts.do_train or explicit or not resolved.labels:
        labels = task.label_list(train)
    else:
        labels = list(resolved.labels)
    if explicit and resolved.labels and not opts.do_train and len(labels) != len(resolved.labels):
        raise UsageError(f"--labels={opts['labels'].value} names {len(labels)} labels but the model "
                         f"folder's head has {len(resolved.labels)} ({','.join(resolved.labels)})")
    if task.kind != "qa" and not labels:
        raise UsageError("no label list: pass --labels, or --init_checkpoint a fine-tuned model folder")
    if labels and len(set(labels)) != len(labels):
        raise UsageError(f"labels repeat: {','.join(labels)}; each label names one class")
    return labels


# ---------------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------------


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


def stall_warning(losses, learning_rate):
    """The warning for a first epoch whose loss did not move, or None.

    losses: the per-step training losses of epoch 1. Its starting value (step 1's, before any update;
    ~ln(num_classes) for a classifier) against the mean of its last quarter: stalled when that is not
    5% lower, or not finite. Fewer than 4 steps tell nothing.
    """
    if len(losses) < 4:
        return None
    start = float(losses[0])  # before any update: ~ln(num_classes) with a fresh head
    late = float(np.mean(losses[-(len(losses) // 4):]))
    if math.isfinite(late) and late < 0.95 * start:
        return None
    if learning_rate > 1e-4:
        cause = f"--learning_rate={learning_rate:g} is likely too high for fine-tuning: try 5e-5"
    elif learning_rate < 1e-5:
        cause = f"--learning_rate={learning_rate:g} is likely too low: try 5e-5"
    else:
        cause = "Likely too few steps (raise --num_train_epochs), or labels unrelated to the text"
    return (f"training loss {late:.4f} at the end of epoch 1 has not moved from its starting value "
            f"{start:.4f}: the model is not learning. {cause} (Google's range for a pretrained "
            f"--init_checkpoint is 2e-5..5e-5)")


class _Progress(keras.callbacks.Callback):
    """A progress line every few seconds; stops at `total_steps` (fractional epochs,
    --max_train_steps); keeps epoch 1's per-step losses for the stall check."""

    def __init__(self, total_steps):
        super().__init__()
        self.total_steps, self.step = total_steps, 0
        self.progress = train_utils.ProgressLogger(total_steps, unit="steps", name="train")
        self.epoch_means, self.first_epoch_losses = [], None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_means = []

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        # Keras reports the running mean of the epoch so far; keep it to recover per-step losses.
        self.epoch_means.append(float((logs or {}).get("loss", float("nan"))))
        self.progress.update(1, force=self.step == self.total_steps, loss=self.epoch_means[-1])
        if self.step >= self.total_steps:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.first_epoch_losses is None:
            means = self.epoch_means
            self.first_epoch_losses = [m * (i + 1) - (means[i - 1] * i if i else 0.0)
                                       for i, m in enumerate(means)]


def make_dataset(features, labels=None, batch_size=32, shuffle=False, seed=0, drop_remainder=False):
    """tf.data over numpy feature arrays (dict of [N, S] int32) and optional labels ([N] / [N, S] or a
    tuple of such); with shuffle, endless (a new order each pass)."""
    data = features if labels is None else (features, labels)
    ds = tf.data.Dataset.from_tensor_slices(data)
    if shuffle:  # endless passes, each in its own order fixed by (seed, pass): the same batches
        # however often the dataset is opened (Keras' fit opens it once to build, once to train),
        # so every worker of a cluster, and a one-machine run, see one sequence of batches
        n = len(next(iter(features.values())))
        return tf.data.Dataset.counter().flat_map(lambda p: ds.shuffle(
            n, seed=seed + p, reshuffle_each_iteration=False).batch(
                batch_size, drop_remainder=drop_remainder)).prefetch(tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def train(task, strategy, features, y, dev, config, resolved, do_lower_case, skipped):
    """Fine-tunes task.model with AdamW, evaluating on dev after each epoch and keeping the best
    weights in output_dir/best/ (a self-describing model folder); restores them at the end."""
    opts, model = task.opts, task.model
    num_examples = len(next(iter(features.values())))
    steps_per_epoch = max(1, num_examples // opts.train_batch_size)
    total_steps = max(1, int(math.ceil(steps_per_epoch * opts.num_train_epochs)))
    if opts.max_train_steps > 0:
        total_steps = min(total_steps, opts.max_train_steps)
    epochs = int(math.ceil(total_steps / steps_per_epoch))
    logging.info("training: %d sequences, batch %d, %d steps (%d epochs of %d)", num_examples,
                 opts.train_batch_size, total_steps, epochs, steps_per_epoch)
    if multi_worker.cluster_of(strategy) is not None and (
            opts.train_batch_size % strategy.num_replicas_in_sync or num_examples < opts.train_batch_size):
        raise UsageError(f"--train_batch_size={opts.train_batch_size} must divide by the "
                         f"{strategy.num_replicas_in_sync} replicas of the cluster and be at most the "
                         f"{num_examples} training examples")
    ds = make_dataset(features, y, opts.train_batch_size, shuffle=True, seed=opts.seed,
                      drop_remainder=num_examples >= opts.train_batch_size)
    loss = task.loss or masked_sparse_ce
    with strategy.scope():
        optimizer = optimization.create_optimizer(
            opts.learning_rate, total_steps, int(total_steps * opts.warmup_proportion),
            weight_decay=opts.weight_decay)
        model.compile(optimizer=optimizer, loss=loss, jit_compile=opts.jit_compile)

    best_dir = os.path.join(opts.output_dir, "best")
    chief = multi_worker.is_chief(strategy)
    # The folder describes itself before the first weights land in it (export_to_pytorch,
    # --init_checkpoint and --do_predict read it alone).
    if chief:
        model_folder.write(best_dir, config=config, vocab_file=resolved.vocab_file,
                           do_lower_case=do_lower_case, task=task.kind, labels=task.labels)
    else:  # every worker saves (as TF asks); the others' copies go to a temporary folder
        cluster = multi_worker.cluster_of(strategy)
        best_dir = multi_worker.worker_dir(opts.output_dir, cluster.tasks.index(
            (cluster.job, cluster.index, cluster.address(cluster.job, cluster.index))))
    checkpoint = modeling.make_checkpoint(model)
    manager = tf.train.CheckpointManager(checkpoint, best_dir, max_to_keep=1)
    progress = _Progress(total_steps)
    history, best = [], {}

    class KeepBest(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            metrics = task.evaluate(dev) if dev is not None else {}
            metrics = dict(metrics, epoch=epoch + 1, train_loss=float((logs or {}).get("loss", 0.0)))
            if epoch == 0:
                warning = stall_warning(progress.first_epoch_losses, opts.learning_rate)
                metrics["loss_stalled"] = warning is not None
                if warning:
                    logging.warning("%s", warning)
            history.append(metrics)
            logging.info("epoch %d: %s", epoch + 1, json.dumps(metrics, ensure_ascii=False))
            if not best or dev is None or metrics[task.key] > best[task.key]:
                best.clear()
                best.update(metrics)
                manager.save()

    if multi_worker.cluster_of(strategy) is not None:
        multi_worker.fit(model, loss, strategy, ds, epochs, steps_per_epoch, [progress, KeepBest()],
                         opts.jit_compile)
    else:
        model.fit(ds.repeat(), epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=0, shuffle=False,
                  callbacks=[progress, KeepBest()])
    checkpoint.restore(manager.latest_checkpoint).expect_partial()
    if chief:
        write_text(os.path.join(opts.output_dir, "train_history.json"),
                   json.dumps({"epochs": history, "skipped": skipped}, ensure_ascii=False, indent=1))


def predict_batches(model, features, batch_size):
    """Runs `model` in inference mode over numpy features; returns its output(s) as numpy ([N, ...]
    or a tuple for QA). Rows are padded to whole batches (one compiled shape, TPU-friendly) and the
    padding dropped again."""
    n = len(next(iter(features.values())))
    pad = -n % batch_size
    if pad:
        features = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in features.items()}
    ds = make_dataset(features, batch_size=batch_size)
    if multi_worker.cluster_of(model.distribute_strategy) is not None:
        out = multi_worker.predict(model, ds)
    else:
        out = model.predict(ds, verbose=0)
    # float32 also under --mixed_precision (bfloat16 logits lose ties and softmax precision).
    if isinstance(out, (tuple, list)):
        return tuple(np.asarray(o[:n], np.float32) for o in out)
    return np.asarray(out[:n], np.float32)


def pad_features(rows, max_seq_length):
    """[(input_ids, segment_ids)] -> dict(input_ids, input_mask, segment_ids) of [N, S] int32."""
    n = len(rows)
    out = {k: np.zeros((n, max_seq_length), np.int32) for k in ("input_ids", "input_mask", "segment_ids")}
    for i, (ids, segs) in enumerate(rows):
        out["input_ids"][i, :len(ids)] = ids
        out["input_mask"][i, :len(ids)] = 1
        out["segment_ids"][i, :len(segs)] = segs
    return out


def main(task_class):
    """The `main(argv)` of a task script: runs the driver on the parsed command line."""
    def main_(argv):
        del argv
        run(flags.FLAGS, task_class(flags.FLAGS))
    return main_
