//! Gradient reduction overlapped with backward (CPU tensors over MPI, CUDA tensors over NCCL).
//!
//! Backward produces gradients from the last layer to the first. A post hook on every
//! parameter's AccumulateGrad node (csrc/grad_ready.cpp) tells [`Overlap`] when a parameter's
//! gradient is complete; when the last parameter of a bucket ([`GradBuckets`]) is, the bucket
//! goes to a communication thread that all-reduces it while backward goes on with earlier layers.
//! After backward, the buckets no hook completed (parameters that got no gradient) follow, and
//! the step waits for the thread. Every rank reduces the same buckets in the same order (the
//! order of backward, the same on every rank) with the same collective as the reduction after
//! backward would: the gradients are bitwise those of the non-overlapped step.
//!
//! The thread starts each reduction with `MPI_Iallreduce` and progresses it with `MPI_Test`,
//! asleep in between (`Communicator::all_reduce_beside_compute`): Open MPI progresses a
//! non-blocking collective only inside MPI calls, and a blocking one busy-polls its core while it
//! waits for the peers, which on a machine without a spare core slows the backward pass it should
//! hide behind. The training thread makes no MPI call meanwhile (MPI was initialized with
//! `MPI_THREAD_MULTIPLE`). Whether `MPI_Iallreduce` adds in the same order as `MPI_Allreduce` is
//! the library's choice: Open MPI's libnbc and its tuned blocking collective may differ, which is
//! why the overlapped path reduces every bucket with it, also the buckets reduced after backward.
//!
//! Over NCCL (CUDA tensors, trainer::dist::nccl) the thread only enqueues: each bucket's
//! collective goes on a communication stream after an event on the compute stream, and returns at
//! once; after backward, `finish_beside_compute` makes the compute stream wait for the
//! communication stream on the device. The host waits for no kernel in the whole step's reduction.

use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Mutex;

use anyhow::{bail, ensure, Context, Result};
use tch::Tensor;
use torch_sys::C_tensor;

use super::{Communicator, GradBuckets, ReduceOp};

extern "C" {
    fn bd3_grad_ready_hook_add(
        param: *const C_tensor,
        fn_: extern "C" fn(*mut c_void, i64),
        ctx: *mut c_void,
        index: i64,
    ) -> *mut c_void;
    fn bd3_grad_ready_hook_remove(handle: *mut c_void);
    fn bd3_grad_ready_error() -> *const std::ffi::c_char;
}

/// What the hooks share with the training thread; boxed, so that its address (the hooks'
/// context) stays put.
struct Shared {
    /// The bucket of each parameter.
    bucket_of: Vec<usize>,
    /// Parameters of each bucket.
    bucket_sizes: Vec<usize>,
    /// Parameters of each bucket whose gradient this backward has not completed yet.
    pending: Vec<AtomicUsize>,
    /// Whether each bucket went to the communication thread in this backward.
    sent: Vec<AtomicBool>,
    /// The communication thread's queue while a reducing backward runs; `None` otherwise (the
    /// hooks then do nothing: backward of an earlier micro-step, validation, …).
    queue: Mutex<Option<Sender<usize>>>,
}

impl Shared {
    fn send(&self, bucket: usize) {
        if !self.sent[bucket].swap(true, Ordering::AcqRel) {
            if let Some(tx) = self.queue.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                let _ = tx.send(bucket); // a stopped thread reports its error at the join
            }
        }
    }
}

/// Called by libtorch's autograd engine after it accumulated parameter `index`'s gradient.
extern "C" fn gradient_ready(ctx: *mut c_void, index: i64) {
    // SAFETY: `ctx` is the `Shared` of an `Overlap`, which removes its hooks before it drops it.
    let shared = unsafe { &*(ctx as *const Shared) };
    let bucket = shared.bucket_of[index as usize];
    if shared.queue.lock().unwrap_or_else(|e| e.into_inner()).is_some()
        && shared.pending[bucket].fetch_sub(1, Ordering::AcqRel) == 1
    {
        shared.send(bucket);
    }
}

/// Hooks on the parameters of [`GradBuckets`] that reduce each bucket as soon as backward has
/// completed it.
pub struct Overlap {
    shared: Box<Shared>,
    handles: Vec<*mut c_void>,
}

/// The communicator, for the communication thread. MPI was initialized with
/// `MPI_THREAD_MULTIPLE`, and while the thread runs the training thread makes no MPI or NCCL call.
struct CommForThread<'a>(&'a dyn Communicator);
// SAFETY: see above: only one thread calls into the communicator at a time.
unsafe impl Send for CommForThread<'_> {}

