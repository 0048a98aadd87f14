"""benchmarks/pretraining_value.py: the carving never leaks scoring rows into training, the rate is
chosen on validation (never on the scoring set), the noise rule, and the whole --smoke pipeline."""

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import pretraining_value  # noqa: E402


def test_carved_splits_are_disjoint_and_scoring_rows_stay_out_of_training(shared_data, tmp_path):
    spec = dict(pretraining_value.TASKS["cluener"], n_train=50, n_test=30)
    paths, gold, train_rows = pretraining_value.carve("cluener", spec, str(shared_data), str(tmp_path), 0.2, 7)
    rows = {s: open(paths[s], encoding="utf-8").read().splitlines() for s in ("train", "val", "test")}
    assert [len(rows[s]) for s in ("train", "val", "test")] == [40, 10, 30]
    assert not set(rows["test"]) & (set(rows["train"]) | set(rows["val"]))
    assert not set(rows["train"]) & set(rows["val"]) and gold is None and train_rows == rows["train"]

    spec = dict(pretraining_value.TASKS["senti100"], n_train=20)
    paths, gold, _ = pretraining_value.carve("senti", spec, str(shared_data), str(tmp_path), 0.25, 7)
    train = open(paths["train"], encoding="utf-8").read().splitlines()
    assert train[0] == "label\ttext_a" and len(train) == 1 + 15  # header kept for run_classifier's task
    assert len(gold) == 1200 and set(gold) == {"0", "1"}  # the whole ChnSentiCorp dev set scores


def test_rate_is_chosen_on_validation_not_on_the_scoring_set():
    runs = {1e-4: [{"val": 0.9, "test": 0.6, "best_epoch": 2}, {"val": 0.8, "test": 0.5, "best_epoch": 3}],
            3e-4: [{"val": 0.5, "test": 0.99, "best_epoch": 1}, {"val": 0.6, "test": 0.98, "best_epoch": 1}]}
    row = pretraining_value.summarize("t", "random", runs)
    assert row["lr"] == 1e-4 and row["test"] == [0.6, 0.5] and row["epochs"] == [2, 3]
    assert row["test_mean"] == pytest.approx(0.55) and row["test_std"] == pytest.approx(0.0707, abs=1e-4)


def test_a_gain_counts_only_beyond_two_standard_errors():
    random_row = {"test_mean": 0.80, "test_std": 0.02, "n_seeds": 3}
    close = pretraining_value.compare({"test_mean": 0.82, "test_std": 0.02, "n_seeds": 3}, random_row)
    clear = pretraining_value.compare({"test_mean": 0.86, "test_std": 0.02, "n_seeds": 3}, random_row)
    one_seed = pretraining_value.compare({"test_mean": 0.9, "test_std": 0.0, "n_seeds": 1},
                                         dict(random_row, test_std=0.0, n_seeds=1))
    worse = pretraining_value.compare({"test_mean": 0.74, "test_std": 0.02, "n_seeds": 3}, random_row)
    assert close["gain"] == pytest.approx(0.02) and not close["wins"] and not close["loses"]
    assert worse["loses"] and not worse["wins"]
    assert clear["wins"] and clear["gain_se"] == pytest.approx(0.0163, abs=1e-4)
    assert not one_seed["wins"] and not one_seed["loses"]  # no spread, no claim


@pytest.mark.slow
def test_smoke_pretrains_evaluates_and_fine_tunes_both_arms(shared_data, repo_root, tmp_path):
    out = tmp_path / "value"
    proc = subprocess.run([sys.executable, "benchmarks/pretraining_value.py", "--smoke", f"--output_dir={out}",
                           "--tasks=senti100", f"--data_dir={shared_data}"], cwd=repo_root, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [r["arm"] for r in results["rows"]] == ["random", "ckpt-20"]
    assert results["arms"]["ckpt-20"]["cpu_s"] > 0
    assert 0 < results["arms"]["ckpt-20"]["mlm"]["masked_lm_loss"] < 20
    assert all(0 <= r["test_mean"] <= 1 and r["n_seeds"] == 1 for r in results["rows"])
    assert results["majority_baseline"]["senti100"] == pytest.approx(0.5, abs=0.2)
    assert (out / "results.md").read_text(encoding="utf-8").count("| senti100 |") == 2
    assert (out / "pretraining_value.png").stat().st_size > 1000
    assert not list(out.glob("runs/*/*/*/best"))  # fine-tuned weights deleted once scored


def test_unknown_task_is_a_one_line_usage_error(repo_root, tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/pretraining_value.py", f"--output_dir={tmp_path}",
                           "--tasks=senti100,mnli"], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--tasks: unknown ['mnli']" in proc.stderr.strip().splitlines()[-1]
