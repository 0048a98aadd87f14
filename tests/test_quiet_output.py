"""What a normal run prints: one line per fact, no noise from our tools or from the libraries we drive.

The generator (local and Beam) and the transformers load of our exports.
"""

import pathlib

import pytest
from conftest import RESOURCES

import create_pretraining_data as cpd

CORPUS = sorted(str(p) for p in (RESOURCES / "corpus").glob("*.txt"))
VOCAB = str(RESOURCES / "vocab.txt")


def _corpus_with_long_lines(tmp_path, count):
    """A corpus whose lines 1, 3, 5, ... are each longer than a 64-token sequence."""
    text = pathlib.Path(CORPUS[0]).read_text(encoding="utf-8")
    long_line = "".join(ch for ch in text if "\u4e00" <= ch <= "\u9fff")[:150]
    path = tmp_path / "long.txt"
    path.write_text("\n\n".join([long_line] * count) + "\n\n" + text, encoding="utf-8")
    return path


def _generate(tmp_path, path, **options):
    lines = []
    o = cpd.Options(input_file=str(path), output_file=str(tmp_path / "out.tfrecord"),
                    vocab_file=VOCAB, max_seq_length=64, max_predictions_per_seq=10, dupe_factor=1,
                    **options)
    summary = cpd.generate(o, log=lines.append)
    return summary, lines


def test_long_lines_are_counted_in_one_warning_line(tmp_path):
    path = _corpus_with_long_lines(tmp_path, 8)
    summary, lines = _generate(tmp_path, path)
    warnings = [line for line in lines if "warning" in line]
    assert summary["split_lines"] == 8
    assert len(warnings) == 1, lines
    assert "8 input lines longer than a sequence (62 tokens) split" in warnings[0]
    assert f"{path}:1 (" in warnings[0] and warnings[0].endswith(", ...")
    assert "8 long lines split" in lines[-1]


def test_dynamic_summary_says_masks_come_at_training_time(tmp_path):
    summary, lines = _generate(tmp_path, CORPUS[0], dynamic_masking=True)
    assert summary["predictions"] == 0  # the counter stays (sidecar, API); the line says why
    assert "masks drawn at training time" in lines[-1] and "0 predictions" not in lines[-1]
    (tmp_path / "s").mkdir()
    static, lines = _generate(tmp_path / "s", CORPUS[0])
    assert f"{static['predictions']} predictions" in lines[-1] and static["predictions"] > 0



@pytest.mark.slow
def test_a_normal_beam_run_prints_only_our_lines_and_each_workers_start_up(tmp_path, repo_root):
    """DirectRunner with two worker processes. Left: the two lines each worker process prints while
    it imports Beam, before any option of ours reaches it (apitools, "Logging handler created")."""
    import subprocess
    import sys

    pytest.importorskip("apache_beam")
    proc = subprocess.run(
        [sys.executable, "create_pretraining_data.py", "--runner=DirectRunner", "--num_workers=2",
         f"--input_file={','.join(CORPUS[:2])}", f"--output_file={tmp_path / 'train.tfrecord'}",
         f"--vocab_file={VOCAB}", "--max_seq_length=64", "--max_predictions_per_seq=8",
         "--num_output_shards=2"],
        cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    worker_start_up = ("WARNING:root:apitools not found", "INFO:__main__:Logging handler created.")
    others = [line for line in lines if not line.startswith(("create_pretraining_data: ", *worker_start_up))]
    assert others == [], "\n".join(others)
    assert sum(line.startswith(worker_start_up) for line in lines) <= 4
    assert proc.stdout.splitlines()[-1].startswith("create_pretraining_data: wrote ")
