# coding=utf-8
"""Turns a Chinese text corpus into masked-LM pretraining TFRecords with whole-word masking.

The stage, in the order of this file (DESIGN.md section 3):
  read     Google's corpus format (one sentence per line, a blank line between documents) or one
           document per line (`--input_format=doc_per_line`); plain, .gz, .bz2 or .xz, streamed in
           chunks of documents.
  segment  each document once with jieba (or rjieba); BERT-tokenize its sentences (ids equal to
           `tokenization.FullTokenizer`). The tokens of one jieba word form one masking group,
           whatever its length; `##` continuations join their word's group.
  pack     DOC-SENTENCES, `dupe_factor` times: `[CLS] sentences... [SEP]` up to `max_seq_length`
           (a random shorter target with `short_seq_prob`), never across documents. Sentences over
           the budget are split at word boundaries, never dropped.
  mask     min(max_predictions_per_seq, max(1, round(n_tokens * masked_lm_prob))) tokens as whole
           groups, per group 80% [MASK] / 10% keep / 10% random ordinary tokens; labels are the
           original ids. `--dynamic_masking` skips this: each instance is written once, unmasked
           (token ids + word starts), and run_pretraining.py draws fresh masks every epoch.
  write    Google's record schema plus `<output>.meta.json`, through `pretraining_records` (exclusive
           temp files, sidecar last; a re-run whose sidecar matches the settings skips the file).

Determinism: each (document, dupe copy) has an RNG seeded from (random_seed, document index, copy),
each chunk's instances are shuffled with an RNG seeded from (random_seed, chunk index), and chunks
are written in input order: the bytes depend only on (input, flags), not on `--num_workers`.
"""

import dataclasses
import os
import random
import sys
import time

import numpy as np
from absl import flags

import corpus
import pretraining_records as records
import tokenization
import train_utils
from train_utils import UsageError

SEGMENTERS = ("jieba", "rjieba")


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
                           "faster, pip install rjieba).", SEGMENTERS)
    jieba_user_dict: str = _flag("", _WWM, "Optional jieba user dictionary (word [freq] [tag] lines).")
    num_workers: int = _flag(1, _RUN, "Worker processes (output is identical).")
    progress_every_secs: float = _flag(10.0, _RUN, "Seconds between progress lines.")
    runner: str = _flag(None, _BEAM, "Run as a Beam pipeline on this runner (DirectRunner, DataflowRunner, "
                        "FlinkRunner, SparkRunner; pip install .[beam]); --beam_<option>=value is passed "
                        "to Beam as --<option>=value.")


def validate_options(o):
    """Raises UsageError naming the flag for settings that cannot produce valid records."""
    if o.max_seq_length < 4:
        raise UsageError(f"--max_seq_length={o.max_seq_length} must be >= 4 ([CLS] [SEP] + 2 tokens)")
    if not 1 <= o.max_predictions_per_seq <= o.max_seq_length - 2:
        raise UsageError(f"--max_predictions_per_seq={o.max_predictions_per_seq} must be in "
                         f"[1, max_seq_length - 2 = {o.max_seq_length - 2}]")
    if not 0.0 < o.masked_lm_prob <= 1.0:
        raise UsageError(f"--masked_lm_prob={o.masked_lm_prob} must be in (0, 1]")
    if not 0.0 <= o.short_seq_prob <= 1.0:
        raise UsageError(f"--short_seq_prob={o.short_seq_prob} must be in [0, 1]")
    if o.dupe_factor < 1:
        raise UsageError(f"--dupe_factor={o.dupe_factor} must be >= 1")
    if o.num_workers < 1:
        raise UsageError(f"--num_workers={o.num_workers} must be >= 1")
    if o.num_output_shards < 1:
        raise UsageError(f"--num_output_shards={o.num_output_shards} must be >= 1")
    if o.input_format not in corpus.INPUT_FORMATS:
        raise UsageError(f"--input_format={o.input_format!r} must be one of {corpus.INPUT_FORMATS}")
    if o.segmenter not in SEGMENTERS:
        raise UsageError(f"--segmenter={o.segmenter!r} must be one of {SEGMENTERS}")
    if o.jieba_user_dict:
        _check_user_dict(o.jieba_user_dict)


