//! `bd3 prepare`: text corpora → tokenized Parquet shards + `index.json`.
//!
//! Input is one file or a directory / object-store prefix of them, taken in path order:
//! `*.txt` (one document per file), `*.jsonl` (one JSON object per line, the document in a text
//! field) and `*.parquet` (one document per row of a string column, as in the public OpenWebText
//! export). Documents are tokenized on all cores with GPT-2 BPE (or the HuggingFace
//! `tokenizer.json` of `tokenizer`, copied beside `index.json`), EOS is appended to each, and
//! the stream is cut into sequences (docs/algorithm.md §7's "wrap"; optionally BOS…EOS around pieces of L−2).
//! The last `valid_documents` documents form the validation split.
//!
//! Re-running after a crash continues: every shard is written whole in one atomic put, and then
//! a journal (`_prepare/progress.json`) records it with the input position after it. A re-run
//! with the same input and settings skips the recorded shards (re-reading, but not re-tokenizing,
//! the input before the position); a shard written but not yet recorded is written again with
//! the same bytes. The output is a pure function of input and settings.

use std::collections::{BTreeMap, VecDeque};
use std::sync::mpsc::sync_channel;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use arrow_array::{Array, LargeStringArray, StringArray, StringViewArray};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::ObjectStoreExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::runtime::Runtime;

use crate::manifest::{Manifest, ShardInfo, Split, SplitName, TokenizerSpecialIds, FORMAT, MANIFEST_NAME};
use crate::shard::{self, hex};
use crate::store::{self, StoreUrl};
use crate::tokenizer::{SpecialTokens, TextTokenizer};

const JOURNAL: &str = "_prepare/progress.json";
/// The copy of a `tokenizer.json` in the output, named by `index.json`.
const TOKENIZER_COPY: &str = "tokenizer.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Framing {
    /// Plain pieces of `seq_len` tokens.
    Wrap,
    /// BOS, `seq_len − 2` tokens, EOS (the reference's `insert_special_tokens`).
    BosEos,
    /// No packing: every document alone in one sequence, BOS first, cut to `seq_len` (keeping
    /// its EOS last) and filled up with the tokenizer's padding token (LM1B without sentence
    /// packing). Needs a tokenizer with a padding token.
    Pad,
}

#[derive(Debug, Clone)]
pub struct PrepareConfig {
    /// A file, a directory or an object-store prefix.
    pub input: String,
    /// Directory or object-store prefix for the shards and `index.json`.
    pub output: String,
    pub seq_len: usize,
    pub valid_documents: u64,
    /// The JSONL field or Parquet column holding the text.
    pub text_field: String,
    pub framing: Framing,
    pub shard_sequences: usize,
    pub row_group_sequences: usize,
    /// Tokenizer threads; 0 = all cores.
    pub threads: usize,
    /// A HuggingFace `tokenizer.json` to tokenize with instead of GPT-2 BPE, and which of its
    /// tokens are BOS, EOS, mask and padding (unset: the usual names, `[CLS]`, `[SEP]`, …).
    pub tokenizer: Option<std::path::PathBuf>,
    pub special_tokens: SpecialTokens,
    /// The command line, recorded in the manifest.
    pub command: String,
    /// Object-store options for input and output, over what the environment says.
    pub store_options: Vec<(String, String)>,
    /// Draw a progress bar (it hides itself when stderr is not a terminal).
    pub progress: bool,
    /// Stop with an error right after writing this many shards, as a crash there would: for
    /// testing that a re-run continues.
    pub fail_after_shards: Option<usize>,
}

impl PrepareConfig {
    pub fn new(input: &str, output: &str, seq_len: usize) -> Self {
        let row_group_sequences = ((1 << 20) / seq_len.max(1)).max(1);
        Self {
            input: input.to_string(),
            output: output.to_string(),
            seq_len,
            valid_documents: 0,
            text_field: "text".to_string(),
            framing: Framing::Wrap,
            // About 1M tokens (≈ 1.5 MB) per row group and 16 row groups (≈ 25 MB) per shard:
            // prepare holds two shards of u32 tokens in memory (one filling, one being written).
            shard_sequences: 16 * row_group_sequences,
            row_group_sequences,
            threads: 0,
            tokenizer: None,
            special_tokens: SpecialTokens::default(),
            command: String::new(),
            store_options: Vec::new(),
            progress: true,
            fail_after_shards: None,
        }
    }

