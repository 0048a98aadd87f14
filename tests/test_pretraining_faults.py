"""run_pretraining.py faults: training state that cannot be read, flags that cannot be right, and a
resume that would read another stream. Each case: a one-line UsageError naming the file or flag and
what to do, and `output_dir` byte-identical afterwards (never a fresh start over old checkpoints).
"""

import json
import os
import re
import shutil
import subprocess
import sys

import helpers
import pytest
from conftest import REPO_ROOT
from helpers import pretrain, pretraining_argv, pretraining_config, snapshot, write_json


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


# ------------------------------------------------------------------------------------------------
# Issue 20: the input-state file, flags the records ignore, corrupt records read unchecked
# ------------------------------------------------------------------------------------------------

def test_resume_without_the_input_state_file_is_refused_never_a_silent_batch_change(pretraining_data, trained,
                                                                                     tmp_path):
    out = _copy(trained, tmp_path)
    os.remove(os.path.join(out, "pretraining_input.json"))
    for batch in ("--train_batch_size=32", "--train_batch_size=16"):  # another batch size, or the same
        _fails(pretraining_data, out, r"run/pretraining_input.json is missing, but .*run holds checkpoints to resume: "
                          r".*put the file back, or to train on, start a new --output_dir", batch)


def test_masked_lm_prob_with_static_records_is_refused_not_ignored(pretraining_data, tmp_path):
    import run_pretraining
    out = str(tmp_path / "run")
    with pytest.raises(run_pretraining.UsageError, match=r"--masked_lm_prob=0.2 would be ignored: .*train"
                                                         r"\.tfrecord holds static records, masked when written"):
        pretrain(pretraining_data, out, "--do_train", "--num_train_steps=2", "--masked_lm_prob=0.2")
    assert not os.path.exists(out)


