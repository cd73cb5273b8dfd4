//! The model: its configuration and its weights, arranged per Transformer block.
//!
//! A [`Model`] is immutable once loaded and is shared between threads and sessions (`Arc`).

mod forward;

use std::ops::Range;
use std::path::Path;

use crate::error::{Error, Result};
use crate::kernels;
use crate::loader::{self, Architecture, ModelConfig, TensorStore};
use crate::tensor::Tensor;
use crate::threading::Par;
use crate::tokenizer::Tokenizer;

pub(crate) use forward::{ForwardScratch, KvCache, LogitsWanted, Workspace};

/// A weight matrix applied to activations, with an optional bias.
#[derive(Debug)]
pub(crate) struct Projection {
    /// The weights, in one of two layouts.
    weight: ProjectionWeight,
    /// Added to every output row when present.
    bias: Option<Vec<f32>>,
}

#[derive(Debug)]
enum ProjectionWeight {
    /// `[n_out, n_in]`, as `torch.nn.Linear` stores it.
    Linear(Tensor),
    /// Columns `cols` of an `[n_in, n_total]` matrix, as GPT-2's `Conv1D` stores it.
    InOut { weight: Tensor, cols: Range<usize> },
}

impl Projection {
    fn linear(weight: Tensor, bias: Option<Tensor>) -> Projection {
        Projection {
            weight: ProjectionWeight::Linear(weight),
            bias: bias.map(|b| b.to_f32_vec()),
        }
    }

    /// Output width.
    pub(crate) fn n_out(&self) -> usize {
        match &self.weight {
            ProjectionWeight::Linear(w) => w.shape()[0],
            ProjectionWeight::InOut { cols, .. } => cols.len(),
        }
    }

    /// `y[t] = W x[t] + b` for `n_tok` rows of `x`.
    pub(crate) fn forward(&self, par: Par, x: &[f32], n_tok: usize, y: &mut [f32]) {
        match &self.weight {
            ProjectionWeight::Linear(w) => kernels::matmul(par, w, x, n_tok, y),
            ProjectionWeight::InOut { weight, cols } => {
                kernels::matmul_in_out_cols(par, weight, cols.clone(), x, n_tok, y)
            }
        }
        if let Some(bias) = &self.bias {
            kernels::add_bias(&mut y[..n_tok * bias.len()], bias);
        }
    }

    /// The dtype name of the weights (for reports).
    pub(crate) fn dtype_name(&self) -> &'static str {
        match &self.weight {
            ProjectionWeight::Linear(w) | ProjectionWeight::InOut { weight: w, .. } => {
                w.dtype().name()
            }
        }
    }
}

/// A normalisation layer's parameters (RMSNorm when `bias` is `None`, else LayerNorm).
#[derive(Debug)]
pub(crate) struct Norm {
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    eps: f32,
}

impl Norm {
    /// Normalises one row.
    pub(crate) fn apply(&self, x: &[f32], out: &mut [f32]) {
        match &self.bias {
            None => kernels::rms_norm(x, &self.weight, self.eps, out),
            Some(bias) => kernels::layer_norm(x, &self.weight, bias, self.eps, out),
        }
    }
}

/// The feed-forward part of a block.
#[derive(Debug)]
pub(crate) enum FeedForward {
    /// `down(silu(gate(x)) * up(x))` (Llama, Qwen2).
    SwiGlu {
        gate: Projection, // [intermediate, hidden]
        up: Projection,   // [intermediate, hidden]
        down: Projection, // [hidden, intermediate]
    },
    /// `proj(gelu(fc(x)))` (GPT-2).
    Gelu {
        fc: Projection,   // [hidden -> intermediate]
        proj: Projection, // [intermediate -> hidden]
    },
}

/// One Transformer block.
#[derive(Debug)]
pub(crate) struct Block {
    pub(crate) attn_norm: Norm,
    pub(crate) q: Projection, // [n_heads * head_dim, hidden]
    pub(crate) k: Projection, // [n_kv_heads * head_dim, hidden]
    pub(crate) v: Projection, // [n_kv_heads * head_dim, hidden]
    pub(crate) o: Projection, // [hidden, n_heads * head_dim]
    pub(crate) ffn_norm: Norm,
    pub(crate) ffn: FeedForward,
}

/// A loaded, immutable language model.
#[derive(Debug)]
pub struct Model {
    pub(crate) config: ModelConfig,
    pub(crate) embed: Tensor,             // [vocab, hidden]
    pub(crate) positions: Option<Tensor>, // [max_positions, hidden] (GPT-2)
    pub(crate) blocks: Vec<Block>,
    pub(crate) final_norm: Norm,
    pub(crate) lm_head: Tensor, // [vocab, hidden]
    pub(crate) tokenizer: Option<Tokenizer>,
}

