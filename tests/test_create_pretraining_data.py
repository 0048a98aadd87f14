"""Tests for create_pretraining_data.py: whole-word masking, packing, determinism, records, bad input.

Everything runs on the embedded corpus (resources/corpus) and vocab; a few tests also use the shared
Wikipedia shard and Google's vocab when ../shared/data is present.
"""

import collections
import json
import lzma
import os
import subprocess
import sys

import jieba
import numpy as np
import pytest
from conftest import REPO_ROOT, RESOURCES, SHARED_DATA

import corpus as corpus_module
import create_pretraining_data as cpd
import pretraining_instances
import pretraining_records
import tokenization

VOCAB = str(RESOURCES / "vocab.txt")
CORPUS = sorted(str(p) for p in (RESOURCES / "corpus").glob("*.txt"))

FEATURES = {  # Google's pretraining schema
    "input_ids": ("int64", "seq"), "input_mask": ("int64", "seq"), "segment_ids": ("int64", "seq"),
    "masked_lm_positions": ("int64", "preds"), "masked_lm_ids": ("int64", "preds"),
    "masked_lm_weights": ("float32", "preds"), "next_sentence_labels": ("int64", 1),
}


def _options(tmp_path, name="out.tfrecord", **kw):
    kw.setdefault("input_file", ",".join(CORPUS))
    kw.setdefault("vocab_file", VOCAB)
    kw.setdefault("dupe_factor", 1)
    kw.setdefault("max_seq_length", 64)
    kw.setdefault("max_predictions_per_seq", 10)
    return cpd.Options(output_file=str(tmp_path / name), **kw)


def _generate(o):
    lines = []
    summary = cpd.generate(o, log=lines.append)
    summary["log"] = lines
    return summary


def _read_records(path, seq, preds):
    """Parses a record file with tf.data and Google's feature spec -> dict of numpy arrays [N, ...]."""
    import tensorflow as tf
    spec = {}
    for name, (dtype, length) in FEATURES.items():
        n = {"seq": seq, "preds": preds}.get(length, length)
        spec[name] = tf.io.FixedLenFeature([n], getattr(tf, dtype))
    ds = tf.data.TFRecordDataset(path).batch(1024).map(lambda x: tf.io.parse_example(x, spec))
    parts = list(ds.as_numpy_iterator())
    return {k: np.concatenate([p[k] for p in parts]) for k in spec}


def _original_ids(rec, i):
    """Instance i's token ids with [CLS]/[SEP] removed and the masked tokens put back."""
    ids = rec["input_ids"][i].copy()
    k = int(rec["masked_lm_weights"][i].sum())
    ids[rec["masked_lm_positions"][i][:k]] = rec["masked_lm_ids"][i][:k]
    n = int(rec["input_mask"][i].sum())
    return ids[1:n - 1]


def _corpus_sentences(paths):
    docs = []
    for path in paths:
        doc = []
        for line in open(path, encoding="utf-8"):
            if line.strip():
                doc.append(line.strip())
            elif doc:
                docs.append(doc)
                doc = []
        if doc:
            docs.append(doc)
    return docs


@pytest.fixture(scope="module")
def tokenizer():
    return tokenization.FullTokenizer(VOCAB)


@pytest.fixture(scope="module")
def many_instances(tmp_path_factory):
    """~3,000 instances of the embedded corpus (dupe_factor 40), parsed, with options."""
    tmp = tmp_path_factory.mktemp("many")
    o = _options(tmp, dupe_factor=40, max_seq_length=128, max_predictions_per_seq=20)
    _generate(o)
    return o, _read_records(o.output_file, 128, 20)


@pytest.fixture(scope="module")
def masked_words(many_instances, tokenizer):
    """Per instance: [(jieba word, positions, masked flags)] from an independent jieba run."""
    _, rec = many_instances
    return [list(_masked_words(rec, i, tokenizer)) for i in range(len(rec["input_ids"]))]


def _masked_words(rec, i, tok):
    """Yields (jieba word, its positions, masked flag per position) for all-CJK words of instance i.

    jieba runs on the decoded original text of the instance, independently of the generator.
    """
    ids = _original_ids(rec, i)
    pieces = [t[2:] if t.startswith("##") else t for t in tok.convert_ids_to_tokens(ids.tolist())]
    k = int(rec["masked_lm_weights"][i].sum())
    masked = set((rec["masked_lm_positions"][i][:k] - 1).tolist())
    char_token = [j for j, piece in enumerate(pieces) for _ in piece]
    pos = 0
    for word in jieba.lcut("".join(pieces)):
        positions = char_token[pos:pos + len(word)]
        pos += len(word)
        if all(tokenization.is_cjk(ch) for ch in word) and len(set(positions)) == len(word):
            yield word, positions, [p in masked for p in positions]