    fn check(&self) -> Result<()> {
        let min = match self.framing {
            Framing::Wrap => 1,
            Framing::Pad => 2,
            Framing::BosEos => 3,
        };
        ensure!(self.seq_len >= min, "sequence length {} is too short for {:?} framing", self.seq_len, self.framing);
        ensure!(self.row_group_sequences > 0, "row groups must hold at least one sequence");
        ensure!(
            self.shard_sequences > 0 && self.shard_sequences % self.row_group_sequences == 0,
            "sequences per shard ({}) must be a positive multiple of sequences per row group ({})",
            self.shard_sequences,
            self.row_group_sequences
        );
        Ok(())
    }
}

/// What `prepare` wrote.
#[derive(Debug, Clone)]
pub struct PrepareSummary {
    pub manifest: Manifest,
    /// Shards found complete from an earlier run and not written again.
    pub resumed_shards: usize,
    pub text_bytes: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    JsonLines,
    Parquet,
}

fn format_of(name: &str) -> Option<Format> {
    let ext = name.rsplit('.').next()?.to_ascii_lowercase();
    match ext.as_str() {
        "txt" => Some(Format::Text),
        "jsonl" => Some(Format::JsonLines),
        "parquet" => Some(Format::Parquet),
        _ => None,
    }
}

struct InputFile {
    path: Path,
    name: String,
    size: u64,
    format: Format,
    documents: u64,
}

/// Journal of a run in progress: its settings and the shards done so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Journal {
    fingerprint: String,
    train: Vec<ShardInfo>,
    valid: Vec<ShardInfo>,
    /// Where the input continues after the last recorded shard.
    position: Position,
    complete: bool,
}

/// The next token to pack: document `doc` (global index), skipping its first `offset` tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Position {
    doc: u64,
    offset: u64,
}

