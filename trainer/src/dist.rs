//! Collectives between training processes (architecture.md, seam 5): the [`Communicator`] trait
//! that training code calls, with one implementation for a single process, one over MPI for
//! CPU tensors and, with the cargo feature `cuda`, one over NCCL for CUDA tensors ([`nccl`]).
//! Only this module touches MPI and NCCL.
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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mpi::collective::SystemOperation;
use mpi::datatype::Equivalence;
use mpi::environment::Universe;
use mpi::raw::AsRaw;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives, Root};
use tch::{Device, Kind, Tensor};

/// NCCL collectives for CUDA tensors (feature `cuda`; loaded at run time).
#[cfg(feature = "cuda")]
pub mod nccl;

/// The exit status of a process whose collective timed out (EX_TEMPFAIL: a requeue may help).
pub const TIMEOUT_EXIT_CODE: i32 = 75;

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
                mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 1);
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

/// `mpirun -np N` with the flags bd3's jobs need on one machine: as root too (containers), more
/// ranks than cores, no core binding (each rank runs libtorch's own thread pool), and shared
/// memory without the single-copy mechanism that containers' ptrace restrictions refuse.
pub fn mpirun_command(np: usize) -> std::process::Command {
    let mut cmd = std::process::Command::new("mpirun");
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .args(["-np", &np.to_string(), "--oversubscribe", "--bind-to", "none"])
        .args(["--mca", "btl_vader_single_copy_mechanism", "none"]);
    cmd
}

/// Set by SIGTERM or SIGUSR1 (the schedulers' "stop soon" signals), read once per training step.
static STOP_SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    // Only an atomic store: the one kind of work that is safe inside a signal handler.
    STOP_SIGNALLED.store(true, Ordering::SeqCst);
}

