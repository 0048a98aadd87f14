"""answer_question.py: extractive QA from our folders and HF exports (transformers 5 has no QA pipeline)."""

import json
import os
import subprocess
import sys

import pytest

import answer_question
import export_to_pytorch
from helpers import make_checkpoint_dir

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
    best = max(((start[s] + end[e], s, e) for s in in_context for e in in_context if s <= e < s + 5))
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