/// Tokenizes `config.input` into shards and a manifest under `config.output`.
pub fn prepare(config: &PrepareConfig) -> Result<PrepareSummary> {
    config.check()?;
    let started = Instant::now();
    let tokenizer = TextTokenizer::load(config.tokenizer.as_deref(), &config.special_tokens)?;
    let tokenizer_bytes = match &config.tokenizer {
        Some(path) => Some(std::fs::read(path).with_context(|| format!("reading tokenizer {}", path.display()))?),
        None => None,
    };
    let rt = storage::runtime();
    let (input, names) = rt.block_on(list_input(config))?;
    let out = store::open_with_options(&config.output, config.store_options.clone())?;
    let files = rt.block_on(count_documents(&input, names, &config.text_field))?;
    let total_docs: u64 = files.iter().map(|f| f.documents).sum();
    ensure!(
        config.valid_documents < total_docs,
        "input {} holds {total_docs} documents: cannot hold out {} for validation and still train",
        config.input,
        config.valid_documents
    );
    let fingerprint = fingerprint(config, &files, tokenizer_bytes.as_deref(), &tokenizer.special_ids());
    let journal = rt.block_on(read_journal(&out))?;
    let journal = match journal {
        Some(j) if j.fingerprint != fingerprint => bail!(
            "output {} holds a prepare of other input or settings ({}): remove it or choose another output",
            config.output,
            out.display(JOURNAL)
        ),
        Some(j) => j,
        None => Journal { fingerprint, ..Default::default() },
    };
    let resumed_shards = journal.train.len() + journal.valid.len();
    if journal.complete {
        let manifest = rt.block_on(Manifest::load(&out))?;
        // "Nothing to do" only once every shard still matches the index.
        rt.block_on(verify_shards(&out, &manifest)).with_context(|| {
            format!(
                "output {} was prepared before but no longer matches its {MANIFEST_NAME}: remove the output and run bd3 prepare again",
                config.output
            )
        })?;
        tracing::info!(output = %config.output, "already prepared and every shard verified; nothing to do");
        return Ok(PrepareSummary {
            manifest,
            resumed_shards,
            text_bytes: 0,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    if resumed_shards > 0 {
        tracing::info!(shards = resumed_shards, "continuing an interrupted prepare");
    }
    let train_docs = total_docs - config.valid_documents;
    let special = tokenizer.special_ids();
    ensure!(
        config.framing != Framing::Pad || special.pad.is_some(),
        "framing `pad` needs a tokenizer with a padding token ([PAD] or <pad>; --pad-token names another), \
         and {} has none",
        tokenizer.name()
    );
    let mut packer = Packer::new(config, rt, &out, journal, train_docs, &special);
    let text_bytes = run_pipeline(config, rt, &input, &files, &mut packer, &tokenizer)?;
    let journal = packer.finish()?;
    let split = |shards: Vec<ShardInfo>, documents: u64| {
        let sequences = shards.iter().map(|s| s.sequences).sum::<u64>();
        Split { documents, sequences, tokens: sequences * config.seq_len as u64, shards }
    };
    let manifest = Manifest {
        format: FORMAT.to_string(),
        tokenizer: tokenizer.name(),
        vocab_size: tokenizer.vocab_size(),
        special_ids: special.clone(),
        seq_len: config.seq_len,
        framing: match config.framing {
            Framing::Wrap => "wrap",
            Framing::BosEos => "bos_eos",
            Framing::Pad => "pad",
        }
        .to_string(),
        row_group_sequences: config.row_group_sequences,
        command: config.command.clone(),
        tokenizer_file: tokenizer_bytes.is_some().then(|| TOKENIZER_COPY.to_string()),
        train: split(journal.train.clone(), train_docs),
        valid: split(journal.valid.clone(), config.valid_documents),
    };
    ensure!(
        manifest.train.sequences > 0,
        "input {}: the training split is shorter than one sequence of {} tokens",
        config.input,
        config.seq_len
    );
    rt.block_on(async {
        // The tokenizer first: a data set whose index.json exists is complete.
        if let Some(bytes) = tokenizer_bytes {
            out.put(TOKENIZER_COPY, vec![bytes.into()]).await?;
        }
        out.put(MANIFEST_NAME, vec![manifest.to_json().into()]).await?;
        write_journal(&out, &Journal { complete: true, ..journal }).await
    })?;
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        train_sequences = manifest.train.sequences,
        valid_sequences = manifest.valid.sequences,
        mb_per_s = format!("{:.1}", text_bytes as f64 / 1e6 / seconds.max(1e-9)),
        "prepared {}",
        out.display(MANIFEST_NAME)
    );
    Ok(PrepareSummary { manifest, resumed_shards, text_bytes, seconds })
}

/// The input store and the objects to read, in path order.
async fn list_input(config: &PrepareConfig) -> Result<(StoreUrl, Vec<(Path, u64)>)> {
    let url = &config.input;
    let local = !url.contains("://") || url.starts_with("file://");
    if local {
        let path = std::path::PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
        let meta = std::fs::metadata(&path).with_context(|| format!("reading input {url}"))?;
        if meta.is_file() {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
            let dir = store::open(parent.to_str().with_context(|| format!("input path {url} is not UTF-8"))?)?;
            let name =
                path.file_name().and_then(|n| n.to_str()).with_context(|| format!("input path {url} is not UTF-8"))?;
            return Ok((dir.clone(), vec![(dir.child(name), meta.len())]));
        }
    }
    let dir = store::open_with_options(url, config.store_options.clone())?;
    if !local {
        if let Ok(meta) = dir.store.head(&dir.prefix).await {
            return Ok((dir.clone(), vec![(meta.location, meta.size)]));
        }
    }
    let mut objects: Vec<(Path, u64)> = dir
        .store
        .list(Some(&dir.prefix))
        .map_ok(|m| (m.location, m.size))
        .try_collect()
        .await
        .with_context(|| format!("listing input {url}"))?;
    objects.sort();
    let before = objects.len();
    objects.retain(|(p, _)| format_of(p.as_ref()).is_some());
    if before > objects.len() {
        tracing::warn!(
            skipped = before - objects.len(),
            "input files that are not .txt, .jsonl or .parquet are skipped"
        );
    }
    ensure!(!objects.is_empty(), "input {url} holds no .txt, .jsonl or .parquet files");
    Ok((dir, objects))
}

async fn fetch(input: &StoreUrl, path: &Path) -> Result<Bytes> {
    let name = path.to_string();
    input
        .store
        .get(path)
        .await
        .with_context(|| format!("reading {name}"))?
        .bytes()
        .await
        .with_context(|| format!("reading {name}"))
}

/// Documents per file, to know where the validation split starts before tokenizing.
async fn count_documents(input: &StoreUrl, names: Vec<(Path, u64)>, field: &str) -> Result<Vec<InputFile>> {
    let mut files = Vec::with_capacity(names.len());
    for (path, size) in names {
        let name = path.to_string();
        let format = format_of(&name)
            .with_context(|| format!("{name}: unknown input format (expected .txt, .jsonl or .parquet)"))?;
        let documents = match format {
            Format::Text => 1,
            Format::JsonLines => {
                let bytes = fetch(input, &path).await?;
                bytes.split(|&b| b == b'\n').filter(|l| !l.trim_ascii().is_empty()).count() as u64
            }
            Format::Parquet => {
                // The footer says how many rows there are; reading it costs two small ranged reads.
                let tail = input
                    .store
                    .get_range(&path, size.saturating_sub(8)..size)
                    .await
                    .with_context(|| format!("reading {name}"))?;
                let len = shard::footer_len(&tail)
                    .with_context(|| format!("{name}: not a Parquet file (no PAR1 magic at its end)"))?;
                let tail = input
                    .store
                    .get_range(&path, size.saturating_sub(len as u64 + 8)..size)
                    .await
                    .with_context(|| format!("reading {name}"))?;
                let meta = parquet::file::metadata::ParquetMetaDataReader::decode_metadata(&tail[..tail.len() - 8])
                    .with_context(|| format!("{name}: reading the Parquet footer"))?;
                ensure!(
                    meta.file_metadata().schema_descr().columns().iter().any(|c| c.path().string() == field),
                    "{name}: no column `{field}` (expected the text of one document per row)"
                );
                meta.file_metadata().num_rows() as u64
            }
        };
        files.push(InputFile { path, name, size, format, documents });
    }
    Ok(files)
}

fn fingerprint(
    config: &PrepareConfig,
    files: &[InputFile],
    tokenizer: Option<&[u8]>,
    special: &TokenizerSpecialIds,
) -> String {
    let mut h = Sha256::new();
    let settings = (
        config.seq_len,
        config.valid_documents,
        &config.text_field,
        config.framing,
        config.shard_sequences,
        config.row_group_sequences,
    );
    h.update(serde_json::to_vec(&settings).expect("plain values serialize"));
    // GPT-2 adds nothing, so the fingerprints of GPT-2 prepares stay what they were.
    if let Some(bytes) = tokenizer {
        h.update(Sha256::digest(bytes));
        h.update(serde_json::to_vec(special).expect("plain values serialize"));
    }
    for f in files {
        h.update(format!("\n{}\t{}\t{}", f.name, f.size, f.documents));
    }
    hex(&h.finalize())
}

async fn read_journal(out: &StoreUrl) -> Result<Option<Journal>> {
    let Some(bytes) = out.get_opt(JOURNAL).await? else { return Ok(None) };
    Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", out.display(JOURNAL)))?))
}

async fn write_journal(out: &StoreUrl, journal: &Journal) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(journal).expect("a journal serializes");
    out.put(JOURNAL, vec![bytes.into()]).await
}

/// A run of consecutive documents, numbered from `first`, with what they weigh in the input.
struct DocBatch {
    index: u64,
    first: u64,
    docs: Vec<String>,
    /// Input bytes these documents stand for (for progress).
    input_bytes: u64,
}

/// Text per tokenizer task: large enough to keep threads busy, small enough to bound memory.
const BATCH_TEXT_BYTES: usize = 1 << 20;

/// Reads documents (one thread), tokenizes them (all cores) and packs them in input order.
fn run_pipeline(
    config: &PrepareConfig,
    rt: &Runtime,
    input: &StoreUrl,
    files: &[InputFile],
    packer: &mut Packer,
    tokenizer: &TextTokenizer,
) -> Result<u64> {
    let threads =
        if config.threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { config.threads };
    let eos = tokenizer.special_ids().eos;
    let start_doc = packer.position.doc;
    let progress = Progress::new(config.progress, files.iter().map(|f| f.size).sum());
    let (batch_tx, batch_rx) = sync_channel::<DocBatch>(threads * 2);
    let batch_rx = Mutex::new(batch_rx);
    let (tok_tx, tok_rx) = sync_channel::<Result<(u64, u64, Vec<Vec<u32>>, u64, u64)>>(threads * 2);
    std::thread::scope(|scope| -> Result<u64> {
        let reader = scope.spawn(move || read_documents(rt, input, files, start_doc, &config.text_field, batch_tx));
        for _ in 0..threads {
            let (rx, tx) = (&batch_rx, tok_tx.clone());
            scope.spawn(move || loop {
                let Ok(batch) = rx.lock().unwrap_or_else(|e| e.into_inner()).recv() else { return };
                let text: u64 = batch.docs.iter().map(|d| d.len() as u64).sum();
                let ids: Result<Vec<Vec<u32>>> = batch
                    .docs
                    .iter()
                    .map(|d| {
                        let mut ids = tokenizer.encode(d)?;
                        ids.push(eos);
                        Ok(ids)
                    })
                    .collect();
                let item = ids.map(|ids| (batch.index, batch.first, ids, text, batch.input_bytes));
                if tx.send(item).is_err() {
                    return;
                }
            });
        }
        drop(tok_tx);
        // Batches finish out of order; pack them in order.
        let mut pending = BTreeMap::new();
        let (mut next, mut text_bytes) = (0u64, 0u64);
        let packed = (|| -> Result<()> {
            for item in tok_rx.iter() {
                let item = item?;
                pending.insert(item.0, item);
                while let Some((_, first, docs, text, weight)) = pending.remove(&next) {
                    packer.push_documents(first, docs)?;
                    text_bytes += text;
                    progress.advance(weight, text_bytes);
                    next += 1;
                }
            }
            Ok(())
        })();
        // On a packing error, dropping the receiver stops the tokenizers and then the reader.
        drop(tok_rx);
        let read = reader.join().map_err(|_| anyhow!("the input reader thread panicked"))?;
        packed?;
        read?;
        progress.finish(text_bytes);
        Ok(text_bytes)
    })
}

/// Sends the documents from global index `start_doc` on, in batches.
fn read_documents(
    rt: &Runtime,
    input: &StoreUrl,
    files: &[InputFile],
    start_doc: u64,
    field: &str,
    tx: std::sync::mpsc::SyncSender<DocBatch>,
) -> Result<()> {
    let mut first = 0u64;
    let mut index = 0u64;
    for file in files {
        if first + file.documents <= start_doc {
            first += file.documents; // done in an earlier run
            continue;
        }
        let bytes = rt.block_on(fetch(input, &file.path))?;
        let docs = documents(file, bytes, field)?;
        ensure!(
            docs.len() as u64 == file.documents,
            "{} changed while being read: {} documents, counted {} before",
            file.name,
            docs.len(),
            file.documents
        );
        let text: u64 = docs.iter().map(|d| d.len() as u64).sum::<u64>().max(1);
        let mut batch = Vec::new();
        let mut batch_text = 0usize;
        let mut batch_first = first;
        for (i, doc) in docs.into_iter().enumerate() {
            let global = first + i as u64;
            if global < start_doc {
                batch_first = global + 1;
                continue;
            }
            batch_text += doc.len();
            batch.push(doc);
            if batch_text >= BATCH_TEXT_BYTES {
                let weight = file.size * batch_text as u64 / text;
                let docs = std::mem::take(&mut batch);
                if tx.send(DocBatch { index, first: batch_first, docs, input_bytes: weight }).is_err() {
                    return Ok(()); // packing failed; its error is reported
                }
                index += 1;
                batch_first = global + 1;
                batch_text = 0;
            }
        }
        if !batch.is_empty() {
            let weight = file.size * batch_text as u64 / text;
            if tx.send(DocBatch { index, first: batch_first, docs: batch, input_bytes: weight }).is_err() {
                return Ok(());
            }
            index += 1;
        }
        first += file.documents;
    }
    Ok(())
}

/// The documents of one input file.
fn documents(file: &InputFile, bytes: Bytes, field: &str) -> Result<Vec<String>> {
    let name = &file.name;
    match file.format {
        // Gutenberg-style texts carry the odd Latin-1 byte: keep the document, replace the byte.
        Format::Text => Ok(vec![String::from_utf8_lossy(&bytes).into_owned()]),
        Format::JsonLines => bytes
            .split(|&b| b == b'\n')
            .enumerate()
            .filter(|(_, l)| !l.trim_ascii().is_empty())
            .map(|(i, line)| {
                let value: serde_json::Value =
                    serde_json::from_slice(line).with_context(|| format!("{name}, line {}: not valid JSON", i + 1))?;
                match value.get(field) {
                    Some(serde_json::Value::String(s)) => Ok(s.clone()),
                    _ => bail!("{name}, line {}: expected an object with a string field `{field}`", i + 1),
                }
            })
            .collect(),
        Format::Parquet => {
            let builder =
                ParquetRecordBatchReaderBuilder::try_new(bytes).with_context(|| format!("{name}: reading Parquet"))?;
            let schema = builder.parquet_schema();
            let column = schema
                .columns()
                .iter()
                .position(|c| c.path().string() == field)
                .with_context(|| format!("{name}: no column `{field}`"))?;
            let mask = ProjectionMask::leaves(schema, [column]);
            let reader = builder.with_projection(mask).build().with_context(|| format!("{name}: reading Parquet"))?;
            let mut docs = Vec::new();
            for batch in reader {
                let batch = batch.with_context(|| format!("{name}: decoding column `{field}`"))?;
                let array = batch.column(0);
                let offset = docs.len();
                let mut push = |i: usize, s: Option<&str>| -> Result<()> {
                    let s = s.with_context(|| format!("{name}, row {}: column `{field}` is null", offset + i))?;
                    docs.push(s.to_string());
                    Ok(())
                };
                if let Some(a) = array.as_any().downcast_ref::<StringArray>() {
                    a.iter().enumerate().try_for_each(|(i, s)| push(i, s))?;
                } else if let Some(a) = array.as_any().downcast_ref::<LargeStringArray>() {
                    a.iter().enumerate().try_for_each(|(i, s)| push(i, s))?;
                } else if let Some(a) = array.as_any().downcast_ref::<StringViewArray>() {
                    a.iter().enumerate().try_for_each(|(i, s)| push(i, s))?;
                } else {
                    bail!("{name}: column `{field}` is {}, expected strings", array.data_type());
                }
            }
            Ok(docs)
        }
    }
}

/// Cuts the token stream into sequences and shards, and records each shard in the journal.
struct Packer<'a> {
    config: &'a PrepareConfig,
    writer: ShardWriter,
    train_docs: u64,
    /// The split of the documents being packed.
    split: SplitName,
    /// Where `buffer` starts in the input.
    position: Position,
    /// Tokens not yet cut into sequences, and the documents they come from:
    /// (document, offset of its first buffered token, tokens buffered).
    buffer: Vec<u32>,
    docs: VecDeque<(u64, u64, u64)>,
    /// The document after the last one pushed.
    next_doc: u64,
    /// Sequences for the next shard.
    sequences: Vec<u32>,
    /// The tokenizer's BOS and EOS (`bos-eos` framing).
    bos: u32,
    eos: u32,
    /// The padding token (`pad` framing).
    pad: Option<u32>,
}

