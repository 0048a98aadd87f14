"""Pretraining throughput on one accelerator on the JAX path (no TensorFlow): BERT-base and -large,
seq 128 and 512, bf16, the largest batch that fits, sequences/s and MFU against the measured bf16
matmul peak, beside NVIDIA's published TF2 figures.

    python benchmarks/bench_gpu.py                          # a machine with a GPU (or TPU) and JAX
    python benchmarks/bench_gpu.py --models=large --seqs=128 --max_batch=512
    python benchmarks/bench_gpu.py --smoke                  # anywhere (CPU): tiny model, seconds

It runs under KERAS_BACKEND=jax (set here) and imports no TensorFlow. What runs is the product's own
step: pretraining_jax.MaskedLMTrainer (the step `KERAS_BACKEND=jax run_pretraining.py` trains with:
forward, backward, masked-LM loss, global-norm clip, AdamW update, one jitted XLA computation) on a
random batch, dropout 0.1, bf16 compute with float32 variables (Keras' mixed_bfloat16 policy).

Batch: for each model and length, from --max_batch (default: MAX_BATCH, 1024/512 at seq 128 and
256/128 at seq 512 for base/large) down by halves while XLA reports RESOURCE_EXHAUSTED; the first
that runs is timed (--steps steps after two warm-up steps). Configurations not started within --time_budget seconds are skipped (said so).

Peak: the best of a few timings of a --matmul_n cube bf16 jnp.matmul (8192 by default: 1.1 TFLOP
per product). MFU = sequences/s x matmul FLOPs per sequence (bench_pretraining.
train_flops_per_sequence: backward = 2x forward) / that peak. The goals of issue 19 are printed
beside: BERT-base seq 128 at >= 50% MFU, BERT-large seq 128 at >= 1,200 sequences/s on one H200.
--json writes the figures to a file. A benchmark: it asserts nothing about time.
"""

import argparse
import gc
import json
import os
import sys
import time

os.environ["KERAS_BACKEND"] = "jax"  # the JAX path, whatever the environment says
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_pretraining import random_batch, train_flops_per_sequence  # noqa: E402

MODELS = {  # name -> (layers, hidden)
    "base": (12, 768),
    "large": (24, 1024),
    "small": (4, 512),  # gpu_run.sh's pretraining model (its step time sets the step count)
    "tiny": (2, 128),  # --smoke
}
PREDICTIONS = {128: 20, 512: 80}  # max_predictions_per_seq, as NVIDIA's phase 1 / phase 2
# First batch tried per (model, seq): about what fits in 141 GB by a rough count of the activations
# kept for the backward pass (NVIDIA's TF2 BERT-large used 312 / 40 on an 80 GB A100), so that the
# first try usually fits and each halving (a new compile) is rare.
MAX_BATCH = {("base", 128): 1024, ("large", 128): 512, ("base", 512): 256, ("large", 512): 128,
             ("small", 128): 1024}
# NVIDIA's published TF2 BERT pretraining throughput, 1x A100 80GB, mixed precision (LAMB, TF 21.02
# NGC container, batch 312 at seq 128 and 40 at seq 512), from the table "Pre-training training
# performance: Single-node on NVIDIA DGX A100 (8x A100 80GB)" of
# https://github.com/NVIDIA/DeepLearningExamples/blob/master/TensorFlow2/LanguageModeling/BERT/README.md
# (read at commit 49e23b4597a6fca461321a085d8eb8abf1e215e2). Only BERT-large is published there;
# BERT-base pretraining prints "n/a".
NVIDIA_TF2_A100 = {("large", 128): 485.59, ("large", 512): 96.52}
GOALS = {("base", 128): "MFU >= 50%", ("large", 128): ">= 1200 seq/s"}
VOCAB = 21128


def device_name():
    import jax
    d = jax.devices()[0]
    return f"{d.platform}: {getattr(d, 'device_kind', d.platform)} (x{jax.device_count()})"


def matmul_peak(n, repeats=5, products=10):
    """Best bf16 TFLOP/s of an n x n x n jnp.matmul (random data), `products` per timing."""
    import jax
    import jax.numpy as jnp
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    mm(a, b).block_until_ready()
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(products):
            c = mm(a, b)
        c.block_until_ready()
        best = max(best, products * 2 * n ** 3 / (time.perf_counter() - start) / 1e12)
    return best


