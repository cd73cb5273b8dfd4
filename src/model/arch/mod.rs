//! The architectures: one file per family says how it is named (Hugging Face and GGUF), how
//! its configuration is read from either format, and how its weights form blocks. What they
//! share (Llama's block, the helpers that read configurations) lives here.

mod gemma2;
mod gemma3;
mod gpt2;
mod granite;
mod llama;
mod phi3;
mod qwen2;
mod qwen3;
mod smollm3;

use serde_json::Value;

use super::config::{
    Activation, Architecture, LayerKind, Llama3RopeScaling, ModelConfig, Rope, RopeScaling,
};
use super::layers::{Block, FeedForward, Norm, Projection};
use super::names::{HfNames, Part, Role, Weights};
use crate::error::{Error, Result};
use crate::loader::gguf::{GgufMetadata, GgufValue};
use crate::tensor::Tensor;

/// Which format the weights come from (some layouts differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// A Hugging Face folder.
    HuggingFace,
    /// A GGUF file (llama.cpp's layouts: permuted Q/K rows, Gemma norms with +1 folded in).
    Gguf,
}

/// The weights a family's builder makes.
pub(crate) struct Parts {
    pub(crate) embed: Tensor,             // [vocab, hidden]
    pub(crate) positions: Option<Tensor>, // [max_positions, hidden] (GPT-2)
    pub(crate) blocks: Vec<Block>,
    pub(crate) final_norm: Norm,
    pub(crate) lm_head: Tensor, // [vocab, hidden]
}

/// One architecture family.
pub(crate) struct Family {
    /// The family.
    pub(crate) arch: Architecture,
    /// `architectures` entries of config.json.
    pub(crate) hf_classes: &'static [&'static str],
    /// `model_type` values of config.json.
    pub(crate) hf_model_types: &'static [&'static str],
    /// `general.architecture` of GGUF files.
    pub(crate) gguf_name: &'static str,
    /// Tensor names of Hugging Face checkpoints.
    pub(crate) hf_names: &'static HfNames,
    /// The configuration from config.json.
    pub(crate) hf_config: fn(&Value) -> Result<ModelConfig>,
    /// The configuration from GGUF metadata and the file's tensors (it takes those that
    /// are configuration, such as RoPE factors).
    pub(crate) gguf_config: fn(&GgufMetadata, &mut Weights) -> Result<ModelConfig>,
    /// Builds the weights.
    pub(crate) build: fn(&ModelConfig, &mut Weights, Format) -> Result<Parts>,
}

/// Every family Ember runs.
pub(crate) const FAMILIES: [&Family; 9] = [
    &llama::FAMILY,
    &qwen2::FAMILY,
    &qwen3::FAMILY,
    &gemma2::FAMILY,
    &gemma3::FAMILY,
    &phi3::FAMILY,
    &smollm3::FAMILY,
    &granite::FAMILY,
    &gpt2::FAMILY,
];

/// The family of an architecture.
pub(crate) fn family(arch: Architecture) -> &'static Family {
    FAMILIES
        .iter()
        .find(|f| f.arch == arch)
        .copied()
        .unwrap_or(&llama::FAMILY)
}

/// The family a config.json names (its `architectures`, else its `model_type`).
pub(crate) fn hf_family(json: &Value) -> Result<&'static Family> {
    let classes: Vec<&str> = json
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let model_type = json.get("model_type").and_then(Value::as_str);
    FAMILIES
        .iter()
        .find(|f| classes.iter().any(|c| f.hf_classes.contains(c)))
        .or_else(|| {
            FAMILIES
                .iter()
                .find(|f| model_type.is_some_and(|t| f.hf_model_types.contains(&t)))
        })
        .copied()
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "model architecture {classes:?} (model_type {:?}); Ember runs {}",
                model_type.unwrap_or("absent"),
                supported_list()
            ))
        })
}

/// The family of a GGUF file's `general.architecture`.
pub(crate) fn gguf_family(name: &str) -> Result<&'static Family> {
    FAMILIES
        .iter()
        .find(|f| f.gguf_name == name)
        .copied()
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "GGUF architecture {name:?}; Ember runs {}",
                supported_list()
            ))
        })
}

