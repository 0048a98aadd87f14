"""The Beam path of create_pretraining_data.py gives the local generator's records (DirectRunner)."""

import glob
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("apache_beam", reason="apache-beam is not installed (pip install '.[beam]')")

from apache_beam.io.filesystem import FileMetadata  # noqa: E402
from apache_beam.io.localfilesystem import LocalFileSystem  # noqa: E402

import beam_pretraining_data  # noqa: E402
import corpus as corpus_module  # noqa: E402
import create_pretraining_data as cpd  # noqa: E402
import pretraining_records as records  # noqa: E402
from train_utils import UsageError  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
RESOURCES = REPO / "resources"


def _options(tmp_path, name, input_file, **kw):
    kw.setdefault("dupe_factor", 2)
    return cpd.Options(input_file=input_file, output_file=str(tmp_path / name),
                       vocab_file=str(RESOURCES / "vocab.txt"), progress_every_secs=1e9, **kw)


def _records(path):
    """The serialized records of one TFRecord file, in file order (framing read by hand)."""
    data, out, i = open(path, "rb").read(), [], 0
    while i < len(data):
        n = int.from_bytes(data[i:i + 8], "little")
        out.append(data[i + 12:i + 12 + n])
        i += 16 + n
    return out


def _sidecar(path):
    with open(path + ".meta.json", encoding="utf-8") as f:
        return json.load(f)


def _corpus_files(tmp_path, n_files=None):
    """The embedded corpus as it is (5 files), or concatenated into `n_files` = 1 file."""
    files = sorted(glob.glob(str(RESOURCES / "corpus" / "*.txt")))
    if n_files != 1:
        return ",".join(files)
    one = tmp_path / "one.txt"
    one.write_text("\n\n".join(open(p, encoding="utf-8").read().strip() for p in files) + "\n", encoding="utf-8")
    return str(one)


def _run_both(tmp_path, input_file, beam_args=(), **kw):
    local = _options(tmp_path, "local.tfrecord", input_file, **kw)
    on_beam = _options(tmp_path, "beam.tfrecord", input_file, **kw)
    cpd.generate(local, log=lambda _: None)
    summary = beam_pretraining_data.run(on_beam, "DirectRunner", beam_args, log=lambda _: None)
    paths = [records.shard_paths(o.output_file, o.num_output_shards) for o in (local, on_beam)]
    return paths[0], paths[1], summary


def test_same_records_as_local_generator_across_files_and_chunks(tmp_path, monkeypatch):
    # Small chunks: many per file, and the local run's chunks straddle file boundaries while Beam's
    # stop at each file's end, so only the per-document seeds can make the records agree.
    monkeypatch.setattr(corpus_module, "DOCS_PER_CHUNK", 5)
    local, on_beam, summary = _run_both(tmp_path, _corpus_files(tmp_path), num_output_shards=3)
    local_records = [r for p in local for r in _records(p)]
    beam_records = [r for p in on_beam for r in _records(p)]
    assert len(local_records) > 200
    assert sorted(beam_records) == sorted(local_records)
    assert [len(_records(p)) for p in on_beam] == [_sidecar(p)["num_instances"] for p in on_beam]
    for a, b in zip(local, on_beam):  # the same sidecar but for the per-shard count
        meta_local, meta_beam = _sidecar(a), _sidecar(b)
        meta_local.pop("num_instances"), meta_beam.pop("num_instances")
        assert meta_beam == meta_local
    # The progress counters Beam shows agree with what was written.
    counters = summary["counters"]
    assert counters["instances"] == len(beam_records) == summary["instances"]
    assert counters["documents"] == _sidecar(on_beam[0])["num_documents"]
    assert counters["record_bytes"] == sum(os.path.getsize(p) for p in on_beam)
    assert counters["input_bytes"] == sum(os.path.getsize(p) for p in _corpus_files(tmp_path).split(","))


def test_one_file_gives_byte_identical_shards_with_other_flags(tmp_path):
    kw = dict(max_seq_length=64, max_predictions_per_seq=10, masked_lm_prob=0.15, short_seq_prob=0.3,
              random_seed=7, dupe_factor=3, do_whole_word_mask=False, num_output_shards=2,
              input_format="doc_per_line")
    local, on_beam, _ = _run_both(tmp_path, _corpus_files(tmp_path, n_files=1), **kw)
    assert len(local) == len(on_beam) == 2  # zip below would pass over a missing shard
    for a, b in zip(local, on_beam):
        assert open(a, "rb").read() == open(b, "rb").read()


