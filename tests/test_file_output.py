"""file_output.py: every output is whole or absent; a second writer fails at once; TF only for gs://."""

import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

import file_output
from train_utils import UsageError


def _listing(folder):
    return sorted(os.listdir(folder))


def test_importing_it_loads_no_tensorflow():
    """Generator workers write through it; TensorFlow would cost each of them seconds and memory."""
    code = "import sys, file_output; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out.json"
    file_output.atomic_write(path, "第一\n")
    file_output.atomic_write(path, b"second\n")
    assert path.read_bytes() == b"second\n"
    assert _listing(tmp_path) == ["out.json"]


def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "curve.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with file_output.replacing(path) as tmp:
            assert file_output.is_temp_or_lock(tmp) and os.path.dirname(tmp) == str(tmp_path)
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise RuntimeError("killed half way")
    assert path.read_bytes() == b"old"
    assert _listing(tmp_path) == ["curve.png"]


def test_gfile_paths_are_written_only_when_complete():
    """gs:// goes through tf.io.gfile; TF's in-memory ram:// filesystem stands in for it."""
    import tensorflow as tf
    path = "ram://file_output_test/one/out.txt"
    with pytest.raises(RuntimeError):
        with file_output.replacing(path) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("killed half way")
    assert not tf.io.gfile.exists(path)
    tf.io.gfile.makedirs("ram://file_output_test/one")
    file_output.atomic_write(path, "whole\n")
    assert tf.io.gfile.GFile(path).read() == "whole\n"


def test_an_output_folder_on_a_gfile_filesystem_is_written_only_when_complete():
    import tensorflow as tf
    out = "ram://file_output_test/export"
    with pytest.raises(RuntimeError):
        with file_output.atomic_output_dir(out) as tmp:
            open(os.path.join(tmp, "half.bin"), "w").write("x")
            raise RuntimeError("killed half way")
    assert not tf.io.gfile.exists(out)
    with file_output.atomic_output_dir(out) as tmp:
        os.makedirs(os.path.join(tmp, "sub"))
        open(os.path.join(tmp, "config.json"), "w").write("{}")
        open(os.path.join(tmp, "sub", "a.txt"), "w").write("a")
    assert sorted(p.rstrip("/") for p in tf.io.gfile.listdir(out)) == ["config.json", "sub"]
    assert tf.io.gfile.GFile(out + "/sub/a.txt").read() == "a"
    with pytest.raises(ValueError, match="already exists and is not empty; pass --overwrite"):
        with file_output.atomic_output_dir(out):
            pass


def test_a_local_output_folder_is_replaced_only_when_the_new_one_is_complete(tmp_path):
    out = tmp_path / "export"
    with file_output.atomic_output_dir(out) as tmp:
        open(os.path.join(tmp, "a.txt"), "w").write("first")
    with pytest.raises(RuntimeError):
        with file_output.atomic_output_dir(out, overwrite=True) as tmp:
            open(os.path.join(tmp, "a.txt"), "w").write("half")
            raise RuntimeError("killed half way")
    assert (out / "a.txt").read_text() == "first" and _listing(tmp_path) == ["export"]
    with file_output.atomic_output_dir(out, overwrite=True) as tmp:
        open(os.path.join(tmp, "b.txt"), "w").write("second")
    assert _listing(out) == ["b.txt"] and _listing(tmp_path) == ["export"]
    with pytest.raises(ValueError, match="holds the input"):
        file_output.check_output_dir(tmp_path, overwrite=True, sources=[out / "b.txt"])


def test_locked_outputs_commit_data_and_sidecars_together(tmp_path):
    paths = [str(tmp_path / "a.bin"), str(tmp_path / "b.bin")]
    with file_output.LockedOutputs(paths, sidecar_suffix=".side") as out:
        out.write([b"a1", b"b1"], [1, 1])
        out.write([b"a2", b""], [1, 0])
        assert {".a.bin.lock", ".b.bin.lock"} <= set(_listing(tmp_path))
        out.commit(["A\n", "B\n"])
    assert out.counts == [2, 1]
    assert _listing(tmp_path) == ["a.bin", "a.bin.side", "b.bin", "b.bin.side"]
    assert (tmp_path / "a.bin").read_bytes() == b"a1a2" and (tmp_path / "b.bin.side").read_text() == "B\n"


def test_a_second_writer_of_the_same_output_fails_at_once_and_touches_nothing(tmp_path):
    path = str(tmp_path / "r.bin")
    with file_output.LockedOutputs([path]) as first:
        first.write([b"partial"])
        before = _listing(tmp_path)
        with pytest.raises(UsageError, match=r"^--output_file: .*r\.bin is being written by another run "
                                             r"\(lock .*\.r\.bin\.lock is held\)"):
            with file_output.LockedOutputs([path]):
                pass
        assert _listing(tmp_path) == before
        first.commit()
    assert _listing(tmp_path) == ["r.bin"]


def test_leaving_without_commit_keeps_what_was_on_disk(tmp_path):
    path = tmp_path / "r.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with file_output.LockedOutputs([str(path)], sidecar_suffix=".side") as out:
            out.write([b"new"])
            raise RuntimeError("killed half way")
    assert path.read_bytes() == b"old" and _listing(tmp_path) == ["r.bin"]
    with pytest.raises(UsageError, match=r"r\.bin\.side ends in \.side, the sidecar suffix"):
        with file_output.LockedOutputs([str(path) + ".side"], sidecar_suffix=".side"):
            pass
