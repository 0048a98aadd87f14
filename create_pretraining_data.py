# coding=utf-8
"""Turns a Chinese text corpus into masked-LM pretraining TFRecords with whole-word masking.

Input (Google's corpus format): UTF-8 text, one sentence per line, a blank line between documents
(`--input_format=sentence_per_line`), or one document per line (`doc_per_line`, split into sentences
after 。！？!?；…). Plain, `.gz`, `.bz2` and `.xz` files are read as streams.

Pipeline for each document (DESIGN.md section 3):
  1. BERT-tokenize every sentence (ids identical to `tokenization.FullTokenizer`, via a cached fast
     path) and segment the document once with jieba (or rjieba).
  2. Align: the tokens of one jieba word form one masking group, whatever the word's length;
     `##` WordPiece continuations join their word's group.
  3. DOC-SENTENCES, `dupe_factor` times: pack `[CLS] sentences... [SEP]` up to a target length
     (`max_seq_length`, or a random shorter one with probability `short_seq_prob`), never across a
     document boundary. Sentences longer than the budget are split at word boundaries, never dropped.
  4. Mask min(max_predictions_per_seq, max(1, round(n_tokens * masked_lm_prob))) tokens as whole
     groups: per group 80% [MASK] / 10% keep / 10% random ordinary tokens. Labels are the original ids.

Determinism: every (document, dupe copy) has its own RNG seeded from (random_seed, document index,
copy index), documents are processed in fixed chunks whose instances are shuffled with an RNG seeded
from (random_seed, chunk index), and the parent writes chunks in input order. The output bytes therefore
depend only on (input, flags), not on `--num_workers`.

Output: Google's TFRecord schema (input_ids, input_mask, segment_ids, masked_lm_positions,
masked_lm_ids, masked_lm_weights, next_sentence_labels) plus `<output>.meta.json`. Files are written
under a temporary name and renamed when complete; the sidecar is written last, and a re-run whose
sidecar matches the current settings skips the file.

Example:
    python create_pretraining_data.py --input_file='resources/corpus/*.txt' \
        --output_file=/tmp/demo.tfrecord --vocab_file=resources/vocab.txt \
        --max_seq_length=128 --max_predictions_per_seq=20 --dupe_factor=5
"""

import bz2
import dataclasses
import glob
import gzip
import itertools
import lzma
import os
import random
import re
import sys
import time
import unicodedata

import numpy as np
from absl import flags

import pretraining_records as records
import tokenization
import train_utils
from train_utils import UsageError

SEGMENTERS = ("jieba", "rjieba")
INPUT_FORMATS = ("sentence_per_line", "doc_per_line")
# A chunk is the unit of work sent to a worker and the unit of output shuffling. Its size depends only
# on the input (never on the worker count), which keeps the output identical for any --num_workers.
DOCS_PER_CHUNK = 256
CHARS_PER_CHUNK = 1 << 20
_RUN_CACHE_LIMIT = 200_000


@dataclasses.dataclass
class Options:
    """Generator settings; field names are the command-line flag names."""
    input_file: str
    output_file: str
    vocab_file: str
    do_lower_case: bool = True
    do_whole_word_mask: bool = True
    max_seq_length: int = 128
    max_predictions_per_seq: int = 20
    random_seed: int = 12345
    dupe_factor: int = 10
    masked_lm_prob: float = 0.10
    short_seq_prob: float = 0.1
    input_format: str = "sentence_per_line"
    segmenter: str = "jieba"
    jieba_user_dict: str = ""
    num_workers: int = 1
    num_output_shards: int = 1
    progress_every_secs: float = 10.0
    dynamic_masking: bool = False


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
    if o.input_format not in INPUT_FORMATS:
        raise UsageError(f"--input_format={o.input_format!r} must be one of {INPUT_FORMATS}")
    if o.segmenter not in SEGMENTERS:
        raise UsageError(f"--segmenter={o.segmenter!r} must be one of {SEGMENTERS}")
    if o.jieba_user_dict and not os.path.isfile(o.jieba_user_dict):
        raise UsageError(f"--jieba_user_dict: file not found: {o.jieba_user_dict}")


# ----------------------------------------------------------------------------------------------------
# Input: files -> documents -> chunks (parent process, streaming)
# ----------------------------------------------------------------------------------------------------

