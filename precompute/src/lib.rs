//! `precompute`: stage one of taesd-rs. A folder of images -> Parquet shards of image/latent
//! pairs made by a VAE encoder running in ONNX Runtime. See the README for the format.

pub mod cli;
pub mod device;
pub mod inspect;
pub mod ortlib;
pub mod output;
pub mod pipeline;
pub mod teacher;

use anyhow::{bail, Context, Result};
use cli::{ImageFormatArg, LatentDtypeArg, RunArgs};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;
use taesd_data::{list_inputs, AugmentConfig, DecodeLimits};
use taesd_schemas::{preset, preset_names, ErrorRecord, ImageFormat, LatentDtype, OutputConfig, PixelRange, VaeSpec};

/// What a run did, for the final summary (and tests).
#[derive(Debug, Clone)]
pub struct Summary {
    pub out: std::path::PathBuf,
    pub device: String,
    pub inputs_total: u64,
    pub shards_total: u32,
    pub shards_skipped: u32,
    pub stats: pipeline::RunStats,
    /// Inputs that could not even be listed (unreadable tar files).
    pub listing_errors: Vec<ErrorRecord>,
    pub rows_total: u64,
}

impl Summary {
    pub fn print(&self) {
        let s = &self.stats;
        let secs = s.elapsed.as_secs_f64().max(1e-9);
        println!("precompute: {}", self.out.display());
        println!("  teacher device   {}", self.device);
        println!(
            "  inputs           {} in folder, {} processed now ({} shards written, {} already done)",
            self.inputs_total, s.inputs, s.shards_written, self.shards_skipped
        );
        println!("  rows             {} written now, {} in the output", s.rows, self.rows_total);
        let skipped = s.errors.len() + self.listing_errors.len();
        println!("  skipped          {skipped}");
        let mut by_reason: std::collections::BTreeMap<String, Vec<&str>> = Default::default();
        for e in s.errors.iter().chain(&self.listing_errors) {
            by_reason.entry(format!("{}: {}", e.stage, e.reason)).or_default().push(&e.source);
        }
        for (reason, sources) in &by_reason {
            let more = if sources.len() > 3 { format!(" (+{} more)", sources.len() - 3) } else { String::new() };
            println!("    {} -- {reason}{more}", sources.iter().take(3).cloned().collect::<Vec<_>>().join(", "));
        }
        if s.inputs > 0 {
            println!(
                "  throughput       {:.1} images/s, {:.1} rows/s over {:.1} s; teacher busy {:.0}% of the time",
                s.inputs as f64 / secs,
                s.rows as f64 / secs,
                secs,
                100.0 * s.teacher_busy.as_secs_f64() / secs
            );
            let w = &s.waits;
            println!(
                "  pipeline         waited {:.2} s for decoded inputs, {:.2} s for the writer; shard files {:.2} s (in parallel), {:.2} s after the last batch",
                w.for_inputs.as_secs_f64(),
                w.for_writer.as_secs_f64(),
                w.writing_files.as_secs_f64(),
                w.after_teacher.as_secs_f64()
            );
        }
        println!("  errors           {}", self.out.join(taesd_schemas::shard::ERRORS_FILE).display());
    }
}

