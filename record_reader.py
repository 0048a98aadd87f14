"""Pretraining records without TensorFlow: the reader and the input stream of the JAX path.

The format is pretraining_records.py's (its one owner: kinds, features, sidecar, framing); this
module reads it with NumPy and google-crc32c only, so `KERAS_BACKEND=jax python run_pretraining.py`
runs on a machine that has no TensorFlow.

  RecordFile      one TFRecord file, memory-mapped: record offsets from its headers, every length
                  and data CRC checked (corrupt or truncated file = one line naming file and record).
  decode          serialized tf.train.Example records -> NumPy arrays of the model's inputs. The
                  protobuf structure is walked per record (a few fields), the payloads of all records
                  of a batch are decoded at once, vectorised (varints packed or not, floats, bytes).
  check_file      pretraining_records.check_records without TensorFlow (sidecar, CRCs, every
                  record's lengths and ids, the count).
  train_batches   the deterministic, resumable stream: the worker split, epoch file order,
                  interleave and windowed shuffle of pretraining_resume.train_dataset_fn, positioned
                  by the global step (a rerun after kill -9 continues at the same input position).
  eval_batches    files in order once, then padding, like pretraining_resume.eval_dataset_fn.

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
from train_utils import UsageError

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
# Decoding tf.train.Example bytes
# ----------------------------------------------------------------------------------------------------

def _varint(buf, pos):
    """-> (value, next position); ValueError past the end or beyond 10 bytes."""
    b = buf[pos]
    if b < 0x80:
        return b, pos + 1
    value, shift = 0, 0
    while True:
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        if b < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _skip(buf, pos, wire):
    """Skips a field's value of wire type `wire` -> next position."""
    if wire == 0:
        return _varint(buf, pos)[1]
    if wire == 1:
        return pos + 8
    if wire == 2:
        n, pos = _varint(buf, pos)
        return pos + n
    if wire == 5:
        return pos + 4
    raise ValueError(f"unsupported wire type {wire}")


def _fields(buf, pos, end):
    """Yields (field number, wire type, value start, value end) of a message in buf[pos:end]."""
    while pos < end:
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 2:
            n, start = _varint(buf, pos)
            pos = start + n
        else:
            start, pos = pos, _skip(buf, pos, wire)
        if pos > end:
            raise ValueError("field runs past its message")
        yield field, wire, start, pos


# Feature.kind oneof field -> the list's dtype
_LISTS = {1: "bytes", 2: "float32", 3: "int64"}


def _walk(buf, start, end, wanted, segments, record):
    """The general path, one record: appends the value bytes of record buf[start:end]'s wanted
    features to segments[name] = [starts, ends, records, list fields]; each segment holds whole
    values: varints (int64, packed or not), 4-byte floats, or one bytes value."""
    for field, wire, fs, fe in _fields(buf, start, end):
        if field != 1 or wire != 2:  # Example.features
            continue
        for field2, wire2, es, ee in _fields(buf, fs, fe):  # Features.feature map entries
            if field2 != 1 or wire2 != 2:
                continue
            name, value = None, None
            for field3, wire3, s, e in _fields(buf, es, ee):
                if field3 == 1 and wire3 == 2:
                    name = bytes(buf[s:e]).decode("utf-8", "replace")
                elif field3 == 2 and wire3 == 2:
                    value = (s, e)
            if name not in wanted or value is None:
                continue
            starts, ends, recs, kinds = segments.setdefault(name, [[], [], [], []])
            for field4, _, ls, le in _fields(buf, *value):  # Feature: one of the lists
                if field4 not in _LISTS:
                    continue
                for field5, wire5, s, e in _fields(buf, ls, le):  # the list's `value` fields
                    if field5 != 1:
                        continue
                    if wire5 == 0:  # an unpacked int64: its varint bytes are one segment
                        s = e - 1
                        while s > ls and buf[s - 1] >= 0x80:
                            s -= 1
                    starts.append(s)
                    ends.append(e)
                    recs.append(record)
                    kinds.append(field4)


def _varints_at(blob, at):
    """Vectorised: the varints starting at positions `at` (int64 [k]) -> (values, next positions,
    ok); ok is False for varints longer than 5 bytes (no length we meet is that long)."""
    value = np.zeros(len(at), np.int64)
    cont = np.ones(len(at), bool)
    pos = at.copy()
    for i in range(5):
        b = blob[np.minimum(pos, len(blob) - 1)].astype(np.int64)
        value |= np.where(cont, (b & 0x7F) << (7 * i), 0)
        pos += cont
        cont &= b >= 0x80
        if not cont.any():
            break
    return value, pos, ~cont


