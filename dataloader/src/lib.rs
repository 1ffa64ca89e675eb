//! Text → tokens → batches, with no libtorch dependency.
//!
//! Batches are plain `u32` buffers `[micro_batch, seq_len]`; the reader's state is a small serde
//! value that a checkpoint can store. Corpora live in object stores (`store`), the demo corpus
//! in memory (`InMemoryLoader`).

pub mod corpus;
pub mod loader;
pub mod store;
pub mod testing;
pub mod tokenizer;

pub use corpus::{PackedCorpus, TextCorpus};
pub use loader::{Batch, InMemoryLoader, LoaderState};
pub use object_store;
pub use tokenizer::Gpt2Tokenizer;
