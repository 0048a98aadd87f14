"""Time and peak memory of export/import for BERT-base and -large (random weights).

    python benchmarks/bench_export.py                 # base and large
    python benchmarks/bench_export.py --sizes=base

Each step runs in its own process, so its peak memory (VmHWM) is its own; the figure reported is
the peak minus the process's RSS right after importing TensorFlow, i.e. what the step itself
costs, next to the fp32 model size. Steps, from one random-weight checkpoint of ours:
  export_hf      our ckpt -> HF folder (model.safetensors)        export_to_pytorch.export_checkpoint
  import_hf      HF folder -> our ckpt                            convert_checkpoint.hf_to_tf2
  export_google  our ckpt -> Google TF1 bert_model.ckpt           convert_checkpoint.tf2_to_google
  import_google  Google TF1 -> our ckpt                           convert_checkpoint.google_to_tf2
"model build" is the part spent creating the Keras model (random init + one dummy call) before
the weights are copied in. Targets: peak under 2x the model size, base exported in under 10 s.
Timings on a shared machine vary a lot; prints figures, asserts nothing.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("export_hf", "import_hf", "export_google", "import_google")


def _rss_mb(field):
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_step(step, work):
    """Runs in the child process; prints one JSON line."""
    sys.path.insert(0, REPO)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # noqa: F401  (counted in the baseline)

    import convert_checkpoint
    import export_to_pytorch
    import modeling

    # Time spent building the Keras model (random init + a dummy call), separate from the I/O.
    build_seconds = [0.0]
    make_task_model = modeling.make_task_model

    def timed_build(*args, **kwargs):
        t = time.perf_counter()
        try:
            return make_task_model(*args, **kwargs)
        finally:
            build_seconds[0] += time.perf_counter() - t

    modeling.make_task_model = timed_build
    baseline = _rss_mb("VmRSS")
    config_file, vocab = os.path.join(work, "bert_config.json"), os.path.join(work, "vocab.txt")
    start = time.perf_counter()
    if step == "make":
        config = modeling.BertConfig.from_json_file(config_file)
        model = modeling.make_task_model(config, "mlm")
        convert_checkpoint.save_tf2_checkpoint(model, config, vocab, os.path.join(work, "ours"))
        extra = {"params": int(sum(w.variable.shape.num_elements() for w in modeling.name_table(model)))}
    elif step == "export_hf":
        export_to_pytorch.export_checkpoint(os.path.join(work, "ours"), config_file, vocab,
                                            os.path.join(work, "hf"), "mlm")
        extra = {"bytes": os.path.getsize(os.path.join(work, "hf", "model.safetensors"))}
    elif step == "import_hf":
        convert_checkpoint.hf_to_tf2(os.path.join(work, "hf"), os.path.join(work, "from_hf"))
        extra = {}
    elif step == "export_google":
        convert_checkpoint.tf2_to_google(os.path.join(work, "ours"), config_file, vocab,
                                         os.path.join(work, "google"))
        extra = {}
    else:
        convert_checkpoint.google_to_tf2(os.path.join(work, "google", "bert_model.ckpt"), config_file,
                                         vocab, os.path.join(work, "from_google"))
        extra = {}
    seconds = time.perf_counter() - start
    print(json.dumps(dict(extra, step=step, seconds=seconds, build_seconds=build_seconds[0],
                          baseline_mb=baseline, peak_extra_mb=_rss_mb("VmHWM") - baseline)))


def child(step, work):
    out = subprocess.run([sys.executable, __file__, f"--child={step}", f"--work={work}"],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{step} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(size):
    work = tempfile.mkdtemp(prefix=f"bench_export_{size}_")
    try:
        shutil.copyfile(os.path.join(REPO, "resources", f"bert_config_{size}.json"),
                        os.path.join(work, "bert_config.json"))
        with open(os.path.join(work, "bert_config.json"), encoding="utf-8") as f:
            vocab_size = json.load(f)["vocab_size"]
        with open(os.path.join(work, "vocab.txt"), "w", encoding="utf-8") as f:  # same size as Google's
            specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            f.write("".join(t + "\n" for t in specials + [f"tok{i}" for i in range(vocab_size - 5)]))
        made = child("make", work)
        model_mb = made["params"] * 4 / 2**20
        print(f"{size}: {made['params'] / 1e6:.1f}M params, fp32 model {model_mb:.0f} MB "
              f"(random init + save {made['seconds']:.1f} s)")
        for step in STEPS:
            r = child(step, work)
            print(f"  {step:14s} {r['seconds']:6.2f} s (model build {r['build_seconds']:5.2f} s)   "
                  f"peak +{r['peak_extra_mb']:6.0f} MB = {r['peak_extra_mb'] / model_mb:4.2f} x model   "
                  f"(process baseline {r['baseline_mb']:.0f} MB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="base,large")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_step(args.child, args.work)
        return
    for size in args.sizes.split(","):
        bench(size)


if __name__ == "__main__":
    main()
