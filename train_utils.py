"""Small pieces every script shares: the command line, device strategy, progress lines, seeding.

Import this module before TensorFlow. It keeps TensorFlow's own chatter out of our output:
- on machines without an NVIDIA GPU, the C++ lines TensorFlow prints while it loads (oneDNN, "Could
  not find cuda drivers", "failed call to cuInit"), which no logging setting reaches because they are
  written before logging starts;
- TensorFlow's C++ info and warning lines after that ("Compiled cluster using XLA!",
  `dump_mlir_util.cc`, `tf_record_dataset_op.cc`): TF_CPP_MIN_LOG_LEVEL=2 unless you set it yourself
  (its C++ runtime reads it once, so it must be set before TensorFlow loads); errors still show;
- the INFO lines TensorFlow's Python code logs through absl ("Sharding callback duration").
ROBERTA_ZH_TF_STARTUP_LOG=1 shows all of them.
"""

import errno
import importlib.abc
import importlib.util
import logging as std_logging
import os
import random
import re
import sys
import time

import numpy as np
from absl import logging

STRATEGIES = ("auto", "tpu", "mirrored", "multi_worker", "one_device")


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Loads `tensorflow` (once) with file descriptor 2 pointed at /dev/null, GPU probe included.

    Only the C++ start-up lines are lost; a Python exception from the import still reaches the user
    because stderr is restored before it propagates. Set ROBERTA_ZH_TF_STARTUP_LOG=1 to see them.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # one shot: the real finders locate the package
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            loader = spec.loader

            class QuietLoader(importlib.abc.Loader):
                def create_module(self, spec):
                    return loader.create_module(spec)

                def exec_module(self, module):
                    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, 2)
                    try:
                        loader.exec_module(module)
                        module.config.list_physical_devices("GPU")  # prints cuInit's error here
                    finally:
                        os.dup2(saved, 2)
                        os.close(saved)
                        os.close(devnull)

            spec.loader = QuietLoader()
        return spec


class _DropTensorFlowInfo:
    """A logging filter: drops records below WARNING logged from TensorFlow's own Python code."""

    _tf_dir = os.path.join(os.sep, "tensorflow", "python", "")

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or self._tf_dir not in record.pathname


if not os.environ.get("ROBERTA_ZH_TF_STARTUP_LOG"):
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        if not os.path.exists("/proc/driver/nvidia"):
            sys.meta_path.insert(0, _QuietTensorFlowImport())
    for _logger in (logging.get_absl_logger(), std_logging.getLogger("tensorflow")):
        _logger.addFilter(_DropTensorFlowInfo())


def _on_tpu_vm():
    """True on a Cloud TPU VM: TPU chips on this host (/dev/accel* up to v4, /dev/vfio from v5e)
    and a TPU runtime (libtpu) installed."""
    import glob

    chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
    return bool(chips) and importlib.util.find_spec("libtpu") is not None


def make_strategy(name="auto", tpu=None, tpu_zone=None, gcp_project=None):
    """Builds the tf.distribute strategy named by `--strategy`.

    auto: a TPU if `tpu` is given or this is a Cloud TPU VM, MultiWorkerMirrored if TF_CONFIG names
    several tasks (multi_worker.py checks it and sets the lost-peer timeout), Mirrored if there are
    several GPUs, else the default one-device strategy.
    On a TPU VM the TPU is this host's (`tpu="local"`, the default there); a TPU Node is reached by
    its name (with zone/project) or grpc:// address. A TPU resolver is only built when a TPU is asked
    for (building one unconditionally breaks GPU/CPU runs). A flag that cannot be right is a UsageError.
    """
    import tensorflow as tf

    import multi_worker  # the TF_CONFIG rules (checked here, before anything is written)

    if name not in STRATEGIES:
        raise UsageError(f"--strategy={name!r} is not one of {', '.join(STRATEGIES)}")
    cluster = None
    if name in ("auto", "multi_worker") and not (name == "auto" and (tpu or _on_tpu_vm())):
        cluster = multi_worker.read_tf_config()  # UsageError for a TF_CONFIG that cannot be right
    if name == "auto":
        if tpu or _on_tpu_vm():
            name = "tpu"
        elif cluster is not None:
            name = "multi_worker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "one_device"
    if name == "tpu":
        if not tpu and not _on_tpu_vm():
            raise UsageError("--strategy=tpu needs --tpu_name (a TPU Node's name or grpc:// "
                             "address) unless it runs on a Cloud TPU VM (--tpu_name=local)")
        tpu = tpu or "local"
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu=tpu, zone=tpu_zone, project=gcp_project)
        if tpu != "local":  # a TPU Node: its TPU workers are reached over the network
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if name == "multi_worker":
        if cluster is None:  # no cluster: TF's one-machine multi-worker strategy
            return tf.distribute.MultiWorkerMirroredStrategy()
        return multi_worker.make_strategy(cluster)
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")


