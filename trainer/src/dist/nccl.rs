//! NCCL collectives for CUDA tensors (cargo feature `cuda`).
//!
//! NCCL is not linked: `libnccl.so.2` — the one PyTorch's CUDA wheel ships in
//! `site-packages/nvidia/nccl/lib`, already loaded in the process when libtorch_cuda is — is opened
//! at run time with `dlopen` (`BD3_NCCL_LIB` names another file). A machine without NCCL or
//! without a GPU fails in [`NcclComm::init`] with an error that says which.
//!
//! **Bootstrap.** Rank 0 creates the NCCL unique id and broadcasts its 128 bytes over the job's
//! CPU communicator (MPI); every rank then joins with `ncclCommInitRank` on CUDA device
//! `local_rank`.
//!
//! **Streams.** A blocking collective (`all_reduce`, `reduce_scatter`, …) is enqueued on libtorch's
//! *current* CUDA stream of the device (reached through bd3-kernels' C++ glue), so it runs after
//! the kernels that produced its input and before those that consume its output, and the call
//! then waits for that stream under the same watchdog as the MPI collectives: a dead peer makes
//! every other rank exit after `dist.timeout_s` instead of hanging in a later kernel.
//!
//! The gradient reductions overlapped with backward (`*_beside_compute`, called by
//! trainer::dist::overlap as buckets complete) do not wait on the host. Each one goes on a
//! communication stream of its own (a libtorch pool stream) after an event recorded on the
//! compute stream (libtorch's current stream of the thread that created the communicator, which
//! backward's kernels run on) when the communication thread takes the bucket: after the kernels
//! that completed it, perhaps after a few more; the compute stream goes on with the rest of
//! backward. [`Communicator::finish_beside_compute`] makes the compute stream wait,
//! on the device, for everything the communication stream was given. The host never blocks in
//! between; the watchdog polls an event recorded after each collective instead.
//!
//! Memory: the buckets are long-lived flat buffers, and a reduce-scatter's output is allocated
//! for the compute stream before the collective is enqueued and is first read after
//! `finish_beside_compute`, so libtorch's caching allocator never hands either to other work
//! while the communication stream still uses it.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use kernels::cuda::{Event, Stream as CudaStream};
use tch::{Device, Kind, Tensor};

use super::watchdog::Watchdog;
use super::{Communicator, ReduceOp};

/// `ncclUniqueId`: 128 opaque bytes.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [u8; 128],
}

type RawComm = *mut c_void;
type Stream = *mut c_void;

// The signatures of the NCCL entry points bd3 uses (nccl.h of NCCL 2.28; stable since 2.10).
type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
type GetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> c_int;
type CommInitRank = unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int) -> c_int;
type CommDestroy = unsafe extern "C" fn(RawComm) -> c_int;
type GetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
/// ncclAllReduce and ncclReduceScatter: send, receive, count, type, op, comm, stream.
type Reduce = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, Stream) -> c_int;
type AllGather = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, RawComm, Stream) -> c_int;
/// ncclBroadcast: send, receive, count, type, root, comm, stream.
type Broadcast = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, Stream) -> c_int;

/// The NCCL entry points, from the loaded library.
struct Library {
    get_version: GetVersion,
    get_unique_id: GetUniqueId,
    comm_init_rank: CommInitRank,
    comm_destroy: CommDestroy,
    get_error_string: GetErrorString,
    all_reduce: Reduce,
    reduce_scatter: Reduce,
    all_gather: AllGather,
    broadcast: Broadcast,
}

// ncclDataType_t and ncclRedOp_t values (nccl.h).
const NCCL_UINT8: c_int = 1;
const NCCL_INT32: c_int = 2;
const NCCL_INT64: c_int = 4;
const NCCL_FLOAT16: c_int = 6;
const NCCL_FLOAT32: c_int = 7;
const NCCL_FLOAT64: c_int = 8;
const NCCL_BFLOAT16: c_int = 9;
const NCCL_SUM: c_int = 0;
const NCCL_AVG: c_int = 4;

