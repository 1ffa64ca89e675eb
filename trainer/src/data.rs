//! Where training and validation tokens come from: prepared Parquet shards (`bd3 prepare`)
//! streamed from a local path or an object store, or a text corpus tokenized in memory (the
//! demo's).

use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use dataloader::manifest::SpecialIds;
use dataloader::{
    Batch, Gpt2Tokenizer, InMemoryLoader, LoaderState, Manifest, PackedCorpus, RankSlice, Reader, ReaderConfig,
    SplitName, TextCorpus,
};
use tracing::info;

use crate::config::Config;
use dataloader::tokenizer::{EOS_ID, MODEL_VOCAB};

/// The training batches of a run.
pub enum TrainData {
    Shards(Box<Reader>),
    Memory(InMemoryLoader),
}

impl TrainData {
    /// This rank's training batches and the validation tokens of `cfg.data`. Rank `rank` of
    /// `world` gets only its rows of every global batch (`train.micro_batch` at a time), from
    /// one order whose batches and saved position do not depend on the number of ranks.
    pub fn open(cfg: &Config, rank: usize, world: usize) -> Result<(Self, Vec<u32>)> {
        let (mb, seq_len) = (cfg.train.micro_batch, cfg.model.seq_len);
        let global_batch = mb * world * cfg.train.grad_accum;
        if cfg.data.dataset.is_empty() {
            let corpus = load_corpus(cfg)?;
            let slice = RankSlice { rank, world, global_batch, micro_batch: mb };
            let loader = InMemoryLoader::for_rank(corpus.train, seq_len, slice, cfg.train.seed, true)?;
            return Ok((Self::Memory(loader), corpus.valid));
        }
        let url = &cfg.data.dataset;
        let reader = Reader::open(url, ReaderConfig::new(cfg.train.seed, rank, world, global_batch, mb))
            .with_context(|| format!("data.dataset {url}"))?;
        ensure!(
            reader.seq_len() == seq_len,
            "data.dataset {url} holds sequences of {} tokens, but model.seq_len is {seq_len}",
            reader.seq_len()
        );
        check_data_set_vocabulary(cfg, url, &reader)?;
        // Validation reads only what evaluation and the clip search use (all of it with
        // train.eval_batches = 0), in the split's stored order.
        let wanted = match cfg.train.eval_batches {
            0 => None,
            n => Some(n.max(cfg.diffusion.clip_search_batches) * mb),
        };
        let valid = match reader.manifest().valid.sequences {
            0 => vec![],
            _ => split_tokens(cfg, SplitName::Valid, wanted)?,
        };
        info!(
            dataset = %url,
            train_sequences = reader.num_sequences(),
            valid_sequences = valid.len() / seq_len,
            "data set opened"
        );
        Ok((Self::Shards(Box::new(reader)), valid))
    }

    pub fn next_batch(&mut self) -> Result<Batch> {
        match self {
            Self::Shards(r) => r.next_batch(),
            Self::Memory(m) => Ok(m.next_batch()),
        }
    }

    /// Bytes of row groups read from the data set so far (bd3-storage's count, less the
    /// shards' footers read at open; 0 for an in-memory corpus).
    pub fn row_group_bytes_read(&self) -> u64 {
        match self {
            Self::Shards(r) => r.row_group_bytes_read(),
            Self::Memory(_) => 0,
        }
    }

    pub fn state(&self) -> LoaderState {
        match self {
            Self::Shards(r) => r.state(),
            Self::Memory(m) => m.state(),
        }
    }

    pub fn restore(&mut self, state: LoaderState) -> Result<()> {
        match self {
            Self::Shards(r) => r.restore(state),
            Self::Memory(m) => m.restore(state),
        }
    }
}

