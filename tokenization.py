"""BERT tokenization for Chinese text, compatible with Google's `chinese_L-12_H-768_A-12` vocab.

The pipeline is the one google-research/bert uses, so ids match any Google/brightmart/HF Chinese BERT:

    text --clean--> (control chars dropped, whitespace -> " ")
         --BasicTokenizer--> words   (each CJK character is a word; punctuation split off;
                                      lower-casing + accent stripping when do_lower_case)
         --WordpieceTokenizer--> tokens (greedy longest-match-first, "##" continuation, [UNK])

Example:
    >>> tok = FullTokenizer("resources/vocab.txt")
    >>> tok.tokenize("我爱Python!")
    ['我', '爱', 'python', '!']          # or word pieces, depending on the vocab
"""

import collections
import hashlib
import unicodedata

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)


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


class FullTokenizer:
    """Basic tokenization followed by WordPiece; the tokenizer every script uses."""

    def __init__(self, vocab_file, do_lower_case=True):
        self.vocab = load_vocab(vocab_file)
        self.inv_vocab = {i: t for t, i in self.vocab.items()}
        self.basic_tokenizer = BasicTokenizer(do_lower_case=do_lower_case)
        self.wordpiece_tokenizer = WordpieceTokenizer(vocab=self.vocab)

    def tokenize(self, text):
        return [piece
                for word in self.basic_tokenizer.tokenize(text)
                for piece in self.wordpiece_tokenizer.tokenize(word)]

    def convert_tokens_to_ids(self, tokens):
        unk = self.vocab[UNK]
        return [self.vocab.get(t, unk) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        return [self.inv_vocab[i] for i in ids]


class BasicTokenizer:
    """Cleans text, splits CJK characters and punctuation, optionally lower-cases and strips accents."""

    def __init__(self, do_lower_case=True):
        self.do_lower_case = do_lower_case

    def tokenize(self, text):
        text = _clean_text(convert_to_unicode(text))
        text = _space_out_cjk(text)
        words = []
        for word in whitespace_tokenize(text):
            if self.do_lower_case:
                word = _strip_accents(word.lower())
            words.extend(_split_on_punctuation(word))
        return whitespace_tokenize(" ".join(words))


class WordpieceTokenizer:
    """Greedy longest-match-first WordPiece over one whitespace-free word at a time."""

    def __init__(self, vocab, unk_token=UNK, max_input_chars_per_word=100):
        self.vocab = vocab
        self.unk_token = unk_token
        self.max_input_chars_per_word = max_input_chars_per_word

    def tokenize(self, text):
        """"unaffable" -> ["un", "##aff", "##able"]; a word with any unmatched rest -> [UNK]."""
        pieces = []
        for word in whitespace_tokenize(convert_to_unicode(text)):
            if len(word) > self.max_input_chars_per_word:
                pieces.append(self.unk_token)
                continue
            word_pieces, start = [], 0
            while start < len(word):
                end = len(word)
                while end > start:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in self.vocab:
                        break
                    end -= 1
                if end == start:  # nothing matched: the whole word is unknown
                    word_pieces = [self.unk_token]
                    break
                word_pieces.append(piece)
                start = end
            pieces.extend(word_pieces)
        return pieces


def _clean_text(text):
    """Drops NUL, U+FFFD and control characters; maps every whitespace character to a space."""
    out = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or _is_control(ch):
            continue
        out.append(" " if _is_whitespace(ch) else ch)
    return "".join(out)


def _space_out_cjk(text):
    """Surrounds every CJK ideograph with spaces so each becomes its own word."""
    return "".join(f" {ch} " if _is_cjk(ord(ch)) else ch for ch in text)


def _strip_accents(text):
    return "".join(ch for ch in unicodedata.normalize("NFD", text)
                   if unicodedata.category(ch) != "Mn")


def _split_on_punctuation(word):
    """"a,b!" -> ["a", ",", "b", "!"]."""
    parts, current = [], []
    for ch in word:
        if _is_punctuation(ch):
            if current:
                parts.append("".join(current))
                current = []
            parts.append(ch)
        else:
            current.append(ch)
    if current:
        parts.append("".join(current))
    return parts


def _is_cjk(cp):
    """CJK Unified Ideographs blocks (not Hiragana/Katakana/Hangul, which are written with spaces)."""
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _is_whitespace(ch):
    if ch in " \t\n\r":
        return True
    return unicodedata.category(ch) == "Zs"


def _is_control(ch):
    """Control, format and private-use characters are dropped.

    Google's tokenizer keeps private-use characters (they become [UNK]); transformers' BertTokenizer
    drops them. We follow transformers so exported models tokenize identically there.
    """
    if ch in "\t\n\r":  # counted as whitespace
        return False
    return unicodedata.category(ch) in ("Cc", "Cf", "Co")


def _is_punctuation(ch):
    """ASCII non-alphanumerics count as punctuation (e.g. "$", "^"), as in Google's tokenizer."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")