impl<'a> Packer<'a> {
    fn new(
        config: &'a PrepareConfig,
        rt: &Runtime,
        out: &StoreUrl,
        journal: Journal,
        train_docs: u64,
        special: &TokenizerSpecialIds,
    ) -> Self {
        let position = journal.position;
        let split = if position.doc < train_docs { SplitName::Train } else { SplitName::Valid };
        Self {
            config,
            writer: ShardWriter::start(config, rt, out, journal),
            train_docs,
            split,
            position,
            buffer: Vec::new(),
            docs: VecDeque::new(),
            next_doc: position.doc,
            sequences: Vec::new(),
            bos: special.bos,
            eos: special.eos,
            pad: special.pad,
        }
    }

    fn piece_len(&self) -> usize {
        match self.config.framing {
            Framing::Wrap | Framing::Pad => self.config.seq_len,
            Framing::BosEos => self.config.seq_len - 2,
        }
    }

    /// `pad` framing: document `doc` (EOS appended) alone in one sequence after BOS, cut to
    /// `seq_len` with its EOS kept last, then padded. Shards end between documents.
    fn pad_document(&mut self, doc: u64, mut ids: Vec<u32>) -> Result<()> {
        let (seq_len, pad) = (self.config.seq_len, self.pad.context("pad framing without a padding id")?);
        if ids.len() > seq_len - 1 {
            ids.truncate(seq_len - 2);
            ids.push(self.eos);
        }
        let start = self.sequences.len();
        self.sequences.push(self.bos);
        self.sequences.extend_from_slice(&ids);
        self.sequences.resize(start + seq_len, pad);
        self.next_doc = doc + 1;
        self.position = Position { doc: doc + 1, offset: 0 };
        if self.sequences.len() == self.config.shard_sequences * seq_len {
            self.write_shard()?;
        }
        Ok(())
    }

