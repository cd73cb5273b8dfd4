// ember.hpp: a header-only C++17 wrapper of Ember's C API (include/ember.h).
//
// Move-only RAII owners of the C handles (ember::Model, ember::Session, ember::Sampler,
// ember::Detokenizer); std::string_view in, std::string / std::vector<int32_t> out. All the
// work is done by the library: this header only owns handles and converts types.
//
// Errors, two ways:
// - try_* functions never throw: they return ember::Result<T>, which holds a value or a
//   Status with the library's message. This is the API for builds without exceptions.
// - The functions without the prefix return the value itself and throw ember::Error
//   (status + message) on failure. They exist only when exceptions are enabled
//   (__cpp_exceptions); with -fno-exceptions they are compiled out. Define
//   EMBER_HPP_EXCEPTIONS to 0 or 1 to choose by hand.
//
//   ember::Model model("models/SmolLM2-135M-Instruct.Q4_1.gguf");
//   ember::SessionParams sp;  sp.n_threads = 2;
//   ember::Session session(model, sp);
//   ember::Sampler sampler;                              // greedy
//   ember::GenerateOptions options;  options.max_tokens = 64;  options.stop = {"\n\n"};
//   session.generate("Once upon a time", sampler, options,
//                    [](std::string_view piece) { std::cout << piece << std::flush; });
//
// Threading is the C API's: a Model is shared by any number of threads; a Session,
// Sampler or Detokenizer is used by one thread at a time (Status::busy otherwise), except
// Session::cancel() and Session::position(), which any thread may call.
#ifndef EMBER_HPP
#define EMBER_HPP

#include "ember.h"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#ifndef EMBER_HPP_EXCEPTIONS
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS) || defined(_CPPUNWIND)
#define EMBER_HPP_EXCEPTIONS 1
#else
#define EMBER_HPP_EXCEPTIONS 0
#endif
#endif

#if EMBER_HPP_EXCEPTIONS
#include <exception>
#include <stdexcept>
#endif

namespace ember {

/// The status of a call (ember_status).
enum class Status : int32_t {
  ok = EMBER_OK,
  invalid_argument = EMBER_ERR_INVALID_ARGUMENT,
  io = EMBER_ERR_IO,
  bad_format = EMBER_ERR_BAD_FORMAT,
  unsupported = EMBER_ERR_UNSUPPORTED,
  context_full = EMBER_ERR_CONTEXT_FULL,
  buffer_too_small = EMBER_ERR_BUFFER_TOO_SMALL,
  cancelled = EMBER_ERR_CANCELLED,
  out_of_memory = EMBER_ERR_OUT_OF_MEMORY,
  busy = EMBER_ERR_BUSY,
  internal = EMBER_ERR_INTERNAL,
};

/// Why a generation stopped (ember_stop_reason).
enum class StopReason : int32_t {
  end_token = EMBER_STOP_REASON_END_TOKEN,
  max_tokens = EMBER_STOP_REASON_MAX_TOKENS,
  stop_string = EMBER_STOP_REASON_STOP_STRING,
  callback = EMBER_STOP_REASON_CALLBACK,
  context_full = EMBER_STOP_REASON_CONTEXT_FULL,
  cancelled = EMBER_STOP_REASON_CANCELLED,
  constraint_complete = EMBER_STOP_REASON_CONSTRAINT_COMPLETE,
  constraint_incomplete = EMBER_STOP_REASON_CONSTRAINT_INCOMPLETE,
};

/// What a sampler's constraint text is (`Sampler::try_set_constraint`).
enum class ConstraintKind : uint32_t {
  none = EMBER_CONSTRAINT_NONE,
  json_schema = EMBER_CONSTRAINT_JSON_SCHEMA,
  regex = EMBER_CONSTRAINT_REGEX,
  lark = EMBER_CONSTRAINT_LARK,
};

/// Where a sampler's constraint stands.
enum class ConstraintState : int32_t {
  none = EMBER_CONSTRAINT_STATE_NONE,
  incomplete = EMBER_CONSTRAINT_STATE_INCOMPLETE,
  complete = EMBER_CONSTRAINT_STATE_COMPLETE,
  finished = EMBER_CONSTRAINT_STATE_FINISHED,
};

/// The C name of a status, e.g. "EMBER_ERR_CONTEXT_FULL".
inline const char *status_name(Status status) noexcept {
  return ember_status_name(static_cast<int32_t>(status));
}

/// The library's version, e.g. "0.1.0".
inline const char *version() noexcept { return ember_version(); }

/// True if the loaded library implements the ABI of the header this was compiled with.
inline bool abi_compatible() noexcept { return ember_abi_version() == EMBER_ABI_VERSION; }

/// A failure: its status and the library's message (ember_last_error() of the call).
struct ErrorInfo {
  Status status = Status::ok;  ///< what failed
  std::string message;         ///< the library's description
};

#if EMBER_HPP_EXCEPTIONS
/// The exception the throwing API raises: a status and the library's message.
class Error : public std::runtime_error {
 public:
  /// An error from a failure's status and message.
  explicit Error(ErrorInfo info)
      : std::runtime_error(info.message + " [" + status_name(info.status) + "]"),
        info_(std::move(info)) {}
  /// The failing status.
  Status status() const noexcept { return info_.status; }
  /// The library's message (what() adds the status name).
  const std::string &message() const noexcept { return info_.message; }

 private:
  ErrorInfo info_;
};
#endif

namespace detail {
/// The failure of the call that just returned `status` on this thread.
inline ErrorInfo failure(ember_status status) {
  return ErrorInfo{static_cast<Status>(status), ember_last_error()};
}

/// What Result::value() does on a failed result: throw, or abort without exceptions.
[[noreturn]] inline void fail(const ErrorInfo &error) {
#if EMBER_HPP_EXCEPTIONS
  throw Error(error);
#else
  (void)error;
  std::abort();
#endif
}
}  // namespace detail

/// A value or a failure, returned by the try_* functions (which never throw).
/// Check ok() before value(): on a failure value() throws ember::Error, or aborts when
/// exceptions are off.
template <class T>
class [[nodiscard]] Result {
 public:
  /// A success.
  Result(T value) : value_(std::move(value)) {}
  /// A failure.
  Result(ErrorInfo error) : error_(std::move(error)) {}

  /// True on success.
  bool ok() const noexcept { return value_.has_value(); }
  /// True on success.
  explicit operator bool() const noexcept { return ok(); }
  /// Status::ok, or the failing status.
  Status status() const noexcept { return error_.status; }
  /// The failure's message ("" on success).
  const std::string &message() const noexcept { return error_.message; }
  /// The failure (status ok and empty message on success).
  const ErrorInfo &error() const noexcept { return error_; }

