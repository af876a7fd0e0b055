"""The service's errors: one tree, each kind standing for the HTTP status it is answered with.

Domain code raises these, or its own subclasses, which keep their names (an
`ArchiveUnavailable` is an `Unavailable`, an `InvalidRequest` an `InvalidInput`). One
middleware per surface turns any of them into a response (`service.web.middlewares`):
`{"error": message, "field": ...}` with `Retry-After` on the API (`/v1`), the error page on
the console (`/ui`). Handlers do not catch them to answer; they catch one only where it is
part of the page (a form's error shown beside its field).

    ServiceError             500  the base; not raised itself
    ├── InvalidInput         400  the input is malformed; `field` names which input
    │                             (also a ValueError, as the checks it replaced were)
    ├── NotFoundError        404  no such thing
    ├── Conflict             409  not possible in its current state (`retry_after` when
    │                             waiting will change that)
    ├── Gone                 410  it existed and was deleted
    ├── Unprocessable        422  well formed, but cannot be done as asked
    └── Unavailable          503  a dependency did not answer; try again (`retry_after`)

Internal control flow (`PreconditionFailed`, `NotFound` of the store, `AlreadyArchived`,
`BodyStalled`, ...) stays outside the tree: it never reaches a response as it is.

This module imports nothing from the service: every layer may use it.
"""

from __future__ import annotations

from typing import ClassVar


class ServiceError(Exception):
    """Something the client is told about: `status`, a sentence (`message`), and when it
    is worth trying again (`retry_after`, seconds, sent as `Retry-After`)."""

    status: ClassVar[int] = 500
    title: ClassVar[str] = "Something went wrong"  # the heading of the console's page
    retry_after: int | None = None
    field: str | None = None  # the input the error is about (InvalidInput)

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        if retry_after is not None:
            self.retry_after = retry_after

    @property
    def message(self) -> str:
        """The sentence the client is told: the exception's text, unless a kind keeps that
        text for the logs only (`ArchiveUnavailable` names the S3 call that failed)."""
        return str(self)


class InvalidInput(ServiceError, ValueError):
    """The input is malformed; the message says how and `field` names which input
    (`"received_on"`, `"events.since"`, a query parameter; None: the input as a whole).
    Nothing was changed."""

    status = 400
    title = "The input is not valid"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFoundError(ServiceError):
    """No such thing (a request id that names no request)."""

    status = 404
    title = "Not found"


class Conflict(ServiceError):
    """Not possible in the thing's current state (answered, extended to the limit, being
    filed right now); with `retry_after` when waiting will change that."""

    status = 409
    title = "Not possible now"


class Gone(ServiceError):
    """It existed and was deleted (the retention period is over)."""

    status = 410
    title = "Deleted"


class Unprocessable(ServiceError):
    """Well formed, but cannot be done as asked (an Idempotency-Key reused for another
    request)."""

    status = 422
    title = "Not possible"


class Unavailable(ServiceError):
    """A dependency (S3) did not answer, or kept changing under us; nothing was changed,
    try again after `retry_after` seconds."""

    status = 503
    title = "Try again shortly"
    retry_after = 5