/// The tokens of a split of `cfg.data` in stored order, at most `max_sequences` sequences (from
/// a prepared data set: whole micro-batches only).
pub fn split_tokens(cfg: &Config, split: SplitName, max_sequences: Option<usize>) -> Result<Vec<u32>> {
    let (mb, seq_len) = (cfg.train.micro_batch, cfg.model.seq_len);
    let cap = |n: usize| max_sequences.map_or(n, |m| m.min(n)) / mb * mb;
    if cfg.data.dataset.is_empty() {
        let corpus = load_corpus(cfg)?;
        let mut tokens = if split == SplitName::Train { corpus.train } else { corpus.valid };
        if let Some(m) = max_sequences {
            tokens.truncate(m * seq_len);
        }
        return Ok(tokens);
    }
    let url = &cfg.data.dataset;
    let config = ReaderConfig { split, ..ReaderConfig::validation(0, 1, mb, mb) };
    let mut reader = Reader::open(url, config).with_context(|| format!("data.dataset {url}: {split} split"))?;
    check_data_set_vocabulary(cfg, url, &reader)?;
    let wanted = cap(reader.num_sequences() as usize);
    let mut tokens = Vec::with_capacity(wanted * seq_len);
    while tokens.len() < wanted * seq_len {
        tokens.extend(reader.next_batch()?.tokens);
    }
    Ok(tokens)
}

/// Loads the corpus of `cfg.data`, tokenizes and packs it into `model.seq_len` sequences.
pub fn load_corpus(cfg: &Config) -> Result<PackedCorpus> {
    let source = format!("data.corpus {} (GPT-2 BPE)", cfg.data.corpus.display());
    check_vocabulary(cfg, GPT2_VOCAB, &[("EOS", EOS_ID)], &source)?;
    let started = Instant::now();
    let corpus = TextCorpus::load_dir(&cfg.data.corpus)?;
    let tokenizer = Gpt2Tokenizer::new()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let documents = corpus.tokenize(&tokenizer, threads);
    let packed = PackedCorpus::pack(&documents, cfg.model.seq_len, cfg.data.valid_documents)
        .with_context(|| format!("packing corpus {}", cfg.data.corpus.display()))?;
    info!(
        documents = documents.len(),
        train_sequences = packed.num_train(),
        valid_sequences = packed.num_valid(),
        seconds = started.elapsed().as_secs_f64(),
        "corpus ready"
    );
    Ok(packed)
}

/// GPT-2's ids, which the in-memory corpus is tokenized into (the model adds `[MASK]`).
const GPT2_VOCAB: u32 = MODEL_VOCAB as u32 - 1;

/// The BOS and EOS ids of a run, each from `data.bos_id`/`data.eos_id` when set, else from the
/// data set's `index.json`, else GPT-2's `<|endoftext|>`; refused (naming where the id came
/// from) when the model cannot embed it.
pub fn special_ids(cfg: &Config) -> Result<SpecialIds> {
    let d = &cfg.data;
    let index = match (d.bos_id, d.eos_id) {
        (Some(_), Some(_)) => None,
        _ if d.dataset.is_empty() => None,
        _ => Some(Manifest::load_url(&d.dataset).with_context(|| format!("data.dataset {}", d.dataset))?.special_ids),
    };
    let pick = |name: &str, field: &str, set: Option<u32>, from_index: Option<u32>| -> Result<u32> {
        let (id, source) = match (set, from_index) {
            (Some(id), _) => (id, format!("{field} ({id})")),
            (None, Some(id)) => (id, format!("the {name} id {id} of data.dataset {} (index.json)", d.dataset)),
            (None, None) => (EOS_ID, format!("the {name} id {EOS_ID} (GPT-2's <|endoftext|>; set {field})")),
        };
        ensure!(
            (id as usize) < cfg.model.vocab_size,
            "{source} is not below model.vocab_size ({}): the model cannot embed it",
            cfg.model.vocab_size
        );
        Ok(id)
    };
    Ok(SpecialIds {
        bos: pick("BOS", "data.bos_id", d.bos_id, index.as_ref().map(|i| i.bos))?,
        eos: pick("EOS", "data.eos_id", d.eos_id, index.as_ref().map(|i| i.eos))?,
    })
}

