"""answer_question.py: extractive QA from our folders and HF exports (transformers 5 has no QA pipeline)."""

import json
import os
import re
import subprocess
import sys

import pytest
from helpers import make_checkpoint_dir

import answer_question
import export_to_pytorch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = [("首都是哪里", "中国的首都是北京。上海是大学生的好地方。"),
         ("他们问", "我爱你们。" * 30 + "天津好。")]  # longer than one 40-token window: several windows


@pytest.fixture(scope="module")
def qa_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    ckpt = str(root / "ckpt")
    make_checkpoint_dir(ckpt, "qa", seed=5)
    hf_dir = export_to_pytorch.export_checkpoint(ckpt, os.path.join(ckpt, "bert_config.json"),
                                                 os.path.join(ckpt, "vocab.txt"), str(root / "hf"), "qa")
    return ckpt, hf_dir


def test_our_folder_and_its_hf_export_give_the_same_answers(qa_folders):
    ckpt, hf_dir = qa_folders
    answers = {}
    for name, folder in (("ours", ckpt), ("hf", hf_dir)):
        model, tokenizer = answer_question.load_qa_model(folder)
        answers[name] = answer_question.answer(model, tokenizer, PAIRS, max_seq_length=40, doc_stride=16,
                                               max_query_length=8, max_answer_length=5)
    assert answers["ours"] == answers["hf"]
    for (_, context), text in zip(PAIRS, answers["ours"]):
        assert text and text in context and len(text) <= 5


