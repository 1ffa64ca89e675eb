//! The safetensors container: an 8-byte little-endian header length, a JSON header naming every
//! tensor's dtype, shape and byte range, then the raw bytes. Written and parsed here so that a
//! writer can stream tensors without building the file in memory, and a reader can fetch one
//! tensor with a ranged read after the header. Nothing is ever unpickled.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::DType;

/// Where one tensor lives inside a safetensors file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderEntry {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Byte range relative to the start of the data section.
    pub data_offsets: [u64; 2],
}

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub tensors: BTreeMap<String, HeaderEntry>,
    pub metadata: BTreeMap<String, String>,
    /// Offset of the data section from the start of the file.
    pub data_start: u64,
}

impl Header {
    /// The absolute byte range of tensor `name` in the file.
    pub fn byte_range(&self, name: &str) -> Option<std::ops::Range<u64>> {
        let e = self.tensors.get(name)?;
        Some(self.data_start + e.data_offsets[0]..self.data_start + e.data_offsets[1])
    }
}

/// A tensor to be written: its name, dtype, shape and bytes.
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub data: Bytes,
}

/// Encodes a safetensors file as a list of chunks (header first, then each tensor's bytes,
/// zero-copy) in the order given. Names must be unique.
pub fn encode(tensors: &[TensorView<'_>], metadata: &BTreeMap<String, String>) -> Result<Vec<Bytes>> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    }
    let mut offset = 0u64;
    for t in tensors {
        let expected = t.shape.iter().product::<usize>() * t.dtype.size_bytes();
        ensure!(t.data.len() == expected, "tensor `{}`: {} bytes, its shape needs {expected}", t.name, t.data.len());
        let end = offset + t.data.len() as u64;
        let entry = HeaderEntry { dtype: t.dtype, shape: t.shape.to_vec(), data_offsets: [offset, end] };
        ensure!(header.insert(t.name.to_string(), serde_json::to_value(entry)?).is_none(), "tensor `{}` twice", t.name);
        offset = end;
    }
    let mut json = serde_json::to_vec(&header)?;
    // The data section starts 8-byte aligned; the format pads the header with spaces.
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut head = Vec::with_capacity(8 + json.len());
    head.extend_from_slice(&(json.len() as u64).to_le_bytes());
    head.extend_from_slice(&json);
    let mut chunks = vec![Bytes::from(head)];
    chunks.extend(tensors.iter().map(|t| t.data.clone()));
    Ok(chunks)
}

/// Length of the header (the first 8 bytes), checked against the file size.
pub fn header_len(first8: &[u8], file_len: u64, file: &str) -> Result<u64> {
    ensure!(first8.len() == 8 && file_len >= 8, "{file}: {file_len} bytes is too short for a safetensors file");
    let n = u64::from_le_bytes(first8.try_into().expect("8 bytes"));
    ensure!(n <= file_len - 8 && n <= 100 << 20, "{file}: header length {n} does not fit a {file_len}-byte file");
    Ok(n)
}

/// Parses and validates a header: JSON, known dtypes, sizes that match shapes, byte ranges that
/// tile the data section exactly.
pub fn parse_header(json: &[u8], file_len: u64, file: &str) -> Result<Header> {
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(json).with_context(|| format!("{file}: safetensors header is not a JSON object"))?;
    let data_start = 8 + json.len() as u64;
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, value) in raw {
        if name == "__metadata__" {
            metadata = serde_json::from_value(value).with_context(|| format!("{file}: `__metadata__`"))?;
            continue;
        }
        let entry: HeaderEntry = serde_json::from_value(value)
            .with_context(|| format!("{file}: tensor `{name}`: expected {{dtype, shape, data_offsets}}"))?;
        let [start, end] = entry.data_offsets;
        let expected = entry.shape.iter().product::<usize>() as u64 * entry.dtype.size_bytes() as u64;
        if start > end || end - start != expected {
            bail!("{file}: tensor `{name}`: byte range {start}..{end} but shape {:?} needs {expected}", entry.shape);
        }
        tensors.insert(name, entry);
    }
    let mut ranges: Vec<[u64; 2]> = tensors.values().map(|e| e.data_offsets).collect();
    ranges.sort();
    let mut at = 0;
    for [start, end] in ranges {
        ensure!(start == at, "{file}: tensor byte ranges overlap or leave a gap at {at}");
        at = end;
    }
    ensure!(
        data_start + at == file_len,
        "{file}: the header describes {} bytes of data but the file has {}",
        at,
        file_len.saturating_sub(data_start)
    );
    Ok(Header { tensors, metadata, data_start })
}

/// Parses a whole safetensors file held in memory.
pub fn parse(file_bytes: &[u8], file: &str) -> Result<Header> {
    let n = header_len(file_bytes.get(..8).unwrap_or(&[]), file_bytes.len() as u64, file)?;
    parse_header(&file_bytes[8..8 + n as usize], file_bytes.len() as u64, file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(views: &[TensorView<'_>]) -> Vec<u8> {
        encode(views, &BTreeMap::from([("format".to_string(), "pt".to_string())])).unwrap().concat()
    }

    #[test]
    fn round_trip_and_ranges() {
        let a = Bytes::from(vec![1u8; 24]);
        let b = Bytes::from(vec![2u8; 2]);
        let bytes = file(&[
            TensorView { name: "w", dtype: DType::F32, shape: &[2, 3], data: a.clone() },
            TensorView { name: "eps", dtype: DType::BF16, shape: &[], data: b.clone() },
        ]);
        let h = parse(&bytes, "x.safetensors").unwrap();
        assert_eq!(h.data_start % 8, 0);
        assert_eq!(&bytes[h.byte_range("w").unwrap().start as usize..][..24], &a[..]);
        let r = h.byte_range("eps").unwrap();
        assert_eq!(&bytes[r.start as usize..r.end as usize], &b[..]);
        assert_eq!(h.metadata["format"], "pt");
    }

    #[test]
    fn damaged_files_are_refused_with_the_file_name() {
        let good = file(&[TensorView { name: "w", dtype: DType::F32, shape: &[4], data: Bytes::from(vec![0u8; 16]) }]);
        let truncated = &good[..good.len() - 1];
        let err = parse(truncated, "shard-3.safetensors").unwrap_err().to_string();
        assert!(err.contains("shard-3.safetensors") && err.contains("bytes of data"), "{err}");
        let err = parse(&good[..4], "s.safetensors").unwrap_err().to_string();
        assert!(err.contains("too short"), "{err}");
        let mut bad_json = good.clone();
        bad_json[8] = b'[';
        assert!(parse(&bad_json, "s.safetensors").unwrap_err().to_string().contains("not a JSON object"));
    }
}
