"""Tests for pretraining_records.py: the bytes, the file listing, the checks and the parser.

Records here are small and hand-made with the module's own encoder; the generator's output is tested
in test_create_pretraining_data.py.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO_ROOT

import pretraining_records as records
from train_utils import UsageError

SEQ, PRED, VOCAB = 16, 4, 100


def _instance(ids, positions=(1,), labels=(5,), seq=SEQ, pred=PRED):
    """A static record's features (Google's names and types), zero padded to seq/pred."""
    ids, positions, labels = list(ids), list(positions), list(labels)
    return {
        "input_ids": ("int64", ids + [0] * (seq - len(ids))),
        "input_mask": ("int64", [1] * len(ids) + [0] * (seq - len(ids))),
        "segment_ids": ("int64", [0] * seq),
        "masked_lm_positions": ("int64", positions + [0] * (pred - len(positions))),
        "masked_lm_ids": ("int64", labels + [0] * (pred - len(labels))),
        "masked_lm_weights": ("float32", [1.0] * len(positions) + [0.0] * (pred - len(positions))),
        "next_sentence_labels": ("int64", [0]),
    }


def _good(n, seed=0):
    rng = np.random.default_rng(seed)
    return [_instance([1] + rng.integers(3, VOCAB, 10).tolist() + [2], positions=[2, 5],
                      labels=rng.integers(3, VOCAB, 2).tolist()) for _ in range(n)]


def _write(path, instances, sidecar=True, **meta):
    serialized = [records.encode_example(i) for i in instances]
    if sidecar:
        return records.write_records(str(path), serialized, dict(
            max_seq_length=SEQ, max_predictions_per_seq=PRED, vocab_size=VOCAB, **meta))
    with open(path, "wb") as f:
        f.write(records.frame(serialized))


# ---------------------------------------------------------------------------------------------------
# Bytes: our encoder and framing equal TensorFlow's
# ---------------------------------------------------------------------------------------------------

def test_framing_is_byte_identical_to_tensorflow_writer(tmp_path):
    import tensorflow as tf
    rng = np.random.default_rng(0)
    blobs = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in rng.integers(0, 5000, 80)]
    blobs += [b"", b"123456789", bytes(64), bytes(65)]
    with tf.io.TFRecordWriter(str(tmp_path / "ref.tfrecord")) as writer:
        for blob in blobs:
            writer.write(blob)
    assert records.frame(blobs) == (tmp_path / "ref.tfrecord").read_bytes()


def test_encoders_give_the_example_tensorflow_builds():
    import tensorflow as tf
    instance = _instance([1, 7, 99, 2], positions=[1, 2], labels=[8, 50])
    general = tf.train.Example.FromString(records.encode_example(instance))
    fast = tf.train.Example.FromString(records.ExampleEncoder(SEQ, PRED, VOCAB).encode(
        [1, 7, 99, 2], [1, 2], [8, 50]))
    reference = tf.train.Example(features=tf.train.Features(feature={
        name: tf.train.Feature(float_list=tf.train.FloatList(value=values)) if dtype == "float32"
        else tf.train.Feature(int64_list=tf.train.Int64List(value=values))
        for name, (dtype, values) in instance.items()}))
    assert general == reference and fast == reference
    assert len(records.encode_example(instance)) == len(reference.SerializeToString())


# ---------------------------------------------------------------------------------------------------
# Listing: globs never match sidecars, temp or lock files
# ---------------------------------------------------------------------------------------------------

def test_record_glob_never_matches_sidecars_temp_or_lock_files(tmp_path):
    for name in ("a.tfrecord", "b.tfrecord"):
        _write(tmp_path / name, _good(3))
    for stray in (".a.tfrecord.tmp-123", ".a.tfrecord.tmp-123.meta.json", ".b.tfrecord.lock"):
        (tmp_path / stray).write_bytes(b"x")
    expected = [str(tmp_path / "a.tfrecord"), str(tmp_path / "b.tfrecord")]
    assert records.record_files(f"{tmp_path}/*") == expected
    # Comma lists keep their order; a file named twice is read once.
    assert records.record_files(f"{expected[1]}, {tmp_path}/*") == expected[::-1]


def test_record_glob_through_tf_gfile_skips_hidden_files_too(tmp_path):
    """Remote patterns (gs://...) go through tf.io.gfile, whose '*' also matches dot files."""
    import tensorflow as tf
    root = "ram://records_glob"
    tf.io.gfile.makedirs(root)
    for name in ("a.tfrecord", "a.tfrecord.meta.json", ".a.tfrecord.tmp-1"):
        with tf.io.gfile.GFile(f"{root}/{name}", "wb") as f:
            f.write(b"x")
    assert records.record_files(f"{root}/*") == [f"{root}/a.tfrecord"]


@pytest.mark.parametrize("pattern, message", [
    ("{d}/none*", r"--eval_input_file: '.*none\*' matches no record file$"),
    ("{d}/only/*", r"--eval_input_file: '.*only/\*' matches no record file \(only 1 sidecar/temp"),
    ("{d}/only", r"--eval_input_file: .*only is a directory; give its files, e.g. '.*only/\*'"),
    ("", r"--eval_input_file is required"),
])
def test_record_patterns_that_match_nothing_name_the_flag(tmp_path, pattern, message):
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "x.tfrecord.meta.json").write_text("{}")
    with pytest.raises(UsageError, match=message):
        records.record_files(pattern.format(d=tmp_path), flag="--eval_input_file")