# ---------------------------------------------------------------------------------------------------
# Tokenization fast path
# ---------------------------------------------------------------------------------------------------

TRICKY = [
    "我爱Python编程!2019年 running, 中華人民共和國 Ａ１",
    "Café naïve ÉCOLE ﬁne ﬀ İstanbul straße",
    "e\u0301t\u00e9 中\u0301文 a\u200bb \x00\x07\ufffd x\t\ty\r\n",
    "###hash## tags #中文# ...!!! ？？ 「引号」『书名』《红楼梦》",
    "emoji 😀 and 𠀀𪚥 rare ideographs, 豈更 compat",
    "UNAFFABLE unaffable 123,456.78 3.5% 1990-2020 www.example.com user@mail.cn",
    "x" * 150 + " 长单词" + "y" * 99,
    "a\u2028b 中\u2028文 x\x1cy\x85z Ａ１２ａｂ ｸﾞ Ⅻ ² ½ \ue000私用\U00100000",
]


@pytest.mark.parametrize("lower", [True, False])
def test_fast_tokenizer_gives_identical_ids_to_full_tokenizer(lower):
    span_tok = pretraining_instances.WholeWordTokenizer(VOCAB, lower)
    full = tokenization.FullTokenizer(VOCAB, do_lower_case=lower)
    sentences = [s for doc in _corpus_sentences(CORPUS) for s in doc] + TRICKY
    for s in sentences:
        (ids, starts), = span_tok.tokenize_sentences([s], b"\x01" * len(s))
        assert ids == full.convert_tokens_to_ids(full.tokenize(s)), s
        assert not ids or starts[0] == 0


def test_fast_tokenizer_matches_on_wikipedia_with_google_vocab(google_vocab):
    shard = SHARED_DATA / "corpus" / "zhwiki" / "zhwiki_00.txt.xz"
    if not shard.is_file():
        pytest.skip("shared corpus shard absent")
    with lzma.open(shard, "rt", encoding="utf-8") as f:
        lines = [line.strip() for _, line in zip(range(4000), f) if line.strip()]
    span_tok = pretraining_instances.WholeWordTokenizer(str(google_vocab), True)
    full = tokenization.FullTokenizer(str(google_vocab))
    for s in lines:
        (ids, _), = span_tok.tokenize_sentences([s], b"\x01" * len(s))
        assert ids == full.convert_tokens_to_ids(full.tokenize(s)), s


# ---------------------------------------------------------------------------------------------------
# Whole-word masking
# ---------------------------------------------------------------------------------------------------

def test_groups_are_jieba_words_of_any_length(tmp_path):
    maker = pretraining_instances.InstanceMaker(_options(tmp_path, max_seq_length=128))
    long_words = 0
    for doc in _corpus_sentences(CORPUS):
        pieces, _ = maker.featurize([(i + 1, s) for i, s in enumerate(doc)], "corpus")
        for (_ids, starts), sentence in zip(pieces, doc):
            words = jieba.lcut(sentence)  # an independent jieba run on the sentence
            if not all(len(maker.tok.full.tokenize(w)) == len(w) for w in words):
                continue  # English/number words: several chars per token; checked separately below
            bounds = list(np.cumsum([0] + [len(w) for w in words if w.strip()]))[:-1]
            assert starts == bounds, sentence
            long_words += sum(len(w) >= 4 for w in words)
    assert long_words > 20  # e.g. 人工智能, 自然保护区: no 3-character cap on group length


def test_wordpiece_continuations_join_their_word(tmp_path):
    maker = pretraining_instances.InstanceMaker(_options(tmp_path))
    (ids, starts), = maker.featurize([(1, "他说unaffable和running都是英文。")], "x")[0]
    tokens = maker.tok.full.convert_ids_to_tokens(ids)
    continuations = [i for i, t in enumerate(tokens) if t.startswith("##")]
    assert continuations, tokens  # the case under test must be there
    assert not set(continuations) & set(starts), tokens


def test_every_masked_group_is_one_whole_jieba_word(masked_words):
    whole, long_masked = 0, 0
    for words in masked_words:
        for word, _, flags in words:
            assert all(flags) or not any(flags), (word, flags)  # never part of a word
            if all(flags):
                whole += 1
                long_masked += len(word) >= 4
    assert whole > 10_000 and long_masked > 50