/// Makes SIGTERM and SIGUSR1 request a coordinated stop instead of ending the process, so that
/// a preempted job saves a checkpoint first (see [`stop_requested`]).
pub fn catch_stop_signals() -> Result<()> {
    for signal in [libc::SIGTERM, libc::SIGUSR1] {
        // SAFETY: a zeroed sigaction is a valid value; the handler only stores to an atomic.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_stop_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        ensure!(rc == 0, "installing the handler of signal {signal}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether any rank received SIGTERM or SIGUSR1. A collective: every rank calls it at the same
/// point of each step, so all ranks see the same answer and stop after the same step.
pub fn stop_requested(comm: &dyn Communicator) -> Result<bool> {
    let here = STOP_SIGNALLED.load(Ordering::SeqCst);
    if comm.world_size() == 1 {
        return Ok(here);
    }
    let flag = Tensor::from_slice(&[i64::from(here)]);
    comm.all_reduce(&flag, ReduceOp::Sum)?;
    Ok(flag.int64_value(&[0]) > 0)
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

/// Collectives over `MPI_COMM_WORLD` for CPU tensors.
pub struct MpiComm {
    world: SimpleCommunicator,
    /// The value of `MPI_IN_PLACE` of the MPI library in use, which the `mpi` crate does not
    /// expose: it saves a copy of every all-reduced buffer. `None` for an unknown library.
    in_place: Option<usize>,
    watchdog: Watchdog,
    // Dropped last: finalizes MPI.
    _universe: Universe,
}

impl MpiComm {
    /// Initializes MPI; fails if this process already did (MPI allows it once per process).
    pub fn init(options: DistOptions) -> Result<Self> {
        // Multiple: the watchdog thread and an async checkpoint writer may outlive a collective.
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Multiple)
            .context("MPI was already initialized in this process (it can be only once)")?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let in_place = in_place_marker(&mpi::environment::library_version().unwrap_or_default());
        Ok(Self { world, in_place, watchdog: Watchdog::start(rank, size, options.timeout), _universe: universe })
    }

    /// The MPI communicator itself (benchmarks compare against raw MPI calls on it).
    pub fn world(&self) -> &SimpleCommunicator {
        &self.world
    }

    /// `t` as a mutable slice of `T`, after checking that MPI can read and write it directly.
    /// From `&Tensor`: a tch tensor is a handle, and writing through it is how libtorch's own
    /// in-place operations work too.
    #[allow(clippy::mut_from_ref)]
    fn cpu_slice<T>(t: &Tensor) -> Result<&mut [T]> {
        check_cpu_contiguous(t)?;
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        ensure!(bytes % std::mem::size_of::<T>() == 0, "tensor of {bytes} bytes is not a whole number of elements");
        // SAFETY: the tensor is a contiguous CPU tensor of `bytes` bytes, and libtorch aligns its
        // CPU allocations to at least 64 bytes. The slice does not outlive the collective call it
        // is made for, during which nothing else uses the tensor.
        Ok(unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, bytes / std::mem::size_of::<T>()) })
    }

    fn all_reduce_typed<T: Equivalence + Copy>(&self, t: &Tensor) -> Result<()> {
        let data = Self::cpu_slice::<T>(t)?;
        let Some(in_place) = self.in_place else {
            let send = data.to_vec();
            let _watch = self.watchdog.enter("all_reduce");
            self.world.all_reduce_into(&send[..], data, SystemOperation::sum());
            return Ok(());
        };
        let _watch = self.watchdog.enter("all_reduce");
        // MPI counts are C ints.
        for chunk in data.chunks_mut(1 << 30) {
            // SAFETY: MPI_IN_PLACE as the send buffer and a live, writable buffer of `chunk.len()`
            // elements of T's MPI type as the receive buffer, on this process's communicator.
            let rc = unsafe {
                mpi::ffi::MPI_Allreduce(
                    in_place as *const std::ffi::c_void,
                    chunk.as_mut_ptr().cast(),
                    chunk.len() as i32,
                    T::equivalent_datatype().as_raw(),
                    SystemOperation::sum().as_raw(),
                    self.world.as_raw(),
                )
            };
            ensure!(rc == 0, "MPI_Allreduce failed with code {rc}");
        }
        Ok(())
    }

    fn reduce_scatter_typed<T: Equivalence + Copy>(&self, input: &Tensor, out: &Tensor) -> Result<()> {
        let send = Self::cpu_slice::<T>(input)?;
        let recv = Self::cpu_slice::<T>(out)?;
        let _watch = self.watchdog.enter("reduce_scatter");
        self.world.reduce_scatter_block_into(&send[..], recv, SystemOperation::sum());
        Ok(())
    }

    /// The kind in which `kind` is summed: itself, or f32 for the 16-bit floats.
    fn reduction_kind(kind: Kind) -> Result<Kind> {
        Ok(match kind {
            Kind::Float | Kind::Double | Kind::Int64 => kind,
            Kind::BFloat16 | Kind::Half => Kind::Float,
            _ => bail!("MPI reductions support f32, f64, i64, bf16 and f16 tensors, not {kind:?}"),
        })
    }

    fn sum_in_place(&self, t: &Tensor) -> Result<()> {
        match t.kind() {
            Kind::Float => self.all_reduce_typed::<f32>(t),
            Kind::Double => self.all_reduce_typed::<f64>(t),
            Kind::Int64 => self.all_reduce_typed::<i64>(t),
            _ => unreachable!("reduction_kind admits only these"),
        }
    }
}

/// `MPI_IN_PLACE` is a macro: `(void *) 1` in Open MPI's `mpi.h`, `(void *) -1` in MPICH's and
/// its derivatives'. Recognized from `MPI_Get_library_version`; `None` for another library.
fn in_place_marker(library_version: &str) -> Option<usize> {
    if library_version.contains("Open MPI") {
        Some(1)
    } else if ["MPICH", "MVAPICH", "Intel(R) MPI"].iter().any(|name| library_version.contains(name)) {
        Some(usize::MAX)
    } else {
        None
    }
}

fn check_cpu_contiguous(t: &Tensor) -> Result<()> {
    ensure!(t.device() == Device::Cpu, "MPI collectives take CPU tensors; this one is on {:?}", t.device());
    ensure!(t.is_contiguous(), "MPI collectives take contiguous tensors");
    Ok(())
}

