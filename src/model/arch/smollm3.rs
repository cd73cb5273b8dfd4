//! SmolLM3: Llama without rotary embeddings on some layers ("NoPE"): those `no_rope_layers`
//! marks 0 in config.json (by default every fourth, from the fourth). GGUF files carry no key
//! for it; llama.cpp hard-codes every fourth layer for the `smollm3` architecture, and so does
//! Ember. GGUF Q/K rows are permuted as Llama's (on every layer, NoPE ones included).

use serde_json::Value;

use super::{
    build_llama, get_usize, gguf_llama_like, hf_layer_kinds, hf_llama_like, hf_optional_window,
    no_attention_bias, Family, LLAMA_HF_NAMES,
};
use crate::error::{Error, Result};
use crate::loader::gguf::GgufMetadata;
use crate::model::config::{Architecture, ModelConfig};
use crate::model::names::Weights;

/// SmolLM3.
pub(crate) const FAMILY: Family = Family {
    arch: Architecture::SmolLM3,
    hf_classes: &["SmolLM3ForCausalLM"],
    hf_model_types: &["smollm3"],
    gguf_name: "smollm3",
    hf_names: &LLAMA_HF_NAMES,
    hf_config,
    gguf_config,
    build: build_llama,
};

/// The default NoPE rule: no RoPE on layers `interval - 1`, `2 * interval - 1`, ...
fn rope_by_default(layer: usize, interval: usize) -> bool {
    (layer + 1) % interval != 0
}

fn hf_config(json: &Value) -> Result<ModelConfig> {
    let mut c = hf_llama_like(json, Architecture::SmolLM3)?;
    no_attention_bias(json, c.architecture)?;
    c.tie_word_embeddings = super::get_bool(json, "tie_word_embeddings").unwrap_or(true);
    let interval = get_usize(json, "no_rope_layer_interval")?
        .unwrap_or(4)
        .max(1);
    let uses_rope: Vec<bool> = match json.get("no_rope_layers").and_then(Value::as_array) {
        Some(flags) if flags.len() == c.n_layers => flags
            .iter()
            .map(|f| f.as_u64().map(|v| v != 0))
            .collect::<Option<_>>()
            .ok_or_else(|| Error::format("config: no_rope_layers must hold 0 or 1"))?,
        Some(flags) => {
            return Err(Error::format(format!(
                "config: {} no_rope_layers for {} layers",
                flags.len(),
                c.n_layers
            )))
        }
        None => (0..c.n_layers)
            .map(|i| rope_by_default(i, interval))
            .collect(),
    };
    // transformers: only NoPE layers slide, and only with `use_sliding_window`.
    let window = hf_optional_window(json)?;
    c.layers = hf_layer_kinds(json, c.n_layers, window, &|i| !uses_rope[i])?;
    for (layer, rope) in c.layers.iter_mut().zip(uses_rope) {
        layer.rope = rope;
    }
    Ok(c)
}

fn gguf_config(meta: &GgufMetadata, w: &mut Weights) -> Result<ModelConfig> {
    let mut c = gguf_llama_like(meta, w, Architecture::SmolLM3)?;
    c.rope_interleaved = true;
    for (i, layer) in c.layers.iter_mut().enumerate() {
        layer.rope = rope_by_default(i, 4);
    }
    Ok(c)
}