fn supported_list() -> String {
    FAMILIES
        .iter()
        .map(|f| f.gguf_name)
        .collect::<Vec<_>>()
        .join(", ")
}

// ---- reading config.json ----

pub(crate) fn get_usize(json: &Value, key: &str) -> Result<Option<usize>> {
    match json.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| {
                Error::format(format!("config.json: {key} is not a non-negative integer"))
            }),
    }
}

pub(crate) fn require_usize(json: &Value, keys: &[&str]) -> Result<usize> {
    for key in keys {
        if let Some(v) = get_usize(json, key)? {
            return Ok(v);
        }
    }
    Err(Error::format(format!(
        "config.json: missing {}",
        keys.join(" / ")
    )))
}

pub(crate) fn get_f32(json: &Value, key: &str) -> Result<Option<f32>> {
    match json.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(|x| Some(x as f32))
            .ok_or_else(|| Error::format(format!("config.json: {key} is not a number"))),
    }
}

pub(crate) fn get_bool(json: &Value, key: &str) -> Option<bool> {
    json.get(key).and_then(Value::as_bool)
}

pub(crate) fn token_ids(json: &Value, key: &str) -> Result<Vec<u32>> {
    let to_id = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| Error::format(format!("config.json: {key} holds a non-token value")))
    };
    match json.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(to_id).collect(),
        Some(v) => Ok(vec![to_id(v)?]),
    }
}

/// A factor list of a RoPE scaling entry.
fn factor_list(s: &Value, key: &str) -> Result<Vec<f32>> {
    s.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_f64)
                .map(|v| v as f32)
                .collect()
        })
        .ok_or_else(|| Error::format(format!("config: rope_scaling.{key} missing")))
}

/// The RoPE scaling of a config's `rope_parameters` (transformers 5) or `rope_scaling`, or of
/// one layer type's entry of nested `rope_parameters`. `original_max` is the config's
/// top-level `original_max_position_embeddings`, which transformers prefers to the entry's.
pub(crate) fn rope_scaling_of(
    scaling: Option<&Value>,
    max_positions: usize,
    original_max: Option<usize>,
) -> Result<RopeScaling> {
    let Some(s) = scaling.filter(|s| !s.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let field = |key: &str| {
        get_f32(s, key)?.ok_or_else(|| Error::format(format!("config: rope_scaling.{key} missing")))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: field("factor")?,
        }),
        "llama3" => {
            let l = Llama3RopeScaling {
                factor: field("factor")?,
                low_freq_factor: field("low_freq_factor")?,
                high_freq_factor: field("high_freq_factor")?,
                original_max_position_embeddings: field("original_max_position_embeddings")?,
            };
            if !(l.factor > 0.0
                && l.low_freq_factor > 0.0
                && l.high_freq_factor > l.low_freq_factor
                && l.original_max_position_embeddings > 0.0)
            {
                return Err(Error::format("config: inconsistent llama3 rope_scaling"));
            }
            Ok(RopeScaling::Llama3(l))
        }
        "longrope" | "su" => {
            let original = match original_max {
                Some(o) => o,
                None => get_usize(s, "original_max_position_embeddings")?.unwrap_or(max_positions),
            };
            // transformers: factor defaults to max / original, and the attention factor to
            // sqrt(1 + ln(factor) / ln(original)) (1 when the factor is at most 1).
            let factor =
                get_f32(s, "factor")?.unwrap_or(max_positions as f32 / original.max(1) as f32);
            let attention_factor = match get_f32(s, "attention_factor")? {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + (factor as f64).ln() / (original as f64).ln()).sqrt() as f32,
            };
            Ok(RopeScaling::LongRope {
                short: factor_list(s, "short_factor")?,
                long: factor_list(s, "long_factor")?,
                original_max: original,
                attention_factor,
            })
        }
        other => Err(Error::Unsupported(format!("rope_scaling type {other}"))),
    }
}

