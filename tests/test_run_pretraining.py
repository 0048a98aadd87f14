"""run_pretraining.py on CPU with a tiny model: learning, multi-replica equivalence, kill-and-resume,
early and clear errors on bad input, NaN handling.

Records are built from real text (the shared zhwiki corpus when present, else resources/) with the
Google vocab when present (else resources/vocab.txt), by tests/helpers.py.
"""

import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import helpers
import numpy as np
import pytest
from conftest import REPO_ROOT, RESOURCES, SHARED_DATA
from helpers import (
    PRED,
    SEQ,
    checkpoint_weights,
    pretrain,
    pretraining_argv,
    pretraining_config,
    snapshot,
    tensorboard_scalars,
    write_json,
)


@pytest.mark.slow
# ------------------------------------------------------------------------------------------------
# Learning
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_training_lowers_mlm_loss_and_raises_accuracy(pretraining_data, tmp_path, capsys):
    out = str(tmp_path / "run")
    result = pretrain(pretraining_data, out, "--do_train", "--do_eval", "--num_train_steps=100",
                  "--iterations_per_loop=20", "--save_checkpoints_steps=60", "--learning_rate=3e-3",
                  "--num_warmup_steps=10", "--train_batch_size=32")

    scalars = tensorboard_scalars(out)
    assert {"loss", "masked_lm_accuracy", "learning_rate", "grad_norm",
            "sequences_per_second"} <= set(scalars)
    assert [s for s, _ in scalars["loss"]] == [20, 40, 60, 80, 100]
    losses = [v for _, v in scalars["loss"]]
    accuracies = [v for _, v in scalars["masked_lm_accuracy"]]
    # A random model starts at ln(V) ~ 10 nats and ~0 accuracy.
    assert losses[-1] < losses[0] - 1.5 and losses[-1] < math.log(pretraining_data["vocab_size"]) - 3, losses
    assert accuracies[-1] > max(0.03, accuracies[0]), accuracies
    assert all(math.isfinite(v) and v > 0 for _, v in scalars["grad_norm"])

    # --do_eval: one JSON line with Google's keys, on held-out records.
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == result
    assert set(printed) == {"masked_lm_loss", "masked_lm_accuracy", "perplexity", "global_step"}
    assert printed["global_step"] == 100
    # Held-out text (small when only resources/ is there): better than a random model's ln(V)
    # loss and ~1/V accuracy, by less than on the training stream.
    assert printed["masked_lm_loss"] < math.log(pretraining_data["vocab_size"]) - 1.0
    assert printed["perplexity"] == pytest.approx(math.exp(printed["masked_lm_loss"]), rel=1e-6)
    assert printed["masked_lm_accuracy"] > 0.01

    # Checkpoints follow tf.train.CheckpointManager naming; the config used is written beside them.
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "ckpt-*.index"))) == [
        "ckpt-100.index", "ckpt-60.index"]
    with open(os.path.join(out, "bert_config.json"), encoding="utf-8") as f:
        assert json.load(f)["vocab_size"] == pretraining_data["vocab_size"]


def test_mlm_sums_equal_softmax_cross_entropy_and_argmax_accuracy():
    import tensorflow as tf

    import run_pretraining
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 20, 50)).astype(np.float32) * 3 + 40  # far from 0, as real logits
    ids = rng.integers(0, 50, size=(4, 20)).astype(np.int32)
    ids[:, ::2] = logits[:, ::2].argmax(-1)  # half the labels are the model's best guess
    weights = (rng.random((4, 20)) > 0.2).astype(np.float32)
    loss, correct, count = (float(v) for v in run_pretraining.mlm_sums(
        tf.constant(logits), tf.constant(ids), tf.constant(weights)))
    cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(ids, logits).numpy()
    np.testing.assert_allclose(loss, (cross_entropy * weights).sum(), rtol=1e-5)
    assert correct == ((logits.argmax(-1) == ids) * weights).sum() > 0
    assert count == weights.sum()


