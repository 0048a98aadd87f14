"""Turns a Chinese text corpus into masked-LM pretraining TFRecords with whole-word masking.

    python create_pretraining_data.py --input_file='corpus/*.txt' --output_file=records/train.tfrecord \
        --vocab_file=vocab.txt --max_seq_length=128 --max_predictions_per_seq=20 --num_workers=4

This file is the command line and the local driver:
  read     Google's corpus format (one sentence per line, a blank line between documents) or one
           document per line (`--input_format=doc_per_line`); plain, .gz, .bz2 or .xz, streamed in
           chunks of documents (corpus.py).
  work     each chunk in a worker process: segment, tokenize, pack, mask, encode
           (pretraining_instances.py, where the rules and the seeds are described).
  write    chunks in input order through `pretraining_records.RecordOutputs` (exclusive temp files,
           sidecar last; a re-run whose sidecar matches the settings skips the file).
`--runner=<Beam runner>` hands the same work to beam_pretraining_data.py instead.
"""

import dataclasses
import os
import sys
import time

from absl import flags

import corpus
import pretraining_instances as instances
import pretraining_records as records
import tokenization
import train_utils
from train_utils import UsageError


def _flag(default, group, help_text, enum=None):
    return dataclasses.field(default=default, metadata={"group": group, "help": help_text, "enum": enum})


_IO, _INST, _WWM, _RUN = "Input and output", "Instances", "Whole-word masking", "Speed and progress"
_BEAM = "Apache Beam (more text than one machine)"


@dataclasses.dataclass
class Options:
    """Generator settings; each field is the command-line flag of the same name (`define_flags`)."""
    input_file: str = _flag(None, _IO, "Input text file(s): comma list, globs allowed (.xz/.gz/.bz2 ok).")
    input_format: str = _flag("sentence_per_line", _IO, "sentence_per_line (blank line between "
                              "documents) or doc_per_line.", corpus.INPUT_FORMATS)
    output_file: str = _flag(None, _IO, "Output TFRecord file (or comma list of shards).")
    num_output_shards: int = _flag(1, _IO, "Split output into N files <output_file>-0000i-of-0000N.")
    vocab_file: str = _flag(None, _IO, "WordPiece vocab the model will use.")
    do_lower_case: bool = _flag(True, _IO, "Lower-case and strip accents.")
    max_seq_length: int = _flag(128, _INST, "Tokens per instance incl. [CLS]/[SEP].")
    short_seq_prob: float = _flag(0.1, _INST, "Probability of a random shorter target length.")
    dupe_factor: int = _flag(10, _INST, "Copies of each document with fresh masks.")
    dynamic_masking: bool = _flag(False, _INST, "Write each instance once, unmasked (token ids + word "
                                  "starts); run_pretraining.py draws fresh whole-word masks every "
                                  "epoch. Ignores --dupe_factor.")
    random_seed: int = _flag(12345, _INST, "Seed; output depends only on it and input.")
    do_whole_word_mask: bool = _flag(True, _WWM, "Mask whole jieba words (else single tokens).")
    masked_lm_prob: float = _flag(0.10, _WWM, "Share of tokens to predict.")
    max_predictions_per_seq: int = _flag(20, _WWM, "Maximum masked tokens per instance.")
    segmenter: str = _flag("jieba", _WWM, "Word segmenter for whole-word masking (rjieba is much "
                           "faster, pip install rjieba).", instances.SEGMENTERS)
    jieba_user_dict: str = _flag("", _WWM, "Optional jieba user dictionary (word [freq] [tag] lines).")
    num_workers: int = _flag(1, _RUN, "Worker processes (output is identical).")
    progress_every_secs: float = _flag(10.0, _RUN, "Seconds between progress lines.")
    runner: str = _flag(None, _BEAM, "Run as a Beam pipeline on this runner (DirectRunner, DataflowRunner, "
                        "FlinkRunner, SparkRunner; pip install .[beam]); --beam_<option>=value is passed "
                        "to Beam as --<option>=value.")


_MAKER = None


def _init_worker(options):
    global _MAKER
    try:
        _MAKER = instances.InstanceMaker(options)
    except Exception as e:  # noqa: BLE001 -- a failing Pool initializer would respawn forever;
        _MAKER = e  # report it from the first task instead, where the parent sees it.


def process_chunk(job):
    """Worker entry: (chunk_index, first_doc_index, docs, paths) -> (shard_bytes, per_shard, stats).

    shard_bytes[s] is the TFRecord-framed bytes this chunk appends to output shard s, holding
    per_shard[s] records.
    """
    chunk_index, first_doc, docs, paths = job
    if isinstance(_MAKER, Exception):
        raise _MAKER
    stats = instances.new_stats()
    serialized = instances.document_records(_MAKER, [(paths[p], s) for p, s in docs], first_doc, stats)
    shards = instances.shuffle_and_shard(serialized, chunk_index, _MAKER.o)
    return [records.frame(r) for r in shards], [len(r) for r in shards], stats


# ----------------------------------------------------------------------------------------------------
# Driver: chunks -> workers -> output files (written by pretraining_records.RecordOutputs)
# ----------------------------------------------------------------------------------------------------

