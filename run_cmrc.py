r"""Fine-tunes BERT/RoBERTa for extractive QA on SQuAD-format JSON (CMRC2018, DRCD).

    python run_cmrc.py --data_dir=cmrc2018 --init_checkpoint=chinese_L-12_H-768_A-12 \
      --do_train=true --do_eval=true --max_seq_length=384 --doc_stride=128 --max_query_length=64 \
      --max_answer_length=30 --n_best_size=20 --learning_rate=3e-5 --output_dir=out/cmrc

With --data_dir and no file flags: cmrc2018_train.json / cmrc2018_dev.json (the release's names), else
train.json / dev.json / trial.json (CLUE's packaging); dev never falls back to test.

Input is `[CLS] question [SEP] context-window [SEP]`; a context longer than the window is covered by
windows every --doc_stride tokens. Training uses each question's first answer; a window that does not
contain it points at [CLS]. Questions that cannot be trained on (no answer, a blank answer, an answer
not at its `answer_start`) and dev questions without a reference are counted and reported in the log
and the metrics JSON ("skipped"), never dropped silently. Prediction takes the best (start, end) over all windows (start must be in its max-context
window). --do_eval writes predictions.json ({id: answer}) and scores it with the official CMRC2018
metric: EM and character-level F1 with punctuation removed, each the max over all reference answers.
The best model on dev is kept in output_dir/best/ (a model folder export_to_pytorch.py reads alone).
"""

import dataclasses
import json
import os
import re
from collections import Counter

import train_utils  # first: it hides TensorFlow's C++ start-up lines

# isort: split

import numpy as np
from absl import flags

import finetuning
from train_utils import UsageError


@dataclasses.dataclass
class QAExample:
    qid: str
    question: str
    context: str
    answers: list  # all reference answer texts (for the metric)
    answer_start: int  # char offset of the first answer, -1 when absent or mismatched
    answer_text: str


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------


def read_squad(path, split="train"):
    """Reads SQuAD-format JSON -> (examples, Counter of skipped questions by reason).

    Questions that cannot be trained on are counted, never dropped silently: no answer
    (`answers: []`), a blank answer, or a first answer whose text is not at `answer_start` (kept as a
    reference for the metric, answer_start -1). In a dev file, questions without any reference
    answer are not scored and are counted. UsageError naming the file and question id for missing
    fields or wrong types, and for a file without questions.
    """
    text = finetuning.read_text(path)
    if not text.strip():
        raise UsageError(f"{path}: empty file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise UsageError(f"{path}: no top-level \"data\" list (SQuAD format expected)")
    examples, skipped = [], Counter()
    for a, article in enumerate(data["data"]):
        for p, paragraph in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else ()):
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            if not isinstance(context, str):
                raise UsageError(f"{path}: data[{a}].paragraphs[{p}] has no \"context\" string")
            for qa in paragraph.get("qas", []):
                qid = qa.get("id") if isinstance(qa, dict) else None
                if qid is None or not isinstance(qa.get("question"), str):
                    raise UsageError(f"{path}: a question in data[{a}].paragraphs[{p}] has no id/question")
                answers = qa.get("answers") or []
                if not isinstance(answers, list) or not all(isinstance(x, dict) for x in answers):
                    raise UsageError(f"{path}: question {qid}: \"answers\" must be a list of objects "
                                     f"{{\"text\", \"answer_start\"}}, got {json.dumps(answers, ensure_ascii=False)[:60]}")
                texts = [str(ans.get("text", "")) for ans in answers]
                references = [t for t in texts if t.strip()]
                start, first = -1, texts[0] if texts else ""
                if split == "dev" and not references:
                    skipped["questions without a (non-blank) answer: not scored"] += 1
                    continue
                if split == "train":
                    if not texts:
                        skipped["questions without an answer"] += 1
                    elif not first.strip():
                        skipped["questions whose first answer is blank"] += 1
                    elif not isinstance(answers[0].get("answer_start"), int):
                        raise UsageError(f"{path}: question {qid}: answer has no integer answer_start")
                    elif (answers[0]["answer_start"] >= 0 and
                          context[answers[0]["answer_start"]:answers[0]["answer_start"] + len(first)] == first):
                        start = answers[0]["answer_start"]
                    else:
                        skipped["answers not found at their answer_start (kept as references)"] += 1
                examples.append(QAExample(str(qid), qa["question"], context, references, start, first))
    if not examples:
        raise UsageError(f"{path}: no questions (empty file?)")
    return examples, skipped


