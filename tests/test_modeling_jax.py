"""The same model on the JAX backend: weights saved under TensorFlow give the same logits under
KERAS_BACKEND=jax, in a process where TensorFlow cannot be imported (as on the GPU machine)."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from test_export import LABELS, padded_batch, randomize, tiny_config

import modeling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a fresh interpreter: TensorFlow blocked before any import, then the JAX backend.
JAX_SIDE = r"""
import sys
sys.modules["tensorflow"] = None  # any import of it now fails
import os
os.environ["KERAS_BACKEND"] = "jax"
sys.path.insert(0, sys.argv[1])
import jax
import numpy as np
import keras
import modeling
assert keras.backend.backend() == "jax"
data = dict(np.load(os.path.join(sys.argv[2], "inputs.npz")))
config = modeling.BertConfig.from_json_file(os.path.join(sys.argv[2], "bert_config.json"))
out = {}
for task in ("mlm", "classifier", "ner", "qa"):
    model = modeling.make_task_model(config, task, num_labels=int(data["num_labels_" + task]))
    report = modeling.load_pretrained(model, os.path.join(sys.argv[2], task + ".weights.safetensors"))
    assert not report.newly_initialized and not report.unused, report
    # Jitted as a trainer runs it (one XLA program: faster here than op-by-op eager dispatch).
    forward = jax.jit(lambda trainable, frozen, x, model=model: model.stateless_call(trainable, frozen, x)[0])
    logits = forward([v.value for v in model.trainable_variables],
                     [v.value for v in model.non_trainable_variables],
                     {k: data[k] for k in ("input_ids", "input_mask", "segment_ids", "masked_lm_positions")})
    out[task] = np.stack([np.asarray(t) for t in logits]) if task == "qa" else np.asarray(logits)
np.savez(os.path.join(sys.argv[2], "jax_logits.npz"), **out)
try:  # a TF checkpoint here is a one-line error naming it, not an ImportError
    modeling.load_pretrained(model, os.path.join(sys.argv[2], "tf", "ckpt-1"))
except ValueError as e:
    print("TF checkpoint:", e)
print("tensorflow imported:", sys.modules["tensorflow"] is not None)
"""


@pytest.mark.skipif(importlib.util.find_spec("jax") is None,
                    reason="jax is not installed (pip install -e '.[jax]')")
def test_the_four_heads_give_the_same_logits_under_jax_without_tensorflow(tmp_path):
    config = tiny_config()
    config.to_json_file(tmp_path / "bert_config.json")
    ids, mask, segments = padded_batch()  # the second row padded
    inputs = {"input_ids": ids, "input_mask": mask, "segment_ids": segments,
              "masked_lm_positions": np.array([[1, 4, 7], [2, 3, 0]], np.int32)}
    expected = {}
    for seed, task in enumerate(("mlm", "classifier", "ner", "qa")):
        num_labels = len(LABELS.get(task, ()))
        model = randomize(modeling.make_task_model(config, task, num_labels or None), seed)
        modeling.save_weights(model, tmp_path / f"{task}.weights.safetensors")
        if task == "qa":
            modeling.make_checkpoint(model).write(str(tmp_path / "tf" / "ckpt-1"))
        logits = model(inputs)
        expected[task] = np.stack([t.numpy() for t in logits]) if task == "qa" else logits.numpy()
        inputs[f"num_labels_{task}"] = np.int32(num_labels)
    np.savez(tmp_path / "inputs.npz", **inputs)

    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", JAX_SIDE, REPO, str(tmp_path)], capture_output=True,
                            text=True, timeout=300, env=env, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tensorflow imported: False" in result.stdout
    assert f"TF checkpoint: {tmp_path}/tf/ckpt-1.index: reading it needs TensorFlow" in result.stdout
    got = np.load(tmp_path / "jax_logits.npz")
    for task, want in expected.items():
        assert got[task].shape == want.shape and got[task].dtype == np.float32
        np.testing.assert_allclose(got[task], want, atol=1e-5, rtol=0, err_msg=task)
