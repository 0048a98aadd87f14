"""tf.train.Example bytes of pretraining records -> NumPy arrays, without protobuf or TensorFlow.

record_reader.py's decoder (its files and streams hand it the records). The record kinds and their
features are pretraining_records.py's; this module only reads the protobuf wire format:
  fast path   `_walk_batch`: all records of a batch at once, vectorised over records, for the
              layout protobuf writers produce (ours and tf.train.Example's: one `features` field,
              map entries key then value, int64/float lists packed, one bytes value);
  general     `_walk`: one record at a time, any legal layout (unpacked lists, other field order),
              for the records the fast path does not read;
  payloads    every feature's value bytes of the whole batch decoded at once (varints by byte
              rank, floats by view, bytes by gather).
A record that is not a tf.train.Example of the kind, or whose lengths, ids or positions are wrong,
is a UsageError naming the file and record, in pretraining_records.check_values' words.
"""

import numpy as np

import pretraining_records as records
from train_utils import UsageError


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

    def __init__(self, kind, seq_len, max_pred, vocab_size=None, predictions=None):
        self.kind, self.seq, self.pred, self.vocab_size = kind, seq_len, max_pred, vocab_size
        # Static records: only the first `predictions` slots (pretraining_records.predictions_in_use)
        # are handed over, as tf.data does; a record with a real prediction past them is an error.
        self.predictions = max_pred if predictions is None else min(predictions, max_pred)
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
                             self.vocab_size if self.vocab_size is not None else 1 << 62,
                             self.predictions)
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
            if self.predictions < pred:
                rows = np.flatnonzero(batch["masked_lm_weights"][:, self.predictions:].any(axis=1))
                if len(rows):
                    self._explain(raws, where, int(rows[0]))
                for key in ("masked_lm_positions", "masked_lm_ids", "masked_lm_weights"):
                    batch[key] = np.ascontiguousarray(batch[key][:, :self.predictions])
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
