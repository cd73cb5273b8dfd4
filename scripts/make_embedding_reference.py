#!/usr/bin/env python3
"""Writes transformers' final hidden states for the tiny fixtures, the reference of tests/embed.rs.

For every fixture folder (tests/fixtures/{llama,qwen2,gpt2} and tests/fixtures/arch/<family>),
runs the model of model.safetensors on the tokens of its reference.safetensors with
`output_hidden_states=True` and writes embedding.safetensors beside it:
  hidden  [T, hidden] F32, the last entry of `hidden_states`: every token's state after the
          final norm (checked equal to the base model's `last_hidden_state`)

Needs torch and transformers. Not run by CI; the outputs are committed.
Usage: python3 scripts/make_embedding_reference.py [folder ...]
"""

import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from make_attention_reference import FIXTURES, FOLDERS


def main():
    for name in sys.argv[1:] or FOLDERS:
        folder = FIXTURES / name
        reference = load_file(str(folder / "reference.safetensors"))
        tokens = reference["tokens"].long()[None, :]
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), torch_dtype=torch.float32, attn_implementation="eager"
        ).eval()
        with torch.no_grad():
            out = model(tokens, output_hidden_states=True, use_cache=False)
            base = model.base_model(tokens, use_cache=False).last_hidden_state
        drift = (out.logits[0] - reference["logits"]).abs().max().item()
        assert drift < 1e-4, f"{name}: logits moved by {drift} from reference.safetensors"
        hidden = out.hidden_states[-1][0].contiguous()
        normed = (hidden - base[0]).abs().max().item()
        assert normed < 1e-6, f"{name}: hidden_states[-1] is not after the final norm ({normed})"
        save_file({"hidden": hidden}, str(folder / "embedding.safetensors"))
        print(f"{name}: hidden {tuple(hidden.shape)}, logits within {drift:.1e}")


if __name__ == "__main__":
    main()
