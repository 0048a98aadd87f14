"""Reads a pretraining corpus: input files -> documents of sentences -> chunks of documents.

Google's corpus format (one sentence per line, a blank line between documents) or one document per
line (`doc_per_line`, split into sentences at 。！？!?；…); plain, .gz, .bz2 or .xz; streamed, never
held whole. Files that are not UTF-8 are refused before anything is written (with the likely
encoding); the odd invalid byte in a UTF-8 file is replaced, counted and reported.

Used by the local generator (create_pretraining_data.py) and its Beam pipeline
(beam_pretraining_data.py), which cut the same chunks.
"""

import bz2
import glob
import gzip
import lzma
import os
import re

from train_utils import UsageError

INPUT_FORMATS = ("sentence_per_line", "doc_per_line")
# A chunk is the unit of work sent to a worker and the unit of output shuffling. Its size depends only
# on the input (never on the worker count), which keeps the output identical for any --num_workers.
DOCS_PER_CHUNK = 256
CHARS_PER_CHUNK = 1 << 20


def resolve_input_files(spec):
    """`--input_file` comma list with globs -> sorted, de-duplicated list of existing, non-empty files."""
    paths = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise UsageError(f"--input_file: pattern {item!r} matched no files")
        else:
            matches = [item]
        for path in matches:
            if not os.path.exists(path):
                raise UsageError(f"--input_file: file not found: {path}")
            if os.path.isdir(path):
                raise UsageError(f"--input_file: {path} is a directory (give files or a glob)")
            if not os.path.isfile(path):
                # A pipe (`<(xzcat ...)`) could be read once, but the encoding check reads the start
                # of every file before the corpus is read.
                raise UsageError(f"--input_file: {path} is not a regular file (a pipe?); write it to a "
                                 "file first (.gz/.xz/.bz2 are read directly)")
            if os.path.getsize(path) == 0:
                raise UsageError(f"--input_file: {path} is empty")
            if path not in paths:
                paths.append(path)
    if not paths:
        raise UsageError("--input_file is required")
    return paths


def _open_binary(path):
    """Returns (raw file, decompressed binary stream); raw.tell() measures progress in input bytes."""
    raw = open(path, "rb")
    if path.endswith(".xz"):
        return raw, lzma.open(raw)
    if path.endswith(".gz"):
        return raw, gzip.open(raw)
    if path.endswith(".bz2"):
        return raw, bz2.open(raw)
    return raw, raw


# A sentence ends after a run of end marks plus any closing quotes/brackets.
_SENTENCE_RE = re.compile(r".*?(?:[。！？!?；…]+[”’」』）)\]\"']*|$)", re.S)


def split_sentences(text):
    """'他来了。你呢？好' -> ['他来了。', '你呢？', '好']; the pieces concatenate back to `text`."""
    return [s for s in _SENTENCE_RE.findall(text) if s.strip()]


# A file is refused as not UTF-8 when invalid byte sequences are more than this share of its bytes
# (in two lines or more; one bad line says nothing about the encoding). The odd broken character in
# UTF-8 text stays far below it: one per 100 bytes would break nearly every line of Chinese text.
# GBK or Big5 text read as UTF-8 is 30-90% invalid, Latin-1 text with accents a few percent.
MAX_INVALID_UTF8_SHARE = 0.01
# Before anything is written, this much of every input file is checked with the same rule.
ENCODING_CHECK_BYTES = 1 << 20


class _Utf8Lines:
    """Decodes one file's lines as UTF-8 (invalid bytes -> U+FFFD) and counts what was replaced."""

    def __init__(self, path):
        self.path = path
        self.bytes = self.replaced = self.bad_lines = 0
        self.first_bad_line = None
        self.sample = b""  # bytes from the first invalid line on, to guess the encoding from

    def decode(self, line, line_no):
        self.bytes += len(line)
        if self.first_bad_line is not None and len(self.sample) < 1 << 16:
            self.sample += line
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError:
            text = line.decode("utf-8", "replace")
            # Count only the replacements we made, not U+FFFD characters that were in the file.
            self.replaced += text.count("\ufffd") - line.count("\ufffd".encode("utf-8"))
            self.bad_lines += 1
            if self.first_bad_line is None:
                self.first_bad_line = line_no
                self.sample = line
            return text

    def check(self):
        """Raises UsageError (one line) when the file is evidently in another encoding."""
        if self.bad_lines < 2 or self.replaced <= MAX_INVALID_UTF8_SHARE * self.bytes:
            return
        raise UsageError(
            f"--input_file: {self.path} is not UTF-8: line {self.first_bad_line} is the first of "
            f"{self.bad_lines} lines with invalid bytes ({self.replaced / self.bytes:.0%} of the "
            f"{self.bytes} bytes read); {_guess_encoding(self.sample)}")