def test_masking_rate_is_ten_percent_with_the_cap_rule(many_instances):
    o, rec = many_instances
    n_tokens = rec["input_mask"].sum(axis=1) - 2
    n_pred = rec["masked_lm_weights"].sum(axis=1)
    assert len(n_tokens) > 2500
    expected = np.minimum(o.max_predictions_per_seq, np.maximum(1, np.round(n_tokens * o.masked_lm_prob)))
    assert abs(n_pred.sum() / n_tokens.sum() - 0.10) <= 0.01
    assert abs(n_pred.sum() / expected.sum() - 1.0) <= 0.01
    assert (n_pred <= expected).all()


def test_mask_keep_random_split_is_80_10_10_per_word(many_instances, masked_words, tokenizer):
    _, rec = many_instances
    mask_id = tokenizer.vocab["[MASK]"]
    counts = collections.Counter()
    for i in range(len(rec["input_ids"])):
        ids = rec["input_ids"][i]
        original = _original_ids(rec, i)
        for word, positions, flags in masked_words[i]:
            if not all(flags):
                continue
            now = [ids[p + 1] for p in positions]
            if all(t == mask_id for t in now):
                counts["mask"] += 1
            elif all(t == original[p] for t, p in zip(now, positions)):
                counts["keep"] += 1
            else:
                assert mask_id not in now, (word, now)  # one decision per word, never mixed
                counts["random"] += 1
    total = sum(counts.values())
    assert total > 10_000
    assert abs(counts["mask"] / total - 0.8) <= 0.03, counts
    assert abs(counts["keep"] / total - 0.1) <= 0.03, counts
    assert abs(counts["random"] / total - 0.1) <= 0.03, counts


def test_labels_never_use_hash_chinese_ids(many_instances, tokenizer):
    _, rec = many_instances
    hash_cjk = {i for t, i in tokenizer.vocab.items() if t.startswith("##") and len(t) == 3
                and tokenization.is_cjk(t[2])}
    assert hash_cjk  # the demo vocab has them, like Google's
    labels = rec["masked_lm_ids"][rec["masked_lm_weights"] > 0]
    assert not hash_cjk & set(labels.tolist())
    assert not hash_cjk & set(rec["input_ids"].ravel().tolist())


def test_random_replacements_are_never_special_or_hash_tokens(many_instances, tokenizer):
    _, rec = many_instances
    mask_id = tokenizer.vocab["[MASK]"]
    replaced = []
    for i in range(len(rec["input_ids"])):
        k = int(rec["masked_lm_weights"][i].sum())
        pos, lab = rec["masked_lm_positions"][i][:k], rec["masked_lm_ids"][i][:k]
        now = rec["input_ids"][i][pos]
        replaced += now[(now != lab) & (now != mask_id)].tolist()
    assert len(replaced) > 500
    for token in tokenizer.convert_ids_to_tokens(sorted(set(replaced))):
        assert not (token.startswith("[") and token.endswith("]")) and not token.startswith("##"), token


# ---------------------------------------------------------------------------------------------------
# Packing: coverage and document boundaries
# ---------------------------------------------------------------------------------------------------

def test_every_token_of_the_input_appears_once_with_dupe_factor_one(tmp_path, tokenizer):
    long_line = "".join(ch for s in _corpus_sentences(CORPUS[:1])[0] for ch in s if tokenization.is_cjk(ch)) * 3
    path = tmp_path / "with_long_line.txt"
    path.write_text("短文档。\n\n" + long_line + "\n\n" + open(CORPUS[0], encoding="utf-8").read(),
                    encoding="utf-8")
    o = _options(tmp_path, input_file=f"{path}," + ",".join(CORPUS[1:]), short_seq_prob=0.0)
    summary = _generate(o)
    rec = _read_records(o.output_file, 64, 10)
    got = collections.Counter()
    for i in range(len(rec["input_ids"])):
        got.update(_original_ids(rec, i).tolist())
    want = collections.Counter()
    for doc in _corpus_sentences([str(path)] + CORPUS[1:]):
        for s in doc:
            want.update(tokenizer.convert_tokens_to_ids(tokenizer.tokenize(s)))
    assert got == want
    assert summary["split_lines"] >= 1
    assert any(f"{path}:3" in line for line in summary["log"])  # the long line is named, not dropped