# ---------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class WindowInfo:
    example: int  # index into the examples
    doc_offset: int  # position of the first context token in the sequence
    spans: list  # [(char_start, char_end)] of the whole word each of the window's context tokens is in
    max_context: list  # [bool] per context token: is this its max-context window


def convert_examples(examples, tokenizer, opts, training):
    """Builds windowed features.

    Returns (features dict [F, S] int32, (start [F], end [F]) int32 positions or None, list[WindowInfo]).
    In training, examples without a usable answer are skipped, and windows not containing the answer
    get start = end = 0 ([CLS]).
    """
    rows, starts, ends, infos = [], [], [], []
    for i, ex in enumerate(examples):
        if training and ex.answer_start < 0:
            continue
        q_tokens = tokenizer.tokenize(ex.question)[:opts.max_query_length]
        # Answers are cut at word spans: a span starting at "##xon" in "Nexon" gives "Nexon", as
        # transformers' QA pipeline does; training targets cover the answer's own tokens (c_spans).
        c_tokens, c_spans, word_spans = tokenizer.tokenize_with_word_spans(ex.context)
        window = opts.max_seq_length - len(q_tokens) - 3
        windows = finetuning.doc_windows(len(c_tokens), window, opts.doc_stride)
        if training:  # tokens overlapping the answer's characters
            a_start, a_end = ex.answer_start, ex.answer_start + len(ex.answer_text)
            covered = [t for t, (s, e) in enumerate(c_spans) if s < a_end and e > a_start]
            if not covered:
                continue
        for w, (start, length) in enumerate(windows):
            tokens = ["[CLS]"] + q_tokens + ["[SEP]"] + c_tokens[start:start + length] + ["[SEP]"]
            segments = [0] * (len(q_tokens) + 2) + [1] * (length + 1)
            rows.append((tokenizer.convert_tokens_to_ids(tokens), segments))
            doc_offset = len(q_tokens) + 2
            infos.append(WindowInfo(i, doc_offset, word_spans[start:start + length],
                                    [finetuning.max_context_window(windows, p) == w
                                     for p in range(start, start + length)]))
            if training:
                inside = start <= covered[0] and covered[-1] < start + length
                starts.append(doc_offset + covered[0] - start if inside else 0)
                ends.append(doc_offset + covered[-1] - start if inside else 0)
    features = finetuning.pad_features(rows, opts.max_seq_length)
    positions = (np.array(starts, np.int32), np.array(ends, np.int32)) if training else None
    return features, positions, infos


def best_answers(examples, infos, start_logits, end_logits, n_best_size, max_answer_length):
    """Chooses each example's answer over all its windows.

    start_logits, end_logits: [F, S]. Candidates: the n_best starts x n_best ends of each window that
    lie in the context, with the start in its max-context window, end >= start and at most
    max_answer_length tokens; score = start + end logit. The text runs from the start of the start
    token's word to the end of the end token's word. Returns {qid: answer text} ("" if none).
    """
    best = {}  # example index -> (score, text)
    for f, info in enumerate(infos):
        n_doc = len(info.spans)
        top_starts = np.argsort(start_logits[f])[::-1][:n_best_size]
        top_ends = np.argsort(end_logits[f])[::-1][:n_best_size]
        for s in top_starts:
            ds = s - info.doc_offset
            if not 0 <= ds < n_doc or not info.max_context[ds]:
                continue
            for e in top_ends:
                de = e - info.doc_offset
                if not ds <= de < n_doc or de - ds + 1 > max_answer_length:
                    continue
                score = float(start_logits[f][s] + end_logits[f][e])
                if info.example not in best or score > best[info.example][0]:
                    context = examples[info.example].context
                    best[info.example] = (score, context[info.spans[ds][0]:info.spans[de][1]])
    return {ex.qid: best.get(i, (0.0, ""))[1] for i, ex in enumerate(examples)}


