"""Builds the small embedded demo vocabulary `resources/vocab.txt`.

The layout follows Google's Chinese BERT vocab so that code written for one works with the other:

    id 0        [PAD]
    ids 1..99   [unused1] .. [unused99]
    id 100      [UNK]
    id 101      [CLS]
    id 102      [SEP]
    id 103      [MASK]
    then        punctuation (ASCII and full-width CJK), digits and numbers, ASCII letters, a few common
                English words, `##` pieces for ASCII (so English and numbers WordPiece-split instead of
                becoming [UNK]), CJK characters ranked by their frequency in jieba's bundled dictionary,
                and `##` forms of the most frequent CJK characters (Google's vocab has these too; our
                data generator must never emit them as labels, and tests check that).

Everything is derived from jieba's `dict.txt` plus fixed lists in this file, so the output is
deterministic: running the script twice, or on another machine with the same jieba version, gives the
same bytes.

Usage:
    python build_vocab.py --output=resources/vocab.txt [--num_cjk=8000] [--num_hash_cjk=600]
"""

import collections
import os

from absl import flags

import file_output
import tokenization
import train_utils

NUM_UNUSED = 99
SPECIAL_TOKENS = [tokenization.UNK, tokenization.CLS, tokenization.SEP, tokenization.MASK]

# Every ASCII character the tokenizer splits off as punctuation, in code point order.
ASCII_PUNCTUATION = [chr(c) for c in range(128) if tokenization.is_punctuation(chr(c))]
# Full-width and CJK punctuation / symbols that occur in ordinary Chinese text.
CJK_PUNCTUATION = list(
    "。，、；：？！“”‘’（）《》〈〉【】『』「」〔〕…—～·￥％＋－／＝＠＃＆＊．＜＞"
    "｜＿＾｀｛｝［］＼＂＇﹏・°×÷±≤≥≠∞√℃‰§№☆★○●◎◇◆□■△▲→←↑↓"
)
COMMON_ENGLISH_WORDS = (
    "the of and to in is for on that with as by at from it an be this are was or we you not "
    "have has but can all new more one about which will their they his her who also been were "
    "its our out up so no if when what there than other into after first two time use only may "
    "world china chinese university city company data model system bert google music game "
    "online video news app web www com cn http https html email ai cpu gpu usb ok ipad iphone "
    "android windows apple microsoft python java linux"
).split()
HASH_ASCII_SUFFIXES = (
    "s es ed ing er ers ly tion tions al ic ment ness able ity ous ive ize ist est ful less "
    "en on an in or ar le re te de ne se ce ge ve ty ry ia io"
).split()


def jieba_dict_path():
    import jieba  # Imported here so `--help` works without jieba.
    return os.path.join(os.path.dirname(jieba.__file__), "dict.txt")


def rank_cjk_chars(dict_path):
    """Returns CJK characters sorted by summed word frequency (desc), ties by code point."""
    counts = collections.Counter()
    with open(dict_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if len(parts) < 2:
                continue
            try:
                freq = int(parts[1])
            except ValueError:
                raise ValueError("%s:%d: frequency is not an integer: %r" % (dict_path, line_no, line)) from None
            for ch in parts[0]:
                if tokenization.is_cjk(ch):
                    counts[ch] += freq
    return sorted(counts, key=lambda ch: (-counts[ch], ord(ch)))


def build_vocab(num_cjk=8000, num_hash_cjk=600, dict_path=None):
    """Returns the vocabulary as a list of tokens (index = id)."""
    tokens = [tokenization.PAD] + ["[unused%d]" % i for i in range(1, NUM_UNUSED + 1)] + SPECIAL_TOKENS
    tokens += ASCII_PUNCTUATION + CJK_PUNCTUATION
    tokens += [str(d) for d in range(10)]
    tokens += ["%02d" % n for n in range(100)]
    tokens += [str(y) for y in range(1950, 2030)]
    tokens += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    tokens += COMMON_ENGLISH_WORDS
    tokens += ["##%d" % d for d in range(10)] + ["##%02d" % n for n in range(100)]
    tokens += ["##" + chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens += ["##" + s for s in HASH_ASCII_SUFFIXES]
    cjk = rank_cjk_chars(dict_path or jieba_dict_path())
    tokens += cjk[:num_cjk]
    tokens += ["##" + ch for ch in cjk[:num_hash_cjk]]

    seen = set()
    unique = []
    for tok in tokens:  # Fixed lists may overlap (e.g. "00" and a year); keep the first.
        if tok not in seen:
            seen.add(tok)
            unique.append(tok)
    assert unique.index("[UNK]") == 100 and unique.index("[MASK]") == 103
    return unique


def define_flags(fv=flags.FLAGS):
    with train_utils.flag_group("Vocabulary", fv):
        flags.DEFINE_string("output", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   "resources", "vocab.txt"),
                            "Vocab file to write (one token per line).", flag_values=fv)
        flags.DEFINE_integer("num_cjk", 8000, "Most frequent CJK characters kept.", flag_values=fv)
        flags.DEFINE_integer("num_hash_cjk", 600, "How many of them also get a `##` form.",
                             flag_values=fv)
        flags.DEFINE_string("jieba_dict", None, "Word frequency list (default: jieba's bundled "
                            "dict.txt).", flag_values=fv)


def main(argv):
    fv = flags.FLAGS
    if fv.num_cjk < 1 or fv.num_hash_cjk < 0:
        raise train_utils.UsageError(f"--num_cjk={fv.num_cjk} must be >= 1 and "
                                     f"--num_hash_cjk={fv.num_hash_cjk} >= 0")
    if fv.jieba_dict and not os.path.isfile(fv.jieba_dict):
        raise train_utils.UsageError(f"--jieba_dict: file not found: {fv.jieba_dict}")
    try:
        tokens = build_vocab(fv.num_cjk, fv.num_hash_cjk, fv.jieba_dict)
    except (ValueError, UnicodeDecodeError) as e:
        raise train_utils.UsageError(f"--jieba_dict: {e}") from None
    output = os.path.abspath(fv.output)
    if os.path.isdir(output):
        raise train_utils.UsageError(f"--output: {fv.output} is a directory; give a file name")
    os.makedirs(os.path.dirname(output), exist_ok=True)
    file_output.atomic_write(output, "".join(tok + "\n" for tok in tokens))  # never half a vocab
    print("wrote %d tokens to %s" % (len(tokens), fv.output))


EXAMPLE = "python build_vocab.py --output=/tmp/vocab.txt --num_cjk=8000 --num_hash_cjk=600"

if __name__ == "__main__":
    train_utils.run_script(main, __doc__, EXAMPLE, define_flags)
