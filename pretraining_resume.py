"""What lets a pretraining run be killed and rerun: its input stream and its output folder.

The input stream is a deterministic function of (record files, seed, step), so a rerun positions it
at the restored step instead of restoring iterator state (tf.distribute's per-replica iterators
cannot be saved). The output folder holds the checkpoints, the files that make it a self-describing
model folder (model_folder's contract), and the identity of the inputs a resume must match. State
that exists but cannot be read is a one-line UsageError naming the file and the fix, never a fresh
start over it.
"""

import hashlib
import json
import os
import re

import train_utils  # noqa: I001 -- first: it hides TensorFlow's C++ start-up lines

import keras
import numpy as np
from absl import logging

import model_folder
import pretraining_records

if keras.backend.backend() == "tensorflow":  # the input-state and run-folder rules serve JAX too
    import tensorflow as tf

UsageError = train_utils.UsageError
_fs = model_folder._fs  # tf.io.gfile for gs:// paths, the standard library for local ones
INPUT_STATE = "pretraining_input.json"  # in output_dir: what the input position depends on


# ------------------------------------------------------------------------------------------------
# Input: one deterministic pipeline per worker/host, positioned by the global step
# ------------------------------------------------------------------------------------------------

def count_records(path):
    """Records in one file, by reading it (for files neither a scan nor a sidecar has counted)."""
    return int(tf.data.TFRecordDataset(path, buffer_size=1 << 20).reduce(
        np.int64(0), lambda n, _: n + 1))


# One pipeline's share of the files (the rule is TF-free, shared with record_reader.py).
pipeline_files = pretraining_records.pipeline_files


def train_dataset_fn(files, counts, per_replica_batch, seed, shuffle_buffer_size, start_step,
                     parse):
    """-> dataset_fn(input_context) for `strategy.distribute_datasets_from_function`.

    Each pipeline's stream is a deterministic function of (files, seed): epoch e reads its files in
    an order drawn from (seed, e), interleaved, and shuffles records within windows of
    shuffle_buffer_size by draws from (seed, position). Every
    record carries its stream position e * records_per_epoch + i. Resuming at `start_step` skips
    the records already consumed (raw reads, no parsing, at most one epoch) instead of restoring
    iterator state, which tf.distribute's per-replica iterators cannot save. Batches are
    [per_replica_batch, ...] with static shapes; consecutive batches go to consecutive replicas.
    """

    def dataset_fn(context):
        num_pipelines, pipeline_id = context.num_input_pipelines, context.input_pipeline_id
        local_replicas = context.num_replicas_in_sync // num_pipelines
        mine, shard_records, per_epoch = pipeline_files(files, counts, num_pipelines, pipeline_id)
        first_epoch, skip = divmod(start_step * per_replica_batch * local_replicas, per_epoch)
        names = tf.constant(mine)
        seed64 = tf.constant(seed, tf.int64)

        def epoch(e):
            order = tf.random.experimental.stateless_shuffle(
                tf.range(len(mine)), seed=tf.stack([seed64, e]))
            d = tf.data.Dataset.from_tensor_slices(tf.gather(names, order))
            d = d.interleave(lambda f: tf.data.TFRecordDataset(f, buffer_size=1 << 20),
                             cycle_length=min(4, len(mine)), num_parallel_calls=tf.data.AUTOTUNE,
                             deterministic=True)
            if shard_records:
                d = d.shard(num_pipelines, pipeline_id)
            d = tf.data.Dataset.zip(tf.data.Dataset.range(e * per_epoch, (e + 1) * per_epoch), d)
            # Shuffled within windows of shuffle_buffer_size records by stateless draws keyed by
            # (seed, the window's first position): the order depends on nothing else (not the
            # global seed, not an iterator's state).
            return d.batch(shuffle_buffer_size).map(shuffle_window).unbatch()

        def shuffle_window(positions, serialized):                          # [W], [W]
            order = tf.random.experimental.stateless_shuffle(
                tf.range(tf.shape(positions)[0]), seed=tf.stack([seed64, positions[0]]))
            return tf.gather(positions, order), tf.gather(serialized, order)

        d = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch).skip(skip)
        d = d.batch(per_replica_batch, drop_remainder=True)
        d = d.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return d.prefetch(tf.data.AUTOTUNE)

    return dataset_fn