def _check_user_dict(path):
    """The user dictionary is read by every worker: a wrong path or encoding fails here, once."""
    if os.path.isdir(path):
        raise UsageError(f"--jieba_user_dict: {path} is a directory; give the dictionary file")
    if not os.path.isfile(path):
        raise UsageError(f"--jieba_user_dict: file not found: {path}")
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                raise UsageError(f"--jieba_user_dict: {path}:{line_no}: not UTF-8 (jieba reads UTF-8 only); "
                                 "convert it, e.g. `iconv -f GBK -t UTF-8`") from None


# ----------------------------------------------------------------------------------------------------
# Tokens and whole-word groups
# ----------------------------------------------------------------------------------------------------

class SpanTokenizer:
    """`tokenization.FullTokenizer`'s ids for many sentences at once, plus the tokens' masking groups.

    The tokens and their character spans come from `FullTokenizer.encode_with_spans` (fast on whole
    chunks); the groups come from comparing the spans with the jieba words.
    """

    def __init__(self, vocab_file, do_lower_case):
        self.full = tokenization.FullTokenizer(vocab_file, do_lower_case=do_lower_case)
        self.vocab = self.full.vocab

    def tokenize_sentences(self, sentences, word_start):
        """Token ids and masking groups of every sentence (of one or many documents, in one go).

        A token joins the previous token's group when it is a WordPiece continuation or when its
        first character lies in the jieba word of the previous token's last character.

        Args:
          sentences: list[str]; the text is "\n".join(sentences).
          word_start: bytes [len(text)], 1 where a jieba word starts.
        Returns:
          [(ids list[int], group_starts list[int])] per sentence; group_starts ascending, [0] first.
        """
        ids, pos, end, join = self.full.encode_with_spans("\n".join(sentences))  # [T] each
        # word_of[c]: number of the jieba word holding character c.
        word_of = np.cumsum(np.frombuffer(word_start, np.uint8), dtype=np.int64)
        new_group = ~join
        new_group[1:] &= word_of[pos[1:]] != word_of[end[:-1] - 1]
        # Split tokens by sentence (sentence k starts at character offset[k]); each starts a group.
        # Tokens never cross the "\n"; the running maximum keeps `pos` sorted for the search even
        # where accent stripping reorders marks inside a word.
        offset = np.cumsum([0] + [len(x) + 1 for x in sentences[:-1]])
        cut = np.searchsorted(np.maximum.accumulate(pos) if len(pos) else pos, offset)
        new_group[cut[cut < len(pos)]] = True
        group_starts = np.flatnonzero(new_group)
        gcut = np.searchsorted(group_starts, cut).tolist() + [len(group_starts)]
        # Group starts relative to their sentence's first token, converted to Python once.
        sentence_of_group = np.searchsorted(cut, group_starts, side="right") - 1
        rel = (group_starts - cut[sentence_of_group]).tolist()
        ids = ids.tolist()
        bounds = cut.tolist() + [len(ids)]
        return [(ids[bounds[k]:bounds[k + 1]], rel[gcut[k]:gcut[k + 1]]) for k in range(len(sentences))]


# ----------------------------------------------------------------------------------------------------
# Segmentation
# ----------------------------------------------------------------------------------------------------

def make_segmenter(name, user_dict=""):
    """Returns a function str -> list[str] whose pieces concatenate back to the input."""
    if name == "rjieba":
        try:
            import rjieba
        except ImportError:
            raise UsageError("--segmenter=rjieba needs the rjieba package: pip install rjieba") from None
        seg = rjieba.Jieba()
        if user_dict:
            for word, freq, tag in _read_user_dict(user_dict):
                seg.add_word(word, freq, tag)
        return seg.cut
    import jieba
    jieba.setLogLevel(60)  # silence "Building prefix dict..." on every worker
    if not user_dict:
        jieba.initialize()
        return jieba.lcut
    tok = jieba.Tokenizer()
    tok.load_userdict(user_dict)
    return tok.lcut


