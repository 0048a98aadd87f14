"""corpus.py: input files -> documents of sentences -> chunks of documents, in both input formats;
a corpus that is not UTF-8 is refused with one line naming the file, its first bad line and the
likely encoding, and nothing already on disk changes; the odd invalid byte in a UTF-8 corpus is
still replaced, counted and reported."""

import gzip
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, RESOURCES

import corpus as corpus_module
import create_pretraining_data as cpd
import train_utils
from corpus import InputReader

VOCAB = str(RESOURCES / "vocab.txt")
CORPUS = sorted((RESOURCES / "corpus").glob("*.txt"))


def _corpus_text(max_lines=60):
    lines = CORPUS[0].read_text(encoding="utf-8").splitlines()[:max_lines]
    return "\n".join(lines) + "\n"


def test_input_file_lists_and_globs_resolve_to_each_file_once(tmp_path):
    for name in ("b.txt", "a.txt"):
        (tmp_path / name).write_text("句子。\n", encoding="utf-8")
    a, b = str(tmp_path / "a.txt"), str(tmp_path / "b.txt")
    assert corpus_module.resolve_input_files(f"{b}, {tmp_path}/*.txt,{a}") == [b, a]
    (tmp_path / "empty.txt").write_text("")
    for spec, message in ((f"{tmp_path}/*.md", "matched no files"), (f"{tmp_path}/c.txt", "file not found"),
                          (str(tmp_path), "is a directory"), (f"{tmp_path}/empty.txt", "is empty"),
                          (" , ", "--input_file is required")):
        with pytest.raises(train_utils.UsageError, match=message):
            corpus_module.resolve_input_files(spec)


def test_sentences_split_after_end_marks_and_closing_quotes_without_loss():
    text = "他说：“来了！”你呢？好……然后"
    pieces = corpus_module.split_sentences(text)
    assert pieces == ["他说：“来了！”", "你呢？", "好……", "然后"] and "".join(pieces) == text


@pytest.mark.parametrize("input_format, text, documents", [
    ("sentence_per_line", "一。\n二。\n\n\n三。\n", [[(1, "一。"), (2, "二。")], [(5, "三。")]]),
    ("doc_per_line", "一。二。\n\n三。\n", [[(1, "一。"), (1, "二。")], [(3, "三。")]]),
])
def test_documents_keep_their_line_numbers_in_both_formats(tmp_path, input_format, text, documents):
    path = tmp_path / "c.txt"
    path.write_text(text, encoding="utf-8")
    reader = InputReader([str(path)], input_format)
    assert [sentences for _, sentences in reader.documents()] == documents
    assert reader.docs_per_file == [2] and reader.text_bytes == len(text.encode("utf-8"))


def test_chunks_number_documents_across_files_and_depend_only_on_the_input(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "DOCS_PER_CHUNK", 2)
    paths = []
    for i, n in enumerate((3, 2)):
        paths.append(str(tmp_path / f"{i}.txt"))
        with open(paths[-1], "w", encoding="utf-8") as f:
            f.write("".join(f"文件{i}文档{d}。\n\n" for d in range(n)))
    chunks = list(InputReader(paths, "sentence_per_line").chunks())
    assert [(c, first, [(p, s[0][1]) for p, s in docs]) for c, first, docs in chunks] == [
        (0, 0, [(0, "文件0文档0。"), (0, "文件0文档1。")]),
        (1, 2, [(0, "文件0文档2。"), (1, "文件1文档0。")]),  # chunks run on across files
        (2, 4, [(1, "文件1文档1。")])]


def _options(tmp_path, input_file, **kw):
    return cpd.Options(input_file=str(input_file), output_file=str(tmp_path / "out" / "train.tfrecord"),
                       vocab_file=VOCAB, dupe_factor=1, max_seq_length=64, max_predictions_per_seq=10,
                       **kw)


