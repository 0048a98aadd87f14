"""tokenization.py: Google-compatible BERT tokenizer; equality with transformers' BertTokenizer; the
character spans of tokenize_with_offsets (fine-tuning offsets and the data generator's fast path)."""

import json
import lzma
import random
import unicodedata

import pytest
from conftest import RESOURCES

import pretraining_instances
import tokenization

VARIED_TEXTS = [
    "中国的首都是北京。",
    "Hello, World! ＡＢＣ１２３ ｈｅｌｌｏ",
    "😀表情符号🎉测试👍🏽",
    "école Café naïve RÉSUMÉ",
    "a\x00b\x07c\u200bd\ufeffe",
    "\ue000私用区\U000F0000字",
    "ａｂｃ，。！？【】《》“”‘’：；（）",
    "x" * 150,
    "y" * 100 + " " + "z" * 101,
    "supercalifragilisticexpialidocious unaffable 2023年12月31日 3.14159 $100^2",
    "日本語のテキスト、カタカナ、한국어",
    "\u3000全角空格\u00a0nbsp\u2028line-sep",
    "Ⅷ ① ㊣ ℃ ﬁ ½",
    "𠀀𪜀 rare 〇",
    "\t\n\r",
    "",
    "iPhone15ProMax售价8999元，比上一代贵了10%。",
    "他说：“我今天去了ＫＦＣ……”然后就走了——真的！",
    "C++/Python/Go都是编程语言; e-mail: test@example.com",
    "iphone\u200b12 data\u00adbase a\u0378b",  # issue 9: a format char or unassigned code point inside a word
]


def _shared_corpus_lines(shared_data, n=300, seed=0):
    """A reproducible sample of real Wikipedia lines from the shared corpus."""
    shard = shared_data / "corpus" / "zhwiki" / "zhwiki_00.txt.xz"
    if not shard.is_file():
        return []
    with lzma.open(shard, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for _, line in zip(range(20000), f) if line.strip()]
    return random.Random(seed).sample(lines, min(n, len(lines)))


def test_tokenize_matches_transformers_bert_tokenizer(google_vocab, shared_data):
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertTokenizer(str(google_vocab))
    ours = tokenization.FullTokenizer(str(google_vocab), do_lower_case=True)
    texts = VARIED_TEXTS + _shared_corpus_lines(shared_data)
    assert len(texts) > 100
    for text in texts:
        tokens = ours.tokenize(text)
        assert tokens == hf.tokenize(text), repr(text)
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ours.convert_tokens_to_ids(tokens) == ids, repr(text)


def test_cased_tokenizer_keeps_case_and_accents(google_vocab):
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertTokenizer(str(google_vocab), do_lower_case=False)
    ours = tokenization.FullTokenizer(str(google_vocab), do_lower_case=False)
    for text in VARIED_TEXTS:
        assert ours.tokenize(text) == hf.tokenize(text), repr(text)


def _write_vocab(tmp_path, tokens):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + tokens) + "\n",
                    encoding="utf-8")
    return path


def test_wordpiece_is_greedy_longest_match_first(tmp_path):
    vocab = _write_vocab(tmp_path, ["un", "##aff", "##able", "runn", "##ing", "中", "国", ","])
    tok = tokenization.FullTokenizer(str(vocab))
    assert tok.tokenize("UNaffable running,中国") == ["un", "##aff", "##able", "runn", "##ing", ",",
                                                      "中", "国"]
    assert tok.tokenize("unknownword") == ["[UNK]"]


def test_words_longer_than_limit_become_unk(tmp_path):
    vocab = _write_vocab(tmp_path, ["a", "##a"])
    tok = tokenization.FullTokenizer(str(vocab))
    assert tok.tokenize("a" * 100) == ["a"] + ["##a"] * 99
    assert tok.tokenize("a" * 101) == ["[UNK]"]


def test_cjk_characters_are_split_one_per_token(tmp_path):
    vocab = _write_vocab(tmp_path, list("我爱北京"))
    tok = tokenization.FullTokenizer(str(vocab))
    assert tok.tokenize("我爱北京abc") == ["我", "爱", "北", "京", "[UNK]"]


def test_ids_round_trip(tmp_path):
    vocab = _write_vocab(tmp_path, list("我爱北京"))
    tok = tokenization.FullTokenizer(str(vocab))
    ids = tok.convert_tokens_to_ids(["[CLS]", "我", "?", "[SEP]"])
    assert ids == [2, 5, 1, 3]
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "我", "[UNK]", "[SEP]"]


def test_missing_vocab_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="vocab file not found: .*nope.txt"):
        tokenization.FullTokenizer(str(tmp_path / "nope.txt"))


def test_empty_vocab_names_the_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="vocab file is empty: .*empty.txt"):
        tokenization.FullTokenizer(str(empty))


def test_vocab_without_special_tokens_is_rejected(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"lacks special tokens"):
        tokenization.load_vocab(str(bad))


