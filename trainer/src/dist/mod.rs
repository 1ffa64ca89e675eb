//! Collectives between training processes: the [`Communicator`] trait that training code calls,
//! with one implementation for a single process (here), one over MPI for CPU tensors
//! ([`mpi`](MpiComm)) and, with the cargo feature `cuda`, one over NCCL for CUDA tensors
//! ([`nccl`]). Only this module touches MPI and NCCL.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | the trait, [`SingleProcess`], [`Placement`] from the launcher's environment, [`init`] |
//! | `mpi.rs` | [`MpiComm`]: MPI collectives on CPU tensors |
//! | `nccl.rs` | NCCL collectives on CUDA tensors (feature `cuda`) |
//! | `buckets.rs` | [`GradBuckets`]: gradients as views of flat buffers, reduced per bucket |
//! | `overlap.rs` | [`Overlap`]: buckets reduced while backward goes on (autograd hooks; MPI, NCCL) |
//! | `watchdog.rs` | the timeout that ends a rank whose collective hangs |
//!
//! Preemption signals (SIGTERM, SIGUSR1) are in the `preemption` module; the mpirun command line that
//! starts a local job is the launcher's.
//!
//! **Bootstrap.** [`init`] reads the rank and world size that mpirun (`OMPI_COMM_WORLD_*`), a PMI
//! launcher such as MPICH's Hydra (`PMI_*`) or Slurm's srun (`SLURM_*`) put in the environment.
//! A process started by none of them is rank 0 of 1 and never initializes MPI, so single-process
//! runs and tests need neither mpirun nor a working MPI set-up at run time.
//!
//! **Data types.** Sums of `f32`, `f64` and `i64` tensors are MPI reductions of that type.
//! `bf16` and `f16` tensors are widened to `f32`, reduced, and rounded back once: a sum over
//! ranks rounds once instead of at every partial sum, and MPI has no bf16 type to reduce in.
//! Broadcast and all-gather move bytes, so they are exact for every type.
//!
//! **Hangs.** Every MPI collective runs under a watchdog: when one has not completed after
//! `dist.timeout_s` (a peer died, or stopped calling collectives), the process prints which
//! collective on which rank timed out and exits with status [`TIMEOUT_EXIT_CODE`]. Each rank
//! watches itself, so every survivor of a dead peer exits, whatever the launcher does.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use tch::Tensor;

mod buckets;
mod mpi;
mod overlap;
mod watchdog;

pub use buckets::{all_reduce_bucketed, GradBuckets};
pub use mpi::MpiComm;
pub use overlap::Overlap;
pub use watchdog::TIMEOUT_EXIT_CODE;

/// NCCL collectives for CUDA tensors (feature `cuda`; loaded at run time).
#[cfg(feature = "cuda")]
pub mod nccl;

/// How gradients and metrics are combined across ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// The sum divided by the world size.
    Avg,
}

/// Collectives over the ranks of one job. Tensors live on the device the implementation serves
/// (CPU for [`MpiComm`]), are contiguous, and have the same shape and type on every rank; every
/// rank calls the same collectives in the same order.
pub trait Communicator {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Reduces `tensor` over all ranks, in place on every rank.
    fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<()>;
    /// Reduces `input` (`world_size × n` elements on every rank) and returns this rank's part of
    /// the result: elements `rank·n .. (rank+1)·n` of the flattened reduction, as a 1-D tensor.
    fn reduce_scatter(&self, input: &Tensor, op: ReduceOp) -> Result<Tensor>;
    /// The concatenation, in rank order, of every rank's flattened `input` (1-D).
    fn all_gather(&self, input: &Tensor) -> Result<Tensor>;
    /// Overwrites `tensor` on every rank with its value on `root`.
    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// [`Communicator::all_reduce`] for a thread that runs beside computation: the wait for the
    /// peers gives the core back instead of spinning on it (trainer::dist::overlap).
    fn all_reduce_beside_compute(&self, tensor: &Tensor, op: ReduceOp) -> Result<()> {
        self.all_reduce(tensor, op)
    }
    /// [`Communicator::reduce_scatter`] beside computation, as [`Communicator::all_reduce_beside_compute`].
    fn reduce_scatter_beside_compute(&self, input: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.reduce_scatter(input, op)
    }
    /// Orders the collectives the `*_beside_compute` calls started before the work the calling
    /// thread enqueues next. They may return before the collective has run (NCCL enqueues it on
    /// a stream of its own); those of MPI complete before they return, so there is nothing to do.
    fn finish_beside_compute(&self) -> Result<()> {
        Ok(())
    }
}

/// Where this process sits in its job, as its launcher described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub rank: usize,
    pub world_size: usize,
    /// Rank among the processes of this node: the CUDA device it should use.
    pub local_rank: usize,
}

impl Placement {
    pub const SINGLE: Placement = Placement { rank: 0, world_size: 1, local_rank: 0 };

