"""Pretraining TFRecords: the one owner of their format, from the writer's bytes to the model's tensors.

Record kinds (the sidecar's `kind`; a sidecar without one, or no sidecar, means "static"):
  static: google-research/bert's schema, masks drawn when the file was written (DESIGN.md section 2):
      input_ids, input_mask, segment_ids        int64 [max_seq_length], zero padded
      masked_lm_positions, masked_lm_ids        int64 [max_predictions_per_seq], zero padded
      masked_lm_weights                         float32 [max_predictions_per_seq], 1.0 real / 0.0 pad
      next_sentence_labels                      int64 [1], always 0 (kept for Google's tools)
  unmasked (`create_pretraining_data.py --dynamic_masking`): each instance once, no masks:
      token_ids                                 int64 [n], n <= max_seq_length - 2, no [CLS]/[SEP]
      word_starts                               bytes [ceil(n / 8)], a bit per token: starts a word
  the masks are drawn in tf.data at training time (see "The unmasked kind" below).

Longer than our ~600-line aim (~880) on purpose: each kind's writer, checks, parser and (for the
unmasked kind) masking rule must change together, and the rule is shared by tf.data and the JAX
step; the generic parts already live elsewhere (file_output.py, example_decoder.py, record_reader.py).
  Each kind registers itself in `KINDS` and `PARSERS`; the trainer only ever calls `make_parser`.

Sidecar `<file>.meta.json` (written last, after the records are complete): `READ_KEYS` are what
  readers check; `SETTINGS_KEYS` record how the file was made, so the generator can skip a
  finished output; the generator adds counts of what it wrote and read.

Pieces, in pipeline order:
  writing  `ExampleEncoder` (static records -> serialized tf.train.Example), `frame` (TFRecord
           framing, CRC-32C by the google-crc32c package), `RecordOutputs` (file_output's exclusive,
           atomic outputs, with sidecars). TensorFlow-free, so generator worker processes never import it.
  listing  `record_files`: comma-separated globs; sidecars, temp and lock files never match.
  reading  `check_records` (sidecar vs flags, record shapes and ids, CRCs and count) and
           `make_parser` (serialized records -> the model's tensors). These import TensorFlow.
"""

import dataclasses
import functools
import glob
import json
import os
import struct

import google_crc32c

import file_output
from train_utils import UsageError

FORMAT_VERSION = 1
STATIC = "static"
SIDECAR_SUFFIX = ".meta.json"


@dataclasses.dataclass(frozen=True)
class Feature:
    """One feature of a record kind. length: "seq" (max_seq_length), "pred" (max predictions),
    "body" (1 to max_seq_length - 2 values: an instance without [CLS]/[SEP]) or a number."""
    name: str
    dtype: str  # "int64" | "float32" | "bytes"
    length: object
    token_ids: bool = False  # values must be < vocab_size
    positions: bool = False  # values must be < max_seq_length
    read: bool = True  # parsed for training (Google's next_sentence_labels is only written)


KINDS = {
    STATIC: (
        Feature("input_ids", "int64", "seq", token_ids=True),
        Feature("input_mask", "int64", "seq"),
        Feature("segment_ids", "int64", "seq"),
        Feature("masked_lm_positions", "int64", "pred", positions=True),
        Feature("masked_lm_ids", "int64", "pred", token_ids=True),
        Feature("masked_lm_weights", "float32", "pred"),
        Feature("next_sentence_labels", "int64", 1, read=False),
    ),
}


def feature_length(feature, seq_len, max_pred):
    """The feature's number of values; None for "body" (1 to max_seq_length - 2 values)."""
    return {"seq": seq_len, "pred": max_pred, "body": None}.get(feature.length, feature.length)


def feature_spec(seq_len, max_pred, kind=STATIC):
    """The tf.io.parse_example spec of the features training reads."""
    import tensorflow as tf
    return {f.name: tf.io.FixedLenFeature([feature_length(f, seq_len, max_pred)], getattr(tf, f.dtype))
            for f in _features(kind) if f.read}


def _features(kind, where="records"):
    if kind not in KINDS:
        raise UsageError(f"{where}: unknown record kind {kind!r} (this version reads "
                         f"{', '.join(KINDS)}); written by a newer version?")
    return KINDS[kind]


# ----------------------------------------------------------------------------------------------------
# Sidecar
# ----------------------------------------------------------------------------------------------------

def sidecar_path(path):
    return path + SIDECAR_SUFFIX


# Sidecar keys. Readers check READ_KEYS; SETTINGS_KEYS say how the file was made (the generator
# compares them to skip a finished output on a re-run). The generator also writes counts:
# num_output_shards, total_instances, num_documents, replaced_invalid_utf8_chars, split_long_lines,
# and `vocab_file` (where the vocab was; run_pretraining.py copies it into its run folder when
# vocab_sha256 matches).
READ_KEYS = ("kind", "format_version", "max_seq_length", "max_predictions_per_seq", "vocab_size",
             "num_instances")
SETTINGS_KEYS = ("vocab_sha256", "do_lower_case", "do_whole_word_mask", "masked_lm_prob",
                 "dupe_factor", "short_seq_prob", "random_seed", "segmenter", "jieba_user_dict",
                 "input_format", "input_files",  # input_files: [{"path": absolute, "bytes": size}]
                 "settings_version")
# How the generator turns the settings into records; bumped whenever the same flags give other bytes.
#   1 (no key in the sidecar): packing and masking drew from one random stream per (document, copy).
#   2: each has its own stream, so packing does not depend on the masking settings, and unmasked
#      records no longer draw (and throw away) static masks to keep packing in step.
# Readers take records of every version; a re-run of the generator over older outputs regenerates them.
SETTINGS_VERSION = 2


