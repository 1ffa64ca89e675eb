//! GPT-2 BPE (`r50k_base`, embedded in tiktoken-rs: no network) plus the diffusion mask token.

use anyhow::{anyhow, Result};
use tiktoken_rs::CoreBPE;

/// `<|endoftext|>`: GPT-2's BOS and EOS.
pub const EOS_ID: u32 = 50256;
/// GPT-2 has no mask token, so `[MASK]` is appended after the last id (docs/algorithm.md §1.2).
pub const MASK_ID: u32 = 50257;
/// Model vocabulary: GPT-2's 50257 ids plus `[MASK]`.
pub const MODEL_VOCAB: usize = 50258;

pub struct Gpt2Tokenizer {
    bpe: CoreBPE,
}

impl Gpt2Tokenizer {
    pub fn new() -> Result<Self> {
        let bpe = tiktoken_rs::r50k_base().map_err(|e| anyhow!("loading GPT-2 BPE (r50k_base): {e}"))?;
        Ok(Self { bpe })
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.bpe.encode_ordinary(text)
    }

    /// Text of `ids`. EOS is written as `<|endoftext|>` and `[MASK]` as `[MASK]`; invalid UTF-8
    /// (a multi-byte character cut between tokens) is replaced rather than rejected.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            match id {
                EOS_ID => out.extend_from_slice(b"<|endoftext|>"),
                MASK_ID => out.extend_from_slice(b"[MASK]"),
                _ => match self.bpe.decode_bytes(&[id]) {
                    Ok(bytes) => out.extend_from_slice(&bytes),
                    Err(_) => out.extend_from_slice(format!("<|unk:{id}|>").as_bytes()),
                },
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_ids_and_round_trip() {
        let tok = Gpt2Tokenizer::new().unwrap();
        assert_eq!(tok.encode("Hello world"), vec![15496, 995]);
        let text = "To be, or not to be: that is the question.";
        assert_eq!(tok.decode(&tok.encode(text)), text);
        assert_eq!(tok.decode(&[15496, EOS_ID, MASK_ID]), "Hello<|endoftext|>[MASK]");
    }
}