    /// Reads the placement from the environment of mpirun (Open MPI), a PMI launcher or srun;
    /// `None` when no launcher started this process.
    pub fn from_env() -> Result<Option<Placement>> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Placement::from_env`] over any variable source (tests pass a map).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Placement>> {
        // Open MPI first: under `srun mpirun …` or mpirun inside an allocation, the SLURM_*
        // variables describe the allocation, not this process.
        let schemes = [
            ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
            ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
            ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
        ];
        for (rank_var, size_var, local_var) in schemes {
            let (Some(rank), Some(size)) = (var(rank_var), var(size_var)) else { continue };
            let parse = |name: &str, value: &str| -> Result<usize> {
                value.trim().parse().with_context(|| format!("environment variable {name}={value:?} is not a number"))
            };
            let (rank, world_size) = (parse(rank_var, &rank)?, parse(size_var, &size)?);
            ensure!(
                world_size > 0 && rank < world_size,
                "{rank_var}={rank} and {size_var}={world_size} do not describe a rank of the job"
            );
            let local_rank = match var(local_var) {
                Some(v) => parse(local_var, &v)?,
                None => 0,
            };
            return Ok(Some(Placement { rank, world_size, local_rank }));
        }
        Ok(None)
    }
}

/// Settings of the collectives (the `dist` config section).
#[derive(Debug, Clone, Copy)]
pub struct DistOptions {
    /// A collective that has not completed after this long aborts the process.
    pub timeout: Duration,
}

/// The job this process belongs to: a communicator, and the MPI library while it is in use.
pub struct Dist {
    comm: Box<dyn Communicator>,
    pub placement: Placement,
}

impl Dist {
    pub fn comm(&self) -> &dyn Communicator {
        self.comm.as_ref()
    }

    /// A single process, without MPI.
    pub fn single() -> Self {
        Self { comm: Box::new(SingleProcess), placement: Placement::SINGLE }
    }

    /// Ends the whole job after a failure on this rank, so that its peers do not wait for it in
    /// their next collective until the timeout. A no-op for a single process.
    pub fn abort_job(&self, error: &anyhow::Error) {
        if self.placement.world_size > 1 {
            eprintln!("bd3 rank {}/{}: {error:#}; aborting the job", self.placement.rank, self.placement.world_size);
            // SAFETY: MPI is initialized (world_size > 1 means an MpiComm exists) and not finalized.
            unsafe {
                ::mpi::ffi::MPI_Abort(::mpi::ffi::RSMPI_COMM_WORLD, 1);
            }
        }
    }
}

/// Joins the job this process was started in: MPI when a launcher started it with more than one
/// rank, otherwise a single process.
pub fn init(options: DistOptions) -> Result<Dist> {
    match Placement::from_env()? {
        Some(p) if p.world_size > 1 => {
            let comm = MpiComm::init(options)?;
            ensure!(
                comm.rank() == p.rank && comm.world_size() == p.world_size,
                "the launcher says rank {} of {}, MPI says rank {} of {}: with srun, start bd3 with \
                 an MPI plugin that Open MPI supports (srun --mpi=pmix), or use mpirun",
                p.rank,
                p.world_size,
                comm.rank(),
                comm.world_size()
            );
            Ok(Dist { comm: Box::new(comm), placement: p })
        }
        _ => Ok(Dist::single()),
    }
}

/// One process: every collective is the identity.
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce(&self, _: &Tensor, _: ReduceOp) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter(&self, input: &Tensor, _: ReduceOp) -> Result<Tensor> {
        Ok(input.flatten(0, -1).copy())
    }
    fn all_gather(&self, input: &Tensor) -> Result<Tensor> {
        Ok(input.flatten(0, -1).copy())
    }
    fn broadcast(&self, _: &Tensor, root: usize) -> Result<()> {
        ensure!(root == 0, "broadcast from rank {root} in a job of 1");
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn placement(vars: &[(&str, &str)]) -> Result<Option<Placement>> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Placement::from_vars(|name| map.get(name).cloned())
    }

    #[test]
    fn placement_comes_from_the_launcher_environment() {
        assert_eq!(placement(&[]).unwrap(), None);
        let ompi = [("OMPI_COMM_WORLD_RANK", "2"), ("OMPI_COMM_WORLD_SIZE", "3"), ("OMPI_COMM_WORLD_LOCAL_RANK", "1")];
        assert_eq!(placement(&ompi).unwrap(), Some(Placement { rank: 2, world_size: 3, local_rank: 1 }));
        // Open MPI's variables win over an enclosing Slurm allocation's.
        let nested = [ompi.as_slice(), &[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]].concat();
        assert_eq!(placement(&nested).unwrap().unwrap().rank, 2);
        let slurm = [("SLURM_PROCID", "5"), ("SLURM_NTASKS", "8"), ("SLURM_LOCALID", "1")];
        assert_eq!(placement(&slurm).unwrap(), Some(Placement { rank: 5, world_size: 8, local_rank: 1 }));
        let err = placement(&[("PMI_RANK", "4"), ("PMI_SIZE", "4")]).unwrap_err();
        assert!(err.to_string().contains("PMI_RANK=4"), "{err}");
        let err = placement(&[("PMI_RANK", "x"), ("PMI_SIZE", "4")]).unwrap_err();
        assert!(err.to_string().contains("PMI_RANK"), "{err}");
    }

    /// Without a GPU (or NCCL), joining NCCL fails with an error that says what is missing.
    #[cfg(feature = "cuda")]
    #[test]
    fn nccl_without_a_gpu_is_a_clear_error() {
        if tch::Cuda::is_available() {
            return; // a GPU machine: kernels/gpu-check.sh runs the real collectives there
        }
        let err = match nccl::NcclComm::init(&SingleProcess, 0, Duration::from_secs(5)) {
            Ok(_) => panic!("NCCL initialized without a CUDA device"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains("needs a CUDA device") || err.contains("NCCL could not be loaded"), "{err}");
    }

    #[test]
    fn a_single_process_is_the_identity() {
        let dist = init(DistOptions { timeout: Duration::from_secs(1) }).unwrap();
        let comm = dist.comm();
        assert_eq!((comm.rank(), comm.world_size()), (0, 1));
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        comm.all_reduce(&t, ReduceOp::Avg).unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), [1.0, 2.0, 3.0]);
        assert_eq!(Vec::<f32>::try_from(&comm.all_gather(&t).unwrap()).unwrap(), [1.0, 2.0, 3.0]);
        assert!(comm.broadcast(&t, 1).is_err());
        comm.barrier().unwrap();
    }
}
