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
use taesd_data::{list_inputs, part_of, select_part, AugmentConfig, DecodeLimits};
use taesd_schemas::{
    preset, preset_names, ErrorRecord, ImageFormat, LatentDtype, OutputConfig, Part, PixelRange, VaeSpec,
};

/// What a run did, for the final summary (and tests).
#[derive(Debug, Clone)]
pub struct Summary {
    pub out: std::path::PathBuf,
    pub device: String,
    /// Inputs listed under `--images` (files, and tar members named like images), after `--limit`.
    pub inputs_total: u64,
    /// Listed inputs that shards finished before this run cover.
    pub inputs_already: u64,
    /// Shards finished before this run.
    pub shards_before: u32,
    /// This run's shards (indices), planned.
    pub shards_planned: Vec<u32>,
    /// Inputs earlier runs encoded that are no longer listed / whose size changed.
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub stats: pipeline::RunStats,
    /// What could not even be listed (unreadable folders or tar files, special files).
    pub listing_errors: Vec<ErrorRecord>,
    pub rows_total: u64,
    pub upscaled_total: u64,
    /// A folder without finished shards started over with other settings: what changed.
    pub restarted: Option<String>,
    pub resolution: u32,
    /// `--part`: this run's part, and the inputs listed in all (before the partition).
    pub part: Option<(Part, u64)>,
    /// This run's errors file (`errors.jsonl`, or the part's).
    pub errors_file: std::path::PathBuf,
}

/// `a, b, c (+N more)`.
fn some_of(items: &[String], n: usize) -> String {
    let more = if items.len() > n { format!(" (+{} more)", items.len() - n) } else { String::new() };
    format!("{}{more}", items.iter().take(n).cloned().collect::<Vec<_>>().join(", "))
}

/// `3`, `3..7`.
fn index_range(v: &[u32]) -> String {
    match (v.first(), v.last()) {
        (Some(a), Some(b)) if a != b => format!("{a}..{b}"),
        (Some(a), _) => a.to_string(),
        _ => "-".into(),
    }
}

