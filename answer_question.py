"""Answers a question from a context with an extractive-QA model (CMRC2018-style span answers).

    python answer_question.py --checkpoint=out/cmrc/best --question="中国的首都是哪里？" \
        --context="北京是中华人民共和国的首都，也是全国的政治中心。"
    北京

The QA path for transformers 5, which removed the question-answering pipeline: --checkpoint is a
model folder of ours (run_cmrc.py's best/, model_folder.py), a Google TF1 SQuAD-style checkpoint, or
a HuggingFace BertForQuestionAnswering folder (export_to_pytorch.py --task=qa, or transformers' own).
The context is cut into windows of --max_seq_length tokens every --doc_stride tokens and the answer
is the best span over all windows, exactly as run_cmrc.py predicts (its windowing and span decoding
are used here). `--input_file` takes JSON lines {"question": ..., "context": ...} and prints one
JSON line {"question", "answer"} each.
"""

import json
import sys
import types

import train_utils  # first: it hides TensorFlow's C++ start-up lines

# isort: split

from absl import flags

import convert_checkpoint
import finetuning
import run_cmrc
import tokenization


def load_qa_model(checkpoint, bert_config_file=None, vocab_file=None, do_lower_case=None):
    """Returns (BertSpanQA with every weight restored, FullTokenizer) from any model folder."""
    model, found = convert_checkpoint.load_model(checkpoint, "qa", bert_config_file, vocab_file)
    do_lower_case = found.do_lower_case if do_lower_case is None else do_lower_case
    return model, tokenization.FullTokenizer(found.vocab_file, do_lower_case)


def answer(model, tokenizer, pairs, max_seq_length=384, doc_stride=128, max_query_length=64,
           max_answer_length=30, n_best_size=20, batch_size=8):
    """[(question, context)] -> [answer text] ("" when no span fits), via run_cmrc's decoding."""
    if max_seq_length > model.config.max_position_embeddings:
        raise ValueError(f"--max_seq_length={max_seq_length} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}")
    if max_seq_length - max_query_length - 3 < 1:
        raise ValueError(f"--max_seq_length={max_seq_length} leaves no room for the context after "
                         f"--max_query_length={max_query_length}")
    examples = [run_cmrc.QAExample(str(i), q, c, [], -1, "") for i, (q, c) in enumerate(pairs)]
    opts = types.SimpleNamespace(max_seq_length=max_seq_length, doc_stride=doc_stride,
                                 max_query_length=max_query_length)
    features, _, infos = run_cmrc.convert_examples(examples, tokenizer, opts, training=False)
    start_logits, end_logits = finetuning.predict_batches(model, features, batch_size)
    best = run_cmrc.best_answers(examples, infos, start_logits, end_logits, n_best_size, max_answer_length)
    return [best[ex.qid] for ex in examples]


def read_pairs(path):
    """JSON lines {"question", "context"} -> [(question, context)]; errors name the line."""
    pairs = []
    for n, row in finetuning.json_lines(path):
        if not all(isinstance(row.get(k), str) for k in ("question", "context")):
            raise ValueError(f"{path}:{n}: expected {{\"question\": str, \"context\": str}}")
        pairs.append((row["question"], row["context"]))
    if not pairs:
        raise ValueError(f"{path}: no questions")
    return pairs


EXAMPLE = ("python answer_question.py --checkpoint=out/cmrc/best --question='中国的首都是哪里？' "
           "--context='北京是中华人民共和国的首都。'")


def define_flags(fv=flags.FLAGS):
    with train_utils.flag_group("Model", fv):
        flags.DEFINE_string("checkpoint", None, "A QA model folder (run_cmrc.py's best/, a HuggingFace "
                            "BertForQuestionAnswering folder) or a checkpoint prefix.", flag_values=fv)
        flags.DEFINE_string("bert_config_file", None, "bert_config.json (default: the folder's).", flag_values=fv)
        flags.DEFINE_string("vocab_file", None, "vocab.txt (default: the folder's).", flag_values=fv)
        flags.DEFINE_bool("do_lower_case", None, "Default: the folder's setting, else true.", flag_values=fv)
    with train_utils.flag_group("Question", fv):
        flags.DEFINE_string("question", None, "The question.", flag_values=fv)
        flags.DEFINE_string("context", None, "The text to find the answer in.", flag_values=fv)
        flags.DEFINE_string("input_file", None, "Instead: JSON lines {\"question\", \"context\"}.", flag_values=fv)
    with train_utils.flag_group("Windows and spans (as in run_cmrc.py)", fv):
        flags.DEFINE_integer("max_seq_length", 384, "Tokens per window.", flag_values=fv)
        flags.DEFINE_integer("doc_stride", 128, "Tokens between window starts.", flag_values=fv)
        flags.DEFINE_integer("max_query_length", 64, "Question tokens kept.", flag_values=fv)
        flags.DEFINE_integer("max_answer_length", 30, "Longest answer in tokens.", flag_values=fv)
        flags.DEFINE_integer("n_best_size", 20, "Start/end candidates per window.", flag_values=fv)
    train_utils.require_flags("checkpoint")


def main(argv):
    fv = flags.FLAGS
    if bool(fv.input_file) == bool(fv.question and fv.context):
        raise train_utils.UsageError("give --question and --context, or --input_file (not both)")
    pairs = read_pairs(fv.input_file) if fv.input_file else [(fv.question, fv.context)]
    model, tokenizer = load_qa_model(fv.checkpoint, fv.bert_config_file, fv.vocab_file, fv.do_lower_case)
    answers = answer(model, tokenizer, pairs, fv.max_seq_length, fv.doc_stride, fv.max_query_length,
                     fv.max_answer_length, fv.n_best_size)
    if fv.input_file:
        for (question, _), text in zip(pairs, answers):
            print(json.dumps({"question": question, "answer": text}, ensure_ascii=False))
    else:
        print(answers[0])
    sys.stdout.flush()


if __name__ == "__main__":
    train_utils.run_script(main, __doc__, EXAMPLE, define_flags, input_errors=(ValueError, OSError))
