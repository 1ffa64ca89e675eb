//! Forward + backward time of block-diffusion attention on the CPU: block-sparse against the
//! dense-mask SDPA reference, in the same run, on the two-stream (x_t ⊕ x_0) layout.
//!
//! cargo bench -p bd3-kernels --bench attention --profile dev -- [--batch 16] [--heads 12]
//!     [--len 1024] [--dim 64] [--blocks 16,4] [--iters 2] [--tiles 256] [--threads N]
//!
//! `--len` is L (the input is 2L long). Each variant runs one untimed warm-up, then `--iters`
//! timed iterations; the median is reported.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use kernels::{dense_attention, sparse_attention_with_tile, BlockLayout};
use tch::{Device, Kind, Tensor};

struct Args {
    batch: i64,
    heads: i64,
    len: usize,
    dim: i64,
    blocks: Vec<usize>,
    iters: usize,
    tiles: Vec<usize>,
    threads: i32,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        batch: 16,
        heads: 12,
        len: 1024,
        dim: 64,
        blocks: vec![16, 4],
        iters: 2,
        tiles: vec![kernels::sparse::DEFAULT_TILE],
        threads: 0,
    };
    let mut it = std::env::args().skip(1);
    let list = |s: String| -> Result<Vec<usize>> { s.split(',').map(|x| x.parse().context("bad list")).collect() };
    while let Some(flag) = it.next() {
        if flag == "--bench" {
            continue; // passed by `cargo bench`
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--batch" => a.batch = value.parse()?,
            "--heads" => a.heads = value.parse()?,
            "--len" => a.len = value.parse()?,
            "--dim" => a.dim = value.parse()?,
            "--blocks" => a.blocks = list(value)?,
            "--iters" => a.iters = value.parse()?,
            "--tiles" => a.tiles = list(value)?,
            "--threads" => a.threads = value.parse()?,
            _ => bail!("unknown flag {flag}"),
        }
    }
    Ok(a)
}

type Attention<'a> = &'a dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;

/// Median seconds of forward + backward.
fn time(f: Attention, q: &Tensor, k: &Tensor, v: &Tensor, iters: usize) -> Result<f64> {
    let mut times = Vec::new();
    for i in 0..=iters {
        let start = Instant::now();
        let out = f(q, k, v)?;
        let grads = Tensor::f_run_backward(&[out.sum(Kind::Float)], &[q, k, v], false, false)?;
        drop(grads);
        let dt = start.elapsed().as_secs_f64();
        if i > 0 {
            times.push(dt);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn main() -> Result<()> {
    let a = parse()?;
    // As `bd3 train` does on CPU (trainer::device::keep_freed_memory_for_reuse): keep freed buffers
    // in the heap instead of returning them to the kernel and page-faulting them back each pass.
    // SAFETY: mallopt only changes allocator tuning parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    if a.threads > 0 {
        tch::set_num_threads(a.threads);
    }
    tch::manual_seed(0);
    let s = 2 * a.len as i64;
    let make = || Tensor::randn([a.batch, a.heads, s, a.dim], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let (q, k, v) = (make(), make(), make());
    println!(
        "two-stream attention, forward+backward, fp32, B={} H={} 2L={} D={}, {} threads, median of {}",
        a.batch,
        a.heads,
        s,
        a.dim,
        tch::get_num_threads(),
        a.iters
    );
    for &b in &a.blocks {
        let layout = BlockLayout::two_stream(a.len, b)?;
        let dense = time(&|q, k, v| dense_attention(q, k, v, &layout), &q, &k, &v, a.iters)?;
        println!("L'={b:<4} dense-mask SDPA        {dense:8.3} s   1.00x");
        for &tile in &a.tiles {
            let sparse = time(&|q, k, v| sparse_attention_with_tile(q, k, v, &layout, tile), &q, &k, &v, a.iters)?;
            println!("L'={b:<4} block-sparse tile {tile:<4} {sparse:8.3} s  {:5.2}x", dense / sparse);
        }
    }
    Ok(())
}
