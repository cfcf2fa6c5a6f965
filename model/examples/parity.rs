//! Parity of the released taef2 / taesana weights with the reference outputs, on any device and
//! dtype (the CI test does CPU f32; this is how the CUDA f32/bf16 figures in the README are made).
//!
//!   cargo run --release -p taesd --example parity -- REFERENCE_DIR [cpu|cuda] [f32|bf16|f16] [time]
//!
//! REFERENCE_DIR holds taef2/{taef2_encoder.pth,taef2_decoder.pth,taef2_parity.safetensors} and
//! taesana/taesana_encoder.pth (../shared/reference). Prints max |err| and relative L2 error per
//! output, and the forward time of a 256x256 batch of 16 (after a warm-up).

use candle_core::{DType, Device, Module, Tensor};
use taesd::Taesd;

fn errors(got: &Tensor, want: &Tensor) -> candle_core::Result<(f32, f32)> {
    let got = got.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let d = (&got - want)?;
    let max = d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let rel = (d.sqr()?.sum_all()?.to_scalar::<f32>()? / want.sqr()?.sum_all()?.to_scalar::<f32>()?).sqrt();
    Ok((max, rel))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).map(String::as_str).unwrap_or("../shared/reference");
    let device = match args.get(2).map(String::as_str).unwrap_or("cpu") {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        d => anyhow::bail!("device {d}: use cpu or cuda"),
    };
    let dtype = match args.get(3).map(String::as_str).unwrap_or("f32") {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        d => anyhow::bail!("dtype {d}: use f32, bf16 or f16"),
    };
    let r = candle_core::safetensors::load(format!("{dir}/taef2/taef2_parity.safetensors"), &Device::Cpu)?;
    let files = [format!("{dir}/taef2/taef2_encoder.pth"), format!("{dir}/taef2/taef2_decoder.pth")];
    let taef2 = Taesd::load_files(&files, None, dtype, &device)?;
    let taesana = Taesd::load(format!("{dir}/taesana/taesana_encoder.pth"), None, dtype, &device)?;
    let (enc, dec) = (taef2.encoder.as_ref().unwrap(), taef2.decoder.as_ref().unwrap());
    let on = |t: &Tensor| t.to_device(&device).and_then(|t| t.to_dtype(dtype));
    println!("device {device:?}, dtype {dtype:?}");
    for s in ["a", "b"] {
        let image = &r[&format!("image_{s}")];
        let (lm, lr) = errors(&enc.forward(&on(image)?)?, &r[&format!("taef2_latent_{s}")])?;
        let (dm, dr) =
            errors(&dec.forward(&on(&r[&format!("taef2_latent_{s}")])?)?, &r[&format!("taef2_decoded_{s}")])?;
        println!(
            "taef2 image_{s} {:?}: encoder max|err| {lm:.3e} rel {lr:.2e}; decoder max|err| {dm:.3e} rel {dr:.2e}",
            image.dims()
        );
    }
    let (sm, sr) = errors(&taesana.encoder.as_ref().unwrap().forward(&on(&r["image_a"])?)?, &r["taesana_latent_a"])?;
    println!("taesana image_a: encoder max|err| {sm:.3e} rel {sr:.2e}");

    // Forward speed of a 16 x 256 x 256 batch (first call excluded: kernel JIT/cuDNN set-up); on
    // the GPU only, unless asked for (`... cpu f32 time`).
    if device.is_cpu() && args.get(4).map(String::as_str) != Some("time") {
        return Ok(());
    }
    let x = Tensor::rand(0f32, 1f32, (16, 3, 256, 256), &device)?.to_dtype(dtype)?;
    for f in [0, 1] {
        let run = |x: &Tensor| -> candle_core::Result<Tensor> {
            if f == 0 {
                enc.forward(x)
            } else {
                dec.forward(&enc.forward(x)?)
            }
        };
        run(&x)?;
        device.synchronize()?;
        let t0 = std::time::Instant::now();
        let n = 5;
        for _ in 0..n {
            run(&x)?;
        }
        device.synchronize()?;
        let ms = t0.elapsed().as_secs_f64() * 1e3 / n as f64;
        let what = if f == 0 { "encoder" } else { "encoder+decoder" };
        println!("forward {what} 16x3x256x256: {ms:.1} ms");
    }
    Ok(())
}