/// The RoPE base: `rope_theta`, or transformers 5's `rope_parameters.rope_theta`.
pub(crate) fn rope_theta(json: &Value, default: f32) -> Result<f32> {
    if let Some(theta) = get_f32(json, "rope_theta")? {
        return Ok(theta);
    }
    match json.get("rope_parameters") {
        Some(p) if !p.is_null() => Ok(get_f32(p, "rope_theta")?.unwrap_or(default)),
        _ => Ok(default),
    }
}

/// The RoPE of a Llama-like config.json: base, scaling, partial rotary factor.
pub(crate) fn hf_rope(json: &Value, head_dim: usize, max_positions: usize) -> Result<Rope> {
    let scaling_entry = match (json.get("rope_parameters"), json.get("rope_scaling")) {
        (Some(s), _) if !s.is_null() => Some(s),
        (_, s) => s,
    };
    // transformers keeps the entry's factor over the top-level one.
    let entry_partial = match scaling_entry {
        Some(s) => get_f32(s, "partial_rotary_factor")?,
        None => None,
    };
    let partial = entry_partial
        .or(get_f32(json, "partial_rotary_factor")?)
        .unwrap_or(1.0);
    if !(partial > 0.0 && partial <= 1.0) {
        return Err(Error::format(
            "config: partial_rotary_factor must be in (0, 1]",
        ));
    }
    Ok(Rope {
        theta: rope_theta(json, 10000.0)?,
        dims: ((head_dim as f32 * partial) as usize) / 2 * 2,
        scaling: rope_scaling_of(
            scaling_entry,
            max_positions,
            get_usize(json, "original_max_position_embeddings")?,
        )?,
    })
}

/// A Llama-shaped config.json: the fields every Llama-like family shares, with its
/// defaults (a family changes what it does differently).
pub(crate) fn hf_llama_like(json: &Value, arch: Architecture) -> Result<ModelConfig> {
    let hidden = require_usize(json, &["hidden_size"])?;
    let n_heads = require_usize(json, &["num_attention_heads"])?;
    if n_heads == 0 {
        return Err(Error::format(
            "config: num_attention_heads must be positive",
        ));
    }
    let n_kv = get_usize(json, "num_key_value_heads")?.unwrap_or(n_heads);
    let head_dim = get_usize(json, "head_dim")?.unwrap_or(hidden / n_heads);
    let n_layers = require_usize(json, &["num_hidden_layers"])?;
    let mut c = ModelConfig::base(
        arch,
        require_usize(json, &["vocab_size"])?,
        hidden,
        require_usize(json, &["intermediate_size"])?,
        n_layers,
        n_heads,
        n_kv,
        head_dim,
    );
    c.max_position_embeddings = get_usize(json, "max_position_embeddings")?.unwrap_or(2048);
    c.norm_eps = get_f32(json, "rms_norm_eps")?.unwrap_or(1e-6);
    c.rope = hf_rope(json, head_dim, c.max_position_embeddings)?;
    c.tie_word_embeddings = get_bool(json, "tie_word_embeddings").unwrap_or(false);
    c.bos_token_id = token_ids(json, "bos_token_id")?.first().copied();
    c.eos_token_ids = token_ids(json, "eos_token_id")?;
    if get_bool(json, "mlp_bias") == Some(true) {
        return Err(Error::Unsupported(format!("{} with mlp_bias", arch.name())));
    }
    let act = json
        .get("hidden_act")
        .or_else(|| json.get("hidden_activation"))
        .and_then(Value::as_str);
    c.activation = match act {
        None | Some("silu") => Activation::Silu,
        Some("gelu_pytorch_tanh" | "gelu_tanh") => Activation::GeluTanh,
        Some(other) => return Err(Error::Unsupported(format!("hidden_act {other}"))),
    };
    Ok(c)
}

/// Fails for configs with biases on the attention projections (families without them).
pub(crate) fn no_attention_bias(json: &Value, arch: Architecture) -> Result<()> {
    if get_bool(json, "attention_bias") == Some(true) {
        return Err(Error::Unsupported(format!(
            "{} with attention_bias",
            arch.name()
        )));
    }
    Ok(())
}