@pytest.mark.parametrize("replicas", [2, 8])
def test_replicas_draw_dropout_seeds_from_their_own_ranges(replicas):
    import keras

    import modeling
    import run_pretraining
    trainer = run_pretraining.MaskedLMTrainer
    state = keras.random.SeedGenerator(5).state  # a Keras seed-generator state [seed, counter]
    steps = np.arange(100_000)  # the counter of one dropout layer over 100k draws
    seeds = [(trainer._seed_offset(state, r, replicas).numpy()[1] + steps) % modeling.SEED_MODULUS
             for r in range(replicas)]  # the int32 seed dropout draws with (modeling.Dropout)
    assert len(np.unique(np.concatenate(seeds))) == replicas * len(steps)


def test_masked_positions_line_up_with_their_labels(pretraining_data, tmp_path):
    """Records whose chosen tokens stay visible: predicting them is copying the input at the
    gathered position, learnt within ~50 steps only if positions, ids and weights line up."""
    import tokenization
    tokenizer = tokenization.FullTokenizer(pretraining_data["vocab_file"])
    lines = helpers.corpus_sentences(str(SHARED_DATA), str(RESOURCES), max_chars=30_000)
    copy = str(tmp_path / "copy.tfrecord")
    helpers.write_records(copy, helpers.make_instances(tokenizer, lines, SEQ, PRED, mask_prob=0.0,
                                                       random_prob=0.0), pretraining_data["vocab_file"], SEQ, PRED)
    out = str(tmp_path / "run")
    pretrain(pretraining_data, out, f"--input_file={copy}", "--do_train", "--num_train_steps=60",
         "--iterations_per_loop=20", "--save_checkpoints_steps=60", "--learning_rate=3e-3",
         "--num_warmup_steps=10", "--train_batch_size=32")
    accuracies = [v for _, v in tensorboard_scalars(out)["masked_lm_accuracy"]]
    # Misaligned labels would stay at the ~0.04 token-frequency plateau of real text.
    assert accuracies[-1] > 0.25, accuracies


@pytest.mark.slow
# ------------------------------------------------------------------------------------------------
# The trainer owns the gradients: accumulation, one all-reduce, scaling, clipping
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("optimizer,jit", [("adamw", "true"), ("lamb", "false")])
def test_accumulated_micro_batches_equal_one_large_batch(pretraining_data, tmp_path, optimizer, jit):
    common = ["--do_train", "--num_train_steps=3", "--iterations_per_loop=3",
              "--save_checkpoints_steps=3", f"--optimizer={optimizer}", f"--jit_compile={jit}"]
    pretrain(pretraining_data, tmp_path / "large", *common)
    pretrain(pretraining_data, tmp_path / "micro", *common, "--gradient_accumulation_steps=4")  # 4 x 4 sequences
    large, micro = checkpoint_weights(str(tmp_path / "large" / "ckpt-3")), checkpoint_weights(str(tmp_path / "micro" / "ckpt-3"))
    initial = _weights_of_fresh_model(pretraining_data, str(tmp_path / "initial"))
    assert large.keys() == micro.keys() == initial.keys() and len(large) > 10
    for name in large:
        np.testing.assert_allclose(micro[name], large[name], atol=3e-6, err_msg=name)
        if "pooler" not in name:  # the pooler is not trained by the masked-LM loss (modeling.py)
            assert np.abs(large[name] - initial[name]).max() > 0, f"{name} did not move"
    # Same schedule position, same losses: the schedule counts updates, not micro-batches.
    a, b = tensorboard_scalars(str(tmp_path / "large")), tensorboard_scalars(str(tmp_path / "micro"))
    np.testing.assert_allclose([v for _, v in b["loss"]], [v for _, v in a["loss"]], rtol=1e-5)
    np.testing.assert_allclose([v for _, v in b["grad_norm"]], [v for _, v in a["grad_norm"]],
                               rtol=1e-4)