  /// The value (see the class comment for failures).
  T &value() & {
    if (!ok()) detail::fail(error_);
    return *value_;
  }
  /// The value (see the class comment for failures).
  const T &value() const & {
    if (!ok()) detail::fail(error_);
    return *value_;
  }
  /// The value, moved out (see the class comment for failures).
  T value() && {
    if (!ok()) detail::fail(error_);
    return std::move(*value_);
  }
  /// The value, unchecked.
  T &operator*() & noexcept { return *value_; }
  /// The value, unchecked.
  T *operator->() noexcept { return &*value_; }

 private:
  std::optional<T> value_;
  ErrorInfo error_;
};

/// The result of a try_* function with no value: ok, or a failure.
template <>
class [[nodiscard]] Result<void> {
 public:
  /// A success.
  Result() = default;
  /// A failure.
  Result(ErrorInfo error) : error_(std::move(error)) {}

  /// True on success.
  bool ok() const noexcept { return error_.status == Status::ok; }
  /// True on success.
  explicit operator bool() const noexcept { return ok(); }
  /// Status::ok, or the failing status.
  Status status() const noexcept { return error_.status; }
  /// The failure's message ("" on success).
  const std::string &message() const noexcept { return error_.message; }
  /// The failure (status ok and empty message on success).
  const ErrorInfo &error() const noexcept { return error_; }
  /// Throws ember::Error on a failure (aborts when exceptions are off).
  void value() const {
    if (!ok()) detail::fail(error_);
  }

 private:
  ErrorInfo error_;
};

namespace detail {
/// Result<void> of a status.
inline Result<void> check(ember_status status) {
  if (status == EMBER_OK) return Result<void>();
  return failure(status);
}

/// Runs `call(buffer, capacity, &n)` for a text output of the C API, growing the buffer
/// when the library says it is too small.
template <class Call>
Result<std::string> read_text(Call &&call, size_t capacity = 256) {
  std::string text(capacity, '\0');
  size_t n = 0;
  ember_status st = call(text.data(), text.size(), &n);
  if (st == EMBER_ERR_BUFFER_TOO_SMALL && n > text.size()) {
    text.assign(n, '\0');
    st = call(text.data(), text.size(), &n);
  }
  if (st != EMBER_OK) return failure(st);
  text.resize(n);
  return text;
}

/// The C handle an owner class holds: move-only, released with `Free`.
template <class T, void (*Free)(T *)>
class Handle {
 public:
  /// The C handle (nullptr if empty); still owned by this object.
  T *get() const noexcept { return handle_.get(); }
  /// True unless empty.
  explicit operator bool() const noexcept { return handle_ != nullptr; }

 protected:
  Handle() noexcept = default;
  explicit Handle(T *handle) noexcept : handle_(handle) {}

 private:
  struct Release {
    void operator()(T *p) const noexcept { Free(p); }
  };
  std::unique_ptr<T, Release> handle_;
};
}  // namespace detail

/// Options of Model loading, starting from the library's defaults.
struct ModelParams : ember_model_params {
  ModelParams() : ember_model_params() {
    ember_model_params_default(sizeof(ember_model_params), this);
  }
};

/// Options of a Session (n_ctx, n_threads, n_ubatch, pool, kv_type), starting from the library's defaults.
struct SessionParams : ember_session_params {
  SessionParams() : ember_session_params() {
    ember_session_params_default(sizeof(ember_session_params), this);
  }
};

/// Options of a Sampler, starting from the library's defaults (greedy, no penalties).
struct SamplerParams : ember_sampler_params {
  SamplerParams() : ember_sampler_params() {
    ember_sampler_params_default(sizeof(ember_sampler_params), this);
  }
};

/// Options of generate() and chat(), starting from the library's defaults (max_tokens,
/// ignore_end_tokens, add_special, parse_special). Stop strings go in `stop`.
struct GenerateOptions : ember_generate_params {
  std::vector<std::string> stop;  ///< texts that end generation (not passed to the callback)
  GenerateOptions() : ember_generate_params() {
    ember_generate_params_default(sizeof(ember_generate_params), this);
  }
};

/// A message of a conversation.
struct ChatMessage {
  std::string role;     ///< "system", "user", "assistant", ...
  std::string content;  ///< the message text
};

/// How a generation ended.
struct Generation {
  StopReason reason = StopReason::max_tokens;  ///< why it stopped
  size_t n_tokens = 0;                         ///< tokens generated
};

namespace detail {
/// The C API takes these strings NUL-terminated: one with a NUL inside cannot be passed.
inline Result<void> no_nul(std::string_view text, const char *what) {
  if (text.find('\0') == std::string_view::npos) return Result<void>();
  return ErrorInfo{Status::invalid_argument, std::string(what) + " contains a NUL character"};
}

/// The C view of `messages` in `out`, borrowing their strings.
inline Result<void> c_messages(const std::vector<ChatMessage> &messages,
                               std::vector<ember_chat_message> &out) {
  out.reserve(messages.size());
  for (const ChatMessage &m : messages) {
    if (auto r = no_nul(m.role, "a message role"); !r) return r;
    if (auto r = no_nul(m.content, "a message content"); !r) return r;
    out.push_back({m.role.c_str(), m.content.c_str()});
  }
  return Result<void>();
}

/// The C params of `options` in `out`, with its stop strings (borrowed) in `stops`.
inline Result<void> c_params(const GenerateOptions &options, ember_generate_params &out,
                             std::vector<const char *> &stops) {
  out = options;
  if (options.stop.empty()) return Result<void>();
  for (const std::string &s : options.stop) {
    if (auto r = no_nul(s, "a stop string"); !r) return r;
    stops.push_back(s.c_str());
  }
  out.stop_strings = stops.data();
  out.n_stop_strings = stops.size();
  return Result<void>();
}
}  // namespace detail

/// A loaded model: immutable, shared by any number of sessions on any threads. Sessions and
/// detokenizers keep the weights alive, so a Model may be destroyed before them.
/// What probe() says about a model file (ember_model_info).
struct ModelInfo {
  std::string architecture;      ///< as the file names it, even when unsupported
  bool supported = false;        ///< Ember can load and run the file
  std::string reason;            ///< why not ("" when supported)
  bool has_tokenizer = false;    ///< the file has a tokenizer Ember can build
  bool has_chat_template = false;///< the tokenizer has a chat template
  uint64_t n_ctx_train = 0;      ///< trained context (0: unknown)
  uint64_t n_layers = 0;         ///< Transformer blocks (0: unknown)
  uint64_t n_vocab = 0;          ///< vocabulary size (0: unknown)
  uint64_t n_params = 0;         ///< number of weights
  uint64_t file_bytes = 0;       ///< bytes of the model's files
  uint64_t bytes_per_token = 0;  ///< weight bytes one generated token reads
  std::string tensor_types;      ///< e.g. "61 F32, 16 Q4_K, 166 Q5_0"
};

/// Describes the model file at `path` without loading it; fails only when the path cannot
/// be read (an unusable file is described, with supported false and the reason).
inline Result<ModelInfo> try_probe(std::string_view path) {
  if (auto r = detail::no_nul(path, "the path"); !r) return r.error();
  ember_model_info c;
  ember_status st = EMBER_MODEL_PROBE(std::string(path).c_str(), &c);
  if (st != EMBER_OK) return detail::failure(st);
  ModelInfo info;
  info.architecture = c.architecture;
  info.supported = c.supported != 0;
  info.reason = c.reason;
  info.has_tokenizer = c.has_tokenizer != 0;
  info.has_chat_template = c.has_chat_template != 0;
  info.n_ctx_train = c.n_ctx_train;
  info.n_layers = c.n_layers;
  info.n_vocab = c.n_vocab;
  info.n_params = c.n_params;
  info.file_bytes = c.file_bytes;
  info.bytes_per_token = c.bytes_per_token;
  info.tensor_types = c.tensor_types;
  return info;
}

#if EMBER_HPP_EXCEPTIONS
/// try_probe(); throws ember::Error on failure.
inline ModelInfo probe(std::string_view path) { return try_probe(path).value(); }
#endif

class Model : public detail::Handle<ember_model, ember_model_free> {
 public:
  /// An empty model (as after a move); load one with try_load() or the constructor.
  Model() noexcept = default;

