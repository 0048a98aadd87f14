"""Does our pretraining help? Fine-tunes from random init and from pretrained checkpoints under one
fair protocol and writes the results table (issue 15).

    python benchmarks/pretraining_value.py --output_dir=/tmp/value \
      --bert_config_file=resources/bert_config_L2_H128.json --vocab_file=../shared/data/vocab/vocab.txt \
      --init_checkpoint=pretrain/ckpt-1000,pretrain/ckpt-3000 --mlm_eval_file=records/eval.tfrecord
    python benchmarks/pretraining_value.py --smoke --output_dir=/tmp/value_smoke   # about a minute

Protocol, the same for every arm (random init, and each --init_checkpoint):
- Each task's labelled pool is shuffled once (--data_seed) and cut into a training subset, a
  validation split carved from it (--val_fraction of it), and a scoring set that is never used for
  any choice (ChnSentiCorp dev; the first rows of BQ dev; rows of CLUENER train outside the pool,
  since CLUENER's dev set is held out).
- For every learning rate in --learning_rates and seed in --seeds, run_classifier.py / run_ner.py
  fine-tune for the task's maximum epochs, evaluating on the validation split after each epoch and
  keeping the best epoch (so the number of epochs is chosen on validation too); that model then
  predicts the scoring set.
- Per arm and task, the learning rate with the best mean validation score is chosen; the table
  reports the scoring-set mean +- sample std over the seeds at that rate, with the majority-class
  baseline beside it. A pretrained arm "wins" when its mean beats random init's by more than two
  standard errors of the difference.
Each run's summary is cached in output_dir/runs/<task>/<arm>/lr*_seed*/run.json, so an interrupted or
extended grid (more seeds, rates, checkpoints) only runs what is missing. Fine-tuned weights are
deleted once scored.

Pretraining cost: --init_checkpoint=<run>/ckpt-N reads <run>/cpu_seconds.json ({"N": seconds}) when
it exists; the --pretrain_corpus stage writes it (CPU seconds of the pretraining process, sampled
when each checkpoint appears, plus the record creation).
"""

import json
import math
import os
import random
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags, logging  # noqa: E402

import train_utils  # noqa: E402
from train_utils import UsageError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> how to build it from ../shared/data. `train`: the labelled pool; `test`: a separate file, or
# None to score on `n_test` pool rows outside the training subset. Epochs are the maximum; the best
# epoch is picked on the validation split.
TASKS = {
    "senti100": dict(script="run_classifier.py", task_name="chnsenticorp", train="chnsenticorp/train.tsv",
                     test="chnsenticorp/dev.tsv", header=True, label_col=0, n_train=100, n_test=0, epochs=10),
    "senti300": dict(script="run_classifier.py", task_name="chnsenticorp", train="chnsenticorp/train.tsv",
                     test="chnsenticorp/dev.tsv", header=True, label_col=0, n_train=300, n_test=0, epochs=6),
    "senti1000": dict(script="run_classifier.py", task_name="chnsenticorp", train="chnsenticorp/train.tsv",
                      test="chnsenticorp/dev.tsv", header=True, label_col=0, n_train=1000, n_test=0, epochs=4),
    "bq": dict(script="run_classifier.py", task_name="bq", train="bq_corpus/train.tsv", test="bq_corpus/dev.tsv",
               header=False, label_col=2, n_train=1000, n_test=1000, epochs=4),
    "cluener": dict(script="run_ner.py", train="cluener2020/train.json", test=None, header=False,
                    n_train=1000, n_test=500, epochs=4),
}
METRIC = {"run_classifier.py": "accuracy", "run_ner.py": "f1"}


