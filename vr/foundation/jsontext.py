"""JSON from outside (payloads, spool files, later HTTP bodies), read strictly.

Python's json module is lenient where a manager's mistake should be refused: it takes
UTF-16 and a BOM, keeps the last of two equal keys, reads NaN and Infinity, turns a
5,000-digit literal into a ValueError deep inside int(), and recurses until the
interpreter gives up. Each of those is refused here with a message naming the place.
Standard library only: the CLI's thin path uses it without importing pydantic.
"""

from __future__ import annotations

import json
import re

MAX_BYTES = 64 * 1024 * 1024  # a 4,000-VM, 10,000-rule router is ~5 MB
MAX_DEPTH = 64  # the document nests 6 deep: where a walk runs, deeper is refused; the parser's own limit is ~1,000
MAX_INTEGER_DIGITS = 20  # above any field's bound, and far below int()'s 4,300-digit limit
_LONG_DIGITS = re.compile(rb"\d{%d}" % (MAX_INTEGER_DIGITS + 1))
QUOTE_CHARS = 40  # how much of a value an error message repeats


class JsonRefused(ValueError):
    """The text is not a JSON object vr accepts; path is where ('' for the whole text)."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}" if path else reason)


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """repr() of a value, cut to a short prefix: a refusal never echoes 4 MB back."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, str | bytes) else f"{len(text)} characters as text"
    return f"{text[:limit]}... ({size})"


class _Duplicated(dict):
    """An object in which a key appeared twice (marked so the walk can name the path)."""

    duplicates: list[str]


def _object_hook(found: list[bool]):
    def make(pairs: list[tuple[str, object]]) -> dict:
        result = dict(pairs)
        if len(result) != len(pairs):
            found.append(True)
            marked = _Duplicated(result)
            seen: set[str] = set()
            marked.duplicates = [k for k, _ in pairs if k in seen or seen.add(k)]
            return marked
        return result

    return make


def _integer(text: str) -> int:
    digits = text.lstrip("-")
    if len(digits) > MAX_INTEGER_DIGITS:
        raise JsonRefused("", f"an integer of {len(digits)} digits (at most {MAX_INTEGER_DIGITS})")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise JsonRefused("", f"a number out of range: {quote(text)}")
    return value


def _constant(name: str) -> None:
    raise JsonRefused("", f"{name} is not JSON")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abAB]|\\u[dD][c-fC-F]")


def check_size(size: int, limit: int = MAX_BYTES) -> None:
    if size > limit:
        raise JsonRefused("", f"{size} bytes; a payload has at most {limit}")


def loads(data: bytes | str) -> object:
    """Parse JSON text from outside, or raise JsonRefused saying where and why."""
    if isinstance(data, bytes):
        check_size(len(data))
        if data.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")):
            raise JsonRefused("", "starts with a byte order mark: send UTF-8 without one")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise JsonRefused("", f"not UTF-8 text: invalid byte at offset {error.start}") from None
    else:
        text = data
    duplicates: list[bool] = []
    # The hooks that cost a Python call per value run only where the text needs them.
    long_digits = _LONG_DIGITS.search(data if isinstance(data, bytes) else data.encode("utf-8", "replace"))
    try:
        value = json.loads(text, object_pairs_hook=_object_hook(duplicates), parse_float=_float,
                           parse_int=_integer if long_digits else None, parse_constant=_constant)  # fmt: skip
    except JsonRefused:
        raise
    except RecursionError:
        raise JsonRefused("", f"nested too deep (at most {MAX_DEPTH} levels)") from None
    except json.JSONDecodeError as error:
        raise JsonRefused("", f"not valid JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    except ValueError as error:  # int() and float() of literals json accepted
        raise JsonRefused("", f"not valid JSON: {error}") from None
    surrogates = bool(_SURROGATE_ESCAPE.search(text))
    if duplicates or surrogates:  # the walk costs as much as the parse: only to find the place
        _walk(value, check_strings=surrogates)
    return value


def _walk(value: object, check_strings: bool) -> None:
    """Depth, duplicate keys and (only if the text escaped any) lone surrogates, which no
    file or daemon can take as text. Iterative: the depth it checks is the point."""
    stack: list[tuple[object, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise JsonRefused(path, f"nested too deep (at most {MAX_DEPTH} levels)")
        if isinstance(item, dict):
            if isinstance(item, _Duplicated):
                raise JsonRefused(path, f"key {quote(item.duplicates[0])} appears twice in one object")
            for key, child in item.items():
                if check_strings:
                    _text(key, f"{path}.{key}" if path else key)
                if isinstance(child, dict | list) or check_strings:
                    stack.append((child, f"{path}.{key}" if path else str(key), depth + 1))
        elif isinstance(item, list):
            for n, child in enumerate(item):
                if isinstance(child, dict | list) or check_strings:
                    stack.append((child, f"{path}[{n}]", depth + 1))
        elif isinstance(item, str):
            _text(item, path)


def _text(value: str, path: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise JsonRefused(path, "a lone UTF-16 surrogate escape (\\ud800-\\udfff) is not text") from None
