#!/usr/bin/env python3
"""Writes tiny GGUF files in every quantization mix llama.cpp's quantizer makes, with
llama.cpp's logits on them, for tests/gguf.rs.

A random Llama whose rows are whole 256-value super-blocks (hidden 256, FFN 512, 1 layer,
GQA, tied embeddings, the tiny fixtures' tokenizer) is saved by transformers, converted to an
F32 GGUF by llama.cpp's own convert_hf_to_gguf.py (the pre-tokenizer, which the converter
identifies by hashing a real vocabulary's output, is set to "gpt-2"), and quantized by
llama.cpp's llama_model_quantize to each mix. Every mix's types are what llama.cpp puts in
users' files (e.g. Q4_K_M: Q4_K with Q6_K for some attn_v/ffn_down and the tied output).

Outputs, in tests/fixtures/kquant/:
  <MIX>.gguf        Q4_K_M, Q5_K_M, Q6_K, Q3_K_M, Q2_K, IQ4_NL, IQ4_XS, Q5_0, Q5_1
  reference.json    tokens; llama.cpp's logits on the F32 file and on each mix; each mix's
                    tensor types (counts)

Needs torch, transformers, numpy, sentencepiece, llama-cpp-python (its quantizer and its
runtime) and the llama.cpp sources (scripts/llamacpp_source.py). Not run by CI.
Usage: python3 scripts/make_kquant_fixtures.py
"""

import collections
import json
import pathlib
import runpy
import shutil
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from llamacpp_run import logits  # noqa: E402
from llamacpp_source import llama_cpp_dir  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "kquant"
MIXES = ["Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K", "IQ4_NL", "IQ4_XS", "Q5_0", "Q5_1"]


def make_hf_model(folder):
    import torch
    import transformers

    torch.manual_seed(256)
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # weights large enough for the logits to mean something
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURES / "llama" / name, folder / name)


def convert(folder, out):
    source = llama_cpp_dir()
    sys.path.insert(0, str(source))
    import conversion.base

    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    argv = sys.argv
    sys.argv = ["convert_hf_to_gguf.py", str(folder), "--outfile", str(out), "--outtype", "f32"]
    try:
        runpy.run_path(str(source / "convert_hf_to_gguf.py"), run_name="__main__")
    finally:
        sys.argv = argv


def quantize(src, dst, mix):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    assert status == 0, (mix, status)


def type_counts(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    return dict(collections.Counter(t.tensor_type.name for t in reader.tensors))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    tokens = list(range(3, 19))
    reference = {"tokens": tokens, "logits": {}, "types": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        make_hf_model(tmp / "hf")
        f32 = tmp / "F32.gguf"
        convert(tmp / "hf", f32)
        reference["logits"]["F32"] = logits(f32, tokens).round(4).tolist()
        for mix in MIXES:
            path = OUT / f"{mix}.gguf"
            quantize(f32, path, mix)
            reference["types"][mix] = type_counts(path)
            reference["logits"][mix] = logits(path, tokens).round(4).tolist()
            print(mix, reference["types"][mix])
    (OUT / "reference.json").write_text(json.dumps(reference) + "\n")


if __name__ == "__main__":
    main()
