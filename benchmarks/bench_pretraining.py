"""Pretraining throughput: our compiled MLM train step vs transformers' PyTorch BertForMaskedLM.

    python benchmarks/bench_pretraining.py                     # L4/H256 and base, seq 128
    python benchmarks/bench_pretraining.py --sizes=small --rounds=5

Prints sequences/s and MFU (model FLOPs / the fp32 matmul peak measured here, on this machine) for
our step (run_pretraining.MaskedLMTrainer: the whole step - forward, backward, clip, AdamW update -
as one XLA computation, or without XLA) and for the peer (PyTorch eager BertForMaskedLM with the
masked positions gathered before the head, AdamW, clip 1.0), dropout 0.1 in both, fp32, random
token ids. Two profiling variants say what bounds our step: forward+backward alone (what the
update costs) and the whole step without dropout (what dropout costs). The peer runs in a process
of its own (in one shared with TensorFlow every PyTorch round ran slow). Variants run in alternating rounds
so that load from other processes hits them alike; figures are medians with the range over rounds.
Not a test: asserts nothing.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

SIZES = {  # name -> (layers, hidden, batch)
    "small": (4, 256, 32),
    "base": (12, 768, 8),
}
VOCAB, SEQ, PRED = 21128, 128, 20


def train_flops_per_sequence(layers, hidden, seq=SEQ, pred=PRED, vocab=VOCAB):
    """Matmul FLOPs of one training sequence (backward = 2x forward), as in MFU papers."""
    intermediate = 4 * hidden
    per_token_layer = 2 * (4 * hidden * hidden + 2 * hidden * intermediate) + 4 * seq * hidden
    head = pred * (2 * hidden * hidden + 2 * hidden * vocab)
    return 3 * (layers * seq * per_token_layer + head)


def measure_matmul_peak(n=2048, repeats=10):
    """Best fp32 GFLOP/s of an n x n matmul (TensorFlow, all cores)."""
    import tensorflow as tf
    a = tf.random.normal([n, n])
    b = tf.random.normal([n, n])
    mm = tf.function(lambda a, b: tf.matmul(a, b))
    mm(a, b).numpy()
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a, b).numpy()
        best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return best


def random_batch(batch, seq=SEQ, pred=PRED, seed=0):
    """A pretraining batch of random ids (shared with bench_gpu.py): dict of [batch, seq|pred]."""
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(1000, VOCAB, size=(batch, seq)).astype(np.int32),
        "input_mask": np.ones((batch, seq), np.int32),
        "segment_ids": np.zeros((batch, seq), np.int32),
        "masked_lm_positions": np.sort(rng.integers(1, seq, size=(batch, pred)), 1).astype(np.int32),
        "masked_lm_ids": rng.integers(1000, VOCAB, size=(batch, pred)).astype(np.int32),
        "masked_lm_weights": np.ones((batch, pred), np.float32),
    }


def trainer_on_random_batches(config, strategy, batch, seq, pred, jit_compile):
    """Our MaskedLMTrainer (AdamW, no clipping) over one repeated random batch, built under
    `strategy`; -> (trainer, step(n)) where step runs n steps in one host call (shared with
    bench_gpu.py)."""
    import tensorflow as tf

    import modeling
    import optimization
    import run_pretraining
    with strategy.scope():
        model = modeling.build_model(modeling.BertPretrainer(config))
        optimizer = optimization.create_optimizer(1e-4, 10_000, 100, clip_norm=0)
        optimizer.build(model.trainable_variables)
    trainer = run_pretraining.MaskedLMTrainer(model, optimizer, strategy, per_replica_batch=batch,
                                              jit_compile=jit_compile)
    data = tf.data.Dataset.from_tensors(random_batch(batch, seq, pred)).repeat()
    iterator = iter(strategy.distribute_datasets_from_function(lambda _: data))

    def step(n):
        _, _, ran, finite = trainer.train_loop(iterator, tf.constant(n))
        if not (bool(finite) and int(ran) == n):
            raise RuntimeError("non-finite loss in the benchmark")
    return trainer, step


def make_ours(layers, hidden, batch, jit_compile, grads_only=False, dropout=0.1):
    """-> step(n): runs n training steps of our trainer (one host call, as --steps_per_loop=n).

    grads_only: only forward+backward (XLA), no all-reduce/clip/update, to see what the rest costs.
    """
    import tensorflow as tf

    import modeling
    import train_utils
    config = modeling.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=hidden // 64, intermediate_size=4 * hidden,
                                 max_position_embeddings=512, hidden_dropout_prob=dropout,
                                 attention_probs_dropout_prob=dropout)
    strategy = train_utils.make_strategy("one_device")
    trainer, step = trainer_on_random_batches(config, strategy, batch, SEQ, PRED, jit_compile)
    model = trainer.model

    grads_fn = tf.function(trainer._loss_and_grads, jit_compile=True)
    batch_k = {k: tf.constant(v[np.newaxis]) for k, v in random_batch(batch).items()}  # [k=1, B, ...]

    def grads_step(n):
        for _ in range(n):
            grads, _, _ = grads_fn([v.value for v in model.trainable_variables],
                                   [v.value for v in model.non_trainable_variables], batch_k)
        float(grads[0][0, 0])
    return grads_step if grads_only else step


def peer_train_step(layers, hidden, head="gathered"):
    """-> train(batch): one step of transformers' BertForMaskedLM on a dict of numpy [B, S|P]
    arrays (as `random_batch`), AdamW, clip 1.0 (shared with bench_pretraining_e2e.py, which feeds
    it records). head="gathered": the masked positions gathered before the head (the fast way);
    "labels": the call of transformers' docs and run_mlm.py, labels over every position (-100 where
    none), so the head computes the logits of all B x S positions."""
    import torch
    import transformers
    torch.set_num_threads(os.cpu_count())
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=hidden // 64, intermediate_size=4 * hidden,
                                     hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                                     max_position_embeddings=512)
    model = transformers.BertForMaskedLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-6, weight_decay=0.01)

    def train(batch):
        b = {k: torch.from_numpy(v).long() if v.dtype == np.int32 else torch.from_numpy(v)
             for k, v in batch.items()}
        rows = torch.arange(b["input_ids"].shape[0])[:, None]
        if head == "labels":
            labels = torch.full_like(b["input_ids"], -100)
            real = b["masked_lm_weights"] > 0
            labels[rows.expand_as(real)[real], b["masked_lm_positions"][real]] = b["masked_lm_ids"][real]
            loss = model(input_ids=b["input_ids"], attention_mask=b["input_mask"],
                         token_type_ids=b["segment_ids"], labels=labels).loss
            return update(loss)
        sequence = model.bert(input_ids=b["input_ids"], attention_mask=b["input_mask"],
                              token_type_ids=b["segment_ids"]).last_hidden_state       # [B, S, H]
        logits = model.cls(sequence[rows, b["masked_lm_positions"]])                  # [B, P, V]
        losses = torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), b["masked_lm_ids"].reshape(-1), reduction="none")
        weights = b["masked_lm_weights"].reshape(-1)
        return update((losses * weights).sum() / (weights.sum() + 1e-5))

    def update(loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return train


def make_peer(layers, hidden, batch):
    """-> step(n): n steps of transformers' BertForMaskedLM on one random batch, in this process."""
    train = peer_train_step(layers, hidden)
    data = random_batch(batch)

    def step(n):
        for _ in range(n):
            train(data)
    return step


