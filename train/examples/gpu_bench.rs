//! Times our training step (train::recipe::Recipe::step) on CUDA, for bench/gpu_train_step.sh.
//!
//! `gpu_bench --size 256 --batch 32 --recipe full|cycle|decoder [--steps 10] [--warmup 3]
//!  [--seconds 60] [--precision f32|tf32|bf16] [--stock] [--profile N] [--untuned-device]
//!  [--algo heuristic|benchmark] [--workspace-mib N] [--host-profile PATH [--host-profile-steps N]]`
//! full: encoder MSE + decoder GAN (patch discriminator, replay, correction) + low-res MSE;
//! cycle: full plus the latent cycle term (`recipe.cycle_weight` 1: an encoder pass more);
//! decoder: decoder-only full-res MSE. `--precision`: the step's arithmetic
//! (train::recipe::Precision; `--tf32` = `--precision tf32`). `--stock`: candle's stock ops instead of taesd-ops
//! (layers and optimiser). Prints one JSON line: images/s, ms/step and the memory pool's
//! high-water marks over the timed steps (`peak_mem_mib` used, `peak_reserved_mib` reserved: as
//! PyTorch's max_memory_allocated/reserved), plus the growth of cuMemGetInfo after synchronised
//! steps (a lower bound, kept for comparison with earlier results).
//! `--host-profile PATH` (built with feature `host-profile`): N more steps (default 20) after the
//! timed ones with the host sampled (train::host_profile), folded stacks written to PATH.
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use train::recipe::{Batch, Precision, Recipe, RecipeConfig};

/// The memory pool's high-water marks (train::device::pool_high_water_mib), NaN without CUDA.
fn pool_high_mib(dev: &Device, reset: bool) -> (f64, f64) {
    train::device::pool_high_water_mib(dev, reset).unwrap_or((f64::NAN, f64::NAN))
}

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
    train::switches::apply_from_env();
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
    // `--algo heuristic|benchmark`: how taesd-ops picks cuDNN algorithms (default benchmark).
    if let Some(a) = get("--algo") {
        let search = match a.as_str() {
            "heuristic" => taesd_ops::AlgoSearch::Heuristic,
            "benchmark" => taesd_ops::AlgoSearch::Benchmark,
            other => bail!("--algo heuristic|benchmark, not {other}"),
        };
        taesd_ops::update_settings(|s| s.algo_search = search);
    }
    // `--workspace-mib N`: the largest cuDNN workspace an algorithm may use.
    if let Some(m) = get("--workspace-mib") {
        let bytes = m.parse::<usize>()? << 20;
        taesd_ops::update_settings(|s| s.workspace_limit = bytes);
    }
    if stock {
        taesd::layers::set_use_ops(false);
    }
    // `--cpu`: a smoke run of this program on the CPU (tiny sizes).
    let dev = if args.iter().any(|a| a == "--cpu") { Device::Cpu } else { Device::new_cuda(0)? };
    // As `train` does (train::device::open); `--untuned-device`: the driver's and cudarc's
    // defaults instead (freed memory released at each synchronisation, events per allocation).
    let tuned = !args.iter().any(|a| a == "--untuned-device");
    if tuned {
        taesd_ops::tune_device(&dev)?;
    }
    let _ = Tensor::zeros(1, candle_core::DType::F32, &dev)?;
    dev.synchronize()?;
    let base = used_mib();
    let model = taesd::Variant::Taef2.config();
    let cfg = match recipe_kind.as_str() {
        "full" => RecipeConfig { replay_capacity: 4 * batch, ..Default::default() },
        "cycle" => RecipeConfig { replay_capacity: 4 * batch, cycle_weight: 1.0, ..Default::default() },
        "decoder" => RecipeConfig {
            train_encoder: false,
            gan_weight: 0.0,
            lowres_mse_weight: 0.0,
            fullres_mse_weight: 1.0,
            ..Default::default()
        },
        other => bail!("--recipe full|cycle|decoder, not {other}"),
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
    // As the PyTorch script: the high-water marks of the timed steps (after warm-up).
    dev.synchronize()?;
    pool_high_mib(&dev, true);
    let t0 = Instant::now();
    let mut n = 0;
    // Per step: wall time (synchronised) and the host's time to launch it (StepReport::issue_seconds).
    let (mut step_ms, mut issue_ms) = (Vec::new(), Vec::new());
    while n < steps && (n == 0 || t0.elapsed().as_secs_f64() < seconds) {
        let ts = Instant::now();
        let r = recipe.step(&b)?;
        dev.synchronize()?;
        step_ms.push(ts.elapsed().as_secs_f64() * 1e3);
        issue_ms.push(r.issue_seconds * 1e3);
        peak = peak.max(used_mib());
        if let Some(why) = r.skipped {
            eprintln!("step skipped: {why}");
        }
        n += 1;
    }
    let dt = t0.elapsed().as_secs_f64() / n as f64;
    let (pool_used, pool_reserved) = pool_high_mib(&dev, false);
    // `--profile N`: N more steps with a synchronising timer at each phase (after the timed
    // steps, so they do not slow them): where the time goes, ms per step and phase.
    let mut phases = serde_json::Map::new();
    let np: u64 = get("--profile").map_or(Ok(0), |s| s.parse())?;
    if np > 0 {
        recipe.set_profiling(true);
        for _ in 0..np {
            recipe.step(&b)?;
        }
        let p = recipe.profile().expect("profiling on");
        let total: f64 = p.seconds.values().sum();
        for (k, v) in &p.seconds {
            let ms = v * 1e3 / p.steps as f64;
            let peak = p.peak_mib.get(k).copied().unwrap_or(f64::NAN);
            eprintln!("  {k:<40} {ms:8.2} ms/step  {:5.1}%  peak {peak:8.0} MiB", 100.0 * v / total);
            phases.insert((*k).into(), serde_json::json!({"ms": ms, "peak_mib": peak}));
        }
    }
    let host_profile = host_profile(get("--host-profile"), get("--host-profile-steps"), &mut recipe, &b)?;
    println!(
        "{}",
        serde_json::json!({
            "impl": if stock { "candle-stock" } else { "ours" },
            "tuned_device": tuned,
            "mode": if precision == Precision::F32 { "fp32" } else { precision.name() },
            "recipe": recipe_kind, "size": size, "batch": batch, "steps": n,
            "ms_per_step": dt * 1e3, "images_per_s": batch as f64 / dt,
            "peak_mem_mib": pool_used,
            "peak_reserved_mib": pool_reserved,
            "step_ms_min_median_max": spread(&mut step_ms),
            "issue_ms_min_median_max": spread(&mut issue_ms),
            "mem_get_info_growth_mib": peak - base,
            "phases": phases,
            "host_profile": host_profile,
        })
    );
    Ok(())
}

