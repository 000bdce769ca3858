"""The event contract: what the catalog publishes, validated before anything else runs.

Validation happens twice: in the publisher (so a producer hears about a bad event at once)
and in the worker (a producer in another language may skip the first check).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cardigan.errors import InvalidEvent

# Product ids reach Milvus primary keys ("<id>#<n>") and, in tools, filter strings:
# a strict character set keeps quotes, spaces and filter syntax out by construction.
PRODUCT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")


def is_product_id(value: object, max_len: int = 128) -> bool:
    """The one product-id check: events, queries, URLs and S3 layouts use it before an id is a
    Milvus filter value or a Redis key."""
    return isinstance(value, str) and 0 < len(value) <= max_len and PRODUCT_ID_RE.match(value) is not None


MAX_VERSION = 2**62  # fits Milvus INT64 with room; absurd beyond this

# Limits of a Milvus JSON field, enforced here so the publisher and the worker refuse the same
# events (Milvus Lite accepts megabytes and hides what a real server rejects, and a rejected row
# fails the whole upsert it is in). Milvus 2.5 documents 65,536 bytes per JSON value.
MAX_ATTRIBUTES_BYTES = 65_536
MAX_ATTRIBUTES_DEPTH = 16  # nesting of objects/arrays; deeper is a mistake, and recursion costs
_INT64 = (-(2**63), 2**63 - 1)
# S3 bucket names (AWS rules: 3-63 characters, lowercase letters, digits, dots and hyphens,
# starting and ending with a letter or digit). An invalid one can never be fetched: refusing it
# here makes it a dead letter at once instead of a retried signing error.
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
MAX_KEY_BYTES = 1024  # S3's limit on an object key, in UTF-8 bytes


def _lone_surrogate(text: str) -> bool:
    """A lone surrogate (from JSON ``"\\ud800"``) cannot be encoded as UTF-8: Milvus refuses it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_json_value(value: Any, path: str = "", depth: int = 0) -> None:
    """Refuse what a Milvus JSON field cannot hold: NaN/Infinity (stored as null), lone
    surrogates, integers beyond int64, nesting deeper than MAX_ATTRIBUTES_DEPTH.

    ``path`` is where ``value`` sits inside the checked object (named in the error).
    """
    where = f"at {path}" if path else "value"
    if depth > MAX_ATTRIBUTES_DEPTH:
        raise ValueError(f"{where}: nested deeper than {MAX_ATTRIBUTES_DEPTH} levels")
    if isinstance(value, str):
        if _lone_surrogate(value):
            raise ValueError(f"{where}: contains a lone surrogate (not valid UTF-8)")
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise ValueError(f"{where}: integer outside the 64-bit range")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value} is not a finite number (JSON has no NaN or Infinity)")
    elif isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: keys must be strings")
            if _lone_surrogate(k):
                raise ValueError(f"{where}: a key contains a lone surrogate (not valid UTF-8)")
            check_json_value(v, f"{path}.{k}" if path else k, depth + 1)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            check_json_value(v, f"{path}[{i}]", depth + 1)
    else:
        raise ValueError(f"{where}: {type(value).__name__} is not a JSON value")


