//! The model: its configuration and its weights, arranged per Transformer block.
//!
//! A [`Model`] is immutable once loaded and is shared between threads and sessions (`Arc`).

mod forward;

use std::ops::Range;
use std::path::Path;

use crate::error::{Error, Result};
use crate::kernels;
use crate::kernels::quant::QuantActs;
use crate::loader::{self, Architecture, ModelConfig, TensorStore};
use crate::tensor::{DType, Tensor};
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

    /// `y[t] = W x[t] + b` for `n_tok` rows of `x`; `act` holds quantized activations.
    pub(crate) fn forward(
        &self,
        par: Par,
        x: &[f32],
        n_tok: usize,
        y: &mut [f32],
        act: &mut QuantActs,
    ) {
        match &self.weight {
            ProjectionWeight::Linear(w) => kernels::matmul_with(par, w, x, n_tok, y, act),
            ProjectionWeight::InOut { weight, cols } => {
                kernels::matmul_in_out_cols(par, weight, cols.clone(), x, n_tok, y)
            }
        }
        if let Some(bias) = &self.bias {
            kernels::add_bias(&mut y[..n_tok * bias.len()], bias);
        }
    }

    /// The weights' element type.
    pub(crate) fn dtype(&self) -> DType {
        match &self.weight {
            ProjectionWeight::Linear(w) | ProjectionWeight::InOut { weight: w, .. } => w.dtype(),
        }
    }

    /// Bytes of weights one product reads.
    pub(crate) fn weight_bytes(&self) -> usize {
        match &self.weight {
            ProjectionWeight::Linear(w) => w.bytes().len(),
            ProjectionWeight::InOut { weight, cols } => {
                weight.shape()[0] * cols.len() * weight.dtype().block_bytes()
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
    pub(crate) tokenizer: LazyTokenizer,
    /// How many of the file's tensors have each element type.
    pub(crate) type_counts: std::collections::BTreeMap<&'static str, usize>,
}

/// How a model is loaded.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Make the tokenizer available (built from `tokenizer.json` or GGUF metadata on first
    /// use). Default true.
    pub load_tokenizer: bool,
    /// Quantize F32/F16/BF16 matrices to Q8_0 at load (faster, about 1/4 of the F32 memory,
    /// not bit-exact). GPT-2's Conv1D matrices stay as they are. Default false.
    pub quantize_q8_0: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            load_tokenizer: true,
            quantize_q8_0: false,
        }
    }
}

/// Builds the tokenizer from its source.
type TokenizerBuilder = Box<dyn FnOnce() -> Result<Option<Tokenizer>> + Send>;

/// A tokenizer built on first use: building a 50k-token vocabulary takes about 25 ms, which
/// loading the weights should not pay (nor users who only step ids).
#[derive(Default)]
pub(crate) struct LazyTokenizer {
    builder: std::sync::Mutex<Option<TokenizerBuilder>>,
    built: std::sync::OnceLock<Result<Option<Tokenizer>, Error>>,
}

impl std::fmt::Debug for LazyTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyTokenizer")
            .field("built", &self.built.get())
            .finish()
    }
}

impl LazyTokenizer {
    fn ready(tokenizer: Option<Tokenizer>) -> LazyTokenizer {
        let lazy = LazyTokenizer::default();
        let _ = lazy.built.set(Ok(tokenizer));
        lazy
    }

    fn deferred(builder: TokenizerBuilder) -> LazyTokenizer {
        LazyTokenizer {
            builder: std::sync::Mutex::new(Some(builder)),
            built: std::sync::OnceLock::new(),
        }
    }

    /// The tokenizer, built now if this is the first call.
    fn get(&self, n_vocab: usize) -> Result<Option<&Tokenizer>> {
        let built = self.built.get_or_init(|| {
            let builder = self
                .builder
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            let tokenizer = builder.map_or(Ok(None), |build| build())?;
            check_tokenizer_fits(tokenizer.as_ref(), n_vocab)?;
            Ok(tokenizer)
        });
        match built {
            Ok(t) => Ok(t.as_ref()),
            Err(e) => Err(e.duplicate()),
        }
    }
}