def resolve_input_files(spec):
    """`--input_file` comma list with globs -> sorted, de-duplicated list of existing, non-empty files."""
    paths = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise UsageError(f"--input_file: pattern {item!r} matched no files")
        else:
            matches = [item]
        for path in matches:
            if not os.path.exists(path):
                raise UsageError(f"--input_file: file not found: {path}")
            if os.path.isdir(path):
                raise UsageError(f"--input_file: {path} is a directory (give files or a glob)")
            if os.path.getsize(path) == 0:
                raise UsageError(f"--input_file: {path} is empty")
            if path not in paths:
                paths.append(path)
    if not paths:
        raise UsageError("--input_file is required")
    return paths


def _open_binary(path):
    """Returns (raw file, decompressed binary stream); raw.tell() measures progress in input bytes."""
    raw = open(path, "rb")
    if path.endswith(".xz"):
        return raw, lzma.open(raw)
    if path.endswith(".gz"):
        return raw, gzip.open(raw)
    if path.endswith(".bz2"):
        return raw, bz2.open(raw)
    return raw, raw


# A sentence ends after a run of end marks plus any closing quotes/brackets.
_SENTENCE_RE = re.compile(r".*?(?:[。！？!?；…]+[”’」』）)\]\"']*|$)", re.S)


def split_sentences(text):
    """'他来了。你呢？好' -> ['他来了。', '你呢？', '好']; the pieces concatenate back to `text`."""
    return [s for s in _SENTENCE_RE.findall(text) if s.strip()]


class InputReader:
    """Streams documents out of the input files; counts bytes read and invalid UTF-8 replaced.

    A document is `(path_index, [(line_number, sentence), ...])`. Documents never span files.
    """

    def __init__(self, paths, input_format):
        self.paths = paths
        self.input_format = input_format
        self.bytes_done_in_closed_files = 0
        self._raw = None
        self.replaced_chars = 0
        self.first_replacement = None  # "file:line"
        self.docs_per_file = [0] * len(paths)
        self.text_bytes = 0  # decompressed

    @property
    def bytes_done(self):
        return self.bytes_done_in_closed_files + (self._raw.tell() if self._raw else 0)

    def _decode(self, line, path, line_no):
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError:
            text = line.decode("utf-8", "replace")
            # Count only the replacements we made, not U+FFFD characters that were in the file.
            self.replaced_chars += text.count("\ufffd") - line.count("\ufffd".encode("utf-8"))
            if self.first_replacement is None:
                self.first_replacement = f"{path}:{line_no}"
            return text

    def documents(self):
        for path_index, path in enumerate(self.paths):
            raw, stream = _open_binary(path)
            self._raw = raw
            try:
                sentences, chars = [], 0
                for line_no, line in enumerate(stream, 1):
                    self.text_bytes += len(line)
                    text = self._decode(line, path, line_no).strip()
                    if self.input_format == "doc_per_line":
                        if text:
                            self.docs_per_file[path_index] += 1
                            yield path_index, [(line_no, s) for s in split_sentences(text)]
                    elif text:
                        sentences.append((line_no, text))
                        chars += len(text)
                        # A giant "document" (e.g. a file without blank lines) is cut into parts
                        # so that memory stays bounded; parts are packed like documents.
                        if chars >= CHARS_PER_CHUNK:
                            self.docs_per_file[path_index] += 1
                            yield path_index, sentences
                            sentences, chars = [], 0
                    elif sentences:
                        self.docs_per_file[path_index] += 1
                        yield path_index, sentences
                        sentences, chars = [], 0
                if sentences:
                    self.docs_per_file[path_index] += 1
                    yield path_index, sentences
            except (OSError, EOFError, lzma.LZMAError) as e:
                raise ValueError(f"--input_file: cannot read {path}: {e}") from None
            finally:
                self.bytes_done_in_closed_files += os.path.getsize(path)
                self._raw = None
                stream.close()
                raw.close()

    def chunks(self):
        """Yields (chunk_index, first_doc_index, [document, ...]) in input order."""
        chunk, chars, chunk_index, doc_index = [], 0, 0, 0
        for doc in self.documents():
            chunk.append(doc)
            chars += sum(len(s) for _, s in doc[1])
            if len(chunk) >= DOCS_PER_CHUNK or chars >= CHARS_PER_CHUNK:
                yield chunk_index, doc_index, chunk
                doc_index += len(chunk)
                chunk_index += 1
                chunk, chars = [], 0
        if chunk:
            yield chunk_index, doc_index, chunk


# ----------------------------------------------------------------------------------------------------
# Tokenization with character spans (a fast path with ids identical to FullTokenizer)
# ----------------------------------------------------------------------------------------------------

