"""create_pretraining_data.py as an Apache Beam pipeline: the same records on a laptop or on a cluster.

    python create_pretraining_data.py --runner=DirectRunner --num_workers=2 \
        --input_file='corpus/*.txt' --output_file=/tmp/records/train.tfrecord --num_output_shards=4 \
        --vocab_file=resources/vocab.txt

`--runner` is any Beam runner (DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, ...); every
`--beam_<option>=value` reaches Beam as `--<option>=value` (`--beam_project=...`, `--beam_region=...`).
With DirectRunner, `--num_workers=N` means N worker processes on this machine.

Stages (the work on documents is the local generator's own: `pretraining_instances.document_records`,
`shuffle_and_shard`, `pretraining_records.frame`, as in create_pretraining_data's `process_chunk`):
  1. ReadChunks, one element per input file (a gs://... file is first copied to the worker's disk):
     stream the file's documents and cut them into the local generator's chunks (<= DOCS_PER_CHUNK
     documents or CHARS_PER_CHUNK characters); also output the file's document and chunk counts.
     Chunks never cross files here (locally they may). Reading is parallel over files only.
  2. Offsets: the counts give every file's first global document and chunk number, so each
     document gets the global index - hence the RNG seeds - it has in a local run.
  3. Reshuffle + MakeRecords, per chunk: segment, tokenize, pack, mask `dupe_factor` times (or write
     the unmasked kind), encode, shuffle, frame -> (shard, (chunk number, zlib'd TFRecord bytes)).
  4. GroupByKey(shard) + WriteShard: a shard's pieces are spilled to local disk and written in chunk
     order to a temporary file, so a worker's memory holds one chunk and an index, never a shard.
  5. Finalize, once: the local path's checks (`pretraining_instances.check_produced`), then
     `pretraining_records.commit_records`: temporary files renamed to the outputs, sidecars last.

Same records: every document's RNG is seeded from (random_seed, global document index, copy), as
locally, so the outputs hold exactly the local generator's serialized instances, whatever the runner
or its parallelism. A record's shard and place in the shard depend only on its chunk, so they are
fixed too; with a single input file the shards are byte-identical to the local ones (locally, chunks
run on across file boundaries; here they stop at the end of each file).
"""

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
import zlib


class _BeamImportNoise(logging.Filter):
    """Beam's bigquery client says at import, on the root logger, that it cannot work without
    apitools (a Google Cloud extra this pipeline never uses)."""

    def filter(self, record):
        return not str(record.msg).startswith("apitools not found")


# Beam's INFO lines (import-time notes, job service chatter) would drown our own log lines.
logging.getLogger("apache_beam").setLevel(logging.WARNING)
logging.getLogger().addFilter(_BeamImportNoise())
try:
    import apache_beam as beam
except ImportError:  # run_script prints this as a one-line error
    from train_utils import UsageError
    raise UsageError("--runner needs Apache Beam: pip install '.[beam]' (or pip install apache-beam)") from None
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

import corpus
import file_output
import pretraining_instances as instances
import pretraining_records as records
import tokenization
from train_utils import UsageError

_NAMESPACE = "create_pretraining_data"
_STAT_KEYS = ("documents", "empty_documents", "sentences", "tokens", "instances", "predictions")
_KEEP_SPLIT_LINES = 5  # long-line warnings kept for the log (all are counted)


def _read_bytes(path):
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


def _write_bytes(path, data):
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)


class _BeamFiles:
    """The file operations `pretraining_records.commit_records` needs, on Beam's file systems."""
    exists = staticmethod(FileSystems.exists)
    write = staticmethod(_write_bytes)

    @staticmethod
    def remove(path):
        FileSystems.delete([path])

    @staticmethod
    def rename(src, dst):
        FileSystems.rename([src], [dst])


# ----------------------------------------------------------------------------------------------------
# Pipeline stages
# ----------------------------------------------------------------------------------------------------

