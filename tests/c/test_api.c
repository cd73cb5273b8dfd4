/* Tests of every function of the C API, including the error paths.
 * Usage: test_api FIXTURE_MODEL_DIR SCRATCH_DIR
 * Built by tests/c_api.rs with -std=c11 -Wall -Wextra -Werror against include/ember.h. */
#define _GNU_SOURCE /* memmem */
#define _POSIX_C_SOURCE 200809L
#include "ember.h"

#include <dirent.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int failures = 0;
static int checks = 0;

#define CHECK(cond)                                                            \
  do {                                                                         \
    checks++;                                                                  \
    if (!(cond)) {                                                             \
      failures++;                                                              \
      fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__,  \
              __LINE__, #cond, ember_last_error());                            \
    }                                                                          \
  } while (0)

#define CHECK_STATUS(call, expected) CHECK((call) == (expected))

static const char *model_dir;
static const char *scratch_dir;
static ember_model *model;

/* ---- helpers ---- */

static size_t argmax(const float *v, size_t n) {
  size_t best = 0;
  for (size_t i = 1; i < n; i++)
    if (v[i] > v[best]) best = i;
  return best;
}

struct text_buffer {
  char data[8192];
  size_t len;
  int calls;
  int stop_after; /* 0 = never */
};

static bool collect(const char *piece, size_t len, void *user) {
  struct text_buffer *b = user;
  if (b->len + len < sizeof b->data) {
    memcpy(b->data + b->len, piece, len);
    b->len += len;
    b->data[b->len] = 0;
  }
  if (piece[len] != 0) failures++; /* pieces are NUL-terminated too */
  b->calls++;
  return b->stop_after == 0 || b->calls < b->stop_after;
}

static ember_session *new_session(uint32_t n_ctx, uint32_t n_threads) {
  ember_session_params p;
  CHECK_STATUS(EMBER_SESSION_PARAMS_DEFAULT(&p), EMBER_OK);
  p.n_ctx = n_ctx;
  p.n_threads = n_threads;
  ember_session *s = NULL;
  CHECK_STATUS(ember_session_new(model, &p, &s), EMBER_OK);
  return s;
}

static void write_file(const char *path, const void *data, size_t len) {
  FILE *f = fopen(path, "wb");
  if (!f) { fprintf(stderr, "cannot write %s\n", path); exit(2); }
  fwrite(data, 1, len, f);
  fclose(f);
}

static void *read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) { fprintf(stderr, "cannot read %s\n", path); exit(2); }
  fseek(f, 0, SEEK_END);
  *len = (size_t)ftell(f);
  fseek(f, 0, SEEK_SET);
  void *data = malloc(*len ? *len : 1);
  if (fread(data, 1, *len, f) != *len) exit(2);
  fclose(f);
  return data;
}

/* ---- tests ---- */

static void test_version(void) {
  CHECK(ember_abi_version() == EMBER_ABI_VERSION);
  CHECK(strlen(ember_version()) > 0);
  CHECK(strcmp(ember_status_name(EMBER_ERR_CONTEXT_FULL), "EMBER_ERR_CONTEXT_FULL") == 0);
  CHECK(strcmp(ember_status_name(12345), "EMBER_UNKNOWN_STATUS") == 0);
  CHECK(ember_last_error() != NULL);
}

static int log_messages = 0;
static void on_log(ember_log_level level, const char *message, void *user) {
  (void)level;
  (void)user;
  if (message && strlen(message) > 0) log_messages++;
}

static void test_load_errors(void) {
  ember_model *m = (ember_model *)0x1;
  CHECK_STATUS(ember_model_load(NULL, NULL, &m), EMBER_ERR_INVALID_ARGUMENT);
  CHECK(m == (ember_model *)0x1); /* outputs untouched on failure */
  CHECK(strstr(ember_last_error(), "path") != NULL);
  CHECK_STATUS(ember_model_load(model_dir, NULL, NULL), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_model_load("/nonexistent/model", NULL, &m), EMBER_ERR_IO);
  CHECK_STATUS(ember_model_load("\xff\xfe", NULL, &m), EMBER_ERR_INVALID_ARGUMENT);

  /* A folder with a truncated safetensors file and a garbage one. */
  char path[4096], file[4200];
  snprintf(path, sizeof path, "%s/corrupt", scratch_dir);
  char cmd[8600];
  snprintf(cmd, sizeof cmd, "mkdir -p '%s' && cp '%s/config.json' '%s/'", path, model_dir, path);
  CHECK(system(cmd) == 0);
  size_t len;
  snprintf(file, sizeof file, "%s/model.safetensors", model_dir);
  char *weights = read_file(file, &len);
  snprintf(file, sizeof file, "%s/model.safetensors", path);
  write_file(file, weights, len / 3);
  CHECK_STATUS(ember_model_load(path, NULL, &m), EMBER_ERR_BAD_FORMAT);
  memset(weights, 0xff, 64);
  write_file(file, weights, len);
  CHECK_STATUS(ember_model_load(path, NULL, &m), EMBER_ERR_BAD_FORMAT);
  free(weights);
  /* A config that disagrees with the weights' shapes. */
  snprintf(cmd, sizeof cmd,
           "cp '%s/model.safetensors' '%s/' && sed -i 's/\"intermediate_size\": 128/\"intermediate_size\": 100/' '%s/config.json'",
           model_dir, path, path);
  CHECK(system(cmd) == 0);
  CHECK_STATUS(ember_model_load(path, NULL, &m), EMBER_ERR_BAD_FORMAT);
  CHECK(strstr(ember_last_error(), "gate_proj") != NULL);
}

static void test_probe(void) {
  ember_model_info info;
  CHECK_STATUS(EMBER_MODEL_PROBE(model_dir, &info), EMBER_OK);
  CHECK(info.supported && info.has_tokenizer && info.has_chat_template);
  CHECK(strcmp(info.architecture, "LlamaForCausalLM") == 0 && info.reason[0] == 0);
  CHECK(info.n_layers == 2 && info.n_vocab == 320 && info.n_ctx_train == 128);
  CHECK(info.n_params > 0 && info.file_bytes > info.n_params * 4);
  CHECK(strstr(info.tensor_types, "F32") != NULL && info.bytes_per_token > 0);

  char path[4096];
  snprintf(path, sizeof path, "%s/../gguf/llama.Q4_1.gguf", model_dir);
  CHECK_STATUS(EMBER_MODEL_PROBE(path, &info), EMBER_OK);
  CHECK(info.supported && strcmp(info.architecture, "llama") == 0);
  CHECK(strstr(info.tensor_types, "Q4_1") != NULL);

  /* The folder test_load_errors left: a config that disagrees with the weights. */
  snprintf(path, sizeof path, "%s/corrupt", scratch_dir);
  CHECK_STATUS(EMBER_MODEL_PROBE(path, &info), EMBER_OK);
  CHECK(!info.supported && strstr(info.reason, "gate_proj") != NULL);

  /* A GGUF file of an architecture Ember does not run: described, with the reason. */
  size_t len;
  snprintf(path, sizeof path, "%s/../gguf/llama.F32.gguf", model_dir);
  char *bytes = read_file(path, &len);
  char *arch = memmem(bytes, len, "general.architecture", 20);
  CHECK(arch != NULL && memcmp(arch + 20 + 4 + 8, "llama", 5) == 0);
  memcpy(arch + 20 + 4 + 8, "mamba", 5);
  snprintf(path, sizeof path, "%s/mamba.gguf", scratch_dir);
  write_file(path, bytes, len);
  free(bytes);
  CHECK_STATUS(EMBER_MODEL_PROBE(path, &info), EMBER_OK);
  CHECK(!info.supported && strcmp(info.architecture, "mamba") == 0);
  CHECK(strstr(info.reason, "mamba") != NULL && info.n_params > 0);

  /* An older, smaller struct: only its fields are written. */
  ember_model_info small;
  memset(&small, 'X', sizeof small);
  CHECK_STATUS(ember_model_probe(model_dir, offsetof(ember_model_info, reason), &small), EMBER_OK);
  CHECK(small.supported && small.struct_size == offsetof(ember_model_info, reason));
  CHECK(small.reason[0] == 'X' && small.n_layers != 2);

  ember_model_info untouched;
  untouched.n_layers = 77;
  CHECK_STATUS(EMBER_MODEL_PROBE("/nonexistent/model", &untouched), EMBER_ERR_IO);
  CHECK(untouched.n_layers == 77);
  CHECK_STATUS(EMBER_MODEL_PROBE(NULL, &info), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_model_probe(model_dir, sizeof info, NULL), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_model_probe(model_dir, 2, &info), EMBER_ERR_INVALID_ARGUMENT);
}

static void test_model(void) {
  ember_set_log_callback(on_log, NULL);
  ember_model_params params;
  CHECK_STATUS(EMBER_MODEL_PARAMS_DEFAULT(&params), EMBER_OK);
  CHECK(params.struct_size == sizeof params && params.load_tokenizer == 1);
  CHECK_STATUS(ember_model_load(model_dir, &params, &model), EMBER_OK);
  CHECK(log_messages > 0);
  ember_set_log_callback(NULL, NULL);

  CHECK(ember_model_n_vocab(model) == 320);
  CHECK(ember_model_n_ctx_train(model) == 128);
  CHECK(ember_model_token_bos(model) == 1);
  CHECK(ember_model_token_eos(model) == 2);
  CHECK(ember_model_token_eot(model) == 2);
  CHECK(ember_model_token_is_end(model, 2) && !ember_model_token_is_end(model, 5));
  CHECK(strcmp(ember_model_architecture(model), "llama") == 0);
  CHECK(ember_model_has_chat_template(model));
  /* NULL models: neutral values, no crash. */
  CHECK(ember_model_n_vocab(NULL) == 0);
  CHECK(ember_model_token_bos(NULL) == -1);
  CHECK(strcmp(ember_model_architecture(NULL), "") == 0);
  CHECK(!ember_model_has_chat_template(NULL));

  /* An old caller's params struct: only struct_size. */
  struct { uint32_t struct_size; } old = {sizeof old};
  ember_model *m2 = NULL;
  CHECK_STATUS(ember_model_load(model_dir, (const ember_model_params *)&old, &m2), EMBER_OK);
  ember_model_free(m2);
  struct { uint32_t struct_size; } bad = {0};
  CHECK_STATUS(ember_model_load(model_dir, (const ember_model_params *)&bad, &m2), EMBER_ERR_INVALID_ARGUMENT);
  /* Without the tokenizer, text functions say so. */
  params.load_tokenizer = 0;
  CHECK_STATUS(ember_model_load(model_dir, &params, &m2), EMBER_OK);
  int32_t ids[8];
  size_t n = 99;
  CHECK_STATUS(ember_tokenize(m2, "hi", 2, false, false, ids, 8, &n), EMBER_ERR_UNSUPPORTED);
  CHECK(n == 99);
  ember_model_free(m2);
  ember_model_free(NULL);
}

/* A GGUF file of the same weights, and load-time Q8_0 quantization. */
static void test_gguf_and_quantization(void) {
  char path[4096];
  snprintf(path, sizeof path, "%s/../gguf/llama.Q4_1.gguf", model_dir);
  ember_model *gguf = NULL;
  CHECK_STATUS(ember_model_load(path, NULL, &gguf), EMBER_OK);
  CHECK(strcmp(ember_model_architecture(gguf), "llama") == 0);
  CHECK(ember_model_n_vocab(gguf) == 320 && ember_model_has_chat_template(gguf));
  int32_t a[16], b[16];
  size_t na = 0, nb = 0;
  CHECK_STATUS(ember_tokenize(model, "Hello <|im_end|>", 16, false, true, a, 16, &na), EMBER_OK);
  CHECK_STATUS(ember_tokenize(gguf, "Hello <|im_end|>", 16, false, true, b, 16, &nb), EMBER_OK);
  CHECK(na == nb && memcmp(a, b, na * sizeof a[0]) == 0);

  /* Quantized at load: close to the F32 logits, but not equal. */
  ember_model_params params;
  EMBER_MODEL_PARAMS_DEFAULT(&params);
  CHECK(params.quantize_q8_0 == 0);
  params.quantize_q8_0 = 1;
  ember_model *q8 = NULL;
  CHECK_STATUS(ember_model_load(model_dir, &params, &q8), EMBER_OK);
  ember_session *s1 = NULL, *s2 = NULL;
  CHECK_STATUS(ember_session_new(model, NULL, &s1), EMBER_OK);
  CHECK_STATUS(ember_session_new(q8, NULL, &s2), EMBER_OK);
  static float l1[320], l2[320];
  CHECK_STATUS(ember_step(s1, a, na, l1), EMBER_OK);
  CHECK_STATUS(ember_step(s2, a, na, l2), EMBER_OK);
  float worst = 0.0f;
  for (int i = 0; i < 320; i++) {
    float d = l1[i] > l2[i] ? l1[i] - l2[i] : l2[i] - l1[i];
    if (d > worst) worst = d;
  }
  CHECK(worst > 0.0f && worst < 0.2f);
  ember_session_free(s1);
  ember_session_free(s2);
  ember_model_free(q8);
  ember_model_free(gguf);

  /* A truncated GGUF file. */
  snprintf(path, sizeof path, "%s/cut.gguf", scratch_dir);
  char cmd[8192];
  snprintf(cmd, sizeof cmd, "head -c 5000 '%s/../gguf/llama.Q4_1.gguf' > '%s'", model_dir, path);
  CHECK(system(cmd) == 0);
  CHECK_STATUS(ember_model_load(path, NULL, &gguf), EMBER_ERR_BAD_FORMAT);
  CHECK(strstr(ember_last_error(), "cut.gguf") != NULL);
}

