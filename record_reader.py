"""Pretraining records without TensorFlow: the reader and the input stream of the JAX path.

The format is pretraining_records.py's (its one owner: kinds, features, sidecar, framing); this
module reads it with NumPy and google-crc32c only, so `KERAS_BACKEND=jax python run_pretraining.py`
runs on a machine that has no TensorFlow.

  RecordFile      one TFRecord file, memory-mapped: record offsets from its headers, every length
                  and data CRC checked (corrupt or truncated file = one line naming file and record).
  Decoder         (example_decoder.py) serialized tf.train.Example records -> NumPy arrays of
                  the model's inputs, many records at once, vectorised.
  check_file      pretraining_records.check_records without TensorFlow (sidecar, CRCs, every
                  record's lengths and ids, the count).
  train_batches   the deterministic, resumable stream: the worker split, epoch file order,
                  interleave and windowed shuffle of pretraining_input.train_dataset_fn, positioned
                  by the global step (a rerun after kill -9 continues at the same input position).
  eval_batches    files in order once, then padding, like pretraining_input.eval_dataset_fn.

Static records give the model's tensors. Unmasked records (kind "unmasked") give
{token_ids int32 [B, S] (the body at 1..n), num_tokens int32 [B], word_starts bool [B, S],
positions int32 [B]}: jax_masking.mask_batch draws the masks on the device from (seed, position).
The draws behind the order are NumPy's (keyed by seed, epoch and position), not TensorFlow's: the
same rules, another random order than the tf.data stream.
"""

import mmap
import os
import queue
import struct
import threading

import numpy as np

import pretraining_records as records
from example_decoder import Decoder
from train_utils import UsageError

__all__ = ["Decoder", "RecordFile", "check_file", "count_records", "eval_batches", "interleave",
           "train_batches"]

_HEADER, _FOOTER = 12, 4  # uint64 length + uint32 masked CRC; uint32 masked CRC of the data
_CYCLE = 4  # files read at once per epoch, round robin (tf.data interleave's cycle_length)


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------

class RecordFile:
    """One TFRecord file: `starts`/`lengths` int64 [N] of its records' data, from the headers."""

    def __init__(self, path):
        self.path = path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        except OSError as e:
            raise UsageError(f"{path}: unreadable ({e.strerror or e})") from None
        self.starts, self.lengths = self._index(size)

    def _index(self, size):
        buf, header = self.buf, records._header  # the writer's header bytes, cached per length
        starts, lengths = [], []
        offset = 0
        while offset < size:
            i = len(starts)
            if offset + _HEADER > size:
                self._bad(i, f"truncated header at byte {offset}")
            head = buf[offset:offset + _HEADER]
            (length,) = struct.unpack_from("<Q", head)
            if head != header(length) if length < 1 << 40 else True:
                self._bad(i, "length CRC mismatch (corrupt file)")
            if offset + _HEADER + length + _FOOTER > size:
                self._bad(i, f"truncated: {length} bytes of data announced at byte {offset}, "
                             f"the file ends at {size}")
            starts.append(offset + _HEADER)
            lengths.append(length)
            offset += _HEADER + length + _FOOTER
        return np.array(starts, np.int64), np.array(lengths, np.int64)

    def _bad(self, index, what):
        raise UsageError(f"{self.path}: corrupt or truncated TFRecord file (record {index}: {what})")

    def __len__(self):
        return len(self.starts)

    def read(self, indices):
        """Records at `indices` (ints) -> [bytes], each data CRC checked."""
        out = []
        buf, masked_crc = self.buf, records._masked_crc
        for i in indices:
            start = int(self.starts[i])
            end = start + int(self.lengths[i])
            data = buf[start:end]
            if masked_crc(data) != buf[end:end + _FOOTER]:
                self._bad(int(i), "data CRC mismatch (corrupt file)")
            out.append(data)
        return out


# ----------------------------------------------------------------------------------------------------
# Checking a file before training (pretraining_records.check_records without TensorFlow)
# ----------------------------------------------------------------------------------------------------

def check_file(path, seq_len, max_pred, vocab_size, full_scan=True, batch=4096):
    """Sidecar vs flags (pretraining_records.check_sidecar), record 0, and with `full_scan` every
    record: CRCs, lengths, ids and positions, and the count against the sidecar's num_instances.
    Returns the file's RecordInfo. UsageError naming the file (and the record index)."""
    meta, kind, _ = records.check_sidecar(path, seq_len, max_pred, vocab_size)
    info = records.RecordInfo(kind, ((path, meta),))
    f = RecordFile(path)
    if not len(f):
        raise UsageError(f"{path}: no records")
    decode = Decoder(kind, seq_len, max_pred, vocab_size,
                     records.predictions_in_use(info, seq_len, max_pred))
    for first in range(0, len(f) if full_scan else 1, batch):
        indices = range(first, min(first + batch, len(f)) if full_scan else 1)
        decode(f.read(indices), lambda i, first=first: (path, first + i))
    if full_scan and meta is not None and "num_instances" in meta and len(f) != meta["num_instances"]:
        raise UsageError(f"{path}: {len(f)} records, but {records.sidecar_path(path)} says "
                         f"num_instances={meta['num_instances']} (incomplete file?)")
    return info


