//! With the `cuda` feature: compile `src/kernels/ops.cu` to PTX with nvcc (`$NVCC`, else `nvcc` on
//! PATH; tools/cuda/build.sh puts the pinned CUDA 13.0 nvcc there: PTX from a newer nvcc is
//! refused by the GPU machine's driver 580). Target `compute_$CUDA_COMPUTE_CAP` (default 90).
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/kernels/ops.cu");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("ops.ptx");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap = cap.replace('.', "");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("src/kernels/ops.cu")
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("taesd-ops: cannot run {nvcc}: {e} (source tools/cuda's env.sh)"));
    assert!(status.success(), "taesd-ops: {nvcc} failed on src/kernels/ops.cu");
}
