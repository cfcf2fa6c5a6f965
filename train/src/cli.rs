//! Command-line interface of `train`.

use crate::config::{plan, PlanRequest};
use crate::dist::World;
use crate::runner::{RunOptions, RunOutcome};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(
    name = "train",
    version,
    about = "Train TAESD tiny autoencoders with candle from precompute's shards; evaluate, preview and convert checkpoints",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Args, Debug, Clone, Default)]
pub struct TrainArgs {
    /// Configuration file (TOML); repeat for several runs, one after another.
    #[arg(long = "config", value_name = "TOML")]
    pub configs: Vec<PathBuf>,
    /// Sweep file: [base] plus [[runs]] entries (each with a `name`), each a run.
    #[arg(long, value_name = "TOML")]
    pub sweep: Option<PathBuf>,
    /// Run only this entry of the sweep (repeatable), e.g. to run the entries in parallel.
    #[arg(long, value_name = "NAME")]
    pub only: Vec<String>,
    /// Override any setting: section.key=value (repeatable), e.g. --set recipe.lr=1e-4.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Shard folder written by precompute (data.shards).
    #[arg(long)]
    pub shards: Option<PathBuf>,
    /// Total optimisation steps (run.steps).
    #[arg(long)]
    pub steps: Option<u64>,
    /// data.batch_size.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Training crop side (data.crop).
    #[arg(long)]
    pub crop: Option<u32>,
    /// cpu, cuda, cuda:N or auto (run.device).
    #[arg(long)]
    pub device: Option<String>,
    /// Step arithmetic: f32, tf32 or bf16 (run.precision; bf16 = mixed precision with f32
    /// master weights, for CUDA).
    #[arg(long)]
    pub precision: Option<String>,
    /// Run folder (run.dir); with several runs, each gets a subfolder named after it.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// run.seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Continue from the run folder's latest checkpoint (with no --config, its saved config).
    #[arg(long)]
    pub resume: bool,
    /// Print the resolved configuration of each run and exit.
    #[arg(long)]
    pub print_config: bool,
    /// No progress bar or progress lines.
    #[arg(long)]
    pub quiet: bool,
    /// Stop training after this many seconds of this session (checkpoint as on Ctrl-C; continue
    /// with --resume): one stint of a run longer than a machine is held. The run's end
    /// (--steps) and its learning-rate schedule stay as they are.
    #[arg(long, value_name = "SECONDS")]
    pub time_limit: Option<f64>,
    /// Fit a new run's step counts to this many seconds of training on this machine: each crop
    /// and batch size of the schedule is timed first (throwaway steps, each batch's upload included:
    /// --fit-steps and at least 0.3% of SECONDS each), then every step count
    /// (run.steps, each [[data.stages]] entry) is scaled by one factor, the schedule's shape
    /// kept, 3% left for evaluations, previews, checkpoints and the loader; at each stage switch
    /// the rest of the run is fitted again to the time left. The fitted counts are the run's
    /// (config.toml; a resume keeps them). Data-parallel: the ranks time the step together and
    /// fit rank 0's timing. Pair with a --time-limit ~10% above.
    #[arg(long, value_name = "SECONDS")]
    pub fit_time: Option<f64>,
    /// Steps timed per crop and batch size for --fit-time (after a third as many untimed ones).
    #[arg(long, value_name = "N", default_value_t = crate::runner::fit::DEFAULT_TIMED_STEPS)]
    pub fit_steps: usize,
    /// Data-parallel on this node: start N ranks of this command (one per GPU, rank r on
    /// cuda:r; with --device cpu, N CPU processes). Multi-node runs are started by torchrun or
    /// srun instead (docs/scale-out.md). data.batch_size is per rank: the global batch is N
    /// times it.
    #[arg(long, value_name = "N")]
    pub gpus: Option<usize>,
    /// Collectives of a data-parallel run: auto (NCCL on CUDA, TCP on the CPU; none alone), tcp
    /// or nccl (also alone: the NCCL path at world size 1).
    #[arg(long, value_name = "BACKEND", default_value = "auto")]
    pub dist_backend: String,
    /// Seconds a data-parallel rank waits for the others in a collective (a dead rank is noticed
    /// at once; this bounds a hung one), and at the rendezvous (the smaller of it and 300).
    #[arg(long, value_name = "SECONDS", default_value_t = 1800.0)]
    pub dist_timeout: f64,
    /// NCCL's library (default: libnccl.so.2 on the library path), e.g. the nvidia-nccl-cu13
    /// wheel's `nvidia/nccl/lib/libnccl.so.2`.
    #[arg(long, value_name = "PATH")]
    pub nccl_lib: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// PSNR, SSIM, sharpness and latent errors of a model (and a reference decoder) on shards.
    Eval {
        /// Checkpoint (file/folder, any layout), run folder or run checkpoint folder.
        #[arg(long)]
        model: PathBuf,
        /// Shard folder (default: the run's, when --model is a run folder).
        #[arg(long)]
        shards: Option<PathBuf>,
        /// A decoder to compare with (e.g. the released one).
        #[arg(long)]
        reference: Option<PathBuf>,
        /// Encoder for the latent-cycle error |E(D(z)) - z| (default: the model's).
        #[arg(long)]
        cycle_encoder: Option<PathBuf>,
        /// heldout (default) or all.
        #[arg(long, default_value = "heldout")]
        split: String,
        /// Held-out fraction (default: the run's data.eval_fraction, else 0.02).
        #[arg(long)]
        eval_fraction: Option<f64>,
        #[arg(long, default_value_t = 256)]
        max_images: usize,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        #[arg(long, default_value = "auto")]
        device: String,
        /// Variant, where the checkpoint cannot tell (taesd vs taesdxl).
        #[arg(long)]
        variant: Option<String>,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Images to latents (.safetensors and/or .npy per image).
    Encode {
        #[arg(long)]
        model: PathBuf,
        /// An image, a folder of images (recursive) or a webdataset .tar.
        #[arg(long)]
        images: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// safetensors, npy or both.
        #[arg(long, default_value = "safetensors")]
        format: String,
        /// Resize (short side) and centre-crop to N x N first (default: native size).
        #[arg(long)]
        size: Option<u32>,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long)]
        variant: Option<String>,
    },
    /// Latents (shard folder, .safetensors, .npy, or a folder of them) to PNGs.
    Decode {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        latents: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// At most N latents (0 = all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long)]
        variant: Option<String>,
    },
    /// One metric of several runs in one chart (A/B curves): a line per run folder.
    Plot {
        /// Run folders (or metrics.jsonl files).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Dotted path into the train lines (losses.decoder_mse, lr, images_per_s) or eval.NAME
        /// for the EMA model's held-out metrics (eval.psnr).
        #[arg(long, default_value = "losses.decoder_mse")]
        key: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 960)]
        width: u32,
        #[arg(long, default_value_t = 540)]
        height: u32,
    },
    /// The model for another tool: `onnx` (encoder and decoder .onnx, for ONNX Runtime) or `pth`
    /// (the taesd.py / ComfyUI vae_approx `.pth` pair).
    Export {
        /// Checkpoint (file/folder, any layout), run folder or run checkpoint folder.
        #[arg(long)]
        model: PathBuf,
        /// onnx or pth.
        #[arg(long)]
        format: String,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// f32 (default) or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        #[arg(long)]
        variant: Option<String>,
    },
    /// Write RUN/report.html: one self-contained page of a run (config, curves, eval, preview,
    /// throughput, exports).
    Report {
        /// Run folder.
        run: PathBuf,
    },
    /// A checkpoint in another layout (taesd, diffusers, comfyui, combined).
    Convert {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        layout: String,
        /// Folder (taesd, diffusers) or file (comfyui, combined).
        #[arg(long)]
        out: PathBuf,
        /// f32, f16 or bf16 (default: as stored).
        #[arg(long)]
        dtype: Option<String>,
        #[arg(long)]
        variant: Option<String>,
    },
}