def test_invalid_utf8_bytes_are_replaced_not_fatal(tmp_path):
    vocab = _write_vocab(tmp_path, list("好的"))
    tok = tokenization.FullTokenizer(str(vocab))
    assert tok.tokenize(b"\xe5\xa5\xbd \xff \xe7\x9a\x84") == ["好", "的"]


# ---------------------------------------------------------------------------------------------------
# Character spans: tokenize_with_offsets (fine-tuning) and encode_with_spans (the data generator)
# ---------------------------------------------------------------------------------------------------

ISSUE_9_CASES = {  # text -> tokens with lower-casing, on Google's vocab
    "iphone\u200b12": ["iphone", "##12"],  # zero-width space is dropped, not a word break
    "data\u00adbase": ["database"],  # soft hyphen likewise
    "a\u0378b": ["[UNK]"],  # an unassigned code point is kept, and the word is unknown
    "X^Σ": ["x", "^", "ς"],  # lower-casing sees the whole word: Σ after "X^" is word-final
}


def test_issue_9_cases_agree_in_tokenizer_offsets_and_generator(google_vocab):
    tok = tokenization.FullTokenizer(str(google_vocab))
    generator = pretraining_instances.WholeWordTokenizer(str(google_vocab), True)
    for text, expected in ISSUE_9_CASES.items():
        assert tok.tokenize(text) == expected, repr(text)
        assert tok.tokenize_with_offsets(text)[0] == expected, repr(text)
        (ids, _), = generator.tokenize_sentences([text], b"\x01" * len(text))
        assert ids == tok.convert_tokens_to_ids(expected), repr(text)
    assert tok.tokenize_with_offsets("iphone\u200b12")[1] == [(0, 6), (7, 9)]
    assert tok.tokenize_with_offsets("data\u00adbase")[1] == [(0, 9)]


def test_spans_of_wordpieces_hangul_and_dotted_capital_i(google_vocab):
    tok = tokenization.FullTokenizer(str(google_vocab))
    assert tok.tokenize_with_offsets("我爱Python!") == (["我", "爱", "python", "!"],
                                                         [(0, 1), (1, 2), (2, 8), (8, 9)])
    # "İ" lower-cases to two characters; the accent is stripped and both stay with "İ".
    tokens, spans = tok.tokenize_with_offsets("İstanbul")
    assert tokens[0] == "is" and spans[0] == (0, 2)
    # A Hangul syllable decomposes into jamo; the pieces made of one syllable share it.
    tokens, spans = tok.tokenize_with_offsets("한국")
    assert len(tokens) > 2 and spans[0] == spans[1] == (0, 1) and spans[-1] == (1, 2)


def _normalize(text, lower):
    """What the tokenizer makes of a stretch of text, without splitting it: dropped characters
    removed; with lower-casing, lower-cased and accents (Mn marks after NFD) stripped."""
    text = "".join(ch for ch in text if not tokenization.is_dropped(ch))
    if lower:
        text = "".join(ch for ch in unicodedata.normalize("NFD", text.lower())
                       if unicodedata.category(ch) != "Mn")
    return text.replace("ς", "σ")  # lower-casing of Σ depends on the whole word, not on the span


def assert_spans_slice_back(tok, text, tokens, spans):
    """The meaning of a span (a, b) of token t, checked here:

    * 0 <= a < b <= len(text); starts never decrease.
    * [UNK]: text[a:b] is exactly one word of the basic tokenizer (the whole word is unknown).
    * otherwise, with p = t without "##": p occurs in _normalize(text[a:b]) and the span is the
      smallest such stretch (dropping its first or last character loses p). In the common case
      _normalize(text[a:b]) == p; it is longer only when normalisation turned one character into
      several (Hangul jamo) and a WordPiece boundary falls inside it.
    """
    lower = tok.do_lower_case
    assert len(tokens) == len(spans)
    previous = 0
    for token, (a, b) in zip(tokens, spans):
        where = f"{token!r} at {a}:{b} of {text!r}"
        assert 0 <= a < b <= len(text), where
        assert a >= previous, where
        previous = a
        if token == tokenization.UNK:
            assert len(tok.basic_tokenizer.tokenize(text[a:b])) == 1, where
            continue
        piece = _normalize(token[2:] if token.startswith("##") else token, False)
        assert piece in _normalize(text[a:b], lower), where
        if b - a > 1:
            assert piece not in _normalize(text[a + 1:b], lower), where
            assert piece not in _normalize(text[a:b - 1], lower), where


