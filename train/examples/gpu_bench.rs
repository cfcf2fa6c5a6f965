//! Times our training step (train::recipe::Recipe::step) on CUDA, for bench/gpu_train_step.sh.
//!
//! `gpu_bench --size 256 --batch 32 --recipe full|decoder [--steps 10] [--warmup 3]
//!  [--seconds 60] [--precision f32|tf32|bf16] [--stock]`
//! full: encoder MSE + decoder GAN (patch discriminator, replay, correction) + low-res MSE;
//! decoder: decoder-only full-res MSE. `--precision`: the step's arithmetic
//! (train::recipe::Precision; `--tf32` = `--precision tf32`). `--stock`: candle's stock ops instead of taesd-ops
//! (layers and optimiser). Prints one JSON line: images/s, ms/step and the device memory in use
//! at its highest (cuMemGetInfo after each step, minus the use before the model was built: it
//! includes candle's cached allocations, comparable to PyTorch's max_memory_reserved).
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use train::recipe::{Batch, Precision, Recipe, RecipeConfig};

#[cfg(feature = "cuda")]
fn used_mib() -> f64 {
    match candle_core::cuda::cudarc::driver::result::mem_get_info() {
        Ok((free, total)) => (total - free) as f64 / (1 << 20) as f64,
        Err(_) => f64::NAN,
    }
}

#[cfg(not(feature = "cuda"))]
fn used_mib() -> f64 {
    f64::NAN
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str| args.iter().position(|a| a == k).and_then(|i| args.get(i + 1)).cloned();
    let size: usize = get("--size").map_or(Ok(256), |s| s.parse())?;
    let batch: usize = get("--batch").map_or(Ok(32), |s| s.parse())?;
    let steps: usize = get("--steps").map_or(Ok(10), |s| s.parse())?;
    let warmup: usize = get("--warmup").map_or(Ok(3), |s| s.parse())?;
    let seconds: f64 = get("--seconds").map_or(Ok(60.0), |s| s.parse())?;
    let recipe_kind = get("--recipe").unwrap_or_else(|| "full".into());
    let precision = if args.iter().any(|a| a == "--tf32") {
        Precision::Tf32
    } else {
        Precision::parse(&get("--precision").unwrap_or_else(|| "f32".into()))?
    };
    let stock = args.iter().any(|a| a == "--stock");
    if stock {
        taesd::layers::set_use_ops(false);
    }
    // `--cpu`: a smoke run of this program on the CPU (tiny sizes).
    let dev = if args.iter().any(|a| a == "--cpu") { Device::Cpu } else { Device::new_cuda(0)? };
    let _ = Tensor::zeros(1, candle_core::DType::F32, &dev)?;
    dev.synchronize()?;
    let base = used_mib();
    let model = taesd::Variant::Taef2.config();
    let cfg = match recipe_kind.as_str() {
        "full" => RecipeConfig { replay_capacity: 4 * batch, ..Default::default() },
        "decoder" => RecipeConfig {
            train_encoder: false,
            gan_weight: 0.0,
            lowres_mse_weight: 0.0,
            fullres_mse_weight: 1.0,
            ..Default::default()
        },
        other => bail!("--recipe full|decoder, not {other}"),
    };
    let mut recipe = Recipe::new(&cfg, model, &Default::default(), &dev, 0)?;
    recipe.set_precision(precision);
    let images = Tensor::rand(0f32, 1.0, (batch, 3, size, size), &dev)?;
    let latents = Tensor::randn(0f32, 1.0, (batch, model.latent_channels, size / 8, size / 8), &dev)?;
    let b = Batch { images, latents };
    let mut peak = 0f64;
    for _ in 0..warmup {
        recipe.step(&b)?;
        dev.synchronize()?;
        peak = peak.max(used_mib());
    }
    let t0 = Instant::now();
    let mut n = 0;
    while n < steps && (n == 0 || t0.elapsed().as_secs_f64() < seconds) {
        let r = recipe.step(&b)?;
        dev.synchronize()?;
        peak = peak.max(used_mib());
        if let Some(why) = r.skipped {
            eprintln!("step skipped: {why}");
        }
        n += 1;
    }
    let dt = t0.elapsed().as_secs_f64() / n as f64;
    println!(
        "{}",
        serde_json::json!({
            "impl": if stock { "candle-stock" } else { "ours" },
            "mode": if precision == Precision::F32 { "fp32" } else { precision.name() },
            "recipe": recipe_kind, "size": size, "batch": batch, "steps": n,
            "ms_per_step": dt * 1e3, "images_per_s": batch as f64 / dt,
            "peak_mem_mib": peak - base,
        })
    );
    Ok(())
}