# ---------------------------------------------------------------------------------------------------
# The official CMRC2018 metric (re-implemented from its definition)
# ---------------------------------------------------------------------------------------------------

# The official script's punctuation list. Its "……" entry is two characters and never equals a single
# character, so a lone "…" is kept, exactly as in the official scorer.
CMRC_PUNCTUATION = frozenset(["-", ":", "_", "*", "^", "/", "\\", "~", "`", "+", "=", "，", "。", "：",
                              "？", "！", "“", "”", "；", "’", "《", "》", "……", "·", "、", "「", "」",
                              "（", "）", "－", "～", "『", "』"])
_CJK = re.compile(r"[\u4e00-\u9fa5]")
# The official scorer splits non-Chinese runs with nltk.word_tokenize; words and single symbols are
# the same split for the text CMRC answers contain (numbers, latin names, units).
_NON_CJK_WORD = re.compile(r"\w+(?:[.,']\w+)*|[^\w\s]", re.UNICODE)


def cmrc_segments(text, remove_punctuation=True):
    """Lower-cased text -> Chinese characters (one segment each) and non-Chinese words.

    cmrc_segments("2019年，Apple Inc.") -> ["2019", "年", "apple", "inc", "."]
    """
    segments, run = [], ""
    for ch in str(text).lower().strip():
        if remove_punctuation and ch in CMRC_PUNCTUATION:
            continue
        if _CJK.match(ch) or ch in CMRC_PUNCTUATION:
            segments.extend(_NON_CJK_WORD.findall(run))
            run = ""
            segments.append(ch)
        else:
            run += ch
    segments.extend(_NON_CJK_WORD.findall(run))
    return segments


def _longest_common_run(a, b):
    """Length of the longest common contiguous run of two lists (the official 'LCS')."""
    best, prev = 0, [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b):
            if x == y:
                cur[j + 1] = prev[j] + 1
                best = max(best, cur[j + 1])
        prev = cur
    return best


def cmrc_f1(references, prediction):
    """Max over references of the F1 of the longest common run of segments (punctuation removed)."""
    pred = cmrc_segments(prediction)
    scores = [0.0]
    for ref in references:
        ref_segs = cmrc_segments(ref)
        common = _longest_common_run(ref_segs, pred)
        if common:
            precision, recall = common / len(pred), common / len(ref_segs)
            scores.append(2 * precision * recall / (precision + recall))
    return max(scores)


def cmrc_em(references, prediction):
    """1.0 if the prediction equals any reference after lower-casing, stripping and removing punctuation."""
    def norm(s):
        return "".join(ch for ch in str(s).lower().strip() if ch not in CMRC_PUNCTUATION)
    return float(any(norm(ref) == norm(prediction) for ref in references))


def cmrc_metrics(examples, predictions):
    """{"f1", "em"} in percent over all examples (a missing prediction scores 0), plus counts."""
    f1 = em = 0.0
    for ex in examples:
        prediction = predictions.get(ex.qid)
        if prediction is None:
            continue
        f1 += cmrc_f1(ex.answers, prediction)
        em += cmrc_em(ex.answers, prediction)
    n = len(examples)
    return {"f1": 100.0 * f1 / n, "em": 100.0 * em / n, "average": 50.0 * (f1 + em) / n, "total": n,
            "skip": sum(ex.qid not in predictions for ex in examples)}


