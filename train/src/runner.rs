//! One training run: shards + configuration -> checkpoints, metrics, previews, loss curve,
//! evaluations and the final EMA export, in the run folder:
//!
//! ```text
//! runs/<name>/
//!   config.toml          the resolved configuration (every value, recipe defaults included)
//!   metrics.jsonl        see crate::metrics
//!   loss.png             the loss curve (redrawn with each preview and at the end)
//!   previews/step-00000500.png
//!   eval.json            the latest evaluation (all models)
//!   checkpoints/step-00001000/{recipe/, trainer.json}
//!   export/taesd/<variant>_{encoder,decoder}.{safetensors,pth}, export/diffusers/, export/comfyui/,
//!   export/onnx/ (with `run.export` "onnx"), export/export.json
//!   events.out.tfevents.*  TensorBoard (crate::tensorboard)
//!   report.html          one page of the run (crate::report), written at the end
//! ```

use crate::checkpoint::{self, TrainerState};
use crate::config::{differences, RunPlan, StageAt, TrainConfig, RESOLVED_CONFIG, RESUME_MAY_CHANGE};
use crate::dataset::ShardSet;
use crate::eval::{evaluate, EvalSet, Metrics, Split, Subject};
use crate::loader::{Loader, LoaderConfig};
use crate::metrics::{Interval, MetricsLog, METRICS_FILE};
use crate::order::Position;
use crate::recipe::{Batch, ModelInit, Recipe, RecipeConfig};
use crate::sample::{check_crop, SampleSpec};
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use taesd::{Layout, TaesdConfig, Variant};

/// How a run is driven.
#[derive(Clone)]
pub struct RunOptions {
    pub resume: bool,
    /// No progress bar and no per-interval lines.
    pub quiet: bool,
    /// Set by Ctrl-C / SIGTERM: checkpoint and stop.
    pub stop: Arc<AtomicBool>,
    /// Stop this session's training loop after this long (checkpoint, as on Ctrl-C; continue
    /// with `--resume`): one stint of a run longer than a machine is held.
    pub time_limit: Option<std::time::Duration>,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub name: String,
    pub dir: PathBuf,
    pub step: u64,
    pub steps: u64,
    pub interrupted: bool,
    /// The stop came from `RunOptions::time_limit` (not Ctrl-C).
    pub time_limit_reached: bool,
    pub resumed_from: Option<u64>,
    pub skipped_steps: u64,
    /// Steps per second of this session's training loop.
    pub steps_per_s: f64,
    pub final_eval: Vec<(String, Metrics)>,
    pub exported: Vec<PathBuf>,
}

/// Everything resolved from the configuration and the shards.
pub struct Resolved {
    pub config: TrainConfig,
    pub recipe: RecipeConfig,
    pub model: TaesdConfig,
    pub variant: Option<Variant>,
    pub crop: u32,
    pub set: Arc<ShardSet>,
}