impl Model {
    /// Loads a model from a Hugging Face folder (config.json + safetensors).
    ///
    /// Weights are memory-mapped and used in place; the files must not be modified while the
    /// model is alive.
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            ));
        }
        if path.is_dir() {
            let (config, store) = loader::load_hf_folder(path)?;
            let model = Model::from_hf_tensors(config, store)?;
            model.with_tokenizer(Tokenizer::from_hf_folder(path)?)
        } else {
            Err(Error::Unsupported(format!(
                "{}: model files other than Hugging Face folders are not supported yet",
                path.display()
            )))
        }
    }

    /// Builds a model from its configuration and Hugging Face-named tensors.
    pub fn from_hf_tensors(config: ModelConfig, mut store: TensorStore) -> Result<Model> {
        let model = match config.architecture {
            Architecture::Llama | Architecture::Qwen2 => llama_from_hf(config, &mut store)?,
            Architecture::Gpt2 => gpt2_from_hf(config, &mut store)?,
        };
        store.finish()?;
        Ok(model)
    }

    /// Attaches a tokenizer, checking that its ids fit the model's vocabulary.
    pub fn with_tokenizer(mut self, tokenizer: Option<Tokenizer>) -> Result<Model> {
        if let Some(t) = &tokenizer {
            if t.n_vocab() > self.config.vocab_size {
                return Err(Error::format(format!(
                    "the tokenizer has {} tokens but the model only {} embeddings",
                    t.n_vocab(),
                    self.config.vocab_size
                )));
            }
        }
        self.tokenizer = tokenizer;
        Ok(self)
    }

    /// The model's tokenizer, or an error naming what is missing.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::Unsupported("this model has no tokenizer (tokenizer.json)".into())
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Vocabulary size (length of a logits vector).
    pub fn n_vocab(&self) -> usize {
        self.config.vocab_size
    }

    /// A one-line description of the weights' dtypes, e.g. `"BF16"`.
    pub fn weight_dtype(&self) -> &'static str {
        self.blocks.first().map_or("none", |b| b.q.dtype_name())
    }

    /// Total number of weight bytes a decode step reads (all matrices once, the embedding
    /// row aside): the denominator of the memory-bandwidth bound.
    pub fn weight_bytes_per_token(&self) -> usize {
        let mut bytes = self.lm_head.bytes().len();
        for b in &self.blocks {
            for p in [&b.q, &b.k, &b.v, &b.o] {
                bytes += p.n_out() * self.config.hidden_size * dtype_size(p);
            }
            match &b.ffn {
                FeedForward::SwiGlu { gate, up, down } => {
                    for p in [gate, up, down] {
                        bytes +=
                            self.config.hidden_size * self.config.intermediate_size * dtype_size(p);
                    }
                }
                FeedForward::Gelu { fc, proj } => {
                    for p in [fc, proj] {
                        bytes +=
                            self.config.hidden_size * self.config.intermediate_size * dtype_size(p);
                    }
                }
            }
        }
        bytes
    }
}

fn dtype_size(p: &Projection) -> usize {
    match &p.weight {
        ProjectionWeight::Linear(w) | ProjectionWeight::InOut { weight: w, .. } => w.dtype().size(),
    }
}

fn norm(
    store: &mut TensorStore,
    prefix: &str,
    hidden: usize,
    eps: f32,
    with_bias: bool,
) -> Result<Norm> {
    let weight = store
        .take(&format!("{prefix}.weight"), &[hidden])?
        .to_f32_vec();
    let bias = if with_bias {
        Some(
            store
                .take(&format!("{prefix}.bias"), &[hidden])?
                .to_f32_vec(),
        )
    } else {
        None
    };
    Ok(Norm { weight, bias, eps })
}

fn linear(
    store: &mut TensorStore,
    prefix: &str,
    n_out: usize,
    n_in: usize,
    with_bias: bool,
) -> Result<Projection> {
    let weight = store.take(&format!("{prefix}.weight"), &[n_out, n_in])?;
    let bias = if with_bias {
        Some(store.take(&format!("{prefix}.bias"), &[n_out])?)
    } else {
        None
    };
    Ok(Projection::linear(weight, bias))
}

