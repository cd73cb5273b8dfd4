#!/usr/bin/env python3
"""Writes the tiny fixture models of tests/fixtures/{llama,qwen2,gpt2} as GGUF files.

The files follow the layout llama.cpp's converter produces (so they test Ember's GGUF
mapping, not just its own round trip):
  - names blk.N.attn_q.weight, ffn_gate, token_embd, output_norm, ... (GPT-2: attn_qkv, ...);
  - `llama` Q/K rows permuted within each head for RoPE on adjacent pairs;
  - GPT-2's Conv1D matrices transposed to [n_out, n_in];
  - the byte-level BPE tokenizer as tokenizer.ggml.* (pre-tokenizer "gpt-2") and the chat
    template.
Outputs, in tests/fixtures/gguf/:
  llama.F32.gguf, qwen2.F32.gguf, gpt2.F32.gguf   same weights as the HF fixtures: Ember must
                                                   reproduce their reference logits
  llama.{Q8_0,Q4_0,Q4_1}.gguf                      2-D weights quantized by gguf-py
  reference.json                                   llama.cpp's logits for the quantized files
                                                   (when llama-cpp-python is installed)

Needs numpy, safetensors and gguf (pip install gguf); llama-cpp-python for reference.json.
Not run by CI; its outputs are committed. Usage: python3 scripts/make_gguf_fixtures.py
"""

import json
import pathlib

import gguf
import numpy as np
from safetensors.numpy import load_file

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "gguf"