/// Fill what the configuration leaves to the shards (variant, crop) and check it all fits.
pub fn resolve(config: &TrainConfig) -> Result<Resolved> {
    let mut config = config.clone();
    let shards = config.data.shards.clone().ok_or_else(|| anyhow!("no shards: pass --shards DIR or set data.shards"))?;
    let mut set = ShardSet::open(&shards)?;
    set.skip_bad_rows = config.data.skip_bad_rows;
    let set = Arc::new(set);
    let channels = set.latent_shape[0] as usize;
    let variant = match config.variant() {
        Some(v) => Some(v),
        None => match set.variant_name() {
            Some(n) => Some(Variant::parse(n).ok_or_else(|| {
                anyhow!("{}: the shards name the TAESD variant `{n}`, which this build does not know; set model.variant", shards.display())
            })?),
            None => None,
        },
    };
    let model = variant.map(|v| v.config()).unwrap_or_else(|| TaesdConfig::custom(channels));
    ensure!(
        model.latent_channels == channels,
        "model.variant {} has {} latent channels but the shards in {} hold {channels}-channel latents",
        model.describe(),
        model.latent_channels,
        shards.display()
    );
    let scale = model.spatial_scale() as u32;
    ensure!(
        set.vae.downscale as u32 == scale,
        "{} downsamples {}x but the shards' VAE downsamples {}x",
        model.describe(),
        scale,
        set.vae.downscale
    );
    let crop = config.data.crop.unwrap_or_else(|| (256.min(set.resolution) / scale) * scale);
    check_crop(crop, set.resolution, scale).context("data.crop")?;
    for (i, st) in config.data.stages.iter().enumerate() {
        if let Some(c) = st.crop {
            check_crop(c, set.resolution, scale).with_context(|| format!("data.stages[{i}].crop"))?;
        }
    }
    let recipe: RecipeConfig =
        config.recipe.clone().try_into().map_err(|e: toml::de::Error| anyhow!("[recipe]: {}", e.to_string().trim()))?;
    recipe.validate()?;
    for (k, p) in [("model.init_encoder", &config.model.init_encoder), ("model.init_decoder", &config.model.init_decoder)] {
        if let Some(p) = p {
            ensure!(p.exists(), "{k} = {} does not exist", p.display());
        }
    }
    config.model.variant = variant.map(|v| v.to_string());
    config.data.crop = Some(crop);
    config.recipe = toml::Table::try_from(&recipe).context("recipe config does not serialise")?;
    Ok(Resolved { config, recipe, model, variant, crop, set })
}

impl Resolved {
    /// The resolved configuration as TOML, with the `[recipe]` keys in the recipe's own order.
    pub fn config_toml(&self) -> Result<String> {
        #[derive(serde::Serialize)]
        struct Sections<'a> {
            data: &'a crate::config::DataConfig,
            model: &'a crate::config::ModelConfig,
            run: &'a crate::config::RunConfig,
        }
        let c = &self.config;
        let head = toml::to_string(&Sections { data: &c.data, model: &c.model, run: &c.run })?;
        let recipe = toml::to_string(&self.recipe)?;
        Ok(format!("{head}\n[recipe]\n{recipe}"))
    }
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Compare a resumed run's configuration with the one it was started with. Returns the
/// differences that are allowed, as `key: old -> new` lines (said aloud by the caller).
fn check_resume_config(run_dir: &Path, now: &TrainConfig) -> Result<Vec<String>> {
    let p = run_dir.join(RESOLVED_CONFIG);
    if !p.is_file() {
        return Ok(vec![]);
    }
    let saved = crate::config::read_table(&p)?;
    let allowed: Vec<String> = differences(&saved, &now.to_table()?)
        .into_iter()
        .filter(|(k, _)| RESUME_MAY_CHANGE.contains(&k.as_str()))
        .map(|(_, d)| d)
        .collect();
    let diffs: Vec<String> = differences(&saved, &now.to_table()?)
        .into_iter()
        .filter(|(k, _)| !RESUME_MAY_CHANGE.contains(&k.as_str()) && k != "data.shards")
        .map(|(_, d)| d)
        .collect();
    if !diffs.is_empty() {
        bail!(
            "--resume: the settings differ from those {} was started with:\n  {}\nresume with the same settings (only {} may change), or start a new run folder",
            run_dir.display(),
            diffs.join("\n  "),
            RESUME_MAY_CHANGE.join(", ")
        );
    }
    Ok(allowed)
}

/// Models evaluated in a run, by name.
fn run_eval(
    recipe: &Recipe,
    set: &EvalSet,
    reference: Option<&taesd::Decoder>,
    cycle: Option<&taesd::Encoder>,
    batch: usize,
    device: &Device,
    with_reference: bool,
) -> Result<Vec<(String, Metrics)>> {
    let mut out = Vec::new();
    let (ee, ed) = (recipe.ema_encoder()?, recipe.ema_decoder()?);
    let s = Subject { encoder: ee.as_ref(), decoder: ed.as_ref(), cycle_encoder: cycle };
    out.push(("ema".to_string(), evaluate(set, &s, batch, device)?));
    let (re, rd) = (recipe.encoder()?, recipe.decoder()?);
    let s = Subject { encoder: re.as_ref(), decoder: rd.as_ref(), cycle_encoder: cycle };
    out.push(("raw".to_string(), evaluate(set, &s, batch, device)?));
    if let (Some(r), true) = (reference, with_reference) {
        let s = Subject { encoder: None, decoder: Some(r), cycle_encoder: cycle.or(ee.as_ref()) };
        out.push(("reference".to_string(), evaluate(set, &s, batch, device)?));
    }
    Ok(out)
}

