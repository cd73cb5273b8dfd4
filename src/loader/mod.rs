//! Reading model files: Hugging Face folders (config.json + safetensors).

pub mod config;
pub mod gguf;
pub mod safetensors;

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

pub use config::{Architecture, Llama3RopeScaling, ModelConfig};

/// Named tensors read from a model's files, consumed as the model takes them.
#[derive(Debug, Default)]
pub struct TensorStore {
    /// Tensors not yet taken, by name.
    pub tensors: HashMap<String, Tensor>,
}

impl TensorStore {
    /// Removes and returns a required tensor, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let tensor = self
            .tensors
            .remove(name)
            .ok_or_else(|| Error::format(format!("tensor {name} is missing")))?;
        tensor.expect_shape(name, shape)?;
        Ok(tensor)
    }

    /// Removes and returns a tensor that may be absent, checking its shape when present.
    pub fn take_optional(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.tensors.contains_key(name) {
            self.take(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// How many tensors have each element type.
    pub fn type_counts(&self) -> std::collections::BTreeMap<&'static str, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for t in self.tensors.values() {
            *counts.entry(t.dtype().name()).or_default() += 1;
        }
        counts
    }

    /// Fails if tensors remain that the model did not use, except known buffers that
    /// some exporters save (rotary frequency tables, GPT-2 causal masks).
    pub fn finish(self) -> Result<()> {
        let mut unexpected: Vec<&String> = self
            .tensors
            .keys()
            .filter(|name| {
                !(name.ends_with("rotary_emb.inv_freq")
                    || name.ends_with(".attn.bias")
                    || name.ends_with(".attn.masked_bias"))
            })
            .collect();
        unexpected.sort();
        match unexpected.first() {
            None => Ok(()),
            Some(first) => Err(Error::format(format!(
                "unexpected tensor {first} ({} unused in all)",
                unexpected.len()
            ))),
        }
    }
}

/// The bytes of `path`, refused when larger than `max` (checked before reading).
pub(crate) fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    let size = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if size > max {
        return Err(Error::format(format!(
            "{}: {size} bytes, more than the {max} accepted",
            path.display()
        )));
    }
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Maps a file read-only.
pub(crate) fn map_file(path: &Path) -> Result<std::sync::Arc<crate::tensor::Storage>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the mapping is read-only. Like every memory-mapped reader, Ember assumes the
    // file is not truncated or rewritten while the model is loaded; that is documented as a
    // requirement of `Model::load`.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(std::sync::Arc::new(crate::tensor::Storage::Mapped(map)))
}

/// Largest `config.json` (and `model.safetensors.index.json`) accepted; real ones have a few
/// kilobytes.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Reads `config.json` and maps the safetensors weights of a Hugging Face model folder.
pub fn load_hf_folder(dir: &Path) -> Result<(ModelConfig, TensorStore)> {
    let config_path = dir.join("config.json");
    let bytes = read_bounded(&config_path, MAX_CONFIG_BYTES)?;
    let text = String::from_utf8(bytes)
        .map_err(|_| Error::format(format!("{} is not UTF-8", config_path.display())))?;
    let config = ModelConfig::from_hf_json(&text)?;
    let store = safetensors::load_folder(dir)?;
    Ok((config, store))
}
