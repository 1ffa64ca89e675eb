//! Data read per step and rank at W = 1, 2 and 3 (data-parallelism issue): the Shakespeare
//! corpus prepared at L = 128 in row groups of 16 sequences, a global batch of 48 sequences,
//! every rank of each world size reading the same 60 steps from local files. Prints a markdown
//! table: row-group bytes per step and rank (bd3-storage's count, footers excluded), and the
//! ratio against one rank reading the whole batch, measured in the same run.
//!
//!   cargo bench -p bd3-dataloader --bench rank_reads

use dataloader::{prepare, PrepareConfig, Reader, ReaderConfig};

const GLOBAL_BATCH: usize = 48;
const STEPS: usize = 60;

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data").display().to_string();
    let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/shakespeare");
    let config = PrepareConfig {
        row_group_sequences: 16,
        shard_sequences: 16 * 16,
        progress: false,
        ..PrepareConfig::new(corpus, &data, 128)
    };
    let summary = prepare(&config)?;
    eprintln!("prepared {summary:?}");
    println!("| ranks | row-group bytes per step, each rank | mean per rank | ratio to 1 rank | all ranks together |");
    println!("|---|---|---|---|---|");
    let mut one_rank = 0.0;
    for world in [1, 2, 3] {
        let per_rank: Vec<f64> = (0..world)
            .map(|rank| -> anyhow::Result<f64> {
                let config = ReaderConfig::new(11, rank, world, GLOBAL_BATCH, GLOBAL_BATCH / world);
                let mut reader = Reader::open(&data, config)?;
                for _ in 0..STEPS {
                    reader.next_batch()?;
                }
                Ok(reader.row_group_bytes_read() as f64 / STEPS as f64)
            })
            .collect::<anyhow::Result<_>>()?;
        let mean = per_rank.iter().sum::<f64>() / world as f64;
        if world == 1 {
            one_rank = mean;
        }
        let each: Vec<String> = per_rank.iter().map(|b| format!("{b:.0}")).collect();
        println!(
            "| {world} | {} | {mean:.0} | {:.3} | {:.3}× |",
            each.join(" / "),
            mean / one_rank,
            mean * world as f64 / one_rank
        );
    }
    Ok(())
}