/// Divides a sum over `world` ranks into a mean, in place.
fn average(t: &Tensor, world: usize) {
    let mut t = t.shallow_clone();
    if t.is_floating_point() {
        let _ = t.divide_scalar_(world as f64);
    } else {
        let _ = t.floor_divide_scalar_(world as i64);
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn world_size(&self) -> usize {
        self.world.size() as usize
    }

    fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<()> {
        check_cpu_contiguous(tensor)?;
        let kind = Self::reduction_kind(tensor.kind())?;
        if kind == tensor.kind() {
            self.sum_in_place(tensor)?;
        } else {
            let wide = tensor.to_kind(kind);
            self.sum_in_place(&wide)?;
            tensor.shallow_clone().copy_(&wide);
        }
        if op == ReduceOp::Avg {
            average(tensor, self.world_size());
        }
        Ok(())
    }

    fn reduce_scatter(&self, input: &Tensor, op: ReduceOp) -> Result<Tensor> {
        check_cpu_contiguous(input)?;
        let world = self.world_size();
        let n = input.numel();
        ensure!(n % world == 0, "reduce_scatter of {n} elements over {world} ranks: not a multiple of the world size");
        let kind = Self::reduction_kind(input.kind())?;
        let wide = input.flatten(0, -1).to_kind(kind);
        let out = Tensor::empty([(n / world) as i64], (kind, Device::Cpu));
        match kind {
            Kind::Float => self.reduce_scatter_typed::<f32>(&wide, &out)?,
            Kind::Double => self.reduce_scatter_typed::<f64>(&wide, &out)?,
            _ => self.reduce_scatter_typed::<i64>(&wide, &out)?,
        }
        if op == ReduceOp::Avg {
            average(&out, world);
        }
        Ok(out.to_kind(input.kind()))
    }

    fn all_gather(&self, input: &Tensor) -> Result<Tensor> {
        check_cpu_contiguous(input)?;
        let out = Tensor::empty([(input.numel() * self.world_size()) as i64], (input.kind(), Device::Cpu));
        let send = Self::cpu_slice::<u8>(input)?;
        let recv = Self::cpu_slice::<u8>(&out)?;
        let _watch = self.watchdog.enter("all_gather");
        self.world.all_gather_into(&send[..], recv);
        Ok(out)
    }

    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<()> {
        let world = self.world_size();
        ensure!(root < world, "broadcast from rank {root} in a job of {world}");
        let data = Self::cpu_slice::<u8>(tensor)?;
        let _watch = self.watchdog.enter("broadcast");
        self.world.process_at_rank(root as i32).broadcast_into(data);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        let _watch = self.watchdog.enter("barrier");
        self.world.barrier();
        Ok(())
    }
}

/// How [`all_reduce_bucketed`] and [`GradBuckets`] group tensors: consecutive tensors of one type
/// share a bucket of at most `bucket_bytes` (a larger tensor goes alone), so every rank packs the
/// same buckets.
fn bucket_groups(tensors: &[Tensor], bucket_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let mut groups = vec![];
    let mut start = 0;
    while start < tensors.len() {
        let kind = tensors[start].kind();
        let mut end = start;
        let mut bytes = 0;
        while end < tensors.len() && tensors[end].kind() == kind {
            let size = tensors[end].numel() * kind.elt_size_in_bytes();
            if end > start && bytes + size > bucket_bytes {
                break;
            }
            bytes += size;
            end += 1;
        }
        groups.push(start..end);
        start = end;
    }
    groups
}

/// Sums or averages `tensors` over all ranks, packed into flat buffers of at most `bucket_bytes`
/// (one collective per bucket instead of one per tensor; a tensor larger than a bucket goes alone).
/// Packing costs a copy in and a copy out; gradients avoid both by living in [`GradBuckets`].
pub fn all_reduce_bucketed(
    comm: &dyn Communicator,
    tensors: &[Tensor],
    op: ReduceOp,
    bucket_bytes: usize,
) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(()); // the identity, without the copies
    }
    for range in bucket_groups(tensors, bucket_bytes) {
        let group = &tensors[range];
        let flat = Tensor::cat(&group.iter().map(|t| t.flatten(0, -1)).collect::<Vec<_>>(), 0);
        comm.all_reduce(&flat, op)?;
        let mut offset = 0;
        for t in group {
            let n = t.numel() as i64;
            t.shallow_clone().copy_(&flat.narrow(0, offset, n).view_as(t));
            offset += n;
        }
    }
    Ok(())
}