    /// Documents `first`, `first + 1`, … tokenized (EOS appended).
    fn push_documents(&mut self, first: u64, docs: Vec<Vec<u32>>) -> Result<()> {
        for (i, mut ids) in docs.into_iter().enumerate() {
            let doc = first + i as u64;
            if doc < self.position.doc {
                continue;
            }
            if doc == self.train_docs && self.split == SplitName::Train {
                self.end_train()?;
            }
            if self.config.framing == Framing::Pad {
                self.pad_document(doc, ids)?;
                continue;
            }
            let mut offset = 0;
            if doc == self.position.doc && self.docs.is_empty() {
                // Resuming inside this document: its first tokens are in a recorded shard.
                offset = self.position.offset.min(ids.len() as u64);
                ids.drain(..offset as usize);
            }
            self.docs.push_back((doc, offset, ids.len() as u64));
            self.next_doc = doc + 1;
            self.buffer.extend_from_slice(&ids);
            self.cut()?;
        }
        Ok(())
    }

    /// Moves whole pieces from the buffer into sequences, writing shards as they fill.
    fn cut(&mut self) -> Result<()> {
        let piece = self.piece_len();
        let mut at = 0;
        while self.buffer.len() - at >= piece {
            let tokens = &self.buffer[at..at + piece];
            match self.config.framing {
                Framing::Wrap | Framing::Pad => self.sequences.extend_from_slice(tokens),
                Framing::BosEos => {
                    self.sequences.push(self.bos);
                    self.sequences.extend_from_slice(tokens);
                    self.sequences.push(self.eos);
                }
            }
            at += piece;
            if self.sequences.len() == self.config.shard_sequences * self.config.seq_len {
                self.consume(at);
                at = 0;
                self.write_shard()?;
            }
        }
        self.consume(at);
        Ok(())
    }

