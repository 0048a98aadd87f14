"""The JAX trainer: `KERAS_BACKEND=jax python run_pretraining.py <the same flags>` (pretraining_jax.py).

Every JAX run is a subprocess with TensorFlow blocked (`sys.modules["tensorflow"] = None`), as on a
GPU or TPU machine that has only JAX. Records come from real text (tests/helpers.py); the
models are tiny. What the TensorFlow side does with a JAX run folder (fine-tuning, export) runs in
TensorFlow subprocesses.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import REPO_ROOT, RESOURCES, SHARED_DATA

pytest.importorskip("jax")

SEQ, PRED = 32, 5
# Runs the script like `python run_pretraining.py ...`, with TensorFlow made unimportable.
_NO_TF = ('import runpy, sys; sys.modules["tensorflow"] = None; sys.argv[0] = "{script}"; '
          'runpy.run_path("{script}", run_name="__main__")')


def _vocab_file():
    google = SHARED_DATA / "vocab" / "vocab.txt"
    return str(google if google.is_file() else RESOURCES / "vocab.txt")


def _config(vocab_size, dropout=0.0):
    return {"vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 64, "hidden_act": "gelu",
            "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout,
            "max_position_embeddings": SEQ, "type_vocab_size": 2, "initializer_range": 0.02}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import helpers as records

    import tokenization

    root = tmp_path_factory.mktemp("jax_pretraining")
    vocab_file = _vocab_file()
    tokenizer = tokenization.FullTokenizer(vocab_file)
    lines = records.corpus_sentences(str(SHARED_DATA), str(RESOURCES), max_chars=20_000)
    instances = records.make_instances(tokenizer, lines, SEQ, PRED, seed=1)
    assert len(instances) > 100
    train, evaluation = str(root / "train.tfrecord"), str(root / "eval.tfrecord")
    records.write_records(train, instances[:-32], vocab_file, SEQ, PRED)
    records.write_records(evaluation, instances[-32:], vocab_file, SEQ, PRED)
    # Records masked at training time (create_pretraining_data.py --dynamic_masking): on JAX the
    # masks are drawn inside the jitted step.
    import create_pretraining_data as cpd

    unmasked = str(root / "unmasked.tfrecord")
    corpus = ",".join(sorted(str(p) for p in (RESOURCES / "corpus").glob("*.txt")))
    cpd.generate(cpd.Options(input_file=corpus, output_file=unmasked, vocab_file=vocab_file,
                             max_seq_length=SEQ, max_predictions_per_seq=PRED,
                             dynamic_masking=True, random_seed=7),
                 log=lambda line: None)
    out = {"root": root, "train": train, "eval": evaluation, "vocab_file": vocab_file,
           "unmasked": unmasked}
    for name, dropout in (("config", 0.0), ("config_dropout", 0.1)):
        out[name] = str(root / f"{name}.json")
        with open(out[name], "w", encoding="utf-8") as f:
            json.dump(_config(len(tokenizer.vocab), dropout), f)
    return out


def _argv(data, output_dir, *extra, config=None):
    return [f"--input_file={data['train']}", f"--eval_input_file={data['eval']}",
            f"--output_dir={output_dir}", f"--bert_config_file={config or data['config']}",
            f"--vocab_file={data['vocab_file']}", f"--max_seq_length={SEQ}",
            f"--max_predictions_per_seq={PRED}", "--train_batch_size=8", "--eval_batch_size=16",
            "--learning_rate=2e-3", "--num_warmup_steps=1", "--shuffle_buffer_size=50", *extra]


def _env(backend, **extra):
    return dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
                TF_CPP_MIN_LOG_LEVEL="3", **extra)


def _command(script, backend, args):
    path = str(REPO_ROOT / script)
    if backend == "jax":
        return [sys.executable, "-c", _NO_TF.format(script=path), *args]
    return [sys.executable, path, *args]


def _run(args, backend="jax", script="run_pretraining.py", timeout=600):
    return subprocess.run(_command(script, backend, args), cwd=REPO_ROOT, env=_env(backend),
                          capture_output=True, text=True, timeout=timeout, check=False)


def _scalars(output_dir):
    """TensorBoard scalars under output_dir/train -> {tag: [(step, value)]}, read with
    tensorboard's TF-free event reader."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(os.path.join(output_dir, "train"),
                                             size_guidance={"tensors": 0})  # 0: keep every event
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        out[tag] = [(e.step, float(np.asarray(_tensor(e.tensor_proto)))) for e in acc.Tensors(tag)]
    return out


