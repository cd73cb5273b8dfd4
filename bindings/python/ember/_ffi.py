"""The C library: where it is found, and the ctypes declarations of ``include/ember.h``.

Every function of the header is declared here (``SIGNATURES``) with its argument and result
types; ``tests/test_header.py`` parses the header and fails when a declaration here differs
from it, so a change of the C API cannot go unnoticed.

The library is looked up in this order (the first that exists is loaded):

1. the ``EMBER_LIBRARY`` environment variable: the library file itself (or a folder holding
   it); if it is set but names nothing, importing ``ember`` fails rather than fall back;
2. next to this package (``pip install`` copies the library built from the repository here);
3. the repository's ``target/release`` then ``target/debug`` (a source checkout used as is);
4. the system's library path (``ctypes.util.find_library("ember")``, e.g. after
   ``scripts/install-c``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char,
    c_char_p,
    c_double,
    c_float,
    c_int,
    c_int32,
    c_size_t,
    c_uint32,
    c_uint64,
    c_uint8,
    c_void_p,
)
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

#: The C ABI version these declarations describe (``EMBER_ABI_VERSION`` in ``ember.h``).
ABI_VERSION = 1

if sys.platform == "win32":
    LIBRARY_NAME = "ember.dll"
elif sys.platform == "darwin":
    LIBRARY_NAME = "libember.dylib"
else:
    LIBRARY_NAME = "libember.so"


# ---- opaque handles ----


class ember_model(Structure):
    """Opaque ``ember_model``: only pointers to it are used."""


class ember_session(Structure):
    """Opaque ``ember_session``."""


class ember_sampler(Structure):
    """Opaque ``ember_sampler``."""


class ember_pool(Structure):
    """Opaque ``ember_pool``."""


class ember_generation(Structure):
    """Opaque ``ember_generation``."""


class ember_detokenizer(Structure):
    """Opaque ``ember_detokenizer``."""


class ember_status(c_int):
    """``enum ember_status`` as a result type: a subclass, so that ctypes hands the value to
    the ``errcheck`` hook that turns failures into exceptions (see ``errors.check``)."""


# ---- parameter structs (each begins with uint32_t struct_size) ----


class ember_generate_params(Structure):
    """Options of ``ember_generate`` and ``ember_chat``."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("max_tokens", c_uint32),
        ("stop_strings", POINTER(c_char_p)),
        ("n_stop_strings", c_size_t),
        ("ignore_end_tokens", c_uint32),
        ("add_special", c_uint32),
        ("parse_special", c_uint32),
        ("logprobs", c_uint32),
        ("max_ahead", c_uint32),
        ("top_logprobs", c_uint32),
    ]


class ember_chat_message(Structure):
    """One message of a conversation (NUL-terminated UTF-8 role and content)."""

    _fields_ = [("role", c_char_p), ("content", c_char_p)]


class ember_generation_prompt(Structure):
    """What ``ember_generation_start`` generates from: text, tokens or messages."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("text", c_char_p),
        ("text_len", c_size_t),
        ("tokens", POINTER(c_int32)),
        ("n_tokens", c_size_t),
        ("messages", POINTER(ember_chat_message)),
        ("n_messages", c_size_t),
        ("conversation", c_char_p),
        ("conversation_len", c_size_t),
    ]


class ember_token_info(Structure):
    """One generated token and its log-probability."""

    _fields_ = [("token", c_int32), ("logprob", c_float)]


class ember_model_params(Structure):
    """Options of ``ember_model_load``."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("load_tokenizer", c_uint32),
        ("quantize_q8_0", c_uint32),
    ]


class ember_model_info(Structure):
    """What ``ember_model_probe`` says about a model file."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("supported", c_uint32),
        ("has_tokenizer", c_uint32),
        ("has_chat_template", c_uint32),
        ("architecture", ctypes.c_char * 32),
        ("reason", ctypes.c_char * 256),
        ("n_ctx_train", c_uint64),
        ("n_layers", c_uint64),
        ("n_vocab", c_uint64),
        ("n_params", c_uint64),
        ("file_bytes", c_uint64),
        ("bytes_per_token", c_uint64),
        ("tensor_types", ctypes.c_char * 192),
    ]


class ember_logit_bias(Structure):
    """A bias on one token's logit."""

    _fields_ = [("token", c_int32), ("bias", c_float)]


