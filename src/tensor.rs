//! Weight tensors that live in a memory-mapped file (or, rarely, in an owned buffer).
//!
//! A [`Tensor`] is a typed, shaped window onto bytes owned by a shared [`Storage`]. Nothing is
//! copied at load: the operating system pages weights in when a kernel first touches them.

use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;

use crate::error::{Error, Result};

/// Element type of a weight tensor.
///
/// The block-quantized types are GGML's (their byte layouts are those of llama.cpp's
/// `ggml-common.h`): blocks of [`DType::block_len`] weights of [`DType::block_bytes`] bytes.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 single precision.
    F32,
    /// IEEE 754 half precision.
    F16,
    /// bfloat16 (the upper half of an f32).
    BF16,
    /// Q8_0: 32 weights, an f16 scale and 32 `i8` (34 bytes).
    Q8_0,
    /// Q4_0: 32 weights, an f16 scale and 32 4-bit values offset by 8 (18 bytes).
    Q4_0,
    /// Q4_1: 32 weights, f16 scale and minimum, 32 4-bit values (20 bytes).
    Q4_1,
    /// Q5_0: 32 weights, an f16 scale, 32 5-bit values offset by 16 (22 bytes).
    Q5_0,
    /// Q5_1: 32 weights, f16 scale and minimum, 32 5-bit values (24 bytes).
    Q5_1,
    /// Q2_K: 256 weights in 16 groups with 4-bit scales and minimums, 2-bit values (84 bytes).
    Q2_K,
    /// Q3_K: 256 weights in 16 groups with 6-bit scales, 3-bit values (110 bytes).
    Q3_K,
    /// Q4_K: 256 weights in 8 groups with 6-bit scales and minimums, 4-bit values (144 bytes).
    Q4_K,
    /// Q5_K: 256 weights in 8 groups with 6-bit scales and minimums, 5-bit values (176 bytes).
    Q5_K,
    /// Q6_K: 256 weights in 16 groups with 8-bit scales, 6-bit values (210 bytes).
    Q6_K,
    /// IQ4_NL: 32 weights, an f16 scale, 32 4-bit indices into a fixed table (18 bytes).
    IQ4_NL,
    /// IQ4_XS: 256 weights in 8 groups with 6-bit scales, 4-bit table indices (136 bytes).
    IQ4_XS,
}

impl DType {
    /// Every type, for tests and tables.
    pub fn all() -> [DType; 15] {
        [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::Q8_0,
            DType::Q4_0,
            DType::Q4_1,
            DType::Q5_0,
            DType::Q5_1,
            DType::Q2_K,
            DType::Q3_K,
            DType::Q4_K,
            DType::Q5_K,
            DType::Q6_K,
            DType::IQ4_NL,
            DType::IQ4_XS,
        ]
    }

    /// Number of elements stored together: 256 for the K-quants and IQ4_XS, 32 for the other
    /// quantized types, 1 for floats.
    pub fn block_len(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::IQ4_NL => {
                32
            }
            DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K | DType::IQ4_XS => {
                256
            }
        }
    }

    /// Size in bytes of one block of [`block_len`](Self::block_len) elements.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 34,
            DType::Q4_0 | DType::IQ4_NL => 18,
            DType::Q4_1 => 20,
            DType::Q5_0 => 22,
            DType::Q5_1 => 24,
            DType::Q2_K => 84,
            DType::Q3_K => 110,
            DType::Q4_K => 144,
            DType::Q5_K => 176,
            DType::Q6_K => 210,
            DType::IQ4_XS => 136,
        }
    }

    /// True for the block-quantized types.
    pub fn is_quantized(self) -> bool {
        self.block_len() > 1
    }

    /// Bytes needed for `n` elements, or `None` if `n` is not a whole number of blocks or
    /// the size overflows.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        if n % self.block_len() != 0 {
            return None;
        }
        (n / self.block_len()).checked_mul(self.block_bytes())
    }

    /// Alignment the in-place view of the elements needs (quantized blocks are read with
    /// unaligned loads; their sizes are even).
    fn alignment(self) -> usize {
        match self {
            DType::F32 => 4,
            _ => 2,
        }
    }

    /// The name used in file formats and messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q8_0 => "Q8_0",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
            DType::Q5_0 => "Q5_0",
            DType::Q5_1 => "Q5_1",
            DType::Q2_K => "Q2_K",
            DType::Q3_K => "Q3_K",
            DType::Q4_K => "Q4_K",
            DType::Q5_K => "Q5_K",
            DType::Q6_K => "Q6_K",
            DType::IQ4_NL => "IQ4_NL",
            DType::IQ4_XS => "IQ4_XS",
        }
    }
}

/// Bytes that tensors borrow from: a read-only file mapping, an owned, 8-byte aligned buffer,
/// or bytes the host owns.
pub enum Storage {
    /// A memory-mapped file.
    Mapped(Mmap),
    /// Bytes the host keeps alive and unchanged while the model lives: the `'static` is the
    /// host's promise, made to [`crate::Model::load_gguf_unowned`].
    Borrowed(&'static [u8]),
    /// Bytes held in memory (used when a file's tensor is not aligned for in-place use).
    Owned {
        /// Backing words; `u64` guarantees 8-byte alignment.
        words: Vec<u64>,
        /// Number of meaningful bytes.
        len: usize,
    },
}

impl std::fmt::Debug for Storage {
    /// The kind and length only (never the bytes: they are the model's weights).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Storage::Mapped(_) => "Mapped",
            Storage::Borrowed(_) => "Borrowed",
            Storage::Owned { .. } => "Owned",
        };
        write!(f, "Storage::{kind}({} bytes)", self.bytes().len())
    }
}