impl Summary {
    pub fn print(&self) {
        let s = &self.stats;
        let secs = s.elapsed.as_secs_f64().max(1e-9);
        println!("precompute: {}", self.out.display());
        println!("  teacher device   {}", self.device);
        if let Some((part, listed)) = self.part {
            println!("  part             {part}: {} of the {listed} listed input(s) fall in it", self.inputs_total);
        }
        println!(
            "  inputs           {} under --images, {} processed now ({} shard(s) written), {} already done in {} earlier shard(s)",
            self.inputs_total, s.inputs, s.shards_written, self.inputs_already, self.shards_before
        );
        if self.shards_before > 0 && !self.shards_planned.is_empty() {
            println!(
                "  incremental      {} new input(s) since the last run, encoded into new shard(s) {}; the {} earlier shard(s) are kept as they are",
                s.inputs,
                index_range(&self.shards_planned),
                self.shards_before
            );
        }
        if !self.removed.is_empty() {
            println!(
                "  removed          {} input(s) encoded earlier are no longer under --images: {}; their rows stay in the output (manifest.json removed_inputs; write to a new --out to leave them out)",
                self.removed.len(),
                some_of(&self.removed, 3)
            );
        }
        if !self.changed.is_empty() {
            println!(
                "  changed          {} input(s) changed size since they were encoded: {}; their rows are of the old file (manifest.json changed_inputs; write to a new --out to encode them again)",
                self.changed.len(),
                some_of(&self.changed, 3)
            );
        }
        println!("  rows             {} written now, {} in the output", s.rows, self.rows_total);
        println!(
            "  upscaled         {} row(s) now, {} in the output: crops smaller than {} px, enlarged (see --min-side)",
            s.upscaled, self.upscaled_total, self.resolution
        );
        let skipped = s.errors.len() + self.listing_errors.len();
        println!("  skipped          {skipped}");
        let mut by_reason: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for e in s.errors.iter().chain(&self.listing_errors) {
            by_reason.entry(format!("{}: {}", e.stage, e.reason)).or_default().push(e.source.clone());
        }
        for (reason, sources) in &by_reason {
            println!("    {} -- {reason}", some_of(sources, 3));
        }
        println!(
            "  accounted        {} input(s) processed now = {} with rows + {} without (in errors.jsonl){}",
            s.inputs,
            s.inputs - s.inputs_without_rows,
            s.inputs_without_rows,
            if self.listing_errors.is_empty() {
                String::new()
            } else {
                format!("; {} unlistable (stage list)", self.listing_errors.len())
            }
        );
        if s.inputs > 0 {
            println!(
                "  throughput       {:.1} images/s, {:.1} rows/s over {:.1} s; teacher busy {:.0}% of the time{}",
                s.inputs as f64 / secs,
                s.rows as f64 / secs,
                secs,
                100.0 * s.teacher_busy.as_secs_f64() / secs / s.sessions.max(1) as f64,
                if s.sessions > 1 { format!(" (mean of {} sessions)", s.sessions) } else { String::new() }
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
        println!("  errors           {}", self.errors_file.display());
    }
}

/// The VAE spec for `--vae` (and the custom flags).
pub fn vae_spec(args: &RunArgs) -> Result<VaeSpec> {
    let name = args.vae.as_deref().unwrap_or_default();
    if name == "custom" {
        let channels = args.channels.context("--vae custom needs --channels")?;
        let scale = args.scale.context("--vae custom needs --scale (use 1 for latents already in TAESD scale)")?;
        let range = args.input_range.as_deref().context("--vae custom needs --input-range (\"0,1\" or \"-1,1\")")?;
        let range =
            PixelRange::parse(range).with_context(|| format!("--input-range {range}: use \"0,1\" or \"-1,1\""))?;
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

/// The devices the flags ask for: `--gpus N`, else `--device`.
pub fn devices(args: &RunArgs) -> device::DeviceList {
    match args.gpus {
        Some(n) => device::DeviceList::gpus(n),
        None => args.device.clone(),
    }
}

/// The teacher's settings from the flags, for a session on `device`.
pub fn teacher_options(args: &RunArgs, device: device::DeviceRequest) -> teacher::TeacherOptions {
    teacher::TeacherOptions {
        device,
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
    if args.resolution == 0 || !args.resolution.is_multiple_of(spec.downscale as u32) {
        bail!("--resolution {} must be a positive multiple of {}", args.resolution, spec.downscale);
    }
    let mut items = list_inputs(images).map_err(|e| anyhow::anyhow!("--images: {e}"))?.items;
    if let Some(n) = args.limit {
        items.truncate(n);
    }
    let cfg = pipeline_config(
        args,
        &spec,
        teacher::InputFormat { half: args.decode_dtype == LatentDtypeArg::F16, range: spec.input_range },
        String::new(),
    );
    let stats = pipeline::decode_only(&items, &cfg)?;
    Ok(DecodeSummary { workers: cfg.workers, stats })
}

fn pipeline_config(
    args: &RunArgs,
    spec: &VaeSpec,
    input_format: teacher::InputFormat,
    onnx_sha256: String,
) -> pipeline::PipelineConfig {
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
        min_side: min_side(args),
        latent_dtype: latent_dtype(args),
        vae: spec.clone(),
        onnx_sha256,
        progress: !args.quiet,
    }
}

/// `--min-side`, or its default (half the resolution).
fn min_side(args: &RunArgs) -> u32 {
    args.min_side.unwrap_or_else(|| taesd_data::default_min_side(args.resolution))
}

/// Run precompute end to end. Everything that can be checked (flags, the ONNX file against the
/// preset, the output folder's settings) is checked before anything is written.
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
    if args.resolution == 0 || !args.resolution.is_multiple_of(spec.downscale as u32) {
        bail!("--resolution {} must be a positive multiple of {}", args.resolution, spec.downscale);
    }
    teacher::check_onnx_file(onnx)?;

    let listing = list_inputs(images).map_err(|e| anyhow::anyhow!("--images: {e}"))?;
    let mut items = listing.items;
    if let Some(n) = args.limit {
        items.truncate(n);
    }
    let listed = items.len() as u64;
    let mut listing_errors: Vec<ErrorRecord> = listing
        .errors
        .into_iter()
        .map(|(source, reason)| ErrorRecord { source, stage: "list".into(), reason })
        .collect();
    if let Some(part) = args.part {
        // The part's inputs, and the listing errors that fall in it (each reported by one part).
        items = select_part(items, part);
        listing_errors.retain(|e| part_of(&e.source, part.count) == part.index);
    }
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
        min_side: min_side(args),
    };
    let inputs_info = output::InputsInfo {
        root: images.display().to_string(),
        total: items.len() as u64,
        fingerprint: taesd_data::fingerprint(&items),
    };
    let existing = output::Existing::read(out_dir, args.part)?;
    existing.check_partition(&config)?;
    let restarted = existing.check_settings(&config)?;
    let plan = output::plan(&existing, &items, inputs_per_shard);
    let shards_before = existing.shards.len() as u32;
    let mut summary = Summary {
        out: out_dir.to_path_buf(),
        device: "none (nothing to do)".to_string(),
        inputs_total: items.len() as u64,
        inputs_already: plan.already,
        shards_before,
        shards_planned: plan.pending.iter().map(|(i, _)| *i).collect(),
        removed: plan.removed.clone(),
        changed: plan.changed.clone(),
        stats: pipeline::RunStats::default(),
        listing_errors: listing_errors.clone(),
        rows_total: 0,
        upscaled_total: 0,
        restarted: restarted.clone(),
        resolution: args.resolution,
        part: args.part.map(|p| (p, listed)),
        errors_file: existing.layout.errors_path(),
    };
    // A part without inputs of its own (when others have some) still writes its manifest, so that
    // readers of the folder see it finished.
    if listed == 0 {
        eprintln!(
            "warning: --images {} holds no input files{}; nothing to encode",
            images.display(),
            if listing_errors.is_empty() {
                String::new()
            } else {
                format!(" that could be listed ({} listing errors)", listing_errors.len())
            }
        );
        if existing.manifest.is_none() {
            // Nothing to write: leave --out as it was.
            return Ok(summary);
        }
    }

    // The teacher before anything is written: an ONNX file that does not fit the preset (or is
    // no ONNX model) leaves the output folder as it was.
    let teachers = if plan.pending.is_empty() {
        Vec::new()
    } else {
        let lib = ortlib::find(args.ort_lib.as_deref())?;
        let env = ortlib::init(&lib)?;
        let teachers = open_teachers(&env, onnx, &spec, args)?;
        for teacher in &teachers {
            tracing::info!(
                "teacher {} on {} (ONNX Runtime from {}, found by {})",
                onnx.display(),
                teacher.device,
                lib.path.display(),
                lib.found_by
            );
            if teacher.device != "cpu" {
                eprintln!(
                    "teacher on {}: {}; warm-up {:.1} s (not timed)",
                    teacher.device,
                    teacher.setup,
                    teacher.warmup_time.as_secs_f64()
                );
            }
        }
        teachers
    };
    if let Some(note) = &restarted {
        eprintln!("note: {note}");
    }
    if shards_before > 0 && !plan.pending.is_empty() {
        eprintln!(
            "incremental run: {} new input(s) under --images (of {}), encoded into new shard(s) {}; {} input(s) already in {} earlier shard(s) are kept",
            plan.new_inputs(),
            items.len(),
            index_range(&summary.shards_planned),
            plan.already,
            shards_before
        );
    }
    if !plan.removed.is_empty() {
        eprintln!(
            "warning: {} input(s) encoded by an earlier run are no longer under --images ({}); their rows stay in {}",
            plan.removed.len(),
            some_of(&plan.removed, 3),
            out_dir.display()
        );
    }
    let mut out = output::OutputDir::open(existing, &config, &inputs_info, onnx, &plan)?;
    if let Some(first) = teachers.first() {
        summary.device = teachers.iter().map(|t| t.device.as_str()).collect::<Vec<_>>().join(",");
        out.manifest.extra.insert("device".into(), summary.device.clone().into());
        out.manifest.extra.insert("teacher_setup".into(), first.setup.clone().into());
        let cfg = pipeline_config(args, &spec, first.input_format(), onnx_sha256);
        summary.stats = pipeline::run(plan.pending, teachers, &mut out, &cfg)?;
    }
    out.finish(&listing_errors)?;
    summary.rows_total = out.manifest.rows;
    summary.upscaled_total = out.manifest.upscaled_rows;
    Ok(summary)
}

/// One teacher session per device of `--device` / `--gpus` (opened, checked and warmed up at
/// once when there are several). One device is opened as it always was.
fn open_teachers(
    env: &ort::environment::Environment,
    onnx: &Path,
    spec: &VaeSpec,
    args: &RunArgs,
) -> Result<Vec<teacher::Teacher>> {
    let devices = devices(args).0;
    let open =
        |d: device::DeviceRequest| teacher::Teacher::new(env, onnx, spec, args.resolution, teacher_options(args, d));
    if let [d] = devices.as_slice() {
        return Ok(vec![open(*d)?]);
    }
    let teachers = std::thread::scope(|scope| {
        let handles: Vec<_> = devices
            .iter()
            .map(|d| scope.spawn(move || open(*d).with_context(|| format!("teacher session on {d}"))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("opening a teacher panicked"))?)
            .collect::<Result<Vec<_>>>()
    });
    let teachers: Vec<teacher::Teacher> = teachers?;
    // `auto` cannot be in a list, so every session is on the kind of device asked for.
    let kinds: std::collections::BTreeSet<bool> = teachers.iter().map(|t| t.device == "cpu").collect();
    if kinds.len() > 1 {
        bail!("the teacher sessions ended on different kinds of device; list one kind in --device");
    }
    Ok(teachers)
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
