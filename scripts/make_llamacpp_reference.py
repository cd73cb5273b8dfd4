#!/usr/bin/env python3
"""llama.cpp's outputs on the default model's Q4_1 GGUF, the reference of tests/smollm2.rs.

Writes tests/reference/smollm2_q4_1_llamacpp.json with:
  cases       for each prompt of tests/reference/smollm2_greedy.json: llama.cpp's 32 greedy
              tokens and, at each step, the margin between its two best logits
  perplexity  the tokens of tests/reference/perplexity.txt (llama.cpp's tokenizer) and
              llama.cpp's perplexity over them (one pass, every position scored)

Needs llama-cpp-python (CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TOOLS=OFF" pip install
llama-cpp-python) and the model (scripts/fetch-model). Not run by CI; its output is committed.
Usage: python3 scripts/make_llamacpp_reference.py
"""

import json
import pathlib

import llama_cpp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
REFERENCE = ROOT / "tests" / "reference"
N_GENERATED = 32


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def main():
    llm = llama_cpp.Llama(
        model_path=str(MODEL),
        n_ctx=1024,
        n_batch=512,
        logits_all=True,
        n_threads=2,
        verbose=False,
    )
    cases = []
    greedy = json.loads((REFERENCE / "smollm2_greedy.json").read_text())
    for case in greedy["cases"]:
        llm.reset()
        llm.eval(case["prompt"])
        generated, margins = [], []
        for _ in range(N_GENERATED):
            logits = np.array(llm.scores[llm.n_tokens - 1])
            top2 = np.sort(logits)[-2:]
            token = int(np.argmax(logits))
            generated.append(token)
            margins.append(round(float(top2[1] - top2[0]), 5))
            llm.eval([token])
        cases.append(
            {"name": case["name"], "prompt": case["prompt"], "generated": generated, "margins": margins}
        )
        print(case["name"], llm.detokenize(generated).decode(errors="replace")[:60].replace("\n", " "))

    text = (REFERENCE / "perplexity.txt").read_text()
    tokens = llm.tokenize(text.encode(), add_bos=False, special=False)
    llm.reset()
    llm.eval(tokens)
    nll = [
        -log_softmax(np.array(llm.scores[i - 1]))[tokens[i]] for i in range(1, len(tokens))
    ]
    ppl = float(np.exp(np.mean(nll)))
    print(f"perplexity over {len(tokens)} tokens: {ppl:.4f}")
    out = {
        "model": MODEL.name,
        "llama_cpp_python": llama_cpp.__version__,
        "cases": cases,
        "perplexity": {"tokens": tokens, "value": ppl},
    }
    (REFERENCE / "smollm2_q4_1_llamacpp.json").write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
