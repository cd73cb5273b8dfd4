//! Saving, restoring and copying what a session holds: its tokens, the keys and values of
//! the computed ones, and the last token's logits.
//!
//! The saved form (all numbers little-endian), version 1:
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `EMBERSES` |
//! | 4 | format version (1) |
//! | 4 | cache element type (0: f32, 1: f16), `b` bytes per number |
//! | 8 | [`Model::fingerprint`] of the model that made it |
//! | 8 | the keys' rotations (LongRoPE's factors depend on the context length) |
//! | 4, 4, 4 | layers, numbers per position (`n_kv_heads * head_dim`), vocabulary size |
//! | 8, 8 | tokens held `n`, tokens computed `c <= n` |
//! | 4 | 1 if the last token's logits follow, else 0 |
//! | 4·n | the tokens |
//! | 4·vocab | the logits (if present) |
//! | 2 · layers · b·c·kv_dim | per layer: the keys of positions `0..c`, then their values |
//! | 8 | checksum of everything before it |
//!
//! A state loads into sessions whose cache has the element type it was saved with (the
//! numbers are kept as they are, never converted).
//!
//! Only positions `0..c` are stored, never the whole allocated context, so a state's size
//! grows with what the session holds. When the logits of the last token are not at hand (a
//! session rewound, or copied partway), that token is stored as pending instead: the next step
//! recomputes it, with results identical to computing it the first time.

use super::Session;
use crate::checksum::Hash64;
use crate::error::{Error, Result};
use crate::model::KvType;

const MAGIC: &[u8; 8] = b"EMBERSES";
const VERSION: u32 = 1;
/// The format's code for a cache element type.
fn kv_code(kv_type: KvType) -> u32 {
    match kv_type {
        KvType::F32 => 0,
        KvType::F16 => 1,
    }
}
/// Bytes of the fixed-size header (magic to the logits flag).
const HEADER_BYTES: usize = 8 + 4 + 4 + 8 + 8 + 4 + 4 + 4 + 8 + 8 + 4;

/// What of a session's prefix of `n` tokens can be kept as computed.
struct Prefix {
    /// Tokens held.
    n: usize,
    /// Tokens whose keys and values are kept.
    computed: usize,
    /// The last token's logits are kept too.
    logits: bool,
}

impl Session {
    /// The rotations this session's cached keys carry.
    fn rope_signature(&self) -> u64 {
        crate::model::rope_signature(&self.model.config, self.n_ctx())
    }

    /// What copying or saving this session's first `n` tokens keeps (`n <= position`).
    fn prefix(&self, n: usize) -> Prefix {
        let computed = self.computed.min(n);
        let logits = computed == n && n == self.position() && self.logits_current && n > 0;
        // Computed rows whose last logits are missing: recompute that token on the next step.
        let computed = if computed == n && !logits {
            n.saturating_sub(1)
        } else {
            computed
        };
        Prefix {
            n,
            computed,
            logits,
        }
    }

    /// Bytes [`Session::save_state`] writes for the session as it is now.
    pub fn state_size(&self) -> usize {
        let p = self.prefix(self.position());
        let config = &self.model.config;
        HEADER_BYTES
            + 4 * p.n
            + if p.logits { 4 * config.vocab_size } else { 0 }
            + 2 * config.n_layers * self.kv_type().bytes() * p.computed * config.kv_dim()
            + 8
    }

    /// Writes the session's state (format in this module's documentation) to the start of
    /// `out` and returns its length; `out` must hold [`Session::state_size`] bytes
    /// ([`Error::BufferTooSmall`] otherwise, with nothing written).
    pub fn save_state(&self, out: &mut [u8]) -> Result<usize> {
        let needed = self.state_size();
        if out.len() < needed {
            return Err(Error::BufferTooSmall { needed });
        }
        let p = self.prefix(self.position());
        let config = &self.model.config;
        let mut w = Writer {
            out: &mut out[..needed],
            at: 0,
        };
        w.bytes(MAGIC);
        w.u32(VERSION);
        w.u32(kv_code(self.kv_type()));
        w.u64(self.model.fingerprint());
        w.u64(self.rope_signature());
        w.u32(config.n_layers as u32);
        w.u32(config.kv_dim() as u32);
        w.u32(config.vocab_size as u32);
        w.u64(p.n as u64);
        w.u64(p.computed as u64);
        w.u32(p.logits as u32);
        for &t in &self.history[..p.n] {
            w.u32(t);
        }
        if p.logits {
            w.floats(&self.ws.scratch.logits);
        }
        let layer_bytes = 2 * self.kv_type().bytes() * p.computed * config.kv_dim();
        for layer in 0..config.n_layers {
            let out = w.next(layer_bytes);
            self.ws.cache.write_prefix_le(layer, p.computed, out);
        }
        let mut hash = Hash64::default();
        hash.update(&w.out[..w.at]);
        w.u64(hash.finish());
        debug_assert_eq!(w.at, needed);
        Ok(needed)
    }