  /// Loads a GGUF file or a Hugging Face folder (config.json, safetensors, tokenizer.json).
  static Result<Model> try_load(std::string_view path, const ModelParams &params = ModelParams()) {
    if (auto r = detail::no_nul(path, "the path"); !r) return r.error();
    ember_model *handle = nullptr;
    ember_status st = ember_model_load(std::string(path).c_str(), &params, &handle);
    if (st != EMBER_OK) return detail::failure(st);
    return Model(handle);
  }

  /// Loads a GGUF file from `len` bytes at `data`, used in place: the bytes must stay alive
  /// and unchanged until the model and its sessions are gone.
  static Result<Model> try_load_from_memory(const void *data, size_t len,
                                            const ModelParams &params = ModelParams()) {
    ember_model *handle = nullptr;
    ember_status st = ember_model_load_from_memory(data, len, &params, &handle);
    if (st != EMBER_OK) return detail::failure(st);
    return Model(handle);
  }

  /// Loads a GGUF file stored at `offset` (`len` bytes, 0: to the end) of the open file `fd`
  /// (an APK asset); `fd` may be closed afterwards. POSIX only.
  static Result<Model> try_load_fd(int32_t fd, uint64_t offset, uint64_t len = 0,
                                   const ModelParams &params = ModelParams()) {
    ember_model *handle = nullptr;
    ember_status st = ember_model_load_fd(fd, offset, len, &params, &handle);
    if (st != EMBER_OK) return detail::failure(st);
    return Model(handle);
  }

#if EMBER_HPP_EXCEPTIONS
  /// Loads a model; throws ember::Error on failure.
  explicit Model(std::string_view path, const ModelParams &params = ModelParams())
      : Model(try_load(path, params).value()) {}
#endif


  /// Vocabulary size: the length of a logits vector.
  size_t n_vocab() const noexcept { return ember_model_n_vocab(get()); }
  /// Width of the final hidden state: the length of an embedding (Session::try_embed).
  size_t n_embd() const noexcept { return ember_model_n_embd(get()); }
  /// The context the model was trained for.
  size_t n_ctx_train() const noexcept { return ember_model_n_ctx_train(get()); }
  /// Beginning-of-sequence token, or -1.
  int32_t bos_token() const noexcept { return ember_model_token_bos(get()); }
  /// End-of-sequence token, or -1.
  int32_t eos_token() const noexcept { return ember_model_token_eos(get()); }
  /// End-of-turn token (else EOS), or -1.
  int32_t eot_token() const noexcept { return ember_model_token_eot(get()); }
  /// True if `token` ends generation.
  bool is_end_token(int32_t token) const noexcept { return ember_model_token_is_end(get(), token); }
  /// The architecture (GGUF's general.architecture: "llama", "qwen3", "gemma3", ...; "" if
  /// empty).
  std::string_view architecture() const noexcept { return ember_model_architecture(get()); }
  /// True if the tokenizer has a chat template.
  bool has_chat_template() const noexcept { return ember_model_has_chat_template(get()); }
  /// Bytes a session with `params` would allocate (KV cache, buffers, token history).
  Result<size_t> try_session_memory(const ember_session_params &params) const {
    size_t bytes = 0;
    ember_status st = ember_session_memory_estimate(get(), &params, &bytes);
    if (st != EMBER_OK) return detail::failure(st);
    return bytes;
  }

  /// Token ids of `text` (add_special: BOS/EOS as the tokenizer adds them; parse_special:
  /// recognise special tokens written in the text).
  Result<std::vector<int32_t>> try_tokenize(std::string_view text, bool add_special = true,
                                            bool parse_special = false) const {
    std::vector<int32_t> ids(text.size() + 8);
    size_t n = 0;
    ember_status st = ember_tokenize(get(), text.data(), text.size(), add_special, parse_special,
                                     ids.data(), ids.size(), &n);
    if (st == EMBER_ERR_BUFFER_TOO_SMALL) {
      ids.resize(n);
      st = ember_tokenize(get(), text.data(), text.size(), add_special, parse_special, ids.data(),
                          ids.size(), &n);
    }
    if (st != EMBER_OK) return detail::failure(st);
    ids.resize(n);
    return ids;
  }

  /// The text of `n` token ids.
  Result<std::string> try_detokenize(const int32_t *tokens, size_t n) const {
    return detail::read_text([&](char *out, size_t cap, size_t *n_out) {
      return ember_detokenize(get(), tokens, n, out, cap, n_out);
    });
  }
  /// The text of token ids.
  Result<std::string> try_detokenize(const std::vector<int32_t> &tokens) const {
    return try_detokenize(tokens.data(), tokens.size());
  }

  /// The prompt the model's chat template makes of `messages`.
  Result<std::string> try_apply_chat_template(const std::vector<ChatMessage> &messages,
                                              bool add_generation_prompt = true) const {
    std::vector<ember_chat_message> c;
    if (auto r = detail::c_messages(messages, c); !r) return r.error();
    return detail::read_text([&](char *out, size_t cap, size_t *n_out) {
      return ember_chat_apply(get(), c.data(), c.size(), add_generation_prompt, out, cap, n_out);
    });
  }