fn check_tokenizer_fits(tokenizer: Option<&Tokenizer>, n_vocab: usize) -> Result<()> {
    match tokenizer {
        Some(t) if t.n_vocab() > n_vocab => Err(Error::format(format!(
            "the tokenizer has {} tokens but the model only {n_vocab} embeddings",
            t.n_vocab()
        ))),
        _ => Ok(()),
    }
}

impl Model {
    /// Loads a model from a Hugging Face folder (config.json + safetensors) or a GGUF file.
    ///
    /// Weights are memory-mapped and used in place; the files must not be modified while the
    /// model is alive.
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        Model::load_with(path, &LoadOptions::default())
    }

    /// [`Model::load`] with options (load-time Q8_0 quantization, no tokenizer).
    pub fn load_with(path: impl AsRef<Path>, options: &LoadOptions) -> Result<Model> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            ));
        }
        if path.is_dir() {
            let (config, store) = loader::load_hf_folder(path)?;
            let dir = path.to_path_buf();
            let model = Model::from_hf_tensors(config, store)?;
            model.finish_load(options, Box::new(move || Tokenizer::from_hf_folder(&dir)))
        } else {
            let storage = loader::map_file(path)?;
            Model::from_gguf_storage(storage, &path.display().to_string(), options)
        }
    }

    /// Loads a model from the bytes of a GGUF file (copied; `name` names it in errors).
    pub fn load_gguf_bytes(bytes: &[u8], name: &str, options: &LoadOptions) -> Result<Model> {
        let storage = std::sync::Arc::new(crate::tensor::Storage::owned(bytes)?);
        Model::from_gguf_storage(storage, name, options)
    }

    /// Loads a model from GGUF bytes held by `storage`.
    fn from_gguf_storage(
        storage: std::sync::Arc<crate::tensor::Storage>,
        name: &str,
        options: &LoadOptions,
    ) -> Result<Model> {
        let file = loader::gguf::GgufFile::parse(storage).map_err(|e| e.in_file(name))?;
        let (config, store) = loader::gguf::model_parts(&file).map_err(|e| e.in_file(name))?;
        let mut model = Model::from_gguf_tensors(config, store).map_err(|e| e.in_file(name))?;
        // Every tensor of the file (the loader folds `rope_freqs` into the configuration).
        model.type_counts = std::collections::BTreeMap::new();
        for info in &file.infos {
            *model.type_counts.entry(info.dtype.name()).or_default() += 1;
        }
        let metadata = file.metadata;
        let name = name.to_string();
        model.finish_load(
            options,
            Box::new(move || {
                crate::tokenizer::tokenizer_from_gguf(&metadata).map_err(|e| e.in_file(&name))
            }),
        )
    }

    /// What every way of loading does last: attach the tokenizer's builder and quantize
    /// if asked.
    fn finish_load(mut self, options: &LoadOptions, tokenizer: TokenizerBuilder) -> Result<Model> {
        if options.load_tokenizer {
            self.tokenizer = LazyTokenizer::deferred(tokenizer);
        }
        if options.quantize_q8_0 {
            self.quantize_q8_0()?;
        }
        Ok(self)
    }

    /// Replaces every F32/F16/BF16 linear weight matrix (and the output matrix) by a Q8_0
    /// copy. The embedding table stays as it is (one row is read per token).
    fn quantize_q8_0(&mut self) -> Result<()> {
        for block in &mut self.blocks {
            let Block {
                q, k, v, o, ffn, ..
            } = block;
            let mut projections: Vec<&mut Projection> = vec![q, k, v, o];
            match ffn {
                FeedForward::SwiGlu { gate, up, down } => projections.extend([gate, up, down]),
                FeedForward::Gelu { fc, proj } => projections.extend([fc, proj]),
            }
            for p in projections {
                if let ProjectionWeight::Linear(w) = &p.weight {
                    if let Some(quantized) = quantized_q8_0(w)? {
                        p.weight = ProjectionWeight::Linear(quantized);
                    }
                }
            }
        }
        if let Some(head) = quantized_q8_0(&self.lm_head)? {
            self.lm_head = head;
        }
        Ok(())
    }

    /// Builds a model from its configuration and Hugging Face-named tensors.
    pub fn from_hf_tensors(config: ModelConfig, mut store: TensorStore) -> Result<Model> {
        let counts = store.type_counts();
        let mut model = match config.architecture {
            Architecture::Llama | Architecture::Qwen2 => llama_from_hf(config, &mut store)?,
            Architecture::Gpt2 => gpt2_from_hf(config, &mut store, Gpt2Layout::Conv1D)?,
        };
        store.finish()?;
        model.type_counts = counts;
        Ok(model)
    }

    /// Builds a model from a GGUF file's configuration and tensors, renamed to Hugging Face
    /// names by the loader (GPT-2 projections stay in GGUF's `[n_out, n_in]` layout).
    pub fn from_gguf_tensors(config: ModelConfig, mut store: TensorStore) -> Result<Model> {
        let counts = store.type_counts();
        let mut model = match config.architecture {
            Architecture::Llama | Architecture::Qwen2 => llama_from_hf(config, &mut store)?,
            Architecture::Gpt2 => gpt2_from_hf(config, &mut store, Gpt2Layout::Linear)?,
        };
        store.finish()?;
        model.type_counts = counts;
        Ok(model)
    }

    /// How many of the model file's tensors have each element type (e.g. a Q4_K_M file:
    /// `{"F32": 61, "Q4_K": 16, "Q5_0": 166, ...}`).
    pub fn tensor_type_counts(&self) -> &std::collections::BTreeMap<&'static str, usize> {
        &self.type_counts
    }

    /// Attaches a tokenizer (or none), checking that its ids fit the model's vocabulary.
    pub fn with_tokenizer(mut self, tokenizer: Option<Tokenizer>) -> Result<Model> {
        check_tokenizer_fits(tokenizer.as_ref(), self.config.vocab_size)?;
        self.tokenizer = LazyTokenizer::ready(tokenizer);
        Ok(self)
    }

    /// The model's tokenizer (built on the first call), or an error saying why there is none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.get(self.config.vocab_size)?.ok_or_else(|| {
            Error::Unsupported(
                "this model has no tokenizer (no tokenizer.json or tokenizer.ggml metadata)".into(),
            )
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
        self.blocks.first().map_or("none", |b| b.q.dtype().name())
    }

    /// The dtypes of the weights, e.g. `"matrices Q4_1, embedding Q8_0, output Q8_0 (tied)"`.
    pub fn dtype_summary(&self) -> String {
        let mut matrices: Vec<&str> = Vec::new();
        for b in &self.blocks {
            for p in b.projections() {
                if !matrices.contains(&p.dtype().name()) {
                    matrices.push(p.dtype().name());
                }
            }
        }
        let tied = if self.config.tie_word_embeddings {
            " (tied)"
        } else {
            ""
        };
        format!(
            "matrices {}, embedding {}, output {}{tied}",
            matrices.join("+"),
            self.embed.dtype().name(),
            self.lm_head.dtype().name()
        )
    }

    /// Total number of weight bytes a decode step reads (all matrices once, the embedding
    /// row aside): the denominator of the memory-bandwidth bound.
    pub fn weight_bytes_per_token(&self) -> usize {
        let mut bytes = self.lm_head.bytes().len();
        for b in &self.blocks {
            bytes += b.projections().map(Projection::weight_bytes).sum::<usize>();
        }
        bytes
    }

    /// True when some product runs on quantized weights (the session then needs a buffer
    /// for quantized activations).
    pub(crate) fn has_quantized_weights(&self) -> bool {
        self.lm_head.dtype().is_quantized()
            || self
                .blocks
                .iter()
                .any(|b| b.projections().any(|p| p.dtype().is_quantized()))
    }
}