def settings_version(meta):
    """The generator settings version a sidecar records (1 for sidecars written before the key)."""
    return meta.get("settings_version", 1)


def _gfile():
    import tensorflow as tf
    return tf.io.gfile


def read_sidecar(path):
    """`path`'s sidecar as a dict (with `kind` filled in), or None when there is none."""
    meta_path = sidecar_path(path)
    try:
        if file_output.is_remote(path):
            if not _gfile().exists(meta_path):
                return None
            with _gfile().GFile(meta_path) as f:
                meta = json.load(f)
        else:
            if not os.path.exists(meta_path):
                return None
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
    except (ValueError, OSError) as e:
        raise UsageError(f"{meta_path}: unreadable sidecar ({e}); delete it to read the records "
                         "without it, or regenerate them") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{meta_path}: not a JSON object; delete it or regenerate the records")
    meta.setdefault("kind", STATIC)  # sidecars written before record kinds existed
    return meta


def sidecar_matches(path, settings, **more):
    """True when `path` exists and its sidecar has every key of `settings` and `more` equal."""
    try:
        meta = read_sidecar(path)
    except UsageError:
        return False
    if meta is None:
        return False
    want = dict(settings, **more)
    exists = _gfile().exists(path) if file_output.is_remote(path) else os.path.isfile(path)
    return exists and all(meta.get(k) == v for k, v in want.items())


def sidecar_text(meta):
    """A sidecar's file contents: sorted keys, one per line, so sidecars diff well."""
    return json.dumps(meta, ensure_ascii=False, indent=1, sort_keys=True) + "\n"


# ----------------------------------------------------------------------------------------------------
# Writing: tf.train.Example encoding by hand (cheap, and workers need no TensorFlow) and framing
# ----------------------------------------------------------------------------------------------------

def _varint(n):
    out = bytearray()
    while True:
        bits = n & 0x7F
        n >>= 7
        if n:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(tag, payload):
    """A length-delimited protobuf field: tag byte, varint length, payload."""
    return bytes([tag]) + _varint(len(payload)) + payload


def _feature_entry(name, feature):
    """One entry of Features.feature (map<string, Feature>, field 1)."""
    return _field(0x0A, _field(0x0A, name.encode()) + _field(0x12, feature))


def _int64_feature(packed):
    return _field(0x1A, _field(0x0A, packed))  # Feature.int64_list(3) { value(1) packed }


def _float_feature(packed):
    return _field(0x12, _field(0x0A, packed))  # Feature.float_list(2) { value(1) packed }


def encode_example(features):
    """{name: (dtype "int64"|"float32", values)} -> a serialized tf.train.Example (any values).

    The general, slower encoder (tests, tools); the generator uses `ExampleEncoder`.
    """
    entries = []
    for name, (dtype, values) in features.items():
        if dtype == "float32":
            entries.append(_feature_entry(name, _float_feature(struct.pack(f"<{len(values)}f", *values))))
        else:  # int64 varints are two's complement on 10 bytes for negative values
            entries.append(_feature_entry(name, _int64_feature(b"".join(
                _varint(int(v) & 0xFFFFFFFFFFFFFFFF) for v in values))))
    body = b"".join(entries)
    return b"\x0a" + _varint(len(body)) + body  # Example.features(1)


class ExampleEncoder:
    """Encodes one static instance as a serialized tf.train.Example with Google's features.

    The bytes are assembled from cached pieces: a varint table for ids/positions/lengths, and whole
    feature entries for the parts that depend only on lengths (input_mask, masked_lm_weights) or on
    nothing (segment_ids, next_sentence_labels). tests/ parse the result with tf.data.
    """

    def __init__(self, max_seq_length, max_predictions, vocab_size):
        self.seq, self.preds = max_seq_length, max_predictions
        # Every id, position and protobuf length we can meet is < this bound.
        self.varints = [_varint(i) for i in range(max(vocab_size, 8 * max_seq_length + 64) + 1)]
        self.keys = {name: _field(0x0A, name.encode()) + b"\x12" for name in (
            "input_ids", "masked_lm_ids", "masked_lm_positions")}
        self.mask_entries = [_feature_entry("input_mask", _int64_feature(
            b"\x01" * n + b"\x00" * (max_seq_length - n))) for n in range(max_seq_length + 1)]
        self.weight_entries = [_feature_entry("masked_lm_weights", _float_feature(
            b"\x00\x00\x80\x3f" * k + b"\x00" * 4 * (max_predictions - k))) for k in range(max_predictions + 1)]
        self.segment_entry = _feature_entry("segment_ids", _int64_feature(b"\x00" * max_seq_length))
        self.nsp_entry = _feature_entry("next_sentence_labels", _int64_feature(b"\x00"))

    def _int64_entry(self, key, values, size):
        """Features.feature map entry {key, Feature{int64_list{packed values, zero padded}}}."""
        v = self.varints
        packed = b"".join(map(v.__getitem__, values)) + bytes(size - len(values))
        int64_list = b"\x0a" + v[len(packed)] + packed
        feature = b"\x1a" + v[len(int64_list)] + int64_list
        entry = self.keys[key] + v[len(feature)] + feature
        return b"\x0a" + v[len(entry)] + entry

    def encode(self, input_ids, positions, labels):
        """input_ids: [n <= seq] ids with [CLS]/[SEP]; positions, labels: [k <= preds]. -> bytes."""
        features = b"".join((
            self._int64_entry("input_ids", input_ids, self.seq),
            self.mask_entries[len(input_ids)],
            self._int64_entry("masked_lm_ids", labels, self.preds),
            self._int64_entry("masked_lm_positions", positions, self.preds),
            self.weight_entries[len(positions)],
            self.nsp_entry,
            self.segment_entry,
        ))
        return b"\x0a" + _varint(len(features)) + features  # Example.features(1)


