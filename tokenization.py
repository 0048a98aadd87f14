"""BERT tokenization for Chinese text, compatible with Google's `chinese_L-12_H-768_A-12` vocab.

This file owns every text rule of the toolkit: the character classes (CJK, punctuation, whitespace,
dropped characters) and the one tokenizer. The pipeline is google-research/bert's, so ids match any
Google/brightmart/HF Chinese BERT:

    text --BasicTokenizer--> words   (dropped characters removed, whitespace splits words, each CJK
                                      character is a word, lower-casing + accent stripping when
                                      do_lower_case, punctuation split off)
         --WordpieceTokenizer--> tokens (greedy longest-match-first, "##" continuation, [UNK])

Both steps keep, for every character of a word, the index of the text character it came from, so
`FullTokenizer.tokenize_with_offsets` also gives each token's character span (NER and QA map
predictions back to characters with it; the data generator groups tokens into jieba words with it).
It runs at the data generator's speed: CJK characters and punctuation are looked up one by one
through a `str.translate` table, the runs between them are tokenized once per distinct string and
cached, and tests check that the tokens equal `tokenize` on real and random text.

Example:
    >>> tok = FullTokenizer("resources/vocab.txt")
    >>> tok.tokenize("我爱Python!")
    ['我', '爱', 'python', '!']          # or word pieces, depending on the vocab
    >>> tok.tokenize_with_offsets("我爱Python!")
    (['我', '爱', 'python', '!'], [(0, 1), (1, 2), (2, 8), (8, 9)])
"""

import collections
import hashlib
import itertools
import operator
import unicodedata

import numpy as np

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)


# ---------------------------------------------------------------------------------------------------
# Character classes: the one definition every script uses
# ---------------------------------------------------------------------------------------------------

