r"""Fine-tunes BERT/RoBERTa for named-entity recognition on CLUENER2020-style JSON lines.

    python run_ner.py --data_dir=cluener2020 --init_checkpoint=chinese_L-12_H-768_A-12 \
      --do_train=true --do_eval=true --do_predict=true --tag_scheme=BIO --max_seq_length=128 \
      --learning_rate=3e-5 --output_dir=out/cluener

With --data_dir and no file flags, CLUENER's train.json/dev.json/test.json are used (dev never falls
back to test). The best model on dev is kept in output_dir/best/, a model folder whose model_info.json
lists the tags (export_to_pytorch.py --checkpoint=out/cluener/best needs no other flag).

Input lines: {"text": "...", "label": {type: {entity_text: [[start, end_inclusive], ...]}}}.
Character spans become one tag per *token* (BIO or BIOES). Chinese characters are mostly one token
each, but digits/latin words become WordPieces and spaces vanish, so every token keeps the character
range it came from (finetuning.tokenize_with_offsets) and predicted token spans map back to exact
character spans; entities that cover no token are counted and reported. Texts longer than the window are cut into overlapping windows; each token is
trained and predicted in the window where it has the most context, so no entity is lost at a cut.
Scores: entity-level (type, start, end) exact match, precision/recall/F1 overall (micro) and per
type. Predictions are written back in CLUENER's format (dev_predictions.json / test_predictions.json).
"""

import collections
import dataclasses
import json
import os
from collections import Counter

import train_utils  # first: it hides TensorFlow's C++ start-up lines

# isort: split

import numpy as np
from absl import flags

import finetuning
from train_utils import UsageError


@dataclasses.dataclass
class NerExample:
    guid: str  # the line's "id" if present, else its 0-based example number
    text: str
    entities: list  # [(type, start, end_inclusive)] character spans; [] for unlabelled text


# ---------------------------------------------------------------------------------------------------
# Reading and writing CLUENER JSON lines
# ---------------------------------------------------------------------------------------------------


def read_cluener(path):
    """Reads CLUENER JSON lines into NerExamples.

    UsageError naming path:line for a line that is not a JSON object, a missing "text", a "label" or
    mention table that is not an object, a malformed span, a span outside its text or one whose
    characters differ from the entity string; and for an empty file. A null "label" means no entities.
    """
    examples = []
    for n, record in finetuning.json_lines(path):
        if not isinstance(record.get("text"), str):
            raise UsageError(f"{path}:{n}: no \"text\" string")
        text, label = record["text"], record.get("label") or {}
        if not isinstance(label, dict):
            raise UsageError(f"{path}:{n}: \"label\" must be an object {{type: {{entity: [[start, end]]}}}}, "
                             f"got a {type(label).__name__}")
        entities = []
        for etype, mentions in label.items():
            if not isinstance(mentions, dict):
                raise UsageError(f"{path}:{n}: label[{etype!r}] must be an object {{entity: [[start, end]]}}, "
                                 f"got a {type(mentions).__name__}")
            for name, spans in mentions.items():
                for span in spans if isinstance(spans, list) else [spans]:
                    if (not isinstance(span, (list, tuple)) or len(span) != 2
                            or not all(isinstance(x, int) for x in span)):
                        raise UsageError(f"{path}:{n}: {etype} {name!r}: span {span!r} is not [start, end]")
                    start, end = span
                    if not 0 <= start <= end < len(text):
                        raise UsageError(f"{path}:{n}: {etype} {name!r}: span [{start}, {end}] is outside "
                                         f"the text (length {len(text)})")
                    if text[start:end + 1] != name:
                        raise UsageError(f"{path}:{n}: {etype} {name!r}: span [{start}, {end}] covers "
                                         f"{text[start:end + 1]!r}")
                    entities.append((etype, start, end))
        guid = str(record.get("id", len(examples)))
        examples.append(NerExample(guid, text, sorted(entities, key=lambda e: (e[1], e[2], e[0]))))
    if not examples:
        raise UsageError(f"{path}: no examples (empty file?)")
    return examples


def to_cluener(text, entities):
    """[(type, start, end)] -> CLUENER's {type: {entity_text: [[start, end], ...]}}."""
    label = collections.defaultdict(dict)
    for etype, start, end in sorted(entities, key=lambda e: (e[1], e[2], e[0])):
        label[etype].setdefault(text[start:end + 1], []).append([start, end])
    return dict(label)


