//! Checkpoint save/load throughput and the training stall of an asynchronous save, on CPU.
//!
//!     cargo bench -p bd3-trainer --bench checkpoint_io --profile dev -- [small|tiny] [--steps N] [--dir D]
//!
//! The state is a real model's: parameters and buffers, EMA weights and AdamW moments (after one
//! training step). Save and load go through `CheckpointStore` on a local directory (`--dir`,
//! default `target/bench-checkpoints`); the baseline writes the same bytes sequentially to one
//! file with `std::fs` and reads them back, in the same run. The stall is the time training is
//! blocked (the copy of every tensor to host memory) against the time of one training step; the
//! interference is the slowdown of the steps that run while the writer thread uploads.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use checkpoint::{AsyncSaver, CheckpointStore, SaveJob, Slice, WriteOptions};
use tch::{nn, Device, Kind};
use trainer::config::Config;
use trainer::device::keep_freed_memory_for_reuse;
use trainer::diffusion::{tokens_tensor, BlockDiffusion, ClipInterval};
use trainer::dist::SingleProcess;
use trainer::model::Dit;
use trainer::optim::Ema;
use trainer::optimizer::Optimizer;
use trainer::progress::Progress;
use trainer::rng::NoiseRng;
use trainer::state::TrainState;
use trainer::stateful::Params;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let (mut name, mut steps, mut dir) = ("small".to_string(), 2usize, root.join("target/bench-checkpoints"));
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--steps" => steps = it.next().expect("--steps N").parse()?,
            "--dir" => dir = PathBuf::from(it.next().expect("--dir D")),
            other => name = other.to_string(),
        }
    }
    keep_freed_memory_for_reuse(true);
    let batch = if name == "small" { "train.micro_batch=1" } else { "train.micro_batch=16" };
    let cfg = Config::load(&root.join(format!("configs/{name}.toml")), &[batch.to_string()])?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;

    tch::manual_seed(0);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = Dit::build(&mut vs, &cfg.model)?;
    let params = Params::of(&vs);
    let objective = BlockDiffusion::new(&cfg.model, &cfg.diffusion)?;
    let optimizer = Optimizer::new(&params.tensors, &cfg.optim, false, 0, 1, 1 << 20)?;
    let ema = Ema::new(&params.tensors, cfg.optim.ema_decay);
    let data = dataloader::LoaderState { epoch: 0, consumed: 0, seed: 0 };
    let clip = ClipInterval::FULL;
    let (clip_beta, clip_omega) = (clip.beta, clip.omega);
    let progress =
        Progress { step: 0, tokens_seen: 0, optimizer_steps: 0, ema_updates: 0, clip_beta, clip_omega, data };
    let mut state = TrainState { vs, params, optimizer, ema, progress };
    let (b, l) = (cfg.train.micro_batch, cfg.model.seq_len);
    let mut step_no = 0u64;
    let mut train_steps = |n: usize, state: &mut TrainState| -> Result<f64> {
        let TrainState { params, optimizer, ema, .. } = state;
        let params = &mut params.tensors;
        let started = Instant::now();
        for _ in 0..n {
            let mut data_rng = NoiseRng::new(0, 100, step_no, 0);
            let tokens: Vec<u32> = (0..b * l).map(|_| data_rng.below(50257) as u32).collect();
            let x0 = tokens_tensor(&tokens, b, l, Device::Cpu);
            let noise = objective.sample_noise(&tokens, b, ClipInterval::FULL, &mut NoiseRng::new(0, 1, step_no, 0))?;
            for p in params.iter_mut() {
                p.zero_grad();
            }
            objective.token_losses(&model, &x0, &noise, true)?.mean(Kind::Float).backward();
            optimizer.step(&SingleProcess, params, cfg.optim.lr, cfg.optim.grad_clip, 0)?;
            ema.update(params);
            step_no += 1;
        }
        Ok(started.elapsed().as_secs_f64() / n as f64)
    };
    train_steps(1, &mut state)?; // warm-up: moments exist, allocations settled
    let step_s = train_steps(steps, &mut state)?;

    let started = Instant::now();
    let (tensors, _) = state.snapshot(0, 1)?;
    let stall_s = started.elapsed().as_secs_f64();
    let bytes: usize = tensors.iter().map(|t| t.buffer.data.len()).sum();
    let gb = bytes as f64 / 1e9;

    // Baseline: the same bytes, written sequentially to one file, then read back. Each side runs
    // twice, alternating, and the faster run counts (the first write into fresh page cache is slower).
    let store = Arc::new(CheckpointStore::open(dir.join("ckpt").to_str().unwrap())?);
    let meta = checkpoint::CheckpointMeta::default();
    let (mut raw_write_s, mut raw_read_s, mut save_s) = (f64::MAX, f64::MAX, f64::MAX);
    let mut tensors = Some(tensors);
    let mut manifest = None;
    for round in 0..2u64 {
        let raw = dir.join("raw.bin");
        let started = Instant::now();
        let mut f = std::fs::File::create(&raw)?;
        for t in tensors.as_ref().unwrap() {
            f.write_all(&t.buffer.data)?;
        }
        drop(f);
        raw_write_s = raw_write_s.min(started.elapsed().as_secs_f64());
        let started = Instant::now();
        let raw_bytes = std::fs::read(&raw)?;
        raw_read_s = raw_read_s.min(started.elapsed().as_secs_f64());
        assert_eq!(raw_bytes.len(), bytes);
        drop(raw_bytes);
        std::fs::remove_file(&raw)?;

        let batch = if round == 0 { tensors.clone().unwrap() } else { tensors.take().unwrap() };
        let started = Instant::now();
        manifest = store.save(10 + round, 0, 1, batch, Some(meta.clone()), WriteOptions::default())?;
        save_s = save_s.min(started.elapsed().as_secs_f64());
    }
    let manifest = manifest.unwrap();
    let started = Instant::now();
    let requests: Vec<(String, Slice)> =
        manifest.tensors.iter().map(|(name, e)| (name.clone(), Slice::whole(&e.shape))).collect();
    let read: usize = store.read_many(&manifest, &requests)?.iter().map(|b| b.data.len()).sum();
    let load_s = started.elapsed().as_secs_f64();
    assert_eq!(read, bytes);
    let started = Instant::now();
    store.verify(&manifest)?;
    let verify_s = started.elapsed().as_secs_f64();

    // Steps while an asynchronous save of step 2 uploads.
    let mut saver = AsyncSaver::new(store.clone());
    let started = Instant::now();
    let (tensors, _) = state.snapshot(0, 1)?;
    let job = SaveJob {
        step: 2,
        rank: 0,
        world_size: 1,
        tensors,
        meta: Some(meta),
        options: WriteOptions::default(),
        retention: None,
    };
    saver.save(job)?;
    let blocked_s = started.elapsed().as_secs_f64();
    let during_s = train_steps(steps, &mut state)?;
    let waited = Instant::now();
    saver.wait()?;
    let tail_s = waited.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);

    println!("threads: {}, state: {} tensors, {:.2} GB ({name})", tch::get_num_threads(), manifest.tensors.len(), gb);
    println!("| measurement | seconds | GB/s | ratio |");
    println!("|---|---|---|---|");
    println!("| raw sequential write (baseline) | {raw_write_s:.2} | {:.2} | 1.00× |", gb / raw_write_s);
    println!(
        "| checkpoint save (CRC-32C + safetensors + manifest) | {save_s:.2} | {:.2} | {:.2}× |",
        gb / save_s,
        raw_write_s / save_s
    );
    println!("| raw sequential read (baseline) | {raw_read_s:.2} | {:.2} | 1.00× |", gb / raw_read_s);
    println!(
        "| checkpoint load (ranged reads per tensor) | {load_s:.2} | {:.2} | {:.2}× |",
        gb / load_s,
        raw_read_s / load_s
    );
    println!("| checkpoint verify (read + CRC-32C) | {verify_s:.2} | {:.2} | |", gb / verify_s);
    println!("| training step (mean of {steps}) | {step_s:.2} | | |");
    println!("| stall: copy to host (sync snapshot) | {stall_s:.3} | | {:.1}% of a step |", 100.0 * stall_s / step_s);
    println!(
        "| stall: async save call (snapshot + hand-off) | {blocked_s:.3} | | {:.1}% of a step |",
        100.0 * blocked_s / step_s
    );
    println!(
        "| training step while the writer uploads | {during_s:.2} | | {:.1}% slower |",
        100.0 * (during_s / step_s - 1.0)
    );
    println!("| writer still busy after those steps | {tail_s:.2} | | |");
    Ok(())
}
