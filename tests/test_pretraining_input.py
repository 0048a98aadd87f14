"""pretraining_input.py, what lets a pretraining run be killed and rerun: the input stream as a
function of (files, seed, step), the state a resume must match, and the output folder's leftovers.
Whole runs killed and resumed are in test_run_pretraining.py and test_pretraining_faults.py."""

import os

import numpy as np
import pytest
import tensorflow as tf

import pretraining_input
import pretraining_records as records
from train_utils import UsageError


def _files(tmp_path, sizes):
    """Record files holding records "f<i>-r<j>" (raw bytes, enough to follow each record)."""
    paths = []
    for i, n in enumerate(sizes):
        path = str(tmp_path / f"part-{i}.tfrecord")
        with open(path, "wb") as f:
            f.write(records.frame([f"f{i}-r{j}".encode() for j in range(n)]))
        paths.append(path)
    return paths


def _stream(files, counts, batch, start_step, n, num_pipelines=1, pipeline_id=0, seed=7):
    fn = pretraining_input.train_dataset_fn(files, counts, batch, seed, 8, start_step,
                                             lambda position, serialized: (position, serialized))
    context = tf.distribute.InputContext(num_input_pipelines=num_pipelines, input_pipeline_id=pipeline_id,
                                         num_replicas_in_sync=num_pipelines)
    it = iter(fn(context))
    return [tuple(t.numpy().tolist() for t in next(it)) for _ in range(n)]


def test_a_stream_resumed_at_a_step_equals_the_stream_read_through(tmp_path):
    counts = [13, 7, 10]
    files = _files(tmp_path, counts)
    batch, steps = 4, 12                                     # 48 records: past the first epoch (30)
    through = _stream(files, counts, batch, 0, steps)
    assert _stream(files, counts, batch, steps - 5, 5) == through[-5:]
    positions = [p for ps, _ in through for p in ps]
    assert positions != sorted(positions)                    # shuffled ...
    first_epoch = [r for _, rs in through for r in rs][:30]  # ... every record once per epoch
    assert sorted(first_epoch) == sorted(f"f{i}-r{j}".encode() for i, n in enumerate(counts) for j in range(n))
    assert _stream(files, counts, batch, 0, steps, seed=8) != through


def test_pipelines_split_whole_files_or_every_nth_record():
    files, counts = ["a", "b", "c"], [5, 6, 7]
    assert pretraining_input.pipeline_files(files, counts, 2, 1) == (["b"], False, 6)
    assert pretraining_input.pipeline_files(files, counts, 1, 0) == (files, False, 18)
    # Fewer files than pipelines: every pipeline reads all files and keeps its share of records.
    assert pretraining_input.pipeline_files(files, counts, 4, 3) == (files, True, 4)


def test_two_pipelines_read_disjoint_records(tmp_path):
    counts = [6, 6]
    files = _files(tmp_path, counts)
    seen = [{r for _, rs in _stream(files, counts, 2, 0, 3, 2, i) for r in rs} for i in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 6 and not seen[0] & seen[1]


def _state(**changes):
    state = {"input_files": [{"file": "train.tfrecord", "bytes": 10}], "train_batch_size": 8, "seed": 1,
             "shuffle_buffer_size": 100, "input_pipelines": 1, "masked_lm_prob": 0.1}
    state.update(changes)
    return state


def test_resume_input_must_be_the_same_stream(tmp_path):
    out = str(tmp_path)
    # Called only when output_dir holds checkpoints: without the state file the stream is unknown.
    with pytest.raises(UsageError, match=r"pretraining_input.json is missing, but .* holds checkpoints"):
        pretraining_input.check_resume_input(out, _state())
    pretraining_input.write_json(os.path.join(out, pretraining_input.INPUT_STATE), _state())
    pretraining_input.check_resume_input(out, _state())
    with pytest.raises(UsageError, match=r"--train_batch_size=16, but .* was trained with 8"):
        pretraining_input.check_resume_input(out, _state(train_batch_size=16))
    with pytest.raises(UsageError, match=r"same names, other contents"):
        pretraining_input.check_resume_input(out, _state(input_files=[{"file": "train.tfrecord", "bytes": 11}]))
    with pytest.raises(UsageError, match=r"--seed is 2, but .* was trained with 1"):
        pretraining_input.check_resume_input(out, _state(seed=2))
    # A state written before masked_lm_prob was recorded still resumes.
    old = _state()
    del old["masked_lm_prob"]
    pretraining_input.write_json(os.path.join(out, pretraining_input.INPUT_STATE), old)
    pretraining_input.check_resume_input(out, _state(masked_lm_prob=0.2))


def test_partial_saves_are_removed_and_nothing_else(tmp_path):
    for name in ("ckpt-3_temp", "ckpt-x_temp", "keep"):
        (tmp_path / name).mkdir()
    (tmp_path / "ckpt-4_temp").write_text("a file, not a save folder")
    pretraining_input.remove_partial_saves(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["ckpt-4_temp", "ckpt-x_temp", "keep"]


def test_a_resume_refuses_checkpoints_without_their_state_file(tmp_path):
    ckpt = tf.train.Checkpoint(v=tf.Variable([1.0]))
    tf.train.CheckpointManager(ckpt, str(tmp_path), max_to_keep=2).save(checkpoint_number=4)
    assert pretraining_input.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt-4")
    os.remove(tmp_path / "checkpoint")
    with pytest.raises(UsageError, match=r'checkpoint is missing but .* holds ckpt-4: write the line '
                                         r'`model_checkpoint_path: "ckpt-4"`'):
        pretraining_input.latest_checkpoint(str(tmp_path))
    np.testing.assert_array_equal(ckpt.v.numpy(), [1.0])


def test_sequence_stats_sample_the_files_round_robin(tmp_path):
    files = _files(tmp_path, [50, 5])

    def parse(positions, serialized):  # file 0's records: 1 real prediction, 2 real tokens; 3, 4
        first = tf.strings.substr(serialized, 1, 1) == "0"                            # [B]
        predictions, tokens = tf.where(first, 1, 3), tf.where(first, 2, 4)
        return {"masked_lm_weights": tf.cast(tf.range(4)[None, :] < predictions[:, None], tf.float32),
                "input_mask": tf.cast(tf.range(8)[None, :] < tokens[:, None], tf.int32),
                "input_ids": tf.ones([tf.shape(serialized)[0], 8], tf.int32)}

    stats = pretraining_input.sample_sequence_stats(files, parse, num_records=10)
    # 5 records of each file, not the first 10 of file 0
    assert stats == {"masked_lm_weights": (2.0, 1.0), "input_mask": (3.0, 1.0)}
    stats = pretraining_input.sample_sequence_stats(files, parse, num_records=1000)
    assert stats["masked_lm_weights"][0] == (50 * 1 + 5 * 3) / 55

    def broken(positions, serialized):
        return {"masked_lm_weights": tf.strings.to_number(serialized)[:, None],  # an op error
                "input_mask": tf.ones([tf.shape(serialized)[0], 8], tf.int32)}

    assert pretraining_input.sample_sequence_stats(files, broken) is None