def _padded_batch(rng, seq_len, slots, vocab, lengths, counts):
    """Row b: lengths[b] real tokens, then padding; counts[b] real predictions among them."""
    rows = len(lengths)
    positions = np.zeros((rows, slots), np.int32)
    weights = np.zeros((rows, slots), np.float32)
    for b, (length, n) in enumerate(zip(lengths, counts)):
        positions[b, :n] = np.sort(rng.choice(np.arange(1, length - 1), n, replace=False))
        weights[b, :n] = 1
    return {"input_ids": rng.integers(100, vocab, (rows, seq_len)).astype(np.int32),
            "input_mask": (np.arange(seq_len)[None, :] < np.array(lengths)[:, None]).astype(np.int32),
            "segment_ids": np.zeros((rows, seq_len), np.int32),
            "masked_lm_positions": positions,
            "masked_lm_ids": (rng.integers(100, vocab, (rows, slots)) * weights).astype(np.int32),
            "masked_lm_weights": weights}


def test_packing_keeps_every_real_token_and_prediction():
    import tensorflow as tf

    import run_pretraining
    rng = np.random.default_rng(1)
    batch = _padded_batch(rng, 16, 6, 500, lengths=[16, 3, 9, 12], counts=[6, 0, 3, 5])
    tokens = run_pretraining.pack_tokens(tf.constant(batch["input_mask"]), 44).numpy()
    real = np.flatnonzero(batch["input_mask"].reshape(-1))
    assert len(real) == 40 and (tokens[:40] == real).all()  # the real tokens in order, then
    assert len(set(tokens)) == 44 and not batch["input_mask"].reshape(-1)[tokens[40:]].any()  # padding
    packed = run_pretraining.pack_predictions({k: tf.constant(v) for k, v in batch.items()}, 16, 4)
    packed = {k: v.numpy() for k, v in packed.items()}
    assert packed["masked_lm_positions"].shape == (4, 4)

    def predictions(b):  # [(token in the flattened batch, label)] of the real predictions
        rows = np.arange(len(b["masked_lm_weights"]))[:, None] * 16
        real = b["masked_lm_weights"] > 0
        return sorted(zip((b["masked_lm_positions"] + rows)[real], b["masked_lm_ids"][real]))

    assert predictions(packed) == predictions(batch) and len(predictions(batch)) == 14
    assert packed["masked_lm_weights"].sum() == 14  # 14 real slots first, then 2 of padding
    assert (packed["masked_lm_weights"].reshape(-1)[14:] == 0).all()