class ReadChunks(beam.DoFn):
    """(file number, path) -> (file number, chunk in file, first document in file, documents) per chunk,
    and once per file the tagged output "files": (file number, counts)."""

    def __init__(self, input_format):
        self.input_format = input_format
        self.text_bytes = Metrics.counter(_NAMESPACE, "input_bytes")  # decompressed text read

    def process(self, item):
        file_index, path = item
        with _local_copy(path) as local:
            reader = corpus.InputReader([local], self.input_format)
            n_chunks, done = 0, 0
            for chunk, first_doc, docs in reader.chunks():
                n_chunks += 1
                self.text_bytes.inc(reader.text_bytes - done)
                done = reader.text_bytes
                yield file_index, chunk, first_doc, docs
        self.text_bytes.inc(reader.text_bytes - done)
        first_replacement = reader.first_replacement and reader.first_replacement.replace(local, path, 1)
        yield beam.pvalue.TaggedOutput("files", (file_index, {
            "documents": reader.docs_per_file[0], "chunks": n_chunks, "text_bytes": reader.text_bytes,
            "replaced_chars": reader.replaced_chars, "first_replacement": first_replacement}))


@contextlib.contextmanager
def _local_copy(path):
    """A local file with `path`'s bytes: `path` itself, or for gs://... a temporary copy (same
    suffix, so .xz/.gz/.bz2 are still recognized) that the reader streams as it does locally."""
    if not file_output.is_remote(path):
        yield path
        return
    with tempfile.NamedTemporaryFile(suffix="-" + path.rsplit("/", 1)[-1]) as local:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as remote:
            shutil.copyfileobj(remote, local, 1 << 22)
        local.flush()
        yield local.name


def file_offsets(file_counts):
    """[(file number, counts)] -> {file number: (first global document, first global chunk)}."""
    offsets, docs, chunks = {}, 0, 0
    for file_index, counts in sorted(file_counts):
        offsets[file_index] = (docs, chunks)
        docs += counts["documents"]
        chunks += counts["chunks"]
    return offsets


class MakeRecords(beam.DoFn):
    """A chunk -> (shard, (global chunk number, zlib'd TFRecord bytes)) per non-empty shard, and its
    stats tagged "stats".

    The vocab and user dictionary travel inside the DoFn as bytes, so workers need no access to the
    launcher's files.
    """

    def __init__(self, options, paths, shipped):
        self.options, self.paths, self.shipped = options, paths, shipped
        self.instances = Metrics.counter(_NAMESPACE, "instances")
        self.record_bytes = Metrics.counter(_NAMESPACE, "record_bytes")
        self.documents = Metrics.counter(_NAMESPACE, "documents")

    def setup(self):
        self._dir = tempfile.mkdtemp(prefix="beam_pretraining_data-")
        local = {}
        for name, data in self.shipped.items():
            if data is not None:
                local[name] = os.path.join(self._dir, name + ".txt")
                with open(local[name], "wb") as f:
                    f.write(data)
        # The local generator's InstanceMaker, hence the same tokens, packing and masks.
        self.maker = instances.InstanceMaker(dataclasses.replace(self.options, **local))

    def teardown(self):
        shutil.rmtree(self._dir, ignore_errors=True)

    def process(self, chunk, offsets):
        file_index, chunk_in_file, first_doc_in_file, docs = chunk
        doc0, chunk0 = offsets[file_index]
        number = chunk0 + chunk_in_file
        # The local worker's steps (create_pretraining_data.process_chunk), with this chunk's numbers.
        stats = instances.new_stats()
        path = self.paths[file_index]
        serialized = instances.document_records(self.maker, [(path, s) for _, s in docs], doc0 + first_doc_in_file, stats)
        shards = instances.shuffle_and_shard(serialized, number, self.maker.o)
        shard_bytes = [records.frame(r) for r in shards]
        stats["per_shard"] = [len(r) for r in shards]
        self.documents.inc(stats["documents"])
        self.instances.inc(stats["instances"])
        self.record_bytes.inc(sum(map(len, shard_bytes)))
        stats["split_lines"] = [(number, i, line) for i, line in enumerate(stats["split_lines"])]
        yield beam.pvalue.TaggedOutput("stats", stats)
        for shard, data in enumerate(shard_bytes):
            if data:
                # Zero-padded features compress ~4.5x at ~200 MB/s: a few % of CPU buys a 4x smaller
                # shuffle (Dataflow bills it per GB; DirectRunner holds it in memory).
                yield shard, (number, zlib.compress(data, 1))