/// The direct flags, typed (device and precision parsed here, once).
fn flags(a: &TrainArgs) -> Result<crate::config::Flags> {
    Ok(crate::config::Flags {
        shards: a.shards.clone(),
        steps: a.steps,
        batch_size: a.batch_size,
        crop: a.crop,
        device: a.device.as_deref().map(crate::device::DeviceSpec::parse).transpose().context("--device")?,
        precision: a.precision.as_deref().map(crate::recipe::Precision::parse).transpose().context("--precision")?,
        run_dir: a.run_dir.clone(),
        seed: a.seed,
    })
}

/// The device of data-parallel rank `w` for `run.device`: `cuda`, `cuda:N` and (with CUDA)
/// `auto` mean this rank's GPU, `cuda:LOCAL_RANK`.
fn rank_device(spec: crate::device::DeviceSpec, w: &World) -> Result<candle_core::Device> {
    use crate::device::{cuda_compiled, open_spec, DeviceSpec};
    match spec {
        DeviceSpec::Cpu => Ok(candle_core::Device::Cpu),
        DeviceSpec::Cuda(_) => open_spec(DeviceSpec::Cuda(w.cuda_ordinal())),
        DeviceSpec::Auto if cuda_compiled() => open_spec(DeviceSpec::Cuda(w.cuda_ordinal())).or_else(|e| {
            tracing::warn!("--device auto: cuda:{} did not open ({e:#}); using the CPU", w.cuda_ordinal());
            Ok(candle_core::Device::Cpu)
        }),
        DeviceSpec::Auto => Ok(candle_core::Device::Cpu),
    }
}

