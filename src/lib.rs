//! Ember: embeddable CPU inference for GPT-style Transformer language models.
//!
//! The crate is organised by stage of the pipeline:
//! - [`ffi`]: the C API (`include/ember.h`);
//! - [`loader`]: reading model files (GGUF, Hugging Face folders) into named, memory-mapped
//!   tensors;
//! - [`tensor`]: typed views of weights that stay in the mapped file;
//! - [`kernels`]: SIMD matrix products and the small vector operations of a Transformer;
//! - [`model`]: the [`Model`] (weights per block, one file per architecture family) and its
//!   forward pass;
//! - [`session`]: a [`Session`], one sequence's KV cache and position;
//! - [`generate`]: streaming generation and chat with stop conditions;
//! - [`sampler`]: choosing the next token (greedy, temperature, top-k/p, min-p, penalties);
//! - [`threading`]: the private, persistent thread pool a session computes on;
//! - [`tokenizer`]: text to ids and back (Hugging Face `tokenizers`), streaming, chat templates.
//!
//! ```no_run
//! use std::sync::Arc;
//! use ember::{Model, Session, SessionOptions};
//!
//! let model = Arc::new(Model::load("models/SmolLM2-135M-Instruct")?);
//! let mut session = Session::new(model, &SessionOptions { n_threads: 2, ..Default::default() })?;
//! let logits = session.step(&[1, 2, 3])?;
//! let next = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
//! # let _ = next;
//! # Ok::<(), ember::Error>(())
//! ```

mod checksum;
pub mod constraint;
pub mod convert;
pub mod defaults;
pub mod error;
pub mod ffi;
#[doc(hidden)]
pub mod fuzzing;
pub mod generate;
pub mod kernels;
pub mod loader;
pub mod model;
pub mod sampler;
pub mod session;
pub mod tensor;
pub mod threading;
pub mod tokenizer;
pub mod tools;

pub use constraint::{Constraint, ConstraintKind, ConstraintState};
pub use error::{Error, Result};
pub use generate::{
    chat, chat_conversation, generate, GenerateOptions, Generation, Generator, Piece, StopReason,
};
pub use model::{Architecture, ModelConfig};
pub use model::{
    AttentionRows, AttentionSelection, KvType, LoadOptions, Model, ModelInfo, Pooling,
};
pub use sampler::{Sampler, SamplerOptions};
pub use session::{CancelHandle, CombinedSteps, Perf, PerfCounts, Session, SessionOptions};
pub use threading::ThreadPool;
pub use tokenizer::{ChatMessage, Conversation, StreamDecoder, Tokenizer};
pub use tools::{ToolChoice, ToolFormat};

/// The README's Rust examples, compiled by `cargo test` (as doctests) so that they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