/// Per-layer sliding windows from config.json: `layer_types` where the config has them
/// (transformers 5 writes them), else the family's default pattern (`slides(layer)`), for
/// a `window` the family has read (`None`: no layer slides). The window is never the
/// context length.
pub(crate) fn hf_layer_kinds(
    json: &Value,
    n_layers: usize,
    window: Option<usize>,
    slides: &dyn Fn(usize) -> bool,
) -> Result<Vec<LayerKind>> {
    let full = LayerKind {
        sliding_window: None,
        rope: true,
        local_rope: false,
    };
    let sliding = LayerKind {
        sliding_window: window,
        ..full
    };
    match json.get("layer_types").and_then(Value::as_array) {
        Some(types) => {
            if types.len() != n_layers {
                return Err(Error::format(format!(
                    "config: {} layer_types for {n_layers} layers",
                    types.len()
                )));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(sliding),
                    Some("full_attention") => Ok(full),
                    other => Err(Error::Unsupported(format!("layer type {other:?}"))),
                })
                .collect()
        }
        None => Ok((0..n_layers)
            .map(|i| if slides(i) { sliding } else { full })
            .collect()),
    }
}

/// The window of families that switch it with `use_sliding_window` (off by default):
/// Qwen2, Qwen3.
pub(crate) fn hf_optional_window(json: &Value) -> Result<Option<usize>> {
    Ok(match get_bool(json, "use_sliding_window") {
        Some(true) => get_usize(json, "sliding_window")?,
        _ => None,
    })
}

// ---- reading GGUF metadata ----

/// The `<arch>.<key>` names of a GGUF file's architecture.
pub(crate) struct GgufKeys<'a> {
    pub(crate) meta: &'a GgufMetadata,
    pub(crate) arch: &'static str,
}

impl GgufKeys<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    pub(crate) fn usize(&self, k: &str) -> Result<Option<usize>> {
        self.meta.usize(&self.key(k))
    }

    pub(crate) fn require(&self, k: &str) -> Result<usize> {
        self.meta.require_usize(&self.key(k))
    }

    pub(crate) fn f32(&self, k: &str) -> Result<Option<f32>> {
        Ok(self.meta.f64(&self.key(k))?.map(|v| v as f32))
    }

    pub(crate) fn str(&self, k: &str) -> Result<Option<&str>> {
        self.meta.str(&self.key(k))
    }
}

/// The vocabulary size of a GGUF model: the rows of its embedding matrix.
pub(crate) fn gguf_vocab(weights: &Weights) -> Result<usize> {
    weights
        .shape(Role::TokenEmbd, None)
        .and_then(|s| s.first().copied())
        .ok_or_else(|| Error::format("GGUF tensor token_embd.weight is missing"))
}

/// A Llama-shaped GGUF configuration (llama.cpp's keys every Llama-like family writes).
pub(crate) fn gguf_llama_like(
    meta: &GgufMetadata,
    weights: &Weights,
    arch: Architecture,
) -> Result<ModelConfig> {
    let k = GgufKeys {
        meta,
        arch: family(arch).gguf_name,
    };
    let hidden = k.require("embedding_length")?;
    let n_heads = k.require("attention.head_count")?;
    if n_heads == 0 {
        return Err(Error::format("GGUF: attention.head_count must be positive"));
    }
    let head_dim = k.usize("attention.key_length")?.unwrap_or(hidden / n_heads);
    let n_layers = k.require("block_count")?;
    let mut c = ModelConfig::base(
        arch,
        gguf_vocab(weights)?,
        hidden,
        k.require("feed_forward_length")?,
        n_layers,
        n_heads,
        k.usize("attention.head_count_kv")?.unwrap_or(n_heads),
        head_dim,
    );
    c.max_position_embeddings = k.require("context_length")?;
    c.norm_eps = k.f32("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5);
    c.rope.theta = k.f32("rope.freq_base")?.unwrap_or(10000.0);
    c.rope.dims = k.usize("rope.dimension_count")?.unwrap_or(head_dim);
    c.rope.scaling = match k.str("rope.scaling.type")? {
        // LongRoPE's factors are tensors, which the family reads (Phi-3).
        None | Some("none" | "longrope") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: k.f32("rope.scaling.factor")?.unwrap_or(1.0),
        },
        Some(kind) => return Err(Error::Unsupported(format!("GGUF RoPE scaling {kind:?}"))),
    };
    let id = |key: &str| -> Result<Option<u32>> {
        meta.usize(key)?
            .map(|v| {
                u32::try_from(v).map_err(|_| Error::format(format!("GGUF {key} out of range")))
            })
            .transpose()
    };
    c.bos_token_id = id("tokenizer.ggml.bos_token_id")?;
    c.eos_token_ids = id("tokenizer.ggml.eos_token_id")?.into_iter().collect();
    c.tie_word_embeddings = !weights.has(Role::Output, None);
    c.attention_scale = 1.0 / (head_dim as f32).sqrt();
    Ok(c)
}

