"""The Python API over the C handles: ``Model``, ``Session``, ``Sampler``, ``Detokenizer`` and
the ``TextStream`` of a generation. Everything computes in the C library; this module only
converts arguments, owns handles and turns failures into ``EmberError`` exceptions."""

from __future__ import annotations

import array
import atexit
import contextlib
import ctypes
import json
import operator
import os
import sys
import threading
import weakref
from ctypes import POINTER, byref, c_char_p, c_float, c_int, c_int32, c_size_t
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from . import _ffi
from .errors import (
    BufferTooSmallError,
    BusyError,
    CancelledError,
    EmberError,
    ConstraintKind,
    ConstraintState,
    InvalidArgumentError,
    KvType,
    LogLevel,
    StopReason,
)

try:  # numpy is optional: without it logits are memoryviews of float32.
    import numpy as _np
except ImportError:  # pragma: no cover - exercised by a subprocess test
    _np = None

_lib = _ffi.lib

#: A KV cache type: ``"f32"``, ``"f16"`` or a ``KvType``.
KvTypeLike = Union[str, KvType]

#: True when numpy is installed: logits are then numpy arrays.
HAVE_NUMPY: bool = _np is not None

#: A conversation message: ``{"role": ..., "content": ...}`` or ``(role, content)``.
Message = Union[Mapping[str, Any], Tuple[str, str]]
#: Logits: what ``Session.step`` returns (numpy array or memoryview), or any sequence of floats.
Logits = Any
#: Text given to the library: ``str``, or ``bytes`` already in UTF-8.
Text = Union[str, bytes]
#: A path to a model: a GGUF file or a Hugging Face folder.
PathLike = Union[str, "os.PathLike[str]"]


# ---- conversions ----


def _utf8(text: Text) -> bytes:
    """UTF-8 bytes of ``text``. Lone surrogates pass through as invalid UTF-8, so that the
    library, which checks every text, rejects them (``InvalidArgumentError``)."""
    if isinstance(text, bytes):
        return text
    return text.encode("utf-8", "surrogatepass")


def _cstr(text: Text, what: str) -> bytes:
    """UTF-8 bytes for a NUL-terminated C string; a NUL inside cannot be passed."""
    data = _utf8(text)
    if b"\0" in data:
        raise InvalidArgumentError(f"{what} contains a NUL character")
    return data


def _uint(value: int, what: str, bits: int = 32) -> int:
    """``value`` checked to fit an unsigned C integer (ctypes would wrap it silently)."""
    value = operator.index(value)
    if not 0 <= value < 1 << bits:
        raise InvalidArgumentError(f"{what} = {value} is out of range")
    return value


def _token(token: int) -> int:
    """A token id checked to fit an ``int32_t`` (the library checks the vocabulary)."""
    token = operator.index(token)
    if not -(1 << 31) <= token < 1 << 31:
        raise InvalidArgumentError(f"token {token} is out of range")
    return token


def _tokens(ids: Union[int, Iterable[int]]) -> "ctypes.Array[c_int32]":
    """``ids`` (one id or an iterable of ids) as a C ``int32_t`` array."""
    if not hasattr(ids, "__iter__"):
        ids = [operator.index(ids)]  # type: ignore[arg-type]
    try:
        values = array.array("i", ids)  # type: ignore[arg-type]
    except OverflowError as e:
        raise InvalidArgumentError(f"a token id is out of range: {e}") from None
    return (c_int32 * len(values)).from_buffer(values)


def _floats(logits: Logits) -> Tuple[Any, int, Any]:
    """``(pointer, count, keepalive)`` for a vector of float32 logits, without copying when
    it already is one (numpy float32 arrays, memoryviews, ``array('f')``, ctypes arrays)."""
    if isinstance(logits, ctypes.Array) and logits._type_ is c_float:
        return logits, len(logits), logits
    if _np is not None and isinstance(logits, _np.ndarray):
        if logits.ndim != 1:
            raise InvalidArgumentError(f"logits must be one-dimensional, not {logits.shape}")
        arr = _np.ascontiguousarray(logits, dtype=_np.float32)
        return arr.ctypes.data_as(ctypes.POINTER(c_float)), arr.size, arr
    try:
        view = memoryview(logits)
    except TypeError:
        view = None
    if view is not None and view.format in ("f", "<f", "=f") and view.ndim == 1 \
            and view.c_contiguous:
        n = view.shape[0]
        buf = (c_float * n).from_buffer_copy(view) if view.readonly \
            else (c_float * n).from_buffer(view)
        return buf, n, (buf, view)
    values = array.array("f", logits)
    buf = (c_float * len(values)).from_buffer(values)
    return buf, len(values), (buf, values)


def _float_view(buffer: "ctypes.Array[c_float]", shape: Tuple[int, ...]) -> Any:
    """A view of a C float buffer, sharing its memory: a numpy array, else a memoryview."""
    if _np is not None:
        return _np.ctypeslib.as_array(buffer).reshape(shape)
    return memoryview(buffer).cast("B").cast("f", list(shape))


def _read_text(call: Callable[[Any, int, Any], Any], cap: int = 256) -> str:
    """Runs ``call(buffer, capacity, n_out)`` for a text output of the C API, growing the
    buffer to the size the library asks for on ``EMBER_ERR_BUFFER_TOO_SMALL``."""
    n = c_size_t()
    while True:
        buf = ctypes.create_string_buffer(cap)
        try:
            call(buf, cap, byref(n))
        except BufferTooSmallError:
            if n.value <= cap:
                raise
            cap = n.value
            continue
        return buf.raw[: n.value].decode("utf-8")


def _conversation(messages: Iterable[Message], tools: Optional[Iterable[Mapping[str, Any]]] = None,
                  tool_choice: Union[None, str, Mapping[str, Any]] = None,
                  chat_template: Optional[str] = None,
                  variables: Optional[Mapping[str, Any]] = None,
                  parallel_tool_calls: Optional[bool] = None) -> bytes:
    """A conversation as the JSON ``ember_chat_apply_json`` and ``ember_chat_json`` take:
    messages (mappings with ``role``, ``content`` and whatever else the template reads, such
    as ``tool_calls``; or ``(role, content)`` pairs), the template's variables, ``tools``,
    ``tool_choice`` and ``chat_template``."""
    def text(value: Any) -> Any:  # roles and contents may be given as UTF-8 bytes
        return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else value

    request: Dict[str, Any] = dict(variables or {})
    try:
        request["messages"] = [{k: text(v) for k, v in m.items()} if isinstance(m, Mapping)
                               else {"role": text(m[0]), "content": text(m[1])}
                               for m in messages]
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(f"a message is not UTF-8: {e}") from None
    if tools is not None:
        request["tools"] = list(tools)
    if tool_choice is not None:
        request["tool_choice"] = tool_choice
    if chat_template is not None:
        request["chat_template"] = chat_template
    if parallel_tool_calls is not None:
        request["parallel_tool_calls"] = bool(parallel_tool_calls)
    try:
        return json.dumps(request, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"the conversation is not JSON: {e}") from None


def _generate_params(
    max_tokens: int,
    stop: Union[Text, Iterable[Text]],
    ignore_end_tokens: bool,
    add_special: bool = True,
    parse_special: bool = False,
) -> _ffi.ember_generate_params:
    """An ``ember_generate_params`` from the library's defaults and these options."""
    params = _ffi.ember_generate_params()
    _lib.ember_generate_params_default(ctypes.sizeof(params), byref(params))
    params.max_tokens = _uint(max_tokens, "max_tokens")
    stops = [stop] if isinstance(stop, (str, bytes)) else list(stop)
    encoded = [_cstr(s, "a stop string") for s in stops]
    # ctypes keeps the array (and the bytes in it) alive as long as params.
    params.stop_strings = (c_char_p * len(encoded))(*encoded)
    params.n_stop_strings = len(encoded)
    params.ignore_end_tokens = int(bool(ignore_end_tokens))
    params.add_special = int(bool(add_special))
    params.parse_special = int(bool(parse_special))
    # A stream computes at most one piece ahead of its consumer: one that stops reading
    # (a break) costs no more tokens.
    params.max_ahead = 1
    return params