def is_cjk(ch):
    """CJK Unified Ideographs blocks (not Hiragana/Katakana/Hangul, which are written with spaces).

    Each such character is a word of its own.
    """
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def is_punctuation(ch):
    """ASCII non-alphanumerics (e.g. "$", "^") and Unicode P*, as in Google's tokenizer; each is a word."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def is_dropped(ch):
    """Characters removed before words are formed: NUL, U+FFFD, control, format and private use.

    A dropped character joins its neighbours ("data\u00adbase" is one word). Google's tokenizer keeps
    private-use characters (they become [UNK]); transformers' BertTokenizer drops them, and we follow
    transformers so exported models tokenize identically there. Unassigned code points are kept by
    both (a word holding one becomes [UNK]).
    """
    if ch in "\t\n\r":  # whitespace
        return False
    cp = ord(ch)
    return cp == 0 or cp == 0xFFFD or unicodedata.category(ch) in ("Cc", "Cf", "Co")


def is_whitespace(ch):
    """Separates words (of the characters that are not dropped): Python's `str.isspace`.

    That is Unicode Zs, tab, newline, carriage return and the line/paragraph separators U+2028/9;
    the other ASCII and C1 spaces are control characters and dropped first.
    """
    return ch.isspace()


# ---------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------

def convert_to_unicode(text):
    """Returns `text` as str; bytes are decoded as UTF-8 with invalid bytes replaced by U+FFFD."""
    if isinstance(text, str):
        return text
    if isinstance(text, bytes):
        return text.decode("utf-8", "replace")
    raise TypeError(f"expected str or bytes, got {type(text).__name__}")


def load_vocab(vocab_file):
    """Reads a vocab file (one token per line, id = line number) into an OrderedDict token -> id.

    Raises ValueError naming the file if it is missing, empty, or lacks a special token.
    """
    vocab = collections.OrderedDict()
    try:
        with open(vocab_file, encoding="utf-8") as f:
            for index, line in enumerate(f):
                token = line.rstrip("\n").rstrip("\r")
                # Google's vocab has no duplicates; keep the first id if a file does.
                vocab.setdefault(token.strip() if token.strip() else token, index)
    except FileNotFoundError:
        raise ValueError(f"vocab file not found: {vocab_file}") from None
    except IsADirectoryError:
        raise ValueError(f"vocab file {vocab_file} is a directory; give its vocab.txt") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"vocab file {vocab_file} is not UTF-8: {e}") from None
    if not vocab:
        raise ValueError(f"vocab file is empty: {vocab_file}")
    missing = [t for t in (UNK, CLS, SEP, MASK) if t not in vocab]
    if missing:
        raise ValueError(f"vocab file {vocab_file} lacks special tokens {missing}")
    return vocab


def vocab_sha256(vocab_file):
    """Hex sha256 of the vocab file's bytes (recorded next to data and checkpoints)."""
    with open(vocab_file, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def whitespace_tokenize(text):
    """Splits on whitespace after stripping the ends."""
    text = text.strip()
    return text.split() if text else []


# ---------------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------------

# The fast path translates each "simple" character (see FullTokenizer._is_simple) to a code point at or
# above _SIMPLE_BASE that numbers it (131,072 numbers; CJK and punctuation are about 90,000 characters).
_SIMPLE_BASE = 0xF0000
_RUN_CACHE_LIMIT = 200_000


class FullTokenizer:
    """Basic tokenization followed by WordPiece; the tokenizer every script uses."""

    def __init__(self, vocab_file, do_lower_case=True):
        self.vocab = load_vocab(vocab_file)
        self.inv_vocab = {i: t for t, i in self.vocab.items()}
        self.do_lower_case = do_lower_case
        self.basic_tokenizer = BasicTokenizer(do_lower_case=do_lower_case)
        self.wordpiece_tokenizer = WordpieceTokenizer(vocab=self.vocab)
        self._char_table = _CharTable(self)  # str.translate table of the fast path
        self._simple_ids = []  # token id of each simple character, in the table's numbering
        self._simple_ids_array = np.zeros(0, np.int64)
        self._runs = {}  # run of non-simple characters -> (ids, starts, ends, joins), relative

    def tokenize(self, text):
        return [piece
                for word in self.basic_tokenizer.tokenize(text)
                for piece in self.wordpiece_tokenizer.tokenize(word)]

    def convert_tokens_to_ids(self, tokens):
        unk = self.vocab[UNK]
        return [self.vocab.get(t, unk) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        return [self.inv_vocab[i] for i in ids]

    def tokenize_with_offsets(self, text):
        """`tokenize(text)` plus the characters each token came from.

        Returns:
          tokens: list[str], equal to tokenize(text).
          spans: list[(start, end)], end exclusive: the smallest stretch text[start:end] whose
            characters give the token (without "##"; after lower-casing and accent stripping). A
            [UNK] spans its whole word. Characters dropped inside a word (e.g. a soft hyphen) lie
            inside the span; when normalisation turns one character into several (a Hangul
            syllable into jamo) the pieces made of it share it. Starts never decrease (short of
            NFD reordering two spacing marks inside a word that WordPiece then splits).
        """
        ids, starts, ends, _ = self.encode_with_spans(convert_to_unicode(text))
        return self.convert_ids_to_tokens(ids.tolist()), list(zip(starts.tolist(), ends.tolist()))

    def tokenize_with_word_spans(self, text):
        """`tokenize_with_offsets(text)` plus, for each token, the span of the whole word it is a piece
        of: ("Nexon" -> ne ##xon: both pieces get (0, 5)). Words are what BasicTokenizer splits (each
        CJK character and punctuation mark alone, other runs at whitespace), as transformers' BERT
        pre-tokenizer does, so an answer cut at these spans starts and ends on a word boundary.

        Returns tokens, spans, word_spans: lists of str, (start, end), (start, end); ends exclusive.
        """
        ids, starts, ends, joins = self.encode_with_spans(convert_to_unicode(text))
        first = np.flatnonzero(~joins)  # [W] the first piece of each word
        word = np.cumsum(~joins) - 1  # [T] the word of each token
        word_starts = np.minimum.reduceat(starts, first)[word] if len(ids) else starts
        word_ends = np.maximum.reduceat(ends, first)[word] if len(ids) else ends
        return (self.convert_ids_to_tokens(ids.tolist()), list(zip(starts.tolist(), ends.tolist())),
                list(zip(word_starts.tolist(), word_ends.tolist())))

    def encode_with_spans(self, text):
        """Token ids of `text` and their spans, as arrays for long texts (the data generator's path).

        Returns:
          ids, starts, ends: int64 [T]; ids equal convert_tokens_to_ids(tokenize(text)) and token i
            came from text[starts[i]:ends[i]] (see tokenize_with_offsets).
          joins: bool [T], True when token i is not the first WordPiece of its word.
        """
        # Simple characters (CJK, most punctuation) are one token whatever their neighbours, so the
        # text splits into them and runs of other characters, each run tokenized once and cached.
        codes = np.frombuffer(text.translate(self._char_table).encode("utf-32-le"), np.uint32)  # [C]
        if len(self._simple_ids_array) != len(self._simple_ids):
            self._simple_ids_array = np.array(self._simple_ids, np.int64)
        simple = codes >= _SIMPLE_BASE
        edges = np.flatnonzero(np.diff(np.concatenate(([1], simple, [1])).astype(np.int8)))
        bounds = edges.reshape(-1, 2)  # [R, 2] runs of non-simple characters, (start, end)
        runs, analyze = self._runs, self._analyze_run
        found = [runs.get(text[a:b]) or analyze(text[a:b])  # (zip allocates no list per run)
                 for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist())]
        per_run = np.fromiter((len(f[0]) for f in found), np.int64, len(found))  # [R] tokens per run
        n = int(per_run.sum())
        chain = _chain_field
        run_start = np.repeat(bounds[:, 0], per_run)  # [n]
        s_pos = np.flatnonzero(simple)
        # A run's tokens sort by the run's start (stable), simple characters by their own position.
        order = np.argsort(np.concatenate([s_pos, run_start]), kind="stable")
        ids = np.concatenate([self._simple_ids_array[codes[simple] - _SIMPLE_BASE],
                              np.fromiter(chain(found, 0), np.int64, n)])[order]
        starts = np.concatenate([s_pos, run_start + np.fromiter(chain(found, 1), np.int64, n)])[order]
        ends = np.concatenate([s_pos + 1, run_start + np.fromiter(chain(found, 2), np.int64, n)])[order]
        joins = np.concatenate([np.zeros(len(s_pos), bool), np.fromiter(chain(found, 3), bool, n)])[order]
        return ids, starts, ends, joins

    def _is_simple(self, ch):
        """True for characters that are exactly one token of their own, whatever their neighbours.

        CJK characters are surrounded by spaces, and punctuation is split off as a word. Punctuation
        counts only when lower-casing and accent stripping leave it unchanged and lower-casing does
        not look across it: "^" in "X^Σ" is case-ignorable, so Σ lower-cases to the word-final ς there
        (Python's str.lower, as in Google's tokenizer), which only a run holding all three gets right.
        """
        if is_cjk(ch):
            return True
        if not is_punctuation(ch):
            return False
        return not self.do_lower_case or (unicodedata.normalize("NFD", ch.lower()) == ch
                                          and ("A" + ch + "Σ").lower()[-1] == "σ")

    def _analyze_run(self, run):
        """Tokenizes one run of non-simple characters word by word; cached."""
        tokens, starts, ends, joins = [], [], [], []
        for word, offsets in self.basic_tokenizer.words_with_offsets(run):
            for k, (token, start, end) in enumerate(self.wordpiece_tokenizer.pieces(word)):
                covered = offsets[start:end]
                tokens.append(token)
                starts.append(min(covered))
                ends.append(max(covered) + 1)
                joins.append(k > 0)
        entry = (self.convert_tokens_to_ids(tokens), starts, ends, joins)
        if len(self._runs) >= _RUN_CACHE_LIMIT:
            self._runs.clear()
        self._runs[run] = entry
        return entry


def _chain_field(entries, k):
    """Field k of every entry, concatenated (at C speed: the generator's hot path)."""
    return itertools.chain.from_iterable(map(operator.itemgetter(k), entries))


class _CharTable(dict):
    """str.translate table: simple char -> chr(_SIMPLE_BASE + its number); any other char -> NUL."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def __missing__(self, cp):
        tok, ch = self.tokenizer, chr(cp)
        if tok._is_simple(ch):
            tokens = tok.tokenize(ch)
            if len(tokens) != 1:
                raise AssertionError(f"character {ch!r} gave {len(tokens)} tokens")
            value = chr(_SIMPLE_BASE + len(tok._simple_ids))
            tok._simple_ids.append(tok.convert_tokens_to_ids(tokens)[0])
        else:  # only the runs' bounds matter here (their text is read from the original)
            value = "\0"
        self[cp] = value
        return value


class BasicTokenizer:
    """Drops and splits on characters, splits CJK characters and punctuation, optionally lower-cases
    and strips accents."""

    def __init__(self, do_lower_case=True):
        self.do_lower_case = do_lower_case

    def tokenize(self, text):
        return [word for word, _ in self.words_with_offsets(text)]

    def words_with_offsets(self, text):
        """[(word, offsets)]: the words WordPiece gets and, for each character of a word, the index of
        the character of `text` it came from (normalisation can turn one character into several)."""
        text = convert_to_unicode(text)
        kinds, kind_of = _CHAR_KINDS, _char_kind
        words, current = [], []  # current: indexes of the whitespace-delimited word being read
        for i, ch in enumerate(text):
            kind = kinds.get(ch) or kind_of(ch)
            if kind <= _PUNCTUATION:  # part of a whitespace-delimited word
                current.append(i)
                continue
            if kind == _DROPPED:
                continue
            if current:
                self._split_word(text, current, words)
                current = []
            if kind == _PLAIN_CJK or (kind == _CJK and not self.do_lower_case):
                words.append((ch, [i]))
            elif kind == _CJK:  # a compatibility ideograph: lower-casing maps it to another
                self._split_word(text, [i], words)
        if current:
            self._split_word(text, current, words)
        return words

    def _split_word(self, text, offsets, words):
        """Normalizes one whitespace-delimited word, splits off its punctuation, appends to `words`."""
        if offsets[-1] - offsets[0] + 1 == len(offsets):
            word = text[offsets[0]:offsets[-1] + 1]
        else:  # dropped characters inside
            word = "".join(map(text.__getitem__, offsets))
        if self.do_lower_case:
            word, offsets = _lower_and_strip_accents(word, offsets)
        kinds, kind_of = _CHAR_KINDS, _char_kind
        start = 0
        for k, ch in enumerate(word):
            if (kinds.get(ch) or kind_of(ch)) == _PUNCTUATION:
                if k > start:
                    words.append((word[start:k], offsets[start:k]))
                words.append((ch, offsets[k:k + 1]))
                start = k + 1
        if start == 0:
            words.append((word, offsets))
        elif len(word) > start:
            words.append((word[start:], offsets[start:]))


# What the basic tokenizer does with a character, cached per character (one dict lookup per character
# on the tokenizer's path instead of several Unicode database calls).
_OTHER, _PUNCTUATION, _DROPPED, _SPACE, _CJK, _PLAIN_CJK = 1, 2, 3, 4, 5, 6
_CHAR_KINDS = {}


def _char_kind(ch):
    if is_dropped(ch):
        kind = _DROPPED
    elif is_whitespace(ch):
        kind = _SPACE
    elif is_cjk(ch):  # plain: lower-casing and NFD leave it alone (all but compatibility ideographs)
        kind = _PLAIN_CJK if unicodedata.normalize("NFD", ch.lower()) == ch else _CJK
    elif is_punctuation(ch):
        kind = _PUNCTUATION
    else:
        kind = _OTHER
    _CHAR_KINDS[ch] = kind
    return kind


def _lower_and_strip_accents(word, offsets):
    """(word.lower() in NFD without Mn marks, the offset of each of its characters).

    The word is lower-cased as a whole (a word-final Σ becomes ς); each character's lower-case form
    has the length of its own ch.lower(), which gives the offsets.
    """
    lowered = word.lower()
    if word.isascii():
        return lowered, offsets
    if len(lowered) != len(word):  # e.g. "İ" -> "i̇"
        offsets = [i for ch, i in zip(word, offsets) for _ in ch.lower()]
    if unicodedata.is_normalized("NFD", lowered):
        pairs = list(zip(lowered, offsets))
    else:
        pairs = [(d, i) for ch, i in zip(lowered, offsets) for d in unicodedata.normalize("NFD", ch)]
        if "".join(d for d, _ in pairs) != unicodedata.normalize("NFD", lowered):
            pairs = _canonical_order(pairs)
    kept = [(d, i) for d, i in pairs if unicodedata.category(d) != "Mn"]
    return "".join(d for d, _ in kept), [i for _, i in kept]


def _canonical_order(pairs):
    """NFD's last step across character boundaries: stable sort of each run of combining marks by
    class (only matters for the few spacing marks that have a class; Mn marks are dropped)."""
    out, k = [], 0
    while k < len(pairs):
        end = k
        while end < len(pairs) and unicodedata.combining(pairs[end][0]):
            end += 1
        if end == k:
            out.append(pairs[k])
            k += 1
        else:
            out += sorted(pairs[k:end], key=lambda p: unicodedata.combining(p[0]))
            k = end
    return out


class WordpieceTokenizer:
    """Greedy longest-match-first WordPiece over one whitespace-free word at a time."""

    def __init__(self, vocab, unk_token=UNK, max_input_chars_per_word=100):
        self.vocab = vocab
        self.unk_token = unk_token
        self.max_input_chars_per_word = max_input_chars_per_word

    def tokenize(self, text):
        """"unaffable" -> ["un", "##aff", "##able"]; a word with any unmatched rest -> [UNK]."""
        return [piece for word in whitespace_tokenize(convert_to_unicode(text))
                for piece, _, _ in self.pieces(word)]

    def pieces(self, word):
        """[(token, start, end)]: the WordPieces of `word` and the characters word[start:end] of each."""
        if len(word) > self.max_input_chars_per_word:
            return [(self.unk_token, 0, len(word))]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            if end == start:  # nothing matched: the whole word is unknown
                return [(self.unk_token, 0, len(word))]
            pieces.append((piece, start, end))
            start = end
        return pieces
