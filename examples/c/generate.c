/* Streams a completion: load a model, tokenize a prompt, step the model, sample, and print
 * text as it completes.
 *
 *   cc -std=c11 -Iinclude examples/c/generate.c -Ltarget/release -lember -o generate
 *   ./generate MODEL "Once upon a time" [max_tokens] [n_threads]
 */
#include "ember.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *what, ember_status status) {
  fprintf(stderr, "%s failed: %s: %s\n", what, ember_status_name(status), ember_last_error());
  return 1;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s MODEL [PROMPT] [MAX_TOKENS] [N_THREADS]\n", argv[0]);
    return 2;
  }
  const char *prompt = argc > 2 ? argv[2] : "Once upon a time";
  int max_tokens = argc > 3 ? atoi(argv[3]) : 64;
  int n_threads = argc > 4 ? atoi(argv[4]) : 0;

  ember_model *model = NULL;
  ember_status st = ember_model_load(argv[1], NULL, &model);
  if (st != EMBER_OK) return fail("ember_model_load", st);

  /* Tokenize: ask for the size first, then fill. */
  size_t n_prompt = 0;
  st = ember_tokenize(model, prompt, strlen(prompt), true, false, NULL, 0, &n_prompt);
  if (st != EMBER_OK && st != EMBER_ERR_BUFFER_TOO_SMALL) return fail("ember_tokenize", st);
  int32_t *tokens = malloc((n_prompt ? n_prompt : 1) * sizeof *tokens);
  st = ember_tokenize(model, prompt, strlen(prompt), true, false, tokens, n_prompt, &n_prompt);
  if (st != EMBER_OK) return fail("ember_tokenize", st);

  ember_session_params sp;
  EMBER_SESSION_PARAMS_DEFAULT(&sp);
  sp.n_threads = (uint32_t)(n_threads > 0 ? n_threads : 0);
  ember_session *session = NULL;
  if ((st = ember_session_new(model, &sp, &session)) != EMBER_OK) return fail("ember_session_new", st);

  ember_sampler_params smp;
  EMBER_SAMPLER_PARAMS_DEFAULT(&smp);
  smp.temperature = 0.0f; /* greedy: the same text every run */
  ember_sampler *sampler = NULL;
  if ((st = ember_sampler_new(&smp, &sampler)) != EMBER_OK) return fail("ember_sampler_new", st);
  ember_detokenizer *detok = NULL;
  if ((st = ember_detokenizer_new(model, &detok)) != EMBER_OK) return fail("ember_detokenizer_new", st);

  size_t n_vocab = ember_model_n_vocab(model);
  float *logits = malloc(n_vocab * sizeof *logits);
  fputs(prompt, stdout);
  /* Step the prompt as one batch, then one token at a time. */
  st = ember_step(session, tokens, n_prompt, logits);
  char piece[256];
  size_t len;
  for (int i = 0; st == EMBER_OK && i < max_tokens; i++) {
    int32_t next;
    if ((st = ember_sample(sampler, logits, n_vocab, &next)) != EMBER_OK) break;
    if (ember_model_token_is_end(model, next)) break;
    if ((st = ember_detokenizer_push(detok, next, piece, sizeof piece, &len)) != EMBER_OK) break;
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
    st = ember_step(session, &next, 1, logits);
  }
  if (st == EMBER_ERR_CONTEXT_FULL) st = EMBER_OK;
  if (st == EMBER_OK && ember_detokenizer_flush(detok, piece, sizeof piece, &len) == EMBER_OK)
    fwrite(piece, 1, len, stdout);
  putchar('\n');
  int rc = st == EMBER_OK ? 0 : fail("generation", st);

  free(logits);
  free(tokens);
  ember_detokenizer_free(detok);
  ember_sampler_free(sampler);
  ember_session_free(session);
  ember_model_free(model);
  return rc;
}
