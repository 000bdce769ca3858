"""``cardigan example-catalog``: sample product photos in your S3, and the events that index them.

A first run of a real deployment (docker compose, or your own S3/MinIO) has no catalog yet: this
renders a few synthetic products (devkit.catalog, the demo's generator), uploads their photos
to ``s3://$CARDIGAN_BUCKET/<prefix>/…`` (creating the bucket when missing) and writes one ``add``
event per product as JSON lines, ready for ``cardigan publish``. Events go to stdout by default,
so a container can write them to the host: ``docker compose run -T example-catalog > events.jsonl``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from cardigan.reach import FIX, settings_or_exit


def catalog_events(products: list[Any], bucket: str, prefix: str) -> list[dict[str, Any]]:
    """One ``add`` event (version 1) per product, its photos at ``s3://bucket/<prefix>/<key>``."""
    from devkit.catalog import image_uri, object_key

    events = []
    for p in products:
        images = []
        for img in p.images:
            ref: dict[str, Any] = {"uri": image_uri(bucket, object_key(prefix, img.key))}
            if img.bbox is not None:
                ref["bbox"] = list(img.bbox)
            images.append(ref)
        events.append({"type": "add", "product_id": p.product_id, "version": 1, "images": images, "attributes": {"category": p.category}})
    return events


def example_catalog(
    products: int = typer.Option(20, "--products", "-n", min=1, max=10_000, help="synthetic products (1-4 photos each)"),
    out: str = typer.Option("-", "--out", "-o", help="events file (JSON lines); - for stdout"),
    prefix: str = typer.Option("example", "--prefix", help="object key prefix, and product ids <prefix>-0001…"),
    seed: int = typer.Option(0, "--seed", help="same seed, same photos"),
) -> None:
    """Upload sample product photos to S3 (CARDIGAN_S3_ENDPOINT_URL, CARDIGAN_BUCKET) and write their add events."""
    from botocore.exceptions import BotoCoreError, ClientError

    from cardigan.event import parse_event
    from cardigan.imaging.fetch import make_s3_client
    from devkit.catalog import generate_catalog, upload

    s = settings_or_exit()
    endpoint = s.s3_endpoint_url or "AWS S3"
    typer.echo(f"cardigan: s3 {endpoint} (bucket {s.bucket}, prefix {prefix}/)", err=True)
    items = generate_catalog(products, seed=seed, prefix=prefix)
    events = catalog_events(items, s.bucket, prefix)
    for ev in events:  # what we write must be what `publish` accepts
        parse_event(ev, max_images=s.limits.max_images, max_id_len=s.limits.max_product_id_len)
    s3 = make_s3_client(s.s3_endpoint_url, s.s3_region)
    try:
        try:
            s3.head_bucket(Bucket=s.bucket)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise
            s3.create_bucket(Bucket=s.bucket)
        n = upload(items, s3, s.bucket, prefix=prefix)
    except (BotoCoreError, ClientError) as e:
        typer.echo(
            f"cardigan: cannot upload to s3 {endpoint} bucket {s.bucket} ({' '.join(str(e).split())}); {FIX}, or set CARDIGAN_S3_ENDPOINT_URL and the AWS_* keys",
            err=True,
        )
        raise typer.Exit(2) from None
    text = "".join(json.dumps(ev) + "\n" for ev in events)
    if out == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        dest = "stdout"
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        dest = out
    typer.echo(
        f"uploaded {n} photos of {len(items)} products to s3://{s.bucket}/{prefix}/; wrote {len(events)} add events to {dest}", err=True
    )
    typer.echo(f"next: cardigan publish {out if out != '-' else 'FILE'}, then `cardigan events show {items[0].product_id}`", err=True)


def register(app: typer.Typer) -> None:
    app.command("example-catalog")(example_catalog)
