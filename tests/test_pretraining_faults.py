"""run_pretraining.py faults: training state that cannot be read, flags that cannot be right, and a
resume that would read another stream. Each case: a one-line UsageError naming the file or flag and
what to do, and `output_dir` byte-identical afterwards (never a fresh start over old checkpoints).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
import helpers
from helpers import pretrain, pretraining_argv, snapshot


@pytest.fixture(scope="module")
def trained(pretraining_data, tmp_path_factory):
    """A finished 4-step run (ckpt-2, ckpt-4) to copy and damage."""
    out = str(tmp_path_factory.mktemp("trained") / "run")
    pretrain(pretraining_data, out, "--do_train", "--num_train_steps=4", "--iterations_per_loop=2",
         "--save_checkpoints_steps=2", "--jit_compile=false", f"--vocab_file={pretraining_data['vocab_file']}")
    return out


def _copy(trained, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(trained, out)
    return out


def _fails(pretraining_data, out, match, *extra):
    """Runs a resume of `out` (6 steps) that must fail with `match`, leaving `out` untouched."""
    import run_pretraining
    before = snapshot(out)
    with pytest.raises(run_pretraining.UsageError, match=match) as error:
        pretrain(pretraining_data, out, "--do_train", "--num_train_steps=6", "--iterations_per_loop=2",
             "--save_checkpoints_steps=2", "--jit_compile=false", *extra)
    assert "\n" not in str(error.value)
    assert snapshot(out) == before
    return str(error.value)


# ------------------------------------------------------------------------------------------------
# Training state that cannot be read is an error, never a fresh start
# ------------------------------------------------------------------------------------------------

def test_garbage_checkpoint_state_file_is_an_error_not_a_fresh_start(pretraining_data, trained, tmp_path):
    out = _copy(trained, tmp_path)
    with open(os.path.join(out, "checkpoint"), "wb") as f:
        f.write(b"\x00\xffnot a checkpoint state {{{")
    message = _fails(pretraining_data, out, r"run/checkpoint is unreadable")
    assert 'model_checkpoint_path: "ckpt-4"' in message   # says how to repair it


def test_deleted_checkpoint_state_file_with_checkpoints_left_is_an_error(pretraining_data, trained, tmp_path):
    out = _copy(trained, tmp_path)
    os.remove(os.path.join(out, "checkpoint"))
    _fails(pretraining_data, out, r"run/checkpoint is missing but .*run holds ckpt-4: write the line "
                      r"`model_checkpoint_path: \"ckpt-4\"`")


def test_state_file_naming_a_missing_checkpoint_is_an_error(pretraining_data, trained, tmp_path):
    out = _copy(trained, tmp_path)
    for name in os.listdir(out):
        if name.startswith("ckpt-4."):
            os.remove(os.path.join(out, name))
    _fails(pretraining_data, out, r"run/checkpoint names .*ckpt-4, which is not there")


def test_truncated_checkpoint_data_file_is_an_error_naming_it(pretraining_data, trained, tmp_path):
    out = _copy(trained, tmp_path)
    path = os.path.join(out, "ckpt-4.data-00000-of-00001")
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])
    _fails(pretraining_data, out, r"cannot restore .*ckpt-4 .*ckpt-4\.data-00000-of-00001\) are damaged")


def test_partial_save_folder_from_a_kill_is_removed_and_training_resumes(pretraining_data, trained, tmp_path):
    import tensorflow as tf
    out = _copy(trained, tmp_path)
    os.makedirs(os.path.join(out, "ckpt-6_temp"))
    with open(os.path.join(out, "ckpt-6_temp", "part-00000-of-00001.data-00000-of-00001"), "wb") as f:
        f.write(b"half a save")
    pretrain(pretraining_data, out, "--do_train", "--num_train_steps=6", "--iterations_per_loop=2",
         "--save_checkpoints_steps=2", "--jit_compile=false")
    assert not os.path.exists(os.path.join(out, "ckpt-6_temp"))
    assert tf.train.latest_checkpoint(out).endswith("ckpt-6")


# ------------------------------------------------------------------------------------------------
# Flags that cannot be right fail before anything is built
# ------------------------------------------------------------------------------------------------

_BAD_FLAGS = {
    "--learning_rate=0": r"--learning_rate must be a positive finite number, got 0",
    "--learning_rate=-1e-4": r"--learning_rate must be a positive finite number, got -0\.0001",
    "--learning_rate=nan": r"--learning_rate must be a positive finite number, got nan",
    "--learning_rate=inf": r"--learning_rate must be a positive finite number, got inf",
    "--num_warmup_steps=-1": r"--num_warmup_steps must be >= 0, got -1",
    "--num_warmup_steps=7": r"--num_warmup_steps=7 > --num_train_steps=6",
    "--clip_norm=-1": r"--clip_norm must be a finite number >= 0",
    "--steps_per_loop=0": r"--steps_per_loop must be >= 1",
    "--masked_lm_prob=nan": r"--masked_lm_prob=nan must be in \(0, 1\]",
}


@pytest.mark.parametrize("flag", sorted(_BAD_FLAGS))
def test_impossible_flag_fails_before_anything_is_built(pretraining_data, trained, tmp_path, flag):
    import run_pretraining
    out = _copy(trained, tmp_path)
    before = snapshot(out)
    argv = pretraining_argv(pretraining_data, out, "--do_train", "--num_train_steps=6", flag)
    opts = run_pretraining.parse_flags(argv)
    with pytest.raises(run_pretraining.UsageError, match=_BAD_FLAGS[flag]):
        run_pretraining.check_flags(opts)  # the first thing run() does
    with pytest.raises(run_pretraining.UsageError, match=_BAD_FLAGS[flag]):
        run_pretraining.run(opts)
    assert snapshot(out) == before


# ------------------------------------------------------------------------------------------------
# A resume that would read another stream is refused
# ------------------------------------------------------------------------------------------------

def test_resume_with_another_batch_size_is_refused_with_a_friendly_message(pretraining_data, trained, tmp_path):
    out = _copy(trained, tmp_path)
    _fails(pretraining_data, out, r"--train_batch_size=32, but .*run was trained with 16: resume with the same "
                      r"batch size, or to train on, start a new --output_dir with --init_checkpoint",
           "--train_batch_size=32")


def test_resume_with_other_record_files_is_refused(pretraining_data, trained, tmp_path):
    out = _copy(trained, tmp_path)
    _fails(pretraining_data, out, r"--input_file differs from the records .*run was trained on \(1 file\(s\) then, "
                      r"2 now", f"--input_file={pretraining_data['train']},{pretraining_data['eval']}")


def test_resume_with_same_names_but_other_records_is_refused(pretraining_data, trained, tmp_path):
    out = _copy(trained, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    path = str(other / os.path.basename(pretraining_data["train"]))
    helpers.write_records(path, pretraining_data["instances"][:200], pretraining_data["vocab_file"], 64, 10)
    _fails(pretraining_data, out, r"same names, other contents", f"--input_file={path}")


def test_vocab_that_did_not_make_the_records_is_refused(pretraining_data, trained, tmp_path):
    out = _copy(trained, tmp_path)
    vocab = tmp_path / "vocab.txt"
    with open(pretraining_data["vocab_file"], encoding="utf-8") as f:
        vocab.write_text(f.read().replace("[MASK]", "[MASK2]", 1), encoding="utf-8")
    _fails(pretraining_data, out, r"--vocab_file=.*vocab\.txt is not the vocab .* was made with", f"--vocab_file={vocab}")


def test_run_folder_is_self_describing(pretraining_data, trained):
    import model_folder
    folder = model_folder.resolve(trained)
    assert folder.checkpoint.endswith("ckpt-4")
    assert folder.task == "mlm" and folder.do_lower_case is True
    with open(folder.vocab_file, "rb") as a, open(pretraining_data["vocab_file"], "rb") as b:
        assert a.read() == b.read()


@pytest.mark.slow
def test_unreadable_state_from_the_command_line_is_one_line_exit_2(pretraining_data, trained, tmp_path):
    out = _copy(trained, tmp_path)
    with open(os.path.join(out, "checkpoint"), "w", encoding="utf-8") as f:
        f.write("garbage {")
    before = snapshot(out)
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "run_pretraining.py"),
                           *pretraining_argv(pretraining_data, out, "--do_train", "--num_train_steps=6")],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run_pretraining.py: error: ") and \
        "checkpoint is unreadable" in lines[0], lines
    assert snapshot(out) == before


def test_run_folder_takes_the_vocab_the_records_sidecar_names(pretraining_data, tmp_path):
    """Without --vocab_file, the vocab named in the records' .meta.json (create_pretraining_data
    writes it) is copied when it still has the records' vocab_sha256."""
    vocab = tmp_path / "vocab.txt"
    shutil.copy(pretraining_data["vocab_file"], vocab)
    path = str(tmp_path / "named.tfrecord")
    meta = helpers.write_records(path, pretraining_data["instances"][:64], str(vocab), 64, 10)
    with open(path + ".meta.json", "w", encoding="utf-8") as f:  # as the generator writes it now
        json.dump(dict(meta, vocab_file=str(vocab)), f)
    out = str(tmp_path / "run")
    pretrain(pretraining_data, out, f"--input_file={path}", "--do_train", "--num_train_steps=2",
         "--jit_compile=false")
    with open(os.path.join(out, "vocab.txt"), "rb") as a, open(vocab, "rb") as b:
        assert a.read() == b.read()