def eval_dataset_fn(files, counts, per_replica_batch, steps, parse):
    """-> dataset_fn(input_context): files in order, once, then all-padding batches, so that every
    replica gets exactly `steps` batches of [per_replica_batch, ...]. Padding rows have zero
    masked_lm_weights and do not count."""

    def dataset_fn(context):
        num_pipelines, pipeline_id = context.num_input_pipelines, context.input_pipeline_id
        local_replicas = context.num_replicas_in_sync // num_pipelines
        mine, shard_records, _ = pipeline_files(files, counts, num_pipelines, pipeline_id)
        d = tf.data.TFRecordDataset(mine)
        if shard_records:
            d = d.shard(num_pipelines, pipeline_id)
        d = tf.data.Dataset.zip(tf.data.Dataset.range(np.iinfo(np.int64).max), d)

        def parse_and_pad(positions, serialized):
            batch = parse(positions, serialized)
            pad = per_replica_batch - tf.shape(serialized)[0]
            return {k: tf.ensure_shape(tf.pad(v, [[0, pad], [0, 0]]), [per_replica_batch] + v.shape[1:])
                    for k, v in batch.items()}

        d = d.batch(per_replica_batch).map(parse_and_pad)
        padding = tf.data.Dataset.from_tensors(
            {k: tf.zeros(s.shape, s.dtype) for k, s in d.element_spec.items()}).repeat()
        return d.concatenate(padding).take(steps * local_replicas).prefetch(2)

    return dataset_fn


# ------------------------------------------------------------------------------------------------
# The output folder: checkpoints to resume, inputs a resume must match, the run-folder files
# ------------------------------------------------------------------------------------------------

def _checkpoint_numbers(directory):
    """ckpt-N files in `directory` -> sorted N (by their .index files)."""
    found = []
    for path in tf.io.gfile.glob(os.path.join(directory, "ckpt-*.index")):
        match = re.fullmatch(r"ckpt-(\d+)\.index", os.path.basename(path))
        if match:
            found.append(int(match.group(1)))
    return sorted(found)


def _state_file_latest(state_path):
    """model_checkpoint_path of a `checkpoint` state file (protobuf text: `key: "value"` lines), or
    None; ValueError saying which line is wrong. Read here rather than by
    tf.train.get_checkpoint_state, which logs a parse error and answers "no checkpoint"."""
    try:
        with tf.io.gfile.GFile(state_path, "rb") as f:
            text = f.read().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    latest = None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        match = re.fullmatch(r'(\w+)\s*:\s*(?:"((?:[^"\\]|\\.)*)"|[-+0-9.eE]+)', line)
        if not match:
            raise ValueError(f"line {number} is not `key: value`")
        if match.group(1) == "model_checkpoint_path":
            latest = match.group(2)
    return latest