def _random_texts(seed, n):
    """Seeded random strings: all planes, controls, format, private-use, unassigned and surrogate
    code points, combining marks, case-mapping oddities, mixed scripts and over-long words."""
    rng = random.Random(seed)
    pools = [
        lambda: chr(rng.randrange(0x20, 0x7F)),
        lambda: chr(rng.randrange(0x4E00, 0xA000)),
        lambda: chr(rng.randrange(0x80, 0x800)),  # Latin, Greek, Cyrillic, Hebrew, Arabic, ...
        lambda: chr(rng.randrange(0x300, 0x370)),  # combining marks
        lambda: rng.choice(" \t\n\r\u3000\u00a0\u2028\u200b\u00ad\ufeff\x00\x07\x0b\x1c\x85\ufffd"),
        lambda: rng.choice("ΣΣΑαİßǅﬁẞ^.:'`·≠\u1fef\u0345\u302e\U0001d165"),
        lambda: chr(rng.choice([0xE000, 0xF8FF, 0xF0000, 0x10FFFD, 0x378, 0xFFFF, 0x2FFFF, 0xE0001,
                                0xD800, 0xDFFF])),
        lambda: chr(rng.randrange(0xAC00, 0xD7A4)),  # Hangul syllables
        lambda: chr(rng.randrange(0x3040, 0x3100)),  # kana
        lambda: chr(rng.randrange(0, 0x110000)),  # anything
        lambda: rng.choice("abcxyz") * rng.randrange(95, 105),  # around the 100-character limit
    ]
    weights = [8, 8, 4, 2, 3, 2, 1, 1, 1, 3, 0.2]
    return ["".join(rng.choices(pools, weights)[0]() for _ in range(rng.randrange(1, 40)))
            for _ in range(n)]


def _fuzz_texts(shared_data, n_random, n_lines, seed):
    texts = _random_texts(seed, n_random)
    if shared_data is None:
        return texts
    texts += _shared_corpus_lines(shared_data, n=n_lines, seed=seed)
    cluener = shared_data / "cluener2020" / "train.json"
    if cluener.is_file():
        with open(cluener, encoding="utf-8") as f:
            rows = [json.loads(line)["text"] for _, line in zip(range(5 * n_lines), f)]
        texts += random.Random(seed).sample(rows, min(n_lines, len(rows)))
    cmrc = shared_data / "cmrc2018" / "trial.json"
    if cmrc.is_file():
        with open(cmrc, encoding="utf-8") as f:
            data = json.load(f)["data"]
        paragraphs = [p for article in data for p in article["paragraphs"]]
        picked = random.Random(seed).sample(paragraphs, min(n_lines // 10, len(paragraphs)))
        texts += [p["context"] for p in picked] + [q["question"] for p in picked for q in p["qas"]]
    return texts


def _vocabs(shared_data):
    vocabs = [RESOURCES / "vocab.txt"]
    if shared_data is not None and (shared_data / "vocab" / "vocab.txt").is_file():
        vocabs.append(shared_data / "vocab" / "vocab.txt")
    return vocabs


def _check_fuzz(shared_data, lower, n_random, n_lines, seed):
    texts = _fuzz_texts(shared_data, n_random, n_lines, seed)
    for vocab in _vocabs(shared_data):
        tok = tokenization.FullTokenizer(str(vocab), do_lower_case=lower)
        generator = pretraining_instances.WholeWordTokenizer(str(vocab), lower)
        for text in texts:
            expected = tok.tokenize(text)
            tokens, spans = tok.tokenize_with_offsets(text)
            assert tokens == expected, repr(text)
            assert_spans_slice_back(tok, text, tokens, spans)
        # The generator tokenizes many sentences in one call; ids must not depend on the neighbours.
        sentences = [t.replace("\n", " ") for t in texts]
        joined = "\n".join(sentences)
        out = generator.tokenize_sentences(sentences, b"\x01" * len(joined))
        for sentence, (ids, _) in zip(sentences, out):
            assert ids == tok.convert_tokens_to_ids(tok.tokenize(sentence)), repr(sentence)


@pytest.fixture(scope="module")
def optional_shared_data():
    from conftest import SHARED_DATA
    return SHARED_DATA if SHARED_DATA.is_dir() else None


@pytest.mark.parametrize("lower", [True, False])
def test_spans_equal_tokenize_and_slice_back_on_real_and_random_text(optional_shared_data, lower):
    _check_fuzz(optional_shared_data, lower, n_random=300, n_lines=150, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("lower", [True, False])
def test_spans_fuzz_large(optional_shared_data, lower):
    _check_fuzz(optional_shared_data, lower, n_random=20_000, n_lines=3000, seed=2)


# ---------------------------------------------------------------------------------------------------
# build_vocab.py (uses the same character classes)
# ---------------------------------------------------------------------------------------------------

def test_build_vocab_reproduces_the_embedded_vocab_and_its_punctuation_is_split_off():
    import build_vocab
    tokens = build_vocab.build_vocab()
    assert "\n".join(tokens) + "\n" == (RESOURCES / "vocab.txt").read_text(encoding="utf-8")
    tok = tokenization.FullTokenizer(str(RESOURCES / "vocab.txt"))
    # Every punctuation token is one word of its own, so the vocab entry is reachable.
    # (Symbols such as ～ ￥ ℃ are not punctuation to Google's tokenizer and stay inside words.)
    listed = build_vocab.ASCII_PUNCTUATION + build_vocab.CJK_PUNCTUATION
    punctuation = [ch for ch in listed if tokenization.is_punctuation(ch)]
    assert len(punctuation) > len(listed) // 2, punctuation
    for ch in punctuation:
        assert tok.tokenize("a" + ch + "b") == ["a", ch, "b"], ch
