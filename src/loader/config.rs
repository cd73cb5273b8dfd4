//! The model hyper-parameters, read from a Hugging Face `config.json`.

use serde_json::Value;

use super::gguf::GgufMetadata;
use crate::error::{Error, Result};

/// The Transformer families Ember runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, SmolLM, TinyLlama, Mistral: RMSNorm, RoPE, GQA, SwiGLU.
    Llama,
    /// Qwen2: Llama plus biases on the q/k/v projections.
    Qwen2,
    /// GPT-2: learned positions, LayerNorm, GELU, fused attention projection.
    Gpt2,
}

impl Architecture {
    /// The short name used in messages and by the C API (`llama`, `qwen2`, `gpt2`).
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Gpt2 => "gpt2",
        }
    }
}

/// Llama 3 style frequency-dependent RoPE scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    /// Divisor applied to low frequencies.
    pub factor: f32,
    /// Wavelength bound (as a divisor of the original context) below which scaling is full.
    pub low_freq_factor: f32,
    /// Wavelength bound above which frequencies are left unchanged.
    pub high_freq_factor: f32,
    /// Context length the model was pre-trained with.
    pub original_max_position_embeddings: f32,
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Which family of Transformer.
    pub architecture: Architecture,
    /// Number of rows of the embedding and output matrices.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Number of Transformer blocks.
    pub n_layers: usize,
    /// Number of query heads.
    pub n_heads: usize,
    /// Number of key/value heads (equal to `n_heads` without grouped-query attention).
    pub n_kv_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// Epsilon of RMSNorm / LayerNorm.
    pub norm_eps: f32,
    /// RoPE base frequency (unused by GPT-2).
    pub rope_theta: f32,
    /// Optional Llama 3 RoPE scaling.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Whether the output matrix is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token, if the config names one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens named by the config.
    pub eos_token_ids: Vec<u32>,
    /// RoPE rotates adjacent pairs `(2i, 2i + 1)` instead of pairs half a head apart: GGUF
    /// files of the `llama` architecture store Q and K rows permuted for this layout.
    pub rope_interleaved: bool,
    /// Per-frequency divisors of the RoPE frequencies (GGUF's `rope_freqs.weight`, which is
    /// how GGUF stores Llama 3 scaling), `head_dim / 2` values.
    pub rope_freq_factors: Option<Vec<f32>>,
}

