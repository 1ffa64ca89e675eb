//! Preemption: SIGTERM and SIGUSR1 (what Slurm and Kubernetes send before they stop a job) ask
//! for a coordinated stop. Every rank finishes the step it is in, saves a checkpoint at the same
//! step and exits 0, so that the scheduler's requeue resumes exactly.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{ensure, Result};
use tch::Tensor;

use crate::dist::{Communicator, ReduceOp};

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