_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF),
               (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0x2F800, 0x2FA1F))


def _is_cjk_char(ch):
    cp = ord(ch)
    return any(a <= cp <= b for a, b in _CJK_RANGES)


def _is_punctuation(ch):
    """The BERT tokenizer's punctuation: ASCII non-alphanumerics and Unicode category P*."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_simple_char(ch, do_lower_case):
    """True for characters that always become exactly one token of their own.

    The tokenizer puts spaces around CJK ideographs, and splits off punctuation as a one-character
    word (we only count punctuation that lower-casing and accent stripping leave unchanged). Either
    way the token does not depend on the neighbours, so these characters are looked up one by one.
    """
    if _is_cjk_char(ch):
        return True
    return _is_punctuation(ch) and not (do_lower_case and unicodedata.normalize("NFD", ch.lower()) != ch)


def _is_split_char(ch):
    """Where the basic tokenizer splits words (whitespace, punctuation); used only to find spans."""
    return ch.isspace() or _is_punctuation(ch)


_ID_BASE = 0x100000  # simple characters are translated to chr(_ID_BASE + token id)


class _CharTable(dict):
    """str.translate table: simple char -> chr(_ID_BASE + id); other chars -> a char below _ID_BASE."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def __missing__(self, cp):
        ch = chr(cp)
        if _is_simple_char(ch, self.tokenizer.do_lower_case):
            ids = self.tokenizer.full.convert_tokens_to_ids(self.tokenizer.full.tokenize(ch))
            if len(ids) != 1:
                raise AssertionError(f"character {ch!r} gave {len(ids)} tokens")
            value = chr(_ID_BASE + ids[0])
        else:  # private-use planes 15/16 are dropped by the tokenizer; "\0" is dropped the same way
            value = ch if cp < _ID_BASE else "\0"
        self[cp] = value
        return value


