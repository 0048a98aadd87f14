"""Benchmark of create_pretraining_data.py: where the time goes, and end-to-end throughput.

    python benchmarks/bench_create_pretraining_data.py [--mb 3] [--corpus FILES] [--skip_e2e]

Corpus: the first --mb MB of the shared Chinese Wikipedia shard (../shared/data/corpus/zhwiki, read
with lzma) when present, else the embedded resources/corpus. Prints

  1. a per-stage profile in CPU seconds per input MB (segmentation, tokenization + alignment,
     packing, masking, Example encoding, TFRecord framing), measured in-process, best of --repeats;
  2. end-to-end runs of the script (seq 128/512 x dupe 1/10 x 1/2 workers with jieba, and
     seq 128 dupe 2 with jieba and rjieba): input MB/s by wall clock and per CPU second,
     instances/s, the parent process's share of the CPU time (the part that does not run in
     workers), and peak RSS of the process tree (sum) and of its largest process.

CPU seconds are the steadier figure on a shared machine; wall-clock MB/s depends on the load.
This is a benchmark, not a test: it asserts nothing about time.
"""

import argparse
import glob
import lzma
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARD = os.path.join(REPO, "..", "shared", "data", "corpus", "zhwiki", "zhwiki_00.txt.xz")


def prepare_corpus(args, workdir):
    """Writes the benchmark corpus to a plain file; returns (path, description)."""
    path = os.path.join(workdir, "corpus.txt")
    if args.corpus:
        files = sorted(p for spec in args.corpus.split(",") for p in glob.glob(spec))
        text = "\n".join(open(p, encoding="utf-8").read() for p in files)
        desc = f"{len(files)} given files"
    elif os.path.isfile(SHARD):
        with lzma.open(SHARD, "rt", encoding="utf-8") as f:
            text = f.read(int(args.mb * 1e6 / 2.8))  # ~2.8 bytes per character in this corpus
        text = text[:text.rfind("\n\n") + 1]  # whole documents only
        desc = f"zhwiki_00 (first {len(text.encode()) / 1e6:.1f} MB)"
    else:
        files = sorted(glob.glob(os.path.join(REPO, "resources", "corpus", "*.txt")))
        text = "\n".join(open(p, encoding="utf-8").read() for p in files)
        desc = "resources/corpus (shared corpus absent)"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path, desc


def cpu():
    return time.process_time()


def profile_stages(corpus, args):
    import create_pretraining_data as cpd
    import pretraining_instances
    import pretraining_records
    from corpus import InputReader

    mb = os.path.getsize(corpus) / 1e6
    o = cpd.Options(input_file=corpus, output_file="/dev/null", vocab_file=args.vocab_file,
                    max_seq_length=128, max_predictions_per_seq=20, dupe_factor=1)
    chunks = [[(corpus, sentences) for _, sentences in docs]
              for _, _, docs in InputReader([corpus], o.input_format).chunks()]
    docs = [d for chunk in chunks for d in chunk]
    texts = ["\n".join(s for _, s in sentences) for _, sentences in docs]
    chunk_texts = ["\n".join(s for _, sentences in chunk for _, s in sentences) for chunk in chunks]
    rows = []

    def best(fn):
        times = []
        for _ in range(args.repeats):
            t = cpu()
            out = fn()
            times.append(cpu() - t)
        return min(times), out

    for name in ("jieba", "rjieba"):
        try:
            seg = pretraining_instances.make_segmenter(name)
        except ValueError as e:
            print(f"  ({e})")
            continue
        t, _ = best(lambda seg=seg: [seg(x) for x in texts])
        rows.append((f"segmentation ({name})", t))

    maker = pretraining_instances.InstanceMaker(o)
    full = maker.tok.full
    t, _ = best(lambda: [full.convert_tokens_to_ids(full.tokenize(s)) for _, ss in docs for _, s in ss])
    rows.append(("reference FullTokenizer (not used on the hot path)", t))
    words = [maker.segment(x) for x in chunk_texts]

    def featurize():  # with the segmentation precomputed, so only tokenization + alignment count
        it = iter(words)
        maker.segment = lambda text: next(it)
        return [p for chunk in chunks for p in maker.featurize_many(chunk)[0]]

    t_cold = cpu()
    featurize()
    t_cold = cpu() - t_cold
    t, pieces = best(featurize)
    rows.append(("tokenize + align to words, cold caches", t_cold))
    rows.append(("tokenize + align to words, warm caches", t))
    rng = random.Random(0)
    flat = [maker.flatten(p) for p in pieces]
    t, inst = best(lambda: [(f, x) for f in flat for x in maker.instances(f[2], rng)])
    rows.append(("pack DOC-SENTENCES, per dupe copy", t))
    t, masked = best(lambda: [maker.mask(f[0], f[1], x, rng) for f, x in inst])
    rows.append(("whole-word masking, per dupe copy", t))
    t, records = best(lambda: [maker.encoder.encode(*m) for m in masked])
    rows.append(("tf.train.Example encoding, per dupe copy", t))
    t, _ = best(lambda: pretraining_records.frame(records))
    rows.append(("TFRecord framing + CRC32C, per dupe copy", t))

    print(f"\nStage profile, seq 128, {len(docs)} documents, {len(inst)} instances per copy "
          f"(CPU s per input MB, best of {args.repeats}):")
    for name, t in rows:
        print(f"  {name:52s} {t / mb:7.3f} s/MB   ({mb / t if t else float('inf'):7.2f} MB/s)")