# ---------------------------------------------------------------------------------------------------
# Checks: every record of a file without sidecar; the sidecar against the flags
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, message", [
    (_instance([1, 7, VOCAB + 5, 2]), rf"record 4321 has token id {VOCAB + 5} in input_ids out of range "
                                      rf"\[0, vocab_size {VOCAB} of --bert_config_file"),
    (_instance([1, 7, 2], labels=[-3]), r"record 4321 has token id -3 in masked_lm_ids out of range"),
    (_instance([1, 7, 2], positions=[SEQ]), rf"record 4321 has position {SEQ} in masked_lm_positions "
                                            rf"out of range \[0, --max_seq_length {SEQ}\)"),
    (_instance([1, 7, 2], seq=SEQ + 1), rf"record 4321 has input_ids of length {SEQ + 1}, but "
                                        rf"--max_seq_length is {SEQ}"),
])
@pytest.mark.parametrize("sidecar", [False, True], ids=["google_no_sidecar", "with_sidecar"])
def test_every_record_is_checked_not_only_the_first(tmp_path, bad, message, sidecar):
    """Google's own script writes no sidecar: one bad record deep in the file names its index."""
    path = tmp_path / "google.tfrecord"
    instances = _good(5000)
    instances[4321] = bad
    _write(path, instances, sidecar=sidecar)
    with pytest.raises(UsageError, match=rf"^{path}: {message}") as err:
        records.check_records(str(path), SEQ, PRED, VOCAB, full_scan=True)
    assert "\n" not in str(err.value)
    # Without the full scan only record 0 is read (the --check_input_files=false contract).
    assert records.check_records(str(path), SEQ, PRED, VOCAB, full_scan=False).kind == "static"
    _write(path, instances[:4321] + instances[4322:], sidecar=sidecar)
    assert records.check_records(str(path), SEQ, PRED, VOCAB).kind == "static"


def test_sidecar_disagreements_and_unknown_kinds_are_one_line_errors(tmp_path):
    path = str(tmp_path / "r.tfrecord")
    _write(path, _good(3))
    with pytest.raises(UsageError, match=r"r\.tfrecord: records have max_seq_length=16 .* "
                                         r"--max_seq_length is 32"):
        records.check_records(path, 32, PRED, VOCAB)
    meta = json.load(open(path + ".meta.json"))
    json.dump(dict(meta, num_instances=4), open(path + ".meta.json", "w"))
    with pytest.raises(UsageError, match=r"3 records, but .*meta\.json says num_instances=4"):
        records.check_records(path, SEQ, PRED, VOCAB)
    json.dump(dict(meta, kind="from_the_future"), open(path + ".meta.json", "w"))
    with pytest.raises(UsageError, match=r"r\.tfrecord: unknown record kind .from_the_future."):
        records.check_records(path, SEQ, PRED, VOCAB)
    json.dump(dict(meta, format_version=2), open(path + ".meta.json", "w"))
    with pytest.raises(UsageError, match=r"r\.tfrecord: format_version 2 .* newer than this version reads"):
        records.check_records(path, SEQ, PRED, VOCAB)
    open(path + ".meta.json", "w").write("{not json")
    with pytest.raises(UsageError, match=r"r\.tfrecord\.meta\.json: unreadable sidecar"):
        records.check_records(path, SEQ, PRED, VOCAB)


def test_sidecar_without_kind_means_static_records(tmp_path):
    path = str(tmp_path / "old.tfrecord")
    meta = _write(path, _good(2))
    del meta["kind"]
    json.dump(meta, open(path + ".meta.json", "w"))
    assert records.read_sidecar(path)["kind"] == "static"
    assert records.read_info([path]).kind == "static"