/// GGUF's `rope_freqs` tensor (Llama 3 scaling as per-frequency divisors), if the file has it.
pub(crate) fn gguf_rope_freqs(weights: &mut Weights, config: &mut ModelConfig) -> Result<()> {
    let n = config.rope.dims / 2;
    if let Some(t) = weights.take_optional(Role::RopeFreqs, None, Part::Weight, &[n])? {
        config.rope.scaling = RopeScaling::Factors(crate::kernels::to_f32_vec(&t));
    }
    Ok(())
}

/// Sliding-window layers of a GGUF file: a window of `<arch>.attention.sliding_window`
/// (`default_window` when absent; 0 means none) on the layers the pattern marks:
/// `<arch>.attention.sliding_window_pattern` as per-layer flags or as a period `n` (the last
/// layer of every `n` is full), else `default_period` (llama.cpp's per-family default).
/// Sliding layers use `<arch>.rope.freq_base_swa` as their RoPE base when the file has it.
pub(crate) fn gguf_sliding_layers(
    k: &GgufKeys<'_>,
    c: &mut ModelConfig,
    default_window: Option<usize>,
    default_period: usize,
) -> Result<()> {
    let window = match k.usize("attention.sliding_window")? {
        Some(0) => None,
        Some(w) => Some(w),
        None => default_window,
    };
    let Some(window) = window else {
        return Ok(());
    };
    let key = format!("{}.attention.sliding_window_pattern", k.arch);
    let slides: Vec<bool> = match k.meta.get(&key) {
        Some(GgufValue::Array(flags)) => flags
            .iter()
            .map(|f| match f {
                GgufValue::Bool(b) => Ok(*b),
                _ => Err(Error::format(format!(
                    "GGUF {key} is not an array of flags"
                ))),
            })
            .collect::<Result<_>>()?,
        _ => {
            let period = k
                .usize("attention.sliding_window_pattern")?
                .unwrap_or(default_period);
            if period == 0 {
                return Err(Error::format(format!("GGUF {key} must be positive")));
            }
            (0..c.n_layers).map(|i| i % period < period - 1).collect()
        }
    };
    if slides.len() != c.n_layers {
        return Err(Error::format(format!(
            "GGUF {key} has {} flags for {} layers",
            slides.len(),
            c.n_layers
        )));
    }
    let local_theta = k.f32("rope.freq_base_swa")?;
    if let Some(theta) = local_theta {
        c.rope_local = Some(Rope {
            theta,
            ..c.rope.clone()
        });
    }
    for (layer, slides) in c.layers.iter_mut().zip(slides) {
        if slides {
            layer.sliding_window = Some(window);
            layer.local_rope = local_theta.is_some();
        }
    }
    Ok(())
}

// ---- building Llama-like blocks ----

