// Tests of the C++ wrapper bindings/cpp/ember.hpp against the tiny fixtures.
// Usage: test_wrapper LLAMA_FIXTURE_DIR GPT2_FIXTURE_DIR
// Built by scripts/test-bindings twice with -std=c++17 -Wall -Wextra -Werror: once as is
// (both APIs) and once with -fno-exceptions (only the non-throwing try_* API exists).
#include "ember.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

static int checks = 0;
static int failures = 0;

#define CHECK(cond)                                                                \
  do {                                                                             \
    checks++;                                                                      \
    if (!(cond)) {                                                                 \
      failures++;                                                                  \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                              \
  } while (0)

// The throwing API exists exactly when exceptions are on.
template <class T, class = void>
struct has_throwing_tokenize : std::false_type {};
template <class T>
struct has_throwing_tokenize<T, std::void_t<decltype(std::declval<const T &>().tokenize(std::string_view()))>>
    : std::true_type {};
static_assert(has_throwing_tokenize<ember::Model>::value == (EMBER_HPP_EXCEPTIONS != 0),
              "the throwing API is compiled exactly when exceptions are on");
#if !defined(__cpp_exceptions)
static_assert(EMBER_HPP_EXCEPTIONS == 0, "-fno-exceptions turns the throwing API off");
#endif
// Owners are move-only.
static_assert(!std::is_copy_constructible_v<ember::Model> && std::is_move_constructible_v<ember::Model>);
static_assert(!std::is_copy_assignable_v<ember::Session> && std::is_move_assignable_v<ember::Session>);
static_assert(!std::is_copy_constructible_v<ember::Sampler> && !std::is_copy_constructible_v<ember::Detokenizer>);

static const char *llama_dir;
static const char *gpt2_dir;

static size_t argmax(const std::vector<float> &v) {
  return static_cast<size_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

static bool valid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (size_t k = 1; k < n; k++)
      if ((static_cast<unsigned char>(s[i + k]) >> 6) != 2) return false;
    i += n;
  }
  return true;
}

static ember::Session new_session(const ember::Model &model, uint32_t n_ctx, uint32_t threads) {
  ember::SessionParams p;
  p.n_ctx = n_ctx;
  p.n_threads = threads;
  auto s = ember::Session::try_create(model, p);
  CHECK(s.ok());
  return std::move(s).value();
}

// Options for `max_tokens` tokens whatever the model says (end tokens ignored).
static ember::GenerateOptions exactly(uint32_t max_tokens) {
  ember::GenerateOptions options;
  options.max_tokens = max_tokens;
  options.ignore_end_tokens = 1;
  return options;
}

// Greedy generation done by hand: step, argmax, detokenize.
static std::string manual_greedy(const ember::Model &model, std::vector<int32_t> prompt, int n) {
  ember::Session s = new_session(model, 0, 1);
  CHECK(s.try_step(prompt).ok());
  std::vector<int32_t> generated;
  for (int i = 0; i < n; i++) {
    int32_t t = static_cast<int32_t>(argmax(s.logits()));
    generated.push_back(t);
    CHECK(s.try_step(&t, 1).ok());
  }
  auto text = model.try_detokenize(generated);
  CHECK(text.ok());
  return text.ok() ? *text : std::string();
}

// ---- the non-throwing API (always built) ----

static void test_library() {
  CHECK(ember::abi_compatible());
  CHECK(std::strlen(ember::version()) > 0);
  CHECK(std::string(ember::status_name(ember::Status::context_full)) == "EMBER_ERR_CONTEXT_FULL");
}

static void test_load_errors() {
  auto missing = ember::Model::try_load("/nonexistent/model");
  CHECK(!missing.ok() && !missing);
  CHECK(missing.status() == ember::Status::io);
  CHECK(missing.message().find("/nonexistent/model") != std::string::npos);
  auto bad_utf8 = ember::Model::try_load("\xff\xfe");
  CHECK(bad_utf8.status() == ember::Status::invalid_argument);
  ember::Model empty;
  CHECK(!empty && empty.n_vocab() == 0 && empty.architecture().empty());
  // Without the tokenizer, text functions say so.
  ember::ModelParams params;
  params.load_tokenizer = 0;
  auto no_tokenizer = ember::Model::try_load(llama_dir, params);
  CHECK(no_tokenizer.ok());
  if (no_tokenizer.ok()) CHECK(no_tokenizer->try_tokenize("hi").status() == ember::Status::unsupported);
  // A probe describes a file without loading it.
  auto info = ember::try_probe(llama_dir);
  CHECK(info.ok() && info->supported && info->reason.empty() && info->n_layers == 2);
  CHECK(info.ok() && info->architecture == "LlamaForCausalLM" && info->has_chat_template);
  CHECK(ember::try_probe("/nonexistent/model").status() == ember::Status::io);
}