impl Overlap {
    /// Hooks every parameter of `params`, whose gradients `buckets` holds (in order).
    pub fn install(params: &[Tensor], buckets: &GradBuckets) -> Result<Self> {
        let bucket_of = buckets.bucket_of_each();
        ensure!(bucket_of.len() == params.len(), "{} parameters for {} gradient views", params.len(), bucket_of.len());
        let mut bucket_sizes = vec![0; buckets.buckets().len()];
        for &b in &bucket_of {
            bucket_sizes[b] += 1;
        }
        let shared = Box::new(Shared {
            pending: bucket_sizes.iter().map(|&n| AtomicUsize::new(n)).collect(),
            sent: bucket_sizes.iter().map(|_| AtomicBool::new(false)).collect(),
            bucket_of,
            bucket_sizes,
            queue: Mutex::new(None),
        });
        let mut overlap = Self { shared, handles: Vec::with_capacity(params.len()) };
        let ctx = &*overlap.shared as *const Shared as *mut c_void;
        for (i, p) in params.iter().enumerate() {
            // SAFETY: a live tensor, a callback that cannot unwind, and a context that outlives
            // the hook (removed in Drop before the Box is freed).
            let handle = unsafe { bd3_grad_ready_hook_add(p.as_ptr(), gradient_ready, ctx, i as i64) };
            if handle.is_null() {
                // SAFETY: a NUL-terminated string owned by the C++ side.
                let why = unsafe { CStr::from_ptr(bd3_grad_ready_error()) }.to_string_lossy().into_owned();
                bail!("hooking parameter {i} for overlapped gradient reduction: {why}");
            }
            overlap.handles.push(handle);
        }
        Ok(overlap)
    }

    /// Runs `backward` while the communication thread averages every bucket of `buckets` over
    /// `comm`'s ranks, in place, as soon as backward has completed it; returns when all are
    /// reduced. `prepare` runs after backward and before the buckets no hook sent are (it makes
    /// the gradients of parameters that got none zeros in their buckets).
    pub fn backward_reducing(
        &self,
        comm: &dyn Communicator,
        buckets: &GradBuckets,
        backward: impl FnOnce(),
        prepare: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let all_reduce =
            |comm: &dyn Communicator, _: usize, bucket: &Tensor| comm.all_reduce_beside_compute(bucket, ReduceOp::Avg);
        self.backward_with(comm, buckets, backward, prepare, all_reduce)
    }

    /// [`Overlap::backward_reducing`] with another collective: the communication thread calls
    /// `reduce(comm, b, bucket)` for every bucket `b`, in the order backward completes them
    /// (ZeRO-1 reduce-scatters them).
    pub fn backward_with(
        &self,
        comm: &dyn Communicator,
        buckets: &GradBuckets,
        backward: impl FnOnce(),
        prepare: impl FnOnce() -> Result<()>,
        reduce: impl Fn(&dyn Communicator, usize, &Tensor) -> Result<()> + Send,
    ) -> Result<()> {
        let s = &*self.shared;
        for (b, &n) in s.bucket_sizes.iter().enumerate() {
            s.pending[b].store(n, Ordering::Release);
            s.sent[b].store(false, Ordering::Release);
        }
        let (tx, rx) = channel::<usize>();
        *s.queue.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        let flat: Vec<Tensor> = buckets.buckets().iter().map(Tensor::shallow_clone).collect();
        let comm_after = comm;
        let comm = CommForThread(comm);
        let reduced = std::thread::scope(|scope| -> Result<()> {
            let reducer = scope.spawn(move || -> Result<usize> {
                let comm = comm;
                let mut reduced = 0;
                for b in rx {
                    reduce(comm.0, b, &flat[b]).with_context(|| format!("reducing bucket {b}"))?;
                    reduced += 1;
                }
                Ok(reduced)
            });
            backward();
            let prepared = prepare();
            if prepared.is_ok() {
                // In bucket order, the same on every rank.
                (0..s.bucket_sizes.len()).for_each(|b| s.send(b));
            }
            // Closing the queue ends the thread once it has reduced what it was sent.
            s.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
            let reduced = reducer.join().map_err(|_| anyhow::anyhow!("the gradient reduction thread panicked"))?;
            prepared?;
            ensure!(reduced? == s.bucket_sizes.len(), "not every gradient bucket was reduced");
            Ok(())
        });
        // Over NCCL the collectives may still run: order them before what the caller enqueues,
        // also after a failure, so that memory they write is not reused before they end.
        let finished = comm_after.finish_beside_compute();
        reduced.and(finished)
    }
}

impl Drop for Overlap {
    fn drop(&mut self) {
        for &h in &self.handles {
            // SAFETY: a handle from bd3_grad_ready_hook_add, removed once.
            unsafe { bd3_grad_ready_hook_remove(h) };
        }
    }
}