def test_no_instance_mixes_two_documents(tmp_path, tokenizer):
    # Many tiny documents: packing across boundaries would be the easy way to fill 64 tokens.
    path = tmp_path / "tiny_docs.txt"
    sentences = [s for doc in _corpus_sentences(CORPUS) for s in doc]
    path.write_text("\n\n".join("\n".join(sentences[i:i + 2]) for i in range(0, 200, 2)) + "\n",
                    encoding="utf-8")
    o = _options(tmp_path, input_file=str(path), dupe_factor=3)
    _generate(o)
    rec = _read_records(o.output_file, 64, 10)

    def as_text(ids):
        return "".join(chr(0x10000 + int(i)) for i in ids)

    docs = [as_text(tokenizer.convert_tokens_to_ids(tokenizer.tokenize("".join(d))))
            for d in _corpus_sentences([str(path)])]
    for i in range(len(rec["input_ids"])):
        inst = as_text(_original_ids(rec, i))
        assert any(inst in d for d in docs), "instance spans two documents"
    assert len(rec["input_ids"]) >= 3 * len(docs)  # every short document kept, in every copy


def test_giant_document_is_cut_into_parts_without_loss(tmp_path, monkeypatch, tokenizer):
    # A file without blank lines is one document; it is read in bounded parts, nothing dropped.
    monkeypatch.setattr(corpus_module, "CHARS_PER_CHUNK", 300)
    sentences = [s for doc in _corpus_sentences(CORPUS[:2]) for s in doc]
    path = tmp_path / "no_blank_lines.txt"
    path.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    o = _options(tmp_path, input_file=str(path), short_seq_prob=0.0)
    summary = _generate(o)
    assert summary["documents"] > 10
    rec = _read_records(o.output_file, 64, 10)
    got = collections.Counter(t for i in range(len(rec["input_ids"])) for t in _original_ids(rec, i).tolist())
    want = collections.Counter(t for s in sentences for t in tokenizer.convert_tokens_to_ids(tokenizer.tokenize(s)))
    assert got == want


def test_without_whole_word_mask_every_token_is_its_own_group(tmp_path):
    maker = pretraining_instances.InstanceMaker(_options(tmp_path, do_whole_word_mask=False))
    (ids, starts), = maker.featurize([(1, "人工智能是一门研究如何让机器模仿人类思维的学科。")], "x")[0]
    assert starts == list(range(len(ids)))


def test_doc_per_line_input_splits_sentences_without_loss(tmp_path, tokenizer):
    docs = _corpus_sentences(CORPUS[:2])
    path = tmp_path / "docs.txt"
    path.write_text("\n".join("".join(d) for d in docs) + "\n", encoding="utf-8")
    assert corpus_module.split_sentences("他说：“来了！”你呢？好") == ["他说：“来了！”", "你呢？", "好"]
    o = _options(tmp_path, input_file=str(path), input_format="doc_per_line", short_seq_prob=0.0)
    summary = _generate(o)
    assert summary["documents"] == len(docs)
    rec = _read_records(o.output_file, 64, 10)
    got = collections.Counter(t for i in range(len(rec["input_ids"])) for t in _original_ids(rec, i).tolist())
    want = collections.Counter(t for d in docs for t in tokenizer.convert_tokens_to_ids(tokenizer.tokenize("".join(d))))
    assert got == want


# ---------------------------------------------------------------------------------------------------
# Determinism, records, sidecar, re-runs
# ---------------------------------------------------------------------------------------------------

def test_output_bytes_do_not_depend_on_worker_count(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "DOCS_PER_CHUNK", 8)  # several chunks from the small corpus
    outputs = []
    for workers in (1, 2):
        o = _options(tmp_path, name=f"w{workers}.tfrecord", num_workers=workers, dupe_factor=2)
        _generate(o)
        outputs.append(open(o.output_file, "rb").read())
    assert outputs[0] == outputs[1] and len(outputs[0]) > 10_000
    o = _options(tmp_path, name="dyn1.tfrecord", dynamic_masking=True)
    _generate(o)
    dynamic = open(o.output_file, "rb").read()
    o = _options(tmp_path, name="dyn2.tfrecord", dynamic_masking=True, num_workers=2)
    _generate(o)
    assert open(o.output_file, "rb").read() == dynamic and len(dynamic) > 10_000
    o = _options(tmp_path, name="seed2.tfrecord", random_seed=7, dupe_factor=2)
    _generate(o)
    assert open(o.output_file, "rb").read() != outputs[0]


