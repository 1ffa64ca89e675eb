//! Tokenizers: GPT-2 BPE (`r50k_base`, embedded in tiktoken-rs: no network) plus the diffusion
//! mask token, the default; and any HuggingFace `tokenizer.json` (the BERT vocabulary of LM1B,
//! docs/algorithm.md §1.2, §7) through the `tokenizers` crate, read from a file, never downloaded.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tiktoken_rs::CoreBPE;

use crate::manifest::{Manifest, TokenizerSpecialIds, MANIFEST_NAME};

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

/// Which token of a `tokenizer.json` plays each special role: names given on the command line,
/// else the first of the usual names the vocabulary has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub mask: Option<String>,
    pub pad: Option<String>,
}

/// The names looked for when a role is not given: BERT's first, then RoBERTa/T5/Llama-style, then GPT-2's.
const BOS_NAMES: [&str; 5] = ["[CLS]", "<s>", "[BOS]", "<bos>", "<|endoftext|>"];
const EOS_NAMES: [&str; 5] = ["[SEP]", "</s>", "[EOS]", "<eos>", "<|endoftext|>"];
const MASK_NAMES: [&str; 2] = ["[MASK]", "<mask>"];
const PAD_NAMES: [&str; 2] = ["[PAD]", "<pad>"];

/// A HuggingFace tokenizer loaded from its `tokenizer.json`, with its special ids.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    /// Where it came from, for messages and the manifest.
    pub source: String,
    pub special: TokenizerSpecialIds,
    /// Every id it produces is below this (its largest id + 1, added tokens included).
    pub vocab_size: u32,
}

impl HfTokenizer {
    /// Reads `path` (a `tokenizer.json`).
    pub fn from_file(path: &Path, names: &SpecialTokens) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading tokenizer {}", path.display()))?;
        Self::from_bytes(&bytes, &path.display().to_string(), names)
    }

    /// Parses the bytes of a `tokenizer.json` read from `source`.
    pub fn from_bytes(bytes: &[u8], source: &str, names: &SpecialTokens) -> Result<Self> {
        let (inner, vocab_size) = Self::parse(bytes, source)?;
        let find = |role: &str, flag: &str, given: &Option<String>, usual: &[&str]| -> Result<Option<u32>> {
            match given {
                Some(name) => match inner.token_to_id(name) {
                    Some(id) => Ok(Some(id)),
                    None => bail!("{source}: {flag} {name:?}: the tokenizer has no such token (the {role} token)"),
                },
                None => Ok(usual.iter().find_map(|name| inner.token_to_id(name))),
            }
        };
        let required = |role: &str, flag: &str, given: &Option<String>, usual: &[&str]| -> Result<u32> {
            find(role, flag, given, usual)?.with_context(|| {
                format!("{source}: the tokenizer has none of the usual {role} tokens {usual:?}: name one with {flag}")
            })
        };
        let special = TokenizerSpecialIds {
            bos: required("BOS", "--bos-token", &names.bos, &BOS_NAMES)?,
            eos: required("EOS", "--eos-token", &names.eos, &EOS_NAMES)?,
            mask: find("mask", "--mask-token", &names.mask, &MASK_NAMES)?,
            pad: find("padding", "--pad-token", &names.pad, &PAD_NAMES)?,
        };
        Ok(Self { inner, source: source.to_string(), special, vocab_size })
    }

    /// The tokenizer and its vocabulary size (largest id + 1).
    fn parse(bytes: &[u8], source: &str) -> Result<(tokenizers::Tokenizer, u32)> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| anyhow!("{source}: not a HuggingFace tokenizer.json that this build can load: {e}"))?;
        let vocab_size = inner.get_vocab(true).values().max().map_or(0, |&m| m + 1);
        anyhow::ensure!(vocab_size > 0, "{source}: the tokenizer has an empty vocabulary");
        Ok((inner, vocab_size))
    }

    /// Token ids of `text`, without the special tokens the tokenizer's post-processor would add
    /// (bd3 adds EOS after every document itself, and BOS/EOS with `bos-eos` framing).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding =
            self.inner.encode(text, false).map_err(|e| anyhow!("{}: tokenizing a document: {e}", self.source))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens written out (`[CLS] … [SEP]`); an id the tokenizer does not
    /// know is written `<|unk:ID|>`.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut out = String::new();
        let mut run: Vec<u32> = vec![];
        let flush = |run: &mut Vec<u32>, out: &mut String| {
            if !run.is_empty() {
                if let Ok(text) = self.inner.decode(run, false) {
                    if !out.is_empty() && !text.is_empty() {
                        out.push(' ');
                    }
                    out.push_str(&text);
                }
                run.clear();
            }
        };
        for &id in ids {
            if self.inner.id_to_token(id).is_some() {
                run.push(id);
            } else {
                flush(&mut run, &mut out);
                if !out.is_empty() {
                    out.push(' ');
                }
                out.push_str(&format!("<|unk:{id}|>"));
            }
        }
        flush(&mut run, &mut out);
        out
    }
}