/// `--host-profile PATH`: `steps` more steps with the host sampled; the folded stacks go to PATH.
#[cfg(feature = "host-profile")]
fn host_profile(
    path: Option<String>,
    steps: Option<String>,
    recipe: &mut Recipe,
    b: &Batch,
) -> Result<serde_json::Value> {
    let Some(path) = path else { return Ok(serde_json::Value::Null) };
    let steps: usize = steps.map_or(Ok(20), |s| s.parse())?;
    let prof = train::host_profile::HostProfile::start(997)?;
    let (t0, cpu0) = (Instant::now(), train::host_profile::process_cpu_seconds()?);
    let mut issue = 0.0;
    for _ in 0..steps {
        issue += recipe.step(b)?.issue_seconds;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu_s = train::host_profile::process_cpu_seconds()? - cpu0;
    let samples = prof.write(std::path::Path::new(&path))?;
    eprintln!("host profile: {samples} samples, {cpu_s:.2} s CPU over {steps} steps ({wall:.2} s) -> {path}");
    Ok(serde_json::json!({
        "path": path, "steps": steps, "samples": samples, "cpu_ms_per_step": cpu_s * 1e3 / steps as f64,
        "ms_per_step": wall * 1e3 / steps as f64, "issue_ms_per_step": issue * 1e3 / steps as f64,
    }))
}

#[cfg(not(feature = "host-profile"))]
fn host_profile(path: Option<String>, _: Option<String>, _: &mut Recipe, _: &Batch) -> Result<serde_json::Value> {
    match path {
        Some(_) => bail!("--host-profile: gpu_bench was built without the train feature host-profile"),
        None => Ok(serde_json::Value::Null),
    }
}

/// `[min, median, max]` of `v`.
fn spread(v: &mut [f64]) -> [f64; 3] {
    v.sort_by(f64::total_cmp);
    match v {
        [] => [f64::NAN; 3],
        _ => [v[0], v[v.len() / 2], v[v.len() - 1]],
    }
}