@pytest.mark.parametrize("jit", [True, False])
def test_a_packed_step_gives_the_gradients_of_the_padded_batch(jit):
    """The trainer computes the encoder on a batch's real tokens and the MLM head on its real
    predictions (module comment "Packing" in run_pretraining.py): the loss, accuracy and
    gradients are those of the padded batch (without dropout, whose masks depend on the shapes),
    also for a batch with more real tokens or predictions than packed (the unpacked branch)."""
    import tensorflow as tf

    import modeling
    import optimization
    import run_pretraining
    import train_utils
    strategy = train_utils.make_strategy("one_device")
    config = dict(pretraining_config(500), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with strategy.scope():
        model = modeling.build_model(modeling.BertPretrainer(modeling.BertConfig(**config)))
        optimizer = optimization.create_optimizer(1e-3, 10, 1, clip_norm=0)

    def trainer(stats):
        return run_pretraining.MaskedLMTrainer(model, optimizer, strategy, per_replica_batch=8,
                                               jit_compile=jit, sequence_stats=stats)

    full = trainer(None)
    packed = trainer({"input_mask": (10.0, 2.0), "masked_lm_weights": (2.0, 0.5)})
    assert (full.packed_tokens, full.packed_width) == (None, None)
    margin = run_pretraining.PACKING_MARGIN  # deviations of a micro-batch's sum
    assert packed.packed_tokens == math.ceil(8 * 10 + margin * 2 * math.sqrt(8)) == 95
    assert packed.packed_width == math.ceil(2 + margin * 0.5 / math.sqrt(8)) == 3
    rng = np.random.default_rng(2)
    short = [16, 9, 12, 8, 10, 11, 9, 13]  # 88 real tokens fit in 95
    for lengths, counts in ((short, [3, 0, 1, 2, 6, 4, 2, 3]),  # 21 predictions fit in 8 x 3
                            (short, [6] * 8),                    # 48 do not
                            ([16] * 8, [3] * 8)):                # 128 tokens do not
        batch = {k: tf.constant(v[None]) for k, v in  # [1 micro-batch, 8, ...]
                 _padded_batch(rng, 16, 6, 500, lengths, counts).items()}
        trainable, non_trainable = full._values()
        expected_grads, expected_sums, _ = full._grads_fn(trainable, non_trainable, batch)
        grads, sums, _ = packed._grads_fn(trainable, non_trainable, batch)
        np.testing.assert_allclose(sums.numpy(), expected_sums.numpy(), rtol=1e-5)
        assert sums.numpy()[2] == sum(counts)
        for variable, g, e in zip(model.trainable_variables, grads, expected_grads):
            np.testing.assert_allclose(g.numpy(), e.numpy(), atol=2e-6, err_msg=variable.path)


@pytest.mark.slow
def test_skipping_padding_trains_the_weights_computing_it_would(pretraining_data, tmp_path, caplog):
    """The default (--skip_padding) against every position computed, on records of one sentence
    each (mostly padding): the same weights after 3 steps (the test config has no dropout, whose
    masks depend on the packed shapes)."""
    import logging

    import tokenization
    tokenizer = tokenization.FullTokenizer(pretraining_data["vocab_file"])
    lines = helpers.corpus_sentences(str(SHARED_DATA), str(RESOURCES), max_chars=8_000)
    sentences = [i for n, line in enumerate(lines)
                 for i in helpers.make_instances(tokenizer, [line], SEQ, PRED, seed=n)]
    data = dict(pretraining_data, train=str(tmp_path / "sentences.tfrecord"))
    helpers.write_records(data["train"], sentences, data["vocab_file"], SEQ, PRED)
    common = ["--do_train", "--num_train_steps=3", "--iterations_per_loop=3", "--save_checkpoints_steps=3"]
    with caplog.at_level(logging.INFO):
        pretrain(data, tmp_path / "packed", *common)
    line = next(r.getMessage() for r in caplog.records if "a micro-batch of 16 computes" in r.getMessage())
    assert re.search(r"computes \d+ of its 1024 tokens", line), line  # packing is on here
    pretrain(data, tmp_path / "padded", *common, "--skip_padding=false")
    packed = checkpoint_weights(str(tmp_path / "packed" / "ckpt-3"))
    padded = checkpoint_weights(str(tmp_path / "padded" / "ckpt-3"))
    assert packed.keys() == padded.keys()
    for name in packed:
        np.testing.assert_allclose(packed[name], padded[name], atol=3e-6, err_msg=name)


def test_bf16_step_compiles_whole_with_float32_weights_and_accumulation():
    """The GPU/TPU configuration (--mixed_precision: Keras' mixed_bfloat16 policy, XLA), run on the
    CPU so dtype mistakes show here first; bf16 is only slow on CPUs, not wrong."""
    import keras
    import tensorflow as tf

    import modeling
    import optimization
    import run_pretraining
    import train_utils
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(100, 500, (4, 16)).astype(np.int32),
             "input_mask": np.ones((4, 16), np.int32), "segment_ids": np.zeros((4, 16), np.int32),
             "masked_lm_positions": np.tile(np.arange(1, 4, dtype=np.int32), (4, 1)),
             "masked_lm_ids": rng.integers(100, 500, (4, 3)).astype(np.int32),
             "masked_lm_weights": np.ones((4, 3), np.float32)}
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        strategy = train_utils.make_strategy("one_device")
        with strategy.scope():
            model = modeling.build_model(modeling.BertPretrainer(modeling.BertConfig(**pretraining_config(500))))
            optimizer = optimization.create_optimizer(1e-3, 10, 1, clip_norm=0)
            optimizer.build(model.trainable_variables)
        trainer = run_pretraining.MaskedLMTrainer(model, optimizer, strategy, per_replica_batch=4,
                                                  accumulation_steps=2)
        assert trainer.mode == "whole"
        data = tf.data.Dataset.from_tensors(batch).repeat()
        iterator = iter(strategy.distribute_datasets_from_function(lambda _: data))
        means, _, ran, finite = trainer.train_loop(iterator, tf.constant(3))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert bool(finite) and int(ran) == 3 and int(optimizer.iterations.numpy()) == 3
    assert {v.dtype for v in model.trainable_variables} == {"float32"}
    assert 0 < float(means["loss"]) < 2 * math.log(500)