static void test_tokenize(void) {
  int32_t ids[64];
  size_t n = 0;
  const char *text = "Hello world";
  CHECK_STATUS(ember_tokenize(model, text, strlen(text), false, false, ids, 64, &n), EMBER_OK);
  CHECK(n > 0 && n < 12);
  /* Too small: nothing written, size needed reported. */
  int32_t small[2] = {-7, -7};
  size_t needed = 0;
  CHECK_STATUS(ember_tokenize(model, text, strlen(text), false, false, small, 1, &needed), EMBER_ERR_BUFFER_TOO_SMALL);
  CHECK(needed == n && small[0] == -7);
  CHECK_STATUS(ember_tokenize(model, text, strlen(text), false, false, NULL, 0, &needed), EMBER_ERR_BUFFER_TOO_SMALL);
  /* Empty text, NULL pointers, invalid UTF-8. */
  CHECK_STATUS(ember_tokenize(model, NULL, 0, false, false, ids, 64, &n), EMBER_OK);
  CHECK(n == 0);
  CHECK_STATUS(ember_tokenize(model, NULL, 3, false, false, ids, 64, &n), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_tokenize(NULL, text, 3, false, false, ids, 64, &n), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_tokenize(model, text, 3, false, false, ids, 64, NULL), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_tokenize(model, "a\xc3", 2, false, false, ids, 64, &n), EMBER_ERR_INVALID_ARGUMENT);
  CHECK(strstr(ember_last_error(), "UTF-8") != NULL);
  /* Control tokens only when asked for. */
  const char *inject = "<|im_start|>";
  CHECK_STATUS(ember_tokenize(model, inject, strlen(inject), false, true, ids, 64, &n), EMBER_OK);
  CHECK(n == 1 && ids[0] == 1);
  CHECK_STATUS(ember_tokenize(model, inject, strlen(inject), false, false, ids, 64, &n), EMBER_OK);
  CHECK(n > 1);
  for (size_t i = 0; i < n; i++) CHECK(ids[i] != 1);

  /* Round trip through detokenize. */
  const char *utf8 = "h\xc3\xa9llo \xf0\x9f\x98\x80 world";
  CHECK_STATUS(ember_tokenize(model, utf8, strlen(utf8), false, false, ids, 64, &n), EMBER_OK);
  char out[256];
  size_t len = 0;
  CHECK_STATUS(ember_detokenize(model, ids, n, out, sizeof out, &len), EMBER_OK);
  CHECK(len == strlen(utf8) && strcmp(out, utf8) == 0);
  char tiny[4] = "xyz";
  CHECK_STATUS(ember_detokenize(model, ids, n, tiny, sizeof tiny, &len), EMBER_ERR_BUFFER_TOO_SMALL);
  CHECK(len == strlen(utf8) + 1 && strcmp(tiny, "xyz") == 0);
  int32_t bad[2] = {5, 320};
  CHECK_STATUS(ember_detokenize(model, bad, 2, out, sizeof out, &len), EMBER_ERR_INVALID_ARGUMENT);
  bad[1] = -1;
  CHECK_STATUS(ember_detokenize(model, bad, 2, out, sizeof out, &len), EMBER_ERR_INVALID_ARGUMENT);

  /* Chat template. */
  ember_chat_message msgs[2] = {{"system", "Be brief."}, {"user", "Hi!"}};
  CHECK_STATUS(ember_chat_apply(model, msgs, 2, true, out, sizeof out, &len), EMBER_OK);
  CHECK(strcmp(out, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n") == 0);
  ember_chat_message broken[1] = {{"user", NULL}};
  CHECK_STATUS(ember_chat_apply(model, broken, 1, true, out, sizeof out, &len), EMBER_ERR_INVALID_ARGUMENT);
}

static void test_session(void) {
  ember_session *s = NULL;
  CHECK_STATUS(ember_session_new(NULL, NULL, &s), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_session_new(model, NULL, NULL), EMBER_ERR_INVALID_ARGUMENT);
  ember_session_params p;
  CHECK_STATUS(EMBER_SESSION_PARAMS_DEFAULT(&p), EMBER_OK);
  p.n_ctx = 100000;
  CHECK_STATUS(ember_session_new(model, &p, &s), EMBER_ERR_INVALID_ARGUMENT);
  /* Old-size params: struct_size and n_ctx only; threads and batch take defaults. */
  struct { uint32_t struct_size; uint32_t n_ctx; } old = {sizeof old, 16};
  CHECK_STATUS(ember_session_new(model, (const ember_session_params *)&old, &s), EMBER_OK);
  CHECK(ember_session_n_ctx(s) == 16);
  CHECK(ember_session_position(s) == 0);

  size_t vocab = ember_model_n_vocab(model);
  float *logits = malloc(vocab * sizeof *logits);
  int32_t prompt[10] = {10, 20, 30, 40, 50, 60, 70, 80, 90, 100};
  CHECK_STATUS(ember_step(s, prompt, 10, logits), EMBER_OK);
  CHECK(ember_session_position(s) == 10);
  int32_t bad[2] = {1, 320};
  CHECK_STATUS(ember_step(s, bad, 2, logits), EMBER_ERR_INVALID_ARGUMENT);
  bad[1] = -5;
  CHECK_STATUS(ember_step(s, bad, 2, logits), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_step(s, NULL, 2, logits), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_step(s, prompt, 0, logits), EMBER_ERR_INVALID_ARGUMENT);
  CHECK(ember_session_position(s) == 10);
  /* Context overflow, then continued use. */
  CHECK_STATUS(ember_step(s, prompt, 7, logits), EMBER_ERR_CONTEXT_FULL);
  CHECK(ember_session_position(s) == 10);
  CHECK_STATUS(ember_step(s, prompt, 6, NULL), EMBER_OK);
  CHECK(ember_session_position(s) == 16);
  CHECK_STATUS(ember_session_rewind(s, 17), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_session_rewind(s, 10), EMBER_OK);
  CHECK(ember_session_position(s) == 10);
  CHECK_STATUS(ember_session_reset(s), EMBER_OK);
  CHECK(ember_session_position(s) == 0);

  /* All-position logits: the last row equals ember_step's logits. */
  float *all = malloc(4 * vocab * sizeof *all);
  CHECK_STATUS(ember_step_all(s, prompt, 4, all, 4 * vocab - 1), EMBER_ERR_BUFFER_TOO_SMALL);
  CHECK(ember_session_position(s) == 0);
  CHECK_STATUS(ember_step_all(s, prompt, 4, all, 4 * vocab), EMBER_OK);
  ember_session *s2 = new_session(16, 1);
  CHECK_STATUS(ember_step(s2, prompt, 4, logits), EMBER_OK);
  CHECK(memcmp(all + 3 * vocab, logits, vocab * sizeof *logits) == 0);
  ember_session_free(s2);

  CHECK_STATUS(ember_session_reset(NULL), EMBER_ERR_INVALID_ARGUMENT);
  CHECK(ember_session_position(NULL) == 0);
  free(all);
  free(logits);
  ember_session_free(s);
  ember_session_free(NULL);
}

static void test_state_and_fork(void) {
  size_t vocab = ember_model_n_vocab(model);
  float *a = malloc(vocab * sizeof *a), *b = malloc(vocab * sizeof *b);
  int32_t prompt[6] = {1, 20, 30, 40, 50, 60};
  ember_session *s = new_session(64, 1);
  CHECK_STATUS(ember_step(s, prompt, 6, NULL), EMBER_OK);

  /* Save: size, too small a buffer, then the bytes. */
  size_t size = 0, n = 0;
  CHECK_STATUS(ember_session_state_size(s, NULL), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_session_state_size(NULL, &size), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_session_state_size(s, &size), EMBER_OK);
  unsigned char *state = malloc(size);
  CHECK_STATUS(ember_session_state_save(s, state, size - 1, &n), EMBER_ERR_BUFFER_TOO_SMALL);
  CHECK(n == size);
  CHECK_STATUS(ember_session_state_save(s, NULL, size, &n), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_session_state_save(s, state, size, NULL), EMBER_ERR_INVALID_ARGUMENT);
  n = 0;
  CHECK_STATUS(ember_session_state_save(s, state, size, &n), EMBER_OK);
  CHECK(n == size && memcmp(state, "EMBERSES", 8) == 0);

  /* Load into a session of another size and thread count; continue bitwise. */
  ember_session *r = new_session(32, 2);
  int32_t other[2] = {7, 8};
  CHECK_STATUS(ember_step(r, other, 2, NULL), EMBER_OK);
  CHECK_STATUS(ember_session_state_load(r, state, size - 1), EMBER_ERR_BAD_FORMAT);
  CHECK_STATUS(ember_session_state_load(r, NULL, size), EMBER_ERR_INVALID_ARGUMENT);
  state[size / 2] ^= 1;
  CHECK_STATUS(ember_session_state_load(r, state, size), EMBER_ERR_BAD_FORMAT);
  state[size / 2] ^= 1;
  CHECK(ember_session_position(r) == 2);
  ember_session *tiny = new_session(4, 1);
  CHECK_STATUS(ember_session_state_load(tiny, state, size), EMBER_ERR_CONTEXT_FULL);
  ember_session_free(tiny);
  CHECK_STATUS(ember_session_state_load(r, state, size), EMBER_OK);
  CHECK(ember_session_position(r) == 6);
  CHECK_STATUS(ember_session_logits(r, a, vocab - 1), EMBER_ERR_BUFFER_TOO_SMALL);
  CHECK_STATUS(ember_session_logits(r, NULL, vocab), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_session_logits(r, a, vocab), EMBER_OK);
  CHECK_STATUS(ember_session_logits(s, b, vocab), EMBER_OK);
  CHECK(memcmp(a, b, vocab * sizeof *a) == 0);
  int32_t next = (int32_t)argmax(a, vocab);
  CHECK_STATUS(ember_step(r, &next, 1, a), EMBER_OK);
  CHECK_STATUS(ember_step(s, &next, 1, b), EMBER_OK);
  CHECK(memcmp(a, b, vocab * sizeof *a) == 0);
  /* A state of another model is refused. */
  char path[4096];
  snprintf(path, sizeof path, "%s/../gguf/llama.Q4_0.gguf", model_dir);
  ember_model *q4 = NULL;
  CHECK_STATUS(ember_model_load(path, NULL, &q4), EMBER_OK);
  ember_session *q = NULL;
  CHECK_STATUS(ember_session_new(q4, NULL, &q), EMBER_OK);
  CHECK_STATUS(ember_session_state_load(q, state, size), EMBER_ERR_INVALID_ARGUMENT);
  CHECK(strstr(ember_last_error(), "another model") != NULL);
  CHECK_STATUS(ember_session_copy_prefix(q, s, 2), EMBER_ERR_INVALID_ARGUMENT);

  /* Fork and copy_prefix. */
  ember_session *f = NULL;
  CHECK_STATUS(ember_session_fork(NULL, NULL, &f), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_session_fork(s, NULL, NULL), EMBER_ERR_INVALID_ARGUMENT);
  ember_session_params p;
  CHECK_STATUS(EMBER_SESSION_PARAMS_DEFAULT(&p), EMBER_OK);
  p.n_ctx = 4;
  CHECK_STATUS(ember_session_fork(s, &p, &f), EMBER_ERR_CONTEXT_FULL);
  CHECK_STATUS(ember_session_fork(s, NULL, &f), EMBER_OK);
  CHECK(ember_session_position(f) == 7 && ember_session_n_ctx(f) == 64);
  CHECK_STATUS(ember_session_logits(f, a, vocab), EMBER_OK);
  CHECK_STATUS(ember_session_copy_prefix(f, f, 1), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_session_copy_prefix(f, s, 8), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_session_copy_prefix(f, NULL, 1), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_session_copy_prefix(f, s, 3), EMBER_OK);
  CHECK(ember_session_position(f) == 3);
  CHECK_STATUS(ember_session_logits(f, a, vocab), EMBER_ERR_INVALID_ARGUMENT);

  /* Perf, in an old caller's smaller struct too. */
  ember_perf perf;
  CHECK_STATUS(EMBER_SESSION_PERF(s, &perf), EMBER_OK);
  CHECK(perf.struct_size == sizeof perf && perf.total_prompt_tokens == 6);
  CHECK(perf.total_generated_tokens == 1 && perf.last_generated_tokens == 1);
  CHECK(perf.total_prompt_ms > 0);
  struct { uint32_t struct_size; uint64_t last_prompt_tokens; } small;
  memset(&small, 0, sizeof small);
  CHECK_STATUS(ember_session_perf(s, sizeof small, (ember_perf *)&small), EMBER_OK);
  CHECK(small.struct_size == sizeof small && small.last_prompt_tokens == 0);
  CHECK_STATUS(ember_session_perf(s, 2, &perf), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_session_perf(s, sizeof perf, NULL), EMBER_ERR_INVALID_ARGUMENT);

  /* Memory estimate. */
  size_t bytes16 = 0, bytes64 = 0;
  p.n_ctx = 16;
  CHECK_STATUS(ember_session_memory_estimate(model, &p, &bytes16), EMBER_OK);
  p.n_ctx = 64;
  CHECK_STATUS(ember_session_memory_estimate(model, &p, &bytes64), EMBER_OK);
  CHECK(bytes16 > 0 && bytes64 > bytes16);
  p.n_ctx = 100000;
  CHECK_STATUS(ember_session_memory_estimate(model, &p, &bytes16), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_session_memory_estimate(NULL, NULL, &bytes16), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_session_memory_estimate(model, NULL, NULL), EMBER_ERR_INVALID_ARGUMENT);

  /* An f16 cache: half the cache's memory; its states and forks keep the type. */
  size_t f32_64 = 0, f16_64 = 0, f16_128 = 0, f32_128 = 0;
  p.n_ctx = 64;
  CHECK_STATUS(ember_session_memory_estimate(model, &p, &f32_64), EMBER_OK);
  p.kv_type = EMBER_KV_F16;
  CHECK_STATUS(ember_session_memory_estimate(model, &p, &f16_64), EMBER_OK);
  p.n_ctx = 128;
  CHECK_STATUS(ember_session_memory_estimate(model, &p, &f16_128), EMBER_OK);
  p.kv_type = EMBER_KV_F32;
  CHECK_STATUS(ember_session_memory_estimate(model, &p, &f32_128), EMBER_OK);
  CHECK(f16_64 < f32_64 && f32_128 - f16_128 == 2 * (f32_64 - f16_64));
  p.kv_type = 7;
  CHECK_STATUS(ember_session_memory_estimate(model, &p, &bytes16), EMBER_ERR_INVALID_ARGUMENT);
  CHECK(strstr(ember_last_error(), "kv_type 7") != NULL);
  ember_session *h = NULL;
  CHECK_STATUS(ember_session_new(model, &p, &h), EMBER_ERR_INVALID_ARGUMENT);
  CHECK(h == NULL);
  p.kv_type = EMBER_KV_F16;
  p.n_ctx = 64;
  CHECK_STATUS(ember_session_new(model, &p, &h), EMBER_OK);
  /* s (f32) cannot move its cache into h (f16): state, copy and fork all say so. */
  CHECK_STATUS(ember_session_state_load(h, state, size), EMBER_ERR_INVALID_ARGUMENT);
  CHECK(strstr(ember_last_error(), "cache types must match") != NULL);
  CHECK_STATUS(ember_session_copy_prefix(h, s, 2), EMBER_ERR_INVALID_ARGUMENT);
  ember_session *hf = NULL;
  CHECK_STATUS(ember_session_fork(s, &p, &hf), EMBER_ERR_INVALID_ARGUMENT);
  CHECK(hf == NULL && ember_session_position(h) == 0);
  CHECK_STATUS(ember_step(h, prompt, 6, a), EMBER_OK);
  CHECK_STATUS(ember_session_fork(h, NULL, &hf), EMBER_OK);
  CHECK_STATUS(ember_session_logits(hf, b, vocab), EMBER_OK);
  CHECK(memcmp(a, b, vocab * sizeof *a) == 0);
  ember_session_free(hf);
  ember_session_free(h);
  p.kv_type = EMBER_KV_F32;

  /* A GGUF from memory and from inside a larger file. */
  size_t len = 0;
  unsigned char *file = read_file(path, &len);
  ember_model *m = NULL;
  CHECK_STATUS(ember_model_load_from_memory(NULL, len, NULL, &m), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_model_load_from_memory(file, len, NULL, NULL), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_model_load_from_memory(file, len / 2, NULL, &m), EMBER_ERR_BAD_FORMAT);
  CHECK_STATUS(ember_model_load_from_memory(file, len, NULL, &m), EMBER_OK);
  ember_session *ms = NULL;
  CHECK_STATUS(ember_session_new(m, NULL, &ms), EMBER_OK);
  CHECK_STATUS(ember_step(ms, prompt, 3, a), EMBER_OK);
  CHECK_STATUS(ember_step(q, prompt, 3, b), EMBER_OK);
  CHECK(memcmp(a, b, vocab * sizeof *a) == 0);
  ember_session_free(ms);
  ember_model_free(m);
  char packed[4096];
  snprintf(packed, sizeof packed, "%s/packed.bin", scratch_dir);
  unsigned char *joined = malloc(len + 100);
  memset(joined, 'x', 100);
  memcpy(joined + 100, file, len);
  write_file(packed, joined, len + 100);
  FILE *fp = fopen(packed, "rb");
  int fd = fileno(fp);
  CHECK_STATUS(ember_model_load_fd(-1, 0, 0, NULL, &m), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_model_load_fd(fd, 100, len + 1, NULL, &m), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_model_load_fd(fd, 100, 0, NULL, NULL), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_model_load_fd(fd, 100, 0, NULL, &m), EMBER_OK);
  fclose(fp); /* the model keeps its own mapping */
  CHECK_STATUS(ember_session_new(m, NULL, &ms), EMBER_OK);
  CHECK_STATUS(ember_step(ms, prompt, 3, a), EMBER_OK);
  CHECK(memcmp(a, b, vocab * sizeof *a) == 0);
  ember_session_free(ms);
  ember_model_free(m);
  free(joined);
  free(file);

  ember_session_free(f);
  ember_session_free(q);
  ember_model_free(q4);
  ember_session_free(r);
  ember_session_free(s);
  free(state);
  free(a);
  free(b);
}

static void sleep_us(long us);

/* Polls a background generation from a "frame loop" until it finishes. */
static size_t poll_all(ember_generation *g, char *text, size_t cap, int *frames) {
  size_t len = 0;
  ember_generation_state state = EMBER_GENERATION_RUNNING;
  while (state != EMBER_GENERATION_FINISHED) {
    size_t n = 0;
    char piece[8]; /* small on purpose: text comes out in several polls */
    CHECK_STATUS(ember_generation_poll(g, piece, sizeof piece, &n, &state), EMBER_OK);
    CHECK(n < sizeof piece && piece[n] == 0);
    if (len + n < cap) {
      memcpy(text + len, piece, n);
      len += n;
    }
    if (n == 0 && state == EMBER_GENERATION_RUNNING)
      CHECK_STATUS(ember_generation_wait(g, 1, NULL), EMBER_OK);
    (*frames)++;
  }
  text[len] = 0;
  return len;
}

static void test_generation(void) {
  ember_session *s = new_session(64, 2);
  ember_sampler *greedy = NULL;
  CHECK_STATUS(ember_sampler_new(NULL, &greedy), EMBER_OK);
  ember_generate_params gp;
  CHECK_STATUS(EMBER_GENERATE_PARAMS_DEFAULT(&gp), EMBER_OK);
  gp.max_tokens = 12;
  gp.ignore_end_tokens = 1;
  gp.logprobs = 1;
  const char *prompt = "Once upon a time";
  struct text_buffer b = {0};
  ember_stop_reason reason = EMBER_STOP_REASON_END_TOKEN;
  size_t n = 0;
  CHECK_STATUS(ember_generate(s, greedy, prompt, strlen(prompt), &gp, collect, &b, &reason, &n), EMBER_OK);

  /* The same text, polled from a background generation. */
  ember_session *t = new_session(64, 2);
  ember_generation_prompt p;
  memset(&p, 0, sizeof p);
  p.struct_size = sizeof p;
  p.text = prompt;
  p.text_len = strlen(prompt);
  ember_generation *g = NULL;
  /* Paced one piece ahead of the polls: until the first poll it holds the session. */
  gp.max_ahead = 1;
  CHECK_STATUS(ember_generation_start(t, greedy, &p, &gp, &g), EMBER_OK);
  /* The session and the sampler belong to the generation until it is finished. */
  int32_t one = 5;
  ember_status busy = ember_step(t, &one, 1, NULL);
  CHECK(busy == EMBER_ERR_BUSY);
  CHECK_STATUS(ember_sample(greedy, (const float[]){1, 2}, 2, &one), EMBER_ERR_BUSY);
  ember_generation *second = NULL;
  CHECK_STATUS(ember_generation_start(t, greedy, &p, &gp, &second), EMBER_ERR_BUSY);
  CHECK(second == NULL);
  /* Freeing them meanwhile is refused (a warning), not a use after free. */
  ember_session_free(t);
  ember_sampler_free(greedy);
  gp.max_ahead = 0;
  char text[1024];
  int frames = 0;
  size_t len = poll_all(g, text, sizeof text, &frames);
  CHECK(len == b.len && memcmp(text, b.data, len) == 0);
  CHECK(frames > 1);
  size_t done = 0, total = 0;
  CHECK_STATUS(ember_generation_progress(g, &done, &total), EMBER_OK);
  CHECK(done == total && total > 0);
  ember_token_info infos[32];
  size_t n_infos = 0;
  CHECK_STATUS(ember_generation_poll_tokens(g, infos, 5, &n_infos), EMBER_OK);
  CHECK(n_infos == 5);
  size_t more = 0;
  CHECK_STATUS(ember_generation_poll_tokens(g, infos + 5, 27, &more), EMBER_OK);
  CHECK(n_infos + more == 12);
  for (size_t i = 0; i < 12; i++) CHECK(infos[i].logprob <= 0 && infos[i].logprob > -100);
  CHECK_STATUS(ember_generation_finish(g, &reason, &n), EMBER_OK);
  CHECK(reason == EMBER_STOP_REASON_MAX_TOKENS && n == 12);
  int32_t held[128];
  size_t n_held = 0;
  CHECK_STATUS(ember_session_tokens(t, held, 128, &n_held), EMBER_OK);
  CHECK(n_held == ember_session_position(s));
  CHECK(n_held >= 12 && held[n_held - 12] == infos[0].token);
  /* Continue from the pending token with an empty prompt, then chat, then tokens. */
  CHECK_STATUS(ember_generation_start(t, greedy, NULL, &gp, &g), EMBER_OK);
  CHECK_STATUS(ember_generation_finish(g, &reason, &n), EMBER_OK);
  CHECK(n == 12 && ember_session_position(t) == n_held + 12);
  /* The same tokens with four alternatives each (greedy: the first is the token itself). */
  gp.top_logprobs = 21;
  CHECK_STATUS(ember_generation_start(t, greedy, &p, &gp, &g), EMBER_ERR_INVALID_ARGUMENT);
  gp.top_logprobs = 4;
  gp.logprobs = 0;
  CHECK_STATUS(ember_generation_start(t, greedy, &p, &gp, &g), EMBER_ERR_INVALID_ARGUMENT);
  gp.logprobs = 1;
  CHECK_STATUS(ember_session_reset(t), EMBER_OK);
  CHECK_STATUS(ember_generation_start(t, greedy, &p, &gp, &g), EMBER_OK);
  poll_all(g, text, sizeof text, &frames);
  ember_token_info ranked[12], top[12 * 4];
  size_t n_ranked = 0, n_rest = 0;
  CHECK_STATUS(ember_generation_poll_tokens_top(g, ranked, 12, NULL, 8, &n_ranked),
               EMBER_ERR_INVALID_ARGUMENT);
  /* Room for the alternatives of 2 tokens only: 2 are copied. */
  CHECK_STATUS(ember_generation_poll_tokens_top(g, ranked, 12, top, 9, &n_ranked), EMBER_OK);
  CHECK(n_ranked == 2);
  CHECK_STATUS(ember_generation_poll_tokens_top(g, ranked + 2, 10, top + 8, 40, &n_rest),
               EMBER_OK);
  CHECK(n_ranked + n_rest == 12);
  for (size_t i = 0; i < 12; i++) {
    CHECK(ranked[i].token == infos[i].token && ranked[i].logprob == infos[i].logprob);
    CHECK(top[4 * i].token == ranked[i].token && top[4 * i].logprob == ranked[i].logprob);
    for (size_t j = 1; j < 4; j++) CHECK(top[4 * i + j].logprob <= top[4 * i + j - 1].logprob);
  }
  CHECK_STATUS(ember_generation_finish(g, &reason, &n), EMBER_OK);
  gp.top_logprobs = 0;
  ember_chat_message chat[1] = {{"user", "Hi"}};
  memset(&p, 0, sizeof p);
  p.struct_size = sizeof p;
  p.messages = chat;
  p.n_messages = 1;
  CHECK_STATUS(ember_generation_start(t, greedy, &p, &gp, &g), EMBER_OK);
  frames = 0;
  poll_all(g, text, sizeof text, &frames);
  CHECK_STATUS(ember_generation_finish(g, &reason, &n), EMBER_OK);
  CHECK(n == 12);

  /* Errors are reported by start, synchronously, and leave the session usable. */
  int32_t bad[2] = {1, 320};
  memset(&p, 0, sizeof p);
  p.struct_size = sizeof p;
  p.tokens = bad;
  p.n_tokens = 2;
  g = NULL;
  CHECK_STATUS(ember_generation_start(t, greedy, &p, &gp, &g), EMBER_ERR_INVALID_ARGUMENT);
  CHECK(g == NULL);
  p.text = prompt;
  p.text_len = 3;
  CHECK_STATUS(ember_generation_start(t, greedy, &p, &gp, &g), EMBER_ERR_INVALID_ARGUMENT);
  p.text_len = 0;
  p.n_tokens = 1;
  CHECK_STATUS(ember_generation_start(NULL, greedy, &p, &gp, &g), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_generation_start(t, NULL, &p, &gp, &g), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_generation_start(t, greedy, &p, &gp, NULL), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_generation_finish(NULL, NULL, NULL), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_generation_poll(NULL, text, 8, &n, NULL), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_generation_cancel(NULL), EMBER_ERR_INVALID_ARGUMENT);
  /* A prompt that does not fit is refused at once too. */
  int32_t many[80];
  for (int i = 0; i < 80; i++) many[i] = 10 + i;
  p.tokens = many;
  p.n_tokens = 80;
  CHECK_STATUS(ember_session_reset(t), EMBER_OK);
  CHECK_STATUS(ember_generation_start(t, greedy, &p, &gp, &g), EMBER_ERR_CONTEXT_FULL);
  CHECK(g == NULL && ember_session_position(t) == 0);
  /* An error during the generation (an invalid bias token for this vocabulary) ends it;
     finish reports it and the session keeps what it had. */
  ember_sampler_params sp;
  CHECK_STATUS(EMBER_SAMPLER_PARAMS_DEFAULT(&sp), EMBER_OK);
  ember_logit_bias far = {400, 1.0f};
  sp.logit_bias = &far;
  sp.n_logit_bias = 1;
  ember_sampler *biased = NULL;
  CHECK_STATUS(ember_sampler_new(&sp, &biased), EMBER_OK);
  p.n_tokens = 3;
  CHECK_STATUS(ember_generation_start(t, biased, &p, &gp, &g), EMBER_OK);
  CHECK_STATUS(ember_generation_finish(g, &reason, &n), EMBER_ERR_INVALID_ARGUMENT);
  CHECK(strstr(ember_last_error(), "outside the vocabulary") != NULL);
  ember_sampler_free(biased);
  CHECK(ember_session_position(t) == 3);
  CHECK_STATUS(ember_session_reset(t), EMBER_OK);
  CHECK_STATUS(ember_step(t, many, 3, NULL), EMBER_OK);

  /* Cancel at once (before the worker has started), and cancel mid-way. */
  gp.max_tokens = 0;
  p.n_tokens = 3;
  for (int round = 0; round < 20; round++) {
    CHECK_STATUS(ember_session_reset(t), EMBER_OK);
    CHECK_STATUS(ember_generation_start(t, greedy, &p, &gp, &g), EMBER_OK);
    if (round % 2) sleep_us(2000);
    CHECK_STATUS(ember_generation_cancel(g), EMBER_OK);
    ember_status st = ember_generation_finish(g, &reason, &n);
    bool cancelled = st == EMBER_ERR_CANCELLED && reason == EMBER_STOP_REASON_CANCELLED;
    /* The generation runs as soon as it starts: it may fill the context before the cancel
       (under valgrind's scheduler it often does). */
    CHECK(cancelled || (st == EMBER_OK && reason == EMBER_STOP_REASON_CONTEXT_FULL));
    CHECK(ember_session_position(t) == (n == 0 ? 0 : 3 + n));
  }
  /* A finish without polling drops the text; the session and sampler are free again. */
  CHECK_STATUS(ember_session_reset(t), EMBER_OK);
  gp.max_tokens = 4;
  CHECK_STATUS(ember_generation_start(t, greedy, &p, &gp, &g), EMBER_OK);
  CHECK_STATUS(ember_generation_finish(g, NULL, NULL), EMBER_OK);
  CHECK_STATUS(ember_step(t, &one, 1, NULL), EMBER_OK);
  /* Paced one piece ahead and never polled, finish still completes it (it used to wait for
     a poll forever); a host that polls only tokens is paced by those polls. */
  gp.max_ahead = 1;
  gp.max_tokens = 5;
  CHECK_STATUS(ember_session_reset(t), EMBER_OK);
  CHECK_STATUS(ember_generation_start(t, greedy, &p, &gp, &g), EMBER_OK);
  CHECK_STATUS(ember_generation_finish(g, &reason, &n), EMBER_OK);
  CHECK(reason == EMBER_STOP_REASON_MAX_TOKENS && n == 5);
  CHECK_STATUS(ember_session_reset(t), EMBER_OK);
  CHECK_STATUS(ember_generation_start(t, greedy, &p, &gp, &g), EMBER_OK);
  size_t got = 0;
  for (int spins = 0; got < 5 && spins < 100000; spins++) {
    size_t k = 0;
    CHECK_STATUS(ember_generation_poll_tokens(g, infos, 32, &k), EMBER_OK);
    got += k;
    if (k == 0) sleep_us(100);
  }
  CHECK(got == 5);
  size_t pdone = 7, ptotal = 7;
  CHECK_STATUS(ember_generation_progress(g, NULL, &ptotal), EMBER_ERR_INVALID_ARGUMENT);
  CHECK(ptotal == 7); /* outputs untouched on failure */
  CHECK_STATUS(ember_generation_progress(g, &pdone, &ptotal), EMBER_OK);
  CHECK_STATUS(ember_generation_finish(g, &reason, &n), EMBER_OK);
  CHECK(n == 5 && ember_session_position(t) == 3 + 5);
  gp.max_ahead = 0;
  ember_sampler_free(greedy);
  ember_session_free(t);
  ember_session_free(s);
}

static void test_sampler(void) {
  ember_sampler_params p;
  CHECK_STATUS(EMBER_SAMPLER_PARAMS_DEFAULT(&p), EMBER_OK);
  CHECK(p.temperature == 0.0f && p.top_p == 1.0f);
  ember_sampler *greedy = NULL;
  CHECK_STATUS(ember_sampler_new(&p, &greedy), EMBER_OK);
  float logits[5] = {0.5f, 2.0f, -1.0f, 1.9f, 0.0f};
  int32_t t = -1;
  CHECK_STATUS(ember_sample(greedy, logits, 5, &t), EMBER_OK);
  CHECK(t == 1);
  CHECK_STATUS(ember_sample(greedy, NULL, 5, &t), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_sample(greedy, logits, 5, NULL), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_sampler_accept(greedy, -1), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_sampler_reset(greedy), EMBER_OK);
  ember_sampler_free(greedy);

  p.temperature = -1.0f;
  ember_sampler *s = NULL;
  CHECK_STATUS(ember_sampler_new(&p, &s), EMBER_ERR_INVALID_ARGUMENT);
  CHECK(s == NULL);
  p.temperature = 1.0f;
  p.seed = 1234;
  int32_t first[20], second[20];
  CHECK_STATUS(ember_sampler_new(&p, &s), EMBER_OK);
  for (int i = 0; i < 20; i++) CHECK_STATUS(ember_sample(s, logits, 5, &first[i]), EMBER_OK);
  ember_sampler_free(s);
  CHECK_STATUS(ember_sampler_new(&p, &s), EMBER_OK);
  for (int i = 0; i < 20; i++) CHECK_STATUS(ember_sample(s, logits, 5, &second[i]), EMBER_OK);
  CHECK(memcmp(first, second, sizeof first) == 0);
  ember_sampler_free(s);
  ember_sampler_free(NULL);

  /* Logit bias: ban the best token, boost another; bad entries are errors. */
  ember_sampler_params b;
  CHECK_STATUS(EMBER_SAMPLER_PARAMS_DEFAULT(&b), EMBER_OK);
  CHECK(b.logit_bias == NULL && b.n_logit_bias == 0);
  ember_logit_bias biases[2] = {{1, -INFINITY}, {4, 1.95f}};
  b.logit_bias = biases;
  b.n_logit_bias = 1;
  CHECK_STATUS(ember_sampler_new(&b, &s), EMBER_OK);
  CHECK_STATUS(ember_sample(s, logits, 5, &t), EMBER_OK);
  CHECK(t == 3);
  ember_sampler_free(s);
  b.n_logit_bias = 2;
  CHECK_STATUS(ember_sampler_new(&b, &s), EMBER_OK);
  biases[1].bias = 0; /* copied at creation: later changes do not matter */
  CHECK_STATUS(ember_sample(s, logits, 5, &t), EMBER_OK);
  CHECK(t == 4);
  CHECK_STATUS(ember_sample(s, logits, 4, &t), EMBER_ERR_INVALID_ARGUMENT); /* token 4 */
  ember_sampler_free(s);
  biases[0].token = -3;
  CHECK_STATUS(ember_sampler_new(&b, &s), EMBER_ERR_INVALID_ARGUMENT);
  biases[0].token = 1;
  biases[0].bias = NAN;
  CHECK_STATUS(ember_sampler_new(&b, &s), EMBER_ERR_INVALID_ARGUMENT);
  b.logit_bias = NULL;
  CHECK_STATUS(ember_sampler_new(&b, &s), EMBER_ERR_INVALID_ARGUMENT);

  /* A constraint: a regex over the model's vocabulary; bad ones leave the sampler as it was. */
  CHECK_STATUS(ember_sampler_new(NULL, &s), EMBER_OK);
  ember_constraint_state state = EMBER_CONSTRAINT_STATE_FINISHED;
  CHECK_STATUS(ember_sampler_constraint_state(s, &state), EMBER_OK);
  CHECK(state == EMBER_CONSTRAINT_STATE_NONE);
  const char *rx = "(yes|no)!";
  CHECK_STATUS(ember_sampler_set_constraint(s, model, 9, rx, strlen(rx)), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_sampler_set_constraint(s, NULL, EMBER_CONSTRAINT_REGEX, rx, strlen(rx)),
               EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_sampler_set_constraint(s, model, EMBER_CONSTRAINT_REGEX, NULL, 3),
               EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_sampler_set_constraint(s, model, EMBER_CONSTRAINT_REGEX, "(", 1),
               EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_sampler_set_constraint(s, model, EMBER_CONSTRAINT_JSON_SCHEMA, "{", 1),
               EMBER_ERR_INVALID_ARGUMENT);
  CHECK(strstr(ember_last_error(), "not JSON") != NULL);
  CHECK_STATUS(ember_sampler_constraint_state(s, &state), EMBER_OK);
  CHECK(state == EMBER_CONSTRAINT_STATE_NONE);
  CHECK_STATUS(ember_sampler_set_constraint(s, model, EMBER_CONSTRAINT_REGEX, rx, strlen(rx)),
               EMBER_OK);
  CHECK_STATUS(ember_sampler_constraint_state(s, &state), EMBER_OK);
  CHECK(state == EMBER_CONSTRAINT_STATE_INCOMPLETE);
  CHECK_STATUS(ember_sampler_constraint_state(s, NULL), EMBER_ERR_INVALID_ARGUMENT);
  ember_session *session = new_session(64, 1);
  struct text_buffer out = {0};
  ember_stop_reason reason = EMBER_STOP_REASON_END_TOKEN;
  size_t n = 0;
  const char *prompt = "Hello";
  CHECK_STATUS(ember_generate(session, s, prompt, strlen(prompt), NULL, collect, &out, &reason, &n),
               EMBER_OK);
  CHECK(reason == EMBER_STOP_REASON_CONSTRAINT_COMPLETE);
  CHECK((out.len == 4 && memcmp(out.data, "yes!", 4) == 0) ||
        (out.len == 3 && memcmp(out.data, "no!", 3) == 0));
  CHECK_STATUS(ember_sampler_constraint_state(s, &state), EMBER_OK);
  CHECK(state == EMBER_CONSTRAINT_STATE_FINISHED);
  /* Too few tokens: the reason says the output is incomplete. */
  const char *long_rx = "[a-z]{40}";
  CHECK_STATUS(ember_sampler_set_constraint(s, model, EMBER_CONSTRAINT_REGEX, long_rx,
                                            strlen(long_rx)), EMBER_OK);
  ember_generate_params gp;
  CHECK_STATUS(EMBER_GENERATE_PARAMS_DEFAULT(&gp), EMBER_OK);
  gp.max_tokens = 3;
  CHECK_STATUS(ember_session_reset(session), EMBER_OK);
  CHECK_STATUS(ember_generate(session, s, prompt, strlen(prompt), &gp, NULL, NULL, &reason, &n),
               EMBER_OK);
  CHECK(reason == EMBER_STOP_REASON_CONSTRAINT_INCOMPLETE && n == 3);
  /* GBNF, llama.cpp's grammar format. */
  const char *gbnf = "root ::= answer \"!\"\nanswer ::= \"yes\" | \"no\"\n";
  CHECK_STATUS(ember_sampler_set_constraint(s, model, EMBER_CONSTRAINT_GBNF, gbnf, strlen(gbnf)),
               EMBER_OK);
  memset(&out, 0, sizeof out);
  CHECK_STATUS(ember_session_reset(session), EMBER_OK);
  CHECK_STATUS(ember_generate(session, s, prompt, strlen(prompt), NULL, collect, &out, &reason, &n),
               EMBER_OK);
  CHECK(reason == EMBER_STOP_REASON_CONSTRAINT_COMPLETE);
  CHECK(strcmp(out.data, "yes!") == 0 || strcmp(out.data, "no!") == 0);
  const char *bad_gbnf = "root ::= nowhere\n";
  CHECK_STATUS(ember_sampler_set_constraint(s, model, EMBER_CONSTRAINT_GBNF, bad_gbnf,
                                            strlen(bad_gbnf)), EMBER_ERR_INVALID_ARGUMENT);
  CHECK(strstr(ember_last_error(), "nowhere") != NULL);
  CHECK_STATUS(ember_sampler_set_constraint(s, NULL, EMBER_CONSTRAINT_NONE, NULL, 0), EMBER_OK);
  CHECK_STATUS(ember_sampler_constraint_state(s, &state), EMBER_OK);
  CHECK(state == EMBER_CONSTRAINT_STATE_NONE);
  ember_session_free(session);
  ember_sampler_free(s);
}

/* A conversation as JSON with a tool and a template of its own that reads tools and names the
   <tool_call> format. */
static const char *TOOL_CONVERSATION =
    "{\"messages\": [{\"role\": \"user\", \"content\": \"Go north.\"}],"
    " \"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"go\", \"parameters\":"
    " {\"type\": \"object\", \"properties\": {\"to\": {\"enum\": [\"n\", \"s\"]}},"
    " \"required\": [\"to\"], \"additionalProperties\": false}}}],"
    " \"tool_choice\": \"required\","
    " \"chat_template\": \"{% for m in messages %}{{ m.role }}: {{ m.content }}\\n{% endfor %}"
    "{% if tools %}{{ tools | length }} tool, as <tool_call>\\n{% endif %}assistant: \"}";

static void test_tools(void) {
  char text[512];
  size_t n = 0;
  const size_t len = strlen(TOOL_CONVERSATION);
  CHECK_STATUS(ember_chat_apply_json(model, TOOL_CONVERSATION, len, true, text, sizeof text, &n),
               EMBER_OK);
  CHECK(strcmp(text, "user: Go north.\n1 tool, as <tool_call>\nassistant: ") == 0);
  CHECK_STATUS(ember_chat_apply_json(model, "{\"messages\": 1}", 15, true, text, sizeof text, &n),
               EMBER_ERR_INVALID_ARGUMENT);
  CHECK(strstr(ember_last_error(), "messages") != NULL);
  CHECK_STATUS(ember_chat_apply_json(model, NULL, 3, true, text, sizeof text, &n),
               EMBER_ERR_INVALID_ARGUMENT);

  /* Required: the reply is a call of the tool, whatever the sampler draws. */
  ember_session *session = new_session(128, 1);
  ember_sampler_params sp;
  CHECK_STATUS(EMBER_SAMPLER_PARAMS_DEFAULT(&sp), EMBER_OK);
  sp.temperature = 1.0f;
  ember_sampler *sampler = NULL;
  CHECK_STATUS(ember_sampler_new(&sp, &sampler), EMBER_OK);
  struct text_buffer out = {0};
  ember_stop_reason reason = EMBER_STOP_REASON_END_TOKEN;
  CHECK_STATUS(ember_chat_json(session, sampler, TOOL_CONVERSATION, len, NULL, collect, &out,
                               &reason, &n), EMBER_OK);
  CHECK(reason == EMBER_STOP_REASON_CONSTRAINT_COMPLETE);
  CHECK(strncmp(out.data, "<tool_call>\n{\"name\": \"go\", \"arguments\": {\"to\": \"", 48) == 0);
  char message[512];
  CHECK_STATUS(ember_chat_parse_reply(model, TOOL_CONVERSATION, len, out.data, out.len, message,
                                      sizeof message, &n), EMBER_OK);
  CHECK(strstr(message, "\"tool_calls\":[{\"type\":\"function\",\"function\":{\"name\":\"go\",\"arguments\":{\"to\":") != NULL);
  CHECK(strstr(message, "\"name\":\"go\"") != NULL);
  /* The sampler has no constraint of its own afterwards. */
  ember_constraint_state state = EMBER_CONSTRAINT_STATE_FINISHED;
  CHECK_STATUS(ember_sampler_constraint_state(sampler, &state), EMBER_OK);
  CHECK(state == EMBER_CONSTRAINT_STATE_NONE);
  /* A broken call is an error naming it; the model's own template reads no tools. */
  const char *broken = "<tool_call>\n{\"name\": 1}\n</tool_call>";
  CHECK_STATUS(ember_chat_parse_reply(model, TOOL_CONVERSATION, len, broken, strlen(broken),
                                      message, sizeof message, &n), EMBER_ERR_INVALID_ARGUMENT);
  CHECK(strstr(ember_last_error(), "tool call 1") != NULL);
  CHECK_STATUS(ember_chat_parse_reply(model, NULL, 0, broken, strlen(broken), message,
                                      sizeof message, &n), EMBER_OK);
  CHECK(strstr(message, "tool_calls") == NULL);

  /* The same in the background, from the prompt's conversation field. */
  ember_generation_prompt p;
  memset(&p, 0, sizeof p);
  p.struct_size = sizeof p;
  p.conversation = TOOL_CONVERSATION;
  p.conversation_len = len;
  ember_generation *g = NULL;
  CHECK_STATUS(ember_session_reset(session), EMBER_OK);
  CHECK_STATUS(ember_generation_start(session, sampler, &p, NULL, &g), EMBER_OK);
  size_t got = 0;
  ember_generation_state gs = EMBER_GENERATION_RUNNING;
  while (gs == EMBER_GENERATION_RUNNING && got + 1 < sizeof text) {
    CHECK_STATUS(ember_generation_wait(g, 1000, NULL), EMBER_OK);
    CHECK_STATUS(ember_generation_poll(g, text + got, sizeof text - got, &n, &gs), EMBER_OK);
    got += n;
  }
  CHECK(strncmp(text, "<tool_call>\n{\"name\": \"go\"", 25) == 0);
  CHECK_STATUS(ember_generation_finish(g, &reason, &n), EMBER_OK);
  CHECK(reason == EMBER_STOP_REASON_CONSTRAINT_COMPLETE);
  /* A conversation and messages at once are refused. */
  ember_chat_message hi = {"user", "hi"};
  p.messages = &hi;
  p.n_messages = 1;
  CHECK_STATUS(ember_generation_start(session, sampler, &p, NULL, &g), EMBER_ERR_INVALID_ARGUMENT);
  ember_sampler_free(sampler);
  ember_session_free(session);
}

static void test_generate(void) {
  ember_session *s = new_session(64, 2);
  ember_sampler *greedy = NULL;
  CHECK_STATUS(ember_sampler_new(NULL, &greedy), EMBER_OK);
  ember_generate_params gp;
  CHECK_STATUS(EMBER_GENERATE_PARAMS_DEFAULT(&gp), EMBER_OK);
  gp.max_tokens = 12;
  gp.ignore_end_tokens = 1;
  struct text_buffer b = {0};
  ember_stop_reason reason = EMBER_STOP_REASON_END_TOKEN;
  size_t n = 0;
  const char *prompt = "Once upon a time";
  CHECK_STATUS(ember_generate(s, greedy, prompt, strlen(prompt), &gp, collect, &b, &reason, &n), EMBER_OK);
  CHECK(reason == EMBER_STOP_REASON_MAX_TOKENS && n == 12);
  CHECK(b.len > 0);

  /* The same text comes from stepping and sampling by hand. */
  ember_session *s2 = new_session(64, 1);
  int32_t ids[64], gen[16];
  size_t n_ids = 0;
  CHECK_STATUS(ember_tokenize(model, prompt, strlen(prompt), true, false, ids, 64, &n_ids), EMBER_OK);
  size_t vocab = ember_model_n_vocab(model);
  float *logits = malloc(vocab * sizeof *logits);
  CHECK_STATUS(ember_step(s2, ids, n_ids, logits), EMBER_OK);
  for (int i = 0; i < 12; i++) {
    gen[i] = (int32_t)argmax(logits, vocab);
    CHECK_STATUS(ember_step(s2, &gen[i], 1, logits), EMBER_OK);
  }
  char text[1024];
  size_t len = 0;
  CHECK_STATUS(ember_detokenize(model, gen, 12, text, sizeof text, &len), EMBER_OK);
  CHECK(len == b.len && memcmp(text, b.data, len) == 0);
  free(logits);
  ember_session_free(s2);

  /* Stop strings and callbacks that stop. */
  if (b.len > 4) {
    char stop[3] = {b.data[b.len / 2], b.data[b.len / 2 + 1], 0};
    const char *stops[1] = {stop};
    if ((unsigned char)stop[0] < 0x80 && (unsigned char)stop[1] < 0x80) {
      gp.stop_strings = stops;
      gp.n_stop_strings = 1;
      struct text_buffer c = {0};
      CHECK_STATUS(ember_session_reset(s), EMBER_OK);
      CHECK_STATUS(ember_generate(s, greedy, prompt, strlen(prompt), &gp, collect, &c, &reason, &n), EMBER_OK);
      CHECK(reason == EMBER_STOP_REASON_STOP_STRING);
      CHECK(strstr(b.data, stop) == b.data + c.len && memcmp(b.data, c.data, c.len) == 0);
      gp.stop_strings = NULL;
      gp.n_stop_strings = 0;
    }
  }
  struct text_buffer d = {0};
  d.stop_after = 2;
  CHECK_STATUS(ember_session_reset(s), EMBER_OK);
  CHECK_STATUS(ember_generate(s, greedy, prompt, strlen(prompt), &gp, collect, &d, &reason, NULL), EMBER_OK);
  CHECK(reason == EMBER_STOP_REASON_CALLBACK && d.calls == 2);
  /* NULL callback and outputs are allowed. */
  CHECK_STATUS(ember_session_reset(s), EMBER_OK);
  CHECK_STATUS(ember_generate(s, greedy, prompt, strlen(prompt), NULL, NULL, NULL, NULL, NULL), EMBER_OK);
  CHECK_STATUS(ember_generate(s, NULL, prompt, strlen(prompt), NULL, NULL, NULL, NULL, NULL), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_generate(s, greedy, "\xff", 1, NULL, NULL, NULL, NULL, NULL), EMBER_ERR_INVALID_ARGUMENT);

  /* Chat keeps the conversation in the session. */
  CHECK_STATUS(ember_session_reset(s), EMBER_OK);
  ember_chat_message msgs[1] = {{"user", "Hello"}};
  struct text_buffer e = {0};
  gp.max_tokens = 6;
  CHECK_STATUS(ember_chat(s, greedy, msgs, 1, &gp, collect, &e, &reason, &n), EMBER_OK);
  CHECK(n == 6 && ember_session_position(s) > 6);
  ember_sampler_free(greedy);
  ember_session_free(s);
}

static void test_detokenizer(void) {
  const char *text = "caf\xc3\xa9 \xf0\x9f\x98\x80 \xe6\x97\xa5\xe6\x9c\xac end";
  int32_t ids[64];
  size_t n = 0;
  CHECK_STATUS(ember_tokenize(model, text, strlen(text), false, false, ids, 64, &n), EMBER_OK);
  ember_detokenizer *d = NULL;
  CHECK_STATUS(ember_detokenizer_new(model, &d), EMBER_OK);
  char joined[256] = {0}, piece[64];
  size_t len = 0, total = 0;
  for (size_t i = 0; i < n; i++) {
    /* A one-byte buffer holds an empty piece; for a longer one it is too small, and then the
     * token is not consumed: the call is repeated with room. */
    char one[1];
    ember_status st = ember_detokenizer_push(d, ids[i], one, sizeof one, &len);
    if (st == EMBER_ERR_BUFFER_TOO_SMALL) {
      CHECK(len > 1);
      CHECK_STATUS(ember_detokenizer_push(d, ids[i], piece, sizeof piece, &len), EMBER_OK);
    } else {
      CHECK(st == EMBER_OK && len == 0 && one[0] == 0);
      piece[0] = 0;
    }
    CHECK(strlen(piece) == len);
    memcpy(joined + total, piece, len);
    total += len;
  }
  CHECK_STATUS(ember_detokenizer_flush(d, piece, sizeof piece, &len), EMBER_OK);
  memcpy(joined + total, piece, len);
  total += len;
  joined[total] = 0;
  CHECK(strcmp(joined, text) == 0);
  CHECK_STATUS(ember_detokenizer_push(d, 320, piece, sizeof piece, &len), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_detokenizer_push(d, -3, piece, sizeof piece, &len), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_detokenizer_reset(d), EMBER_OK);
  ember_detokenizer_free(d);
  ember_detokenizer_free(NULL);
  CHECK_STATUS(ember_detokenizer_push(NULL, 1, piece, sizeof piece, &len), EMBER_ERR_INVALID_ARGUMENT);
}

/* ---- cancellation and threads ---- */

static void sleep_us(long us) {
  struct timespec t = {us / 1000000, (us % 1000000) * 1000};
  nanosleep(&t, NULL);
}

struct canceller {
  const ember_session *session;
  volatile int stop;
  int sent;
};

static void *cancel_repeatedly(void *arg) {
  struct canceller *c = arg;
  while (!c->stop) {
    ember_session_cancel(c->session);
    c->sent++;
    sleep_us(50 + (c->sent * 37) % 400);
  }
  return NULL;
}

struct cancel_probe {
  const ember_session *session;
  int calls;
};

static bool cancel_at_third_piece(const char *piece, size_t len, void *user) {
  (void)piece;
  (void)len;
  struct cancel_probe *c = user;
  if (++c->calls == 3) ember_session_cancel(c->session);
  return true;
}

static void test_cancel(void) {
  ember_session_params p;
  CHECK_STATUS(EMBER_SESSION_PARAMS_DEFAULT(&p), EMBER_OK);
  p.n_ctx = 128;
  p.n_threads = 2;
  p.n_ubatch = 1;
  ember_session *s = NULL;
  CHECK_STATUS(ember_session_new(model, &p, &s), EMBER_OK);
  int32_t tokens[100];
  for (int i = 0; i < 100; i++) tokens[i] = 3 + i;
  /* A cancel with no call running does nothing: it never reaches a later call. */
  CHECK_STATUS(ember_step(s, tokens, 5, NULL), EMBER_OK);
  CHECK_STATUS(ember_session_cancel(s), EMBER_OK);
  CHECK_STATUS(ember_step(s, tokens, 100, NULL), EMBER_OK);
  CHECK(ember_session_position(s) == 105);
  CHECK_STATUS(ember_session_cancel(NULL), EMBER_ERR_INVALID_ARGUMENT);

  /* A cancel during a generation: EMBER_ERR_CANCELLED, and the outputs say what happened;
   * the tokens delivered stay in the session. */
  ember_sampler *greedy = NULL;
  CHECK_STATUS(ember_sampler_new(NULL, &greedy), EMBER_OK);
  ember_generate_params gp;
  CHECK_STATUS(EMBER_GENERATE_PARAMS_DEFAULT(&gp), EMBER_OK);
  gp.max_tokens = 30;
  gp.ignore_end_tokens = 1;
  CHECK_STATUS(ember_session_reset(s), EMBER_OK);
  struct cancel_probe probe = {s, 0};
  ember_stop_reason reason = EMBER_STOP_REASON_END_TOKEN;
  size_t n = 999;
  const char *prompt = "Once upon a time";
  int32_t prompt_ids[32];
  size_t n_prompt = 0;
  CHECK_STATUS(ember_tokenize(model, prompt, strlen(prompt), true, false, prompt_ids, 32, &n_prompt), EMBER_OK);
  CHECK_STATUS(ember_generate(s, greedy, prompt, strlen(prompt), &gp, cancel_at_third_piece, &probe, &reason, &n),
               EMBER_ERR_CANCELLED);
  CHECK(reason == EMBER_STOP_REASON_CANCELLED);
  CHECK(n >= 3 && n < 30);
  CHECK(ember_session_position(s) == n_prompt + n);

  /* The Stop-button race: cancels at random moments, before, during and after the calls.
   * A call is either cancelled while it runs or completes; once the canceller is gone every
   * call completes. */
  struct canceller c = {s, 0, 0};
  pthread_t thread;
  pthread_create(&thread, NULL, cancel_repeatedly, &c);
  int cancelled = 0, completed = 0;
  gp.max_tokens = 8;
  /* 60 calls, and more (up to 600) until a cancel has landed: under valgrind's one-thread-
   * at-a-time scheduler the canceller can miss 60 short calls in a row. */
  for (int i = 0; i < 60 || (cancelled == 0 && i < 600); i++) {
    CHECK_STATUS(ember_session_reset(s), EMBER_OK);
    ember_status st = ember_generate(s, greedy, prompt, strlen(prompt), &gp, NULL, NULL, &reason, &n);
    if (st == EMBER_ERR_CANCELLED) {
      cancelled++;
      CHECK(reason == EMBER_STOP_REASON_CANCELLED);
      CHECK(ember_session_position(s) == (n == 0 ? 0 : n_prompt + n));
    } else {
      completed++;
      CHECK(st == EMBER_OK && reason == EMBER_STOP_REASON_MAX_TOKENS && n == 8);
    }
  }
  c.stop = 1;
  pthread_join(thread, NULL);
  CHECK(cancelled > 0);
  for (int i = 0; i < 5; i++) {
    CHECK_STATUS(ember_session_reset(s), EMBER_OK);
    CHECK_STATUS(ember_generate(s, greedy, prompt, strlen(prompt), &gp, NULL, NULL, &reason, &n), EMBER_OK);
    CHECK(reason == EMBER_STOP_REASON_MAX_TOKENS);
  }
  ember_sampler_free(greedy);
  ember_session_free(s);
}

/* The session holds every token whose text was delivered, and says which. */
static void test_session_tokens(void) {
  ember_session *s = new_session(64, 2);
  ember_sampler *greedy = NULL;
  CHECK_STATUS(ember_sampler_new(NULL, &greedy), EMBER_OK);
  ember_generate_params gp;
  CHECK_STATUS(EMBER_GENERATE_PARAMS_DEFAULT(&gp), EMBER_OK);
  gp.max_tokens = 6;
  gp.ignore_end_tokens = 1;
  const char *prompt = "The king";
  int32_t ids[64];
  size_t n_ids = 0, n = 0;
  CHECK_STATUS(ember_tokenize(model, prompt, strlen(prompt), true, false, ids, 64, &n_ids), EMBER_OK);
  struct text_buffer b = {0};
  ember_stop_reason reason;
  CHECK_STATUS(ember_generate(s, greedy, prompt, strlen(prompt), &gp, collect, &b, &reason, &n), EMBER_OK);
  CHECK(reason == EMBER_STOP_REASON_MAX_TOKENS && n == 6);
  CHECK(ember_session_position(s) == n_ids + 6);
  int32_t held[64];
  size_t n_held = 0;
  CHECK_STATUS(ember_session_tokens(s, held, 2, &n_held), EMBER_ERR_BUFFER_TOO_SMALL);
  CHECK(n_held == n_ids + 6);
  CHECK_STATUS(ember_session_tokens(s, NULL, 0, &n_held), EMBER_ERR_BUFFER_TOO_SMALL);
  CHECK_STATUS(ember_session_tokens(s, held, 64, NULL), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_session_tokens(s, held, 64, &n_held), EMBER_OK);
  CHECK(n_held == n_ids + 6 && memcmp(held, ids, n_ids * sizeof *ids) == 0);
  char text[512];
  size_t len = 0;
  CHECK_STATUS(ember_detokenize(model, held + n_ids, 6, text, sizeof text, &len), EMBER_OK);
  CHECK(len == b.len && memcmp(text, b.data, len) == 0);
  /* Continuing with an empty prompt starts from the last token, as a fresh session fed every
   * held token does. */
  struct text_buffer more = {0}, fresh_text = {0};
  CHECK_STATUS(ember_generate(s, greedy, "", 0, &gp, collect, &more, &reason, &n), EMBER_OK);
  ember_session *fresh = new_session(64, 1);
  size_t vocab = ember_model_n_vocab(model);
  float *logits = malloc(vocab * sizeof *logits);
  CHECK_STATUS(ember_step(fresh, held, n_held, logits), EMBER_OK);
  int32_t gen[6];
  for (int i = 0; i < 6; i++) {
    gen[i] = (int32_t)argmax(logits, vocab);
    CHECK_STATUS(ember_step(fresh, &gen[i], 1, logits), EMBER_OK);
  }
  CHECK_STATUS(ember_detokenize(model, gen, 6, fresh_text.data, sizeof fresh_text.data, &fresh_text.len), EMBER_OK);
  CHECK(more.len == fresh_text.len && memcmp(more.data, fresh_text.data, more.len) == 0);
  /* With nothing pending, an empty prompt is an error. */
  CHECK_STATUS(ember_session_reset(s), EMBER_OK);
  CHECK_STATUS(ember_generate(s, greedy, "", 0, &gp, NULL, NULL, NULL, NULL), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_session_tokens(NULL, held, 64, &n_held), EMBER_ERR_INVALID_ARGUMENT);
  free(logits);
  ember_session_free(fresh);
  ember_sampler_free(greedy);
  ember_session_free(s);
}

/* Position and context length are readable from any thread while a call runs. */
struct long_prompt {
  ember_session *session;
  ember_status status;
  volatile int done;
};

static void *step_long_prompt(void *arg) {
  struct long_prompt *lp = arg;
  int32_t tokens[120];
  for (int i = 0; i < 120; i++) tokens[i] = 3 + (i * 7) % 300;
  lp->status = ember_step(lp->session, tokens, 120, NULL);
  lp->done = 1;
  return NULL;
}

static void test_progress(void) {
  ember_session_params p;
  CHECK_STATUS(EMBER_SESSION_PARAMS_DEFAULT(&p), EMBER_OK);
  p.n_ctx = 128;
  p.n_threads = 1;
  p.n_ubatch = 1;
  ember_session *s = NULL;
  CHECK_STATUS(ember_session_new(model, &p, &s), EMBER_OK);
  int rounds_seen_between = 0;
  for (int round = 0; round < 200 && rounds_seen_between == 0; round++) {
    CHECK_STATUS(ember_session_reset(s), EMBER_OK);
    struct long_prompt lp = {s, EMBER_OK, 0};
    pthread_t thread;
    pthread_create(&thread, NULL, step_long_prompt, &lp);
    size_t last = 0;
    int ctx_ok = 1, monotonic = 1, between = 0;
    while (!lp.done) {
      size_t pos = ember_session_position(s);
      if (ember_session_n_ctx(s) != 128) ctx_ok = 0;
      if (pos < last) monotonic = 0;
      if (pos > 0 && pos < 120) between = 1;
      last = pos;
      sched_yield();
    }
    pthread_join(thread, NULL);
    CHECK(lp.status == EMBER_OK);
    CHECK(ctx_ok && monotonic);
    CHECK(ember_session_position(s) == 120);
    rounds_seen_between += between;
  }
  CHECK(rounds_seen_between > 0);
  ember_session_free(s);
}

/* No Ember lock is held while Ember calls the host: callbacks may call back in. */
static int reentrant_logs = 0;
static void log_and_uninstall(ember_log_level level, const char *message, void *user) {
  (void)level;
  (void)message;
  (void)user;
  reentrant_logs++;
  ember_set_log_callback(NULL, NULL); /* what a Unity domain reload does */
}

static void log_and_log(ember_log_level level, const char *message, void *user) {
  (void)level;
  (void)message;
  int *depth = user;
  reentrant_logs++;
  if (++*depth < 3) {
    /* Loading logs again, from inside the callback. */
    ember_model *m = NULL;
    if (ember_model_load(model_dir, NULL, &m) == EMBER_OK) ember_model_free(m);
  }
  --*depth;
}

struct reentry {
  ember_session *session;
  ember_sampler *sampler;
  ember_status step, sample, tokenize, cancel;
  size_t position, n_ctx;
};

static bool reenter(const char *piece, size_t len, void *user) {
  (void)piece;
  (void)len;
  struct reentry *r = user;
  int32_t t = 5, ids[16];
  size_t n = 0;
  float logits[320] = {0};
  r->step = ember_step(r->session, &t, 1, NULL);
  r->sample = ember_sample(r->sampler, logits, 320, &t);
  r->tokenize = ember_tokenize(model, "hi", 2, false, false, ids, 16, &n);
  r->position = ember_session_position(r->session);
  r->n_ctx = ember_session_n_ctx(r->session);
  r->cancel = ember_session_cancel(r->session);
  return true;
}

static void test_reentrancy(void) {
  alarm(60); /* a deadlock ends the test instead of hanging it */
  ember_set_log_callback(log_and_uninstall, NULL);
  ember_model *m = NULL;
  CHECK_STATUS(ember_model_load(model_dir, NULL, &m), EMBER_OK);
  CHECK(reentrant_logs == 1);
  ember_model_free(m);
  ember_model *m2 = NULL;
  CHECK_STATUS(ember_model_load(model_dir, NULL, &m2), EMBER_OK);
  CHECK(reentrant_logs == 1); /* uninstalled */
  ember_model_free(m2);
  int depth = 0;
  ember_set_log_callback(log_and_log, &depth);
  CHECK_STATUS(ember_model_load(model_dir, NULL, &m), EMBER_OK);
  CHECK(reentrant_logs >= 4 && depth == 0);
  ember_set_log_callback(NULL, NULL);
  ember_model_free(m);

  ember_session *s = new_session(64, 2);
  ember_sampler *greedy = NULL;
  CHECK_STATUS(ember_sampler_new(NULL, &greedy), EMBER_OK);
  struct reentry r = {s, greedy, EMBER_OK, EMBER_OK, EMBER_ERR_INTERNAL, EMBER_ERR_INTERNAL, 0, 0};
  ember_generate_params gp;
  CHECK_STATUS(EMBER_GENERATE_PARAMS_DEFAULT(&gp), EMBER_OK);
  gp.max_tokens = 10;
  gp.ignore_end_tokens = 1;
  ember_stop_reason reason;
  size_t n = 0;
  /* The callback cancels the generation it runs in, after the other calls. */
  CHECK_STATUS(ember_generate(s, greedy, "Hello", 5, &gp, reenter, &r, &reason, &n), EMBER_ERR_CANCELLED);
  CHECK(reason == EMBER_STOP_REASON_CANCELLED && n >= 1 && n < 10);
  CHECK(r.step == EMBER_ERR_BUSY && r.sample == EMBER_ERR_BUSY);
  CHECK(r.tokenize == EMBER_OK && r.cancel == EMBER_OK);
  CHECK(r.n_ctx == 64 && r.position == ember_session_position(s));
  ember_sampler_free(greedy);
  ember_session_free(s);
  alarm(0);
}

/* Thread counts above the machine's are clamped: a thousand threads start no thousand. */
static int count_threads(void) {
  DIR *d = opendir("/proc/self/task");
  if (!d) return -1;
  int n = 0;
  struct dirent *e;
  while ((e = readdir(d)))
    if (e->d_name[0] != '.') n++;
  closedir(d);
  return n;
}

/* The thread count once it has stopped changing. A joined thread can still be listed in
   /proc/self/task for a moment while the kernel finishes its exit (long under valgrind). */
static int settled_threads(void) {
  int n = count_threads();
  for (int stable = 0, polls = 0; stable < 20 && polls < 5000; polls++) {
    struct timespec ms = {0, 1000000};
    nanosleep(&ms, NULL);
    int now = count_threads();
    stable = now == n ? stable + 1 : 0;
    n = now;
  }
  return n;
}

/* Whether the thread count falls to `limit` or below within ten seconds. */
static bool threads_fall_to(int limit) {
  for (int polls = 0; polls < 10000; polls++) {
    if (count_threads() <= limit) return true;
    struct timespec ms = {0, 1000000};
    nanosleep(&ms, NULL);
  }
  return false;
}

static void test_thread_limit(void) {
  int before = settled_threads();
  ember_session *s = new_session(32, 1000);
  long cores = sysconf(_SC_NPROCESSORS_ONLN);
  if (before > 0) CHECK(count_threads() - before <= cores);
  int32_t t = 5;
  CHECK_STATUS(ember_step(s, &t, 1, NULL), EMBER_OK);
  ember_session_free(s);
  if (before > 0) CHECK(threads_fall_to(before));
}

struct busy_probe {
  ember_session *session;
  ember_status seen;
};

static void *step_from_thread(void *arg) {
  struct busy_probe *probe = arg;
  int32_t t = 5;
  probe->seen = ember_step(probe->session, &t, 1, NULL);
  return NULL;
}

static bool probe_busy(const char *piece, size_t len, void *user) {
  (void)piece;
  (void)len;
  struct busy_probe *probe = user;
  /* The session is inside ember_generate: another thread (or this one) gets BUSY. */
  pthread_t thread;
  pthread_create(&thread, NULL, step_from_thread, probe);
  pthread_join(thread, NULL);
  return false;
}

static void test_busy(void) {
  ember_session *s = new_session(64, 1);
  ember_sampler *greedy = NULL;
  CHECK_STATUS(ember_sampler_new(NULL, &greedy), EMBER_OK);
  ember_generate_params gp;
  CHECK_STATUS(EMBER_GENERATE_PARAMS_DEFAULT(&gp), EMBER_OK);
  gp.ignore_end_tokens = 1;
  struct busy_probe probe = {s, EMBER_OK};
  CHECK_STATUS(ember_generate(s, greedy, "Hello", 5, &gp, probe_busy, &probe, NULL, NULL), EMBER_OK);
  CHECK(probe.seen == EMBER_ERR_BUSY);
  /* Usable again once the call returned. */
  int32_t t = 5;
  CHECK_STATUS(ember_step(s, &t, 1, NULL), EMBER_OK);
  ember_sampler_free(greedy);
  ember_session_free(s);
}

struct worker {
  char text[2048];
  size_t len;
  ember_status status;
};

static bool append(const char *piece, size_t len, void *user) {
  struct worker *w = user;
  if (w->len + len < sizeof w->text) {
    memcpy(w->text + w->len, piece, len);
    w->len += len;
  }
  return true;
}

static void run_worker(struct worker *w, uint32_t threads) {
  ember_session *s = new_session(96, threads);
  ember_sampler_params sp;
  EMBER_SAMPLER_PARAMS_DEFAULT(&sp);
  sp.temperature = 0.8f;
  sp.top_k = 40;
  sp.seed = 99;
  ember_sampler *sampler = NULL;
  ember_sampler_new(&sp, &sampler);
  ember_generate_params gp;
  EMBER_GENERATE_PARAMS_DEFAULT(&gp);
  gp.max_tokens = 40;
  gp.ignore_end_tokens = 1;
  w->len = 0;
  w->status = ember_generate(s, sampler, "The robot said", 14, &gp, append, w, NULL, NULL);
  ember_sampler_free(sampler);
  ember_session_free(s);
}

static void *worker_main(void *arg) {
  run_worker(arg, 2);
  return NULL;
}

static void test_threads(void) {
  struct worker reference;
  run_worker(&reference, 1);
  CHECK(reference.status == EMBER_OK && reference.len > 0);
  enum { N = 6 };
  struct worker workers[N];
  pthread_t threads[N];
  for (int i = 0; i < N; i++) pthread_create(&threads[i], NULL, worker_main, &workers[i]);
  for (int i = 0; i < N; i++) pthread_join(threads[i], NULL);
  for (int i = 0; i < N; i++) {
    CHECK(workers[i].status == EMBER_OK);
    CHECK(workers[i].len == reference.len && memcmp(workers[i].text, reference.text, reference.len) == 0);
  }
}

struct pool_worker {
  ember_session *session;
  int32_t tokens[24];
  float *logits;
  ember_status status;
};

static void *step_on_pool(void *arg) {
  struct pool_worker *w = arg;
  w->status = EMBER_OK;
  for (int i = 0; i < 24 && w->status == EMBER_OK; i++)
    w->status = ember_step(w->session, &w->tokens[i], 1, w->logits);
  return NULL;
}

static void test_pool(void) {
  ember_pool *pool = NULL;
  CHECK_STATUS(ember_pool_new(NULL, NULL), EMBER_ERR_INVALID_ARGUMENT);
  ember_pool_params pp;
  CHECK_STATUS(EMBER_POOL_PARAMS_DEFAULT(&pp), EMBER_OK);
  pp.n_threads = 2;
  int before = settled_threads();
  CHECK_STATUS(ember_pool_new(&pp, &pool), EMBER_OK);
  CHECK(ember_pool_n_threads(pool) == 2 && ember_pool_n_threads(NULL) == 0);
  ember_session_params p;
  CHECK_STATUS(EMBER_SESSION_PARAMS_DEFAULT(&p), EMBER_OK);
  CHECK(p.pool == NULL);
  p.n_ctx = 64;
  p.n_threads = 7; /* ignored with a pool */
  p.pool = pool;
  enum { N = 8 };
  ember_session *npcs[N];
  for (int i = 0; i < N; i++) CHECK_STATUS(ember_session_new(model, &p, &npcs[i]), EMBER_OK);
  /* Eight sessions, one worker thread: the pool's. */
  CHECK(count_threads() == before + 1);
  /* Steps from several threads at once take turns on the pool, and give what a session of
     its own gives. */
  size_t vocab = ember_model_n_vocab(model);
  struct pool_worker w[N];
  pthread_t threads[N];
  for (int i = 0; i < N; i++) {
    w[i].session = npcs[i];
    for (int t = 0; t < 24; t++) w[i].tokens[t] = 1 + (i * 31 + t * 7) % 300;
    w[i].logits = malloc(vocab * sizeof(float));
    pthread_create(&threads[i], NULL, step_on_pool, &w[i]);
  }
  for (int i = 0; i < N; i++) pthread_join(threads[i], NULL);
  float *alone = malloc(vocab * sizeof(float));
  for (int i = 0; i < N; i++) {
    CHECK(w[i].status == EMBER_OK);
    ember_session *own = new_session(64, 2);
    CHECK_STATUS(ember_step(own, w[i].tokens, 24, alone), EMBER_OK);
    CHECK(memcmp(alone, w[i].logits, vocab * sizeof(float)) == 0);
    ember_session_free(own);
  }
  /* A fork onto the pool; the pool freed first, the sessions still work. */
  ember_session *fork = NULL;
  CHECK_STATUS(ember_session_fork(npcs[0], &p, &fork), EMBER_OK);
  /* The sessions of their own above have been freed: their threads end. */
  CHECK(threads_fall_to(before + 1) && count_threads() == before + 1);
  ember_session *same = NULL; /* NULL params: on the source's pool, no new thread */
  CHECK_STATUS(ember_session_fork(npcs[1], NULL, &same), EMBER_OK);
  CHECK(count_threads() == before + 1);
  ember_session *own = new_session(64, 2);
  ember_session *owns = NULL;
  CHECK(count_threads() == before + 2);
  CHECK_STATUS(ember_session_fork(own, NULL, &owns), EMBER_OK);
  CHECK(count_threads() == before + 2);
  ember_session_free(owns);
  ember_session_free(own);
  ember_session_free(same);
  size_t with_pool = 0;
  CHECK_STATUS(ember_session_memory_estimate(model, &p, &with_pool), EMBER_OK);
  /* Background generations on the pool's sessions step together: fewer passes than steps
     (each generation's first token comes from its prompt's pass, not a step). */
  uint64_t passes = 1, steps = 1;
  CHECK_STATUS(ember_pool_combined_steps(pool, NULL, &steps), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_pool_combined_steps(NULL, &passes, &steps), EMBER_ERR_INVALID_ARGUMENT);
  CHECK(passes == 1 && steps == 1);
  CHECK_STATUS(ember_pool_combined_steps(pool, &passes, &steps), EMBER_OK);
  CHECK(passes == 0 && steps == 0); /* ember_step is not a generation's step */
  ember_sampler *greedy = NULL;
  CHECK_STATUS(ember_sampler_new(NULL, &greedy), EMBER_OK);
  ember_sampler *samplers[N];
  ember_generation *gens[N];
  ember_generate_params gp;
  CHECK_STATUS(EMBER_GENERATE_PARAMS_DEFAULT(&gp), EMBER_OK);
  gp.max_tokens = 16;
  gp.ignore_end_tokens = 1;
  gp.max_ahead = 1; /* each pauses until its piece is read, as a game's characters do */
  for (int i = 0; i < N; i++) {
    CHECK_STATUS(ember_session_reset(npcs[i]), EMBER_OK);
    CHECK_STATUS(ember_sampler_new(NULL, &samplers[i]), EMBER_OK);
    ember_generation_prompt gprompt;
    memset(&gprompt, 0, sizeof gprompt);
    gprompt.struct_size = sizeof gprompt;
    gprompt.tokens = w[i].tokens;
    gprompt.n_tokens = 4;
    CHECK_STATUS(ember_generation_start(npcs[i], samplers[i], &gprompt, &gp, &gens[i]), EMBER_OK);
  }
  /* The game loop: each character's new text in turn, until all have finished. */
  for (int finished = 0; finished < N;) {
    finished = 0;
    for (int i = 0; i < N; i++) {
      char text[256];
      size_t n_text = 0;
      ember_generation_state state = EMBER_GENERATION_RUNNING;
      CHECK_STATUS(ember_generation_poll(gens[i], text, sizeof text, &n_text, &state), EMBER_OK);
      finished += state == EMBER_GENERATION_FINISHED;
    }
    struct timespec frame = {0, 1000000};
    nanosleep(&frame, NULL);
  }
  for (int i = 0; i < N; i++) {
    ember_stop_reason reason;
    size_t n = 0;
    CHECK_STATUS(ember_generation_finish(gens[i], &reason, &n), EMBER_OK);
    CHECK(reason == EMBER_STOP_REASON_MAX_TOKENS && n == 16);
    ember_sampler_free(samplers[i]);
    /* What it generated is what a session of its own generates. */
    int32_t together[20], own_tokens[20];
    size_t n_together = 0, n_own = 0;
    CHECK_STATUS(ember_session_tokens(npcs[i], together, 20, &n_together), EMBER_OK);
    ember_session *own1 = new_session(64, 2);
    ember_generation_prompt gprompt;
    memset(&gprompt, 0, sizeof gprompt);
    gprompt.struct_size = sizeof gprompt;
    gprompt.tokens = w[i].tokens;
    gprompt.n_tokens = 4;
    ember_generation *alone1 = NULL;
    CHECK_STATUS(ember_generation_start(own1, greedy, &gprompt, &gp, &alone1), EMBER_OK);
    CHECK_STATUS(ember_generation_finish(alone1, NULL, NULL), EMBER_OK);
    CHECK_STATUS(ember_session_tokens(own1, own_tokens, 20, &n_own), EMBER_OK);
    CHECK(n_together == 20 && n_own == 20 && memcmp(together, own_tokens, sizeof together) == 0);
    ember_session_free(own1);
  }
  ember_sampler_free(greedy);
  CHECK_STATUS(ember_pool_combined_steps(pool, &passes, &steps), EMBER_OK);
  CHECK(steps == N * 15 && passes > 0 && passes < steps);
  ember_pool_free(pool);
  CHECK_STATUS(ember_step(fork, w[0].tokens, 1, alone), EMBER_OK);
  for (int i = 0; i < N; i++) {
    ember_session_free(npcs[i]);
    free(w[i].logits);
  }
  /* The fork still holds the pool. */
  CHECK(threads_fall_to(before + 1) && count_threads() == before + 1);
  ember_session_free(fork);
  CHECK(threads_fall_to(before));
  ember_pool_free(NULL);
  free(alone);
}

static void test_attention(void) {
  ember_session *s = new_session(64, 2);
  int32_t tokens[5] = {5, 17, 42, 99, 7};
  float logits[320], w[3 * 5], single[5];
  size_t bytes = 0, nq = 0, np = 0;
  /* Off by default. */
  CHECK_STATUS(ember_step(s, tokens, 5, logits), EMBER_OK);
  CHECK_STATUS(ember_session_attention(s, 1, 0, w, 15, &nq, &np), EMBER_ERR_INVALID_ARGUMENT);
  ember_session_reset(s);
  int32_t layers[1] = {1}, heads[2] = {3, 0};
  CHECK_STATUS(ember_session_capture_attention(s, layers, 1, heads, 2, 3, &bytes), EMBER_OK);
  CHECK(bytes == 1 * 2 * 3 * 64 * sizeof(float));
  CHECK_STATUS(ember_step(s, tokens, 5, logits), EMBER_OK);
  /* Sizing: the sizes are written, the buffer is not. */
  w[0] = -1.0f;
  CHECK_STATUS(ember_session_attention(s, 1, 3, w, 2, &nq, &np), EMBER_ERR_BUFFER_TOO_SMALL);
  CHECK(nq == 3 && np == 5 && w[0] == -1.0f);
  CHECK_STATUS(ember_session_attention(s, 1, 3, NULL, 0, &nq, &np), EMBER_ERR_BUFFER_TOO_SMALL);
  CHECK_STATUS(ember_session_attention(s, 1, 3, w, 15, NULL, &np), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_session_attention(s, 1, 3, w, 15, &nq, &np), EMBER_OK);
  for (size_t q = 0; q < 3; q++) {
    double sum = 0;
    for (size_t k = 0; k < 5; k++) sum += w[q * 5 + k];
    CHECK(fabs(sum - 1.0) < 1e-5);
    for (size_t k = 2 + q + 1; k < 5; k++) CHECK(w[q * 5 + k] == 0.0f); /* later keys */
  }
  CHECK_STATUS(ember_session_attention(s, 0, 3, w, 15, &nq, &np), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_session_attention(s, 1, 1, w, 15, &nq, &np), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_session_attention(s, -1, 0, w, 15, &nq, &np), EMBER_ERR_INVALID_ARGUMENT);
  /* A bad selection leaves the capture as it was. */
  int32_t bad[1] = {2};
  bytes = 7;
  CHECK_STATUS(ember_session_capture_attention(s, bad, 1, NULL, 0, 3, &bytes), EMBER_ERR_INVALID_ARGUMENT);
  CHECK(bytes == 7);
  CHECK_STATUS(ember_session_capture_attention(s, NULL, 1, NULL, 0, 3, NULL), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_session_attention(s, 1, 0, w, 15, &nq, &np), EMBER_OK);
  /* The last query of the prompt equals the same token stepped alone after the others. */
  ember_session *t = new_session(64, 1);
  CHECK_STATUS(ember_session_capture_attention(t, NULL, 0, NULL, 0, 1, &bytes), EMBER_OK);
  CHECK(bytes == 2 * 4 * 1 * 64 * sizeof(float));
  CHECK_STATUS(ember_step(t, tokens, 4, logits), EMBER_OK);
  CHECK_STATUS(ember_step(t, tokens + 4, 1, logits), EMBER_OK);
  CHECK_STATUS(ember_session_attention(t, 1, 0, single, 5, &nq, &np), EMBER_OK);
  CHECK(nq == 1 && np == 5 && memcmp(single, w + 2 * 5, sizeof single) == 0);
  /* Off again. */
  CHECK_STATUS(ember_session_capture_attention(t, NULL, 0, NULL, 0, 0, &bytes), EMBER_OK);
  CHECK(bytes == 0);
  CHECK_STATUS(ember_session_attention(t, 1, 0, single, 5, &nq, &np), EMBER_ERR_INVALID_ARGUMENT);
  ember_session_free(t);
  ember_session_free(s);
}

static void test_step_batch(void) {
  ember_session *a = new_session(64, 2), *b = new_session(64, 1), *c = new_session(8, 1);
  int32_t prompt[4] = {5, 17, 42, 99}, one[1] = {7}, bad[1] = {1 << 20};
  static float la[320], lb[320], alone[320];
  /* a takes a prompt while b takes one token; b's logits are skipped. */
  ember_session *sessions[2] = {a, b};
  const int32_t *tokens[2] = {prompt, one};
  size_t counts[2] = {4, 1};
  float *outs[2] = {la, NULL};
  CHECK_STATUS(ember_step_batch(sessions, tokens, counts, 2, outs), EMBER_OK);
  CHECK(ember_session_position(a) == 4 && ember_session_position(b) == 1);
  ember_session *t = new_session(64, 1);
  CHECK_STATUS(ember_step(t, prompt, 4, alone), EMBER_OK);
  CHECK(memcmp(la, alone, sizeof la) == 0); /* bitwise what stepping it alone gives */
  ember_session_reset(t);
  CHECK_STATUS(ember_step(t, one, 1, alone), EMBER_OK);
  CHECK_STATUS(ember_session_logits(b, lb, 320), EMBER_OK);
  CHECK(memcmp(lb, alone, sizeof lb) == 0);
  /* No logits at all; b decodes while a does too. */
  const int32_t *next[2] = {one, one};
  size_t ones[2] = {1, 1};
  CHECK_STATUS(ember_step_batch(sessions, next, ones, 2, NULL), EMBER_OK);
  CHECK(ember_session_position(a) == 5 && ember_session_position(b) == 2);
  /* Errors name the session and step nobody. */
  const int32_t *with_bad[2] = {one, bad};
  CHECK_STATUS(ember_step_batch(sessions, with_bad, ones, 2, outs), EMBER_ERR_INVALID_ARGUMENT);
  CHECK(strstr(ember_last_error(), "session 1 of the batch") != NULL);
  ember_session *full[2] = {a, c};
  int32_t nine[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  const int32_t *too_many[2] = {one, nine};
  size_t n9[2] = {1, 9};
  CHECK_STATUS(ember_step_batch(full, too_many, n9, 2, outs), EMBER_ERR_CONTEXT_FULL);
  ember_session *twice[2] = {a, a};
  CHECK_STATUS(ember_step_batch(twice, next, ones, 2, outs), EMBER_ERR_INVALID_ARGUMENT);
  CHECK(strstr(ember_last_error(), "same session as index 0") != NULL);
  CHECK_STATUS(ember_step_batch(sessions, NULL, ones, 2, outs), EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_step_batch(sessions, next, ones, 0, outs), EMBER_ERR_INVALID_ARGUMENT);
  CHECK(ember_session_position(a) == 5 && ember_session_position(b) == 2 &&
        ember_session_position(c) == 0);
  ember_session_free(t);
  ember_session_free(c);
  ember_session_free(b);
  ember_session_free(a);
}

static void test_embed(void) {
  size_t n_embd = ember_model_n_embd(model), n = 0;
  CHECK(n_embd > 0 && n_embd <= 256 && ember_model_n_embd(NULL) == 0);
  ember_session *s = new_session(8, 1);
  int32_t text[3] = {5, 17, 42}, nine[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  static float first[256], again[256], out[256];
  /* Sized with cap 0: nothing computed, the width reported. */
  CHECK_STATUS(ember_session_embed(s, text, 3, EMBER_POOLING_MEAN, true, NULL, 0, &n),
               EMBER_ERR_BUFFER_TOO_SMALL);
  CHECK(n == n_embd && ember_session_position(s) == 0);
  CHECK_STATUS(ember_session_embed(s, text, 3, EMBER_POOLING_MEAN, true, first, 256, &n),
               EMBER_OK);
  double norm = 0;
  for (size_t i = 0; i < n_embd; i++) norm += (double)first[i] * first[i];
  CHECK(fabs(norm - 1.0) < 1e-5 && ember_session_position(s) == 3);
  /* The same text on its own again: bitwise the same; the last token's state differs. */
  ember_session_reset(s);
  CHECK_STATUS(ember_session_embed(s, text, 3, EMBER_POOLING_MEAN, true, again, 256, &n),
               EMBER_OK);
  CHECK(memcmp(first, again, n_embd * sizeof(float)) == 0);
  ember_session_reset(s);
  CHECK_STATUS(ember_session_embed(s, text, 3, EMBER_POOLING_LAST, false, again, 256, &n),
               EMBER_OK);
  CHECK(memcmp(first, again, n_embd * sizeof(float)) != 0);
  /* Failures leave the buffer and the session as they were. */
  memset(out, 0, sizeof out);
  CHECK_STATUS(ember_session_embed(s, text, 3, 7, true, out, 256, &n), EMBER_ERR_INVALID_ARGUMENT);
  CHECK(strstr(ember_last_error(), "pooling 7") != NULL);
  CHECK_STATUS(ember_session_embed(s, nine, 9, EMBER_POOLING_LAST, true, out, 256, &n),
               EMBER_ERR_CONTEXT_FULL);
  CHECK_STATUS(ember_session_embed(s, text, 0, EMBER_POOLING_LAST, true, out, 256, &n),
               EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_session_embed(s, text, 3, EMBER_POOLING_LAST, true, out, 256, NULL),
               EMBER_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(ember_session_embed(NULL, text, 3, EMBER_POOLING_LAST, true, out, 256, &n),
               EMBER_ERR_INVALID_ARGUMENT);
  for (size_t i = 0; i < 256; i++) CHECK(out[i] == 0.0f);
  CHECK(ember_session_position(s) == 3);
  ember_session_free(s);
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s FIXTURE_MODEL_DIR SCRATCH_DIR\n", argv[0]);
    return 2;
  }
  model_dir = argv[1];
  scratch_dir = argv[2];
  test_version();
  test_load_errors();
  test_probe();
  test_model();
  test_gguf_and_quantization();
  test_tokenize();
  test_session();
  test_state_and_fork();
  test_sampler();
  test_generate();
  test_tools();
  test_detokenizer();
  test_cancel();
  test_generation();
  test_session_tokens();
  test_progress();
  test_reentrancy();
  test_thread_limit();
  test_pool();
  test_busy();
  test_threads();
  test_attention();
  test_step_batch();
  test_embed();
  ember_model_free(model);
  printf("%d passed, %d failed\n", checks - failures, failures);
  return failures == 0 ? 0 : 1;
}
