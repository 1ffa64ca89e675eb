//! Parity and benchmark of `block_diffusion_attention` on one device, as one JSON object on stdout.
//! Built with `--features cuda` and run by `kernels/gpu-check.sh` on a GPU machine; runs on the
//! CPU too (fp32, block-sparse path), which is how it is tested where there is no GPU.
//!
//! cuda_check --probe                      does tch see CUDA, can it make a CUDA tensor
//! cuda_check [--device cpu|cuda] [--dtype f32|bf16|fp16] [--quick] [--bench] [--iters N]
//!
//! Parity: output and dq/dk/dv of every backend that runs on the device (`fused` — CUDA builds on a
//! GPU —, `sdpa-tiles`, `dense`) against the dense-mask reference computed in fp32 from the same
//! (rounded) inputs, as `max |ours − ref| / max(1, max |ref|)`, with a tolerance per dtype; the
//! error of libtorch's own dense SDPA in the same dtype (`dense`) is the yardstick. Bench:
//! forward+backward milliseconds of each backend at B=16, H=12, 2L=2048, D=64, L′ ∈ {16, 4}, and
//! each one's speed-up over dense-mask SDPA.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use kernels::{attention, dense_attention, Backend, BlockLayout};
use tch::{Device, Kind, Tensor};

struct Args {
    device: Device,
    kind: Kind,
    quick: bool,
    bench: bool,
    iters: usize,
}

fn parse() -> Result<Option<Args>> {
    let mut a = Args { device: Device::Cpu, kind: Kind::Float, quick: false, bench: false, iters: 10 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--probe" => return Ok(None),
            "--quick" => a.quick = true,
            "--bench" => a.bench = true,
            "--iters" => a.iters = it.next().context("--iters needs a value")?.parse()?,
            "--device" => {
                a.device = match it.next().context("--device needs a value")?.as_str() {
                    "cpu" => Device::Cpu,
                    "cuda" => Device::Cuda(0),
                    d => bail!("unknown device {d} (cpu or cuda)"),
                }
            }
            "--dtype" => {
                a.kind = match it.next().context("--dtype needs a value")?.as_str() {
                    "f32" => Kind::Float,
                    "bf16" => Kind::BFloat16,
                    "fp16" => Kind::Half,
                    d => bail!("unknown dtype {d} (f32, bf16 or fp16)"),
                }
            }
            f => bail!("unknown flag {f}"),
        }
    }
    Ok(Some(a))
}

fn tolerance(kind: Kind) -> f64 {
    match kind {
        Kind::BFloat16 => 4e-2,
        Kind::Half => 1e-2,
        _ => 1e-4,
    }
}

fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bf16",
        Kind::Half => "fp16",
        _ => "f32",
    }
}

/// Output and input gradients of `f` for upstream gradient `g`, all as fp32.
fn with_grads(
    f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    inputs: [&Tensor; 3],
    g: &Tensor,
) -> Result<[Tensor; 4]> {
    let [q, k, v] = inputs.map(|t| t.detach().set_requires_grad(true));
    let out = f(&q, &k, &v)?;
    let grads =
        Tensor::f_run_backward(&[(&out * g.to_kind(out.kind())).sum(Kind::Float)], &[&q, &k, &v], false, false)?;
    let f32 = |t: &Tensor| t.to_kind(Kind::Float);
    Ok([f32(&out), f32(&grads[0]), f32(&grads[1]), f32(&grads[2])])
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).abs().max().double_value(&[]);
    diff / b.abs().max().double_value(&[]).max(1.0)
}

fn layout_name(l: &BlockLayout) -> String {
    match *l {
        BlockLayout::TwoStream { seq_len, block_size } => format!("two_stream(L={seq_len},L'={block_size})"),
        BlockLayout::BlockCausal { seq_len, block_size } => format!("block_causal(L={seq_len},L'={block_size})"),
        BlockLayout::Causal { seq_len } => format!("causal(L={seq_len})"),
        BlockLayout::Decode { prefix_len, block_len, .. } => format!("decode(prefix={prefix_len},block={block_len})"),
    }
}

fn cases(quick: bool) -> Result<Vec<(BlockLayout, i64, i64)>> {
    let mut out = Vec::new();
    let lens: &[usize] = if quick { &[16, 128, 200] } else { &[16, 128, 200, 1024] };
    for &n in lens {
        let (b, h) = if n >= 1024 { (1, 3) } else { (3, 5) };
        let blocks = [1usize, 4, 8, 16, 64, n].into_iter().filter(|&bs| n % bs == 0 && (bs != 8 || n == 200));
        let mut blocks: Vec<usize> = blocks.collect();
        blocks.dedup();
        for bs in blocks {
            out.push((BlockLayout::two_stream(n, bs)?, b, h));
        }
        out.push((BlockLayout::block_causal(n, if n % 16 == 0 { 16 } else { 8 })?, b, h));
        out.push((BlockLayout::Causal { seq_len: n }, b, h));
    }
    for (prefix_len, block_len) in [(0usize, 16usize), (1008, 16), (37, 4)] {
        out.push((BlockLayout::Decode { prefix_len, block_len, position: prefix_len }, 3, 5));
    }
    Ok(out)
}

