"""Two workers vs one: run_pretraining.py throughput under MultiWorkerMirroredStrategy on 127.0.0.1.

    python benchmarks/bench_multi_worker.py                  # L2/H128, seq 128, global batch 32
    python benchmarks/bench_multi_worker.py --steps=100 --batch=64

Three runs of the real script, one after another, on the same random records and global batch B:
  one worker      --strategy=one_device, batch B
  two workers     TF_CONFIG with two workers on free 127.0.0.1 ports, B/2 per worker
  two alone       the same two processes at the same time, each --strategy=one_device at B/2 with no
                  cluster: the two workers' work and CPU contention without the all-reduce
Sequences/s are medians over the steps after the first few (TensorBoard's sequences_per_second of
each step). The all-reduce share of a two-worker step is 1 - (step time of "two alone") / (step time
of "two workers"): what the gradient all-reduce and waiting for the peer add. On one machine the two
workers share its cores, so two workers are not expected to be faster here; on two machines the
compute halves per worker and the all-reduce goes over the network. Every run is --jit_compile=false
(XLA cannot compile the update of variables mirrored over CPU workers, so all three run the same
uncompiled step). Not a test: asserts nothing.
"""

import argparse
import glob
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_records(path, num, seq, pred, vocab_size, seed=0):
    """`num` random masked-LM records (ids drawn uniformly, `pred` masked positions each)."""
    import pretraining_records

    rng = np.random.default_rng(seed)
    serialized = []
    for _ in range(num):
        ids = rng.integers(1000, vocab_size, seq)
        positions = np.sort(rng.choice(np.arange(1, seq - 1), pred, replace=False))
        serialized.append(pretraining_records.encode_example({
            "input_ids": ("int64", ids.tolist()), "input_mask": ("int64", [1] * seq),
            "segment_ids": ("int64", [0] * (seq // 2) + [1] * (seq - seq // 2)),
            "masked_lm_positions": ("int64", positions.tolist()),
            "masked_lm_ids": ("int64", ids[positions].tolist()),
            "masked_lm_weights": ("float32", [1.0] * pred),
            "next_sentence_labels": ("int64", [0])}))
    pretraining_records.write_records(path, serialized, {
        "max_seq_length": seq, "max_predictions_per_seq": pred, "vocab_size": vocab_size,
        "do_lower_case": True, "do_whole_word_mask": False, "masked_lm_prob": 0.15,
        "segmenter": "none (random ids, benchmarks/bench_multi_worker.py)", "input_files": []})


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def command(args, output_dir, batch, strategy):
    return [sys.executable, os.path.join(ROOT, "run_pretraining.py"), f"--input_file={args.records}",
            f"--bert_config_file={args.config}", f"--output_dir={output_dir}", "--do_train",
            f"--max_seq_length={args.seq}", f"--max_predictions_per_seq={args.pred}",
            f"--train_batch_size={batch}", f"--num_train_steps={args.steps}", "--num_warmup_steps=1",
            "--learning_rate=1e-4", "--iterations_per_loop=1", "--save_checkpoints_steps=1000000",
            "--jit_compile=false", "--check_input_files=false", f"--strategy={strategy}"]


def run_together(commands, envs, workdir):
    """Starts the commands at once; waits; fails with the log of any that failed."""
    procs = []
    for i, (cmd, env) in enumerate(zip(commands, envs)):
        log = open(os.path.join(workdir, f"log-{time.time_ns()}-{i}.txt"), "w+")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **env)), log))
    for proc, log in procs:
        if proc.wait() != 0:
            log.seek(0)
            sys.exit(f"a benchmark run failed:\n{log.read()[-3000:]}")


def sequences_per_second(output_dir, skip):
    """Median of the per-step sequences/s after the first `skip` steps."""
    import tensorflow as tf

    values = []
    for path in glob.glob(os.path.join(output_dir, "train", "events.out.tfevents.*")):
        for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
            event = tf.compat.v1.Event.FromString(raw)
            for value in event.summary.value:
                if value.tag == "sequences_per_second" and event.step > skip:
                    values.append(float(tf.make_ndarray(value.tensor)))
    return statistics.median(values)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "resources", "bert_config_L2_H128.json"))
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--pred", type=int, default=20)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=10, help="first steps left out (tracing, warm-up)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench_multi_worker-")
    with open(args.config) as f:
        vocab_size = json.load(f)["vocab_size"]
    args.records = os.path.join(work, "train.tfrecord")
    write_records(args.records, 4 * args.batch, args.seq, args.pred, vocab_size)

    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    started = time.time()
    run_together([command(args, os.path.join(work, "one"), args.batch, "one_device")], [{}], work)
    run_together([command(args, os.path.join(work, "two"), args.batch, "auto")] * 2,
                 [{"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
                  for i in range(2)], work)
    run_together([command(args, os.path.join(work, f"alone{i}"), args.batch // 2, "one_device")
                  for i in range(2)], [{}, {}], work)

    one = sequences_per_second(os.path.join(work, "one"), args.skip)
    two = sequences_per_second(os.path.join(work, "two"), args.skip)
    alone = [sequences_per_second(os.path.join(work, f"alone{i}"), args.skip) for i in range(2)]
    step_two = args.batch / two                                  # s per global step, two workers
    step_alone = max((args.batch // 2) / s for s in alone)        # the slower of the two alone
    print(f"config {os.path.basename(args.config)}, seq {args.seq}, global batch {args.batch}, "
          f"{args.steps} steps (median after step {args.skip}), {os.cpu_count()} CPU cores, "
          f"{time.time() - started:.0f} s in all")
    print(f"one worker:   {one:8.1f} sequences/s  ({1000 * args.batch / one:.0f} ms/step)")
    print(f"two workers:  {two:8.1f} sequences/s  ({1000 * step_two:.0f} ms/step)  "
          f"= {two / one:.2f} x one worker")
    print(f"two alone:    {args.batch / step_alone:8.1f} sequences/s  ({1000 * step_alone:.0f} ms/step, "
          "the same two processes without the all-reduce)")
    print(f"all-reduce share of a two-worker step: {max(0.0, 1 - step_alone / step_two):.0%}")


if __name__ == "__main__":
    main()
