//! Memory-mapped `.safetensors` files, single or sharded.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use safetensors::{Dtype as StDtype, SafeTensors};

use crate::error::{Error, Result};
use crate::loader::TensorMap;
use crate::tensor::{DType, Storage, Tensor};

fn dtype_of(dtype: StDtype, name: &str) -> Result<DType> {
    match dtype {
        StDtype::F32 => Ok(DType::F32),
        StDtype::F16 => Ok(DType::F16),
        StDtype::BF16 => Ok(DType::BF16),
        other => Err(Error::Unsupported(format!(
            "tensor {name} has dtype {other:?}"
        ))),
    }
}

/// Reads the tensors of one mapped safetensors file into `store`.
///
/// `only` restricts the tensors taken to those a sharded index assigns to this file.
fn read_file(
    path: &Path,
    store: &mut TensorMap,
    only: Option<&dyn Fn(&str) -> bool>,
) -> Result<()> {
    read_storage(
        super::map_file(path)?,
        &path.display().to_string(),
        store,
        only,
    )
}

/// Reads the tensors of safetensors bytes held by `storage` (`name` names them in errors)
/// into `store`, keeping only those `only` accepts.
pub fn read_storage(
    storage: Arc<Storage>,
    name: &str,
    store: &mut TensorMap,
    only: Option<&dyn Fn(&str) -> bool>,
) -> Result<()> {
    let bytes = storage.bytes();
    let parsed =
        SafeTensors::deserialize(bytes).map_err(|e| Error::format(format!("{name}: {e}")))?;
    let base = bytes.as_ptr() as usize;
    for (name, view) in parsed.tensors() {
        if only.is_some_and(|keep| !keep(&name)) {
            continue;
        }
        let dtype = dtype_of(view.dtype(), &name)?;
        let offset = view.data().as_ptr() as usize - base;
        let tensor = Tensor::new(storage.clone(), offset, dtype, view.shape().to_vec(), &name)?;
        if store.insert(name.clone(), tensor).is_some() {
            return Err(Error::format(format!("tensor {name} appears twice")));
        }
    }
    Ok(())
}

/// Loads `model.safetensors`, or the shards listed by `model.safetensors.index.json`.
pub fn load_folder(dir: &Path) -> Result<TensorMap> {
    let mut store = TensorMap::new();
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.is_file() {
        read_file(&single, &mut store, None)?;
        return Ok(store);
    }
    if !index.is_file() {
        return Err(Error::io(
            &single,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "neither model.safetensors nor model.safetensors.index.json exists",
            ),
        ));
    }
    let text = super::read_bounded(&index, super::MAX_CONFIG_BYTES)?;
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let parsed: Index = serde_json::from_slice(&text)
        .map_err(|e| Error::format(format!("{}: {e}", index.display())))?;
    let mut by_file: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (tensor, file) in &parsed.weight_map {
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(Error::format(format!(
                "index names an unsafe shard path {file:?}"
            )));
        }
        by_file.entry(file).or_default().push(tensor);
    }
    for (file, names) in &by_file {
        let keep = |name: &str| parsed.weight_map.get(name).is_some_and(|f| f == file);
        read_file(&dir.join(file), &mut store, Some(&keep))?;
        for name in names {
            if !store.contains_key(*name) {
                return Err(Error::format(format!(
                    "tensor {name} is listed in the index but missing from {file}"
                )));
            }
        }
    }
    Ok(store)
}
