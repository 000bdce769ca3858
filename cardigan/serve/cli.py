"""``cardigan serve`` (the search service) and ``cardigan bench-search`` (its load test)."""

from __future__ import annotations

import ipaddress

import typer


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and ``localhost``: binds that no other machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def serve(
    host: str | None = typer.Option(None, "--host", help="address to bind (default CARDIGAN_SERVE__HOST, 127.0.0.1)"),
    port: int | None = typer.Option(None, "--port", min=0, max=65535, help="port (default CARDIGAN_SERVE__PORT, 8080)"),
    access_log: bool = typer.Option(False, "--access-log", help="log every request (off: the metrics count them)"),
) -> None:
    """Serve the search API, its OpenAPI docs (/docs) and the search page (/)."""
    import uvicorn

    from cardigan.cli import _fail, _settings, err_console
    from cardigan.serve.app import create_app

    s = _settings()
    bind, at = host or s.serve.host, s.serve.port if port is None else port
    if not is_loopback(bind) and not s.serve.token.get_secret_value():
        _fail(f"--host {bind} is reachable from other machines: set CARDIGAN_SERVE__TOKEN (clients send Authorization: Bearer <token>)", 2)
    shown = f"[{bind}]" if ":" in bind else bind
    err_console.print(f"cardigan search on http://{shown}:{at}/ (API docs: /docs); index alias {s.collection}")
    uvicorn.run(create_app(s), host=bind, port=at, access_log=access_log, log_level="info", timeout_graceful_shutdown=10)


def register(app: typer.Typer) -> None:
    """``cardigan serve`` and ``cardigan bench-search``."""
    from cardigan.serve.bench import bench_search

    app.command("serve")(serve)
    app.command("bench-search")(bench_search)
