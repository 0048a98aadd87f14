"""record_reader: pretraining records read without TensorFlow, and the resumable stream of the JAX path.

Records are made by the real generator (create_pretraining_data.py) from the embedded corpus; the
reference values come from tf.data parsing the same files.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO_ROOT, RESOURCES
from helpers import generate_demo_records

import pretraining_records as records
import record_reader as rr
from train_utils import UsageError

VOCAB = str(RESOURCES / "vocab.txt")
CORPUS = ",".join(sorted(str(p) for p in (RESOURCES / "corpus").glob("*.txt")))
SEQ, PRED = 64, 10


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    static = generate_demo_records(root / "static.tfrecord")
    unmasked = generate_demo_records(root / "unmasked.tfrecord", dynamic_masking=True)
    with open(static + records.SIDECAR_SUFFIX, encoding="utf-8") as f:
        vocab_size = json.load(f)["vocab_size"]
    return {"root": root, "static": static, "unmasked": unmasked, "vocab_size": vocab_size}


def _read_all(path, vocab_size):
    f = rr.RecordFile(path)
    info = records.read_info([path])
    return rr.Decoder(info.kind, SEQ, PRED, vocab_size, records.predictions_in_use(info, SEQ, PRED))(
        f.read(range(len(f))), lambda i: (path, i))


def test_static_records_decode_to_what_tf_data_parses(data):
    import tensorflow as tf
    ours = _read_all(data["static"], data["vocab_size"])
    parse = records.make_parser(records.read_info([data["static"]]), SEQ, PRED)
    raw = list(tf.data.TFRecordDataset(data["static"]).as_numpy_iterator())
    theirs = parse(tf.zeros(len(raw), tf.int64), tf.constant(raw))
    assert set(ours) == set(theirs)
    # Both hand over only the prediction slots the generator can fill.
    width = theirs["masked_lm_weights"].shape[1]
    assert width == records.predictions_in_use(records.read_info([data["static"]]), SEQ, PRED) < PRED
    for k, v in theirs.items():
        assert ours[k].dtype == v.numpy().dtype, k
        np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)
    assert len(raw) == rr.count_records(data["static"]) > 100


def test_unmasked_records_decode_to_what_tf_data_parses(data):
    import tensorflow as tf
    ours = _read_all(data["unmasked"], data["vocab_size"])
    for i, raw in enumerate(tf.data.TFRecordDataset(data["unmasked"]).as_numpy_iterator()):
        feats = tf.train.Example.FromString(raw).features.feature
        ids = list(feats["token_ids"].int64_list.value)
        bits = np.unpackbits(np.frombuffer(feats["word_starts"].bytes_list.value[0], np.uint8),
                             bitorder="little")[:len(ids)]
        assert ours["num_tokens"][i] == len(ids)
        np.testing.assert_array_equal(ours["token_ids"][i], [0, *ids, *[0] * (SEQ - 1 - len(ids))])
        np.testing.assert_array_equal(np.flatnonzero(ours["word_starts"][i]), 1 + np.flatnonzero(bits))


def _static_values(n):
    return {"input_ids": ("int64", [101, *range(200, 200 + n), 102] + [0] * (SEQ - n - 2)),
            "input_mask": ("int64", [1] * (n + 2) + [0] * (SEQ - n - 2)),
            "segment_ids": ("int64", [0] * SEQ),
            "masked_lm_positions": ("int64", [1, 2] + [0] * (PRED - 2)),
            "masked_lm_ids": ("int64", [200, 201] + [0] * (PRED - 2)),
            "masked_lm_weights": ("float32", [1.0, 1.0] + [0.0] * (PRED - 2)),
            "next_sentence_labels": ("int64", [0])}


def _unpacked_example(features):
    """A tf.train.Example whose int64 and float lists are NOT packed (one field per value), and whose
    feature map entries come in reverse order: legal protobuf our writer never produces."""
    entries = []
    for name, (dtype, values) in reversed(features.items()):
        if dtype == "float32":
            body = b"".join(b"\x0d" + np.float32(v).tobytes() for v in values)
            feature = records._field(0x12, body)
        else:
            body = b"".join(b"\x08" + records._varint(int(v) & 0xFFFFFFFFFFFFFFFF) for v in values)
            feature = records._field(0x1A, body)
        entries.append(records._field(0x0A, records._field(0x0A, name.encode()) + records._field(0x12, feature)))
    body = b"".join(entries)
    return b"\x0a" + records._varint(len(body)) + body


def test_packed_and_unpacked_lists_decode_alike_and_as_protobuf_reads_them(tmp_path):
    import tensorflow as tf
    packed = records.encode_example(_static_values(5))
    unpacked = _unpacked_example(_static_values(7))
    path = str(tmp_path / "mixed.tfrecord")
    records.write_records(path, [packed, unpacked, packed],
                          {"max_seq_length": SEQ, "max_predictions_per_seq": PRED, "vocab_size": 300})
    ours = _read_all(path, 300)
    for i, raw in enumerate([packed, unpacked, packed]):
        feats = tf.train.Example.FromString(raw).features.feature
        np.testing.assert_array_equal(ours["input_ids"][i], feats["input_ids"].int64_list.value)
        np.testing.assert_array_equal(ours["masked_lm_weights"][i], feats["masked_lm_weights"].float_list.value)
    assert rr.check_file(path, SEQ, PRED, 300).kind == records.STATIC


def _both_checks_fail_alike(path):
    """-> the one-line error of record_reader.check_file, asserted equal to check_records'."""
    with pytest.raises(UsageError) as ours:
        rr.check_file(path, SEQ, PRED, 300)
    with pytest.raises(UsageError) as theirs:
        records.check_records(path, SEQ, PRED, 300)
    assert str(ours.value) == str(theirs.value)
    return str(ours.value)