def out_of_memory(error):
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def measure(layers, hidden, seq, batch, steps, bf16):
    """One configuration -> sequences/s over `steps` steps of MaskedLMTrainer.train_step."""
    import jax
    import keras

    import modeling
    import optimization
    import pretraining_jax
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if bf16 else "float32")
    pred = PREDICTIONS.get(seq, max(1, seq * 3 // 20))
    config = modeling.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=hidden // 64, intermediate_size=4 * hidden,
                                 max_position_embeddings=max(512, seq))
    model = modeling.build_model(modeling.BertPretrainer(config), seq_len=8)
    optimizer = optimization.create_optimizer(1e-4, 10_000, 100, clip_norm=0)
    trainer = pretraining_jax.MaskedLMTrainer(model, optimizer, global_batch=batch, clip_norm=1.0,
                                              mixed_precision=bf16)
    state = trainer.init_state()
    data = jax.device_put(random_batch(batch, seq, pred), trainer.sharded)
    for _ in range(2):  # compile, warm up
        state, metrics = trainer.train_step(state, data)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = trainer.train_step(state, data)
    loss = float(jax.block_until_ready(metrics)["loss"])
    elapsed = time.perf_counter() - start
    if loss != loss or abs(loss) == float("inf"):
        raise RuntimeError(f"non-finite loss {loss} in the benchmark")
    return batch * steps / elapsed


def _release():
    import jax
    import keras
    keras.backend.clear_session()
    gc.collect()
    jax.clear_caches()


def largest_batch(layers, hidden, seq, max_batch, min_batch, steps, bf16):
    """From max_batch down by halves until one fits -> (batch, sequences/s), or None."""
    batch = max_batch
    while batch >= min_batch:
        try:
            rate = measure(layers, hidden, seq, batch, steps, bf16)
        except Exception as e:  # noqa: BLE001 -- XLA's RESOURCE_EXHAUSTED comes as several types
            if not out_of_memory(e):
                raise
            print(f"    batch {batch}: does not fit (RESOURCE_EXHAUSTED)", flush=True)
            _release()
            batch //= 2
            continue
        print(f"    batch {batch}: {rate:.1f} seq/s", flush=True)
        _release()
        return batch, rate
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="base,large")
    parser.add_argument("--seqs", default="128,512")
    parser.add_argument("--max_batch", type=int, default=None,
                        help="first batch tried (default: MAX_BATCH by model and length)")
    parser.add_argument("--min_batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--matmul_n", type=int, default=8192)
    parser.add_argument("--time_budget", type=float, default=None,
                        help="seconds: configurations not started by then are skipped")
    parser.add_argument("--no_bf16", action="store_true", help="float32 instead of bf16")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model, seq 32, batch 8, 2 steps, a 256 matmul: checks the script "
                             "end to end on any machine (figures meaningless)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.seqs, args.max_batch, args.steps, args.matmul_n = "tiny", "32", 8, 2, 256
    began = time.perf_counter()
    bf16 = not args.no_bf16
    peak = matmul_peak(args.matmul_n)
    print(f"device {device_name()}; measured bf16 matmul peak {peak:.1f} TFLOP/s "
          f"({args.matmul_n}^3 jnp.matmul)", flush=True)
    rows = []
    for model in args.models.split(","):
        layers, hidden = MODELS[model]
        for seq in (int(s) for s in args.seqs.split(",")):
            row = {"model": model, "seq": seq, "batch": None, "seq_per_s": None, "mfu": None,
                   "nvidia_tf2_a100": NVIDIA_TF2_A100.get((model, seq)), "goal": GOALS.get((model, seq))}
            rows.append(row)
            if args.time_budget is not None and time.perf_counter() - began > args.time_budget:
                print(f"  {model} seq {seq}: skipped (--time_budget={args.time_budget:.0f} s spent)")
                row["skipped"] = True
                continue
            print(f"  {model} (L={layers} H={hidden}) seq {seq}:", flush=True)
            found = largest_batch(layers, hidden, seq, args.max_batch or MAX_BATCH.get((model, seq), 64),
                                  min(args.min_batch, args.max_batch or args.min_batch), args.steps, bf16)
            if found is None:
                continue
            batch, rate = found
            flops = train_flops_per_sequence(layers, hidden, seq=seq, pred=PREDICTIONS.get(seq, max(1, seq * 3 // 20)))
            row.update(batch=batch, seq_per_s=rate, mfu=rate * flops / (peak * 1e12))
            write_json(args.json, bf16, peak, args.matmul_n, rows)  # so far: a killed run keeps them

    print(f"\n{'model':>6} {'seq':>4} {'batch':>6} {'seq/s':>9} {'MFU':>7}  {'goal':>14}  "
          "NVIDIA TF2 large, 1x A100")
    for r in rows:
        if r["batch"] is None:
            print(f"{r['model']:>6} {r['seq']:>4}  {'skipped' if r.get('skipped') else 'did not fit'}")
            continue
        reference = f"{r['nvidia_tf2_a100']} seq/s" if r["nvidia_tf2_a100"] else "n/a"
        print(f"{r['model']:>6} {r['seq']:>4} {r['batch']:>6} {r['seq_per_s']:>9.1f} {r['mfu']:>7.1%}  "
              f"{r['goal'] or '':>14}  {reference}")
    write_json(args.json, bf16, peak, args.matmul_n, rows)
    return rows


def write_json(path, bf16, peak, matmul_n, rows):
    if path:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"device": device_name(), "bf16": bf16, "matmul_peak_tflops": peak,
                       "matmul_n": matmul_n, "rows": rows}, f, indent=1)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