static void test_model(const ember::Model &model) {
  CHECK(model.n_vocab() == 320);
  CHECK(model.n_ctx_train() == 128);
  CHECK(model.bos_token() == 1 && model.eos_token() == 2 && model.eot_token() == 2);
  CHECK(model.is_end_token(2) && !model.is_end_token(5));
  CHECK(model.architecture() == "llama");
  CHECK(model.has_chat_template());

  const std::string text = "h\xc3\xa9llo \xe2\x9c\x93 w\xc3\xb6rld";
  auto ids = model.try_tokenize(text, false);
  CHECK(ids.ok() && !ids->empty());
  auto with_special = model.try_tokenize(text, true);  // this tokenizer adds no BOS
  CHECK(with_special.ok() && *with_special == *ids);
  auto back = model.try_detokenize(*ids);
  CHECK(back.ok() && *back == text);
  // Special tokens only when asked for.
  auto special = model.try_tokenize("<|im_start|>", false, true);
  CHECK(special.ok() && special->size() == 1 && (*special)[0] == 1);
  auto plain = model.try_tokenize("<|im_start|>", false, false);
  CHECK(plain.ok() && plain->size() > 1);
  // A text longer than the first buffer, back and forth.
  std::string long_text;
  for (int i = 0; i < 100; i++) long_text += "caf\xc3\xa9 number " + std::to_string(i) + ". ";
  auto long_ids = model.try_tokenize(long_text, false);
  CHECK(long_ids.ok());
  auto long_back = model.try_detokenize(*long_ids);
  CHECK(long_back.ok() && *long_back == long_text);
  // Errors.
  CHECK(model.try_detokenize(std::vector<int32_t>{5, 320}).status() == ember::Status::invalid_argument);
  CHECK(model.try_detokenize(std::vector<int32_t>{-1}).status() == ember::Status::invalid_argument);
  CHECK(model.try_tokenize("a\xc3").status() == ember::Status::invalid_argument);
  // Chat template.
  auto prompt = model.try_apply_chat_template({{"system", "Be brief."}, {"user", "Hi!"}});
  CHECK(prompt.ok() &&
        *prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n");
  auto closed = model.try_apply_chat_template({{"user", "Hi!"}}, false);
  CHECK(closed.ok() && *closed == "<|im_start|>user\nHi!<|im_end|>\n");
  // C strings cannot hold a NUL: refused rather than cut short.
  auto nul = model.try_apply_chat_template({{"user", std::string("a\0b", 3)}});
  CHECK(nul.status() == ember::Status::invalid_argument && nul.message().find("NUL") != std::string::npos);
  CHECK(ember::Model::try_load(std::string(llama_dir) + std::string("\0x", 2)).status() ==
        ember::Status::invalid_argument);
}

static void test_session(const ember::Model &model) {
  ember::SessionParams too_big;
  too_big.n_ctx = 100000;
  CHECK(ember::Session::try_create(model, too_big).status() == ember::Status::invalid_argument);
  ember::Session s = new_session(model, 16, 1);
  CHECK(s.n_ctx() == 16 && s.position() == 0);
  CHECK(s.logits().size() == 320);
  std::vector<int32_t> prompt = {10, 20, 30, 40, 50, 60, 70, 80, 90, 100};
  CHECK(s.try_step(prompt).ok() && s.position() == 10);
  std::vector<float> after_prompt = s.logits();
  CHECK(s.try_step(std::vector<int32_t>{1, 320}).status() == ember::Status::invalid_argument);
  CHECK(s.try_step(std::vector<int32_t>{}).status() == ember::Status::invalid_argument);
  CHECK(s.position() == 10 && s.logits() == after_prompt);
  // Context full, then continued use.
  auto full = s.try_step(std::vector<int32_t>(7, 5));
  CHECK(full.status() == ember::Status::context_full && !full.message().empty());
  CHECK(s.position() == 10);
  CHECK(s.try_step(std::vector<int32_t>(6, 5)).ok() && s.position() == 16);
  CHECK(s.try_rewind(17).status() == ember::Status::invalid_argument);
  CHECK(s.try_rewind(10).ok() && s.position() == 10);
  // After a rewind the same tokens give the same logits.
  CHECK(s.try_rewind(9).ok() && s.try_step(&prompt[9], 1).ok() && s.logits() == after_prompt);
  CHECK(s.try_reset().ok() && s.position() == 0);
  // step_all's last row is step's logits.
  auto all = s.try_step_all({10, 20, 30, 40});
  CHECK(all.ok() && all->size() == 4 * 320);
  ember::Session s2 = new_session(model, 16, 2);
  CHECK(s2.try_step({10, 20, 30, 40}).ok());
  CHECK(all.ok() && std::equal(s2.logits().begin(), s2.logits().end(), all->begin() + 3 * 320));
  // A cancel with nothing running reaches no later step.
  s.cancel();
  CHECK(s.try_step({7, 8}).ok() && s.position() == 6);
  auto held = s.try_tokens();
  CHECK(held.ok() && *held == std::vector<int32_t>({10, 20, 30, 40, 7, 8}));
  // Moves: the moved-from session is empty and fails cleanly.
  ember::Session moved = std::move(s);
  CHECK(!s && moved && moved.position() == 6);  // NOLINT(bugprone-use-after-move)
  CHECK(s.try_step({1}).status() == ember::Status::invalid_argument);  // NOLINT
  CHECK(s.position() == 0);                                            // NOLINT
}

static void test_sampler() {
  auto greedy = ember::Sampler::try_create();
  CHECK(greedy.ok());
  std::vector<float> logits = {0.5f, 2.0f, -1.0f, 1.9f, 0.0f};
  auto t = greedy->try_sample(logits);
  CHECK(t.ok() && *t == 1);
  CHECK(greedy->try_accept(-1).status() == ember::Status::invalid_argument);
  CHECK(greedy->try_reset().ok());
  // The repetition penalty divides a positive logit of a recent token.
  ember::SamplerParams penalised;
  penalised.repetition_penalty = 2.0f;
  auto p = ember::Sampler::try_create(penalised);
  CHECK(p.ok() && p->try_accept(1).ok());
  auto pt = p->try_sample(logits);
  CHECK(pt.ok() && *pt == 3);
  ember::SamplerParams bad;
  bad.temperature = -1.0f;
  CHECK(ember::Sampler::try_create(bad).status() == ember::Status::invalid_argument);
  // A seed fixes the sequence.
  ember::SamplerParams random;
  random.temperature = 1.0f;
  random.seed = 1234;
  auto a = ember::Sampler::try_create(random);
  auto b = ember::Sampler::try_create(random);
  bool same = true;
  std::vector<int32_t> seen;
  for (int i = 0; i < 30; i++) {
    int32_t x = a->try_sample(logits).value(), y = b->try_sample(logits).value();
    same = same && x == y;
    seen.push_back(x);
  }
  CHECK(same);
  std::sort(seen.begin(), seen.end());
  CHECK(std::unique(seen.begin(), seen.end()) - seen.begin() > 1);  // it does sample
}

static void test_detokenizer(const ember::Model &model) {
  const std::string text = "caf\xc3\xa9 \xf0\x9f\x98\x80 \xe6\x97\xa5\xe6\x9c\xac \xe2\x9c\x93 end";
  auto ids = model.try_tokenize(text, false);
  CHECK(ids.ok());
  auto d = ember::Detokenizer::try_create(model);
  CHECK(d.ok());
  std::string joined;
  int empty_pieces = 0;
  for (int32_t id : *ids) {
    auto piece = d->try_push(id);
    CHECK(piece.ok() && valid_utf8(*piece));
    if (piece->empty()) empty_pieces++;
    joined += *piece;
  }
  auto rest = d->try_flush();
  CHECK(rest.ok() && rest->empty());
  CHECK(joined == text);
  CHECK(empty_pieces > 0);  // some character was split across tokens and held back
  // An incomplete character at the end comes out as U+FFFD.
  auto check_mark = model.try_tokenize("\xe2\x9c\x93", false);
  CHECK(check_mark.ok() && check_mark->size() == 3);  // one token per byte
  CHECK(d->try_push((*check_mark)[0]).value().empty());
  CHECK(d->try_flush().value() == "\xef\xbf\xbd");
  CHECK(d->try_push(320).status() == ember::Status::invalid_argument);
  CHECK(d->try_reset().ok());
}

static void test_generate(const ember::Model &model) {
  ember::Session s = new_session(model, 64, 2);
  ember::Sampler greedy = ember::Sampler::try_create().value();
  ember::GenerateOptions options = exactly(12);
  std::string text;
  int calls = 0;
  auto r = s.try_generate("Once upon a time", greedy, options, [&](std::string_view piece) {
    CHECK(valid_utf8(piece));
    text += piece;
    calls++;
    return true;
  });
  CHECK(r.ok() && r->reason == ember::StopReason::max_tokens && r->n_tokens == 12);
  CHECK(calls > 0 && !text.empty());
  CHECK(text == manual_greedy(model, model.try_tokenize("Once upon a time").value(), 12));
  // The session holds the prompt and all twelve tokens.
  size_t n_prompt = model.try_tokenize("Once upon a time").value().size();
  CHECK(s.position() == n_prompt + 12 && s.try_tokens().value().size() == n_prompt + 12);

  // A cancel from the callback ends the generation with StopReason::cancelled (not an
  // error): what was delivered is reported and kept.
  CHECK(s.try_reset().ok());
  int seen = 0;
  auto cancelled = s.try_generate("Once upon a time", greedy, options, [&](std::string_view) {
    if (++seen == 2) s.cancel();
  });
  CHECK(cancelled.ok() && cancelled->reason == ember::StopReason::cancelled);
  CHECK(cancelled.ok() && cancelled->n_tokens >= 2 && s.position() == n_prompt + cancelled->n_tokens);

  // A callback returning false stops; a void callback never does.
  CHECK(s.try_reset().ok());
  int pieces = 0;
  auto stopped = s.try_generate("Once upon a time", greedy, options, [&](std::string_view) { return ++pieces < 2; });
  CHECK(stopped.ok() && stopped->reason == ember::StopReason::callback && pieces == 2);
  CHECK(s.position() > 4);
  CHECK(s.try_reset().ok());
  std::string again;
  auto all = s.try_generate("Once upon a time", greedy, options, [&](std::string_view piece) { again += piece; });
  CHECK(all.ok() && again == text);

  // Stop strings: the text up to the stop string, which is not passed on.
  size_t at = text.size() / 2;
  if (text.size() > 4 && static_cast<unsigned char>(text[at]) < 0x80 &&
      static_cast<unsigned char>(text[at + 1]) < 0x80) {
    ember::GenerateOptions with_stop = options;
    with_stop.stop = {text.substr(at, 2)};
    std::string cut;
    CHECK(s.try_reset().ok());
    auto r2 = s.try_generate("Once upon a time", greedy, with_stop, [&](std::string_view piece) { cut += piece; });
    CHECK(r2.ok() && r2->reason == ember::StopReason::stop_string);
    CHECK(cut == text.substr(0, text.find(with_stop.stop[0])));
  }

  // A prompt that does not fit: context_full, session unchanged.
  ember::Session small = new_session(model, 8, 1);
  auto too_long = small.try_generate("a long prompt that needs more than eight tokens", greedy, options,
                                     [](std::string_view) {});
  CHECK(too_long.status() == ember::Status::context_full && small.position() == 0);
  CHECK(s.try_generate("\xff", greedy, options, [](std::string_view) {}).status() ==
        ember::Status::invalid_argument);
  ember::GenerateOptions nul_stop = options;
  nul_stop.stop = {std::string("\0", 1)};
  CHECK(s.try_generate("Hi", greedy, nul_stop, [](std::string_view) {}).status() == ember::Status::invalid_argument);
}

static void test_chat(const ember::Model &model) {
  ember::Session s = new_session(model, 0, 1);
  ember::Sampler greedy = ember::Sampler::try_create().value();
  ember::GenerateOptions options = exactly(8);
  std::vector<ember::ChatMessage> messages = {{"system", "Be brief."}, {"user", "Hello"}};
  std::string reply;
  auto r = s.try_chat(messages, greedy, options, [&](std::string_view piece) { reply += piece; });
  CHECK(r.ok() && r->n_tokens == 8);
  // The same reply by hand: the template's text, tokenized with its control tokens.
  auto prompt = model.try_apply_chat_template(messages);
  CHECK(prompt.ok());
  CHECK(reply == manual_greedy(model, model.try_tokenize(*prompt, false, true).value(), 8));
  // A second turn in the same session.
  messages.push_back({"assistant", reply});
  messages.push_back({"user", "More"});
  size_t before = s.position();
  std::string second;
  auto r2 = s.try_chat(messages, greedy, options, [&](std::string_view piece) { second += piece; });
  CHECK(r2.ok() && s.position() > before);
  auto prompt2 = model.try_apply_chat_template(messages);
  CHECK(second == manual_greedy(model, model.try_tokenize(*prompt2, false, true).value(), 8));
}

static void test_threads(const ember::Model &model) {
  auto run = [&](std::string *out) {
    ember::Session s = new_session(model, 96, 2);
    ember::SamplerParams p;
    p.temperature = 0.8f;
    p.top_k = 40;
    p.seed = 99;
    ember::Sampler sampler = ember::Sampler::try_create(p).value();
    auto r = s.try_generate("The robot said", sampler, exactly(40), [&](std::string_view piece) { *out += piece; });
    CHECK(r.ok());
  };
  std::string reference;
  run(&reference);
  CHECK(!reference.empty());
  std::vector<std::string> outputs(4);
  std::vector<std::thread> threads;
  for (std::string &out : outputs) threads.emplace_back(run, &out);
  for (std::thread &t : threads) t.join();
  for (const std::string &out : outputs) CHECK(out == reference);
}

static void test_moves(const char *dir) {
  ember::Model a = ember::Model::try_load(dir).value();
  ember::Session s = new_session(a, 16, 1);
  ember::Model b = std::move(a);
  CHECK(!a && b && b.n_vocab() == 320);  // NOLINT(bugprone-use-after-move)
  a = std::move(b);
  CHECK(a && !b);  // NOLINT
  // A session keeps the model alive: destroying the model first is fine.
  a = ember::Model();
  CHECK(!a && s.try_step({1, 2, 3}).ok() && s.position() == 3);
}

// ---- the throwing API ----

#if EMBER_HPP_EXCEPTIONS
struct Stop {};

static void test_exceptions(const ember::Model &model) {
  try {
    ember::Model missing("/nonexistent/model");
    CHECK(false);
  } catch (const ember::Error &e) {
    CHECK(e.status() == ember::Status::io);
    CHECK(std::string(e.what()).find("EMBER_ERR_IO") != std::string::npos);
    CHECK(e.message().find("/nonexistent/model") != std::string::npos);
  }
  ember::Model gpt2(gpt2_dir);
  CHECK(gpt2.architecture() == "gpt2");
  std::vector<int32_t> ids = model.tokenize("Hello world", false);
  CHECK(model.detokenize(ids) == "Hello world");
  try {
    model.detokenize({320});
    CHECK(false);
  } catch (const ember::Error &e) {
    CHECK(e.status() == ember::Status::invalid_argument);
  }
  // Result::value() of a failure throws.
  try {
    (void)ember::Model::try_load("/nonexistent").value();
    CHECK(false);
  } catch (const ember::Error &e) {
    CHECK(e.status() == ember::Status::io);
  }

  ember::SessionParams sp;
  sp.n_ctx = 16;
  ember::Session s(model, sp);
  const std::vector<float> &logits = s.step(std::vector<int32_t>(10, 5));
  CHECK(&logits == &s.logits() && logits.size() == 320);
  try {
    s.step(std::vector<int32_t>(7, 5));
    CHECK(false);
  } catch (const ember::Error &e) {
    CHECK(e.status() == ember::Status::context_full);
  }
  CHECK(s.position() == 10);
  s.step(5);
  CHECK(s.position() == 11);
  s.rewind(4);
  CHECK(s.step_all({1, 2}).size() == 2 * 320);
  s.reset();

  // Generation with a lambda; the same text on both fixtures as by hand.
  const ember::Model *models[] = {&model, &gpt2};
  for (const ember::Model *m : models) {
    ember::Session gs(*m);
    ember::Sampler greedy = ember::Sampler::greedy();
    std::string text;
    ember::Generation g = gs.generate("Once upon a time", greedy, exactly(10), [&](std::string_view piece) {
      text += piece;
      return true;
    });
    CHECK(g.reason == ember::StopReason::max_tokens && g.n_tokens == 10);
    CHECK(text == manual_greedy(*m, m->tokenize("Once upon a time"), 10));
  }

  // An exception thrown by the callback stops the generation and comes out of generate();
  // the session is usable afterwards.
  ember::Sampler greedy = ember::Sampler::greedy();
  ember::GenerateOptions options = exactly(0);
  int pieces = 0;
  try {
    s.generate("Once upon a time", greedy, options, [&](std::string_view) {
      if (++pieces == 3) throw Stop();
    });
    CHECK(false);
  } catch (const Stop &) {
    CHECK(pieces == 3);
  }
  CHECK(s.position() > 0);
  s.step(5);

  ember::Detokenizer d(model);
  std::string out;
  for (int32_t id : model.tokenize("\xe2\x9c\x93t\xe2\x9c\x93", false)) out += d.push(id);
  CHECK(out + d.flush() == "\xe2\x9c\x93t\xe2\x9c\x93");

  ember::SamplerParams bad;
  bad.top_p = 2.0f;
  try {
    ember::Sampler sampler(bad);
    CHECK(false);
  } catch (const ember::Error &e) {
    CHECK(e.status() == ember::Status::invalid_argument);
  }
}
#endif

static void test_state_and_fork(const ember::Model &model) {
  ember::Session base = new_session(model, 64, 1);
  std::vector<int32_t> system = {1, 40, 41, 42, 43, 44};
  CHECK(base.try_step(system).ok());
  auto forked = base.try_fork();
  CHECK(forked.ok());
  if (!forked.ok()) return;
  CHECK(forked->logits() == base.logits());
  auto held = forked->try_tokens();
  CHECK(held.ok() && *held == system);
  ember::Session fresh = new_session(model, 64, 1);
  std::vector<int32_t> longer = system;
  longer.push_back(50);
  CHECK(fresh.try_step(longer).ok());
  CHECK(forked->try_step(std::vector<int32_t>{50}).ok());
  CHECK(forked->logits() == fresh.logits());

  auto saved = base.try_save_state();
  CHECK(saved.ok() && saved->size() > 8);
  ember::Session restored = new_session(model, 32, 2);
  CHECK(restored.try_load_state(*saved).ok());
  CHECK(restored.logits() == base.logits());
  std::vector<uint8_t> truncated(saved->begin(), saved->end() - 1);
  CHECK(restored.try_load_state(truncated).status() == ember::Status::bad_format);
  CHECK(restored.position() == system.size());

  ember::Session copy = new_session(model, 64, 1);
  CHECK(copy.try_copy_prefix(base, 3).ok() && copy.position() == 3);
  CHECK(copy.try_copy_prefix(base, 99).status() == ember::Status::invalid_argument);

  auto perf = base.try_perf();
  CHECK(perf.ok() && perf->total_prompt_tokens == system.size() && perf->struct_size == sizeof(ember_perf));
  ember::SessionParams params;
  params.n_ctx = 64;
  auto bytes = model.try_session_memory(params);
  CHECK(bytes.ok() && *bytes > 0);
}

static void test_pool(const ember::Model &model) {
  auto pool = ember::Pool::try_create(2);
  CHECK(pool.ok() && pool->n_threads() == 2);
  if (!pool.ok()) return;
  ember::SessionParams params;
  params.n_ctx = 64;
  params.pool = pool->get();
  auto a = ember::Session::try_create(model, params);
  auto b = ember::Session::try_create(model, params);
  CHECK(a.ok() && b.ok());
  if (!a.ok() || !b.ok()) return;
  ember::Session own = new_session(model, 64, 2);
  std::vector<int32_t> ids = {1, 40, 41, 42};
  CHECK(a->try_step(ids).ok() && b->try_step(ids).ok() && own.try_step(ids).ok());
  CHECK(a->logits() == own.logits() && b->logits() == own.logits());
  // Generations at once on the pool: their steps are counted (plain steps are not).
  auto counts = pool->try_combined_steps();
  CHECK(counts.ok() && counts->first == 0 && counts->second == 0);
  CHECK(!ember::Pool().try_combined_steps().ok());
  auto sa = ember::Sampler::try_create();  // a sampler serves one generation at a time
  auto sb = ember::Sampler::try_create();
  CHECK(sa.ok() && sb.ok() && a->try_reset().ok() && b->try_reset().ok());
  if (!sa.ok() || !sb.ok()) return;
  auto ga = a->try_start("Once upon a time", *sa, exactly(10));
  auto gb = b->try_start("Once upon a time", *sb, exactly(10));
  CHECK(ga.ok() && gb.ok());
  if (!ga.ok() || !gb.ok()) return;
  CHECK(ga->finish().ok() && gb->finish().ok());
  counts = pool->try_combined_steps();
  CHECK(counts.ok() && counts->second == 2 * 9 && counts->first > 0 &&
        counts->first <= counts->second);
}

static void test_background_generation(const ember::Model &model) {
  ember::Session session = new_session(model, 64, 2);
  auto sampler = ember::Sampler::try_create();
  CHECK(sampler.ok());
  if (!sampler.ok()) return;
  std::string expected;
  auto direct = session.try_generate("Once upon a time", *sampler, exactly(10),
                                     [&](std::string_view piece) { expected += piece; });
  CHECK(direct.ok());
  CHECK(session.try_reset().ok());
  auto started = session.try_start("Once upon a time", *sampler, exactly(10));
  CHECK(started.ok());
  if (!started.ok()) return;
  ember::GenerationHandle g = std::move(started).value();
  std::string text;
  while (!g.poll(text)) g.wait(1);
  CHECK(text == expected);
  CHECK(g.progress().first == g.progress().second);
  CHECK(g.tokens().size() == 10);
  auto done = g.finish();
  CHECK(done.ok() && done->n_tokens == 10 && done->reason == ember::StopReason::max_tokens);
  CHECK(!g);
  // Cancelled (the generation may have ended first: it runs as soon as it starts), then
  // dropped unfinished: neither leaks nor blocks.
  auto chat = session.try_start_chat({{"user", "Hi"}}, *sampler, exactly(0));
  CHECK(chat.ok());
  if (chat.ok()) {
    ember::GenerationHandle c = std::move(chat).value();
    c.cancel();
    auto ended = c.finish();
    CHECK(ended.ok() && (ended->reason == ember::StopReason::cancelled ||
                         ended->reason == ember::StopReason::context_full));
  }
  CHECK(session.try_reset().ok());
  auto dropped = session.try_start("Once", *sampler, exactly(5));
  CHECK(dropped.ok());
  if (dropped.ok()) {
    ember::GenerationHandle d = std::move(dropped).value();
  }
  CHECK(session.try_step(std::vector<int32_t>{5}).ok());
  // Log-probabilities with three alternatives each: greedy picks the best one.
  CHECK(session.try_reset().ok());
  ember::GenerateOptions top3 = exactly(6);
  top3.logprobs = 1;
  top3.top_logprobs = 3;
  auto ranked = session.try_start("Once upon a time", *sampler, top3);
  CHECK(ranked.ok());
  if (ranked.ok()) {
    ember::GenerationHandle r = std::move(ranked).value();
    std::string ignored;
    while (!r.poll(ignored)) r.wait(1);
    auto got = r.tokens_top(3);
    CHECK(got.size() == 6);
    for (const auto &t : got) {
      CHECK(t.top.size() == 3 && t.top[0].token == t.token.token);
      CHECK(t.top[0].logprob == t.token.logprob && t.top[1].logprob <= t.top[0].logprob);
    }
    CHECK(r.finish().ok());
  }
}

static void test_constraint(const ember::Model &model) {
  ember::Session session = new_session(model, 64, 1);
  auto sampler = ember::Sampler::try_create();
  CHECK(sampler.ok());
  if (!sampler.ok()) return;
  CHECK(sampler->try_set_constraint(model, ember::ConstraintKind::regex, "[0-9]{2}-[a-z]{2}").ok());
  CHECK(sampler->try_constraint_state().value() == ember::ConstraintState::incomplete);
  std::string text;
  auto done = session.try_generate("Hello", *sampler, ember::GenerateOptions(),
                                   [&](std::string_view piece) { text += piece; });
  CHECK(done.ok() && done->reason == ember::StopReason::constraint_complete);
  CHECK(text.size() == 5 && text[2] == '-');
  CHECK(sampler->try_constraint_state().value() == ember::ConstraintState::finished);
  auto bad = sampler->try_set_constraint(model, ember::ConstraintKind::lark, "start: nothing");
  CHECK(!bad.ok() && bad.error().status == ember::Status::invalid_argument);
  CHECK(sampler->try_set_constraint(model, ember::ConstraintKind::none, "").ok());
  CHECK(sampler->try_constraint_state().value() == ember::ConstraintState::none);
}

static void test_attention(const ember::Model &model) {
  ember::Session session = new_session(model, 64, 1);
  auto bytes = session.try_capture_attention({1}, {0, 3}, 2);
  CHECK(bytes.ok() && *bytes == 1 * 2 * 2 * 64 * sizeof(float));
  CHECK(session.try_attention(1, 0).status() == ember::Status::invalid_argument);  // no step yet
  CHECK(session.try_step(std::vector<int32_t>{5, 6, 7, 8, 9}).ok());
  auto rows = session.try_attention(1, 3);
  CHECK(rows.ok() && rows->n_queries == 2 && rows->n_positions == 5 && rows->weights.size() == 10);
  if (rows.ok()) {
    for (size_t i = 0; i < rows->n_queries; i++) {
      float sum = 0;
      for (size_t j = 0; j < rows->n_positions; j++) sum += rows->weights[i * rows->n_positions + j];
      CHECK(std::fabs(sum - 1.0f) < 1e-5f);
    }
    CHECK(rows->weights[4] == 0.0f && rows->weights[9] > 0.0f);  // query 3 does not see token 4
  }
  CHECK(session.try_attention(0, 0).status() == ember::Status::invalid_argument);  // not captured
  CHECK(session.try_capture_attention({99}, {}, 1).status() == ember::Status::invalid_argument);
  CHECK(session.try_attention(1, 0).ok());  // the refused selection left the old one
  CHECK(session.try_capture_attention({}, {}, 0).value() == 0);
  CHECK(session.try_attention(1, 0).status() == ember::Status::invalid_argument);
}

static void test_embed(const ember::Model &model) {
  ember::Session s = new_session(model, 8, 1);
  auto unit = s.try_embed({5, 17, 42});
  CHECK(unit.ok() && unit.value().size() == model.n_embd() && model.n_embd() > 0);
  double norm = 0;
  for (float v : unit.value()) norm += double(v) * v;
  CHECK(norm > 0.99999 && norm < 1.00001);
  CHECK(s.try_reset().ok());
  auto again = s.try_embed({5, 17, 42});
  CHECK(again.ok() && again.value() == unit.value());
  auto last = s.try_embed({1}, EMBER_POOLING_LAST, false);
  CHECK(last.ok() && s.position() == 4);
  auto full = s.try_embed(std::vector<int32_t>(5, 1));
  CHECK(!full.ok() && full.status() == ember::Status::context_full && s.position() == 4);
  auto bad = s.try_embed({1}, static_cast<ember_pooling>(9));
  CHECK(!bad.ok() && bad.status() == ember::Status::invalid_argument);
}

static void test_step_batch(const ember::Model &model) {
  ember::Session a = new_session(model, 64, 2), b = new_session(model, 64, 1), alone = new_session(model, 64, 1);
  CHECK(ember::Session::try_step_batch({&a, &b}, {{5, 6, 7}, {9}}).ok());
  CHECK(a.position() == 3 && b.position() == 1);
  CHECK(alone.try_step(std::vector<int32_t>{5, 6, 7}).ok() && alone.logits() == a.logits());
  CHECK(alone.try_reset().ok() && alone.try_step(std::vector<int32_t>{9}).ok() && alone.logits() == b.logits());
  auto bad = ember::Session::try_step_batch({&a, &b}, {{5}, {1 << 20}});
  CHECK(bad.status() == ember::Status::invalid_argument);
  CHECK(!bad.ok() && bad.error().message.find("session 1 of the batch") != std::string::npos);
  CHECK(ember::Session::try_step_batch({&a}, {{5}, {6}}).status() == ember::Status::invalid_argument);
  CHECK(a.position() == 3 && b.position() == 1);
}

static void test_tool_calls(const ember::Model &model) {
  // A conversation as JSON: one tool, a template that reads tools in the <tool_call> format.
  const std::string conversation = R"({"messages": [{"role": "user", "content": "Go."}],
    "tools": [{"type": "function", "function": {"name": "go", "parameters": {"type": "object",
      "properties": {"to": {"enum": ["n", "s"]}}, "required": ["to"],
      "additionalProperties": false}}}],
    "tool_choice": "required",
    "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}{% if tools %}<tool_call>{% endif %}"})";
  auto prompt = model.try_apply_chat_template_json(conversation);
  CHECK(prompt.ok() && *prompt == "Go.<tool_call>");
  ember::Session session = new_session(model, 128, 1);
  auto sampler = ember::Sampler::try_create();
  CHECK(sampler.ok());
  if (!sampler.ok()) return;
  std::string reply;
  auto done = session.try_chat_json(conversation, *sampler, ember::GenerateOptions(),
                                    [&](std::string_view piece) { reply += piece; });
  CHECK(done.ok() && done->reason == ember::StopReason::constraint_complete);
  auto message = model.try_parse_reply(conversation, reply);
  CHECK(message.ok() && message->find(R"("tool_calls":[{"type":"function","function":{"name":"go")") !=
                            std::string::npos);
  auto plain = model.try_parse_reply("", "Hello.");
  CHECK(plain.ok() && *plain == R"({"role":"assistant","content":"Hello."})");
  auto bad = model.try_apply_chat_template_json("[]");
  CHECK(!bad.ok() && bad.error().status == ember::Status::invalid_argument);
}

