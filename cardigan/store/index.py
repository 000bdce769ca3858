"""The Milvus side: collections behind an alias, writes by primary key, searches.

MilvusClient only. Correct on Milvus Lite and on a real server: reads that must see our own
writes use Strong consistency (a server's default, Bounded, can be stale), and ``delete``'s
return value is normalised (a list on Lite, ``{"delete_count": n}`` on a server).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from typing import Any

from pymilvus import MilvusClient, MilvusException
from pymilvus.exceptions import DataNotMatchException, DataTypeNotMatchException, ParamError, PrimaryKeyException

from cardigan.errors import CardiganError, IndexRejected, IndexUnavailable
from cardigan.store.schema import OUTPUT_FIELDS, SEARCH_FIELDS, collection_schema, index_params
from config.settings import Settings, redact_url

log = logging.getLogger(__name__)

_VERSIONED = re.compile(r"^(?P<alias>.+)_v(?P<n>\d+)$")


# What Milvus says when the data, not the service, is the problem. Server (merr) codes:
# 1100 parameter invalid (a VARCHAR over max_length, a JSON value over 65,536 bytes, bad UTF-8),
# 1101 parameter missing, 1102 parameter too large. Legacy codes (Milvus Lite, servers < 2.3):
# 5 IllegalArgument (what a server maps 1100 to), 6 IllegalDimension. Everything else (service not
# ready, rate limited, memory or disk quota, timeouts, connection errors) is transient.
PERMANENT_CODES = frozenset({1100, 1101, 1102})
PERMANENT_LEGACY_CODES = frozenset({5, 6})
# raised by pymilvus before anything is sent: the rows do not fit the schema
_CLIENT_DATA_ERRORS = (DataNotMatchException, DataTypeNotMatchException, ParamError, PrimaryKeyException, UnicodeError)


def classify(op: str, collection: str, exc: BaseException) -> CardiganError:
    """A Milvus failure as our error: IndexRejected (permanent) or IndexUnavailable (transient).

    Callers never look at pymilvus types or module names; this is the one translation.
    """
    if isinstance(exc, _CLIENT_DATA_ERRORS):
        msg = exc.message if isinstance(exc, MilvusException) else f"{type(exc).__name__}: {exc}"
        return IndexRejected(f"Milvus {op} on {collection} refused the data: {msg}")
    if isinstance(exc, MilvusException):
        code = getattr(exc, "code", None)
        legacy = getattr(exc, "compatible_code", None)
        if code in PERMANENT_CODES or legacy in PERMANENT_LEGACY_CODES:
            return IndexRejected(f"Milvus {op} on {collection} refused the data (code {code}): {exc.message}")
        return IndexUnavailable(f"Milvus {op} on {collection} failed (code {code}): {exc.message}")
    return IndexUnavailable(f"Milvus {op} on {collection} failed: {type(exc).__name__}: {exc}")


def _refused_credentials(exc: BaseException) -> bool:
    """Whether a failed connect was the server refusing our token (gRPC UNAUTHENTICATED underneath)."""
    seen: BaseException | None = exc
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        code = getattr(seen, "code", None)
        if callable(code) and getattr(code(), "name", "") == "UNAUTHENTICATED":
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def collection_name(alias: str, n: int) -> str:
    return f"{alias}_v{n}"


def collection_number(name: str) -> int:
    m = _VERSIONED.match(name)
    return int(m.group("n")) if m else 0


def escape_filter_string(value: str) -> str:
    """Quote a value for a Milvus filter expression; ids are validated first, this is the second lock."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Index:
    """A MilvusClient bound to one alias (``CARDIGAN_COLLECTION``); thread-safe."""

    @classmethod
    def from_settings(cls, s: Settings) -> Index:
        """The index through the configured alias (URI, token, database): how every caller opens it."""
        return cls(s.milvus_uri, token=s.milvus_token.get_secret_value(), db_name=s.milvus_db, alias=s.collection)

    def __init__(self, uri: str, *, token: str = "", db_name: str = "", alias: str, timeout: float = 20.0) -> None:
        self.alias = alias
        self.timeout = timeout
        # No keepalive pings on idle connections: the Milvus Lite server (grpc defaults)
        # answers pings more often than every 5 min with GOAWAY "too many pings".
        kw: dict[str, Any] = {
            "uri": uri,
            "timeout": timeout,
            "grpc_options": {"grpc.keepalive_time_ms": 300_000, "grpc.keepalive_permit_without_calls": False},
        }
        if token:
            kw["token"] = token
        if db_name:
            kw["db_name"] = db_name
        try:
            self.client = MilvusClient(**kw)
        except MilvusException as e:
            if _refused_credentials(e):  # pymilvus says "fail connecting" for a wrong or missing token too
                raise IndexUnavailable(
                    f"Milvus at {redact_url(uri)} refused the credentials: set CARDIGAN_MILVUS_TOKEN to user:password "
                    "(or an API key) that this server accepts"
                ) from e
            raise IndexUnavailable(f"Milvus at {redact_url(uri)} unreachable: {e.message}") from e
        except Exception as e:  # grpc connection errors surface as plain exceptions
            raise IndexUnavailable(f"Milvus at {redact_url(uri)} unreachable: {e}") from e
        self._loaded: set[str] = set()
        self._lock = threading.Lock()
        self._lite: bool | None = None

    def close(self) -> None:
        self.client.close()

    # -- collections and the alias -------------------------------------------------------

    def live_collection(self) -> str | None:
        """The collection the alias points at, or None before first use."""
        # list first: describe_alias on a missing alias makes pymilvus log a traceback
        if self.alias not in self.client.list_aliases().get("aliases", []):
            return None
        try:
            return str(self.client.describe_alias(self.alias)["collection_name"])
        except MilvusException:
            return None

    def ensure(self) -> str:
        """Create ``<alias>_v1`` and the alias on first use; make sure it is loaded.

        Raises our errors, never pymilvus's: a worker starting against a down server sees
        IndexUnavailable (and retries), not a guess from a module name.
        """
        try:
            return self._ensure()
        except CardiganError:
            raise
        except Exception as e:  # noqa: BLE001 - MilvusException, gRPC errors: classified
            raise classify("ensure", self.alias, e) from e

    def _ensure(self) -> str:
        with self._lock:
            live = self.live_collection()
            if live is None:
                live = collection_name(self.alias, 1)
                self.create_collection(live)
                try:
                    self.client.create_alias(live, self.alias)
                except MilvusException:
                    live = self.live_collection() or live  # another process won the race
            self._load(live)
            return live

    def create_collection(self, name: str) -> None:
        if self.client.has_collection(name):
            return
        schema, idx = collection_schema(), index_params(self.client)
        try:
            # Session: a worker reads its own writes; searches may pass their own level.
            self.client.create_collection(name, schema=schema, index_params=idx, consistency_level="Session")
        except MilvusException:
            if not self.client.has_collection(name):
                raise
        log.info("created Milvus collection %s", name)

    def _load(self, name: str) -> None:
        # A restarted Milvus Lite server (and a fresh real one) has collections released.
        if name in self._loaded:
            return
        self.client.load_collection(name)
        self._loaded.add(name)

    def collections(self) -> list[str]:
        """This alias's collections, oldest first."""
        names = [c for c in self.client.list_collections() if (m := _VERSIONED.match(c)) and m.group("alias") == self.alias]
        return sorted(names, key=collection_number)

    def switch_alias(self, name: str) -> None:
        """Point searches at ``name`` in one atomic step."""
        self._load(name)
        self.client.alter_alias(name, self.alias)

    def drop(self, name: str) -> None:
        self.client.drop_collection(name)
        self._loaded.discard(name)

    # -- writes ------------------------------------------------------------------------

    def upsert(self, collection: str, rows: Sequence[dict[str, Any]]) -> int:
        if not rows:
            return 0
        res = self._call("upsert", collection, data=list(rows))
        return int(res.get("upsert_count", len(rows))) if isinstance(res, dict) else len(rows)

    def delete(self, collection: str, ids: Sequence[str]) -> int:
        """Delete by primary keys (ms), never by filter (hundreds of ms on a server)."""
        if not ids:
            return 0
        res = self._call("delete", collection, ids=list(ids))
        if isinstance(res, dict):
            return int(res.get("delete_count", 0))
        return len(res) if isinstance(res, list) else 0

    def _call(self, op: str, collection: str, **kw: Any) -> Any:
        try:
            self._load(collection)
            return getattr(self.client, op)(collection, timeout=self.timeout, **kw)
        except Exception as e:  # noqa: BLE001 - MilvusException, gRPC UNAVAILABLE and friends: classified
            err = classify(op, collection, e)
            if not isinstance(err, IndexRejected):
                self._loaded.discard(collection)  # a restarted server has it released
            raise err from e

    # -- reads -------------------------------------------------------------------------

    def count(self, collection: str | None = None) -> int:
        """Rows now in a collection; Strong, so it counts writes just made."""
        name = collection or self.alias
        res = self._call("query", name, filter="", output_fields=["count(*)"], consistency_level="Strong")
        return int(res[0]["count(*)"]) if res else 0

    def get(
        self, ids: Sequence[str], fields: Sequence[str], collection: str | None = None, *, consistency: str | None = None
    ) -> list[dict[str, Any]]:
        """Rows by primary key: no filter string, so no injection and no scan."""
        if not ids:
            return []
        kw = {"consistency_level": consistency} if consistency else {}
        return [dict(r) for r in self._call("get", collection or self.alias, ids=list(ids), output_fields=list(fields), **kw)]

    def get_product(self, product_id: str, max_images: int, collection: str | None = None) -> list[dict[str, Any]]:
        """A product's rows (all K possible keys), image 0 first."""
        ids = [f"{product_id}#{i}" for i in range(max_images)]
        return sorted(self.get(ids, OUTPUT_FIELDS + ["embedding"], collection), key=lambda r: r["image_index"])

    def iter_rows(self, collection: str | None = None, batch: int = 1000, fields: list[str] | None = None) -> Any:
        """Every row, in pages (for verification and reindex)."""
        name = collection or self.alias
        self._load(name)
        it = self.client.query_iterator(
            name, batch_size=batch, filter="", output_fields=fields or OUTPUT_FIELDS, consistency_level="Strong"
        )
        try:
            while page := it.next():
                yield from page
        finally:
            it.close()

    def search(
        self, vectors: Sequence[Sequence[float]], k: int, *, collection: str | None = None, consistency: str = "Bounded", filter: str = ""
    ) -> list[list[dict[str, Any]]]:
        """``filter``: a Milvus expression built only from validated, escaped values (cardigan.serve.filters)."""
        res = self._call(
            "search",
            collection or self.alias,
            data=[list(map(float, v)) for v in vectors],
            limit=k,
            filter=filter,
            output_fields=SEARCH_FIELDS,
            search_params={"metric_type": "COSINE", "params": {"ef": max(64, k)}},
            consistency_level=consistency,
        )
        return [[{"score": float(h["distance"]), **dict(h["entity"]), "pk": h.get("id", h.get("pk"))} for h in hits] for hits in res]

    def range_search(
        self, vectors: Sequence[Sequence[float]], radius: float, limit: int, *, fields: Sequence[str], consistency: str = "Strong"
    ) -> list[list[dict[str, Any]]]:
        """Every hit scoring above ``radius`` (cosine), at most ``limit`` per vector, one call.

        Range search: on a server ``radius`` is the exclusive lower bound for COSINE and the
        optional ``range_filter`` the inclusive upper one; we leave the upper bound out, as an
        exact copy can score a hair above 1.0 in float32. ``ef`` must cover ``limit`` for HNSW.
        """
        lite = self.is_lite()
        params: dict[str, Any] = {"ef": max(64, limit)} if lite else {"radius": float(radius), "ef": max(64, limit)}
        res = self._call(
            "search",
            self.alias,
            data=[list(map(float, v)) for v in vectors],
            limit=limit,
            output_fields=list(fields),
            search_params={"metric_type": "COSINE", "params": params},
            consistency_level=consistency,
        )
        out = [[{"score": float(h["distance"]), **dict(h["entity"])} for h in hits] for hits in res]
        # Milvus Lite: top ``limit`` filtered here gives exactly its own range search (top 5×limit,
        # filtered, cut to ``limit``: the hits are ranked), at a third of its server CPU
        return [[h for h in hits if h["score"] > radius] for hits in out] if lite else out

    def is_lite(self) -> bool:
        """Whether the server is Milvus Lite (its version string says so); asked once."""
        if self._lite is None:
            try:
                self._lite = str(self.client.get_server_version()).startswith("milvus_lite")
            except Exception as e:  # noqa: BLE001 - classified like every other call
                raise classify("get_server_version", self.alias, e) from e
        return self._lite