# ---- handle ownership ----


class _Closing:
    """Closes itself when used as a context manager or collected."""

    def close(self) -> None:  # pragma: no cover - every subclass has its own
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - nothing can be done in a finaliser
            pass


class _Owned(_Closing):
    """Owns one C handle. Counts the calls in flight so that ``close()`` never frees a
    handle another thread is inside (it raises ``BusyError`` instead)."""

    _free: Callable[[Any], None]  # the C free function
    _kind = "object"

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._lock = threading.Lock()
        self._in_use = 0

    def _use(self) -> "_Use":
        """Context manager giving the live handle for one call."""
        return _Use(self)

    @property
    def closed(self) -> bool:
        """True once ``close()`` has released the C object."""
        return not getattr(self, "_handle", None)

    def close(self) -> None:
        """Releases the C object now (it is also released when this object is collected).
        Further use raises ``InvalidArgumentError``; closing twice is fine."""
        lock = getattr(self, "_lock", None)
        if lock is None:  # __init__ did not get as far as owning a handle
            return
        with lock:
            if self._in_use:
                raise BusyError(f"the {self._kind} is in use by another thread")
            handle, self._handle = self._handle, None
        if handle:
            type(self)._free(handle)


class _Use:
    """One call's use of an ``_Owned`` handle (see ``_Owned._use``)."""

    __slots__ = ("owner",)

    def __init__(self, owner: _Owned) -> None:
        self.owner = owner

    def __enter__(self) -> Any:
        owner = self.owner
        with owner._lock:
            if not owner._handle:
                raise InvalidArgumentError(f"the {owner._kind} is closed")
            owner._in_use += 1
            return owner._handle

    def __exit__(self, *exc: Any) -> None:
        with self.owner._lock:
            self.owner._in_use -= 1


# ---- library-wide functions ----

_log_callbacks: List[Any] = []  # every callback ever installed stays alive (see below)


def version() -> str:
    """The library's version, e.g. ``"0.1.0"``."""
    return _lib.ember_version().decode()


def abi_version() -> int:
    """The C ABI version the loaded library implements (``ember.ABI_VERSION`` expected)."""
    return int(_lib.ember_abi_version())


def status_name(status: int) -> str:
    """The C name of a status value, e.g. ``"EMBER_ERR_CONTEXT_FULL"``."""
    return _lib.ember_status_name(status).decode()


def set_log_callback(callback: Optional[Callable[[LogLevel, str], None]]) -> None:
    """Sends the library's log messages to ``callback(level, message)`` (``None`` removes
    it). The callback may run on any thread that calls into Ember and must be quick;
    exceptions it raises are ignored. Installed callbacks are kept alive for the life of
    the process, since another thread may still be inside one when it is replaced."""

    def trampoline(level: int, message: bytes, user: Any) -> None:
        try:
            callback(LogLevel(level), message.decode("utf-8", "replace"))  # type: ignore[misc]
        except BaseException:
            pass

    if callback is None:
        _lib.ember_set_log_callback(_ffi.ember_log_callback(), None)
        return
    function = _ffi.ember_log_callback(trampoline)
    _log_callbacks.append(function)
    _lib.ember_set_log_callback(function, None)


# ---- model ----


class ModelInfo:
    """What ``probe()`` says about a model file (see ``ember_model_info`` in ember.h)."""

    __slots__ = ("architecture", "supported", "reason", "has_tokenizer", "has_chat_template",
                 "n_ctx_train", "n_layers", "n_vocab", "n_params", "file_bytes",
                 "bytes_per_token", "tensor_types")

    def __init__(self, info: "_ffi.ember_model_info") -> None:
        #: The architecture as the file names it (even when Ember does not run it).
        self.architecture: str = info.architecture.decode(errors="replace")
        #: True when Ember can load and run the file.
        self.supported: bool = bool(info.supported)
        #: Why the file is not supported ("" when it is).
        self.reason: str = info.reason.decode(errors="replace")
        #: True when the file has a tokenizer Ember can build.
        self.has_tokenizer: bool = bool(info.has_tokenizer)
        #: True when the tokenizer has a chat template.
        self.has_chat_template: bool = bool(info.has_chat_template)
        #: The trained context length (0 when unknown).
        self.n_ctx_train: int = int(info.n_ctx_train)
        #: Transformer blocks (0 when unknown).
        self.n_layers: int = int(info.n_layers)
        #: Vocabulary size (0 when unknown).
        self.n_vocab: int = int(info.n_vocab)
        #: Number of weights.
        self.n_params: int = int(info.n_params)
        #: Bytes of the model's files.
        self.file_bytes: int = int(info.file_bytes)
        #: Bytes of weights one generated token reads (0 when unsupported).
        self.bytes_per_token: int = int(info.bytes_per_token)
        #: Tensor counts by type, e.g. ``{"F32": 61, "Q4_K": 16}``.
        self.tensor_types: dict = {}
        for item in info.tensor_types.decode().split(", "):
            if item:
                count, dtype = item.split(" ", 1)
                self.tensor_types[dtype] = int(count)

    def __repr__(self) -> str:
        state = "supported" if self.supported else f"unsupported: {self.reason}"
        return f"<ember.ModelInfo {self.architecture} ({state})>"


def probe(path: PathLike) -> ModelInfo:
    """Describes the model file at ``path`` (a GGUF file or a Hugging Face folder) and says
    whether Ember runs it, without loading it. Raises only when the path cannot be read."""
    info = _ffi.ember_model_info()
    _lib.ember_model_probe(_cstr(os.fsencode(path), "the path"), ctypes.sizeof(info), byref(info))
    return ModelInfo(info)