def _unmasked_sequences(rec):
    """Static records -> their input_ids with every masked position given back its label."""
    ids = rec["input_ids"].copy()
    for row, positions, labels, weights in zip(ids, rec["masked_lm_positions"], rec["masked_lm_ids"],
                                               rec["masked_lm_weights"]):
        k = int(weights.sum())
        row[positions[:k]] = labels[:k]
    return ids


def test_packing_does_not_depend_on_the_masking_settings(tmp_path):
    """Packing and masking draw from separate streams (settings version 2): other masking settings
    give other masks on the very same sequences, in the same order."""
    sequences, positions = [], []
    for prob in (0.1, 0.2):
        o = _options(tmp_path, name=f"p{prob}.tfrecord", masked_lm_prob=prob)
        _generate(o)
        rec = _read_records(o.output_file, 64, 10)
        sequences.append(_unmasked_sequences(rec))
        positions.append(rec["masked_lm_positions"])
    assert len(sequences[0]) > 50 and np.array_equal(sequences[0], sequences[1])
    assert not np.array_equal(positions[0], positions[1])


def test_unmasked_records_draw_no_static_masks(tmp_path, monkeypatch):
    def no_masks(*args):
        raise AssertionError("the unmasked kind drew a static mask")

    monkeypatch.setattr(pretraining_instances.InstanceMaker, "mask", no_masks)
    summary = _generate(_options(tmp_path, dynamic_masking=True))
    assert summary["instances"] > 50 and summary["predictions"] == 0


def test_outputs_of_an_older_settings_version_are_regenerated_with_one_line(tmp_path):
    o = _options(tmp_path)
    _generate(o)
    sidecar = o.output_file + ".meta.json"
    meta = json.load(open(sidecar))
    assert meta["settings_version"] == pretraining_records.SETTINGS_VERSION == 2
    del meta["settings_version"]  # as written before the key existed: version 1
    with open(sidecar, "w") as f:
        json.dump(meta, f)
    assert pretraining_records.check_records(o.output_file, 64, 10, meta["vocab_size"]).meta == meta
    summary = _generate(o)
    said = [line for line in summary["log"] if "settings version" in line]
    assert not summary["skipped"] and said == [
        f"create_pretraining_data: {o.output_file} has settings version 1, this generator writes 2 "
        "(other bytes for the same flags); regenerating"]
    assert json.load(open(sidecar))["settings_version"] == 2
    assert _generate(o)["skipped"]


def test_compressed_inputs_give_the_same_records(tmp_path):
    import gzip
    text = open(CORPUS[0], "rb").read()
    (tmp_path / "c.txt.xz").write_bytes(lzma.compress(text))
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(text))
    outputs = []
    for name in (CORPUS[0], str(tmp_path / "c.txt.xz"), str(tmp_path / "c.txt.gz")):
        o = _options(tmp_path, name=os.path.basename(name) + ".tfrecord", input_file=name)
        _generate(o)
        outputs.append(open(o.output_file, "rb").read())
    assert outputs[0] == outputs[1] == outputs[2]


def test_records_parse_with_google_schema_via_tf_data(tmp_path, tokenizer):
    import tensorflow as tf
    o = _options(tmp_path, num_output_shards=2, dupe_factor=2)
    summary = _generate(o)
    shards = summary["outputs"]
    assert [os.path.basename(s) for s in shards] == ["out.tfrecord-00000-of-00002",
                                                     "out.tfrecord-00001-of-00002"]
    total = 0
    for shard in shards:
        rec = _read_records(shard, 64, 10)
        n = len(rec["input_ids"])
        total += n
        meta = json.load(open(shard + ".meta.json"))
        assert meta["num_instances"] == n and meta["format_version"] == 1
        assert meta["vocab_sha256"] == tokenization.vocab_sha256(VOCAB)
        assert meta["vocab_size"] == len(tokenizer.vocab) and meta["max_seq_length"] == 64
        assert meta["input_files"][0]["bytes"] == os.path.getsize(CORPUS[0])
        assert (rec["input_ids"][:, 0] == tokenizer.vocab["[CLS]"]).all()
        lengths = rec["input_mask"].sum(1)
        assert (rec["input_ids"][np.arange(n), lengths - 1] == tokenizer.vocab["[SEP]"]).all()
        assert (rec["input_ids"] * (1 - rec["input_mask"]) == 0).all()
        assert (rec["segment_ids"] == 0).all() and (rec["next_sentence_labels"] == 0).all()
        w = rec["masked_lm_weights"]
        assert set(np.unique(w)) <= {0.0, 1.0} and (rec["masked_lm_positions"][w == 0] == 0).all()
        for positions, k in zip(rec["masked_lm_positions"], w.sum(1).astype(int)):
            assert (np.diff(positions[:k]) > 0).all()  # ascending, as in Google's records
    assert total == summary["instances"]
    # The hand-written proto equals what tf.train.Example builds from the same values.
    raw = next(iter(tf.data.TFRecordDataset(shards[0]))).numpy()
    ex = tf.train.Example.FromString(raw)
    rebuilt = tf.train.Example(features=tf.train.Features(feature={
        k: (tf.train.Feature(float_list=tf.train.FloatList(value=ex.features.feature[k].float_list.value))
            if k == "masked_lm_weights" else
            tf.train.Feature(int64_list=tf.train.Int64List(value=ex.features.feature[k].int64_list.value)))
        for k in FEATURES}))
    assert tf.train.Example.FromString(rebuilt.SerializeToString()) == ex
    assert len(rebuilt.SerializeToString()) == len(raw)