def _read_user_dict(path):
    """jieba user-dict lines: `word [freq] [tag]`."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                freq = int(parts[1]) if len(parts) > 1 else None
            except ValueError:
                raise UsageError(f"--jieba_user_dict: {path}:{line_no}: frequency is not an integer")
            yield parts[0], freq, parts[2] if len(parts) > 2 else None

# ----------------------------------------------------------------------------------------------------
# Documents -> instances -> records (worker side)
# ----------------------------------------------------------------------------------------------------

class InstanceMaker:
    """Everything a worker needs: tokenizer, segmenter, masking settings, encoder."""

    def __init__(self, o):
        self.o = o
        self.tok = SpanTokenizer(o.vocab_file, o.do_lower_case)
        self.segment = make_segmenter(o.segmenter, o.jieba_user_dict)
        vocab = self.tok.vocab
        self.cls_id, self.sep_id, self.mask_id = vocab["[CLS]"], vocab["[SEP]"], vocab["[MASK]"]
        # Random replacements: ordinary tokens only (no [PAD]/[UNK]/[CLS]/[SEP]/[MASK]/[unusedN], no ##).
        self.ordinary_ids = records.ordinary_ids(vocab)
        if not self.ordinary_ids:
            raise UsageError(f"--vocab_file: {o.vocab_file} has no ordinary tokens to sample from")
        self.max_tokens = o.max_seq_length - 2
        self.encoder = records.ExampleEncoder(o.max_seq_length, o.max_predictions_per_seq, len(vocab))
        self.unmasked_encoder = records.UnmaskedEncoder(len(vocab))
        self._word_start_table = [b""]  # [n] -> b"\x01" + n-1 zero bytes

    def featurize(self, sentences, path):
        """One document: [(line_number, sentence)] -> (pieces, split_lines); see featurize_many."""
        pieces, split_lines = self.featurize_many([(path, sentences)])
        return pieces[0], split_lines

    def featurize_many(self, docs):
        """Segments and tokenizes documents, all in one go (NumPy calls amortized over the chunk).

        Args:
          docs: [(path, [(line_number, sentence), ...])].
        Returns:
          (pieces per document: [[(ids, group_starts)]] with len(ids) <= max_seq_length - 2 (long
           sentences split at group starts), split_lines: ["file:line (n tokens)"]).
        """
        sentences = [x for _, doc in docs for _, x in doc]
        # Documents are joined by "\n" like sentences; jieba never joins words across a newline,
        # so this is the same segmentation as one document at a time, in one call.
        text = "\n".join(sentences)
        lengths = list(map(len, self.segment(text)))
        table = self._word_start_table
        if max(lengths) >= len(table):
            table += [b"\x01" + bytes(n - 1) for n in range(len(table), max(lengths) + 1)]
        word_start = b"".join(map(table.__getitem__, lengths))  # 1 where a jieba word starts
        if len(word_start) != len(text):
            path, doc = docs[0]
            raise UsageError(f"{path}:{doc[0][0]}: segmenter {self.o.segmenter} lost characters")
        tokenized = iter(self.tok.tokenize_sentences(sentences, word_start))
        out, split_lines = [], []
        for path, doc in docs:
            pieces = []
            for (line_no, _), (ids, starts) in zip(doc, tokenized):
                if not self.o.do_whole_word_mask:
                    starts = list(range(len(ids)))
                if len(ids) > self.max_tokens:
                    split_lines.append(f"{path}:{line_no} ({len(ids)} tokens)")
                    pieces.extend(self._split_long(ids, starts))
                elif ids:
                    pieces.append((ids, starts))
            out.append(pieces)
        return out, split_lines

    def _split_long(self, ids, starts):
        """Cuts a too-long sentence into pieces of <= max_tokens at group starts (hard cut if none)."""
        out, begin, si = [], 0, 0
        while begin < len(ids):
            end = min(begin + self.max_tokens, len(ids))
            while si < len(starts) and starts[si] < begin:
                si += 1
            sj = si
            while sj < len(starts) and starts[sj] <= end:
                sj += 1
            # starts[si:sj] are group starts inside [begin, end]; cut at the last one > begin.
            if end < len(ids) and sj - 1 > si and starts[sj - 1] > begin:
                end = starts[sj - 1]
            piece_starts = [s - begin for s in starts[si:sj] if s < end]
            if not piece_starts or piece_starts[0] != 0:
                piece_starts.insert(0, 0)  # a hard cut inside a group starts a new group
            out.append((ids[begin:end], piece_starts))
            begin = end
        return out

    @staticmethod
    def flatten(pieces):
        """[(ids, group_starts)] of one document -> (ids, starts, bounds) over the whole document.

        ids: [T] token ids; starts: [G] ascending token index of each group's first token;
        bounds: [(token_begin, token_end, group_begin, group_end)] per piece (sentence or part of one).
        Instances are then just index ranges: no per-copy list building.
        """
        ids, starts, bounds = [], [], []
        for piece_ids, piece_starts in pieces:
            off, g = len(ids), len(starts)
            ids += piece_ids
            starts += [off + x for x in piece_starts]
            bounds.append((off, len(ids), g, len(starts)))
        return ids, starts, bounds

    def instances(self, bounds, rng):
        """DOC-SENTENCES packing of one document copy.

        Yields (token_begin, token_end, group_begin, group_end): whole pieces, at most
        max_seq_length - 2 tokens, filled up to a target length (shorter with short_seq_prob);
        the document's tail is kept however short.
        """
        max_tokens, short_prob = self.max_tokens, self.o.short_seq_prob

        def target():
            return rng.randint(2, max_tokens) if rng.random() < short_prob else max_tokens

        begin, goal = None, target()
        for a, b, g, g_end in bounds:
            if begin is not None and b - begin > max_tokens:
                yield begin, a, g_begin, g
                begin, goal = None, target()
            if begin is None:
                begin, g_begin = a, g
            if b - begin >= goal:
                yield begin, b, g_begin, g_end
                begin, goal = None, target()
        if begin is not None:
            yield begin, b, g_begin, g_end

    def mask(self, ids, starts, instance, rng):
        """Whole-word masking of one instance.

        Args:
          ids, starts: the document's tokens and group starts (see `flatten`).
          instance: (token_begin, token_end, group_begin, group_end) from `instances`.
        Returns:
          (input_ids [n + 2] with [CLS]/[SEP], positions [k] ascending (counting [CLS]), labels [k]).
        """
        a, b, g0, g1 = instance
        o, n, groups = self.o, b - a, g1 - g0
        num_to_predict = min(o.max_predictions_per_seq, max(1, int(round(n * o.masked_lm_prob))))
        input_ids = [self.cls_id] + ids[a:b] + [self.sep_id]
        positions, count, swapped = [], 0, {}
        # Lazy Fisher-Yates over the groups (a dict holds the few swapped slots): visit groups in
        # random order and take each whole group that still fits.
        for i in range(groups):
            if count >= num_to_predict:
                break
            j = i + int(rng.random() * (groups - i))
            g = swapped.get(j, j)
            swapped[j] = swapped.get(i, i)
            begin = starts[g0 + g]
            end = starts[g0 + g + 1] if g + 1 < groups else b
            if count + end - begin > num_to_predict:
                continue
            count += end - begin
            lo, hi = begin - a + 1, end - a + 1  # positions in input_ids
            positions.extend(range(lo, hi))
            # One decision per word: 80% [MASK], 10% keep, 10% random ordinary tokens.
            r = rng.random()
            if r < 0.8:
                input_ids[lo:hi] = [self.mask_id] * (hi - lo)
            elif r >= 0.9:
                pool = self.ordinary_ids
                input_ids[lo:hi] = [pool[int(rng.random() * len(pool))] for _ in range(hi - lo)]
        positions.sort()
        labels = [ids[a + p - 1] for p in positions]
        return input_ids, positions, labels



_MAKER = None


def _init_worker(options):
    global _MAKER
    try:
        _MAKER = InstanceMaker(options)
    except Exception as e:  # noqa: BLE001 -- a failing Pool initializer would respawn forever;
        _MAKER = e  # report it from the first task instead, where the parent sees it.


def new_stats():
    return {"documents": 0, "empty_documents": 0, "sentences": 0, "tokens": 0, "instances": 0,
            "predictions": 0, "split_lines": []}


def document_records(maker, docs, first_doc, stats):
    """Documents -> serialized records: the per-document unit of work (a worker's, or a Beam stage's).

    Args:
      maker: an InstanceMaker (tokenizer, segmenter, settings).
      docs: [(path, [(line_number, sentence), ...])], documents number first_doc, first_doc + 1, ...
        in the whole input (the global index seeds each document's masks).
      stats: counters from `new_stats()`, updated in place.
    Returns:
      [serialized tf.train.Example], in (document, dupe copy, instance) order. The bytes depend only
      on the documents, their global indices and the options, not on how documents are grouped.
    """
    o, out = maker.o, []
    doc_pieces, split_lines = maker.featurize_many(docs)
    stats["split_lines"] += split_lines
    for d, ((_, sentences), pieces) in enumerate(zip(docs, doc_pieces)):
        stats["documents"] += 1
        stats["sentences"] += len(sentences)
        if not pieces:
            stats["empty_documents"] += 1
            continue
        ids, starts, bounds = maker.flatten(pieces)
        stats["tokens"] += len(ids)
        for dupe in range(1 if o.dynamic_masking else o.dupe_factor):
            # Seeded from (seed, document, copy) only: independent of chunking and worker count.
            rng = random.Random((o.random_seed << 64) | ((first_doc + d) << 16) | dupe)
            for instance in maker.instances(bounds, rng):
                input_ids, positions, labels = maker.mask(ids, starts, instance, rng)
                if o.dynamic_masking:
                    # The mask above only keeps `rng` in step with static copy 0, so both kinds
                    # pack the same instances; training draws the masks (pretraining_records).
                    a, b, g0, g1 = instance
                    out.append(maker.unmasked_encoder.encode(ids[a:b], [x - a for x in starts[g0:g1]]))
                    continue
                stats["predictions"] += len(positions)
                out.append(maker.encoder.encode(input_ids, positions, labels))
    stats["instances"] += len(out)
    return out


def shuffle_and_shard(serialized, chunk_index, o):
    """A chunk's records -> one list per output shard, mixed with an RNG fixed by (seed, chunk)."""
    # Mix documents and copies inside the chunk (Google shuffles all instances; we stream).
    random.Random((o.random_seed << 64) | (1 << 63) | chunk_index).shuffle(serialized)
    # Record j of chunk c goes to shard (j + c) % num_shards: balanced, and fixed by the input alone.
    n = o.num_output_shards
    return [serialized[(s - chunk_index) % n::n] for s in range(n)]


def process_chunk(job):
    """Worker entry: (chunk_index, first_doc_index, docs, paths) -> (shard_bytes, per_shard, stats).

    shard_bytes[s] is the TFRecord-framed bytes this chunk appends to output shard s, holding
    per_shard[s] records.
    """
    chunk_index, first_doc, docs, paths = job
    if isinstance(_MAKER, Exception):
        raise _MAKER
    stats = new_stats()
    serialized = document_records(_MAKER, [(paths[p], s) for p, s in docs], first_doc, stats)
    shards = shuffle_and_shard(serialized, chunk_index, _MAKER.o)
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


def output_settings(o, vocab, vocab_sha256, input_files):
    """The sidecar keys saying how the outputs were made (local and Beam runs alike).

    input_files: [(path, size in bytes)].
    """
    settings = {k: getattr(o, k) for k in records.READ_KEYS + records.SETTINGS_KEYS if hasattr(o, k)}
    settings.update(kind=records.UNMASKED if o.dynamic_masking else records.STATIC,
                    dupe_factor=1 if o.dynamic_masking else o.dupe_factor,
                    format_version=records.FORMAT_VERSION, vocab_size=len(vocab), vocab_sha256=vocab_sha256,
                    input_files=[{"path": p, "bytes": n} for p, n in input_files])
    return settings


def sidecars(o, vocab, settings, counts, totals, replaced_chars, split_lines):
    """One sidecar per output shard holding counts[i] records; totals as from `new_stats`."""
    kind_keys = records.unmasked_sidecar_keys(vocab) if o.dynamic_masking else {}
    # Where the vocab was: run_pretraining.py copies it into its output folder when the hash matches.
    # Not a setting (a moved vocab does not make finished outputs stale).
    vocab_file = o.vocab_file if records.is_remote(o.vocab_file) else os.path.abspath(o.vocab_file)
    return [dict(settings, **kind_keys, vocab_file=vocab_file, num_instances=n, num_output_shards=len(counts),
                 total_instances=totals["instances"], num_documents=totals["documents"],
                 replaced_invalid_utf8_chars=replaced_chars, split_long_lines=split_lines) for n in counts]


def side_inputs(o):
    """Files read besides the corpus, which an output must not replace either."""
    return [p for p in (o.vocab_file, o.jieba_user_dict) if p]


def generate(o, log=print):
    """Runs the generator; returns a summary dict. Raises UsageError (one line) on bad input.

    A failing run leaves every file already on disk as it was; a second run on the same output
    fails at once (see pretraining_records.RecordOutputs).
    """
    validate_options(o)
    try:
        vocab = tokenization.load_vocab(o.vocab_file)
    except ValueError as e:
        raise UsageError(f"--vocab_file: {e}") from None
    outputs = records.shard_paths(o.output_file, o.num_output_shards)
    input_paths = corpus.resolve_input_files(o.input_file)
    settings = output_settings(o, vocab, tokenization.vocab_sha256(o.vocab_file),
                               [(os.path.abspath(p), os.path.getsize(p)) for p in input_paths])
    if all(records.sidecar_matches(p, settings, num_output_shards=len(outputs)) for p in outputs):
        log(f"create_pretraining_data: {', '.join(outputs)} already complete (same settings); skipped")
        return {"skipped": True, "outputs": outputs}
    reader = corpus.InputReader(input_paths, o.input_format)  # checks the encodings before any output is touched
    if o.segmenter == "rjieba":
        make_segmenter("rjieba")  # fail fast in the parent when it is not installed

    from train_utils import ProgressLogger

    totals = new_stats()
    total_kb = sum(os.path.getsize(p) for p in input_paths) // 1024 + 1
    progress = ProgressLogger(total=total_kb, unit="KB", every_secs=o.progress_every_secs,
                              name="create_pretraining_data")
    start = time.perf_counter()
    with records.RecordOutputs(outputs, inputs=input_paths + side_inputs(o)) as out:
        for shard_bytes, per_shard, stats in _results(o, reader, input_paths):
            out.write(shard_bytes, per_shard)
            for k, v in stats.items():
                totals[k] += v
            elapsed = max(time.perf_counter() - start, 1e-9)
            progress.update(reader.bytes_done // 1024 - progress.done,
                            docs_per_s=round(totals["documents"] / elapsed, 1),
                            instances_per_s=round(totals["instances"] / elapsed, 1))
        for path, n_docs in zip(input_paths, reader.docs_per_file):
            if n_docs == 0:
                raise UsageError(f"--input_file: {path} contains no text (only blank lines)")
        if totals["instances"] == 0:
            raise UsageError("--input_file: no instance produced (every document was empty)")
        split_lines = totals.pop("split_lines")
        out.commit(sidecars(o, vocab, settings, out.counts, totals, reader.replaced_chars,
                            len(split_lines)))
    elapsed = time.perf_counter() - start
    mb = reader.text_bytes / 1e6
    if split_lines:
        log(split_lines_warning(len(split_lines), split_lines, o.max_seq_length))
    summary = dict(totals, outputs=outputs, seconds=round(elapsed, 2), input_mb=round(mb, 3),
                   replaced_chars=reader.replaced_chars, split_lines=len(split_lines), skipped=False)
    bad = (f"; replaced {reader.replaced_chars} invalid UTF-8 characters with U+FFFD "
           f"(first at {reader.first_replacement})" if reader.replaced_chars else "")
    log(summary_line(o, summary, f"in {elapsed:.1f}s ({mb / max(elapsed, 1e-9):.2f} MB of text/s){bad}"))
    return summary


def split_lines_warning(count, examples, max_seq_length):
    """The one warning line for input lines too long for one sequence (all counted, a few named)."""
    named = ", ".join(examples[:3]) + (", ..." if count > 3 else "")
    return (f"create_pretraining_data: warning: {count} input line{'s' if count > 1 else ''} longer "
            f"than a sequence ({max_seq_length - 2} tokens) split at word boundaries into several "
            f"instances, none dropped: {named}")


def summary_line(o, totals, tail):
    """The closing line of a run (local or Beam): what was written, then `tail` (where, how fast)."""
    # Dynamic records hold no masks: training draws them, so there is no prediction count yet.
    masks = ("masks drawn at training time" if o.dynamic_masking
             else f"{totals['predictions']} predictions")
    return (f"create_pretraining_data: wrote {totals['instances']} instances from "
            f"{totals['documents']} documents ({totals['tokens']} tokens, {masks}, "
            f"{totals['empty_documents']} empty documents, {totals['split_lines']} long lines split) "
            f"to {', '.join(totals['outputs'])} {tail}")


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
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments {argv[1:]}")
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