/// Flat buffers that the parameters' gradients are views of (PyTorch DDP's "gradient as bucket
/// view"): backward accumulates straight into them, and averaging the gradients over the ranks is
/// one in-place all-reduce per bucket, without the packing copies of [`all_reduce_bucketed`].
pub struct GradBuckets {
    buckets: Vec<Tensor>,
    /// Each parameter's place in its bucket, shaped like the parameter.
    views: Vec<Tensor>,
}

impl GradBuckets {
    /// Zeroed buckets for tensors shaped like `like`, grouped as [`all_reduce_bucketed`] does.
    pub fn new(like: &[Tensor], bucket_bytes: usize) -> Self {
        let (mut buckets, mut views) = (vec![], vec![]);
        for range in bucket_groups(like, bucket_bytes) {
            let group = &like[range];
            let n: usize = group.iter().map(Tensor::numel).sum();
            buckets.push(Self::bucket_for(group, n, &mut views));
        }
        Self { buckets, views }
    }

    /// One zeroed bucket of `len` elements (at least those of `like`, of one type; the rest is
    /// padding) for all of `like`: ZeRO's flat gradient.
    pub fn single(like: &[Tensor], len: usize) -> Self {
        let mut views = vec![];
        let bucket = Self::bucket_for(like, len, &mut views);
        Self { buckets: vec![bucket], views }
    }

    /// A zeroed flat buffer of `len` elements whose first elements `views` receives, shaped like
    /// the tensors of `group` in order.
    fn bucket_for(group: &[Tensor], len: usize, views: &mut Vec<Tensor>) -> Tensor {
        let (kind, device) = group.first().map_or((Kind::Float, Device::Cpu), |t| (t.kind(), t.device()));
        let flat = Tensor::zeros([len as i64], (kind, device));
        let mut offset = 0;
        for t in group {
            let n = t.numel() as i64;
            views.push(flat.narrow(0, offset, n).view_as(t));
            offset += n;
        }
        flat
    }

    /// The flat buffers.
    pub fn buckets(&self) -> &[Tensor] {
        &self.buckets
    }

    /// The tensors the buckets hold, in the order of `like`.
    pub fn views(&self) -> &[Tensor] {
        &self.views
    }

    /// Makes every parameter's gradient its view in the buckets. A gradient that already is
    /// costs nothing (every step after the first, as backward accumulates in place); another is
    /// copied in and re-pointed. A parameter without gradient gets zeros in its place and stays
    /// without one.
    pub fn adopt_gradients(&self, params: &[Tensor]) -> Result<()> {
        ensure!(
            params.len() == self.views.len(),
            "{} gradient views for {} parameters",
            self.views.len(),
            params.len()
        );
        tch::no_grad(|| {
            for (p, view) in params.iter().zip(&self.views) {
                let mut grad = p.grad();
                if !grad.defined() {
                    let _ = view.shallow_clone().zero_();
                } else if grad.data_ptr() != view.data_ptr() {
                    view.shallow_clone().copy_(&grad);
                    // Re-points the gradient's storage (shared by every handle to it) at the view.
                    let _ = grad.set_source_tensor_(view);
                }
            }
        });
        Ok(())
    }

    /// Reduces every bucket over all ranks, in place.
    pub fn all_reduce(&self, comm: &dyn Communicator, op: ReduceOp) -> Result<()> {
        if comm.world_size() > 1 {
            for b in &self.buckets {
                comm.all_reduce(b, op)?;
            }
        }
        Ok(())
    }
}

/// Aborts the process when a collective takes longer than the timeout (see the module docs).
struct Watchdog {
    shared: Arc<WatchState>,
    thread: Option<JoinHandle<()>>,
}

struct WatchState {
    epoch: Instant,
    /// Milliseconds since `epoch` at which the running collective started, plus one; 0 = none.
    started: AtomicU64,
    /// Collectives entered so far: identifies the one that hung in the error message.
    count: AtomicU64,
    op: Mutex<&'static str>,
    stop: AtomicBool,
}

struct WatchGuard<'a>(&'a WatchState);

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        self.0.started.store(0, Ordering::SeqCst);
    }
}

