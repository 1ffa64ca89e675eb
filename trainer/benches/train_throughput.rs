//! Training throughput on CPU with the dense-mask attention.
//!
//!     cargo bench -p bd3-trainer --bench train_throughput --profile dev -- [tiny] [small] [--steps N]
//!
//! For each config, times full optimizer steps (noise, forward, backward, clipping, AdamW, EMA)
//! of the two-stream objective with logits at every x_t position (the reference's way, the
//! baseline), with logits only at masked positions (bd3's default), and with freed memory kept
//! in the heap as `bd3 train` does on CPU, on random tokens, and prints tokens/s and the ratio to
//! the baseline measured in the same run.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use tch::{nn, Device, Kind};
use trainer::config::Config;
use trainer::device::keep_freed_memory_for_reuse;
use trainer::diffusion::{tokens_tensor, BlockDiffusion, ClipInterval};
use trainer::model::{num_parameters, Dit};
use trainer::optim::{clip_grad_norm, AdamW, Ema};
use trainer::rng::NoiseRng;
use trainer::stateful::Params;

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    /// Logits at every x_t position, as the reference computes them.
    DenseLogits,
    /// Logits only at masked positions.
    MaskedLogits,
    /// Masked positions, and freed memory kept in the heap (what `bd3 train` does on CPU).
    MaskedLogitsHeapReuse,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let mut steps = 5usize;
    let mut configs = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--steps" => steps = it.next().expect("--steps N").parse()?,
            name => configs.push(name.to_string()),
        }
    }
    if configs.is_empty() {
        configs = vec!["tiny".into(), "small".into()];
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    println!("threads: {}", tch::get_num_threads());
    println!("| config | micro-batch × L | L′ | params | logits | tokens/s | ratio |");
    println!("|---|---|---|---|---|---|---|");
    for name in configs {
        // The small model runs one sequence per micro-batch: a step is ~2 TFLOP on two cores.
        let batch = if name == "small" { "train.micro_batch=1" } else { "train.micro_batch=16" };
        let cfg = Config::load(&root.join(format!("configs/{name}.toml")), &[batch.to_string()])?;
        let mut baseline = None;
        for variant in [Variant::DenseLogits, Variant::MaskedLogits, Variant::MaskedLogitsHeapReuse] {
            keep_freed_memory_for_reuse(variant == Variant::MaskedLogitsHeapReuse);
            let (params, tokens_per_s) = measure(&cfg, variant, steps)?;
            let base = *baseline.get_or_insert(tokens_per_s);
            println!(
                "| {name} | {} × {} | {} | {:.1}M | {} | {:.0} | {:.2}× |",
                cfg.train.micro_batch,
                cfg.model.seq_len,
                cfg.diffusion.block_size,
                params as f64 / 1e6,
                match variant {
                    Variant::DenseLogits => "all positions (baseline)",
                    Variant::MaskedLogits => "masked positions",
                    Variant::MaskedLogitsHeapReuse => "masked positions + heap reuse",
                },
                tokens_per_s,
                tokens_per_s / base
            );
        }
    }
    Ok(())
}

/// Returns (parameters, training tokens/s) over `steps` timed steps after one warm-up step.
fn measure(cfg: &Config, variant: Variant, steps: usize) -> Result<(i64, f64)> {
    tch::manual_seed(0);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = Dit::build(&mut vs, &cfg.model)?;
    let mut params = Params::of(&vs).tensors;
    let objective = BlockDiffusion::new(&cfg.model, &cfg.diffusion)?;
    let mut adamw = AdamW::new(&params, &cfg.optim);
    let mut ema = Ema::new(&params, cfg.optim.ema_decay);
    let (b, l) = (cfg.train.micro_batch, cfg.model.seq_len);
    let mut data_rng = NoiseRng::new(0, 100, 0, 0);
    let mut started = Instant::now();
    for step in 0..=steps {
        if step == 1 {
            started = Instant::now();
        }
        let tokens: Vec<u32> = (0..b * l).map(|_| data_rng.below(50257) as u32).collect();
        let x0 = tokens_tensor(&tokens, b, l, Device::Cpu);
        let noise = objective.sample_noise(&tokens, b, ClipInterval::FULL, &mut NoiseRng::new(0, 1, step as u64, 0))?;
        for p in params.iter_mut() {
            p.zero_grad();
        }
        let terms = match variant {
            Variant::DenseLogits => objective.token_losses_two_stream_dense(&model, &x0, &noise, true)?,
            _ => objective.token_losses_two_stream(&model, &x0, &noise, true)?,
        };
        terms.mean(Kind::Float).backward();
        clip_grad_norm(&params, cfg.optim.grad_clip);
        adamw.step(&params, cfg.optim.lr);
        ema.update(&params);
    }
    Ok((num_parameters(&vs), (steps * b * l) as f64 / started.elapsed().as_secs_f64()))
}
