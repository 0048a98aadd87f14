"""optimization.py: updates checked against numpy re-implementations of Google's formulas, the
schedule, flag checks, and model.fit + checkpoint round trip. Gradient accumulation and
multi-replica equivalence are the trainer's and are tested in test_run_pretraining.py."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import modeling
import optimization

CONFIG = modeling.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=16,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def google_decays(google_name):
    # google-research/bert optimization.py: exclude_from_weight_decay=["LayerNorm", "layer_norm", "bias"]
    return not any(p in google_name for p in ("LayerNorm", "layer_norm", "bias"))


def clip_by_global_norm(grads, clip_norm):
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads))
    return [g * (clip_norm / max(norm, clip_norm)) for g in grads]


def tiny_model(seed=0):
    keras.utils.set_random_seed(seed)
    return modeling.build_model(modeling.BertPretrainer(CONFIG))


def random_grads(table, seed, scale=0.5):
    rng = np.random.RandomState(seed)
    return [rng.normal(0, scale, w.variable.shape).astype(np.float32) for w in table]


def test_schedule_warms_up_linearly_then_decays_linearly_to_zero_like_google():
    schedule = optimization.WarmupPolynomialDecay(1e-3, num_train_steps=100, num_warmup_steps=10)
    lr = {step: float(schedule(step)) for step in (0, 5, 9, 10, 50, 100, 150)}
    # Warmup: init_lr * step / warmup. After: Google's polynomial decay of the *global* step.
    expected = {0: 0.0, 5: 5e-4, 9: 9e-4, 10: 9e-4, 50: 5e-4, 100: 0.0, 150: 0.0}
    for step, value in expected.items():
        assert lr[step] == pytest.approx(value, abs=1e-9), step
    assert float(optimization.WarmupPolynomialDecay(2e-5, 10, 0)(0)) == pytest.approx(2e-5)


def test_adamw_updates_equal_googles_formula_without_bias_correction():
    model = tiny_model()
    table = modeling.name_table(model)
    optimizer = optimization.create_optimizer(1e-2, num_train_steps=4, num_warmup_steps=0, beta_2=0.98)
    weights = [w.variable.numpy().astype(np.float64) for w in table]
    m = [np.zeros_like(w) for w in weights]
    v = [np.zeros_like(w) for w in weights]
    for step in range(2):
        grads = random_grads(table, seed=step)                      # global norm >> 1: clipped
        optimizer.apply_gradients(zip(grads, [w.variable for w in table]))
        lr = 1e-2 * (1 - step / 4)
        for i, (w, g) in enumerate(zip(table, clip_by_global_norm(grads, 1.0))):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.98 * v[i] + 0.02 * g * g
            update = m[i] / (np.sqrt(v[i]) + 1e-6)
            if google_decays(w.google_name):
                update += 0.01 * weights[i]
            weights[i] = weights[i] - lr * update
    for w, expected in zip(table, weights):
        np.testing.assert_allclose(w.variable.numpy(), expected, rtol=1e-5, atol=1e-6,
                                   err_msg=w.google_name)
    decayed = {w.google_name for w in table if optimizer._decays(w.variable)}
    assert decayed == {w.google_name for w in table if google_decays(w.google_name)}
    assert "bert/embeddings/LayerNorm/gamma" not in decayed and "cls/predictions/output_bias" not in decayed


def test_lamb_update_equals_trust_ratio_formula():
    model = tiny_model()
    table = modeling.name_table(model)
    optimizer = optimization.create_optimizer(1e-2, num_train_steps=10, num_warmup_steps=0,
                                              optimizer_type="lamb", clip_norm=0)
    before = [w.variable.numpy().astype(np.float64) for w in table]
    grads = random_grads(table, seed=5, scale=0.01)
    optimizer.apply_gradients(zip(grads, [w.variable for w in table]))
    for w, weight, g in zip(table, before, grads):
        m_hat = 0.1 * g / (1 - 0.9)                                  # bias-corrected at step 1
        v_hat = 0.001 * g * g / (1 - 0.999)
        update = m_hat / (np.sqrt(v_hat) + 1e-6)
        ratio = 1.0
        if google_decays(w.google_name):
            update += 0.01 * weight
            ratio = np.linalg.norm(weight) / np.linalg.norm(update)
        np.testing.assert_allclose(w.variable.numpy(), weight - 1e-2 * ratio * update,
                                   rtol=1e-5, atol=1e-6, err_msg=w.google_name)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="--optimizer='sgd' is not one of"):
        optimization.create_optimizer(1e-4, 10, 1, optimizer_type="sgd")
    with pytest.raises(ValueError, match="num_warmup_steps must be in"):
        optimization.create_optimizer(1e-4, 10, 20)
    for bad in (0.0, -1e-4, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="learning_rate must be a positive finite number"):
            optimization.create_optimizer(bad, 10, 1)
    with pytest.raises(ValueError, match="num_warmup_steps must be in"):
        optimization.create_optimizer(1e-4, 10, -1)


@pytest.mark.parametrize("kind", ["adamw", "lamb"])
def test_each_apply_is_one_update_from_exactly_the_gradients_given(kind):
    """One gradient owner: the trainers accumulate micro-batches and sum replicas; the optimizer holds
    the schedule and the update rule only. So every apply_gradients is one update (no accumulation
    window in which the weights stand still), and the update depends on nothing but the gradients
    given (two optimizers fed the same gradients end at the same weights)."""
    rng = np.random.RandomState(0)
    grads = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(4)]
    finals = []
    for _ in range(2):
        optimizer = optimization.create_optimizer(1e-2, num_train_steps=10, num_warmup_steps=0,
                                                  optimizer_type=kind, clip_norm=0)
        assert optimizer.gradient_accumulation_steps is None
        variable = keras.Variable(np.ones((3, 2), np.float32))
        optimizer.build([variable])
        for step, g in enumerate(grads, 1):
            before = variable.numpy().copy()
            optimizer.apply_gradients([(tf.constant(g), variable)])
            assert int(optimizer.iterations.numpy()) == step
            assert not np.array_equal(variable.numpy(), before), f"step {step} left the weights alone"
        finals.append(variable.numpy())
    np.testing.assert_array_equal(finals[0], finals[1])


def test_model_fit_trains_and_optimizer_state_resumes_from_checkpoint(tmp_path):
    keras.utils.set_random_seed(0)
    model = modeling.build_model(modeling.BertClassifier(CONFIG, num_labels=2))
    optimizer = optimization.create_optimizer(1e-2, num_train_steps=30, num_warmup_steps=3)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.RandomState(0)
    ids = rng.randint(5, CONFIG.vocab_size, (32, 8)).astype(np.int32)
    labels = (ids[:, 1] % 2).astype(np.int32)                        # learnable from one token
    history = model.fit({"input_ids": ids}, labels, batch_size=16, epochs=6, verbose=0)
    assert history.history["loss"][-1] < 0.7 * history.history["loss"][0]
    assert int(optimizer.iterations.numpy()) == 6 * 2

    path = modeling.make_checkpoint(model, optimizer=optimizer).save(str(tmp_path / "ckpt"))
    restored = modeling.build_model(modeling.BertClassifier(CONFIG, num_labels=2))
    new_optimizer = optimization.create_optimizer(1e-2, 30, 3)
    new_optimizer.build(restored.trainable_variables)
    modeling.make_checkpoint(restored, optimizer=new_optimizer).restore(path).assert_consumed()
    assert int(new_optimizer.iterations.numpy()) == 12
    for a, b in zip(new_optimizer.variables, optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# -- the same classes on JAX: Keras' stateless_apply (what pretraining_jax.py calls) ----------------

_NAMES = ("dense_kernel", "dense_bias", "LayerNorm_gamma")  # variable paths: only the last two match
                                                           # NO_DECAY_PATTERNS


def _updates_script(optimizer_type, steps=3):
    """Python source that applies `steps` updates of fixed gradients to three named variables with
    optimization.create_optimizer under the current backend and prints the results as JSON."""
    return f"""