def _tree_rss_kb(root):
    """(sum of RSS over the process tree, largest single RSS) in KB, from /proc."""
    pids, stack = [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                stack += [int(c) for c in f.read().split()]
        except OSError:
            pass
    sizes = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                m = re.search(r"VmRSS:\s+(\d+)", f.read())
                sizes.append(int(m.group(1)) if m else 0)
        except OSError:
            pass
    return sum(sizes), max(sizes, default=0)


def run_once(corpus, out_dir, args, seq, dupe, workers, segmenter):
    out = os.path.join(out_dir, f"s{seq}_d{dupe}_w{workers}_{segmenter}.tfrecord")
    cmd = [sys.executable, os.path.join(REPO, "create_pretraining_data.py"), f"--input_file={corpus}",
           f"--output_file={out}", f"--vocab_file={args.vocab_file}", f"--max_seq_length={seq}",
           f"--max_predictions_per_seq={20 if seq == 128 else 77}", f"--dupe_factor={dupe}",
           f"--num_workers={workers}", f"--segmenter={segmenter}", "--progress_every_secs=1000"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_sum = peak_one = parent_cpu = 0
    while proc.poll() is None:
        total, largest = _tree_rss_kb(proc.pid)
        peak_sum, peak_one = max(peak_sum, total), max(peak_one, largest)
        try:  # the parent's own CPU time (utime + stime), to see what does not parallelize
            with open(f"/proc/{proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parent_cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
        time.sleep(0.05)
    output = proc.stdout.read()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    m = re.search(r"wrote (\d+) instances .* in ([\d.]+)s", output)
    if proc.returncode or not m:
        print(f"  run failed: {' '.join(cmd)}\n{output[-2000:]}")
        return
    instances, gen_s = int(m.group(1)), float(m.group(2))
    mb = os.path.getsize(corpus) / 1e6
    print(f"  seq {seq:3d}  dupe {dupe:2d}  workers {workers}  {segmenter:6s}  "
          f"{mb / gen_s:5.2f} MB/s  {mb / cpu_s:5.2f} MB/CPU-s  {instances / gen_s:7.0f} inst/s  "
          f"{instances:7d} inst  wall {wall:5.1f}s (generator {gen_s:5.1f}s)  CPU {cpu_s:5.1f}s "
          f"(parent {100 * parent_cpu / cpu_s:3.0f}%)  "
          f"peak RSS tree {peak_sum / 1024:4.0f} MB, largest {peak_one / 1024:4.0f} MB")
    os.remove(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=3.0, help="MB of the shared corpus to use")
    parser.add_argument("--corpus", default="", help="comma list / globs instead of the default corpus")
    parser.add_argument("--vocab_file", default=os.path.join(REPO, "resources", "vocab.txt"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip_profile", action="store_true")
    parser.add_argument("--skip_e2e", action="store_true")
    parser.add_argument("--only", default="", help="e.g. s128_d2_w1_rjieba,s128_d2_w2_rjieba")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        corpus, desc = prepare_corpus(args, workdir)
        print(f"corpus: {desc}, {os.path.getsize(corpus) / 1e6:.2f} MB; vocab {args.vocab_file}; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        if not args.skip_profile:
            profile_stages(corpus, args)
        if args.skip_e2e:
            return
        print("\nEnd to end (MB/s = input MB per generator wall second; MB/CPU-s counts all processes):")
        runs = [(seq, dupe, workers, "jieba") for seq in (128, 512) for dupe in (1, 10) for workers in (1, 2)]
        runs += [(128, 2, workers, seg) for seg in ("jieba", "rjieba") for workers in (1, 2)]
        if args.only:
            runs = [r for r in runs if "s{}_d{}_w{}_{}".format(*r) in args.only.split(",")]
        for run in runs:
            run_once(corpus, workdir, args, *run)


if __name__ == "__main__":
    main()
