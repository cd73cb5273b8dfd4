//! The model: its configuration and its weights, arranged per Transformer block.
//!
//! - `config.rs`: the hyper-parameters and the features of the forward pass;
//! - `names.rs`: tensor names of both formats, mapped to roles;
//! - `layers.rs`: projections, norms, feed-forward networks and blocks;
//! - `arch/`: one file per architecture family (what it changes relative to Llama);
//! - `forward.rs`: the forward pass, reading features rather than family names;
//! - `capture.rs`: attention weights kept for the host to read, when it asks;
//! - `probe.rs`: describing a model file without loading it.
//!
//! A [`Model`] is immutable once loaded and is shared between threads and sessions (`Arc`).

pub(crate) mod arch;
mod capture;
pub(crate) mod config;
mod forward;
pub(crate) mod kv_cache;
pub(crate) mod layers;
pub(crate) mod names;
mod probe;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::Value;

use crate::constraint::{Constraint, ConstraintFactory, ConstraintKind};
use crate::error::{Error, Result};
use crate::kernels;
use crate::loader::{self, gguf::GgufFile};
use crate::tensor::{DType, Tensor};
use crate::tokenizer::Tokenizer;
use arch::{Family, Format};
use layers::{Block, Norm, Projection, ProjectionWeight};
use names::Weights;

