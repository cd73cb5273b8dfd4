//! GGUF files (versions 2 and 3): metadata, tensor infos and tensor data, read from a memory
//! map.
//!
//! Layout: magic `GGUF`, version (u32), tensor count (u64), metadata count (u64), the metadata
//! key/value pairs, the tensor infos (name, dimensions innermost first, type, offset), then the
//! tensor data, starting at the next multiple of `general.alignment` (default 32). Every count,
//! length and offset is checked against the file before it is used, so a corrupt file is an
//! error and never a panic or an outsized allocation (metadata arrays are capped in total).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::tensor::{DType, Storage, Tensor};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Any integer type, widened.
    Int(i128),
    /// `f32` or `f64`, widened.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    String(String),
    /// An array of values of one type (numbers and booleans as read; strings built in
    /// memory).
    Array(Vec<GgufValue>),
    /// An array of strings as read from a file: validated when the file is parsed, left in
    /// the file's bytes and read from them when used (a vocabulary is tens of thousands of
    /// strings, which loading should not copy).
    Strings(StringArray),
}

/// Strings of a GGUF array, in the file's bytes: `count` items from `start`, each a u64
/// length and that many bytes of UTF-8 (checked when the file was parsed).
#[derive(Clone)]
pub struct StringArray {
    storage: Arc<Storage>,
    start: usize,
    count: usize,
}

impl StringArray {
    /// Number of strings.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when the array has no string.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The strings, in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        let bytes = self.storage.bytes();
        let mut pos = self.start;
        (0..self.count).map(move |_| {
            // Bounds and UTF-8 were checked at parse time, on the same immutable bytes.
            let n = u64::from_le_bytes(bytes[pos..pos + 8].try_into().unwrap_or([0; 8])) as usize;
            let text = std::str::from_utf8(&bytes[pos + 8..pos + 8 + n]).unwrap_or_default();
            pos += 8 + n;
            text
        })
    }
}

impl std::fmt::Debug for StringArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StringArray({} strings)", self.count)
    }
}

impl PartialEq for StringArray {
    fn eq(&self, other: &StringArray) -> bool {
        self.count == other.count && self.iter().eq(other.iter())
    }
}

/// The key/value metadata of a GGUF file.
#[derive(Debug, Default, Clone)]
pub struct GgufMetadata {
    /// Values by key.
    pub entries: HashMap<String, GgufValue>,
}

impl GgufMetadata {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.entries.get(key)
    }

    fn wrong_type(key: &str, expected: &str) -> Error {
        Error::format(format!("GGUF metadata {key} is not {expected}"))
    }

    /// A string value; an error if present with another type.
    pub fn str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::String(s)) => Ok(Some(s)),
            Some(_) => Err(Self::wrong_type(key, "a string")),
        }
    }

    /// A non-negative integer that fits `usize`.
    pub fn usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Int(v)) => usize::try_from(*v)
                .map(Some)
                .map_err(|_| Self::wrong_type(key, "a valid size")),
            Some(_) => Err(Self::wrong_type(key, "an integer")),
        }
    }

    /// A required non-negative integer.
    pub fn require_usize(&self, key: &str) -> Result<usize> {
        self.usize(key)?
            .ok_or_else(|| Error::format(format!("GGUF metadata {key} is missing")))
    }

    /// A number (integer or float), as f64.
    pub fn f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Float(v)) => Ok(Some(*v)),
            Some(GgufValue::Int(v)) => Ok(Some(*v as f64)),
            Some(_) => Err(Self::wrong_type(key, "a number")),
        }
    }

    /// A boolean.
    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Bool(v)) => Ok(Some(*v)),
            Some(_) => Err(Self::wrong_type(key, "a boolean")),
        }
    }

    /// An array of strings.
    pub fn str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Strings(strings)) => Ok(Some(strings.iter().collect())),
            Some(GgufValue::Array(items)) => items
                .iter()
                .map(|v| match v {
                    GgufValue::String(s) => Ok(s.as_str()),
                    _ => Err(Self::wrong_type(key, "an array of strings")),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(_) => Err(Self::wrong_type(key, "an array")),
        }
    }

    /// An array of integers.
    pub fn int_array(&self, key: &str) -> Result<Option<Vec<i128>>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Array(items)) => items
                .iter()
                .map(|v| match v {
                    GgufValue::Int(i) => Ok(*i),
                    _ => Err(Self::wrong_type(key, "an array of integers")),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(_) => Err(Self::wrong_type(key, "an array")),
        }
    }
}