/// Write a preview grid of the fixed preview samples.
fn write_preview(
    recipe: &Recipe,
    samples: &(Tensor, Tensor),
    reference: Option<&taesd::Decoder>,
    path: &Path,
) -> Result<()> {
    let (enc, dec) = (recipe.ema_encoder()?, recipe.ema_decoder()?);
    let m = crate::preview::PreviewModels { encoder: enc.as_ref(), decoder: dec.as_ref(), reference };
    crate::preview::write(path, &samples.0, &samples.1, &m)
}

/// Export the EMA weights in each configured layout under `export/`, and say in
/// `export/export.json` which step they are of.
fn export(recipe: &Recipe, r: &Resolved, run_dir: &Path, step: u64) -> Result<(Vec<PathBuf>, Vec<String>)> {
    let mut files = Vec::new();
    let mut notes = Vec::new();
    let name = r.variant.map(|v| v.name().to_string()).unwrap_or_else(|| format!("taesd-c{}", r.model.latent_channels));
    for l in &r.config.run.export {
        let Some(layout) = Layout::parse(l) else {
            // A format beside the layouts (`onnx`): crate::export.
            files.extend(crate::export::run_export(l, &recipe.ema_tensors()?, r.model, r.variant, run_dir)?);
            continue;
        };
        if layout == Layout::Diffusers && !r.model.diffusers_supported() {
            notes.push(format!("diffusers export skipped: AutoencoderTiny cannot hold {}", r.model.describe()));
            continue;
        }
        let final_dir = crate::models::export_dir(run_dir, layout);
        let tmp = run_dir.join("export").join(format!(".tmp-{}", layout.name()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let dest = match layout {
            Layout::TaesdPy | Layout::Diffusers => tmp.clone(),
            Layout::ComfyUi | Layout::Combined => tmp.join(format!("{name}.safetensors")),
        };
        let mut written = recipe.export(layout, &dest, r.variant).with_context(|| format!("exporting the {layout} layout"))?;
        if layout == Layout::TaesdPy {
            // The same pair as .pth: what taesd.py and ComfyUI's vae_approx folder load.
            written.extend(crate::export::pth_files(&recipe.ema_tensors()?, r.model, r.variant, &tmp)?);
        }
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).with_context(|| format!("cannot replace {}", final_dir.display()))?;
        }
        std::fs::rename(&tmp, &final_dir).with_context(|| format!("cannot rename {} to {}", tmp.display(), final_dir.display()))?;
        files.extend(written.iter().map(|p| final_dir.join(p.strip_prefix(&tmp).unwrap_or(p))));
    }
    let info = crate::models::ExportInfo { step, files: files.clone() };
    write_atomic(&run_dir.join("export").join(crate::models::EXPORT_INFO), &serde_json::to_string_pretty(&info)?)?;
    Ok((files, notes))
}

fn progress_bar(steps: u64, start: u64, quiet: bool) -> ProgressBar {
    let target =
        if quiet || !std::io::stderr().is_terminal() { ProgressDrawTarget::hidden() } else { ProgressDrawTarget::stderr() };
    let pb = ProgressBar::with_draw_target(Some(steps), target);
    pb.set_style(progress_style());
    pb.set_position(start);
    pb
}

/// The progress line: the losses (the message) are cut to what the terminal's width leaves, so
/// that the line never wraps (a wrapped line is redrawn as a new line at every tick).
fn progress_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:20} {pos}/{len} steps ({per_sec}, eta {eta}) {wide_msg}")
        .expect("template")
        .progress_chars("=> ")
}

