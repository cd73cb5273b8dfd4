#!/usr/bin/env python3
"""Makes tiny random models of every architecture family in tests/fixtures/arch/<family>/.

Each folder holds what a user downloads, in both formats, and the references Ember is held to:
  config.json, model.safetensors        saved by transformers (F32)
  tokenizer.json, tokenizer_config.json a tiny tokenizer of the family's kind (byte-level BPE
                                        with the family's pre-tokenizer, or Gemma's
                                        SentencePiece model with byte fallback)
  model.gguf                            made by llama.cpp's own convert_hf_to_gguf.py (F32);
                                        the converter names a BPE pre-tokenizer by hashing a
                                        real vocabulary's output, so it is told the name
  reference.safetensors                 tokens [T]; logits [T, vocab] of transformers (eager
                                        attention, F32); llamacpp [T, vocab], llama.cpp's logits
                                        on model.gguf (n_ctx 256, F32 cache, no flash
                                        attention); Phi-3 also short_logits, the
                                        first SHORT tokens alone (LongRoPE's short factors)
  tokens.json                           the HF tokenizer's ids for a corpus of texts (the
                                        tokenizer tests' corpus and a few more), and the chat
                                        template applied to a conversation (text and ids)

The configurations exercise what each family changes relative to Llama, with inputs longer
than the sliding windows (T = 40, windows of 8). Needs torch, transformers, sentencepiece,
protobuf, llama-cpp-python and the llama.cpp sources (scripts/llamacpp_source.py). Not run by
CI; the outputs are committed. Usage: python3 scripts/make_arch_fixtures.py [family ...]
"""

import json
import pathlib
import runpy
import shutil
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from llamacpp_run import logits as llamacpp_logits  # noqa: E402
from llamacpp_source import llama_cpp_dir  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "arch"
SEQ_LEN = 40
SHORT = 24
BPE_VOCAB = 320

TRAINING_TEXT = [
    "Once upon a time there was a little robot who wanted to learn how to speak.",
    "The quick brown fox jumps over the lazy dog. 0123456789 I've, you'll, we'd.",
    "def main():\n    print('hello, world')\n\treturn 42\n",
    "Émilie a mangé une crème brûlée. 日本語のテキスト。 😀 emoji CamelCaseWords HTTPServer",
]

# Texts the tokenizers are compared on (GGUF metadata vs the Hugging Face files).
CORPUS = [
    "Hello world",
    " leading space and  double  spaces",
    "The quick brown fox jumps over the lazy dog.",
    "numbers 1 12 123 1234 12345 and 3.14159",
    "I've been told he's there, 'RE you sure? We'Ve a'lL",
    "CamelCaseWords HTTPServer iPhone McDonald's",
    "tabs\tand\nnew\n\nlines\r\n",
    "Émilie a mangé une crème brûlée.",
    "日本語のテキスト。 😀🦙 emoji",
    "def main():\n    print('hello, world')\n",
    "<|im_start|>user\nhi<|im_end|>",
    "<start_of_turn>model\nok<end_of_turn>",
    "",
]

# The conversation each family's chat template renders.
CHAT = [
    {"role": "user", "content": "Hello! Who are you?"},
    {"role": "assistant", "content": "I am Bram, the blacksmith."},
    {"role": "user", "content": "Sell me a sword, 40 gold."},
]

