"""Result files read back (``--out`` JSON Lines, ``track.jsonl``, fairseq's logs): files from outside like any
other. Only regular files of bounded size are read, a line at most ``LINE_BYTES`` long; a line that is not a
result (not JSON, not an object, a value of the wrong kind, out of range or too long) is named with its
reason and left out of what is read, and kept, unchanged, by whatever rewrites the file: nothing a user wrote
is lost because this code cannot read it."""
from __future__ import annotations

import json
import math
import os
import stat

FILE_BYTES = 2**28  # a result file or a log (256 MiB)
LINE_BYTES = 2**20  # one line (1 MiB: a result is a few hundred bytes)


class Unreadable(ValueError):
    """A file that is not a result file at all (not a regular file, too large); the message names it."""


def regular(path: str, what: str = "file", limit: int = FILE_BYTES) -> os.stat_result:
    """The status of a regular file within ``limit`` bytes (a link is followed, to a regular file only)."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise Unreadable(f"{path}: cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise Unreadable(f"{path}: not a regular file (a FIFO, a device or a folder), so not a {what}")
    if st.st_size > limit:
        raise Unreadable(f"{path}: {st.st_size:,} bytes, more than a {what} holds ({limit:,})")
    return st


def lines(path: str, what: str = "result file", limit: int = FILE_BYTES):
    """(line number, text, (start, stop) byte offsets) of a regular file within ``limit`` bytes; the text is
    None for a line longer than LINE_BYTES (never held whole: its offsets say where it is)."""
    regular(path, what, limit)
    with open(path, "rb") as f:
        number = 0
        while True:
            start = f.tell()
            raw = f.readline(LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > LINE_BYTES:  # over the bound: the rest of the line is passed over
                while raw and not raw.endswith(b"\n"):
                    raw = f.readline(LINE_BYTES + 1)
                yield number, None, (start, f.tell())
                continue
            yield number, raw.decode("utf-8", errors="replace").rstrip("\n"), (start, f.tell())


def copy_kept(kept, source: str, out) -> None:
    """Write the ``kept`` lines of ``source`` to the open binary file ``out`` unchanged: texts as they are, a
    line over the bound copied byte for byte from its offsets in ``source``."""
    for item in kept:
        if isinstance(item, str):
            out.write(item.encode("utf-8", errors="replace") + b"\n")
            continue
        with open(source, "rb") as f:
            f.seek(item[0])
            left, last = item[1] - item[0], b""
            while left > 0:
                block = f.read(min(left, 2**20))
                if not block:
                    break
                out.write(block)
                left, last = left - len(block), block
        if not last.endswith(b"\n"):
            out.write(b"\n")


def finite(value, lo: float = -math.inf, hi: float = math.inf):
    """A finite number in [lo, hi] (not a bool, not a string), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if lo <= value <= hi else None


def count(value, hi: int = 10**15):
    """A whole number in 0..hi (a float only when whole), else None."""
    v = finite(value, 0, hi)
    if v is None or (isinstance(v, float) and not v.is_integer()):
        return None
    return int(v)


def fraction(value):
    """An accuracy as the commands write it: a number in [0, 1], else None."""
    return finite(value, 0.0, 1.0)


def read_jsonl(path: str, check, what: str = "result file") -> tuple[list[dict], list, list[str]]:
    """(records, kept, problems) of a JSON Lines file: ``check(record)`` says why a parsed object is not a
    result (None when it is one); the lines that are not results are ``kept`` (their text, or the byte
    offsets of a line over the bound: ``copy_kept`` writes them back unchanged) and named in ``problems``."""
    records, kept, problems = [], [], []
    for number, text, span in lines(path, what):
        if text is None:
            kept.append(span)
            problems.append(f"{path} line {number}: longer than {LINE_BYTES:,} bytes")
            continue
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except (ValueError, RecursionError):
            why = "not JSON"
        else:
            why = "not a JSON object" if not isinstance(record, dict) else check(record)
        if why is None:
            records.append(record)
        else:
            kept.append(text)
            problems.append(f"{path} line {number}: {why}")
    return records, kept, problems