  /// The prompt of a conversation given as JSON (messages with tool calls and tool results,
  /// `tools`, `chat_template`, template variables; see ember_chat_apply_json).
  Result<std::string> try_apply_chat_template_json(std::string_view conversation,
                                                   bool add_generation_prompt = true) const {
    return detail::read_text([&](char *out, size_t cap, size_t *n_out) {
      return ember_chat_apply_json(get(), conversation.data(), conversation.size(),
                                   add_generation_prompt, out, cap, n_out);
    });
  }

  /// An assistant's `reply` to `conversation` (JSON; empty for the model's own template) as
  /// the message to append to it, as JSON: content, reasoning_content and tool_calls (see
  /// ember_chat_parse_reply).
  Result<std::string> try_parse_reply(std::string_view conversation, std::string_view reply) const {
    return detail::read_text([&](char *out, size_t cap, size_t *n_out) {
      return ember_chat_parse_reply(get(), conversation.empty() ? nullptr : conversation.data(),
                                    conversation.size(), reply.data(), reply.size(), out, cap,
                                    n_out);
    });
  }

#if EMBER_HPP_EXCEPTIONS
  /// try_tokenize, throwing ember::Error on failure.
  std::vector<int32_t> tokenize(std::string_view text, bool add_special = true,
                                bool parse_special = false) const {
    return try_tokenize(text, add_special, parse_special).value();
  }
  /// try_detokenize, throwing ember::Error on failure.
  std::string detokenize(const std::vector<int32_t> &tokens) const {
    return try_detokenize(tokens).value();
  }
  /// try_apply_chat_template, throwing ember::Error on failure.
  std::string apply_chat_template(const std::vector<ChatMessage> &messages,
                                  bool add_generation_prompt = true) const {
    return try_apply_chat_template(messages, add_generation_prompt).value();
  }
#endif

 private:
  explicit Model(ember_model *handle) noexcept : Handle(handle) {}
};

/// Picks tokens from logits (random state and recent tokens for the penalties).
class Sampler : public detail::Handle<ember_sampler, ember_sampler_free> {
 public:
  /// An empty sampler (as after a move); make one with try_create() or a constructor.
  Sampler() noexcept = default;

  /// A sampler with `params` (SamplerParams() = greedy).
  static Result<Sampler> try_create(const SamplerParams &params = SamplerParams()) {
    ember_sampler *handle = nullptr;
    ember_status st = ember_sampler_new(&params, &handle);
    if (st != EMBER_OK) return detail::failure(st);
    return Sampler(handle);
  }

#if EMBER_HPP_EXCEPTIONS
  /// A sampler with `params`; throws ember::Error on failure.
  explicit Sampler(const SamplerParams &params) : Sampler(try_create(params).value()) {}
  /// A greedy sampler; throws ember::Error on failure.
  static Sampler greedy() { return Sampler(SamplerParams()); }
#endif


  /// A token picked from `n` logits (remembered for the penalties).
  Result<int32_t> try_sample(const float *logits, size_t n) {
    int32_t token = -1;
    ember_status st = ember_sample(get(), logits, n, &token);
    if (st != EMBER_OK) return detail::failure(st);
    return token;
  }
  /// A token picked from logits.
  Result<int32_t> try_sample(const std::vector<float> &logits) {
    return try_sample(logits.data(), logits.size());
  }
  /// Remembers `token` for the penalties.
  Result<void> try_accept(int32_t token) { return detail::check(ember_sampler_accept(get(), token)); }
  /// Restarts the random sequence from the seed, forgets recent tokens and starts the
  /// constraint's output over.
  Result<void> try_reset() { return detail::check(ember_sampler_reset(get())); }
  /// Draws only tokens that keep the output valid for a JSON schema, a regex or a Lark
  /// grammar over `model`'s vocabulary (ConstraintKind::none removes the constraint).
  Result<void> try_set_constraint(const class Model &model, ConstraintKind kind,
                                  std::string_view text);
  /// Where the constraint's output stands.
  Result<ConstraintState> try_constraint_state() {
    ember_constraint_state state = EMBER_CONSTRAINT_STATE_NONE;
    ember_status st = ember_sampler_constraint_state(get(), &state);
    if (st != EMBER_OK) return detail::failure(st);
    return static_cast<ConstraintState>(state);
  }

#if EMBER_HPP_EXCEPTIONS
  /// try_sample, throwing ember::Error on failure.
  int32_t sample(const float *logits, size_t n) { return try_sample(logits, n).value(); }
  /// try_sample, throwing ember::Error on failure.
  int32_t sample(const std::vector<float> &logits) { return try_sample(logits).value(); }
  /// try_accept, throwing ember::Error on failure.
  void accept(int32_t token) { try_accept(token).value(); }
  /// try_reset, throwing ember::Error on failure.
  void reset() { try_reset().value(); }
  /// try_set_constraint, throwing ember::Error on failure.
  void set_constraint(const class Model &model, ConstraintKind kind, std::string_view text) {
    try_set_constraint(model, kind, text).value();
  }
#endif

 private:
  explicit Sampler(ember_sampler *handle) noexcept : Handle(handle) {}
};

inline Result<void> Sampler::try_set_constraint(const Model &model, ConstraintKind kind,
                                                std::string_view text) {
  return detail::check(ember_sampler_set_constraint(get(), model.get(),
                                                    static_cast<uint32_t>(kind), text.data(),
                                                    text.size()));
}

/// Turns tokens fed one by one into complete UTF-8 text (a character split across tokens
/// comes out whole).
class Detokenizer : public detail::Handle<ember_detokenizer, ember_detokenizer_free> {
 public:
  /// An empty detokenizer (as after a move).
  Detokenizer() noexcept = default;

  /// A detokenizer for `model`'s tokenizer.
  static Result<Detokenizer> try_create(const Model &model) {
    ember_detokenizer *handle = nullptr;
    ember_status st = ember_detokenizer_new(model.get(), &handle);
    if (st != EMBER_OK) return detail::failure(st);
    return Detokenizer(handle);
  }

#if EMBER_HPP_EXCEPTIONS
  /// A detokenizer for `model`; throws ember::Error on failure.
  explicit Detokenizer(const Model &model) : Detokenizer(try_create(model).value()) {}
#endif


