//! Phi-3 / Phi-3.5 / Phi-4-mini: Llama with
//! - fused projections: `qkv_proj` (queries, keys, values) and `gate_up_proj` (gate rows
//!   first), split as views of the one matrix;
//! - partial rotary embeddings (`partial_rotary_factor`: Phi-4-mini rotates 96 of 128);
//! - LongRoPE: per-frequency divisors for short and long contexts, and a factor on cos and
//!   sin. Like llama.cpp, Ember chooses once per session, by its context length (the long
//!   factors when it exceeds the original context); transformers chooses per call, by the
//!   longest position.
//! - `sliding_window` on every layer (Phi-3-mini-4k: 2047), honoured from either format
//!   (llama.cpp ignores it).

use serde_json::Value;

use super::{
    build_llama, get_usize, gguf_llama_like, hf_layer_kinds, hf_llama_like, Family, GgufKeys,
    LLAMA_IGNORED,
};
use crate::error::Result;
use crate::loader::gguf::GgufMetadata;
use crate::model::config::{Architecture, ModelConfig, RopeScaling};
use crate::model::names::{HfNames, Part, Role, Weights};

/// Phi-3.
pub(crate) const FAMILY: Family = Family {
    arch: Architecture::Phi3,
    hf_classes: &["Phi3ForCausalLM"],
    hf_model_types: &["phi3"],
    gguf_name: "phi3",
    hf_names: &HfNames {
        layer_prefix: "model.layers.{}.",
        names: &[
            (Role::TokenEmbd, "model.embed_tokens"),
            (Role::OutputNorm, "model.norm"),
            (Role::Output, "lm_head"),
            (Role::AttnNorm, "input_layernorm"),
            (Role::AttnQkv, "self_attn.qkv_proj"),
            (Role::AttnOutput, "self_attn.o_proj"),
            (Role::FfnNorm, "post_attention_layernorm"),
            (Role::FfnUp, "mlp.gate_up_proj"),
            (Role::FfnDown, "mlp.down_proj"),
        ],
        optional_prefix: None,
        ignored_suffixes: LLAMA_IGNORED,
    },
    hf_config,
    gguf_config,
    build: build_llama,
};

fn hf_config(json: &Value) -> Result<ModelConfig> {
    let mut c = hf_llama_like(json, Architecture::Phi3)?;
    let window = get_usize(json, "sliding_window")?;
    c.layers = hf_layer_kinds(json, c.n_layers, window, &|_| true)?;
    Ok(c)
}

fn gguf_config(meta: &GgufMetadata, w: &mut Weights) -> Result<ModelConfig> {
    let mut c = gguf_llama_like(meta, w, Architecture::Phi3)?;
    let k = GgufKeys {
        meta,
        arch: FAMILY.gguf_name,
    };
    // The converter writes a missing window as 0.
    if let Some(window) = k.usize("attention.sliding_window")?.filter(|w| *w > 0) {
        for layer in &mut c.layers {
            layer.sliding_window = Some(window);
        }
    }
    let half = c.rope.dims / 2;
    let long = w.take_optional(Role::RopeFactorsLong, None, Part::Weight, &[half])?;
    let short = w.take_optional(Role::RopeFactorsShort, None, Part::Weight, &[half])?;
    if let (Some(long), Some(short)) = (long, short) {
        c.rope.scaling = RopeScaling::LongRope {
            short: crate::kernels::to_f32_vec(&short),
            long: crate::kernels::to_f32_vec(&long),
            original_max: k
                .usize("rope.scaling.original_context_length")?
                .unwrap_or(c.max_position_embeddings),
            attention_factor: k.f32("rope.scaling.attn_factor")?.unwrap_or(1.0),
        };
    }
    Ok(c)
}