def _masked_crc(data):
    """TFRecord's masked CRC-32C (rotate right by 15, add a constant)."""
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


@functools.lru_cache(maxsize=4096)
def _header(length):
    """`uint64 length | uint32 masked_crc(length)`; few distinct lengths occur, so cached."""
    size = struct.pack("<Q", length)
    return size + _masked_crc(size)


def frame(records):
    """[n] serialized records -> the bytes of a TFRecord file holding them (as tf.io.TFRecordWriter).

    A TFRecord is `uint64 length | uint32 masked_crc(length) | data | uint32 masked_crc(data)`.
    """
    return b"".join(b"".join((_header(len(r)), r, _masked_crc(r))) for r in records)


def write_records(path, serialized, meta):
    """Writes a whole record file and its sidecar (`meta`, `num_instances` added); for small files.

    Returns the sidecar dict. The generator streams through `RecordOutputs` instead.
    """
    serialized = list(serialized)
    meta = {"kind": STATIC, "format_version": FORMAT_VERSION, **meta, "num_instances": len(serialized)}
    with RecordOutputs([path]) as out:
        out.write([frame(serialized)])
        out.commit([meta])
    return meta


# ----------------------------------------------------------------------------------------------------
# Output files: exclusive, atomic, never a record file described by another file's sidecar
# ----------------------------------------------------------------------------------------------------