class Model(_Owned):
    """A loaded model: a GGUF file or a Hugging Face folder (``config.json``, safetensors
    weights, ``tokenizer.json``), memory-mapped. Immutable and shared: any number of sessions and
    threads may use it at once. Use it as a context manager or call ``close()``; sessions
    made from it keep the weights alive until they are closed too.

    ``threads`` is the default worker count of the sessions made by ``session()``,
    ``generate()`` and ``chat()`` (0 = half the machine's cores). ``quantize_q8_0`` quantizes
    F32/F16/BF16 weights to Q8_0 at load (faster, not bit-exact).
    """

    _free = _lib.ember_model_free
    _kind = "model"

    def __init__(
        self,
        path: PathLike,
        *,
        threads: int = 0,
        load_tokenizer: bool = True,
        quantize_q8_0: bool = False,
    ) -> None:
        encoded = _cstr(os.fsencode(path), "the path")
        self._load(lambda params, handle: _lib.ember_model_load(encoded, params, handle),
                   os.fspath(path), threads, load_tokenizer, quantize_q8_0)

    def _load(self, load: Callable[[Any, Any], None], path: str, threads: int,
              load_tokenizer: bool, quantize_q8_0: bool) -> None:
        #: Default thread count of the sessions this model makes.
        self.threads: int = _uint(threads, "threads")
        params = _ffi.ember_model_params()
        _lib.ember_model_params_default(ctypes.sizeof(params), byref(params))
        params.load_tokenizer = int(bool(load_tokenizer))
        params.quantize_q8_0 = int(bool(quantize_q8_0))
        handle = ctypes.POINTER(_ffi.ember_model)()
        load(byref(params), byref(handle))
        super().__init__(handle)
        #: Where the model was loaded from.
        self.path: str = path

    @classmethod
    def from_bytes(cls, data: Union[bytes, bytearray, memoryview], *, threads: int = 0,
                   load_tokenizer: bool = True, quantize_q8_0: bool = False) -> "Model":
        """Loads a GGUF model from bytes in memory, used in place (not copied): the model keeps
        a reference to ``data``, which must not be modified while the model lives."""
        view = memoryview(data).cast("B")
        if view.readonly:
            keep: Any = (ctypes.c_char * len(view)).from_buffer_copy(view)
        else:
            keep = (ctypes.c_char * len(view)).from_buffer(view)
        model = cls.__new__(cls)
        model._data = keep  # the bytes live as long as the model
        model._load(lambda params, handle: _lib.ember_model_load_from_memory(
            ctypes.cast(keep, ctypes.c_void_p), len(view), params, handle),
            "<memory>", threads, load_tokenizer, quantize_q8_0)
        return model

    @classmethod
    def from_fd(cls, fd: int, offset: int = 0, length: int = 0, *, threads: int = 0,
                load_tokenizer: bool = True, quantize_q8_0: bool = False) -> "Model":
        """Loads a GGUF model stored inside a larger file: ``length`` bytes (0: to the end)
        at ``offset`` of the open file descriptor ``fd`` (which may be closed afterwards)."""
        model = cls.__new__(cls)
        model._load(lambda params, handle: _lib.ember_model_load_fd(
            int(fd), _uint(offset, "offset", 64), _uint(length, "length", 64), params, handle),
            f"<fd {fd} at {offset}>", threads, load_tokenizer, quantize_q8_0)
        return model

    def session_memory(self, n_ctx: int = 0, threads: Optional[int] = None,
                       n_ubatch: Optional[int] = None, kv_type: KvTypeLike = "f32") -> int:
        """Bytes a ``session()`` with these options would allocate (KV cache, buffers, token
        history; the weights not included), computed without allocating."""
        params = _session_params(self, n_ctx, threads, n_ubatch, kv_type=kv_type)
        out = c_size_t()
        with self._use() as h:
            _lib.ember_session_memory_estimate(h, byref(params), byref(out))
        return out.value

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.architecture}, {self.n_vocab} tokens"
        return f"<ember.Model {self.path!r} ({state})>"

    @property
    def n_vocab(self) -> int:
        """Vocabulary size: the length of a logits vector."""
        with self._use() as h:
            return int(_lib.ember_model_n_vocab(h))

    @property
    def n_embd(self) -> int:
        """Width of the final hidden state: the length of an embedding (``Session.embed``)."""
        with self._use() as h:
            return int(_lib.ember_model_n_embd(h))

    @property
    def n_ctx_train(self) -> int:
        """The longest context the model was trained for."""
        with self._use() as h:
            return int(_lib.ember_model_n_ctx_train(h))

    def _special(self, function: Callable[[Any], int]) -> Optional[int]:
        with self._use() as h:
            token = int(function(h))
        return None if token < 0 else token

    @property
    def bos_token(self) -> Optional[int]:
        """Beginning-of-sequence token, or ``None``."""
        return self._special(_lib.ember_model_token_bos)

    @property
    def eos_token(self) -> Optional[int]:
        """End-of-sequence token, or ``None``."""
        return self._special(_lib.ember_model_token_eos)

    @property
    def eot_token(self) -> Optional[int]:
        """End-of-turn token of chat models (else the EOS token), or ``None``."""
        return self._special(_lib.ember_model_token_eot)

    def is_end_token(self, token: int) -> bool:
        """True if ``token`` ends generation (EOS, EOT, or a configured end token)."""
        with self._use() as h:
            return bool(_lib.ember_model_token_is_end(h, _token(token)))

    @property
    def architecture(self) -> str:
        """The architecture's name (GGUF's ``general.architecture``): ``"llama"``, ``"qwen2"``,
        ``"qwen3"``, ``"gemma2"``, ``"gemma3"``, ``"phi3"``, ``"smollm3"``, ``"granite"`` or
        ``"gpt2"``."""
        with self._use() as h:
            return _lib.ember_model_architecture(h).decode()

    @property
    def has_chat_template(self) -> bool:
        """True if the tokenizer has a chat template."""
        with self._use() as h:
            return bool(_lib.ember_model_has_chat_template(h))

    def tokenize(self, text: Text, add_special: bool = True,
                 parse_special: bool = False) -> List[int]:
        """Token ids of ``text``. ``add_special`` adds BOS/EOS as the tokenizer does;
        ``parse_special`` recognises special tokens written in the text (off by default, so
        user text cannot inject control tokens)."""
        data = _utf8(text)
        cap = len(data) + 8
        n = c_size_t()
        with self._use() as h:
            while True:
                out = (c_int32 * cap)()
                try:
                    _lib.ember_tokenize(h, data, len(data), add_special, parse_special, out, cap,
                                        byref(n))
                except BufferTooSmallError:
                    cap = n.value
                    continue
                return out[: n.value]

    def detokenize(self, ids: Iterable[int]) -> str:
        """The text of token ids."""
        tokens = _tokens(ids)
        with self._use() as h:
            return _read_text(lambda buf, cap, n: _lib.ember_detokenize(h, tokens, len(tokens), buf,
                                                                        cap, n),
                              cap=4 * len(tokens) + 16)

    def apply_chat_template(self, messages: Iterable[Message],
                            add_generation_prompt: bool = True, *,
                            tools: Optional[Iterable[Mapping[str, Any]]] = None,
                            chat_template: Optional[str] = None,
                            variables: Optional[Mapping[str, Any]] = None) -> str:
        """The prompt text the chat template makes of ``messages``, with the assistant's
        turn opened when ``add_generation_prompt``, as transformers'
        ``apply_chat_template(messages, tools=tools, chat_template=chat_template,
        **variables, tokenize=False)`` renders it. Messages may carry ``tool_calls``
        (``[{"type": "function", "function": {"name": ..., "arguments": {...}}}]``) and tool
        results are messages of role ``tool``."""
        data = _conversation(messages, tools, None, chat_template, variables)
        with self._use() as h:
            return _read_text(lambda buf, cap, n_out: _lib.ember_chat_apply_json(
                h, data, len(data), add_generation_prompt, buf, cap, n_out))

    def parse_reply(self, text: Text, *, chat_template: Optional[str] = None) -> Dict[str, Any]:
        """The assistant's reply ``text`` as the message to append to the conversation:
        ``{"role": "assistant", "content": ..., "reasoning_content": ... (after a <think>
        block), "tool_calls": [...] (when it called tools, in the template's format)}``.
        ``chat_template``: the template the conversation used, if not the model's."""
        return self._parse_reply(_conversation([], chat_template=chat_template), _utf8(text))

    def _parse_reply(self, conversation: bytes, reply: bytes) -> Dict[str, Any]:
        with self._use() as h:
            out = _read_text(lambda buf, cap, n_out: _lib.ember_chat_parse_reply(
                h, conversation, len(conversation), reply, len(reply), buf, cap, n_out),
                cap=2 * len(reply) + 64)
        result: Dict[str, Any] = json.loads(out)
        return result

    def session(self, n_ctx: int = 0, threads: Optional[int] = None,
                n_ubatch: Optional[int] = None, pool: Optional["Pool"] = None,
                kv_type: KvTypeLike = "f32") -> "Session":
        """A new ``Session`` over this model (see ``Session``); with ``pool``, on the
        threads of a ``Pool`` it shares with other sessions."""
        return Session(self, n_ctx=n_ctx, threads=threads, n_ubatch=n_ubatch, pool=pool,
                       kv_type=kv_type)

    def detokenizer(self) -> "Detokenizer":
        """A new streaming ``Detokenizer`` for this model's tokenizer."""
        return Detokenizer(self)

    def generate(self, prompt: Text, *, max_tokens: int = 256, sampler: Optional["Sampler"] = None,
                 stop: Union[Text, Iterable[Text]] = (), ignore_end_tokens: bool = False,
                 add_special: bool = True, parse_special: bool = False, n_ctx: int = 0,
                 threads: Optional[int] = None, logprobs: bool = False, top_logprobs: int = 0,
                 json_schema: Union[None, str, dict] = None, regex: Optional[str] = None,
                 grammar: Optional[str] = None) -> "TextStream":
        """Generates a continuation of ``prompt`` in a session of its own (made for this
        call, closed when the stream ends), yielding text as it comes. See
        ``Session.generate`` for the options; ``n_ctx`` and ``threads`` size the session."""
        session = self.session(n_ctx=n_ctx, threads=threads)
        return session._stream_generate(prompt, max_tokens, sampler, stop, ignore_end_tokens,
                                        add_special, parse_special, owned=[session],
                                        logprobs=logprobs, top_logprobs=top_logprobs,
                                 json_schema=json_schema, regex=regex, grammar=grammar)

    def chat(self, messages: Iterable[Message], *, max_tokens: int = 256,
             sampler: Optional["Sampler"] = None, stop: Union[Text, Iterable[Text]] = (),
             ignore_end_tokens: bool = False, parse_special: bool = False, n_ctx: int = 0,
             threads: Optional[int] = None, logprobs: bool = False, top_logprobs: int = 0,
             json_schema: Union[None, str, dict] = None, regex: Optional[str] = None,
             grammar: Optional[str] = None,
             tools: Optional[Iterable[Mapping[str, Any]]] = None,
             tool_choice: Union[None, str, Mapping[str, Any]] = None,
             chat_template: Optional[str] = None,
             variables: Optional[Mapping[str, Any]] = None,
             parallel_tool_calls: Optional[bool] = None) -> "TextStream":
        """The assistant's reply to ``messages`` (the chat template applied), in a session of
        its own, yielding text as it comes. To keep a conversation, use ``Session.chat`` on
        one session: earlier turns are then not computed again. See ``Session.chat`` for
        the options."""
        session = self.session(n_ctx=n_ctx, threads=threads)
        conversation = _conversation(messages, tools, tool_choice, chat_template, variables,
                                     parallel_tool_calls)
        return session._stream_chat(conversation, max_tokens, sampler, stop, ignore_end_tokens,
                                    parse_special, owned=[session], logprobs=logprobs,
                                    top_logprobs=top_logprobs, json_schema=json_schema,
                                    regex=regex, grammar=grammar)