fn dlerror() -> String {
    // SAFETY: dlerror returns a thread-local NUL-terminated string or null.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: non-null, NUL-terminated (above).
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

impl Library {
    fn load() -> Result<Self> {
        let file = std::env::var("BD3_NCCL_LIB").unwrap_or_else(|_| "libnccl.so.2".into());
        let name = CString::new(file.clone()).context("BD3_NCCL_LIB contains a NUL byte")?;
        // SAFETY: dlopen with a valid C string; the library stays loaded for the process's
        // lifetime (libtorch may share it), so the function pointers below never dangle.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if handle.is_null() {
            bail!(
                "NCCL could not be loaded ({file}: {}): it ships with PyTorch's CUDA wheel in \
                 site-packages/nvidia/nccl/lib; put that directory on LD_LIBRARY_PATH or name the \
                 file in BD3_NCCL_LIB",
                dlerror()
            );
        }
        let symbol = |name: &str| -> Result<*mut c_void> {
            let c = CString::new(name).expect("symbol names have no NUL");
            // SAFETY: a live handle and a valid C string.
            let f = unsafe { libc::dlsym(handle, c.as_ptr()) };
            ensure!(!f.is_null(), "{file} has no symbol {name}: not an NCCL library ({})", dlerror());
            Ok(f)
        };
        // SAFETY (every transmute): each symbol is the nccl.h function of that signature.
        unsafe {
            Ok(Self {
                get_version: std::mem::transmute::<*mut c_void, GetVersion>(symbol("ncclGetVersion")?),
                get_unique_id: std::mem::transmute::<*mut c_void, GetUniqueId>(symbol("ncclGetUniqueId")?),
                comm_init_rank: std::mem::transmute::<*mut c_void, CommInitRank>(symbol("ncclCommInitRank")?),
                comm_destroy: std::mem::transmute::<*mut c_void, CommDestroy>(symbol("ncclCommDestroy")?),
                get_error_string: std::mem::transmute::<*mut c_void, GetErrorString>(symbol("ncclGetErrorString")?),
                all_reduce: std::mem::transmute::<*mut c_void, Reduce>(symbol("ncclAllReduce")?),
                reduce_scatter: std::mem::transmute::<*mut c_void, Reduce>(symbol("ncclReduceScatter")?),
                all_gather: std::mem::transmute::<*mut c_void, AllGather>(symbol("ncclAllGather")?),
                broadcast: std::mem::transmute::<*mut c_void, Broadcast>(symbol("ncclBroadcast")?),
            })
        }
    }

    /// `Err` naming `what` for a failed NCCL call.
    fn check(&self, code: c_int, what: &str) -> Result<()> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: NCCL returns a static string for every result code.
        let text = unsafe { CStr::from_ptr((self.get_error_string)(code)) }.to_string_lossy().into_owned();
        bail!("NCCL {what} failed: {text} (code {code})")
    }

    fn version(&self) -> Result<i32> {
        let mut v = 0;
        // SAFETY: writes one int.
        self.check(unsafe { (self.get_version)(&mut v) }, "ncclGetVersion")?;
        Ok(v)
    }
}

/// The version of the NCCL library bd3 would load, as `major.minor.patch` (for `run.json`).
pub fn library_version() -> Result<String> {
    let v = Library::load()?.version()?;
    // NCCL ≥ 2.9 encodes major·10000 + minor·100 + patch.
    Ok(format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100))
}

/// NCCL's type for a tensor kind.
fn nccl_type(kind: Kind) -> Result<c_int> {
    Ok(match kind {
        Kind::Float => NCCL_FLOAT32,
        Kind::Double => NCCL_FLOAT64,
        Kind::Half => NCCL_FLOAT16,
        Kind::BFloat16 => NCCL_BFLOAT16,
        Kind::Int64 => NCCL_INT64,
        Kind::Int => NCCL_INT32,
        Kind::Uint8 => NCCL_UINT8,
        _ => bail!("NCCL collectives support f32, f64, f16, bf16, i64, i32 and u8 tensors, not {kind:?}"),
    })
}

/// How a collective is ordered (module docs, Streams).
#[derive(Clone, Copy)]
enum When {
    /// On libtorch's current stream, waited for by the host.
    Waited,
    /// On the communication stream after the compute stream's work so far, not waited for.
    BesideCompute,
}

/// Collectives over NCCL for CUDA tensors on this rank's device.
pub struct NcclComm {
    lib: Library,
    comm: RawComm,
    device: usize,
    rank: usize,
    world: usize,
    watchdog: Watchdog,
    /// The stream backward's kernels run on (see the module docs).
    compute: CudaStream,
    /// The stream of the collectives overlapped with backward.
    side: CudaStream,
}