def test_answer_is_the_best_span_of_transformers_logits(qa_folders):
    """Independent decoding: argmax of start + end logit over context spans, from transformers."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _, hf_dir = qa_folders
    question, context = PAIRS[0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf_model = transformers.AutoModelForQuestionAnswering.from_pretrained(hf_dir).eval()
    enc = tokenizer(question, context, return_tensors="pt", return_offsets_mapping=True)
    offsets = enc.pop("offset_mapping")[0].tolist()
    with torch.no_grad():
        out = hf_model(**enc)
    start, end = out.start_logits[0].numpy(), out.end_logits[0].numpy()
    in_context = [i for i, s in enumerate(enc.sequence_ids(0)) if s == 1]
    best = max((start[s] + end[e], s, e) for s in in_context for e in in_context if s <= e < s + 5)
    expected = context[offsets[best[1]][0]:offsets[best[2]][1]]
    model, ours_tokenizer = answer_question.load_qa_model(hf_dir)
    assert answer_question.answer(model, ours_tokenizer, [PAIRS[0]], max_seq_length=40,
                                  max_query_length=8, max_answer_length=5) == [expected]


def test_a_model_of_another_task_is_refused(tmp_path):
    ckpt = str(tmp_path / "cls")
    make_checkpoint_dir(ckpt, "classifier", seed=6)
    with pytest.raises(ValueError, match="holds a classifier model, not a qa model"):
        answer_question.load_qa_model(ckpt)


@pytest.mark.slow
def test_command_line_answers_json_lines(qa_folders, tmp_path):
    _, hf_dir = qa_folders
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question": q, "context": c}, ensure_ascii=False) + "\n"
                                 for q, c in PAIRS), encoding="utf-8")
    result = subprocess.run([sys.executable, os.path.join(REPO, "answer_question.py"), f"--checkpoint={hf_dir}",
                             f"--input_file={questions}", "--max_seq_length=40", "--doc_stride=16",
                             "--max_query_length=8", "--max_answer_length=5"],
                            capture_output=True, text=True, timeout=180, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["question"] for r in rows] == [q for q, _ in PAIRS]
    assert all(r["answer"] in c for r, (_, c) in zip(rows, PAIRS))
    bad = subprocess.run([sys.executable, os.path.join(REPO, "answer_question.py"), f"--checkpoint={hf_dir}",
                          "--question=x"], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == \
        "answer_question.py: error: give --question and --context, or --input_file (not both)"


# ---- answers start and end on word boundaries (as transformers' QA pipeline cuts them) ----

def _cmrc_contexts(shared_data):
    path = shared_data / "cmrc2018" / "trial.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)["data"]
    return [p["context"] for article in data for p in article["paragraphs"]]


def _cmrc_contexts_with_latin_words_and_numbers(shared_data, n=40):
    return [c for c in _cmrc_contexts(shared_data)
            if re.search(r"[A-Za-z]{4,}", c) and re.search(r"\d{3,}", c)][:n]


def test_word_spans_are_transformers_words_on_cmrc_contexts(shared_data, google_vocab):
    """transformers' pipeline widens a predicted span to whole words (token_to_word, word_to_chars);
    our word spans must be exactly those words on real contexts with Latin words and numbers."""
    transformers = pytest.importorskip("transformers")
    import tokenization

    ours = tokenization.FullTokenizer(str(google_vocab))
    hf = transformers.BertTokenizer(vocab=dict(tokenization.load_vocab(str(google_vocab))), do_lower_case=True)
    contexts = _cmrc_contexts_with_latin_words_and_numbers(shared_data)
    assert len(contexts) >= 10
    split_words = 0
    for context in contexts:
        tokens, _, word_spans = ours.tokenize_with_word_spans(context)
        enc = hf(context, add_special_tokens=False)
        assert tokens == enc.tokens()
        expected = [tuple(enc.word_to_chars(enc.token_to_word(i))) for i in range(len(tokens))]
        assert word_spans == expected
        split_words += sum(t.startswith("##") for t in tokens)
    assert split_words > 10  # the contexts do hold words cut into several pieces


def test_an_answer_predicted_inside_a_latin_word_is_the_whole_word(shared_data, google_vocab):
    """The CMRC trial context with "由韩国Nexon开发": a model pointing at the ##xon piece answers
    "Nexon", not "xon" (and a span ending inside a number ends after it)."""
    import numpy as np

    import run_cmrc
    import tokenization

    tokenizer = tokenization.FullTokenizer(str(google_vocab))

    def decoder(context):
        """(tokens of the one window, answer_at(start, end): the answer logits peaking there give)."""
        example = run_cmrc.QAExample("0", "谁开发的", context, [], -1, "")
        opts = type("Opts", (), dict(max_seq_length=512, doc_stride=128, max_query_length=16))
        features, _, infos = run_cmrc.convert_examples([example], tokenizer, opts, training=False)

        def answer_at(start, end):
            start_logits, end_logits = np.zeros((2, 1, 512), np.float32)
            start_logits[0, start], end_logits[0, end] = 10.0, 10.0
            return run_cmrc.best_answers([example], infos, start_logits, end_logits, 20, 30)["0"]
        return tokenizer.convert_ids_to_tokens(features["input_ids"][0].tolist()), infos[0], answer_at

    contexts = _cmrc_contexts(shared_data)
    tokens, _, answer_at = decoder(next(c for c in contexts if "由韩国Nexon开发" in c))
    xon = tokens.index("##xon")
    assert tokens[xon - 1] == "ne"
    assert answer_at(xon, xon) == "Nexon"
    assert answer_at(xon - 3, xon - 1) == "韩国Nexon"  # ends on "ne": widened to the word's end

    context = next(c for c in contexts if re.search(r"\d{5,}", c) and len(c) < 400)
    tokens, info, answer_at = decoder(context)
    spans = tokenizer.tokenize_with_offsets(context)[1]
    numbers = [p for p, token in enumerate(tokens[:-1])
               if token[0].isdigit() and tokens[p + 1].startswith("##") and tokens[p + 1][2:].isdigit()]
    assert numbers  # a number cut into pieces, answered from its second piece: the whole number
    start = spans[numbers[0] - info.doc_offset][0]
    assert answer_at(numbers[0] + 1, numbers[0] + 1) == re.match(r"[0-9A-Za-z]+", context[start:]).group()