fn describe_stage(s: &StageAt, default_crop: u32, stages: usize) -> String {
    let until = if s.until == u64::MAX { "the end".to_string() } else { format!("step {}", s.until) };
    let which = if s.stage < stages { format!("data stage {}/{stages}", s.stage + 1) } else { "the last data stage".into() };
    format!("{which}: crop {}, batch {} until {until}", s.crop.unwrap_or(default_crop), s.batch_size)
}

fn short_losses(v: &[(String, f64)]) -> String {
    v.iter().map(|(k, x)| format!("{k} {x:.4}")).collect::<Vec<_>>().join(", ")
}

/// A fatal error of the training loop at trainer state `ts`: save a checkpoint of the steps done
/// (unless there is one at this step already, or no step was done), then return the error with
/// how to resume. The recipe's state is that of `ts.step` when its step counter says so: a failed
/// step writes nothing (its proposals are committed only at its end).
fn fail_after_checkpoint(
    e: anyhow::Error,
    data_error: bool,
    recipe: &Recipe,
    ts: &TrainerState,
    last_ckpt: Option<u64>,
    run_dir: &Path,
    save: impl FnOnce(&Recipe, &TrainerState) -> Result<PathBuf>,
) -> anyhow::Error {
    if ts.step == 0 {
        return e;
    }
    let skip = if data_error { " --set data.skip_bad_rows=true (to skip the bad data)" } else { "" };
    let resume = format!("resume with: train --resume --run-dir {}{skip}", run_dir.display());
    let saved = if last_ckpt == Some(ts.step) {
        Ok(format!("the checkpoint at step {} holds the run so far", ts.step))
    } else if recipe.step_count() != ts.step {
        Err(anyhow!("the error came in the middle of step {}'s update; the training state is not saved", recipe.step_count()))
    } else {
        save(recipe, ts).map(|p| format!("checkpoint saved at step {} ({})", ts.step, p.display()))
    };
    match saved {
        Ok(note) => anyhow!("{e:#}\n{note}; {resume}"),
        Err(s) => {
            let last = last_ckpt.map_or("no checkpoint yet".to_string(), |k| format!("the last checkpoint is at step {k}"));
            anyhow!("{e:#}\ncould not save a checkpoint ({s:#}); {last}; {resume}")
        }
    }
}