int main(int argc, char **argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s LLAMA_FIXTURE_DIR GPT2_FIXTURE_DIR\n", argv[0]);
    return 2;
  }
  llama_dir = argv[1];
  gpt2_dir = argv[2];
  test_library();
  test_load_errors();
  auto loaded = ember::Model::try_load(llama_dir);
  CHECK(loaded.ok());
  if (!loaded.ok()) {
    std::fprintf(stderr, "cannot load %s: %s\n", llama_dir, loaded.message().c_str());
    return 1;
  }
  const ember::Model &model = *loaded;
  test_model(model);
  test_session(model);
  test_state_and_fork(model);
  test_background_generation(model);
  test_constraint(model);
  test_tool_calls(model);
  test_attention(model);
  test_step_batch(model);
  test_embed(model);
  test_pool(model);
  test_sampler();
  test_detokenizer(model);
  test_generate(model);
  test_chat(model);
  test_threads(model);
  test_moves(llama_dir);
#if EMBER_HPP_EXCEPTIONS
  test_exceptions(model);
#endif
  std::printf("test_wrapper, exceptions %s\n", EMBER_HPP_EXCEPTIONS ? "on" : "off");
  std::printf("%d passed, %d failed\n", checks - failures, failures);
  return failures == 0 ? 0 : 1;
}
