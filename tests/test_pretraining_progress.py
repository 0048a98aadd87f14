"""What a user sees while run_pretraining.py runs: progress however large --iterations_per_loop is,
and no TensorFlow C++ / internal INFO lines among ours."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT
from helpers import checkpoint_weights, pretrain, pretraining_argv, tensorboard_scalars


def _host_calls(monkeypatch):
    """Records the steps of each host call (each reports its progress once)."""
    import train_utils

    calls = []
    update = train_utils.ProgressLogger.update

    def spy(self, n=1, **kwargs):
        calls.append(n)
        return update(self, n, **kwargs)

    monkeypatch.setattr(train_utils.ProgressLogger, "update", spy)
    return calls


def test_slow_steps_split_a_large_loop_into_short_host_calls(pretraining_data, tmp_path, monkeypatch):
    """With the default --iterations_per_loop=1000, a host call that would outlast HOST_CALL_SECONDS
    is cut short: here every call runs one step and reports progress. The summary points stay one
    per loop window (ending on the saves), and saves land exactly on --save_checkpoints_steps."""
    import run_pretraining

    monkeypatch.setattr(run_pretraining, "HOST_CALL_SECONDS", 1e-9)  # any step is "too slow"
    calls = _host_calls(monkeypatch)
    out = tmp_path / "p"
    pretrain(pretraining_data, out, "--do_train", "--num_train_steps=5", "--save_checkpoints_steps=2")
    assert calls == [1, 1, 1, 1, 1]
    assert [step for step, _ in tensorboard_scalars(str(out))["loss"]] == [2, 4, 5]
    assert sorted(p.name for p in out.glob("ckpt-*.index")) == [
        "ckpt-2.index", "ckpt-4.index", "ckpt-5.index"]


@pytest.mark.slow
def test_short_host_calls_train_exactly_like_one_long_call(pretraining_data, tmp_path, monkeypatch):
    """Cutting host calls short changes neither the input position, the updates nor the summary
    points (each the mean over its window of steps)."""
    import run_pretraining

    pretrain(pretraining_data, tmp_path / "long", "--do_train", "--num_train_steps=4")
    monkeypatch.setattr(run_pretraining, "HOST_CALL_SECONDS", 1e-9)
    pretrain(pretraining_data, tmp_path / "short", "--do_train", "--num_train_steps=4")
    long, short = checkpoint_weights(str(tmp_path / "long" / "ckpt-4")), checkpoint_weights(str(tmp_path / "short" / "ckpt-4"))
    assert long.keys() == short.keys()
    for name in long:
        np.testing.assert_array_equal(long[name], short[name], err_msg=name)
    long, short = tensorboard_scalars(str(tmp_path / "long")), tensorboard_scalars(str(tmp_path / "short"))
    for tag in ("loss", "masked_lm_accuracy", "grad_norm", "learning_rate"):
        assert [s for s, _ in long[tag]] == [s for s, _ in short[tag]] == [4]
        np.testing.assert_allclose(long[tag][0][1], short[tag][0][1], rtol=1e-6, err_msg=tag)


@pytest.mark.slow
def test_pretraining_stderr_has_our_lines_and_no_tensorflow_chatter(pretraining_data, tmp_path):
    """A plain command line (no TF_CPP_MIN_LOG_LEVEL in the environment), XLA-compiled step: the
    C++ lines TensorFlow logs after start-up (XLA compilation, dataset ops) and its Python INFO lines
    are gone; our progress and save lines stay."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_CPP_MAX_VLOG_LEVEL")}
    proc = subprocess.run(
        [sys.executable, "run_pretraining.py", "--do_train", *pretraining_argv(pretraining_data, tmp_path / "p"),
         "--num_train_steps=2", "--jit_compile=true"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for chatter in ("dump_mlir_util", "Compiled cluster using XLA", "tf_record_dataset_op",
                    "service.cc", "Sharding callback", "I0000 ", "W0000 "):
        assert chatter not in proc.stderr, proc.stderr
    assert "pretrain: 2/2 steps" in proc.stderr and "saved " in proc.stderr


def test_progress_rate_leaves_out_the_start_up_before_the_first_update(monkeypatch):
    """A compile of 60 s, then 10 steps a second: after the first update the rate and ETA are the
    steps', not diluted by the start-up."""
    import train_utils

    clock = [0.0]
    monkeypatch.setattr(train_utils.time, "perf_counter", lambda: clock[0])
    progress = train_utils.ProgressLogger(total=1000, unit="steps", name="pretrain")
    clock[0] = 60.0
    progress.update(1)  # the first host call: compilation and one step
    clock[0] = 70.0
    progress.update(100)
    assert progress.rate == pytest.approx(10.0)
    assert "pretrain: 101/1000 steps, 10.0 steps/s, ETA 1:29" in progress.line()