def test_files_of_different_kinds_are_not_read_together(tmp_path, monkeypatch):
    monkeypatch.setitem(records.KINDS, "other", records.KINDS["static"])
    a, b = str(tmp_path / "a.tfrecord"), str(tmp_path / "b.tfrecord")
    _write(a, _good(2))
    _write(b, _good(2), kind="other")
    with pytest.raises(UsageError, match=r"--input_file: records of different kinds \(static: .*a\.tfrecord, "
                                         r"other: .*b\.tfrecord\)"):
        records.read_info([a, b])


# ---------------------------------------------------------------------------------------------------
# Parsing: serialized records -> the model's tensors
# ---------------------------------------------------------------------------------------------------

def test_static_parser_gives_the_model_tensors_for_one_record_or_a_batch(tmp_path):
    import tensorflow as tf
    path = str(tmp_path / "r.tfrecord")
    instances = _good(5)
    _write(path, instances)
    parse = records.make_parser(records.read_info([path]), SEQ, PRED)
    batch = next(iter(tf.data.TFRecordDataset(path).enumerate().batch(5).map(parse)))
    assert sorted(batch) == ["input_ids", "input_mask", "masked_lm_ids", "masked_lm_positions",
                             "masked_lm_weights", "segment_ids"]
    assert batch["input_ids"].dtype == tf.int32 and batch["masked_lm_weights"].dtype == tf.float32
    assert batch["input_ids"].shape == (5, SEQ) and batch["masked_lm_ids"].shape == (5, PRED)
    np.testing.assert_array_equal(batch["input_ids"].numpy()[3], instances[3]["input_ids"][1])
    single = parse(tf.constant(3, tf.int64), next(iter(tf.data.TFRecordDataset(path).skip(3))))
    np.testing.assert_array_equal(single["masked_lm_ids"].numpy(), instances[3]["masked_lm_ids"][1])


def test_static_parser_hands_over_only_the_prediction_slots_the_generator_can_fill(tmp_path):
    import tensorflow as tf
    instances = _good(5)  # 2 predictions of PRED = 4 slots, in records of SEQ = 16
    path = str(tmp_path / "r.tfrecord")
    _write(path, instances, masked_lm_prob=0.15)  # at most round(14 * 0.15) = 2 predictions
    assert records.predictions_in_use(records.read_info([path]), SEQ, PRED) == 2
    batch = next(iter(tf.data.TFRecordDataset(path).enumerate().batch(5).map(
        records.make_parser(records.read_info([path]), SEQ, PRED))))
    for key in ("masked_lm_positions", "masked_lm_ids", "masked_lm_weights"):
        np.testing.assert_array_equal(batch[key].numpy(), [i[key][1][:2] for i in instances], key)
    # Without masked_lm_prob in the sidecar (or without a sidecar: Google's records) all slots.
    _write(tmp_path / "google.tfrecord", instances, sidecar=False)
    assert records.predictions_in_use(records.read_info([str(tmp_path / "google.tfrecord")]),
                                      SEQ, PRED) == PRED
    # A sidecar that promises fewer predictions than a record holds fails loudly, naming the file.
    lying = str(tmp_path / "lying.tfrecord")
    _write(lying, instances, masked_lm_prob=0.1)  # round(1.4) = 1 < 2
    parse = records.make_parser(records.read_info([lying]), SEQ, PRED)
    with pytest.raises(tf.errors.InvalidArgumentError, match="lying.tfrecord: a record has more than 1"):
        next(iter(tf.data.TFRecordDataset(lying).enumerate().batch(5).map(parse)))
    # ... and the check before training (run_pretraining's --check_input_files) says so in one
    # line, naming the record; the parser's assert only backs up --check_input_files=false.
    with pytest.raises(records.UsageError, match=r"lying.tfrecord: record 0 has 2 predictions, more "
                       r"than the 1 its sidecar's masked_lm_prob allows at --max_seq_length=16;"):
        records.check_records(lying, SEQ, PRED, VOCAB)
    assert records.check_records(path, SEQ, PRED, VOCAB).kind == records.STATIC


# ---------------------------------------------------------------------------------------------------
# Output files: exclusive, atomic, nothing on disk changed by a failing run
# ---------------------------------------------------------------------------------------------------

