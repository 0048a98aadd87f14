"""Fine-tunes BERT/RoBERTa for extractive QA on SQuAD-format JSON (CMRC2018, DRCD).

    python run_cmrc.py --data_dir=../shared/data/cmrc2018 --train_file=train.json \
      --dev_file=trial.json --vocab_file=vocab.txt --bert_config_file=bert_config.json \
      --init_checkpoint=... --do_train --do_eval --max_seq_length=384 --doc_stride=128 \
      --max_query_length=64 --max_answer_length=30 --n_best_size=20 --output_dir=/tmp/cmrc

Input is `[CLS] question [SEP] context-window [SEP]`; a context longer than the window is covered by
windows every --doc_stride tokens. Training uses each question's first answer; a window that does not
contain it points at [CLS]. Answers whose text does not match `answer_start` are counted, skipped and
reported. Prediction takes the best (start, end) over all windows (start must be in its max-context
window). --do_eval writes predictions.json ({id: answer}) and scores it with the official CMRC2018
metric: EM and character-level F1 with punctuation removed, each the max over all reference answers.
"""

import dataclasses
import json
import os
import re

import numpy as np
from absl import flags, logging

import finetune_utils
import modeling
import tokenization
import train_utils


@dataclasses.dataclass
class QAExample:
    qid: str
    question: str
    context: str
    answers: list  # all reference answer texts (for the metric)
    answer_start: int  # char offset of the first answer, -1 when absent or mismatched
    answer_text: str


@dataclasses.dataclass
class QAOptions(finetune_utils.FinetuneOptions):
    max_seq_length: int = 384
    doc_stride: int = 128
    max_query_length: int = 64
    max_answer_length: int = 30
    n_best_size: int = 20


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------


def read_squad(path):
    """Reads SQuAD-format JSON. Returns (examples, n_mismatched).

    A first answer whose text is not `context[answer_start:answer_start + len(text)]` is counted in
    n_mismatched and its answer_start is set to -1 (not trained on; still a reference for the metric).
    Raises ValueError naming the file and question id for missing fields, and for a file without
    questions.
    """
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"{path}: empty file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{path}: no top-level \"data\" list (SQuAD format expected)")
    examples, mismatched = [], 0
    for a, article in enumerate(data["data"]):
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            context = paragraph.get("context")
            if not isinstance(context, str):
                raise ValueError(f"{path}: data[{a}].paragraphs[{p}] has no \"context\" string")
            for qa in paragraph.get("qas", []):
                qid = qa.get("id")
                if qid is None or not isinstance(qa.get("question"), str):
                    raise ValueError(f"{path}: a question in data[{a}].paragraphs[{p}] has no id/question")
                answers = qa.get("answers") or []
                texts = [str(ans.get("text", "")) for ans in answers]
                start, text = -1, ""
                if answers:
                    first = answers[0]
                    text = texts[0]
                    if not isinstance(first.get("answer_start"), int):
                        raise ValueError(f"{path}: question {qid}: answer has no integer answer_start")
                    s = first["answer_start"]
                    if text and s >= 0 and context[s:s + len(text)] == text:
                        start = s
                    else:
                        mismatched += 1
                        logging.warning("%s: question %s: answer %r does not occur at offset %d; skipped "
                                        "for training", path, qid, text, s)
                examples.append(QAExample(str(qid), qa["question"], context, texts, start, text))
    if not examples:
        raise ValueError(f"{path}: no questions (empty file?)")
    return examples, mismatched


# ---------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class WindowInfo:
    example: int  # index into the examples
    doc_offset: int  # position of the first context token in the sequence
    spans: list  # [(char_start, char_end)] of the window's context tokens
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
        c_tokens, c_spans = finetune_utils.tokenize_with_offsets(tokenizer, ex.context)
        window = opts.max_seq_length - len(q_tokens) - 3
        windows = finetune_utils.doc_windows(len(c_tokens), window, opts.doc_stride)
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
            infos.append(WindowInfo(i, doc_offset, c_spans[start:start + length],
                                    [finetune_utils.max_context_window(windows, p) == w
                                     for p in range(start, start + length)]))
            if training:
                inside = start <= covered[0] and covered[-1] < start + length
                starts.append(doc_offset + covered[0] - start if inside else 0)
                ends.append(doc_offset + covered[-1] - start if inside else 0)
    features = finetune_utils.pad_features(rows, opts.max_seq_length)
    positions = (np.array(starts, np.int32), np.array(ends, np.int32)) if training else None
    return features, positions, infos