/// Join the data-parallel job of `world` for `plans` (`None`: alone).
fn join(a: &TrainArgs, world: &World, plans: &[crate::config::RunPlan]) -> Result<Option<crate::dist::Dist>> {
    let backend = crate::dist::Backend::parse(&a.dist_backend).context("--dist-backend")?;
    if !world.is_distributed() && backend == crate::dist::Backend::Auto {
        return Ok(None);
    }
    if !(a.dist_timeout.is_finite() && a.dist_timeout > 0.0) {
        bail!("--dist-timeout {}: give a positive number of seconds", a.dist_timeout);
    }
    let spec = plans.first().map(|p| p.config.run.device).context("no run")?;
    if plans.iter().any(|p| p.config.run.device != spec) {
        bail!("a data-parallel sweep runs every entry on the same device (run.device differs between entries)");
    }
    let device = rank_device(spec, world).with_context(|| format!("rank {}", world.rank))?;
    let op = std::time::Duration::from_secs_f64(a.dist_timeout);
    let opts = crate::dist::DistOptions {
        backend,
        timeouts: crate::dist::Timeouts { connect: op.min(std::time::Duration::from_secs(300)), op },
        nccl_lib: a.nccl_lib.clone(),
    };
    crate::dist::join(world, &device, &opts)
        .with_context(|| format!("joining the data-parallel run as {}", world.describe()))
}

/// `train` (the runs) as this process's place in `world` (read from the launcher's
/// variables by the binary; [`World::single`] alone). Returns the process exit code.
pub fn train(a: &TrainArgs, stop: Arc<AtomicBool>, world: &World) -> Result<i32> {
    if a.gpus.is_some() {
        bail!("--gpus is handled by the binary (it starts the ranks); a rank itself gets RANK, WORLD_SIZE, ...");
    }
    if let (true, Some(d)) = (a.resume, &a.run_dir) {
        if !d.exists() {
            bail!("--resume: no such run: {} does not exist (start a run there without --resume)", d.display());
        }
    }
    let req = PlanRequest {
        configs: a.configs.clone(),
        sweep: a.sweep.clone(),
        overrides: a.sets.clone(),
        flags: flags(a)?,
        resume: a.resume,
        only: a.only.clone(),
    };
    let plans = plan(&req, a.run_dir.as_deref())?;
    if a.print_config {
        for p in &plans {
            let r = crate::runner::resolve(&p.config);
            let text = match r {
                Ok(r) => r.config.to_toml()?,
                Err(e) => {
                    eprintln!("note: run `{}` not fully resolved ({e:#}); showing the configuration as given", p.name);
                    p.config.to_toml()?
                }
            };
            println!("# run `{}` -> {}\n{text}", p.name, p.dir.display());
        }
        return Ok(0);
    }
    if let Some(t) = a.time_limit {
        if !(t.is_finite() && t > 0.0) {
            bail!("--time-limit {t}: give a positive number of seconds");
        }
    }
    let time_limit = a.time_limit.map(std::time::Duration::from_secs_f64);
    if let Some(t) = a.fit_time {
        crate::runner::fit::check_budget(t)?;
    }
    let dist = join(a, world, &plans)?;
    let root = dist.as_ref().is_none_or(|d| d.is_root());
    let comm = dist.as_ref().map(|d| d.comm.clone());
    let opts = RunOptions {
        resume: a.resume,
        quiet: a.quiet,
        stop,
        time_limit,
        fit_time: a.fit_time,
        fit_steps: a.fit_steps,
        dist,
    };
    let r = runs(a, &plans, &opts, root);
    // The other ranks learn of this rank's failure (a goodbye otherwise).
    if let Some(c) = comm {
        match &r {
            Err(e) => c.abort(&format!("{e:#}")),
            Ok(_) => c.close(),
        }
    }
    r
}