def set_precision(use_bf16, strategy):
    """`--mixed_precision`, decided the same way by every script: bfloat16 compute (float32 variables)
    on TPUs and on GPUs of compute capability >= 8.0; elsewhere a warning and float32, because bf16 is
    slower than fp32 on CPUs."""
    import keras
    import tensorflow as tf

    keras.mixed_precision.set_global_policy("float32")
    if not use_bf16:
        return
    supported = isinstance(strategy, tf.distribute.TPUStrategy)
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        supported |= details.get("compute_capability", (0,))[0] >= 8
    if supported:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        logging.info("mixed precision: bfloat16 compute, float32 variables")
    else:
        logging.warning("--mixed_precision ignored: no TPU or bf16-capable GPU "
                        "(bf16 is slower than fp32 on CPUs)")


def set_seed(seed):
    """Seeds Python, NumPy and TensorFlow (Keras) random generators."""
    import keras

    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)


def _format_seconds(seconds):
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class ProgressLogger:
    """Logs `name: done/total unit, rate unit/s, ETA h:mm:ss` at most every `every_secs` seconds.

    >>> progress = ProgressLogger(total=1000, unit="steps", name="pretrain")
    >>> for step in range(1000):
    ...     progress.update(1, loss=0.5)
    """

    def __init__(self, total=None, unit="steps", every_secs=10.0, name="", start=0):
        self.total = total
        self.unit = unit
        self.every_secs = every_secs
        self.name = name
        self.done = start
        self._start_done = start
        self._start_time = time.perf_counter()
        self._last_log = self._start_time
        self._first_update = None  # (done, time) after the first update

    @property
    def rate(self):
        """Units per second since the first update (so start-up and compilation before it do not
        count), or since the start while there has been only one."""
        done, start = self._start_done, self._start_time
        if self._first_update and self.done > self._first_update[0]:
            done, start = self._first_update
        elapsed = time.perf_counter() - start
        return (self.done - done) / elapsed if elapsed > 0 else 0.0

    def update(self, n=1, force=False, **metrics):
        if self._first_update is None:
            self._first_update = (self.done + n, time.perf_counter())
        self.done += n
        now = time.perf_counter()
        if force or now - self._last_log >= self.every_secs:
            self._last_log = now
            logging.info(self.line(**metrics))

    # What `line` writes, found inside a log line whatever the logging prefix: "[name: ]done[/total]
    # unit, rate unit/s..." (demo.py echoes these lines of each stage while it runs).
    LINE_PATTERN = re.compile(r"(?:^|\] )((?:[^\s:\]][^:\]]*: )?\d+(?:/\d+)? \S+, [\d.]+ \S+/s(?:,.*)?)$")

    @classmethod
    def find_line(cls, text):
        """The progress message in one line of a script's output, or None."""
        match = cls.LINE_PATTERN.search(text.rstrip("\n"))
        return match.group(1) if match else None

    def line(self, **metrics):
        rate = self.rate
        parts = [f"{self.name}: " if self.name else ""]
        parts.append(f"{self.done}/{self.total} {self.unit}" if self.total else f"{self.done} {self.unit}")
        parts.append(f", {rate:.1f} {self.unit}/s")
        if self.total and rate > 0:
            parts.append(f", ETA {_format_seconds(max(0, self.total - self.done) / rate)}")
        for key, value in metrics.items():
            parts.append(f", {key}={value:.4g}" if isinstance(value, float) else f", {key}={value}")
        return "".join(parts)


# --- Command-line help: flags grouped under headings, and a friendly message for missing flags. ---

_FLAG_GROUPS = []  # [(title, [flag names])] in definition order
_REQUIRED = []


