//! Granite 3: Llama with four multipliers: on the token embeddings, on q·k (replacing
//! `1/√head_dim`), on each block's attention and feed-forward outputs before the residual
//! adds, and a divisor of the output logits. GGUF Q/K rows are permuted as Llama's.

use serde_json::Value;

use super::{
    build_llama, get_f32, gguf_llama_like, gguf_rope_freqs, hf_llama_like, no_attention_bias,
    Family, GgufKeys, LLAMA_HF_NAMES,
};
use crate::error::Result;
use crate::loader::gguf::GgufMetadata;
use crate::model::config::{Architecture, ModelConfig};
use crate::model::names::Weights;

/// Granite.
pub(crate) const FAMILY: Family = Family {
    arch: Architecture::Granite,
    hf_classes: &["GraniteForCausalLM"],
    hf_model_types: &["granite"],
    gguf_name: "granite",
    hf_names: &LLAMA_HF_NAMES,
    hf_config,
    gguf_config,
    build: build_llama,
};

fn hf_config(json: &Value) -> Result<ModelConfig> {
    let mut c = hf_llama_like(json, Architecture::Granite)?;
    no_attention_bias(json, c.architecture)?;
    c.embedding_scale = get_f32(json, "embedding_multiplier")?.unwrap_or(1.0);
    c.attention_scale = get_f32(json, "attention_multiplier")?.unwrap_or(c.attention_scale);
    c.residual_scale = get_f32(json, "residual_multiplier")?.unwrap_or(1.0);
    c.logit_scale = get_f32(json, "logits_scaling")?.unwrap_or(1.0);
    Ok(c)
}

fn gguf_config(meta: &GgufMetadata, w: &mut Weights) -> Result<ModelConfig> {
    let mut c = gguf_llama_like(meta, w, Architecture::Granite)?;
    let k = GgufKeys {
        meta,
        arch: FAMILY.gguf_name,
    };
    c.rope_interleaved = true;
    // The converter writes each multiplier only when it is not zero; llama.cpp treats a
    // missing one as "no scaling".
    let nonzero = |v: Option<f32>| v.filter(|v| *v != 0.0);
    c.embedding_scale = nonzero(k.f32("embedding_scale")?).unwrap_or(1.0);
    c.attention_scale = nonzero(k.f32("attention.scale")?).unwrap_or(c.attention_scale);
    c.residual_scale = nonzero(k.f32("residual_scale")?).unwrap_or(1.0);
    c.logit_scale = nonzero(k.f32("logit_scale")?).unwrap_or(1.0);
    gguf_rope_freqs(w, &mut c)?;
    Ok(c)
}
