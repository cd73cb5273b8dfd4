//! The KV cache: keys and values of every past position, for every layer, in f32 or f16.
//!
//! Keys and values are computed in f32 and rounded to the cache's element type when stored
//! (round to nearest even for f16); attention widens them back exactly as it reads them. An
//! f16 cache holds half the bytes of an f32 one and, at long contexts, attention reads half
//! as much memory.

use half::f16;

use super::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kernels::{SimdWeight, WeightElement};

/// The element type of a session's KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvType {
    /// 4 bytes per number: the keys and values exactly as computed (the default; the
    /// transformers-parity tests run with it).
    #[default]
    F32,
    /// 2 bytes per number, rounded to nearest: half the memory.
    F16,
}

impl KvType {
    /// Bytes per cached number.
    pub fn bytes(self) -> usize {
        match self {
            KvType::F32 => 4,
            KvType::F16 => 2,
        }
    }

    /// Lower-case name ("f32", "f16").
    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
        }
    }

    /// The type named `name` ("f32" or "f16", any case).
    pub fn from_name(name: &str) -> Option<KvType> {
        [KvType::F32, KvType::F16]
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }
}

/// A number type a cache stores.
pub(crate) trait KvElement: WeightElement + SimdWeight + Default {
    /// Bytes of one element in the saved form.
    const BYTES: usize;
    /// The element nearest to `v`.
    fn from_f32(v: f32) -> Self;
    /// Writes the element little-endian into `out` (`BYTES` long).
    fn write_le(self, out: &mut [u8]);
    /// Reads an element written by [`KvElement::write_le`].
    fn read_le(bytes: &[u8]) -> Self;
}

impl KvElement for f32 {
    const BYTES: usize = 4;
    fn from_f32(v: f32) -> f32 {
        v
    }
    fn write_le(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_le_bytes());
    }
    fn read_le(bytes: &[u8]) -> f32 {
        f32::from_le_bytes(bytes.try_into().expect("4 bytes"))
    }
}

impl KvElement for f16 {
    const BYTES: usize = 2;
    fn from_f32(v: f32) -> f16 {
        f16::from_f32(v)
    }
    fn write_le(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_bits().to_le_bytes());
    }
    fn read_le(bytes: &[u8]) -> f16 {
        f16::from_bits(u16::from_le_bytes(bytes.try_into().expect("2 bytes")))
    }
}

/// Keys and values of one element type, `[n_layers, n_ctx, kv_dim]` each.
#[derive(Debug)]
pub(crate) struct Planes<T> {
    pub(crate) keys: Vec<T>,
    pub(crate) values: Vec<T>,
}

impl<T: KvElement> Planes<T> {
    fn new(len: usize) -> Result<Planes<T>> {
        let alloc = |what: &str| {
            let mut v = Vec::new();
            v.try_reserve_exact(len)
                .map_err(|_| Error::OutOfMemory(format!("KV cache {what} ({len} numbers)")))?;
            v.resize(len, T::default());
            Ok::<_, Error>(v)
        };
        Ok(Planes {
            keys: alloc("keys")?,
            values: alloc("values")?,
        })
    }

    fn store(&mut self, start: usize, k: &[f32], v: &[f32]) {
        let convert = |dst: &mut [T], src: &[f32]| {
            dst.iter_mut()
                .zip(src)
                .for_each(|(d, &s)| *d = T::from_f32(s))
        };
        convert(&mut self.keys[start..start + k.len()], k);
        convert(&mut self.values[start..start + v.len()], v);
    }
}

/// The cache's numbers, by element type.
#[derive(Debug)]
pub(crate) enum KvData {
    F32(Planes<f32>),
    F16(Planes<f16>),
}

/// Keys and values of every past position, for every layer.
#[derive(Debug)]
pub(crate) struct KvCache {
    pub(crate) data: KvData,
    n_ctx: usize,
    kv_dim: usize,
    n_layers: usize,
}

/// Calls `$body` with `$planes` bound to the typed planes of `$data`, whatever their type.
macro_rules! with_planes {
    ($data:expr, $planes:ident => $body:expr) => {
        match $data {
            $crate::model::kv_cache::KvData::F32($planes) => $body,
            $crate::model::kv_cache::KvData::F16($planes) => $body,
        }
    };
}
pub(crate) use with_planes;

