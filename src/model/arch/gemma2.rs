//! Gemma 2: Llama with
//! - embeddings multiplied by √hidden;
//! - RMSNorm by `(1 + w)` (checkpoints store `w` zero-centred; GGUF files store `1 + w`);
//! - sandwich norms: a norm after attention and after the feed-forward network, before each
//!   residual add;
//! - GeGLU (tanh GELU) instead of SwiGLU;
//! - queries scaled by `1/√query_pre_attn_scalar` (GGUF: `1/√head_dim`, as llama.cpp);
//! - soft caps `c·tanh(x/c)` on attention scores and on the output logits;
//! - sliding-window attention on every other layer, starting with the first.

use serde_json::Value;

use super::{
    build_llama_like, get_bool, get_f32, get_usize, gguf_llama_like, gguf_sliding_layers,
    hf_layer_kinds, hf_llama_like, no_attention_bias, Family, Format, GgufKeys, Parts,
    LLAMA_IGNORED,
};
use crate::error::{Error, Result};
use crate::loader::gguf::GgufMetadata;
use crate::model::config::{Activation, Architecture, ModelConfig};
use crate::model::names::{HfNames, Role, Weights};

/// Gemma 2.
pub(crate) const FAMILY: Family = Family {
    arch: Architecture::Gemma2,
    hf_classes: &["Gemma2ForCausalLM"],
    hf_model_types: &["gemma2"],
    gguf_name: "gemma2",
    hf_names: &GEMMA_NAMES,
    hf_config,
    gguf_config,
    build: build_gemma,
};

/// Hugging Face names of Gemma 2 and 3 checkpoints: Llama's, with the sandwich norms.
pub(crate) const GEMMA_NAMES: HfNames = HfNames {
    layer_prefix: "model.layers.{}.",
    names: &[
        (Role::TokenEmbd, "model.embed_tokens"),
        (Role::OutputNorm, "model.norm"),
        (Role::Output, "lm_head"),
        (Role::AttnNorm, "input_layernorm"),
        (Role::AttnQ, "self_attn.q_proj"),
        (Role::AttnK, "self_attn.k_proj"),
        (Role::AttnV, "self_attn.v_proj"),
        (Role::AttnOutput, "self_attn.o_proj"),
        (Role::AttnQNorm, "self_attn.q_norm"),
        (Role::AttnKNorm, "self_attn.k_norm"),
        (Role::PostAttnNorm, "post_attention_layernorm"),
        (Role::FfnNorm, "pre_feedforward_layernorm"),
        (Role::FfnGate, "mlp.gate_proj"),
        (Role::FfnUp, "mlp.up_proj"),
        (Role::FfnDown, "mlp.down_proj"),
        (Role::PostFfnNorm, "post_feedforward_layernorm"),
    ],
    optional_prefix: None,
    ignored_suffixes: LLAMA_IGNORED,
};

/// What Gemma 2 and 3 configs share: sandwich norms, tied embeddings, GeGLU, √hidden
/// embedding scale and the query scale.
pub(crate) fn gemma_hf(json: &Value, c: &mut ModelConfig) -> Result<()> {
    no_attention_bias(json, c.architecture)?;
    c.sandwich_norms = true;
    c.tie_word_embeddings = get_bool(json, "tie_word_embeddings").unwrap_or(true);
    c.activation = match json.get("hidden_activation").and_then(Value::as_str) {
        None | Some("gelu_pytorch_tanh") => Activation::GeluTanh,
        Some(other) => return Err(Error::Unsupported(format!("hidden_activation {other}"))),
    };
    let scalar = get_f32(json, "query_pre_attn_scalar")?.unwrap_or(c.head_dim as f32);
    if scalar.is_nan() || scalar <= 0.0 {
        return Err(Error::format(
            "config: query_pre_attn_scalar must be positive",
        ));
    }
    c.attention_scale = 1.0 / scalar.sqrt();
    c.embedding_scale = (c.hidden_size as f64).sqrt() as f32;
    c.attn_softcap = get_f32(json, "attn_logit_softcapping")?;
    c.final_softcap = get_f32(json, "final_logit_softcapping")?;
    Ok(())
}

/// What Gemma 2 and 3 GGUF files share. llama.cpp's query scale is `1/√head_dim`, except for
/// the 27B models (`big_layers` layers), where it is `1/√(hidden/heads)`.
pub(crate) fn gemma_gguf(k: &GgufKeys<'_>, c: &mut ModelConfig, big_layers: usize) -> Result<()> {
    c.sandwich_norms = true;
    c.activation = Activation::GeluTanh;
    c.embedding_scale = (c.hidden_size as f32).sqrt();
    let scale_width = if c.n_layers == big_layers {
        c.hidden_size / c.n_heads
    } else {
        c.head_dim
    };
    c.attention_scale = 1.0 / (scale_width as f32).sqrt();
    c.final_softcap = k.f32("final_logit_softcapping")?.filter(|cap| *cap != 0.0);
    Ok(())
}

fn hf_config(json: &Value) -> Result<ModelConfig> {
    let mut c = hf_llama_like(json, Architecture::Gemma2)?;
    gemma_hf(json, &mut c)?;
    let window = get_usize(json, "sliding_window")?;
    c.layers = hf_layer_kinds(json, c.n_layers, window, &|i| i % 2 == 0)?;
    Ok(c)
}

fn gguf_config(meta: &GgufMetadata, w: &mut Weights) -> Result<ModelConfig> {
    let mut c = gguf_llama_like(meta, w, Architecture::Gemma2)?;
    let k = GgufKeys {
        meta,
        arch: FAMILY.gguf_name,
    };
    gemma_gguf(&k, &mut c, 46)?;
    // llama.cpp applies both caps always, with these defaults.
    c.attn_softcap = Some(k.f32("attn_logit_softcapping")?.unwrap_or(50.0));
    c.final_softcap = Some(k.f32("final_logit_softcapping")?.unwrap_or(30.0));
    gguf_sliding_layers(&k, &mut c, Some(4096), 2)?;
    Ok(c)
}

/// Gemma's weights: Llama's block, with zero-centred norms in Hugging Face checkpoints.
///
/// The embedding scale is √hidden in f32 from either format, as llama.cpp and transformers in
/// f32 compute it; transformers running in BF16 rounds it to BF16 (Gemma 3 1B: 34.0 for
/// √1152 = 33.94).
pub(crate) fn build_gemma(c: &ModelConfig, w: &mut Weights, format: Format) -> Result<Parts> {
    build_llama_like(c, w, format == Format::HuggingFace)
}