def latest_checkpoint(directory):
    """The checkpoint to resume from in `directory`, or None when it holds none.

    Training state that exists but cannot be read is an error, never a fresh start that would
    overwrite it: ckpt-N files with a missing or unreadable `checkpoint` state file, or a state file
    naming a checkpoint that is not there. (`ckpt-N_temp/` folders, left by a kill during a save,
    are not checkpoints: `remove_partial_saves` deletes them.)
    """
    numbers = _checkpoint_numbers(directory)
    state_path = os.path.join(directory, "checkpoint")
    fix = (f"write the line `model_checkpoint_path: \"ckpt-{numbers[-1]}\"` into {state_path} to "
           f"resume from the newest, or use a new --output_dir" if numbers else "")
    if not tf.io.gfile.exists(state_path):
        if numbers:
            raise UsageError(f"{state_path} is missing but {directory} holds ckpt-{numbers[-1]}: "
                             f"{fix}")
        return None
    try:
        prefix = _state_file_latest(state_path)
    except ValueError as e:
        raise UsageError(f"{state_path} is unreadable ({e}): "
                         f"{fix or 'delete it to start fresh'}") from None
    if not prefix:
        if numbers:
            raise UsageError(f"{state_path} names no checkpoint but {directory} holds "
                             f"ckpt-{numbers[-1]}: {fix}")
        return None
    if not os.path.isabs(prefix) and "://" not in prefix:
        prefix = os.path.join(directory, prefix)
    if not tf.io.gfile.exists(prefix + ".index"):
        raise UsageError(f"{state_path} names {prefix}, which is not there: "
                         f"{fix or 'delete the state file to start fresh'}")
    return prefix


def restore(checkpoint, prefix):
    """Restores `prefix`; an unreadable checkpoint is a UsageError naming its files."""
    try:
        checkpoint.restore(prefix).assert_existing_objects_matched()
    except Exception as e:  # truncated data files fail in many ways (OpError, IndexError, ...)  # noqa: BLE001
        data = ", ".join(sorted(tf.io.gfile.glob(prefix + ".data-*"))) or prefix + ".data-*"
        raise UsageError(f"cannot restore {prefix} ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else 'no detail'}); "
                         f"its files ({prefix}.index, {data}) are damaged or not this model's: "
                         "point the `checkpoint` state file at an older ckpt-N, or use a new "
                         "--output_dir") from None


def _fingerprint(path):
    """Identity of one record file: its name and size, and its sidecar's sha256 when it has one."""
    size = _fs(path).stat(path).length if "://" in path else os.path.getsize(path)
    entry = {"file": os.path.basename(path), "bytes": size}
    sidecar = pretraining_records.sidecar_path(path)
    if _fs(sidecar).exists(sidecar):
        with _fs(sidecar).GFile(sidecar, "rb") as f:
            entry["meta_sha256"] = hashlib.sha256(f.read()).hexdigest()
    return entry


def input_state(opts, files, num_pipelines):
    """What the input position at step N depends on; must be equal to resume exactly."""
    return {"input_files": [_fingerprint(p) for p in files],
            "train_batch_size": opts.train_batch_size, "seed": opts.seed,
            "shuffle_buffer_size": opts.shuffle_buffer_size, "input_pipelines": num_pipelines,
            "masked_lm_prob": opts.masked_lm_prob}  # unmasked records: the masks drawn at each position


def check_resume_input(output_dir, state):
    """UsageError if a run resumed in output_dir would read a different stream than before."""
    path = os.path.join(output_dir, INPUT_STATE)
    if not _fs(path).exists(path):
        return
    with _fs(path).GFile(path) as f:
        before = json.load(f)
    advice = ("to train on, start a new --output_dir with --init_checkpoint=" + output_dir)
    if before.get("train_batch_size") != state["train_batch_size"]:
        raise UsageError(f"--train_batch_size={state['train_batch_size']}, but {output_dir} was "
                         f"trained with {before.get('train_batch_size')}: resume with the same "
                         f"batch size, or {advice}")
    if before.get("input_files") != state["input_files"]:
        old = [e["file"] for e in before.get("input_files", [])]
        new = [e["file"] for e in state["input_files"]]
        detail = (f"{len(old)} file(s) then, {len(new)} now" if old != new
                  else "same names, other contents (size or .meta.json differ)")
        raise UsageError(f"--input_file differs from the records {output_dir} was trained on "
                         f"({detail}; see {path}): resume with the same records, or {advice}")
    for key in ("seed", "shuffle_buffer_size", "input_pipelines", "masked_lm_prob"):
        if key in before and before[key] != state[key]:  # runs before masked_lm_prob was recorded resume
            flag = {"input_pipelines": "number of workers"}.get(key, "--" + key)
            raise UsageError(f"{flag} is {state[key]}, but {output_dir} was trained with "
                             f"{before.get(key)}: the input position would not resume exactly; "
                             f"use the same value, or {advice}")


