"""The same model on two Keras backends: forward + backward of the masked-LM loss, TensorFlow vs JAX.

    python benchmarks/bench_backends.py                     # L4/H256, batch 32, seq 128, 2 rounds
    python benchmarks/bench_backends.py --rounds=3 --steps=20

Each backend runs in its own process (KERAS_BACKEND is fixed when keras is imported); the JAX one
has TensorFlow blocked, as on a machine without it. Both compile one program for the step - the
gradients of the masked-LM loss of modeling.BertPretrainer, from Model.stateless_call, dropout 0.1,
fp32 - (tf.function(jit_compile=True) vs jax.jit) and time it on bench_pretraining.random_batch, the
same batch. No optimizer update: this compares what the backends do with the same keras.ops model.
Rounds alternate between the backends so that load from other processes hits both alike; the
figures are medians over rounds and the ratio is JAX / TensorFlow. Not a test: asserts nothing.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("tensorflow", "jax")


def masked_lm_loss(logits, ids, weights):
    """Mean cross-entropy over the real masked positions, in keras.ops. logits [B,P,V], ids [B,P]."""
    from keras import ops
    log_probs = ops.log_softmax(logits, axis=-1)                                   # [B, P, V]
    picked = ops.take_along_axis(log_probs, ops.expand_dims(ids, -1), axis=-1)[..., 0]  # [B, P]
    return -ops.sum(picked * weights) / ops.maximum(ops.sum(weights), 1.0)


def worker(args):
    """One backend (the KERAS_BACKEND of this process): prints {"backend", "sequences_per_s"}."""
    sys.path.insert(0, REPO)
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import keras
    import numpy as np
    from bench_pretraining import VOCAB, random_batch

    import modeling
    backend = keras.backend.backend()
    config = modeling.BertConfig(vocab_size=VOCAB, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                 num_attention_heads=args.hidden // 64, intermediate_size=4 * args.hidden,
                                 max_position_embeddings=512, hidden_dropout_prob=args.dropout,
                                 attention_probs_dropout_prob=args.dropout)
    keras.utils.set_random_seed(0)
    model = modeling.make_task_model(config, "mlm")
    batch = random_batch(args.batch)
    inputs = {k: batch[k] for k in ("input_ids", "input_mask", "segment_ids", "masked_lm_positions")}

    def loss_fn(trainable, non_trainable):
        logits, non_trainable = model.stateless_call(trainable, non_trainable, inputs, training=True)
        return masked_lm_loss(logits, batch["masked_lm_ids"], batch["masked_lm_weights"]), non_trainable

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    if backend == "jax":
        import jax
        grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))

        def step(non_trainable):
            (loss, non_trainable), grads = grad_fn(trainable, non_trainable)
            return loss, grads, non_trainable

        def wait(loss, grads):
            jax.block_until_ready((loss, grads))
    else:
        import tensorflow as tf
        non_trainable = [tf.convert_to_tensor(v) for v in non_trainable]  # one trace: tensors each call

        @tf.function(jit_compile=True)
        def step(non_trainable):
            with tf.GradientTape() as tape:
                tape.watch(trainable)
                loss, non_trainable = loss_fn(trainable, non_trainable)
            return loss, [tf.convert_to_tensor(g) for g in tape.gradient(loss, trainable)], non_trainable

        def wait(loss, grads):
            float(loss)
            grads[-1].numpy()

    start = time.perf_counter()
    loss, grads, non_trainable = step(non_trainable)  # compiles
    wait(loss, grads)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        loss, grads, non_trainable = step(non_trainable)
    wait(loss, grads)
    elapsed = time.perf_counter() - start
    print(json.dumps({"backend": backend, "sequences_per_s": args.steps * args.batch / elapsed,
                      "compile_s": compile_s, "loss": float(np.asarray(loss))}), flush=True)


# Set before anything is imported in the JAX process: TensorFlow must not be needed there.
_BLOCK_TF = "import sys; sys.modules['tensorflow'] = None; import runpy; sys.argv = sys.argv[1:]; " \
            "runpy.run_path(sys.argv[0], run_name='__main__')"


def run_backend(backend, args):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    flags = ["--worker", f"--layers={args.layers}", f"--hidden={args.hidden}", f"--batch={args.batch}",
             f"--steps={args.steps}", f"--dropout={args.dropout}"]
    command = [sys.executable, __file__, *flags]
    if backend == "jax":
        command = [sys.executable, "-c", _BLOCK_TF, __file__, *flags]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        sys.exit(f"{backend} worker failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round, after compiling")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.1, help="0: what the dropout masks cost")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    print(f"L{args.layers}/H{args.hidden}, batch {args.batch}, seq 128, 20 masked positions, fp32, "
          f"dropout {args.dropout}, "
          f"{args.steps} steps x {args.rounds} rounds; {os.cpu_count()} CPUs", flush=True)
    figures = {b: [] for b in BACKENDS}
    for r in range(args.rounds):
        for backend in BACKENDS if r % 2 == 0 else BACKENDS[::-1]:
            result = run_backend(backend, args)
            figures[backend].append(result["sequences_per_s"])
            print(f"  round {r + 1} {backend:10s} {result['sequences_per_s']:7.1f} sequences/s "
                  f"(compile {result['compile_s']:.1f} s, loss {result['loss']:.3f})", flush=True)
    medians = {b: statistics.median(v) for b, v in figures.items()}
    for backend in BACKENDS:
        print(f"{backend:10s} {medians[backend]:7.1f} sequences/s (median; range "
              f"{min(figures[backend]):.1f}-{max(figures[backend]):.1f})")
    print(f"jax / tensorflow: {medians['jax'] / medians['tensorflow']:.2f}x")
    return None


if __name__ == "__main__":
    main()
