#!/usr/bin/env python3
"""Builds Hugging Face folders of SmolLM2-135M-Instruct from the default GGUF, and transformers'
greedy continuations of a few prompts on them.

1. transformers dequantizes models/SmolLM2-135M-Instruct.Q4_1.gguf (from_pretrained with
   gguf_file=...); its state dict is copied into a fresh LlamaForCausalLM built from
   ../shared/fixtures/smollm2/config.json and saved as
   models/SmolLM2-135M-Instruct-f32/ and models/SmolLM2-135M-Instruct-bf16/, with the
   metadata files of ../shared/fixtures/smollm2/ (its tokenizer.json is the correct one).
2. With --reference, writes tests/reference/smollm2_greedy.json: for each prompt its token ids
   (Hugging Face tokenizers on the shared tokenizer.json) and the 32 tokens transformers
   picks greedily in f32 (eager attention), with the top-2 logit margin of every step.

Needs torch, transformers, gguf, accelerate (pip install torch transformers gguf accelerate). Not run by CI.
Usage: scripts/fetch-model && python3 scripts/make_smollm2_reference.py [--reference]
"""

import json
import pathlib
import shutil
import sys

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from tokenizers import Tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "fixtures" / "smollm2"
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
NEW_TOKENS = 32

PROMPTS = {
    "story": "Once upon a time, in a small village at the edge of a great forest, there lived",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "numbers": "The first ten prime numbers are 2, 3, 5, 7,",
    "french": "La capitale de la France est Paris. La capitale de l'Allemagne est",
    "chat": None,  # filled in with the chat template below
    "long": None,  # a prompt of about 300 tokens
}

CHAT_QUESTION = "What is the boiling point of water at sea level, in Celsius?"

LONG_TEXT = (
    "The history of computing is a story of abstraction. Early machines were programmed by "
    "rewiring panels and flipping switches; each new problem meant physically rebuilding the "
    "computer. Stored-program designs changed this: instructions became data, kept in the same "
    "memory as the numbers they operated on. Assemblers let programmers write mnemonics instead "
    "of binary codes, and compilers went further, translating expressions that resembled "
    "mathematics into sequences of machine instructions. Operating systems hid the details of "
    "disks, terminals and memory behind files, processes and virtual address spaces. Networks "
    "connected machines, and protocols layered on protocols let programs on different continents "
    "exchange messages without knowing how the bits travelled. Each layer made the layers above "
    "it simpler to build, at the price of hiding what happened underneath. Today a programmer "
    "can write a few lines that fetch a web page, parse it, and store the result in a database, "
    "with millions of lines of other people's code doing the work. Understanding those layers "
    "remains valuable: when something goes wrong, or when performance matters, the abstractions "
    "leak, and the engineer who knows what lies beneath can find the cause. Caches, for example, "
    "are invisible until a program's access pattern defeats them; then a loop that should take "
    "milliseconds takes seconds. Memory bandwidth, not arithmetic, limits many modern programs, "
    "which is why the same computation can run ten times faster when its data is laid out "
    "contiguously. In summary, the main lesson of this history is that"
)


def build_folders():
    config = json.loads((SHARED / "config.json").read_text())
    quantized = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32)
    fresh = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "transformers_version"}))
    missing, unexpected = fresh.load_state_dict(quantized.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert all("lm_head" in m for m in missing), missing
    fresh.tie_weights()
    for suffix, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        out = ROOT / "models" / f"SmolLM2-135M-Instruct-{suffix}"
        out.mkdir(parents=True, exist_ok=True)
        fresh.to(dtype).save_pretrained(out, safe_serialization=True)
        for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(SHARED / name, out / name)
        print(f"wrote {out}")
    fresh.to(torch.float32)


def make_reference():
    folder = ROOT / "models" / "SmolLM2-135M-Instruct-f32"
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(folder)
    prompts = dict(PROMPTS)
    prompts["chat"] = hf_tok.apply_chat_template(
        [{"role": "user", "content": CHAT_QUESTION}], tokenize=False, add_generation_prompt=True
    )
    prompts["long"] = LONG_TEXT
    cases = []
    for name, text in prompts.items():
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        generated, margins = [], []
        with torch.no_grad():
            out = model(torch.tensor([ids]), use_cache=True)
            for _ in range(NEW_TOKENS):
                logits = out.logits[0, -1]
                top = torch.topk(logits, 2)
                token = int(top.indices[0])
                generated.append(token)
                margins.append(round(float(top.values[0] - top.values[1]), 5))
                out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
        print(f"{name}: {len(ids)} prompt tokens -> {tokenizer.decode(generated)!r}")
        cases.append({"name": name, "prompt": ids, "generated": generated, "margins": margins})
    dest = ROOT / "tests" / "reference" / "smollm2_greedy.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({"model": "SmolLM2-135M-Instruct Q4_1 dequantized to F32", "cases": cases}, indent=1) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    build_folders()
    if "--reference" in sys.argv:
        make_reference()