def count_records(path):
    """Records in one file, from its headers (their CRCs checked)."""
    return len(RecordFile(path))


# ----------------------------------------------------------------------------------------------------
# The streams
# ----------------------------------------------------------------------------------------------------

def _rng(seed, *key):
    """A NumPy generator that is a function of (seed, key...) only."""
    return np.random.default_rng([int(seed) % (1 << 64), *(int(k) for k in key)])


def interleave(counts):
    """tf.data's deterministic interleave (cycle_length=min(4, files), block_length 1) of files
    with `counts` records, in that order -> (file index, record index) int64 [sum(counts)] each.

    Slots are visited round robin; a visit takes the next record of the slot's file. A visit that
    finds its file exhausted closes it and moves on; the next visit to that slot opens the next file.
    """
    cycle = min(_CYCLE, len(counts))
    slots = [None] * cycle  # [file, next record] or None
    pending = iter(range(len(counts)))
    pieces = []
    exhausted_input = False
    while True:
        # Fast path: every slot holds a file with records left -> whole rounds at once.
        if all(s is not None for s in slots) and cycle:
            rounds = min(counts[s[0]] - s[1] for s in slots)
            if rounds > 0:
                steps = np.arange(rounds)  # round r visits slot 0, 1, ...: columns interleaved
                pieces.append((np.stack([np.full(rounds, s[0]) for s in slots], axis=1).reshape(-1),
                               np.stack([s[1] + steps for s in slots], axis=1).reshape(-1)))
                for s in slots:
                    s[1] += rounds
        # One round visit by visit (files open and close here).
        progressed = False
        for k in range(cycle):
            if slots[k] is None:
                if exhausted_input:
                    continue
                nxt = next(pending, None)
                if nxt is None:
                    exhausted_input = True
                    continue
                slots[k] = [nxt, 0]
            f, i = slots[k]
            progressed = True
            if i < counts[f]:
                pieces.append((np.array([f]), np.array([i])))
                slots[k][1] += 1
            else:
                slots[k] = None
        if not progressed:
            break
    if not pieces:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return (np.concatenate([f for f, _ in pieces]).astype(np.int64),
            np.concatenate([i for _, i in pieces]).astype(np.int64))


class _Epochs:
    """One pipeline's stream: (file index into `mine`, record index, position) per record, epoch by
    epoch, as pretraining_input.train_dataset_fn orders it (with NumPy's draws)."""

    def __init__(self, files, counts, seed, shuffle_buffer_size, num_pipelines, pipeline_id):
        self.mine, self.shard, self.per_epoch = records.pipeline_files(
            files, counts, num_pipelines, pipeline_id)
        by_path = dict(zip(files, counts))
        self.counts = [by_path[p] for p in self.mine]
        self.seed, self.window = seed, max(1, shuffle_buffer_size)
        self.num_pipelines, self.pipeline_id = num_pipelines, pipeline_id

    def epoch(self, e):
        """-> (file index, record index, position) int64 [per_epoch] each."""
        order = _rng(self.seed, 0, e).permutation(len(self.mine))
        f, i = interleave([self.counts[k] for k in order])
        f = order[f]
        if self.shard:
            f, i = f[self.pipeline_id::self.num_pipelines], i[self.pipeline_id::self.num_pipelines]
        positions = e * self.per_epoch + np.arange(len(f), dtype=np.int64)
        perm = np.empty(len(f), np.int64)
        for w in range(0, len(f), self.window):  # windows keyed by their first position
            size = min(self.window, len(f) - w)
            perm[w:w + size] = w + _rng(self.seed, 1, positions[w]).permutation(size)
        return f[perm], i[perm], positions[perm]


def _prefetched(generator, depth):
    """Runs `generator` in a thread, `depth` items ahead; its exceptions reach the consumer."""
    if depth <= 0:
        yield from generator
        return
    q = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def work():
        try:
            for item in generator:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer
            q.put((done, e))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()


class _Files:
    """Opened record files (memory-mapped on first use) and reads of (file, record) lists."""

    def __init__(self, paths):
        self.paths, self.open = paths, {}

    def read(self, file_index, record_index):
        """-> ([bytes] in the given order, where(i) -> (path, record index))."""
        out = [None] * len(file_index)
        for f in np.unique(file_index):
            if f not in self.open:
                self.open[f] = RecordFile(self.paths[f])
            rows = np.flatnonzero(file_index == f)
            for row, data in zip(rows, self.open[f].read(record_index[rows])):
                out[row] = data
        paths = self.paths
        return out, lambda i: (paths[int(file_index[i])], int(record_index[i]))


