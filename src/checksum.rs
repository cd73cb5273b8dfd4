//! A fast, non-cryptographic 64-bit hash: model fingerprints and the checksums of saved
//! session states. It detects accidents (a truncated or corrupted save file, the state of
//! another model), not tampering; a saved state holds only numbers and token ids, so a forged
//! one can make the model say something else but cannot reach memory outside the session.

/// An incremental hash of bytes (a multiply-rotate mix over 8-byte words).
#[derive(Debug, Clone)]
pub(crate) struct Hash64 {
    state: u64,
    /// Bytes not yet mixed (fewer than 8).
    tail: [u8; 8],
    n_tail: usize,
    len: u64,
}

const K0: u64 = 0x9e37_79b9_7f4a_7c15;
const K1: u64 = 0xbf58_476d_1ce4_e5b9;

impl Default for Hash64 {
    fn default() -> Self {
        Hash64 {
            state: K0,
            tail: [0; 8],
            n_tail: 0,
            len: 0,
        }
    }
}

impl Hash64 {
    fn mix(&mut self, word: u64) {
        self.state = (self.state ^ word.wrapping_mul(K1))
            .rotate_left(31)
            .wrapping_mul(K0);
    }

    /// Adds bytes.
    pub(crate) fn update(&mut self, mut bytes: &[u8]) {
        self.len += bytes.len() as u64;
        if self.n_tail > 0 {
            let take = (8 - self.n_tail).min(bytes.len());
            self.tail[self.n_tail..self.n_tail + take].copy_from_slice(&bytes[..take]);
            self.n_tail += take;
            bytes = &bytes[take..];
            if self.n_tail < 8 {
                return;
            }
            self.mix(u64::from_le_bytes(self.tail));
            self.n_tail = 0;
        }
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            self.mix(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        let rest = words.remainder();
        self.tail[..rest.len()].copy_from_slice(rest);
        self.n_tail = rest.len();
    }

    /// Adds a number (as 8 little-endian bytes).
    pub(crate) fn update_u64(&mut self, value: u64) {
        self.update(&value.to_le_bytes());
    }

    /// The hash of everything added.
    pub(crate) fn finish(&self) -> u64 {
        let mut h = self.clone();
        let mut last = [0u8; 8];
        last[..h.n_tail].copy_from_slice(&h.tail[..h.n_tail]);
        h.mix(u64::from_le_bytes(last) ^ h.len.rotate_left(56));
        let mut z = h.state ^ h.len;
        z = (z ^ (z >> 30)).wrapping_mul(K1);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::Hash64;

    fn hash(bytes: &[u8]) -> u64 {
        let mut h = Hash64::default();
        h.update(bytes);
        h.finish()
    }

    #[test]
    fn pieces_hash_as_the_whole_and_every_byte_counts() {
        let data: Vec<u8> = (0..100u32).map(|i| (i * 7 + 3) as u8).collect();
        let whole = hash(&data);
        for split in [0, 1, 7, 8, 9, 50, 99, 100] {
            let mut h = Hash64::default();
            h.update(&data[..split]);
            h.update(&data[split..]);
            assert_eq!(h.finish(), whole, "split at {split}");
        }
        for i in 0..data.len() {
            let mut changed = data.clone();
            changed[i] ^= 1;
            assert_ne!(hash(&changed), whole, "byte {i}");
        }
        // Trailing zero bytes change the hash (the length is mixed in).
        assert_ne!(
            hash(&data[..96]),
            hash(&[&data[..96], &[0u8; 4][..]].concat())
        );
    }
}
