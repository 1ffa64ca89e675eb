include!("../kernels/torch_link.rs");

fn main() {
    link_libtorch();
    compile_mpi_shim();
    compile_grad_ready_hook();
}

/// Compiles csrc/grad_ready.cpp (the post-accumulate hook that trainer::dist::overlap starts
/// bucket reductions from) against libtorch's headers.
fn compile_grad_ready_hook() {
    println!("cargo:rerun-if-changed=csrc/grad_ready.cpp");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!("DEP_TCH_LIBTORCH_LIB is unset: torch-sys must be a direct dependency");
    };
    let torch = std::path::Path::new(&lib).parent().expect("torch/lib has a parent").to_path_buf();
    cc::Build::new()
        .cpp(true)
        .file("csrc/grad_ready.cpp")
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("GLOG_USE_GLOG_EXPORT", None)
        .flag_if_supported("-Wno-unused-parameter")
        .pic(true)
        .compile("bd3_grad_ready");
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