    /// Drops the first `n` buffered tokens (now in sequences) and moves `position` past them.
    fn consume(&mut self, n: usize) {
        self.buffer.drain(..n);
        let mut n = n as u64;
        while let Some(front) = self.docs.front_mut() {
            if n < front.2 {
                front.1 += n;
                front.2 -= n;
                break;
            }
            n -= front.2;
            self.docs.pop_front();
        }
        self.position = match self.docs.front() {
            Some(&(doc, offset, _)) => Position { doc, offset },
            None => Position { doc: self.next_doc, offset: 0 },
        };
    }

    /// Hands the sequences gathered so far to the writer as the next shard of the current split.
    fn write_shard(&mut self) -> Result<()> {
        if self.sequences.is_empty() {
            return Ok(());
        }
        let capacity = self.sequences.capacity();
        let sequences = std::mem::replace(&mut self.sequences, Vec::with_capacity(capacity));
        self.writer.write(self.split, sequences, self.position)
    }

    /// Ends the training split before document `train_docs`: the tokens that do not fill a
    /// last piece are dropped, as the reference drops the remainder.
    fn end_train(&mut self) -> Result<()> {
        self.buffer.clear();
        self.docs.clear();
        self.position = Position { doc: self.train_docs, offset: 0 };
        self.write_shard()?;
        self.split = SplitName::Valid;
        Ok(())
    }

