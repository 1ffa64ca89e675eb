//! Text → tokens → batches, with no libtorch dependency.
//!
//! Batches are plain `u32` buffers `[micro_batch, seq_len]`; the reader's state is a small serde
//! value that a checkpoint can store. Corpora live in object stores (`store`), the demo corpus
//! in memory (`InMemoryLoader`).

pub mod corpus;
pub mod loader;
pub mod manifest;
pub mod prepare;
pub mod reader;
pub mod shard;
pub mod testing;
pub mod tokenizer;

pub use corpus::{PackedCorpus, TextCorpus};
pub use loader::{Batch, InMemoryLoader, LoaderState, RankSlice};
pub use manifest::{Manifest, SplitName};
pub use prepare::{prepare, Framing, PrepareConfig, PrepareSummary};
pub use reader::{Reader, ReaderConfig};
/// Object stores by URL (bd3-storage, under the name this crate always gave it).
pub use storage as store;
pub use storage::object_store;
pub use storage::RetryConfig;
pub use tokenizer::{data_set_tokenizer, DataSetTokenizer, Gpt2Tokenizer, HfTokenizer, SpecialTokens, TextTokenizer};

#[cfg(test)]
mod tests;
