include!("../kernels/torch_link.rs");

fn main() {
    link_libtorch();
    compile_mpi_shim();
}

/// Compiles csrc/mpi_in_place.c against the headers of the MPI library that the `mpi` crate
/// links, found through its compiler wrapper: `mpicc --showme:incdirs` (Open MPI), or the `-I`
/// flags of `mpicc -show` (MPICH and its derivatives).
fn compile_mpi_shim() {
    println!("cargo:rerun-if-changed=csrc/mpi_in_place.c");
    println!("cargo:rerun-if-env-changed=MPICC");
    let mpicc = std::env::var("MPICC").unwrap_or_else(|_| "mpicc".into());
    let run = |arg: &str| {
        std::process::Command::new(&mpicc)
            .arg(arg)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let dirs: Vec<String> = if let Some(out) = run("--showme:incdirs") {
        out.split_whitespace().map(String::from).collect()
    } else if let Some(out) = run("-show") {
        out.split_whitespace().filter_map(|t| t.strip_prefix("-I")).map(String::from).collect()
    } else {
        panic!(
            "`{mpicc}` not found: the MPI compiler wrapper is needed for mpi.h (scripts/setup.sh installs Open MPI)"
        );
    };
    let mut build = cc::Build::new();
    build.file("csrc/mpi_in_place.c");
    for dir in dirs {
        build.include(dir);
    }
    build.compile("bd3_mpi_shim");
}
