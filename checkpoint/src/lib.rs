//! Checkpoints as sharded safetensors with a manifest (no libtorch).
//!
//! The trainer converts its tensors (parameters, EMA, optimizer moments) to [`TensorBuffer`]s,
//! says which part of each global tensor this rank holds ([`LocalTensor`]), and hands them to a
//! [`CheckpointStore`] (or an [`AsyncSaver`]). Every rank writes its own files; rank 0 merges the
//! ranks' indices into `manifest.json` and writes the commit marker last. Readers ask for any box
//! of any tensor, so a checkpoint written by N processes loads on M.

mod finite;
pub mod manifest;
pub mod safetensors;
pub mod saver;
pub mod slice;
pub mod store;

pub use manifest::{CheckpointMeta, Manifest};
pub use saver::{AsyncSaver, SaveJob, SaveReport};
use serde::{Deserialize, Serialize};
pub use slice::Slice;
pub use store::{CheckpointStore, LocalTensor, ResumePoint, Retention, StepStatus, WriteOptions};
use thiserror::Error;

/// Element types a checkpoint stores (safetensors names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DType {
    F32,
    F64,
    BF16,
    F16,
    I64,
    I32,
    U8,
    Bool,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::U8 | DType::Bool => 1,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BufferError {
    #[error("tensor `{name}`: {actual} bytes, but shape {shape:?} of {dtype:?} needs {expected}")]
    SizeMismatch { name: String, dtype: DType, shape: Vec<usize>, expected: usize, actual: usize },
}

/// One tensor's bytes (little-endian, row-major) with its name, type and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorBuffer {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl TensorBuffer {
    pub fn new(name: impl Into<String>, dtype: DType, shape: Vec<usize>, data: Vec<u8>) -> Result<Self, BufferError> {
        let name = name.into();
        let expected = shape.iter().product::<usize>() * dtype.size_bytes();
        if data.len() != expected {
            return Err(BufferError::SizeMismatch { name, dtype, shape, expected, actual: data.len() });
        }
        Ok(Self { name, dtype, shape, data })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked_and_errors_name_the_tensor() {
        let ok = TensorBuffer::new("w", DType::BF16, vec![2, 3], vec![0; 12]).unwrap();
        assert_eq!(ok.numel(), 6);
        let scalar = TensorBuffer::new("eps", DType::F32, vec![], vec![0; 4]).unwrap();
        assert_eq!(scalar.numel(), 1);
        let err = TensorBuffer::new("backbone.x", DType::F32, vec![2, 3], vec![0; 12]).unwrap_err();
        assert!(err.to_string().contains("backbone.x") && err.to_string().contains("needs 24"), "{err}");
    }
}