def _walk_batch(blob, offsets, names, segments):
    """The fast path, all records at once: Examples laid out as protobuf writers (ours,
    tf.train.Example) write them -- one `features` field, each map entry key then value, each list
    packed (int64/float) or a single value (bytes). Appends what it reads to `segments` (as
    _walk) and returns bool [n]: the records it could not read this way (for _walk)."""
    end = np.asarray(offsets[1:], np.int64)
    start = np.asarray(offsets[:-1], np.int64)
    blob = np.concatenate([blob, np.zeros(16, np.uint8)])  # look-ahead past the last record
    size, pos, ok = _varints_at(blob, start + 1)
    irregular = ~((end > start) & (blob[np.minimum(start, len(blob) - 1)] == 0x0A) & ok & (pos + size == end))
    keys = {name: np.frombuffer(name.encode(), np.uint8) for name in names}
    while True:
        rows = np.flatnonzero(~irregular & (pos < end))
        if not len(rows):
            return irregular
        at, stop = pos[rows], end[rows]

        def byte(i):
            return blob[np.minimum(i, len(blob) - 1)]

        entry, at, ok1 = _varints_at(blob, at + 1)        # map entry: 0x0A len
        entry_end = at + entry
        key, at2, ok2 = _varints_at(blob, at + 1)         # key: 0x0A len name
        key_end = at2 + key
        value, at3, ok3 = _varints_at(blob, key_end + 1)  # value: 0x12 len Feature
        tag = byte(at3)                                    # Feature: list tag, len
        lst, at4, ok4 = _varints_at(blob, at3 + 1)
        payload, at5, ok5 = _varints_at(blob, at4 + 1)    # list: 0x0A len values, or empty
        empty = lst == 0
        good = ((byte(pos[rows]) == 0x0A) & ok1 & (entry_end <= stop) & (byte(at) == 0x0A) & ok2
                & (byte(key_end) == 0x12) & ok3 & (at3 + value == entry_end) & ok4
                & (at4 + lst == entry_end) & ((tag & 7) == 2) & ((tag >> 3) >= 1) & ((tag >> 3) <= 3)
                & (empty | ((byte(at4) == 0x0A) & ok5 & (at5 + payload == entry_end))))
        irregular[rows[~good]] = True
        for name, want in keys.items():
            hit = good & (key == len(want))
            if hit.any():
                idx = np.flatnonzero(hit)
                same = (blob[at2[idx, None] + np.arange(len(want))] == want).all(axis=1)
                idx = idx[same]
                seg = segments.setdefault(name, [[], [], [], []])
                seg[0].append(np.where(empty[idx], entry_end[idx], at5[idx]))
                seg[1].append(entry_end[idx])
                seg[2].append(rows[idx])
                seg[3].append((tag[idx] >> 3).astype(np.int64))
        pos[rows[good]] = entry_end[good]


def _merged(seg):
    """segments[name] (lists of ints and arrays from both paths) -> int64 arrays ordered by record."""
    starts, ends, recs, kinds = (np.concatenate([np.atleast_1d(np.asarray(x, np.int64)) for x in part])
                                 if part else np.zeros(0, np.int64) for part in seg)
    order = np.argsort(recs, kind="stable")
    return starts[order], ends[order], recs[order], kinds[order]


def _gather(blob, starts, ends):
    """The bytes of segments [starts[i], ends[i]) of `blob` (uint8), concatenated -> uint8 [sum]."""
    lengths = ends - starts
    before = np.cumsum(lengths) - lengths
    return blob[np.repeat(starts - before, lengths) + np.arange(lengths.sum())]