  /// Adds `token`; the text it completes (often "" mid-character).
  Result<std::string> try_push(int32_t token) {
    return detail::read_text(
        [&](char *out, size_t cap, size_t *n) { return ember_detokenizer_push(get(), token, out, cap, n); },
        64);
  }
  /// The text still held back (an incomplete character as U+FFFD); then resets.
  Result<std::string> try_flush() {
    return detail::read_text(
        [&](char *out, size_t cap, size_t *n) { return ember_detokenizer_flush(get(), out, cap, n); },
        64);
  }
  /// Forgets every token fed so far.
  Result<void> try_reset() { return detail::check(ember_detokenizer_reset(get())); }

#if EMBER_HPP_EXCEPTIONS
  /// try_push, throwing ember::Error on failure.
  std::string push(int32_t token) { return try_push(token).value(); }
  /// try_flush, throwing ember::Error on failure.
  std::string flush() { return try_flush().value(); }
  /// try_reset, throwing ember::Error on failure.
  void reset() { try_reset().value(); }
#endif

 private:
  explicit Detokenizer(ember_detokenizer *handle) noexcept : Handle(handle) {}
};

namespace detail {
/// Adapts a C++ callable `bool(std::string_view)` (or `void(std::string_view)`: always
/// continue) to ember_text_callback. An exception thrown by the callable is caught here,
/// stops the generation and is rethrown once the C call has returned: it never unwinds
/// through the library.
template <class F>
struct TextSink {
  explicit TextSink(F &callable) : f(callable) {}

  F &f;
#if EMBER_HPP_EXCEPTIONS
  std::exception_ptr error;
#endif

  static bool call(const char *piece, size_t len, void *user) {
    TextSink &self = *static_cast<TextSink *>(user);
#if EMBER_HPP_EXCEPTIONS
    try {
#endif
      std::string_view text(piece, len);
      if constexpr (std::is_void_v<std::invoke_result_t<F &, std::string_view>>) {
        self.f(text);
        return true;
      } else {
        return static_cast<bool>(self.f(text));
      }
#if EMBER_HPP_EXCEPTIONS
    } catch (...) {
      self.error = std::current_exception();
      return false;
    }
#endif
  }

  /// Rethrows what the callable threw, if anything.
  void rethrow() {
#if EMBER_HPP_EXCEPTIONS
    if (error) std::rethrow_exception(error);
#endif
  }
};

}  // namespace detail

/// Worker threads several sessions share: set `SessionParams::pool` to `pool.get()` (the
/// sessions keep the pool alive; their steps take turns on its threads, and generations
/// running at once on it step together).
class Pool : public detail::Handle<ember_pool, ember_pool_free> {
 public:
  /// An empty pool (as after a move).
  Pool() noexcept = default;
  /// A pool of `n_threads` threads (0 = half the machine's), the stepping thread included.
  static Result<Pool> try_create(uint32_t n_threads = 0) {
    ember_pool_params params;
    (void)EMBER_POOL_PARAMS_DEFAULT(&params);
    params.n_threads = n_threads;
    ember_pool *handle = nullptr;
    ember_status st = ember_pool_new(&params, &handle);
    if (st != EMBER_OK) return detail::failure(st);
    return Pool(handle);
  }
  /// The threads each step uses.
  size_t n_threads() const noexcept { return ember_pool_n_threads(get()); }
  /// The forward passes the generations on this pool have run (`first`) and the generation
  /// steps they carried (`second`): generations running at once on one pool step together.
  Result<std::pair<uint64_t, uint64_t>> try_combined_steps() const {
    uint64_t passes = 0, steps = 0;
    ember_status st = ember_pool_combined_steps(get(), &passes, &steps);
    if (st != EMBER_OK) return detail::failure(st);
    return std::make_pair(passes, steps);
  }

 private:
  explicit Pool(ember_pool *handle) noexcept : Handle(handle) {}
};

/// One sequence's state over a model: KV cache and position. Used by one thread at a time;
/// cancel() and position() may be called from any thread.
class Session : public detail::Handle<ember_session, ember_session_free> {
 public:
  /// An empty session (as after a move).
  Session() noexcept = default;

  /// A session over `model` (which it keeps alive).
  static Result<Session> try_create(const Model &model, const SessionParams &params = SessionParams()) {
    ember_session *handle = nullptr;
    ember_status st = ember_session_new(model.get(), &params, &handle);
    if (st != EMBER_OK) return detail::failure(st);
    return Session(handle, model.n_vocab());
  }

#if EMBER_HPP_EXCEPTIONS
  /// A session over `model`; throws ember::Error on failure.
  explicit Session(const Model &model, const SessionParams &params = SessionParams())
      : Session(try_create(model, params).value()) {}
#endif


  /// Tokens the session holds (any thread, any time; during a long step it advances as
  /// micro-batches complete).
  size_t position() const noexcept { return ember_session_position(get()); }
  /// The context length in tokens (any thread, any time).
  size_t n_ctx() const noexcept { return ember_session_n_ctx(get()); }
  /// Asks the step or generation running on this session (in another thread, or from its
  /// callback) to stop: a step fails with Status::cancelled and leaves the session as it was;
  /// a generation ends with StopReason::cancelled and keeps what it delivered. With nothing
  /// running it does nothing.
  void cancel() const noexcept { (void)ember_session_cancel(get()); }
  /// The tokens the session holds, oldest first (prompts and every delivered token).
  Result<std::vector<int32_t>> try_tokens() const {
    size_t n = 0;
    ember_status st = ember_session_tokens(get(), nullptr, 0, &n);
    std::vector<int32_t> out(n);
    if (st == EMBER_ERR_BUFFER_TOO_SMALL) st = ember_session_tokens(get(), out.data(), n, &n);
    if (st != EMBER_OK) return detail::failure(st);
    out.resize(n);
    return out;
  }
  /// The logits of the last token of the last successful step, fork or state load
  /// (n_vocab floats).
  const std::vector<float> &logits() const noexcept { return logits_; }
  /// Keeps the attention weights of `layers` × query `heads` (empty = every one) for the last
  /// `max_queries` tokens of each step (0 = capture off); returns the buffer's size in bytes.
  /// Allocated here once; steps allocate nothing. A bad index leaves the old capture.
  Result<size_t> try_capture_attention(const std::vector<int32_t> &layers,
                                       const std::vector<int32_t> &heads, size_t max_queries = 1) {
    size_t bytes = 0;
    ember_status st = ember_session_capture_attention(get(), layers.data(), layers.size(),
                                                      heads.data(), heads.size(), max_queries,
                                                      &bytes);
    if (st != EMBER_OK) return detail::failure(st);
    return bytes;
  }
  /// try_attention's result: `weights[i * n_positions + j]` is how much the query at
  /// position `n_positions - n_queries + i` attends to position `j`; each row sums to 1.
  struct Attention {
    size_t n_queries = 0;
    size_t n_positions = 0;
    std::vector<float> weights;
  };
  /// The attention weights of `layer`'s query head `head` from the last captured step.
  Result<Attention> try_attention(int32_t layer, int32_t head) const {
    Attention out;
    ember_status st =
        ember_session_attention(get(), layer, head, nullptr, 0, &out.n_queries, &out.n_positions);
    if (st == EMBER_ERR_BUFFER_TOO_SMALL) {
      out.weights.resize(out.n_queries * out.n_positions);
      st = ember_session_attention(get(), layer, head, out.weights.data(), out.weights.size(),
                                   &out.n_queries, &out.n_positions);
    }
    if (st != EMBER_OK) return detail::failure(st);
    out.weights.resize(out.n_queries * out.n_positions);
    return out;
  }