/// The `tokenizer.json` a data set was written with (`bd3 prepare --tokenizer`), as `index.json`
/// names it beside itself, with the special ids it records.
pub struct DataSetTokenizer {
    pub bytes: Vec<u8>,
    /// Where it was read from, for messages.
    pub source: String,
    pub special: TokenizerSpecialIds,
}

/// The `tokenizer.json` of the data set at `url` (a `bd3 prepare` output); `None` for GPT-2 BPE
/// (no file) and for no data set (an empty `url`: the in-memory corpus is tokenized with GPT-2).
pub fn data_set_tokenizer(url: &str) -> Result<Option<DataSetTokenizer>> {
    if url.is_empty() {
        return Ok(None);
    }
    let manifest = Manifest::load_url(url)?;
    let Some(file) = &manifest.tokenizer_file else { return Ok(None) };
    let dir = crate::store::open(url.strip_suffix(MANIFEST_NAME).unwrap_or(url).trim_end_matches('/'))?;
    let source = dir.display(file);
    let bytes =
        storage::block_on(dir.get(file)).with_context(|| format!("reading the data set's tokenizer {source}"))?;
    Ok(Some(DataSetTokenizer { bytes: bytes.to_vec(), source, special: manifest.special_ids }))
}

/// The tokenizer of a data set: GPT-2 BPE (`bd3 prepare`'s default), or a `tokenizer.json`.
pub enum TextTokenizer {
    Gpt2(Gpt2Tokenizer),
    HuggingFace(Box<HfTokenizer>),
}

impl TextTokenizer {
    /// GPT-2 BPE without a file, else the `tokenizer.json` at `file`.
    pub fn load(file: Option<&Path>, names: &SpecialTokens) -> Result<Self> {
        match file {
            None => Ok(Self::Gpt2(Gpt2Tokenizer::new()?)),
            Some(path) => Ok(Self::HuggingFace(Box::new(HfTokenizer::from_file(path, names)?))),
        }
    }

    /// The tokenizer the data set at `url` (a `bd3 prepare` output) was written with: the copy of
    /// its `tokenizer.json` that `index.json` names, else GPT-2. An empty `url` (no data set) is
    /// GPT-2 (the in-memory corpus is tokenized with it).
    pub fn of_data_set(url: &str) -> Result<Self> {
        match data_set_tokenizer(url)? {
            None => Ok(Self::Gpt2(Gpt2Tokenizer::new()?)),
            Some(file) => Self::with_ids(&file.bytes, &file.source, file.special),
        }
    }