/// Run (or continue) one training run.
pub fn run(plan: &RunPlan, opts: &RunOptions) -> Result<RunOutcome> {
    let r = resolve(&plan.config).with_context(|| format!("run `{}`", plan.name))?;
    let cfg = &r.config;
    let run_dir = plan.dir.clone();
    std::fs::create_dir_all(&run_dir).with_context(|| format!("cannot create the run folder {}", run_dir.display()))?;
    checkpoint::clean_temp(&run_dir)?;
    let latest = checkpoint::latest(&run_dir)?;
    let mut resume_changes = Vec::new();
    let resume_from = match (&latest, opts.resume) {
        (Some((s, p)), true) => {
            resume_changes = check_resume_config(&run_dir, cfg)?;
            Some((*s, p.clone()))
        }
        (None, true) => {
            tracing::warn!("--resume: {} has no checkpoint yet; starting the run", run_dir.display());
            None
        }
        (_, false) => {
            checkpoint::ensure_fresh(&run_dir)?;
            None
        }
    };
    write_atomic(&run_dir.join(RESOLVED_CONFIG), &r.config_toml()?)?;

    let device = crate::device::open(&cfg.run.device)?;
    let init = ModelInit { encoder: cfg.model.init_encoder.clone(), decoder: cfg.model.init_decoder.clone() };
    let mut recipe = Recipe::new(&r.recipe, r.model, &init, &device, cfg.run.seed).context("building the recipe")?;
    recipe.set_precision(crate::recipe::Precision::parse(&cfg.run.precision).context("run.precision")?);
    recipe.set_schedule_end(Some(cfg.run.steps));
    recipe.set_save_replay(cfg.run.checkpoint_replay);
    let mut ts = TrainerState {
        step: 0,
        data_position: Position::default(),
        images_seen: 0,
        skipped_steps: 0,
        skipped_rows: 0,
        train_seconds: 0.0,
        seed: cfg.run.seed,
        shard_rows: r.set.rows,
    };
    if let Some((_, ck)) = &resume_from {
        let saved = checkpoint::read_state(ck)?;
        ensure!(
            saved.shard_rows == r.set.rows,
            "--resume: the shard folder {} now has {} rows, the run started with {}; the batch order would differ",
            r.set.dir.display(),
            r.set.rows,
            saved.shard_rows
        );
        ensure!(saved.seed == cfg.run.seed, "--resume: the run was started with seed {}, not {}", saved.seed, cfg.run.seed);
        recipe.load_state(&ck.join(checkpoint::RECIPE_DIR)).with_context(|| format!("resuming from {}", ck.display()))?;
        ensure!(
            recipe.step_count() == saved.step,
            "{}: the recipe state is at step {}, the trainer state at {}",
            ck.display(),
            recipe.step_count(),
            saved.step
        );
        ts = saved;
    }
    let mut log = MetricsLog::open(&run_dir, Some(ts.step))?;
    let say = |pb: &ProgressBar, msg: String| {
        if !opts.quiet {
            pb.suspend(|| eprintln!("{msg}"));
        }
    };

    // Evaluation and preview data: the held-out split (or, without one, the first rows).
    let eval_set = if cfg.data.eval_fraction > 0.0 {
        EvalSet::load(&r.set, Split::HeldOut(cfg.data.eval_fraction), cfg.data.eval_max_images)?
    } else {
        EvalSet { rows: vec![] }
    };
    let preview_rows = if eval_set.is_empty() {
        EvalSet::load(&r.set, Split::All, cfg.data.preview_images)?
    } else {
        EvalSet { rows: eval_set.rows.iter().take(cfg.data.preview_images).cloned().collect() }
    };
    let preview_samples =
        if preview_rows.is_empty() || cfg.data.preview_images == 0 { None } else { Some(preview_rows.batch(0..preview_rows.len(), &device)?) };
    let reference = match &cfg.model.reference_decoder {
        Some(p) => Some(crate::models::load(p, r.variant, &device)?.decoder.ok_or_else(|| anyhow!("{} has no decoder", p.display()))?),
        None => None,
    };
    let cycle_encoder = match &cfg.model.cycle_encoder {
        Some(p) => Some(crate::models::load(p, r.variant, &device)?.encoder.ok_or_else(|| anyhow!("{} has no encoder", p.display()))?),
        None => None,
    };

    // The loader's settings in the data stage of a step (`data.stages`).
    let loader_cfg = |stage: &StageAt| LoaderConfig {
        batch_size: stage.batch_size,
        sample: SampleSpec {
            crop: stage.crop.unwrap_or(r.crop),
            scale: r.model.spatial_scale() as u32,
            hflip: cfg.data.hflip && !r.set.flipped,
            sample_posterior: cfg.data.sample_posterior,
        },
        shuffle_buffer: cfg.data.shuffle_buffer,
        prefetch: cfg.data.prefetch,
        workers: cfg.data.workers,
        eval_fraction: cfg.data.eval_fraction,
        seed: cfg.run.seed,
    };
    let total = cfg.run.steps;
    let pb = progress_bar(total, ts.step, opts.quiet);
    say(
        &pb,
        format!(
            "run `{}` in {}: {} on {} ({}), {} rows ({} held out for eval), crop {}, batch {}, steps {}..{}{}",
            plan.name,
            run_dir.display(),
            r.model.describe(),
            crate::device::describe(&device),
            recipe.precision().name(),
            r.set.rows,
            eval_set.len(),
            r.crop,
            cfg.data.batch_size,
            ts.step,
            total,
            if resume_from.is_some() { " (resumed)" } else { "" }
        ),
    );
    for change in &resume_changes {
        say(&pb, format!("resumed with a changed setting: {change}"));
        if change.starts_with("run.steps:") && r.recipe.lr_schedule != crate::recipe::LrSchedule::Constant {
            say(&pb, format!("note: the learning rate ({:?} schedule) now decays towards step {total}", r.recipe.lr_schedule));
        }
    }
    if r.recipe.train_encoder && r.crop < r.set.resolution && r.recipe.encoder_margin == 0 {
        say(
            &pb,
            format!(
                "note: crop {} < the shards' {} px: near the crop edges the teacher latents saw pixels the encoder does not; \
                 for encoder training use --crop {} (recipe.encoder_margin helps only partly)",
                r.crop, r.set.resolution, r.set.resolution
            ),
        );
    }
    if cfg.data.hflip && r.set.flipped {
        tracing::info!("the shards were flipped by precompute --hflip: the loader does not flip again");
    }
    log.write(
        "start",
        ts.step,
        json!({"resumed": resume_from.is_some(), "device": crate::device::describe(&device), "precision": recipe.precision().name(), "rows": r.set.rows, "eval_rows": eval_set.len()}),
    )?;

    let eval_now = |recipe: &Recipe, log: &mut MetricsLog, step: u64, with_reference: bool| -> Result<Vec<(String, Metrics)>> {
        if eval_set.is_empty() {
            return Ok(vec![]);
        }
        let res =
            run_eval(recipe, &eval_set, reference.as_ref(), cycle_encoder.as_ref(), cfg.data.eval_batch_size, &device, with_reference)?;
        for (name, m) in &res {
            let mut v = serde_json::to_value(m)?;
            v["model"] = json!(name);
            log.write("eval", step, v)?;
        }
        let models: serde_json::Map<String, serde_json::Value> =
            res.iter().map(|(n, m)| (n.clone(), serde_json::to_value(m).expect("json"))).collect();
        write_atomic(
            &run_dir.join("eval.json"),
            &serde_json::to_string_pretty(&json!({"step": step, "images": eval_set.len(), "models": models}))?,
        )?;
        Ok(res)
    };
    let preview_now = |recipe: &Recipe, log: &mut MetricsLog, step: u64| -> Result<()> {
        if let Some(s) = &preview_samples {
            let p = run_dir.join("previews").join(format!("step-{step:08}.png"));
            write_preview(recipe, s, reference.as_ref(), &p)?;
            log.write("preview", step, json!({"path": p}))?;
        }
        let metrics = run_dir.join(METRICS_FILE);
        crate::plot::write_loss_curve(&metrics, &run_dir.join("loss.png"), cfg.run.plot_width, cfg.run.plot_height)
    };

    let mut last_eval = Vec::new();
    if ts.step == 0 {
        last_eval = eval_now(&recipe, &mut log, 0, true)?;
        if !last_eval.is_empty() {
            say(&pb, format!("step 0 eval:\n{}", crate::eval::table(&last_eval)));
        }
        if cfg.run.preview_every > 0 {
            preview_now(&recipe, &mut log, 0)?;
        }
    }

    let mut stage = cfg.data.stage_at(ts.step);
    let mut loader = Loader::start(r.set.clone(), loader_cfg(&stage), ts.data_position)?;
    if !cfg.data.stages.is_empty() {
        say(&pb, describe_stage(&stage, r.crop, cfg.data.stages.len()));
    }
    let mut interval = Interval::default();
    let mut last_ckpt = resume_from.as_ref().map(|(s, _)| *s);
    let session_start = ts.step;
    let t0 = Instant::now();
    let every = |n: u64, s: u64| n > 0 && s.is_multiple_of(n);
    let save_ckpt = |recipe: &Recipe, ts: &TrainerState, log: &mut MetricsLog| -> Result<PathBuf> {
        let p = checkpoint::save(&run_dir, ts, cfg.run.keep_checkpoints, |d| recipe.save_state(d))?;
        log.write("checkpoint", ts.step, json!({"path": p}))?;
        Ok(p)
    };
    let mut interrupted = false;
    let mut time_limit_reached = false;
    // The loop's fallible calls: an error after step 1 saves a checkpoint first (as Ctrl-C
    // does) and says how to resume (below). `data_error`: the loader failed (bad shard data).
    let mut data_error = false;
    let mut skips_in_a_row = 0u64;
    let looped = (|| -> Result<()> {
        while ts.step < total {
            time_limit_reached = opts.time_limit.is_some_and(|l| t0.elapsed() >= l);
            if opts.stop.load(Ordering::SeqCst) || time_limit_reached {
                interrupted = true;
                break;
            }
            if ts.step >= stage.until {
                // The next data stage: the loader restarts where the last one stopped.
                stage = cfg.data.stage_at(ts.step);
                loader.stop();
                loader = Loader::start(r.set.clone(), loader_cfg(&stage), ts.data_position)?;
                let crop = stage.crop.unwrap_or(r.crop);
                log.write("stage", ts.step, json!({"stage": stage.stage, "crop": crop, "batch_size": stage.batch_size}))?;
                say(&pb, format!("step {}: {}", ts.step, describe_stage(&stage, r.crop, cfg.data.stages.len())));
            }
            let tw = Instant::now();
            let hb = loader.next_batch().inspect_err(|_| data_error = true)?;
            for b in &hb.skipped {
                ts.skipped_rows += b.rows;
                log.write("bad_data", ts.step, json!({"what": b.what, "reason": b.reason, "rows": b.rows, "skipped_rows_total": ts.skipped_rows}))?;
                say(&pb, format!("step {}: skipped bad data (data.skip_bad_rows): {}: {}", ts.step, b.what, b.reason));
            }
            let loaded = tw.elapsed().as_secs_f64();
            let (images, latents) = hb.to_tensors(&device)?;
            let uploaded = tw.elapsed().as_secs_f64();
            let report = recipe.step(&Batch { images, latents }).with_context(|| format!("training step {}", ts.step + 1))?;
            let stepped = tw.elapsed().as_secs_f64();
            interval.time("loader_wait", loaded);
            interval.time("upload", uploaded - loaded);
            interval.time("step", stepped - uploaded);
            ts.train_seconds += stepped;
            ts.step = recipe.step_count();
            ts.data_position = hb.next;
            ts.images_seen += hb.batch as u64;
            let pause = Instant::now();
            match &report.skipped {
                Some(why) => {
                    ts.skipped_steps += 1;
                    skips_in_a_row += 1;
                    interval.count(hb.batch as u64);
                    log.write("skip", ts.step, json!({"reason": why, "skipped_total": ts.skipped_steps}))?;
                    say(&pb, format!("step {}: skipped ({why})", ts.step));
                    let most = cfg.run.max_skips_in_a_row;
                    if most > 0 && skips_in_a_row >= most {
                        bail!(
                            "the NaN guard skipped {skips_in_a_row} steps in a row (run.max_skips_in_a_row), the last at step {} ({why}): \
                             giving up, the run has diverged (a lower recipe.lr or grad_clip, or --precision f32, may help in a new run)",
                            ts.step
                        );
                    }
                }
                None => {
                    skips_in_a_row = 0;
                    interval.add_step(&report.losses, &report.grad_norms, hb.batch as u64)
                }
            }
            pb.set_position(ts.step);
            if every(cfg.run.log_every, ts.step) || ts.step == total {
                let means = interval.loss_means();
                let mut v = interval.take();
                v["lr"] = json!(report.lr);
                v["epoch"] = json!(hb.next.epoch);
                v["skipped_total"] = json!(ts.skipped_steps);
                v["skipped_rows_total"] = json!(ts.skipped_rows);
                v["images_seen"] = json!(ts.images_seen);
                v["elapsed_s"] = json!(ts.train_seconds);
                let ips = v["images_per_s"].as_f64().unwrap_or(0.0);
                log.write("train", ts.step, v)?;
                pb.set_message(short_losses(&means));
                if pb.is_hidden() && !opts.quiet {
                    eprintln!("step {}/{}: {} ({ips:.1} img/s)", ts.step, total, short_losses(&means));
                }
            }
            if every(cfg.run.checkpoint_every, ts.step) {
                save_ckpt(&recipe, &ts, &mut log)?;
                last_ckpt = Some(ts.step);
            }
            if every(cfg.run.preview_every, ts.step) {
                preview_now(&recipe, &mut log, ts.step)?;
            }
            if every(cfg.run.eval_every, ts.step) && ts.step < total {
                last_eval = eval_now(&recipe, &mut log, ts.step, false)?;
            }
            interval.time("pauses", pause.elapsed().as_secs_f64());
        }
        Ok(())
    })();
    if let Err(e) = looped {
        drop(loader);
        pb.finish_and_clear();
        return Err(fail_after_checkpoint(e, data_error, &recipe, &ts, last_ckpt, &run_dir, |recipe, ts| save_ckpt(recipe, ts, &mut log)));
    }
    drop(loader);
    let session_steps = ts.step - session_start;
    let steps_per_s = session_steps as f64 / t0.elapsed().as_secs_f64().max(1e-9);
    if last_ckpt != Some(ts.step) {
        save_ckpt(&recipe, &ts, &mut log)?;
    }
    let mut exported = Vec::new();
    if !interrupted {
        if ts.step % cfg.run.preview_every.max(1) != 0 || cfg.run.preview_every == 0 {
            preview_now(&recipe, &mut log, ts.step)?;
        }
        last_eval = eval_now(&recipe, &mut log, ts.step, true)?;
        let (files, notes) = export(&recipe, &r, &run_dir, ts.step)?;
        for n in notes {
            say(&pb, n);
        }
        log.write("export", ts.step, json!({"files": files}))?;
        exported = files;
    } else {
        crate::plot::write_loss_curve(&run_dir.join(METRICS_FILE), &run_dir.join("loss.png"), cfg.run.plot_width, cfg.run.plot_height)?;
    }
    log.write("end", ts.step, json!({"interrupted": interrupted, "steps_per_s": steps_per_s, "skipped_total": ts.skipped_steps}))?;
    if let Err(e) = crate::report::write(&run_dir) {
        say(&pb, format!("note: {} not written: {e:#}", crate::report::REPORT_FILE));
    }
    pb.finish_and_clear();
    Ok(RunOutcome {
        name: plan.name.clone(),
        dir: run_dir,
        step: ts.step,
        steps: total,
        interrupted,
        time_limit_reached,
        resumed_from: resume_from.map(|(s, _)| s),
        skipped_steps: ts.skipped_steps,
        steps_per_s,
        final_eval: last_eval,
        exported,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A terminal of a given width that keeps what is drawn.
    #[derive(Debug)]
    struct Screen {
        width: u16,
        lines: Arc<Mutex<Vec<String>>>,
    }

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            self.width
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.lines.lock().unwrap().push(s.to_string());
            Ok(())
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.lines.lock().unwrap().push(s.to_string());
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_progress_line_fits_the_terminal() {
        let losses: Vec<(String, f64)> = ["encoder", "disc", "correction_std", "disc_acc", "gan", "lowres_mse", "decoder", "decoder_mse"]
            .iter()
            .map(|k| (k.to_string(), 0.123456))
            .collect();
        for width in [100u16, 120] {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let screen = Screen { width, lines: lines.clone() };
            let pb = ProgressBar::with_draw_target(Some(100_000), ProgressDrawTarget::term_like(Box::new(screen)));
            pb.set_style(progress_style());
            pb.set_position(12_345);
            pb.set_message(short_losses(&losses));
            pb.finish();
            let lines = lines.lock().unwrap();
            assert!(!lines.is_empty());
            for l in lines.iter() {
                let n = l.chars().count();
                assert!(n <= width as usize, "{n} > {width} columns: {l:?}");
            }
            assert!(lines.iter().any(|l| l.contains("12345/100000") && l.contains("encoder 0.1235")), "{lines:?}");
        }
    }
}