  /// Appends tokens and returns their embedding (the model's n_embd floats): the final hidden
  /// state after the final norm of the last token (EMBER_POOLING_LAST) or the mean over the
  /// tokens (EMBER_POOLING_MEAN), unit length with `normalize`. Earlier tokens condition it:
  /// try_reset first to embed a text on its own. No logits are computed.
  Result<std::vector<float>> try_embed(const std::vector<int32_t> &tokens,
                                       ember_pooling pooling = EMBER_POOLING_MEAN,
                                       bool normalize = true) {
    size_t n = 0;
    ember_session_embed(get(), tokens.data(), tokens.size(), pooling, normalize, nullptr, 0, &n);
    std::vector<float> out(n);
    ember_status st = ember_session_embed(get(), tokens.data(), tokens.size(), pooling, normalize,
                                          out.data(), out.size(), &n);
    if (st != EMBER_OK) return detail::failure(st);
    return out;
  }

  /// A new session holding this one's tokens and KV cache without computing them again (one
  /// shared prompt, many characters); with no params, this session's context, threads and
  /// batch size.
  Result<Session> try_fork() const { return fork_with(nullptr); }
  /// try_fork with the new session's own params (its context must hold the tokens).
  Result<Session> try_fork(const SessionParams &params) const { return fork_with(&params); }
  /// Replaces what this session holds by the first `n_tokens` tokens of `src` (same model).
  Result<void> try_copy_prefix(const Session &src, size_t n_tokens) {
    ember_status st = ember_session_copy_prefix(get(), src.get(), n_tokens);
    if (st == EMBER_OK) refresh_logits();
    return detail::check(st);
  }
  /// The session's state (tokens, KV rows, last logits, model fingerprint) as bytes for a
  /// save file.
  Result<std::vector<uint8_t>> try_save_state() const {
    size_t size = 0;
    if (ember_status st = ember_session_state_size(get(), &size); st != EMBER_OK)
      return detail::failure(st);
    std::vector<uint8_t> out(size);
    ember_status st = ember_session_state_save(get(), out.data(), out.size(), &size);
    if (st != EMBER_OK) return detail::failure(st);
    out.resize(size);
    return out;
  }
  /// Replaces what the session holds by a saved state of the same model; on failure
  /// (another model, corrupted bytes, too small a context) the session is unchanged.
  Result<void> try_load_state(const uint8_t *data, size_t len) {
    ember_status st = ember_session_state_load(get(), data, len);
    if (st == EMBER_OK) refresh_logits();
    return detail::check(st);
  }
  /// try_load_state from a vector.
  Result<void> try_load_state(const std::vector<uint8_t> &data) {
    return try_load_state(data.data(), data.size());
  }
  /// Prompt and generated tokens and milliseconds: the last call and in total.
  Result<ember_perf> try_perf() const {
    ember_perf perf{};
    ember_status st = EMBER_SESSION_PERF(get(), &perf);
    if (st != EMBER_OK) return detail::failure(st);
    return perf;
  }

  /// Appends `n` tokens; their last one's logits are then in logits(). On failure the
  /// session is unchanged.
  Result<void> try_step(const int32_t *tokens, size_t n) {
    return detail::check(ember_step(get(), tokens, n, logits_.data()));
  }
  /// Appends tokens (see above).
  Result<void> try_step(const std::vector<int32_t> &tokens) { return try_step(tokens.data(), tokens.size()); }
  /// Steps several sessions of one model in one forward pass (each weight read once for all):
  /// `sessions[i]` appends `tokens[i]` (empty when it has pending tokens); each one's last
  /// logits are then in its logits(), bitwise what stepping it alone gives. An error names the
  /// session's index in Error::message and steps none of them.
  static Result<void> try_step_batch(const std::vector<Session *> &sessions,
                                     const std::vector<std::vector<int32_t>> &tokens) {
    if (sessions.size() != tokens.size())
      return ErrorInfo{Status::invalid_argument, "as many token lists as sessions are needed"};
    std::vector<ember_session *> handles;
    std::vector<const int32_t *> lists;
    std::vector<size_t> counts;
    std::vector<float *> outs;
    for (size_t i = 0; i < sessions.size(); i++) {
      handles.push_back(sessions[i]->get());
      lists.push_back(tokens[i].data());
      counts.push_back(tokens[i].size());
      outs.push_back(sessions[i]->logits_.data());
    }
    return detail::check(
        ember_step_batch(handles.data(), lists.data(), counts.data(), handles.size(), outs.data()));
  }
  /// Appends tokens and returns the logits of every one, row by row (n × n_vocab).
  Result<std::vector<float>> try_step_all(const std::vector<int32_t> &tokens) {
    std::vector<float> all(tokens.size() * logits_.size());
    ember_status st = ember_step_all(get(), tokens.data(), tokens.size(), all.data(), all.size());
    if (st != EMBER_OK) return detail::failure(st);
    return all;
  }
  /// Truncates the session to its first `n_past` tokens.
  Result<void> try_rewind(size_t n_past) { return detail::check(ember_session_rewind(get(), n_past)); }
  /// Forgets every token.
  Result<void> try_reset() { return detail::check(ember_session_reset(get())); }

  /// Tokenizes `prompt` (appended to what the session holds) and generates with `sampler`,
  /// calling `on_text(std::string_view)` with complete UTF-8 text as it comes; on_text
  /// returns bool (false stops) or void. An exception from on_text stops the generation
  /// and propagates once the library has returned. The session then holds every token whose
  /// text was delivered. A cancel() is not an error here: the Generation says
  /// StopReason::cancelled and how many tokens were delivered.
  template <class F>
  Result<Generation> try_generate(std::string_view prompt, Sampler &sampler,
                                  const GenerateOptions &options, F &&on_text) {
    std::vector<const char *> stops;
    ember_generate_params p;
    if (auto r = detail::c_params(options, p, stops); !r) return r.error();
    detail::TextSink<std::remove_reference_t<F>> sink{on_text};
    ember_stop_reason reason = EMBER_STOP_REASON_END_TOKEN;
    size_t n = 0;
    ember_status st = ember_generate(get(), sampler.get(), prompt.data(), prompt.size(), &p,
                                     &decltype(sink)::call, &sink, &reason, &n);
    sink.rethrow();
    return finish(st, reason, n);
  }