    fn finish(mut self) -> Result<Journal> {
        if self.split == SplitName::Train {
            self.end_train()?;
        }
        self.buffer.clear();
        self.docs.clear();
        self.position = Position { doc: self.train_docs + self.config.valid_documents, offset: 0 };
        self.write_shard()?;
        self.writer.finish()
    }
}

struct ShardJob {
    split: SplitName,
    name: String,
    sequences: Vec<u32>,
    /// The input position after these sequences, for the journal.
    position: Position,
}

/// Encodes and writes shards on a thread of its own, in order, so that packing and tokenizing
/// go on meanwhile, and records each written shard in the journal.
struct ShardWriter {
    tx: Option<std::sync::mpsc::SyncSender<ShardJob>>,
    thread: Option<std::thread::JoinHandle<Result<Journal>>>,
    /// Shards of each split handed over so far (train, valid).
    counts: [usize; 2],
}

impl ShardWriter {
    fn start(config: &PrepareConfig, rt: &Runtime, out: &StoreUrl, journal: Journal) -> Self {
        // A rendezvous channel: one shard being written, one being filled, no more in memory.
        let (tx, rx) = sync_channel::<ShardJob>(0);
        let counts = [journal.train.len(), journal.valid.len()];
        let (seq_len, group, fail_after) = (config.seq_len, config.row_group_sequences, config.fail_after_shards);
        let (rt, out) = (rt.handle().clone(), out.clone());
        let thread = std::thread::spawn(move || -> Result<Journal> {
            let mut journal = journal;
            for job in rx {
                let (bytes, info) = shard::encode_with_info(&job.sequences, seq_len, group, &job.name)?;
                drop(job.sequences);
                // One put: the shard appears whole or not at all (a local file is renamed into place).
                rt.block_on(out.put(&job.name, vec![bytes.into()]))?;
                match job.split {
                    SplitName::Train => journal.train.push(info),
                    SplitName::Valid => journal.valid.push(info),
                }
                journal.position = job.position;
                rt.block_on(write_journal(&out, &journal))?;
                tracing::debug!(shard = %job.name, "wrote");
                let written = journal.train.len() + journal.valid.len();
                if fail_after.is_some_and(|n| written >= n) {
                    bail!("stopping after {written} shards as asked (fail_after_shards)");
                }
            }
            Ok(journal)
        });
        Self { tx: Some(tx), thread: Some(thread), counts }
    }

