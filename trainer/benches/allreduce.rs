//! Bandwidth of bd3's bucketed gradient all-reduce against one raw `MPI_Allreduce` of the same
//! bytes, in the same run, on 2 ranks over shared memory.
//!
//!     cargo bench -p bd3-trainer --bench allreduce --profile dev -- [--np N] [--iters N] [MiB …]
//!
//! Started by cargo (no launcher), the bench starts itself under mpirun with N ranks (default 2).
//! The "gradients" are the parameter shapes of GPT-2-small layers (hidden 768), repeated up to
//! the size asked for: a few large matrices and many small vectors, as a model has. Measured, each
//! the median of the iterations, GB/s counting the reduced bytes once:
//! * `raw`: one `MPI_Allreduce` (sum) of the same number of f32 from one flat buffer into another
//!   (the baseline the ratios are relative to);
//! * `in place`: one `MPI_Allreduce` (sum) with `MPI_IN_PLACE` on one flat tensor of them all
//!   (`MpiComm::all_reduce`: a single MPI call, no buckets);
//! * `packed`: `all_reduce_bucketed` (avg) over separately allocated tensors, 25 MiB buckets:
//!   each bucket is packed into a flat buffer and unpacked after;
//! * `views`: `GradBuckets::all_reduce` (sum, then avg = what training runs): the tensors are
//!   views of the 25 MiB buckets, as training's gradients are, and each bucket is reduced in place.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use launcher::local::mpirun_command;
use mpi::collective::SystemOperation;
use mpi::traits::CommunicatorCollectives;
use tch::{Device, Kind, Tensor};
use trainer::dist::{all_reduce_bucketed, Communicator, DistOptions, GradBuckets, MpiComm, Placement, ReduceOp};

const BUCKET_BYTES: usize = 25 << 20;

/// The parameter shapes of one GPT-2-small transformer layer.
const LAYER: [&[i64]; 12] = [
    &[768],
    &[768],
    &[2304, 768],
    &[2304],
    &[768, 768],
    &[768],
    &[768],
    &[768],
    &[3072, 768],
    &[3072],
    &[768, 3072],
    &[768],
];

fn gradients(bytes: usize, rank: usize) -> Vec<Tensor> {
    let mut out = vec![];
    let mut total = 0;
    'fill: loop {
        for shape in LAYER {
            let n = shape.iter().product::<i64>() as usize * 4;
            if total + n > bytes {
                break 'fill;
            }
            total += n;
            out.push(Tensor::full(shape, 1.0 + rank as f64, (Kind::Float, Device::Cpu)));
        }
    }
    out
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let (mut np, mut iters, mut sizes) = (2usize, 10usize, vec![]);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--np" => np = it.next().context("--np N")?.parse()?,
            "--iters" => iters = it.next().context("--iters N")?.parse()?,
            mib => sizes.push(mib.parse::<usize>().with_context(|| format!("{mib:?}: a size in MiB"))?),
        }
    }
    if Placement::from_env()?.is_none() {
        let exe = std::env::current_exe()?;
        let status = mpirun_command(np).arg(exe).args(&args).status().context("starting mpirun")?;
        std::process::exit(status.code().unwrap_or(1));
    }
    if sizes.is_empty() {
        sizes = vec![16, 64, 256];
    }
    let comm = MpiComm::init(DistOptions { timeout: Duration::from_secs(600) })?;
    let (rank, world) = (comm.rank(), comm.world_size());
    if rank == 0 {
        println!("{world} ranks, {iters} iterations (median), buckets of {} MiB", BUCKET_BYTES >> 20);
        println!(
            "| MiB | tensors | raw GB/s | in place GB/s | ratio | packed avg GB/s | ratio | views sum GB/s | ratio | \
             views avg GB/s | ratio |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
    }
    for mib in sizes {
        let grads = gradients(mib << 20, rank);
        let elems: usize = grads.iter().map(Tensor::numel).sum();
        let send = vec![1.0f32 + rank as f32; elems];
        let mut recv = vec![0.0f32; elems];
        let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<Duration> {
            comm.barrier()?;
            let started = Instant::now();
            f()?;
            Ok(started.elapsed())
        };
        let buckets = GradBuckets::new(&grads, BUCKET_BYTES);
        for (view, g) in buckets.views().iter().zip(&grads) {
            view.shallow_clone().copy_(g);
        }
        let flat = Tensor::full([elems as i64], 1.0 + rank as f64, (Kind::Float, Device::Cpu));
        let mut times: [Vec<Duration>; 5] = Default::default();
        for i in 0..iters + 1 {
            // Interleaved, so that a noisy neighbour slows all alike; the first round is warm-up.
            let round = [
                time(&mut || {
                    comm.world().all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum());
                    Ok(())
                })?,
                time(&mut || comm.all_reduce(&flat, ReduceOp::Sum))?,
                time(&mut || all_reduce_bucketed(&comm, &grads, ReduceOp::Avg, BUCKET_BYTES))?,
                time(&mut || buckets.all_reduce(&comm, ReduceOp::Sum))?,
                time(&mut || buckets.all_reduce(&comm, ReduceOp::Avg))?,
            ];
            if i > 0 {
                for (all, t) in times.iter_mut().zip(round) {
                    all.push(t);
                }
            }
        }
        let bytes = (elems * 4) as f64;
        let gbs: Vec<f64> = times.into_iter().map(|t| bytes / median(t).as_secs_f64() / 1e9).collect();
        if rank == 0 {
            let mut row = format!("| {:.0} | {} | {:.2} |", bytes / (1 << 20) as f64, grads.len(), gbs[0]);
            for g in &gbs[1..] {
                row += &format!(" {g:.2} | {:.0} % |", 100.0 * g / gbs[0]);
            }
            println!("{row}");
        }
    }
    Ok(())
}