def _corrupt_copy(data, tmp_path):
    """The train records with one byte flipped a tenth of the way in (record 0 stays readable; the
    first shuffle window reads past it)."""
    path = str(tmp_path / "bad.tfrecord")
    shutil.copy(data["train"], path)
    shutil.copy(data["train"] + ".meta.json", path + ".meta.json")
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        f.seek(size // 10)
        byte = f.read(1)
        f.seek(size // 10)
        f.write(bytes([byte[0] ^ 0xFF]))
    return path


@pytest.mark.parametrize("mode", ["--do_train", "--do_eval"])
def test_corrupt_records_read_without_the_check_are_one_line(pretraining_data, trained, tmp_path, mode):
    import run_pretraining
    path = _corrupt_copy(pretraining_data, tmp_path)
    out = str(tmp_path / "run")
    extra = (["--num_train_steps=2", "--iterations_per_loop=2", "--save_checkpoints_steps=2"]
             if mode == "--do_train" else ["--init_checkpoint=" + trained])
    message = (r"bad input record .*bad\.tfrecord: corrupt or truncated TFRecord file \(corrupted record at "
               r"\d+\) \(read with --check_input_files=false")
    with pytest.raises(run_pretraining.UsageError, match=message) as error:
        pretrain(pretraining_data, out, mode, f"--input_file={path}", f"--eval_input_file={path}", "--check_input_files=false",
             "--jit_compile=false", "--max_eval_steps=100", *extra)
    assert "\n" not in str(error.value)
    assert ("near step 0" if mode == "--do_train" else "in eval batch") in str(error.value)


@pytest.fixture(scope="module")
def unmasked(tmp_path_factory):
    """Records masked at training time (--dynamic_masking) from the embedded corpus and vocab."""
    from conftest import RESOURCES

    import create_pretraining_data as cpd
    root = tmp_path_factory.mktemp("unmasked")
    vocab = str(RESOURCES / "vocab.txt")
    corpus = sorted(str(p) for p in (RESOURCES / "corpus").glob("*.txt"))[0]
    path = str(root / "train.tfrecord")
    cpd.generate(cpd.Options(input_file=corpus, output_file=path, vocab_file=vocab, max_seq_length=64,
                             max_predictions_per_seq=10, dupe_factor=1, random_seed=7, dynamic_masking=True),
                 log=lambda line: None)
    with open(vocab, encoding="utf-8") as f:
        vocab_size = sum(1 for _ in f)
    return path, vocab_size


@pytest.mark.parametrize("key, value, message", [
    ("mask_id", "SIZE", r"mask_id=\d+ is not a token id of the model \(vocab_size \d+ of --bert_config_file\)"),
    ("sep_id", -1, r"sep_id=-1 is not a token id of the model"),
    ("ordinary_ids", "RANGE", r"ordinary_ids holds id \d+, outside the model's vocab_size \d+"),
])
def test_sidecar_ids_that_do_not_fit_the_model_vocab_are_refused_before_training(
        pretraining_data, unmasked, tmp_path, key, value, message):
    """A hand-edited or foreign sidecar: today a GatherV2 traceback in the first training loop."""
    import run_pretraining
    source, vocab_size = unmasked
    path = str(tmp_path / "train.tfrecord")
    shutil.copy(source, path)
    with open(source + ".meta.json", encoding="utf-8") as f:
        meta = json.load(f)
    beyond = f"{meta['ordinary_ids']},{vocab_size}-{vocab_size + 9}"  # ten ids past the vocab
    meta[key] = {"SIZE": vocab_size, "RANGE": beyond}.get(value, value)
    write_json(path + ".meta.json", meta)
    config = write_json(tmp_path / "config.json", pretraining_config(vocab_size))
    out = str(tmp_path / "run")
    with pytest.raises(run_pretraining.UsageError, match=r"train\.tfrecord\.meta\.json: " + message):
        pretrain(pretraining_data, out, "--do_train", "--num_train_steps=2", f"--input_file={path}", f"--eval_input_file={path}",
             "--jit_compile=false", config=config)
    assert not os.path.exists(out)


# ------------------------------------------------------------------------------------------------
# An output folder on a read-only file system: pretraining, resume, export, import
# ------------------------------------------------------------------------------------------------

def _read_only_commands(pretraining_data, trained, tmp_path, ro):
    """(script, args) of the four writers, each aimed at a folder under `ro` (the resume: `ro/run`,
    a copy of `trained`); the import reads an HF export made outside `ro`."""
    import export_to_pytorch
    hf = export_to_pytorch.export_checkpoint(trained, os.path.join(trained, "bert_config.json"),
                                             os.path.join(trained, "vocab.txt"), str(tmp_path / "hf"))
    train = pretraining_argv(pretraining_data, "OUT", "--do_train", "--num_train_steps=6", "--iterations_per_loop=2",
                  "--save_checkpoints_steps=2", "--jit_compile=false")
    return {
        "pretraining": ("run_pretraining.py", [a.replace("OUT", f"{ro}/new") for a in train]),
        "resume": ("run_pretraining.py", [a.replace("OUT", f"{ro}/run") for a in train]),
        "export": ("export_to_pytorch.py", [f"--checkpoint={ro}/run", f"--output_dir={ro}/hf"]),
        "import": ("convert_checkpoint.py", ["--mode=hf_to_tf2", f"--input={hf}", f"--output_dir={ro}/imported"]),
    }


_RO_MESSAGE = {
    "pretraining": r"--output_dir=.*ro/new: .*ro is on a read-only file system \(where .*ro/new would be written\)",
    "resume": r"--output_dir=.*ro/run: .*ro/run is on a read-only file system; choose another --output_dir",
    "export": r"--output_dir=.*ro/hf: .*ro is on a read-only file system",
    "import": r"--output_dir=.*ro/imported: .*ro is on a read-only file system",
}


def test_an_output_folder_on_a_read_only_file_system_is_one_line_naming_it(pretraining_data, trained, tmp_path,
                                                                            monkeypatch):
    """In-process, with the file system's answer simulated at the one place that asks it
    (file_output.check_writable: os.access / os.statvfs), as chmod does not stop root; the slow
    test below mounts a real read-only file system."""
    from absl import flags

    import convert_checkpoint
    import export_to_pytorch
    import run_pretraining

    ro = str(tmp_path / "ro")
    _copy(trained, tmp_path / "ro")
    commands = _read_only_commands(pretraining_data, trained, tmp_path, ro)
    real_access, real_statvfs = os.access, os.statvfs
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p).startswith(ro) and mode & os.W_OK
                        else real_access(p, mode, **kw))
    monkeypatch.setattr(os, "statvfs", lambda p: type("S", (), {"f_flag": os.ST_RDONLY})() if str(p).startswith(ro)
                        else real_statvfs(p))
    before = snapshot(ro)
    for case, (script, args) in commands.items():
        if script == "run_pretraining.py":
            call = lambda args=args: run_pretraining.run(run_pretraining.parse_flags(args))  # noqa: E731
        else:
            module = {"export_to_pytorch.py": export_to_pytorch, "convert_checkpoint.py": convert_checkpoint}[script]
            fv = flags.FlagValues()
            module.define_flags(fv)
            fv([script, *args])
            call = lambda module=module, fv=fv: module.run(fv)  # noqa: E731
        with pytest.raises(ValueError, match=_RO_MESSAGE[case]) as error:
            call()
        assert "\n" not in str(error.value), case
    assert snapshot(ro) == before


