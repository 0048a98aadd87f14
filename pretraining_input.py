"""The TensorFlow training input stream of run_pretraining.py, and what a rerun must find again.

The input stream is a deterministic function of (record files, seed, step), so a rerun positions it
at the restored step instead of restoring iterator state (tf.distribute's per-replica iterators
cannot be saved). The output folder holds the checkpoints, the files that make it a self-describing
model folder (model_folder's contract), and the identity of the inputs a resume must match. State
that exists but cannot be read is a one-line UsageError naming the file and the fix, never a fresh
start over it.
"""

import hashlib
import json
import math
import os
import re

import train_utils  # first: it hides TensorFlow's C++ start-up lines

# isort: split

import keras
import numpy as np
from absl import logging

import file_output
import model_folder
import modeling
import pretraining_records

if keras.backend.backend() == "tensorflow":  # the input-state and run-folder rules serve JAX too
    import tensorflow as tf

UsageError = train_utils.UsageError
_fs = file_output.fs  # tf.io.gfile for gs:// paths, the standard library for local ones
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


def sample_sequence_stats(files, parse, num_records=4096):
    """{"input_mask": (mean, std), "masked_lm_weights": (mean, std)}: real tokens and real
    predictions per sequence in the first `num_records` records (read round-robin over the files,
    parsed as training parses them), for the trainer's packed sizes (run_pretraining.packed_sizes);
    None when nothing could be read (the training stream then reports the problem where it always
    does). A sample is enough: the sizes only decide speed, a batch that does not fit them is
    computed unpacked."""
    d = tf.data.Dataset.from_tensor_slices(files).interleave(
        tf.data.TFRecordDataset, cycle_length=min(len(files), 16))
    keys = ("input_mask", "masked_lm_weights")
    d = d.take(num_records).enumerate().batch(512).map(
        lambda positions, serialized: {k: tf.reduce_sum(tf.cast(v > 0, tf.int32), axis=1)
                                       for k, v in parse(positions, serialized).items() if k in keys})
    try:
        counts = list(d.as_numpy_iterator())
    except tf.errors.OpError:
        return None
    if not counts:
        return None
    counts = {k: np.concatenate([c[k] for c in counts]) for k in keys}
    return {k: (float(c.mean()), float(c.std())) for k, c in counts.items()}


# ------------------------------------------------------------------------------------------------
# The output folder: checkpoints to resume, inputs a resume must match, the run-folder files
# ------------------------------------------------------------------------------------------------

def latest_checkpoint(directory):
    """The checkpoint to resume from in `directory`, or None when it holds none.

    model_folder's state-file reader with the resume rules: training state that exists but cannot
    be read is an error, never a fresh start that would overwrite it. (`ckpt-N_temp/` folders, left
    by a kill during a save, are not checkpoints: `remove_partial_saves` deletes them.)
    """
    return model_folder.latest_checkpoint(directory, resume=True)


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


def check_kind_flags(opts, train_files, eval_files):
    """A flag the records' kind ignores is refused, not dropped: static records were masked when
    written, so --masked_lm_prob would change nothing (unless it repeats what made them)."""
    if not opts["masked_lm_prob"].present:
        return
    infos = [(files, pretraining_records.read_info(files, flag)) for files, flag in
             ((train_files, "--input_file"), (eval_files, "--eval_input_file")) if files]
    if any(info.kind != pretraining_records.STATIC for _, info in infos):
        return  # records masked at training time use it
    for files, info in infos:
        made = info.meta.get("masked_lm_prob")
        if made is None or not math.isclose(made, opts.masked_lm_prob):
            raise UsageError(f"--masked_lm_prob={opts.masked_lm_prob} would be ignored: {files[0]} holds "
                             f"static records, masked when written (masked_lm_prob={made}); drop the flag, "
                             "or make records masked at training time (create_pretraining_data.py "
                             "--dynamic_masking)")


def bad_records_error(opts, patterns, where, error):
    """-> the UsageError for a record that failed to read mid-run (--check_input_files=false):
    a full scan of the files, the check that flag skipped, names the file and the record."""
    cause = next((line.strip() for line in error.message.splitlines()[1:]
                  if line.strip() and not line.startswith(("Detected at", "<stack", "\t"))), error.message)
    vocab_size = modeling.BertConfig.from_json_file(opts.bert_config_file).vocab_size
    try:
        for path in pretraining_records.record_files(patterns):
            pretraining_records.check_records(path, opts.max_seq_length, opts.max_predictions_per_seq,
                                              vocab_size, full_scan=True)
    except UsageError as found:
        cause = str(found)
    skipped = " (read with --check_input_files=false: the default checks every record before step 1)"
    return UsageError(f"bad input record {where}: {cause}{skipped if not opts.check_input_files else ''}")


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
    advice = ("to train on, start a new --output_dir with --init_checkpoint=" + output_dir)
    if not _fs(path).exists(path):  # the batch size, records and seed of the run are unknown
        raise UsageError(f"{path} is missing, but {output_dir} holds checkpoints to resume: without it "
                         "the input position (batch size, records, seed) cannot be checked; put the "
                         f"file back, or {advice}")
    try:
        with _fs(path).GFile(path) as f:
            before = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is unreadable ({e}); put the file back, or {advice}") from None
    if not isinstance(before, dict):
        raise UsageError(f"{path}: expected a JSON object; put the file back, or {advice}")
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
    file_output.atomic_write(path, json.dumps(obj, indent=1))


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


def save_checkpoint(manager, step):
    """manager.save(checkpoint_number=step); a save that fails (a full disk) leaves no ckpt-N_temp/.

    TF writes a checkpoint into `ckpt-N_temp/` and then merges it into ckpt-N.*; the error goes on
    up (run_script prints a full disk as one line), the folder keeps only whole checkpoints."""
    try:
        return manager.save(checkpoint_number=step)
    except BaseException:
        partial = f"{manager._checkpoint_prefix}-{step}_temp"  # noqa: SLF001 -- TF's own naming of the prefix
        if tf.io.gfile.isdir(partial):
            try:
                tf.io.gfile.rmtree(partial)
            except tf.errors.OpError as e:  # the save's own error is the one to report
                logging.warning("could not remove %s (%s); the next run removes it", partial, e.message)
        raise


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