def test_unmasked_records_for_dynamic_masking_are_the_local_ones(tmp_path):
    local, on_beam, _ = _run_both(tmp_path, _corpus_files(tmp_path), dynamic_masking=True, num_output_shards=2)
    assert sorted(r for p in on_beam for r in _records(p)) == sorted(r for p in local for r in _records(p))
    for a, b in zip(local, on_beam):
        meta_local, meta_beam = _sidecar(a), _sidecar(b)
        assert meta_beam["kind"] == records.UNMASKED
        meta_local.pop("num_instances"), meta_beam.pop("num_instances")
        assert meta_beam == meta_local


@pytest.mark.slow
def test_two_worker_processes_give_the_same_records(tmp_path):
    # DirectRunner's multi_processing mode: every stage runs in two spawned SDK worker processes.
    local, on_beam, summary = _run_both(
        tmp_path, _corpus_files(tmp_path), ["--beam_direct_num_workers=2",
                                            "--beam_direct_running_mode=multi_processing"],
        dupe_factor=3, num_output_shards=2)
    assert sorted(r for p in on_beam for r in _records(p)) == sorted(r for p in local for r in _records(p))
    assert summary["counters"]["instances"] == summary["instances"] > 0


def test_rerun_with_same_settings_is_skipped_and_output_order_is_fixed(tmp_path):
    o = _options(tmp_path, "beam.tfrecord", _corpus_files(tmp_path), num_output_shards=2)
    beam_pretraining_data.run(o, "DirectRunner", log=lambda _: None)
    first = [open(p, "rb").read() for p in records.shard_paths(o.output_file, o.num_output_shards)]
    assert beam_pretraining_data.run(o, "DirectRunner", log=lambda _: None)["skipped"]
    for p in records.shard_paths(o.output_file, o.num_output_shards):
        os.remove(p + ".meta.json")
    beam_pretraining_data.run(o, "DirectRunner", log=lambda _: None)
    assert [open(p, "rb").read() for p in records.shard_paths(o.output_file, o.num_output_shards)] == first


def test_blank_input_file_fails_like_the_local_path_and_leaves_nothing(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n", encoding="utf-8")
    o = _options(tmp_path, "out.tfrecord", f"{_corpus_files(tmp_path)},{blank}")
    with pytest.raises(ValueError, match="blank.txt contains no text"):
        beam_pretraining_data.run(o, "DirectRunner", log=lambda _: None)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(("out", ".out"))]


def test_not_utf8_after_the_checked_head_fails_in_a_worker_with_one_line(tmp_path, monkeypatch):
    # The head check passes on the launcher; the reading stage finds the GBK part and fails the run.
    head = open(_corpus_files(tmp_path).split(",")[0], encoding="utf-8").read()
    monkeypatch.setattr(corpus_module, "ENCODING_CHECK_BYTES", len(head.encode()) // 2)
    corpus = tmp_path / "mixed.txt"
    corpus.write_bytes(head.encode() + b"\n" + head.encode("gbk"))
    (tmp_path / "out.tfrecord").write_bytes(b"earlier records")
    with pytest.raises(UsageError, match=r"mixed\.txt is not UTF-8: line \d+ is the first") as e:
        beam_pretraining_data.run(_options(tmp_path, "out.tfrecord", str(corpus)), "DirectRunner",
                                  log=lambda _: None)
    assert "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["mixed.txt", "out.tfrecord"]  # untouched, no temp file
    assert (tmp_path / "out.tfrecord").read_bytes() == b"earlier records"


def test_odd_invalid_bytes_are_replaced_and_reported_as_locally(tmp_path):
    lines = open(_corpus_files(tmp_path).split(",")[0], "rb").read().split(b"\n")
    lines[3] += b" \xff"
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"\n".join(lines))
    log = []
    on_beam = _options(tmp_path, "beam.tfrecord", str(corpus))
    beam_pretraining_data.run(on_beam, "DirectRunner", log=log.append)
    assert f"replaced 1 invalid UTF-8 characters with U+FFFD (first at {corpus}:4)" in log[-1]
    assert _sidecar(on_beam.output_file)["replaced_invalid_utf8_chars"] == 1


