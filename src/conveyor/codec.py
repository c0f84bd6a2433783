"""Payloads to JSON text: one encoder for every way items are submitted, so the App, the CLI and
the stores' bulk paths agree on what a payload may hold and how it is written.

orjson does the common case ~10x faster than the standard library; anything it treats differently
goes to the stdlib, which decides: datetimes, dataclasses and subclasses are passed through (so they
fail or are handled as json.dumps would), and orjson writes NaN/Infinity as null, so output
containing null is re-encoded by the stdlib, which refuses non-finite numbers. Integers must fit in
64 bits: items are decoded with orjson too, which would turn bigger ones into floats.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import orjson

from .errors import UsageError

_std_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_ORJSON_OPTS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS
_dumps = orjson.dumps


#: containers nested deeper than this are refused (orjson, which stores and reads every payload, stops there)
MAX_DEPTH = 254


def _stdlib_verdict(value: Any, exc: TypeError) -> str:
    reason = str(exc)
    if "64-bit" in reason:
        raise ValueError("an integer does not fit in 64 bits; send such numbers as strings") from None
    if "Recursion limit" in reason:
        raise ValueError(f"it nests lists or objects more than {MAX_DEPTH} levels deep") from None
    if "surrogates" in reason:
        raise ValueError(_SURROGATE) from None
    try:
        text = _std_encode(value)
    except RecursionError:
        raise ValueError(f"it nests lists or objects more than {MAX_DEPTH} levels deep") from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(_SURROGATE) from None
    try:  # the same depth limit as the fast path, so what is stored can always be read back
        _dumps(orjson.loads(text))
    except (TypeError, ValueError):
        raise ValueError(f"it nests lists or objects more than {MAX_DEPTH} levels deep") from None
    return text


_SURROGATE = "a string in it holds a lone surrogate (such as '\\ud800'), which is not valid Unicode text"


def check_text(value: str, what: str) -> str:
    """A user's string that is stored as text: refuse what no database can store as UTF-8 (lone
    surrogates, e.g. from undecodable command-line bytes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} holds a lone surrogate (such as '\\ud800'), which is not valid Unicode text") from None
    return value


def encode(payload: Any) -> str:
    """One payload's JSON text. Raises TypeError or ValueError if it is not JSON-serialisable, nests
    deeper than MAX_DEPTH, holds an integer beyond 64 bits or a string that is not valid Unicode."""
    try:
        out = _dumps(payload, option=_ORJSON_OPTS)
    except TypeError as exc:  # non-str keys, passed-through types: the stdlib's verdict
        return _stdlib_verdict(payload, exc)
    if b"null" in out:
        return _std_encode(payload)
    return out.decode()


def encode_rows(payloads: Sequence[Any]) -> str:
    """`[[p0],[p1],…]`: every payload wrapped in a one-element array, as one JSON document, encoded
    in one orjson call when it can be (the common case: a few nanoseconds of Python per item), else
    payload by payload. Raises as encode() does."""
    rows = [[p] for p in payloads]
    try:
        out = _dumps(rows, option=_ORJSON_OPTS)
    except TypeError:
        out = b"null"  # let the per-payload path find the culprit (or the stdlib accept it)
    if b"null" not in out:
        return out.decode()
    return "[" + ",".join(f"[{encode(p)}]" for p in payloads) + "]"


def encode_payload(payload: Any, where: str) -> str:
    """encode(), with a failure reported as one UsageError naming `where`."""
    try:
        return encode(payload)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{where}: payload is not JSON-serialisable ({exc})") from None


def name_the_culprit(payloads: Sequence[Any], where: str, start: int = 0) -> None:
    """After a bulk encode failed: raise the UsageError naming the first payload that cannot be
    encoded, counting from `start` (returns if, against expectation, all of them can)."""
    for n, p in enumerate(payloads, start):
        encode_payload(p, f"{where}, item {n}")
