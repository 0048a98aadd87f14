"""run_classifier.py: readers for every task layout and their errors, metrics on a hand-worked case,
the predictions file, the command line's one-line errors, and an end-to-end run on THUCNews titles."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import run_classifier
from run_classifier import ClassifierOptions


def _spec(task="generic", **flags):
    opts = ClassifierOptions(output_dir="", bert_config_file="", vocab_file="", task_name=task, **flags)
    return run_classifier.task_spec(opts)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_headerless_pair_tsv_like_lcqmc(tmp_path):
    path = _write(tmp_path, "dev.tsv", "今天天气好\t天气不错\t1\n你好\t再见\t0\n")
    examples = run_classifier.read_examples(path, _spec("lcqmc"), ("0", "1"))
    assert [(e.guid, e.text_a, e.text_b, e.label) for e in examples] == [
        ("0", "今天天气好", "天气不错", "1"), ("1", "你好", "再见", "0")]


def test_header_names_the_columns_in_any_order_and_csv_quotes_work(tmp_path):
    tsv = _write(tmp_path, "train.tsv", "label\ttext_a\n1\t好评\n0\t差评\n")
    examples = run_classifier.read_examples(tsv, _spec("chnsenticorp"), ("0", "1"))
    assert [(e.text_a, e.label) for e in examples] == [("好评", "1"), ("差评", "0")]
    csv_path = _write(tmp_path, "news.csv", 'title,topic\n"股市,大涨",finance\n足球赛,sports\n')
    spec = _spec(text_a_column="title", label_column="topic")
    examples = run_classifier.read_examples(csv_path, spec)
    assert [(e.text_a, e.text_b, e.label) for e in examples] == [("股市,大涨", None, "finance"),
                                                               ("足球赛", None, "sports")]
    assert run_classifier.label_list(spec, examples) == ["finance", "sports"]


def test_json_lines_drop_unlabelled_nli_rows_and_keep_ids(tmp_path):
    path = _write(tmp_path, "ocnli.json",
                  '{"sentence1": "前提", "sentence2": "假设", "label": "entailment", "id": 7}\n'
                  '{"sentence1": "前提", "sentence2": "假设", "label": "-", "id": 8}\n'
                  '{"sentence1": "前提", "sentence2": "假设二", "label": "neutral", "id": 9}\n')
    examples = run_classifier.read_examples(path, _spec("ocnli"), run_classifier.NLI_LABELS)
    assert [(e.guid, e.label) for e in examples] == [("7", "entailment"), ("9", "neutral")]


def test_numeric_labels_sort_numerically():
    examples = [run_classifier.Example("0", "x", None, l) for l in ("10", "9", "100", "9")]
    assert run_classifier.label_list(_spec("thucnews"), examples) == ["9", "10", "100"]


def test_bad_rows_name_file_and_line(tmp_path):
    missing = _write(tmp_path, "missing.tsv", "a\tb\t1\nonly_one_column\t0\n")
    with pytest.raises(ValueError, match=r"missing.tsv:2: missing column 2"):
        run_classifier.read_examples(missing, _spec("lcqmc"), ("0", "1"))
    unknown = _write(tmp_path, "unknown.tsv", "text_a\ttext_b\tlabel\n甲\t乙\tneutral\n甲\t乙\tmaybe\n")
    with pytest.raises(ValueError, match=r"unknown.tsv:3: unknown label 'maybe'"):
        run_classifier.read_examples(unknown, _spec("xnli"), run_classifier.NLI_LABELS)
    ragged = _write(tmp_path, "ragged.tsv", "label\ttext_a\n1\n")
    with pytest.raises(ValueError, match=r"ragged.tsv:2: 1 columns, the header has 2"):
        run_classifier.read_examples(ragged, _spec("chnsenticorp"), ("0", "1"))
    no_header_col = _write(tmp_path, "cols.tsv", "label\tsentence\n1\t好\n")
    with pytest.raises(ValueError, match=r"cols.tsv:2: missing column 'text_a'"):
        run_classifier.read_examples(no_header_col, _spec("chnsenticorp"), ("0", "1"))
    empty = _write(tmp_path, "empty.tsv", "")
    with pytest.raises(ValueError, match=r"empty.tsv: no examples"):
        run_classifier.read_examples(empty, _spec("lcqmc"), ("0", "1"))


def test_accuracy_and_macro_f1_by_hand():
    # class 0: tp 1 fp 1 fn 1 -> F1 1/2; class 1: tp 2 fp 1 fn 0 -> 4/5; class 2: tp 0 -> 0.
    m = run_classifier.classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0])
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_pairs_are_truncated_longest_first_within_max_seq_length(google_vocab):
    import tokenization

    tokenizer = tokenization.FullTokenizer(str(google_vocab))
    ex = run_classifier.Example("0", "一二三四五六七八九十", "甲乙", "1")
    features, labels = run_classifier.convert_examples([ex], {"0": 0, "1": 1}, 10, tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(features["input_ids"][0].tolist())
    assert tokens == ["[CLS]", "一", "二", "三", "四", "五", "[SEP]", "甲", "乙", "[SEP]"]
    assert features["segment_ids"][0].tolist() == [0] * 7 + [1] * 3 and labels.tolist() == [1]


def test_prediction_file_has_one_row_per_example_in_order(tmp_path):
    examples = [run_classifier.Example(str(i), "x", None, None) for i in (5, 3, 9)]
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    path = tmp_path / "p.tsv"
    run_classifier.write_predictions(str(path), examples, probs, ["neg", "pos"])
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "id\tlabel\tprob_neg\tprob_pos"
    assert [l.split("\t")[:2] for l in lines[1:]] == [["5", "neg"], ["3", "pos"], ["9", "neg"]]


def test_command_line_reports_a_bad_row_in_one_line(tmp_path, repo_root, google_vocab):
    bad = _write(tmp_path, "train.tsv", "甲\t乙\t1\n甲\t乙\t2\n")
    proc = subprocess.run(
        [sys.executable, str(repo_root / "run_classifier.py"), "--task_name=lcqmc", f"--train_file={bad}",
         "--do_train", f"--vocab_file={google_vocab}", "--bert_config_file=unused.json",
         f"--output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode != 0
    assert f"run_classifier.py: error: {bad}:2: unknown label '2'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_classifier_trains_end_to_end_and_beats_the_majority_class(tmp_path, shared_data, google_vocab):
    import modeling

    t0 = time.time()
    lines = (shared_data / "thucnews_title" / "dev.txt").read_text(encoding="utf-8").splitlines()
    (tmp_path / "train.txt").write_text("\n".join(lines[:4000]) + "\n", encoding="utf-8")
    (tmp_path / "dev.txt").write_text("\n".join(lines[-600:]) + "\n", encoding="utf-8")
    (tmp_path / "test.txt").write_text("\n".join(l.split("\t")[0] for l in lines[-600:-500]) + "\n",
                                       encoding="utf-8")  # text only: test files need no label
    config = tmp_path / "bert_config.json"
    modeling.BertConfig(vocab_size=21128, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=512).to_json_file(str(config))
    opts = ClassifierOptions(
        output_dir=str(tmp_path / "out"), bert_config_file=str(config), vocab_file=str(google_vocab),
        task_name="thucnews", data_dir=str(tmp_path), train_file="train.txt", dev_file="dev.txt",
        test_file="test.txt", do_train=True, do_eval=True, do_predict=True, max_seq_length=32,
        train_batch_size=32, learning_rate=3e-4, num_train_epochs=2)
    metrics = run_classifier.run(opts)
    print(f"thucnews slice: {metrics}, {time.time() - t0:.0f}s")
    assert metrics["accuracy"] > metrics["majority_baseline_accuracy"] + 0.15
    rows = (tmp_path / "out" / "test_predictions.tsv").read_text(encoding="utf-8").splitlines()
    assert rows[0].split("\t") == ["id", "label"] + [f"prob_{i}" for i in range(10)]
    assert len(rows) == 101 and [r.split("\t")[0] for r in rows[1:3]] == ["0", "1"]
    assert os.path.isfile(tmp_path / "out" / "best" / "checkpoint")
    history = json.loads((tmp_path / "out" / "train_history.json").read_text(encoding="utf-8"))
    assert metrics["accuracy"] == pytest.approx(max(h["accuracy"] for h in history))