/// Reads norms and projections of one family's weights.
pub(crate) struct Builder<'a> {
    pub(crate) w: &'a mut Weights,
    pub(crate) c: &'a ModelConfig,
    /// Norm weights are stored zero-centred and used as `1 + w` (Gemma's Hugging Face
    /// checkpoints; GGUF files store them with the 1 added).
    pub(crate) norm_plus_one: bool,
}

impl Builder<'_> {
    /// A norm of `width` weights (and biases, for LayerNorm).
    pub(crate) fn norm(
        &mut self,
        role: Role,
        layer: Option<usize>,
        width: usize,
        with_bias: bool,
    ) -> Result<Norm> {
        let mut weight = self.w.take_f32(role, layer, Part::Weight, &[width])?;
        if self.norm_plus_one {
            weight.iter_mut().for_each(|v| *v += 1.0);
        }
        let bias = if with_bias {
            Some(self.w.take_f32(role, layer, Part::Bias, &[width])?)
        } else {
            None
        };
        Ok(Norm {
            weight,
            bias,
            eps: self.c.norm_eps,
        })
    }

    /// `[n_out, n_in]` weights (and `[n_out]` biases).
    pub(crate) fn linear(
        &mut self,
        role: Role,
        layer: usize,
        (n_out, n_in): (usize, usize),
        with_bias: bool,
    ) -> Result<Projection> {
        let weight = self
            .w
            .take(role, Some(layer), Part::Weight, &[n_out, n_in])?;
        let bias = if with_bias {
            Some(self.w.take(role, Some(layer), Part::Bias, &[n_out])?)
        } else {
            None
        };
        Ok(Projection::linear(weight, bias))
    }

    /// The row blocks `sizes` of one fused `[Σ sizes, n_in]` matrix, as projections sharing
    /// its storage (no copy).
    pub(crate) fn fused(
        &mut self,
        role: Role,
        layer: usize,
        sizes: &[usize],
        n_in: usize,
        with_bias: bool,
    ) -> Result<Vec<Projection>> {
        let total: usize = sizes.iter().sum();
        let weight = self
            .w
            .take(role, Some(layer), Part::Weight, &[total, n_in])?;
        let bias = if with_bias {
            Some(self.w.take_f32(role, Some(layer), Part::Bias, &[total])?)
        } else {
            None
        };
        let mut at = 0;
        Ok(sizes
            .iter()
            .map(|&n| {
                let rows = at..at + n;
                at += n;
                Projection {
                    weight: super::layers::ProjectionWeight::Linear(weight.rows(rows.clone())),
                    bias: bias.as_ref().map(|b| b[rows].to_vec()),
                }
            })
            .collect())
    }
}