def test_negative_ids_are_decoded_and_rejected_like_check_records(tmp_path):
    values = _static_values(5)
    values["masked_lm_ids"] = ("int64", [-3] + [0] * (PRED - 1))
    path = str(tmp_path / "neg.tfrecord")
    records.write_records(path, [records.encode_example(_static_values(5))] * 3 + [records.encode_example(values)],
                          {"max_seq_length": SEQ, "max_predictions_per_seq": PRED, "vocab_size": 300})
    assert "record 3 has token id -3 in masked_lm_ids" in _both_checks_fail_alike(path)


def test_static_slots_are_cut_to_what_the_sidecar_allows_and_a_lying_sidecar_is_named(tmp_path):
    """As tf.data: only the slots masked_lm_prob can fill; more real predictions: check_records' error."""
    meta = {"max_seq_length": SEQ, "max_predictions_per_seq": PRED, "vocab_size": 300}
    honest, lying = str(tmp_path / "honest.tfrecord"), str(tmp_path / "lying.tfrecord")
    records.write_records(honest, [records.encode_example(_static_values(5))] * 4,
                          {**meta, "masked_lm_prob": 0.05})  # round(62 * 0.05) = 3 slots
    records.write_records(lying, [records.encode_example(_static_values(5))] * 4,
                          {**meta, "masked_lm_prob": 0.01})  # round(0.62) -> 1 slot, 2 real
    batch = next(rr.eval_batches([honest], [4], 4, 1, records.read_info([honest]), seq_len=SEQ,
                                 max_pred=PRED))
    assert batch["masked_lm_weights"].tolist() == [[1.0, 1.0, 0.0]] * 4
    assert ("record 0 has 2 predictions, more than the 1 its sidecar's masked_lm_prob allows"
            in _both_checks_fail_alike(lying))


@pytest.mark.parametrize("field,value", [("input_ids", ("int64", [1] * (SEQ - 1))),
                                         ("masked_lm_positions", ("int64", [SEQ] + [0] * (PRED - 1)))])
def test_a_bad_record_is_one_line_naming_file_and_index_as_check_records_says(tmp_path, field, value):
    bad = _static_values(5)
    bad[field] = value
    path = str(tmp_path / "bad.tfrecord")
    records.write_records(path, [records.encode_example(_static_values(5))] * 6 + [records.encode_example(bad)],
                          {"max_seq_length": SEQ, "max_predictions_per_seq": PRED, "vocab_size": 300})
    with pytest.raises(UsageError) as ours:
        rr.check_file(path, SEQ, PRED, 300)
    with pytest.raises(UsageError) as theirs:
        records.check_records(path, SEQ, PRED, 300)
    assert str(ours.value) == str(theirs.value)
    assert f"{path}: record 6 " in str(ours.value) and "\n" not in str(ours.value)
    # ... and the stream says the same when it meets it
    with pytest.raises(UsageError, match="record 6 "):
        for _ in rr.train_batches([path], [7], 7, 0, 1, 0, records.read_info([path]), seq_len=SEQ,
                                  max_pred=PRED, vocab_size=300, prefetch=0):
            pass


def _copy_with(src, dst, edit):
    data = bytearray(open(src, "rb").read())
    data = edit(data)
    with open(dst, "wb") as f:
        f.write(data)
    return str(dst)