/// The runs of `plans`, one after another; outcomes printed by rank 0 (or alone).
fn runs(a: &TrainArgs, plans: &[crate::config::RunPlan], opts: &RunOptions, root: bool) -> Result<i32> {
    let mut outcomes: Vec<RunOutcome> = Vec::new();
    for (i, p) in plans.iter().enumerate() {
        if plans.len() > 1 && !a.quiet && root {
            eprintln!("=== run {}/{}: {} ===", i + 1, plans.len(), p.name);
        }
        let o = crate::runner::run(p, opts)?;
        if root {
            print_outcome(&o);
        }
        if o.time_limit_reached {
            // A stint ended as asked: not a failure.
            return Ok(0);
        }
        let stop = o.interrupted;
        outcomes.push(o);
        if stop {
            let left: Vec<&str> = plans[i + 1..].iter().map(|p| p.name.as_str()).collect();
            if !left.is_empty() && root {
                println!("not started: {}", left.join(", "));
            }
            return Ok(130);
        }
    }
    if outcomes.len() > 1 && root {
        println!("\nsweep summary:");
        for o in &outcomes {
            let psnr = o.final_eval.iter().find(|(n, _)| n == "ema").and_then(|(_, m)| m.psnr);
            println!(
                "  {:<20} step {:>7}  {:>6.2} steps/s  ema psnr {}",
                o.name,
                o.step,
                o.steps_per_s,
                psnr.map(|p| format!("{p:.2}")).unwrap_or_else(|| "-".into())
            );
        }
    }
    Ok(0)
}

fn print_outcome(o: &RunOutcome) {
    if o.interrupted {
        println!(
            "run `{}` {} at step {}/{}; checkpoint saved. Continue with: train --resume --run-dir {}",
            o.name,
            if o.time_limit_reached { "stopped at the time limit" } else { "interrupted" },
            o.step,
            o.steps,
            o.dir.display()
        );
        return;
    }
    println!(
        "run `{}` finished: step {} ({:.2} steps/s this session, {} skipped)",
        o.name, o.step, o.steps_per_s, o.skipped_steps
    );
    if !o.final_eval.is_empty() {
        print!("{}", crate::eval::table(&o.final_eval));
    }
    for f in &o.exported {
        println!("  exported {}", f.display());
    }
}