/// `cfg` as a run records it in its directory (`config.toml`): what it took from its data set
/// made explicit, so that sampling from and scoring samples of its weights need no data set (it
/// may have moved, or been on a scratch volume): the BOS and EOS ids, and the tokenizer, "gpt2"
/// or a copy of the data set's `tokenizer.json` written into `run_dir`.
pub fn recorded_config(cfg: &Config, run_dir: &Path) -> Result<Config> {
    let mut recorded = cfg.clone();
    let ids = special_ids(cfg)?;
    (recorded.data.bos_id, recorded.data.eos_id) = (Some(ids.bos), Some(ids.eos));
    if cfg.data.tokenizer.is_empty() {
        recorded.data.tokenizer = match dataloader::data_set_tokenizer(&cfg.data.dataset)
            .with_context(|| format!("data.dataset {}", cfg.data.dataset))?
        {
            None => "gpt2".to_string(),
            Some(file) => {
                let copy = run_dir.join("tokenizer.json");
                std::fs::write(&copy, &file.bytes).with_context(|| {
                    format!("copying the data set's tokenizer {} to {}", file.source, copy.display())
                })?;
                // Absolute, as the run may be sampled from any directory.
                let copy = std::path::absolute(&copy).with_context(|| format!("resolving {}", copy.display()))?;
                copy.display().to_string()
            }
        };
    }
    Ok(recorded)
}

/// The tokenizer that decodes a run's samples (`data.tokenizer`, with the run's BOS/EOS ids).
pub fn sample_tokenizer(cfg: &Config) -> Result<dataloader::TextTokenizer> {
    let ids = special_ids(cfg)?;
    let special = dataloader::manifest::TokenizerSpecialIds { bos: ids.bos, eos: ids.eos, mask: None, pad: None };
    dataloader::TextTokenizer::named(&cfg.data.tokenizer, &cfg.data.dataset, special)
}

/// The padding id the loss leaves out: that of a data set prepared with `--framing pad` (one
/// document per sequence, filled with the tokenizer's padding token), from its `index.json`.
/// Packed data sets (`wrap`, `bos-eos`) and the in-memory corpus have no padding.
pub fn padding_id(cfg: &Config) -> Result<Option<u32>> {
    let url = &cfg.data.dataset;
    if url.is_empty() {
        return Ok(None);
    }
    let index = Manifest::load_url(url).with_context(|| format!("data.dataset {url}"))?;
    if index.framing != "pad" {
        return Ok(None);
    }
    let pad = index.special_ids.pad.with_context(|| {
        format!("data.dataset {url}: index.json has framing \"pad\" but records no padding id (special_ids.pad)")
    })?;
    Ok(Some(pad))
}

/// [`check_vocabulary`] against a prepared data set's `index.json`; a tokenizer with a mask token
/// of its own (BERT's `[MASK]`) must be the model's `diffusion.mask_id`.
fn check_data_set_vocabulary(cfg: &Config, url: &str, reader: &Reader) -> Result<()> {
    let index = reader.manifest();
    let source = format!("data.dataset {url} (index.json, tokenizer {})", index.tokenizer);
    check_vocabulary(cfg, index.vocab_size, &index.special_ids.named(), &source)?;
    if let Some(mask) = index.special_ids.mask {
        ensure!(
            mask == cfg.diffusion.mask_id,
            "{source} records the mask id {mask}, but diffusion.mask_id is {}: set diffusion.mask_id = {mask}",
            cfg.diffusion.mask_id
        );
    }
    Ok(())
}

/// Refuses a model whose embedding cannot hold every id of the data (`vocab_size` ids, and the
/// special ids it records), before libtorch meets an out-of-range index deep inside a step.
pub fn check_vocabulary(cfg: &Config, vocab_size: u32, special: &[(&str, u32)], source: &str) -> Result<()> {
    let model = cfg.model.vocab_size;
    ensure!(
        vocab_size as usize <= model,
        "model.vocab_size ({model}) is smaller than the vocabulary of {source} ({vocab_size} ids): \
         token ids up to {} would index past the embedding; set model.vocab_size to at least \
         {vocab_size} (plus one for a [MASK] id after the tokenizer's ids, as GPT-2's 50257 + 1)",
        vocab_size - 1
    );
    for (name, id) in special {
        ensure!((*id as usize) < model, "{source}: the {name} id {id} is not below model.vocab_size ({model})");
    }
    Ok(())
}