def _snapshot(folder):
    """{name: bytes} of every file in `folder` (hidden temp files included)."""
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.fixture
def earlier_output(tmp_path):
    """An output folder holding a finished run's records and sidecar, to check they stay untouched."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.tfrecord").write_bytes(b"earlier records")
    (out / "train.tfrecord.meta.json").write_text('{"earlier": true}\n')
    return out


@pytest.mark.parametrize("encoding, expected", [("gbk", "GB18030"), ("big5", "BIG5"),
                                                 ("utf-16", "UTF-16")])
def test_corpus_in_another_encoding_is_refused_before_output_is_touched(
        tmp_path, earlier_output, encoding, expected):
    text = _corpus_text()
    if encoding == "big5":  # Big5 has no simplified characters; use traditional text
        text = "中華民國的首都是臺北。維基百科是一個自由的百科全書。\n這是第二個句子，還有更多內容。\n\n" * 20
    corpus = tmp_path / f"corpus.{encoding}.txt"
    corpus.write_bytes(text.encode(encoding))
    before = _snapshot(earlier_output)
    with pytest.raises(train_utils.UsageError) as e:
        cpd.generate(_options(tmp_path, corpus), log=lambda line: None)
    message = str(e.value)
    assert "\n" not in message
    assert f"{corpus} is not UTF-8: line 1 is the first of" in message
    assert f"likely encoding {expected}" in message
    assert _snapshot(earlier_output) == before


def test_compressed_gbk_corpus_is_refused_too(tmp_path, earlier_output):
    corpus = tmp_path / "corpus.txt.gz"
    with gzip.open(corpus, "wb") as f:
        f.write(_corpus_text().encode("gbk"))
    before = _snapshot(earlier_output)
    expected = r"corpus\.txt\.gz is not UTF-8: line 1 .*likely encoding GB18030"
    with pytest.raises(train_utils.UsageError, match=expected):
        cpd.generate(_options(tmp_path, corpus), log=lambda line: None)
    assert _snapshot(earlier_output) == before


def test_short_samples_name_every_equally_likely_encoding(tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_bytes("中国的首都是北京。\n我们爱北京。\n".encode("gbk"))
    with pytest.raises(train_utils.UsageError, match=r"likely encoding one of .*GB18030"):
        InputReader([str(corpus)], "sentence_per_line")


def test_binary_data_is_not_given_an_encoding(tmp_path):
    corpus = tmp_path / "corpus.txt"  # a compressed file without its .gz name
    corpus.write_bytes(gzip.compress(_corpus_text().encode()))
    with pytest.raises(train_utils.UsageError, match=r"not recognised \(binary or compressed data\?\)"):
        InputReader([str(corpus)], "sentence_per_line")


def test_gbk_after_the_checked_head_fails_before_the_output_is_replaced(tmp_path, earlier_output,
                                                                        monkeypatch):
    # A UTF-8 file with a GBK file appended: the head check passes, the end-of-file check fails.
    head = _corpus_text(20)
    monkeypatch.setattr(corpus_module, "ENCODING_CHECK_BYTES", len(head.encode()) // 2)
    corpus = tmp_path / "mixed.txt"
    corpus.write_bytes(head.encode() + b"\n" + _corpus_text(200).encode("gbk"))
    first_bad = head.count("\n") + 2
    before = _snapshot(earlier_output)
    expected = rf"mixed\.txt is not UTF-8: line {first_bad} is the first"
    with pytest.raises(train_utils.UsageError, match=expected):
        cpd.generate(_options(tmp_path, corpus), log=lambda line: None)
    assert _snapshot(earlier_output) == before  # no temp file left either


def test_odd_invalid_bytes_below_the_share_are_replaced_counted_and_reported(tmp_path):
    text = _corpus_text(200)
    lines = text.encode().split(b"\n")
    lines[3] += b" \xff"
    lines[50] += b" \xc3"
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"\n".join(lines))
    log = []
    summary = cpd.generate(_options(tmp_path, corpus), log=log.append)
    assert summary["replaced_chars"] == 2 and summary["instances"] > 0
    assert f"replaced 2 invalid UTF-8 characters with U+FFFD (first at {corpus}:4)" in log[-1]


def test_share_rule_needs_two_bad_lines_above_one_percent_of_bytes(tmp_path):
    def outcome(lines):
        path = tmp_path / "c.txt"
        path.write_bytes(b"".join(lines))
        try:
            InputReader([str(path)], "sentence_per_line")
        except train_utils.UsageError:
            return "refused"
        return "read"

    good = "好" * 33 + "\n"  # 100 bytes
    assert outcome([good.encode()] * 98 + [b"\xff" * 50 + b"\n"]) == "read"  # one bad line, 33%
    assert outcome([good.encode()] * 98 + [b"\xff\n"] * 2) == "read"  # two lines, 2 of 9,806 bytes
    assert outcome([good.encode()] * 98 + [b"\xff" * 60 + b"\n"] * 2) == "refused"  # 120 of 9,922


@pytest.mark.slow
def test_script_prints_one_line_for_a_gbk_corpus(tmp_path, earlier_output):
    corpus = tmp_path / "gbk.txt"
    corpus.write_bytes(_corpus_text().encode("gbk"))
    before = _snapshot(earlier_output)
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "create_pretraining_data.py"), f"--input_file={corpus}",
         f"--output_file={earlier_output / 'train.tfrecord'}", f"--vocab_file={VOCAB}"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and f"{corpus} is not UTF-8: line 1" in errors[0], proc.stderr
    assert _snapshot(earlier_output) == before