# ---- session ----


class Pool(_Owned):
    """Worker threads that several sessions share (``Session(..., pool=pool)``): eight NPCs
    on one pool of ``threads`` threads instead of eight pools; their steps take turns, and
    generations running at once on it (``Session.start``, or ``generate`` from several
    threads) step together in shared forward passes. The threads sleep when idle and stop
    once the pool and every session using it are closed."""

    _free = _lib.ember_pool_free
    _kind = "pool"

    def __init__(self, threads: int = 0) -> None:
        params = _ffi.ember_pool_params()
        _lib.ember_pool_params_default(ctypes.sizeof(params), byref(params))
        params.n_threads = _uint(threads, "threads")
        handle = ctypes.POINTER(_ffi.ember_pool)()
        _lib.ember_pool_new(byref(params), byref(handle))
        super().__init__(handle)

    @property
    def threads(self) -> int:
        """The number of threads each step uses."""
        with self._use() as h:
            return int(_lib.ember_pool_n_threads(h))

    @property
    def combined_steps(self) -> Tuple[int, int]:
        """``(passes, steps)``: the forward passes the generations on this pool have run and
        the generation steps (one session's next token each) they carried."""
        passes, steps = ctypes.c_uint64(), ctypes.c_uint64()
        with self._use() as h:
            _lib.ember_pool_combined_steps(h, byref(passes), byref(steps))
        return int(passes.value), int(steps.value)


def _kv_type(kv_type: KvTypeLike) -> KvType:
    if isinstance(kv_type, str):
        try:
            return KvType[kv_type.upper()]
        except KeyError:
            raise ValueError(f"kv_type {kv_type!r} (must be 'f32' or 'f16')") from None
    return KvType(kv_type)


def _session_params(model: Model, n_ctx: int, threads: Optional[int],
                    n_ubatch: Optional[int], pool: Optional[Pool] = None,
                    kv_type: KvTypeLike = "f32") -> "_ffi.ember_session_params":
    params = _ffi.ember_session_params()
    _lib.ember_session_params_default(ctypes.sizeof(params), byref(params))
    params.kv_type = _kv_type(kv_type)
    params.n_ctx = _uint(n_ctx, "n_ctx")
    params.n_threads = _uint(model.threads if threads is None else threads, "threads")
    if n_ubatch is not None:
        params.n_ubatch = _uint(n_ubatch, "n_ubatch")
    if pool is not None:
        with pool._use() as p:  # read by the call only: the session keeps the pool alive
            params.pool = p
    return params


