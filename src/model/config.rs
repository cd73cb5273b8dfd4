//! A model's hyper-parameters: its shape and every feature of its forward pass.
//!
//! The forward pass reads features (a sliding window, norms on queries and keys, soft caps,
//! multipliers) rather than architecture names: each family's file (`arch/*.rs`) says which
//! features it has, from a Hugging Face `config.json` or GGUF metadata.

use crate::error::{Error, Result};

/// The Transformer families Ember runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3/3.2, SmolLM/SmolLM2, TinyLlama, Mistral: RMSNorm, RoPE, GQA, SwiGLU.
    Llama,
    /// Qwen2 / Qwen2.5: Llama plus biases on the q/k/v projections.
    Qwen2,
    /// Qwen3: Llama with RMSNorm on each head's queries and keys.
    Qwen3,
    /// Gemma 2: sandwich norms, GeGLU, soft caps, alternating sliding-window layers.
    Gemma2,
    /// Gemma 3: Gemma 2 with query/key norms, a layer pattern and two RoPE bases.
    Gemma3,
    /// Phi-3 / Phi-4-mini: fused projections, partial rotary, LongRoPE.
    Phi3,
    /// SmolLM3: Llama without RoPE on every fourth layer.
    SmolLM3,
    /// Granite 3: Llama with embedding, attention, residual and logit multipliers.
    Granite,
    /// GPT-2: learned positions, LayerNorm, GELU, fused attention projection.
    Gpt2,
}

impl Architecture {
    /// The short name used in messages and by the C API (GGUF's `general.architecture`).
    pub fn name(self) -> &'static str {
        self.c_name().to_str().unwrap_or("")
    }

    /// [`Architecture::name`] as a C string.
    pub fn c_name(self) -> &'static std::ffi::CStr {
        match self {
            Architecture::Llama => c"llama",
            Architecture::Qwen2 => c"qwen2",
            Architecture::Qwen3 => c"qwen3",
            Architecture::Gemma2 => c"gemma2",
            Architecture::Gemma3 => c"gemma3",
            Architecture::Phi3 => c"phi3",
            Architecture::SmolLM3 => c"smollm3",
            Architecture::Granite => c"granite",
            Architecture::Gpt2 => c"gpt2",
        }
    }

    /// Every family, for messages and tables.
    pub fn all() -> [Architecture; 9] {
        [
            Architecture::Llama,
            Architecture::Qwen2,
            Architecture::Qwen3,
            Architecture::Gemma2,
            Architecture::Gemma3,
            Architecture::Phi3,
            Architecture::SmolLM3,
            Architecture::Granite,
            Architecture::Gpt2,
        ]
    }
}

/// Llama 3 style frequency-dependent RoPE scaling (`rope_type: "llama3"`).
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

/// How RoPE frequencies are scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Frequencies `theta^(-2i/d)` as they are.
    None,
    /// Llama 3's frequency-dependent scaling.
    Llama3(Llama3RopeScaling),
    /// Every frequency divided by `factor` (position interpolation).
    Linear {
        /// The divisor.
        factor: f32,
    },
    /// One divisor per frequency (GGUF's `rope_freqs`, which is how it stores Llama 3
    /// scaling), `dims / 2` values.
    Factors(Vec<f32>),
    /// Phi-3's LongRoPE: per-frequency divisors for short and long contexts, and a factor on
    /// cos and sin. Which set applies is decided by the session's context length: the long
    /// factors when it exceeds `original_max`.
    LongRope {
        /// Divisors for contexts up to `original_max`.
        short: Vec<f32>,
        /// Divisors for longer contexts.
        long: Vec<f32>,
        /// The context length the short factors are for.
        original_max: usize,
        /// Multiplies cos and sin (so q·k by its square).
        attention_factor: f32,
    },
}

/// Rotary position embeddings of a layer kind.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// Base frequency.
    pub theta: f32,
    /// Leading dimensions of each head that rotate (the rest pass through); even.
    pub dims: usize,
    /// Frequency scaling.
    pub scaling: RopeScaling,
}

/// What differs from one layer to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerKind {
    /// Keys older than this many positions (the token itself counts) are not attended to.
    pub sliding_window: Option<usize>,
    /// Whether the layer rotates queries and keys.
    pub rope: bool,
    /// Whether it uses [`ModelConfig::rope_local`] (Gemma 3's sliding layers).
    pub local_rope: bool,
}

/// The activation of the feed-forward network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu(gate) * up` (SwiGLU).
    Silu,
    /// `gelu_tanh(gate) * up` (GeGLU), or GPT-2's `gelu_tanh(fc)`.
    GeluTanh,
}