def write_predictions(path, examples, predictions):
    """One CLUENER JSON line per example: {"id", "text", "label"}."""
    finetuning.write_text(path, "".join(
        json.dumps({"id": ex.guid, "text": ex.text, "label": to_cluener(ex.text, entities)},
                   ensure_ascii=False) + "\n" for ex, entities in zip(examples, predictions)))


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
        tokens, spans = finetuning.tokenize_with_offsets(tokenizer, ex.text)
        token_entities, n_lost = char_to_token_spans(ex.entities, spans)
        lost += n_lost
        encoded.append(EncodedText(tokens, spans, span_tags(len(tokens), token_entities, scheme),
                                   finetuning.doc_windows(len(tokens), window, max(1, window // 2))))
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
                if finetuning.max_context_window(enc.windows, p) == w:
                    labels[1 + p - start] = tag_map[enc.tags[p]]
            rows.append((ids, [0] * len(ids)))
            label_rows.append(labels)
            owners.append((t, start, length))
    return finetuning.pad_features(rows, max_seq_length), np.stack(label_rows), owners


def assemble_predictions(encoded, owners, labels, tags):
    """Per-window predicted tags -> character entities per text.

    Args:
      owners, labels: from window_features; labels[f, j] >= 0 marks the tokens window f owns.
      tags: [F, S] predicted tag strings.
    Returns list (one per text) of [(type, start, end_inclusive)].
    """
    token_tags = [["O"] * len(enc.tokens) for enc in encoded]
    for f, (t, start, _length) in enumerate(owners):
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
# The task for the shared driver
# ---------------------------------------------------------------------------------------------------


def define_flags(fv=flags.FLAGS):
    finetuning.define_flags(fv, max_seq_length=128)
    with train_utils.flag_group("Tagging", fv):
        flags.DEFINE_enum("tag_scheme", "BIO", ["BIO", "BIOES"], "Token tagging scheme.", flag_values=fv)


class NerTask(finetuning.Task):
    kind, key = "ner", "f1"
    file_names = {"train": ("train.json",), "dev": ("dev.json",), "test": ("test.json",)}
    prediction_files = ("dev_predictions.json", "test_predictions.json")

    def read(self, path, split):
        examples = read_cluener(path)
        skipped = Counter()
        if split == "train":  # tokenized once here, so untaggable entities are counted up front
            self.encoded, lost = encode(examples, self.tokenizer, self.opts.max_seq_length, self.opts.tag_scheme)
            if lost:
                skipped["entities covering no token (whitespace only) or overlapping another"] = lost
        return examples, skipped

    def label_list(self, train):
        return tag_list({e[0] for ex in train for e in ex.entities}, self.opts.tag_scheme)

    def validate(self, data):
        known = {t[2:] for t in self.labels if t != "O"}
        for split in ("train", "dev"):
            unknown = {e[0] for ex in data.get(split, ()) for e in ex.entities} - known
            if unknown:
                raise UsageError(f"{split} file: entity types the model has no tags for: {sorted(unknown)}")
        self.tag_map = {t: i for i, t in enumerate(self.labels)}

    def train_data(self, examples):
        features, y, _ = window_features(self.encoded, self.tokenizer, self.tag_map, self.opts.max_seq_length)
        return features, y

    def _predict(self, examples, batch_size):
        encoded, _ = encode(examples, self.tokenizer, self.opts.max_seq_length, self.opts.tag_scheme)
        features, labels, owners = window_features(encoded, self.tokenizer, self.tag_map, self.opts.max_seq_length)
        logits = finetuning.predict_batches(self.model, features, batch_size)  # [F, S, C]
        predicted = [[self.labels[i] for i in row] for row in np.argmax(logits, axis=-1)]
        return assemble_predictions(encoded, owners, labels, predicted)

    def evaluate(self, examples, output_dir=None):
        predictions = self._predict(examples, self.opts.eval_batch_size)
        metrics = ner_metrics([ex.entities for ex in examples], predictions)
        if output_dir is None:  # per-epoch: the overall scores only
            return {k: v for k, v in metrics.items() if k != "per_type"}
        write_predictions(os.path.join(output_dir, "dev_predictions.json"), examples, predictions)
        return dict(metrics, task="ner", n=len(examples))

    def predict(self, examples, output_dir):
        out = os.path.join(output_dir, "test_predictions.json")
        write_predictions(out, examples, self._predict(examples, self.opts.predict_batch_size))
        return out


def run(opts):
    """Runs train/eval/predict as the parsed flags `opts` ask. Returns the dev metrics dict."""
    return finetuning.run(opts, NerTask(opts))


EXAMPLE = ("python run_ner.py --data_dir=../shared/data/cluener2020 --dev_file=train.json "
           "--vocab_file=../shared/data/vocab/vocab.txt --bert_config_file=resources/bert_config_L2_H128.json "
           "--do_train=true --do_eval=true --output_dir=/tmp/cluener")

if __name__ == "__main__":
    train_utils.run_script(finetuning.main(NerTask), __doc__, EXAMPLE, define_flags)
