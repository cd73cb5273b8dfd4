"""llama.cpp's logits through llama-cpp-python's low-level API, for reference scripts.

`logits(path, tokens)` decodes `tokens` in one batch and returns every position's logits.
Extra buffer types (the repacked and AMX weight layouts of CPU builds) are off: on tiny
fixture models llama.cpp 0.3.36 crashes in them (segmentation fault), and the plain
vec_dot kernels compute the same products.
"""

import numpy as np


def logits(path, tokens, threads=1):
    import llama_cpp as L

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.use_extra_bufts = False
    model = L.llama_model_load_from_file(str(path).encode(), mp)
    assert model, path
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = 256
    cp.n_threads = cp.n_threads_batch = threads
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
