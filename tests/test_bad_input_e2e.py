"""Bad input at the worker: every bad event becomes a dead letter naming its problem, the worker
stays up, and the good events published in the same go are indexed.

One worker, one batch: good images in every format we accept (they must index, vectors present),
bad images and URIs, invalid events from a producer that skipped validation, and broker messages
Celery cannot run. The worker runs with a local root (file:// URIs) and a small byte limit.
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kombu import Connection
from PIL import Image, ImageDraw, ImageOps

from cardigan.imaging.crop import preprocess
from cardigan.ops.verify import Expected
from tests.harness import Namespace, wait_until
from tests.test_index_e2e import converge

pytestmark = pytest.mark.e2e

MAX_BYTES = 150_000  # this worker's CARDIGAN_LIMITS__MAX_IMAGE_BYTES


# -- pictures -----------------------------------------------------------------------------


def scene(seed: int, size: tuple[int, int] = (96, 96)) -> Image.Image:
    """A product on white, different for each seed, and not symmetric (rotation shows)."""
    rng = np.random.default_rng(seed)
    w, h = size
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    c = tuple(int(v) for v in rng.integers(0, 256, 3))
    d.rectangle([w // 8, h // 8, w * 5 // 8, h * 7 // 8], fill=c)  # off-centre body
    d.polygon([(w * 5 // 8, h // 8), (w * 7 // 8, h // 2), (w * 5 // 8, h * 7 // 8)], fill=tuple(255 - v for v in c))
    for _ in range(5):
        x, y = (int(v) for v in rng.integers(0, min(w, h) - 10, 2))
        d.ellipse([x, y, x + 9, y + 9], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return im


def encode(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def exif_rotated_jpeg(upright: Image.Image) -> bytes:
    """Pixels stored turned 90° counter-clockwise, EXIF orientation 6 says: turn them back."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())


