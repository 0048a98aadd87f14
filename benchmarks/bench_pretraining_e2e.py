"""Pretraining end to end, the way users run it: run_pretraining.py on records vs transformers'
PyTorch BertForMaskedLM on the same records; and where one training loop's time goes.

    python benchmarks/bench_pretraining_e2e.py                        # 20 and 140 steps, 2 rounds
    python benchmarks/bench_pretraining_e2e.py --steps=10,50 --rounds=3 --kinds=static
    python benchmarks/bench_pretraining_e2e.py --skip_e2e             # the breakdown only

Records: the first --mb MB of the shared Wikipedia shard (else resources/corpus), made by
create_pretraining_data.py as a user would: static (--dupe_factor=2) and dynamic
(--dynamic_masking), seq 128, 20 predictions, rjieba when installed. Model: L4/H256
(resources/bert_config_L4_H256.json, dropout 0.1), batch 32, fp32.

1. End to end. Each run is a fresh process:
     ours: python run_pretraining.py --do_train --input_file=<records> --num_train_steps=N ...
           (every other flag at its default: --iterations_per_loop=1000, one save at the end)
     peer: this file with --peer: the records read by tf.data (shuffled in a 1000-record buffer,
           parsed by the same parser as ours, so dynamic records get the same masks), each batch
           handed to BertForMaskedLM as torch tensors (AdamW, clip 1.0; benchmarks/bench_pretraining):
           by default the masked positions gathered before the head; --peer_head=labels calls it
           as transformers' docs and run_mlm.py do, labels over all positions (2-4x slower here).
   Startup is excluded: rate = (N2 - N1) x 32 / (time of N2 steps - time of N1 steps); CPU
   seconds per step (user + system, all threads, the same difference) are the steadier figure
   when other jobs load the machine. The runs
   alternate (ours, peer, per kind, per N) in every round; each variant's best round is reported,
   and the ratio ours / peer per round.
2. Breakdown of one training loop, in this process (ours only): run_pretraining's own pieces for
   each kind - the input alone (the distributed dataset iterated in a tf.function, as the loop
   does), the step alone on one cached batch of those records (packed as run_pretraining packs
   it, and with the padding computed: --skip_padding=false), the step on a random batch
   (bench_pretraining's measure: no padding), and the loop as run_pretraining._train runs it
   (input, step and the per-loop work). Rounds alternate; best of rounds.

Other jobs load this machine: compare figures from one run only. Not a test: asserts nothing.
"""

import argparse
import functools
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

SEQ, PRED, BATCH = 128, 20, 32
CONFIG = os.path.join(REPO, "resources", "bert_config_L4_H256.json")
SHARED_VOCAB = os.path.join(REPO, "..", "shared", "data", "vocab", "vocab.txt")


# ------------------------------------------------------------------------------------------------
# Records, made by the user's command
# ------------------------------------------------------------------------------------------------

def make_records(workdir, mb):
    """-> {"static": path, "dynamic": path}, written by create_pretraining_data.py."""
    from bench_create_pretraining_data import prepare_corpus
    corpus, desc = prepare_corpus(types.SimpleNamespace(corpus=None, mb=mb), workdir)
    vocab = SHARED_VOCAB if os.path.isfile(SHARED_VOCAB) else os.path.join(REPO, "resources", "vocab.txt")
    try:
        import rjieba  # noqa: F401
        segmenter = "rjieba"
    except ImportError:
        segmenter = "jieba"
    paths = {}
    for kind, extra in (("static", ["--dupe_factor=2"]), ("dynamic", ["--dynamic_masking"])):
        paths[kind] = os.path.join(workdir, f"{kind}.tfrecord")
        if not os.path.exists(paths[kind] + ".meta.json"):
            subprocess.run([sys.executable, os.path.join(REPO, "create_pretraining_data.py"),
                            f"--input_file={corpus}", f"--output_file={paths[kind]}",
                            f"--vocab_file={vocab}", f"--max_seq_length={SEQ}",
                            f"--max_predictions_per_seq={PRED}", f"--segmenter={segmenter}", *extra],
                           check=True, capture_output=True)
    import pretraining_records
    counts = {k: pretraining_records.read_sidecar(p)["num_instances"] for k, p in paths.items()}
    print(f"records from {desc}, {segmenter}: " +
          ", ".join(f"{k} {n} sequences" for k, n in counts.items()))
    return paths


