"""Publisher: validate events, then send them as Celery task messages (JSON).

The wire format (docs/message-format.md) is Celery's message protocol v2 with a JSON body, so
a producer in any language can publish; this module is the Python way to do it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from celery import Celery

from cardigan.errors import InvalidEvent
from cardigan.event import Event, parse_event
from cardigan.keys import INDEX_TASK
from config.settings import Settings

TASK_NAME = INDEX_TASK


@dataclass
class Rejection:
    line: int
    reason: str


@dataclass
class PublishReport:
    published: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    task_ids: list[str] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)  # what was published, for `publish --wait`


@dataclass
class Sent:
    line: int
    task_id: str
    type: str
    product_id: str
    version: int
    sent_at: float = 0.0  # publisher's clock: `publish --wait` ignores outcomes recorded before it


def task_message_args(ev: Event) -> dict[str, Any]:
    """The event as it travels: JSON, plus the publish time for freshness metrics."""
    body = ev.model_dump(mode="json", exclude_none=True)
    body["published_at_ms"] = ev.published_at_ms or int(time.time() * 1000)
    for img in body.get("images", []):
        if img.get("bbox") is None:
            img.pop("bbox", None)
    return body


class Publisher:
    """Validates and publishes events on one pooled broker connection."""

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        from config.celery_app import create_app

        self.settings = settings
        self.app = app or create_app(settings)

    def validate(self, raw: Any) -> Event:
        lim = self.settings.limits
        return parse_event(raw, max_images=lim.max_images, max_id_len=lim.max_product_id_len)

    def publish(self, event: dict[str, Any] | Event, *, producer: Any = None) -> str:
        """Validate and send one event; returns the task id. Raises InvalidEvent."""
        ev = event if isinstance(event, Event) else self.validate(event)
        tid = uuid.uuid4().hex
        self.app.send_task(
            TASK_NAME,
            args=[task_message_args(ev)],
            task_id=tid,
            queue=self.settings.queue,
            argsrepr=f"{ev.type} {ev.product_id} v{ev.version}",  # what Flower shows
            producer=producer,
            retry=True,
            retry_policy={"max_retries": 10, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 3},
        )
        return tid

    def publish_many(self, events: Iterable[tuple[int, Any]], *, on_progress: Any = None) -> PublishReport:
        """Publish ``(line_number, raw_event)`` pairs; invalid ones are reported, not sent."""
        report = PublishReport()
        with self.app.producer_or_acquire() as producer:
            for line, raw in events:
                try:
                    ev = self.validate(raw)
                except InvalidEvent as e:
                    report.rejected.append(Rejection(line, e.reason))
                else:
                    tid = self.publish(ev, producer=producer)
                    report.task_ids.append(tid)
                    report.sent.append(Sent(line, tid, ev.type, ev.product_id, ev.version, time.time()))
                    report.published += 1
                if on_progress:
                    on_progress(1)
        return report


def read_json_lines(stream: TextIO) -> Iterator[tuple[int, Any]]:
    """``(line_number, parsed or raw text)``; blank lines skipped, bad JSON passed on as text."""
    for n, line in enumerate(stream, start=1):
        text = line.strip()
        if not text:
            continue
        try:
            yield n, json.loads(text)
        except json.JSONDecodeError:
            yield n, text  # parse_event reports it as malformed JSON with the position
