"""One error tree: transient errors are retried, permanent ones become dead letters.

The retry policy lives in one place (``tasks/policy.py``); code below it only raises the
right kind of error and never decides whether to retry.
"""

from __future__ import annotations


class CardiganError(Exception):
    """Base of every error this system raises on purpose."""

    #: short machine-readable kind, stored with dead letters
    kind: str = "error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    @property
    def reason(self) -> str:
        """The message a person reads: names the field when there is one."""
        msg = str(self)
        return f"{self.field}: {msg}" if self.field and not msg.startswith(self.field) else msg


class PermanentError(CardiganError):
    """Retrying cannot help: the event is dead-lettered with this reason."""

    kind = "permanent"


class TransientError(CardiganError):
    """A dependency is down or slow: retry with backoff."""

    kind = "transient"


class InvalidEvent(PermanentError):
    kind = "invalid_event"


class ForbiddenURI(PermanentError):
    kind = "forbidden_uri"


class MissingImage(PermanentError):
    kind = "missing_image"


class ImageTooLarge(PermanentError):
    kind = "image_too_large"


class CorruptImage(PermanentError):
    kind = "corrupt_image"


class InvalidCrop(PermanentError):
    kind = "invalid_crop"


class PoisonMessage(PermanentError):
    kind = "poison"


class InternalError(PermanentError):
    """A bug, not bad input: the event is kept for replay after the fix."""

    kind = "internal_error"


class IndexRejected(PermanentError):
    """Milvus refused the data itself (a row over a field limit, a wrong type): retrying cannot help."""

    kind = "index_rejected"


class RetriesExhausted(PermanentError):
    kind = "retries_exhausted"


class FetchUnavailable(TransientError):
    kind = "fetch_unavailable"


class IndexUnavailable(TransientError):
    kind = "index_unavailable"


class StateUnavailable(TransientError):
    kind = "state_unavailable"