impl Watchdog {
    fn start(rank: usize, world: usize, timeout: Duration) -> Self {
        let shared = Arc::new(WatchState {
            epoch: Instant::now(),
            started: AtomicU64::new(0),
            count: AtomicU64::new(0),
            op: Mutex::new(""),
            stop: AtomicBool::new(false),
        });
        let state = Arc::clone(&shared);
        // Polling a twentieth of the timeout bounds the overshoot to 5 %.
        let poll = (timeout / 20).clamp(Duration::from_millis(10), Duration::from_millis(500));
        let thread = std::thread::Builder::new()
            .name("bd3-dist-watchdog".into())
            .spawn(move || {
                while !state.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(poll);
                    let started = state.started.load(Ordering::SeqCst);
                    if started == 0 {
                        continue;
                    }
                    let since = Duration::from_millis(started - 1);
                    if state.epoch.elapsed().saturating_sub(since) > timeout {
                        let op = *state.op.lock().unwrap_or_else(|e| e.into_inner());
                        let count = state.count.load(Ordering::SeqCst);
                        // One write of the whole line: the launcher merges every rank's stderr.
                        let line = format!(
                            "bd3 rank {rank}/{world}: collective #{count} ({op}) did not complete within {:.1} s \
                             (dist.timeout_s): a peer rank has died or stopped; exiting\n",
                            timeout.as_secs_f64()
                        );
                        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
                        // _exit: no MPI_Finalize or destructors, which could wait on the dead peer.
                        // SAFETY: _exit ends the process immediately; no Rust state is used after.
                        unsafe { libc::_exit(TIMEOUT_EXIT_CODE) };
                    }
                }
            })
            .expect("spawning the collective watchdog thread");
        Self { shared, thread: Some(thread) }
    }

    fn enter(&self, op: &'static str) -> WatchGuard<'_> {
        let s = &self.shared;
        *s.op.lock().unwrap_or_else(|e| e.into_inner()) = op;
        s.count.fetch_add(1, Ordering::SeqCst);
        s.started.store(s.epoch.elapsed().as_millis() as u64 + 1, Ordering::SeqCst);
        WatchGuard(s)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
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
            return; // a GPU machine: trainer/nccl-check.sh runs the real collectives there
        }
        let err = match nccl::NcclComm::init(&SingleProcess, 0, Duration::from_secs(5)) {
            Ok(_) => panic!("NCCL initialized without a CUDA device"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains("needs a CUDA device") || err.contains("NCCL could not be loaded"), "{err}");
    }

    /// Gradients adopted into the buckets stay there: the next backward accumulates in place.
    #[test]
    fn gradients_live_in_their_buckets_across_steps() {
        let params: Vec<Tensor> = [vec![3i64, 2], vec![5], vec![4]]
            .iter()
            .map(|s| Tensor::ones(s.as_slice(), (Kind::Float, Device::Cpu)).set_requires_grad(true))
            .collect();
        // Small buckets: the first two parameters share one, the last goes alone.
        let buckets = GradBuckets::new(&params, 11 * 4);
        assert_eq!(buckets.buckets.len(), 2);
        for step in 1..=3 {
            for p in &params {
                p.shallow_clone().zero_grad();
            }
            // The last parameter gets no gradient on step 2.
            let used = if step == 2 { &params[..2] } else { &params[..] };
            let loss: Tensor = used.iter().map(|p| (p * step as f64).sum(Kind::Float)).sum();
            loss.backward();
            buckets.adopt_gradients(&params).unwrap();
            for (i, (p, view)) in params.iter().zip(buckets.views()).enumerate() {
                if step == 2 && i == 2 {
                    assert_eq!(view.abs().sum(Kind::Float).double_value(&[]), 0.0);
                    continue;
                }
                assert_eq!(p.grad().data_ptr(), view.data_ptr(), "step {step}, parameter {i}");
                assert!(view.equal(&Tensor::full_like(view, step as f64)), "step {step}, parameter {i}: {view}");
            }
            buckets.all_reduce(&SingleProcess, ReduceOp::Avg).unwrap();
        }
    }

    #[test]
    fn mpi_in_place_is_known_for_open_mpi_and_mpich() {
        assert_eq!(in_place_marker("Open MPI v4.1.4, package: Debian OpenMPI"), Some(1));
        assert_eq!(in_place_marker("MPICH Version:\t4.0.2"), Some(usize::MAX));
        assert_eq!(in_place_marker("Some Other MPI 1.0"), None);
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