/// A Llama-like block: pre-norm attention (separate or fused q/k/v, optional biases and
/// per-head q/k norms), optional sandwich norms, and a gated feed-forward network (separate or
/// fused gate/up). Every Llama-like family's block, whatever it names its tensors.
pub(crate) fn llama_block(b: &mut Builder<'_>, i: usize) -> Result<Block> {
    let c = b.c;
    let (h, inter, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
    let attn_norm = b.norm(Role::AttnNorm, Some(i), h, false)?;
    let (q, k, v) = if b.w.has(Role::AttnQkv, Some(i)) {
        let mut parts = b.fused(Role::AttnQkv, i, &[q_dim, kv_dim, kv_dim], h, c.qkv_bias)?;
        let v = parts.pop();
        let k = parts.pop();
        let q = parts.pop();
        match (q, k, v) {
            (Some(q), Some(k), Some(v)) => (q, k, v),
            _ => return Err(Error::Internal("fused q/k/v".into())),
        }
    } else {
        (
            b.linear(Role::AttnQ, i, (q_dim, h), c.qkv_bias)?,
            b.linear(Role::AttnK, i, (kv_dim, h), c.qkv_bias)?,
            b.linear(Role::AttnV, i, (kv_dim, h), c.qkv_bias)?,
        )
    };
    let o = b.linear(Role::AttnOutput, i, (h, q_dim), false)?;
    let (q_norm, k_norm) = if c.qk_norm {
        (
            Some(b.norm(Role::AttnQNorm, Some(i), hd, false)?),
            Some(b.norm(Role::AttnKNorm, Some(i), hd, false)?),
        )
    } else {
        (None, None)
    };
    let post_attn_norm = if c.sandwich_norms {
        Some(b.norm(Role::PostAttnNorm, Some(i), h, false)?)
    } else {
        None
    };
    let ffn_norm = b.norm(Role::FfnNorm, Some(i), h, false)?;
    let ffn = if b.w.has(Role::FfnGate, Some(i)) {
        FeedForward::Gated {
            gate: b.linear(Role::FfnGate, i, (inter, h), false)?,
            up: b.linear(Role::FfnUp, i, (inter, h), false)?,
            down: b.linear(Role::FfnDown, i, (h, inter), false)?,
        }
    } else {
        // Gate and up in one matrix, the gate's rows first (Phi-3).
        let mut parts = b.fused(Role::FfnUp, i, &[inter, inter], h, false)?;
        let up = parts.pop();
        let gate = parts.pop();
        match (gate, up) {
            (Some(gate), Some(up)) => FeedForward::Gated {
                gate,
                up,
                down: b.linear(Role::FfnDown, i, (h, inter), false)?,
            },
            _ => return Err(Error::Internal("fused gate/up".into())),
        }
    };
    let post_ffn_norm = if c.sandwich_norms {
        Some(b.norm(Role::PostFfnNorm, Some(i), h, false)?)
    } else {
        None
    };
    Ok(Block {
        attn_norm,
        q,
        k,
        v,
        o,
        q_norm,
        k_norm,
        post_attn_norm,
        ffn_norm,
        ffn,
        post_ffn_norm,
    })
}

/// Every part of a Llama-like model: blocks, embeddings, final norm, output matrix (the
/// embeddings when tied).
pub(crate) fn build_llama_like(
    c: &ModelConfig,
    w: &mut Weights,
    norm_plus_one: bool,
) -> Result<Parts> {
    let mut b = Builder {
        w,
        c,
        norm_plus_one,
    };
    let blocks = (0..c.n_layers)
        .map(|i| llama_block(&mut b, i))
        .collect::<Result<Vec<_>>>()?;
    let shape = [c.vocab_size, c.hidden_size];
    let embed = b.w.take(Role::TokenEmbd, None, Part::Weight, &shape)?;
    let lm_head = match b
        .w
        .take_optional(Role::Output, None, Part::Weight, &shape)?
    {
        Some(head) => head,
        None if c.tie_word_embeddings => embed.clone(),
        None => {
            return Err(Error::format(
                "the output matrix is missing (embeddings are not tied)",
            ))
        }
    };
    Ok(Parts {
        final_norm: b.norm(Role::OutputNorm, None, c.hidden_size, false)?,
        embed,
        positions: None,
        blocks,
        lm_head,
    })
}

/// Hugging Face names of Llama-like checkpoints (`model.layers.N.self_attn.q_proj`, ...),
/// shared by the families that keep Llama's.
pub(crate) const LLAMA_NAMES: &[(Role, &str)] = &[
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
    (Role::FfnNorm, "post_attention_layernorm"),
    (Role::FfnGate, "mlp.gate_proj"),
    (Role::FfnUp, "mlp.up_proj"),
    (Role::FfnDown, "mlp.down_proj"),
];

/// Buffers Llama-like exporters sometimes save.
pub(crate) const LLAMA_IGNORED: &[&str] = &["rotary_emb.inv_freq"];

/// How Llama-like checkpoints name their tensors (`model.layers.N.`, [`LLAMA_NAMES`]).
pub(crate) const LLAMA_HF_NAMES: HfNames = HfNames {
    layer_prefix: "model.layers.{}.",
    names: LLAMA_NAMES,
    optional_prefix: None,
    ignored_suffixes: LLAMA_IGNORED,
};

/// The builder of families whose weights are Llama's, whatever the format.
pub(crate) fn build_llama(c: &ModelConfig, w: &mut Weights, _format: Format) -> Result<Parts> {
    build_llama_like(c, w, false)
}
