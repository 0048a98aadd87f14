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


def _drawn_figure(monkeypatch, scalars, path):
    """Runs plot() and returns the matplotlib figure it drew (kept open for inspection)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_learning_curve.plot(scalars, str(path))
    return figures[0]


@pytest.mark.parametrize("points", [1, 2])
def test_a_run_with_one_or_two_points_shows_markers_and_says_why(tmp_path, monkeypatch, points):
    import tensorflow as tf

    with tf.summary.create_file_writer(str(tmp_path / "train")).as_default():
        for step in range(1, points + 1):
            tf.summary.scalar("loss", 8.0 - step, step=step * 1000)
            tf.summary.scalar("learning_rate", 1e-4, step=step * 1000)
    scalars = plot_learning_curve.read_scalars(str(tmp_path))
    figure = _drawn_figure(monkeypatch, scalars, tmp_path / "curve.png")
    loss_line = figure.axes[0].lines[0]
    assert len(loss_line.get_xdata()) == points and loss_line.get_marker() == "o"
    notes = [t.get_text() for t in figure.texts]
    assert any(f"only {points} logged point" in n and "--iterations_per_loop" in n for n in notes), notes


def test_a_long_run_has_plain_lines_and_no_note(tmp_path, monkeypatch):
    _write_run(tmp_path)
    scalars = plot_learning_curve.read_scalars(str(tmp_path))
    figure = _drawn_figure(monkeypatch, scalars, tmp_path / "curve.png")
    assert figure.axes[0].lines[0].get_marker() in (None, "None", "")
    assert plot_learning_curve.thin_run_note(scalars) is None and not figure.texts