@pytest.mark.parametrize("how,message", [
    ("data_crc", "record 3: data CRC mismatch"),
    ("length_crc", "record 3: length CRC mismatch"),
    ("truncated", "record {last}: truncated"),  # the file's last record
])
def test_corrupt_or_truncated_files_are_one_line_errors(data, tmp_path, how, message):
    f = rr.RecordFile(data["static"])
    start = int(f.starts[3])

    def edit(b):
        if how == "data_crc":
            b[start + 5] ^= 0x10
        elif how == "length_crc":
            b[start - 4] ^= 0x01
        else:
            del b[-10:]
        return b

    path = _copy_with(data["static"], tmp_path / "bad.tfrecord", edit)
    with pytest.raises(UsageError) as e:
        stream = rr.train_batches([path], [len(f)], 16, 0, 1, 0, None, seq_len=SEQ, max_pred=PRED,
                                  prefetch=0)
        for _ in range(len(f) // 16):
            next(stream)
    text = str(e.value)
    message = message.format(last=len(f) - 1)
    assert text.startswith(f"{path}: corrupt or truncated TFRecord file") and message in text
    assert "\n" not in text


def test_interleave_is_tf_datas_deterministic_interleave():
    import tensorflow as tf
    counts = [5, 0, 3, 9, 1, 4, 7, 2]
    d = tf.data.Dataset.from_tensor_slices(np.arange(len(counts), dtype=np.int64)).interleave(
        lambda f: tf.data.Dataset.range(tf.gather(np.array(counts, np.int64), f)).map(lambda i: (f, i)),
        cycle_length=4, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    want = np.array(list(d.as_numpy_iterator()))
    f, i = rr.interleave(counts)
    np.testing.assert_array_equal(np.stack([f, i], axis=1), want)


def _stream(paths, counts, batch, start, n, **kw):
    it = rr.train_batches(paths, counts, batch, 11, 40, start, records.read_info(paths), seq_len=SEQ,
                          max_pred=PRED, **kw)
    return [next(it) for _ in range(n)]


def test_resumed_stream_continues_exactly_where_the_unbroken_one_is(data):
    path = data["unmasked"]
    n = rr.count_records(path)
    unbroken = _stream([path, path], [n, n], 24, 0, 40)  # > 2 epochs of 2 * 216 records
    resumed = _stream([path, path], [n, n], 24, 17, 23)
    for a, b in zip(unbroken[17:], resumed):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # Each epoch holds every record once, positions 0.. in shuffled order, windows of 40.
    positions = np.concatenate([b["positions"] for b in unbroken])
    assert sorted(positions[:2 * n]) == list(range(2 * n))
    assert not np.array_equal(positions[:40], np.arange(40))
    assert sorted(positions[:40]) == list(range(40))
    epoch1 = np.concatenate([b["token_ids"] for b in unbroken])[2 * n:4 * n]
    epoch0 = np.concatenate([b["token_ids"] for b in unbroken])[:2 * n]
    assert not np.array_equal(epoch0, epoch1)  # another order in the next epoch
    assert sorted(map(bytes, epoch0)) == sorted(map(bytes, epoch1))


def test_pipelines_split_the_stream_into_disjoint_shares(data):
    path = data["static"]
    n = rr.count_records(path)  # one file, two pipelines: each keeps every other record
    shares = [np.concatenate([b["input_ids"] for b in _stream(
        [path], [n], 24, 0, n // 2 // 12, num_pipelines=2, pipeline_id=p)]) for p in (0, 1)]
    assert all(len(s) == n // 2 // 12 * 12 for s in shares)
    everything = sorted(map(bytes, _read_all(path, None)["input_ids"]))
    together = sorted(map(bytes, np.concatenate(shares)))
    assert set(together) <= set(everything) and len(together) == len(set(together))


def test_eval_batches_hold_every_record_once_then_padding(data):
    path = data["unmasked"]
    n = rr.count_records(path)
    batches = list(rr.eval_batches([path], [n], 50, 7, records.read_info([path]), seq_len=SEQ, max_pred=PRED))
    assert len(batches) == 7 and all(b["token_ids"].shape == (50, SEQ) for b in batches)
    counts = np.concatenate([b["num_tokens"] for b in batches])
    assert (counts[:n] > 0).all() and (counts[n:] == 0).all()
    np.testing.assert_array_equal(np.concatenate([b["positions"] for b in batches])[:n], np.arange(n))
    np.testing.assert_array_equal(np.concatenate([b["token_ids"] for b in batches])[:n],
                                  _read_all(path, None)["token_ids"])


def test_reader_and_stream_work_with_tensorflow_blocked(data):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["tensorflow"] = None
        sys.path.insert(0, {str(REPO_ROOT)!r})
        import pretraining_records as records, record_reader as rr
        for path in ({data['static']!r}, {data['unmasked']!r}):
            info = rr.check_file(path, {SEQ}, {PRED}, {data['vocab_size']})
            n = rr.count_records(path)
            batch = next(rr.train_batches([path], [n], 8, 0, 100, 3, info, seq_len={SEQ}, max_pred={PRED}))
            ev = next(rr.eval_batches([path], [n], 8, 1, info, seq_len={SEQ}, max_pred={PRED}))
            print(info.kind, sorted(batch), len(ev))
        assert "tensorflow" not in [m for m, v in sys.modules.items() if v is not None]
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "static ['input_ids'" in out.stdout and "unmasked ['num_tokens', 'positions'" in out.stdout