class flag_group:
    """Context manager: flags defined inside it are listed under `title` in the script's --help.

    >>> with flag_group("Input"):
    ...     flags.DEFINE_string("input_file", None, "Records to read.")
    """

    def __init__(self, title, flag_values=None):
        self.title = title
        self.flag_values = flag_values

    def __enter__(self):
        from absl import flags

        self._fv = flags.FLAGS if self.flag_values is None else self.flag_values  # an empty one is falsy
        self._before = set(self._fv)
        return self

    # `with flag_group("Data", fv) as group: group.string(...)`: absl's DEFINE_* on this group's
    # FlagValues, so a script never writes `flag_values=fv` (or a helper of its own for it) per flag.
    def _define(self, kind, name, default, text, **kwargs):
        from absl import flags

        getattr(flags, f"DEFINE_{kind}")(name, default, text, flag_values=self._fv, **kwargs)

    def string(self, name, default, text, **kwargs):
        self._define("string", name, default, text, **kwargs)

    def integer(self, name, default, text, **kwargs):
        self._define("integer", name, default, text, **kwargs)

    def float(self, name, default, text, **kwargs):
        self._define("float", name, default, text, **kwargs)

    def boolean(self, name, default, text, **kwargs):
        self._define("bool", name, default, text, **kwargs)

    def enum(self, name, default, choices, text, **kwargs):
        from absl import flags

        flags.DEFINE_enum(name, default, choices, text, flag_values=self._fv, **kwargs)

    def __exit__(self, *exc):
        from absl import flags

        if self._fv is flags.FLAGS:  # tests parse private FlagValues; only the script's own count
            _FLAG_GROUPS.append((self.title, [n for n in self._fv if n not in self._before]))
        return False


def require_flags(*names):
    """Marks flags as required; `run_script` reports all missing ones at once with an example."""
    _REQUIRED.extend(names)


def grouped_help(prog, doc, flag_values=None):
    """The --help text: the script's docstring, then each flag group with help and default."""
    from absl import flags

    fv = flag_values or flags.FLAGS
    lines = [doc.strip(), "", f"usage: python {prog} [flags]"]
    for title, names in _FLAG_GROUPS:
        lines += ["", f"{title}:"]
        for name in names:
            flag = fv[name]
            mark = " (required)" if name in _REQUIRED else ""
            default = "" if flag.default in (None, "") else f" (default: {flag.default})"
            lines.append(f"  --{name}{mark}: {flag.help}{default}")
    lines += ["", "Absl's own flags (verbosity, logging): --helpfull."]
    return "\n".join(lines)


class UsageError(ValueError):
    """Bad flags, config or data: `run_script` prints it as one line (`prog: error: ...`), exit 2.

    Every script raises this (never a bare traceback) for anything the user can fix, naming the
    flag, file, line or tensor and what to do.
    """


def run_script(main, doc, example, define_flags=None, *, takes_arguments=False, input_errors=()):
    """The one command-line convention of every script.

    Each script declares its flags once, in `define_flags(fv=flags.FLAGS)` (grouped with
    `flag_group`, required ones marked with `require_flags`), and ends with
    `train_utils.run_script(main, __doc__, EXAMPLE, define_flags)`. This gives a grouped --help, one
    message listing every missing flag with `example` (a full command line that works), and turns a
    `UsageError` raised anywhere in `main` into one line `prog: error: ...` with exit status 2.

    Arguments left after the flags are refused in that one line, unless `takes_arguments` (fill_mask.py
    reads its texts there). `input_errors`: further exception types printed the same way: the
    scripts that read model folders and files pass (ValueError,), which our readers raise naming
    the file and what is wrong with it.
    """
    import sys

    from absl import app, flags

    prog = os.path.basename(sys.argv[0])
    if define_flags is not None:
        define_flags()

    def parse(argv):
        if any(arg in ("-h", "--help", "-?", "--helpshort") for arg in argv[1:]):
            print(grouped_help(prog, doc))
            sys.exit(0)
        try:
            rest = flags.FLAGS(argv)
        except flags.Error as e:
            print(f"{prog}: error: {e} (see `python {prog} --help`)", file=sys.stderr)
            sys.exit(2)
        missing = [name for name in _REQUIRED if flags.FLAGS[name].value in (None, "")]
        if missing:
            print(f"{prog}: missing required flag(s): {', '.join('--' + m for m in missing)}\n"
                  f"example:\n  {example}\nSee `python {prog} --help` for every flag.", file=sys.stderr)
            sys.exit(2)
        return rest

    def guarded_main(argv):
        try:
            if len(argv) > 1 and not takes_arguments:
                raise UsageError(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
            return main(argv)
        except (UsageError, *input_errors) as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            sys.exit(2)
        except Exception as e:  # a full disk can hit any write (TF's ResourceExhaustedError, OSError)
            if getattr(e, "errno", None) != errno.ENOSPC and "No space left on device" not in str(e):
                raise
            print(f"{prog}: error: no space left on device ({type(e).__name__}); free space and rerun "
                  "the same command: outputs are written under temporary names, and a rerun resumes "
                  "or replaces them", file=sys.stderr)
            sys.exit(2)

    app.run(guarded_main, flags_parser=parse)