impl NcclComm {
    /// Joins the NCCL communicator of the job that `cpu` (MPI, or a single process) spans, on
    /// CUDA device `local_rank`.
    pub fn init(cpu: &dyn Communicator, local_rank: usize, timeout: Duration) -> Result<Self> {
        let (rank, world) = (cpu.rank(), cpu.world_size());
        // Every rank finds out about its own machine first; the failure names what is missing.
        let lib = Library::load()?;
        let devices = tch::Cuda::device_count() as usize;
        ensure!(
            devices > 0,
            "NCCL needs a CUDA device and libtorch sees none (no GPU, no driver, or a binary \
             built without libtorch_cuda)"
        );
        ensure!(local_rank < devices, "local rank {local_rank} has no CUDA device: this machine has {devices}");
        let version = lib.version()?;
        ensure!(version >= 21000, "NCCL {version} is too old: bf16 and averaging need 2.10 or newer");
        // Makes the device current for ncclCommInitRank.
        let compute = CudaStream(kernels::cuda::current_stream(local_rank)?);
        let side = kernels::cuda::pool_stream(local_rank)?;
        let mut id = UniqueId { internal: [0; 128] };
        if rank == 0 {
            // SAFETY: writes one ncclUniqueId.
            lib.check(unsafe { (lib.get_unique_id)(&mut id) }, "ncclGetUniqueId")?;
        }
        let bytes = Tensor::from_slice(&id.internal);
        cpu.broadcast(&bytes, 0).context("broadcasting the NCCL unique id")?;
        bytes.copy_data_u8(&mut id.internal, 128);
        let mut comm = std::ptr::null_mut();
        let watchdog = Watchdog::start(rank, world, timeout);
        {
            let _watch = watchdog.enter("ncclCommInitRank");
            // SAFETY: a valid out-pointer, the id every rank received, this rank's place.
            lib.check(
                unsafe { (lib.comm_init_rank)(&mut comm, world as c_int, id, rank as c_int) },
                "ncclCommInitRank",
            )?;
        }
        Ok(Self { lib, comm, device: local_rank, rank, world, watchdog, compute, side })
    }

    pub fn device(&self) -> Device {
        Device::Cuda(self.device)
    }

    fn check_tensor(&self, t: &Tensor) -> Result<c_int> {
        ensure!(
            t.device() == self.device(),
            "NCCL collectives on this rank take tensors on {:?}; this one is on {:?}",
            self.device(),
            t.device()
        );
        ensure!(t.is_contiguous(), "NCCL collectives take contiguous tensors");
        nccl_type(t.kind())
    }

    /// Enqueues `call(stream)` on libtorch's current stream and waits for it under the watchdog.
    fn run(&self, what: &'static str, call: impl FnOnce(Stream) -> c_int) -> Result<()> {
        let stream = kernels::cuda::current_stream(self.device)?;
        let _watch = self.watchdog.enter(what);
        self.lib.check(call(stream), what)?;
        kernels::cuda::synchronize(self.device)
    }

    /// Enqueues `call(stream)` on the communication stream after the work enqueued on the compute
    /// stream so far, without waiting (see the module docs); the watchdog follows it.
    fn run_beside_compute(&self, what: &'static str, call: impl FnOnce(Stream) -> c_int) -> Result<()> {
        // Makes the device current on this thread (the overlap's communication thread).
        kernels::cuda::current_stream(self.device)?;
        let ready = Event::recorded(self.device, self.compute).with_context(|| format!("ordering {what}"))?;
        ready.block(self.side).with_context(|| format!("ordering {what}"))?;
        self.lib.check(call(self.side.0), what)?;
        let done = Event::recorded(self.device, self.side).with_context(|| format!("following {what}"))?;
        // A failed query is a CUDA error, which the training thread meets at its next call.
        self.watchdog.track(what, move || done.is_done().unwrap_or(true));
        Ok(())
    }

    fn launch(&self, when: When, what: &'static str, call: impl FnOnce(Stream) -> c_int) -> Result<()> {
        match when {
            When::Waited => self.run(what, call),
            When::BesideCompute => self.run_beside_compute(what, call),
        }
    }

    fn all_reduce_at(&self, when: When, tensor: &Tensor, op: ReduceOp) -> Result<()> {
        let dtype = self.check_tensor(tensor)?;
        let ptr = tensor.data_ptr();
        // SAFETY (every collective below): device pointers of live contiguous tensors of the
        // element counts passed, on this communicator's device, that outlive the collective
        // (waited for, or module docs, Memory).
        self.launch(when, "ncclAllReduce", |s| unsafe {
            (self.lib.all_reduce)(ptr, ptr, tensor.numel(), dtype, Self::op(op), self.comm, s)
        })
    }

    fn reduce_scatter_at(&self, when: When, input: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let dtype = self.check_tensor(input)?;
        let n = input.numel();
        ensure!(
            n % self.world == 0,
            "reduce_scatter of {n} elements over {} ranks: not a multiple of the world size",
            self.world
        );
        let out = Tensor::empty([(n / self.world) as i64], (input.kind(), self.device()));
        self.launch(when, "ncclReduceScatter", |s| unsafe {
            let (send, recv) = (input.data_ptr(), out.data_ptr());
            (self.lib.reduce_scatter)(send, recv, n / self.world, dtype, Self::op(op), self.comm, s)
        })?;
        Ok(out)
    }

