"""The HTTP layer of the search service: routes, auth, limits, errors, metrics.

FastAPI (on Starlette) because the issue asks for OpenAPI docs, and FastAPI writes them from
the routes themselves; everything that decides a status code is ours, not its validators, so
every bad request gets a 4xx that names the field and the problem:
``{"error": "k: must be 1..100, got 0", "field": "k"}``.

The gate in front of the routes is plain ASGI (no per-request middleware objects): bearer
token or cookie, a bound on requests in flight (503 + ``Retry-After`` beyond it, never an
unbounded queue), a bound on the body size, and the Prometheus counters.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cardigan.errors import CardiganError, CorruptImage, ForbiddenURI, ImageTooLarge, MissingImage, TransientError
from cardigan.ops.query import Hit
from cardigan.serve.filters import BadRequest, parse_bbox, parse_filter, parse_k, product_id
from cardigan.serve.service import SearchService, thread_cpu
from config.settings import Settings

STATIC = Path(__file__).parent / "static"
FORM_OVERHEAD = 64 * 1024  # multipart headers and the small fields around the photo
RETRY_AFTER_S = 1

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_ROUTE_ID = re.compile(r"^/v1/products/[^/]+")


class BodyTooLarge(Exception):
    """The request body went past the limit while it was being read."""


class Metrics:
    """One registry per app (tests build several apps in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cardigan_serve_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram(
            "cardigan_serve_request_seconds", "request latency", ["route"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )  # fmt: skip
        self.in_flight = Gauge("cardigan_serve_in_flight", "API requests being served, by kind (query or image)", ["kind"], registry=r)
        self.rejected = Counter("cardigan_serve_overloaded", "requests refused with 503 (in-flight bound)", registry=r)
        self.embed_batches = Gauge("cardigan_serve_embed_batches", "forward passes so far", registry=r)
        self.thread_cpu = Gauge("cardigan_serve_thread_cpu_seconds", "CPU seconds of the process's threads by stage", ["stage"], registry=r)
        self.embed_items = Gauge("cardigan_serve_embed_items", "images embedded so far (items / batches = mean batch)", registry=r)


def route_label(path: str) -> str:
    """Low-cardinality route names for metrics: ids replaced by ``{id}``."""
    if path.startswith("/v1/products/"):
        tail = _ROUTE_ID.sub("", path)
        tail = re.sub(r"^/images/[^/]+$", "/images/{n}", tail)
        return "/v1/products/{id}" + tail
    return path if path.startswith(("/v1/", "/healthz", "/readyz", "/metrics")) else "other"


class Gate:
    """Auth, admission and body limits in front of the app (plain ASGI: cheap per request)."""

    def __init__(self, app: ASGIApp, *, token: str, max_in_flight: int, max_body: int, metrics: Metrics) -> None:
        self.app = app
        self.token = token.encode()
        self.max_body = max_body
        self.metrics = metrics
        # queries and catalog images are bounded apart: a page of 100 thumbnails must not
        # shut out searches, nor searches the thumbnails. Images are cheaper: 4x the bound.
        self.in_flight = {"query": 0, "image": 0}
        self.bounds = {"query": max_in_flight, "image": 4 * max_in_flight}

    def _authorised(self, scope: Scope) -> bool:
        if not self.token:
            return True
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer " and hmac.compare_digest(value[7:].strip(), self.token):
                return True
            if name == b"cookie":
                for part in value.split(b";"):
                    k, _, v = part.strip().partition(b"=")
                    # the page stores it with encodeURIComponent: a base64 token has + / =
                    if k == b"cardigan_token" and hmac.compare_digest(unquote_to_bytes(v), self.token):
                        return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        api = path.startswith("/v1/")
        if (api or path == "/metrics") and not self._authorised(scope):
            await _error(
                send, 401, "missing or wrong bearer token (Authorization: Bearer <token>)", "authorization", {"www-authenticate": "Bearer"}
            )
            return
        if not api:
            await self.app(scope, receive, send)
            return
        route = route_label(path)
        kind = "image" if route.endswith("/images/{n}") else "query"
        if self.in_flight[kind] >= self.bounds[kind]:
            self.metrics.rejected.inc()
            self.metrics.requests.labels(route, "503").inc()
            await _error(
                send,
                503,
                f"overloaded: {self.in_flight[kind]} {kind} requests in flight; retry after {RETRY_AFTER_S}s",
                None,
                {"retry-after": str(RETRY_AFTER_S)},
            )
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                await _error(send, 413, f"request body is {int(value)} bytes, over the limit of {self.max_body}", "file")
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            msg = await receive()
            received += len(msg.get("body", b""))
            if received > self.max_body:
                raise BodyTooLarge(f"request body is over the limit of {self.max_body} bytes")
            return msg

        status = 500

        async def send_status(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        self.in_flight[kind] += 1
        gauge = self.metrics.in_flight.labels(kind)
        gauge.inc()
        t0 = time.perf_counter()
        try:
            await self.app(scope, limited_receive, send_status)
        finally:
            self.in_flight[kind] -= 1
            gauge.dec()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)
            self.metrics.requests.labels(route, str(status)).inc()


async def _error(send: Send, status: int, message: str, field: str | None, headers: dict[str, str] | None = None) -> None:
    resp = _json_error(status, message, field, headers)
    await send({"type": "http.response.start", "status": status, "headers": resp.raw_headers})
    await send({"type": "http.response.body", "body": resp.body})


def _json_error(status: int, message: str, field: str | None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


def error_status(e: CardiganError) -> int:
    """The HTTP status a user expects for each of our error kinds."""
    if isinstance(e, BadRequest):
        return e.status
    if isinstance(e, ImageTooLarge):
        return 413
    if isinstance(e, CorruptImage):
        return 415 if str(e).startswith(("not an image", "unsupported")) else 400
    if isinstance(e, MissingImage):
        return 404
    if isinstance(e, ForbiddenURI):
        return 403
    if isinstance(e, TransientError):
        return 503
    return 400


def hit_json(h: Hit) -> dict[str, Any]:
    return {
        "product_id": h.product_id,
        "image_index": h.image_index,
        "image_url": f"/v1/products/{h.product_id}/images/{h.image_index}",
        "score": round(h.score, 6),
        "version": h.version,
        "model_version": h.model_version,
        "attributes": h.attributes,
    }


_HITS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "results": {"type": "array", "items": {"type": "object", "properties": {
            "product_id": {"type": "string"}, "image_index": {"type": "integer"}, "image_url": {"type": "string"},
            "score": {"type": "number"}, "version": {"type": "integer"}, "model_version": {"type": "string"},
            "attributes": {"type": "object"},
        }}},
        "query_model_version": {"type": "string"},
    },
}  # fmt: skip
_ERRORS_DOC: dict[int | str, dict[str, Any]] = {
    400: {"description": "bad request: `error` names the field and the problem"},
    401: {"description": "missing or wrong bearer token"},
    404: {"description": "unknown product"},
    503: {"description": "overloaded (see Retry-After) or Milvus unreachable"},
}


def create_app(settings: Settings, service: SearchService | None = None) -> FastAPI:
    """The ASGI app; the model loads in the lifespan (once per process), not here."""
    svc = service or SearchService(settings)
    metrics = Metrics()
    serve = settings.serve

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(svc.start)
        try:
            yield
        finally:
            await asyncio.to_thread(svc.close)

    app = FastAPI(
        title="Cardigan search",
        version="1",
        description="Search the product index by photo, find similar items and near-duplicate listings.",
        lifespan=lifespan,
    )
    app.state.service = svc

    @app.exception_handler(CardiganError)
    async def _cardigan_error(_req: Request, e: CardiganError) -> JSONResponse:
        status = error_status(e)
        return _json_error(status, e.reason, e.field, {"retry-after": str(RETRY_AFTER_S)} if status == 503 else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, e: StarletteHTTPException) -> JSONResponse:
        return _json_error(e.status_code, str(e.detail), None)

    @app.exception_handler(ClientDisconnect)
    async def _gone(_req: Request, _e: ClientDisconnect) -> Response:
        return Response(status_code=499)  # nobody reads it: the client left mid-upload

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_req: Request, e: BodyTooLarge) -> JSONResponse:
        return _json_error(413, str(e), "file")

    def results(hits: list[Hit]) -> dict[str, Any]:
        return {"results": [hit_json(h) for h in hits], "query_model_version": svc.encoder.model_version}

    @app.post(
        "/v1/search",
        tags=["search"],
        summary="Products that look like this photo",
        responses=_ERRORS_DOC | {413: {"description": "photo too large (bytes or pixels)"}, 415: {"description": "not an image"}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file"],
                            "properties": {
                                "file": {
                                    "type": "string",
                                    "format": "binary",
                                    "description": "the photo (JPEG, PNG, WebP, GIF, BMP, TIFF)",
                                },
                                "bbox": {"type": "string", "description": "x0,y0,x1,y1 in pixels of the photo: where the product is"},
                                "k": {"type": "integer", "default": 10, "description": f"products to return, 1..{serve.max_k}"},
                                "filter": {
                                    "type": "string",
                                    "description": 'JSON object of attributes, e.g. {"category": "cardigan"} or {"category": ["dress", "skirt"]}',
                                },
                            },
                        }
                    }
                },
            },
            "responses": {"200": {"content": {"application/json": {"schema": _HITS_SCHEMA}}}},
        },  # fmt: skip
    )
    async def search(request: Request) -> dict[str, Any]:
        form = await request.form(max_files=1, max_fields=8, max_part_size=FORM_OVERHEAD)
        try:
            upload = form.get("file")
            if upload is None:
                raise BadRequest("no image: send the photo as multipart/form-data field 'file'", field="file")
            if not isinstance(upload, UploadFile):
                raise BadRequest("must be a file upload, not a text field", field="file")
            data = await upload.read(settings.limits.max_image_bytes + 1)
            if not data:
                raise BadRequest("no image: the uploaded file is empty", field="file", status=400)
            if len(data) > settings.limits.max_image_bytes:
                raise BadRequest(f"image is over the limit of {settings.limits.max_image_bytes} bytes", field="file", status=413)
            k = parse_k(_text(form.get("k"), "k"), serve.max_k)
            bbox = parse_bbox(_text(form.get("bbox"), "bbox"))
            filters = parse_filter(_text(form.get("filter"), "filter"))
        finally:
            await form.close()
        return results(await svc.search(data, k=k, bbox=bbox, filters=filters))

    @app.get("/v1/products/{pid}/similar", tags=["search"], summary="Products that look like this one", responses=_ERRORS_DOC)
    async def similar(pid: str, k: str | None = None, filter: str | None = None) -> dict[str, Any]:  # noqa: A002 - the API's name
        p = product_id(pid, settings.limits.max_product_id_len)
        return results(await svc.similar(p, k=parse_k(k, serve.max_k), filters=parse_filter(filter)))

    @app.get(
        "/v1/products/{pid}/duplicates",
        tags=["duplicates"],
        summary="Near-duplicate listings of this product",
        description=(
            f"The double listings duplicate detection recorded for this product, scoring at least {svc.duplicate_threshold} "
            "(`serve.duplicate_threshold`, or `duplicates.threshold` when higher): each with its matching image."
        ),
        responses=_ERRORS_DOC,
    )
    async def product_duplicates(pid: str, k: str | None = None) -> dict[str, Any]:
        p = product_id(pid, settings.limits.max_product_id_len)
        out = results(await svc.duplicates(p, k=parse_k(k, serve.max_k)))
        return out | {"threshold": svc.duplicate_threshold}

    @app.get(
        "/v1/duplicates",
        tags=["duplicates"],
        summary="Groups of near-duplicate listings",
        description=(
            "The groups of double listings duplicate detection recorded (connected pairs), largest first, over the pairs "
            f"scoring at least {svc.duplicate_threshold} (`serve.duplicate_threshold`, or `duplicates.threshold` when higher)."
        ),
        responses=_ERRORS_DOC,
    )
    async def duplicates(limit: str | None = None) -> dict[str, Any]:
        n = parse_k(limit, 1000, default=50)
        groups, recorded = await svc.duplicate_groups(limit=n)
        shown = await svc.products(sorted({p for g in groups for p in g.products}))
        return {
            "groups": [{"score": g.score, "products": [_listing(shown.get(p), p) for p in g.products]} for g in groups],
            "threshold": svc.duplicate_threshold,
            "pairs_recorded": recorded,
        }

    @app.get(
        "/v1/products/{pid}/images/{n}", tags=["images"], summary="A catalog image, from S3 through the service", responses=_ERRORS_DOC
    )
    async def image(pid: str, n: str) -> Response:
        p = product_id(pid, settings.limits.max_product_id_len)
        if not n.isdigit() or len(n) > 3:
            raise BadRequest(f"must be a whole number 0..{settings.limits.max_images - 1}, got {n[:10]!r}", field="image_index")
        data, ctype = await svc.image(p, int(n))
        return Response(data, media_type=ctype, headers={"cache-control": "private, max-age=300", "x-content-type-options": "nosniff"})

    @app.get("/healthz", tags=["operations"], summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz", tags=["operations"], summary="Ready: model loaded and Milvus answers", responses={503: {"description": "not ready"}}
    )
    async def readyz() -> JSONResponse:
        try:
            info = await asyncio.wait_for(asyncio.to_thread(svc.ready), timeout=5)
        except (CardiganError, TimeoutError) as e:
            reason = e.reason if isinstance(e, CardiganError) else "Milvus did not answer within 5 s"
            return JSONResponse({"status": "not ready", "error": reason}, status_code=503)
        ok = bool(info["model_loaded"])
        return JSONResponse({"status": "ready" if ok else "not ready", **info}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics")
    async def prometheus() -> Response:
        if svc.embedder is not None:
            metrics.embed_batches.set(svc.embedder.stats.batches)
            metrics.embed_items.set(svc.embedder.stats.items)
        for stage, seconds in thread_cpu().items():
            metrics.thread_cpu.labels(stage).set(seconds)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/duplicates", include_in_schema=False)
    async def duplicates_page() -> FileResponse:
        return FileResponse(STATIC / "duplicates.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(
        Gate,
        token=serve.token.get_secret_value(),
        max_in_flight=serve.max_in_flight,
        max_body=settings.limits.max_image_bytes + FORM_OVERHEAD,
        metrics=metrics,
    )
    return app


def _listing(hit: Hit | None, product_id: str) -> dict[str, Any]:
    """A product in a duplicate group: its image 0 and attributes (no score: the group has one)."""
    if hit is None:  # deleted since the scan
        return {"product_id": product_id}
    return {k: v for k, v in hit_json(hit).items() if k != "score"}


def _text(value: Any, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise BadRequest("must be a text field, not a file", field=field)
