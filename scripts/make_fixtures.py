#!/usr/bin/env python3
"""Makes the tiny reference models in tests/fixtures/ with Hugging Face transformers.

Each fixture folder holds a randomly initialised model saved by transformers
(config.json + model.safetensors) and reference.safetensors with:
  tokens  [T]          int64  the input ids
  logits  [T, vocab]   f32    transformers' logits for every position (eager attention, f32)

F16/BF16 variants hold the same model rounded to that dtype; their reference is computed in
f32 on the rounded weights, which is what Ember computes too.

Needs torch and transformers (pip install torch transformers); not run by CI. Its outputs
are committed. Usage: python3 scripts/make_fixtures.py [out_dir]
"""

import json
import pathlib
import sys

import torch
from safetensors.torch import save_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

OUT = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")
SEQ_LEN = 20


def randomise(model, seed):
    """Replaces the default (tiny) initialisation with weights large enough to matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.15
            if "norm" in name or ".ln_" in name or name.endswith("ln_f.weight"):
                p.copy_(1.0 + noise if name.endswith("weight") else noise)
            else:
                p.copy_(noise)


def save_fixture(name, model_class, config, seed, dtypes):
    torch.manual_seed(seed)
    model = model_class(config).eval()
    randomise(model, seed)
    tokens = torch.randint(0, config.vocab_size, (SEQ_LEN,), generator=torch.Generator().manual_seed(seed + 1))
    for dtype_name in dtypes:
        dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
        folder = OUT / (name if dtype_name == "f32" else f"{name}-{dtype_name}")
        folder.mkdir(parents=True, exist_ok=True)
        model.to(dtype).save_pretrained(folder, safe_serialization=True)
        # Reference: the saved (rounded) weights, computed in f32.
        reloaded = model_class.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            logits = reloaded(tokens[None, :]).logits[0].float().contiguous()
        save_file({"tokens": tokens.to(torch.int64), "logits": logits}, folder / "reference.safetensors")
        # Keep only what Ember reads: config.json, model.safetensors, reference.
        for extra in folder.iterdir():
            if extra.name not in ("config.json", "model.safetensors", "reference.safetensors"):
                extra.unlink()
        print(f"{folder}: logits {tuple(logits.shape)}, max |logit| {logits.abs().max():.3f}")
        model.to(torch.float32)


def main():
    save_fixture(
        "llama",
        LlamaForCausalLM,
        LlamaConfig(
            vocab_size=200,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            # Llama 3 scaling with a short original context, so it changes some frequencies.
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        ),
        seed=10,
        dtypes=["f32", "f16", "bf16"],
    )
    save_fixture(
        "qwen2",
        Qwen2ForCausalLM,
        Qwen2Config(
            vocab_size=200,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=1,
            max_position_embeddings=128,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            use_sliding_window=False,
            bos_token_id=1,
            eos_token_id=2,
        ),
        seed=20,
        dtypes=["f32", "bf16"],
    )
    save_fixture(
        "gpt2",
        GPT2LMHeadModel,
        GPT2Config(
            vocab_size=200,
            n_embd=36,
            n_layer=2,
            n_head=3,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
        ),
        seed=30,
        dtypes=["f32", "f16"],
    )
    (OUT / "README.md").write_text(
        "Tiny random models saved by Hugging Face transformers, with reference logits.\n"
        "Made by `scripts/make_fixtures.py`; do not edit by hand.\n"
        + json.dumps({"torch": torch.__version__, "transformers": __import__("transformers").__version__})
        + "\n"
    )


if __name__ == "__main__":
    main()