def write_json(path, obj):
    model_folder.atomic_write(path, json.dumps(obj, indent=1))


def _sha256(path):
    with _fs(path).GFile(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def vocab_and_casing(opts, files):
    """-> (vocab file or None, do_lower_case) for the run folder, checked against the sidecars.

    The vocab: --vocab_file, which must be the one the records were made with (their sidecars'
    vocab_sha256); without the flag, the file the sidecars name (`vocab_file`) if it is still there
    with that hash; else None (the run trains, and warns that the folder lacks vocab.txt).
    """
    metas = [(p, m) for p, m in pretraining_records.read_info(files).metas if m]
    hashes = {m["vocab_sha256"] for _, m in metas if m.get("vocab_sha256")}
    vocab_file = opts.vocab_file
    if vocab_file:
        if not _fs(vocab_file).exists(vocab_file) or _fs(vocab_file).isdir(vocab_file):
            raise UsageError(f"--vocab_file={vocab_file}: no such file")
        sha = _sha256(vocab_file)
        for path, meta in metas:
            if meta.get("vocab_sha256") not in (None, sha):
                raise UsageError(f"--vocab_file={vocab_file} is not the vocab {path} was made with "
                                 f"(vocab_sha256 differs in {path}.meta.json)")
    else:
        named = next((m["vocab_file"] for _, m in metas if m.get("vocab_file")), None)
        if named and _fs(named).exists(named) and not _fs(named).isdir(named) \
                and hashes <= {_sha256(named)}:
            vocab_file = named
        elif named:
            logging.warning("the records' sidecar names %s, but it is gone or changed since; "
                            "give --vocab_file to make the run folder self-describing", named)
    cased = {m["do_lower_case"] for _, m in metas if "do_lower_case" in m}
    lower = opts.do_lower_case
    if lower is None:
        lower = cased.pop() if len(cased) == 1 else True
    elif cased and cased != {lower}:
        raise UsageError(f"--do_lower_case={lower}, but the records were made with "
                         f"do_lower_case={sorted(cased)[0]} (see their .meta.json)")
    return vocab_file, lower


def remove_partial_saves(output_dir):
    """Deletes `ckpt-N_temp/` folders: what a kill during a save leaves (TF writes a checkpoint
    there, then renames it into ckpt-N.*). They are never a checkpoint TF would restore."""
    for path in tf.io.gfile.glob(os.path.join(output_dir, "ckpt-*_temp")):
        if re.fullmatch(r"ckpt-\d+_temp", os.path.basename(path)) and tf.io.gfile.isdir(path):
            logging.warning("removing %s, left by a run killed while saving", path)
            tf.io.gfile.rmtree(path)


def write_run_folder(output_dir, config, vocab_file, do_lower_case):
    """bert_config.json, vocab.txt and model_info.json beside the checkpoints (model_folder's
    contract), so fill_mask.py, export_to_pytorch.py and --init_checkpoint take the folder alone."""
    if vocab_file is None:
        logging.warning("no --vocab_file: %s gets no vocab.txt; rerun the same command with "
                        "--vocab_file=<the vocab the records were made with> to add it",
                        output_dir)
        if not _fs(output_dir).exists(os.path.join(output_dir, "bert_config.json")):
            config.to_json_file(os.path.join(output_dir, "bert_config.json"))
        return
    import model_folder  # the run-folder contract's one owner

    model_folder.write(output_dir, config=config, vocab_file=vocab_file,
                       do_lower_case=do_lower_case, task="mlm")
