//! Reading model files: GGUF files and Hugging Face folders (config.json + safetensors).

pub mod gguf;
pub mod safetensors;

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// A model file's tensors by name.
pub type TensorMap = HashMap<String, Tensor>;

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
pub fn read_hf_folder(dir: &Path) -> Result<(serde_json::Value, TensorMap)> {
    let config_path = dir.join("config.json");
    let bytes = read_bounded(&config_path, MAX_CONFIG_BYTES)?;
    let json = parse_config(&bytes)?;
    let tensors = safetensors::load_folder(dir)?;
    Ok((json, tensors))
}

/// Parses the bytes of a `config.json`.
pub fn parse_config(bytes: &[u8]) -> Result<serde_json::Value> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::format(format!("config.json is not valid JSON: {e}")))
}
