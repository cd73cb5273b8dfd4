//! Llama 2/3/3.2, SmolLM/SmolLM2, TinyLlama and Mistral: the family the others are told
//! relative to. RMSNorm, RoPE (Llama 3 scaling), grouped-query attention, SwiGLU.
//!
//! - Mistral's `sliding_window` makes every layer slide (it is never the context length).
//! - GGUF files hold Q and K rows permuted for RoPE on adjacent pairs, and Llama 3 scaling as
//!   the `rope_freqs` tensor.

use serde_json::Value;

use super::{
    build_llama, gguf_llama_like, gguf_rope_freqs, hf_layer_kinds, hf_llama_like,
    no_attention_bias, Family, LLAMA_HF_NAMES,
};
use crate::error::Result;
use crate::loader::gguf::GgufMetadata;
use crate::model::config::{Architecture, ModelConfig};
use crate::model::names::Weights;

/// Llama.
pub(crate) const FAMILY: Family = Family {
    arch: Architecture::Llama,
    hf_classes: &["LlamaForCausalLM", "MistralForCausalLM"],
    hf_model_types: &["llama", "mistral"],
    gguf_name: "llama",
    hf_names: &LLAMA_HF_NAMES,
    hf_config,
    gguf_config,
    build: build_llama,
};

fn hf_config(json: &Value) -> Result<ModelConfig> {
    let mut c = hf_llama_like(json, Architecture::Llama)?;
    no_attention_bias(json, c.architecture)?;
    let window = super::get_usize(json, "sliding_window")?;
    c.layers = hf_layer_kinds(json, c.n_layers, window, &|_| true)?;
    Ok(c)
}

fn gguf_config(meta: &GgufMetadata, w: &mut Weights) -> Result<ModelConfig> {
    let mut c = gguf_llama_like(meta, w, Architecture::Llama)?;
    c.rope_interleaved = true;
    gguf_rope_freqs(w, &mut c)?;
    Ok(c)
}