def rope_pairs_adjacent(w, n_heads):
    """Reorders the rows of each head from (first half, second half) to interleaved pairs:
    row i of the first half and row i of the second half become rows 2i and 2i+1."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    return (
        w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def tokenizer_metadata(writer, folder, config):
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [None] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    specials = {t["id"] for t in tok["added_tokens"] if t["special"]}
    for t in tok["added_tokens"]:
        if t["id"] >= len(tokens):
            tokens.extend([None] * (t["id"] + 1 - len(tokens)))
        tokens[t["id"]] = t["content"]
    assert None not in tokens
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [
            gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL
            for i in range(len(tokens))
        ]
    )
    writer.add_token_merges(merges)
    by_text = {t: i for i, t in enumerate(tokens)}
    if tok_config.get("bos_token"):
        writer.add_bos_token_id(by_text[tok_config["bos_token"]])
    if tok_config.get("eos_token"):
        writer.add_eos_token_id(by_text[tok_config["eos_token"]])
    writer.add_add_bos_token(False)
    if tok_config.get("chat_template"):
        writer.add_chat_template(tok_config["chat_template"])


def llama_tensors(name, config, weights):
    n_heads = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_heads)
    permute = name == "llama"
    out = {"token_embd.weight": weights["model.embed_tokens.weight"]}
    out["output_norm.weight"] = weights["model.norm.weight"]
    if "lm_head.weight" in weights and not config.get("tie_word_embeddings"):
        out["output.weight"] = weights["lm_head.weight"]
    parts = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for key, value in weights.items():
        if not key.startswith("model.layers."):
            continue
        _, _, layer, rest = key.split(".", 3)
        stem, suffix = rest.rsplit(".", 1)
        if permute and stem == "self_attn.q_proj":
            value = rope_pairs_adjacent(value, n_heads)
        if permute and stem == "self_attn.k_proj":
            value = rope_pairs_adjacent(value, n_kv)
        out[f"blk.{layer}.{parts[stem]}.{suffix}"] = value
    return out


def llama3_rope_factors(rope, head_dim, config):
    """Llama 3 RoPE scaling as GGUF stores it: one divisor per frequency (rope_freqs)."""
    base = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    old_ctx = rope["original_max_position_embeddings"]
    low_wavelen = old_ctx / rope["low_freq_factor"]
    high_wavelen = old_ctx / rope["high_freq_factor"]
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * np.pi / (1.0 / base ** (i / head_dim))
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rope["factor"])
        else:
            smooth = (old_ctx / wavelen - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"]
            )
            factors.append(1.0 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def gpt2_tensors(config, weights):
    prefix = "transformer." if "transformer.wte.weight" in weights else ""
    out = {
        "token_embd.weight": weights[prefix + "wte.weight"],
        "position_embd.weight": weights[prefix + "wpe.weight"],
        "output_norm.weight": weights[prefix + "ln_f.weight"],
        "output_norm.bias": weights[prefix + "ln_f.bias"],
    }
    parts = {
        "ln_1": "attn_norm",
        "attn.c_attn": "attn_qkv",
        "attn.c_proj": "attn_output",
        "ln_2": "ffn_norm",
        "mlp.c_fc": "ffn_up",
        "mlp.c_proj": "ffn_down",
    }
    for key, value in weights.items():
        if not key.startswith(prefix + "h."):
            continue
        _, layer, rest = key[len(prefix) :].split(".", 2)
        stem, suffix = rest.rsplit(".", 1)
        if stem not in parts:
            continue  # attention mask buffers
        if suffix == "weight" and value.ndim == 2:
            value = value.T.copy()  # Conv1D [n_in, n_out] -> [n_out, n_in]
        out[f"blk.{layer}.{parts[stem]}.{suffix}"] = value
    return out


def write(name, qtype):
    folder = FIXTURES / name
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(folder / "model.safetensors")
    arch = {"llama": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}[name]
    path = OUT / f"{name}.{qtype.name}.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    if arch == "gpt2":
        hidden = config["n_embd"]
        writer.add_context_length(config["n_positions"])
        writer.add_embedding_length(hidden)
        writer.add_feed_forward_length(config.get("n_inner") or 4 * hidden)
        writer.add_block_count(config["n_layer"])
        writer.add_head_count(config["n_head"])
        writer.add_layer_norm_eps(config["layer_norm_epsilon"])
        tensors = gpt2_tensors(config, weights)
    else:
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_embedding_length(config["hidden_size"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_block_count(config["num_hidden_layers"])
        writer.add_head_count(config["num_attention_heads"])
        writer.add_head_count_kv(config.get("num_key_value_heads", config["num_attention_heads"]))
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
        rope_theta = (config.get("rope_parameters") or {}).get("rope_theta")
        writer.add_rope_freq_base(rope_theta or config.get("rope_theta", 10000.0))
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        writer.add_rope_dimension_count(head_dim)
        tensors = llama_tensors(name, config, weights)
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if rope.get("rope_type") == "llama3":
            tensors["rope_freqs.weight"] = llama3_rope_factors(rope, head_dim, config)
    writer.add_file_type(
        {"F32": 0, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}[qtype.name]
    )
    tokenizer_metadata(writer, folder, config)
    for tname, value in sorted(tensors.items()):
        value = value.astype(np.float32)
        if qtype != gguf.GGMLQuantizationType.F32 and value.ndim == 2:
            writer.add_tensor(tname, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(tname, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_logits(path, tokens):
    """llama.cpp's logits for every position of `tokens`."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1
    )
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def main():
    OUT.mkdir(exist_ok=True)
    Q = gguf.GGMLQuantizationType
    for name in ["llama", "qwen2", "gpt2"]:
        print("wrote", write(name, Q.F32))
    quantized = [write("llama", q) for q in (Q.Q8_0, Q.Q4_0, Q.Q4_1)]
    for p in quantized:
        print("wrote", p)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python missing: reference.json not written")
        return
    # The first tokens of the HF fixture's reference, so llama.cpp's F32 logits can be
    # compared with transformers' too.
    tokens = [int(t) for t in load_file(FIXTURES / "llama" / "reference.safetensors")["tokens"][:24]]
    reference = {"tokens": tokens, "logits": {}}
    for p in [OUT / "llama.F32.gguf"] + quantized:
        reference["logits"][p.name] = llama_cpp_logits(p, tokens).round(6).tolist()
    (OUT / "reference.json").write_text(json.dumps(reference))
    print("wrote", OUT / "reference.json")


if __name__ == "__main__":
    main()
