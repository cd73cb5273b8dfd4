#!/usr/bin/env python3
"""GBNF as Ember reads it (converted to llguidance's Lark) against llama.cpp's own grammar
engine, on the default model (SmolLM2-135M-Instruct, Q4_1), for grammars written here that
use every GBNF construct:

1. texts Ember samples under each grammar (temperature 1.0) are accepted by llama.cpp's
   grammar sampler, token by token, ending where the grammar may end;
2. texts llama.cpp samples under the same grammar (its grammar sampler, temperature 1.0, the
   same chat prompt) are accepted by Ember's constraint;
3. hand-written texts outside each grammar's language are refused by both.

One difference is not the grammar's: llama.cpp lets a control token stand for the text of its
name (SmolLM2's `<reponame>` satisfies `"<" [a-z]+ ">"`), so its grammar output can hold
control tokens; Ember never allows them. The script writes such tokens out as text and
counts the samples that had one.

    python3 scripts/check_gbnf.py [--samples 50]

Needs llama-cpp-python (installed here if missing: a ~10 minute build). Not a test.
"""

import argparse
import ctypes
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

# name: (grammar, prompt, texts outside the language)
GRAMMARS = {
    "record": (r'''# an NPC's record, one line
root ::= "name: " name "\nage: " age "\nmood: " mood ( "\ntags: " tag ( ", " tag ){0,2} )?
name ::= [A-Z] [a-z]{1,8} ( " " [A-Z] [a-z]{1,8} )?
age  ::= [1-9] [0-9]?
mood ::= "calm" | "angry" | "sad"
tag  ::= [a-z]{1,8}
''', "Describe the blacksmith.", ["name: bob\nage: 40\nmood: calm", "name: Bob\nage: 0\nmood: calm",
                                   "name: Bob\nage: 40\nmood: happy",
                                   "name: Bob\nage: 40\nmood: calm\ntags: a, b, c, d"]),
    "json": (r'''root   ::= object
object ::= "{" ws ( pair ( "," ws pair )* )? "}"
pair   ::= string ws ":" ws value ws
value  ::= object | list | string | number | "true" | "false" | "null"
list   ::= "[" ws ( value ws ( "," ws value ws )* )? "]"
string ::= "\"" ( [^"\\\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} ) ){0,12} "\""
number ::= "-"? ( "0" | [1-9] [0-9]{0,4} ) ( "." [0-9]{1,3} )? ( [eE] [-+]? [0-9]{1,2} )?
ws     ::= ( " " | "\n" [ \t]{0,4} )?
''', "Give the shop's stock as JSON.", ['{"a": 01}', '{"a" 1}', "{'a': 1}", '{"a": [1,]}']),
    "arithmetic": (r'''root ::= expr "="
expr ::= term ( ( "+" | "-" ) term ){0,3}
term ::= factor ( ( "*" | "/" ) factor ){0,2}
factor ::= [0-9]{1,3} | "(" expr ")"
''', "Write a sum:", ["1+", "(1+2=", "1234=", "1*2*3*4="]),
    "anything": (r'''root ::= "<" [^>\n]{1,20} ">" . .? "\x21"
''', "Write a tag:", ["<>a!", "<a\nb>c!", "<a>!"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=50)
    args = ap.parse_args()
    try:
        import llama_cpp as L
    except ImportError:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "llama-cpp-python"],
                              env=dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TOOLS=OFF"))
        import llama_cpp as L
    if not MODEL.exists():
        subprocess.check_call(["bash", str(ROOT / "scripts" / "fetch-model")])
    subprocess.check_call(["cargo", "build", "--release", "--quiet", "--lib"], cwd=ROOT)
    os.environ["EMBER_LIBRARY"] = str(ROOT / "target" / "release" / "libember.so")
    sys.path.insert(0, str(ROOT / "bindings" / "python"))
    import ember

    model = ember.Model(str(MODEL))
    llm = L.Llama(model_path=str(MODEL), n_ctx=512, verbose=False, logits_all=False)
    vocab = L.llama_model_get_vocab(llm._model.model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    eos = L.llama_vocab_eos(vocab)
    eot = L.llama_vocab_eot(vocab)
    candidates = (L.llama_token_data * n_vocab)()

    def llama_accepts(grammar: str, text: str) -> bool:
        """Feeds llama.cpp's tokens of `text` to its grammar sampler: every token allowed,
        and then an end token allowed."""
        sampler = L.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        assert sampler, "llama.cpp refused the grammar"
        try:
            for token in llm.tokenize(text.encode(), add_bos=False, special=False) + [None]:
                for i in range(n_vocab):
                    candidates[i].id, candidates[i].logit, candidates[i].p = i, 0.0, 0.0
                array = L.llama_token_data_array(candidates, n_vocab, -1, False)
                L.llama_sampler_apply(sampler, ctypes.byref(array))
                if token is None:
                    return any(not math.isinf(candidates[t].logit) for t in (eos, eot) if t >= 0)
                if math.isinf(candidates[token].logit):
                    return False
                L.llama_sampler_accept(sampler, token)
        finally:
            L.llama_sampler_free(sampler)
        return False

    def ember_accepts(grammar: str, text: str) -> bool:
        """Feeds Ember's tokens of `text` to its constraint (a draw from logits that favour
        each token in turn picks it only if it is allowed), then asks if the output is whole."""
        sampler = ember.Sampler(temperature=0.0)
        sampler.set_constraint(model, grammar=ember.Gbnf(grammar))
        logits = [0.0] * model.n_vocab
        for token in model.tokenize(text, add_special=False):
            logits[token] = 100.0
            drawn = sampler.sample(logits)
            logits[token] = 0.0
            if drawn != token:
                return False
        return sampler.constraint_state in (ember.ConstraintState.COMPLETE,
                                              ember.ConstraintState.FINISHED)

    failures = 0
    session = model.session(n_ctx=512)
    for name, (grammar, prompt, outside) in GRAMMARS.items():
        messages = [{"role": "user", "content": prompt}]
        ember_texts, llama_texts, controls = [], [], 0
        for i in range(args.samples):
            stream = session.chat(messages, max_tokens=120, grammar=ember.Gbnf(grammar),
                                  sampler=ember.Sampler(temperature=1.0, seed=i))
            text = stream.read()
            if stream.stop_reason == ember.StopReason.CONSTRAINT_COMPLETE:
                ember_texts.append(text)
            llm.reset()
            llm.set_seed(i)
            prompt = llm.tokenize(model.apply_chat_template(messages).encode(), add_bos=False,
                                  special=True)
            tokens = []
            for token in llm.generate(prompt, temp=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                      grammar=L.LlamaGrammar.from_string(grammar, verbose=False)):
                if token in (eos, eot) or len(tokens) == 120:
                    break
                tokens.append(token)
            if len(tokens) < 120:
                # Control tokens' text (<reponame>, ...) is written out: llama.cpp lets a
                # control token stand for the text of its name, which Ember never does.
                controls += any(L.llama_vocab_is_control(vocab, t) for t in tokens)
                llama_texts.append(llm.detokenize(tokens, special=True).decode("utf-8", "replace"))
        by_llama = sum(llama_accepts(grammar, t) for t in ember_texts)
        by_ember = sum(ember_accepts(grammar, t) for t in llama_texts)
        refused = sum(not llama_accepts(grammar, t) and not ember_accepts(grammar, t) for t in outside)
        ok = by_llama == len(ember_texts) and by_ember == len(llama_texts) and refused == len(outside)
        failures += not ok
        print(f"{name:<11} Ember's {len(ember_texts)} complete samples: {by_llama} accepted by llama.cpp; "
              f"llama.cpp's {len(llama_texts)}: {by_ember} accepted by Ember; "
              f"{refused}/{len(outside)} outside texts refused by both{'' if ok else '  MISMATCH'}"
              + (f" ({controls} of llama.cpp's samples used control tokens as text)" if controls else ""))
        if not ok:
            for t in ember_texts:
                if not llama_accepts(grammar, t):
                    print(f"    llama.cpp refuses Ember's {t!r}")
            for t in llama_texts:
                if not ember_accepts(grammar, t):
                    print(f"    Ember refuses llama.cpp's {t!r}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