class Session(_Owned):
    """One sequence's state over a model: the KV cache (allocated here, ``n_ctx`` tokens;
    0 = the model's trained context, at most 2048) and the position. Computes on
    ``threads`` worker threads (the caller's included; ``None`` = the model's default).
    ``kv_type="f16"`` stores the cache in half the memory (rounded to nearest).

    A session is used by one thread at a time: a call made while another is running on it
    raises ``BusyError``. ``cancel()`` and ``position`` work from any thread.
    """

    _free = _lib.ember_session_free
    _kind = "session"

    def __init__(self, model: Model, *, n_ctx: int = 0, threads: Optional[int] = None,
                 n_ubatch: Optional[int] = None, pool: Optional[Pool] = None,
                 kv_type: KvTypeLike = "f32") -> None:
        params = _session_params(model, n_ctx, threads, n_ubatch, pool, kv_type)
        handle = ctypes.POINTER(_ffi.ember_session)()
        with model._use() as m:
            _lib.ember_session_new(m, byref(params), byref(handle))
        self._adopt(model, handle, KvType(params.kv_type))

    def _adopt(self, model: Model, handle: Any, kv_type: KvType) -> None:
        with model._use() as m:
            n_vocab = int(_lib.ember_model_n_vocab(m))
        super().__init__(handle)
        #: The model this session runs.
        self.model: Model = model
        #: The element type of the KV cache (saved states, forks and copies keep it).
        self.kv_type: KvType = kv_type
        self._n_vocab = n_vocab
        self._logits = (c_float * n_vocab)()
        self._logits_view = _float_view(self._logits, (n_vocab,))
        self._streams: "weakref.WeakSet[TextStream]" = weakref.WeakSet()

    def __repr__(self) -> str:
        if self.closed:
            return "<ember.Session (closed)>"
        return f"<ember.Session {self.position}/{self.n_ctx} tokens>"

    def close(self) -> None:
        """Ends this session's unfinished generations, then releases the session."""
        for stream in list(getattr(self, "_streams", ())):
            stream.close()
        super().close()

    @property
    def n_ctx(self) -> int:
        """The context length in tokens."""
        with self._use() as h:
            return int(_lib.ember_session_n_ctx(h))

    @property
    def position(self) -> int:
        """How many tokens the session holds. Safe from any thread at any time: during a long
        step it advances as micro-batches complete (progress of a prompt)."""
        with self._use() as h:
            return int(_lib.ember_session_position(h))

    @property
    def tokens(self) -> List[int]:
        """The tokens the session holds, oldest first: the prompts and every generated token
        whose text was delivered."""
        n = c_size_t()
        cap = 0
        with self._use() as h:
            while True:
                out = (c_int32 * max(cap, 1))()
                try:
                    _lib.ember_session_tokens(h, out, cap, byref(n))
                except BufferTooSmallError:
                    cap = n.value
                    continue
                return out[: n.value]

    def step(self, ids: Union[int, Iterable[int]]) -> Logits:
        """Appends tokens and returns the logits of the last one (``n_vocab`` float32).

        The result is a view of a buffer this session owns, with no copy: a numpy array
        when numpy is installed, else a ``memoryview``. The next ``step`` overwrites it;
        copy it (``numpy.copy``, ``list``) to keep it. On failure (bad token, full context,
        cancellation) the session is unchanged."""
        tokens = _tokens(ids)
        with self._use() as h:
            _lib.ember_step(h, tokens, len(tokens), self._logits)
        return self._logits_view

    def embed(self, ids: Iterable[int], *, pooling: str = "mean",
              normalize: bool = True) -> Any:
        """Appends tokens and returns their embedding, ``n_embd`` float32 in a new array
        (numpy, else a ``memoryview``): the final hidden state after the final norm of the
        last token (``pooling="last"``) or the mean over the tokens (``"mean"``), scaled to
        unit length unless ``normalize=False`` (so a dot product is the cosine similarity).
        Earlier tokens condition it: ``reset()`` first to embed a text on its own. No logits
        are computed (step before sampling)."""
        codes = {"last": 0, "mean": 1}
        if pooling not in codes:
            raise ValueError(f"pooling must be 'last' or 'mean', not {pooling!r}")
        tokens = _tokens(ids)
        n = c_size_t()
        size = self.model.n_embd
        buf = (c_float * size)()
        with self._use() as h:
            _lib.ember_session_embed(h, tokens, len(tokens), codes[pooling], bool(normalize),
                                     buf, size, byref(n))
        return _float_view(buf, (size,))

    def step_all(self, ids: Iterable[int]) -> Logits:
        """Appends tokens and returns the logits of every one of them, shape
        ``(len(ids), n_vocab)``, in a new array (numpy, else a 2-D ``memoryview``)."""
        tokens = _tokens(ids)
        n = len(tokens) * self._n_vocab
        if _np is not None:
            out = _np.empty((len(tokens), self._n_vocab), dtype=_np.float32)
            pointer = out.ctypes.data_as(ctypes.POINTER(c_float))
        else:
            buf = (c_float * n)()
            out, pointer = _float_view(buf, (len(tokens), self._n_vocab)), buf
        with self._use() as h:
            _lib.ember_step_all(h, tokens, len(tokens), pointer, n)
        return out

    def logits(self) -> Logits:
        """The logits of the last token the session holds (a view, as ``step`` returns): for
        sampling right after ``fork``, ``copy_prefix`` or ``load_state``. Raises
        ``InvalidArgumentError`` when the last token has not been computed (step it)."""
        with self._use() as h:
            _lib.ember_session_logits(h, self._logits, self._n_vocab)
        return self._logits_view

    def save_state(self) -> bytes:
        """What the session holds (tokens, KV cache rows, last logits) as bytes for a save
        file: only the tokens held are stored, and a fingerprint of the model. Load them with
        ``load_state`` into a session of the same model."""
        size = c_size_t()
        with self._use() as h:
            _lib.ember_session_state_size(h, byref(size))
            buf = (ctypes.c_uint8 * max(size.value, 1))()
            n = c_size_t()
            _lib.ember_session_state_save(h, buf, size.value, byref(n))
        return bytes(memoryview(buf)[: n.value])

    def load_state(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Replaces what the session holds by a ``save_state`` of the same model (any thread
        count; a context that holds its tokens). Bytes of another model, truncated or
        corrupted raise an error and leave the session as it was. Continuing gives the
        logits the saved session would have given, bit for bit."""
        view = memoryview(data).cast("B")
        buf = (ctypes.c_uint8 * max(len(view), 1)).from_buffer_copy(
            bytes(view) if len(view) else b"\0")
        with self._use() as h:
            _lib.ember_session_state_load(h, buf, len(view))

    def fork(self, *, n_ctx: Optional[int] = None, threads: Optional[int] = None,
             n_ubatch: Optional[int] = None) -> "Session":
        """A new session holding this one's tokens and KV cache, without computing them again:
        one shared prompt, many continuations. With no options it has this session's context
        length, threads and batch size."""
        handle = ctypes.POINTER(_ffi.ember_session)()
        with self._use() as h:
            if n_ctx is None and threads is None and n_ubatch is None:
                _lib.ember_session_fork(h, None, byref(handle))
            else:
                params = _session_params(self.model, n_ctx or 0, threads, n_ubatch,
                                         kv_type=self.kv_type)
                _lib.ember_session_fork(h, byref(params), byref(handle))
        forked = Session.__new__(Session)
        forked._adopt(self.model, handle, self.kv_type)
        return forked

    def copy_prefix(self, src: "Session", n_tokens: int) -> None:
        """Replaces what this session holds by the first ``n_tokens`` tokens of ``src`` (a
        session of the same model) and their KV rows, without computing them."""
        with self._use() as h, src._use() as s:
            _lib.ember_session_copy_prefix(h, s, _uint(n_tokens, "n_tokens", 64))

    @property
    def perf(self) -> Dict[str, float]:
        """Prompt and generated tokens and their milliseconds, for the last call
        (``last_*``) and since the session was made (``total_*``)."""
        out = _ffi.ember_perf()
        with self._use() as h:
            _lib.ember_session_perf(h, ctypes.sizeof(out), byref(out))
        return {name: getattr(out, name) for name, _ in _ffi.ember_perf._fields_[1:]}

    def rewind(self, n_past: int) -> None:
        """Truncates the session to its first ``n_past`` tokens (undo, regenerate)."""
        with self._use() as h:
            _lib.ember_session_rewind(h, _uint(n_past, "n_past", 64))

    def reset(self) -> None:
        """Forgets every token."""
        with self._use() as h:
            _lib.ember_session_reset(h)

    def cancel(self) -> None:
        """Asks the step or generation running on this session (in another thread) to stop
        with ``CancelledError``. A step leaves the session as it was; a generation keeps the
        text it delivered (its stream's ``stop_reason`` is then ``StopReason.CANCELLED``).
        With nothing running it does nothing: a cancellation never reaches a later call."""
        with self._use() as h:
            _lib.ember_session_cancel(h)

    def capture_attention(self, layers: Optional[Iterable[int]] = None,
                          heads: Optional[Iterable[int]] = None, *,
                          max_queries: int = 1) -> int:
        """Keeps, from the following steps, the attention weights of ``layers`` and query
        ``heads`` (None: every one) for each step's last ``max_queries`` tokens, to read with
        ``attention``; ``max_queries=0`` turns capture off. The buffer is allocated now (steps
        allocate nothing); returns its size in bytes."""
        def indices(values: Optional[Iterable[int]], what: str) -> Tuple[Any, int]:
            picked = [] if values is None else [_uint(v, what, 31) for v in values]
            return (c_int32 * max(len(picked), 1))(*picked), len(picked)
        (layer_ids, n_layers) = indices(layers, "layer")
        (head_ids, n_heads) = indices(heads, "head")
        size = c_size_t()
        with self._use() as h:
            _lib.ember_session_capture_attention(
                h, layer_ids, n_layers, head_ids, n_heads,
                _uint(max_queries, "max_queries", 64), byref(size))
        return size.value

    def attention(self, layer: int, head: int) -> Any:
        """The attention weights of ``layer``'s query ``head`` from the last step, shape
        ``(n_queries, n_positions)``, in a new array (numpy, else a 2-D ``memoryview``): row
        ``i`` is the query at position ``n_positions - n_queries + i`` over every position
        held; rows sum to 1 and keys a query does not see are 0. Raises
        ``InvalidArgumentError`` when the pair is not captured (``capture_attention``) or no
        step was since."""
        n_queries, n_positions = c_size_t(), c_size_t()
        layer, head = _uint(layer, "layer", 31), _uint(head, "head", 31)
        with self._use() as h:
            try:
                _lib.ember_session_attention(h, layer, head, None, 0,
                                             byref(n_queries), byref(n_positions))
            except BufferTooSmallError:
                pass
            shape = (n_queries.value, n_positions.value)
            buf = (c_float * (shape[0] * shape[1]))()
            _lib.ember_session_attention(h, layer, head, buf, shape[0] * shape[1],
                                         byref(n_queries), byref(n_positions))
        return _float_view(buf, shape)

    def generate(self, prompt: Text, *, max_tokens: int = 256, sampler: Optional["Sampler"] = None,
                 stop: Union[Text, Iterable[Text]] = (), ignore_end_tokens: bool = False,
                 add_special: bool = True, parse_special: bool = False,
                 logprobs: bool = False, top_logprobs: int = 0,
                 json_schema: Union[None, str, dict] = None, regex: Optional[str] = None,
                 grammar: Optional[str] = None) -> "TextStream":
        """Tokenizes ``prompt`` (appended to what the session holds) and generates until an
        end token, ``max_tokens`` tokens (0 = no limit), a ``stop`` string (not yielded) or a
        full context. Returns a ``TextStream`` yielding complete UTF-8 text as it comes.

        ``sampler`` defaults to a new greedy ``Sampler``. ``add_special`` adds BOS as the
        tokenizer does (pass ``False`` to continue a session that holds text already);
        ``parse_special`` lets the prompt name special tokens. Afterwards the session holds
        the prompt and every generated token whose text was delivered (``tokens``), so a
        later call continues exactly after the text; an empty ``prompt`` continues it.
        ``logprobs=True`` fills the stream's ``tokens`` with each token's log-probability;
        ``top_logprobs=k`` (at most 20) also gives each token's k most likely alternatives
        (the stream's ``top_logprobs``). ``json_schema`` (a dict or JSON text), ``regex`` or
        ``grammar`` (Lark, llguidance's syntax, or ``ember.Gbnf(text)`` for llama.cpp's GBNF)
        constrain the output to be valid: the stream
        then ends with ``StopReason.CONSTRAINT_COMPLETE`` (``CONSTRAINT_INCOMPLETE`` when
        ``max_tokens`` ran out first); a ``sampler`` given gets the constraint for this
        call only."""
        return self._stream_generate(prompt, max_tokens, sampler, stop, ignore_end_tokens,
                                     add_special, parse_special, owned=[], logprobs=logprobs, top_logprobs=top_logprobs,
                                 json_schema=json_schema, regex=regex, grammar=grammar)

    def chat(self, messages: Iterable[Message], *, max_tokens: int = 256,
             sampler: Optional["Sampler"] = None, stop: Union[Text, Iterable[Text]] = (),
             ignore_end_tokens: bool = False, parse_special: bool = False,
             logprobs: bool = False, top_logprobs: int = 0,
             json_schema: Union[None, str, dict] = None, regex: Optional[str] = None,
             grammar: Optional[str] = None,
             tools: Optional[Iterable[Mapping[str, Any]]] = None,
             tool_choice: Union[None, str, Mapping[str, Any]] = None,
             chat_template: Optional[str] = None,
             variables: Optional[Mapping[str, Any]] = None,
             parallel_tool_calls: Optional[bool] = None) -> "TextStream":
        """The assistant's reply to the whole conversation ``messages`` (the model's chat
        template applied), as a ``TextStream``. Keep a conversation in one session and pass
        all its messages each turn: the tokens of earlier turns the session still holds are
        reused, so each turn costs only its new tokens.

        Message contents are plain text: a special token written in a message (player text
        such as ``<|im_start|>system``) stays text and cannot open or close a turn; only the
        template's own control tokens are control tokens. ``parse_special=True`` turns this
        off, for messages the program wrote itself.

        Tools: ``tools`` (as transformers' ``apply_chat_template(tools=...)`` takes them)
        reach the template, and the reply follows the template's tool-call format as
        ``tool_choice`` says: ``"auto"`` (the default: text, or calls valid for the tools'
        schemas), ``"required"``, ``{"type": "function", "function": {"name": NAME}}`` or
        ``"none"``; ``parallel_tool_calls=False`` allows one call per reply (small models
        may not know when to stop calling). ``stream.message()`` gives the reply parsed,
        with its ``tool_calls``.
        ``chat_template`` replaces the model's template; ``variables`` are the template's
        other inputs (``enable_thinking``, ...)."""
        conversation = _conversation(messages, tools, tool_choice, chat_template, variables,
                                     parallel_tool_calls)
        return self._stream_chat(conversation, max_tokens, sampler, stop, ignore_end_tokens,
                                 parse_special, owned=[], logprobs=logprobs,
                                 top_logprobs=top_logprobs, json_schema=json_schema,
                                 regex=regex, grammar=grammar)

    def _stream_generate(self, prompt: Text, max_tokens: int, sampler: Optional["Sampler"],
                         stop: Union[Text, Iterable[Text]], ignore_end_tokens: bool,
                         add_special: bool, parse_special: bool,
                         owned: List[_Owned], logprobs: bool = False, top_logprobs: int = 0,
                 json_schema: Union[None, str, dict] = None, regex: Optional[str] = None,
                 grammar: Optional[str] = None) -> "TextStream":
        data = _utf8(prompt)
        params = _generate_params(max_tokens, stop, ignore_end_tokens, add_special, parse_special)
        params.logprobs = int(bool(logprobs) or top_logprobs > 0)
        params.top_logprobs = _uint(top_logprobs, "top_logprobs")
        request = _ffi.ember_generation_prompt()
        request.struct_size = ctypes.sizeof(request)
        request.text, request.text_len = data, len(data)
        sampler, owned, clear = self._constrained(sampler, owned, json_schema, regex, grammar)
        if not data:  # an empty prompt is an error here, as ember_generate makes it
            request.text, request.text_len = None, 0
            return TextStream(self, sampler, request, params, owned, keep=[data], empty=True,
                              clear_constraint=clear)
        return TextStream(self, sampler, request, params, owned, keep=[data],
                          clear_constraint=clear)

    def _stream_chat(self, conversation: bytes, max_tokens: int,
                     sampler: Optional["Sampler"], stop: Union[Text, Iterable[Text]],
                     ignore_end_tokens: bool, parse_special: bool,
                     owned: List[_Owned], logprobs: bool = False, top_logprobs: int = 0,
                     json_schema: Union[None, str, dict] = None, regex: Optional[str] = None,
                     grammar: Optional[str] = None) -> "TextStream":
        params = _generate_params(max_tokens, stop, ignore_end_tokens,
                                  parse_special=parse_special)
        params.logprobs = int(bool(logprobs) or top_logprobs > 0)
        params.top_logprobs = _uint(top_logprobs, "top_logprobs")
        request = _ffi.ember_generation_prompt()
        request.struct_size = ctypes.sizeof(request)
        request.conversation, request.conversation_len = conversation, len(conversation)
        sampler, owned, clear = self._constrained(sampler, owned, json_schema, regex, grammar)
        return TextStream(self, sampler, request, params, owned, keep=[conversation],
                          clear_constraint=clear, conversation=conversation)

    def _constrained(self, sampler: Optional["Sampler"], owned: List[_Owned],
                     json_schema: Union[None, str, dict], regex: Optional[str],
                     grammar: Optional[str]) -> Tuple[Optional["Sampler"], List[_Owned], bool]:
        """The sampler of a stream with the constraint asked for (a new greedy one if none
        was given), what the stream owns, and whether to remove the constraint at its end."""
        if json_schema is None and regex is None and grammar is None:
            return sampler, owned, False
        clear = sampler is not None
        if sampler is None:
            sampler = Sampler()
            owned = owned + [sampler]
        sampler.set_constraint(self.model, json_schema=json_schema, regex=regex,
                               grammar=grammar)
        return sampler, owned, clear


# ---- sampler ----


def step_batch(sessions: Sequence[Session],
               tokens: Sequence[Union[int, Iterable[int]]]) -> List[Logits]:
    """Steps several sessions of one model in one forward pass (each weight is read once for
    all of them): ``sessions[i]`` appends ``tokens[i]`` (a token, a list, or an empty list
    when it has pending tokens). Returns each session's last-token logits, the same views
    ``Session.step`` returns, bitwise what stepping each alone gives. Every input is checked
    first: an error names the session's index and no session changes."""
    sessions = list(sessions)
    lists = [_tokens(t) for t in tokens]
    if len(lists) != len(sessions):
        raise InvalidArgumentError(f"{len(sessions)} sessions but {len(lists)} token lists")
    n = len(sessions)
    with contextlib.ExitStack() as stack:
        handles = (_ffi._session_p * max(n, 1))(*[stack.enter_context(s._use()) for s in sessions])
        pointers = (_ffi._tokens * max(n, 1))(*[ctypes.cast(t, _ffi._tokens) for t in lists])
        counts = (c_size_t * max(n, 1))(*[len(t) for t in lists])
        outs = (_ffi._floats * max(n, 1))(*[ctypes.cast(s._logits, _ffi._floats) for s in sessions])
        _lib.ember_step_batch(handles, pointers, counts, n, outs)
    return [s._logits_view for s in sessions]


class Sampler(_Owned):
    """Picks the next token from logits. Every option left at ``None`` takes the library's
    default, so ``Sampler()`` is greedy decoding without penalties.

    - ``temperature``: softmax temperature; 0 = greedy (default 0).
    - ``top_k``: keep the k most likely tokens; 0 = off.
    - ``top_p``: keep the most likely tokens up to this probability mass; 1 = off.
    - ``min_p``: drop tokens below this fraction of the best token's probability; 0 = off.
    - ``repetition_penalty`` (1 = off), ``presence_penalty``, ``frequency_penalty`` (0 = off)
      over the last ``penalty_window`` tokens (default 64).
    - ``seed``: the same seed gives the same tokens.
    - ``logit_bias``: ``{token: bias}`` added to those logits first; ``-math.inf`` bans a token.

    A sampler is used by one thread at a time (else ``BusyError``).
    """

    _free = _lib.ember_sampler_free
    _kind = "sampler"

    def __init__(self, *, temperature: Optional[float] = None, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, min_p: Optional[float] = None,
                 repetition_penalty: Optional[float] = None,
                 presence_penalty: Optional[float] = None,
                 frequency_penalty: Optional[float] = None,
                 penalty_window: Optional[int] = None, seed: Optional[int] = None,
                 logit_bias: Optional[Dict[int, float]] = None) -> None:
        params = _ffi.ember_sampler_params()
        _lib.ember_sampler_params_default(ctypes.sizeof(params), byref(params))
        for name, value in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p),
                            ("repetition_penalty", repetition_penalty),
                            ("presence_penalty", presence_penalty),
                            ("frequency_penalty", frequency_penalty)):
            if value is not None:
                setattr(params, name, float(value))
        if top_k is not None:
            params.top_k = _uint(top_k, "top_k")
        if penalty_window is not None:
            params.penalty_window = _uint(penalty_window, "penalty_window")
        if seed is not None:
            params.seed = _uint(seed, "seed", 64)
        biases = list((logit_bias or {}).items())
        array_type = _ffi.ember_logit_bias * max(len(biases), 1)
        bias_array = array_type(*[_ffi.ember_logit_bias(_token(t), float(b)) for t, b in biases])
        params.logit_bias = ctypes.cast(bias_array, ctypes.POINTER(_ffi.ember_logit_bias))
        params.n_logit_bias = len(biases)
        handle = ctypes.POINTER(_ffi.ember_sampler)()
        _lib.ember_sampler_new(byref(params), byref(handle))
        params.logit_bias, params.n_logit_bias = None, 0  # copied by the library
        super().__init__(handle)
        #: The options the sampler was made with (the library's struct).
        self.params: _ffi.ember_sampler_params = params

    def __repr__(self) -> str:
        p = self.params
        return (f"<ember.Sampler temperature={p.temperature:g} top_k={p.top_k} top_p={p.top_p:g} "
                f"min_p={p.min_p:g} seed={p.seed}>")

    def sample(self, logits: Logits) -> int:
        """A token id picked from ``logits`` (any float vector: what ``Session.step``
        returns is passed without a copy). The token is remembered for the penalties."""
        pointer, n, _keep = _floats(logits)
        out = c_int32()
        with self._use() as h:
            _lib.ember_sample(h, pointer, n, byref(out))
        return out.value

    def accept(self, token: int) -> None:
        """Remembers ``token`` for the penalties (e.g. the prompt's tokens)."""
        with self._use() as h:
            _lib.ember_sampler_accept(h, _token(token))

    def reset(self) -> None:
        """Restarts the random sequence from the seed, forgets recent tokens and starts the
        constraint's output over."""
        with self._use() as h:
            _lib.ember_sampler_reset(h)

    def set_constraint(self, model: Model, *, json_schema: Union[None, str, dict] = None,
                       regex: Optional[str] = None, grammar: Optional[str] = None) -> None:
        """Constrains the tokens drawn to those that keep the output valid: one JSON value
        valid against ``json_schema`` (a dict or JSON text), text matching ``regex``, or a
        Lark ``grammar`` (llguidance's syntax; ``ember.Gbnf(text)`` for GBNF), over
        ``model``'s vocabulary. With none of
        them, removes the constraint. Invalid ones raise ``InvalidArgumentError``."""
        kind, text = _constraint_of(json_schema, regex, grammar)
        data = _utf8(text)
        with self._use() as h, model._use() as m:
            _lib.ember_sampler_set_constraint(h, m, kind, data, len(data))

    def clear_constraint(self) -> None:
        """Removes the constraint."""
        with self._use() as h:
            _lib.ember_sampler_set_constraint(h, None, ConstraintKind.NONE, None, 0)

    @property
    def constraint_state(self) -> ConstraintState:
        """Where the constraint's output stands (``NONE`` without a constraint)."""
        out = c_int()
        with self._use() as h:
            _lib.ember_sampler_constraint_state(h, byref(out))
        return ConstraintState(out.value)


class Gbnf(str):
    """A grammar in llama.cpp's GBNF (start rule ``root``), for ``grammar=``:
    ``grammar=ember.Gbnf('root ::= "yes" | "no"')``. A plain string there is Lark."""


def _constraint_of(json_schema: Union[None, str, dict], regex: Optional[str],
                   grammar: Optional[str]) -> Tuple[ConstraintKind, str]:
    given = [(k, v) for k, v in ((ConstraintKind.JSON_SCHEMA, json_schema),
                                 (ConstraintKind.REGEX, regex),
                                 (ConstraintKind.GBNF if isinstance(grammar, Gbnf)
                                  else ConstraintKind.LARK, grammar)) if v is not None]
    if len(given) > 1:
        raise ValueError("give one of json_schema, regex and grammar")
    if not given:
        return ConstraintKind.NONE, ""
    kind, value = given[0]
    if kind == ConstraintKind.JSON_SCHEMA and not isinstance(value, str):
        value = json.dumps(value)
    return kind, value


# ---- detokenizer ----


class Detokenizer(_Owned):
    """Turns tokens fed one by one into text, giving only complete UTF-8 characters: a
    character split across tokens comes out whole with its last token."""

    _free = _lib.ember_detokenizer_free
    _kind = "detokenizer"

    def __init__(self, model: Model) -> None:
        handle = ctypes.POINTER(_ffi.ember_detokenizer)()
        with model._use() as m:
            _lib.ember_detokenizer_new(m, byref(handle))
        super().__init__(handle)

    def push(self, token: int) -> str:
        """Adds ``token``; returns the text it completes (often ``""`` mid-character)."""
        token = _token(token)
        with self._use() as h:
            return _read_text(
                lambda buf, cap, n: _lib.ember_detokenizer_push(h, token, buf, cap, n), cap=64)

    def flush(self) -> str:
        """Returns what is still held back (an incomplete character as U+FFFD) and resets."""
        with self._use() as h:
            return _read_text(lambda buf, cap, n: _lib.ember_detokenizer_flush(h, buf, cap, n),
                              cap=64)

    def reset(self) -> None:
        """Forgets every token fed so far."""
        with self._use() as h:
            _lib.ember_detokenizer_reset(h)


# ---- streaming generation ----
#
# A stream is a generation handle of the library (ember_generation_start): the library
# generates on a thread of its own, and next() polls the text ready (ember_generation_poll),
# waiting with ember_generation_wait (the GIL released) only when there is none. All the
# logic (stop strings, end tokens, UTF-8 boundaries, chat prefix reuse) stays in the
# library, no Python thread or queue is involved, and closing the stream cancels the
# generation and joins it (ember_generation_finish), leaving the session usable and holding
# the prompt and every token generated.


#: Every stream not yet collected, for _close_at_exit.
_live_streams: "weakref.WeakSet[TextStream]" = weakref.WeakSet()

#: ``ember_generation_state`` values.
_RUNNING, _FINISHED = 0, 1


@atexit.register
def _close_at_exit() -> None:
    """Ends the generations still running when the interpreter exits (each runs on a thread of
    the library, which ``ember_generation_finish`` joins), so that none outlives the
    interpreter."""
    for stream in list(_live_streams):
        stream.close()


class TextStream(_Closing, Iterator[str]):
    """The text of one generation, as it comes: iterate it (``for piece in stream``). The
    generation starts at the first ``next()`` and runs in the background, on the library's
    own thread (``ember_generation_start``), while ``next()`` returns the text generated
    since the last one, waiting only when there is none yet (without holding the GIL).

    Breaking out early, ``close()``, leaving a ``with`` block or dropping the stream stops
    the generation and leaves the session usable. After the end, ``stop_reason`` and
    ``n_tokens`` tell why it stopped and how many tokens the session gained; ``progress``
    tells how much of the prompt is computed, and ``tokens`` the ids and log-probabilities
    generated so far. Errors (e.g. ``ContextFullError`` for a prompt that does not fit,
    ``CancelledError``) are raised by ``next()``.
    """

    def __init__(self, session: Session, sampler: Optional[Sampler], request: Any,
                 params: Any, owned: List[_Owned], keep: List[Any],
                 empty: bool = False, clear_constraint: bool = False,
                 conversation: Optional[bytes] = None) -> None:
        if sampler is None:
            sampler = Sampler()
            owned = owned + [sampler]
        self._session, self._sampler = session, sampler
        self._request, self._params, self._keep, self._empty = request, params, keep, empty
        self._owned = owned
        self._clear_constraint = clear_constraint
        self._conversation = conversation
        self._text: List[str] = []
        self._handle: Any = None
        self._uses: List[_Use] = []
        self._lock = threading.Lock()  # one C call on the handle at a time
        self._buffer = ctypes.create_string_buffer(4096)
        self._started = False
        self._finished = False
        self._closing = False
        self._token_infos: List[Tuple[int, float]] = []
        self._top = int(params.top_logprobs)
        self._alternatives: List[List[Tuple[int, float]]] = []
        #: Why the generation stopped (``None`` until it has).
        self.stop_reason: Optional[StopReason] = None
        #: Tokens generated (``None`` until the generation has stopped).
        self.n_tokens: Optional[int] = None
        session._streams.add(self)
        _live_streams.add(self)

    def __iter__(self) -> "TextStream":
        return self

    def _start(self) -> None:
        self._started = True
        if self._empty:
            self._end_with(InvalidArgumentError("the prompt has no tokens"))
        session_use, sampler_use = self._session._use(), self._sampler._use()
        s = session_use.__enter__()
        try:
            smp = sampler_use.__enter__()
        except BaseException:
            session_use.__exit__(None, None, None)
            raise
        self._uses = [sampler_use, session_use]
        handle = ctypes.POINTER(_ffi.ember_generation)()
        try:
            _lib.ember_generation_start(s, smp, byref(self._request), byref(self._params),
                                        byref(handle))
        except BaseException as e:
            self._end_with(e)
        self._handle = handle

    def __next__(self) -> str:
        with self._lock:
            if self._finished:
                raise StopIteration
            if not self._started:
                self._start()
            n, state = c_size_t(), c_int()
            while True:
                _lib.ember_generation_poll(self._handle, self._buffer, len(self._buffer),
                                           byref(n), byref(state))
                self._collect_tokens()
                if n.value:
                    piece = self._buffer.raw[: n.value].decode("utf-8")
                    if self._conversation is not None:
                        self._text.append(piece)
                    return piece
                if state.value == _FINISHED:
                    self._finish(stopped=False)
                    raise StopIteration
                _lib.ember_generation_wait(self._handle, 100, None)

    def _collect_tokens(self) -> None:
        k = self._top
        infos = (_ffi.ember_token_info * 64)()
        top = (_ffi.ember_token_info * (64 * k))()
        n = c_size_t()
        while True:
            _lib.ember_generation_poll_tokens_top(self._handle, infos, 64, top, 64 * k, byref(n))
            self._token_infos += [(infos[i].token, infos[i].logprob) for i in range(n.value)]
            if k:
                self._alternatives += [
                    [(top[j].token, top[j].logprob) for j in range(i * k, (i + 1) * k)
                     if top[j].token >= 0]
                    for i in range(n.value)]
            if n.value < 64:
                return

    @property
    def tokens(self) -> List[Tuple[int, float]]:
        """``(token, logprob)`` of every token generated so far (logprob is NaN unless
        ``logprobs=True`` was asked for)."""
        with self._lock:
            if self._handle:
                self._collect_tokens()
            return list(self._token_infos)

    @property
    def top_logprobs(self) -> List[List[Tuple[int, float]]]:
        """For every token generated so far, its ``top_logprobs`` most likely alternatives
        as ``(token, logprob)``, best first (empty lists unless ``top_logprobs`` was asked
        for)."""
        with self._lock:
            if self._handle:
                self._collect_tokens()
            if not self._top:
                return [[] for _ in self._token_infos]
            return [list(a) for a in self._alternatives]

    @property
    def progress(self) -> Tuple[int, int]:
        """``(done, total)`` tokens of the prompt computed (``done == total`` once tokens are
        being generated; ``(0, 0)`` before the first ``next()``)."""
        with self._lock:
            if not self._handle:
                return (0, 0)
            done, total = c_size_t(), c_size_t()
            _lib.ember_generation_progress(self._handle, byref(done), byref(total))
            return (done.value, total.value)

    def read(self) -> str:
        """All the (remaining) text at once."""
        return "".join(self)

    def message(self) -> Dict[str, Any]:
        """For a chat: the whole reply (what is left of it is generated first) parsed into
        the message to append to the conversation: ``{"role": "assistant", "content": ...,
        "tool_calls": [{"type": "function", "function": {"name": ..., "arguments": {...}}},
        ...]}`` (``tool_calls`` when it called tools; ``reasoning_content`` after a
        ``<think>`` block)."""
        if self._conversation is None:
            raise InvalidArgumentError("message() is for the stream of a chat")
        self.read()
        return self._session.model._parse_reply(self._conversation,
                                                "".join(self._text).encode("utf-8"))

    def close(self) -> None:
        """Stops the generation (if it runs, within about one layer's time) and releases what
        the stream owns; the session stays usable and keeps the tokens generated."""
        if self._finished:
            return
        self._closing = True  # the cancel below is the consumer's stop, not an error
        if self._handle:
            try:
                self._session.cancel()  # stops the session's running call: this generation
            except EmberError:
                pass
        with self._lock:
            if not self._finished:
                self._finish(stopped=True)

    def _finish(self, stopped: bool) -> None:
        """Ends the generation (under the lock): joins it, records why it stopped."""
        error: Optional[BaseException] = None
        stopped = stopped or self._closing
        if self._handle:
            reason, n = c_int(), c_size_t()
            handle, self._handle = self._handle, None
            try:
                _lib.ember_generation_finish(handle, byref(reason), byref(n))
            except CancelledError as e:
                error = None if stopped else e
            except BaseException as e:
                error = e
            if error is None or isinstance(error, CancelledError):
                self.stop_reason, self.n_tokens = StopReason(reason.value), n.value
                if stopped and self.stop_reason == StopReason.CANCELLED:
                    self.stop_reason = StopReason.CALLBACK  # the consumer stopped it
        self._release()
        if error is not None:
            raise error

    def _end_with(self, error: BaseException) -> None:
        self._release()
        raise error

    def _release(self) -> None:
        self._finished = True
        for use in self._uses:
            use.__exit__(None, None, None)
        self._uses = []
        self._session._streams.discard(self)
        if self._clear_constraint:  # the caller's sampler: back as it was given
            self._clear_constraint = False
            self._sampler.clear_constraint()
        for owned in self._owned:
            owned.close()

    def __enter__(self) -> "TextStream":
        return self
