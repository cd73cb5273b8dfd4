//! What a model file is and whether Ember runs it, without loading it: a game checks a modded
//! file before committing to it.
//!
//! The probe reads the file's metadata (GGUF header, config.json, safetensors headers),
//! builds the model's description the way loading does — which reads the norm and bias
//! vectors, a few hundred kilobytes, but no weight matrix — and builds the tokenizer from
//! its metadata. The file is mapped only for the duration of the call.

use std::collections::BTreeMap;
use std::path::Path;

use super::Model;
use crate::error::{Error, Result};
use crate::loader::{self, gguf::GgufFile};
use crate::tensor::DType;
use crate::tokenizer::Tokenizer;

/// A model file's description.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelInfo {
    /// The architecture as the file names it (GGUF `general.architecture`; config.json's
    /// first `architectures` entry or `model_type`), even when Ember does not run it.
    pub architecture: String,
    /// Why Ember cannot load or run the file, or `None` when it can.
    pub unsupported: Option<String>,
    /// The context length the model was trained for, when the file says.
    pub n_ctx_train: Option<usize>,
    /// Number of Transformer blocks, when known.
    pub n_layers: Option<usize>,
    /// Vocabulary size (rows of the embedding matrix), when known.
    pub n_vocab: Option<usize>,
    /// Number of weights: the elements of every tensor.
    pub n_params: u64,
    /// Bytes of the model's files.
    pub file_bytes: u64,
    /// Bytes of weights a generated token reads (when the model loads).
    pub bytes_per_token: Option<usize>,
    /// How many tensors have each element type.
    pub tensor_types: BTreeMap<&'static str, usize>,
    /// Whether the file has a tokenizer Ember can build.
    pub has_tokenizer: bool,
    /// Whether the tokenizer has a chat template.
    pub has_chat_template: bool,
}

impl ModelInfo {
    /// Fills in what the loaded model says, then checks the tokenizer.
    fn describe(
        &mut self,
        model: Result<Model>,
        tokenizer: impl FnOnce() -> Result<Option<Tokenizer>>,
    ) {
        let model = match model {
            Ok(model) => model,
            Err(e) => {
                self.unsupported = Some(e.to_string());
                return;
            }
        };
        let c = model.config();
        self.n_ctx_train = Some(c.max_position_embeddings);
        self.n_layers = Some(c.n_layers);
        self.n_vocab = Some(c.vocab_size);
        self.bytes_per_token = Some(model.weight_bytes_per_token());
        match tokenizer() {
            Ok(Some(t)) => {
                self.has_tokenizer = true;
                self.has_chat_template = t.chat_template().is_some();
                if t.n_vocab() > c.vocab_size {
                    self.unsupported = Some(format!(
                        "the tokenizer has {} tokens but the model only {} embeddings",
                        t.n_vocab(),
                        c.vocab_size
                    ));
                }
            }
            Ok(None) => {}
            Err(e) => self.unsupported = Some(format!("tokenizer: {e}")),
        }
    }

    fn count(&mut self, dtype: DType, shape: &[usize]) {
        *self.tensor_types.entry(dtype.name()).or_default() += 1;
        self.n_params += shape.iter().map(|&d| d as u64).product::<u64>();
    }
}

impl Model {
    /// Describes the model at `path` (a GGUF file or a Hugging Face folder) and says whether
    /// Ember runs it, without loading its weights. Fails only when the path cannot be read;
    /// a file Ember cannot use is described with [`ModelInfo::unsupported`] saying why.
    pub fn probe(path: impl AsRef<Path>) -> Result<ModelInfo> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            probe_folder(path)
        } else {
            probe_gguf(path)
        }
    }
}

fn probe_gguf(path: &Path) -> Result<ModelInfo> {
    let storage = loader::map_file(path)?;
    let mut info = ModelInfo {
        file_bytes: storage.bytes().len() as u64,
        ..ModelInfo::default()
    };
    let file = match GgufFile::parse(storage) {
        Ok(file) => file,
        Err(e) => {
            info.unsupported = Some(e.to_string());
            return Ok(info);
        }
    };
    let meta = &file.metadata;
    info.architecture = meta
        .str("general.architecture")
        .ok()
        .flatten()
        .unwrap_or_default()
        .to_string();
    let key = |k: &str| {
        meta.usize(&format!("{}.{k}", info.architecture))
            .ok()
            .flatten()
    };
    info.n_ctx_train = key("context_length");
    info.n_layers = key("block_count");
    for t in &file.infos {
        info.count(t.dtype, &t.shape);
    }
    info.n_vocab = file.tensors.get("token_embd.weight").map(|t| t.shape()[0]);
    let model = Model::from_gguf_file(&file);
    info.describe(model, || {
        crate::tokenizer::tokenizer_from_gguf(&file.metadata)
    });
    Ok(info)
}

fn probe_folder(dir: &Path) -> Result<ModelInfo> {
    let config_path = dir.join("config.json");
    let bytes = loader::read_bounded(&config_path, loader::MAX_CONFIG_BYTES)?;
    let mut info = ModelInfo {
        file_bytes: bytes.len() as u64,
        ..ModelInfo::default()
    };
    let json = match loader::parse_config(&bytes) {
        Ok(json) => json,
        Err(e) => {
            info.unsupported = Some(e.to_string());
            return Ok(info);
        }
    };
    let text = |v: &serde_json::Value| v.as_str().map(str::to_string);
    info.architecture = json["architectures"]
        .get(0)
        .and_then(text)
        .or_else(|| text(&json["model_type"]))
        .unwrap_or_default();
    info.n_ctx_train = json["max_position_embeddings"]
        .as_u64()
        .or(json["n_positions"].as_u64())
        .map(|n| n as usize);
    let tensors = match loader::safetensors::load_folder(dir) {
        Ok(tensors) => tensors,
        Err(e) => {
            info.unsupported = Some(e.to_string());
            return Ok(info);
        }
    };
    for t in tensors.values() {
        info.count(t.dtype(), t.shape());
    }
    for entry in std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
    {
        let name = entry.file_name();
        if name.to_string_lossy().ends_with(".safetensors") {
            info.file_bytes += entry.metadata().map_or(0, |m| m.len());
        }
    }
    let model = Model::from_hf(&json, tensors);
    info.describe(model, || Tokenizer::from_hf_folder(dir));
    Ok(info)
}
