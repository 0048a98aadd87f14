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
    logs = sorted(os.listdir(tmp / "out" / ".logs"))
    assert logs == ["part_01.tfrecord.log", "part_02.tfrecord.log", "part_03.tfrecord.log"]
    assert sorted(os.listdir(tmp / "out")) == [
        ".logs", "part_01.tfrecord", "part_01.tfrecord.meta.json", "part_02.tfrecord",
        "part_02.tfrecord.meta.json"]
    # The README's next step reads the folder with a glob: it means the records, not the logs.
    import pretraining_records
    assert pretraining_records.record_files(f"{tmp / 'out'}/*") == [
        str(tmp / "out" / f"part_0{i}.tfrecord") for i in (1, 2)]

    # Re-running skips the finished files without rewriting them.
    mtime = (tmp / "out" / "part_01.tfrecord").stat().st_mtime_ns
    result = _run(tmp, "1", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[1] skipped" in result.stdout and "[2] skipped" in result.stdout
    assert (tmp / "out" / "part_01.tfrecord").stat().st_mtime_ns == mtime


def _project_copy(tmp_path, venv_python):
    """A project folder whose files are the repo's (linked), with or without a .venv/bin/python,
    and a PATH whose python3 cannot import absl (a plain system Python)."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("create_pretrain_data.sh", "create_pretraining_data.py", "resources"):
        (project / name).symlink_to(REPO_ROOT / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'absl'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    if venv_python:
        (project / ".venv" / "bin").mkdir(parents=True)
        wrapper = project / ".venv" / "bin" / "python"
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", INPUT_DIR=str(tmp_path / "in"),
               INPUT_PATTERN="part_%02d.txt", OUTPUT_DIR=str(tmp_path / "out"),
               OUTPUT_PATTERN="part_%02d.tfrecord", MAX_SEQ_LENGTH="64", MAX_PREDICTIONS_PER_SEQ="8",
               DUPE_FACTOR="1")
    return project, env


def test_as_printed_it_uses_the_project_venv_and_names_its_vocab(numbered_inputs):
    """No PYTHON, no activated venv, no VOCAB_FILE: the project's .venv runs the files, and the
    output names the demo vocab it falls back to."""
    tmp = numbered_inputs
    project, env = _project_copy(tmp, venv_python=True)
    result = subprocess.run(["bash", str(project / "create_pretrain_data.sh"), "1", "1"], cwd=tmp,
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"with {project}/.venv/bin/python" in result.stdout
    assert "the demo's own 9339-token vocab" in result.stdout and "VOCAB_FILE=" in result.stdout
    assert "[1] done: wrote" in result.stdout


def test_without_a_project_interpreter_one_clear_error(numbered_inputs):
    tmp = numbered_inputs
    project, env = _project_copy(tmp, venv_python=False)
    result = subprocess.run(["bash", str(project / "create_pretrain_data.sh"), "1", "2"], cwd=tmp,
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "python3 cannot import absl" in result.stderr and "make install" in result.stderr
    assert not (tmp / "out").exists()


def test_a_missing_vocab_is_refused_before_any_file(numbered_inputs):
    result = _run(numbered_inputs, "1", "2", VOCAB_FILE=str(numbered_inputs / "nope.txt"))
    assert result.returncode == 2 and "vocab file not found" in result.stderr