class SpanTokenizer:
    """Wraps `tokenization.FullTokenizer`: the same ids, plus the masking groups of the tokens.

    A whole document is handled at once with NumPy. Simple characters (CJK, punctuation) map to one
    id each through a `str.translate` table. The other runs ("iPhone 12", "3.5", "\n") are tokenized
    once per distinct string with the full tokenizer and cached with the character span each token
    came from. Tokens never cross a simple character (the tokenizer separates them), so the result
    equals FullTokenizer on every sentence; tests/ check this on the corpora.
    """

    def __init__(self, vocab_file, do_lower_case):
        self.full = tokenization.FullTokenizer(vocab_file, do_lower_case=do_lower_case)
        self.vocab = self.full.vocab
        self.do_lower_case = do_lower_case
        self._table = _CharTable(self)
        self._runs = {}  # complex run -> (ids, rel_starts, rel_ends, joins_previous)

    def _analyze_run(self, run):
        """Tokens of a complex run with the span [start, end) of the piece each came from."""
        pieces, start = [], None
        for i, ch in enumerate(run):
            if _is_split_char(ch):
                if start is not None:
                    pieces.append((start, i))
                    start = None
                if not ch.isspace():
                    pieces.append((i, i + 1))
            elif start is None:
                start = i
        if start is not None:
            pieces.append((start, len(run)))
        # One piece (most runs: "2019", "iPhone", "\n") is its own reference tokenization.
        tokens = None if len(pieces) == 1 and pieces[0] == (0, len(run)) else self.full.tokenize(run)
        piece_tokens, starts, ends, joins = [], [], [], []
        for a, b in pieces:
            for k, tok in enumerate(self.full.tokenize(run[a:b])):
                piece_tokens.append(tok)
                starts.append(a)
                ends.append(b)
                # WordPiece pieces of one word (and anything else one piece yields) stay together.
                joins.append(k > 0 or tok.startswith("##"))
        if tokens is None:
            tokens = piece_tokens
        elif piece_tokens != tokens:
            # Rare (e.g. accent stripping that creates punctuation): keep the exact tokens and give
            # them the whole run as span, so they form one group.
            starts, ends = [0] * len(tokens), [len(run)] * len(tokens)
            joins = [i > 0 for i in range(len(tokens))]
        entry = (self.full.convert_tokens_to_ids(tokens), starts, ends, joins)
        if len(self._runs) >= _RUN_CACHE_LIMIT:
            self._runs.clear()
        self._runs[run] = entry
        return entry

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
        text = "\n".join(sentences)
        codes = np.frombuffer(text.translate(self._table).encode("utf-32-le"), np.uint32)  # [C]
        simple = codes >= _ID_BASE
        # Complex runs: maximal stretches of non-simple characters, as (start, end) pairs.
        edges = np.flatnonzero(np.diff(np.concatenate(([1], simple, [1])).astype(np.int8)))
        bounds = edges.reshape(-1, 2)  # [R, 2]
        runs, analyze = self._runs, self._analyze_run
        found = [runs.get(text[a:b]) or analyze(text[a:b]) for a, b in bounds.tolist()]
        per_run = np.fromiter(map(len, (f[0] for f in found)), np.int64, len(found))  # tokens per run
        chain = itertools.chain.from_iterable
        run_start = np.repeat(bounds[:, 0], per_run)
        n = int(per_run.sum())
        c_pos = run_start + np.fromiter(chain(f[1] for f in found), np.int64, n)
        c_end = run_start + np.fromiter(chain(f[2] for f in found), np.int64, n)
        c_ids = np.fromiter(chain(f[0] for f in found), np.int64, n)
        c_join = np.fromiter(chain(f[3] for f in found), bool, n)
        s_pos = np.flatnonzero(simple)
        pos = np.concatenate([s_pos, c_pos])  # [T] first character of each token
        order = np.argsort(pos, kind="stable")
        pos = pos[order]
        ids = np.concatenate([codes[simple].astype(np.int64) - _ID_BASE, c_ids])[order]
        end = np.concatenate([s_pos + 1, c_end])[order]
        join = np.concatenate([np.zeros(len(s_pos), bool), c_join])[order]
        # word_of[c]: number of the jieba word holding character c.
        word_of = np.cumsum(np.frombuffer(word_start, np.uint8), dtype=np.int64)
        new_group = ~join
        new_group[1:] &= word_of[pos[1:]] != word_of[end[:-1] - 1]
        # Split tokens by sentence (sentence k starts at character offset[k]); each starts a group.
        offset = np.cumsum([0] + [len(x) + 1 for x in sentences[:-1]])
        cut = np.searchsorted(pos, offset)
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
    return records.generator_settings(
        kind=records.UNMASKED if o.dynamic_masking else records.STATIC,
        max_seq_length=o.max_seq_length, max_predictions_per_seq=o.max_predictions_per_seq,
        vocab_size=len(vocab), vocab_sha256=vocab_sha256,
        do_lower_case=o.do_lower_case, do_whole_word_mask=o.do_whole_word_mask,
        masked_lm_prob=o.masked_lm_prob, dupe_factor=1 if o.dynamic_masking else o.dupe_factor,
        short_seq_prob=o.short_seq_prob,
        random_seed=o.random_seed, segmenter=o.segmenter, jieba_user_dict=o.jieba_user_dict,
        input_format=o.input_format, input_files=input_files)


def sidecars(o, vocab, settings, counts, totals, replaced_chars, split_lines):
    """One sidecar per output shard holding counts[i] records; totals as from `new_stats`."""
    kind_keys = records.unmasked_sidecar_keys(vocab) if o.dynamic_masking else {}
    return [dict(settings, **kind_keys, num_instances=n, num_output_shards=len(counts),
                 total_instances=totals["instances"], num_documents=totals["documents"],
                 replaced_invalid_utf8_chars=replaced_chars, split_long_lines=split_lines) for n in counts]


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
    input_paths = resolve_input_files(o.input_file)
    settings = output_settings(o, vocab, tokenization.vocab_sha256(o.vocab_file),
                               [(os.path.abspath(p), os.path.getsize(p)) for p in input_paths])
    if all(records.sidecar_matches(p, settings, num_output_shards=len(outputs)) for p in outputs):
        log(f"create_pretraining_data: {', '.join(outputs)} already complete (same settings); skipped")
        return {"skipped": True, "outputs": outputs}
    if o.segmenter == "rjieba":
        make_segmenter("rjieba")  # fail fast in the parent when it is not installed

    from train_utils import ProgressLogger

    totals = new_stats()
    reader = InputReader(input_paths, o.input_format)
    total_kb = sum(os.path.getsize(p) for p in input_paths) // 1024 + 1
    progress = ProgressLogger(total=total_kb, unit="KB", every_secs=o.progress_every_secs,
                              name="create_pretraining_data")
    start = time.perf_counter()
    with records.RecordOutputs(outputs, inputs=input_paths) as out:
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
        out.commit(sidecars(o, vocab, settings, out.counts, totals, reader.replaced_chars, len(split_lines)))
    elapsed = time.perf_counter() - start
    mb = reader.text_bytes / 1e6
    for line in split_lines[:5]:
        log(f"create_pretraining_data: warning: long line split into several instances: {line}")
    summary = dict(totals, outputs=outputs, seconds=round(elapsed, 2), input_mb=round(mb, 3),
                   replaced_chars=reader.replaced_chars, split_lines=len(split_lines), skipped=False)
    bad = (f"; replaced {reader.replaced_chars} invalid UTF-8 characters with U+FFFD "
           f"(first at {reader.first_replacement})" if reader.replaced_chars else "")
    log(f"create_pretraining_data: wrote {totals['instances']} instances from {totals['documents']} "
        f"documents ({totals['tokens']} tokens, {totals['predictions']} predictions, "
        f"{totals['empty_documents']} empty documents, {len(split_lines)} long lines split) to "
        f"{', '.join(outputs)} in {elapsed:.1f}s ({mb / max(elapsed, 1e-9):.2f} MB of text/s){bad}")
    return summary


