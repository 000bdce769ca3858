"""What operators and tests ask: is work waiting, in flight, dead, and what is indexed?"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery

from cardigan.keys import TARGETS_KEY
from cardigan.ops.reindex import reindex_progress
from cardigan.store.deadletter import DeadLetters
from cardigan.store.guard import make_redis
from cardigan.store.index import Index
from cardigan.store.tombstones import Tombstones
from config.settings import Settings, redact_url


def queue_depths(app: Celery, queues: list[str]) -> dict[str, int]:
    """Messages ready in each queue (Redis list length / AMQP message_count)."""
    out: dict[str, int] = {}
    with app.connection_for_read() as conn:
        for q in queues:
            ch = conn.channel()  # AMQP closes a channel on a failed passive declare
            try:
                _, count, _ = ch.queue_declare(queue=q, passive=True)
            except Exception:  # noqa: BLE001 - a queue not declared yet is an empty queue
                count = 0
            finally:
                try:
                    ch.close()
                except Exception:  # noqa: BLE001
                    pass
            out[q] = int(count)
    return out


def in_flight(app: Celery, timeout: float = 1.0) -> dict[str, Any]:
    """Workers online and the tasks they hold (active, prefetched, waiting on a retry ETA)."""
    insp = app.control.inspect(timeout=timeout)
    active = insp.active() or {}
    reserved = insp.reserved() or {}
    scheduled = insp.scheduled() or {}
    workers = sorted(set(active) | set(reserved) | set(scheduled))
    return {
        "workers": workers,
        "active": sum(len(v) for v in active.values()),
        "reserved": sum(len(v) for v in reserved.values()),
        "scheduled": sum(len(v) for v in scheduled.values()),
    }


def collect_status(settings: Settings, app: Celery, *, inspect: bool = True) -> dict[str, Any]:
    s = settings
    r = make_redis(s.effective_state_url)
    try:
        index = Index.from_settings(s)
        live = index.live_collection()
        collections = {}
        for name in index.collections():
            rows = (
                index.client.query(name, filter="", output_fields=["count(*)"], consistency_level="Strong") if _loaded(index, name) else []
            )
            collections[name] = {"rows": int(rows[0]["count(*)"]) if rows else 0, "live": name == live}
        index.close()
        depths = queue_depths(app, [s.queue, s.bulk_queue])
        flight = in_flight(app) if inspect else {}
        out: dict[str, Any] = {
            "time": time.time(),
            "broker": redact_url(s.broker_url),
            "milvus": redact_url(s.milvus_uri),
            "alias": s.collection,
            "live_collection": live,
            "write_targets": sorted(r.smembers(TARGETS_KEY.format(alias=s.collection))) or ([live] if live else []),  # type: ignore[arg-type]
            "collections": collections,
            "queues": depths,
            "dead_letters": DeadLetters(r).count(),
            "dead_letters_dropped": DeadLetters(r).dropped(),
            "redis_memory": redis_memory(r),
            "tombstones": {c: Tombstones(r, retention_s=s.worker.tombstone_retention_s).count(c) for c in collections},
            "reindex": reindex_progress(r, s.collection),  # the last reindex's phase and counters
            "duplicates": duplicates_status(r, s.collection),
            **({"in_flight": flight} if inspect else {}),
        }
        out["drained"] = sum(depths.values()) == 0 and (not inspect or flight["active"] + flight["reserved"] + flight["scheduled"] == 0)
        return out
    finally:
        r.close()


def duplicates_status(r: Any, alias: str) -> dict[str, Any]:
    """Double listings: pairs and groups open, products waiting for a check, detection lag."""
    from cardigan.duplicates.groups import groups
    from cardigan.duplicates.pairs import PairStore

    store = PairStore(r, alias)
    lags = sorted(store.lags(1000))
    counts = store.counts()
    return {
        "pairs_open": store.count(),
        "groups_open": len(groups(store.all_pairs())),
        "pending": store.pending(),
        "oldest_pending_ms": store.oldest_pending_ms(),
        "lag_p50_ms": lags[len(lags) // 2] if lags else None,
        "lag_p99_ms": lags[min(len(lags) - 1, int(len(lags) * 0.99))] if lags else None,
        "pairs_found": counts.get("pairs_added", 0),
        "pairs_dropped": counts.get("pairs_dropped", 0),
        "checked": counts.get("checked", 0),
        "failures": counts.get("failures", 0),
    }


def redis_memory(r: Any) -> dict[str, Any]:
    """The state store's memory: it is a noeviction server shared with the broker, so a full one
    stops the broker too. ``maxmemory`` 0 means no limit (then the machine's memory is)."""
    info = r.info("memory")
    used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
    return {
        "used_bytes": used,
        "peak_bytes": int(info.get("used_memory_peak", 0)),
        "maxmemory_bytes": limit,
        "policy": str(info.get("maxmemory_policy", "")),
        "used_fraction": round(used / limit, 4) if limit else None,
    }


def format_memory(m: dict[str, Any]) -> str:
    """One status line: ``12.3 MiB used of 1.0 GiB (1.2%), noeviction``."""
    used = f"{m['used_bytes'] / 2**20:.1f} MiB used"
    limit = f" of {m['maxmemory_bytes'] / 2**20:.0f} MiB ({m['used_fraction']:.1%})" if m["maxmemory_bytes"] else " (no maxmemory)"
    return f"{used}{limit}, peak {m['peak_bytes'] / 2**20:.1f} MiB, policy {m['policy'] or '?'}"


def _loaded(index: Index, name: str) -> bool:
    try:
        index.client.load_collection(name)
        return True
    except Exception:  # noqa: BLE001
        return False