def train_batches(files, counts, global_batch, seed, shuffle_buffer_size, start_step, info, *,
                  seq_len, max_pred, vocab_size=None, num_pipelines=1, pipeline_id=0, prefetch=2):
    """The training stream of one pipeline (host): an endless iterator of dict[str, np.ndarray],
    [global_batch // num_pipelines, ...] per step, from step `start_step` on.

    A deterministic function of (files, counts, seed, shuffle_buffer_size, pipelines): epoch e
    reads its files in an order drawn from (seed, e), four at a time round robin, and shuffles
    records within windows of shuffle_buffer_size by draws keyed by (seed, the window's first
    position). Each record's stream position is e * records_per_epoch + i. Starting at
    `start_step` skips start_step * batch records by arithmetic (nothing is read), so a rerun after
    kill -9 continues exactly where the checkpointed step left off.
    Static records give the model's tensors; unmasked records give token_ids, num_tokens,
    word_starts and positions (int32 [B]) for jax_masking.mask_batch.
    """
    if global_batch % num_pipelines:
        raise UsageError(f"--train_batch_size={global_batch} is not divisible by the "
                         f"{num_pipelines} input pipelines")
    batch = global_batch // num_pipelines
    epochs = _Epochs(list(files), list(counts), seed, shuffle_buffer_size, num_pipelines, pipeline_id)
    if epochs.per_epoch < batch:
        raise UsageError(f"--input_file has {epochs.per_epoch} records for pipeline {pipeline_id}, "
                         f"fewer than one batch ({batch})")
    kind = info.kind if info is not None else records.STATIC
    decode = Decoder(kind, seq_len, max_pred, vocab_size,
                     records.predictions_in_use(info, seq_len, max_pred))
    reader = _Files(epochs.mine)
    chunk = batch * max(1, 2048 // batch)

    def generate():
        e, skip = divmod(start_step * batch, epochs.per_epoch)
        carry = [np.zeros(0, np.int64)] * 3
        while True:
            parts = epochs.epoch(e)
            parts = [np.concatenate([c, p[skip:]]) for c, p in zip(carry, parts)]
            skip = 0
            whole = len(parts[0]) // batch * batch
            for c in range(0, whole, chunk):  # decoded a chunk at a time: fewer, larger NumPy calls
                f, i, pos = (p[c:min(c + chunk, whole)] for p in parts)
                raws, where = reader.read(f, i)
                out = decode(raws, where)
                if kind != records.STATIC:
                    out["positions"] = pos.astype(np.int32)
                for b in range(0, len(f), batch):
                    yield {k: v[b:b + batch] for k, v in out.items()}
            carry = [p[whole:] for p in parts]
            e += 1

    return _prefetched(generate(), prefetch)


def eval_batches(files, counts, global_batch, steps, info, *, seq_len, max_pred, vocab_size=None,
                 num_pipelines=1, pipeline_id=0):
    """Evaluation: this pipeline's records in file order, once, positions 0, 1, ...; the last batch
    zero-padded and then all-padding batches, exactly `steps` batches of
    [global_batch // num_pipelines, ...]. Padding rows have zero masked_lm_weights (static) or
    num_tokens 0 (unmasked: mask_batch gives them zero weights), so they do not count."""
    batch = global_batch // num_pipelines
    mine, shard, _ = records.pipeline_files(list(files), list(counts), num_pipelines, pipeline_id)
    by_path = dict(zip(files, counts))
    f = np.concatenate([np.full(by_path[p], k, np.int64) for k, p in enumerate(mine)])
    i = np.concatenate([np.arange(by_path[p], dtype=np.int64) for p in mine])
    if shard:
        f, i = f[pipeline_id::num_pipelines], i[pipeline_id::num_pipelines]
    kind = info.kind if info is not None else records.STATIC
    decode = Decoder(kind, seq_len, max_pred, vocab_size,
                     records.predictions_in_use(info, seq_len, max_pred))
    reader = _Files(mine)
    padding = None
    for step in range(steps):
        rows = slice(step * batch, (step + 1) * batch)
        if len(f[rows]):
            raws, where = reader.read(f[rows], i[rows])
            out = decode(raws, where)
            if kind != records.STATIC:
                out["positions"] = np.arange(rows.start, rows.start + len(raws), dtype=np.int32)
            pad = batch - len(raws)
            out = {k: np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)) for k, v in out.items()}
            padding = {k: np.zeros_like(v) for k, v in out.items()}
        elif padding is None:  # no record at all for this pipeline
            padding = _padding(kind, batch, seq_len, max_pred)
        yield out if len(f[rows]) else padding


def _padding(kind, batch, seq, pred):
    if kind == records.STATIC:
        return {"input_ids": np.zeros((batch, seq), np.int32), "input_mask": np.zeros((batch, seq), np.int32),
                "segment_ids": np.zeros((batch, seq), np.int32),
                "masked_lm_positions": np.zeros((batch, pred), np.int32),
                "masked_lm_ids": np.zeros((batch, pred), np.int32),
                "masked_lm_weights": np.zeros((batch, pred), np.float32)}
    return {"token_ids": np.zeros((batch, seq), np.int32), "num_tokens": np.zeros(batch, np.int32),
            "word_starts": np.zeros((batch, seq), bool), "positions": np.zeros(batch, np.int32)}