/// Everything the forward pass needs to know about a model's shape and features.
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
    /// Width of one attention head (not necessarily `hidden_size / n_heads`).
    pub head_dim: usize,
    /// Longest context the model supports (never the sliding window).
    pub max_position_embeddings: usize,
    /// Epsilon of RMSNorm / LayerNorm.
    pub norm_eps: f32,
    /// RoPE of the layers that use it (unused by GPT-2).
    pub rope: Rope,
    /// RoPE of the layers marked `local_rope`, where it differs (Gemma 3's sliding layers).
    pub rope_local: Option<Rope>,
    /// RoPE rotates adjacent pairs `(2i, 2i + 1)` instead of pairs half the rotary width
    /// apart: GGUF files of the Llama-layout families store Q and K rows permuted for this.
    pub rope_interleaved: bool,
    /// Per-layer differences, `n_layers` of them.
    pub layers: Vec<LayerKind>,
    /// Whether the output matrix is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token, if the config names one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens named by the config.
    pub eos_token_ids: Vec<u32>,
    /// Biases on the q/k/v projections.
    pub qkv_bias: bool,
    /// RMSNorm on each head's queries and keys before RoPE.
    pub qk_norm: bool,
    /// Norms after attention and after the feed-forward network, before the residual adds.
    pub sandwich_norms: bool,
    /// The feed-forward activation.
    pub activation: Activation,
    /// Multiplies q·k (usually `1/sqrt(head_dim)`).
    pub attention_scale: f32,
    /// `c·tanh(s/c)` on attention scores before the softmax.
    pub attn_softcap: Option<f32>,
    /// `c·tanh(l/c)` on the output logits.
    pub final_softcap: Option<f32>,
    /// Multiplies the token embeddings.
    pub embedding_scale: f32,
    /// Multiplies each block's attention and feed-forward outputs before the residual adds.
    pub residual_scale: f32,
    /// Divides the output logits.
    pub logit_scale: f32,
}

impl ModelConfig {
    /// Width of the query projection output (`n_heads * head_dim`).
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the key and value projection outputs (`n_kv_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// A Llama-shaped configuration with every feature off: the base each family's
    /// configuration starts from.
    #[allow(clippy::too_many_arguments)]
    pub fn base(
        architecture: Architecture,
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        n_layers: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> ModelConfig {
        ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            max_position_embeddings: 2048,
            norm_eps: 1e-6,
            rope: Rope {
                theta: 10000.0,
                dims: head_dim,
                scaling: RopeScaling::None,
            },
            rope_local: None,
            rope_interleaved: false,
            layers: vec![
                LayerKind {
                    sliding_window: None,
                    rope: true,
                    local_rope: false,
                };
                n_layers.min(1 << 10)
            ],
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            qkv_bias: false,
            qk_norm: false,
            sandwich_norms: false,
            activation: Activation::Silu,
            attention_scale: 1.0 / (head_dim.max(1) as f32).sqrt(),
            attn_softcap: None,
            final_softcap: None,
            embedding_scale: 1.0,
            residual_scale: 1.0,
            logit_scale: 1.0,
        }
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
        if self.layers.len() != self.n_layers {
            return Err(Error::format(format!(
                "config: {} layer kinds for {} layers",
                self.layers.len(),
                self.n_layers
            )));
        }
        let gpt2 = self.architecture == Architecture::Gpt2;
        if gpt2 && (self.q_dim() != self.hidden_size || self.n_kv_heads != self.n_heads) {
            return Err(Error::format(format!(
                "config: GPT-2 needs heads x head_dim = hidden size ({} x {} != {}) and no \
                 grouped keys/values",
                self.n_heads, self.head_dim, self.hidden_size
            )));
        }
        if !gpt2 {
            for rope in std::iter::once(&self.rope).chain(&self.rope_local) {
                if rope.dims == 0 || rope.dims % 2 != 0 || rope.dims > self.head_dim {
                    return Err(Error::format(format!(
                        "config: RoPE over {} of {} dimensions (must be even, at most the head)",
                        rope.dims, self.head_dim
                    )));
                }
                if !(rope.theta.is_finite() && rope.theta > 0.0) {
                    return Err(Error::format("config: rope_theta must be positive"));
                }
                let half = rope.dims / 2;
                let factors_ok =
                    |f: &[f32]| f.len() == half && f.iter().all(|v| v.is_finite() && *v > 0.0);
                match &rope.scaling {
                    RopeScaling::Factors(f) if !factors_ok(f) => {
                        return Err(Error::format(format!(
                            "config: RoPE frequency factors must be {half} positive numbers"
                        )))
                    }
                    RopeScaling::LongRope {
                        short,
                        long,
                        attention_factor,
                        original_max,
                    } if !(factors_ok(short)
                        && factors_ok(long)
                        && attention_factor.is_finite()
                        && *attention_factor > 0.0
                        && *original_max > 0) =>
                    {
                        return Err(Error::format(format!(
                            "config: LongRoPE needs {half} positive short and long factors"
                        )))
                    }
                    RopeScaling::Linear { factor } if !(factor.is_finite() && *factor > 0.0) => {
                        return Err(Error::format(
                            "config: rope scaling factor must be positive",
                        ))
                    }
                    _ => {}
                }
            }
        }
        if self.layers.iter().any(|l| l.sliding_window == Some(0)) {
            return Err(Error::format("config: a sliding window must be positive"));
        }
        let finite_positive = |v: f32| v.is_finite() && v > 0.0;
        for (name, value) in [
            ("attention scale", self.attention_scale),
            ("embedding scale", self.embedding_scale),
            ("residual scale", self.residual_scale),
            ("logit scale", self.logit_scale),
        ] {
            if !finite_positive(value) {
                return Err(Error::format(format!("config: {name} must be positive")));
            }
        }
        for cap in [self.attn_softcap, self.final_softcap]
            .into_iter()
            .flatten()
        {
            if !finite_positive(cap) {
                return Err(Error::format("config: soft caps must be positive"));
            }
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return Err(Error::format(
                "config: norm epsilon must be a finite non-negative number",
            ));
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
}
