//! Gemma 3 (text): Gemma 2 (`gemma2.rs`) with
//! - RMSNorm `(1 + w)` on each head's queries and keys, before RoPE;
//! - no attention soft cap (and a final one only when configured);
//! - the layer pattern of `layer_types` (five sliding layers, then a full one);
//! - two RoPEs: full layers use `rope_theta` (1e6) with optional scaling, sliding layers
//!   `rope_local_base_freq` (1e4) without.

use serde_json::Value;

use super::gemma2::{build_gemma, gemma_gguf, gemma_hf, GEMMA_NAMES};
use super::{
    get_bool, get_f32, get_usize, gguf_llama_like, gguf_sliding_layers, hf_layer_kinds,
    hf_llama_like, rope_scaling_of, rope_theta, Family, GgufKeys,
};
use crate::error::{Error, Result};
use crate::loader::gguf::GgufMetadata;
use crate::model::config::{Architecture, ModelConfig, Rope, RopeScaling};
use crate::model::names::Weights;

/// Gemma 3.
pub(crate) const FAMILY: Family = Family {
    arch: Architecture::Gemma3,
    hf_classes: &["Gemma3ForCausalLM"],
    hf_model_types: &["gemma3_text"],
    gguf_name: "gemma3",
    hf_names: &GEMMA_NAMES,
    hf_config,
    gguf_config,
    build: build_gemma,
};

/// Marks sliding layers as using the local RoPE.
fn local_rope_on_sliding(c: &mut ModelConfig) {
    for layer in &mut c.layers {
        layer.local_rope = layer.sliding_window.is_some();
    }
}

fn hf_config(json: &Value) -> Result<ModelConfig> {
    let mut c = hf_llama_like(json, Architecture::Gemma3)?;
    gemma_hf(json, &mut c)?;
    c.qk_norm = true;
    if get_bool(json, "use_bidirectional_attention") == Some(true) {
        return Err(Error::Unsupported(
            "Gemma 3 with bidirectional attention".into(),
        ));
    }
    let max = c.max_position_embeddings;
    let rope_of = |entry: Option<&Value>, default_theta: f32| -> Result<Rope> {
        Ok(Rope {
            theta: match entry {
                Some(e) => get_f32(e, "rope_theta")?.unwrap_or(default_theta),
                None => default_theta,
            },
            dims: c.head_dim,
            scaling: rope_scaling_of(entry, max, None)?,
        })
    };
    // transformers 5 nests RoPE per layer type; older configs give the global base and
    // scaling at the top and the local base as `rope_local_base_freq`.
    let nested = json
        .get("rope_parameters")
        .filter(|p| p.get("full_attention").is_some());
    let (global, local) = match nested {
        Some(p) => (
            rope_of(p.get("full_attention"), 1e6)?,
            rope_of(p.get("sliding_attention"), 1e4)?,
        ),
        None => (
            Rope {
                theta: rope_theta(json, 1e6)?,
                dims: c.head_dim,
                scaling: rope_scaling_of(json.get("rope_scaling"), max, None)?,
            },
            Rope {
                theta: get_f32(json, "rope_local_base_freq")?.unwrap_or(1e4),
                dims: c.head_dim,
                scaling: RopeScaling::None,
            },
        ),
    };
    c.rope = global;
    c.rope_local = Some(local);
    let period = get_usize(json, "sliding_window_pattern")?
        .unwrap_or(6)
        .max(1);
    let window = get_usize(json, "sliding_window")?;
    c.layers = hf_layer_kinds(json, c.n_layers, window, &|i| (i + 1) % period != 0)?;
    local_rope_on_sliding(&mut c);
    Ok(c)
}

fn gguf_config(meta: &GgufMetadata, w: &mut Weights) -> Result<ModelConfig> {
    let mut c = gguf_llama_like(meta, w, Architecture::Gemma3)?;
    let k = GgufKeys {
        meta,
        arch: FAMILY.gguf_name,
    };
    gemma_gguf(&k, &mut c, 62)?;
    c.qk_norm = true;
    gguf_sliding_layers(&k, &mut c, None, 6)?;
    // Sliding layers: their own base (llama.cpp's default 1e4) and no scaling.
    c.rope_local = Some(Rope {
        theta: k.f32("rope.freq_base_swa")?.unwrap_or(1e4),
        dims: c.rope.dims,
        scaling: RopeScaling::None,
    });
    local_rope_on_sliding(&mut c);
    Ok(c)
}