  /// The assistant's reply to the whole conversation `messages` (chat template applied),
  /// streamed to `on_text` as try_generate does. Keep a conversation in one session: the
  /// tokens of earlier turns it still holds are reused. Special tokens written in messages
  /// stay plain text unless options.parse_special is set.
  template <class F>
  Result<Generation> try_chat(const std::vector<ChatMessage> &messages, Sampler &sampler,
                              const GenerateOptions &options, F &&on_text) {
    std::vector<const char *> stops;
    ember_generate_params p;
    if (auto r = detail::c_params(options, p, stops); !r) return r.error();
    std::vector<ember_chat_message> c;
    if (auto r = detail::c_messages(messages, c); !r) return r.error();
    detail::TextSink<std::remove_reference_t<F>> sink{on_text};
    ember_stop_reason reason = EMBER_STOP_REASON_END_TOKEN;
    size_t n = 0;
    ember_status st = ember_chat(get(), sampler.get(), c.data(), c.size(), &p,
                                 &decltype(sink)::call, &sink, &reason, &n);
    sink.rethrow();
    return finish(st, reason, n);
  }

  /// The assistant's reply to a conversation given as JSON (see ember_chat_json: tools,
  /// tool_choice, tool calls and results, template variables), streamed as try_chat does.
  /// Parse the reply's tool calls with Model::try_parse_reply.
  template <class F>
  Result<Generation> try_chat_json(std::string_view conversation, Sampler &sampler,
                                   const GenerateOptions &options, F &&on_text) {
    std::vector<const char *> stops;
    ember_generate_params p;
    if (auto r = detail::c_params(options, p, stops); !r) return r.error();
    detail::TextSink<std::remove_reference_t<F>> sink{on_text};
    ember_stop_reason reason = EMBER_STOP_REASON_END_TOKEN;
    size_t n = 0;
    ember_status st = ember_chat_json(get(), sampler.get(), conversation.data(),
                                      conversation.size(), &p, &decltype(sink)::call, &sink,
                                      &reason, &n);
    sink.rethrow();
    return finish(st, reason, n);
  }

  /// Starts generating from `prompt` in the background (see GenerationHandle): returns at
  /// once; the session and `sampler` belong to the generation until it is finished.
  Result<class GenerationHandle> try_start(std::string_view prompt, Sampler &sampler,
                                           const GenerateOptions &options);
  /// Starts the assistant's reply to `messages` in the background (see try_chat).
  Result<class GenerationHandle> try_start_chat(const std::vector<ChatMessage> &messages,
                                                Sampler &sampler, const GenerateOptions &options);

#if EMBER_HPP_EXCEPTIONS
  /// try_step; returns logits(). Throws ember::Error on failure.
  const std::vector<float> &step(const std::vector<int32_t> &tokens) {
    try_step(tokens).value();
    return logits_;
  }
  /// try_step for one token; returns logits(). Throws ember::Error on failure.
  const std::vector<float> &step(int32_t token) {
    try_step(&token, 1).value();
    return logits_;
  }
  /// try_step_batch, throwing ember::Error on failure.
  static void step_batch(const std::vector<Session *> &sessions,
                         const std::vector<std::vector<int32_t>> &tokens) {
    try_step_batch(sessions, tokens).value();
  }
  /// try_step_all, throwing ember::Error on failure.
  std::vector<float> step_all(const std::vector<int32_t> &tokens) { return try_step_all(tokens).value(); }
  /// try_rewind, throwing ember::Error on failure.
  void rewind(size_t n_past) { try_rewind(n_past).value(); }
  /// try_reset, throwing ember::Error on failure.
  void reset() { try_reset().value(); }
  /// try_tokens, throwing ember::Error on failure.
  std::vector<int32_t> tokens() const { return try_tokens().value(); }
  /// try_capture_attention, throwing ember::Error on failure.
  size_t capture_attention(const std::vector<int32_t> &layers, const std::vector<int32_t> &heads,
                           size_t max_queries = 1) {
    return try_capture_attention(layers, heads, max_queries).value();
  }
  /// try_attention, throwing ember::Error on failure.
  Attention attention(int32_t layer, int32_t head) const { return try_attention(layer, head).value(); }
  /// try_embed, throwing ember::Error on failure.
  std::vector<float> embed(const std::vector<int32_t> &tokens,
                           ember_pooling pooling = EMBER_POOLING_MEAN, bool normalize = true) {
    return try_embed(tokens, pooling, normalize).value();
  }
  /// try_fork, throwing ember::Error on failure.
  Session fork() const { return try_fork().value(); }
  /// try_fork with params, throwing ember::Error on failure.
  Session fork(const SessionParams &params) const { return try_fork(params).value(); }
  /// try_copy_prefix, throwing ember::Error on failure.
  void copy_prefix(const Session &src, size_t n_tokens) { try_copy_prefix(src, n_tokens).value(); }
  /// try_save_state, throwing ember::Error on failure.
  std::vector<uint8_t> save_state() const { return try_save_state().value(); }
  /// try_load_state, throwing ember::Error on failure.
  void load_state(const std::vector<uint8_t> &data) { try_load_state(data).value(); }
  /// try_perf, throwing ember::Error on failure.
  ember_perf perf() const { return try_perf().value(); }
  /// try_generate, throwing ember::Error on failure.
  template <class F>
  Generation generate(std::string_view prompt, Sampler &sampler, const GenerateOptions &options,
                      F &&on_text) {
    return try_generate(prompt, sampler, options, std::forward<F>(on_text)).value();
  }
  /// try_chat, throwing ember::Error on failure.
  template <class F>
  Generation chat(const std::vector<ChatMessage> &messages, Sampler &sampler,
                  const GenerateOptions &options, F &&on_text) {
    return try_chat(messages, sampler, options, std::forward<F>(on_text)).value();
  }
#endif

 private:
  Session(ember_session *handle, size_t n_vocab) : Handle(handle), logits_(n_vocab) {}

  Result<Session> fork_with(const ember_session_params *params) const {
    ember_session *handle = nullptr;
    ember_status st = ember_session_fork(get(), params, &handle);
    if (st != EMBER_OK) return detail::failure(st);
    Session forked(handle, logits_.size());
    forked.refresh_logits();
    return forked;
  }

