"""run_ner.py: tag decoding and entity metrics on hand-worked cases, char <-> token alignment (entities
at text boundaries, WordPieces, spaces), long-text windows, bad CLUENER input, and an end-to-end run
on a slice of CLUENER2020."""

import json
import time

import pytest

import finetuning
import run_ner
from train_utils import UsageError


@pytest.fixture(scope="module")
def tokenizer(google_vocab):
    import tokenization

    return tokenization.FullTokenizer(str(google_vocab))


def test_bio_decoding_closes_entities_at_o_type_change_and_text_end():
    tags = ["B-name", "I-name", "O", "I-address", "I-address", "B-name", "I-game", "B-name"]
    assert run_ner.decode_tags(tags) == [("name", 0, 1), ("address", 3, 4), ("name", 5, 5),
                                         ("game", 6, 6), ("name", 7, 7)]


def test_bioes_decoding_ends_entities_at_e_and_s():
    tags = ["S-name", "B-address", "I-address", "E-address", "I-address", "E-name", "B-game"]
    assert run_ner.decode_tags(tags) == [("name", 0, 0), ("address", 1, 3), ("address", 4, 4),
                                         ("name", 5, 5), ("game", 6, 6)]


def test_entity_metrics_by_hand():
    gold = [[("name", 0, 1), ("address", 3, 4)], [("name", 2, 2)]]
    pred = [[("name", 0, 1), ("address", 3, 3), ("company", 5, 6)], [("name", 2, 2)]]
    m = run_ner.ner_metrics(gold, pred)
    # correct 2 (both names), predicted 4, gold 3 -> P = 1/2, R = 2/3, F1 = 4/7
    assert (m["precision"], m["recall"]) == (pytest.approx(0.5), pytest.approx(2 / 3))
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["per_type"]["name"]["f1"] == 1.0
    assert m["per_type"]["address"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_type"]["company"]["support"] == 0 and m["per_type"]["company"]["precision"] == 0.0


@pytest.mark.parametrize("scheme", ["BIO", "BIOES"])
def test_entities_at_both_ends_of_the_text_round_trip_through_tags(tokenizer, scheme):
    text = "张三去北京"
    entities = [("name", 0, 1), ("address", 3, 4)]
    tokens, spans = finetuning.tokenize_with_offsets(tokenizer, text)
    token_entities, lost = run_ner.char_to_token_spans(entities, spans)
    tags = run_ner.span_tags(len(tokens), token_entities, scheme)
    expected = {"BIO": ["B-name", "I-name", "O", "B-address", "I-address"],
                "BIOES": ["B-name", "E-name", "O", "B-address", "E-address"]}[scheme]
    assert lost == 0 and tags == expected
    assert run_ner.token_to_char_entities(run_ner.decode_tags(tags), spans) == entities


def test_wordpieces_and_spaces_map_back_to_exact_characters(tokenizer):
    text = "我玩 Dota 2 游戏，CSOL也玩"
    entities = [("game", 3, 8), ("game", 13, 16)]  # "Dota 2", "CSOL"
    assert [text[s:e + 1] for _, s, e in entities] == ["Dota 2", "CSOL"]
    tokens, spans = finetuning.tokenize_with_offsets(tokenizer, text)
    assert tokens == tokenizer.tokenize(text)
    assert len(tokens) < len(text)  # spaces vanish, latin words become WordPieces
    token_entities, _ = run_ner.char_to_token_spans(entities, spans)
    tags = run_ner.span_tags(len(tokens), token_entities, "BIO")
    assert run_ner.token_to_char_entities(run_ner.decode_tags(tags), spans) == entities


def test_long_text_is_windowed_and_no_entity_is_lost_at_a_cut(tokenizer):
    text = "".join(f"第{i}位是张小{i % 10}和李四，" for i in range(30))  # ~300 chars, names everywhere
    entities = []
    for i in range(30):
        start = text.index(f"第{i}位是") + len(f"第{i}位是")
        entities.append(("name", start, start + 2))
    example = run_ner.NerExample("0", text, entities)
    tags = run_ner.tag_list({"name"}, "BIO")
    encoded, lost = run_ner.encode([example], tokenizer, 24, "BIO")
    features, labels, owners = run_ner.window_features(encoded, tokenizer, {t: i for i, t in enumerate(tags)}, 24)
    assert len(owners) > 10
    # Every token is owned (trained, predicted) by exactly one window.
    assert (labels >= 0).sum() == len(encoded[0].tokens)
    # Feeding the gold tags back as "predictions" recovers every entity, including those cut by windows.
    predicted = [[tags[i] if i >= 0 else "O" for i in row] for row in labels]
    assert run_ner.assemble_predictions(encoded, owners, labels, predicted) == [entities]


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    return str(path)


def test_bad_cluener_input_names_file_and_line(tmp_path):
    ok = {"text": "张三去北京", "label": {"name": {"张三": [[0, 1]]}}}
    outside = {"text": "张三去北京", "label": {"address": {"北京": [[3, 5]]}}}
    path = _write(tmp_path, "outside.json", [ok, outside])
    with pytest.raises(UsageError, match=r"outside.json:2: address '北京': span \[3, 5\] is outside the text"):
        run_ner.read_cluener(path)
    wrong = {"text": "张三去北京", "label": {"name": {"张三": [[1, 2]]}}}
    with pytest.raises(UsageError, match=r"wrong.json:1: .* covers '三去'"):
        run_ner.read_cluener(_write(tmp_path, "wrong.json", [wrong]))
    with pytest.raises(UsageError, match=r"empty.json: no examples"):
        run_ner.read_cluener(_write(tmp_path, "empty.json", []))
    (tmp_path / "broken.json").write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(UsageError, match=r"broken.json:2: not a JSON line"):
        run_ner.read_cluener(str(tmp_path / "broken.json"))


@pytest.mark.parametrize("record, message", [
    (["张三", "name"], r"rows.json:1: a JSON object \{...\} expected, got a list"),
    ({"text": "张三", "label": [["name", 0, 1]]}, r"rows.json:1: \"label\" must be an object .*got a list"),
    ({"text": "张三", "label": {"name": [[0, 1]]}}, r"rows.json:1: label\['name'\] must be an object .*got a list"),
    ({"text": "张三", "label": {"name": {"张三": "0,1"}}}, r"rows.json:1: name '张三': span '0,1' is not"),
])
def test_wrongly_shaped_cluener_lines_are_one_line_errors(tmp_path, record, message):
    with pytest.raises(UsageError, match=message):
        run_ner.read_cluener(_write(tmp_path, "rows.json", [record]))


def test_a_null_label_means_no_entities(tmp_path):
    examples = run_ner.read_cluener(_write(tmp_path, "t.json", [{"text": "张三", "label": None}]))
    assert examples[0].entities == []


def test_predictions_are_written_in_cluener_format(tmp_path):
    ex = run_ner.NerExample("7", "张三去北京见张三", [])
    path = tmp_path / "p.json"
    run_ner.write_predictions(str(path), [ex], [[("name", 0, 1), ("address", 3, 4), ("name", 6, 7)]])
    record = json.loads(path.read_text(encoding="utf-8"))
    assert record == {"id": "7", "text": ex.text,
                      "label": {"name": {"张三": [[0, 1], [6, 7]]}, "address": {"北京": [[3, 4]]}}}


@pytest.mark.slow
def test_ner_trains_end_to_end_on_a_cluener_slice(tmp_path, shared_data, google_vocab):
    t0 = time.time()
    lines = (shared_data / "cluener2020" / "train.json").read_text(encoding="utf-8").splitlines()
    data = tmp_path / "cluener"
    data.mkdir()
    (data / "train.json").write_text("\n".join(lines[:2500]) + "\n", encoding="utf-8")
    (data / "dev.json").write_text("\n".join(lines[-400:]) + "\n", encoding="utf-8")
    (data / "test.json").write_text("\n".join(lines[-400:]) + "\n", encoding="utf-8")
    config = tmp_path / "bert_config.json"
    config.write_text(json.dumps({"vocab_size": 21128, "hidden_size": 128, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "intermediate_size": 512}), encoding="utf-8")
    opts = finetuning.parse_flags(
        run_ner.define_flags, output_dir=str(tmp_path / "out"), bert_config_file=str(config),
        vocab_file=str(google_vocab), data_dir=str(data), do_train=True, do_eval=True, do_predict=True,
        max_seq_length=52, train_batch_size=16, learning_rate=5e-4, num_train_epochs=3)
    metrics = run_ner.run(opts)  # CLUENER's usual file names found in --data_dir
    print(f"ner slice: P/R/F1 {metrics['precision']:.3f}/{metrics['recall']:.3f}/{metrics['f1']:.3f}, "
          f"{time.time() - t0:.0f}s")
    predictions = (tmp_path / "out" / "test_predictions.json").read_text(encoding="utf-8").splitlines()
    assert len(predictions) == 400
    # The restored best checkpoint reproduces the best epoch's dev score.
    history = json.loads((tmp_path / "out" / "train_history.json").read_text(encoding="utf-8"))["epochs"]
    assert metrics["f1"] == pytest.approx(max(h["f1"] for h in history))
    info = json.loads((tmp_path / "out" / "best" / "model_info.json").read_text(encoding="utf-8"))
    assert info["task"] == "ner" and info["labels"][0] == "O" and len(info["labels"]) == 21
    # From random init in ~470 CPU steps; the trivial all-"O" tagger scores exactly 0.
    assert metrics["f1"] > 0.04


@pytest.mark.slow
def test_command_line_reports_a_list_shaped_label_in_one_line(tmp_path, repo_root):
    import os
    import subprocess
    import sys

    train = _write(tmp_path, "train.json", [{"text": "张三", "label": {"name": {"张三": [[0, 1]]}}},
                                            {"text": "李四", "label": [["name", 0, 1]]}])
    proc = subprocess.run(
        [sys.executable, str(repo_root / "run_ner.py"), f"--train_file={train}", "--do_train=true",
         f"--vocab_file={repo_root / 'resources' / 'vocab.txt'}", f"--bert_config_file={repo_root / 'resources' / 'bert_config_tiny.json'}",
         f"--output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
    assert proc.stderr.splitlines()[-1].startswith(f"run_ner.py: error: {train}:2: \"label\" must be an object")
