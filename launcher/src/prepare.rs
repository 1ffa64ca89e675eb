//! `bd3 prepare`: parsing only; the work is `dataloader::prepare`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use dataloader::{Framing, PrepareConfig, SpecialTokens};

#[derive(Args)]
pub struct PrepareArgs {
    /// The text corpus: a .txt (one document), .jsonl (one per line) or .parquet (one per row)
    /// file, or a directory or object-store prefix of them, read in path order.
    #[arg(long)]
    input: String,
    /// Where the shards and index.json go: a path, or an s3://, gs://, az://, file:// URL.
    #[arg(long)]
    output: String,
    /// Tokens per sequence (L).
    #[arg(long, default_value_t = 1024)]
    seq_len: usize,
    /// Hold out the last N documents as the validation split (OpenWebText: 100000).
    #[arg(long, default_value_t = 0)]
    valid_documents: u64,
    /// The JSONL field or Parquet column with the text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// `wrap`: plain pieces of L tokens; `bos-eos`: BOS, L-2 tokens, EOS (sentence packing);
    /// `pad`: no packing, one document per sequence after BOS, cut to L and padded (needs a
    /// tokenizer with a padding token, such as BERT's [PAD]).
    #[arg(long, value_enum, default_value_t = FramingArg::Wrap)]
    framing: FramingArg,
    /// Sequences per row group (default: about 1M tokens).
    #[arg(long)]
    row_group_sequences: Option<usize>,
    /// Sequences per shard, a multiple of the row group's (default: 16 row groups).
    #[arg(long)]
    shard_sequences: Option<usize>,
    /// Tokenizer threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// A HuggingFace tokenizer.json to tokenize with (e.g. bert-base-uncased's for LM1B) instead
    /// of GPT-2 BPE; it is copied beside index.json, which records its special ids.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// The token of --tokenizer that is BOS (default: the first of [CLS], <s>, [BOS], <bos>,
    /// <|endoftext|> it has).
    #[arg(long, requires = "tokenizer")]
    bos_token: Option<String>,
    /// The EOS token (default: [SEP], </s>, [EOS], <eos> or <|endoftext|>).
    #[arg(long, requires = "tokenizer")]
    eos_token: Option<String>,
    /// The mask token (default: [MASK] or <mask>, if it has one).
    #[arg(long, requires = "tokenizer")]
    mask_token: Option<String>,
    /// The padding token (default: [PAD] or <pad>, if it has one).
    #[arg(long, requires = "tokenizer")]
    pad_token: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum FramingArg {
    Wrap,
    BosEos,
    Pad,
}

pub fn run(args: PrepareArgs) -> Result<()> {
    let mut c = PrepareConfig::new(&args.input, &args.output, args.seq_len);
    if let Some(n) = args.row_group_sequences {
        c.row_group_sequences = n;
        c.shard_sequences = 16 * n;
    }
    c.shard_sequences = args.shard_sequences.unwrap_or(c.shard_sequences);
    c.valid_documents = args.valid_documents;
    c.text_field = args.text_field;
    c.framing = match args.framing {
        FramingArg::Wrap => Framing::Wrap,
        FramingArg::BosEos => Framing::BosEos,
        FramingArg::Pad => Framing::Pad,
    };
    c.threads = args.threads;
    c.tokenizer = args.tokenizer;
    c.special_tokens =
        SpecialTokens { bos: args.bos_token, eos: args.eos_token, mask: args.mask_token, pad: args.pad_token };
    // The program's own path varies between machines; the manifest records `bd3` and the args.
    let words = std::iter::once("bd3".to_string()).chain(std::env::args().skip(1));
    c.command =
        words.map(|a| if a.contains(char::is_whitespace) { format!("{a:?}") } else { a }).collect::<Vec<_>>().join(" ");
    let s = dataloader::prepare(&c)?;
    let m = &s.manifest;
    let ids = &m.special_ids;
    let optional = |id: Option<u32>| id.map_or("none".to_string(), |id| id.to_string());
    let split = format!(
        "{}: {} train and {} validation sequences of {} tokens ({} documents held out); tokenizer {}, \
         {} ids, BOS {} EOS {} mask {} padding {}",
        args.output,
        m.train.sequences,
        m.valid.sequences,
        m.seq_len,
        m.valid.documents,
        m.tokenizer,
        m.vocab_size,
        ids.bos,
        ids.eos,
        optional(ids.mask),
        optional(ids.pad)
    );
    if s.text_bytes == 0 {
        println!("{split}; already prepared, nothing to do");
    } else {
        let mb = s.text_bytes as f64 / 1e6;
        let kept = if s.resumed_shards > 0 {
            format!("; {} shards kept from an earlier run", s.resumed_shards)
        } else {
            String::new()
        };
        println!("{split}; {mb:.1} MB of text in {:.1} s ({:.1} MB/s){kept}", s.seconds, mb / s.seconds.max(1e-9));
    }
    Ok(())
}
