//! Qwen3: Llama with RMSNorm on each head's queries and keys (before RoPE), and a head width
//! of its own (Qwen3-0.6B: 16 heads of 128 over a hidden size of 1024).
//!
//! - Sliding windows as in Qwen2 (`use_sliding_window`, off in released models).
//! - GGUF files keep Hugging Face's Q/K row order.

use serde_json::Value;

use super::qwen2::qwen_layers;
use super::{
    build_llama, gguf_llama_like, hf_llama_like, no_attention_bias, Family, LLAMA_HF_NAMES,
};
use crate::error::Result;
use crate::loader::gguf::GgufMetadata;
use crate::model::config::{Architecture, ModelConfig};
use crate::model::names::Weights;

/// Qwen3.
pub(crate) const FAMILY: Family = Family {
    arch: Architecture::Qwen3,
    hf_classes: &["Qwen3ForCausalLM"],
    hf_model_types: &["qwen3"],
    gguf_name: "qwen3",
    hf_names: &LLAMA_HF_NAMES,
    hf_config,
    gguf_config,
    build: build_llama,
};

fn hf_config(json: &Value) -> Result<ModelConfig> {
    let mut c = hf_llama_like(json, Architecture::Qwen3)?;
    no_attention_bias(json, c.architecture)?;
    c.qk_norm = true;
    qwen_layers(json, &mut c)?;
    Ok(c)
}

fn gguf_config(meta: &GgufMetadata, w: &mut Weights) -> Result<ModelConfig> {
    let mut c = gguf_llama_like(meta, w, Architecture::Qwen3)?;
    c.qk_norm = true;
    Ok(c)
}
