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
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
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
VOCAB = 320  # 256 byte tokens, 3 special tokens, 61 merges

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TRAINING_TEXT = [
    "Once upon a time there was a little robot who wanted to learn how to speak.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "def main():\n    print('hello, world')\n",
    "Émilie a mangé une crème brûlée. 日本語のテキスト。 😀 emoji",
]


def train_tokenizer():
    """A byte-level BPE small enough for the tiny models, trained by Hugging Face tokenizers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT * 20, trainer)
    assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()
    return tok


def save_tokenizer(tok, folder):
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")


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


def save_fixture(name, model_class, config, seed, dtypes, tokenizer):
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
        # Keep only what Ember reads: config.json, model.safetensors, reference, tokenizer.
        for extra in folder.iterdir():
            if extra.name not in ("config.json", "model.safetensors", "reference.safetensors"):
                extra.unlink()
        save_tokenizer(tokenizer, folder)
        print(f"{folder}: logits {tuple(logits.shape)}, max |logit| {logits.abs().max():.3f}")
        model.to(torch.float32)


def main():
    tokenizer = train_tokenizer()
    save_fixture(
        "llama",
        LlamaForCausalLM,
        LlamaConfig(
            vocab_size=VOCAB,
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
        tokenizer=tokenizer,
    )
    save_fixture(
        "qwen2",
        Qwen2ForCausalLM,
        Qwen2Config(
            vocab_size=VOCAB,
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
        tokenizer=tokenizer,
    )
    save_fixture(
        "gpt2",
        GPT2LMHeadModel,
        GPT2Config(
            vocab_size=VOCAB,
            n_embd=36,
            n_layer=2,
            n_head=3,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
        ),
        seed=30,
        dtypes=["f32", "f16"],
        tokenizer=tokenizer,
    )
    (OUT / "README.md").write_text(
        "Tiny random models saved by Hugging Face transformers, with reference logits.\n"
        "Made by `scripts/make_fixtures.py`; do not edit by hand.\n"
        + json.dumps({"torch": torch.__version__, "transformers": __import__("transformers").__version__})
        + "\n"
    )


if __name__ == "__main__":
    main()
