//! Sampling throughput on CPU: the KV-cache sampler against recomputing the window.
//!
//!     cargo bench -p bd3-trainer --bench sample_throughput --profile dev -- [CONFIG[:TOKENS[:L′]] ...]
//!
//! For each config (context 1024) and block size L′ ∈ {4, 16}: generates one sequence of TOKENS
//! tokens (default 1024) with first-hitting, without the cache (the baseline) and with it, from the
//! same random weights and seed, and prints tokens/s, NFE and the ratio measured in the same run.

use std::path::PathBuf;

use anyhow::{ensure, Result};
use tch::{nn, Device};
use trainer::config::Config;
use trainer::model::Dit;
use trainer::sample::{generate, SampleOptions};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    // CONFIG[:TOKENS[:L′]] — all block sizes (4 and 16) unless one is named.
    let runs: Vec<(String, usize, Vec<usize>)> = if args.is_empty() {
        vec![("tiny".into(), 1024, vec![4, 16]), ("small".into(), 1024, vec![4, 16])]
    } else {
        args.iter()
            .map(|a| {
                let mut parts = a.split(':');
                let name = parts.next().unwrap_or_default().to_string();
                let tokens = parts.next().map_or(Ok(1024), str::parse)?;
                let blocks = parts.next().map_or(Ok(vec![4, 16]), |b| b.parse().map(|b| vec![b]))?;
                Ok((name, tokens, blocks))
            })
            .collect::<Result<_>>()?
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    trainer::device::keep_freed_memory_for_reuse(true);
    println!("threads: {}", tch::get_num_threads());
    println!("| config | tokens | L′ | KV cache | NFE | tokens/s | ratio |");
    println!("|---|---|---|---|---|---|---|");
    for (name, tokens, blocks) in runs {
        for block_size in blocks {
            let sets = ["model.seq_len=1024".to_string(), format!("diffusion.block_size={block_size}")];
            let cfg = Config::load(&root.join(format!("configs/{name}.toml")), &sets)?;
            tch::manual_seed(0);
            let mut vs = nn::VarStore::new(Device::Cpu);
            let model = Dit::build(&mut vs, &cfg.model)?;
            // Zero-initialized adaLN and output layers would give uniform predictions, whose
            // nucleus is the whole vocabulary. Draw the output projection so that logits have a
            // standard deviation of about 3, as peaked as a trained model's: the host-side
            // sampling cost is then what it is in use, for the cached and uncached path alike.
            let logit_std = 3.0 / (cfg.model.hidden as f64).sqrt();
            tch::no_grad(|| {
                for (name, mut t) in vs.variables() {
                    if name.contains("adaLN") {
                        let _ = t.normal_(0.0, 0.02);
                    } else if name.contains("output_layer.linear") {
                        let _ = t.normal_(0.0, logit_std);
                    }
                }
            });
            let mut baseline = None;
            for kv_cache in [false, true] {
                let opts = SampleOptions { kv_cache, ..SampleOptions::from_config(&cfg, tokens) };
                let g = generate(&model, &cfg, &opts, Device::Cpu)?;
                ensure!(g.samples[0].tokens.len() == tokens, "generated {} tokens", g.samples[0].tokens.len());
                let tps = g.tokens_per_s();
                let base = *baseline.get_or_insert(tps);
                println!(
                    "| {name} | {tokens} | {block_size} | {} | {} | {tps:.1} | {:.2}× |",
                    if kv_cache { "yes" } else { "no (baseline)" },
                    g.nfe,
                    tps / base
                );
            }
        }
    }
    Ok(())
}
