"""Dynamic masking (create_pretraining_data.py --dynamic_masking + masks drawn in tf.data) vs static records.

    python benchmarks/bench_dynamic_masking.py [--mb 2] [--segmenter jieba] [--rounds 2] [--batches 100]

Corpus: the first --mb MB of the shared Wikipedia shard when present, else resources/corpus (see
bench_create_pretraining_data.prepare_corpus). Seq 128, 20 predictions, masked_lm_prob 0.10. Prints

  1. disk: record bytes / input text bytes for unmasked records and static records at dupe 5 and 10;
  2. generation speed: MB of text per CPU second, --dynamic_masking vs static dupe 5 (one worker,
     in-process, alternating rounds, best round of each);
  3. masking cost: CPU seconds per batch of 32 through the trainer's input pipeline (read, parse,
     and for unmasked records draw the masks) for both kinds, against the CPU seconds of one
     training step at L4/H256, seq 128, batch 32 (benchmarks/bench_pretraining.make_ours, XLA);
  4. the share of words masked by word length (1, 2, 3, 4, 5+ tokens), static (the generator's
     "take whole words while they fit") vs dynamic, at 20 predictions and with a cap of 5.

CPU seconds (process time, all threads) are the steadier figure on a shared machine; all
comparisons are ratios from this one run. A benchmark, not a test: it asserts nothing about time.
"""

import argparse
import collections
import os
import random
import sys
import tempfile
import time
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import numpy as np  # noqa: E402
from bench_create_pretraining_data import prepare_corpus  # noqa: E402

import create_pretraining_data as cpd  # noqa: E402
import pretraining_instances
import pretraining_records as records  # noqa: E402
from corpus import InputReader  # noqa: E402

SEQ, PRED, BATCH = 128, 20, 32
SHARED_VOCAB = os.path.join(REPO, "..", "shared", "data", "vocab", "vocab.txt")


def generate(corpus, out, vocab, segmenter, **kw):
    """One in-process generator run -> (CPU seconds, record bytes)."""
    o = cpd.Options(input_file=corpus, output_file=out, vocab_file=vocab, max_seq_length=SEQ,
                    max_predictions_per_seq=PRED, segmenter=segmenter, **kw)
    for p in (out, out + records.SIDECAR_SUFFIX):  # a rerun must not skip
        if os.path.exists(p):
            os.remove(p)
    start = time.process_time()
    cpd.generate(o, log=lambda line: None)
    return time.process_time() - start, os.path.getsize(out)


def pipeline_cpu_per_batch(path, batches, seed=0):
    """CPU seconds per training batch of run_pretraining's input pipeline over `path`."""
    import tensorflow as tf

    import pretraining_input
    parse = records.make_parser(records.read_info([path]), SEQ, PRED, seed=seed)
    count = records.read_sidecar(path)["num_instances"]
    dataset_fn = pretraining_input.train_dataset_fn([path], [count], BATCH, seed, 1000, 0, parse)
    it = iter(dataset_fn(tf.distribute.InputContext()))
    for _ in range(5):
        next(it)
    start = time.process_time()
    for _ in range(batches):
        next(it)
    return (time.process_time() - start) / batches


def step_cpu(steps):
    """CPU seconds of one L4/H256 training step (seq 128, batch 32, XLA), best of 3."""
    from bench_pretraining import make_ours
    step = make_ours(4, 256, BATCH, True)
    step(1)
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        step(steps)
        best = min(best, (time.process_time() - start) / steps)
    return best


def word_lengths_static(corpus, vocab, segmenter, max_pred):
    """{length bucket: (words, masked words)} of the static generator's masks (dupe 1)."""
    o = cpd.Options(input_file=corpus, output_file="unused", vocab_file=vocab, max_seq_length=SEQ,
                    max_predictions_per_seq=max_pred, segmenter=segmenter)
    maker = pretraining_instances.InstanceMaker(o)
    docs = [(corpus, doc) for _, doc in InputReader([corpus], o.input_format).documents()]
    counts = collections.defaultdict(lambda: [0, 0])
    for d, pieces in enumerate(maker.featurize_many(docs)[0]):
        if not pieces:
            continue
        ids, starts, bounds = maker.flatten(pieces)
        rng = random.Random(d)
        for instance in maker.instances(bounds, rng):
            a, b, g0, g1 = instance
            chosen = set(maker.mask(ids, starts, instance, rng)[1])
            group_bounds = starts[g0:g1] + [b]
            for x, y in zip(group_bounds, group_bounds[1:]):
                counts[min(y - x, 5)][0] += 1
                counts[min(y - x, 5)][1] += (x - a + 1) in chosen
    return counts


