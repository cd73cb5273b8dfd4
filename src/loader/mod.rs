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

/// Reads `config.json` and maps the safetensors weights of a Hugging Face model folder.
pub fn load_hf_folder(dir: &Path) -> Result<(ModelConfig, TensorStore)> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let config = ModelConfig::from_hf_json(&text)?;
    let store = safetensors::load_folder(dir)?;
    Ok((config, store))
}