def test_rerun_skips_complete_output_and_redoes_incomplete_one(tmp_path):
    o = _options(tmp_path)
    _generate(o)
    before = os.stat(o.output_file).st_mtime_ns
    assert _generate(o)["skipped"]
    assert os.stat(o.output_file).st_mtime_ns == before
    # A killed run leaves a temp file and (at worst) a record file without its sidecar.
    stale = tmp_path / ".out.tfrecord.tmp-99999"
    stale.write_bytes(b"truncated")
    os.remove(o.output_file + ".meta.json")
    assert not _generate(o)["skipped"]
    assert not stale.exists() and os.path.exists(o.output_file + ".meta.json")
    # Different settings are not "complete" either.
    o.dupe_factor = 2
    assert not _generate(o)["skipped"]


def test_user_dict_words_become_single_groups(tmp_path):
    user_dict = tmp_path / "user.txt"
    user_dict.write_text("全词遮盖法 100 n\n", encoding="utf-8")
    sentence = [(1, "我们研究全词遮盖法的效果。")]
    plain = pretraining_instances.InstanceMaker(_options(tmp_path)).featurize(sentence, "x")[0][0][1]
    custom = pretraining_instances.InstanceMaker(_options(tmp_path, jieba_user_dict=str(user_dict))).featurize(sentence, "x")[0][0][1]
    assert 4 in custom and custom[custom.index(4) + 1] == 9  # 全词遮盖法 = tokens 4..8
    assert plain != custom


def test_rjieba_segmenter_gives_the_same_groups_on_most_sentences(tmp_path):
    pytest.importorskip("rjieba")
    a = pretraining_instances.InstanceMaker(_options(tmp_path))
    b = pretraining_instances.InstanceMaker(_options(tmp_path, segmenter="rjieba"))
    same = total = 0
    for doc in _corpus_sentences(CORPUS):
        sents = [(i, s) for i, s in enumerate(doc)]
        pa, pb = a.featurize(sents, "x")[0], b.featurize(sents, "x")[0]
        assert [p[0] for p in pa] == [p[0] for p in pb]  # identical ids
        same += sum(x[1] == y[1] for x, y in zip(pa, pb))
        total += len(pa)
    assert same / total > 0.9


def test_worker_start_error_is_reported_not_hung(tmp_path):
    pytest.importorskip("rjieba")
    bad = tmp_path / "bad_dict.txt"
    bad.write_text("词 notanumber\n", encoding="utf-8")
    _assert_fails(tmp_path, "--jieba_user_dict: .*bad_dict.txt:1: frequency is not an integer",
                  segmenter="rjieba", jieba_user_dict=str(bad), num_workers=2)


def test_missing_rjieba_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "rjieba", None)
    with pytest.raises(ValueError, match="--segmenter=rjieba needs the rjieba package"):
        cpd.generate(_options(tmp_path, segmenter="rjieba"), log=lambda s: None)


# ---------------------------------------------------------------------------------------------------
# Bad input: one-line errors naming the flag or file, and never a partial output file
# ---------------------------------------------------------------------------------------------------

def _assert_fails(tmp_path, match, **kw):
    o = _options(tmp_path, **kw)
    with pytest.raises(ValueError, match=match) as err:
        cpd.generate(o, log=lambda s: None)
    assert "\n" not in str(err.value)
    out_dir = os.path.dirname(o.output_file)
    if os.path.isdir(out_dir):
        assert not [f for f in os.listdir(out_dir) if "out.tfrecord" in f], os.listdir(out_dir)