class ember_perf(Structure):
    """What ``ember_session_perf`` reports."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("last_prompt_tokens", c_uint64),
        ("last_prompt_ms", c_double),
        ("last_generated_tokens", c_uint64),
        ("last_generation_ms", c_double),
        ("total_prompt_tokens", c_uint64),
        ("total_prompt_ms", c_double),
        ("total_generated_tokens", c_uint64),
        ("total_generation_ms", c_double),
    ]


class ember_sampler_params(Structure):
    """Options of ``ember_sampler_new``."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("temperature", c_float),
        ("top_k", c_uint32),
        ("top_p", c_float),
        ("min_p", c_float),
        ("repetition_penalty", c_float),
        ("presence_penalty", c_float),
        ("frequency_penalty", c_float),
        ("penalty_window", c_uint32),
        ("seed", c_uint64),
        ("logit_bias", POINTER(ember_logit_bias)),
        ("n_logit_bias", c_size_t),
    ]


class ember_session_params(Structure):
    """Options of ``ember_session_new``."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("n_ctx", c_uint32),
        ("n_threads", c_uint32),
        ("n_ubatch", c_uint32),
        ("pool", POINTER(ember_pool)),
        ("kv_type", c_uint32),
    ]


class ember_pool_params(Structure):
    """Options of ``ember_pool_new``."""

    _fields_ = [("struct_size", c_uint32), ("n_threads", c_uint32)]


#: Every struct of the header with its fields, by C name (checked by the tests).
STRUCTS: Dict[str, type] = {
    cls.__name__: cls
    for cls in (
        ember_generate_params,
        ember_chat_message,
        ember_generation_prompt,
        ember_token_info,
        ember_model_params,
        ember_model_info,
        ember_logit_bias,
        ember_sampler_params,
        ember_session_params,
        ember_pool_params,
        ember_perf,
    )
}

# ---- callbacks ----

#: ``void (*)(enum ember_log_level level, const char *message, void *user)``
ember_log_callback = CFUNCTYPE(None, c_int, c_char_p, c_void_p)
#: ``bool (*)(const char *piece, size_t len, void *user)``; the piece is read by length.
ember_text_callback = CFUNCTYPE(c_bool, POINTER(c_char), c_size_t, c_void_p)

CALLBACKS: Dict[str, Any] = {
    "ember_log_callback": ember_log_callback,
    "ember_text_callback": ember_text_callback,
}

# ---- functions: name -> (result type, argument types), in the header's order ----

_model_p = POINTER(ember_model)
_session_p = POINTER(ember_session)
_sampler_p = POINTER(ember_sampler)
_detok_p = POINTER(ember_detokenizer)
_generation_p = POINTER(ember_generation)
_pool_p = POINTER(ember_pool)
_chars = POINTER(c_char)  # an output text buffer
_size_p = POINTER(c_size_t)
_tokens = POINTER(c_int32)
_floats = POINTER(c_float)
_bytes = POINTER(c_uint8)
_enum_p = POINTER(c_int)

SIGNATURES: Dict[str, Tuple[Any, List[Any]]] = {
    "ember_last_error": (c_char_p, []),
    "ember_version": (c_char_p, []),
    "ember_abi_version": (c_uint32, []),
    "ember_status_name": (c_char_p, [c_int32]),
    "ember_set_log_callback": (None, [ember_log_callback, c_void_p]),
    "ember_generate_params_default": (ember_status, [c_size_t, POINTER(ember_generate_params)]),
    "ember_generate": (
        ember_status,
        [_session_p, _sampler_p, c_char_p, c_size_t, POINTER(ember_generate_params),
         ember_text_callback, c_void_p, _enum_p, _size_p],
    ),
    "ember_chat": (
        ember_status,
        [_session_p, _sampler_p, POINTER(ember_chat_message), c_size_t,
         POINTER(ember_generate_params), ember_text_callback, c_void_p, _enum_p, _size_p],
    ),
    "ember_chat_json": (
        ember_status,
        [_session_p, _sampler_p, c_char_p, c_size_t, POINTER(ember_generate_params),
         ember_text_callback, c_void_p, _enum_p, _size_p],
    ),
    "ember_generation_start": (
        ember_status,
        [_session_p, _sampler_p, POINTER(ember_generation_prompt),
         POINTER(ember_generate_params), POINTER(_generation_p)],
    ),
    "ember_generation_poll": (ember_status, [_generation_p, _chars, c_size_t, _size_p, _enum_p]),
    "ember_generation_poll_tokens": (
        ember_status, [_generation_p, POINTER(ember_token_info), c_size_t, _size_p]),
    "ember_generation_poll_tokens_top": (
        ember_status, [_generation_p, POINTER(ember_token_info), c_size_t,
                       POINTER(ember_token_info), c_size_t, _size_p]),
    "ember_generation_wait": (ember_status, [_generation_p, c_uint32, _enum_p]),
    "ember_generation_progress": (ember_status, [_generation_p, _size_p, _size_p]),
    "ember_generation_cancel": (ember_status, [_generation_p]),
    "ember_generation_finish": (ember_status, [_generation_p, _enum_p, _size_p]),
    "ember_detokenizer_new": (ember_status, [_model_p, POINTER(_detok_p)]),
    "ember_detokenizer_free": (None, [_detok_p]),
    "ember_detokenizer_push": (ember_status, [_detok_p, c_int32, _chars, c_size_t, _size_p]),
    "ember_detokenizer_flush": (ember_status, [_detok_p, _chars, c_size_t, _size_p]),
    "ember_detokenizer_reset": (ember_status, [_detok_p]),
    "ember_model_params_default": (ember_status, [c_size_t, POINTER(ember_model_params)]),
    "ember_model_load": (
        ember_status, [c_char_p, POINTER(ember_model_params), POINTER(_model_p)]),
    "ember_model_load_from_memory": (
        ember_status, [c_void_p, c_size_t, POINTER(ember_model_params), POINTER(_model_p)]),
    "ember_model_load_fd": (
        ember_status,
        [c_int32, c_uint64, c_uint64, POINTER(ember_model_params), POINTER(_model_p)],
    ),
    "ember_model_free": (None, [_model_p]),
    "ember_model_probe": (ember_status, [c_char_p, c_size_t, POINTER(ember_model_info)]),
    "ember_model_n_vocab": (c_size_t, [_model_p]),
    "ember_model_n_embd": (c_size_t, [_model_p]),
    "ember_model_n_ctx_train": (c_size_t, [_model_p]),
    "ember_model_token_bos": (c_int32, [_model_p]),
    "ember_model_token_eos": (c_int32, [_model_p]),
    "ember_model_token_eot": (c_int32, [_model_p]),
    "ember_model_token_is_end": (c_bool, [_model_p, c_int32]),
    "ember_model_architecture": (c_char_p, [_model_p]),
    "ember_model_has_chat_template": (c_bool, [_model_p]),
    "ember_tokenize": (
        ember_status,
        [_model_p, c_char_p, c_size_t, c_bool, c_bool, _tokens, c_size_t, _size_p],
    ),
    "ember_detokenize": (ember_status, [_model_p, _tokens, c_size_t, _chars, c_size_t, _size_p]),
    "ember_chat_apply": (
        ember_status,
        [_model_p, POINTER(ember_chat_message), c_size_t, c_bool, _chars, c_size_t, _size_p],
    ),
    "ember_chat_apply_json": (
        ember_status,
        [_model_p, c_char_p, c_size_t, c_bool, _chars, c_size_t, _size_p],
    ),
    "ember_chat_parse_reply": (
        ember_status,
        [_model_p, c_char_p, c_size_t, c_char_p, c_size_t, _chars, c_size_t, _size_p],
    ),
    "ember_sampler_params_default": (ember_status, [c_size_t, POINTER(ember_sampler_params)]),
    "ember_sampler_new": (ember_status, [POINTER(ember_sampler_params), POINTER(_sampler_p)]),
    "ember_sampler_free": (None, [_sampler_p]),
    "ember_sample": (ember_status, [_sampler_p, _floats, c_size_t, _tokens]),
    "ember_sampler_accept": (ember_status, [_sampler_p, c_int32]),
    "ember_sampler_set_constraint": (
        ember_status, [_sampler_p, _model_p, c_uint32, c_char_p, c_size_t]),
    "ember_sampler_constraint_state": (ember_status, [_sampler_p, _enum_p]),
    "ember_sampler_reset": (ember_status, [_sampler_p]),
    "ember_session_params_default": (ember_status, [c_size_t, POINTER(ember_session_params)]),
    "ember_session_new": (
        ember_status, [_model_p, POINTER(ember_session_params), POINTER(_session_p)]),
    "ember_pool_params_default": (ember_status, [c_size_t, POINTER(ember_pool_params)]),
    "ember_pool_new": (ember_status, [POINTER(ember_pool_params), POINTER(_pool_p)]),
    "ember_pool_n_threads": (c_size_t, [_pool_p]),
    "ember_pool_combined_steps": (ember_status, [_pool_p, POINTER(c_uint64), POINTER(c_uint64)]),
    "ember_pool_free": (None, [_pool_p]),
    "ember_session_memory_estimate": (
        ember_status, [_model_p, POINTER(ember_session_params), _size_p]),
    "ember_session_fork": (
        ember_status, [_session_p, POINTER(ember_session_params), POINTER(_session_p)]),
    "ember_session_copy_prefix": (ember_status, [_session_p, _session_p, c_size_t]),
    "ember_session_state_size": (ember_status, [_session_p, _size_p]),
    "ember_session_state_save": (ember_status, [_session_p, _bytes, c_size_t, _size_p]),
    "ember_session_state_load": (ember_status, [_session_p, _bytes, c_size_t]),
    "ember_session_logits": (ember_status, [_session_p, _floats, c_size_t]),
    "ember_session_perf": (ember_status, [_session_p, c_size_t, POINTER(ember_perf)]),
    "ember_session_free": (None, [_session_p]),
    "ember_session_reset": (ember_status, [_session_p]),
    "ember_session_rewind": (ember_status, [_session_p, c_size_t]),
    "ember_session_position": (c_size_t, [_session_p]),
    "ember_session_n_ctx": (c_size_t, [_session_p]),
    "ember_session_tokens": (ember_status, [_session_p, _tokens, c_size_t, _size_p]),
    "ember_session_cancel": (ember_status, [_session_p]),
    "ember_session_capture_attention": (
        ember_status,
        [_session_p, POINTER(c_int32), c_size_t, POINTER(c_int32), c_size_t, c_size_t, _size_p],
    ),
    "ember_session_attention": (
        ember_status, [_session_p, c_int32, c_int32, _floats, c_size_t, _size_p, _size_p]),
    "ember_session_embed": (
        ember_status,
        [_session_p, _tokens, c_size_t, c_int32, c_bool, _floats, c_size_t, _size_p]),
    "ember_step": (ember_status, [_session_p, _tokens, c_size_t, _floats]),
    "ember_step_all": (ember_status, [_session_p, _tokens, c_size_t, _floats, c_size_t]),
    "ember_step_batch": (
        ember_status,
        [POINTER(_session_p), POINTER(_tokens), _size_p, c_size_t, POINTER(_floats)]),
}


# ---- finding and loading the library ----


def _candidates() -> Iterator[Path]:
    """Places to look for the library, in the documented order (see the module docstring)."""
    here = Path(__file__).resolve().parent
    yield here / LIBRARY_NAME
    repo = here.parents[2] if len(here.parents) > 2 else here
    for profile in ("release", "debug"):
        yield repo / "target" / profile / LIBRARY_NAME


def find_library() -> str:
    """The path of the library to load, following the documented lookup order.

    Raises ``ImportError`` when ``EMBER_LIBRARY`` names no file or nothing is found.
    """
    env = os.environ.get("EMBER_LIBRARY")
    if env:
        path = Path(env)
        if path.is_dir():
            path = path / LIBRARY_NAME
        if not path.is_file():
            raise ImportError(f"EMBER_LIBRARY={env!r}: no such library file")
        return str(path)
    tried = []
    for path in _candidates():
        if path.is_file():
            return str(path)
        tried.append(str(path))
    system = ctypes.util.find_library("ember")
    if system:
        return system
    raise ImportError(
        "the Ember library was not found; set EMBER_LIBRARY to libember's path, or build it "
        "with `cargo build --release --lib`. Tried: " + ", ".join(tried)
    )


def load(path: str) -> ctypes.CDLL:
    """Loads the library at ``path`` and declares every function of ``SIGNATURES`` on it.

    ``ctypes.CDLL`` (not ``PyDLL``) releases the GIL during every call, so a long step in
    one Python thread does not hold up the others. Status results are left as
    ``ember_status`` values; ``errors`` installs the hook that raises on failure.
    """
    lib = ctypes.CDLL(path)
    for name, (restype, argtypes) in SIGNATURES.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    version = lib.ember_abi_version()
    if version != ABI_VERSION:
        raise ImportError(
            f"{path} implements Ember ABI version {version}; this package needs {ABI_VERSION}"
        )
    return lib


#: The path of the loaded library.
LIBRARY_PATH: str = find_library()
#: The loaded library with every function declared.
lib: ctypes.CDLL = load(LIBRARY_PATH)
