//! A directory of plain-text documents, tokenized and packed ("wrapped", docs/algorithm.md §7 of the reference):
//! EOS after every document, everything concatenated and cut into sequences of `seq_len`
//! tokens, the remainder dropped. The last documents (in file-name order) are held out for
//! validation, as OpenWebText's last 100k documents are in the paper.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use crate::tokenizer::{Gpt2Tokenizer, EOS_ID};

/// Documents read from `*.txt` files, sorted by file name so that the order (and thus the
/// validation split) does not depend on the file system.
pub struct TextCorpus {
    pub documents: Vec<(PathBuf, String)>,
}

impl TextCorpus {
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let entries = std::fs::read_dir(dir).with_context(|| {
            format!("reading corpus directory {} (run `make setup` to install the demo corpus)", dir.display())
        })?;
        let mut paths = Vec::new();
        for entry in entries {
            let path = entry.with_context(|| format!("listing {}", dir.display()))?.path();
            if path.extension().is_some_and(|e| e == "txt") {
                paths.push(path);
            }
        }
        paths.sort();
        if paths.is_empty() {
            bail!("corpus directory {} holds no .txt documents", dir.display());
        }
        let documents = paths
            .into_iter()
            .map(|p| {
                let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
                // Gutenberg texts carry the odd Latin-1 byte; keep the document, replace the byte.
                Ok((p, String::from_utf8_lossy(&bytes).into_owned()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { documents })
    }

    /// Tokenizes every document (in parallel over `threads`) and appends EOS to each.
    pub fn tokenize(&self, tokenizer: &Gpt2Tokenizer, threads: usize) -> Vec<Vec<u32>> {
        let threads = threads.max(1).min(self.documents.len().max(1));
        let chunk = self.documents.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .documents
                .chunks(chunk.max(1))
                .map(|docs| {
                    scope.spawn(move || {
                        docs.iter()
                            .map(|(_, text)| {
                                let mut ids = tokenizer.encode(text);
                                ids.push(EOS_ID);
                                ids
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().expect("tokenizer thread panicked")).collect()
        })
    }
}

/// Packed training and validation sequences, each a flat buffer of `n × seq_len` tokens.
pub struct PackedCorpus {
    pub seq_len: usize,
    pub train: Vec<u32>,
    pub valid: Vec<u32>,
}

impl PackedCorpus {
    /// Packs tokenized documents; the last `valid_documents` documents form the validation split.
    pub fn pack(documents: &[Vec<u32>], seq_len: usize, valid_documents: usize) -> Result<Self> {
        ensure!(seq_len > 0, "sequence length must be positive");
        ensure!(
            valid_documents < documents.len(),
            "cannot hold out {valid_documents} validation documents from a corpus of {}",
            documents.len()
        );
        let split = documents.len() - valid_documents;
        let packed = |docs: &[Vec<u32>]| {
            let mut flat: Vec<u32> = docs.iter().flatten().copied().collect();
            flat.truncate(flat.len() / seq_len * seq_len);
            flat
        };
        let corpus = Self { seq_len, train: packed(&documents[..split]), valid: packed(&documents[split..]) };
        ensure!(corpus.num_train() > 0, "the training split is shorter than one sequence of {seq_len} tokens");
        Ok(corpus)
    }

    pub fn num_train(&self) -> usize {
        self.train.len() / self.seq_len
    }

    pub fn num_valid(&self) -> usize {
        self.valid.len() / self.seq_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_appends_nothing_and_drops_the_remainder() {
        let docs = vec![vec![1, 2, 3, EOS_ID], vec![4, 5, EOS_ID], vec![6, 7, 8, 9, EOS_ID]];
        let c = PackedCorpus::pack(&docs, 3, 1).unwrap();
        assert_eq!(c.train, vec![1, 2, 3, EOS_ID, 4, 5]);
        assert_eq!(c.valid, vec![6, 7, 8]);
        assert_eq!((c.num_train(), c.num_valid()), (2, 1));
        assert!(PackedCorpus::pack(&docs, 3, 3).is_err());
        assert!(PackedCorpus::pack(&docs, 100, 1).is_err());
    }

    #[test]
    fn loads_sorted_documents_and_names_a_missing_dir() {
        let dir = std::env::temp_dir().join(format!("bd3-corpus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("b.txt"), "second").unwrap();
        std::fs::write(dir.join("a.txt"), "first").unwrap();
        std::fs::write(dir.join("skip.md"), "not a document").unwrap();
        let corpus = TextCorpus::load_dir(&dir).unwrap();
        let texts: Vec<_> = corpus.documents.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(texts, ["first", "second"]);
        let tok = Gpt2Tokenizer::new().unwrap();
        let ids = corpus.tokenize(&tok, 2);
        let with_eos = |t: &str| [tok.encode(t), vec![EOS_ID]].concat();
        assert_eq!(ids, vec![with_eos("first"), with_eos("second")]);
        std::fs::remove_dir_all(&dir).unwrap();
        let err = TextCorpus::load_dir(&dir).err().unwrap();
        assert!(format!("{err:#}").contains(&dir.display().to_string()));
    }
}