def merge_stats(parts):
    """Sums process_chunk stats (associative and commutative, as CombineGlobally needs)."""
    total = {k: 0 for k in _STAT_KEYS}
    total.update(per_shard=[], split_lines=[], split_count=0)
    for part in parts:
        for k in _STAT_KEYS:
            total[k] += part[k]
        per_shard = part["per_shard"]
        if len(per_shard) > len(total["per_shard"]):
            total["per_shard"] += [0] * (len(per_shard) - len(total["per_shard"]))
        for i, n in enumerate(per_shard):
            total["per_shard"][i] += n
        total["split_count"] += part.get("split_count", len(part["split_lines"]))
        total["split_lines"] = sorted(total["split_lines"] + part["split_lines"])[:_KEEP_SPLIT_LINES]
    return total


class WriteShard(beam.DoFn):
    """(shard, [(chunk number, bytes)]) -> the shard's temporary file, pieces in chunk order.

    The grouped pieces are streamed to a local spill file first (runners page large groups in), so
    memory holds only the (chunk, offset, size) index.
    """

    def __init__(self, tmp_names):
        self.tmp_names = tmp_names

    def process(self, item):
        shard, pieces = item
        index = []
        with tempfile.TemporaryFile() as spill:
            for number, data in pieces:
                index.append((number, spill.tell(), len(data)))
                spill.write(data)
            index.sort()
            with FileSystems.create(self.tmp_names[shard], compression_type=CompressionTypes.UNCOMPRESSED) as out:
                for _, offset, size in index:
                    spill.seek(offset)
                    out.write(zlib.decompress(spill.read(size)))
        yield shard


def finalize(_, written, stats, file_counts, options, vocab, settings, paths, outputs, tmp_names):
    """Once, after every shard is written: the local path's checks, then renames, then sidecars."""
    counts = dict(file_counts)
    replaced = sum(c["replaced_chars"] for c in counts.values())
    per_shard = stats["per_shard"] + [0] * (len(outputs) - len(stats["per_shard"]))
    metas = instances.sidecars(options, vocab, settings, per_shard, stats, replaced, stats["split_count"])
    try:
        instances.check_produced(paths, [counts.get(i, {}).get("documents", 0) for i in range(len(paths))],
                                 stats["instances"])
        for shard in set(range(len(outputs))) - set(written):
            _write_bytes(tmp_names[shard], b"")  # a shard that got no records is an empty file
        # Only what is still there: a retried Finalize finds the shards its first attempt renamed.
        records.commit_records([(t if FileSystems.exists(t) else None, p) for t, p in zip(tmp_names, outputs)],
                               metas, _BeamFiles)
    except BaseException:
        FileSystems.delete([t for t in tmp_names if FileSystems.exists(t)])
        raise
    text_bytes = sum(c["text_bytes"] for c in counts.values())
    first_bad = [counts[i]["first_replacement"] for i in sorted(counts) if counts[i]["first_replacement"]]
    return dict({k: stats[k] for k in _STAT_KEYS}, input_mb=round(text_bytes / 1e6, 3),
                replaced_chars=replaced, first_replacement=(first_bad or [None])[0],
                split_lines=stats["split_count"],
                split_examples=[line for _, _, line in stats["split_lines"]])