def define_flags(fv=flags.FLAGS):
    """Declares the flags on `fv`; their names are the fields of `Options`."""
    d = Options.__dataclass_fields__

    def define(kind, name, help_text, *args):
        default = d[name].default if d[name].default is not dataclasses.MISSING else None
        getattr(flags, f"DEFINE_{kind}")(name, default, *args, help_text, flag_values=fv)

    with train_utils.flag_group("Input and output", fv):
        define("string", "input_file", "Input text file(s): comma list, globs allowed (.xz/.gz/.bz2 ok).")
        define("enum", "input_format", "sentence_per_line (blank line between documents) or doc_per_line.",
               list(INPUT_FORMATS))
        define("string", "output_file", "Output TFRecord file (or comma list of shards).")
        define("integer", "num_output_shards", "Split output into N files <output_file>-0000i-of-0000N.")
        define("string", "vocab_file", "WordPiece vocab the model will use.")
        define("bool", "do_lower_case", "Lower-case and strip accents.")
    with train_utils.flag_group("Instances", fv):
        define("integer", "max_seq_length", "Tokens per instance incl. [CLS]/[SEP].")
        define("float", "short_seq_prob", "Probability of a random shorter target length.")
        define("integer", "dupe_factor", "Copies of each document with fresh masks.")
        define("bool", "dynamic_masking", "Write each instance once, unmasked (token ids + word "
               "starts); run_pretraining.py draws fresh whole-word masks every epoch. Ignores "
               "--dupe_factor.")
        define("integer", "random_seed", "Seed; output depends only on it and input.")
    with train_utils.flag_group("Whole-word masking", fv):
        define("bool", "do_whole_word_mask", "Mask whole jieba words (else single tokens).")
        define("float", "masked_lm_prob", "Share of tokens to predict.")
        define("integer", "max_predictions_per_seq", "Maximum masked tokens per instance.")
        define("enum", "segmenter", "Word segmenter for whole-word masking (rjieba is much faster, "
               "pip install rjieba).", list(SEGMENTERS))
        define("string", "jieba_user_dict", "Optional jieba user dictionary (word [freq] [tag] lines).")
    with train_utils.flag_group("Speed and progress", fv):
        define("integer", "num_workers", "Worker processes (output is identical).")
        define("float", "progress_every_secs", "Seconds between progress lines.")
    with train_utils.flag_group("Apache Beam (more text than one machine)", fv):
        flags.DEFINE_string("runner", None, "Run as a Beam pipeline on this runner (DirectRunner, DataflowRunner, "
                            "FlinkRunner, SparkRunner; pip install .[beam]); --beam_<option>=value is passed "
                            "to Beam as --<option>=value.", flag_values=fv)
    if fv is flags.FLAGS:
        train_utils.require_flags("input_file", "output_file", "vocab_file")


def main(argv):
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments {argv[1:]}")
    o = Options(**{name: flags.FLAGS[name].value for name in Options.__dataclass_fields__})
    if _BEAM_ARGS and not flags.FLAGS.runner:
        raise UsageError(f"{_BEAM_ARGS[0]}: --beam_<option> settings need --runner=<Beam runner>")
    if flags.FLAGS.runner:  # the local path never imports Beam
        import beam_pretraining_data
        beam_pretraining_data.run(o, flags.FLAGS.runner, _BEAM_ARGS)
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