  /// Copies the library's current logits, when it has them (after a fork or a load).
  void refresh_logits() noexcept {
    (void)ember_session_logits(get(), logits_.data(), logits_.size());
  }

  static Result<Generation> finish(ember_status st, ember_stop_reason reason, size_t n) {
    // A cancelled generation still reports what it delivered.
    if (st != EMBER_OK && !(st == EMBER_ERR_CANCELLED && reason == EMBER_STOP_REASON_CANCELLED))
      return detail::failure(st);
    return Generation{static_cast<StopReason>(reason), n};
  }

  std::vector<float> logits_;
};

/// A generation running on a thread of the library (`ember_generation_*`): poll() its text
/// from the game loop (it never blocks and calls nothing back), cancel() it at any time,
/// and finish() it, which waits for it to end, gives the session and sampler back and says
/// why it stopped. Destroying an unfinished handle cancels and finishes it.
class GenerationHandle {
 public:
  GenerationHandle() noexcept = default;
  GenerationHandle(GenerationHandle &&other) noexcept : handle_(other.handle_) { other.handle_ = nullptr; }
  GenerationHandle &operator=(GenerationHandle &&other) noexcept {
    if (this != &other) {
      reset();
      handle_ = other.handle_;
      other.handle_ = nullptr;
    }
    return *this;
  }
  GenerationHandle(const GenerationHandle &) = delete;
  GenerationHandle &operator=(const GenerationHandle &) = delete;
  ~GenerationHandle() { reset(); }

  /// True until finished.
  explicit operator bool() const noexcept { return handle_ != nullptr; }
  /// The C handle (nullptr once finished).
  ember_generation *get() const noexcept { return handle_; }

  /// Appends the text generated since the last poll to `text`; returns true once the
  /// generation has ended and all its text has been taken (then call finish()).
  bool poll(std::string &text) {
    char buffer[1024];
    ember_generation_state state = EMBER_GENERATION_RUNNING;
    for (;;) {
      size_t n = 0;
      if (ember_generation_poll(handle_, buffer, sizeof buffer, &n, &state) != EMBER_OK) return true;
      text.append(buffer, n);
      if (n + 1 < sizeof buffer) return state == EMBER_GENERATION_FINISHED;
    }
  }
  /// Waits up to `timeout_ms` for text or the end (for a worker thread that prefers to wait).
  void wait(uint32_t timeout_ms) const noexcept { (void)ember_generation_wait(handle_, timeout_ms, nullptr); }
  /// Asks the generation to stop (any thread): it ends with StopReason::cancelled.
  void cancel() const noexcept { (void)ember_generation_cancel(handle_); }
  /// Prompt tokens computed so far, and in all.
  std::pair<size_t, size_t> progress() const noexcept {
    size_t done = 0, total = 0;
    (void)ember_generation_progress(handle_, &done, &total);
    return {done, total};
  }
  /// Tokens generated since the last call, with log-probabilities when asked for.
  std::vector<ember_token_info> tokens() {
    std::vector<ember_token_info> out(256);
    size_t n = 0;
    if (ember_generation_poll_tokens(handle_, out.data(), out.size(), &n) != EMBER_OK) n = 0;
    out.resize(n);
    return out;
  }
  /// A generated token with its most likely alternatives, best first.
  struct TokenWithTop {
    ember_token_info token;
    std::vector<ember_token_info> top;
  };
  /// Tokens generated since the last call, each with its `k` alternatives (`k` as the
  /// generation's params.top_logprobs; padding entries, token -1, are left out).
  std::vector<TokenWithTop> tokens_top(size_t k) {
    std::vector<ember_token_info> tokens(256), top(256 * k);
    size_t n = 0;
    if (ember_generation_poll_tokens_top(handle_, tokens.data(), tokens.size(), top.data(),
                                         top.size(), &n) != EMBER_OK)
      n = 0;
    std::vector<TokenWithTop> out;
    out.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      TokenWithTop t{tokens[i], {}};
      for (size_t j = i * k; j < (i + 1) * k; ++j)
        if (top[j].token >= 0) t.top.push_back(top[j]);
      out.push_back(std::move(t));
    }
    return out;
  }
  /// Waits for the end and frees the generation; a cancel() is not an error here.
  Result<Generation> finish() {
    ember_stop_reason reason = EMBER_STOP_REASON_END_TOKEN;
    size_t n = 0;
    ember_status st = ember_generation_finish(handle_, &reason, &n);
    handle_ = nullptr;
    if (st != EMBER_OK && !(st == EMBER_ERR_CANCELLED && reason == EMBER_STOP_REASON_CANCELLED))
      return detail::failure(st);
    return Generation{static_cast<StopReason>(reason), n};
  }

 private:
  friend class Session;
  explicit GenerationHandle(ember_generation *handle) noexcept : handle_(handle) {}
  void reset() noexcept {
    if (handle_) {
      cancel();
      (void)ember_generation_finish(handle_, nullptr, nullptr);
      handle_ = nullptr;
    }
  }
  ember_generation *handle_ = nullptr;
};

inline Result<GenerationHandle> Session::try_start(std::string_view prompt, Sampler &sampler,
                                                   const GenerateOptions &options) {
  std::vector<const char *> stops;
  ember_generate_params p;
  if (auto r = detail::c_params(options, p, stops); !r) return r.error();
  ember_generation_prompt q{};
  q.struct_size = sizeof q;
  q.text = prompt.data();
  q.text_len = prompt.size();
  ember_generation *handle = nullptr;
  ember_status st = ember_generation_start(get(), sampler.get(), &q, &p, &handle);
  if (st != EMBER_OK) return detail::failure(st);
  return GenerationHandle(handle);
}

inline Result<GenerationHandle> Session::try_start_chat(const std::vector<ChatMessage> &messages,
                                                        Sampler &sampler,
                                                        const GenerateOptions &options) {
  std::vector<const char *> stops;
  ember_generate_params p;
  if (auto r = detail::c_params(options, p, stops); !r) return r.error();
  std::vector<ember_chat_message> c;
  if (auto r = detail::c_messages(messages, c); !r) return r.error();
  ember_generation_prompt q{};
  q.struct_size = sizeof q;
  q.messages = c.data();
  q.n_messages = c.size();
  ember_generation *handle = nullptr;
  ember_status st = ember_generation_start(get(), sampler.get(), &q, &p, &handle);
  if (st != EMBER_OK) return detail::failure(st);
  return GenerationHandle(handle);
}

}  // namespace ember

#endif  // EMBER_HPP
