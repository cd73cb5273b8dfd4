//! Incremental detokenization: one token in, the newly completed text out.
//!
//! A token may end in the middle of a UTF-8 character (byte-level BPE and byte-fallback
//! pieces), and SentencePiece decoders treat the first token of a text differently (its
//! leading space is dropped). The decoder therefore decodes a short window of recent tokens
//! twice, with and without the new ones, and emits the difference once it no longer ends in
//! an incomplete character (U+FFFD). Concatenating every piece, then [`StreamDecoder::finish`],
//! gives exactly `decode(all tokens)`.

use super::Tokenizer;
use crate::error::Result;

/// The state of one stream of tokens being turned into text.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    /// Recent tokens: `ids[..read]` have been emitted as text, `ids[read..]` not yet.
    ids: Vec<u32>,
    /// Tokens of `ids` before `prefix` are context only (already emitted before the window).
    prefix: usize,
    read: usize,
}

impl StreamDecoder {
    /// A decoder at the start of a text.
    pub fn new() -> StreamDecoder {
        StreamDecoder::default()
    }

    /// Adds one token and returns the text it completes (often empty while a character is
    /// incomplete). An id outside the vocabulary is an error and changes nothing.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        tokenizer.check_ids(&[id])?;
        self.ids.push(id);
        let emitted = tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let all = tokenizer.decode(&self.ids[self.prefix..])?;
        if all.len() > emitted.len() && !all.ends_with('\u{FFFD}') {
            let piece = all.get(emitted.len()..).unwrap_or_default().to_string();
            // The window slides: the tokens just emitted become the context of the next one.
            self.prefix = self.read;
            self.read = self.ids.len();
            // Keep the buffer short: what lies before the window is never decoded again.
            if self.prefix > 0 {
                self.ids.drain(..self.prefix);
                self.read -= self.prefix;
                self.prefix = 0;
            }
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// Returns the text still held back (an incomplete character at the very end, as U+FFFD)
    /// and resets the decoder.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        let emitted = tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let all = tokenizer.decode(&self.ids[self.prefix..])?;
        *self = StreamDecoder::default();
        Ok(all.get(emitted.len()..).unwrap_or_default().to_string())
    }

    /// Forgets every token.
    pub fn reset(&mut self) {
        *self = StreamDecoder::default();
    }
}
