//! Collectives over `MPI_COMM_WORLD` for CPU tensors (see the module docs of `dist` for data
//! types and hangs).

use std::ffi::c_void;

use anyhow::{bail, ensure, Context, Result};
use mpi::collective::SystemOperation;
use mpi::datatype::Equivalence;
use mpi::environment::Universe;
use mpi::raw::AsRaw;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives, Root};
use tch::{Device, Kind, Tensor};

use super::watchdog::Watchdog;
use super::{Communicator, DistOptions, ReduceOp};

extern "C" {
    /// `MPI_IN_PLACE` of the `mpi.h` this crate was built against (csrc/mpi_in_place.c): a macro
    /// in C, which the `mpi` crate does not expose.
    fn bd3_mpi_in_place() -> *mut c_void;
}

/// The send-buffer marker that makes a reduction work in place (saves a copy of every buffer).
pub fn in_place() -> *const c_void {
    // SAFETY: the C function only returns the value of a macro.
    unsafe { bd3_mpi_in_place() }
}

/// Collectives over `MPI_COMM_WORLD` for CPU tensors.
pub struct MpiComm {
    world: SimpleCommunicator,
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
        Ok(Self { world, watchdog: Watchdog::start(rank, size, options.timeout), _universe: universe })
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

    /// Sums `t` over the ranks in place: `MPI_Allreduce`, or with `polled`, `MPI_Iallreduce`
    /// progressed by `MPI_Test` every [`POLL_INTERVAL`] with the thread asleep in between. A
    /// blocking collective busy-polls its core while it waits for the peers, which on a machine
    /// without a spare core takes the core from the backward pass a reduction should hide behind.
    fn all_reduce_typed<T: Equivalence + Copy>(&self, t: &Tensor, polled: bool) -> Result<()> {
        let data = Self::cpu_slice::<T>(t)?;
        let _watch = self.watchdog.enter("all_reduce");
        let (dtype, sum, world) =
            (T::equivalent_datatype().as_raw(), SystemOperation::sum().as_raw(), self.world.as_raw());
        // MPI counts are C ints.
        for chunk in data.chunks_mut(1 << 30) {
            let (buf, count) = (chunk.as_mut_ptr().cast(), chunk.len() as i32);
            if !polled {
                // SAFETY: MPI_IN_PLACE as the send buffer and a live, writable buffer of `count`
                // elements of T's MPI type as the receive buffer, on this process's communicator.
                let rc = unsafe { mpi::ffi::MPI_Allreduce(in_place(), buf, count, dtype, sum, world) };
                ensure!(rc == 0, "MPI_Allreduce failed with code {rc}");
                continue;
            }
            let mut request = std::mem::MaybeUninit::<mpi::ffi::MPI_Request>::uninit();
            // SAFETY: as above; the buffer stays untouched until the request completes below.
            let rc =
                unsafe { mpi::ffi::MPI_Iallreduce(in_place(), buf, count, dtype, sum, world, request.as_mut_ptr()) };
            ensure!(rc == 0, "MPI_Iallreduce failed with code {rc}");
            wait_polled(&mut request, "MPI_Iallreduce")?;
        }
        Ok(())
    }

    /// Sums `input` over the ranks and writes this rank's block of the result into `out`:
    /// `MPI_Reduce_scatter_block`, or with `polled`, `MPI_Ireduce_scatter_block` progressed as in
    /// [`Self::all_reduce_typed`].
    fn reduce_scatter_typed<T: Equivalence + Copy>(&self, input: &Tensor, out: &Tensor, polled: bool) -> Result<()> {
        let send = Self::cpu_slice::<T>(input)?;
        let recv = Self::cpu_slice::<T>(out)?;
        let _watch = self.watchdog.enter("reduce_scatter");
        if !polled {
            self.world.reduce_scatter_block_into(&send[..], recv, SystemOperation::sum());
            return Ok(());
        }
        let count = i32::try_from(recv.len()).context("reduce_scatter: more than 2^31 elements per rank")?;
        let (dtype, sum, world) =
            (T::equivalent_datatype().as_raw(), SystemOperation::sum().as_raw(), self.world.as_raw());
        let mut request = std::mem::MaybeUninit::<mpi::ffi::MPI_Request>::uninit();
        // SAFETY: a send buffer of `count × world` and a receive buffer of `count` elements of T's
        // MPI type, both live and untouched until the request completes below.
        let rc = unsafe {
            mpi::ffi::MPI_Ireduce_scatter_block(
                send.as_ptr().cast(),
                recv.as_mut_ptr().cast(),
                count,
                dtype,
                sum,
                world,
                request.as_mut_ptr(),
            )
        };
        ensure!(rc == 0, "MPI_Ireduce_scatter_block failed with code {rc}");
        wait_polled(&mut request, "MPI_Ireduce_scatter_block")
    }