# The `Split` regexes of the Hugging Face tokenizer.json files of these pre-tokenizers.
LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
O200K_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA_CHAT = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def bpe_tokenizer(pre, specials, bos=None):
    """A byte-level BPE trained by Hugging Face tokenizers with the pre-tokenizer `pre` names."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    if pre == "refact":  # StarCoder-style: single digits, then GPT-2's byte-level regex
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    else:
        regex = {"qwen2": QWEN2_REGEX, "llama-bpe": LLAMA3_REGEX, "smaug-bpe": LLAMA3_REGEX, "gpt-4o": O200K_REGEX}[pre]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT * 20, trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    assert tok.get_vocab_size() <= BPE_VOCAB, tok.get_vocab_size()
    return tok


def save_bpe(folder, pre, specials, bos, eos, template):
    tok = bpe_tokenizer(pre, specials, bos)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        # Phi-4-mini's class, which llama.cpp's Phi-3 converter reads as "byte-level BPE".
        "tokenizer_class": "GPT2Tokenizer" if pre == "gpt-4o" else "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "add_bos_token": bos is not None,
        "clean_up_tokenization_spaces": False,
        "chat_template": template,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return tok.get_vocab_size(), tok.token_to_id(eos)


def save_gemma_tokenizer(folder):
    """Gemma's kind of tokenizer: a SentencePiece BPE with byte fallback, no dummy prefix and
    its control tokens, as tokenizer.model (which llama.cpp's converter reads) and as the
    tokenizer.json transformers converts it to (which Ember reads from the folder)."""
    import sentencepiece as spm
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        prefix = pathlib.Path(tmp) / "sp"
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(TRAINING_TEXT * 20),
            model_prefix=str(prefix),
            vocab_size=360,
            model_type="bpe",
            byte_fallback=True,
            pad_id=0, eos_id=1, bos_id=2, unk_id=3,
            pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
            control_symbols=["<start_of_turn>", "<end_of_turn>"],
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=1.0,
            minloglevel=2,
        )
        shutil.copy(f"{prefix}.model", folder / "tokenizer.model")
    config = {
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": None, "add_bos_token": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.chat_template = GEMMA_CHAT
    tok.save_pretrained(folder)
    return len(tok), tok.convert_tokens_to_ids("<end_of_turn>")


def families():
    import transformers as T

    common = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
    )
    chatml = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return {
        # head_dim decoupled from hidden / heads: Q is 4 x 16 = 64 wide over a hidden size of 32.
        "qwen3": dict(
            model=T.Qwen3ForCausalLM, config=lambda v, e: T.Qwen3Config(
                vocab_size=v, head_dim=16, rope_theta=1e6, tie_word_embeddings=True, eos_token_id=e, **common),
            tokenizer=("qwen2", chatml + ["<think>", "</think>"], None, "<|im_end|>", CHATML)),
        "gemma2": dict(
            model=T.Gemma2ForCausalLM, config=lambda v, e: T.Gemma2Config(
                vocab_size=v, head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
                attn_logit_softcapping=50.0, final_logit_softcapping=30.0, eos_token_id=e,
                pad_token_id=0, bos_token_id=2, **common),
            tokenizer="gemma", zero_centred_norms=True),
        # Six layers: llama.cpp assumes Gemma 3's pattern of five sliding layers, then a full one.
        "gemma3": dict(
            model=T.Gemma3ForCausalLM, config=lambda v, e: T.Gemma3TextConfig(
                vocab_size=v, head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
                rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
                eos_token_id=e, pad_token_id=0, bos_token_id=2, **{**common, "num_hidden_layers": 6}),
            tokenizer="gemma", zero_centred_norms=True),
        # Partial rotary (6 of 8 dims), LongRoPE with a short original context.
        "phi3": dict(
            model=T.Phi3ForCausalLM, config=lambda v, e: T.Phi3Config(
                vocab_size=v, partial_rotary_factor=0.75, original_max_position_embeddings=32,
                rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.3, 2.1], "long_factor": [1.7, 4.0, 9.5]},
                sliding_window=None, tie_word_embeddings=True, eos_token_id=e, pad_token_id=0, bos_token_id=None, **common),
            tokenizer=("gpt-4o", ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], None, "<|end|>",
                       "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
                       "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")),
        "smollm3": dict(
            model=T.SmolLM3ForCausalLM, config=lambda v, e: T.SmolLM3Config(
                vocab_size=v, rope_theta=5e6, eos_token_id=e, pad_token_id=None, bos_token_id=None, **common),
            tokenizer=("smaug-bpe", chatml, None, "<|im_end|>", CHATML)),
        "granite": dict(
            model=T.GraniteForCausalLM, config=lambda v, e: T.GraniteConfig(
                vocab_size=v, embedding_multiplier=12.0, attention_multiplier=0.25, residual_multiplier=0.22,
                logits_scaling=8.0, tie_word_embeddings=True, eos_token_id=e, bos_token_id=None, pad_token_id=None, **common),
            tokenizer=("refact", ["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>"], None, "<|end_of_text|>",
                       "{% for m in messages %}{{ '<|start_of_role|>' + m['role'] + '<|end_of_role|>' + m['content'] + '<|end_of_text|>\n' }}{% endfor %}")),
        # Every layer slides (window 8 over 40 tokens); llama.cpp's GGUF has no key for it.
        "mistral": dict(
            model=T.MistralForCausalLM, config=lambda v, e: T.MistralConfig(
                vocab_size=v, sliding_window=8, eos_token_id=e, bos_token_id=None, pad_token_id=None, **common),
            tokenizer=("llama-bpe", ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", CHATML)),
        # Llama 3.2's configuration: tied embeddings and llama3 RoPE scaling.
        "llama32": dict(
            model=T.LlamaForCausalLM, config=lambda v, e: T.LlamaConfig(
                vocab_size=v, tie_word_embeddings=True, rope_theta=500000.0,
                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 32},
                eos_token_id=e, bos_token_id=None, pad_token_id=None, **common),
            tokenizer=("llama-bpe", ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", CHATML)),
    }


def randomise(model, seed, zero_centred_norms):
    """Replaces the default (tiny) initialisation with weights large enough to matter."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.15
            if "norm" in name:
                p.copy_(noise if zero_centred_norms else 1.0 + noise)
            else:
                p.copy_(noise)


def convert(folder, out, pre):
    source = llama_cpp_dir()
    sys.path.insert(0, str(source))
    import conversion.base

    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
    argv = sys.argv
    # A neutral name: llama.cpp gives tokens of models named "phi3" attributes by name.
    sys.argv = ["convert_hf_to_gguf.py", str(folder), "--outfile", str(out), "--outtype", "f32",
                "--model-name", "tiny random model"]
    try:
        runpy.run_path(str(source / "convert_hf_to_gguf.py"), run_name="__main__")
    finally:
        sys.argv = argv


def make(name, spec, seed):
    import torch
    import transformers
    from safetensors.torch import save_file

    folder = OUT / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if spec["tokenizer"] == "gemma":
        vocab, eos = save_gemma_tokenizer(folder)
        pre = None
    else:
        pre, specials, bos, eos_text, template = spec["tokenizer"]
        vocab, eos = save_bpe(folder, pre, specials, bos, eos_text, template)
    config = spec["config"](vocab, eos)
    torch.manual_seed(seed)
    model = spec["model"](config).eval()
    randomise(model, seed, spec.get("zero_centred_norms", False))
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "generation_config.json").unlink(missing_ok=True)

    tokens = torch.randint(0, vocab, (SEQ_LEN,), generator=torch.Generator().manual_seed(seed + 1))
    reloaded = spec["model"].from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        reference = {
            "tokens": tokens.to(torch.int64),
            "logits": reloaded(tokens[None, :]).logits[0].float().contiguous(),
        }
        if name == "phi3":
            reference["short_logits"] = reloaded(tokens[None, :SHORT]).logits[0].float().contiguous()

    gguf_path = folder / "model.gguf"
    convert(folder, gguf_path, pre)
    reference["llamacpp"] = torch.from_numpy(llamacpp_logits(gguf_path, tokens.tolist(), exact=True))
    save_file(reference, folder / "reference.safetensors")

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    corpus = json.loads((ROOT / "tests" / "fixtures" / "tokenizers" / "corpus.json").read_text())
    ids = {text: tok(text)["input_ids"] for text in CORPUS + corpus}
    chat = {
        "messages": CHAT,
        "text": tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
        "ids": list(tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False)),
    }
    (folder / "tokens.json").write_text(json.dumps({"encode": ids, "chat": chat}, ensure_ascii=False) + "\n")
    if spec["tokenizer"] == "gemma":
        (folder / "tokenizer.model").unlink()  # in the GGUF file; Ember reads tokenizer.json

    diff = (reference["llamacpp"] - reference["logits"]).abs().max().item()
    print(f"{name}: vocab {vocab}, max |logit| {reference['logits'].abs().max():.3f}, "
          f"llama.cpp vs transformers {diff:.2e}")


def main():
    torch_threads()
    specs = families()
    names = sys.argv[1:] or list(specs)
    for i, name in enumerate(specs):
        if name in names:
            make(name, specs[name], seed=100 + 10 * i)
    (OUT / "README.md").write_text(
        "Tiny random models of each architecture family, as Hugging Face folders and as GGUF files made by\n"
        "llama.cpp's converter, with transformers' and llama.cpp's logits.\n"
        "Made by `scripts/make_arch_fixtures.py`; do not edit by hand.\n"
    )


def torch_threads():
    import torch

    torch.set_num_threads(2)


if __name__ == "__main__":
    main()
