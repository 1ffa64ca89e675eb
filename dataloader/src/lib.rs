//! Text → tokens → batches, with no libtorch dependency.
//!
//! This first version holds a small corpus in memory (the embedded Shakespeare demo corpus).
//! Batches are plain `u32` buffers `[micro_batch, seq_len]`; the reader's state is a small serde
//! value that a checkpoint can store.

pub mod corpus;
pub mod loader;
pub mod tokenizer;

pub use corpus::{PackedCorpus, TextCorpus};
pub use loader::{Batch, InMemoryLoader, LoaderState};
pub use tokenizer::Gpt2Tokenizer;