/// Run a subcommand.
pub fn command(c: &Command) -> Result<i32> {
    match c {
        Command::Eval {
            model,
            shards,
            reference,
            cycle_encoder,
            split,
            eval_fraction,
            max_images,
            batch_size,
            device,
            variant,
            json,
        } => {
            let split = match (split.as_str(), eval_fraction) {
                ("all", None) => Some(crate::eval::Split::All),
                ("all", Some(_)) => bail!("--eval-fraction applies to --split heldout"),
                ("heldout", Some(f)) => Some(crate::eval::Split::HeldOut(*f)),
                ("heldout", None) => None,
                (other, _) => bail!("--split {other}: use heldout or all"),
            };
            let args = crate::eval::EvalArgs {
                model: model.clone(),
                variant: crate::models::parse_variant(variant.as_deref())?,
                reference: reference.clone(),
                cycle_encoder: cycle_encoder.clone(),
                shards: shards.clone(),
                split,
                max_images: *max_images,
                batch_size: *batch_size,
                device: crate::device::open(device)?,
            };
            let rep = crate::eval::command(&args)?;
            let files: Vec<String> = rep.model_files.iter().map(|p| p.display().to_string()).collect();
            println!("ours: {}", files.join(", "));
            println!("{} images ({}), {} px, shards {}", rep.images, rep.split, rep.resolution, rep.shards.display());
            let rows: Vec<(String, crate::eval::Metrics)> =
                rep.models.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            print!("{}", crate::eval::table(&rows));
            if let Some(p) = json {
                std::fs::write(p, serde_json::to_string_pretty(&rep)? + "\n")
                    .with_context(|| format!("cannot write {}", p.display()))?;
            }
            Ok(0)
        }
        Command::Encode { model, images, out, format, size, batch_size, device, variant } => {
            let s = crate::encode::run(&crate::encode::EncodeArgs {
                model: model.clone(),
                variant: crate::models::parse_variant(variant.as_deref())?,
                images: images.clone(),
                out: out.clone(),
                formats: crate::encode::Formats::parse(format)?,
                batch_size: *batch_size,
                size: *size,
                device: crate::device::open(device)?,
            })?;
            println!("encoded {} images into {} ({} files)", s.encoded, out.display(), s.files.len());
            for (src, why) in &s.failed {
                println!("  skipped {src}: {why}");
            }
            Ok(if s.encoded == 0 { 1 } else { 0 })
        }
        Command::Decode { model, latents, out, batch_size, limit, device, variant } => {
            let s = crate::decode::run(&crate::decode::DecodeArgs {
                model: model.clone(),
                variant: crate::models::parse_variant(variant.as_deref())?,
                latents: latents.clone(),
                out: out.clone(),
                batch_size: *batch_size,
                limit: *limit,
                device: crate::device::open(device)?,
            })?;
            println!("decoded {} latents into {}", s.files.len(), out.display());
            Ok(0)
        }
        Command::Plot { runs, key, out, width, height } => {
            crate::plot::write_comparison(runs, key, out, *width, *height)?;
            println!("wrote {}", out.display());
            Ok(0)
        }
        Command::Export { model, format, out, dtype, variant } => {
            let files = crate::export::run(&crate::export::ExportArgs {
                model: model.clone(),
                variant: crate::models::parse_variant(variant.as_deref())?,
                format: crate::export::ExportFormat::parse(format)?,
                out: out.clone(),
                precision: crate::export::parse_precision(dtype)?,
            })?;
            for f in files {
                println!("wrote {}", f.display());
            }
            Ok(0)
        }
        Command::Report { run } => {
            if !run.join(crate::config::RESOLVED_CONFIG).is_file() {
                bail!("{} is not a run folder (no {})", run.display(), crate::config::RESOLVED_CONFIG);
            }
            println!("wrote {}", crate::report::write(run)?.display());
            Ok(0)
        }
        Command::Convert { model, layout, out, dtype, variant } => {
            let layout = taesd::Layout::parse(layout)
                .ok_or_else(|| anyhow::anyhow!("--layout {layout}: use taesd, diffusers, comfyui or combined"))?;
            let files = crate::convert::run(&crate::convert::ConvertArgs {
                model: model.clone(),
                variant: crate::models::parse_variant(variant.as_deref())?,
                layout,
                out: out.clone(),
                dtype: dtype.as_deref().map(crate::convert::parse_dtype).transpose()?,
            })?;
            for f in files {
                println!("wrote {}", f.display());
            }
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    /// The README calls `precompute` and `train` by name: it must say where they come from.
    #[test]
    fn the_readme_says_where_the_binaries_are() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        for needle in [
            "cargo install --path precompute",
            "cargo install --path train",
            "target/release/precompute",
            "target/release/train",
        ] {
            assert!(readme.contains(needle), "README does not say `{needle}`");
        }
    }
}
