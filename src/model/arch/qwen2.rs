//! Qwen2 / Qwen2.5: Llama plus biases on the query, key and value projections.
//!
//! - Sliding windows only with `use_sliding_window` (off in released models), on the layers
//!   from `max_window_layers` on.
//! - GGUF files keep Hugging Face's Q/K row order (RoPE on pairs half a head apart).

use serde_json::Value;

use super::{
    build_llama, get_usize, gguf_llama_like, hf_layer_kinds, hf_llama_like, hf_optional_window,
    Family, LLAMA_HF_NAMES,
};
use crate::error::Result;
use crate::loader::gguf::GgufMetadata;
use crate::model::config::{Architecture, ModelConfig};
use crate::model::names::Weights;

/// Qwen2.
pub(crate) const FAMILY: Family = Family {
    arch: Architecture::Qwen2,
    hf_classes: &["Qwen2ForCausalLM"],
    hf_model_types: &["qwen2"],
    gguf_name: "qwen2",
    hf_names: &LLAMA_HF_NAMES,
    hf_config,
    gguf_config,
    build: build_llama,
};

/// The layers of a Qwen config: `layer_types`, else sliding from `max_window_layers` on when
/// `use_sliding_window` is set. Shared with Qwen3.
pub(crate) fn qwen_layers(json: &Value, c: &mut ModelConfig) -> Result<()> {
    let from = get_usize(json, "max_window_layers")?.unwrap_or(c.n_layers);
    c.layers = hf_layer_kinds(json, c.n_layers, hf_optional_window(json)?, &|i| i >= from)?;
    Ok(())
}

fn hf_config(json: &Value) -> Result<ModelConfig> {
    let mut c = hf_llama_like(json, Architecture::Qwen2)?;
    c.qkv_bias = true;
    qwen_layers(json, &mut c)?;
    Ok(c)
}

fn gguf_config(meta: &GgufMetadata, w: &mut Weights) -> Result<ModelConfig> {
    let mut c = gguf_llama_like(meta, w, Architecture::Qwen2)?;
    c.qkv_bias = true;
    Ok(c)
}
