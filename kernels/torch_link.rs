// Shared by the build.rs of every package whose binaries or tests link libtorch
// (`include!`d, because a build script cannot depend on a workspace crate cheaply).
//
// Two problems of the plain tch link (measured on the machines bd3 is built on):
// * no RPATH: binaries fail with "libtorch_cpu.so: cannot open shared object file";
// * rustc links with --as-needed, which drops libtorch_cuda.so, and CUDA ops then fail
//   on a GPU machine. Linking it explicitly with --no-as-needed keeps it.
// `TORCH_RPATH` (colon-separated) adds run-time search paths ahead of the build-time one,
// for binaries that are carried to a machine whose PyTorch lives elsewhere.
fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=TORCH_RPATH");
    let lib = match std::env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(lib) => lib,
        Err(_) => {
            println!("cargo:warning=DEP_TCH_LIBTORCH_LIB is unset: add torch-sys as a direct dependency");
            return;
        }
    };
    if let Ok(extra) = std::env::var("TORCH_RPATH") {
        for dir in extra.split(':').filter(|d| !d.is_empty()) {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        }
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // The PyPI CUDA runtime beside torch: binaries of the `cuda` feature of bd3-kernels need
    // libcudart.so.13 directly (libtorch_cuda finds it through its own RPATH, we do not).
    let cuda_lib = std::path::Path::new(&lib).join("../../nvidia/cu13/lib");
    if cuda_lib.join("libcudart.so.13").exists() {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", cuda_lib.display());
    }
    println!("cargo:rustc-link-search=native={lib}");
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,-ltorch,--as-needed");
    }
}