def _weights_of_fresh_model(pretraining_data, prefix):
    import modeling
    import train_utils
    train_utils.set_seed(12345)  # run_pretraining's default --seed
    model = modeling.build_model(modeling.BertPretrainer(modeling.BertConfig.from_json_file(
        pretraining_data["config"])))
    return checkpoint_weights(modeling.make_checkpoint(model).write(prefix))


# ------------------------------------------------------------------------------------------------
# One device vs MirroredStrategy over two logical CPUs
# ------------------------------------------------------------------------------------------------

_MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
    from absl import logging
    logging.set_verbosity(logging.INFO)
    import helpers, run_pretraining
    opts = run_pretraining.parse_flags(json.loads(sys.argv[2]))
    evaluation = run_pretraining.run(opts)
    scalars = helpers.tensorboard_scalars(opts.output_dir)
    print("RESULT " + json.dumps({"loss": scalars["loss"], "grad_norm": scalars["grad_norm"],
                                  "eval": evaluation}))
""")


def _run_in_two_cpu_process(argv):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", _MIRRORED_SCRIPT, str(REPO_ROOT), json.dumps(argv)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):]), proc.stderr


@pytest.mark.slow
def test_mirrored_two_cpus_with_accumulation_matches_one_device(pretraining_data, tmp_path):
    common = ["--do_train", "--do_eval", "--num_train_steps=6", "--iterations_per_loop=1",
              "--save_checkpoints_steps=6", "--jit_compile=true", "--max_eval_steps=2"]
    one = pretraining_argv(pretraining_data, tmp_path / "one", *common, "--strategy=one_device")
    # Same global batch of 16: 2 replicas x 2 micro-batches x 4 sequences.
    two = pretraining_argv(pretraining_data, tmp_path / "two", *common, "--strategy=mirrored",
                "--gradient_accumulation_steps=2")
    import run_pretraining  # in-process: the one-device reference
    reference_eval = run_pretraining.run(run_pretraining.parse_flags(one))
    reference = tensorboard_scalars(str(tmp_path / "one"))
    mirrored, log = _run_in_two_cpu_process(two)
    assert "2 replica(s)" in log and "2 accumulation steps" in log
    # XLA cannot touch mirrored variables on CPU devices: only loss and gradients are compiled there.
    assert "train step compiled: split" in log

    np.testing.assert_allclose([v for _, v in mirrored["loss"]],
                               [v for _, v in reference["loss"]], rtol=2e-4)
    np.testing.assert_allclose([v for _, v in mirrored["grad_norm"]],
                               [v for _, v in reference["grad_norm"]], rtol=2e-3)
    assert mirrored["eval"]["global_step"] == reference_eval["global_step"] == 6
    for key in ("masked_lm_loss", "masked_lm_accuracy"):
        assert mirrored["eval"][key] == pytest.approx(reference_eval[key], rel=1e-4, abs=1e-6)
    a, b = checkpoint_weights(str(tmp_path / "one" / "ckpt-6")), checkpoint_weights(str(tmp_path / "two" / "ckpt-6"))
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=2e-5, err_msg=name)


# ------------------------------------------------------------------------------------------------
# Kill and resume
# ------------------------------------------------------------------------------------------------

# The script's own command line, under MirroredStrategy over two logical CPUs (configured before
# TensorFlow starts, hence this wrapper).
_TWO_CPU_MAIN = textwrap.dedent("""
    import runpy, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.argv = sys.argv[1:]
    sys.path.insert(0, sys.argv[0].rsplit("/", 1)[0])
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def _two_cpu_command(argv):
    return [sys.executable, "-c", _TWO_CPU_MAIN, str(REPO_ROOT / "run_pretraining.py"), *argv]