def shard_paths(output_file, num_shards, flag="--output_file"):
    """`--output_file` (one name or a comma list) and the shard count -> the output paths."""
    names = [s.strip() for s in (output_file or "").split(",") if s.strip()]
    if not names:
        raise UsageError(f"{flag} is required")
    if num_shards > 1:
        if len(names) > 1:
            raise UsageError(f"{flag}: give one name with --num_output_shards, or a comma list")
        names = [f"{names[0]}-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]
    if len(set(names)) != len(names):
        raise UsageError(f"{flag}: a name appears twice in {output_file!r}")
    return names


class RecordOutputs(file_output.LockedOutputs):
    """file_output.LockedOutputs for record files: exclusive, atomic, each with its sidecar.

        with RecordOutputs(paths, inputs=input_paths) as out:
            out.write([bytes for shard 0, bytes for shard 1, ...])   # framed records
            out.commit([sidecar dict of shard 0, ...])                 # all or nothing
    """

    def __init__(self, paths, inputs=(), flag="--output_file"):
        super().__init__(paths, inputs, flag, sidecar_suffix=SIDECAR_SUFFIX)

    def commit(self, metas):
        """Puts every record file and its sidecar (metas[i], a dict) in place."""
        super().commit([sidecar_text(m) for m in metas])


def commit_records(written, metas, fs):
    """Puts record files written under temp names in place, sidecars last, for writers that are not
    `RecordOutputs` (Beam's workers write the shards; its Finalize step commits them).

    written: [(temp name, or None when an earlier attempt already renamed it, output path)].
    metas: the sidecar dicts, one per output. fs: the files' file system, with exists(path),
    remove(path), rename(src, dst) and write(path, bytes). Every old sidecar is removed before
    any records are replaced (a sidecar must never describe other records than its file's).
    """
    for _, path in written:
        if fs.exists(sidecar_path(path)):
            fs.remove(sidecar_path(path))
    for tmp, path in written:
        if tmp is not None:
            fs.rename(tmp, path)
    for (_, path), meta in zip(written, metas):
        fs.write(sidecar_path(path), sidecar_text(meta).encode("utf-8"))


# ----------------------------------------------------------------------------------------------------
# Listing
# ----------------------------------------------------------------------------------------------------

def _is_record_name(path):
    """False for our sidecars, temp and lock files (which a glob like 'records/*' also matches)."""
    name = os.path.basename(path.rstrip("/"))
    return not (name.endswith(SIDECAR_SUFFIX) or file_output.is_temp_or_lock(name))


def record_files(patterns, flag="--input_file"):
    """Comma-separated globs -> record files, sorted per pattern, each once.

    Sidecars (`*.meta.json`), temp and lock files are never matched, so `--input_file='records/*'`
    means the records. A pattern that matches no record file, or names a directory, is a
    UsageError naming `flag`.
    """
    files = []
    for pattern in filter(None, (p.strip() for p in (patterns or "").split(","))):
        if file_output.is_remote(pattern):
            gfile = _gfile()
            matched = sorted(gfile.glob(pattern))
            is_dir = gfile.isdir
        else:
            matched = sorted(glob.glob(os.path.expanduser(pattern)))
            is_dir = os.path.isdir
        records = [p for p in matched if _is_record_name(p)]
        if not records:
            extra = f" (only {len(matched)} sidecar/temp file(s))" if matched else ""
            raise UsageError(f"{flag}: '{pattern}' matches no record file{extra}")
        for path in records:
            if is_dir(path):
                raise UsageError(f"{flag}: {path} is a directory; give its files, e.g. "
                                 f"'{path.rstrip('/')}/*'")
            if path not in files:
                files.append(path)
    if not files:
        raise UsageError(f"{flag} is required")
    return files


# ----------------------------------------------------------------------------------------------------
# Reading: checks before training, and parsing to the model's tensors
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RecordInfo:
    """What readers need to know about a set of record files: their kind and their sidecars."""
    kind: str = STATIC
    metas: tuple = ()  # (path, sidecar dict or None) per file

    @property
    def meta(self):
        """The first sidecar found ({} when none): the generation settings of the set."""
        return next((m for _, m in self.metas if m), {})


def check_sidecar(path, seq_len, max_pred, vocab_size):
    """`path`'s sidecar checked against the flags and the config (TensorFlow-free).

    Returns (sidecar dict or None, kind, the kind's features). Raises UsageError naming the file.
    """
    meta = read_sidecar(path)
    meta_path = sidecar_path(path)
    kind = meta["kind"] if meta else STATIC
    features = _features(kind, path)
    if meta is not None:
        if meta.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise UsageError(f"{path}: format_version {meta['format_version']} (from {meta_path}) is "
                             f"newer than this version reads ({FORMAT_VERSION}); update roberta_zh")
        expected = {"max_seq_length": (seq_len, "--max_seq_length"),
                    "max_predictions_per_seq": (max_pred, "--max_predictions_per_seq"),
                    "vocab_size": (vocab_size, "vocab_size of --bert_config_file")}
        for key, (want, source) in expected.items():
            if key in meta and meta[key] != want:
                raise UsageError(f"{path}: records have {key}={meta[key]} (from {meta_path}) but "
                                 f"{source} is {want}")
        if kind == UNMASKED:
            check_masking_ids(meta, meta_path, vocab_size)
    else:
        from absl import logging
        logging.warning("%s has no %s sidecar; checking its records only", path, SIDECAR_SUFFIX)
    return meta, kind, features


def check_values(path, kind, index, values, seq_len, max_pred, vocab_size, predictions=None):
    """values: {feature name: list of numbers} of record `index` of `path` (TensorFlow-free);
    UsageError naming the file and record on the first problem. `predictions`: how many real
    predictions the file's sidecar allows (`predictions_in_use`); None or max_pred: no such bound."""
    for f in _features(kind, path):
        if not f.read:
            continue
        if f.name not in values:
            raise UsageError(f"{path}: record {index} has no feature '{f.name}' (not "
                             f"{kind} pretraining records?)")
        want, got = feature_length(f, seq_len, max_pred), len(values[f.name])
        if got != want and not (want is None and 1 <= got <= seq_len - 2):
            flag = "--max_predictions_per_seq" if f.length == "pred" else "--max_seq_length"
            raise UsageError(f"{path}: record {index} has {f.name} of length {got}, but {flag} "
                             f"is {want or seq_len}")
        bound = vocab_size if f.token_ids else seq_len if f.positions else None
        if bound is not None and len(values[f.name]):
            low, high = min(values[f.name]), max(values[f.name])
            if high >= bound or low < 0:
                bad = high if high >= bound else low
                what = ("token id", f"vocab_size {vocab_size} of --bert_config_file (records "
                        "made with another vocab?)") if f.token_ids else (
                        "position", f"--max_seq_length {seq_len}")
                raise UsageError(f"{path}: record {index} has {what[0]} {bad} in {f.name} out of "
                                 f"range [0, {what[1]})")
    weights = values.get("masked_lm_weights", ())
    if predictions is not None and predictions < max_pred and any(weights[predictions:]):
        raise UsageError(f"{path}: record {index} has {sum(w != 0 for w in weights)} predictions, "
                         f"more than the {predictions} its sidecar's masked_lm_prob allows at "
                         f"--max_seq_length={seq_len}; regenerate the records or remove the sidecar")


def check_records(path, seq_len, max_pred, vocab_size, full_scan=True):
    """Checks one record file against the flags and the config before any training step.

    Compares its sidecar (kind, sequence length, predictions, vocab size), checks the feature
    lengths and id range of record 0, and with `full_scan` reads every record: TFRecord CRCs catch
    corruption and truncation, every record's lengths, ids and positions are checked (files
    without a sidecar, e.g. from Google's script, have nothing else vouching for them), and the
    count must equal the sidecar's `num_instances`.
    Returns the file's RecordInfo. Raises UsageError naming the file (and the record index).
    (record_reader.check_file does the same without TensorFlow.)
    """
    import tensorflow as tf

    meta, kind, features = check_sidecar(path, seq_len, max_pred, vocab_size)
    meta_path = sidecar_path(path)
    info = RecordInfo(kind, ((path, meta),))
    # The parsers hand the model only the slots the sidecar's masked_lm_prob can fill.
    predictions = predictions_in_use(info, seq_len, max_pred)

    def check_values_(index, values):
        check_values(path, kind, index, values, seq_len, max_pred, vocab_size, predictions)

    def values_of(raw, index):
        try:
            example = tf.train.Example.FromString(raw)
        except Exception as e:  # noqa: BLE001 -- protobuf's DecodeError: framing fine, no Example
            raise UsageError(f"{path}: record {index} is not a tf.train.Example ({e})") from None
        feats = example.features.feature
        return {name: list(getattr(feats[name], feats[name].WhichOneof("kind") or "int64_list").value)
                for name in feats}

    try:
        first = next(iter(tf.data.TFRecordDataset(path).take(1)), None)
        if first is None:
            raise UsageError(f"{path}: no records")
        check_values_(0, values_of(first.numpy(), 0))
        if full_scan:
            count = _scan_every_record(path, seq_len, max_pred, vocab_size, features, check_values_,
                                       values_of, predictions)
            if meta is not None and "num_instances" in meta and count != meta["num_instances"]:
                raise UsageError(f"{path}: {count} records, but {meta_path} says "
                                 f"num_instances={meta['num_instances']} (incomplete file?)")
    except tf.errors.DataLossError as e:
        raise UsageError(f"{path}: corrupt or truncated TFRecord file ({_op_message(e)})") from None
    except tf.errors.OpError as e:
        raise UsageError(f"{path}: unreadable ({_op_message(e)})") from None
    return info


def _op_message(error):
    """A TensorFlow op error's own words, without the function-node and op names around them."""
    import re
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", error.message)
    return re.sub(r"\s*\[Op:[^\]]*\].*$", "", text, flags=re.S).strip()


def _scan_every_record(path, seq_len, max_pred, vocab_size, features, check_values, values_of,
                       predictions):
    """Reads every record (CRCs), checks lengths, ids and positions (and that no real prediction
    lies past the first `predictions` slots) in batches with tf.data, and returns the count.
    A batch with a problem is re-read record by record to name the record.

    Parsing in batches is faster than counting records one by one with Dataset.reduce (0.4-1.9 s
    vs 4.3-6.6 s for 117k records of length 128, 89 MB, on the shared development machine), so
    every full scan checks the ids.
    """
    import tensorflow as tf

    batch = 4096
    checked = [f for f in features if f.read and (f.token_ids or f.positions)]
    spec = {f.name: tf.io.RaggedFeature(tf.int64) if feature_length(f, seq_len, max_pred) is None
            else tf.io.FixedLenFeature([feature_length(f, seq_len, max_pred)], tf.int64)
            for f in checked}
    if predictions < max_pred:
        spec["masked_lm_weights"] = tf.io.FixedLenFeature([max_pred], tf.float32)

    def scan(serialized):
        parsed = tf.io.parse_example(serialized, spec)
        bad = tf.constant(False)
        for f in checked:
            v = parsed[f.name]
            if isinstance(v, tf.RaggedTensor):  # "body" length: 1 to seq_len - 2 values
                lengths = v.row_lengths()
                bad |= tf.reduce_any((lengths < 1) | (lengths > seq_len - 2))
                v = v.flat_values
            bad |= tf.reduce_any((v < 0) | (v >= (vocab_size if f.token_ids else seq_len)))
        if predictions < max_pred:
            bad |= tf.reduce_any(parsed["masked_lm_weights"][:, predictions:] != 0)
        return bad, tf.size(serialized)

    records = tf.data.TFRecordDataset(path, buffer_size=1 << 20)
    batches = iter(records.batch(batch).map(scan, num_parallel_calls=tf.data.AUTOTUNE))
    count = 0
    while True:
        try:
            bad, n = next(batches)
        except StopIteration:
            return count
        except tf.errors.InvalidArgumentError:  # a record of another shape: find which
            bad, n = True, batch
        if bad:
            for j, raw in enumerate(records.skip(count).take(batch)):
                check_values(count + j, values_of(raw.numpy(), count + j))
        count += int(n)


def pipeline_files(files, counts, num_pipelines, pipeline_id):
    """One input pipeline's (worker's/host's) share -> (files, shard_records, records per epoch).

    Whole files per pipeline when there are enough files, else every pipeline reads all files and
    keeps every num_pipelines-th record. (The rule of both readers: pretraining_input's tf.data
    pipeline and record_reader's.)
    """
    if num_pipelines > 1 and len(files) >= num_pipelines:
        mine = range(pipeline_id, len(files), num_pipelines)
        return [files[i] for i in mine], False, sum(counts[i] for i in mine)
    return list(files), num_pipelines > 1, len(range(pipeline_id, sum(counts), num_pipelines))


def combine(infos, flag="--input_file"):
    """One RecordInfo for files read together; UsageError when their kinds differ."""
    infos = list(infos)
    kinds = {i.kind for i in infos}
    if len(kinds) > 1:
        first = {}
        for info in infos:
            first.setdefault(info.kind, info.metas[0][0])
        raise UsageError(f"{flag}: records of different kinds ({', '.join(f'{k}: {p}' for k, p in first.items())}) "
                         "cannot be read together")
    return RecordInfo(kinds.pop() if kinds else STATIC, tuple(m for i in infos for m in i.metas))


def read_info(files, flag="--input_file"):
    """The RecordInfo of files read together, from their sidecars alone (cheap; no record is read)."""
    infos = []
    for path in files:
        meta = read_sidecar(path)
        infos.append(RecordInfo(meta["kind"] if meta else STATIC, ((path, meta),)))
    return combine(infos, flag)


def predictions_in_use(info, seq_len, max_pred):
    """How many of the [P] prediction slots of static records can hold a real prediction: our
    generators mask at most mask_budget(n) <= mask_budget(max_seq_length - 2) tokens (13 of 20 at
    seq 128 and masked_lm_prob 0.1), so the rest are padding the MLM head need not compute. P when
    any file lacks a sidecar with masked_lm_prob (Google's records), and for unmasked records
    (their masks are drawn while training, by a rule that may use all P slots), and without an
    info (nothing known about the files)."""
    if info is None:
        return max_pred
    probs = [m.get("masked_lm_prob") if m else None for _, m in info.metas]
    if info.kind != STATIC or not probs or None in probs:
        return max_pred
    return int(max(mask_budget(seq_len - 2, p, max_pred)[-1] for p in probs))


def _static_parser(info, seq_len, max_pred, **options):
    """Static records: the features as stored, ids cast to int32, the predictions cut to the slots
    in use (`predictions_in_use`); a record with a real prediction past them fails loudly."""
    import tensorflow as tf
    spec = feature_spec(seq_len, max_pred, STATIC)
    width = predictions_in_use(info, seq_len, max_pred)
    files = ", ".join(p for p, _ in info.metas) if info is not None else "the records"

    def parse(position, serialized):
        del position  # the masks were drawn when the file was written
        if serialized.shape.rank == 0:
            features = tf.io.parse_single_example(serialized, spec)
        else:
            features = tf.io.parse_example(serialized, spec)
        features = {k: v if v.dtype == tf.float32 else tf.cast(v, tf.int32) for k, v in features.items()}
        if width < max_pred:
            unused = features["masked_lm_weights"][..., width:]
            check = tf.debugging.assert_equal(
                tf.reduce_max(unused), 0.0,
                message=f"{files}: a record has more than {width} predictions, more than its sidecar's "
                        "masked_lm_prob allows; regenerate the records or remove the sidecar")
            with tf.control_dependencies([check]):
                for key in ("masked_lm_positions", "masked_lm_ids", "masked_lm_weights"):
                    features[key] = tf.identity(features[key][..., :width])
        return features

    return parse


PARSERS = {STATIC: _static_parser}


def make_parser(info, seq_len, max_pred, **options):
    """A function (position, serialized) -> the model's tensors, for records of `info.kind`.

    serialized: string [] or [B]; position: int64 of the same shape, each record's index in the
    training stream (kinds that draw masks at training time key their random ops by it; static
    records ignore it). Returns {input_ids, input_mask, segment_ids, masked_lm_positions,
    masked_lm_ids: int32 [(B,) S or P]; masked_lm_weights: float32 [(B,) P]}; for
    static records P may be fewer than max_pred slots (`predictions_in_use`). `options` are
    kind-specific settings (e.g. masking settings for records masked at training time).
    """
    kind = info.kind if info is not None else STATIC
    _features(kind)
    return PARSERS[kind](info, seq_len, max_pred, **options)


# ----------------------------------------------------------------------------------------------------
# The unmasked kind: token ids + jieba word starts, masks drawn in tf.data (DESIGN.md 3, rule 10)
# ----------------------------------------------------------------------------------------------------
#
# Record: token_ids  int64 [n], the body of the instance (no [CLS]/[SEP]), 1 <= n <= max_seq_length - 2
#         word_starts bytes [ceil(n / 8)], bit i % 8 of byte i // 8 is 1 where token i starts a
#                     jieba word (its masking group); bit 0 is always 1
# Sidecar, besides SETTINGS_KEYS: cls_id, sep_id, mask_id, and ordinary_ids, the ids random
# replacements are drawn from ("104-8117,8119-8128,...": not special, not [unused*], not ##), so
# training needs no vocab file.
#
# Masking, per sequence, in keras.ops (one code for tf.data and for the jitted JAX step) with static
# shapes ([S] = max_seq_length, [P] = max_predictions_per_seq), keyed by (seed, position): stateless
# random draws (TensorFlow's in tf.data, JAX's on the device: same rule, other numbers).
#   budget k = min(P, max(1, round(n * masked_lm_prob)))
#   The words are put in a random order and laid end to end on a circle of n token slots; a window of
#   k slots starting at a random offset picks every word whose first token falls inside it. Each word
#   is then chosen with probability k / n whatever its length, and k tokens are chosen on average.
#   When the window lies inside one long word (k small), it reaches on to the next word start, so
#   at least one word is chosen; which word that is does not depend on its own length either.
#   (Google's rule, used by the static generator, takes whole words "while they fit", which passes
#   over long words: at seq 128 / 20 predictions a 6+-token word is masked at a third of the rate of
#   a 1-token word.) A chosen word that would end past P slots is dropped, so at most P are chosen.
#   One decision per word: 80% [MASK], 10% kept, 10% random ordinary tokens. Labels: original ids.

UNMASKED = "unmasked"
# One decision per chosen word, from a uniform draw u: u < MASK_BELOW -> [MASK], u >= RANDOM_FROM ->
# a random ordinary id, else kept (80/10/10). Shared with the JAX masking (jax_masking.py).
MASK_BELOW, RANDOM_FROM = 0.8, 0.9
# Evaluation masks use this key instead of --seed: one fixed mask per sequence for every run.
EVAL_MASK_SEED = -1

KINDS[UNMASKED] = (
    Feature("token_ids", "int64", "body", token_ids=True),
    Feature("word_starts", "bytes", 1),
)


def ordinary_id_ranges(ids):
    """Sorted ids -> "a-b,c,d-e" (inclusive ranges): the random-replacement pool in the sidecar."""
    ranges = []
    for i in sorted(ids):
        if ranges and ranges[-1][1] == i - 1:
            ranges[-1][1] = i
        else:
            ranges.append([i, i])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in ranges)


