r"""Turns the TensorBoard scalars of a training run into one PNG learning curve.

    python plot_learning_curve.py --logdir=output/pretrain --output=learning_curve.png

The left axis shows the MLM loss (and the eval loss when present), a second panel the MLM accuracy,
and the learning rate is drawn on a second y axis of the loss panel. Event files are read with
TensorFlow's own summary iterator, so neither TensorBoard nor a running server is needed.
"""

import glob
import os

from absl import flags

import file_output
import train_utils

# The tags run_pretraining.py writes (train/) and fine-tuning's Keras logs use; tests/test_demo.py
# checks a real pretraining run yields all three series.
LOSS_TAGS = ("loss", "masked_lm_loss")
ACCURACY_TAGS = ("masked_lm_accuracy", "accuracy")
LR_TAGS = ("learning_rate",)


def read_scalars(logdir):
    """Returns {run/tag: sorted [(step, value)]} for every scalar under `logdir` (recursively).

    `run` is the event file's folder relative to `logdir` ("" for the top level), so train and
    eval writers in sub-folders stay apart.
    """
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # summary_iterator logs a deprecation notice on every call
    files = sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True))
    if not files:
        raise ValueError(f"no TensorBoard event files under --logdir={logdir}")
    scalars = {}
    for path in files:
        run = os.path.relpath(os.path.dirname(path), logdir)
        run = "" if run == "." else run
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    number = value.simple_value
                elif value.HasField("tensor") and not value.tensor.tensor_shape.dim:
                    number = float(tf.make_ndarray(value.tensor))
                else:
                    continue
                key = f"{run}/{value.tag}" if run else value.tag
                scalars.setdefault(key, {})[event.step] = number  # a rerun step overwrites
    return {key: sorted(points.items()) for key, points in scalars.items()}


def _find(scalars, candidates, runs=("", "train")):
    for run in runs:
        for tag in candidates:
            key = f"{run}/{tag}" if run else tag
            if key in scalars:
                return key
    return None


def find_series(scalars):
    """{role: scalar key or None} for loss, accuracy, learning_rate, eval_loss, eval_accuracy."""
    return {"loss": _find(scalars, LOSS_TAGS), "accuracy": _find(scalars, ACCURACY_TAGS),
            "learning_rate": _find(scalars, LR_TAGS),
            "eval_loss": _find(scalars, LOSS_TAGS, runs=("eval",)),
            "eval_accuracy": _find(scalars, ACCURACY_TAGS, runs=("eval",))}


# Below this many points a series gets a marker on each point (a single point has no line to show).
MARKERS_BELOW = 20


def thin_run_note(scalars):
    """A sentence saying why the curve is thin when the training loss has one or two points, else None."""
    key = find_series(scalars)["loss"]
    if key is None or len(scalars[key]) > 2:
        return None
    n = len(scalars[key])
    return (f"only {n} logged point{'s' if n > 1 else ''}: run_pretraining.py writes one per "
            "--iterations_per_loop steps (and one at each checkpoint), fine-tuning one per epoch; "
            "train longer or lower --iterations_per_loop for a curve")


def plot(scalars, output, title=""):
    """Draws loss (+ learning rate on a twin axis) over MLM accuracy against step; writes `output`.

    Short series are drawn with a marker on every point, and a run with one or two points says so
    on the figure (`thin_run_note`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = find_series(scalars)
    loss_key, accuracy_key, lr_key = found["loss"], found["accuracy"], found["learning_rate"]
    eval_loss_key, eval_accuracy_key = found["eval_loss"], found["eval_accuracy"]
    if loss_key is None:
        raise ValueError(f"no loss scalar ({', '.join(LOSS_TAGS)}) among tags {sorted(scalars)}")

    def draw(ax, key, style, color, label, markers=False):
        """Plots one scalar series if the run has it; returns whether it did."""
        if key:
            steps, values = zip(*scalars[key])
            marker = "o" if markers or len(steps) < MARKERS_BELOW else None
            ax.plot(steps, values, style, color=color, label=label, marker=marker)
        return bool(key)

    fig, (ax_loss, ax_acc) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    draw(ax_loss, loss_key, "-", "tab:blue", "train MLM loss")
    draw(ax_loss, eval_loss_key, "-", "tab:orange", "eval MLM loss", markers=True)
    ax_loss.set_ylabel("MLM loss")
    ax_loss.grid(alpha=0.3)
    handles, labels = ax_loss.get_legend_handles_labels()
    if lr_key:
        ax_lr = ax_loss.twinx()
        draw(ax_lr, lr_key, "--", "tab:gray", "learning rate")
        ax_lr.set_ylabel("learning rate")
        lr_handles, lr_labels = ax_lr.get_legend_handles_labels()
        handles, labels = handles + lr_handles, labels + lr_labels
    ax_loss.legend(handles, labels, loc="upper right")

    has_train_accuracy = draw(ax_acc, accuracy_key, "-", "tab:green", "train MLM accuracy")
    has_eval_accuracy = draw(ax_acc, eval_accuracy_key, "-", "tab:red", "eval MLM accuracy",
                             markers=True)
    ax_acc.set_ylabel("MLM accuracy")
    ax_acc.set_xlabel("step")
    ax_acc.grid(alpha=0.3)
    if has_train_accuracy or has_eval_accuracy:
        ax_acc.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    note = thin_run_note(scalars)
    if note:
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=7, wrap=True, color="tab:gray")
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    # Written beside and renamed: a killed run never leaves half a PNG under the name asked for.
    try:
        with file_output.replacing(output) as tmp:
            fig.savefig(tmp, dpi=110, format=os.path.splitext(output)[1][1:])
    except OSError as e:  # a full disk, a read-only folder
        raise train_utils.UsageError(f"--output={output}: cannot write: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return output


def check_output(output):
    """The PNG path the run will write: a name without an extension gets .png, a folder is refused.

    Checked before the event files are read, so a bad --output fails at once.
    """
    if os.path.isdir(output):
        raise train_utils.UsageError(f"--output={output} is a directory; give a file name, e.g. "
                                     f"{os.path.join(output, 'learning_curve.png')}")
    extension = os.path.splitext(output)[1][1:].lower()
    if not extension:
        return output + ".png"
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.backend_bases import FigureCanvasBase
    formats = FigureCanvasBase.get_supported_filetypes()
    if extension not in formats:
        raise train_utils.UsageError(f"--output={output}: .{extension} is not an image format matplotlib "
                                     f"writes ({', '.join(sorted(formats))})")
    return output


def define_flags(fv=flags.FLAGS):
    with train_utils.flag_group("Input and output", fv):
        flags.DEFINE_string("logdir", None, "A run's output_dir (or its TensorBoard folder); searched "
                            "recursively.", flag_values=fv)
        flags.DEFINE_string("output", None, "PNG to write (default: <logdir>/learning_curve.png).",
                            flag_values=fv)
        flags.DEFINE_string("title", "", "Figure title.", flag_values=fv)
    if fv is flags.FLAGS:
        train_utils.require_flags("logdir")


def main(argv):
    del argv
    fv = flags.FLAGS
    output = check_output(fv.output or os.path.join(fv.logdir, "learning_curve.png"))
    scalars = read_scalars(fv.logdir)
    path = plot(scalars, output, fv.title)
    note = thin_run_note(scalars)
    if note:
        print(f"plot_learning_curve.py: {note}")
    print(path)


EXAMPLE = "python plot_learning_curve.py --logdir=out/pretrain --output=learning_curve.png"

if __name__ == "__main__":
    train_utils.run_script(main, __doc__, EXAMPLE, define_flags, input_errors=(ValueError,))