# ------------------------------------------------------------------------------------------------
# 1. End to end: fresh processes, startup excluded by difference
# ------------------------------------------------------------------------------------------------

def ours_command(records, steps, output_dir):
    return [sys.executable, os.path.join(REPO, "run_pretraining.py"), "--do_train",
            f"--input_file={records}", f"--output_dir={output_dir}",
            f"--bert_config_file={CONFIG}", f"--train_batch_size={BATCH}",
            f"--max_seq_length={SEQ}", f"--max_predictions_per_seq={PRED}",
            f"--num_train_steps={steps}", "--num_warmup_steps=1", "--learning_rate=1e-4"]


def peer_command(records, steps, head):
    return [sys.executable, os.path.abspath(__file__), "--peer", f"--peer_records={records}",
            f"--peer_steps={steps}", f"--peer_head={head}"]


def timed(command):
    """-> (wall seconds, CPU seconds) of one process; its last lines of output if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, check=False, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[:3])} failed:\n{done.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return time.perf_counter() - start, cpu


def peer_main(records, steps, head):
    """The peer's process: `steps` PyTorch steps on batches of `records`."""
    import tensorflow as tf
    from bench_pretraining import peer_train_step

    import pretraining_records
    train = peer_train_step(4, 256, head)
    parse = pretraining_records.make_parser(pretraining_records.read_info([records]), SEQ, PRED,
                                            seed=12345, training=True)
    d = tf.data.TFRecordDataset(records).repeat().enumerate().shuffle(1000, seed=12345)
    d = d.batch(BATCH, drop_remainder=True).map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    for batch in d.take(steps).prefetch(2).as_numpy_iterator():
        train(batch)


def end_to_end(paths, n1, n2, rounds, peer_head):
    variants = [(kind, who) for kind in paths for who in ("ours", "peer")]
    times = {v: {n1: [], n2: []} for v in variants}
    cpu = {v: {n1: [], n2: []} for v in variants}
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(rounds):
            for n in (n1, n2):
                for kind, who in variants:
                    if who == "ours":
                        out = os.path.join(scratch, f"out_{kind}_{n}_{r}")
                        t, c = timed(ours_command(paths[kind], n, out))
                        shutil.rmtree(out, ignore_errors=True)
                    else:
                        t, c = timed(peer_command(paths[kind], n, peer_head))
                    times[(kind, who)][n].append(t)
                    cpu[(kind, who)][n].append(c)
            rates = {v: (n2 - n1) * BATCH / (times[v][n2][r] - times[v][n1][r]) for v in variants}
            print(f"  round {r + 1}: " + ", ".join(f"{k} {w} {rates[(k, w)]:.1f}" for k, w in variants)
                  + " seq/s; ours/peer " + ", ".join(
                      f"{k} {rates[(k, 'ours')] / rates[(k, 'peer')]:.2f}x" for k in paths), flush=True)
    print(f"\nend to end, L4/H256 batch {BATCH} seq {SEQ}, (time of {n2} steps - time of {n1} steps), "
          f"best of {rounds} rounds, peer head {peer_head}:")
    best = {}
    for v in variants:
        # The best round is the one with the least interference: the smallest difference.
        per_round = [t2 - t1 for t1, t2 in zip(times[v][n1], times[v][n2])]
        best[v] = (n2 - n1) * BATCH / min(per_round)
        cpu_step = min(c2 - c1 for c1, c2 in zip(cpu[v][n1], cpu[v][n2])) / (n2 - n1)
        print(f"  {v[0]:8s} {v[1]:5s} {best[v]:6.1f} seq/s, {cpu_step * 1000:5.0f} CPU ms/step "
              f"(the {n1}-step run took {min(times[v][n1]):.0f} s)")
    for kind in paths:
        print(f"  {kind}: ours / transformers' PyTorch = {best[(kind, 'ours')] / best[(kind, 'peer')]:.2f}x")
    if "static" in paths and "dynamic" in paths:
        print(f"  ours dynamic / ours static = "
              f"{best[('dynamic', 'ours')] / best[('static', 'ours')]:.2f}x")