fn get_usize(json: &Value, key: &str) -> Result<Option<usize>> {
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

fn require_usize(json: &Value, keys: &[&str]) -> Result<usize> {
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

fn get_f32(json: &Value, key: &str) -> Result<Option<f32>> {
    match json.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(|x| Some(x as f32))
            .ok_or_else(|| Error::format(format!("config.json: {key} is not a number"))),
    }
}

fn token_ids(json: &Value, key: &str) -> Result<Vec<u32>> {
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

impl ModelConfig {
    /// Parses the text of a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<ModelConfig> {
        let json: Value = serde_json::from_str(text)
            .map_err(|e| Error::format(format!("config.json is not valid JSON: {e}")))?;
        let architecture = detect_architecture(&json)?;
        let config = match architecture {
            Architecture::Gpt2 => gpt2_config(&json)?,
            Architecture::Llama | Architecture::Qwen2 => llama_config(&json, architecture)?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the internal consistency of the hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.n_layers),
            ("num_attention_heads", self.n_heads),
            ("num_key_value_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::format(format!("config: {name} must be positive")));
            }
        }
        // Bounds that keep every later size computation far from overflow.
        if self.hidden_size > 1 << 16
            || self.intermediate_size > 1 << 18
            || self.vocab_size > 1 << 24
            || self.n_layers > 1 << 10
            || self.head_dim > 1 << 12
            || self.n_heads > 1 << 10
        {
            return Err(Error::format("config: dimensions are implausibly large"));
        }
        if self.n_heads % self.n_kv_heads != 0 {
            return Err(Error::format(format!(
                "config: {} attention heads are not a multiple of {} key/value heads",
                self.n_heads, self.n_kv_heads
            )));
        }
        if self.architecture == Architecture::Gpt2
            && (self.q_dim() != self.hidden_size || self.n_kv_heads != self.n_heads)
        {
            return Err(Error::format(format!(
                "config: GPT-2 needs heads x head_dim = hidden size ({} x {} != {}) and no \
                 grouped keys/values",
                self.n_heads, self.head_dim, self.hidden_size
            )));
        }
        if self.architecture != Architecture::Gpt2 && self.head_dim % 2 != 0 {
            return Err(Error::format("config: RoPE needs an even head_dim"));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return Err(Error::format(
                "config: norm epsilon must be a finite non-negative number",
            ));
        }
        if self.architecture != Architecture::Gpt2
            && !(self.rope_theta.is_finite() && self.rope_theta > 0.0)
        {
            return Err(Error::format("config: rope_theta must be positive"));
        }
        for &id in self.eos_token_ids.iter().chain(self.bos_token_id.iter()) {
            if id as usize >= self.vocab_size {
                return Err(Error::format(format!(
                    "config: special token {id} is outside the vocabulary ({})",
                    self.vocab_size
                )));
            }
        }
        Ok(())
    }

    /// Width of the query projection output (`n_heads * head_dim`).
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the key and value projection outputs (`n_kv_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

fn detect_architecture(json: &Value) -> Result<Architecture> {
    let names: Vec<&str> = json
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for name in &names {
        match *name {
            "LlamaForCausalLM" | "MistralForCausalLM" => return Ok(Architecture::Llama),
            "Qwen2ForCausalLM" => return Ok(Architecture::Qwen2),
            "GPT2LMHeadModel" => return Ok(Architecture::Gpt2),
            _ => {}
        }
    }
    match json.get("model_type").and_then(Value::as_str) {
        Some("llama") | Some("mistral") => Ok(Architecture::Llama),
        Some("qwen2") => Ok(Architecture::Qwen2),
        Some("gpt2") => Ok(Architecture::Gpt2),
        other => Err(Error::Unsupported(format!(
            "model architecture {:?} (model_type {:?}); Ember runs Llama, Mistral, Qwen2 and GPT-2",
            names,
            other.unwrap_or("absent")
        ))),
    }
}

fn llama_config(json: &Value, architecture: Architecture) -> Result<ModelConfig> {
    let hidden_size = require_usize(json, &["hidden_size"])?;
    let n_heads = require_usize(json, &["num_attention_heads"])?;
    let n_kv_heads = get_usize(json, "num_key_value_heads")?.unwrap_or(n_heads);
    if n_heads == 0 {
        return Err(Error::format(
            "config: num_attention_heads must be positive",
        ));
    }
    let head_dim = get_usize(json, "head_dim")?.unwrap_or(hidden_size / n_heads);
    // Sliding-window attention equals full attention while the context fits in the window, so
    // a model that uses it is run with its context capped at the window.
    let sliding_window = match get_usize(json, "sliding_window")? {
        Some(w)
            if json
                .get("use_sliding_window")
                .and_then(Value::as_bool)
                .unwrap_or(architecture == Architecture::Llama) =>
        {
            Some(w)
        }
        _ => None,
    };
    let max_positions = get_usize(json, "max_position_embeddings")?.unwrap_or(2048);
    if json.get("mlp_bias").and_then(Value::as_bool) == Some(true)
        || json.get("attention_bias").and_then(Value::as_bool) == Some(true)
    {
        return Err(Error::Unsupported(
            "Llama with mlp_bias / attention_bias".into(),
        ));
    }
    if let Some(act) = json.get("hidden_act").and_then(Value::as_str) {
        if act != "silu" {
            return Err(Error::Unsupported(format!("hidden_act {act}")));
        }
    }
    Ok(ModelConfig {
        architecture,
        vocab_size: require_usize(json, &["vocab_size"])?,
        hidden_size,
        intermediate_size: require_usize(json, &["intermediate_size"])?,
        n_layers: require_usize(json, &["num_hidden_layers"])?,
        n_heads,
        n_kv_heads,
        head_dim,
        max_position_embeddings: sliding_window.map_or(max_positions, |w| w.min(max_positions)),
        norm_eps: get_f32(json, "rms_norm_eps")?.unwrap_or(1e-6),
        rope_theta: match get_f32(json, "rope_theta")? {
            Some(theta) => theta,
            None => match json.get("rope_parameters") {
                Some(params) => get_f32(params, "rope_theta")?,
                None => None,
            }
            .unwrap_or(10000.0),
        },
        rope_scaling: rope_scaling(json)?,
        tie_word_embeddings: json
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        bos_token_id: token_ids(json, "bos_token_id")?.first().copied(),
        eos_token_ids: token_ids(json, "eos_token_id")?,
        rope_interleaved: false,
        rope_freq_factors: None,
    })
}

fn rope_scaling(json: &Value) -> Result<Option<Llama3RopeScaling>> {
    // transformers 5 writes `rope_parameters` (theta and scaling together); older versions
    // write `rope_scaling`.
    let scaling = match (json.get("rope_parameters"), json.get("rope_scaling")) {
        (Some(s), _) | (_, Some(s)) if !s.is_null() => s,
        _ => return Ok(None),
    };
    let kind = scaling
        .get("rope_type")
        .or_else(|| scaling.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("absent");
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let field = |key: &str| {
                get_f32(scaling, key)?
                    .ok_or_else(|| Error::format(format!("config: rope_scaling.{key} missing")))
            };
            let s = Llama3RopeScaling {
                factor: field("factor")?,
                low_freq_factor: field("low_freq_factor")?,
                high_freq_factor: field("high_freq_factor")?,
                original_max_position_embeddings: field("original_max_position_embeddings")?,
            };
            if !(s.factor > 0.0
                && s.low_freq_factor > 0.0
                && s.high_freq_factor > s.low_freq_factor
                && s.original_max_position_embeddings > 0.0)
            {
                return Err(Error::format("config: inconsistent llama3 rope_scaling"));
            }
            Ok(Some(s))
        }
        other => Err(Error::Unsupported(format!("rope_scaling type {other}"))),
    }
}

fn gpt2_config(json: &Value) -> Result<ModelConfig> {
    let hidden_size = require_usize(json, &["n_embd", "hidden_size"])?;
    let n_heads = require_usize(json, &["n_head", "num_attention_heads"])?;
    if n_heads == 0 || hidden_size % n_heads != 0 {
        return Err(Error::format("config: n_embd must be a multiple of n_head"));
    }
    if let Some(act) = json.get("activation_function").and_then(Value::as_str) {
        if act != "gelu_new" && act != "gelu_pytorch_tanh" {
            return Err(Error::Unsupported(format!("GPT-2 activation {act}")));
        }
    }
    for flag in ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"] {
        if json.get(flag).and_then(Value::as_bool) == Some(true) {
            return Err(Error::Unsupported(format!("GPT-2 with {flag}")));
        }
    }
    if json.get("scale_attn_weights").and_then(Value::as_bool) == Some(false) {
        return Err(Error::Unsupported(
            "GPT-2 without scale_attn_weights".into(),
        ));
    }
    Ok(ModelConfig {
        architecture: Architecture::Gpt2,
        vocab_size: require_usize(json, &["vocab_size"])?,
        hidden_size,
        intermediate_size: get_usize(json, "n_inner")?.unwrap_or(4 * hidden_size),
        n_layers: require_usize(json, &["n_layer", "num_hidden_layers"])?,
        n_heads,
        n_kv_heads: n_heads,
        head_dim: hidden_size / n_heads,
        max_position_embeddings: require_usize(json, &["n_positions", "max_position_embeddings"])?,
        norm_eps: get_f32(json, "layer_norm_epsilon")?.unwrap_or(1e-5),
        rope_theta: 0.0,
        rope_scaling: None,
        tie_word_embeddings: true,
        bos_token_id: token_ids(json, "bos_token_id")?.first().copied(),
        eos_token_ids: token_ids(json, "eos_token_id")?,
        rope_interleaved: false,
        rope_freq_factors: None,
    })
}

impl ModelConfig {
    /// The hyper-parameters of a GGUF file's model, from its metadata (`general.architecture`
    /// and the `<arch>.*` keys). `vocab_size` is the number of rows of the embedding matrix.
    pub fn from_gguf(meta: &GgufMetadata, vocab_size: usize) -> Result<ModelConfig> {
        let arch_name = meta
            .str("general.architecture")?
            .ok_or_else(|| Error::format("GGUF metadata general.architecture is missing"))?;
        let architecture = match arch_name {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            "gpt2" => Architecture::Gpt2,
            other => {
                return Err(Error::Unsupported(format!(
                    "GGUF architecture {other:?}; Ember runs llama, qwen2 and gpt2"
                )))
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let hidden_size = meta.require_usize(&key("embedding_length"))?;
        let n_heads = meta.require_usize(&key("attention.head_count"))?;
        if n_heads == 0 {
            return Err(Error::format("GGUF: attention.head_count must be positive"));
        }
        let n_kv_heads = meta
            .usize(&key("attention.head_count_kv"))?
            .unwrap_or(n_heads);
        let head_dim = meta
            .usize(&key("attention.key_length"))?
            .unwrap_or(hidden_size / n_heads);
        let eps_key = if architecture == Architecture::Gpt2 {
            "attention.layer_norm_epsilon"
        } else {
            "attention.layer_norm_rms_epsilon"
        };
        if let Some(kind) = meta.str(&key("rope.scaling.type"))? {
            if kind != "none" {
                return Err(Error::Unsupported(format!("GGUF RoPE scaling {kind:?}")));
            }
        }
        if let Some(n) = meta.usize(&key("rope.dimension_count"))? {
            if architecture != Architecture::Gpt2 && n != head_dim {
                return Err(Error::Unsupported(format!(
                    "partial rotary embeddings ({n} of {head_dim} dimensions)"
                )));
            }
        }
        let id = |k: &str| -> Result<Option<u32>> {
            meta.usize(k)?
                .map(|v| {
                    u32::try_from(v).map_err(|_| Error::format(format!("GGUF {k} out of range")))
                })
                .transpose()
        };
        let config = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: meta.require_usize(&key("feed_forward_length"))?,
            n_layers: meta.require_usize(&key("block_count"))?,
            n_heads,
            n_kv_heads,
            head_dim,
            max_position_embeddings: meta.require_usize(&key("context_length"))?,
            norm_eps: meta.f64(&key(eps_key))?.unwrap_or(1e-5) as f32,
            rope_theta: meta.f64(&key("rope.freq_base"))?.unwrap_or(10000.0) as f32,
            rope_scaling: None,
            // Decided by the loader, which sees whether an output matrix exists.
            tie_word_embeddings: false,
            bos_token_id: id("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: id("tokenizer.ggml.eos_token_id")?.into_iter().collect(),
            rope_interleaved: architecture == Architecture::Llama,
            rope_freq_factors: None,
        };
        config.validate()?;
        Ok(config)
    }
}
