"""Every error the agent raises on purpose, in one tree.

::

    AgentError                  base of everything below
    ├── ConfigError             config.json is unreadable or invalid (CLI: one line, exit 2)
    ├── PluginError             a plugin could not be loaded or does not match the hook specs
    ├── StoreError              the state store cannot be opened or migrated (lightd.store)
    ├── DockerError             the engine refused a call (lightd.docker); routes turn it into
    │   ├── DockerNotFound      an ApiError, and losing the engine into DockerUnavailable
    │   └── DockerConflict
    ├── InstallFailed           an install step failed; its message is the panel's reason
    ├── JobFailed               a job gives up; its message is the job's error (lightd.jobs)
    ├── PortPoolError           the port pool's store rows are inconsistent (port_pool plugin)
    ├── IptablesFailed          an iptables call failed or timed out (firewall plugin: logged,
    │                           retried; never answered to a client)
    ├── FileError               the file layer refused (lightd.files; plain, no HTTP status:
    │   │                       the app answers with the status of files.API_STATUS)
    │   ├── InvalidPath         400  (PathEscapes: a path or link leading out of the volume)
    │   ├── NotAFile, NotAFolder                                400
    │   ├── BadArchive      400  a refused archive entry (lightd.files.tarball)
    │   ├── PathNotFound, VolumeNotFound                        404
    │   ├── FileExists, FolderExists                            409
    │   ├── QuotaExceeded   409  Disk quota exceeded (a volume's size_limit, contract §15)
    │   └── NoSpace, FileOperationFailed                        500
    └── ApiError                answered to an API client as {"error": message}; carries a status
        ├── BadRequest          400  invalid input (ValidationError: a field of a JSON body;
        │                            InvalidArchive: the archives plugin's refusals)
        ├── Unauthorized        401  missing, wrong or expired token
        ├── Forbidden           403  vendor header or origin refused
        ├── NotFound            404  unknown resource or route
        ├── MethodNotAllowed    405
        ├── Conflict            409  the resource is in a state that forbids the request
        │                            (OffsetMismatch: a transfer chunk out of step, transfer)
        ├── PayloadTooLarge     413
        ├── UnsupportedMedia    415  a body that is not JSON
        ├── TooManyRequests     429  (JobLimitReached: a key's job limit, lightd.jobs)
        ├── DockerUnavailable   503  the Docker engine does not answer
        └── StatsUnavailable    503  no stats sample came in time (GET /containers/:id/stats)

    FieldError (a ValueError)   a config or body field failed its check; the converter turns
                                it into ConfigError or ValidationError naming the field
    DestinationNotAllowed       (an Exception) a transfer's target resolves to an address
                                that is not allowed (transfer plugin: the job fails so)

Plugins raise these (or subclasses) from their routes; the app turns ApiError and FileError
into responses. Anything else that escapes a route is a bug: it is logged with its
traceback and answered as a bare 500 that reveals nothing. ``tests/test_contracts.py``
fails when a module defines an exception class this tree does not name.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AgentError",
    "ApiError",
    "BadRequest",
    "ConfigError",
    "Conflict",
    "DockerUnavailable",
    "Forbidden",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "PluginError",
    "TooManyRequests",
    "Unauthorized",
    "UnsupportedMedia",
    "ValidationError",
]


class AgentError(Exception):
    """Base class of the agent's own errors."""


class ConfigError(AgentError):
    """The configuration file is missing a piece, malformed, or holds a bad value.

    ``key`` is the dotted path of the offending key (``server.port``), or ``""`` when the
    file as a whole is at fault (unreadable, not JSON).
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


class PluginError(AgentError):
    """A plugin failed to load, or implements a hook that no spec declares."""


class ApiError(AgentError):
    """An error answered to the API client; ``status`` and ``code`` come from the class."""

    status: ClassVar[int] = 500
    #: The class's code; one instance may carry a more specific one (``code=`` below).
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: list[str] | dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        #: [ext] what was expected, where the message alone does not say (contract §1):
        #: every bad field of a body, the ``Accept`` value wanted. Never a secret.
        self.details = details

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.message, "code": self.code}
        if self.details is not None:
            body["details"] = self.details
        return body


class BadRequest(ApiError):
    status = 400
    code = "bad_request"


class ValidationError(BadRequest):
    """A JSON body does not have the expected shape; the message names the first bad field."""

    code = "invalid_field"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ApiError):
    status = 405
    code = "method_not_allowed"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


class UnsupportedMedia(ApiError):
    status = 415
    code = "unsupported_media_type"


class TooManyRequests(ApiError):
    status = 429
    code = "rate_limited"


class DockerUnavailable(ApiError):
    status = 503
    code = "docker_unavailable"

    def __init__(self, message: str = "Docker engine unreachable") -> None:
        super().__init__(message)
