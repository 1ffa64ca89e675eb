//! `bd3 launch local`: N ranks on this machine through Open MPI's mpirun.

use std::process::Command;

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
