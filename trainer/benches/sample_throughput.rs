//! Sampling throughput on CPU: the KV-cache sampler against recomputing the window.
//!
//!     cargo bench -p bd3-trainer --bench sample_throughput --profile dev -- [tiny[:TOKENS]] [small[:TOKENS]]
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
    let runs: Vec<(String, usize)> = if args.is_empty() {
        vec![("tiny".into(), 1024), ("small".into(), 1024)]
    } else {
        args.iter()
            .map(|a| match a.split_once(':') {
                Some((name, n)) => Ok((name.to_string(), n.parse()?)),
                None => Ok((a.clone(), 1024)),
            })
            .collect::<Result<_>>()?
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    trainer::train::keep_freed_memory_for_reuse(true);
    println!("threads: {}", tch::get_num_threads());
    println!("| config | tokens | L′ | KV cache | NFE | tokens/s | ratio |");
    println!("|---|---|---|---|---|---|---|");
    for (name, tokens) in runs {
        for block_size in [4usize, 16] {
            let sets = ["model.seq_len=1024".to_string(), format!("diffusion.block_size={block_size}")];
            let cfg = Config::load(&root.join(format!("configs/{name}.toml")), &sets)?;
            tch::manual_seed(0);
            let vs = nn::VarStore::new(Device::Cpu);
            let model = Dit::new(&vs.root(), &cfg.model)?;
            // Zero-initialized adaLN and output layers would give uniform predictions: perturb them.
            tch::no_grad(|| {
                for (name, mut t) in vs.variables() {
                    if name.contains("adaLN") || name.contains("output_layer.linear") {
                        let _ = t.normal_(0.0, 0.02);
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
