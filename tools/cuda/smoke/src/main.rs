//! CUDA smoke test for the GPU machine: proves that a candle build made on the CPU-only build
//! machine loads the driver, cuBLAS, cuRAND and cuDNN there, JIT-loads candle's PTX, and computes
//! what the CPU computes. Exit status 0 and a last line `SMOKE OK` when every check passes.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use std::time::Instant;

/// Largest absolute difference, relative to the largest absolute reference value.
fn rel_err(got: &Tensor, want: &Tensor) -> Result<f32> {
    let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let want = want.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = want.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-12);
    Ok(diff / scale)
}

struct Checks {
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, name: &str, got: &Tensor, want: &Tensor, tol: f32) -> Result<()> {
        if got.dims() != want.dims() {
            self.failed.push(name.to_string());
            println!("FAIL {name}: shape {:?} != {:?}", got.dims(), want.dims());
            return Ok(());
        }
        let e = rel_err(got, want)?;
        let ok = e.is_finite() && e <= tol;
        println!("{} {name}: shape {:?}, rel err {e:.2e} (tol {tol:.0e})", if ok { "ok  " } else { "FAIL" }, got.dims());
        if !ok {
            self.failed.push(name.to_string());
        }
        Ok(())
    }
}

fn main() -> Result<()> {
    println!(
        "cuda-smoke {}: candle-core with cuda+cudnn; cuda_is_available={}",
        env!("CARGO_PKG_VERSION"),
        candle_core::utils::cuda_is_available()
    );
    let t = Instant::now();
    let gpu = Device::new_cuda(0)?;
    println!("Device::new_cuda(0): {:.2} s", t.elapsed().as_secs_f64());
    let cpu = Device::Cpu;
    let mut c = Checks { failed: Vec::new() };

    // Inputs made on the CPU, copied to the GPU: both sides see the same numbers.
    let x = Tensor::randn(0f32, 1f32, (2, 16, 64, 48), &cpu)?;
    let w = (Tensor::randn(0f32, 1f32, (32, 16, 3, 3), &cpu)? * 0.1)?;
    let a = Tensor::randn(0f32, 1f32, (256, 512), &cpu)?;
    let b = Tensor::randn(0f32, 1f32, (512, 384), &cpu)?;
    let (xg, wg, ag, bg) = (x.to_device(&gpu)?, w.to_device(&gpu)?, a.to_device(&gpu)?, b.to_device(&gpu)?);

    // First kernel launch loads candle's PTX modules (the driver JIT-compiles them for sm_90 once per
    // module; the driver's compute cache, ~/.nv/ComputeCache, keeps the result for later runs).
    let t = Instant::now();
    let y = (xg.sqr()? + 1.0)?.sum_all()?.to_scalar::<f32>()?;
    println!("first GPU op (PTX load/JIT): {:.2} s, sum(x^2+1) = {y:.1}", t.elapsed().as_secs_f64());
    c.check("elementwise+reduce", &(xg.sqr()? + 1.0)?.sum_keepdim(D::Minus1)?, &(x.sqr()? + 1.0)?.sum_keepdim(D::Minus1)?, 1e-5)?;

    // cuBLAS
    let t = Instant::now();
    let mg = ag.matmul(&bg)?;
    gpu.synchronize()?;
    println!("first matmul: {:.2} s", t.elapsed().as_secs_f64());
    c.check("matmul f32 (cuBLAS)", &mg, &a.matmul(&b)?, 1e-4)?;
    c.check(
        "matmul bf16 (cuBLAS)",
        &ag.to_dtype(DType::BF16)?.matmul(&bg.to_dtype(DType::BF16)?)?,
        &a.matmul(&b)?,
        3e-2,
    )?;

    // cuDNN. Its default math mode may use TF32 for f32 convolutions on Hopper: ~1e-3 relative.
    let t = Instant::now();
    let cg = xg.conv2d(&wg, 1, 1, 1, 1)?;
    gpu.synchronize()?;
    println!("first conv2d: {:.2} s", t.elapsed().as_secs_f64());
    let cc = x.conv2d(&w, 1, 1, 1, 1)?;
    c.check("conv2d 3x3 pad1 f32 (cuDNN)", &cg, &cc, 5e-3)?;
    c.check("conv2d 3x3 stride2 f32", &xg.conv2d(&wg, 1, 2, 1, 1)?, &x.conv2d(&w, 1, 2, 1, 1)?, 5e-3)?;
    c.check(
        "conv2d 3x3 pad1 bf16",
        &xg.to_dtype(DType::BF16)?.conv2d(&wg.to_dtype(DType::BF16)?, 1, 1, 1, 1)?,
        &cc,
        3e-2,
    )?;
    c.check("upsample_nearest2d x2", &xg.upsample_nearest2d(128, 96)?, &x.upsample_nearest2d(128, 96)?, 0.0)?;

    // Backward through conv2d (what training needs).
    let grads = |dev: &Device| -> Result<(Tensor, Tensor)> {
        let xv = Var::from_tensor(&x.to_device(dev)?)?;
        let wv = Var::from_tensor(&w.to_device(dev)?)?;
        let loss = xv.as_tensor().conv2d(wv.as_tensor(), 1, 1, 1, 1)?.tanh()?.sqr()?.mean_all()?;
        let g = loss.backward()?;
        Ok((g.get(&xv).unwrap().clone(), g.get(&wv).unwrap().clone()))
    };
    let (gx, gw) = grads(&gpu)?;
    let (cx, cw) = grads(&cpu)?;
    c.check("conv2d backward d/dx", &gx, &cx, 1e-2)?;
    c.check("conv2d backward d/dw", &gw, &cw, 1e-2)?;

    // cuRAND
    gpu.set_seed(7)?;
    let r = Tensor::randn(0f32, 1f32, (1 << 20,), &gpu)?;
    let mean = r.mean_all()?.to_scalar::<f32>()?;
    let std = r.sqr()?.mean_all()?.to_scalar::<f32>()?.sqrt();
    let ok = mean.abs() < 0.01 && (std - 1.0).abs() < 0.01;
    println!("{} randn on GPU (cuRAND): mean {mean:.4}, std {std:.4}", if ok { "ok  " } else { "FAIL" });
    if !ok {
        c.failed.push("randn".into());
    }

    // A rough speed figure: bf16 conv at TAESD-like sizes.
    let xb = Tensor::randn(0f32, 1f32, (16, 64, 128, 128), &gpu)?.to_dtype(DType::BF16)?;
    let wb = Tensor::randn(0f32, 0.05f32, (64, 64, 3, 3), &gpu)?.to_dtype(DType::BF16)?;
    let _ = xb.conv2d(&wb, 1, 1, 1, 1)?;
    gpu.synchronize()?;
    let n = 20;
    let t = Instant::now();
    for _ in 0..n {
        let _ = xb.conv2d(&wb, 1, 1, 1, 1)?;
    }
    gpu.synchronize()?;
    let s = t.elapsed().as_secs_f64() / n as f64;
    let flops = 2.0 * 16.0 * 64.0 * 64.0 * 9.0 * 128.0 * 128.0;
    println!("conv2d bf16 16x64x128x128, 64 3x3 filters: {:.3} ms, {:.1} TFLOP/s", s * 1e3, flops / s / 1e12);

    if !c.failed.is_empty() {
        bail!("SMOKE FAILED: {}", c.failed.join(", "));
    }
    println!("SMOKE OK");
    Ok(())
}
