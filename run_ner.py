"""Fine-tunes BERT/RoBERTa for named-entity recognition on CLUENER2020-style JSON lines.

    python run_ner.py --data_dir=../shared/data/cluener2020 --train_file=train.json \
      --dev_file=dev.json --test_file=test_unlabeled.json --vocab_file=vocab.txt \
      --bert_config_file=bert_config.json --init_checkpoint=... --do_train --do_eval --do_predict \
      --tag_scheme=BIO --max_seq_length=128 --output_dir=/tmp/cluener

Input lines: {"text": "...", "label": {type: {entity_text: [[start, end_inclusive], ...]}}}.
Character spans become one tag per *token* (BIO or BIOES). Chinese characters are mostly one token
each, but digits/latin words become WordPieces and spaces vanish, so every token keeps the character
range it came from (finetune_utils.tokenize_with_offsets) and predicted token spans map back to exact
character spans. Texts longer than the window are cut into overlapping windows; each token is
trained and predicted in the window where it has the most context, so no entity is lost at a cut.
Scores: entity-level (type, start, end) exact match, precision/recall/F1 overall (micro) and per
type. Predictions are written back in CLUENER's format (dev_predictions.json / test_predictions.json).
"""

import collections
import dataclasses
import json
import os

import numpy as np
from absl import flags, logging

import finetune_utils
import modeling
import tokenization
import train_utils


@dataclasses.dataclass
class NerExample:
    guid: str  # the line's "id" if present, else its 0-based example number
    text: str
    entities: list  # [(type, start, end_inclusive)] character spans; [] for unlabelled text


@dataclasses.dataclass
class NerOptions(finetune_utils.FinetuneOptions):
    tag_scheme: str = "BIO"


# ---------------------------------------------------------------------------------------------------
# Reading and writing CLUENER JSON lines
# ---------------------------------------------------------------------------------------------------


def read_cluener(path):
    """Reads CLUENER JSON lines into NerExamples.

    Raises ValueError naming path:line for bad JSON, a missing "text", a malformed span, a span
    outside its text or a span whose characters differ from the entity string; and for an empty file.
    """
    examples = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{n}: no \"text\" string")
            text = record["text"]
            entities = []
            for etype, mentions in (record.get("label") or {}).items():
                for name, spans in mentions.items():
                    for span in spans:
                        if (not isinstance(span, (list, tuple)) or len(span) != 2
                                or not all(isinstance(x, int) for x in span)):
                            raise ValueError(f"{path}:{n}: {etype} {name!r}: span {span!r} is not [start, end]")
                        start, end = span
                        if not 0 <= start <= end < len(text):
                            raise ValueError(f"{path}:{n}: {etype} {name!r}: span [{start}, {end}] is outside "
                                             f"the text (length {len(text)})")
                        if text[start:end + 1] != name:
                            raise ValueError(f"{path}:{n}: {etype} {name!r}: span [{start}, {end}] covers "
                                             f"{text[start:end + 1]!r}")
                        entities.append((etype, start, end))
            guid = str(record.get("id", len(examples)))
            examples.append(NerExample(guid, text, sorted(entities, key=lambda e: (e[1], e[2], e[0]))))
    if not examples:
        raise ValueError(f"{path}: no examples (empty file?)")
    return examples


def to_cluener(text, entities):
    """[(type, start, end)] -> CLUENER's {type: {entity_text: [[start, end], ...]}}."""
    label = collections.defaultdict(dict)
    for etype, start, end in sorted(entities, key=lambda e: (e[1], e[2], e[0])):
        label[etype].setdefault(text[start:end + 1], []).append([start, end])
    return dict(label)