def build(pipeline, o, paths, shipped, vocab, settings, outputs, tmp_names):
    """Adds the generator's stages to `pipeline`; returns the PCollection of the one summary dict."""
    files = pipeline | "Files" >> beam.Create(list(enumerate(paths)))
    read = files | "ReadChunks" >> beam.ParDo(ReadChunks(o.input_format)).with_outputs("files", main="chunks")
    offsets = beam.pvalue.AsSingleton(
        read.files | "FileCounts" >> beam.combiners.ToList() | "Offsets" >> beam.Map(file_offsets))
    made = (read.chunks
            | "SpreadChunks" >> beam.Reshuffle()
            | "MakeRecords" >> beam.ParDo(MakeRecords(o, paths, shipped), offsets)
            .with_outputs("stats", main="pieces"))
    written = (made.pieces
               | "GroupByShard" >> beam.GroupByKey()
               | "WriteShard" >> beam.ParDo(WriteShard(tmp_names)))
    stats = made.stats | "SumStats" >> beam.CombineGlobally(merge_stats)
    return (pipeline
            | "Once" >> beam.Create([None])
            | "Finalize" >> beam.Map(finalize, beam.pvalue.AsList(written), beam.pvalue.AsSingleton(stats),
                                     beam.pvalue.AsList(read.files), options=o, vocab=vocab,
                                     settings=settings, paths=paths, outputs=outputs, tmp_names=tmp_names))


# ----------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------

def _is_direct(runner):
    return runner.lower() in ("direct", "directrunner")


def _direct_runner(options):
    """The FnApiRunner behind DirectRunner. Beam's DirectRunner would first download the Prism
    runner binary from GitHub and run every worker in this one process (ignoring --num_workers);
    `--runner=PrismRunner` still selects that."""
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle
    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def pipeline_options(runner, beam_args, num_workers):
    """`--beam_<option>=v` arguments -> PipelineOptions; DirectRunner gets `num_workers` processes."""
    argv = ["--runner=" + runner]
    for arg in beam_args:
        if not arg.startswith("--beam_"):
            raise UsageError(f"{arg}: Beam options are given as --beam_<option>=value")
        argv.append("--" + arg[len("--beam_"):])
    try:  # an unknown runner: Beam's own list of valid names, in one line
        from apache_beam.runners import runner as beam_runner
        beam_runner.create_runner(runner)
    except (ValueError, ImportError) as e:
        raise UsageError(f"--runner={runner}: {str(e).splitlines()[0]}") from None
    given = {a.split("=", 1)[0] for a in argv}
    if "--default_sdk_harness_log_level" not in given:
        # Workers' INFO lines would drown our log; local workers' warnings are Beam's notes on its
        # own set-up (no staging folder, runner-only options), each printed once per worker and
        # again by the job service. Errors still show; DirectRunner's failures raise here anyway.
        level = "ERROR" if _is_direct(runner) else "WARNING"
        argv.append(f"--default_sdk_harness_log_level={level}")
    if _is_direct(runner) and num_workers > 1 and "--direct_num_workers" not in given:
        argv += [f"--direct_num_workers={num_workers}", "--direct_running_mode=multi_processing"]
        # Worker processes import our modules; make sure they find these, not another checkout's.
        here = os.path.dirname(os.path.abspath(__file__))
        rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != here]
        os.environ["PYTHONPATH"] = os.pathsep.join([here] + rest)
    options = PipelineOptions(argv)
    # Beam drops an option no registered PipelineOptions class defines (a typo, or an option of a
    # runner whose extra is not installed) with a warning; the run would go on without it.
    beam_log = logging.getLogger("apache_beam.options.pipeline_options")
    level = beam_log.level
    beam_log.setLevel(logging.ERROR)  # its "Discarding unparseable args" line: ours says it better
    try:
        known = options.get_all_options(retain_unknown_options=False)
        unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - set(known))
    finally:
        beam_log.setLevel(level)
    if unknown:
        raise UsageError(f"--beam_{unknown[0]}: not an option of Beam's (or of an installed runner's) "
                         f"PipelineOptions, so Beam would drop it; check the name (--beam_<option>=value "
                         "passes --<option>=value to Beam)")
    return options