def _snapshot(folder):
    """{relative path: bytes} of every file (and folder, as None) under `folder`."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder)] = None
        for f in files:
            out[os.path.relpath(os.path.join(root, f), folder)] = open(os.path.join(root, f), "rb").read()
    return out


def test_failing_write_leaves_existing_output_and_sidecar_byte_identical(tmp_path):
    path = str(tmp_path / "r.tfrecord")
    _write(path, _good(3))
    before = _snapshot(tmp_path)
    with pytest.raises(RuntimeError):
        with records.RecordOutputs([path]) as out:
            out.write([records.frame([b"new"])], [1])
            raise RuntimeError("killed half-way")
    assert _snapshot(tmp_path) == before


def test_second_writer_of_the_same_output_fails_at_once(tmp_path):
    """The lock is held by another process; our run must not touch its temp file or the output."""
    path = str(tmp_path / "r.tfrecord")
    _write(path, _good(3))
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO_ROOT)!r})
        import pretraining_records as records
        with records.RecordOutputs([{path!r}]) as out:
            out.write([b"partial"])
            print("locked", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(tmp_path)
        with pytest.raises(UsageError, match=r"--output_file: .*r\.tfrecord is being written by another "
                                             r"run \(lock .*\.r\.tfrecord\.lock is held\)"):
            records.write_records(path, [b"x"], {})
        assert _snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
    # A killed holder's lock dies with it; its temp file is cleaned by the next writer.
    records.write_records(path, [records.encode_example(i) for i in _good(2)],
                          dict(max_seq_length=SEQ, max_predictions_per_seq=PRED, vocab_size=VOCAB))
    assert sorted(os.listdir(tmp_path)) == ["r.tfrecord", "r.tfrecord.meta.json"]
    assert records.check_records(path, SEQ, PRED, VOCAB).meta["num_instances"] == 2


@pytest.mark.parametrize("case", ["directory", "trailing_slash", "is_input", "parent_is_file"])
def test_bad_output_paths_are_one_line_errors_before_anything_is_written(tmp_path, case):
    (tmp_path / "in.txt").write_text("text")
    (tmp_path / "blocker").write_text("a file")
    (tmp_path / "dir").mkdir()
    path, inputs, message = {
        "directory": (tmp_path / "dir", [], r"dir is a directory; give a file name inside it"),
        "trailing_slash": (f"{tmp_path}/new/", [], r"new/ is a directory; give a file name inside it"),
        "is_input": (tmp_path / "sub" / ".." / "in.txt", [str(tmp_path / "in.txt")],
                     r"in\.txt is also an input file"),
        "parent_is_file": (tmp_path / "blocker" / "r.tfrecord", [], r"cannot write to .*blocker"),
    }[case]
    before = _snapshot(tmp_path)
    with pytest.raises(UsageError, match=rf"^--output_file: .*{message}"):
        with records.RecordOutputs([str(path)], inputs=inputs):
            pass
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("content, message", [
    (b"\xe8\xbf\x99\xe4\xb8\x8d\xe6\x98\xaf\n" * 50, r"corrupt or truncated TFRecord file \(corrupted record at 0"),
    (records.frame([b"\xff\xff\xff"]), r"record 0 is not a tf.train.Example"),
    (records.frame([records.encode_example({"label": ("int64", [1])})]),
     r"record 0 has no feature 'input_ids' \(not static pretraining records\?\)"),
    (b"", r"no records"),
])
def test_files_that_are_not_pretraining_records_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "x.tfrecord"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=rf"^{path}: {message}") as err:
        records.check_records(str(path), SEQ, PRED, VOCAB)
    assert "function_node" not in str(err.value) and "\n" not in str(err.value)


def test_commit_records_removes_old_sidecars_first_and_writes_new_ones_last(tmp_path):
    """The commit Beam's Finalize uses: a retried commit (a shard renamed already) completes too."""
    calls = []

    class Files:
        @staticmethod
        def exists(path):
            return os.path.exists(path)

        @staticmethod
        def remove(path):
            calls.append(("remove", os.path.basename(path)))
            os.remove(path)

        @staticmethod
        def rename(src, dst):
            calls.append(("rename", os.path.basename(dst)))
            os.replace(src, dst)

        @staticmethod
        def write(path, data):
            calls.append(("write", os.path.basename(path)))
            with open(path, "wb") as f:
                f.write(data)

    a, b = str(tmp_path / "a.tfrecord"), str(tmp_path / "b.tfrecord")
    _write(a, _good(1))
    (tmp_path / ".a.tmp").write_bytes(records.frame([b"new"]))
    (tmp_path / "b.tfrecord").write_bytes(records.frame([b"renamed by an earlier attempt"]))
    records.commit_records([(str(tmp_path / ".a.tmp"), a), (None, b)], [{"n": 1}, {"n": 2}], Files)
    assert calls == [("remove", "a.tfrecord.meta.json"), ("rename", "a.tfrecord"),
                     ("write", "a.tfrecord.meta.json"), ("write", "b.tfrecord.meta.json")]
    assert records.read_sidecar(b) == {"n": 2, "kind": "static"}
    assert sorted(os.listdir(tmp_path)) == ["a.tfrecord", "a.tfrecord.meta.json", "b.tfrecord",
                                            "b.tfrecord.meta.json"]
