"""Ember: embeddable CPU inference for GPT-style language models, from Python.

A thin layer over the C library (``include/ember.h``) with ``ctypes``: all the work is done
by the library, which releases the GIL during every call. ::

    import ember

    with ember.Model("models/SmolLM2-135M-Instruct.Q4_1.gguf", threads=2) as model:
        for piece in model.generate("Once upon a time", max_tokens=32):
            print(piece, end="", flush=True)

        session = model.session(n_ctx=512)
        logits = session.step(model.tokenize("Hello"))    # numpy view, no copy
        token = ember.Sampler(temperature=0.7, seed=1).sample(logits)

Where the library comes from: see ``ember._ffi`` (``EMBER_LIBRARY``, next to the package,
the repository's ``target/release`` and ``target/debug``, then the system).
"""

from ._core import (
    HAVE_NUMPY,
    Detokenizer,
    Gbnf,
    Message,
    Model,
    ModelInfo,
    Pool,
    Sampler,
    Session,
    TextStream,
    abi_version,
    probe,
    set_log_callback,
    status_name,
    step_batch,
    version,
)
from ._ffi import ABI_VERSION, LIBRARY_PATH
from .errors import (
    BadFormatError,
    BufferTooSmallError,
    BusyError,
    CancelledError,
    ConstraintKind,
    ConstraintState,
    ContextFullError,
    EmberError,
    InternalError,
    InvalidArgumentError,
    IoError,
    KvType,
    LogLevel,
    OutOfMemoryError,
    Status,
    StopReason,
    UnsupportedError,
)

__version__ = "0.1.0"

__all__ = [
    "ABI_VERSION",
    "HAVE_NUMPY",
    "LIBRARY_PATH",
    "BadFormatError",
    "BufferTooSmallError",
    "BusyError",
    "CancelledError",
    "ConstraintKind",
    "ConstraintState",
    "ContextFullError",
    "Detokenizer",
    "EmberError",
    "Gbnf",
    "InternalError",
    "InvalidArgumentError",
    "IoError",
    "KvType",
    "LogLevel",
    "Message",
    "Model",
    "ModelInfo",
    "OutOfMemoryError",
    "Pool",
    "Sampler",
    "Session",
    "Status",
    "StopReason",
    "TextStream",
    "UnsupportedError",
    "abi_version",
    "probe",
    "set_log_callback",
    "status_name",
    "step_batch",
    "version",
]