def define_flags(fv=flags.FLAGS):
    with train_utils.flag_group("Experiment", fv):
        flags.DEFINE_string("output_dir", None, "Work folder: carved data, runs, results.json/.md, plot.",
                            flag_values=fv)
        flags.DEFINE_string("init_checkpoint", "", "Comma list of pretrained checkpoints (ckpt-N prefixes or "
                            "folders), one arm each beside random init; `name=path` names an arm.", flag_values=fv)
        flags.DEFINE_string("bert_config_file", "resources/bert_config_L2_H128.json",
                            "Model shape of every arm.", flag_values=fv)
        flags.DEFINE_string("vocab_file", "../shared/data/vocab/vocab.txt", "Vocab of the checkpoints.",
                            flag_values=fv)
        flags.DEFINE_string("data_dir", "../shared/data", "The shared data folder (task files).", flag_values=fv)
        flags.DEFINE_string("tasks", ",".join(TASKS), f"Comma list of: {', '.join(TASKS)}.", flag_values=fv)
        flags.DEFINE_string("mlm_eval_file", "", "Held-out pretraining records: masked-LM accuracy of each "
                            "checkpoint (run_pretraining.py --do_eval).", flag_values=fv)
        flags.DEFINE_boolean("report_only", False, "Start no fine-tuning: tabulate the cached runs; a task/arm "
                             "with runs missing is left out and named in the log.", flag_values=fv)
        flags.DEFINE_boolean("smoke", False, "Tiny model, a few examples, one rate, one seed, a 20-step "
                             "pretraining on resources/corpus: checks the pipeline, measures nothing.",
                             flag_values=fv)
    with train_utils.flag_group("Protocol", fv):
        flags.DEFINE_string("learning_rates", "2e-5,5e-5,1e-4,3e-4", "Grid; chosen per arm and task on "
                            "the validation split.", flag_values=fv)
        flags.DEFINE_string("seeds", "1,2,3", "Fine-tuning seeds (init of new layers, dropout, order).",
                            flag_values=fv)
        flags.DEFINE_float("val_fraction", 0.2, "Share of each training subset carved off for validation.",
                           flag_values=fv)
        flags.DEFINE_integer("data_seed", 12345, "Shuffle of each task's pool before carving.", flag_values=fv)
        flags.DEFINE_integer("max_seq_length", 128, "Fine-tuning sequence length.", flag_values=fv)
        flags.DEFINE_integer("train_batch_size", 16, "Fine-tuning batch.", flag_values=fv)
        flags.DEFINE_float("epochs_scale", 1.0, "Multiplies every task's maximum epochs.", flag_values=fv)
    with train_utils.flag_group("Optional pretraining stage (writes cpu_seconds.json)", fv):
        flags.DEFINE_string("pretrain_corpus", "", "Comma list of text files: create records, pretrain from "
                            "scratch in output_dir/pretrain, and add each saved checkpoint as an arm.",
                            flag_values=fv)
        flags.DEFINE_integer("pretrain_steps", 2000, "Pretraining steps.", flag_values=fv)
        flags.DEFINE_integer("pretrain_save_steps", 500, "A checkpoint (arm) every this many steps.",
                             flag_values=fv)
        flags.DEFINE_float("pretrain_learning_rate", 1e-3, "Pretraining peak rate.", flag_values=fv)
        flags.DEFINE_integer("pretrain_batch_size", 32, "Pretraining batch.", flag_values=fv)
    train_utils.require_flags("output_dir")


# ---------------------------------------------------------------------------------------------------
# Subprocesses
# ---------------------------------------------------------------------------------------------------