    /// The tokenizer `data.tokenizer` names: "gpt2", or the path of a `tokenizer.json` whose
    /// BOS/EOS are `special` (a run records the copy of its data set's); "" is the data set at
    /// `dataset`'s ([`Self::of_data_set`]).
    pub fn named(name: &str, dataset: &str, special: TokenizerSpecialIds) -> Result<Self> {
        match name {
            "" => Self::of_data_set(dataset),
            "gpt2" => Ok(Self::Gpt2(Gpt2Tokenizer::new()?)),
            path => {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("data.tokenizer: reading the tokenizer.json {path}"))?;
                Self::with_ids(&bytes, path, special)
            }
        }
    }

    /// A `tokenizer.json` read from `source` whose special ids are already known (recorded by
    /// `index.json` or a run; prepare may have been told them, so they are not looked up again).
    fn with_ids(bytes: &[u8], source: &str, special: TokenizerSpecialIds) -> Result<Self> {
        let (inner, vocab_size) = HfTokenizer::parse(bytes, source)?;
        Ok(Self::HuggingFace(Box::new(HfTokenizer { inner, source: source.to_string(), special, vocab_size })))
    }

    /// How the manifest names it.
    pub fn name(&self) -> String {
        match self {
            Self::Gpt2(_) => "gpt2 (tiktoken r50k_base)".to_string(),
            Self::HuggingFace(t) => format!("tokenizer.json ({})", t.source),
        }
    }

    /// Every id it produces is below this.
    pub fn vocab_size(&self) -> u32 {
        match self {
            Self::Gpt2(_) => MODEL_VOCAB as u32 - 1,
            Self::HuggingFace(t) => t.vocab_size,
        }
    }

    pub fn special_ids(&self) -> TokenizerSpecialIds {
        match self {
            Self::Gpt2(_) => TokenizerSpecialIds::gpt2(),
            Self::HuggingFace(t) => t.special.clone(),
        }
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Self::Gpt2(t) => Ok(t.encode(text)),
            Self::HuggingFace(t) => t.encode(text),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Self::Gpt2(t) => t.decode(ids),
            Self::HuggingFace(t) => t.decode(ids),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A WordLevel tokenizer.json without BERT's names: the roles are found by the usual names
    /// or named explicitly, and a name the vocabulary lacks is refused naming the flag.
    #[test]
    fn special_tokens_are_found_or_named() {
        let json = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
            "decoder": null, "model": {"type": "WordLevel", "unk_token": "<unk>",
            "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "<go>": 3, "hello": 4, "world": 5, "<mask>": 6}}}"#;
        let t = HfTokenizer::from_bytes(json.as_bytes(), "t.json", &SpecialTokens::default()).unwrap();
        assert_eq!((t.special.bos, t.special.eos, t.special.mask, t.special.pad), (1, 2, Some(6), None));
        assert_eq!(t.vocab_size, 7);
        assert_eq!(t.encode("hello world").unwrap(), vec![4, 5]);
        assert_eq!(t.decode(&[1, 4, 5, 9]), "<s> hello world <|unk:9|>");
        let names = SpecialTokens { bos: Some("<go>".into()), ..Default::default() };
        let t = HfTokenizer::from_bytes(json.as_bytes(), "t.json", &names).unwrap();
        assert_eq!(t.special.bos, 3);
        let names = SpecialTokens { pad: Some("[PAD]".into()), ..Default::default() };
        let err = HfTokenizer::from_bytes(json.as_bytes(), "t.json", &names).err().unwrap().to_string();
        assert!(err.contains("--pad-token") && err.contains("[PAD]") && err.contains("t.json"), "{err}");
        let err = HfTokenizer::from_bytes(b"{}", "bad.json", &SpecialTokens::default()).err().unwrap().to_string();
        assert!(err.contains("bad.json"), "{err}");
    }

    #[test]
    fn known_ids_and_round_trip() {
        let tok = Gpt2Tokenizer::new().unwrap();
        assert_eq!(tok.encode("Hello world"), vec![15496, 995]);
        let text = "To be, or not to be: that is the question.";
        assert_eq!(tok.decode(&tok.encode(text)), text);
        assert_eq!(tok.decode(&[15496, EOS_ID, MASK_ID]), "Hello<|endoftext|>[MASK]");
    }
}