fn llama_from_hf(config: ModelConfig, store: &mut TensorStore) -> Result<Model> {
    let (h, inter) = (config.hidden_size, config.intermediate_size);
    let (q_dim, kv_dim) = (config.q_dim(), config.kv_dim());
    let qkv_bias = config.architecture == Architecture::Qwen2;
    let eps = config.norm_eps;
    let mut blocks = Vec::with_capacity(config.n_layers);
    for i in 0..config.n_layers {
        let p = format!("model.layers.{i}");
        blocks.push(Block {
            attn_norm: norm(store, &format!("{p}.input_layernorm"), h, eps, false)?,
            q: linear(store, &format!("{p}.self_attn.q_proj"), q_dim, h, qkv_bias)?,
            k: linear(store, &format!("{p}.self_attn.k_proj"), kv_dim, h, qkv_bias)?,
            v: linear(store, &format!("{p}.self_attn.v_proj"), kv_dim, h, qkv_bias)?,
            o: linear(store, &format!("{p}.self_attn.o_proj"), h, q_dim, false)?,
            ffn_norm: norm(
                store,
                &format!("{p}.post_attention_layernorm"),
                h,
                eps,
                false,
            )?,
            ffn: FeedForward::SwiGlu {
                gate: linear(store, &format!("{p}.mlp.gate_proj"), inter, h, false)?,
                up: linear(store, &format!("{p}.mlp.up_proj"), inter, h, false)?,
                down: linear(store, &format!("{p}.mlp.down_proj"), h, inter, false)?,
            },
        });
    }
    let embed = store.take("model.embed_tokens.weight", &[config.vocab_size, h])?;
    let lm_head = match store.take_optional("lm_head.weight", &[config.vocab_size, h])? {
        Some(head) => head,
        None if config.tie_word_embeddings => embed.clone(),
        None => {
            return Err(Error::format(
                "tensor lm_head.weight is missing (embeddings are not tied)",
            ))
        }
    };
    Ok(Model {
        final_norm: norm(store, "model.norm", h, eps, false)?,
        embed,
        positions: None,
        blocks,
        lm_head,
        config,
        tokenizer: None,
    })
}

fn gpt2_from_hf(config: ModelConfig, store: &mut TensorStore) -> Result<Model> {
    // Checkpoints saved from GPT2LMHeadModel prefix names with "transformer."; the original
    // OpenAI conversions do not.
    let prefix = if store.tensors.contains_key("transformer.wte.weight") {
        "transformer."
    } else {
        ""
    };
    let (h, inter) = (config.hidden_size, config.intermediate_size);
    let eps = config.norm_eps;
    // GPT-2's Conv1D stores [n_in, n_out]; `cols` picks the output columns of a projection.
    let conv = |store: &mut TensorStore,
                name: &str,
                n_in: usize,
                n_out: usize|
     -> Result<(Tensor, Vec<f32>)> {
        let w = store.take(&format!("{name}.weight"), &[n_in, n_out])?;
        let b = store.take(&format!("{name}.bias"), &[n_out])?.to_f32_vec();
        Ok((w, b))
    };
    let split = |w: &Tensor, b: &[f32], cols: Range<usize>| Projection {
        bias: Some(b[cols.clone()].to_vec()),
        weight: ProjectionWeight::InOut {
            weight: w.clone(),
            cols,
        },
    };
    let mut blocks = Vec::with_capacity(config.n_layers);
    for i in 0..config.n_layers {
        let p = format!("{prefix}h.{i}");
        let (attn_w, attn_b) = conv(store, &format!("{p}.attn.c_attn"), h, 3 * h)?;
        let (proj_w, proj_b) = conv(store, &format!("{p}.attn.c_proj"), h, h)?;
        let (fc_w, fc_b) = conv(store, &format!("{p}.mlp.c_fc"), h, inter)?;
        let (mproj_w, mproj_b) = conv(store, &format!("{p}.mlp.c_proj"), inter, h)?;
        blocks.push(Block {
            attn_norm: norm(store, &format!("{p}.ln_1"), h, eps, true)?,
            q: split(&attn_w, &attn_b, 0..h),
            k: split(&attn_w, &attn_b, h..2 * h),
            v: split(&attn_w, &attn_b, 2 * h..3 * h),
            o: split(&proj_w, &proj_b, 0..h),
            ffn_norm: norm(store, &format!("{p}.ln_2"), h, eps, true)?,
            ffn: FeedForward::Gelu {
                fc: split(&fc_w, &fc_b, 0..inter),
                proj: split(&mproj_w, &mproj_b, 0..h),
            },
        });
    }
    let embed = store.take(&format!("{prefix}wte.weight"), &[config.vocab_size, h])?;
    let positions = store.take(
        &format!("{prefix}wpe.weight"),
        &[config.max_position_embeddings, h],
    )?;
    let lm_head = store
        .take_optional("lm_head.weight", &[config.vocab_size, h])?
        .unwrap_or_else(|| embed.clone());
    Ok(Model {
        final_norm: norm(store, &format!("{prefix}ln_f"), h, eps, true)?,
        embed,
        positions: Some(positions),
        blocks,
        lm_head,
        config,
        tokenizer: None,
    })
}
