include!("torch_link.rs");

fn main() {
    link_libtorch();
    emulation();
    #[cfg(feature = "cuda")]
    cuda::build();
}

/// The tensor-core kernels on CPU fibers (`csrc/emulate.cpp`), in every build: the tests check the
/// kernels' arithmetic with no GPU and no nvcc. Needs C++20 (templated lambdas); fibers switch in
/// assembly on x86-64 and through POSIX ucontext elsewhere.
fn emulation() {
    for f in ["csrc/emulate.cpp", "csrc/kernels.cuh", "csrc/layout.cuh", "csrc/flash.h"] {
        println!("cargo:rerun-if-changed={f}");
    }
    cc::Build::new()
        .cpp(true)
        .file("csrc/emulate.cpp")
        .include("csrc")
        .flag("-std=c++20")
        .flag_if_supported("-Wno-unknown-pragmas")
        .opt_level(2)
        .pic(true)
        .compile("bd3emulate");
}

/// The fused kernels (feature `cuda`): `csrc/flash.cu` by nvcc, `csrc/autograd.cpp` by the host C++
/// compiler against libtorch's headers, linked with libtorch's CUDA runtime.
#[cfg(feature = "cuda")]
mod cuda {
    use std::path::{Path, PathBuf};

    pub fn build() {
        for f in ["csrc/flash.cu", "csrc/flash.h", "csrc/layout.cuh", "csrc/kernels.cuh", "csrc/autograd.cpp"] {
            println!("cargo:rerun-if-changed={f}");
        }
        println!("cargo:rerun-if-env-changed=NVCC");
        let torch_lib =
            PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys sets DEP_TCH_LIBTORCH_LIB"));
        let torch = torch_lib.parent().expect("torch/lib has a parent").to_path_buf();
        // nvcc: $NVCC, else the one scripts/setup.sh installs beside torch (PyPI cuda-toolkit).
        let nvcc = std::env::var_os("NVCC").map(PathBuf::from).unwrap_or_else(|| torch.join("../nvidia/cu13/bin/nvcc"));
        if !nvcc.exists() {
            panic!(
                "feature `cuda` needs nvcc: {} does not exist. Run scripts/setup.sh (it installs \
                 cuda-toolkit[nvcc,crt,nvvm,cccl] 13.0.2 into .venv) or set NVCC",
                nvcc.display()
            );
        }
        // The CUDA headers and runtime live beside nvcc (…/nvidia/cu13/{bin,include,lib}).
        let cuda_root = nvcc.parent().and_then(Path::parent).expect("nvcc is in <cuda>/bin").to_path_buf();
        let cuda_lib = torch.join("../nvidia/cu13/lib");

        // cc reads NVCC itself; setting it here keeps the choice inside this build script.
        std::env::set_var("NVCC", &nvcc);
        cc::Build::new()
            .cuda(true)
            .cudart("none")
            .file("csrc/flash.cu")
            .include("csrc")
            .flag("-std=c++17")
            .flag("-O3")
            .flag("-gencode=arch=compute_80,code=sm_80")
            .flag("-gencode=arch=compute_90,code=sm_90")
            .flag("-gencode=arch=compute_90,code=compute_90")
            .warnings(false)
            .compile("bd3flash");

        cc::Build::new()
            .cpp(true)
            .file("csrc/autograd.cpp")
            .include("csrc")
            .include(torch.join("include"))
            .include(torch.join("include/torch/csrc/api/include"))
            .include(cuda_root.join("include"))
            .flag("-std=c++17")
            .define("_GLIBCXX_USE_CXX11_ABI", "1")
            .define("GLOG_USE_GLOG_EXPORT", None)
            .flag_if_supported("-Wno-unused-parameter")
            .pic(true)
            .compile("bd3autograd");

        // Propagated to every binary that links this crate (unlike link-arg).
        println!("cargo:rustc-link-search=native={}", cuda_lib.display());
        println!("cargo:rustc-link-search=native={}", cuda_root.join("lib").display());
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        // The PyPI layout has only the versioned libcudart.so.13.
        println!("cargo:rustc-link-lib=dylib:+verbatim=libcudart.so.13");
    }
}
