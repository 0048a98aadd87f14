"""Tests for create_pretrain_data.sh: parallel conversion of numbered files, skipping, failures, logs."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, RESOURCES

SCRIPT = str(REPO_ROOT / "create_pretrain_data.sh")
CORPUS = sorted((RESOURCES / "corpus").glob("*.txt"))


def _run(tmp_path, *args, **env):
    full_env = dict(os.environ, INPUT_DIR=str(tmp_path / "in"), INPUT_PATTERN="part_%02d.txt",
                    OUTPUT_DIR=str(tmp_path / "out"), OUTPUT_PATTERN="part_%02d.tfrecord",
                    MAX_SEQ_LENGTH="64", MAX_PREDICTIONS_PER_SEQ="8", DUPE_FACTOR="2",
                    PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL="2", **env)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=full_env,
                          cwd=tmp_path, timeout=300)


@pytest.fixture
def numbered_inputs(tmp_path):
    (tmp_path / "in").mkdir()
    for i, path in enumerate(CORPUS[:2], start=1):
        shutil.copy(path, tmp_path / "in" / f"part_{i:02d}.txt")
    return tmp_path


def test_help_documents_the_settings():
    result = subprocess.run(["bash", SCRIPT, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for name in ("INPUT_DIR", "INPUT_PATTERN", "OUTPUT_DIR", "OUTPUT_PATTERN", "PARALLEL", "LOG_DIR"):
        assert name in result.stdout


def test_bad_arguments_exit_2(tmp_path):
    assert _run(tmp_path, "1").returncode == 2
    assert _run(tmp_path, "a", "b").returncode == 2


def test_converts_in_parallel_skips_finished_and_reports_failures(numbered_inputs):
    tmp = numbered_inputs
    # Files 1 and 2 exist, 3 does not: two successes, one failure, exit status 1.
    result = _run(tmp, "1", "3", "-j", "2")
    assert result.returncode == 1, result.stdout + result.stderr
    for i in (1, 2):
        out = tmp / "out" / f"part_{i:02d}.tfrecord"
        assert out.stat().st_size > 1000 and (tmp / "out" / f"part_{i:02d}.tfrecord.meta.json").exists()
        assert f"[{i}] done: wrote" in result.stdout
    assert "[3] FAILED" in result.stdout and "part_03.txt" in result.stdout
    assert "1 of 3 files failed: 3" in result.stderr
    logs = sorted(os.listdir(tmp / "out" / "logs"))
    assert [name for name in logs if name.endswith(".log")] == [
        "part_01.tfrecord.log", "part_02.tfrecord.log", "part_03.tfrecord.log"]
    assert not [n for n in os.listdir(tmp / "out") if n.startswith(".") or n.startswith("part_03")]

    # Re-running skips the finished files without rewriting them.
    mtime = (tmp / "out" / "part_01.tfrecord").stat().st_mtime_ns
    result = _run(tmp, "1", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[1] skipped" in result.stdout and "[2] skipped" in result.stdout
    assert (tmp / "out" / "part_01.tfrecord").stat().st_mtime_ns == mtime