fn parity(a: &Args) -> Result<(Vec<String>, bool)> {
    let mut rows = Vec::new();
    let mut all = true;
    let dims: &[i64] = if a.device == Device::Cpu { &[16] } else { &[64, 128] };
    for (layout, b, h) in cases(a.quick)? {
        for &d in dims {
            let make = |len: usize| Tensor::randn([b, h, len as i64, d], (Kind::Float, a.device)).to_kind(a.kind);
            let (q, k, v) = (make(layout.query_len()), make(layout.key_len()), make(layout.key_len()));
            let g = Tensor::randn([b, h, layout.query_len() as i64, d], (Kind::Float, a.device));
            let up = |t: &Tensor| t.to_kind(Kind::Float);
            let reference = with_grads(&|q, k, v| dense_attention(q, k, v, &layout), [&up(&q), &up(&k), &up(&v)], &g)?;
            let mut per_backend = Vec::new();
            let mut pass = true;
            for backend in backends(a) {
                let ours = with_grads(&|q, k, v| attention(backend, q, k, v, &layout), [&q, &k, &v], &g)?;
                let e: Vec<f64> = ours.iter().zip(&reference).map(|(o, r)| rel_err(o, r)).collect();
                pass &= e.iter().all(|e| e.is_finite() && *e <= tolerance(a.kind));
                per_backend.push(format!(
                    "\"{}\":{{\"out\":{:.3e},\"dq\":{:.3e},\"dk\":{:.3e},\"dv\":{:.3e}}}",
                    backend.name(),
                    e[0],
                    e[1],
                    e[2],
                    e[3]
                ));
            }
            all &= pass;
            rows.push(format!(
                "{{\"layout\":\"{}\",\"batch\":{b},\"heads\":{h},\"head_dim\":{d},\"err\":{{{}}},\"pass\":{pass}}}",
                layout_name(&layout),
                per_backend.join(",")
            ));
        }
    }
    Ok((rows, all))
}

/// The backends that run on the device: the fused kernels only in CUDA builds on a GPU, fp16/bf16.
fn backends(a: &Args) -> Vec<Backend> {
    let fused = cfg!(feature = "cuda") && a.device != Device::Cpu && matches!(a.kind, Kind::Half | Kind::BFloat16);
    let mut out = if fused { vec![Backend::Fused] } else { Vec::new() };
    out.extend([Backend::SdpaTiles, Backend::Dense]);
    out
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Median forward+backward milliseconds.
fn time(f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>, inputs: [&Tensor; 3], a: &Args) -> Result<f64> {
    let mut times = Vec::new();
    for i in 0..a.iters + 2 {
        sync(a.device);
        let start = Instant::now();
        let out = f(inputs[0], inputs[1], inputs[2])?;
        let grads = Tensor::f_run_backward(&[out.sum(Kind::Float)], &inputs, false, false)?;
        sync(a.device);
        drop(grads);
        if i >= 2 {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn bench(a: &Args) -> Result<Vec<String>> {
    let (b, h, n, d) = if a.quick { (2, 3, 256, 64) } else { (16, 12, 1024, 64) };
    let make =
        || Tensor::randn([b, h, 2 * n as i64, d], (Kind::Float, a.device)).to_kind(a.kind).set_requires_grad(true);
    let (q, k, v) = (make(), make(), make());
    let mut rows = Vec::new();
    for bs in [16usize, 4] {
        let layout = BlockLayout::two_stream(n, bs)?;
        let dense = time(&|q, k, v| dense_attention(q, k, v, &layout), [&q, &k, &v], a)?;
        for backend in backends(a) {
            let ms = time(&|q, k, v| attention(backend, q, k, v, &layout), [&q, &k, &v], a)?;
            rows.push(format!(
                "{{\"backend\":\"{}\",\"batch\":{b},\"heads\":{h},\"two_l\":{},\"head_dim\":{d},\"block\":{bs},\"ms\":{ms:.3},\"dense_sdpa_ms\":{dense:.3},\"speedup_vs_dense\":{:.3}}}",
                backend.name(),
                2 * n,
                dense / ms
            ));
        }
    }
    Ok(rows)
}

fn main() -> Result<()> {
    let Some(a) = parse()? else {
        let available = tch::Cuda::is_available();
        let made = available && Tensor::f_zeros([2], (Kind::Float, Device::Cuda(0))).is_ok();
        println!(
            "{{\"cuda_available\":{available},\"devices\":{},\"cuda_tensor\":{made},\"fused_kernels_compiled\":{}}}",
            tch::Cuda::device_count(),
            cfg!(feature = "cuda")
        );
        return Ok(());
    };
    if a.device != Device::Cpu && !tch::Cuda::is_available() {
        bail!("--device cuda but libtorch sees no CUDA device");
    }
    tch::manual_seed(7);
    let fused = cfg!(feature = "cuda") && a.device != Device::Cpu;
    let (rows, all) = parity(&a)?;
    let bench_rows = if a.bench { bench(&a)? } else { Vec::new() };
    println!(
        "{{\"device\":\"{:?}\",\"dtype\":\"{}\",\"fused_kernels\":{fused},\"tolerance\":{},\"parity_pass\":{all},\"parity\":[{}],\"bench\":[{}]}}",
        a.device,
        dtype_name(a.kind),
        tolerance(a.kind),
        rows.join(","),
        bench_rows.join(",")
    );
    Ok(())
}
