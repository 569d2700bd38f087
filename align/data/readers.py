"""Local data files read row by row in bounded memory, every unreadable row a DataIssue naming its place.

    read_jsonl(path)  where = "file:line"; a line over MAX_ROW_BYTES or nested deeper than MAX_DEPTH is a bad row
    read_json(path)   an array streamed in pieces (where = "file: row N"), or {"train": [...]} read whole
    read_csv(path)    Python's csv module, every cell text (where = "file: row N"; a ragged row names its line)

No file is read whole into memory except the {"train": [...]} form of .json, and no row is parsed
by recursion deeper than MAX_DEPTH: a hostile line is a bad row, never a RecursionError. A JSON object
naming a key twice is a bad row too (json would keep the last value silently).
"""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path

from align.data.issues import DataIssue

MAX_DEPTH = 64  # real rows nest 3 deep (messages); json's C parser recurses per level
MAX_ROW_BYTES = 16 * 1024 * 1024
_CHUNK = 1 << 20
# A JSON string (skipped whole) or a bracket: what a depth scan needs to look at.
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.S)
_SPACE = re.compile(r"\s*")


class _DuplicateKey(ValueError):
    """A JSON object naming one key twice: json keeps the last value without a word, so the row is refused."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list) -> dict:
    row = dict(pairs)
    if len(row) != len(pairs):
        seen: set = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return row


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _twice(where: str, e: _DuplicateKey) -> DataIssue:
    return DataIssue(where, None, f"key {e.key[:80]!r} appears twice in one object (JSON would keep only the "
                                  f"last); expected each field once")


def nesting_depth(text: str) -> int:
    """The deepest bracket nesting of JSON text, strings left out; iterative, so any depth is safe."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:  # cannot be too deep: skip the scan
        return 0
    depth = deepest = 0
    for m in _STRING_OR_BRACKET.finditer(text):
        token = m.group()
        if token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif token in "]}":
            depth -= 1
    return deepest


def _too_deep(where: str, text: str) -> DataIssue | None:
    if nesting_depth(text) > MAX_DEPTH:
        return DataIssue(where, None, f"JSON nested deeper than {MAX_DEPTH} levels; expected a flat row object")
    return None


def _parse_line(where: str, raw: bytes):
    """One JSONL line -> its record or a DataIssue."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return DataIssue(where, None, f"invalid UTF-8 at byte {e.start} of the line; expected UTF-8 text")
    issue = _too_deep(where, text)
    if issue:
        return issue
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as e:
        msg = e.msg.removesuffix(" at")  # json's "Invalid control character at" already ends in "at"
        return DataIssue(where, None, f"not valid JSON ({msg} at column {e.colno}); expected one JSON object per line")
    except _DuplicateKey as e:
        return _twice(where, e)


def _lines(f):
    """(line bytes, or None for a line longer than MAX_ROW_BYTES): such a line is skipped in pieces, never held."""
    while True:
        raw = f.readline(MAX_ROW_BYTES + 1)
        if not raw:
            return
        if len(raw) > MAX_ROW_BYTES and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = f.readline(_CHUNK)
            yield None
            continue
        yield raw


def read_jsonl(path: Path):
    """Yield (where, record | DataIssue). Accepts a BOM, CRLF and blank lines."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(_lines(f), 1):
            where = f"{path}:{lineno}"
            if raw is None:
                yield where, DataIssue(where, None, f"line longer than {MAX_ROW_BYTES >> 20} MiB; expected one "
                                                    f"row per line")
                continue
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            raw = raw.rstrip(b"\r\n")
            if raw.strip():
                yield where, _parse_line(where, raw)


# -- JSON arrays --------------------------------------------------------------------------------------
class _Text:
    """A decoded text buffer over a file, refilled in chunks; counts the lines of what it drops."""

    def __init__(self, f, chunk_chars: int):
        self.f, self.chunk = f, chunk_chars
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False

    def more(self, at_least: int) -> bool:
        """Append about `at_least` more characters; False at the end of the file."""
        if self.eof:
            return False
        data = self.f.read(max(at_least, self.chunk))
        decoded = self.decoder.decode(data, final=not data)  # first: bad UTF-8 leaves the place as it was
        self.line += self.buf.count("\n", 0, self.pos)  # what is dropped is done
        self.buf, self.pos, self.eof = self.buf[self.pos:] + decoded, 0, not data
        return True

    def rest(self) -> None:
        """Read the whole rest of the file into the buffer (for a value that cannot be streamed)."""
        decoded = self.decoder.decode(self.f.read(), final=True)
        self.line += self.buf.count("\n", 0, self.pos)
        self.buf, self.pos, self.eof = self.buf[self.pos:] + decoded, 0, True

    def peek(self) -> str:
        """The next non-space character ('' at the end), with pos on it."""
        while True:
            self.pos = _SPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self.more(self.chunk):
                return self.buf[self.pos:self.pos + 1]

    def where(self, path: Path, offset: int | None = None) -> str:
        return f"{path}:{self.line + self.buf.count(chr(10), 0, self.pos if offset is None else offset)}"


