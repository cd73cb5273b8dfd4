/* The embedding life cycle of a game editor: load -> sessions -> generate -> free, 100 times
 * in one process. Threads and resident memory must come back to where they started.
 * Usage: lifecycle FIXTURE_MODEL_DIR */
#include "ember.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static long status_field(const char *name) {
  FILE *f = fopen("/proc/self/status", "r");
  char line[256];
  long value = -1;
  size_t n = strlen(name);
  while (f && fgets(line, sizeof line, f))
    if (strncmp(line, name, n) == 0) value = atol(line + n);
  if (f) fclose(f);
  return value;
}

static int cycle(const char *dir) {
  ember_model *model = NULL;
  if (ember_model_load(dir, NULL, &model) != EMBER_OK) return 1;
  ember_session_params sp;
  EMBER_SESSION_PARAMS_DEFAULT(&sp);
  sp.n_ctx = 64;
  sp.n_threads = 3;
  ember_session *a = NULL, *b = NULL;
  ember_sampler *sampler = NULL;
  int rc = ember_session_new(model, &sp, &a) != EMBER_OK || ember_session_new(model, &sp, &b) != EMBER_OK ||
           ember_sampler_new(NULL, &sampler) != EMBER_OK;
  ember_generate_params gp;
  EMBER_GENERATE_PARAMS_DEFAULT(&gp);
  gp.max_tokens = 8;
  gp.ignore_end_tokens = 1;
  if (!rc) rc = ember_generate(a, sampler, "Hello", 5, &gp, NULL, NULL, NULL, NULL) != EMBER_OK;
  if (!rc) rc = ember_generate(b, sampler, "World", 5, &gp, NULL, NULL, NULL, NULL) != EMBER_OK;
  /* Free the model first: the sessions keep it alive. */
  ember_model_free(model);
  ember_sampler_free(sampler);
  ember_session_free(a);
  ember_session_free(b);
  return rc;
}

int main(int argc, char **argv) {
  if (argc != 2) return 2;
  if (cycle(argv[1])) { fprintf(stderr, "warm-up failed: %s\n", ember_last_error()); return 1; }
  long threads0 = status_field("Threads:"), rss0 = status_field("VmRSS:");
  for (int i = 0; i < 100; i++) {
    if (cycle(argv[1])) { fprintf(stderr, "cycle %d failed: %s\n", i, ember_last_error()); return 1; }
  }
  long threads1 = status_field("Threads:"), rss1 = status_field("VmRSS:");
  printf("threads %ld -> %ld, resident %ld kB -> %ld kB\n", threads0, threads1, rss0, rss1);
  int ok = threads1 == threads0 && rss1 - rss0 < 8 * 1024;
  printf("%d passed, %d failed\n", ok ? 1 : 0, ok ? 0 : 1);
  return ok ? 0 : 1;
}