    /// [`Communicator::reduce_scatter`], with `polled` beside computation.
    fn reduce_scatter_polled(&self, input: &Tensor, op: ReduceOp, polled: bool) -> Result<Tensor> {
        check_cpu_contiguous(input)?;
        let world = self.world_size();
        let n = input.numel();
        ensure!(n % world == 0, "reduce_scatter of {n} elements over {world} ranks: not a multiple of the world size");
        let kind = Self::reduction_kind(input.kind())?;
        let wide = input.flatten(0, -1).to_kind(kind);
        let out = Tensor::empty([(n / world) as i64], (kind, Device::Cpu));
        match kind {
            Kind::Float => self.reduce_scatter_typed::<f32>(&wide, &out, polled)?,
            Kind::Double => self.reduce_scatter_typed::<f64>(&wide, &out, polled)?,
            _ => self.reduce_scatter_typed::<i64>(&wide, &out, polled)?,
        }
        if op == ReduceOp::Avg {
            average(&out, world);
        }
        Ok(out.to_kind(input.kind()))
    }

    /// The kind in which `kind` is summed: itself, or f32 for the 16-bit floats.
    fn reduction_kind(kind: Kind) -> Result<Kind> {
        Ok(match kind {
            Kind::Float | Kind::Double | Kind::Int64 => kind,
            Kind::BFloat16 | Kind::Half => Kind::Float,
            _ => bail!("MPI reductions support f32, f64, i64, bf16 and f16 tensors, not {kind:?}"),
        })
    }

    fn sum_in_place(&self, t: &Tensor, polled: bool) -> Result<()> {
        match t.kind() {
            Kind::Float => self.all_reduce_typed::<f32>(t, polled),
            Kind::Double => self.all_reduce_typed::<f64>(t, polled),
            Kind::Int64 => self.all_reduce_typed::<i64>(t, polled),
            _ => unreachable!("reduction_kind admits only these"),
        }
    }

    /// Sums (or averages) `tensor` over the ranks in place, widening 16-bit floats to f32.
    fn reduce_in_place(&self, tensor: &Tensor, op: ReduceOp, polled: bool) -> Result<()> {
        check_cpu_contiguous(tensor)?;
        let kind = Self::reduction_kind(tensor.kind())?;
        if kind == tensor.kind() {
            self.sum_in_place(tensor, polled)?;
        } else {
            let wide = tensor.to_kind(kind);
            self.sum_in_place(&wide, polled)?;
            tensor.shallow_clone().copy_(&wide);
        }
        if op == ReduceOp::Avg {
            average(tensor, self.world_size());
        }
        Ok(())
    }
}

/// How long a thread that reduces beside computation sleeps between progress calls: short next
/// to moving a bucket of megabytes, long next to a context switch.
const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_micros(100);

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

/// Waits for the non-blocking collective `request` (started by `what`): `MPI_Test` every
/// [`POLL_INTERVAL`], the thread asleep in between, so the wait does not take a core.
fn wait_polled(request: &mut std::mem::MaybeUninit<mpi::ffi::MPI_Request>, what: &str) -> Result<()> {
    loop {
        let mut done = 0;
        // SAFETY: a request the collective started, tested until it completes.
        let rc = unsafe { mpi::ffi::MPI_Test(request.as_mut_ptr(), &mut done, mpi::ffi::RSMPI_STATUS_IGNORE) };
        ensure!(rc == 0, "MPI_Test of {what} failed with code {rc}");
        if done != 0 {
            return Ok(());
        }
        std::thread::sleep(POLL_INTERVAL);
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
        self.reduce_in_place(tensor, op, false)
    }

    fn all_reduce_beside_compute(&self, tensor: &Tensor, op: ReduceOp) -> Result<()> {
        self.reduce_in_place(tensor, op, true)
    }

    fn reduce_scatter(&self, input: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.reduce_scatter_polled(input, op, false)
    }

    fn reduce_scatter_beside_compute(&self, input: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.reduce_scatter_polled(input, op, true)
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

#[cfg(test)]
mod tests {
    /// The marker comes from the headers: Open MPI's `mpi.h` defines it as `(void *) 1`.
    #[test]
    fn mpi_in_place_comes_from_the_headers() {
        let marker = super::in_place() as usize;
        assert_ne!(marker, 0, "MPI_IN_PLACE is never the null pointer");
        if mpi::environment::library_version().unwrap_or_default().contains("Open MPI") {
            assert_eq!(marker, 1);
        }
    }
}