def _next_value(text: _Text, path: Path):
    """Decode the value at text.pos -> (value, None, True), or (None, DataIssue, whether reading goes on after
    it); reads on until it is whole. A row with a key given twice is read on without that check (to find its
    end): its DataIssue leaves text.pos past it, so the rows after it are still read."""
    decoder, twice = _DECODER, None
    while True:
        try:
            value, end = decoder.raw_decode(text.buf, text.pos)
        except _DuplicateKey as e:
            decoder, twice = json.JSONDecoder(), e
            continue
        except RecursionError:
            return None, DataIssue(text.where(path), None, f"JSON nested deeper than {MAX_DEPTH} levels; expected "
                                                           f"a flat row object"), False
        except json.JSONDecodeError as e:
            # Perhaps only cut off by the chunk's end: read as much again (so a long row costs linear time),
            # up to MAX_ROW_BYTES past its start.
            held = len(text.buf) - text.pos
            if held <= MAX_ROW_BYTES and text.more(held):
                continue
            why = f" within {MAX_ROW_BYTES >> 20} MiB: a broken row or a longer one" if held > MAX_ROW_BYTES else ""
            return None, DataIssue(text.where(path, e.pos), None, f"not valid JSON ({e.msg}){why}"), False
        if end == len(text.buf) and text.more(text.chunk):  # a number may go on in the next chunk
            continue
        if not isinstance(value, str) and nesting_depth(text.buf[text.pos:end]) > MAX_DEPTH:
            return None, _too_deep(text.where(path), text.buf[text.pos:end]), False
        if twice is not None:
            where, text.pos = text.where(path), end
            return None, _twice(where, twice), True
        text.pos = end
        return value, None, True


def _whole(path: Path, text: _Text):
    """Rows of a .json that is not an array ({"train": [...]}): parsed whole, as it cannot be streamed."""
    text.rest()
    issue = _too_deep(f"{path}:1", text.buf)
    if issue:
        yield issue.where, issue
        return
    try:
        records = _DECODER.decode(text.buf)
    except json.JSONDecodeError as e:
        yield f"{path}:{e.lineno}", DataIssue(f"{path}:{e.lineno}", None, f"not valid JSON ({e.msg})")
        return
    except _DuplicateKey as e:
        yield str(path), _twice(str(path), e)
        return
    if not (isinstance(records, dict) and isinstance(records.get("train"), list)):
        yield str(path), DataIssue(str(path), None, "expected a JSON array of row objects (or JSONL)")
        return
    yield from ((f"{path}: row {i}", r) for i, r in enumerate(records["train"]))


def read_json(path: Path, chunk_chars: int = _CHUNK):
    """Yield (where, record | DataIssue) for a JSON array of rows (or {"train": [...]})."""
    with open(path, "rb") as f:
        text = _Text(f, chunk_chars)
        try:
            first = text.peek()
            if first:
                yield from _array_rows(path, text) if first == "[" else _whole(path, text)
        except UnicodeDecodeError:
            yield text.where(path), DataIssue(text.where(path), None, "invalid UTF-8; expected UTF-8 text")


def _array_rows(path: Path, text: _Text):
    text.pos += 1  # the "["
    i = 0
    while text.peek() != "]":
        if i and text.peek() != ",":
            issue = DataIssue(text.where(path), None, f"expected ',' or ']' after row {i - 1} of the array")
            yield issue.where, issue
            return
        if i:
            text.pos += 1
            text.peek()
        value, issue, go_on = _next_value(text, path)
        if issue:
            yield issue.where, issue
            if not go_on:  # not read past: nothing after it can be placed
                return
        else:
            yield f"{path}: row {i}", value
        i += 1


# -- CSV ----------------------------------------------------------------------------------------------
def read_csv(path: Path):
    """Yield (where, {column: text} | DataIssue); a row with the wrong number of fields names its line."""
    import csv

    csv.field_size_limit(MAX_ROW_BYTES)  # the default (128 KiB) refuses long answers
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                return
            rows = (cells for cells in reader if cells)  # blank lines are no rows, as pandas reads them
            for i, cells in enumerate(rows):
                if len(cells) != len(header):
                    place = f"{path}:{reader.line_num}"
                    yield place, DataIssue(place, None, f"{len(cells)} fields; expected {len(header)} (the "
                                                        f"header's: {', '.join(header)})"[:300])
                    continue
                yield f"{path}: row {i}", dict(zip(header, cells))
        except csv.Error as e:
            place = f"{path}:{reader.line_num}"
            yield place, DataIssue(place, None, f"not valid CSV ({e})")
        except UnicodeDecodeError:
            yield str(path), DataIssue(str(path), None, "invalid UTF-8; expected UTF-8 text")
