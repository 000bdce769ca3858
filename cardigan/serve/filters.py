"""Request values that reach Milvus: validated here, then escaped, never spliced raw.

A filter is a JSON object of attribute names to a value or a list of values:
``{"category": "cardigan"}`` or ``{"category": ["dress", "skirt"]}``. Names are identifiers,
values a short, plain character set; both are checked before an expression is built, and the
values are quoted with :func:`cardigan.store.index.escape_filter_string` as a second lock.
"""

from __future__ import annotations

import json
import re
from typing import Any

from cardigan.errors import InvalidEvent
from cardigan.event import is_product_id
from cardigan.store.index import escape_filter_string

KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
VALUE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._:/&+-]{0,63}$")
MAX_KEYS = 8
MAX_VALUES = 32


class BadRequest(InvalidEvent):
    """A request the client must fix; ``status`` is the HTTP code, ``field`` names what."""

    kind = "bad_request"

    def __init__(self, message: str, *, field: str, status: int = 400) -> None:
        super().__init__(message, field=field)
        self.status = status


def parse_filter(raw: str | None) -> dict[str, list[str]]:
    """``filter`` (a JSON object) to {name: [values]}; BadRequest naming the problem."""
    if raw is None or raw.strip() == "":
        return {}
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadRequest(f'must be a JSON object such as {{"category": "cardigan"}}: {e.msg}', field="filter") from None
    if not isinstance(doc, dict):
        raise BadRequest('must be a JSON object such as {"category": "cardigan"}', field="filter")
    if len(doc) > MAX_KEYS:
        raise BadRequest(f"at most {MAX_KEYS} attributes, got {len(doc)}", field="filter")
    out: dict[str, list[str]] = {}
    for key, value in doc.items():
        if not KEY_RE.match(key):
            raise BadRequest(f"attribute name {key[:40]!r} must be a letter then letters, digits or _ (at most 32)", field="filter")
        values = value if isinstance(value, list) else [value]
        if not values or len(values) > MAX_VALUES:
            raise BadRequest(f"{key}: give 1 to {MAX_VALUES} values", field="filter")
        for v in values:
            if not isinstance(v, str) or not VALUE_RE.match(v):
                raise BadRequest(
                    f"{key}: value {str(v)[:40]!r} must be a string of letters, digits, spaces and . _ : / & + - (at most 64)",
                    field="filter",
                )
        out[key] = list(values)
    return out


def filter_expression(filters: dict[str, list[str]]) -> str:
    """The Milvus expression for validated filters (``""``: no filter)."""
    parts = []
    for key, values in sorted(filters.items()):
        if not KEY_RE.match(key) or not all(VALUE_RE.match(v) for v in values):  # never trust a caller that skipped parse_filter
            raise BadRequest("invalid filter", field="filter")
        path = f'attributes["{key}"]'
        if len(values) == 1:
            parts.append(f"{path} == {escape_filter_string(values[0])}")
        else:
            # "or" rather than "in [...]": Milvus Lite accepts "in" only on plain fields, not JSON paths
            parts.append("(" + " or ".join(f"{path} == {escape_filter_string(v)}" for v in values) + ")")
    return " and ".join(parts)


def product_id(raw: str, max_len: int) -> str:
    """A product id from a URL, checked like an event's before it is used as a key."""
    if not is_product_id(raw, max_len):
        raise BadRequest(f"{raw[:60]!r} is not a product id (letters, digits and . _ : -, at most {max_len})", field="product_id")
    return raw


def parse_k(raw: Any, max_k: int, default: int = 10) -> int:
    if raw is None or raw == "":
        return default
    try:
        k = int(str(raw))
    except ValueError:
        raise BadRequest(f"must be a whole number 1..{max_k}, got {str(raw)[:20]!r}", field="k") from None
    if not 1 <= k <= max_k:
        raise BadRequest(f"must be 1..{max_k}, got {k}", field="k")
    return k


def parse_bbox(raw: str | None) -> tuple[float, float, float, float] | None:
    """``"x0,y0,x1,y1"`` or ``"[x0, y0, x1, y1]"`` in pixels of the uploaded photo."""
    if raw is None or raw.strip() == "":
        return None
    text = raw.strip().removeprefix("[").removesuffix("]")
    parts = [p.strip() for p in text.split(",")]
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        raise BadRequest(f"must be 4 numbers x0,y0,x1,y1 in pixels, got {raw[:60]!r}", field="bbox") from None
    if len(nums) != 4:
        raise BadRequest(f"must be 4 numbers x0,y0,x1,y1 in pixels, got {len(nums)}", field="bbox")
    return (nums[0], nums[1], nums[2], nums[3])
