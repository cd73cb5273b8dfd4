"""llama.cpp's logits through llama-cpp-python's low-level API, for reference scripts.

`logits(path, tokens)` decodes `tokens` in one batch and returns every position's logits
(`exact`: keys and values cached in F32 and flash attention off, instead of llama.cpp's
defaults, F16 cache and flash attention, whose F16 arithmetic moves logits by about 1e-2).
Extra buffer types (the repacked and AMX weight layouts of CPU builds) are off: on tiny
fixture models llama.cpp 0.3.36 crashes in them (segmentation fault), and the plain
vec_dot kernels compute the same products.
"""

import numpy as np


_QUIET = None


def quiet():
    """Silences llama.cpp's log (it prints every tensor and graph node)."""
    global _QUIET
    import llama_cpp as L

    if _QUIET is None:
        _QUIET = L.llama_log_callback(lambda level, text, user_data: None)
        L.llama_log_set(_QUIET, None)


def logits(path, tokens, threads=1, exact=False):
    import llama_cpp as L

    quiet()
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.use_extra_bufts = False
    model = L.llama_model_load_from_file(str(path).encode(), mp)
    assert model, path
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = max(256, len(tokens))
    cp.n_threads = cp.n_threads_batch = threads
    if exact:
        cp.type_k = cp.type_v = L.GGML_TYPE_F32
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = L.llama_init_from_model(model, cp)
    n = len(tokens)
    batch = L.llama_batch_init(n, 0, 1)
    for i, t in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, i, 1
        batch.seq_id[i][0], batch.logits[i] = 0, 1
    batch.n_tokens = n
    assert L.llama_decode(ctx, batch) == 0
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    out = np.array(
        [np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(vocab,)) for i in range(n)],
        dtype=np.float32,
    )
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return out
