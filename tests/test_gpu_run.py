"""benchmarks/gpu_run.sh, the prepared GPU run: its --smoke mode runs every step on this CPU under JAX
(records, benchmark, pretraining, weights export) on tiny data, in a few minutes."""

import json
import os
import subprocess
import sys
import tarfile

import pytest
from conftest import REPO_ROOT


@pytest.mark.slow
def test_gpu_run_smoke_runs_end_to_end_and_brings_back_small_weight_files(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_run.sh"), "--smoke"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    weights = sorted(p for p in (out / "weights").iterdir())
    shards = [p for p in weights if p.name.endswith(".safetensors")]
    assert len(shards) >= 2 and all(p.stat().st_size <= 2 << 20 for p in shards)  # --smoke: 2 MiB
    index = json.loads((out / "weights" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    with tarfile.open(out / "run_folder.tar.gz") as tar:
        names = tar.getnames()
    assert "run/bert_config.json" in names and "run/vocab.txt" in names
    assert not any("ckpt-" in n for n in names)  # the weights travel as the shards only
    assert "run/bench_gpu.json" in names and "run/pretraining.log" in names
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8  # what comes back from the device
    # The shards load into the model the run trained (float16 or float32, read as float32).
    code = ("import sys, modeling; c = modeling.BertConfig.from_json_file(sys.argv[1]); "
            "m = modeling.build_model(modeling.BertPretrainer(c), seq_len=8); "
            "r = modeling.load_pretrained(m, sys.argv[2]); print(len(r.loaded))")
    with tarfile.open(out / "run_folder.tar.gz") as tar:
        tar.extract("run/bert_config.json", tmp_path, filter="data")
    load = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run" / "bert_config.json"),
                           str(out / "weights" / "model.safetensors")],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO_ROOT),
                          env=dict(os.environ, KERAS_BACKEND="jax"))
    assert load.returncode == 0, load.stderr[-2000:]
    assert int(load.stdout.strip().splitlines()[-1]) > 10
