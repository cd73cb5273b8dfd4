//! Weight tensors that live in a memory-mapped file (or, rarely, in an owned buffer).
//!
//! A [`Tensor`] is a typed, shaped window onto bytes owned by a shared [`Storage`]. Nothing is
//! copied at load: the operating system pages weights in when a kernel first touches them.

use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;

use crate::error::{Error, Result};

/// Element type of a weight tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 single precision.
    F32,
    /// IEEE 754 half precision.
    F16,
    /// bfloat16 (the upper half of an f32).
    BF16,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The name used in file formats and messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }
}

/// Bytes that tensors borrow from: a read-only file mapping or an owned, 8-byte aligned buffer.
#[derive(Debug)]
pub enum Storage {
    /// A memory-mapped file.
    Mapped(Mmap),
    /// Bytes held in memory (used when a file's tensor is not aligned for in-place use).
    Owned {
        /// Backing words; `u64` guarantees 8-byte alignment.
        words: Vec<u64>,
        /// Number of meaningful bytes.
        len: usize,
    },
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
        let n_bytes = n_elements
            .checked_mul(dtype.size())
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
        if (ptr as usize) % dtype.size() != 0 {
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
        let n = self.len() * self.dtype.size();
        &self.storage.bytes()[self.offset..self.offset + n]
    }

    /// The elements, typed.
    pub fn elements(&self) -> Elements<'_> {
        let bytes = self.bytes();
        let n = self.len();
        // SAFETY (all three arms): `Tensor::new` checked that `bytes` lies inside the storage,
        // holds exactly `n * dtype.size()` bytes and starts at an address aligned for the
        // element type. f32, f16 and bf16 accept every bit pattern, and the slice borrows
        // `self`, which keeps the storage alive.
        unsafe {
            match self.dtype {
                DType::F32 => Elements::F32(std::slice::from_raw_parts(bytes.as_ptr().cast(), n)),
                DType::F16 => Elements::F16(std::slice::from_raw_parts(bytes.as_ptr().cast(), n)),
                DType::BF16 => Elements::BF16(std::slice::from_raw_parts(bytes.as_ptr().cast(), n)),
            }
        }
    }

    /// Copies the elements out as f32 (for small vectors such as norms and biases).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self.elements() {
            Elements::F32(v) => v.to_vec(),
            Elements::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Elements::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
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