impl Block {
    /// Every projection of the block.
    fn projections(&self) -> impl Iterator<Item = &Projection> {
        let ffn: [&Projection; 3] = match &self.ffn {
            FeedForward::SwiGlu { gate, up, down } => [gate, up, down],
            FeedForward::Gelu { fc, proj } => [fc, proj, proj],
        };
        let ffn_len = if matches!(self.ffn, FeedForward::Gelu { .. }) {
            2
        } else {
            3
        };
        [&self.q, &self.k, &self.v, &self.o]
            .into_iter()
            .chain(ffn.into_iter().take(ffn_len))
    }
}

/// A Q8_0 copy of a float matrix whose rows are whole blocks, or `None` if it is already
/// quantized or its rows cannot be.
fn quantized_q8_0(w: &Tensor) -> Result<Option<Tensor>> {
    let (rows, cols) = (w.shape()[0], w.shape()[1]);
    if w.dtype().is_quantized() || cols % kernels::quant::BLOCK != 0 {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    let size = DType::Q8_0
        .bytes_for(rows * cols)
        .ok_or_else(|| Error::OutOfMemory("quantized weights".into()))?;
    bytes
        .try_reserve_exact(size)
        .map_err(|_| Error::OutOfMemory(format!("{size} bytes of Q8_0 weights")))?;
    let mut row = vec![0.0; cols];
    let elements = w.elements();
    for r in 0..rows {
        elements.to_f32(r * cols, &mut row);
        kernels::quant::quantize_q8_0(&row, &mut bytes);
    }
    let storage = std::sync::Arc::new(crate::tensor::Storage::owned(&bytes)?);
    Tensor::new(storage, 0, DType::Q8_0, vec![rows, cols], "Q8_0 copy").map(Some)
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
        tokenizer: LazyTokenizer::default(),
        type_counts: Default::default(),
    })
}

