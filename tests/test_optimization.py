"""optimization.py: updates checked against numpy re-implementations of Google's formulas, the
schedule, gradient accumulation (k micro-batches == one k-times larger batch), and strategies."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import modeling
import optimization
from conftest import REPO_ROOT

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


def mlm_batch(n, seed=0):
    rng = np.random.RandomState(seed)
    return (rng.randint(0, CONFIG.vocab_size, (n, 8)).astype(np.int32),
            rng.randint(0, 8, (n, 2)).astype(np.int32),
            rng.randint(0, CONFIG.vocab_size, (n, 2)).astype(np.int32))


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


def _train(accumulation_steps, optimizer_type, updates=2, batch=8):
    """`updates` optimizer updates over batches of `batch`, each split into micro-batches."""
    model = tiny_model()
    optimizer = optimization.create_optimizer(
        1e-3, num_train_steps=10, num_warmup_steps=1, optimizer_type=optimizer_type,
        beta_2=0.98, gradient_accumulation_steps=accumulation_steps)
    optimizer.build(model.trainable_variables)
    ids, positions, labels = mlm_batch(batch * updates)
    micro = batch // accumulation_steps

    @tf.function
    def step(ids, positions, labels):
        with tf.GradientTape() as tape:
            logits = model({"input_ids": ids, "masked_lm_positions": positions}, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                labels, logits, from_logits=True))                  # mean over the micro-batch
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    learning_rates = []
    for start in range(0, batch * updates, micro):
        learning_rates.append(float(optimizer.learning_rate))
        step(ids[start:start + micro], positions[start:start + micro], labels[start:start + micro])
    return [v.numpy() for v in model.trainable_variables], optimizer, learning_rates


@pytest.mark.parametrize("optimizer_type", ["adamw", "lamb"])
def test_accumulated_micro_batches_equal_one_large_batch(optimizer_type):
    large, large_opt, _ = _train(1, optimizer_type)
    accumulated, acc_opt, learning_rates = _train(4, optimizer_type)
    assert int(acc_opt.iterations.numpy()) == int(large_opt.iterations.numpy()) == 2
    # The schedule counts updates, not micro-batches: warmup step 0 then 1e-3 * (1 - 1/10).
    assert learning_rates == pytest.approx([0.0] * 4 + [9e-4] * 4)
    for a, b in zip(accumulated, large):
        np.testing.assert_allclose(a, b, atol=2e-6)
    initial = [v.numpy() for v in tiny_model().trainable_variables]
    assert all(np.abs(a - b).max() > 0 for a, b in zip(large, initial))  # every weight moved


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="--optimizer='sgd' is not one of"):
        optimization.create_optimizer(1e-4, 10, 1, optimizer_type="sgd")
    with pytest.raises(ValueError, match="num_warmup_steps must be in"):
        optimization.create_optimizer(1e-4, 10, 20)
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be >= 1"):
        optimization.create_optimizer(1e-4, 10, 1, gradient_accumulation_steps=0)


def test_model_fit_trains_and_optimizer_state_resumes_from_checkpoint(tmp_path):
    keras.utils.set_random_seed(0)
    model = modeling.build_model(modeling.BertClassifier(CONFIG, num_labels=2))
    optimizer = optimization.create_optimizer(1e-2, num_train_steps=30, num_warmup_steps=3,
                                              gradient_accumulation_steps=2)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.RandomState(0)
    ids = rng.randint(5, CONFIG.vocab_size, (32, 8)).astype(np.int32)
    labels = (ids[:, 1] % 2).astype(np.int32)                        # learnable from one token
    history = model.fit({"input_ids": ids}, labels, batch_size=8, epochs=6, verbose=0)
    assert history.history["loss"][-1] < 0.7 * history.history["loss"][0]
    assert int(optimizer.iterations.numpy()) == 6 * 4 // 2

    path = modeling.make_checkpoint(model, optimizer=optimizer).save(str(tmp_path / "ckpt"))
    restored = modeling.build_model(modeling.BertClassifier(CONFIG, num_labels=2))
    new_optimizer = optimization.create_optimizer(1e-2, 30, 3, gradient_accumulation_steps=2)
    new_optimizer.build(restored.trainable_variables)
    modeling.make_checkpoint(restored, optimizer=new_optimizer).restore(path).assert_consumed()
    assert int(new_optimizer.iterations.numpy()) == 12
    for a, b in zip(new_optimizer.variables, optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# Logical CPU devices must be configured before TensorFlow starts, hence a subprocess.
_MIRRORED_SCRIPT = textwrap.dedent("""
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, modeling, optimization
    c = modeling.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=16,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 40, (16, 8)).astype(np.int32)
    pos = rng.randint(0, 8, (16, 2)).astype(np.int32)
    lab = rng.randint(0, 40, (16, 2)).astype(np.int32)

    def train(strategy, k):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = modeling.build_model(modeling.BertPretrainer(c))
            opt = optimization.create_optimizer(1e-3, 10, 0, gradient_accumulation_steps=k)
            opt.build(model.trainable_variables)
        replicas, micro = strategy.num_replicas_in_sync, 8 // k

        def replica_step(ids, pos, lab):
            with tf.GradientTape() as tape:
                logits = model({"input_ids": ids, "masked_lm_positions": pos}, training=True)
                # Per-replica loss scaled by the global micro-batch, as tf.distribute expects.
                loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(
                    lab, logits, from_logits=True)) / micro
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))

        step = tf.function(lambda d: strategy.run(replica_step, args=d))
        for start in range(0, 16, micro):
            part = [a[start:start + micro] for a in (ids, pos, lab)]
            step(strategy.experimental_distribute_values_from_function(
                lambda ctx: tuple(tf.constant(a[ctx.replica_id_in_sync_group::replicas]) for a in part)))
        return [v.numpy() for v in model.trainable_variables]

    base = train(tf.distribute.OneDeviceStrategy("/cpu:0"), 1)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    for k in (1, 2):
        other = train(mirrored, k)
        print("DIFF", k, max(np.abs(a - b).max() for a, b in zip(base, other)))
""")


def test_mirrored_strategy_with_and_without_accumulation_matches_one_device():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", _MIRRORED_SCRIPT], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    diffs = {int(line.split()[1]): float(line.split()[2])
             for line in result.stdout.splitlines() if line.startswith("DIFF")}
    assert set(diffs) == {1, 2}
    assert max(diffs.values()) < 1e-6, diffs
