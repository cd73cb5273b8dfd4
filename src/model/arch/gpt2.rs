//! GPT-2: learned position embeddings, LayerNorm, a plain GELU feed-forward network, one
//! fused query/key/value projection, biases everywhere.
//!
//! Hugging Face checkpoints store projections as `Conv1D`, `[n_in, n_out]` (read in place
//! as column ranges); GGUF files store them `[n_out, n_in]` (row ranges).

use std::ops::Range;

use serde_json::Value;

use super::{
    get_bool, get_f32, get_usize, require_usize, token_ids, Builder, Family, Format, Parts,
};
use crate::error::{Error, Result};
use crate::loader::gguf::GgufMetadata;
use crate::model::config::{Activation, Architecture, ModelConfig};
use crate::model::layers::{Block, FeedForward, Projection, ProjectionWeight};
use crate::model::names::{HfNames, Part, Role, Weights};
use crate::tensor::Tensor;

/// GPT-2.
pub(crate) const FAMILY: Family = Family {
    arch: Architecture::Gpt2,
    hf_classes: &["GPT2LMHeadModel"],
    hf_model_types: &["gpt2"],
    gguf_name: "gpt2",
    hf_names: &HfNames {
        layer_prefix: "h.{}.",
        names: &[
            (Role::TokenEmbd, "wte"),
            (Role::PositionEmbd, "wpe"),
            (Role::OutputNorm, "ln_f"),
            (Role::Output, "lm_head"),
            (Role::AttnNorm, "ln_1"),
            (Role::AttnQkv, "attn.c_attn"),
            (Role::AttnOutput, "attn.c_proj"),
            (Role::FfnNorm, "ln_2"),
            (Role::FfnUp, "mlp.c_fc"),
            (Role::FfnDown, "mlp.c_proj"),
        ],
        // Checkpoints saved from GPT2LMHeadModel prefix names with "transformer."; the
        // original OpenAI conversions do not.
        optional_prefix: Some("transformer."),
        // The causal mask buffers of older exports.
        ignored_suffixes: &[".attn.bias", ".attn.masked_bias"],
    },
    hf_config,
    gguf_config,
    build,
};

fn hf_config(json: &Value) -> Result<ModelConfig> {
    let hidden = require_usize(json, &["n_embd", "hidden_size"])?;
    let n_heads = require_usize(json, &["n_head", "num_attention_heads"])?;
    if n_heads == 0 || hidden % n_heads != 0 {
        return Err(Error::format("config: n_embd must be a multiple of n_head"));
    }
    if let Some(act) = json.get("activation_function").and_then(Value::as_str) {
        if act != "gelu_new" && act != "gelu_pytorch_tanh" {
            return Err(Error::Unsupported(format!("GPT-2 activation {act}")));
        }
    }
    for flag in ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"] {
        if get_bool(json, flag) == Some(true) {
            return Err(Error::Unsupported(format!("GPT-2 with {flag}")));
        }
    }
    if get_bool(json, "scale_attn_weights") == Some(false) {
        return Err(Error::Unsupported(
            "GPT-2 without scale_attn_weights".into(),
        ));
    }
    let mut c = ModelConfig::base(
        Architecture::Gpt2,
        require_usize(json, &["vocab_size"])?,
        hidden,
        get_usize(json, "n_inner")?.unwrap_or(4 * hidden),
        require_usize(json, &["n_layer", "num_hidden_layers"])?,
        n_heads,
        n_heads,
        hidden / n_heads,
    );
    c.max_position_embeddings = require_usize(json, &["n_positions", "max_position_embeddings"])?;
    c.norm_eps = get_f32(json, "layer_norm_epsilon")?.unwrap_or(1e-5);
    gpt2_features(&mut c);
    c.tie_word_embeddings = true;
    c.bos_token_id = token_ids(json, "bos_token_id")?.first().copied();
    c.eos_token_ids = token_ids(json, "eos_token_id")?;
    Ok(c)
}

/// What GPT-2 does differently from the base configuration.
fn gpt2_features(c: &mut ModelConfig) {
    c.activation = Activation::GeluTanh;
    for layer in &mut c.layers {
        layer.rope = false;
    }
}

fn gguf_config(meta: &GgufMetadata, w: &mut Weights) -> Result<ModelConfig> {
    let mut c = super::gguf_llama_like(meta, w, Architecture::Gpt2)?;
    c.norm_eps = meta
        .f64("gpt2.attention.layer_norm_epsilon")?
        .map_or(1e-5, |e| e as f32);
    gpt2_features(&mut c);
    Ok(c)
}

fn build(c: &ModelConfig, w: &mut Weights, format: Format) -> Result<Parts> {
    let (h, inter) = (c.hidden_size, c.intermediate_size);
    let conv1d = format == Format::HuggingFace;
    // A projection's weight and bias, in the file's layout.
    let take = |w: &mut Weights, role: Role, i: usize, n_in: usize, n_out: usize| {
        let shape = if conv1d { [n_in, n_out] } else { [n_out, n_in] };
        let weight = w.take(role, Some(i), Part::Weight, &shape)?;
        let bias = w.take_f32(role, Some(i), Part::Bias, &[n_out])?;
        Ok::<_, Error>((weight, bias))
    };
    // Output features `cols` of a (possibly fused) projection.
    let split = |(weight, bias): &(Tensor, Vec<f32>), cols: Range<usize>| Projection {
        bias: Some(bias[cols.clone()].to_vec()),
        weight: if conv1d {
            ProjectionWeight::InOut {
                weight: weight.clone(),
                cols,
            }
        } else {
            ProjectionWeight::Linear(weight.rows(cols))
        },
    };
    let mut blocks = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let attn = take(w, Role::AttnQkv, i, h, 3 * h)?;
        let out = take(w, Role::AttnOutput, i, h, h)?;
        let fc = take(w, Role::FfnUp, i, h, inter)?;
        let proj = take(w, Role::FfnDown, i, inter, h)?;
        let mut b = Builder {
            w,
            c,
            norm_plus_one: false,
        };
        blocks.push(Block {
            attn_norm: b.norm(Role::AttnNorm, Some(i), h, true)?,
            q: split(&attn, 0..h),
            k: split(&attn, h..2 * h),
            v: split(&attn, 2 * h..3 * h),
            o: split(&out, 0..h),
            q_norm: None,
            k_norm: None,
            post_attn_norm: None,
            ffn_norm: b.norm(Role::FfnNorm, Some(i), h, true)?,
            ffn: FeedForward::Plain {
                fc: split(&fc, 0..inter),
                proj: split(&proj, 0..h),
            },
            post_ffn_norm: None,
        });
    }
    let embed = w.take(Role::TokenEmbd, None, Part::Weight, &[c.vocab_size, h])?;
    let positions = w.take(
        Role::PositionEmbd,
        None,
        Part::Weight,
        &[c.max_position_embeddings, h],
    )?;
    let lm_head = w
        .take_optional(Role::Output, None, Part::Weight, &[c.vocab_size, h])?
        .unwrap_or_else(|| embed.clone());
    let mut b = Builder {
        w,
        c,
        norm_plus_one: false,
    };
    Ok(Parts {
        final_norm: b.norm(Role::OutputNorm, None, h, true)?,
        embed,
        positions: Some(positions),
        blocks,
        lm_head,
    })
}