impl Storage {
    /// Copies `bytes` into an aligned owned buffer.
    pub fn owned(bytes: &[u8]) -> Result<Storage> {
        let n_words = bytes.len().div_ceil(8);
        let mut words: Vec<u64> = Vec::new();
        words
            .try_reserve_exact(n_words)
            .map_err(|_| Error::OutOfMemory(format!("{} bytes of weights", bytes.len())))?;
        words.resize(n_words, 0);
        // SAFETY: `words` owns `n_words * 8 >= bytes.len()` initialised bytes, u8 has no
        // alignment requirement, and the byte view does not outlive `words` in this block.
        let view =
            unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, n_words * 8) };
        view[..bytes.len()].copy_from_slice(bytes);
        Ok(Storage::Owned {
            words,
            len: bytes.len(),
        })
    }

    /// All bytes of the storage.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(map) => map,
            Storage::Borrowed(bytes) => bytes,
            Storage::Owned { words, len } => {
                // SAFETY: `words` holds at least `len` initialised bytes (see `owned`); the
                // returned slice borrows `self`, so it cannot outlive the buffer.
                unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, *len) }
            }
        }
    }
}

/// Typed view of a tensor's elements, borrowed from its storage.
#[derive(Debug, Clone, Copy)]
pub enum Elements<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// f16 elements.
    F16(&'a [f16]),
    /// bf16 elements.
    BF16(&'a [bf16]),
    /// Blocks of a quantized type (see [`DType`]), row after row.
    Quantized(DType, &'a [u8]),
}

/// A shaped, typed window onto a [`Storage`]. Cheap to clone (shares the storage).
#[derive(Debug, Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    offset: usize,
    dtype: DType,
    shape: Vec<usize>,
}

impl Tensor {
    /// Creates a tensor over `storage[offset..]`, checking bounds and alignment.
    ///
    /// If the bytes are not aligned for their element type the tensor is copied into an owned
    /// buffer (safetensors files written by current tools are always aligned).
    pub fn new(
        storage: Arc<Storage>,
        offset: usize,
        dtype: DType,
        shape: Vec<usize>,
        name: &str,
    ) -> Result<Tensor> {
        let n_elements = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| Error::format(format!("tensor {name}: shape {shape:?} overflows")))?;
        let row = shape.last().copied().unwrap_or(1);
        if row % dtype.block_len() != 0 {
            return Err(Error::format(format!(
                "tensor {name}: rows of {row} elements are not whole {} blocks",
                dtype.name()
            )));
        }
        let n_bytes = dtype
            .bytes_for(n_elements)
            .ok_or_else(|| Error::format(format!("tensor {name}: size overflows")))?;
        let end = offset
            .checked_add(n_bytes)
            .filter(|&end| end <= storage.bytes().len())
            .ok_or_else(|| {
                Error::format(format!(
                    "tensor {name}: bytes {offset}..+{n_bytes} lie outside the file ({} bytes)",
                    storage.bytes().len()
                ))
            })?;
        let ptr = storage.bytes()[offset..end].as_ptr();
        if (ptr as usize) % dtype.alignment() != 0 {
            let copy = Storage::owned(&storage.bytes()[offset..end])?;
            return Tensor::new(Arc::new(copy), 0, dtype, shape, name);
        }
        Ok(Tensor {
            storage,
            offset,
            dtype,
            shape,
        })
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Shape, outermost dimension first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The raw little-endian bytes of the tensor.
    pub fn bytes(&self) -> &[u8] {
        // `Tensor::new` checked that this size is whole blocks and does not overflow.
        let n = self.len() / self.dtype.block_len() * self.dtype.block_bytes();
        &self.storage.bytes()[self.offset..self.offset + n]
    }

    /// The elements, typed.
    pub fn elements(&self) -> Elements<'_> {
        let bytes = self.bytes();
        let n = self.len();
        // SAFETY: (the three float arms) `Tensor::new` checked that `bytes` lies inside the
        // storage, holds exactly `n` elements and starts at an address aligned for the element
        // type. f32, f16 and bf16 accept every bit pattern, and the slice borrows `self`, which
        // keeps the storage alive.
        unsafe {
            match self.dtype {
                DType::F32 => Elements::F32(std::slice::from_raw_parts(bytes.as_ptr().cast(), n)),
                DType::F16 => Elements::F16(std::slice::from_raw_parts(bytes.as_ptr().cast(), n)),
                DType::BF16 => Elements::BF16(std::slice::from_raw_parts(bytes.as_ptr().cast(), n)),
                quantized => Elements::Quantized(quantized, bytes),
            }
        }
    }

    /// Rows `rows` of a matrix, as a tensor sharing the same storage.
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Tensor {
        assert!(self.shape.len() == 2 && rows.start <= rows.end && rows.end <= self.shape[0]);
        let row_bytes = self.shape[1] / self.dtype.block_len() * self.dtype.block_bytes();
        Tensor {
            storage: self.storage.clone(),
            offset: self.offset + rows.start * row_bytes,
            dtype: self.dtype,
            shape: vec![rows.len(), self.shape[1]],
        }
    }

    /// Checks the shape, naming the tensor in the error.
    pub fn expect_shape(&self, name: &str, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(Error::format(format!(
                "tensor {name} has shape {:?}, config implies {expected:?}",
                self.shape
            )));
        }
        Ok(())
    }
}