def _parse_id_ranges(text, where):
    try:
        ids = []
        for part in text.split(","):
            a, _, b = part.partition("-")
            ids.extend(range(int(a), int(b or a) + 1))
    except (ValueError, AttributeError):
        raise UsageError(f"{where}: ordinary_ids {str(text)[:40]!r} is not a list of id ranges") from None
    if not ids:
        raise UsageError(f"{where}: ordinary_ids is empty")
    return ids


def check_masking_ids(meta, where, vocab_size):
    """The ids training masks with ([CLS], [SEP], [MASK], the replacement pool) must be < vocab_size
    of the model: a sidecar from another vocab would fail deep in the first training step."""
    missing = [k for k in ("cls_id", "sep_id", "mask_id", "ordinary_ids") if k not in meta]
    if missing:
        raise UsageError(f"{where}: sidecar lacks {', '.join(missing)} (needed to mask unmasked "
                         "records); regenerate the records")
    for key in ("cls_id", "sep_id", "mask_id"):
        if not isinstance(meta[key], int) or not 0 <= meta[key] < vocab_size:
            raise UsageError(f"{where}: {key}={meta[key]!r} is not a token id of the model (vocab_size "
                             f"{vocab_size} of --bert_config_file); records made with another vocab? "
                             "regenerate them with the model's vocab")
    pool = _parse_id_ranges(meta["ordinary_ids"], where)
    if min(pool) < 0 or max(pool) >= vocab_size:
        bad = max(pool) if max(pool) >= vocab_size else min(pool)
        raise UsageError(f"{where}: ordinary_ids holds id {bad}, outside the model's vocab_size {vocab_size} "
                         "(of --bert_config_file); records made with another vocab? regenerate them "
                         "with the model's vocab")