# ------------------------------------------------------------------------------------------------
# 2. Breakdown of one loop, with run_pretraining's own pieces
# ------------------------------------------------------------------------------------------------

def breakdown(paths, steps, rounds):
    import bench_pretraining
    import tensorflow as tf

    import modeling
    import optimization
    import pretraining_input
    import pretraining_records
    import run_pretraining
    import train_utils

    config = run_pretraining.load_config(CONFIG)
    strategy = train_utils.make_strategy("auto")

    def fresh_trainer(stats):  # stats: as run_pretraining._build samples them (packed sizes)
        with strategy.scope():
            model = modeling.build_model(modeling.BertPretrainer(config))
            optimizer = optimization.create_optimizer(1e-4, 100_000, 10, clip_norm=0)
            optimizer.build(model.trainable_variables)
        return run_pretraining.MaskedLMTrainer(model, optimizer, strategy, per_replica_batch=BATCH,
                                               sequence_stats=stats)

    @tf.function
    def consume(iterator, n):  # the input alone, pulled as the train loop pulls it
        total = tf.constant(0)
        for _ in tf.range(n):
            total += next(iterator)["input_ids"][0, 0]
        return total

    _, random_step = bench_pretraining.trainer_on_random_batches(config, strategy, BATCH, SEQ, PRED,
                                                                 jit_compile=True)
    variants = {"step, random batch": lambda n: random_step(n)}
    scratch = tempfile.mkdtemp()
    packing = {}  # kind -> (packed tokens, packed predictions per sequence, the sampled stats)
    for kind, path in paths.items():
        opts = types.SimpleNamespace(
            input_file=path, max_seq_length=SEQ, max_predictions_per_seq=PRED, seed=12345,
            masked_lm_prob=0.10, train_batch_size=BATCH, shuffle_buffer_size=1000,
            save_checkpoints_steps=10**9, num_train_steps=0, output_dir=os.path.join(scratch, kind))
        files = [path]
        counts = [pretraining_records.read_sidecar(path)["num_instances"]]

        def stream(opts=opts, files=files, counts=counts):
            parse = run_pretraining._parser(opts, files, training=True)
            fn = run_pretraining.train_dataset_fn(files, counts, BATCH, opts.seed,
                                                  opts.shuffle_buffer_size, 0, parse)
            return iter(strategy.distribute_datasets_from_function(fn))

        stats = pretraining_input.sample_sequence_stats(
            files, run_pretraining._parser(opts, files, training=True))
        input_it = stream()
        variants[f"{kind}: input alone"] = lambda n, it=input_it: consume(it, tf.constant(n)).numpy()
        cached_trainer = fresh_trainer(stats)
        packing[kind] = (cached_trainer.packed_tokens, cached_trainer.packed_width, stats)
        one = next(iter(run_pretraining.train_dataset_fn(
            files, counts, BATCH, opts.seed, 1000, 0, run_pretraining._parser(opts, files, True))(
                tf.distribute.InputContext())))
        cached = iter(strategy.distribute_datasets_from_function(
            lambda _, one=one: tf.data.Dataset.from_tensors(one).repeat()))

        def cached_step(n, trainer=cached_trainer, it=cached):
            trainer.train_loop(it, tf.constant(n))[2].numpy()
        variants[f"{kind}: step, cached batch"] = cached_step
        variants[f"{kind}: same, padding computed"] = functools.partial(
            cached_step, trainer=fresh_trainer(None))  # --skip_padding=false

        loop_trainer = fresh_trainer(stats)
        manager = tf.train.CheckpointManager(modeling.make_checkpoint(loop_trainer.model),
                                             opts.output_dir, max_to_keep=1)
        loop_it = stream()

        def loop(n, trainer=loop_trainer, it=loop_it, opts=opts, manager=manager):
            opts.num_train_steps = int(trainer.optimizer.iterations.numpy()) + n
            run_pretraining._train(opts, trainer, it, manager, True, n)
        variants[f"{kind}: loop (_train)"] = loop

    for run in variants.values():  # compile, fill buffers
        run(2)
    rates = {name: [] for name in variants}
    cpu_ms = {name: [] for name in variants}  # CPU ms per batch, all threads of this process
    for _ in range(rounds):
        for name, run in variants.items():
            n = steps * 20 if name.endswith("input alone") else steps
            start, cpu_start = time.perf_counter(), time.process_time()
            run(n)
            rates[name].append(n * BATCH / (time.perf_counter() - start))
            cpu_ms[name].append((time.process_time() - cpu_start) / n * 1000)
    shutil.rmtree(scratch, ignore_errors=True)
    best = {name: max(r) for name, r in rates.items()}
    cpu = {name: min(c) for name, c in cpu_ms.items()}
    print(f"\nbreakdown, in-process, {steps} steps per timing, best of {rounds} rounds:")
    for name, rate in best.items():
        print(f"  {name:28s} {rate:9.1f} seq/s {cpu[name]:8.1f} CPU ms/batch")
    random_step = best["step, random batch"]
    for kind, (tokens, width, stats) in packing.items():
        print(f"  {kind}: per sequence real tokens {stats['input_mask'][0]:.1f} +- "
              f"{stats['input_mask'][1]:.1f}, predictions {stats['masked_lm_weights'][0]:.1f} +- "
              f"{stats['masked_lm_weights'][1]:.1f}: packed sizes {tokens} tokens, {width} "
              f"predictions per sequence (run_pretraining.packed_sizes)")
    for kind in paths:
        step, loop = best[f"{kind}: step, cached batch"], best[f"{kind}: loop (_train)"]
        print(f"  {kind}: input alone / the step's demand {best[f'{kind}: input alone'] / step:.0f}x "
              f"(CPU: the input costs {cpu[f'{kind}: input alone'] / cpu[f'{kind}: step, cached batch']:.2%}"
              f" of a step); loop / step {loop / step:.2f}, loop / step on a random batch "
              f"{loop / random_step:.2f} (CPU: {cpu['step, random batch'] / cpu[f'{kind}: loop (_train)']:.2f}); "
              f"the rest (loop - step) {cpu[f'{kind}: loop (_train)'] - cpu[f'{kind}: step, cached batch']:+.0f}"
              " CPU ms/step")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", default="20,140", help="N1,N2: steps of the two timed runs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kinds", default="static,dynamic")
    parser.add_argument("--mb", type=float, default=2.0, help="MB of text for the records")
    parser.add_argument("--workdir", help="keep the records here (reused when present)")
    parser.add_argument("--breakdown_steps", type=int, default=10)
    parser.add_argument("--peer_head", default="gathered", choices=("gathered", "labels"),
                        help="gathered: the peer's head sees the masked positions only (the fast "
                        "way); labels: BertForMaskedLM(labels=...) as transformers' docs call it")
    parser.add_argument("--skip_e2e", action="store_true")
    parser.add_argument("--skip_breakdown", action="store_true")
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peer_records", help=argparse.SUPPRESS)
    parser.add_argument("--peer_steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        return peer_main(args.peer_records, args.peer_steps, args.peer_head)

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_e2e_")
    os.makedirs(workdir, exist_ok=True)
    paths = {k: p for k, p in make_records(workdir, args.mb).items() if k in args.kinds.split(",")}
    if not args.skip_e2e:
        n1, n2 = (int(s) for s in args.steps.split(","))
        end_to_end(paths, n1, n2, args.rounds, args.peer_head)
    if not args.skip_breakdown:
        breakdown(paths, args.breakdown_steps, args.rounds)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
