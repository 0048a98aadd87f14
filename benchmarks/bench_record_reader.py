"""record_reader (NumPy, no TensorFlow) vs tf.data parsing the same pretraining records.

    python benchmarks/bench_record_reader.py [--mb 4] [--batch 256] [--rounds 3]

Records: seq 128, 20 predictions, made by create_pretraining_data.py from the first --mb MB of the
shared Wikipedia shard (resources/corpus when it is absent), both kinds: static, and unmasked
(--dynamic_masking: token ids + word starts; the JAX path masks them on the device).

For each kind, alternating rounds, best round of each:
  ours      record_reader.train_batches (reads, CRC checks, decodes; the trainer's stream), one thread
  tf.data   TFRecordDataset -> batch -> parse (tf.io.parse_example of the same features, for unmasked
            records the same decoding to dense ids and word-start bits, no masking), AUTOTUNE threads
It prints records/s (wall) and CPU microseconds per record for both, their ratio, and the demand of
one training step: BERT-base, seq 128 at ~3,000 sequences/s on one H200 (the reference figure of
issue 19), i.e. ours / demand. A benchmark, not a test: it asserts nothing about time.
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import numpy as np  # noqa: E402
from bench_create_pretraining_data import prepare_corpus  # noqa: E402

import create_pretraining_data as cpd  # noqa: E402
import pretraining_records as records  # noqa: E402
import record_reader  # noqa: E402

SEQ, PRED = 128, 20
DEMAND = 3000  # sequences/s: BERT-base seq 128 bf16 on one H200, the reference figure
SHARED_VOCAB = os.path.join(REPO, "..", "shared", "data", "vocab", "vocab.txt")


def generate(corpus, out, vocab, **kw):
    cpd.generate(cpd.Options(input_file=corpus, output_file=out, vocab_file=vocab, max_seq_length=SEQ,
                             max_predictions_per_seq=PRED, dupe_factor=1, **kw), log=lambda line: None)
    return out


def ours(path, count, batch, batches):
    """-> (wall s, CPU s) for `batches` batches of the trainer's stream."""
    info = records.read_info([path])
    stream = record_reader.train_batches([path], [count], batch, 0, 1000, 0, info, seq_len=SEQ,
                                         max_pred=PRED, prefetch=0)
    for _ in range(max(1, 2048 // batch)):  # opens the file, decodes its first chunk (2048 records)
        next(stream)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(stream)
    return time.perf_counter() - wall, time.process_time() - cpu


def tf_parse(kind):
    import tensorflow as tf
    if kind == records.STATIC:
        spec = records.feature_spec(SEQ, PRED)
        return lambda s: tf.io.parse_example(s, spec)
    spec = {"token_ids": tf.io.RaggedFeature(tf.int64, row_splits_dtype=tf.int32),
            "word_starts": tf.io.FixedLenFeature([], tf.string)}
    width = (SEQ - 2 + 7) // 8

    def parse(serialized):
        features = tf.io.parse_example(serialized, spec)
        ids = features["token_ids"].to_tensor(shape=[None, SEQ - 2])
        raw = tf.cast(tf.io.decode_raw(features["word_starts"], tf.uint8, fixed_length=width), tf.int32)
        bits = tf.bitwise.bitwise_and(tf.bitwise.right_shift(raw[:, :, None], tf.range(8)), 1)
        return ids, tf.reshape(bits, [-1, 8 * width])[:, :SEQ - 2]

    return parse


def tf_data(path, kind, batch, batches):
    import tensorflow as tf
    d = (tf.data.TFRecordDataset(path, buffer_size=1 << 20).repeat().batch(batch)
         .map(tf_parse(kind), num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))
    it = iter(d)
    next(it)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    return time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=4.0, help="MB of the Wikipedia shard")
    parser.add_argument("--corpus", default="", help="text files instead (comma globs)")
    parser.add_argument("--vocab_file", default=SHARED_VOCAB if os.path.isfile(SHARED_VOCAB)
                        else os.path.join(REPO, "resources", "vocab.txt"))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=48, help="a multiple of 2048 / batch")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        corpus, desc = prepare_corpus(args, work)
        files = {records.STATIC: generate(corpus, os.path.join(work, "static.tfrecord"), args.vocab_file),
                 records.UNMASKED: generate(corpus, os.path.join(work, "unmasked.tfrecord"), args.vocab_file,
                                            dynamic_masking=True)}
        print(f"corpus: {desc}; seq {SEQ}, {PRED} predictions, batch {args.batch}, {args.batches} "
              f"batches per round, best of {args.rounds} alternating rounds")
        for kind, path in files.items():
            count = record_reader.count_records(path)
            n = args.batch * args.batches
            best = {"ours": (np.inf, np.inf), "tf.data": (np.inf, np.inf)}
            for _ in range(args.rounds):
                for name, fn in (("ours", ours), ("tf.data", lambda p, c, b, k, kind=kind: tf_data(p, kind, b, k))):
                    wall, cpu = fn(path, count, args.batch, args.batches)
                    best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
            rate = {k: n / v[0] for k, v in best.items()}
            print(f"{kind:9s} ({count} records, {os.path.getsize(path) / count:.0f} B each): "
                  f"ours {rate['ours']:,.0f} records/s ({best['ours'][1] / n * 1e6:.1f} CPU us/record), "
                  f"tf.data {rate['tf.data']:,.0f} records/s ({best['tf.data'][1] / n * 1e6:.1f} CPU "
                  f"us/record); ours/tf.data {rate['ours'] / rate['tf.data']:.2f} (wall), "
                  f"{best['tf.data'][1] / best['ours'][1]:.2f} (CPU); ours / one H200 step's demand "
                  f"({DEMAND:,} seq/s, BERT-base seq {SEQ}) = {rate['ours'] / DEMAND:.1f}x")


if __name__ == "__main__":
    main()
