"""Documents -> pretraining instances -> serialized records: the generator's work, whoever drives it.

create_pretraining_data.py (local processes) and beam_pretraining_data.py (a Beam pipeline) both
call these functions, so they write the same bytes. The stages, in the order of this file
(DESIGN.md section 3):
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
  encode   Google's record schema (or the unmasked kind), framed by `pretraining_records`; the
           sidecar settings (`output_settings`, `sidecars`) and the checks a finished run makes
           (`check_produced`) are here too, so both drivers finish alike.

Determinism: each (document, dupe copy) has two RNGs seeded from (random_seed, document index, copy),
one for packing and one for masking (`random_streams`); each chunk's instances are shuffled with an
RNG seeded from (random_seed, chunk index) (`shuffle_and_shard`): the bytes depend only on (input,
flags), not on the number of workers or the runner.
"""

import os
import random

import numpy as np

import corpus
import file_output
import pretraining_records as records
import tokenization
from train_utils import UsageError

SEGMENTERS = ("jieba", "rjieba")


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

class WholeWordTokenizer:
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
                raise UsageError(f"--jieba_user_dict: {path}:{line_no}: frequency is not an integer") from None
            yield parts[0], freq, parts[2] if len(parts) > 2 else None

# ----------------------------------------------------------------------------------------------------
# Documents -> instances -> records (worker side)
# ----------------------------------------------------------------------------------------------------

class InstanceMaker:
    """Everything a worker needs: tokenizer, segmenter, masking settings, encoder."""

    def __init__(self, o):
        self.o = o
        self.tok = WholeWordTokenizer(o.vocab_file, o.do_lower_case)
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

        begin, g_begin, goal = None, None, target()
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


def new_stats():
    return {"documents": 0, "empty_documents": 0, "sentences": 0, "tokens": 0, "instances": 0,
            "predictions": 0, "split_lines": []}


def random_streams(random_seed, document, copy):
    """(packing RNG, masking RNG) of one document copy: seeded from (seed, global document index,
    copy) only, so they do not depend on chunking, worker count or runner. Separate streams: the
    packing of copy 0 is the same whether its masks are drawn (static) or not (unmasked), and
    whatever the masking settings. Distinct seeds for documents < 2**46 and copies < 2**16."""
    key = (random_seed << 64) | (document << 16) | copy
    return random.Random(key), random.Random(key | _MASK_STREAM)


_MASK_STREAM = 1 << 62  # shuffle_and_shard's seeds set bit 63


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
            pack_rng, mask_rng = random_streams(o.random_seed, first_doc + d, dupe)
            for instance in maker.instances(bounds, pack_rng):
                if o.dynamic_masking:  # training draws the masks (pretraining_records)
                    a, b, g0, g1 = instance
                    out.append(maker.unmasked_encoder.encode(ids[a:b], [x - a for x in starts[g0:g1]]))
                    continue
                input_ids, positions, labels = maker.mask(ids, starts, instance, mask_rng)
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


# ----------------------------------------------------------------------------------------------------
# Settings, sidecars and the end of a run (local and Beam alike)
# ----------------------------------------------------------------------------------------------------

def output_settings(o, vocab, vocab_sha256, input_files):
    """The sidecar keys saying how the outputs were made (local and Beam runs alike).

    input_files: [(path, size in bytes)].
    """
    settings = {k: getattr(o, k) for k in records.READ_KEYS + records.SETTINGS_KEYS if hasattr(o, k)}
    settings.update(kind=records.UNMASKED if o.dynamic_masking else records.STATIC,
                    dupe_factor=1 if o.dynamic_masking else o.dupe_factor,
                    settings_version=records.SETTINGS_VERSION,
                    format_version=records.FORMAT_VERSION, vocab_size=len(vocab), vocab_sha256=vocab_sha256,
                    input_files=[{"path": p, "bytes": n} for p, n in input_files])
    return settings


def sidecars(o, vocab, settings, counts, totals, replaced_chars, split_lines):
    """One sidecar per output shard holding counts[i] records; totals as from `new_stats`."""
    kind_keys = records.unmasked_sidecar_keys(vocab) if o.dynamic_masking else {}
    # Where the vocab was: run_pretraining.py copies it into its output folder when the hash matches.
    # Not a setting (a moved vocab does not make finished outputs stale).
    vocab_file = o.vocab_file if file_output.is_remote(o.vocab_file) else os.path.abspath(o.vocab_file)
    return [dict(settings, **kind_keys, vocab_file=vocab_file, num_instances=n, num_output_shards=len(counts),
                 total_instances=totals["instances"], num_documents=totals["documents"],
                 replaced_invalid_utf8_chars=replaced_chars, split_long_lines=split_lines) for n in counts]


def outputs_complete(outputs, settings, log):
    """True when every output's sidecar says it was made with `settings` (the run is then skipped,
    and says so). Outputs made with the same flags by an older settings version are not complete:
    one line says they are regenerated and why."""
    if all(records.sidecar_matches(p, settings, num_output_shards=len(outputs)) for p in outputs):
        log(f"create_pretraining_data: {', '.join(outputs)} already complete (same settings); skipped")
        return True
    flags_only = {k: v for k, v in settings.items() if k != "settings_version"}
    older = [p for p in outputs if records.sidecar_matches(p, flags_only, num_output_shards=len(outputs))]
    if older:
        version = records.settings_version(records.read_sidecar(older[0]))
        log(f"create_pretraining_data: {older[0]} has settings version {version}, this generator "
            f"writes {records.SETTINGS_VERSION} (other bytes for the same flags); regenerating")
    return False


def side_inputs(o):
    """Files read besides the corpus, which an output must not replace either."""
    return [p for p in (o.vocab_file, o.jieba_user_dict) if p]


def check_produced(paths, docs_per_file, total_instances):
    """The checks of a finished run, before anything is committed: every input file held text, and
    some instance came out. UsageError naming the file."""
    for path, n_docs in zip(paths, docs_per_file):
        if n_docs == 0:
            raise UsageError(f"--input_file: {path} contains no text (only blank lines)")
    if total_instances == 0:
        raise UsageError("--input_file: no instance produced (every document was empty)")


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