def good_images() -> dict[str, bytes]:
    """Every mode and format a catalog may send that must index."""
    s = [scene(i) for i in range(20)]
    rgba = s[2].convert("RGBA")
    alpha = Image.new("L", rgba.size, 0)
    ImageDraw.Draw(alpha).ellipse([8, 8, 88, 88], fill=255)
    rgba.putalpha(alpha)
    la = s[3].convert("L").convert("LA")
    la.putalpha(alpha)
    trns = s[5].convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    grey16 = Image.fromarray((np.asarray(s[6].convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    assert grey16.mode == "I;16"
    frames = [s[7], s[8]]
    return {
        "jpeg": encode(s[0], "JPEG", quality=90),
        "png-rgb": encode(s[1], "PNG"),
        "png-rgba-alpha": encode(rgba, "PNG"),
        "png-la-alpha": encode(la, "PNG"),
        "png-palette": encode(s[4].convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "PNG"),
        "png-palette-transparency": encode(trns, "PNG", transparency=0),
        "png-16bit-grey": encode(grey16, "PNG"),
        "png-1bit": encode(s[9].convert("1"), "PNG"),
        "gif-animated": encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
        "webp-lossy": encode(s[10], "WEBP", quality=80),
        "webp-lossless-alpha": encode(rgba, "WEBP", lossless=True),
        "jpeg-cmyk": encode(s[11].convert("CMYK"), "JPEG", quality=90),
        "jpeg-grey": encode(s[12].convert("L"), "JPEG", quality=90),
        "jpeg-progressive": encode(s[13], "JPEG", quality=90, progressive=True),
        "bmp": encode(s[14], "BMP"),
        "tiff": encode(s[15], "TIFF"),
        "jpeg-exif-rotated": exif_rotated_jpeg(scene(99, (120, 72))),
    }


def noise_png(side: int) -> bytes:
    """Incompressible: a PNG of ``side``² random pixels is about 3·side² bytes."""
    return encode(Image.fromarray(np.random.default_rng(7).integers(0, 256, (side, side, 3), dtype=np.uint8)), "PNG")


# -- raw broker messages --------------------------------------------------------------------


def task_headers(task: str = "cardigan.index_event", task_id: str | None = None) -> dict[str, Any]:
    """Celery protocol-2 headers, as a producer in any language would write them."""
    tid = task_id or str(uuid.uuid4())
    return {
        "lang": "py",
        "task": task,
        "id": tid,
        "root_id": tid,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "eta": None,
        "expires": None,
    }


def send_raw(
    ns: Namespace, body: bytes | str, headers: dict[str, Any], content_type: str = "application/json", encoding: str = "utf-8"
) -> None:
    """Put a message on the live queue with kombu, bypassing Celery's and our own checks."""
    with Connection(ns.settings.broker_url) as conn:
        conn.Producer().publish(
            body, routing_key=ns.settings.queue, exchange="cardigan", headers=headers,
            content_type=content_type, content_encoding=encoding, delivery_mode=2, declare=[],
        )  # fmt: skip


def send_unvalidated(ns: Namespace, event: Any) -> str:
    """A well-formed task message whose event skipped the publisher's validation."""
    tid = uuid.uuid4().hex
    ns.publisher().app.send_task("cardigan.index_event", args=[event], task_id=tid, queue=ns.settings.queue)
    return tid


# -- the batch ----------------------------------------------------------------------------------


@dataclass
class Bad:
    kind: str  # the dead letter's kind
    field: str | None  # the field it names (a prefix), None for message-level problems
    words: str  # what the reason must say


def add_event(pid: str, uris: list[str], **img: Any) -> dict[str, Any]:
    return {"type": "add", "product_id": pid, "version": 1, "images": [{"uri": u, **img} for u in uris], "attributes": {"category": "test"}}


def test_e2e_bad_inputs_dead_lettered_good_ones_indexed(ns: Namespace, tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    (tmp_path / "secret.txt").write_text("not for workers")
    (root / "good.png").write_bytes(encode(scene(50), "PNG"))
    (root / "link-out.jpg").symlink_to(tmp_path / "secret.txt")
    w = ns.start_worker(extra_env={"CARDIGAN_LOCAL_ROOT": str(root), "CARDIGAN_LIMITS__MAX_IMAGE_BYTES": str(MAX_BYTES)})
    bucket = ns.settings.bucket

    # good: one product per format, one with every format at once, a clamped bbox, a local file
    goods = good_images()
    assert all(len(b) < MAX_BYTES for b in goods.values())
    good_events = {f"ok-{name}": add_event(f"ok-{name}", [ns.put_image(f"ok/{name}", data)]) for name, data in goods.items()}
    good_events["ok-all-formats"] = add_event(
        "ok-all-formats",
        [ns.put_image(f"ok/{n}", goods[n]) for n in ("png-palette", "webp-lossy", "gif-animated", "jpeg-cmyk", "png-16bit-grey")],
    )
    good_events["ok-bbox-spills-over"] = add_event(
        "ok-bbox-spills-over", [ns.put_image("ok/spill.jpg", goods["jpeg"])], bbox=[-20, -20, 60, 200]
    )
    good_events["ok-local-file"] = add_event("ok-local-file", [f"file://{root}/good.png"])

    # bad images and URIs, published through the normal path (the publisher cannot know)
    truncated = goods["jpeg"][: len(goods["jpeg"]) // 2]
    bomb = encode(Image.new("1", (8000, 8000), 1), "PNG")  # 64 Mpx in 23 kB, over the 40 Mpx limit
    assert len(bomb) < MAX_BYTES
    big = noise_png(260)
    assert len(big) > MAX_BYTES
    bad_events: dict[str, tuple[dict[str, Any], Bad]] = {
        "bad-missing-object": (
            add_event("bad-missing-object", [f"s3://{bucket}/nope/{uuid.uuid4().hex}.jpg"]),
            Bad("missing_image", "images[0].uri", "does not exist"),
        ),
        "bad-bucket-not-allowed": (  # any bucket but CARDIGAN_BUCKET (no CARDIGAN_S3_BUCKETS here)
            add_event("bad-bucket-not-allowed", [f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/a.jpg"]),
            Bad("forbidden_uri", "images[0].uri", "is not allowed (CARDIGAN_S3_BUCKETS"),
        ),
        "bad-zero-bytes": (
            add_event("bad-zero-bytes", [ns.put_image("bad/empty.jpg", b"")]),
            Bad("corrupt_image", "images[0]", "empty file"),
        ),
        "bad-truncated-jpeg": (
            add_event("bad-truncated-jpeg", [ns.put_image("bad/cut.jpg", truncated)]),
            Bad("corrupt_image", "images[0]", "truncated JPEG"),
        ),
        "bad-not-an-image": (
            add_event("bad-not-an-image", [ns.put_image("bad/doc.jpg", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj <<>> endobj\n")]),
            Bad("corrupt_image", "images[0]", "not an image"),
        ),
        "bad-html-error-page": (
            add_event("bad-html-error-page", [ns.put_image("bad/err.jpg", b"<html><body>403 Forbidden</body></html>")]),
            Bad("corrupt_image", "images[0]", "not an image"),
        ),
        "bad-jpeg-magic-garbage": (
            add_event("bad-jpeg-magic-garbage", [ns.put_image("bad/magic.jpg", b"\xff\xd8\xff\xe0" + np.random.default_rng(3).bytes(300))]),
            Bad("corrupt_image", "images[0]", "JPEG"),
        ),
        "bad-decompression-bomb": (
            add_event("bad-decompression-bomb", [ns.put_image("bad/bomb.png", bomb)]),
            Bad("image_too_large", "images[0]", "over the limit"),
        ),
        "bad-over-byte-limit": (
            add_event("bad-over-byte-limit", [ns.put_image("bad/big.png", big)]),
            Bad("image_too_large", "images[0].uri", f"limit {MAX_BYTES}"),
        ),
        "bad-bbox-outside": (
            add_event("bad-bbox-outside", [ns.put_image("bad/bbox.jpg", goods["jpeg"])], bbox=[200, 200, 300, 300]),
            Bad("invalid_crop", "images[0].bbox", "entirely outside the image on the 96x96 image"),
        ),
        "bad-second-image": (
            add_event("bad-second-image", [ns.put_image("bad/fine.jpg", goods["jpeg"]), ns.put_image("bad/empty2.jpg", b"")]),
            Bad("corrupt_image", "images[1]", "empty file"),
        ),
        "bad-file-outside-root": (
            add_event("bad-file-outside-root", ["file:///etc/passwd"]),
            Bad("forbidden_uri", "images[0].uri", "outside the allowed root"),
        ),
        "bad-file-traversal": (
            add_event("bad-file-traversal", [f"file://{root}/../secret.txt"]),
            Bad("forbidden_uri", "images[0].uri", "outside the allowed root"),
        ),
        "bad-file-encoded-traversal": (
            add_event("bad-file-encoded-traversal", [f"file://{root}/%2e%2e/secret.txt"]),
            Bad("forbidden_uri", "images[0].uri", "outside the allowed root"),
        ),
        "bad-file-symlink-out": (
            add_event("bad-file-symlink-out", [f"file://{root}/link-out.jpg"]),
            Bad("forbidden_uri", "images[0].uri", "outside the allowed root"),
        ),
        "bad-file-missing": (
            add_event("bad-file-missing", [f"file://{root}/nope.jpg"]),
            Bad("missing_image", "images[0].uri", "does not exist"),
        ),
        "bad-file-directory": (
            add_event("bad-file-directory", [f"file://{root}"]),
            Bad("missing_image", "images[0].uri", "not a regular file"),
        ),
    }
    # invalid events from a producer that skipped validation: the worker validates again
    unvalidated: dict[str, tuple[Any, Bad]] = {
        "raw-filter-injection": (
            {"type": "add", "product_id": 'x" or product_id != "', "version": 1, "images": [{"uri": "s3://c/a.jpg"}]},
            Bad("invalid_event", "product_id", "only letters"),
        ),
        "raw-unknown-type": (
            {"type": "upsert", "product_id": "raw-1", "version": 1},
            Bad("invalid_event", "type", "unknown event type 'upsert'"),
        ),
        "raw-negative-version": (
            {"type": "delete", "product_id": "raw-2", "version": -5},
            Bad("invalid_event", "version", "greater than or equal to 0"),
        ),
        "raw-metadata-uri": (
            add_event("raw-3", ["http://169.254.169.254/latest/meta-data/"]),
            Bad("invalid_event", "images[0].uri", "scheme 'http' is not allowed"),
        ),
        "raw-add-no-images": (
            {"type": "add", "product_id": "raw-4", "version": 1, "images": []},
            Bad("invalid_event", "images", "at least one image"),
        ),
        "raw-too-many-images": (
            add_event("raw-5", [f"s3://{bucket}/x{i}.jpg" for i in range(9)]),
            Bad("invalid_event", "images", "at most 8"),
        ),
        "raw-inverted-bbox": (
            add_event("raw-6", [f"s3://{bucket}/x.jpg"], bbox=[50, 50, 10, 10]),
            Bad("invalid_event", "images[0].bbox", "[50, 50, 10, 10] is inverted (x1 < x0)"),
        ),
        "raw-zero-area-bbox": (
            add_event("raw-7", [f"s3://{bucket}/x.jpg"], bbox=[10, 10, 50, 10]),
            Bad("invalid_event", "images[0].bbox", "[10, 10, 50, 10] has zero area"),
        ),
        "raw-not-an-object": ("add raw-8 please", Bad("invalid_event", "event", "malformed JSON")),
        "raw-missing-version": ({"type": "delete", "product_id": "raw-9"}, Bad("invalid_event", "version", "required")),
    }

    expected_dead: dict[str, tuple[str, Bad]] = {}  # task id -> (case, expectation)
    events = list(good_events.values()) + [e for e, _ in bad_events.values()]
    ids = ns.publish(events)
    bad_ids = ids[len(good_events) :]
    for (name, (_, bad)), tid in zip(bad_events.items(), bad_ids, strict=True):
        expected_dead[tid] = (name, bad)
    for name, (raw, bad) in unvalidated.items():
        expected_dead[send_unvalidated(ns, raw)] = (name, bad)
    # broker messages Celery cannot run (stock Celery drops them, and the wrong shape kills it)
    messages: dict[str, tuple[bytes | str, dict[str, Any], Bad]] = {
        "msg-malformed-json": (b'[[{"type": "add", "product_id": "m-1"', task_headers(), Bad("undecodable", None, "malformed JSON body")),
        "msg-body-not-a-list": (
            json.dumps({"type": "add", "product_id": "m-2"}),
            task_headers(),
            Bad("malformed_task", None, "[args, kwargs, embed]"),
        ),
        "msg-body-a-string": (json.dumps("add m-3"), task_headers(), Bad("malformed_task", None, "got str")),
        "msg-no-arguments": (
            json.dumps([[], {}, {}]),
            task_headers(),
            Bad("malformed_task", None, "missing 1 required positional argument"),
        ),
        "msg-unknown-task": (
            json.dumps([[{}], {}, {}]),
            task_headers("cardigan.reindex_everything"),
            Bad("unknown_task", None, "unknown task 'cardigan.reindex_everything'"),
        ),
    }
    for name, (body, headers, bad) in messages.items():
        send_raw(ns, body, headers)
        expected_dead[headers["id"]] = (name, bad)
    # protocol 1 (no headers, the task in the body): a good one runs, a bad one is a dead letter
    p1_good = add_event("ok-protocol-1", [ns.put_image("ok/p1.jpg", goods["jpeg"])])
    good_events["ok-protocol-1"] = p1_good
    send_raw(ns, json.dumps({"task": "cardigan.index_event", "id": str(uuid.uuid4()), "args": [p1_good], "kwargs": {}}), {})
    p1_bad = str(uuid.uuid4())
    send_raw(ns, json.dumps({"task": "cardigan.index_event", "id": p1_bad, "args": [p1_good], "kwargs": "oops"}), {})
    expected_dead[p1_bad] = ("msg-protocol-1-kwargs-not-object", Bad("malformed_task", None, "kwargs an object, got list and str"))
    tid = str(uuid.uuid4())
    send_raw(ns, json.dumps({"hello": "world", "id": tid}), {})  # not a task message at all
    expected_dead[tid] = ("msg-not-a-task", Bad("unknown_message", None, "not a Celery task message"))
    # no task id: stock Celery's consumer restarts in a loop on this one, the message never leaves
    no_id = {k: v for k, v in task_headers().items() if k != "id"}
    send_raw(ns, json.dumps([[{"type": "delete", "product_id": "m-4", "version": 1}], {}, {}]), no_id)

    n_dead = len(expected_dead) + 1  # + the one without an id
    expected: dict[str, Expected | None] = {pid: Expected(1, len(e["images"])) for pid, e in good_events.items()}
    expected.update({pid: None for pid in bad_events})
    converge(ns, expected, timeout=150)
    wait_until(lambda: ns.dead().count() >= n_dead, 30, f"{n_dead} dead letters")
    dead = ns.dead().list()
    assert len(dead) == n_dead, sorted(d.reason for d in dead)
    by_task = {d.task_id: d for d in dead}
    problems = []
    for task_id, (name, bad) in expected_dead.items():
        d = by_task.get(task_id)
        if d is None:
            problems.append(f"{name}: no dead letter")
        elif d.kind != bad.kind or bad.words not in d.reason or (bad.field is not None and not (d.field or "").startswith(bad.field)):
            problems.append(f"{name}: got kind={d.kind} field={d.field} reason={d.reason!r}; want {bad}")
    (stray,) = [d for d in dead if d.task_id not in expected_dead]
    assert stray.task_id is None and stray.kind == "malformed_task" and stray.reason == "the task id ('id') is missing", stray
    assert stray.event[0][0]["product_id"] == "m-4"
    assert "hello" in json.dumps(by_task[tid].event)
    assert not problems, "\n".join(problems)
    assert w.alive(), w.log_text()[-3000:]
    assert "Unrecoverable error" not in w.log_text()

    # every dead letter keeps what was received, so it can be shown and replayed
    assert by_task[bad_ids[0]].event["product_id"] == "bad-missing-object"
    assert "m-1" in by_task[messages["msg-malformed-json"][1]["id"]].event  # the raw body, as a repr

    # good ones: vectors present, unit length, one per image
    index = ns.index()
    for pid, e in good_events.items():
        rows = index.get_product(pid, 8)
        assert len(rows) == len(e["images"]), pid
        for r in rows:
            v = np.asarray(r["embedding"], dtype=np.float64)
            assert np.isfinite(v).all() and abs(np.linalg.norm(v) - 1) < 1e-3, pid

    # EXIF: the stored vector is the upright picture's, not the stored pixels'
    _check_exif_upright(ns, goods["jpeg-exif-rotated"], index.get_product("ok-jpeg-exif-rotated", 8)[0])

    # and the worker still serves
    ns.publish([add_event("ok-after", [ns.put_image("ok/after.jpg", goods["jpeg"])])])
    converge(ns, {**expected, "ok-after": Expected(1, 1)})


def _check_exif_upright(ns: Namespace, stored: bytes, row: dict[str, Any]) -> None:
    """Embed, in this process with the worker's settings, the upright and the unturned pixels."""
    from encoder import build_encoder

    s = ns.settings
    enc = build_encoder(s.encoder).load()
    assert row["model_version"] == enc.model_version, "same encoder settings as the worker"
    raw = Image.open(io.BytesIO(stored))
    assert raw.getexif().get(0x0112) == 6 and raw.size == (72, 120)
    upright = ImageOps.exif_transpose(raw)
    assert upright.size == (120, 72)
    tensors = [
        preprocess(encode(im, "PNG"), None, size=s.encoder.image_size, max_pixels=s.limits.max_image_pixels)[0]
        for im in (upright, raw.convert("RGB"))
    ]
    import torch

    up_vec, unturned_vec = enc.embed(torch.stack(tensors))
    stored_vec = np.asarray(row["embedding"], dtype=np.float32)
    cos_up, cos_unturned = float(stored_vec @ up_vec), float(stored_vec @ unturned_vec)
    assert cos_up > 0.999, f"stored vector is not the upright image's: cos={cos_up:.5f}"
    assert cos_unturned < cos_up - 0.01, f"rotation made no difference to the vector: upright {cos_up:.5f}, unturned {cos_unturned:.5f}"