def _bytes_feature(payload):
    return _field(0x0A, _field(0x0A, payload))  # Feature.bytes_list(1) { value(1) payload }


class UnmaskedEncoder:
    """Encodes one instance as an unmasked record {token_ids, word_starts} (see above)."""

    def __init__(self, vocab_size):
        self.varints = [_varint(i) for i in range(vocab_size)]

    def encode(self, ids, word_starts):
        """ids: [n] body token ids; word_starts: [w] ascending indices into ids, 0 first. -> bytes."""
        import numpy as np
        bits = np.zeros(len(ids), np.uint8)
        bits[word_starts] = 1
        packed = b"".join(map(self.varints.__getitem__, ids))
        body = (_feature_entry("token_ids", _int64_feature(packed)) +
                _feature_entry("word_starts", _bytes_feature(np.packbits(bits, bitorder="little").tobytes())))
        return b"\x0a" + _varint(len(body)) + body  # Example.features(1)


def ordinary_ids(vocab):
    """Ids random replacements may use: not [PAD]/[CLS]/[SEP]/[MASK]/[UNK]/[unused*], not ## pieces."""
    return [i for t, i in vocab.items()
            if t and not (t.startswith("[") and t.endswith("]")) and not t.startswith("##")]


def unmasked_sidecar_keys(vocab):
    """The sidecar keys training needs to mask unmasked records without the vocab file."""
    return {"cls_id": vocab["[CLS]"], "sep_id": vocab["[SEP]"], "mask_id": vocab["[MASK]"],
            "ordinary_ids": ordinary_id_ranges(ordinary_ids(vocab))}


