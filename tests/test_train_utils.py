"""train_utils: strategy choice, progress lines, grouped --help and missing-flag messages."""

import os
import subprocess
import sys
import textwrap

import pytest

import train_utils

SCRIPT = textwrap.dedent('''
    """Toy script docstring."""
    from absl import flags
    import train_utils
    def define_flags(fv=flags.FLAGS):
        with train_utils.flag_group("Input"):
            flags.DEFINE_string("input_file", None, "Files to read.", flag_values=fv)
            flags.DEFINE_integer("max_seq_length", 128, "Tokens per sequence.", flag_values=fv)
        with train_utils.flag_group("Output", fv) as group:
            group.string("output_dir", None, "Where results go.")
        train_utils.require_flags("input_file", "output_dir")
    def main(argv):
        if flags.FLAGS.input_file == "bad":
            raise train_utils.UsageError("--input_file: bad is not a file")
        if flags.FLAGS.input_file == "unreadable":
            raise ValueError("unreadable: line 3 is not JSON")  # what our readers raise
        if flags.FLAGS.input_file == "full":
            import errno
            raise OSError(errno.ENOSPC, "No space left on device")
        print("ran", flags.FLAGS.input_file, flags.FLAGS.output_dir)
    if __name__ == "__main__":
        train_utils.run_script(main, __doc__, "python toy.py --input_file=a --output_dir=b", define_flags,
                               input_errors=(ValueError,))
''')


@pytest.fixture()
def toy(tmp_path, repo_root):
    path = tmp_path / "toy.py"
    path.write_text(SCRIPT)

    def run(*args):
        return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                              env={"PYTHONPATH": str(repo_root), "PATH": "/usr/bin:/bin"})
    return run


def test_help_groups_flags_under_headings(toy):
    proc = toy("--help")
    assert proc.returncode == 0
    out = proc.stdout
    assert "Toy script docstring." in out
    assert out.index("Input:") < out.index("--input_file (required)") < out.index("Output:")
    assert "--max_seq_length: Tokens per sequence. (default: 128)" in out


def test_missing_flags_are_all_named_with_an_example(toy):
    proc = toy("--max_seq_length=64")
    assert proc.returncode != 0
    assert "missing required flag(s): --input_file, --output_dir" in proc.stderr
    assert "python toy.py --input_file=a --output_dir=b" in proc.stderr


def test_unknown_flag_is_a_one_line_error(toy):
    proc = toy("--input_file=a", "--output_dir=b", "--nope=1")
    assert proc.returncode != 0 and "nope" in proc.stderr and "Traceback" not in proc.stderr


def test_complete_command_runs(toy):
    proc = toy("--input_file=a", "--output_dir=b")
    assert proc.returncode == 0 and "ran a b" in proc.stdout


def test_usage_error_is_one_line_with_exit_2(toy):
    proc = toy("--input_file=bad", "--output_dir=b")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "toy.py: error: --input_file: bad is not a file"


def test_full_disk_and_rejected_flag_values_are_one_line_with_exit_2(toy):
    proc = toy("--input_file=full", "--output_dir=b")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("toy.py: error: no space left on device (OSError); free space")
    proc = toy("--input_file=a", "--output_dir=b", "--max_seq_length=x")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("toy.py: error: flag --max_seq_length=x")


def test_stray_arguments_and_readers_value_errors_are_one_line_with_exit_2(toy):
    proc = toy("--input_file=a", "--output_dir=b", "extra", "words")
    assert proc.returncode == 2 and "ran" not in proc.stdout
    assert proc.stderr.strip() == "toy.py: error: unexpected arguments: extra words (flags are --name=value)"
    proc = toy("--input_file=unreadable", "--output_dir=b")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "toy.py: error: unreadable: line 3 is not JSON"


def test_flag_group_declares_on_its_own_flag_values():
    from absl import flags
    fv = flags.FlagValues()  # empty, hence falsy: the group must still use it, not flags.FLAGS
    with train_utils.flag_group("Toy", fv) as group:
        group.integer("steps", 3, "Steps.")
        group.enum("kind", "a", ["a", "b"], "Kind.")
    fv(["prog", "--steps=5", "--kind=b"])
    assert (fv.steps, fv.kind) == (5, "b") and "steps" not in flags.FLAGS


def test_progress_line_has_rate_and_eta():
    progress = train_utils.ProgressLogger(total=100, unit="steps", name="job")
    progress.update(10)
    line = progress.line(loss=1.5)
    assert line.startswith("job: 10/100 steps, ") and "steps/s" in line and "ETA" in line
    assert line.endswith("loss=1.5")


def test_unknown_strategy_is_rejected():
    with pytest.raises(train_utils.UsageError, match="--strategy='gpu' is not one of"):
        train_utils.make_strategy("gpu")


@pytest.mark.skipif(os.path.exists("/proc/driver/nvidia"), reason="start-up lines are kept on GPU machines")
def test_tensorflow_start_up_noise_is_hidden_when_train_utils_comes_first(repo_root):
    code = "import train_utils, tensorflow as tf; print(int(tf.constant(2) * 3))"
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "ROBERTA_ZH_TF_STARTUP_LOG")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "6", proc.stderr
    for noise in ("oneDNN", "cuda drivers", "cuInit", "absl::InitializeLog"):
        assert noise not in proc.stderr, proc.stderr
