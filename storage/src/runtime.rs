//! The process's one tokio runtime for storage I/O.
//!
//! Every blocking API of bd3 (checkpoint saves and loads, `bd3 prepare`, the data reader's
//! read-ahead) runs its object-store futures here instead of building a runtime of its own. The
//! runtime lives as long as the process, so no task of it is ever cancelled by a runtime shutting
//! down under it.

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::{Handle, Runtime, RuntimeFlavor};

/// Worker threads of the shared runtime: storage I/O waits on the network or the disk, so a few
/// threads keep many requests in flight.
fn worker_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 4)
}

/// The shared runtime, started on first use.
pub fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads())
            .thread_name("bd3-io")
            .enable_all()
            .build()
            // Only fails when the OS refuses threads or timers; nothing a caller could recover.
            .expect("starting the shared storage I/O runtime")
    })
}

/// Runs `future` to completion on the shared runtime, blocking the calling thread. Called from
/// inside a multi-threaded runtime's task it steps out of the task first
/// (`block_in_place`); it must not be called from a current-thread runtime.
pub fn block_on<F: Future>(future: F) -> F::Output {
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| handle.block_on(future))
        }
        _ => runtime().block_on(future),
    }
}

/// Spawns `future` on the shared runtime.
pub fn spawn<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    runtime().spawn(future)
}