impl KvCache {
    /// Allocates a cache for `n_ctx` positions (fallibly: a large cache may not fit).
    pub(crate) fn new(config: &ModelConfig, n_ctx: usize, kv_type: KvType) -> Result<KvCache> {
        let len = config
            .n_layers
            .checked_mul(n_ctx)
            .and_then(|n| n.checked_mul(config.kv_dim()))
            .ok_or_else(|| Error::OutOfMemory("KV cache size overflows".into()))?;
        let data = match kv_type {
            KvType::F32 => KvData::F32(Planes::new(len)?),
            KvType::F16 => KvData::F16(Planes::new(len)?),
        };
        Ok(KvCache {
            data,
            n_ctx,
            kv_dim: config.kv_dim(),
            n_layers: config.n_layers,
        })
    }

    /// The element type.
    pub(crate) fn kv_type(&self) -> KvType {
        match self.data {
            KvData::F32(_) => KvType::F32,
            KvData::F16(_) => KvType::F16,
        }
    }

    /// Positions the cache can hold.
    pub(crate) fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Bytes of memory the cache holds.
    pub(crate) fn heap_bytes(&self) -> usize {
        with_planes!(&self.data, p => (p.keys.capacity() + p.values.capacity()) * self.kv_type().bytes())
    }

    /// Bytes [`KvCache::new`] allocates for `n_ctx` positions (`None` on overflow).
    pub(crate) fn bytes_for(config: &ModelConfig, n_ctx: usize, kv_type: KvType) -> Option<usize> {
        config
            .n_layers
            .checked_mul(n_ctx)?
            .checked_mul(config.kv_dim())?
            .checked_mul(2 * kv_type.bytes())
    }

    /// The element range of positions `0..n` of `layer` in either plane.
    pub(crate) fn prefix_range(&self, layer: usize, n: usize) -> std::ops::Range<usize> {
        let start = layer * self.n_ctx * self.kv_dim;
        start..start + n * self.kv_dim
    }

    /// The element range of every position of `layer`.
    pub(crate) fn layer_range(&self, layer: usize) -> std::ops::Range<usize> {
        self.prefix_range(layer, self.n_ctx)
    }

    /// Copies the keys and values of positions `0..n` from `src`, a cache of the same model
    /// and element type holding them (`n` fits both).
    pub(crate) fn copy_prefix_from(&mut self, src: &KvCache, n: usize) {
        for layer in 0..self.n_layers {
            let (from, to) = (src.prefix_range(layer, n), self.prefix_range(layer, n));
            match (&mut self.data, &src.data) {
                (KvData::F32(d), KvData::F32(s)) => d.copy_range(s, from, to),
                (KvData::F16(d), KvData::F16(s)) => d.copy_range(s, from, to),
                _ => panic!("copy between KV caches of different element types"),
            }
        }
    }

    /// Stores the keys and values of position `pos` of `layer`.
    pub(crate) fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let start = (layer * self.n_ctx + pos) * self.kv_dim;
        with_planes!(&mut self.data, p => p.store(start, k, v))
    }

    /// Writes the keys, then the values, of positions `0..n` of `layer` little-endian into
    /// `out` (`2 * n * kv_dim * kv_type().bytes()` long).
    pub(crate) fn write_prefix_le(&self, layer: usize, n: usize, out: &mut [u8]) {
        let range = self.prefix_range(layer, n);
        with_planes!(&self.data, p => {
            let (k, v) = out.split_at_mut(out.len() / 2);
            write_le(&p.keys[range.clone()], k);
            write_le(&p.values[range], v);
        })
    }

    /// Reads what [`KvCache::write_prefix_le`] wrote into positions `0..n` of `layer`.
    pub(crate) fn read_prefix_le(&mut self, layer: usize, n: usize, bytes: &[u8]) {
        let range = self.prefix_range(layer, n);
        with_planes!(&mut self.data, p => {
            read_le(bytes, &mut p.keys[range.clone()]);
            read_le(&bytes[bytes.len() / 2..], &mut p.values[range]);
        })
    }
}

impl<T: KvElement> Planes<T> {
    fn copy_range(
        &mut self,
        src: &Planes<T>,
        from: std::ops::Range<usize>,
        to: std::ops::Range<usize>,
    ) {
        self.keys[to.clone()].copy_from_slice(&src.keys[from.clone()]);
        self.values[to].copy_from_slice(&src.values[from]);
    }
}

fn write_le<T: KvElement>(v: &[T], out: &mut [u8]) {
    for (o, x) in out.chunks_exact_mut(T::BYTES).zip(v) {
        x.write_le(o);
    }
}

fn read_le<T: KvElement>(bytes: &[u8], out: &mut [T]) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(T::BYTES)) {
        *o = T::read_le(b);
    }
}