class _FakeRemoteFileSystem(LocalFileSystem):
    """`fakegcs://x` is the local folder _FakeRemoteFileSystem.root + /x: a stand-in for gs:// that
    drives the pipeline's remote-path code (listing, copying inputs, writing and renaming outputs)."""

    root = None

    @classmethod
    def scheme(cls):
        return "fakegcs"

    def _local(self, path):  # idempotent: LocalFileSystem's methods call each other
        return os.path.join(self.root, path[len("fakegcs://"):]) if path.startswith("fakegcs://") else path

    def _list(self, dir_or_prefix):
        for m in super()._list(self._local(dir_or_prefix)):
            yield FileMetadata("fakegcs://" + os.path.relpath(m.path, self.root), m.size_in_bytes)

    def create(self, path, *args, **kw):
        os.makedirs(os.path.dirname(self._local(path)), exist_ok=True)
        return super().create(self._local(path), *args, **kw)

    def open(self, path, *args, **kw):
        return super().open(self._local(path), *args, **kw)

    def rename(self, sources, destinations):
        super().rename([self._local(p) for p in sources], [self._local(p) for p in destinations])

    def exists(self, path):
        return super().exists(self._local(path))

    def delete(self, paths):
        super().delete([self._local(p) for p in paths])


def test_remote_paths_give_the_same_records(tmp_path, monkeypatch):
    # Inputs, vocab and outputs all behind a non-local Beam file system, as gs:// on Dataflow.
    monkeypatch.setattr(_FakeRemoteFileSystem, "root", str(tmp_path / "bucket"))
    # TensorFlow's gfile (used to read remote sidecars) knows gs:// but not this test's scheme.
    monkeypatch.setattr(records, "sidecar_matches", lambda *a, **k: False)
    (tmp_path / "bucket" / "corpus").mkdir(parents=True)
    for p in _corpus_files(tmp_path).split(","):
        (tmp_path / "bucket" / "corpus" / os.path.basename(p)).write_bytes(open(p, "rb").read())
    (tmp_path / "bucket" / "vocab.txt").write_bytes((RESOURCES / "vocab.txt").read_bytes())
    remote = cpd.Options(input_file="fakegcs://corpus/*.txt", output_file="fakegcs://out/train.tfrecord",
                         vocab_file="fakegcs://vocab.txt", dupe_factor=2, num_output_shards=2)
    beam_pretraining_data.run(remote, "DirectRunner", log=lambda _: None)
    local = _options(tmp_path, "local.tfrecord", _corpus_files(tmp_path), num_output_shards=2)
    cpd.generate(local, log=lambda _: None)
    out = sorted(glob.glob(str(tmp_path / "bucket" / "out" / "*")))
    assert [os.path.basename(p) for p in out] == [
        "train.tfrecord-00000-of-00002", "train.tfrecord-00000-of-00002.meta.json",
        "train.tfrecord-00001-of-00002", "train.tfrecord-00001-of-00002.meta.json"]  # no temp file left
    assert sorted(r for p in out[::2] for r in _records(p)) == sorted(
        r for p in records.shard_paths(local.output_file, 2) for r in _records(p))
    assert _sidecar(out[0])["input_files"][0]["path"] == "fakegcs://corpus/economy_sports.txt"


def test_beam_options_are_passed_through_without_prefix():
    opts = beam_pretraining_data.pipeline_options(
        "DataflowRunner", ["--beam_project=my-project", "--beam_region=us-central1",
                           "--beam_temp_location=gs://bucket/tmp", "--beam_num_workers=50"], num_workers=1)
    everything = opts.get_all_options()
    assert (everything["project"], everything["region"], everything["num_workers"]) == (
        "my-project", "us-central1", 50)
    with pytest.raises(ValueError, match="--beam_<option>=value"):
        beam_pretraining_data.pipeline_options("DirectRunner", ["--project=x"], num_workers=1)


def test_local_path_never_imports_beam(tmp_path):
    code = ("import sys, create_pretraining_data as c;"
            f"c.generate(c.Options(input_file={_corpus_files(tmp_path)!r}, output_file={str(tmp_path / 'o')!r},"
            f"vocab_file={str(RESOURCES / 'vocab.txt')!r}, dupe_factor=1), log=lambda _: None);"
            "assert 'apache_beam' not in sys.modules, 'Beam imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(REPO))


@pytest.mark.slow
def test_command_line_runner_flag_and_beam_options(tmp_path):
    out = tmp_path / "cli.tfrecord"
    proc = subprocess.run(
        [sys.executable, "create_pretraining_data.py", "--runner=DirectRunner", "--beam_direct_num_workers=1",
         f"--input_file={_corpus_files(tmp_path)}", f"--output_file={out}",
         f"--vocab_file={REPO / 'resources' / 'vocab.txt'}", "--dupe_factor=1"],
        cwd=str(REPO), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "on DirectRunner" in proc.stdout and _sidecar(str(out))["total_instances"] > 0


def test_the_beam_module_does_not_import_the_command_line():
    """No import cycle: Beam gets the generator's work from pretraining_instances, not from
    create_pretraining_data (which imports Beam for --runner)."""
    code = "import sys, beam_pretraining_data; print('create_pretraining_data' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