/// A tensor as the file describes it: GGUF name, shape outermost first, type.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    /// Name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Shape, outermost dimension first (GGUF stores it innermost first).
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: DType,
}

/// An opened GGUF file: its metadata and its tensors, which borrow the mapped file.
#[derive(Debug)]
pub struct GgufFile {
    /// Format version (2 or 3).
    pub version: u32,
    /// Key/value metadata.
    pub metadata: GgufMetadata,
    /// Tensor infos, in file order.
    pub infos: Vec<GgufTensorInfo>,
    /// The tensors by GGUF name.
    pub tensors: HashMap<String, Tensor>,
}

/// GGML's tensor type codes for the types Ember reads.
fn dtype_from_ggml(code: u32, name: &str) -> Result<DType> {
    Ok(match code {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::Q4_0,
        3 => DType::Q4_1,
        6 => DType::Q5_0,
        7 => DType::Q5_1,
        8 => DType::Q8_0,
        10 => DType::Q2_K,
        11 => DType::Q3_K,
        12 => DType::Q4_K,
        13 => DType::Q5_K,
        14 => DType::Q6_K,
        20 => DType::IQ4_NL,
        23 => DType::IQ4_XS,
        30 => DType::BF16,
        other => {
            let supported: Vec<&str> = DType::all().iter().map(|d| d.name()).collect();
            return Err(Error::Unsupported(format!(
                "tensor {name}: GGML type {other} ({}) is not supported ({} are)",
                ggml_type_name(other),
                supported.join(", ")
            )));
        }
    })
}

/// A readable name for the GGML type codes Ember does not read, for messages.
fn ggml_type_name(code: u32) -> &'static str {
    match code {
        9 => "Q8_1",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        21 => "IQ3_S",
        22 => "IQ2_S",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        40 => "NVFP4",
        41 => "Q1_0",
        42 => "Q2_0",
        _ => "unknown",
    }
}

/// Most array items the metadata may hold in all. Real files hold about a million (the
/// vocabulary, its types, scores and merges); an item costs far more in memory than its
/// one byte on disk can, so the total is capped rather than trusted.
const MAX_ARRAY_ITEMS: usize = 1 << 23;

