"""Benchmark: create_pretraining_data.py on Beam's DirectRunner vs the local generator, same flags.

    python benchmarks/bench_beam.py [--mb 20] [--files 4] [--workers 2] [--dupe_factor 5] [--segmenter rjieba]

Corpus: the first --mb MB of the shared Chinese Wikipedia shards (../shared/data/corpus/zhwiki, whole
documents), written as --files plain text files. Runs the script twice, `--num_workers=N` locally and
`--runner=DirectRunner --num_workers=N` (Beam's multi_processing mode, N SDK worker processes), and
prints for each: input MB/s by wall clock, MB per CPU second of the whole process tree (the per-core
rate a cluster estimate starts from; sampled every 0.1 s, so the last 0.1 s of each process is
missed), peak RSS of the tree (sum) and of its largest process; then
checks that both wrote the same set of serialized records (sha1 of each, sorted).

Needs apache-beam (pip install '.[beam]'). Wall-clock figures depend on the machine's load; compare
them within one run. This is a benchmark: it asserts nothing about time.
"""

import argparse
import glob
import hashlib
import lzma
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDS = os.path.join(REPO, "..", "shared", "data", "corpus", "zhwiki", "zhwiki_*.txt.xz")


def prepare_corpus(mb, n_files, workdir):
    """The first `mb` MB of the zhwiki shards (whole documents) as `n_files` files; returns their paths."""
    shards = sorted(glob.glob(SHARDS))
    if not shards:
        sys.exit(f"bench_beam: the shared corpus is missing ({SHARDS})")
    docs, size = [], 0
    for shard in shards:
        with lzma.open(shard, "rt", encoding="utf-8") as f:
            for doc in f.read().split("\n\n"):
                if size >= mb * 1e6:
                    break
                docs.append(doc.strip("\n"))
                size += len(doc.encode("utf-8")) + 2
    paths = []
    per_file = -(-len(docs) // n_files)
    for i in range(n_files):
        path = os.path.join(workdir, f"corpus_{i}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n\n".join(docs[i * per_file:(i + 1) * per_file]) + "\n")
        paths.append(path)
    return paths


def record_digests(paths):
    """Sorted sha1 of every serialized record in the TFRecord files (framing read by hand)."""
    out = []
    for path in paths:
        with open(path, "rb") as f:
            while header := f.read(12):
                n = int.from_bytes(header[:8], "little")
                out.append(hashlib.sha1(f.read(n)).digest())
                f.read(4)
    return sorted(out)


def tree_sample(root):
    """{pid: (RSS KB, CPU seconds so far)} over the process tree, from /proc. Children of every
    thread count: Beam starts its worker processes from a runner thread, not the main one."""
    pids, stack = [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        for children in glob.glob(f"/proc/{pid}/task/*/children"):
            try:
                with open(children) as f:
                    stack += [int(c) for c in f.read().split()]
            except OSError:
                pass
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                m = re.search(r"VmRSS:\s+(\d+)", f.read())
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
            out[pid] = (int(m.group(1)) if m else 0, cpu)
        except (OSError, IndexError, ValueError):
            pass
    return out


def run(name, cmd, mb):
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_sum = peak_one = 0
    cpu = {}  # pid -> last CPU seconds seen: counts processes whether or not anyone waits for them
    while proc.poll() is None:
        sample = tree_sample(proc.pid)
        sizes = [rss for rss, _ in sample.values()]
        peak_sum, peak_one = max(peak_sum, sum(sizes)), max(peak_one, max(sizes, default=0))
        cpu.update({pid: c for pid, (_, c) in sample.items()})
        time.sleep(0.1)
    output = proc.stdout.read()
    wall = time.perf_counter() - start
    cpu_s = sum(cpu.values())
    m = re.search(r"wrote (\d+) instances", output)
    if proc.returncode or not m:
        sys.exit(f"bench_beam: {name} failed: {' '.join(cmd)}\n{output[-3000:]}")
    print(f"  {name:28s} {mb / wall:6.3f} MB/s  {mb / cpu_s:6.3f} MB/CPU-s  {int(m.group(1)):8d} instances  "
          f"wall {wall:7.1f}s  CPU {cpu_s:7.1f}s  peak RSS tree {peak_sum / 1024:5.0f} MB, "
          f"largest process {peak_one / 1024:5.0f} MB", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=20.0, help="MB of the shared corpus to use")
    parser.add_argument("--files", type=int, default=4, help="input files the corpus is split into")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dupe_factor", type=int, default=5)
    parser.add_argument("--num_output_shards", type=int, default=4)
    parser.add_argument("--segmenter", default="jieba", choices=["jieba", "rjieba"])
    parser.add_argument("--vocab_file", default=os.path.join(REPO, "..", "shared", "data", "vocab", "vocab.txt"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        inputs = prepare_corpus(args.mb, args.files, work)
        mb = sum(map(os.path.getsize, inputs)) / 1e6
        common = [f"--input_file={','.join(inputs)}", f"--vocab_file={args.vocab_file}",
                  "--max_seq_length=128", "--max_predictions_per_seq=20", f"--dupe_factor={args.dupe_factor}",
                  f"--num_output_shards={args.num_output_shards}", f"--num_workers={args.workers}",
                  f"--segmenter={args.segmenter}",
                  "--progress_every_secs=1000"]
        script = os.path.join(REPO, "create_pretraining_data.py")
        print(f"bench_beam: {mb:.1f} MB of zhwiki text in {args.files} files, seq 128, dupe {args.dupe_factor}, "
              f"{args.num_output_shards} shards, {args.workers} workers, {args.segmenter}")
        outputs = {}
        for name, extra in (("local --num_workers", []), ("beam DirectRunner", ["--runner=DirectRunner"])):
            out = os.path.join(work, name.split()[0], "out.tfrecord")
            run(f"{name}={args.workers}", [sys.executable, script, f"--output_file={out}"] + common + extra, mb)
            outputs[name] = sorted(glob.glob(out + "-*-of-*[0-9]"))
        out_mb = sum(map(os.path.getsize, outputs["local --num_workers"])) / 1e6
        print(f"  records written: {out_mb:.1f} MB ({out_mb / mb:.1f} MB per MB of text)")
        same = record_digests(outputs["local --num_workers"]) == record_digests(outputs["beam DirectRunner"])
        print(f"  same set of serialized records: {same}")


if __name__ == "__main__":
    main()