@pytest.mark.slow
def test_sigkilled_mirrored_run_resumes_to_the_same_weights_as_an_uninterrupted_run(pretraining_data, tmp_path):
    """Per-replica input under MirroredStrategy (2 logical CPUs): the stream is positioned by the
    global step, so a run killed between checkpoints reads exactly what an uninterrupted one reads."""
    import tensorflow as tf
    # No XLA here: resuming does not depend on it, and compiling three times costs test time.
    common = ["--do_train", "--num_train_steps=10", "--iterations_per_loop=1",
              "--save_checkpoints_steps=2", "--jit_compile=false", "--strategy=mirrored",
              "--shuffle_buffer_size=50"]
    config = pretraining_data["config_dropout"]  # dropout on: the seed states must resume too
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(_two_cpu_command(pretraining_argv(pretraining_data, killed, *common, config=config)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(killed, "ckpt-4.index")) and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resumed_from = int(tf.train.latest_checkpoint(killed).rsplit("-", 1)[1])
    assert 4 <= resumed_from < 10

    for out in (killed, str(tmp_path / "uninterrupted")):  # the same command again: resumes
        done = subprocess.run(_two_cpu_command(pretraining_argv(pretraining_data, out, *common, config=config)),
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "2 replica(s)" in done.stderr

    # The rerun went on from the checkpoint (its first step is the one after it) ...
    events = sorted(glob.glob(os.path.join(killed, "train", "events.*")), key=os.path.getmtime)
    rerun_steps = [e.step for e in tf.compat.v1.train.summary_iterator(events[-1]) if e.summary.value]
    assert rerun_steps[0] == resumed_from + 1 and rerun_steps[-1] == 10
    # ... and read exactly the batches (and dropout masks) the uninterrupted run read: a repeated
    # or skipped batch would move the weights far more than this.
    resumed = checkpoint_weights(os.path.join(killed, "ckpt-10"))
    reference = checkpoint_weights(str(tmp_path / "uninterrupted" / "ckpt-10"))
    assert resumed.keys() == reference.keys()
    for name in reference:
        np.testing.assert_allclose(resumed[name], reference[name], atol=1e-6, err_msg=name)


def test_input_stream_resumed_at_a_step_equals_the_stream_read_through(pretraining_data):
    """The pipeline positioned at step s yields exactly the batches s, s+1, ... of a pipeline read
    from step 0, across an epoch boundary, with every record once per epoch."""
    import tensorflow as tf

    import pretraining_input
    import pretraining_records
    files, counts = [pretraining_data["train"], pretraining_data["eval"]], [len(pretraining_data["instances"]) - 32, 32]
    parse = pretraining_records.make_parser(pretraining_records.read_info(files), SEQ, PRED)
    per_epoch, batch = sum(counts), 48
    strategy = tf.distribute.get_strategy()

    def batches(start_step, n):
        fn = pretraining_input.train_dataset_fn(files, counts, batch, 7, 64, start_step, parse)
        it = iter(strategy.distribute_datasets_from_function(fn))
        return [next(it)["input_ids"].numpy() for _ in range(n)]

    steps = per_epoch // batch + 3                       # past the end of the first epoch
    through = batches(0, steps)
    resumed = batches(steps - 5, 5)
    for a, b in zip(through[-5:], resumed):
        np.testing.assert_array_equal(a, b)
    first_epoch = np.concatenate(through)[:per_epoch]             # every record exactly once
    assert sorted(row.tobytes() for row in first_epoch) == sorted(
        np.asarray(i["input_ids"], np.int32).tobytes() for i in pretraining_data["instances"])


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error before any training step, nothing in output_dir overwritten
# ------------------------------------------------------------------------------------------------

def _bad_records(pretraining_data, tmp_path, kind):
    path = str(tmp_path / f"{kind}.tfrecord")
    if kind in ("truncated", "corrupt"):
        helpers.write_records(path, pretraining_data["instances"][:50], pretraining_data["vocab_file"], SEQ, PRED)
        with open(path, "rb") as f:
            raw = bytearray(f.read())
        if kind == "truncated":
            raw = raw[:-100]
        else:
            raw[len(raw) // 2] ^= 0xFF
        with open(path, "wb") as f:
            f.write(raw)
    elif kind == "seq_len":
        import tokenization
        tokenizer = tokenization.FullTokenizer(pretraining_data["vocab_file"])
        short = helpers.make_instances(tokenizer, ["这是一个句子。"] * 20, 32, PRED)
        helpers.write_records(path, short, pretraining_data["vocab_file"], 32, PRED)
    elif kind == "seq_len_no_meta":
        _bad_records(pretraining_data, tmp_path, "seq_len")
        os.rename(path.replace("_no_meta", ""), path)
        os.remove(path.replace("_no_meta", "") + ".meta.json")
    return path


_BAD_INPUT_CASES = {  # case -> the error message (regex)
    "truncated": r"truncated\.tfrecord: corrupt or truncated",
    "corrupt": r"corrupt\.tfrecord: corrupt or truncated",
    "seq_len": r"seq_len\.tfrecord: records have max_seq_length=32 .* --max_seq_length is 64",
    "seq_len_no_meta": r"seq_len_no_meta\.tfrecord: record 0 has input_ids of length 32",
    "vocab": r"train\.tfrecord: records have vocab_size=\d+ .* vocab_size of --bert_config_file is 500",
    "config_missing_field": r"config_missing\.json: field 'num_hidden_layers' is missing",
    "batch_not_divisible": (r"--train_batch_size=16 is not divisible by replicas \(1\) x "
                            r"--gradient_accumulation_steps \(3\)"),
}


@pytest.mark.parametrize("existing_output", [False, True], ids=["fresh_dir", "previous_run"])
@pytest.mark.parametrize("case", sorted(_BAD_INPUT_CASES))
def test_bad_input_fails_before_training_and_leaves_output_dir_alone(
        pretraining_data, tmp_path, case, existing_output):
    import run_pretraining
    out = str(tmp_path / "out")
    if existing_output:  # a previous run's directory of the same model must come through untouched
        os.makedirs(out)
        with open(pretraining_data["config"], encoding="utf-8") as f:
            config_text = f.read()
        with open(os.path.join(out, "bert_config.json"), "w", encoding="utf-8") as f:
            f.write(config_text)
        with open(os.path.join(out, "notes.txt"), "w", encoding="utf-8") as f:
            f.write("keep me")
    before = snapshot(out)

    argv = pretraining_argv(pretraining_data, out, "--do_train", "--do_eval", "--num_train_steps=5")
    if case in ("truncated", "corrupt", "seq_len", "seq_len_no_meta"):
        argv[0] = f"--input_file={_bad_records(pretraining_data, tmp_path, case)}"
    elif case == "vocab":
        argv[3] = f"--bert_config_file={write_json(tmp_path / 'small_vocab.json', pretraining_config(500))}"
    elif case == "config_missing_field":
        config = pretraining_config(pretraining_data["vocab_size"])
        del config["num_hidden_layers"]
        argv[3] = f"--bert_config_file={write_json(tmp_path / 'config_missing.json', config)}"
    elif case == "batch_not_divisible":
        argv.append("--gradient_accumulation_steps=3")

    with pytest.raises(run_pretraining.UsageError, match=_BAD_INPUT_CASES[case]):
        run_pretraining.run(run_pretraining.parse_flags(argv))
    assert snapshot(out) == before


def test_command_line_error_is_one_line_without_traceback(pretraining_data, tmp_path):
    config = pretraining_config(pretraining_data["vocab_size"])
    del config["hidden_size"]
    argv = pretraining_argv(pretraining_data, tmp_path / "out", "--do_train",
                 config=write_json(tmp_path / "c.json", config))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "run_pretraining.py")] + argv,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        x for x in proc.stderr.strip().splitlines() if x.startswith("run_pretraining.py: error:")]
    assert "run_pretraining.py: error:" in proc.stderr
    assert "field 'hidden_size' is missing" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "out")