def mask_budget(seq_len, masked_lm_prob, max_pred):
    """Masked tokens aimed at per sequence of n body tokens -> int32 [seq_len + 1], indexed by n:
    min(max_pred, max(1, round(n * masked_lm_prob))), rounded half to even in float64."""
    import numpy as np
    n = np.arange(seq_len + 1, dtype=np.float64)
    return np.minimum(max_pred, np.maximum(1, np.round(n * masked_lm_prob))).astype(np.int32)


def _stable_argsort(x):
    """Argsort along axis 1, ties in index order (keras.ops.argsort is not stable on TensorFlow)."""
    import keras
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        return tf.argsort(x, axis=1, stable=True)
    return keras.ops.argsort(x, axis=1)  # jax.numpy's argsort is stable


def mask_whole_words(ids, num_tokens, word_start, uniform, *, max_pred, masked_lm_prob, pool,
                     cls_id, sep_id, mask_id):
    """Dynamic whole-word masking of a batch; keras.ops only, static shapes: the one rule, run by
    tf.data on the TensorFlow backend (below) and inside the jitted step on JAX (jax_masking.py).

    Args:
      ids: int32 [B, S], the body tokens at positions 1..n (anything elsewhere).
      num_tokens: int32 [B], n per sequence (1 <= n <= S - 2).
      word_start: bool [B, S], True at positions 1..n where a word starts.
      uniform: float32 [B, 3 * S + 1] in [0, 1): word order, per-word decision, replacement token,
        window offset.
      pool: int32 [V_ordinary], ids for random replacements.
    Returns:
      the model's tensors: input_ids, input_mask, segment_ids int32 [B, S]; masked_lm_positions,
      masked_lm_ids int32 [B, P]; masked_lm_weights float32 [B, P].
    """
    from keras import ops
    seq = ids.shape[1]
    order_keys, decision, replacement = (uniform[:, i * seq:(i + 1) * seq] for i in range(3))
    pos = ops.arange(seq, dtype="int32")[None, :]                                       # [1, S]
    n = ops.cast(num_tokens, "int32")[:, None]                                          # [B, 1]
    body = (pos >= 1) & (pos <= n)                                                      # [B, S]
    word_start = (word_start & body) | (pos == 1)  # the first token always starts a word
    # word[b, t]: index of the word holding token t (words are numbered 0.. in text order).
    word = ops.cumsum(ops.cast(word_start, "int32"), axis=1) - 1                        # [B, S]
    num_words = word[:, -1:] + 1                                                        # [B, 1]
    word = ops.where(body, word, seq - 1)  # [CLS]/[SEP]/padding: a slot no word of <= S-2 tokens uses
    is_word = pos < num_words                                                           # [B, W=S]
    # Word lengths: from each word's first token to the next word's (or past the body's end).
    first = ops.sort(ops.where(word_start, pos, 2 * seq), axis=1)                       # [B, W]
    following = ops.concatenate([first[:, 1:], ops.full_like(first[:, :1], 2 * seq)], axis=1)
    length = ops.where(is_word, ops.minimum(following, n + 1) - first, 0)               # [B, W]
    # Random order of the words; first slot of each word when laid end to end in that order.
    order = _stable_argsort(ops.where(is_word, order_keys, 2.0))                        # [B, W]
    sorted_length = ops.take_along_axis(length, order, axis=1)
    slot_sorted = ops.cumsum(sorted_length, axis=1) - sorted_length                     # exclusive
    slot = ops.take_along_axis(slot_sorted, ops.argsort(order, axis=1), axis=1)         # [B, W]
    budget = ops.take(mask_budget(seq, masked_lm_prob, max_pred), n)                    # [B, 1]
    offset = ops.minimum(ops.cast(uniform[:, -1:] * ops.cast(n, "float32"), "int32"), n - 1)
    slot = ops.where(is_word, ops.mod(slot - offset, ops.maximum(n, 1)), seq)  # window starts at 0
    # A window inside one long word would choose nothing: it then reaches to the next word's start.
    window = ops.maximum(budget, ops.min(slot, axis=1, keepdims=True) + 1)              # [B, 1]
    chosen = ops.cast((slot < window) & (slot + length <= max_pred), "int32")           # [B, W]
    token_chosen = (ops.take_along_axis(chosen, word, axis=1) > 0) & body               # [B, S]
    token_decision = ops.take_along_axis(decision, word, axis=1)                        # [B, S]
    pool_size = pool.shape[0]
    random_ids = ops.take(pool, ops.minimum(ops.cast(replacement * pool_size, "int32"), pool_size - 1))
    original = ops.where(pos == 0, cls_id, ops.where(pos == n + 1, sep_id, ops.where(body, ids, 0)))
    input_ids = ops.where(token_chosen & (token_decision < MASK_BELOW), mask_id,
                          ops.where(token_chosen & (token_decision >= RANDOM_FROM), random_ids, original))
    # Chosen positions in ascending order, zero padded: the P smallest of (pos if chosen else S + pos).
    smallest = ops.sort(ops.where(token_chosen, pos, seq + pos), axis=1)[:, :max_pred]  # [B, P]
    count = ops.sum(ops.cast(token_chosen, "int32"), axis=1, keepdims=True)             # [B, 1]
    real = ops.arange(max_pred, dtype="int32")[None, :] < count                         # [B, P]
    positions = ops.where(real, smallest, 0)
    return {
        "input_ids": ops.cast(input_ids, "int32"),
        "input_mask": ops.cast(pos <= n + 1, "int32"),
        "segment_ids": ops.zeros_like(ops.cast(input_ids, "int32")),
        "masked_lm_positions": ops.cast(positions, "int32"),
        "masked_lm_ids": ops.cast(ops.where(real, ops.take_along_axis(original, positions, axis=1), 0), "int32"),
        "masked_lm_weights": ops.cast(real, "float32"),
    }