class ImageRef(BaseModel):
    """One product photo: where it is and, optionally, where the product is in it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    uri: str = Field(min_length=1, max_length=1024)
    # JSON arrays arrive as lists: allow list -> tuple here, numbers only.
    bbox: tuple[float, float, float, float] | None = Field(None, strict=False)

    @field_validator("uri")
    @classmethod
    def _uri_scheme(cls, v: str) -> str:
        if any(ord(c) < 32 or c == "\x7f" for c in v):
            raise ValueError("must not contain control characters")
        if _lone_surrogate(v):
            raise ValueError("contains a lone surrogate (not valid UTF-8)")
        if v.startswith("s3://"):
            bucket, _, key = v[5:].partition("/")
            if not bucket or not key:
                raise ValueError("must be s3://bucket/key")
            if not BUCKET_RE.match(bucket) or ".." in bucket:
                raise ValueError(
                    f"invalid bucket name {bucket[:70]!r}: 3-63 lowercase letters, digits, '.' and '-', "
                    "starting and ending with a letter or digit"
                )
            if len(key.encode("utf-8")) > MAX_KEY_BYTES:
                raise ValueError(f"object key longer than {MAX_KEY_BYTES} bytes")
            return v
        if v.startswith("file://"):
            return v
        scheme = v.split(":", 1)[0] if ":" in v else "(none)"
        raise ValueError(f"scheme {scheme!r} is not allowed: use s3://bucket/key (or file:// under the local root)")

    @field_validator("bbox")
    @classmethod
    def _bbox_shape(cls, v: tuple[float, float, float, float] | None) -> tuple[float, ...] | None:
        if v is None:
            return v
        x0, y0, x1, y1 = v
        if any(c != c or c in (float("inf"), float("-inf")) for c in v):
            raise ValueError("must be finite numbers")
        shown = "[" + ", ".join(f"{c:g}" for c in v) + "]"
        if x1 < x0 or y1 < y0:
            axis = "x1 < x0" if x1 < x0 else "y1 < y0"
            raise ValueError(f"{shown} is inverted ({axis}): [x0, y0, x1, y1] needs x1 > x0 and y1 > y0")
        if x1 == x0 or y1 == y0:
            raise ValueError(f"{shown} has zero area: [x0, y0, x1, y1] needs x1 > x0 and y1 > y0")
        return v


class Event(BaseModel):
    """A product now looks like ``images`` (add/modify) or is gone (delete), as of ``version``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["add", "modify", "delete"]
    product_id: str = Field(min_length=1, max_length=128)
    version: int = Field(ge=0, le=MAX_VERSION)
    images: list[ImageRef] = Field(default_factory=list)
    attributes: dict[str, Any] = Field(default_factory=dict)
    # set by the publisher: when the event entered the system (ms), for freshness metrics
    published_at_ms: int | None = None

    @field_validator("product_id")
    @classmethod
    def _product_id(cls, v: str) -> str:
        if not PRODUCT_ID_RE.match(v):
            raise ValueError(f"must start with a letter or digit and contain only letters, digits and . _ : - (got {v!r})")
        return v

    @field_validator("attributes")
    @classmethod
    def _attributes(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_json_value(v, "")
        size = len(json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        if size > MAX_ATTRIBUTES_BYTES:
            raise ValueError(f"{size} bytes as JSON, over the Milvus JSON field limit of {MAX_ATTRIBUTES_BYTES} bytes")
        return v


def primary_key(product_id: str, index: int) -> str:
    """Deterministic key: a redelivered event overwrites, never duplicates."""
    return f"{product_id}#{index}"


def _format_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in e["loc"]).replace(".[", "[")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "literal_error" and loc == "type":
            msg = f"unknown event type {e.get('input')!r}: expected 'add', 'modify' or 'delete'"
        elif e["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc or 'event'}: {msg}")
    return "; ".join(parts)


def parse_event(raw: Any, *, max_images: int, max_id_len: int = 128) -> Event:
    """Validate one event (a dict, or JSON text); raise InvalidEvent naming the field."""
    if isinstance(raw, (str, bytes)):
        try:
            ev = Event.model_validate_json(raw)
        except ValidationError as e:
            if any(x["type"] == "json_invalid" for x in e.errors()):
                raise InvalidEvent(f"malformed JSON: {e.errors()[0]['msg']}", field="event") from None
            raise InvalidEvent(_format_error(e), field=_first_field(e)) from None
    elif isinstance(raw, dict):
        try:
            ev = Event.model_validate(raw)
        except ValidationError as e:
            raise InvalidEvent(_format_error(e), field=_first_field(e)) from None
    else:
        raise InvalidEvent(f"must be a JSON object, got {type(raw).__name__}", field="event")
    if len(ev.product_id) > max_id_len:
        raise InvalidEvent(f"longer than {max_id_len} characters", field="product_id")
    if ev.type == "delete" and ev.images:
        raise InvalidEvent("a delete carries no images", field="images")
    if ev.type != "delete" and not ev.images:
        raise InvalidEvent(f"an {ev.type} needs at least one image", field="images")
    if len(ev.images) > max_images:
        raise InvalidEvent(f"{len(ev.images)} images, at most {max_images} allowed", field="images")
    return ev


def _first_field(err: ValidationError) -> str:
    loc = err.errors()[0]["loc"]
    return ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[") or "event"
