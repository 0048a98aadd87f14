"""demo.py end to end, as shipped: every stage runs and its output is what a user should see."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_every_stage_and_outputs_are_sane(tmp_path, repo_root):
    pytest.importorskip("snownlp")
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "demo"
    proc = subprocess.run(
        # The demo as shipped (about 2.5 minutes on 2 idle cores): at smaller sizes the tiny model's
        # fine-tuning stays at chance, which would hide a real failure behind a weak assertion.
        [sys.executable, "demo.py", f"--output_dir={out}"],
        cwd=repo_root, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo finished" in proc.stdout

    import tensorflow as tf

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    # Records parse and their count matches the sidecar.
    records = out / "records" / "train.tfrecord"
    meta = json.loads((out / "records" / "train.tfrecord.meta.json").read_text())
    assert sum(1 for _ in tf.data.TFRecordDataset(str(records))) == meta["num_instances"] > 0
    # Pretraining lowered the loss; eval metrics are finite and consistent.
    first, last = summary["train_loss_first_last"]
    assert last < first - 0.5
    ev = summary["pretrain_eval"]
    # An untrained model is right on ~1/9339 of the masked tokens; 400 steps learn the frequent ones.
    assert ev["global_step"] == 400 and ev["masked_lm_accuracy"] > 0.02
    assert abs(ev["perplexity"] - __import__("math").exp(ev["masked_lm_loss"])) < 1e-2 * ev["perplexity"]
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    import plot_learning_curve  # the plot finds every series a real pretraining run writes

    series = plot_learning_curve.find_series(plot_learning_curve.read_scalars(str(out / "pretrain")))
    assert series["loss"] and series["accuracy"] and series["learning_rate"], series
    # The dev set is balanced (majority class 0.5): the fine-tuned classifier must beat it.
    assert summary["finetune_dev"]["accuracy"] > 0.6, summary["finetune_dev"]
    # Exported folders load in transformers offline.
    for folder, cls in (("hf_mlm", transformers.BertForMaskedLM),
                        ("hf_sentiment", transformers.BertForSequenceClassification)):
        model = cls.from_pretrained(str(out / folder))
        assert model.config.model_type == "bert"
    assert len(summary["fill_mask"][1]) == 5


# ------------------------------------------------------------------------------------------------
# What the user sees while a stage runs, and where a second demo goes (fast: no real stage runs)
# ------------------------------------------------------------------------------------------------

# A stage that prints one progress line, then waits (up to 20 s) for the test to create a file.
_WAITING_STAGE = (
    "import os, sys, time\n"
    "print('I1203 13:36:58.715773 1 train_utils.py:190] ' + 'pre' + 'train: 1/8 steps, 0.5 steps/s, "
    "ETA 0:14', flush=True)\n"  # (split: the echoed command line must not contain it)
    "deadline = time.time() + 20\n"
    "while not os.path.exists(sys.argv[1]) and time.time() < deadline:\n"
    "    time.sleep(0.05)\n")


def _run_in_thread(stage_args, log_dir):
    import threading

    import demo

    thread = threading.Thread(target=demo.run, args=("pretrain", stage_args, str(log_dir)))
    thread.start()
    return thread


def test_stage_progress_lines_reach_the_terminal_while_the_stage_runs(tmp_path, monkeypatch):
    import io
    import time

    import train_utils

    stdout = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stdout)
    release = tmp_path / "release"
    thread = _run_in_thread(["-c", _WAITING_STAGE, str(release)], tmp_path)
    deadline = time.time() + 15
    echoed = "  [pretrain] pretrain: 1/8 steps, 0.5 steps/s, ETA 0:14"
    while echoed not in stdout.getvalue() and time.time() < deadline:
        time.sleep(0.05)
    seen_while_running = thread.is_alive() and echoed in stdout.getvalue()
    release.touch()
    thread.join()
    assert seen_while_running, stdout.getvalue()
    assert (tmp_path / "pretrain.log").read_text().count("ETA 0:14") == 1
    # The pattern demo.py echoes is the one ProgressLogger writes.
    progress = train_utils.ProgressLogger(total=400, name="pretrain")
    assert train_utils.ProgressLogger.find_line("I1203 1 x.py:1] " + progress.line(loss=7.5)) == (
        progress.line(loss=7.5))


def test_a_quiet_stage_says_it_is_still_running(tmp_path, monkeypatch, capsys):
    import demo

    monkeypatch.setattr(demo, "HEARTBEAT_SECONDS", 0.5, raising=False)
    demo.run("data", ["-c", "import time; time.sleep(3)"], str(tmp_path))
    assert "[data] still running, 0:0" in capsys.readouterr().out


def _parse_demo_flags(monkeypatch, *argv):
    from absl import flags

    import demo

    fv = flags.FlagValues()
    demo.define_flags(fv)
    fv(["demo.py", *argv])
    monkeypatch.setattr(demo, "FLAGS", fv)
    return demo


def test_a_second_demo_on_other_text_gets_its_own_folder_and_keeps_the_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, text in (("first.txt", "一句话。\n"), ("my.txt", "另一句话。\n")):
        (tmp_path / name).write_text(text, encoding="utf-8")
    demo = _parse_demo_flags(monkeypatch, "--corpus=first.txt")
    first = demo.claim_output_dir(demo.demo_settings())
    assert first == str(tmp_path / "demo_output_first")
    (tmp_path / "demo_output_first" / "logs" / "data.log").write_text("finished")
    held = (tmp_path / "demo_output_first" / "demo_run.json").read_text()

    demo = _parse_demo_flags(monkeypatch, "--corpus=my.txt")
    assert demo.claim_output_dir(demo.demo_settings()) == str(tmp_path / "demo_output_my")
    # The same settings come back to their folder; other settings never take an existing one.
    demo = _parse_demo_flags(monkeypatch, "--corpus=first.txt")
    assert demo.claim_output_dir(demo.demo_settings()) == first
    demo = _parse_demo_flags(monkeypatch, "--corpus=first.txt", "--pretrain_steps=8")
    assert demo.claim_output_dir(demo.demo_settings()) == str(tmp_path / "demo_output_first-2")
    assert (tmp_path / "demo_output_first" / "demo_run.json").read_text() == held
    assert (tmp_path / "demo_output_first" / "logs" / "data.log").read_text() == "finished"
    # An explicit --output_dir holding another demo is refused, untouched.
    demo = _parse_demo_flags(monkeypatch, "--corpus=my.txt", f"--output_dir={first}")
    import train_utils
    with pytest.raises(train_utils.UsageError, match="holds a demo with other settings .corpus"):
        demo.claim_output_dir(demo.demo_settings())
    assert (tmp_path / "demo_output_first" / "demo_run.json").read_text() == held


def test_output_folder_names_follow_the_corpus(monkeypatch):
    import demo

    assert demo.default_output_dir(None) == "demo_output"
    assert demo.default_output_dir("data/my.txt") == "demo_output_my"
    assert demo.default_output_dir("/x/zhwiki_00.txt.xz") == "demo_output_zhwiki_00"
    assert demo.default_output_dir("corpus/*.txt") == "demo_output_corpus"
    assert demo.default_output_dir("新闻 语料.txt") == "demo_output_新闻_语料"


@pytest.mark.slow
def test_make_demo_data_after_make_demo_just_works_and_keeps_the_first(tmp_path, repo_root):
    """Two demos on two tiny corpora from one folder, then the first again: all exit 0, each in its
    own folder; the second leaves the first's files as they were; the rerun reuses its stages."""
    pytest.importorskip("snownlp")
    corpus = sorted((repo_root / "resources" / "corpus").glob("*.txt"))
    for name, path in (("a.txt", corpus[0]), ("b.txt", corpus[1])):
        (tmp_path / name).write_bytes(path.read_bytes())
    tiny = ["--pretrain_steps=2", "--finetune_examples=32", "--dev_examples=16", "--finetune_epochs=1"]

    def demo(*args):
        proc = subprocess.run([sys.executable, str(repo_root / "demo.py"), *tiny, *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    def snapshot(folder):
        return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}

    assert "everything is under demo_output_a" in demo("--corpus=a.txt")
    first = snapshot(tmp_path / "demo_output_a")
    assert "everything is under demo_output_b" in demo("--corpus=b.txt")
    assert snapshot(tmp_path / "demo_output_a") == first
    again = demo("--corpus=a.txt")
    assert "[pretrain] finished in an earlier run of this demo: reused" in again
    assert "everything is under demo_output_a" in again


def test_make_install_shows_its_progress(tmp_path, repo_root):
    """`make demo` / `make test` start with an install of several minutes: pip runs with its own
    progress lines (never --quiet), each step announced."""
    venv = tmp_path / "venv"
    proc = subprocess.run(["make", "-n", "demo", f"VENV={venv}"], cwd=repo_root, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    pip_lines = [line for line in proc.stdout.splitlines() if "pip install" in line]
    assert len(pip_lines) == 2 and not any("--quiet" in line or " -q" in line for line in pip_lines)
    assert "[install 1/2]" in proc.stdout and "[install 2/2]" in proc.stdout
    assert f"{venv}/bin/python demo.py" in proc.stdout