    /// [`Session::save_state`] into a new vector.
    pub fn save_state_to_vec(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let size = self.state_size();
        out.try_reserve_exact(size)
            .map_err(|_| Error::OutOfMemory(format!("session state of {size} bytes")))?;
        out.resize(size, 0);
        self.save_state(&mut out)?;
        Ok(out)
    }

    /// Replaces what the session holds by a state [`Session::save_state`] wrote, from this
    /// model (or one with the same fingerprint). Any thread count and any context length that
    /// holds the tokens will do. Every check is made before anything changes: a state from
    /// another model, too long for the context, truncated or corrupted is an error that leaves
    /// the session exactly as it was.
    pub fn load_state(&mut self, bytes: &[u8]) -> Result<()> {
        let state = parse(bytes, self)?;
        self.forget_attention();
        self.history.clear();
        let mut r = Reader {
            bytes: state.tokens,
            at: 0,
        };
        for _ in 0..state.n {
            self.history.push(r.u32()?);
        }
        if let Some(logits) = state.logits {
            read_floats(logits, &mut self.ws.scratch.logits);
        }
        let row = state.computed * self.model.config.kv_dim() * self.kv_type().bytes();
        for (layer, kv) in state.kv.chunks_exact(2 * row.max(1)).enumerate() {
            self.ws.cache.read_prefix_le(layer, state.computed, kv);
        }
        self.computed = state.computed;
        self.logits_current = state.logits.is_some();
        self.shared.set_position(self.history.len());
        Ok(())
    }

    /// A new session over the same model holding this session's tokens and cache, without
    /// recomputing them: one prompt, many continuations. `options` sets the new session's
    /// context (which must hold the tokens), threads and micro-batch.
    pub fn fork(&self, options: &super::SessionOptions) -> Result<Session> {
        if options.kv_type != self.kv_type() {
            return Err(kv_mismatch(self.kv_type(), options.kv_type));
        }
        let mut session = Session::new(self.model.clone(), options)?;
        session.copy_prefix(self, self.position())?;
        Ok(session)
    }

    /// Replaces what this session holds by the first `n_tokens` tokens of `src` (a session of
    /// the same model) and their cache rows, without recomputing them. On error nothing
    /// changes.
    pub fn copy_prefix(&mut self, src: &Session, n_tokens: usize) -> Result<()> {
        if !std::sync::Arc::ptr_eq(&self.model, &src.model)
            && self.model.fingerprint() != src.model.fingerprint()
        {
            return Err(Error::InvalidArgument(
                "the sessions run different models".into(),
            ));
        }
        if self.kv_type() != src.kv_type() {
            return Err(kv_mismatch(src.kv_type(), self.kv_type()));
        }
        if self.rope_signature() != src.rope_signature() {
            return Err(Error::InvalidArgument(format!(
                "the sessions' keys are rotated differently (this model's RoPE depends on the \
                 context length: {} here, {} in the source)",
                self.n_ctx(),
                src.n_ctx()
            )));
        }
        if n_tokens > src.position() {
            return Err(Error::InvalidArgument(format!(
                "cannot copy {n_tokens} tokens: the source session holds {}",
                src.position()
            )));
        }
        if n_tokens > self.n_ctx() {
            return Err(Error::ContextFull {
                needed: n_tokens,
                capacity: self.n_ctx(),
            });
        }
        let p = src.prefix(n_tokens);
        self.forget_attention();
        self.history.clear();
        self.history.extend_from_slice(&src.history[..p.n]);
        self.ws.cache.copy_prefix_from(&src.ws.cache, p.computed);
        if p.logits {
            self.ws
                .scratch
                .logits
                .copy_from_slice(&src.ws.scratch.logits);
        }
        self.computed = p.computed;
        self.logits_current = p.logits;
        self.shared.set_position(p.n);
        Ok(())
    }
}

/// A checked state, borrowing its parts from the saved bytes.
struct Parsed<'a> {
    n: usize,
    computed: usize,
    /// `4 * n` bytes.
    tokens: &'a [u8],
    logits: Option<&'a [u8]>,
    /// Per layer, keys then values.
    kv: &'a [u8],
}