def _run(args, log_path, cpu_probe=None):
    """Runs `python <args>` from the repo root, stderr to log_path. Returns (stdout text, CPU seconds
    of the child and its workers). `cpu_probe(pid)` is called every 2 s while it runs."""
    before = os.times()
    with open(log_path, "w", encoding="utf-8") as log, open(log_path + ".stdout", "w+", encoding="utf-8") as out:
        proc = subprocess.Popen([sys.executable] + args, cwd=REPO, stdout=out, stderr=log, text=True,
                                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        while proc.poll() is None:
            if cpu_probe is not None:
                cpu_probe(proc.pid)
            time.sleep(2 if cpu_probe is not None else 0.5)
        out.seek(0)
        stdout = out.read()
    after = os.times()
    if proc.returncode:
        raise RuntimeError(f"{args[0]} failed (exit {proc.returncode}); see {log_path}")
    return stdout, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def _proc_cpu_seconds(pid):
    """CPU seconds (user + system, all threads) of a live process, from /proc; None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _json_line(stdout):
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("no JSON metrics line in the output")


# ---------------------------------------------------------------------------------------------------
# Data: carve train / validation / scoring files
# ---------------------------------------------------------------------------------------------------


def _read_rows(path, header):
    with open(path, encoding="utf-8-sig") as f:
        lines = [x for x in f.read().splitlines() if x.strip()]
    return (lines[0] if header else None), (lines[1:] if header else lines)


def carve(name, spec, data_dir, out_dir, val_fraction, data_seed):
    """Writes train/val/test files for one task. Returns their paths and the test gold labels
    (class strings; None for NER, which is scored from the file)."""
    folder = os.path.join(out_dir, "data", name)
    paths = {s: os.path.join(folder, s + os.path.splitext(spec["train"])[1]) for s in ("train", "val", "test")}
    source = os.path.join(data_dir, spec["train"])
    if not os.path.isfile(source):
        raise UsageError(f"--data_dir: {source} not found (task {name})")
    head, pool = _read_rows(source, spec["header"])
    random.Random(data_seed).shuffle(pool)
    n_val = max(1, round(spec["n_train"] * val_fraction))
    train, val = pool[:spec["n_train"] - n_val], pool[spec["n_train"] - n_val:spec["n_train"]]
    if spec["test"]:
        _, test = _read_rows(os.path.join(data_dir, spec["test"]), spec["header"])
        if spec["n_test"]:
            random.Random(data_seed).shuffle(test)
            test = test[:spec["n_test"]]
    else:  # scored on pool rows never used for training or validation
        test = pool[len(pool) - spec["n_test"]:]
        if len(pool) - spec["n_test"] < spec["n_train"]:
            raise UsageError(f"{source}: {len(pool)} rows, too few for {spec['n_train']} + {spec['n_test']}")
    os.makedirs(folder, exist_ok=True)
    for split, rows in (("train", train), ("val", val), ("test", test)):
        with open(paths[split] + ".tmp", "w", encoding="utf-8") as f:
            f.write("".join(r + "\n" for r in ([head] if head else []) + rows))
        os.replace(paths[split] + ".tmp", paths[split])  # atomic: another invocation may be reading it
    gold = [r.split("\t")[spec["label_col"]] for r in test] if "label_col" in spec else None
    return paths, gold, train


def majority_baseline(spec, train_rows, gold):
    """Accuracy of always predicting the training subset's most frequent class; 0 F1 for NER (all O)."""
    if gold is None:
        return 0.0
    labels = [r.split("\t")[spec["label_col"]] for r in train_rows]
    majority = max(sorted(set(labels)), key=labels.count)
    return sum(g == majority for g in gold) / len(gold)


def score_predictions(spec, run_dir, test_path, gold):
    """Scoring-set metric of one run from its predictions file (accuracy, or CLUENER entity F1)."""
    if gold is not None:
        with open(os.path.join(run_dir, "test_predictions.tsv"), encoding="utf-8") as f:
            predicted = [line.split("\t")[1] for line in f.read().splitlines()[1:]]
        if len(predicted) != len(gold):
            raise RuntimeError(f"{run_dir}: {len(predicted)} predictions for {len(gold)} rows")
        return sum(p == g for p, g in zip(predicted, gold)) / len(gold)
    import run_ner  # the script's own reader and metric, so the score is the one it reports

    gold_ex = run_ner.read_cluener(test_path)
    pred_ex = run_ner.read_cluener(os.path.join(run_dir, "test_predictions.json"))
    return run_ner.ner_metrics([e.entities for e in gold_ex], [e.entities for e in pred_ex])["f1"]


# ---------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------


def finetune(fv, name, spec, paths, gold, arm, checkpoint, lr, seed):
    """One fine-tuning run (cached). Returns {"val", "test", "best_epoch", "cpu_s"}, or None when it is
    not cached and --report_only."""
    run_dir = os.path.join(fv.output_dir, "runs", name, arm, f"lr{lr:g}_seed{seed}")
    summary_path = os.path.join(run_dir, "run.json")
    if os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            return json.load(f)
    if fv.report_only:
        return None
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # an interrupted run: start it again
    os.makedirs(run_dir)
    args = [spec["script"], f"--train_file={paths['train']}", f"--dev_file={paths['val']}",
            f"--test_file={paths['test']}", "--do_train", "--do_eval", "--do_predict",
            f"--vocab_file={fv.vocab_file}", f"--bert_config_file={fv.bert_config_file}",
            f"--learning_rate={lr}", f"--seed={seed}", f"--train_batch_size={fv.train_batch_size}",
            f"--num_train_epochs={max(1, round(spec['epochs'] * fv.epochs_scale))}",
            f"--max_seq_length={fv.max_seq_length}", f"--output_dir={run_dir}"]
    if "task_name" in spec:
        args.append(f"--task_name={spec['task_name']}")
    if checkpoint:
        args.append(f"--init_checkpoint={checkpoint}")
    start = time.time()
    _, cpu = _run(args, os.path.join(run_dir, "log.txt"))
    with open(os.path.join(run_dir, "eval_results.json"), encoding="utf-8") as f:
        val = json.load(f)  # the validation metrics of the kept (best) epoch
    summary = {"val": val[METRIC[spec["script"]]], "best_epoch": val.get("epoch"),
               "test": score_predictions(spec, run_dir, paths["test"], gold),
               "cpu_s": round(cpu, 1), "wall_s": round(time.time() - start, 1)}
    with open(os.path.join(run_dir, "train_history.json"), encoding="utf-8") as f:
        history = json.load(f)
    history = history["epochs"] if isinstance(history, dict) else history  # older scripts wrote the bare list
    summary["best_epoch"] = max(history, key=lambda h: h[METRIC[spec["script"]]])["epoch"]
    summary["first_epoch_train_loss"] = history[0]["train_loss"]
    shutil.rmtree(os.path.join(run_dir, "best"), ignore_errors=True)  # weights are not needed any more
    with open(summary_path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    logging.info("%s %s lr=%g seed=%d: val %.4f test %.4f (epoch %s, %.0f CPU-s)", name, arm, lr, seed,
                 summary["val"], summary["test"], summary["best_epoch"], cpu)
    return summary


def mlm_eval(fv, arm, checkpoint):
    """Held-out masked-LM accuracy/loss of a checkpoint (cached)."""
    folder = os.path.join(fv.output_dir, "mlm", arm)
    cached = os.path.join(folder, "mlm.json")
    if os.path.isfile(cached):
        with open(cached, encoding="utf-8") as f:
            return json.load(f)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    stdout, _ = _run(["run_pretraining.py", "--do_eval", f"--init_checkpoint={checkpoint}",
                      f"--input_file={fv.mlm_eval_file}", f"--bert_config_file={fv.bert_config_file}",
                      f"--output_dir={os.path.join(folder, 'eval')}", "--eval_batch_size=64",
                      f"--max_eval_steps={5 if fv.smoke else 50}", "--jit_compile=false"],
                     os.path.join(folder, "log.txt"))
    result = _json_line(stdout)
    with open(cached, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return result


def pretrain(fv, corpus, vocab_file, bert_config_file):
    """Records + pretraining from scratch in output_dir/pretrain; writes cpu_seconds.json there.
    Returns the checkpoint prefixes and the held-out records (the last corpus file)."""
    folder = os.path.join(fv.output_dir, "pretrain")
    records = os.path.join(fv.output_dir, "records")
    files = corpus.split(",")
    if len(files) < 2:
        raise UsageError("--pretrain_corpus: give at least 2 files; the last one is held out for the MLM eval")
    os.makedirs(records, exist_ok=True)
    data_cpu = 0.0
    for split, inputs, dupe in (("train", files[:-1], 2), ("eval", files[-1:], 1)):
        out = os.path.join(records, f"{split}.tfrecord")
        if not os.path.isfile(out):
            _, cpu = _run(["create_pretraining_data.py", f"--input_file={','.join(inputs)}", f"--output_file={out}",
                           f"--vocab_file={vocab_file}", "--max_seq_length=128", "--max_predictions_per_seq=20",
                           f"--dupe_factor={dupe}", "--segmenter=rjieba", "--random_seed=1"],
                          os.path.join(records, f"{split}.log"))
            data_cpu += cpu if split == "train" else 0.0
    cost_path = os.path.join(folder, "cpu_seconds.json")
    if not os.path.isfile(cost_path):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        seen = {}

        def probe(pid):  # CPU seconds when each checkpoint first appears
            steps = [int(n[5:-6]) for n in os.listdir(folder) if n.startswith("ckpt-") and n.endswith(".index")]
            cpu = _proc_cpu_seconds(pid)
            for step in steps:
                if step not in seen and cpu is not None:
                    seen[step] = cpu

        _, total = _run(["run_pretraining.py", "--do_train", f"--bert_config_file={bert_config_file}",
                         f"--input_file={os.path.join(records, 'train.tfrecord')}", f"--output_dir={folder}",
                         f"--train_batch_size={fv.pretrain_batch_size}", f"--learning_rate={fv.pretrain_learning_rate}",
                         f"--num_train_steps={fv.pretrain_steps}", f"--num_warmup_steps={fv.pretrain_steps // 10}",
                         f"--save_checkpoints_steps={fv.pretrain_save_steps}", "--keep_checkpoint_max=100",
                         f"--iterations_per_loop={min(50, fv.pretrain_save_steps)}", "--seed=1",
                         f"--jit_compile={not fv.smoke}"],
                        os.path.join(folder, "log.txt"), cpu_probe=probe)
        seen[fv.pretrain_steps] = total  # exact, from the OS, once the process has ended
        cost = {str(k): round(v + data_cpu, 1) for k, v in sorted(seen.items())}
        with open(cost_path, "w", encoding="utf-8") as f:
            json.dump(cost, f, indent=1)
    with open(cost_path, encoding="utf-8") as f:
        steps = sorted(int(k) for k in json.load(f))
    return [os.path.join(folder, f"ckpt-{s}") for s in steps], os.path.join(records, "eval.tfrecord")


def pretraining_cost(checkpoint):
    """CPU seconds spent to reach `checkpoint` (ckpt-N prefix), from cpu_seconds.json beside it."""
    folder, base = os.path.split(checkpoint.rstrip("/"))
    if not base.startswith("ckpt-"):
        return None
    path = os.path.join(folder, "cpu_seconds.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get(base[5:])


# ---------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------


def _mean_std(values):
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summarize(name, arm, runs_by_lr):
    """Chooses the rate on mean validation score; returns the arm's row for the table."""
    chosen = max(sorted(runs_by_lr), key=lambda lr: _mean_std([r["val"] for r in runs_by_lr[lr]])[0])
    runs = runs_by_lr[chosen]
    test_mean, test_std = _mean_std([r["test"] for r in runs])
    return {"task": name, "arm": arm, "lr": chosen, "val_mean": _mean_std([r["val"] for r in runs])[0],
            "test_mean": test_mean, "test_std": test_std, "test": [r["test"] for r in runs],
            "epochs": [r["best_epoch"] for r in runs], "n_seeds": len(runs),
            "val_by_lr": {f"{lr:g}": _mean_std([r["val"] for r in rs])[0] for lr, rs in sorted(runs_by_lr.items())}}


def compare(row, random_row):
    """Gain over random init and whether it exceeds two standard errors of the difference."""
    n1, n2 = row["n_seeds"], random_row["n_seeds"]
    se = math.sqrt(row["test_std"] ** 2 / n1 + random_row["test_std"] ** 2 / n2)
    gain = row["test_mean"] - random_row["test_mean"]
    spread = n1 > 1 and n2 > 1  # no spread, no claim either way
    return {"gain": gain, "gain_se": se, "wins": spread and gain > 2 * se, "loses": spread and gain < -2 * se}


def write_markdown(path, rows, baselines, arms_info):
    lines = ["| task | majority | arm | pretraining CPU-h | held-out MLM acc | lr (chosen on val) | "
             "epochs | score, mean +- std | gain vs random (+- SE) | beyond 2 SE? |", "|" + "---|" * 10]
    for row in rows:
        info = arms_info.get(row["arm"], {})
        cpu = f"{info['cpu_s'] / 3600:.2f}" if info.get("cpu_s") is not None else ("0" if row["arm"] == "random" else "?")
        mlm = f"{info['mlm']['masked_lm_accuracy'] * 100:.1f}%" if info.get("mlm") else "-"
        gain = (f"{row['gain'] * 100:+.1f} +- {row['gain_se'] * 100:.1f}" if "gain" in row else "")
        wins = ("**yes**" if row.get("wins") else "worse" if row.get("loses") else "no") if "gain" in row else ""
        lines.append(f"| {row['task']} | {baselines[row['task']] * 100:.1f} | {row['arm']} | {cpu} | {mlm} | "
                     f"{row['lr']:g} | {','.join(str(e) for e in row['epochs'])} | "
                     f"{row['test_mean'] * 100:.1f} +- {row['test_std'] * 100:.1f} (n={row['n_seeds']}) | "
                     f"{gain} | {wins} |")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def plot(path, rows, arms_info):
    """Gain over random init vs pretraining CPU-hours and vs held-out MLM accuracy, one line per task."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    tasks = sorted({r["task"] for r in rows}, key=list(TASKS).index)
    for task in tasks:
        pts = [(0.0, 0.0, 0.0, 0.0)]  # random init: no cost, MLM accuracy ~0, gain 0 by definition
        for r in rows:
            info = arms_info.get(r["arm"], {})
            if r["task"] == task and "gain" in r and info.get("cpu_s") is not None:
                mlm = info["mlm"]["masked_lm_accuracy"] * 100 if info.get("mlm") else float("nan")
                pts.append((info["cpu_s"] / 3600, mlm, r["gain"] * 100, r["gain_se"] * 100))
        pts.sort()
        for ax, x in ((axes[0], 0), (axes[1], 1)):
            ax.errorbar([p[x] for p in pts], [p[2] for p in pts], yerr=[2 * p[3] for p in pts], marker="o",
                        capsize=3, label=task)
    for ax, label in ((axes[0], "pretraining cost (CPU-hours, this machine)"),
                      (axes[1], "held-out masked-LM accuracy (%)")):
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel(label)
        ax.set_ylabel("gain over random init (points; bars: 2 SE)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Fine-tuning gain from pretraining (lr and epochs chosen on validation; mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------


def _parse_arms(text):
    arms = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, path = item.rpartition("=")
        path = path.rstrip("/")
        name = name or os.path.basename(path)
        if name == "random" or name in [a for a, _ in arms]:
            raise UsageError(f"--init_checkpoint: arm name {name!r} is used twice or reserved; write name=path")
        arms.append((name, path))
    return arms


def main(argv):
    del argv
    fv = flags.FLAGS
    if fv.smoke:  # tiny everything; the pipeline, not a measurement
        fv.bert_config_file, fv.vocab_file = "resources/bert_config_tiny.json", "resources/vocab.txt"
        fv.learning_rates, fv.seeds, fv.max_seq_length, fv.epochs_scale = "1e-3", "1", 32, 0.1
        fv.pretrain_steps, fv.pretrain_save_steps, fv.pretrain_batch_size = 20, 20, 8
        if not fv.pretrain_corpus and not fv.init_checkpoint:
            fv.pretrain_corpus = ",".join(os.path.join(REPO, "resources", "corpus", n)
                                          for n in sorted(os.listdir(os.path.join(REPO, "resources", "corpus"))))
        for spec in TASKS.values():
            spec.update(n_train=min(spec["n_train"], 40), n_test=40)
    for name in ("bert_config_file", "vocab_file"):
        if not os.path.isfile(os.path.join(REPO, fv[name].value)):
            raise UsageError(f"--{name}: {fv[name].value} not found")
    fv.bert_config_file, fv.vocab_file = (os.path.abspath(os.path.join(REPO, p))
                                          for p in (fv.bert_config_file, fv.vocab_file))
    fv.output_dir = os.path.abspath(fv.output_dir)
    data_dir = os.path.abspath(os.path.join(REPO, fv.data_dir))
    tasks = [t.strip() for t in fv.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UsageError(f"--tasks: unknown {unknown}; choose from {', '.join(TASKS)}")
    try:
        lrs = [float(x) for x in fv.learning_rates.split(",")]
        seeds = [int(x) for x in fv.seeds.split(",")]
    except ValueError as e:
        raise UsageError(f"--learning_rates/--seeds: {e}") from None
    os.makedirs(fv.output_dir, exist_ok=True)

    arms = _parse_arms(fv.init_checkpoint)
    if fv.pretrain_corpus:
        checkpoints, held_out = pretrain(fv, fv.pretrain_corpus, fv.vocab_file, fv.bert_config_file)
        arms += [(os.path.basename(c), c) for c in checkpoints]
        fv.mlm_eval_file = fv.mlm_eval_file or held_out
    arms_info = {}
    for arm, checkpoint in arms:
        arms_info[arm] = {"checkpoint": checkpoint, "cpu_s": pretraining_cost(checkpoint),
                          "mlm": mlm_eval(fv, arm, checkpoint) if fv.mlm_eval_file else None}
        logging.info("arm %s: %s", arm, arms_info[arm])

    rows, baselines = [], {}
    for name in tasks:
        spec = TASKS[name]
        paths, gold, train_rows = carve(name, spec, data_dir, fv.output_dir, fv.val_fraction, fv.data_seed)
        baselines[name] = majority_baseline(spec, train_rows, gold)
        random_row = None
        for arm, checkpoint in [("random", "")] + arms:
            runs = {lr: [finetune(fv, name, spec, paths, gold, arm, checkpoint, lr, s) for s in seeds] for lr in lrs}
            missing = sum(r is None for rs in runs.values() for r in rs)
            if missing:
                logging.warning("%s %s: %d of %d runs not done; left out of the table", name, arm, missing,
                                len(lrs) * len(seeds))
                continue
            row = summarize(name, arm, runs)
            if arm == "random":
                random_row = row
            elif random_row is not None:
                row.update(compare(row, random_row))
            rows.append(row)
            logging.info("%s", json.dumps(row))

    results = {"protocol": {k: fv[k].value for k in ("bert_config_file", "learning_rates", "seeds", "val_fraction",
                                                      "data_seed", "max_seq_length", "train_batch_size",
                                                      "epochs_scale", "smoke")},
               "tasks": {t: {k: v for k, v in TASKS[t].items()} for t in tasks},
               "majority_baseline": baselines, "arms": arms_info, "rows": rows}
    with open(os.path.join(fv.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    write_markdown(os.path.join(fv.output_dir, "results.md"), rows, baselines, arms_info)
    if arms:
        plot(os.path.join(fv.output_dir, "pretraining_value.png"), rows, arms_info)
    with open(os.path.join(fv.output_dir, "results.md"), encoding="utf-8") as f:
        print(f.read())


if __name__ == "__main__":
    train_utils.run_script(main, __doc__, "python benchmarks/pretraining_value.py --smoke --output_dir=/tmp/value_smoke",
                           define_flags)