def _guess_encoding(sample):
    """What to tell the user about the encoding of `sample`, by charset_normalizer.

    Short samples can be ambiguous (a few GBK characters decode as Korean CP949 just as well); then
    the equally likely encodings are all named. Names are spelled as iconv accepts them.
    """
    import charset_normalizer

    matches = list(charset_normalizer.from_bytes(sample))
    if not matches:
        return "its encoding is not recognised (binary or compressed data?)"
    tied = [m.encoding.upper().replace("_", "-") for m in matches
            if (m.chaos, m.coherence) == (matches[0].chaos, matches[0].coherence)][:3]
    named = tied[0] if len(tied) == 1 else "one of " + ", ".join(tied)
    return (f"likely encoding {named}; convert it to UTF-8 first "
            f"(e.g. iconv -f {tied[0] if len(tied) == 1 else 'ENCODING'} -t UTF-8)")


class InputReader:
    """Streams documents out of the input files; counts bytes read and invalid UTF-8 replaced.

    A document is `(path_index, [(line_number, sentence), ...])`. Documents never span files.
    Raises UsageError naming the file, its first bad line and the likely encoding when a file is not
    UTF-8 (see MAX_INVALID_UTF8_SHARE): for the first ENCODING_CHECK_BYTES of every file already when
    constructed, before any output is opened; for the rest when the file has been read, which is
    still before any output is renamed into place.
    """

    def __init__(self, paths, input_format):
        self.paths = paths
        self.input_format = input_format
        self.bytes_done_in_closed_files = 0
        self._raw = None
        self.replaced_chars = 0
        self.first_replacement = None  # "file:line"
        self.docs_per_file = [0] * len(paths)
        self.text_bytes = 0  # decompressed
        for path in paths:
            self._check_encoding(path)

    @property
    def bytes_done(self):
        return self.bytes_done_in_closed_files + (self._raw.tell() if self._raw else 0)

    @staticmethod
    def _check_encoding(path):
        lines = _Utf8Lines(path)
        raw, stream = _open_binary(path)
        try:
            for line_no, line in enumerate(stream, 1):
                lines.decode(line, line_no)
                if lines.bytes >= ENCODING_CHECK_BYTES:
                    break
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise UsageError(f"--input_file: cannot read {path}: {e}") from None
        finally:
            stream.close()
            raw.close()
        lines.check()

    def documents(self):
        for path_index, path in enumerate(self.paths):
            raw, stream = _open_binary(path)
            self._raw = raw
            lines = _Utf8Lines(path)
            try:
                sentences, chars = [], 0
                for line_no, line in enumerate(stream, 1):
                    self.text_bytes += len(line)
                    text = lines.decode(line, line_no).strip()
                    if self.input_format == "doc_per_line":
                        if text:
                            self.docs_per_file[path_index] += 1
                            yield path_index, [(line_no, s) for s in split_sentences(text)]
                    elif text:
                        sentences.append((line_no, text))
                        chars += len(text)
                        # A giant "document" (e.g. a file without blank lines) is cut into parts
                        # so that memory stays bounded; parts are packed like documents.
                        if chars >= CHARS_PER_CHUNK:
                            self.docs_per_file[path_index] += 1
                            yield path_index, sentences
                            sentences, chars = [], 0
                    elif sentences:
                        self.docs_per_file[path_index] += 1
                        yield path_index, sentences
                        sentences, chars = [], 0
                lines.check()
                self.replaced_chars += lines.replaced
                if self.first_replacement is None and lines.first_bad_line is not None:
                    self.first_replacement = f"{path}:{lines.first_bad_line}"
                if sentences:
                    self.docs_per_file[path_index] += 1
                    yield path_index, sentences
            except (OSError, EOFError, lzma.LZMAError) as e:
                raise UsageError(f"--input_file: cannot read {path}: {e}") from None
            finally:
                self.bytes_done_in_closed_files += os.path.getsize(path)
                self._raw = None
                stream.close()
                raw.close()

    def chunks(self):
        """Yields (chunk_index, first_doc_index, [document, ...]) in input order."""
        chunk, chars, chunk_index, doc_index = [], 0, 0, 0
        for doc in self.documents():
            chunk.append(doc)
            chars += sum(len(s) for _, s in doc[1])
            if len(chunk) >= DOCS_PER_CHUNK or chars >= CHARS_PER_CHUNK:
                yield chunk_index, doc_index, chunk
                doc_index += len(chunk)
                chunk_index += 1
                chunk, chars = [], 0
        if chunk:
            yield chunk_index, doc_index, chunk