def masking_settings(info, masked_lm_prob):
    """The masking settings of unmasked records from their sidecar, checked (TensorFlow-free):
    {"pool": int32 [V_ordinary] replacement ids, "cls_id", "sep_id", "mask_id"}."""
    import numpy as np
    meta = info.meta
    where = next((sidecar_path(p) for p, m in info.metas if m), "unmasked records")
    missing = [k for k in ("cls_id", "sep_id", "mask_id", "ordinary_ids") if k not in meta]
    if missing:
        raise UsageError(f"{where}: sidecar lacks {', '.join(missing)} (needed to mask unmasked "
                         "records); regenerate the records")
    if not 0.0 < masked_lm_prob <= 1.0:
        raise UsageError(f"--masked_lm_prob={masked_lm_prob} must be in (0, 1]")
    return {"pool": np.array(_parse_id_ranges(meta["ordinary_ids"], where), np.int32),
            "cls_id": meta["cls_id"], "sep_id": meta["sep_id"], "mask_id": meta["mask_id"]}


def _unmasked_parser(info, seq_len, max_pred, *, seed=0, masked_lm_prob=0.10, training=True,
                     **unused):
    """Unmasked records -> the model's tensors, masks drawn from (seed, position).

    training=False (evaluation) keys the masks by EVAL_MASK_SEED instead of `seed`, so every run
    evaluates on the same masks.
    """
    import tensorflow as tf
    meta = info.meta
    pool = tf.constant(masking_settings(info, masked_lm_prob)["pool"])
    key = tf.constant(seed if training else EVAL_MASK_SEED, tf.int64)
    spec = {"token_ids": tf.io.RaggedFeature(tf.int64, row_splits_dtype=tf.int32),
            "word_starts": tf.io.FixedLenFeature([], tf.string)}
    body_len, bitmap_len = seq_len - 2, (seq_len - 2 + 7) // 8

    def draw(position):  # [] int64 -> [3S + 1] uniform, a function of (key, position) only
        return tf.random.stateless_uniform([3 * seq_len + 1], seed=tf.stack([key, position]))

    def parse(position, serialized):
        single = serialized.shape.rank == 0
        if single:
            position, serialized = position[None], serialized[None]
        features = tf.io.parse_example(serialized, spec)
        tokens = features["token_ids"]                                                # [B, (n)]
        num_tokens = tf.minimum(tf.cast(tokens.row_lengths(), tf.int32), body_len)
        ids = tf.pad(tf.cast(tokens.to_tensor(shape=[None, body_len]), tf.int32), [[0, 0], [1, 1]])
        bytes_ = tf.cast(tf.io.decode_raw(features["word_starts"], tf.uint8, fixed_length=bitmap_len),
                         tf.int32)                                                    # [B, S/8]
        bits = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bytes_[:, :, None], tf.range(8)), 1)
        bits = tf.reshape(bits, [-1, 8 * bitmap_len])[:, :body_len]
        word_start = tf.pad(tf.cast(bits, tf.bool), [[0, 0], [1, 1]])                 # [B, S]
        uniform = tf.map_fn(draw, tf.cast(position, tf.int64),
                            fn_output_signature=tf.TensorSpec([3 * seq_len + 1], tf.float32))
        out = mask_whole_words(ids, num_tokens, word_start, uniform, max_pred=max_pred,
                               masked_lm_prob=masked_lm_prob, pool=pool, cls_id=meta["cls_id"],
                               sep_id=meta["sep_id"], mask_id=meta["mask_id"])
        return {k: v[0] for k, v in out.items()} if single else out

    return parse


PARSERS[UNMASKED] = _unmasked_parser