/// Checks every part of a saved state against `session` (its model, context, cache type and
/// rotations).
fn parse<'a>(bytes: &'a [u8], session: &Session) -> Result<Parsed<'a>> {
    let (model, n_ctx, rope) = (&*session.model, session.n_ctx(), session.rope_signature());
    let bad = |what: String| Error::format(format!("session state: {what}"));
    if bytes.len() < HEADER_BYTES + 8 {
        return Err(bad(format!(
            "{} bytes is too short to be a saved session state",
            bytes.len()
        )));
    }
    let mut r = Reader { bytes, at: 0 };
    if r.take(8)? != MAGIC {
        return Err(bad("not a saved Ember session state (wrong magic)".into()));
    }
    let version = r.u32()?;
    if version != VERSION {
        return Err(Error::Unsupported(format!(
            "session state: format version {version} (this library reads version {VERSION})"
        )));
    }
    let code = r.u32()?;
    let Some(kv_type) = [KvType::F32, KvType::F16]
        .into_iter()
        .find(|&t| kv_code(t) == code)
    else {
        return Err(Error::Unsupported(format!(
            "session state: cache element type {code}"
        )));
    };
    let (body, checksum) = bytes.split_at(bytes.len() - 8);
    let mut hash = Hash64::default();
    hash.update(body);
    if hash.finish().to_le_bytes() != checksum {
        return Err(bad(
            "checksum mismatch: the bytes are truncated or corrupted".into(),
        ));
    }
    if r.u64()? != model.fingerprint() {
        return Err(Error::InvalidArgument(
            "session state: it was saved from another model (fingerprints differ)".into(),
        ));
    }
    if r.u64()? != rope {
        return Err(Error::InvalidArgument(format!(
            "session state: its keys are rotated for another context length (this model's \
             RoPE depends on it; this session has {n_ctx})"
        )));
    }
    if kv_type != session.kv_type() {
        return Err(kv_mismatch(kv_type, session.kv_type()));
    }
    let config = &model.config;
    let dims = [r.u32()?, r.u32()?, r.u32()?];
    let expected = [config.n_layers, config.kv_dim(), config.vocab_size].map(|d| d as u32);
    if dims != expected {
        return Err(bad(format!(
            "shapes {dims:?} (layers, kv width, vocabulary) differ from the model's {expected:?}"
        )));
    }
    let (n, computed) = (r.u64()?, r.u64()?);
    let has_logits = r.u32()?;
    if computed > n || has_logits > 1 || (has_logits == 1 && (computed != n || n == 0)) {
        return Err(bad(format!(
            "inconsistent counts ({n} tokens, {computed} computed, logits flag {has_logits})"
        )));
    }
    if n > n_ctx as u64 {
        return Err(Error::ContextFull {
            needed: n as usize,
            capacity: n_ctx,
        });
    }
    let (n, computed) = (n as usize, computed as usize);
    let kv_bytes = 2 * config.n_layers * kv_type.bytes() * computed * config.kv_dim();
    let logit_bytes = has_logits as usize * 4 * config.vocab_size;
    if body.len() != HEADER_BYTES + 4 * n + logit_bytes + kv_bytes {
        return Err(bad(format!(
            "{} bytes where {n} tokens ({computed} computed) take {}",
            bytes.len(),
            HEADER_BYTES + 4 * n + logit_bytes + kv_bytes + 8
        )));
    }
    let tokens = r.take(4 * n)?;
    let vocab = config.vocab_size as u32;
    if let Some((i, t)) = tokens
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .enumerate()
        .find(|&(_, t)| t >= vocab)
    {
        return Err(bad(format!(
            "token {t} at index {i} is outside the vocabulary"
        )));
    }
    let logits = (has_logits == 1).then(|| r.take(logit_bytes)).transpose()?;
    let kv = r.take(kv_bytes)?;
    Ok(Parsed {
        n,
        computed,
        tokens,
        logits,
        kv,
    })
}

/// Little-endian f32s from bytes (`bytes.len() == 4 * out.len()`).
fn read_floats(bytes: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes(c.try_into().expect("4 bytes"));
    }
}

/// The error for moving cache rows of type `from` into a session whose cache holds `to`.
fn kv_mismatch(from: KvType, to: KvType) -> Error {
    Error::InvalidArgument(format!(
        "the keys and values are {} and this session's KV cache is {} (cache types must match)",
        from.name(),
        to.name()
    ))
}

/// Writes little-endian numbers into a buffer sized beforehand.
struct Writer<'a> {
    out: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.out[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    /// The next `n` bytes, for the caller to fill.
    fn next(&mut self, n: usize) -> &mut [u8] {
        self.at += n;
        &mut self.out[self.at - n..self.at]
    }
    fn floats(&mut self, v: &[f32]) {
        let out = &mut self.out[self.at..self.at + 4 * v.len()];
        for (o, x) in out.chunks_exact_mut(4).zip(v) {
            o.copy_from_slice(&x.to_le_bytes());
        }
        self.at += 4 * v.len();
    }
}

/// Reads little-endian numbers, failing on truncation.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| Error::format("session state: truncated"))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}
