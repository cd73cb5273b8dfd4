#!/usr/bin/env python3
"""Writes transformers' attention weights for the tiny fixtures, the reference of tests/attention.rs.

For every fixture folder (tests/fixtures/{llama,qwen2,gpt2} and tests/fixtures/arch/<family>),
runs the model of model.safetensors on the tokens of its reference.safetensors with eager
attention and `output_attentions=True`, and writes attention.safetensors beside it:
  attentions  [layers, heads, T, T] F32, the softmax weights of every query over every key
              (0 for masked keys: later ones, and ones outside a sliding window)

Needs torch and transformers. Not run by CI; the outputs are committed.
Usage: python3 scripts/make_attention_reference.py [folder ...]
"""

import pathlib
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
FOLDERS = ["llama", "qwen2", "gpt2"] + [
    f"arch/{p.name}" for p in sorted((FIXTURES / "arch").iterdir()) if p.is_dir()
]


def main():
    for name in sys.argv[1:] or FOLDERS:
        folder = FIXTURES / name
        reference = load_file(str(folder / "reference.safetensors"))
        tokens = reference["tokens"].long()
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), torch_dtype=torch.float32, attn_implementation="eager"
        ).eval()
        with torch.no_grad():
            out = model(tokens[None, :], output_attentions=True, use_cache=False)
        # The same model as the logits reference was made from.
        drift = (out.logits[0] - reference["logits"]).abs().max().item()
        assert drift < 1e-4, f"{name}: logits moved by {drift} from reference.safetensors"
        attentions = torch.stack([a[0] for a in out.attentions]).contiguous()
        save_file({"attentions": attentions}, str(folder / "attention.safetensors"))
        print(f"{name}: attentions {tuple(attentions.shape)}, logits within {drift:.1e}")


if __name__ == "__main__":
    main()