    fn op(op: ReduceOp) -> c_int {
        match op {
            ReduceOp::Sum => NCCL_SUM,
            ReduceOp::Avg => NCCL_AVG,
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: the communicator was created by ncclCommInitRank and is destroyed once.
        unsafe { (self.lib.comm_destroy)(self.comm) };
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<()> {
        self.all_reduce_at(When::Waited, tensor, op)
    }

    fn reduce_scatter(&self, input: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.reduce_scatter_at(When::Waited, input, op)
    }

    fn all_reduce_beside_compute(&self, tensor: &Tensor, op: ReduceOp) -> Result<()> {
        self.all_reduce_at(When::BesideCompute, tensor, op)
    }

    fn reduce_scatter_beside_compute(&self, input: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.reduce_scatter_at(When::BesideCompute, input, op)
    }

    fn finish_beside_compute(&self) -> Result<()> {
        let current = CudaStream(kernels::cuda::current_stream(self.device)?);
        ensure!(
            current == self.compute,
            "the training thread's CUDA stream changed since NCCL started: the overlapped gradient \
             reduction orders itself after the stream backward ran on when NcclComm::init was called"
        );
        Event::recorded(self.device, self.side)?.block(self.compute).context("waiting for the overlapped collectives")
    }

    fn all_gather(&self, input: &Tensor) -> Result<Tensor> {
        let dtype = self.check_tensor(input)?;
        let out = Tensor::empty([(input.numel() * self.world) as i64], (input.kind(), self.device()));
        self.run("ncclAllGather", |s| unsafe {
            (self.lib.all_gather)(input.data_ptr(), out.data_ptr(), input.numel(), dtype, self.comm, s)
        })?;
        Ok(out)
    }

    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<()> {
        ensure!(root < self.world, "broadcast from rank {root} in a job of {}", self.world);
        self.check_tensor(tensor)?;
        // Bytes: exact for every type.
        let (ptr, bytes) = (tensor.data_ptr(), tensor.numel() * tensor.kind().elt_size_in_bytes());
        self.run("ncclBroadcast", |s| unsafe {
            (self.lib.broadcast)(ptr, ptr, bytes, NCCL_UINT8, root as c_int, self.comm, s)
        })
    }

    fn barrier(&self) -> Result<()> {
        self.all_reduce(&Tensor::zeros([1], (Kind::Float, self.device())), ReduceOp::Sum)
    }
}

/// The communicator of a run on several GPUs: collectives on CUDA tensors (gradients, weights)
/// go over NCCL, those on CPU tensors (the loss, the stop flag) over the job's CPU communicator.
pub struct Routed<'a> {
    cpu: &'a dyn Communicator,
    nccl: NcclComm,
}

impl<'a> Routed<'a> {
    /// Joins NCCL on CUDA device `local_rank` next to `cpu`.
    pub fn new(cpu: &'a dyn Communicator, local_rank: usize, timeout: Duration) -> Result<Self> {
        Ok(Self { nccl: NcclComm::init(cpu, local_rank, timeout)?, cpu })
    }

    fn pick(&self, t: &Tensor) -> &dyn Communicator {
        if t.device().is_cuda() {
            &self.nccl
        } else {
            self.cpu
        }
    }
}

impl Communicator for Routed<'_> {
    fn rank(&self) -> usize {
        self.cpu.rank()
    }
    fn world_size(&self) -> usize {
        self.cpu.world_size()
    }
    fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<()> {
        self.pick(tensor).all_reduce(tensor, op)
    }
    fn reduce_scatter(&self, input: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.pick(input).reduce_scatter(input, op)
    }
    fn all_gather(&self, input: &Tensor) -> Result<Tensor> {
        self.pick(input).all_gather(input)
    }
    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<()> {
        self.pick(tensor).broadcast(tensor, root)
    }
    fn barrier(&self) -> Result<()> {
        self.cpu.barrier()
    }
    fn all_reduce_beside_compute(&self, tensor: &Tensor, op: ReduceOp) -> Result<()> {
        self.pick(tensor).all_reduce_beside_compute(tensor, op)
    }
    fn reduce_scatter_beside_compute(&self, input: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.pick(input).reduce_scatter_beside_compute(input, op)
    }
    fn finish_beside_compute(&self) -> Result<()> {
        self.cpu.finish_beside_compute()?;
        self.nccl.finish_beside_compute()
    }
}