pub use capture::{AttentionRows, AttentionSelection};
pub use config::{
    Activation, Architecture, LayerKind, Llama3RopeScaling, ModelConfig, Rope, RopeScaling,
};
pub use forward::Pooling;
pub(crate) use forward::{
    rope_signature, AttentionCapture, ForwardScratch, KvCache, LogitsWanted, Sequence, Workspace,
};
pub use kv_cache::KvType;
pub use probe::ModelInfo;

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
    pub(crate) type_counts: BTreeMap<&'static str, usize>,
    /// [`Model::fingerprint`], computed on first use.
    pub(crate) fingerprint: std::sync::OnceLock<u64>,
    /// The token trie of constraints ([`Model::constraint`]), built on first use.
    /// (The error of building it is kept as its message.)
    pub(crate) constraints: std::sync::OnceLock<std::result::Result<ConstraintFactory, String>>,
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
            let (json, tensors) = loader::read_hf_folder(path)?;
            let dir = path.to_path_buf();
            let model = Model::from_hf(&json, tensors)?;
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

    /// Loads a model from the bytes of a GGUF file, used in place (not copied; `name` names it
    /// in errors). Tensors whose bytes are not aligned for their type are copied, so `bytes`
    /// should start at an address aligned to 32 bytes, as GGUF aligns its tensors.
    ///
    /// # Safety
    /// The bytes must stay alive and unchanged for as long as the model (and any session
    /// over it) lives.
    pub unsafe fn load_gguf_unowned(
        bytes: &[u8],
        name: &str,
        options: &LoadOptions,
    ) -> Result<Model> {
        // SAFETY: the caller promises the bytes outlive the model, the only user of this
        // reference (every tensor holds the storage, and the model holds the tensors).
        let bytes: &'static [u8] =
            unsafe { std::slice::from_raw_parts(bytes.as_ptr(), bytes.len()) };
        let storage = std::sync::Arc::new(crate::tensor::Storage::Borrowed(bytes));
        Model::from_gguf_storage(storage, name, options)
    }

    /// Loads a model from a GGUF file that is part of a larger file: `len` bytes (0: to the
    /// end) from `offset` of the open file `file` (an Android APK asset, an archive entry),
    /// memory-mapped. The file must stay unchanged while the model lives; the caller's handle
    /// may be closed once this returns.
    pub fn load_gguf_in_file(
        file: &std::fs::File,
        offset: u64,
        len: u64,
        options: &LoadOptions,
    ) -> Result<Model> {
        let name = format!("GGUF at offset {offset} of an open file");
        let io = |e| Error::io(Path::new(&name), e);
        let size = file.metadata().map_err(io)?.len();
        let len = if len == 0 {
            size.saturating_sub(offset)
        } else {
            len
        };
        if offset.checked_add(len).map_or(true, |end| end > size) || len == 0 {
            return Err(Error::InvalidArgument(format!(
                "{len} bytes at offset {offset} do not fit in the file's {size} bytes"
            )));
        }
        let len = usize::try_from(len)
            .map_err(|_| Error::InvalidArgument(format!("length {len} is too large")))?;
        // SAFETY: the mapping is read-only and lies within the file (checked above); like
        // every memory-mapped reader, Ember assumes the file is not truncated or rewritten
        // while the model is loaded, a documented requirement of this function.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(len)
                .map(file)
        }
        .map_err(io)?;
        let storage = std::sync::Arc::new(crate::tensor::Storage::Mapped(map));
        Model::from_gguf_storage(storage, &name, options)
    }

    /// Loads a model from GGUF bytes held by `storage`.
    fn from_gguf_storage(
        storage: std::sync::Arc<crate::tensor::Storage>,
        name: &str,
        options: &LoadOptions,
    ) -> Result<Model> {
        let file = GgufFile::parse(storage).map_err(|e| e.in_file(name))?;
        let model = Model::from_gguf_file(&file).map_err(|e| e.in_file(name))?;
        let metadata = file.metadata;
        let name = name.to_string();
        model.finish_load(
            options,
            Box::new(move || {
                crate::tokenizer::tokenizer_from_gguf(&metadata).map_err(|e| e.in_file(&name))
            }),
        )
    }

    /// The family a GGUF file's `general.architecture` names.
    pub(crate) fn gguf_family(file: &GgufFile) -> Result<&'static Family> {
        let name = file
            .metadata
            .str("general.architecture")?
            .ok_or_else(|| Error::format("GGUF metadata general.architecture is missing"))?;
        arch::gguf_family(name)
    }

    /// A model from a parsed GGUF file (its weights stay in the file's storage).
    pub(crate) fn from_gguf_file(file: &GgufFile) -> Result<Model> {
        let family = Model::gguf_family(file)?;
        let mut weights = Weights::from_gguf(&file.tensors)?;
        let config = (family.gguf_config)(&file.metadata, &mut weights)?;
        Model::assemble(family, config, weights, Format::Gguf)
    }

    /// A model from a Hugging Face `config.json` and its named tensors.
    pub(crate) fn from_hf(json: &Value, tensors: HashMap<String, Tensor>) -> Result<Model> {
        let family = arch::hf_family(json)?;
        let config = (family.hf_config)(json)?;
        let weights = Weights::from_hf(tensors, family.hf_names)?;
        Model::assemble(family, config, weights, Format::HuggingFace)
    }

    /// Builds the family's blocks from the weights, checking that every tensor was used.
    fn assemble(
        family: &Family,
        config: ModelConfig,
        mut weights: Weights,
        format: Format,
    ) -> Result<Model> {
        config.validate()?;
        let type_counts = weights.type_counts().clone();
        let parts = (family.build)(&config, &mut weights, format)?;
        weights.finish()?;
        Ok(Model {
            config,
            embed: parts.embed,
            positions: parts.positions,
            blocks: parts.blocks,
            final_norm: parts.final_norm,
            lm_head: parts.lm_head,
            tokenizer: LazyTokenizer::default(),
            type_counts,
            fingerprint: std::sync::OnceLock::new(),
            constraints: std::sync::OnceLock::new(),
        })
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
            for p in block.projections_mut() {
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

    /// How many of the model file's tensors have each element type (e.g. a Q4_K_M file:
    /// `{"F32": 61, "Q4_K": 16, "Q5_0": 166, ...}`).
    pub fn tensor_type_counts(&self) -> &BTreeMap<&'static str, usize> {
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

    /// A constraint on this model's output ([`crate::SamplerOptions`] has none: set it with
    /// [`crate::Sampler::set_constraint`]). The first call builds the vocabulary's token
    /// trie (tens of milliseconds for a 49k vocabulary); later ones reuse it.
    pub fn constraint(&self, kind: ConstraintKind, text: &str) -> Result<Constraint> {
        let factory = self.constraints.get_or_init(|| {
            self.tokenizer()
                .and_then(|t| ConstraintFactory::new(t, self.config.vocab_size))
                .map_err(|e| e.to_string())
        });
        match factory {
            Ok(f) => f.constraint(kind, text),
            Err(e) => Err(Error::Unsupported(e.clone())),
        }
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Vocabulary size (length of a logits vector).
    pub fn n_vocab(&self) -> usize {
        self.config.vocab_size
    }

    /// Width of the final hidden state: the length of an embedding ([`crate::Session::embed`]).
    pub fn n_embd(&self) -> usize {
        self.config.hidden_size
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

    /// A 64-bit fingerprint of the model as loaded: architecture, shapes, every weight's type
    /// and shape, a sample of each matrix's bytes and all norm weights. Saved session states
    /// carry it, so a state is only loaded into the model that made it (the same file, or one
    /// with identical weights, loaded with the same options).
    pub fn fingerprint(&self) -> u64 {
        *self.fingerprint.get_or_init(|| {
            let mut h = crate::checksum::Hash64::default();
            let c = &self.config;
            h.update(format!("{:?}", c.architecture).as_bytes());
            for n in [
                c.vocab_size,
                c.hidden_size,
                c.intermediate_size,
                c.n_layers,
                c.n_heads,
                c.n_kv_heads,
                c.head_dim,
            ] {
                h.update_u64(n as u64);
            }
            fn tensor(h: &mut crate::checksum::Hash64, t: &Tensor) {
                h.update(t.dtype().name().as_bytes());
                for &d in t.shape() {
                    h.update_u64(d as u64);
                }
                // The first and last 256 bytes: two pages at most, whatever the size.
                let bytes = t.bytes();
                h.update(&bytes[..bytes.len().min(256)]);
                h.update(&bytes[bytes.len().saturating_sub(256)..]);
            }
            fn floats(h: &mut crate::checksum::Hash64, v: &[f32]) {
                for x in v {
                    h.update(&x.to_le_bytes());
                }
            }
            tensor(&mut h, &self.embed);
            if let Some(p) = &self.positions {
                tensor(&mut h, p);
            }
            for b in &self.blocks {
                for p in b.projections() {
                    match &p.weight {
                        ProjectionWeight::Linear(w) => tensor(&mut h, w),
                        ProjectionWeight::InOut { weight, cols } => {
                            tensor(&mut h, weight);
                            h.update_u64(cols.start as u64);
                        }
                    }
                }
                for norm in b.norms() {
                    floats(&mut h, &norm.weight);
                    floats(&mut h, norm.bias.as_deref().unwrap_or(&[]));
                }
            }
            tensor(&mut h, &self.lm_head);
            floats(&mut h, &self.final_norm.weight);
            h.finish()
        })
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
        kernels::to_f32(elements, r * cols, &mut row);
        kernels::quant::quantize_q8_0(&row, &mut bytes);
    }
    let storage = std::sync::Arc::new(crate::tensor::Storage::owned(&bytes)?);
    Tensor::new(storage, 0, DType::Q8_0, vec![rows, cols], "Q8_0 copy").map(Some)
}