def _results(o, reader, paths):
    """Yields each chunk's process_chunk result in input order, computed inline or by workers."""
    jobs = ((ci, first, docs, paths) for ci, first, docs in reader.chunks())
    if o.num_workers == 1:
        _init_worker(o)
        for job in jobs:
            yield process_chunk(job)
        return
    import collections
    import multiprocessing
    # spawn, not fork: the caller may have threads (e.g. TensorFlow in tests) that fork would break.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(o.num_workers, initializer=_init_worker, initargs=(o,)) as pool:
        pending = collections.deque()
        for job in jobs:
            pending.append(pool.apply_async(process_chunk, (job,)))
            # Bounded look-ahead keeps memory proportional to workers, not to the corpus.
            while len(pending) >= 2 * o.num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def generate(o, log=print):
    """Runs the generator; returns a summary dict. Raises UsageError (one line) on bad input.

    A failing run leaves every file already on disk as it was; a second run on the same output
    fails at once (see pretraining_records.RecordOutputs).
    """
    instances.validate_options(o)
    try:
        vocab = tokenization.load_vocab(o.vocab_file)
    except ValueError as e:
        raise UsageError(f"--vocab_file: {e}") from None
    outputs = records.shard_paths(o.output_file, o.num_output_shards)
    input_paths = corpus.resolve_input_files(o.input_file)
    settings = instances.output_settings(o, vocab, tokenization.vocab_sha256(o.vocab_file),
                                         [(os.path.abspath(p), os.path.getsize(p)) for p in input_paths])
    if instances.outputs_complete(outputs, settings, log):
        return {"skipped": True, "outputs": outputs}
    reader = corpus.InputReader(input_paths, o.input_format)  # checks the encodings before any output is touched
    if o.segmenter == "rjieba":
        instances.make_segmenter("rjieba")  # fail fast in the parent when it is not installed

    from train_utils import ProgressLogger

    totals = instances.new_stats()
    total_kb = sum(os.path.getsize(p) for p in input_paths) // 1024 + 1
    progress = ProgressLogger(total=total_kb, unit="KB", every_secs=o.progress_every_secs,
                              name="create_pretraining_data")
    start = time.perf_counter()
    with records.RecordOutputs(outputs, inputs=input_paths + instances.side_inputs(o)) as out:
        for shard_bytes, per_shard, stats in _results(o, reader, input_paths):
            out.write(shard_bytes, per_shard)
            for k, v in stats.items():
                totals[k] += v
            elapsed = max(time.perf_counter() - start, 1e-9)
            progress.update(reader.bytes_done // 1024 - progress.done,
                            docs_per_s=round(totals["documents"] / elapsed, 1),
                            instances_per_s=round(totals["instances"] / elapsed, 1))
        instances.check_produced(input_paths, reader.docs_per_file, totals["instances"])
        split_lines = totals.pop("split_lines")
        out.commit(instances.sidecars(o, vocab, settings, out.counts, totals, reader.replaced_chars,
                            len(split_lines)))
    elapsed = time.perf_counter() - start
    mb = reader.text_bytes / 1e6
    if split_lines:
        log(instances.split_lines_warning(len(split_lines), split_lines, o.max_seq_length))
    summary = dict(totals, outputs=outputs, seconds=round(elapsed, 2), input_mb=round(mb, 3),
                   replaced_chars=reader.replaced_chars, split_lines=len(split_lines), skipped=False)
    bad = (f"; replaced {reader.replaced_chars} invalid UTF-8 characters with U+FFFD "
           f"(first at {reader.first_replacement})" if reader.replaced_chars else "")
    log(instances.summary_line(o, summary, f"in {elapsed:.1f}s ({mb / max(elapsed, 1e-9):.2f} MB of text/s){bad}"))
    return summary


def define_flags(fv=flags.FLAGS):
    """Declares one flag per `Options` field, under its group's heading in --help."""
    kinds = {str: "string", int: "integer", float: "float", bool: "bool"}
    fields = dataclasses.fields(Options)
    for group in dict.fromkeys(f.metadata["group"] for f in fields):
        with train_utils.flag_group(group, fv):
            for f in (f for f in fields if f.metadata["group"] == group):
                if f.metadata["enum"]:
                    flags.DEFINE_enum(f.name, f.default, list(f.metadata["enum"]), f.metadata["help"],
                                      flag_values=fv)
                else:
                    getattr(flags, f"DEFINE_{kinds[f.type]}")(f.name, f.default, f.metadata["help"],
                                                              flag_values=fv)
    if fv is flags.FLAGS:
        train_utils.require_flags("input_file", "output_file", "vocab_file")


def main(argv):
    del argv
    o = Options(**{f.name: flags.FLAGS[f.name].value for f in dataclasses.fields(Options)})
    if _BEAM_ARGS and not o.runner:
        raise UsageError(f"{_BEAM_ARGS[0]}: --beam_<option> settings need --runner=<Beam runner>")
    if o.runner:  # the local path never imports Beam
        import beam_pretraining_data
        beam_pretraining_data.run(o, o.runner, _BEAM_ARGS)
    else:
        generate(o)


EXAMPLE = ("python create_pretraining_data.py --input_file=resources/corpus/*.txt "
           "--output_file=/tmp/records/train.tfrecord --vocab_file=resources/vocab.txt "
           "--max_seq_length=128 --max_predictions_per_seq=20 --dupe_factor=5 --num_workers=2")

_BEAM_ARGS = []

if __name__ == "__main__":
    # absl rejects flags it does not define: --beam_<option>=value go to Beam instead.
    _BEAM_ARGS += [a for a in sys.argv[1:] if a.startswith("--beam_")]
    sys.argv = [a for a in sys.argv if not a.startswith("--beam_")]
    train_utils.run_script(main, __doc__, EXAMPLE, define_flags)
