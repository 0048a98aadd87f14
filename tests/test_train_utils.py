"""train_utils: strategy choice, progress lines, grouped --help and missing-flag messages."""

import subprocess
import sys
import textwrap

import pytest

import train_utils

SCRIPT = textwrap.dedent('''
    """Toy script docstring."""
    from absl import flags
    import train_utils
    with train_utils.flag_group("Input"):
        flags.DEFINE_string("input_file", None, "Files to read.")
        flags.DEFINE_integer("max_seq_length", 128, "Tokens per sequence.")
    with train_utils.flag_group("Output"):
        flags.DEFINE_string("output_dir", None, "Where results go.")
    train_utils.require_flags("input_file", "output_dir")
    def main(argv):
        print("ran", flags.FLAGS.input_file, flags.FLAGS.output_dir)
    if __name__ == "__main__":
        train_utils.run_script(main, __doc__, "python toy.py --input_file=a --output_dir=b")
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


def test_progress_line_has_rate_and_eta():
    progress = train_utils.ProgressLogger(total=100, unit="steps", name="job")
    progress.update(10)
    line = progress.line(loss=1.5)
    assert line.startswith("job: 10/100 steps, ") and "steps/s" in line and "ETA" in line
    assert line.endswith("loss=1.5")


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError, match="--strategy='gpu' is not one of"):
        train_utils.make_strategy("gpu")