# ------------------------------------------------------------------------------------------------
# Divergence
# ------------------------------------------------------------------------------------------------

def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(pretraining_data, tmp_path):
    import run_pretraining
    out = str(tmp_path / "run")
    # An absurd learning rate: step 1 (finite loss) blows the weights up, step 2's loss is NaN/inf.
    with pytest.raises(run_pretraining.TrainingDivergedError,
                       match=r"NaN/inf at step 2; stopped without saving\. "
                             r"Last good checkpoint: .*ckpt-1"):
        pretrain(pretraining_data, out, "--do_train", "--num_train_steps=8", "--iterations_per_loop=4",
             "--save_checkpoints_steps=1", "--num_warmup_steps=0", "--learning_rate=1e38",
             "--jit_compile=false")
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "ckpt-*"))) == [
        "ckpt-1.data-00000-of-00001", "ckpt-1.index"]
    import tensorflow as tf
    assert tf.train.latest_checkpoint(out).endswith("ckpt-1")


@pytest.mark.slow
def test_gpu_benchmark_runs_end_to_end_in_smoke_mode():
    """benchmarks/bench_gpu.py is for machines with a GPU; --smoke runs it anywhere on a tiny model."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_gpu.py"), "--smoke"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.split("NVIDIA TF2 large, 1x A100")[-1].strip().splitlines()
    model, seq, batch, rate = table[0].split()[:4]
    assert (model, seq, batch) == ("tiny", "32", "8") and float(rate) > 0


def test_tpu_strategy_off_a_tpu_vm_asks_for_a_tpu_name(pretraining_data, tmp_path):
    """`--strategy=tpu` on a machine that is no Cloud TPU VM (no /dev/accel*, no libtpu) and without
    --tpu_name is a one-line error naming both ways to reach a TPU; nothing is written."""
    import run_pretraining
    out = str(tmp_path / "out")
    with pytest.raises(run_pretraining.UsageError,
                       match=r"--strategy=tpu needs --tpu_name .* Cloud TPU VM \(--tpu_name=local\)"):
        pretrain(pretraining_data, out, "--do_train", "--strategy=tpu")
    assert not os.path.exists(out)


@pytest.mark.slow
def test_roberta_zh_pretraining_command_runs_verbatim_with_only_paths_and_sizes_changed(tmp_path):
    """brightmart/roberta_zh's README: data from create_pretraining_data.py (so `tf*.tfrecord` sits
    beside its .meta.json), `--do_train=True`, and Google's `bert_model.ckpt` as --init_checkpoint.
    The run folder it leaves is enough for fill_mask.py alone."""

    import modeling

    base = tmp_path / "chinese_roberta_zh"
    base.mkdir()
    config = pretraining_config(open(RESOURCES / "vocab.txt", encoding="utf-8").read().count("\n"))
    write_json(base / "bert_config_large.json", config)
    helpers.write_tf1_checkpoint(modeling.BertConfig.from_dict(config), str(base / "bert_model.ckpt"))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", BERT_BASE_DIR=str(base))
    make = subprocess.run(
        [sys.executable, str(REPO_ROOT / "create_pretraining_data.py"), "--do_whole_word_mask=True",
         f"--input_file={RESOURCES / 'corpus' / 'science_tech.txt'}",
         "--output_file=./data/tf_news_2016_zh_raw_news2016zh_1.tfrecord",
         f"--vocab_file={RESOURCES / 'vocab.txt'}", "--do_lower_case=True", f"--max_seq_length={SEQ}",
         f"--max_predictions_per_seq={PRED}", "--masked_lm_prob=0.10", "--random_seed=12345",
         "--dupe_factor=2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert make.returncode == 0, make.stderr[-2000:]
    command = ("python run_pretraining.py --input_file=./data/tf*.tfrecord --output_dir=my_new_model_path "
               "--do_train=True --do_eval=True --bert_config_file=$BERT_BASE_DIR/bert_config_large.json "
               f"--train_batch_size=8 --max_seq_length={SEQ} --max_predictions_per_seq={PRED} "
               "--num_train_steps=4 --num_warmup_steps=1 --learning_rate=1e-4 --save_checkpoints_steps=2 "
               "--init_checkpoint=$BERT_BASE_DIR/bert_model.ckpt")
    command = command.replace("python run_pretraining.py", f"{sys.executable} {REPO_ROOT / 'run_pretraining.py'}")
    proc = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bert_model.ckpt" in proc.stderr and '"global_step": 4' in proc.stdout
    out = tmp_path / "my_new_model_path"
    assert {"ckpt-4.index", "bert_config.json", "vocab.txt", "model_info.json"} <= set(os.listdir(out))
    fill = subprocess.run([sys.executable, str(REPO_ROOT / "fill_mask.py"), f"--checkpoint={out}",
                           "中国的首都是[MASK]京。"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert fill.returncode == 0, fill.stderr[-2000:]