    fn write(&mut self, split: SplitName, sequences: Vec<u32>, position: Position) -> Result<()> {
        let (count, prefix) = match split {
            SplitName::Train => (&mut self.counts[0], "train"),
            SplitName::Valid => (&mut self.counts[1], "valid"),
        };
        let name = format!("{prefix}-{:05}.parquet", *count);
        *count += 1;
        let job = ShardJob { split, name, sequences, position };
        match self.tx.as_ref().map(|tx| tx.send(job)) {
            Some(Ok(())) => Ok(()),
            // The writer stopped: its error says why.
            _ => self.finish().map(|_| ()),
        }
    }

    /// Waits for the last shard and returns the journal.
    fn finish(&mut self) -> Result<Journal> {
        drop(self.tx.take());
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => bail!("the shard writer thread panicked"),
            None => bail!("the shard writer has already stopped"),
        }
    }
}

/// Progress bar (MB/s, ETA) plus a log line every 10 s for when stderr is not a terminal.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    done: std::cell::Cell<u64>,
    started: Instant,
    last_log: std::cell::Cell<Instant>,
}

impl Progress {
    fn new(show: bool, total: u64) -> Self {
        let bar = show.then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} of input, {msg}, ETA {eta}")
                    .expect("a valid template"),
            );
            bar
        });
        Self { bar, total, done: 0.into(), started: Instant::now(), last_log: Instant::now().into() }
    }

    fn advance(&self, input_bytes: u64, text_bytes: u64) {
        self.done.set(self.done.get() + input_bytes);
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let rate = text_bytes as f64 / 1e6 / secs;
        if let Some(bar) = &self.bar {
            bar.set_position(self.done.get());
            bar.set_message(format!("{rate:.1} MB/s of text"));
        }
        if self.last_log.get().elapsed() >= Duration::from_secs(10) {
            self.last_log.set(Instant::now());
            let frac = self.done.get() as f64 / self.total.max(1) as f64;
            let eta = if frac > 0.0 { secs * (1.0 - frac) / frac } else { f64::NAN };
            tracing::info!(
                percent = format!("{:.1}", frac * 100.0),
                mb_per_s = format!("{rate:.1}"),
                eta_s = format!("{eta:.0}"),
                "tokenizing"
            );
        }
    }

    fn finish(&self, text_bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        tracing::info!(
            mb = text_bytes as f64 / 1e6,
            mb_per_s = format!("{:.1}", text_bytes as f64 / 1e6 / secs),
            "tokenized"
        );
    }
}

/// Reads every shard of `url`'s manifest whole and checks its size and SHA-256.
pub fn verify(url: &str, options: Vec<(String, String)>) -> Result<Manifest> {
    let dir = store::open_with_options(url.strip_suffix(MANIFEST_NAME).unwrap_or(url).trim_end_matches('/'), options)?;
    storage::block_on(async {
        let manifest = Manifest::load(&dir).await?;
        verify_shards(&dir, &manifest).await?;
        Ok(manifest)
    })
}

/// Checks every shard's size and SHA-256 against the manifest; the error names the first bad one.
async fn verify_shards(dir: &StoreUrl, manifest: &Manifest) -> Result<()> {
    for info in manifest.train.shards.iter().chain(&manifest.valid.shards) {
        let name = dir.display(&info.path);
        let bytes = dir.get_opt(&info.path).await?.with_context(|| format!("shard {name} is missing"))?;
        ensure!(
            bytes.len() as u64 == info.bytes,
            "shard {name}: {} bytes, the manifest says {}",
            bytes.len(),
            info.bytes
        );
        let sum = hex(&Sha256::digest(&bytes));
        ensure!(sum == info.sha256, "shard {name}: SHA-256 {sum}, the manifest says {}", info.sha256);
    }
    Ok(())
}