@pytest.mark.slow
def test_a_real_read_only_mount_is_one_line_exit_2_for_every_writer(pretraining_data, trained, tmp_path):
    """A tmpfs remounted read-only in a private mount namespace (unshare -m; skipped where that is
    not allowed). Each script: exit 2, one line naming --output_dir, nothing written."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["unshare", "-m", "mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(ro)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a read-only file system here (unshare -m / mount not permitted)")
    commands = _read_only_commands(pretraining_data, trained, tmp_path, str(ro))
    lines = [f"mount -t tmpfs tmpfs {ro}", f"cp -a {trained} {ro}/run", f"mount -o remount,ro {ro}",
             f"find {ro} | sort > {tmp_path}/before"]
    for case, (script, args) in commands.items():
        quoted = " ".join(f"'{a}'" for a in args)
        lines.append(f"{sys.executable} {REPO_ROOT / script} {quoted} > {tmp_path}/{case}.out 2>&1; "
                     f"echo $? > {tmp_path}/{case}.rc")
    lines.append(f"find {ro} | sort > {tmp_path}/after")
    subprocess.run(["unshare", "-m", "sh", "-c", " && ".join(lines[:4]) + "; " + "; ".join(lines[4:])],
                   check=True, timeout=900, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    for case in commands:
        output = (tmp_path / f"{case}.out").read_text(encoding="utf-8").strip().splitlines()
        errors = [line for line in output if ": error: " in line or "Traceback" in line]
        assert (tmp_path / f"{case}.rc").read_text().strip() == "2", (case, output[-5:])
        assert len(errors) == 1 and re.search(_RO_MESSAGE[case], errors[0]), (case, output[-5:])
        assert "Traceback" not in "\n".join(output), case
    assert (tmp_path / "before").read_text() == (tmp_path / "after").read_text()


# ------------------------------------------------------------------------------------------------
# A full disk during a save leaves no ckpt-N_temp/ (README, "When things go wrong")
# ------------------------------------------------------------------------------------------------

def test_a_save_that_fails_on_a_full_disk_leaves_no_temp_folder(pretraining_data, trained, tmp_path, monkeypatch):
    """TF writes ckpt-N_temp/ and then fails (simulated here at CheckpointManager.save, which is
    where a full disk stops it; the slow test below fills a real small file system)."""
    import tensorflow as tf
    out = _copy(trained, tmp_path)

    def full_disk_save(self, checkpoint_number=None, **kwargs):
        os.makedirs(f"{self._checkpoint_prefix}-{checkpoint_number}_temp")
        with open(f"{self._checkpoint_prefix}-{checkpoint_number}_temp/part-00000-of-00001.data-00000-of-00001",
                  "wb") as f:
            f.write(b"half a save")
        raise tf.errors.ResourceExhaustedError(None, None, "ckpt: No space left on device")

    monkeypatch.setattr(tf.train.CheckpointManager, "save", full_disk_save)
    before = snapshot(out)
    with pytest.raises(tf.errors.ResourceExhaustedError):
        pretrain(pretraining_data, out, "--do_train", "--num_train_steps=6", "--iterations_per_loop=2",
             "--save_checkpoints_steps=2", "--jit_compile=false")
    assert not os.path.exists(os.path.join(out, "ckpt-6_temp"))
    after = snapshot(out)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert all("/train/" in p or p.endswith("pretraining_input.json") for p in changed), changed


@pytest.mark.slow
def test_a_real_full_disk_during_a_save_is_one_line_and_leaves_no_temp_folder(pretraining_data, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["unshare", "-m", "mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a small file system here (unshare -m / mount not permitted)")
    args = " ".join(f"'{a}'" for a in pretraining_argv(pretraining_data, f"{disk}/run", "--do_train", "--num_train_steps=2",
                                              "--save_checkpoints_steps=2", "--num_warmup_steps=0",
                                              "--jit_compile=false", f"--vocab_file={pretraining_data['vocab_file']}"))
    script = (f"mount -t tmpfs -o size=6m tmpfs {disk} && {{ {sys.executable} {REPO_ROOT / 'run_pretraining.py'} "
              f"{args} > {tmp_path}/out 2>&1; echo $? > {tmp_path}/rc; ls -a {disk}/run > {tmp_path}/ls; }}")
    subprocess.run(["unshare", "-m", "sh", "-c", script], check=True, timeout=600,
                   env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    output = (tmp_path / "out").read_text(encoding="utf-8")
    assert (tmp_path / "rc").read_text().strip() == "2", output[-2000:]
    assert "run_pretraining.py: error: no space left on device" in output and "Traceback" not in output
    assert not [n for n in (tmp_path / "ls").read_text().split() if n.endswith("_temp")]
