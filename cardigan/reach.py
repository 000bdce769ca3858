"""Where a command talks, and one clear line when nothing answers there.

A new user's first mistake is a shell that does not point at their servers: the event goes to
an unrelated Redis, or a command dies in a traceback. Every command that talks to a server says
first, on stderr, where (secrets redacted), and turns "nothing listens there" into one line with
the fix and exit status 2.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer

from cardigan.errors import IndexUnavailable, StateUnavailable
from cardigan.keys import EX_UNREACHABLE
from config.settings import Settings, load_settings, redact_url

FIX = 'start the stack with `eval "$(cardigan stack up)"`, or `source demo-out/demo.env` after `cardigan demo --keep`'


class Unreachable(Exception):
    """A server named by the settings did not answer."""

    def __init__(self, what: str, url: str, detail: str, variable: str) -> None:
        super().__init__(f"{what} at {url} unreachable: {detail}")
        self.what, self.url, self.detail, self.variable = what, url, detail, variable

    def line(self) -> str:
        return f"cardigan: cannot reach the {self.what} at {self.url} ({self.detail}); {FIX}, or set {self.variable}"


def settings_or_exit() -> Settings:
    """The settings, or exit 2 with one line naming the bad value (never a traceback)."""
    try:
        return load_settings()
    except Exception as e:  # noqa: BLE001 - a settings error must read as one, not a traceback
        typer.echo(f"cardigan: configuration error: {e}", err=True)
        raise typer.Exit(EX_UNREACHABLE) from None


def state_url(settings: Settings) -> str:
    """The state Redis URL, or exit 2 with the reason (RabbitMQ broker without CARDIGAN_STATE_URL)."""
    try:
        return settings.effective_state_url
    except ValueError as e:
        typer.echo(f"cardigan: configuration error: {e}", err=True)
        raise typer.Exit(EX_UNREACHABLE) from None


def where(settings: Settings, *, broker: bool = False, queues: list[str] | None = None, state: bool = False, milvus: bool = False) -> str:
    """``broker redis://… (queue q) · state redis://… · milvus http://… (alias products)``."""
    s = settings
    parts = []
    if broker:
        qs = queues if queues is not None else [s.queue]
        # kombu/Celery print every broker URL as redis://:**@host, password or not: say which it is
        pw = "password ***" if "@" in s.broker_url.split("://", 1)[-1] else "no password"
        parts.append(f"broker {redact_url(s.broker_url)} ({pw}; queue{'s' if len(qs) > 1 else ''} {', '.join(qs)})")
    if state:
        url = state_url(s)
        parts.append("state: the broker's Redis" if broker and url == s.broker_url else f"state {redact_url(url)}")
    if milvus:
        parts.append(f"milvus {redact_url(s.milvus_uri)} (alias {s.collection})")
    return " · ".join(parts)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def check_broker(settings: Settings, *, attempts: int = 1, interval_s: float = 1.0) -> None:
    """Connect to the broker (Redis or AMQP, with the app's TLS options), at most ``attempts`` times."""
    from config.celery_app import create_app

    app = create_app(settings)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(
                max_retries=max(0, attempts - 1), interval_start=interval_s, interval_step=interval_s, interval_max=interval_s, timeout=5
            )
    except Exception as e:  # noqa: BLE001 - kombu wraps redis/amqp/socket errors differently
        raise Unreachable("broker", redact_url(settings.broker_url), _one_line(e), "CARDIGAN_BROKER_URL") from e


def check_state(settings: Settings, *, attempts: int = 1, interval_s: float = 1.0) -> None:
    """PING the state Redis, at most ``attempts`` times."""
    import time

    import redis

    from cardigan.store.guard import make_redis

    url = state_url(settings)
    for i in range(attempts):
        r = make_redis(url)
        try:
            r.ping()
            return
        except redis.RedisError as e:
            if i == attempts - 1:
                variable = "CARDIGAN_STATE_URL" if settings.state_url else "CARDIGAN_BROKER_URL"
                raise Unreachable("state Redis", redact_url(url), _one_line(e), variable) from e
            time.sleep(interval_s)
        finally:
            r.close()


def _as_unreachable(e: BaseException, settings: Settings) -> Unreachable | None:
    """The errors that mean "a server did not answer", as an Unreachable; None for any other."""
    import redis
    from kombu.exceptions import OperationalError

    if isinstance(e, Unreachable):
        return e
    if isinstance(e, IndexUnavailable):
        return Unreachable(
            "Milvus server", redact_url(settings.milvus_uri), _one_line(e).split(" unreachable: ", 1)[-1], "CARDIGAN_MILVUS_URI"
        )
    if isinstance(e, (redis.ConnectionError, redis.TimeoutError, StateUnavailable)):
        try:
            url = redact_url(settings.effective_state_url)
        except ValueError:
            url = "?"
        return Unreachable("state Redis", url, _one_line(e), "CARDIGAN_STATE_URL")
    if isinstance(e, (OperationalError, ConnectionError)):
        return Unreachable("broker", redact_url(settings.broker_url), _one_line(e), "CARDIGAN_BROKER_URL")
    return None


@contextmanager
def talking_to(
    settings: Settings,
    *,
    broker: bool = False,
    queues: list[str] | None = None,
    state: bool = False,
    milvus: bool = False,
    check: bool = True,
) -> Iterator[None]:
    """Say where the block talks, check the broker/state first, and exit 2 with the fix if one is down.

    Milvus is not pinged here: opening the index fails fast (under a second) with IndexUnavailable,
    which is turned into the same one line."""
    typer.echo(f"cardigan: {where(settings, broker=broker, queues=queues, state=state, milvus=milvus)}", err=True)
    try:
        if check and broker:
            check_broker(settings)
        if check and state:
            check_state(settings)
        yield
    except Exception as e:
        u = _as_unreachable(e, settings)
        if u is None:
            raise
        typer.echo(u.line(), err=True)
        raise typer.Exit(EX_UNREACHABLE) from None


def exit_line(e: BaseException, settings: Any) -> str | None:
    """For ``main``: the one line for an unreachable server that escaped a command, else None."""
    u = _as_unreachable(e, settings) if settings is not None else None
    return u.line() if u else None
