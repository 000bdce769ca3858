"""Celery wiring: JSON only, late acks, events on for Flower. No domain code here."""

from __future__ import annotations

import os
import ssl
from typing import Any
from urllib.parse import urlsplit

# Before torch is imported: idle OpenMP threads must sleep, not spin, or on a small CPU they
# steal the cores that decode and the broker need (measured: model load 0.3 s vs 30 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from celery import Celery  # noqa: E402
from kombu import Exchange, Queue  # noqa: E402

from config.settings import Settings, load_settings  # noqa: E402


def broker_tls(url: str) -> dict[str, Any] | None:
    """TLS options that check the server's certificate and name, for rediss:// and amqps://.

    kombu's defaults are weaker: rediss:// without options accepts any certificate (CERT_NONE,
    with a warning) and amqps:// checks the chain but not the host name. Options given in a
    rediss:// URL (``?ssl_cert_reqs=…&ssl_ca_certs=…``) are the operator's choice and win.
    A private CA: ``SSL_CERT_FILE=/path/ca.pem`` in the environment (OpenSSL's default paths).
    """
    parts = urlsplit(url)
    if parts.scheme == "rediss":
        return None if "ssl_cert_reqs" in parts.query else {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if parts.scheme == "amqps":
        return {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": parts.hostname}
    return None


def create_app(settings: Settings | None = None) -> Celery:
    """An app bound to ``settings`` (read from the environment when not given)."""
    s = settings or load_settings()
    app = Celery("cardigan", broker=s.broker_url, include=["tasks.index", "tasks.bulk"])
    exchange = Exchange("cardigan", type="direct", durable=True)
    app.conf.update(
        # pickle on a broker is remote code execution: JSON in, JSON out
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,  # outcomes live in Milvus, dead letters and events, not a backend
        # ack after the vectors are written; a killed worker's messages come back
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,  # failures are dead-lettered by us before acking
        worker_consumer="workers.consumer:Consumer",  # undecodable/refused messages: dead letters, not drops
        # batching needs several events in flight per process
        worker_prefetch_multiplier=s.worker.prefetch_multiplier,
        # durable queues and persistent messages survive a RabbitMQ restart
        task_queues=[
            Queue(s.queue, exchange, routing_key=s.queue, durable=True),
            Queue(s.bulk_queue, exchange, routing_key=s.bulk_queue, durable=True),
        ],
        task_default_queue=s.queue,
        task_default_exchange="cardigan",
        task_default_routing_key=s.queue,
        task_default_delivery_mode="persistent",
        task_routes={"cardigan.index_bulk": {"queue": s.bulk_queue, "routing_key": s.bulk_queue}},
        # Redis: an unacked message is redelivered after this; longer than any task may run
        # and a killed worker's messages are looked for every few seconds, not every 100 s
        broker_transport_options={
            "visibility_timeout": s.broker_visibility_timeout_s,
            "unacked_restore_interval": max(1, min(10, s.broker_visibility_timeout_s // 6)),
            "unacked_restore_throttle": 1,
            "cardigan_owner_ttl_s": s.broker_owner_ttl_s,  # a crashed worker's messages return in seconds
        },
        broker_use_ssl=broker_tls(s.broker_url),  # certificate and host name checked
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a restarted broker is waited for, not given up on
        # Flower: task events on, readable names, product id visible in the arguments
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        worker_redirect_stdouts=False,
    )
    app.cardigan_settings = s  # type: ignore[attr-defined]
    return app


app = create_app()
