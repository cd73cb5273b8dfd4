"""Status codes of the C API and the exceptions they become: one ``EmberError`` subclass per
failing ``ember_status``, each carrying ``.status`` and ``.message`` (``ember_last_error()``
of the failed call)."""

from __future__ import annotations

import enum
from typing import Any, Dict, Optional, Type

from . import _ffi


class Status(enum.IntEnum):
    """``enum ember_status``: the result of every fallible call."""

    OK = 0
    INVALID_ARGUMENT = 1
    IO = 2
    BAD_FORMAT = 3
    UNSUPPORTED = 4
    CONTEXT_FULL = 5
    BUFFER_TOO_SMALL = 6
    CANCELLED = 7
    OUT_OF_MEMORY = 8
    BUSY = 9
    INTERNAL = 10


class StopReason(enum.IntEnum):
    """``enum ember_stop_reason``: why a generation stopped."""

    END_TOKEN = 0
    MAX_TOKENS = 1
    STOP_STRING = 2
    CALLBACK = 3
    CONTEXT_FULL = 4
    CANCELLED = 5
    CONSTRAINT_COMPLETE = 6
    CONSTRAINT_INCOMPLETE = 7


class ConstraintKind(enum.IntEnum):
    """``enum ember_constraint_kind``: what a sampler's constraint text is."""

    NONE = 0
    JSON_SCHEMA = 1
    REGEX = 2
    LARK = 3
    GBNF = 4


class ConstraintState(enum.IntEnum):
    """``enum ember_constraint_state``: where a sampler's constraint stands."""

    NONE = 0
    INCOMPLETE = 1
    COMPLETE = 2
    FINISHED = 3


class KvType(enum.IntEnum):
    """``enum ember_kv_type``: the element type of a session's KV cache."""

    F32 = 0
    F16 = 1


class LogLevel(enum.IntEnum):
    """``enum ember_log_level``: severity of a log message."""

    ERROR = 0
    WARN = 1
    INFO = 2


class EmberError(Exception):
    """A failed Ember call. ``status`` is the ``Status`` (an int if the library returned a
    value this package does not know), ``message`` the library's description."""

    #: The status this class stands for (set on each subclass).
    status: Any = None

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        if status is not None:
            try:
                self.status = Status(status)
            except ValueError:
                self.status = status
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        name = self.status.name if isinstance(self.status, Status) else str(self.status)
        return f"{self.message} [{name}]"


class InvalidArgumentError(EmberError, ValueError):
    """A NULL or closed handle, an out-of-range value, invalid UTF-8, a bad token id."""

    status = Status.INVALID_ARGUMENT


class IoError(EmberError):
    """A file could not be opened or read (e.g. a model folder that does not exist)."""

    status = Status.IO


class BadFormatError(EmberError):
    """A file is malformed (truncated, corrupt, inconsistent)."""

    status = Status.BAD_FORMAT


class UnsupportedError(EmberError):
    """Something Ember does not implement (architecture, dtype, a model without tokenizer)."""

    status = Status.UNSUPPORTED


class ContextFullError(EmberError):
    """The session's context cannot hold the tokens; the session is unchanged."""

    status = Status.CONTEXT_FULL


class BufferTooSmallError(EmberError):
    """An output buffer was too small (handled inside this package; not normally seen)."""

    status = Status.BUFFER_TOO_SMALL


class CancelledError(EmberError):
    """The call was cancelled with ``Session.cancel()``; the session is unchanged."""

    status = Status.CANCELLED


class OutOfMemoryError(EmberError, MemoryError):
    """An allocation failed (e.g. a KV cache too large for the machine)."""

    status = Status.OUT_OF_MEMORY


class BusyError(EmberError):
    """The object is in use by another thread (or by a running generation)."""

    status = Status.BUSY


class InternalError(EmberError):
    """A bug in Ember; the session involved is no longer usable."""

    status = Status.INTERNAL


#: The exception class of each failing status.
ERRORS: Dict[Status, Type[EmberError]] = {
    cls.status: cls
    for cls in (
        InvalidArgumentError,
        IoError,
        BadFormatError,
        UnsupportedError,
        ContextFullError,
        BufferTooSmallError,
        CancelledError,
        OutOfMemoryError,
        BusyError,
        InternalError,
    )
}


def error_for(status: int, message: str) -> EmberError:
    """The exception for a failing ``status`` with ``message``."""
    cls = ERRORS.get(status)  # type: ignore[call-overload]
    return cls(message) if cls is not None else EmberError(message, status)


def last_error() -> str:
    """``ember_last_error()``: the message of this thread's last failed call ("" if none)."""
    return _ffi.lib.ember_last_error().decode("utf-8", "replace")


def check(result: _ffi.ember_status, function: Any, arguments: Any) -> int:
    """ctypes ``errcheck`` hook of every function returning ``ember_status``: raises the
    matching ``EmberError`` on failure. It runs on the calling thread right after the call,
    so ``ember_last_error()`` still describes this call."""
    status = result.value
    if status != Status.OK:
        raise error_for(status, last_error())
    return status


for _name, (_restype, _) in _ffi.SIGNATURES.items():
    if _restype is _ffi.ember_status:
        getattr(_ffi.lib, _name).errcheck = check