/// The VAE spec for `--vae` (and the custom flags).
pub fn vae_spec(args: &RunArgs) -> Result<VaeSpec> {
    let name = args.vae.as_deref().unwrap_or_default();
    if name == "custom" {
        let channels = args.channels.context("--vae custom needs --channels")?;
        let scale = args.scale.context("--vae custom needs --scale (use 1 for latents already in TAESD scale)")?;
        let range = args.input_range.as_deref().context("--vae custom needs --input-range (\"0,1\" or \"-1,1\")")?;
        let range = PixelRange::parse(range).with_context(|| format!("--input-range {range}: use \"0,1\" or \"-1,1\""))?;
        return Ok(VaeSpec::custom(channels, scale, args.shift.unwrap_or(0.0), range, args.downscale));
    }
    if args.channels.is_some() || args.scale.is_some() || args.shift.is_some() || args.input_range.is_some() {
        bail!("--channels/--scale/--shift/--input-range only apply to --vae custom");
    }
    match preset(name) {
        Some(p) => Ok(p.spec()),
        None => bail!("unknown --vae `{name}`; choose one of: {}", preset_names().join(", ")),
    }
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Decode/resize threads: --workers, else every core.
fn workers(args: &RunArgs) -> usize {
    args.workers.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// The teacher's settings from the flags.
pub fn teacher_options(args: &RunArgs) -> teacher::TeacherOptions {
    teacher::TeacherOptions {
        device: args.device,
        intra_threads: args.ort_threads,
        tf32: args.tf32,
        cuda: teacher::CudaTuning {
            conv_search: args.conv_search,
            prefer_nhwc: args.nhwc,
            io_binding: args.io_binding,
            static_shapes: args.static_shapes || args.cuda_graph,
            cuda_graph: args.cuda_graph,
            extra: args.cuda_options.clone(),
        },
        batch: args.batch_size.max(1),
        warmup: args.warmup,
    }
}

/// What `--decode-only` measured.
#[derive(Debug, Clone)]
pub struct DecodeSummary {
    pub workers: usize,
    pub stats: pipeline::DecodeStats,
}

impl DecodeSummary {
    pub fn print(&self) {
        let s = &self.stats;
        let secs = s.elapsed.as_secs_f64().max(1e-9);
        println!("precompute --decode-only: {} workers", self.workers);
        println!("  inputs           {} ({} failed)", s.inputs, s.failed);
        println!("  samples          {}", s.samples);
        println!(
            "  decode rate      {:.1} images/s, {:.1} samples/s over {:.2} s (read + sha256 + decode + crop + stored-image encode + input conversion)",
            s.inputs as f64 / secs,
            s.samples as f64 / secs,
            secs
        );
    }
}

/// `--decode-only`: the CPU side of the pipeline alone, no teacher, no output.
pub fn decode_only(args: &RunArgs) -> Result<DecodeSummary> {
    let spec = vae_spec(args)?;
    let images = args.images.as_deref().context("--images is required")?;
    if args.resolution == 0 || args.resolution % spec.downscale as u32 != 0 {
        bail!("--resolution {} must be a positive multiple of {}", args.resolution, spec.downscale);
    }
    let mut items = list_inputs(images).with_context(|| format!("cannot read --images {}", images.display()))?.items;
    if let Some(n) = args.limit {
        items.truncate(n);
    }
    let cfg = pipeline_config(args, &spec, teacher::InputFormat { half: args.decode_dtype == LatentDtypeArg::F16, range: spec.input_range }, String::new());
    let stats = pipeline::decode_only(&items, &cfg)?;
    Ok(DecodeSummary { workers: cfg.workers, stats })
}

fn pipeline_config(args: &RunArgs, spec: &VaeSpec, input_format: teacher::InputFormat, onnx_sha256: String) -> pipeline::PipelineConfig {
    pipeline::PipelineConfig {
        input_format,
        batch_size: args.batch_size.max(1),
        workers: workers(args),
        augment: AugmentConfig {
            resolution: args.resolution,
            variants: args.variants,
            hflip: args.hflip,
            color_augment: args.color_augment,
            seed: args.seed,
        },
        image_format: image_format(args),
        jpeg_quality: args.quality,
        limits: DecodeLimits { max_pixels: args.max_pixels, ..DecodeLimits::default() },
        latent_dtype: latent_dtype(args),
        vae: spec.clone(),
        onnx_sha256,
        progress: !args.quiet,
    }
}

/// Run precompute end to end.
pub fn run(args: &RunArgs) -> Result<Summary> {
    let spec = vae_spec(args)?;
    if args.cuda_graph && !args.io_binding {
        bail!("--cuda-graph needs --io-binding true (the graph replays fixed device buffers)");
    }
    let images = args.images.as_deref().context("--images is required")?;
    let out_dir = args.out.as_deref().context("--out is required")?;
    let onnx = args.onnx.as_deref().context("--onnx is required")?;
    if args.variants == 0 {
        bail!("--variants must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.color_augment) {
        bail!("--color-augment is a fraction in [0, 1]");
    }
    if args.resolution == 0 || args.resolution % spec.downscale as u32 != 0 {
        bail!("--resolution {} must be a positive multiple of {}", args.resolution, spec.downscale);
    }

    let listing = list_inputs(images).with_context(|| format!("cannot read --images {}", images.display()))?;
    let mut items = listing.items;
    if let Some(n) = args.limit {
        items.truncate(n);
    }
    let listing_errors: Vec<ErrorRecord> = listing
        .errors
        .into_iter()
        .map(|(source, reason)| ErrorRecord { source, stage: "list".into(), reason })
        .collect();
    let onnx_sha256 = sha256_file(onnx)?;
    let inputs_per_shard = (args.shard_rows / args.variants).max(1);
    let config = OutputConfig {
        vae: spec.clone(),
        onnx_sha256: onnx_sha256.clone(),
        resolution: args.resolution,
        variants: args.variants,
        hflip: args.hflip,
        color_augment: args.color_augment,
        seed: args.seed,
        image_format: image_format(args),
        jpeg_quality: args.quality,
        latent_dtype: latent_dtype(args),
        inputs_per_shard,
    };
    let inputs_info = output::InputsInfo {
        root: images.display().to_string(),
        total: items.len() as u64,
        fingerprint: taesd_data::fingerprint(&items),
    };
    let shards_total = items.len().div_ceil(inputs_per_shard as usize) as u32;
    let mut out = output::OutputDir::open(out_dir, &config, &inputs_info, onnx, shards_total)?;

    let pending: Vec<(u32, Vec<taesd_data::InputItem>)> = items
        .chunks(inputs_per_shard as usize)
        .enumerate()
        .filter(|(i, _)| !out.is_done(*i as u32))
        .map(|(i, c)| (i as u32, c.to_vec()))
        .collect();
    let shards_skipped = shards_total - pending.len() as u32;

    let mut device = "none (nothing to do)".to_string();
    let stats = if pending.is_empty() {
        pipeline::RunStats::default()
    } else {
        let lib = ortlib::find(args.ort_lib.as_deref())?;
        let env = ortlib::init(&lib)?;
        let opts = teacher_options(args);
        let teacher = teacher::Teacher::new(&env, onnx, &spec, args.resolution, opts)?;
        device = teacher.device.clone();
        tracing::info!("teacher {} on {} (ONNX Runtime from {}, found by {})", onnx.display(), device, lib.path.display(), lib.found_by);
        if teacher.device != "cpu" {
            eprintln!(
                "teacher on {}: {}; warm-up {:.1} s (not timed)",
                teacher.device,
                teacher.setup,
                teacher.warmup_time.as_secs_f64()
            );
        }
        out.manifest.extra.insert("device".into(), device.clone().into());
        out.manifest.extra.insert("teacher_setup".into(), teacher.setup.clone().into());
        let cfg = pipeline_config(args, &spec, teacher.input_format(), onnx_sha256);
        pipeline::run(pending, teacher, &mut out, &cfg)?
    };
    out.finish(&listing_errors)?;
    Ok(Summary {
        out: out_dir.to_path_buf(),
        device,
        inputs_total: items.len() as u64,
        shards_total,
        shards_skipped,
        stats,
        listing_errors,
        rows_total: out.manifest.rows,
    })
}

/// The stored-image format the flags ask for.
fn image_format(args: &RunArgs) -> ImageFormat {
    match args.image_format {
        ImageFormatArg::Png => ImageFormat::Png,
        ImageFormatArg::Jpeg => ImageFormat::Jpeg,
    }
}

/// The stored-latent element type the flags ask for.
fn latent_dtype(args: &RunArgs) -> LatentDtype {
    match args.latent_dtype {
        LatentDtypeArg::F16 => LatentDtype::Float16,
        LatentDtypeArg::F32 => LatentDtype::Float32,
    }
}
