"""Pretraining throughput on one GPU: BERT-base and -large, seq 128 and 512, bf16 + XLA, the largest
batch that fits, sequences/s and MFU against the GPU's bf16 peak, next to NVIDIA's TF2 figures.

    python benchmarks/bench_gpu.py                       # on a machine with an NVIDIA GPU
    python benchmarks/bench_gpu.py --models=large --seqs=128 --peak_tflops=312
    python benchmarks/bench_gpu.py --smoke               # anywhere (CPU): tiny model, end to end

What runs is the product's own train step: run_pretraining.MaskedLMTrainer (forward, backward,
masked-LM loss, global-norm clip, AdamW update; one XLA computation), under the strategy and the
precision policy run_pretraining.py picks (train_utils.make_strategy / set_precision: bf16 on GPUs
of compute capability >= 8.0), with --steps_per_loop steps per host call, dropout 0.1, random ids.
For each model and length the batch doubles from --start_batch until it no longer fits (XLA's
ResourceExhaustedError) or reaches --max_batch; the largest that ran is timed.

MFU = sequences/s x model FLOPs per sequence (matmuls, backward = 2x forward) / the bf16 dense
peak of the GPU (from a table by device name, or --peak_tflops). NVIDIA's figures for comparison:
DeepLearningExamples, TensorFlow2 BERT-large pretraining, 1x A100 80GB, mixed precision, 485.6
sequences/s at seq 128 and 96.5 at seq 512 (as quoted in this project's issue 13). A benchmark:
it prints figures and asserts nothing about time.
"""

import argparse
import gc
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_utils  # noqa: E402,I001 -- first: it hides TensorFlow's C++ start-up lines


from bench_pretraining import train_flops_per_sequence, trainer_on_random_batches  # noqa: E402

MODELS = {  # name -> (layers, hidden)
    "base": (12, 768),
    "large": (24, 1024),
    "tiny": (2, 128),  # --smoke
}
PREDICTIONS = {128: 20, 512: 80}  # max_predictions_per_seq, as NVIDIA's phase 1 / phase 2
NVIDIA_TF2_LARGE_A100 = {128: 485.6, 512: 96.5}
# bf16 dense tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's data sheets, by device name.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0,
                    "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0,
                    "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0}
VOCAB = 21128


def gpu_name_and_peak(override=None):
    """-> (device name, bf16 peak TFLOP/s or None) of the first GPU; ("cpu", None) without one."""
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "cpu", override
    name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    if override:
        return name, override
    for key, peak in BF16_PEAK_TFLOPS.items():  # the longest names first where they overlap
        if key in name:
            return name, peak
    return name, None


def measure(layers, hidden, seq, batch, steps, mixed_precision, jit_compile=True):
    """Builds the trainer for one configuration; -> (sequences/s over `steps` steps, precision)."""
    import keras

    import modeling

    pred = PREDICTIONS.get(seq, max(1, seq * 3 // 20))
    strategy = train_utils.make_strategy("one_device")
    train_utils.set_precision(mixed_precision, strategy)
    policy = keras.mixed_precision.global_policy().name
    config = modeling.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=hidden // 64, intermediate_size=4 * hidden,
                                 max_position_embeddings=max(512, seq))
    _, run = trainer_on_random_batches(config, strategy, batch, seq, pred, jit_compile)

    run(2)  # compile + warm up
    start = time.perf_counter()
    run(steps)
    return batch * steps / (time.perf_counter() - start), policy


def _release():
    import keras
    keras.backend.clear_session()
    gc.collect()


def largest_batch(layers, hidden, seq, start, max_batch, steps, mixed_precision):
    """Doubles the batch from `start` while it fits -> (batch, sequences/s, precision) of the
    largest that ran, or None when even `start` does not fit."""
    import tensorflow as tf
    best, batch = None, start
    while batch <= max_batch:
        try:
            rate, policy = measure(layers, hidden, seq, batch, steps, mixed_precision)
        except (tf.errors.ResourceExhaustedError, tf.errors.InternalError) as e:
            print(f"    batch {batch}: does not fit ({type(e).__name__})", flush=True)
            _release()
            break
        print(f"    batch {batch}: {rate:.1f} seq/s", flush=True)
        best = (batch, rate, policy)
        _release()
        batch *= 2
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="base,large")
    parser.add_argument("--seqs", default="128,512")
    parser.add_argument("--start_batch", type=int, default=16)
    parser.add_argument("--max_batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (one host call)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="bf16 peak of the GPU if its name is not in the table")
    parser.add_argument("--no_mixed_precision", action="store_true", help="fp32 instead of bf16")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model, seq 32, batches 2-8, 2 steps: checks the script end to end "
                             "on any machine (figures meaningless)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.seqs, args.start_batch, args.max_batch, args.steps = "tiny", "32", 2, 8, 2

    name, peak = gpu_name_and_peak(args.peak_tflops)
    print(f"device: {name}; bf16 peak: {f'{peak:.0f} TFLOP/s' if peak else 'unknown (--peak_tflops)'}")
    if name == "cpu" and not args.smoke:
        print("no GPU: these are CPU figures (bf16 is not used on CPUs); run on a GPU, or --smoke")
    rows = []
    for model in args.models.split(","):
        layers, hidden = MODELS[model]
        for seq in (int(s) for s in args.seqs.split(",")):
            print(f"  {model} (L={layers} H={hidden}) seq {seq}:", flush=True)
            found = largest_batch(layers, hidden, seq, args.start_batch, args.max_batch, args.steps,
                                  not args.no_mixed_precision)
            if found is None:
                rows.append((model, seq, None, None, None, None))
                continue
            batch, rate, policy = found
            pred = PREDICTIONS.get(seq, max(1, seq * 3 // 20))
            flops = train_flops_per_sequence(layers, hidden, seq=seq, pred=pred)
            mfu = rate * flops / (peak * 1e12) if peak else None
            rows.append((model, seq, batch, rate, mfu, policy))

    print(f"\n{'model':>6} {'seq':>4} {'batch':>6} {'seq/s':>9} {'MFU':>7} {'precision':>15}  "
          "NVIDIA TF2 large, 1x A100")
    for model, seq, batch, rate, mfu, policy in rows:
        if batch is None:
            print(f"{model:>6} {seq:>4}  did not fit at --start_batch={args.start_batch}")
            continue
        reference = NVIDIA_TF2_LARGE_A100.get(seq) if model == "large" else None
        print(f"{model:>6} {seq:>4} {batch:>6} {rate:>9.1f} {f'{mfu:.1%}' if mfu else 'n/a':>7} "
              f"{policy:>15}  {f'{reference} seq/s' if reference else ''}")
    return rows


if __name__ == "__main__":
    main()