def _decode_varints(data):
    """uint8 [n] of whole varints -> int64 [values], and the index of each value's last byte."""
    if not len(data) or data.max() < 0x80:  # one byte each (masks, small ids): the bytes
        return data.astype(np.int64), np.arange(len(data))
    last = np.flatnonzero(data < 0x80)
    if not len(last) or last[-1] != len(data) - 1:
        raise ValueError("varint cut at a segment end")
    if not len(last):
        return np.zeros(0, np.int64), last
    first = np.empty_like(last)
    first[0], first[1:] = 0, last[:-1] + 1
    length = last - first + 1
    longest = int(length.max())
    if longest > 10:
        raise ValueError("varint longer than 10 bytes")
    values = (data[first] & 0x7F).astype(np.uint64)
    for k in range(1, longest):  # byte k of the values that have one
        has = np.flatnonzero(length > k)
        values[has] |= (data[first[has] + k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    return values.view(np.int64), last


def _values_by_record(kind, blob, merged, n):
    """One feature's merged segments -> (values [total], per-record value counts [n]); bytes
    features give the bytes and the per-record byte counts (one value per record, checked by the
    caller)."""
    starts, ends, recs, _ = merged
    data = _gather(blob, starts, ends)
    if kind == "int64":
        values, last = _decode_varints(data)
        cut = np.cumsum(ends - starts)  # where each segment ends in `data`
        if (data[cut[ends > starts] - 1] >= 0x80).any():
            raise ValueError("varint cut at a segment end")
        per_segment = np.diff(np.searchsorted(last, cut), prepend=0)
        return values, np.bincount(recs, weights=per_segment, minlength=n).astype(np.int64)
    if kind == "float32":
        if ((ends - starts) % 4).any():
            raise ValueError("float list of a length not a multiple of 4")
        return data.view("<f4"), np.bincount(recs, weights=(ends - starts) // 4, minlength=n).astype(np.int64)
    return data, np.bincount(recs, weights=ends - starts, minlength=n).astype(np.int64)


_KIND_CODE = {v: k for k, v in _LISTS.items()}


class Decoder:
    """Serialized records of one kind -> the arrays of a batch (see the module docstring).

    `where(i)` -> (path, record index) of the batch's record i, for messages. Lengths are always
    checked (a batch has static shapes); ids and positions against `vocab_size` / seq_len when
    vocab_size is given. A bad record is a UsageError naming the file and record, in
    pretraining_records.check_values' words.
    """

    def __init__(self, kind, seq_len, max_pred, vocab_size=None):
        self.kind, self.seq, self.pred, self.vocab_size = kind, seq_len, max_pred, vocab_size
        self.features = [f for f in records._features(kind) if f.read]
        self.names = {f.name for f in self.features}

    def __call__(self, raws, where):
        n = len(raws)
        blob_bytes = b"".join(raws)
        blob = np.frombuffer(blob_bytes, np.uint8)
        offsets = np.cumsum([0] + [len(r) for r in raws])
        segments = {}
        for i in np.flatnonzero(_walk_batch(blob, offsets, self.names, segments)):
            try:  # the general path for what the fast one does not read
                _walk(blob_bytes, int(offsets[i]), int(offsets[i + 1]), self.names, segments, int(i))
            except (ValueError, IndexError) as e:
                self._not_an_example(where(int(i)), e)
        out = {}
        for f in self.features:
            merged = _merged(segments.get(f.name, [[], [], [], []]))
            if (merged[3] != _KIND_CODE[f.dtype]).any() or not np.bincount(merged[2], minlength=n).all():
                self._explain(raws, where)
            try:
                out[f.name] = (*_values_by_record(f.dtype, blob, merged, n), merged)
            except ValueError:
                self._explain(raws, where)
        return self._arrays(out, raws, where, blob)

    @staticmethod
    def _not_an_example(place, error):
        raise UsageError(f"{place[0]}: record {place[1]} is not a tf.train.Example ({error})") from None

    def values_of(self, raw):
        """One record -> {feature name: list of values} (ValueError/IndexError when malformed)."""
        segments = {}
        _walk(raw, 0, len(raw), self.names, segments, 0)
        blob = np.frombuffer(raw, np.uint8)
        values = {}
        for name, seg in segments.items():
            merged = _merged(seg)
            kind = _LISTS[int(merged[3][0])] if len(merged[3]) else "int64"
            data, _ = _values_by_record(kind, blob, merged, 1)
            values[name] = ([bytes(blob[s:e]) for s, e in zip(merged[0], merged[1])] if kind == "bytes"
                            else data.tolist())
        return values

    def check(self, raw, place):
        """Checks one record; UsageError naming place = (path, index) on the first problem."""
        try:
            values = self.values_of(raw)
        except (ValueError, IndexError) as e:
            self._not_an_example(place, e)
        for f in self.features:
            if f.name in values and values[f.name] and type(values[f.name][0]) is not (
                    bytes if f.dtype == "bytes" else float if f.dtype == "float32" else int):
                raise UsageError(f"{place[0]}: record {place[1]} has {f.name} of another type than "
                                 f"{f.dtype} (not {self.kind} pretraining records?)")
        records.check_values(place[0], self.kind, place[1], values, self.seq, self.pred,
                             self.vocab_size if self.vocab_size is not None else 1 << 62)
        if self.kind == records.UNMASKED and len(values["word_starts"]) != 1:
            raise UsageError(f"{place[0]}: record {place[1]} has {len(values['word_starts'])} "
                             "word_starts values, not 1")

    def _explain(self, raws, where, first=0):
        """Raises the one-line error of the first bad record from `first` on."""
        for i in range(first, len(raws)):
            self.check(raws[i], where(i))
        path, index = where(first)
        raise UsageError(f"{path}: record {index}: unexpected record (not {self.kind} pretraining "
                         "records?)")

    def _arrays(self, out, raws, where, blob):
        n, seq, pred = len(raws), self.seq, self.pred
        if self.kind == records.STATIC:
            batch = {}
            for f in self.features:
                values, counts, _ = out[f.name]
                length = records.feature_length(f, seq, pred)
                bad = np.flatnonzero(counts != length)
                if len(bad):
                    self._explain(raws, where, int(bad[0]))
                array = values.reshape(n, length)
                bound = (self.vocab_size if f.token_ids else seq if f.positions else None)
                if bound is not None:
                    rows = np.flatnonzero(((array < 0) | (array >= bound)).any(axis=1))
                    if len(rows):
                        self._explain(raws, where, int(rows[0]))
                batch[f.name] = array.astype(np.float32 if f.dtype == "float32" else np.int32)
            return batch
        # unmasked: token_ids [n_i] -> [B, S] at 1..n_i; word_starts bitmap -> bool [B, S]
        values, counts, _ = out["token_ids"]
        bad = (counts < 1) | (counts > seq - 2)
        if self.vocab_size is not None:
            bad |= np.bincount(np.repeat(np.arange(n), counts),
                               weights=(values < 0) | (values >= self.vocab_size), minlength=n) > 0
        if bad.any():
            self._explain(raws, where, int(np.flatnonzero(bad)[0]))
        token_ids = np.zeros((n, seq), np.int32)
        before = np.repeat(np.cumsum(counts) - counts, counts)
        token_ids[np.repeat(np.arange(n), counts), 1 + np.arange(len(values)) - before] = values
        _, _, (starts, ends, recs, _) = out["word_starts"]
        if len(recs) != n:  # one bytes value per record (they are in record order)
            self._explain(raws, where)
        # The bitmap: bit i % 8 of byte i // 8 is token i; cut or zero-padded to the body's size.
        width = (seq - 2 + 7) // 8
        starts = np.asarray(starts, np.int64)
        take = np.minimum(np.asarray(ends, np.int64) - starts, width)
        cols = np.arange(take.sum()) - np.repeat(np.cumsum(take) - take, take)
        bitmap = np.zeros((n, width), np.uint8)
        bitmap[np.repeat(np.arange(n), take), cols] = blob[np.repeat(starts, take) + cols]
        bits = np.unpackbits(bitmap, axis=1, bitorder="little")[:, :seq - 2].astype(bool)
        word_starts = np.zeros((n, seq), bool)
        word_starts[:, 1:seq - 1] = bits
        return {"token_ids": token_ids, "num_tokens": counts.astype(np.int32),
                "word_starts": word_starts}


# ----------------------------------------------------------------------------------------------------
# Checking a file before training (pretraining_records.check_records without TensorFlow)
# ----------------------------------------------------------------------------------------------------

def check_file(path, seq_len, max_pred, vocab_size, full_scan=True, batch=4096):
    """Sidecar vs flags (pretraining_records.check_sidecar), record 0, and with `full_scan` every
    record: CRCs, lengths, ids and positions, and the count against the sidecar's num_instances.
    Returns the file's RecordInfo. UsageError naming the file (and the record index)."""
    meta, kind, _ = records.check_sidecar(path, seq_len, max_pred, vocab_size)
    f = RecordFile(path)
    if not len(f):
        raise UsageError(f"{path}: no records")
    decode = Decoder(kind, seq_len, max_pred, vocab_size)
    for first in range(0, len(f) if full_scan else 1, batch):
        indices = range(first, min(first + batch, len(f)) if full_scan else 1)
        decode(f.read(indices), lambda i, first=first: (path, first + i))
    if full_scan and meta is not None and "num_instances" in meta and len(f) != meta["num_instances"]:
        raise UsageError(f"{path}: {len(f)} records, but {records.sidecar_path(path)} says "
                         f"num_instances={meta['num_instances']} (incomplete file?)")
    return records.RecordInfo(kind, ((path, meta),))


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
    epoch, as pretraining_resume.train_dataset_fn orders it (with NumPy's draws)."""

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
    decode = Decoder(kind, seq_len, max_pred, vocab_size)
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
    decode = Decoder(kind, seq_len, max_pred, vocab_size)
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