def best_answers(examples, infos, start_logits, end_logits, n_best_size, max_answer_length):
    """Chooses each example's answer over all its windows.

    start_logits, end_logits: [F, S]. Candidates: the n_best starts x n_best ends of each window that
    lie in the context, with the start in its max-context window, end >= start and at most
    max_answer_length tokens; score = start + end logit. Returns {qid: answer text} ("" if none).
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
# Driver
# ---------------------------------------------------------------------------------------------------


def run(opts):
    """Runs train/eval/predict as asked by `opts` (QAOptions). Returns the dev metrics dict."""
    finetune_utils.check_options(opts)
    if opts.max_seq_length - opts.max_query_length - 3 <= 0:
        raise ValueError(f"--max_seq_length={opts.max_seq_length} leaves no room after "
                         f"--max_query_length={opts.max_query_length}")
    paths = {name: finetune_utils.resolve_path(opts, name) for name in ("train_file", "dev_file", "test_file")}
    os.makedirs(opts.output_dir, exist_ok=True)
    tokenizer = tokenization.FullTokenizer(opts.vocab_file, do_lower_case=opts.do_lower_case)
    train, n_mismatched = read_squad(paths["train_file"]) if opts.do_train else (None, 0)
    dev = read_squad(paths["dev_file"])[0] if opts.do_eval else None
    test = read_squad(paths["test_file"])[0] if opts.do_predict else None

    strategy = finetune_utils.setup_runtime(opts)
    model = finetune_utils.build_task_model(opts, strategy, modeling.BertSpanQA)

    def predict(examples):
        features, _, infos = convert_examples(examples, tokenizer, opts, training=False)
        start_logits, end_logits = finetune_utils.predict_batches(model, features, opts.eval_batch_size)
        return best_answers(examples, infos, start_logits, end_logits, opts.n_best_size, opts.max_answer_length)

    def evaluate():
        return cmrc_metrics(dev, predict(dev))

    summary = {}
    if opts.do_train:
        features, (starts, ends), _ = convert_examples(train, tokenizer, opts, training=True)
        summary = {"train_questions": len(train), "train_answers_mismatched_skipped": n_mismatched,
                   "train_windows": len(starts)}
        logging.info("training data: %s", summary)
        ds = finetune_utils.make_dataset(features, (starts, ends), opts.train_batch_size, shuffle=True,
                                         seed=opts.seed, drop_remainder=len(starts) >= opts.train_batch_size)
        finetune_utils.train_and_keep_best(
            model, opts, strategy, ds, len(starts), [finetune_utils.masked_sparse_ce] * 2,
            evaluate if dev else None, key="f1")
    metrics = {}
    if dev:
        predictions = predict(dev)
        with open(os.path.join(opts.output_dir, "predictions.json"), "w", encoding="utf-8") as f:
            json.dump(predictions, f, ensure_ascii=False, indent=1)
        metrics = dict(cmrc_metrics(dev, predictions), task="cmrc", split=os.path.basename(paths["dev_file"]),
                       **summary)
        finetune_utils.write_metrics(opts, metrics)
    if test:
        out = os.path.join(opts.output_dir, "test_predictions.json")
        with open(out, "w", encoding="utf-8") as f:
            json.dump(predict(test), f, ensure_ascii=False, indent=1)
        logging.info("wrote %d predictions to %s", len(test), out)
    return metrics


def main(argv):
    del argv
    try:
        run(finetune_utils.options_from_flags(QAOptions))
    except ValueError as e:
        raise SystemExit(f"run_cmrc.py: error: {e}") from None


if __name__ == "__main__":
    finetune_utils.define_common_flags(defaults={"max_seq_length": 384})
    with train_utils.flag_group("Question answering"):
        flags.DEFINE_integer("doc_stride", 128, "Tokens between the starts of consecutive context windows.")
        flags.DEFINE_integer("max_query_length", 64, "Question tokens kept.")
        flags.DEFINE_integer("max_answer_length", 30, "Longest answer, in tokens.")
        flags.DEFINE_integer("n_best_size", 20, "Start/end candidates per window.")
    train_utils.run_script(main, __doc__, ("python run_cmrc.py --data_dir=../shared/data/cmrc2018 --train_file=train.json "
                           "--dev_file=trial.json --vocab_file=../shared/data/vocab/vocab.txt "
                           "--bert_config_file=resources/bert_config_L2_H128.json --do_train --do_eval "
                           "--output_dir=/tmp/cmrc"))