def word_lengths_dynamic(path, max_pred, epochs=3):
    """The same counts for masks drawn by the unmasked parser over `epochs` passes of `path`."""
    import tensorflow as tf
    parse = records.make_parser(records.read_info([path]), SEQ, max_pred, seed=1)
    words = []
    for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
        f = tf.train.Example.FromString(raw).features.feature
        n = len(f["token_ids"].int64_list.value)
        bits = np.unpackbits(np.frombuffer(f["word_starts"].bytes_list.value[0], np.uint8),
                             bitorder="little")[:n]
        words.append(np.flatnonzero(bits).tolist() + [n])
    counts = collections.defaultdict(lambda: [0, 0])
    d = tf.data.TFRecordDataset(path).repeat(epochs).enumerate().batch(256).map(parse)
    i = 0
    for batch in d.as_numpy_iterator():
        for positions, weights in zip(batch["masked_lm_positions"], batch["masked_lm_weights"]):
            chosen = set(positions[weights > 0].tolist())
            bounds = words[i % len(words)]
            for x, y in zip(bounds, bounds[1:]):
                counts[min(y - x, 5)][0] += 1
                counts[min(y - x, 5)][1] += (x + 1) in chosen
            i += 1
    return counts


def print_shares(title, static, dynamic):
    print(f"\n{title}: share of words masked, by length in tokens (relative to 1-token words)")
    print(f"  {'length':>6} {'words':>8} {'static':>15} {'dynamic':>15}")
    for length in sorted(static):
        s = static[length][1] / static[length][0]
        d = dynamic[length][1] / dynamic[length][0]
        s1 = static[1][1] / static[1][0]
        d1 = dynamic[1][1] / dynamic[1][0]
        label = f"{length}+" if length == 5 else str(length)
        print(f"  {label:>6} {static[length][0]:8d} {s:7.2%} ({s / s1:4.2f}x) {d:7.2%} ({d / d1:4.2f}x)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=2.0, help="MB of the Wikipedia shard")
    parser.add_argument("--corpus", default="", help="text files instead (comma globs)")
    parser.add_argument("--vocab_file", default=SHARED_VOCAB if os.path.isfile(SHARED_VOCAB)
                        else os.path.join(REPO, "resources", "vocab.txt"))
    parser.add_argument("--segmenter", default="jieba")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batches", type=int, default=100, help="batches per pipeline timing")
    parser.add_argument("--steps", type=int, default=3, help="training steps per step timing")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        corpus, desc = prepare_corpus(types.SimpleNamespace(corpus=args.corpus, mb=args.mb), work)
        text_bytes = os.path.getsize(corpus)
        print(f"corpus: {desc}, {text_bytes / 1e6:.2f} MB; vocab {args.vocab_file}; "
              f"segmenter {args.segmenter}; seq {SEQ}, {PRED} predictions")

        # 1 + 2. Disk and generation speed.
        runs = {"dynamic": dict(dynamic_masking=True), "static dupe 5": dict(dupe_factor=5),
                "static dupe 10": dict(dupe_factor=10)}
        paths = {name: os.path.join(work, name.replace(" ", "_") + ".tfrecord") for name in runs}
        cpu, size = {name: float("inf") for name in runs}, {}
        for r in range(args.rounds):
            for name, kw in runs.items():
                if r and name == "static dupe 10":
                    continue  # only its size is reported
                seconds, size[name] = generate(corpus, paths[name], args.vocab_file, args.segmenter, **kw)
                cpu[name] = min(cpu[name], seconds)
        print("\ndisk (record bytes / text bytes):")
        for name in runs:
            print(f"  {name:15s} {size[name] / 1e6:8.2f} MB  {size[name] / text_bytes:5.2f}x the text")
        mb = text_bytes / 1e6
        print("generation speed (one worker, MB of text per CPU second, best of "
              f"{args.rounds} rounds):")
        for name in ("dynamic", "static dupe 5"):
            print(f"  {name:15s} {mb / cpu[name]:6.3f} MB/CPU-s")
        print(f"  dynamic / static dupe 5 = {cpu['static dupe 5'] / cpu['dynamic']:.2f}x")

        # 3. Masking cost in the input pipeline vs a training step.
        per_batch = {}
        for r in range(args.rounds):
            for name in ("static dupe 5", "dynamic"):
                t = pipeline_cpu_per_batch(paths[name], args.batches, seed=r)
                per_batch[name] = min(per_batch.get(name, t), t)
        step = step_cpu(args.steps)
        extra = per_batch["dynamic"] - per_batch["static dupe 5"]
        print(f"\ninput pipeline, CPU ms per batch of {BATCH} (best of {args.rounds}): static "
              f"{per_batch['static dupe 5'] * 1e3:.2f}, dynamic {per_batch['dynamic'] * 1e3:.2f} "
              f"(masking +{extra * 1e3:.2f} ms)")
        print(f"training step L4/H256 seq {SEQ} batch {BATCH} (XLA): {step * 1e3:.0f} CPU ms")
        print(f"masking cost = {extra / step:.2%} of a training step "
              f"(whole dynamic pipeline {per_batch['dynamic'] / step:.2%}, static "
              f"{per_batch['static dupe 5'] / step:.2%})")

        # 4. Word lengths.
        for cap in (PRED, 5):
            static = word_lengths_static(corpus, args.vocab_file, args.segmenter, cap)
            dynamic = word_lengths_dynamic(paths["dynamic"], cap)
            print_shares(f"seq {SEQ}, cap {cap} predictions", static, dynamic)


if __name__ == "__main__":
    main()