def test_missing_vocab_file(tmp_path):
    _assert_fails(tmp_path, "--vocab_file: .*not found", vocab_file=str(tmp_path / "nope.txt"))


def test_empty_vocab_file(tmp_path):
    (tmp_path / "empty_vocab.txt").write_text("")
    _assert_fails(tmp_path, "--vocab_file: .*empty", vocab_file=str(tmp_path / "empty_vocab.txt"))


def test_missing_input_file_and_unmatched_glob(tmp_path):
    _assert_fails(tmp_path, "--input_file: file not found: .*nope.txt", input_file=str(tmp_path / "nope.txt"))
    _assert_fails(tmp_path, "--input_file: pattern .* matched no files", input_file=str(tmp_path / "*.none"))


def test_empty_and_blank_input_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    _assert_fails(tmp_path, "--input_file: .*empty.txt is empty", input_file=str(tmp_path / "empty.txt"))
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    _assert_fails(tmp_path, "--input_file: .*blank.txt contains no text",
                  input_file=f"{CORPUS[0]},{tmp_path / 'blank.txt'}")


def test_invalid_utf8_bytes_are_replaced_and_counted(tmp_path):
    path = tmp_path / "bad_bytes.txt"
    path.write_bytes("第一句话。\n".encode() + b"\xff\xfe\xc3 broken \x80\n\n" + "第二个文档。\n".encode())
    o = _options(tmp_path, input_file=str(path))
    summary = _generate(o)
    assert summary["replaced_chars"] == 4 and summary["documents"] == 2
    assert f"replaced 4 invalid UTF-8 characters with U+FFFD (first at {path}:2)" in summary["log"][-1]
    assert json.load(open(o.output_file + ".meta.json"))["replaced_invalid_utf8_chars"] == 4


def test_empty_documents_are_counted_not_fatal(tmp_path):
    path = tmp_path / "empty_doc.txt"
    # blank lines in a row, and a document whose only line tokenizes to nothing (control chars)
    path.write_text("第一个文档。\n\n\n\n\x07\x08\n\n第三个文档。\n", encoding="utf-8")
    summary = _generate(_options(tmp_path, input_file=str(path)))
    assert summary["documents"] == 3 and summary["empty_documents"] == 1 and summary["instances"] == 2


def test_100k_character_line_without_punctuation_is_split_not_dropped(tmp_path):
    path = tmp_path / "long.txt"
    text = "".join(ch for s in _corpus_sentences(CORPUS)[0] for ch in s if tokenization.is_cjk(ch))
    line = (text * 1000)[:100_000]
    path.write_text(line + "\n", encoding="utf-8")
    o = _options(tmp_path, input_file=str(path), short_seq_prob=0.0, max_seq_length=128)
    summary = _generate(o)
    assert summary["split_lines"] == 1 and f"{path}:1 (" in summary["log"][0]
    assert summary["tokens"] == len(tokenization.FullTokenizer(VOCAB).tokenize(line))
    assert summary["instances"] >= 100_000 // 126


def test_bad_sequence_settings_name_the_flag(tmp_path):
    _assert_fails(tmp_path, "--max_seq_length=3 must be >= 4", max_seq_length=3)
    _assert_fails(tmp_path, "--max_predictions_per_seq=63 must be in", max_predictions_per_seq=63)
    _assert_fails(tmp_path, "--dupe_factor=0", dupe_factor=0)
    _assert_fails(tmp_path, "--masked_lm_prob", masked_lm_prob=1.5)


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where a directory should be")
    o = _options(tmp_path)
    o.output_file = str(blocker / "out.tfrecord")
    with pytest.raises(ValueError, match="--output_file: cannot write to .*not_a_dir"):
        cpd.generate(o, log=lambda s: None)


def test_command_line_error_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "create_pretraining_data.py"), f"--input_file={CORPUS[0]}",
         f"--output_file={tmp_path / 'x.tfrecord'}", f"--vocab_file={tmp_path / 'missing.txt'}"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("create_pretraining_data.py: error: --vocab_file:") and "missing.txt" in last
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------
# Outputs that cannot be right: exit 2, one line naming the flag and file, nothing on disk changed
# ---------------------------------------------------------------------------------------------------

def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _cli(tmp_path, *flags):
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "create_pretraining_data.py"), f"--vocab_file={VOCAB}",
         "--max_seq_length=64", "--max_predictions_per_seq=10", "--dupe_factor=1", *flags],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)


