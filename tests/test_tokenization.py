"""tokenization.py: Google-compatible BERT tokenizer; equality with transformers' BertTokenizer."""

import lzma
import random

import pytest

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
