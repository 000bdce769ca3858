"""``cardigan serve`` (the search service) and ``cardigan bench-search`` (its load test)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import typer
from rich.console import Console

from cardigan.cli._devkit import require_devkit


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


def bench_search(
    clients: str = typer.Option("1,8,32", "--clients", help="comma-separated concurrent client counts"),
    seconds: float = typer.Option(10, "--seconds", min=1, help="measured seconds per level"),
    products: int = typer.Option(300, "--products", "-n", min=1, help="synthetic products indexed first"),
    model: str = typer.Option("mobilenet_v2", "--model", help="encoder backbone"),
    image_size: int = typer.Option(224, "--image-size", min=32, max=1024),
    k: int = typer.Option(10, "-k", min=1, max=100),
    out: Path | None = typer.Option(None, "--out", help="write bench_search.json and the service log here"),
) -> None:
    """Queries/s and p50/p99 of `cardigan serve` at 1, 8 and 32 clients, next to forward-only images/s."""
    sb = require_devkit("devkit.search_bench", "bench-search")
    console = Console()
    levels = sorted({int(c) for c in clients.split(",") if c.strip()})
    res = sb.run(
        products=products,
        levels=levels,
        seconds=seconds,
        image_size=image_size,
        model=model,
        k=k,
        out=out,
        say=lambda m: console.print(f"[dim]{m}[/]"),
    )
    console.print(sb.table(res))
    h = res["half_peak"]
    console.print(
        f"encoder forward-only: {res['forward_only_images_per_s']:.0f} images/s (before/after: "
        f"{', '.join(f'{v:.0f}' for v in res['forward_only_before_after'])}; {res['forward_only_threads']} torch threads); "
        f"{res['levels'][-1]['clients']} clients reach {res['scaling_top_vs_1']:.2f}x the 1-client rate and "
        f"{res['top_vs_forward_only']:.2f} of forward-only"
    )
    console.print(
        f"paced at half the peak ({h['rate']:.0f}/s): p50 {h['p50_ms']:.0f} ms, p99 {h['p99_ms']:.0f} ms (p99/p50 {h['p99_ms'] / h['p50_ms']:.1f})"
    )
    for r in res["levels"]:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["service_cpu_ms_by_stage"].items() if v >= 0.05)
        console.print(f"service CPU ms per query by stage at {r['clients']} client(s): {stages}")
    console.print(f"load average (1 min) before and after: {res['load_avg_1m']} (a shared machine shows here)")


def register(app: typer.Typer) -> None:
    """``cardigan serve`` and ``cardigan bench-search``."""
    app.command("serve")(serve)
    app.command("bench-search")(bench_search)
