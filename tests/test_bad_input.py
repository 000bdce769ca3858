"""Bad input the publisher refuses before anything is sent (fast: no servers, no workers).

Every case goes through ``Publisher.publish`` bound to a broker address where nothing listens:
a rejection must come from validation, never from a send attempt. The worker validates again
(a producer in another language may skip this); tests/test_bad_input_e2e.py covers that side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cardigan.errors import InvalidEvent
from cardigan.event import parse_event
from cardigan.ops.publish import Publisher, read_json_lines
from config.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
NOWHERE = "redis://127.0.0.1:1/0"  # nothing listens on port 1: a send would fail, not pass

GOOD: dict[str, Any] = {
    "type": "add",
    "product_id": "sku-1",
    "version": 3,
    "images": [{"uri": "s3://catalog/sku-1/front.jpg", "bbox": [10, 20, 110, 220]}],
    "attributes": {"category": "cardigan"},
}


def ev(**changes: Any) -> dict[str, Any]:
    """GOOD with some fields replaced (a value of ... removes the field)."""
    out = json.loads(json.dumps(GOOD))
    for k, v in changes.items():
        if v is ...:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def img(uri: str = "s3://catalog/a.jpg", **kw: Any) -> list[dict[str, Any]]:
    return [{"uri": uri, **kw}]


# (id, raw event, field the error must name, words the reason must contain)
CASES: list[tuple[str, Any, str, str]] = [
    # malformed or not an object
    ("malformed-json", '{"type": "add", "product_id": ', "event", "malformed JSON"),
    ("json-trailing-garbage", json.dumps(GOOD) + " }", "event", "malformed JSON"),
    ("json-array", [GOOD], "event", "must be a JSON object"),
    ("json-null", None, "event", "must be a JSON object"),
    ("json-string-text", '"add sku-1"', "event", "object"),
    ("json-number", 42, "event", "must be a JSON object"),
    # wrong types (strict: no "1" -> 1, no true -> 1, no 1.5 -> 1)
    ("version-string", ev(version="3"), "version", "integer"),
    ("version-float", ev(version=3.5), "version", "integer"),
    ("version-bool", ev(version=True), "version", "integer"),
    ("product-id-number", ev(product_id=123), "product_id", "string"),
    ("images-object", ev(images={"uri": "s3://catalog/a.jpg"}), "images", "list"),
    ("image-string", ev(images=["s3://catalog/a.jpg"]), "images[0]", ""),
    ("bbox-string", ev(images=img(bbox="0,0,10,10")), "images[0].bbox", ""),
    ("bbox-three-numbers", ev(images=img(bbox=[0, 0, 10])), "images[0].bbox", ""),
    ("bbox-number-strings", ev(images=img(bbox=["0", "0", "10", "10"])), "images[0].bbox", "number"),
    ("attributes-list", ev(attributes=["red"]), "attributes", "dictionary"),
    # missing fields
    ("missing-type", ev(type=...), "type", "required"),
    ("missing-product-id", ev(product_id=...), "product_id", "required"),
    ("missing-version", ev(version=...), "version", "required"),
    ("image-missing-uri", ev(images=[{"bbox": [0, 0, 5, 5]}]), "images[0].uri", "required"),
    ("unknown-field", ev(colour="red"), "colour", "unknown field"),
    # unknown event type
    ("type-upsert", ev(type="upsert"), "type", "unknown event type 'upsert'"),
    ("type-uppercase", ev(type="ADD"), "type", "unknown event type 'ADD'"),
    # versions
    ("version-negative", ev(version=-1), "version", "greater than or equal to 0"),
    ("version-over-int64", ev(version=2**63), "version", "less than or equal"),
    ("version-absurd", ev(version=10**30), "version", "less than or equal"),
    ("version-absurd-json-text", json.dumps(ev(version=10**30)), "version", "less than or equal"),
    # product ids: keys are "<id>#<n>" and ids may reach filter strings: a strict set only
    ("id-double-quote", ev(product_id='sku"1'), "product_id", "only letters"),
    ("id-milvus-filter-injection", ev(product_id='x" or product_id != "'), "product_id", "only letters"),
    ("id-single-quote", ev(product_id="sku'1"), "product_id", "only letters"),
    ("id-space", ev(product_id="sku 1"), "product_id", "only letters"),
    ("id-unicode", ev(product_id="café-1"), "product_id", "only letters"),
    ("id-fullwidth", ev(product_id="ｓｋｕ1"), "product_id", "only letters"),
    ("id-newline", ev(product_id="sku\n1"), "product_id", "only letters"),
    ("id-nul", ev(product_id="sku\x001"), "product_id", "only letters"),
    ("id-pk-separator", ev(product_id="sku#1"), "product_id", "only letters"),
    ("id-path", ev(product_id="../sku"), "product_id", "only letters"),
    ("id-leading-dash", ev(product_id="-sku"), "product_id", "start with a letter or digit"),
    ("id-empty", ev(product_id=""), "product_id", "at least 1"),
    ("id-too-long", ev(product_id="s" * 129), "product_id", "128"),
    # images: count and presence
    ("too-many-images", ev(images=[{"uri": f"s3://catalog/{i}.jpg"} for i in range(9)]), "images", "at most 8"),
    ("add-without-images", ev(images=[]), "images", "at least one image"),
    ("add-images-missing", ev(images=...), "images", "at least one image"),
    ("modify-without-images", ev(type="modify", images=[]), "images", "at least one image"),
    ("delete-with-images", ev(type="delete"), "images", "a delete carries no images"),
    # URIs: only s3:// (and file:// under the worker's root) are ever fetched
    ("uri-http", ev(images=img("http://cdn.example.com/a.jpg")), "images[0].uri", "scheme 'http' is not allowed"),
    ("uri-https", ev(images=img("https://cdn.example.com/a.jpg")), "images[0].uri", "scheme 'https' is not allowed"),
    (
        "uri-cloud-metadata",
        ev(images=img("http://169.254.169.254/latest/meta-data/iam/security-credentials/")),
        "images[0].uri",
        "not allowed",
    ),
    ("uri-localhost", ev(images=img("http://127.0.0.1:6379/")), "images[0].uri", "not allowed"),
    ("uri-ftp", ev(images=img("ftp://files.example.com/a.jpg")), "images[0].uri", "scheme 'ftp'"),
    ("uri-gopher", ev(images=img("gopher://127.0.0.1:6379/_FLUSHALL")), "images[0].uri", "scheme 'gopher'"),
    ("uri-gs", ev(images=img("gs://bucket/a.jpg")), "images[0].uri", "scheme 'gs'"),
    ("uri-data", ev(images=img("data:image/png;base64,iVBORw0KGgo=")), "images[0].uri", "scheme 'data'"),
    ("uri-uppercase-scheme", ev(images=img("S3://catalog/a.jpg")), "images[0].uri", "scheme 'S3'"),
    ("uri-relative", ev(images=img("images/a.jpg")), "images[0].uri", "scheme '(none)'"),
    ("uri-empty", ev(images=img("")), "images[0].uri", "at least 1"),
    ("uri-s3-no-key", ev(images=img("s3://catalog")), "images[0].uri", "s3://bucket/key"),
    ("uri-s3-no-bucket", ev(images=img("s3:///a.jpg")), "images[0].uri", "s3://bucket/key"),
    ("uri-header-injection", ev(images=img("s3://catalog/a.jpg\r\nHost: evil")), "images[0].uri", "control characters"),
    ("uri-too-long", ev(images=img("s3://catalog/" + "a" * 1100)), "images[0].uri", "at most 1024"),
    # bboxes that describe no region (a bbox outside the image is the worker's to judge)
    ("bbox-inverted", ev(images=img(bbox=[100, 10, 50, 80])), "images[0].bbox", "[100, 10, 50, 80] is inverted (x1 < x0)"),
    ("bbox-inverted-y", ev(images=img(bbox=[10, 80, 50, 10])), "images[0].bbox", "is inverted (y1 < y0)"),
    ("bbox-zero-area", ev(images=img(bbox=[10, 10, 10, 80])), "images[0].bbox", "[10, 10, 10, 80] has zero area"),
    ("bbox-nan", ev(images=img(bbox=[float("nan"), 0, 10, 10])), "images[0].bbox", "finite"),
    ("bbox-nan-json-text", json.dumps(ev(images=img(bbox=[float("nan"), 0, 10, 10]))), "images[0].bbox", "finite"),
    ("bbox-infinity", ev(images=img(bbox=[0, 0, float("inf"), 10])), "images[0].bbox", "finite"),
]


@pytest.fixture(scope="module")
def publisher() -> Publisher:
    return Publisher(Settings(broker_url=NOWHERE))


def test_the_good_event_is_valid(publisher: Publisher) -> None:
    """The base every case below breaks in one way: valid as it stands."""
    ev_ = publisher.validate(GOOD)
    assert ev_.product_id == "sku-1" and ev_.images[0].bbox == (10, 20, 110, 220)


@pytest.mark.parametrize(("raw", "field", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_publisher_rejects(publisher: Publisher, raw: Any, field: str, words: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        publisher.publish(raw)  # raises before any send: the broker address is dead
    err = info.value
    assert err.field is not None and err.field.startswith(field), f"field {err.field!r}, reason {err.reason!r}"
    assert err.reason.startswith(err.field), "the reason a producer reads starts with the field"
    assert words.lower() in err.reason.lower(), err.reason


def test_at_least_thirty_kinds() -> None:
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


def test_worker_side_validation_is_the_same_function() -> None:
    """The worker calls parse_event with the same limits: what the publisher refuses, it refuses."""
    for _name, raw, field, _ in CASES:
        with pytest.raises(InvalidEvent) as info:
            parse_event(raw, max_images=8, max_id_len=128)
        assert info.value.field is not None and info.value.field.startswith(field)


def test_max_images_and_id_length_follow_settings() -> None:
    pub = Publisher(Settings(broker_url=NOWHERE, limits={"max_images": 2, "max_product_id_len": 5}))
    with pytest.raises(InvalidEvent, match="3 images, at most 2"):
        pub.publish(ev(images=[{"uri": f"s3://catalog/{i}.jpg"} for i in range(3)]))
    with pytest.raises(InvalidEvent, match="longer than 5"):
        pub.publish(ev(product_id="sku-12"))


def test_cli_publish_reports_each_rejected_line(tmp_path: Path) -> None:
    """`cardigan publish` names every bad line and exits 1; nothing is sent (the broker is dead)."""
    lines = [c[1] if isinstance(c[1], str) else json.dumps(c[1]) for c in CASES]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    env = {**os.environ, "CARDIGAN_BROKER_URL": NOWHERE}
    out = subprocess.run(
        [sys.executable, "-m", "cardigan.cli", "publish", str(path), "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stderr
    report = json.loads(out.stdout)
    assert report["published"] == 0
    assert [r["line"] for r in report["rejected"]] == list(range(1, len(CASES) + 1))
    for r, case in zip(report["rejected"], CASES, strict=True):
        assert r["reason"].startswith(case[2]), (case[0], r["reason"])


def test_read_json_lines_passes_bad_json_on_as_text() -> None:
    """A bad line is reported by the validator with its position, not swallowed by the reader."""
    import io

    got = list(read_json_lines(io.StringIO('{"a": 1}\n\n{"b": \n')))
    assert got == [(1, {"a": 1}), (3, '{"b":')]
    with pytest.raises(InvalidEvent, match="malformed JSON"):
        parse_event(got[1][1], max_images=8)
