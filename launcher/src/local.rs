//! `bd3 launch local`: N ranks on this machine through Open MPI's mpirun.

use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};

/// `mpirun -np N` with the flags bd3's jobs need on one machine: as root too (containers), more
/// ranks than cores, no core binding (each rank runs libtorch's own thread pool), and shared
/// memory without the single-copy mechanism that containers' ptrace restrictions refuse.
pub fn mpirun_command(np: usize) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .args(["-np", &np.to_string(), "--oversubscribe", "--bind-to", "none"])
        .args(["--mca", "btl_vader_single_copy_mechanism", "none"]);
    cmd
}

/// The child that [`status_forwarding_signals`] waits for (0: none).
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_to_child(signal: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, signal) };
    }
}

/// Runs `cmd` (mpirun) and waits for it, forwarding SIGTERM, SIGUSR1 and SIGUSR2 that this
/// process receives, so that a scheduler signalling `bd3 launch local` reaches every rank
/// (which checkpoint and exit, trainer::preemption) instead of leaving them orphaned.
pub fn status_forwarding_signals(cmd: &mut Command) -> std::io::Result<ExitStatus> {
    let mut child = cmd.spawn()?;
    CHILD.store(child.id() as i32, Ordering::SeqCst);
    for signal in [libc::SIGTERM, libc::SIGUSR1, libc::SIGUSR2] {
        // SAFETY: the handler only reads an atomic and calls kill.
        unsafe { libc::signal(signal, forward_to_child as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    }
    child.wait()
}