/// Bounds-checked little-endian reader over the file's bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    /// What `bytes` belongs to (string arrays keep a view of it).
    storage: &'a Arc<Storage>,
    pos: usize,
    /// Array items the metadata may still hold (see [`MAX_ARRAY_ITEMS`]).
    items_left: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                Error::format(format!(
                    "GGUF file truncated while reading {what} at byte {}",
                    self.pos
                ))
            })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A count that must be satisfiable by the bytes left, each item taking at least
    /// `min_item_bytes` bytes (so a corrupt count cannot cause a huge allocation).
    fn count(&mut self, min_item_bytes: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_item_bytes as u64) > left {
            return Err(Error::format(format!(
                "GGUF {what} {n} is larger than the file allows"
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(1, what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| Error::format(format!("GGUF {what} is not valid UTF-8")))
    }

    fn value(&mut self, type_code: u32, key: &str, depth: u32) -> Result<GgufValue> {
        Ok(match type_code {
            0 => GgufValue::Int(self.array::<1>(key)?[0] as i128),
            1 => GgufValue::Int(self.array::<1>(key)?[0] as i8 as i128),
            2 => GgufValue::Int(u16::from_le_bytes(self.array(key)?) as i128),
            3 => GgufValue::Int(i16::from_le_bytes(self.array(key)?) as i128),
            4 => GgufValue::Int(self.u32(key)? as i128),
            5 => GgufValue::Int(i32::from_le_bytes(self.array(key)?) as i128),
            6 => GgufValue::Float(f32::from_le_bytes(self.array(key)?) as f64),
            7 => match self.array::<1>(key)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(Error::format(format!("GGUF metadata {key}: bool byte {b}"))),
            },
            8 => GgufValue::String(self.string(key)?),
            9 => {
                if depth > 0 {
                    return Err(Error::format(format!(
                        "GGUF metadata {key}: nested arrays are not supported"
                    )));
                }
                let item_type = self.u32(key)?;
                let min_size = match item_type {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    _ => 1,
                };
                let n = self.count(min_size, key)?;
                self.items_left = self.items_left.checked_sub(n).ok_or_else(|| {
                    Error::format(format!(
                        "GGUF metadata arrays hold more than {MAX_ARRAY_ITEMS} items ({key})"
                    ))
                })?;
                if item_type == 8 {
                    // Strings stay in the file: checked here, read when used.
                    let start = self.pos;
                    for _ in 0..n {
                        let len = self.count(1, key)?;
                        std::str::from_utf8(self.take(len, key)?).map_err(|_| {
                            Error::format(format!("GGUF metadata {key}: a string is not UTF-8"))
                        })?;
                    }
                    return Ok(GgufValue::Strings(StringArray {
                        storage: self.storage.clone(),
                        start,
                        count: n,
                    }));
                }
                // Grown as items are read: the count is only checked against the bytes left.
                let mut items = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    items.push(self.value(item_type, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::Int(self.u64(key)? as i128),
            11 => GgufValue::Int(i64::from_le_bytes(self.array(key)?) as i128),
            12 => GgufValue::Float(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(Error::format(format!(
                    "GGUF metadata {key}: unknown value type {other}"
                )))
            }
        })
    }
}

impl GgufFile {
    /// Memory-maps and parses a GGUF file.
    pub fn open(path: &Path) -> Result<GgufFile> {
        GgufFile::parse(super::map_file(path)?).map_err(|e| e.in_file(&path.display().to_string()))
    }

    /// Parses GGUF bytes held by `storage`.
    pub fn parse(storage: Arc<Storage>) -> Result<GgufFile> {
        let bytes = storage.bytes();
        let mut r = Reader {
            bytes,
            storage: &storage,
            pos: 0,
            items_left: MAX_ARRAY_ITEMS,
        };
        if r.take(4, "the magic number").ok() != Some(b"GGUF".as_slice()) {
            return Err(Error::format("not a GGUF file (no GGUF magic number)"));
        }
        let version = r.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::Unsupported(format!(
                "GGUF version {version} (versions 2 and 3 are supported)"
            )));
        }
        // A tensor info takes at least 8 (name length) + 4 + 4 + 8 bytes.
        let n_tensors = r.count(24, "tensor count")?;
        // A metadata pair takes at least 8 (key length) + 4 (type) + 1 bytes.
        let n_kv = r.count(13, "metadata count")?;
        let mut metadata = GgufMetadata::default();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let type_code = r.u32(&key)?;
            let value = r.value(type_code, &key, 0)?;
            if metadata.entries.insert(key.clone(), value).is_some() {
                return Err(Error::format(format!("GGUF metadata {key} appears twice")));
            }
        }
        let alignment = metadata.usize("general.alignment")?.unwrap_or(32);
        if alignment == 0 || !alignment.is_power_of_two() || alignment > 1 << 20 {
            return Err(Error::format(format!("GGUF alignment {alignment}")));
        }

        let mut raw = Vec::with_capacity(n_tensors.min(1 << 12));
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32(&name)? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(Error::format(format!("tensor {name}: {n_dims} dimensions")));
            }
            let mut shape = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = r.u64(&name)?;
                shape.push(usize::try_from(d).map_err(|_| {
                    Error::format(format!("tensor {name}: dimension {d} too large"))
                })?);
            }
            shape.reverse(); // GGUF lists the innermost dimension first.
            let dtype = dtype_from_ggml(r.u32(&name)?, &name)?;
            let offset = r.u64(&name)?;
            raw.push((name, shape, dtype, offset));
        }
        let data_start = r.pos.div_ceil(alignment) * alignment;
        // A file without tensors (a vocabulary-only file) may end before the padding.
        if data_start > bytes.len() && n_tensors > 0 {
            return Err(Error::format("GGUF file truncated before its tensor data"));
        }

        let mut tensors = HashMap::with_capacity(raw.len());
        let mut infos = Vec::with_capacity(raw.len());
        for (name, shape, dtype, offset) in raw {
            let offset = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(data_start))
                .ok_or_else(|| Error::format(format!("tensor {name}: offset out of range")))?;
            let tensor = Tensor::new(storage.clone(), offset, dtype, shape.clone(), &name)?;
            if tensors.insert(name.clone(), tensor).is_some() {
                return Err(Error::format(format!("tensor {name} appears twice")));
            }
            infos.push(GgufTensorInfo { name, shape, dtype });
        }
        Ok(GgufFile {
            version,
            metadata,
            infos,
            tensors,
        })
    }
}