import json, keras, numpy as np
import optimization
rng = np.random.RandomState(0)
values = [rng.normal(0, 1, (4, 3)).astype("float32"), rng.normal(0, 1, (3,)).astype("float32"),
          rng.normal(1, 0.1, (3,)).astype("float32")]
grads = [[rng.normal(0, 0.5, v.shape).astype("float32") for v in values] for _ in range({steps})]
variables = [keras.Variable(value, name=name) for name, value in zip({_NAMES!r}, values)]
opt = optimization.create_optimizer(1e-2, num_train_steps=10, num_warmup_steps=2,
                                    optimizer_type={optimizer_type!r}, beta_2=0.98, clip_norm=0)
opt.build(variables)
if keras.backend.backend() == "jax":
    import jax
    step = jax.jit(opt.stateless_apply)
    weights, slots = [v.value for v in variables], [v.value for v in opt.variables]
    for g in grads:
        weights, slots = step(slots, g, weights)
    out = [np.asarray(w).tolist() for w in weights]
else:
    for g in grads:
        opt.apply_gradients(zip(g, variables))
    out = [v.numpy().tolist() for v in variables]
print("RESULT" + json.dumps({{"after": out, "before": [v.tolist() for v in values],
                            "decays": [opt._decays(v) for v in variables]}}))
"""


def _run_updates(backend, optimizer_type):
    import json
    import os
    import subprocess
    import sys

    block_tf = 'import sys; sys.modules["tensorflow"] = None\n' if backend == "jax" else ""
    env = dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", block_tf + _updates_script(optimizer_type)],
                          check=False, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("optimizer_type", ["adamw", "lamb"])
def test_same_optimizer_classes_give_the_same_updates_on_jax_without_tensorflow(optimizer_type):
    pytest.importorskip("jax")
    on_tf = _run_updates("tensorflow", optimizer_type)
    on_jax = _run_updates("jax", optimizer_type)  # tensorflow blocked in that process
    assert on_tf["decays"] == on_jax["decays"] == [True, False, False]
    for name, before, a, b in zip(_NAMES, on_tf["before"], on_tf["after"], on_jax["after"]):
        assert np.abs(np.subtract(a, before)).max() > 1e-3, name  # three real updates
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=name)