/// How a GPT-2 checkpoint stores its projection matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gpt2Layout {
    /// `[n_in, n_out]` (Hugging Face's `Conv1D`).
    Conv1D,
    /// `[n_out, n_in]` (GGUF files, converted to ordinary linear layers).
    Linear,
}

fn gpt2_from_hf(config: ModelConfig, store: &mut TensorStore, layout: Gpt2Layout) -> Result<Model> {
    // Checkpoints saved from GPT2LMHeadModel prefix names with "transformer."; the original
    // OpenAI conversions do not.
    let prefix = if store.tensors.contains_key("transformer.wte.weight") {
        "transformer."
    } else {
        ""
    };
    let (h, inter) = (config.hidden_size, config.intermediate_size);
    let eps = config.norm_eps;
    // A projection's weight and bias, in the checkpoint's layout.
    let conv = |store: &mut TensorStore,
                name: &str,
                n_in: usize,
                n_out: usize|
     -> Result<(Tensor, Vec<f32>)> {
        let shape = match layout {
            Gpt2Layout::Conv1D => [n_in, n_out],
            Gpt2Layout::Linear => [n_out, n_in],
        };
        let w = store.take(&format!("{name}.weight"), &shape)?;
        let b = store.take(&format!("{name}.bias"), &[n_out])?.to_f32_vec();
        Ok((w, b))
    };
    // Output features `cols` of a (possibly fused) projection.
    let split = |w: &Tensor, b: &[f32], cols: Range<usize>| Projection {
        bias: Some(b[cols.clone()].to_vec()),
        weight: match layout {
            Gpt2Layout::Conv1D => ProjectionWeight::InOut {
                weight: w.clone(),
                cols,
            },
            Gpt2Layout::Linear => ProjectionWeight::Linear(w.rows(cols)),
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
        tokenizer: LazyTokenizer::default(),
        type_counts: Default::default(),
    })
}
