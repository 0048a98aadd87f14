"""Classifier fine-tuning throughput: our Keras BertClassifier vs transformers' PyTorch
BertForSequenceClassification, same sizes, same batch, same machine, same run.

    python benchmarks/bench_finetune.py                       # base (L=12/H=768) and L=4/H=256, seq 128
    python benchmarks/bench_finetune.py --sizes=4x256 --batch_size=32 --jit_compile

Prints training and inference sequences/s for each framework and the ratio ours/PyTorch. Training is
a full step (forward, backward, AdamW update, dropout on); inference is a forward pass without
dropout. Random weights and token ids (vocab 21128): throughput does not depend on their values.
PyTorch runs in a process of its own, after ours.
A benchmark, not a test: it asserts nothing about time.
"""

import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_string("sizes", "12x768,4x256", "Comma-separated LxH model sizes (heads = H/64, FFN = 4H).")
flags.DEFINE_integer("seq_len", 128, "Sequence length.")
flags.DEFINE_integer("batch_size", 16, "Sequences per step.")
flags.DEFINE_integer("steps", 0, "Timed steps per measurement; 0 = about 20 s worth (at least 3).")
flags.DEFINE_bool("jit_compile", False, "XLA-compile our train/predict steps.")
flags.DEFINE_integer("num_labels", 2, "Classes.")
flags.DEFINE_string("peer_only", None, "(internal) Only PyTorch's two rates for this LxH size.")
FLAGS = flags.FLAGS
VOCAB = 21128


def _timed(step, steps):
    """Runs `step` once to warm up (tracing / compilation), then times `steps` calls. Returns s/step."""
    step()
    if not steps:  # calibrate on one more call
        t = time.perf_counter()
        step()
        steps = max(3, int(20.0 / max(time.perf_counter() - t, 1e-3)))
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def bench_ours(layers, hidden, batch):
    import tensorflow as tf

    import finetuning
    import modeling
    import optimization

    config = modeling.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=hidden // 64, intermediate_size=4 * hidden)
    model = modeling.build_model(modeling.BertClassifier(config, FLAGS.num_labels))
    model.compile(optimizer=optimization.create_optimizer(2e-5, 10_000, 100),
                  loss=finetuning.masked_sparse_ce, jit_compile=FLAGS.jit_compile)
    rng = np.random.default_rng(0)
    x = {"input_ids": rng.integers(1000, VOCAB, (batch, FLAGS.seq_len)).astype(np.int32),
         "input_mask": np.ones((batch, FLAGS.seq_len), np.int32),
         "segment_ids": np.zeros((batch, FLAGS.seq_len), np.int32)}
    y = rng.integers(0, FLAGS.num_labels, batch).astype(np.int32)
    x_tf = {k: tf.constant(v) for k, v in x.items()}
    y_tf = tf.constant(y)
    predict = tf.function(lambda inputs: model(inputs, training=False), jit_compile=FLAGS.jit_compile)
    train_s = _timed(lambda: model.train_on_batch(x_tf, y_tf), FLAGS.steps)
    infer_s = _timed(lambda: predict(x_tf).numpy(), FLAGS.steps)
    return batch / train_s, batch / infer_s


def bench_torch(layers, hidden, batch):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=hidden // 64, intermediate_size=4 * hidden,
                                     num_labels=FLAGS.num_labels)
    model = transformers.BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(1000, VOCAB, (batch, FLAGS.seq_len)))
    mask = torch.ones_like(ids)
    segments = torch.zeros_like(ids)
    labels = torch.from_numpy(rng.integers(0, FLAGS.num_labels, batch))

    def train_step():
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, token_type_ids=segments, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer_step():
        model.eval()
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, token_type_ids=segments).logits.numpy()

    train_s = _timed(train_step, FLAGS.steps)
    infer_s = _timed(infer_step, FLAGS.steps)
    return batch / train_s, batch / infer_s


def bench_torch_process(size):
    """bench_torch in a process of its own: in the process that had run TensorFlow, PyTorch ran in
    its slow mode (README, "Measured here"), which flattered our ratio."""
    command = [sys.executable, os.path.abspath(__file__), f"--peer_only={size}"] + [
        f"--{name}={FLAGS[name].value}" for name in ("seq_len", "batch_size", "steps", "num_labels")]
    train, infer = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-2:]
    return float(train), float(infer)


def main(argv):
    del argv
    if FLAGS.peer_only:
        layers, hidden = (int(v) for v in FLAGS.peer_only.lower().split("x"))
        print(*bench_torch(layers, hidden, FLAGS.batch_size))
        return
    import torch

    print(f"seq_len={FLAGS.seq_len} batch={FLAGS.batch_size} jit_compile={FLAGS.jit_compile} "
          f"cpus={os.cpu_count()} torch_threads={torch.get_num_threads()}")
    header = f"{'model':>10} {'framework':>10} {'train seq/s':>12} {'infer seq/s':>12}"
    print(header)
    for size in FLAGS.sizes.split(","):
        layers, hidden = (int(v) for v in size.lower().split("x"))
        ours = bench_ours(layers, hidden, FLAGS.batch_size)
        theirs = bench_torch_process(size)
        print(f"{size:>10} {'ours (TF)':>10} {ours[0]:12.1f} {ours[1]:12.1f}")
        print(f"{size:>10} {'PyTorch':>10} {theirs[0]:12.1f} {theirs[1]:12.1f}")
        print(f"{size:>10} {'ratio':>10} {ours[0] / theirs[0]:11.2f}x {ours[1] / theirs[1]:11.2f}x",
              flush=True)


if __name__ == "__main__":
    app.run(main)
