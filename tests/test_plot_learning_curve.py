"""plot_learning_curve.py: TensorBoard scalars -> PNG."""

import pytest

import plot_learning_curve


def _write_run(logdir):
    import tensorflow as tf

    with tf.summary.create_file_writer(str(logdir / "train")).as_default():
        for step in range(1, 21):
            tf.summary.scalar("loss", 8.0 - 0.2 * step, step=step)
            tf.summary.scalar("masked_lm_accuracy", 0.01 * step, step=step)
            tf.summary.scalar("learning_rate", 1e-4 * min(step, 10) / 10, step=step)
    with tf.summary.create_file_writer(str(logdir / "eval")).as_default():
        tf.summary.scalar("masked_lm_loss", 5.0, step=20)


def test_reads_scalars_per_run_and_plots_png(tmp_path):
    _write_run(tmp_path)
    scalars = plot_learning_curve.read_scalars(str(tmp_path))
    assert scalars["train/loss"][0] == (1, pytest.approx(7.8))
    assert len(scalars["train/masked_lm_accuracy"]) == 20
    assert scalars["eval/masked_lm_loss"] == [(20, 5.0)]
    assert plot_learning_curve.find_series(scalars) == {
        "loss": "train/loss", "accuracy": "train/masked_lm_accuracy",
        "learning_rate": "train/learning_rate", "eval_loss": "eval/masked_lm_loss",
        "eval_accuracy": None}
    out = plot_learning_curve.plot(scalars, str(tmp_path / "curve.png"))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_missing_event_files_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no TensorBoard event files under --logdir="):
        plot_learning_curve.read_scalars(str(tmp_path))


def test_run_without_loss_names_the_tags_it_found(tmp_path):
    import tensorflow as tf

    with tf.summary.create_file_writer(str(tmp_path)).as_default():
        tf.summary.scalar("something_else", 1.0, step=1)
    with pytest.raises(ValueError, match="something_else"):
        plot_learning_curve.plot(plot_learning_curve.read_scalars(str(tmp_path)),
                                 str(tmp_path / "x.png"))