def make_peer_process(layers, hidden, batch):
    """-> step(n): the same steps in a process of their own, which runs them while this one waits.

    In the process that also ran TensorFlow every PyTorch round was a slow one (30.4-31.1 seq/s at
    L4/H256 on 2026-12-03, 42-44 in a good round alone), which flattered our ratio (README,
    "Measured here").
    """
    server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve_peer",
                               f"{layers},{hidden},{batch}"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def step(n):
        server.stdin.write(f"{n}\n")
        server.stdin.flush()
        if server.stdout.readline().strip() != "done":
            raise RuntimeError("the PyTorch peer process failed (its error is above)")
    return step


def serve_peer(sizes):
    """The peer process: reads a step count per line, runs them, answers "done"."""
    step = make_peer(*(int(v) for v in sizes.split(",")))
    for line in sys.stdin:
        step(int(line))
        print("done", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="small,base")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=0, help="steps per timing (default: by size)")
    parser.add_argument("--serve_peer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_peer:
        return serve_peer(args.serve_peer)

    print(f"fp32 matmul peak (TF, 2048^2, {os.cpu_count()} cores) is measured in every round, "
          "beside the variants: MFU per round = that round's rate x FLOPs / that round's peak.")
    for size in args.sizes.split(","):
        layers, hidden, batch = SIZES[size]
        steps = args.steps or (6 if size == "small" else 2)
        flops = train_flops_per_sequence(layers, hidden)
        variants = {"ours_xla": make_ours(layers, hidden, batch, True),
                    "ours_no_xla": make_ours(layers, hidden, batch, False),
                    "ours_xla_fwd_bwd_only": make_ours(layers, hidden, batch, True, grads_only=True),
                    "ours_xla_no_dropout": make_ours(layers, hidden, batch, True, dropout=0.0),
                    "peer_torch": make_peer_process(layers, hidden, batch)}
        for step in variants.values():
            step(1)  # compile / warm up
        times = {name: [] for name in variants}
        peaks = []
        for _ in range(args.rounds):
            peaks.append(measure_matmul_peak(repeats=4))
            for name, step in variants.items():
                start = time.perf_counter()
                step(steps)
                times[name].append(batch * steps / (time.perf_counter() - start))
        print(f"\nL={layers} H={hidden} seq={SEQ} batch={batch} predictions={PRED} dropout=0.1 fp32, "
              f"{flops / 1e9:.2f} GFLOP/sequence; matmul peak per round "
              f"{min(peaks):.0f}-{max(peaks):.0f} GFLOP/s")
        rates = {name: statistics.median(v) for name, v in times.items()}
        for name, rate in rates.items():
            spread = f"{min(times[name]):.1f}-{max(times[name]):.1f}"
            mfus = [r * flops / 1e9 / p for r, p in zip(times[name], peaks)]
            print(f"  {name:21s} {rate:7.2f} seq/s  (rounds {spread})  MFU median "
                  f"{statistics.median(mfus):6.1%} (rounds {min(mfus):.0%}-{max(mfus):.0%})")
        # Ratios per round (both measured back to back), so load that moves between rounds cancels;
        # and best round against best round: PyTorch's two OpenMP threads lose ~30% in a round
        # where anything else wakes on the two cores, so its median can flatter us.
        for name in ("ours_xla", "ours_no_xla"):
            per_round = [a / b for a, b in zip(times[name], times["peer_torch"])]
            print(f"  {name} / peer_torch = {statistics.median(per_round):.2f}x median of rounds "
                  f"({min(per_round):.2f}-{max(per_round):.2f}x), "
                  f"{max(times[name]) / max(times['peer_torch']):.2f}x best round / best round")


if __name__ == "__main__":
    main()