def write_predictions(path, examples, predictions):
    """One CLUENER JSON line per example: {"id", "text", "label"}."""
    with open(path, "w", encoding="utf-8") as f:
        for ex, entities in zip(examples, predictions):
            f.write(json.dumps({"id": ex.guid, "text": ex.text, "label": to_cluener(ex.text, entities)},
                               ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------
# Tags
# ---------------------------------------------------------------------------------------------------


def tag_list(entity_types, scheme):
    """["O", "B-address", "I-address", ...] (BIO) or with E-/S- too (BIOES)."""
    if scheme not in ("BIO", "BIOES"):
        raise ValueError(f"--tag_scheme={scheme!r} must be BIO or BIOES")
    return ["O"] + [f"{p}-{t}" for t in sorted(entity_types) for p in scheme if p != "O"]


def span_tags(num_tokens, token_entities, scheme):
    """Tags for a token sequence from [(type, first_token, last_token)] (non-overlapping)."""
    tags = ["O"] * num_tokens
    for etype, first, last in token_entities:
        if scheme == "BIOES" and first == last:
            tags[first] = f"S-{etype}"
            continue
        tags[first] = f"B-{etype}"
        for i in range(first + 1, last + 1):
            tags[i] = f"I-{etype}"
        if scheme == "BIOES":
            tags[last] = f"E-{etype}"
    return tags


def decode_tags(tags):
    """Tag sequence -> [(type, first, last)] token spans.

    B-X/S-X start an entity; I-X/E-X continue an open entity of type X, or (like conlleval) start
    one when none of that type is open; E-X/S-X close it; O closes it.
    """
    spans, current = [], None  # current = [type, first, last]
    for i, tag in enumerate(tags):
        prefix, _, etype = tag.partition("-")
        if prefix == "O" or not etype:
            current = None
            continue
        if prefix in ("B", "S") or current is None or current[0] != etype:
            current = [etype, i, i]
            spans.append(current)
        else:
            current[2] = i
        if prefix in ("E", "S"):
            current = None
    return [tuple(s) for s in spans]


# ---------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------


def char_to_token_spans(entities, spans):
    """Maps character entities to token entities: the tokens overlapping [start, end].

    Returns ([(type, first_token, last_token)], n_unmappable). Entities covering no token (only
    whitespace) cannot be tagged and are counted; overlapping entities keep the earlier one.
    """
    out, lost, used = [], 0, set()
    for etype, start, end in entities:
        covered = [i for i, (s, e) in enumerate(spans) if s <= end and e > start]
        if not covered or used.intersection(covered):
            lost += 1
            continue
        used.update(covered)
        out.append((etype, covered[0], covered[-1]))
    return out, lost


def token_to_char_entities(token_entities, spans):
    """[(type, first_token, last_token)] -> [(type, start_char, end_char_inclusive)]."""
    return [(etype, spans[first][0], spans[last][1] - 1) for etype, first, last in token_entities]


@dataclasses.dataclass
class EncodedText:
    tokens: list
    spans: list  # [(start, end)] characters of each token
    tags: list  # gold tag per token (all "O" when unlabelled)
    windows: list  # [(start, length)] token windows


def encode(examples, tokenizer, max_seq_length, scheme):
    """Tokenizes each example, tags its tokens and cuts it into overlapping windows.

    Returns (list[EncodedText], n_lost_entities).
    """
    window = max_seq_length - 2
    encoded, lost = [], 0
    for ex in examples:
        tokens, spans = finetune_utils.tokenize_with_offsets(tokenizer, ex.text)
        token_entities, n_lost = char_to_token_spans(ex.entities, spans)
        lost += n_lost
        encoded.append(EncodedText(tokens, spans, span_tags(len(tokens), token_entities, scheme),
                                   finetune_utils.doc_windows(len(tokens), window, max(1, window // 2))))
    return encoded, lost


def window_features(encoded, tokenizer, tag_map, max_seq_length):
    """`[CLS] window [SEP]` features for every window of every text.

    Returns (features dict of [F, S] int32, labels [F, S] int32, owners). labels[f, j] is the gold tag id
    of the token at position j, or -1 for [CLS]/[SEP]/padding and for tokens that have more context in
    another window (so each token is trained once). owners: [(text index, window start, length)] per row.
    """
    rows, label_rows, owners = [], [], []
    for t, enc in enumerate(encoded):
        for w, (start, length) in enumerate(enc.windows):
            ids = tokenizer.convert_tokens_to_ids(["[CLS]"] + enc.tokens[start:start + length] + ["[SEP]"])
            labels = np.full(max_seq_length, -1, np.int32)
            for p in range(start, start + length):
                if finetune_utils.max_context_window(enc.windows, p) == w:
                    labels[1 + p - start] = tag_map[enc.tags[p]]
            rows.append((ids, [0] * len(ids)))
            label_rows.append(labels)
            owners.append((t, start, length))
    return finetune_utils.pad_features(rows, max_seq_length), np.stack(label_rows), owners


def assemble_predictions(encoded, owners, labels, tags):
    """Per-window predicted tags -> character entities per text.

    Args:
      owners, labels: from window_features; labels[f, j] >= 0 marks the tokens window f owns.
      tags: [F, S] predicted tag strings.
    Returns list (one per text) of [(type, start, end_inclusive)].
    """
    token_tags = [["O"] * len(enc.tokens) for enc in encoded]
    for f, (t, start, length) in enumerate(owners):
        for j in np.nonzero(labels[f] >= 0)[0]:
            token_tags[t][start + j - 1] = tags[f][j]
    return [token_to_char_entities(decode_tags(tt), enc.spans) for tt, enc in zip(token_tags, encoded)]


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------


def ner_metrics(gold, pred):
    """Entity-level exact-match scores.

    gold, pred: lists (one per text) of [(type, start, end)]. An entity counts as correct when type,
    start and end all match. Returns {"precision", "recall", "f1", "per_type": {type: {...}}} with
    precision/recall/F1 = 0 where their denominator is 0.
    """
    counts = collections.defaultdict(lambda: [0, 0, 0])  # type -> [correct, predicted, gold]
    for g, p in zip(gold, pred):
        g, p = set(g), set(p)
        for e in p:
            counts[e[0]][1] += 1
            counts[e[0]][0] += e in g
        for e in g:
            counts[e[0]][2] += 1

    def prf(correct, predicted, gold_n):
        precision = correct / predicted if predicted else 0.0
        recall = correct / gold_n if gold_n else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"precision": precision, "recall": recall, "f1": f1, "support": gold_n}

    total = np.sum([c for c in counts.values()], axis=0) if counts else [0, 0, 0]
    out = prf(*[int(x) for x in total])
    out["per_type"] = {t: prf(*counts[t]) for t in sorted(counts)}
    return out


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------


def run(opts):
    """Runs train/eval/predict as asked by `opts` (NerOptions). Returns the dev metrics dict."""
    finetune_utils.check_options(opts)
    paths = {name: finetune_utils.resolve_path(opts, name) for name in ("train_file", "dev_file", "test_file")}
    os.makedirs(opts.output_dir, exist_ok=True)
    tokenizer = tokenization.FullTokenizer(opts.vocab_file, do_lower_case=opts.do_lower_case)

    tags_path = os.path.join(opts.output_dir, "ner_tags.json")
    train = read_cluener(paths["train_file"]) if opts.do_train else None
    if train:
        tags = tag_list({e[0] for ex in train for e in ex.entities}, opts.tag_scheme)
        with open(tags_path, "w", encoding="utf-8") as f:
            json.dump(tags, f, ensure_ascii=False)
    elif os.path.isfile(tags_path):
        with open(tags_path, encoding="utf-8") as f:
            tags = json.load(f)
    else:
        raise ValueError(f"no tag list: train first so {tags_path} exists")
    tag_map = {t: i for i, t in enumerate(tags)}
    dev = read_cluener(paths["dev_file"]) if opts.do_eval else None
    if dev:
        unknown = {e[0] for ex in dev for e in ex.entities} - {t[2:] for t in tags if t != "O"}
        if unknown:
            raise ValueError(f"{paths['dev_file']}: entity types not in training data: {sorted(unknown)}")
    test = read_cluener(paths["test_file"]) if opts.do_predict else None

    strategy = finetune_utils.setup_runtime(opts)
    model = finetune_utils.build_task_model(
        opts, strategy, lambda config: modeling.BertTokenClassifier(config, num_labels=len(tags)))

    def predict(examples):
        encoded, _ = encode(examples, tokenizer, opts.max_seq_length, opts.tag_scheme)
        features, labels, owners = window_features(encoded, tokenizer, tag_map, opts.max_seq_length)
        logits = finetune_utils.predict_batches(model, features, opts.eval_batch_size)  # [F, S, C]
        predicted = [[tags[i] for i in row] for row in np.argmax(logits, axis=-1)]
        return assemble_predictions(encoded, owners, labels, predicted)

    def evaluate():
        m = ner_metrics([ex.entities for ex in dev], predict(dev))
        return {k: v for k, v in m.items() if k != "per_type"}

    if opts.do_train:
        encoded, lost = encode(train, tokenizer, opts.max_seq_length, opts.tag_scheme)
        if lost:
            logging.warning("%s: %d entities cover no token (whitespace only) or overlap another; "
                            "not tagged", paths["train_file"], lost)
        features, y, _ = window_features(encoded, tokenizer, tag_map, opts.max_seq_length)
        ds = finetune_utils.make_dataset(features, y, opts.train_batch_size, shuffle=True, seed=opts.seed,
                                         drop_remainder=len(y) >= opts.train_batch_size)
        finetune_utils.train_and_keep_best(model, opts, strategy, ds, len(y), finetune_utils.masked_sparse_ce,
                                           evaluate if dev else None, key="f1")
    metrics = {}
    if dev:
        predictions = predict(dev)
        metrics = ner_metrics([ex.entities for ex in dev], predictions)
        metrics.update(task="ner", split=os.path.basename(paths["dev_file"]), n=len(dev))
        write_predictions(os.path.join(opts.output_dir, "dev_predictions.json"), dev, predictions)
        finetune_utils.write_metrics(opts, metrics)
    if test:
        out = os.path.join(opts.output_dir, "test_predictions.json")
        write_predictions(out, test, predict(test))
        logging.info("wrote %d predictions to %s", len(test), out)
    return metrics


def main(argv):
    del argv
    try:
        run(finetune_utils.options_from_flags(NerOptions))
    except ValueError as e:
        raise SystemExit(f"run_ner.py: error: {e}") from None


if __name__ == "__main__":
    finetune_utils.define_common_flags()
    with train_utils.flag_group("Tagging"):
        flags.DEFINE_enum("tag_scheme", "BIO", ["BIO", "BIOES"], "Token tagging scheme.")
    train_utils.run_script(main, __doc__, ("python run_ner.py --data_dir=../shared/data/cluener2020 --train_file=train.json "
                           "--dev_file=train.json --vocab_file=../shared/data/vocab/vocab.txt "
                           "--bert_config_file=resources/bert_config_L2_H128.json --do_train --do_eval "
                           "--output_dir=/tmp/cluener"))