def _assert_usage_error(result, *parts):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("create_pretraining_data.py: error: --output_file: "), last
    for part in parts:
        assert part in last, last


def test_output_equal_to_an_input_is_refused(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(open(CORPUS[0], "rb").read())
    other = tmp_path / "other.txt"
    other.write_text("另一个文件。\n", encoding="utf-8")
    before = _files(tmp_path)
    result = _cli(tmp_path, f"--input_file={other},{tmp_path}/corpus.*", "--output_file=./corpus.txt")
    _assert_usage_error(result, "corpus.txt is also an input file")
    assert _files(tmp_path) == before


def test_output_that_is_a_directory_is_refused(tmp_path):
    (tmp_path / "records").mkdir()
    result = _cli(tmp_path, f"--input_file={CORPUS[0]}", "--output_file=records")
    _assert_usage_error(result, "records is a directory")
    assert os.listdir(tmp_path / "records") == []


def test_concurrent_run_on_the_same_output_fails_and_harms_neither(tmp_path):
    """A second run must not delete the first run's temp file nor replace the finished output."""
    o = _options(tmp_path, name="out.tfrecord")
    _generate(o)
    with pretraining_records.RecordOutputs([o.output_file]) as first_run:
        first_run.write([b"first run's partial records"])
        before = _files(tmp_path)
        result = _cli(tmp_path, f"--input_file={CORPUS[0]}", f"--output_file={o.output_file}")
        assert _files(tmp_path) == before
    _assert_usage_error(result, "out.tfrecord is being written by another run")


def test_failing_run_leaves_the_previous_output_byte_identical(tmp_path):
    o = _options(tmp_path)
    _generate(o)
    before = _files(tmp_path)
    (tmp_path / "blank.txt").write_text("\n\n")
    o.input_file = f"{CORPUS[0]},{tmp_path / 'blank.txt'}"  # fails after all records are made
    with pytest.raises(ValueError, match="blank.txt contains no text"):
        cpd.generate(o, log=lambda s: None)
    assert {k: v for k, v in _files(tmp_path).items() if k != "blank.txt"} == before


def test_remote_output_is_written_through_tf_gfile(tmp_path):
    """gs:// outputs are written locally and copied at the end; TF's ram:// stands in for GCS."""
    import tensorflow as tf
    local = _options(tmp_path)
    _generate(local)
    remote = _options(tmp_path, name="unused")
    remote.output_file = "ram://generator_test/out.tfrecord"
    _generate(remote)
    assert sorted(tf.io.gfile.listdir("ram://generator_test/")) == ["out.tfrecord", "out.tfrecord.meta.json"]
    with tf.io.gfile.GFile(remote.output_file, "rb") as f:
        assert f.read() == open(local.output_file, "rb").read()
    assert _generate(remote)["skipped"]


def test_corrupt_compressed_input_is_one_line_and_keeps_the_previous_output(tmp_path):
    o = _options(tmp_path)
    _generate(o)
    before = _files(tmp_path)
    (tmp_path / "broken.txt.xz").write_bytes(lzma.compress(open(CORPUS[0], "rb").read())[:-40])
    result = _cli(tmp_path, f"--input_file={tmp_path / 'broken.txt.xz'}", f"--output_file={o.output_file}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("create_pretraining_data.py: error: --input_file: cannot read ") and "broken.txt.xz" in last
    assert {k: v for k, v in _files(tmp_path).items() if k != "broken.txt.xz"} == before


@pytest.mark.slow
def test_killed_run_leaves_the_previous_output_and_the_rerun_cleans_up(tmp_path):
    import signal
    import time
    o = _options(tmp_path)
    _generate(o)
    before = _files(tmp_path)
    big = tmp_path / "big.txt"  # a few seconds of work, so the kill lands mid-run
    big.write_bytes(b"\n".join(open(p, "rb").read() for p in CORPUS) * 40)
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "create_pretraining_data.py"), f"--input_file={big}",
         f"--output_file={o.output_file}", f"--vocab_file={VOCAB}", "--dupe_factor=1",
         "--max_seq_length=64", "--max_predictions_per_seq=10"], cwd=tmp_path)
    deadline = time.time() + 60
    while not any(p.name.startswith(".out.tfrecord.tmp-") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it was killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    visible = {k: v for k, v in _files(tmp_path).items() if not k.startswith(".") and k != "big.txt"}
    assert visible == before  # records and sidecar as they were; only hidden temp/lock files left
    o.input_file = str(big)
    _generate(o)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt", "out.tfrecord", "out.tfrecord.meta.json"]