def _resolve_inputs(spec):
    """--input_file -> [(path, size)]: local files as the local generator resolves them, else Beam's match."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not any(map(file_output.is_remote, items)):
        return [(p, os.path.getsize(p)) for p in corpus.resolve_input_files(spec)]
    found = []
    for item in items:
        try:
            matched = sorted(FileSystems.match([item])[0].metadata_list, key=lambda m: m.path)
        except Exception as e:  # noqa: BLE001 -- the file systems raise their own error types
            raise UsageError(f"--input_file: cannot list {item}: {e}") from None
        if not matched:
            raise UsageError(f"--input_file: pattern {item!r} matched no files")
        for m in matched:
            if m.size_in_bytes == 0:
                raise UsageError(f"--input_file: {m.path} is empty")
            if m.path not in (p for p, _ in found):
                found.append((m.path, m.size_in_bytes))
    return found


def _launch_inputs(o):
    """What the launcher reads before building the pipeline: the input list, the vocab and user
    dictionary as bytes (shipped to the workers), the vocab, and the sidecar settings."""
    files = _resolve_inputs(o.input_file)
    try:
        vocab_bytes = _read_bytes(o.vocab_file)
        user_dict = _read_bytes(o.jieba_user_dict) if o.jieba_user_dict else None
    except Exception as e:  # noqa: BLE001 -- the file systems raise their own error types
        raise UsageError(f"cannot read --vocab_file/--jieba_user_dict: {e}") from None
    with tempfile.TemporaryDirectory() as tmp:  # tokenization reads local files only
        local_vocab = os.path.join(tmp, "vocab.txt")
        with open(local_vocab, "wb") as f:
            f.write(vocab_bytes)
        try:
            vocab = tokenization.load_vocab(local_vocab)
        except ValueError as e:
            raise UsageError(f"--vocab_file: {e}") from None
        vocab_sha = tokenization.vocab_sha256(local_vocab)
    settings = instances.output_settings(o, vocab, vocab_sha, [
        (p if file_output.is_remote(p) else os.path.abspath(p), n) for p, n in files])
    shipped = {"vocab_file": vocab_bytes, "jieba_user_dict": user_dict}
    return [p for p, _ in files], shipped, vocab, settings


def run(o, runner, beam_args=(), log=print):
    """Runs the generator on Beam; returns the summary dict. Raises UsageError (one line) on bad input."""
    instances.validate_options(o)
    options = pipeline_options(runner, beam_args, o.num_workers)
    paths, shipped, vocab, settings = _launch_inputs(o)
    # Constructing the reader runs the local path's early input checks (e.g. the encoding of each
    # file's head) here, before any output is touched; workers repeat them on what they read.
    corpus.InputReader([p for p in paths if not file_output.is_remote(p)], o.input_format)
    if not _is_direct(runner) and not any(map(file_output.is_remote, paths)):
        log(f"create_pretraining_data: warning: --runner={runner} reads --input_file on its workers; "
            f"local paths work only where every worker sees the same file system (use gs://... on Dataflow)")
    outputs = records.shard_paths(o.output_file, o.num_output_shards)
    if instances.outputs_complete(outputs, settings, log):
        return {"skipped": True, "outputs": outputs}
    if o.segmenter == "rjieba":
        instances.make_segmenter("rjieba")  # fail here, not on every worker, when it is not installed
    job = uuid.uuid4().hex[:12]
    tmp_names = [os.path.join(os.path.dirname(p), f".{os.path.basename(p)}.tmp-beam-{job}") for p in outputs]
    pipeline = beam.Pipeline(runner=_direct_runner(options) if _is_direct(runner) else None, options=options)
    summary = build(pipeline, o, paths, shipped, vocab, settings, outputs, tmp_names)
    summary | "KeepSummary" >> beam.Map(_write_json, _summary_name(tmp_names[0]))

    # Local outputs: RecordOutputs checks the names and holds their locks for the whole run (it
    # writes nothing itself: the workers write and Finalize renames).
    local = not any(map(file_output.is_remote, outputs))
    start = time.perf_counter()
    held = _HeldErrors()
    with records.RecordOutputs(outputs, inputs=paths + instances.side_inputs(o)) if local \
            else contextlib.nullcontext(), held:
        try:
            result = pipeline.run()
            result.wait_until_finish()
        except Exception as e:  # noqa: BLE001 -- runners wrap a stage's UsageError in their own types
            _remove_temp_files(tmp_names)
            found = re.search(r"UsageError: (.+?)(?: \[while running .*)?$", str(e), re.M)
            if found:
                raise UsageError(found.group(1)) from None
            if "No space left on device" in str(e):  # a worker's write (OSError, or its runner's copy)
                raise UsageError(f"--output_file: cannot write {', '.join(outputs)}: No space left on "
                                 "device; nothing was replaced") from None
            held.release()  # not ours to name: Beam's own account of the failing stage goes first
            raise
    elapsed = time.perf_counter() - start
    summary = json.loads(_read_bytes(_summary_name(tmp_names[0])))
    FileSystems.delete([_summary_name(tmp_names[0])])
    examples = summary.pop("split_examples")
    if summary["split_lines"]:
        log(instances.split_lines_warning(summary["split_lines"], examples, o.max_seq_length))
    summary.update(outputs=outputs, seconds=round(elapsed, 2), skipped=False, runner=runner,
                   counters=_counters(result))
    bad = (f"; replaced {summary['replaced_chars']} invalid UTF-8 characters with U+FFFD "
           f"(first at {summary['first_replacement']})" if summary["replaced_chars"] else "")
    log(instances.summary_line(o, summary, f"on {runner} in {elapsed:.1f}s "
                         f"({summary['input_mb'] / max(elapsed, 1e-9):.2f} MB of text/s){bad}"))
    return summary


class _HeldErrors:
    """While the pipeline runs, holds the ERROR records Beam logs for a failing stage (a full
    traceback) instead of printing them before our one-line error; `release()` logs them after all
    when the failure is not one we can name."""

    def __init__(self):
        self.records = []

    def filter(self, record):
        if record.name.startswith("apache_beam") and record.levelno >= logging.ERROR:
            self.records.append(record)
            return False
        return True

    def __enter__(self):
        for handler in logging.getLogger().handlers:
            handler.addFilter(self)
        return self

    def __exit__(self, *exc):
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self)

    def release(self):
        self.__exit__()
        for record in self.records:
            logging.getLogger(record.name).handle(record)


def _remove_temp_files(tmp_names):
    """What a failed run's workers wrote: the shards' temporary files and the summary."""
    names = list(tmp_names) + [_summary_name(tmp_names[0])]
    with contextlib.suppress(Exception):  # noqa: BLE001 -- best effort: the run's own error is the one to report
        FileSystems.delete([n for n in names if FileSystems.exists(n)])


def _counters(result):
    """The pipeline's Beam counters, {name: committed value} (what Dataflow's job page shows)."""
    try:
        found = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(_NAMESPACE))["counters"]
    except (NotImplementedError, AttributeError, KeyError):  # runners without metrics support
        return {}
    return {c.key.metric.name: c.committed for c in found}


def _summary_name(tmp_name):
    return tmp_name + ".summary.json"


def _write_json(obj, path):
    _write_bytes(path, json.dumps(obj, ensure_ascii=False).encode("utf-8"))