# ---------------------------------------------------------------------------------------------------
# The task for the shared driver
# ---------------------------------------------------------------------------------------------------


def define_flags(fv=flags.FLAGS):
    finetuning.define_flags(fv, max_seq_length=384)
    with train_utils.flag_group("Question answering", fv):
        def integer(name, default, text):
            flags.DEFINE_integer(name, default, text, flag_values=fv)
        integer("doc_stride", 128, "Tokens between the starts of consecutive context windows.")
        integer("max_query_length", 64, "Question tokens kept.")
        integer("max_answer_length", 30, "Longest answer, in tokens.")
        integer("n_best_size", 20, "Start/end candidates per window.")


class QATask(finetuning.Task):
    kind, key = "qa", "f1"
    # CMRC2018's release names, then CLUE's packaging (whose dev set is trial.json when dev.json
    # is held out).
    file_names = {"train": ("cmrc2018_train.json", "train.json"),
                  "dev": ("cmrc2018_dev.json", "dev.json", "trial.json", "cmrc2018_trial.json"),
                  "test": ("cmrc2018_test.json", "test.json")}
    prediction_files = ("predictions.json", "test_predictions.json")

    def check(self):
        opts = self.opts
        if opts.max_seq_length - opts.max_query_length - 3 <= 0:
            raise UsageError(f"--max_seq_length={opts.max_seq_length} leaves no room after "
                             f"--max_query_length={opts.max_query_length}")
        for name in ("doc_stride", "max_answer_length", "n_best_size"):
            if opts[name].value < 1:
                raise UsageError(f"--{name} must be >= 1, got {opts[name].value}")

    def read(self, path, split):
        examples, skipped = read_squad(path, split)
        if split == "train":
            self.features, self.positions, infos = convert_examples(examples, self.tokenizer, self.opts,
                                                                    training=True)
            uncovered = sum(ex.answer_start >= 0 for ex in examples) - len({i.example for i in infos})
            if uncovered:
                skipped["answers covering no token (whitespace only)"] += uncovered
            self.summary = {"train_questions": len(examples), "train_windows": len(self.positions[0])}
        return examples, skipped

    loss = [finetuning.masked_sparse_ce] * 2

    def train_data(self, examples):
        return self.features, self.positions

    def _predict(self, examples, batch_size):
        features, _, infos = convert_examples(examples, self.tokenizer, self.opts, training=False)
        start_logits, end_logits = finetuning.predict_batches(self.model, features, batch_size)
        return best_answers(examples, infos, start_logits, end_logits, self.opts.n_best_size,
                            self.opts.max_answer_length)

    def evaluate(self, examples, output_dir=None):
        predictions = self._predict(examples, self.opts.eval_batch_size)
        if output_dir is None:
            return cmrc_metrics(examples, predictions)
        finetuning.write_text(os.path.join(output_dir, "predictions.json"),
                                  json.dumps(predictions, ensure_ascii=False, indent=1))
        return dict(cmrc_metrics(examples, predictions), task="cmrc", **getattr(self, "summary", {}))

    def predict(self, examples, output_dir):
        out = os.path.join(output_dir, "test_predictions.json")
        predictions = self._predict(examples, self.opts.predict_batch_size)
        finetuning.write_text(out, json.dumps(predictions, ensure_ascii=False, indent=1))
        return out


def run(opts):
    """Runs train/eval/predict as the parsed flags `opts` ask. Returns the dev metrics dict."""
    return finetuning.run(opts, QATask(opts))


EXAMPLE = ("python run_cmrc.py --data_dir=../shared/data/cmrc2018 --vocab_file=../shared/data/vocab/vocab.txt "
           "--bert_config_file=resources/bert_config_L2_H128.json --do_train=true --do_eval=true "
           "--output_dir=/tmp/cmrc")

if __name__ == "__main__":
    train_utils.run_script(finetuning.main(QATask), __doc__, EXAMPLE, define_flags)