def _tensor(proto):
    from tensorboard.util import tensor_util

    return tensor_util.make_ndarray(proto)


def _weights(path):
    from safetensors.numpy import load_file

    return load_file(path)


def _json_line(stdout):
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


# ------------------------------------------------------------------------------------------------
# Fast: the command, the run folder, the input-state rule
# ------------------------------------------------------------------------------------------------

def test_jax_run_writes_the_run_folder_scalars_and_eval_line_without_tensorflow(data, tmp_path):
    out = tmp_path / "run"
    proc = _run(_argv(data, out, "--do_train", "--do_eval", "--num_train_steps=2",
                      "--save_checkpoints_steps=1", "--keep_checkpoint_max=1", "--use_tpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(os.listdir(out))
    assert names == ["bert_config.json", "ckpt-2.train_state.npz", "ckpt-2.weights.safetensors",
                     "model_info.json", "pretraining_input.json", "train", "vocab.txt"], names
    assert json.loads((out / "model_info.json").read_text())["task"] == "mlm"
    # The TF-only flag is named once; progress lines carry an ETA.
    assert "--use_tpu ignored under KERAS_BACKEND=jax" in proc.stderr
    assert "pretrain: 2/2 steps" in proc.stderr and "ETA" in proc.stderr
    result = _json_line(proc.stdout)
    assert set(result) == {"masked_lm_loss", "masked_lm_accuracy", "perplexity", "global_step"}
    assert result["global_step"] == 2 and 0 < result["masked_lm_loss"] < 20
    scalars = _scalars(str(out))
    assert {"loss", "masked_lm_accuracy", "learning_rate", "sequences_per_second"} <= set(scalars)
    assert [step for step, _ in scalars["loss"]] == [1, 2]
    assert scalars["learning_rate"][0][1] == 0.0  # warmup's first step, as on TensorFlow
    weights = _weights(str(out / "ckpt-2.weights.safetensors"))
    assert "bert/embeddings/word_embeddings" in weights and "cls/predictions/output_bias" in weights

    # Resuming with another batch would read another input stream: refused before anything runs.
    refused = _run(_argv(data, out, "--do_train", "--num_train_steps=3", "--train_batch_size=4"))
    assert refused.returncode == 2
    assert "--train_batch_size=4, but" in refused.stderr.splitlines()[-1]
    assert sorted(os.listdir(out)) == names


_EQUIVALENCE = textwrap.dedent("""
    import json, sys
    import jax, keras, numpy as np
    import modeling, optimization, pretraining_jax
    config = modeling.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32,
                                 max_position_embeddings=16, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    rng = np.random.RandomState(0)
    weights = rng.randint(0, 2, (8, 3)).astype("float32")
    weights[0] = 0  # rows with no masked position: the division is by the global count
    batch = {"input_ids": rng.randint(5, 60, (8, 16)).astype("int32"),
             "input_mask": np.ones((8, 16), "int32"), "segment_ids": np.zeros((8, 16), "int32"),
             "masked_lm_positions": rng.randint(0, 16, (8, 3)).astype("int32"),
             "masked_lm_ids": rng.randint(5, 60, (8, 3)).astype("int32"),
             "masked_lm_weights": weights}
    out = {}
    for name, k, devices, bf16 in (("one", 1, 1, False), ("accumulated_on_two_devices", 2, 2, False),
                                   ("bf16", 2, 2, True)):
        keras.mixed_precision.set_global_policy("mixed_bfloat16" if bf16 else "float32")
        keras.utils.set_random_seed(0)
        model = modeling.build_model(modeling.BertPretrainer(config))
        opt = optimization.create_optimizer(1e-2, 10, 0, clip_norm=0)
        trainer = pretraining_jax.MaskedLMTrainer(model, opt, 8, accumulation_steps=k,
                                                  clip_norm=0.5, mixed_precision=bf16,
                                                  devices=jax.devices()[:devices])
        state = trainer.init_state()
        for _ in range(2):
            state, metrics = trainer.train_step(state, batch)
        out[name] = {"loss": float(metrics["loss"]), "step": trainer.step_of(state),
                     "dtypes": sorted({str(w.dtype) for w in state["trainable"]}),
                     "weights": [np.asarray(w).tolist() for w in state["trainable"]]}
    print("RESULT" + json.dumps(out))
""")


def test_accumulation_and_devices_give_the_same_update_as_one_batch():
    """Google's order in one jitted step: sums over micro-batches and devices, one division by the
    global count of masked positions, one clip; the same weights whatever k and the device count.
    The bf16 step (--mixed_precision's policy, on GPUs and TPUs) compiles and keeps float32 weights."""
    env = _env("jax", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-c", 'import sys; sys.modules["tensorflow"] = None\n'
                           + _EQUIVALENCE], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    one, other, bf16 = out["one"], out["accumulated_on_two_devices"], out["bf16"]
    assert one["step"] == other["step"] == bf16["step"] == 2
    assert other["loss"] == pytest.approx(one["loss"], rel=1e-5)
    for a, b in zip(one["weights"], other["weights"]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    # --mixed_precision: bfloat16 compute, float32 weights and updates, the same loss to bf16 noise.
    assert bf16["dtypes"] == ["float32"] and bf16["loss"] == pytest.approx(one["loss"], rel=2e-2)


# ------------------------------------------------------------------------------------------------
# Slow: kill -9 and resume; the folder on the TensorFlow side; the same training on both backends
# ------------------------------------------------------------------------------------------------

def _pair_data(folder, n=32):
    """A tiny pair-classification task (label 1 iff the texts are made of 好)."""
    rng = np.random.default_rng(0)
    chars = list("我你他天地人山水风雨花草书车")
    rows = []
    for i in range(n):
        label = i % 2
        a, b = ("".join(rng.choice(chars + ["好坏"[1 - label]] * 8, 6)) for _ in range(2))
        rows.append(f"{a}\t{b}\t{label}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / "dev.txt").write_text("\n".join(rows[: n // 2]) + "\n", encoding="utf-8")


@pytest.mark.slow
def test_killed_jax_run_resumes_to_the_same_weights_and_the_folder_serves_tensorflow(data, tmp_path):
    """On records masked in the step (the masks and dropout drawn from seeds and positions)."""
    args = ("--do_train", "--num_train_steps=6", "--save_checkpoints_steps=2",
            "--iterations_per_loop=1", f"--input_file={data['unmasked']}",
            "--gradient_accumulation_steps=2")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = _run(_argv(data, whole, *args, config=data["config_dropout"]))
    assert proc.returncode == 0, proc.stderr[-3000:]

    # kill -9 as soon as the first save is complete (mid-run: step 3 or later is under way).
    job = subprocess.Popen(_command("run_pretraining.py", "jax",
                                    _argv(data, killed, *args, config=data["config_dropout"])),
                           cwd=REPO_ROOT, env=_env("jax"), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (killed / "ckpt-2.weights.safetensors").exists() and job.poll() is None:
        assert time.time() < deadline, "no save within 10 minutes"
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert not (killed / "ckpt-6.weights.safetensors").exists()
    resumed = _run(_argv(data, killed, *args, config=data["config_dropout"]))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "ckpt-6" not in resumed.stderr.split("resumed from")[1][:80]
    expected = _weights(str(whole / "ckpt-6.weights.safetensors"))
    got = _weights(str(killed / "ckpt-6.weights.safetensors"))
    assert sorted(got) == sorted(expected)
    for name in expected:  # the same steps on the same batches with the same dropout masks
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-7, err_msg=name)
    with np.load(killed / "ckpt-6.train_state.npz") as state:
        assert int(state["step"]) == 6

    # The folder alone is the input of TensorFlow's fine-tuning, export and fill-mask: no flags.
    _pair_data(tmp_path / "pairs")
    tuned = _run(["--task_name=lcqmc", f"--data_dir={tmp_path / 'pairs'}", "--do_train=true",
                  f"--init_checkpoint={killed}", f"--output_dir={tmp_path / 'tuned'}",
                  "--max_seq_length=16", "--train_batch_size=8", "--num_train_epochs=1"],
                 backend="tensorflow", script="run_classifier.py")
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert "Loaded" in tuned.stderr and "ckpt-6.weights.safetensors" in tuned.stderr
    exported = _run([f"--checkpoint={killed}", f"--output_dir={tmp_path / 'hf'}"],
                    backend="tensorflow", script="export_to_pytorch.py")
    assert exported.returncode == 0, exported.stderr[-3000:]
    filled = _run([f"--checkpoint={killed}", "--top_k=2", "今天[MASK]气很好"], backend="tensorflow",
                  script="fill_mask.py")
    assert filled.returncode == 0 and len(filled.stdout.strip().splitlines()) == 2, filled.stderr[-3000:]
    hf = _weights(str(tmp_path / "hf" / "model.safetensors"))
    hf_name = next(n for n in hf if n.endswith("embeddings.word_embeddings.weight"))
    np.testing.assert_array_equal(hf[hf_name], got["bert/embeddings/word_embeddings"])


@pytest.mark.slow
def test_tensorflow_and_jax_train_the_same_model_to_the_same_losses(data, tmp_path):
    """The same records, initial weights and flags on both backends: one file and
    --shuffle_buffer_size=1 make both streams read the file in order, so the step losses may differ
    only by floating-point noise (the update rules, schedule, clip and loss are shared code)."""
    init = tmp_path / "init"
    make_init = textwrap.dedent(f"""
        import keras, modeling
        keras.utils.set_random_seed(7)
        config = modeling.BertConfig.from_json_file({data['config']!r})
        model = modeling.build_model(modeling.BertPretrainer(config))
        modeling.save_weights(model, {str(init) + '.safetensors'!r})
    """)
    proc = subprocess.run([sys.executable, "-c", make_init], cwd=REPO_ROOT, env=_env("tensorflow"),
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = ("--do_train", "--do_eval", "--num_train_steps=30", "--num_warmup_steps=3",
            "--save_checkpoints_steps=30", "--iterations_per_loop=1", "--shuffle_buffer_size=1",
            f"--init_checkpoint={init}.safetensors")
    results, losses = {}, {}
    for backend in ("tensorflow", "jax"):
        out = tmp_path / backend
        proc = _run(_argv(data, out, *args), backend=backend)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[backend] = _json_line(proc.stdout)
        losses[backend] = np.array([v for _, v in _scalars(str(out))["loss"]])
    assert len(losses["tensorflow"]) == len(losses["jax"]) == 30
    assert losses["jax"][-5:].mean() < losses["jax"][:5].mean() - 0.1, losses["jax"]  # it learned
    np.testing.assert_allclose(losses["jax"], losses["tensorflow"], rtol=1e-4, atol=1e-4)
    print("largest step-loss difference, TF vs JAX:", np.abs(losses["jax"] - losses["tensorflow"]).max())
    assert results["jax"]["global_step"] == results["tensorflow"]["global_step"] == 30
    assert results["jax"]["masked_lm_loss"] == pytest.approx(results["tensorflow"]["masked_lm_loss"],
                                                             abs=1e-3)
    assert results["jax"]["masked_lm_accuracy"] == pytest.approx(
        results["tensorflow"]["masked_lm_accuracy"], abs=0.02)


@pytest.mark.slow
def test_nan_loss_stops_the_jax_run_without_saving(data, tmp_path):
    out = tmp_path / "run"
    proc = _run(_argv(data, out, "--do_train", "--num_train_steps=4", "--save_checkpoints_steps=2",
                      "--learning_rate=1e8", "--num_warmup_steps=0"))
    assert proc.returncode == 2
    assert "loss became NaN/inf at step" in proc.stderr.splitlines()[-1]
    assert not list(out.glob("ckpt-*"))
