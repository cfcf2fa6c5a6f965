//! [`Session`]: one session of a run (a fresh start or a resume): its resolved settings,
//! device, recipe, trainer state, metrics log and evaluation data, and what it writes.

use super::output::{export, run_eval, write_atomic, write_preview};
use super::progress::{describe_stage, progress_bar, short_losses};
use super::resolve::{check_resume_config, resolve, Resolved};
use super::{RunOptions, RunOutcome};
use crate::checkpoint::{self, TrainerState};
use crate::config::{RunPlan, StageAt, TrainConfig, RESOLVED_CONFIG};
use crate::eval::{EvalSet, Metrics, Split};
use crate::loader::{Loader, LoaderConfig};
use crate::metrics::{Interval, MetricsLog, METRICS_FILE};
use crate::order::Position;
use crate::recipe::{ModelInit, Recipe, RecipeConfig, StepReport};
use crate::sample::SampleSpec;
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use indicatif::ProgressBar;
use serde_json::json;
use std::path::{Path, PathBuf};

/// The held-out rows evaluated during the run, the preview samples and the models they are
/// compared with.
struct EvalData {
    set: EvalSet,
    preview: Option<(Tensor, Tensor)>,
    reference: Option<taesd::Decoder>,
    cycle_encoder: Option<taesd::Encoder>,
}

pub(super) struct Session<'a> {
    pub plan: &'a RunPlan,
    pub opts: &'a RunOptions,
    pub r: Resolved,
    pub dir: PathBuf,
    pub device: Device,
    pub recipe: Recipe,
    pub ts: TrainerState,
    pub log: MetricsLog,
    /// The checkpoint this session resumed from, and the allowed settings that changed.
    pub resume_from: Option<(u64, PathBuf)>,
    resume_changes: Vec<String>,
    data: EvalData,
    pub pb: ProgressBar,
    pub last_ckpt: Option<u64>,
    pub last_eval: Vec<(String, Metrics)>,
    /// What `--fit-time` did to this run's step counts.
    fit: Option<super::fit::Fit>,
    /// Rank 0 of a data-parallel run, or alone: the process that writes the run folder.
    pub root: bool,
}

/// A recipe for run configuration `cfg` with the recipe settings `rc` (the run's own, or the
/// `--fit-time` timing's variant of them): its initial weights, seed, precision and schedule end.
/// The data-parallel communicator is set by the caller, after any checkpoint is loaded.
pub(super) fn build_recipe(
    cfg: &TrainConfig,
    rc: &RecipeConfig,
    model: taesd::TaesdConfig,
    device: &Device,
) -> Result<Recipe> {
    let init = ModelInit { encoder: cfg.model.init_encoder.clone(), decoder: cfg.model.init_decoder.clone() };
    let mut recipe = Recipe::new(rc, model, &init, device, cfg.run.seed)?;
    recipe.set_precision(cfg.run.precision);
    recipe.set_schedule_end(Some(cfg.run.steps));
    Ok(recipe)
}

impl<'a> Session<'a> {
    /// Resolve the configuration, prepare the run folder (refusing to start over a run, or to
    /// resume with other settings), build the recipe (and load the latest checkpoint on
    /// `--resume`), open the metrics log and load the evaluation data.
    pub fn open(plan: &'a RunPlan, opts: &'a RunOptions) -> Result<Session<'a>> {
        let mut r = resolve(&plan.config).with_context(|| format!("run `{}`", plan.name))?;
        let dir = plan.dir.clone();
        let root = opts.dist.as_ref().is_none_or(|d| d.is_root());
        let mut resume_changes = Vec::new();
        let resume_from = if root {
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create the run folder {}", dir.display()))?;
            checkpoint::clean_temp(&dir)?;
            let latest = checkpoint::latest(&dir)?;
            let resume_from = match (latest, opts.resume) {
                (Some(l), true) => {
                    resume_changes = check_resume_config(&dir, &r.config)?;
                    Some(l)
                }
                (None, true) => {
                    tracing::warn!("--resume: {} has no checkpoint yet; starting the run", dir.display());
                    None
                }
                (_, false) => {
                    checkpoint::ensure_fresh(&dir)?;
                    None
                }
            };
            resume_from
        } else {
            None
        };
        // Every rank resumes from the checkpoint rank 0 chose (and starts when rank 0 has
        // checked the run folder).
        let resume_from = match &opts.dist {
            Some(d) => agree_checkpoint(d, &dir, resume_from)?,
            None => resume_from,
        };

        let device = match &opts.dist {
            Some(d) => d.device.clone(),
            None => crate::device::open_spec(r.config.run.device)?,
        };
        let fit = match opts.fit_time {
            Some(budget) if resume_from.is_none() => {
                let comm = opts.dist.as_ref().map(|d| &d.comm);
                let f = super::fit::fit(&mut r.config, r.model, r.crop, &device, comm, budget, opts.fit_steps)
                    .with_context(|| format!("run `{}`", plan.name))?;
                Some(f)
            }
            Some(_) => {
                tracing::warn!("--fit-time: a resumed run keeps the step counts it was started with");
                None
            }
            None => None,
        };
        // The configuration as this session runs it (a fresh run's fitted step counts included).
        if root {
            write_atomic(&dir.join(RESOLVED_CONFIG), &r.config.to_toml()?)?;
        }
        let cfg = &r.config;
        let mut recipe = build_recipe(cfg, &cfg.recipe, r.model, &device).context("building the recipe")?;
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
            ts = load_checkpoint(&mut recipe, ck, &r, cfg.run.seed)?;
        }
        recipe.set_comm(opts.dist.as_ref().map(|d| d.comm.clone()))?;
        if let (Some(d), Some((_, ck))) = (&opts.dist, &resume_from) {
            if !d.is_root() {
                // This rank's own replay buffer, when the checkpoint holds it.
                let own = checkpoint::rank_dir(&ck.join(checkpoint::RECIPE_DIR), d.rank());
                recipe
                    .load_rank_replay(&own)
                    .with_context(|| format!("rank {}: resuming from {}", d.rank(), ck.display()))?;
            }
        }
        // Rank 0 alone writes into the run folder, evaluates and previews.
        let (log, data) = if root {
            (MetricsLog::open(&dir, Some(ts.step))?, EvalData::load(&r, &device)?)
        } else {
            (MetricsLog::disabled(&dir), EvalData::none())
        };
        let pb = progress_bar(cfg.run.steps, ts.step, opts.quiet || !root);
        let last_ckpt = resume_from.as_ref().map(|(s, _)| *s);
        Ok(Session {
            plan,
            opts,
            r,
            dir,
            device,
            recipe,
            ts,
            log,
            resume_from,
            resume_changes,
            data,
            pb,
            last_ckpt,
            last_eval: vec![],
            fit,
            root,
        })
    }

    pub fn cfg(&self) -> &TrainConfig {
        &self.r.config
    }

    /// A line on stderr (not with --quiet, nor on a data-parallel rank other than 0), above the
    /// progress bar.
    pub fn say(&self, msg: String) {
        if !self.opts.quiet && self.root {
            self.pb.suspend(|| eprintln!("{msg}"));
        }
    }

    /// What the session is about to do, and what changed on a resume.
    pub fn announce(&mut self) -> Result<()> {
        let (cfg, r) = (&self.r.config, &self.r);
        self.say(format!(
            "run `{}` in {}: {} on {} ({}), {} rows ({} held out for eval), crop {}, batch {}, steps {}..{}{}",
            self.plan.name,
            self.dir.display(),
            r.model.describe(),
            crate::device::describe(&self.device),
            self.recipe.precision().name(),
            r.set.rows,
            self.data.set.len(),
            r.crop,
            match &self.opts.dist {
                Some(d) => format!(
                    "{} per rank x {} ranks ({} backend) = {}",
                    cfg.data.batch_size,
                    d.world.world_size,
                    d.comm.backend(),
                    cfg.data.batch_size * d.world.world_size
                ),
                None => cfg.data.batch_size.to_string(),
            },
            self.ts.step,
            cfg.run.steps,
            if self.resume_from.is_some() { " (resumed)" } else { "" }
        ));
        for change in &self.resume_changes {
            self.say(format!("resumed with a changed setting: {change}"));
            if change.starts_with("run.steps:") && cfg.recipe.lr_schedule != crate::recipe::LrSchedule::Constant {
                self.say(format!(
                    "note: the learning rate ({:?} schedule) now decays towards step {}",
                    cfg.recipe.lr_schedule, cfg.run.steps
                ));
            }
        }
        if cfg.recipe.train_encoder && r.crop < r.set.resolution && cfg.recipe.encoder_margin == 0 {
            self.say(format!(
                "note: crop {} < the shards' {} px: near the crop edges the teacher latents saw pixels the encoder does not; \
                 for encoder training use --crop {} (recipe.encoder_margin helps only partly)",
                r.crop, r.set.resolution, r.set.resolution
            ));
        }
        if cfg.recipe.ema_warmup {
            let decays: Vec<f64> =
                std::iter::once(cfg.recipe.ema_decay).chain(cfg.recipe.ema_probe_decays.iter().copied()).collect();
            let same = crate::recipe::ema::still_on_ramp(&decays, cfg.run.steps);
            if same.len() > 1 {
                let low = same.iter().copied().fold(f64::INFINITY, f64::min);
                self.say(format!(
                    "note: the EMAs at decays {same:?} are one and the same average in this run: recipe.ema_warmup ramps \
                     the decay as (1 + n) / (10 + n), which reaches {low} only after {} updates (run.steps = {})",
                    crate::recipe::ema::warmup_reaches(low),
                    cfg.run.steps
                ));
            }
        }
        if cfg.data.hflip && r.set.flipped {
            tracing::info!("the shards were flipped by precompute --hflip: the loader does not flip again");
        }
        let start = json!({
            "resumed": self.resume_from.is_some(), "device": crate::device::describe(&self.device),
            "precision": self.recipe.precision().name(), "rows": r.set.rows, "eval_rows": self.data.set.len(),
        });
        self.log.write("start", self.ts.step, start)?;
        if let Some(f) = &self.fit {
            self.say(f.describe());
            self.log.write("fit", self.ts.step, serde_json::to_value(f)?)?;
        }
        Ok(())
    }

    /// Evaluate on the held-out rows (`eval` lines, `eval.json`); the reference decoder too with
    /// `with_reference`.
    pub fn eval(&mut self, with_reference: bool) -> Result<()> {
        if self.data.set.is_empty() {
            return Ok(());
        }
        let d = &self.data;
        let batch = self.r.config.data.eval_batch_size;
        let res = run_eval(
            &self.recipe,
            &d.set,
            d.reference.as_ref(),
            d.cycle_encoder.as_ref(),
            batch,
            &self.device,
            with_reference,
        )?;
        for (name, m) in &res {
            let mut v = serde_json::to_value(m)?;
            v["model"] = json!(name);
            self.log.write("eval", self.ts.step, v)?;
        }
        let models: serde_json::Map<String, serde_json::Value> =
            res.iter().map(|(n, m)| (n.clone(), serde_json::to_value(m).expect("json"))).collect();
        let text =
            serde_json::to_string_pretty(&json!({"step": self.ts.step, "images": d.set.len(), "models": models}))?;
        write_atomic(&self.dir.join("eval.json"), &text)?;
        self.last_eval = res;
        Ok(())
    }

    /// A preview grid of the preview samples and the loss curve.
    pub fn preview(&mut self) -> Result<()> {
        if !self.root {
            return Ok(());
        }
        if let Some(s) = &self.data.preview {
            let p = self.dir.join("previews").join(format!("step-{:08}.png", self.ts.step));
            write_preview(&self.recipe, s, self.data.reference.as_ref(), &p)?;
            self.log.write("preview", self.ts.step, json!({"path": p}))?;
        }
        self.loss_curve()
    }

    pub fn loss_curve(&self) -> Result<()> {
        if !self.root {
            return Ok(());
        }
        let run = &self.r.config.run;
        crate::plot::write_loss_curve(
            &self.dir.join(METRICS_FILE),
            &self.dir.join("loss.png"),
            run.plot_width,
            run.plot_height,
        )
    }

    /// A checkpoint of this step (rank 0 alone writes it; elsewhere `None`). Every rank calls
    /// this at the same step.
    pub fn checkpoint(&mut self) -> Result<Option<PathBuf>> {
        self.write_checkpoint(true)
    }

    /// With `every_rank` (every rank is here, at this step: not after a failure) the other
    /// ranks' replay buffers go in too (`recipe/rank-R/`): each writes its own into a staging
    /// folder, and rank 0 moves them into the checkpoint once every rank has succeeded.
    fn write_checkpoint(&mut self, every_rank: bool) -> Result<Option<PathBuf>> {
        let step = self.ts.step;
        let ranks = match &self.opts.dist {
            Some(d) if every_rank && self.recipe.saves_replay() => d.world.world_size,
            _ => 1,
        };
        if let (Some(d), true) = (&self.opts.dist, ranks > 1) {
            let staged = if self.root {
                Ok(())
            } else {
                let p = checkpoint::rank_staging(&self.dir, step, d.rank());
                (|| {
                    if p.exists() {
                        std::fs::remove_dir_all(&p)?;
                    }
                    std::fs::create_dir_all(&p)?;
                    self.recipe.save_rank_replay(&p)
                })()
                .with_context(|| format!("rank {}: saving its replay buffer into {}", d.rank(), p.display()))
            };
            let failed = crate::dist::comm::gather_flags(d.comm.as_ref(), staged.is_err())?;
            staged?;
            if failed.iter().any(|f| *f) {
                bail!(
                    "rank(s) {} could not save their replay buffers for the checkpoint of step {step} (their errors above)",
                    crate::dist::comm::ranks_of(&failed)
                );
            }
        }
        if !self.root {
            self.last_ckpt = Some(step);
            return Ok(None);
        }
        let p = checkpoint::save(&self.dir, &self.ts, self.r.config.run.keep_checkpoints, |d| {
            self.recipe.save_state(d)?;
            for r in 1..ranks {
                let from = checkpoint::rank_staging(&self.dir, step, r);
                let to = checkpoint::rank_dir(d, r);
                std::fs::rename(&from, &to)
                    .with_context(|| format!("cannot move {} to {}", from.display(), to.display()))?;
            }
            Ok(())
        })?;
        self.log.write("checkpoint", self.ts.step, json!({"path": p}))?;
        self.last_ckpt = Some(self.ts.step);
        Ok(Some(p))
    }

    /// The loader of a data stage, starting at the trainer's data position.
    pub fn start_loader(&self, stage: &StageAt) -> Result<Loader> {
        let (cfg, r) = (&self.r.config, &self.r);
        let lc = LoaderConfig {
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
            rank: self.opts.dist.as_ref().map_or(0, |d| d.world.rank),
            world_size: self.opts.dist.as_ref().map_or(1, |d| d.world.world_size),
        };
        Loader::start(r.set.clone(), lc, self.ts.data_position)
    }

    /// Whether this session fitted the run's step counts (`--fit-time` on a fresh run).
    pub fn fitted(&self) -> bool {
        self.fit.is_some()
    }

    /// At a stage switch of a run this session fitted (`--fit-time`), `elapsed_s` seconds into
    /// its training: fit the rest of the run again ([`super::fit::refit`]), so the budget holds
    /// where a stage ran off its timing. The new counts are the run's (`config.toml`, the
    /// schedule's end, the progress bar); a `refit` line says what changed. A refit that would
    /// make the configuration invalid is left out, with a note.
    pub fn refit(&mut self, elapsed_s: f64) -> Result<()> {
        let Some(fit) = &self.fit else { return Ok(()) };
        let mut cfg = self.r.config.clone();
        let r = match super::fit::refit(&mut cfg, self.r.crop, fit, self.ts.step, elapsed_s) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) => {
                self.say(format!("note: the rest of the run keeps its step counts ({e:#})"));
                return Ok(());
            }
        };
        self.r.config = cfg;
        self.recipe.set_schedule_end(Some(r.run_steps_after));
        self.pb.set_length(r.run_steps_after);
        if self.root {
            write_atomic(&self.dir.join(RESOLVED_CONFIG), &self.r.config.to_toml()?)?;
        }
        self.say(r.describe());
        self.log.write("refit", self.ts.step, serde_json::to_value(&r)?)
    }

    /// Say (and log) that a data stage starts.
    pub fn stage_started(&mut self, stage: &StageAt, switched: bool) -> Result<()> {
        let n = self.r.config.data.stages.len();
        if n == 0 {
            return Ok(());
        }
        let line = describe_stage(stage, self.r.crop, n);
        if switched {
            let crop = stage.crop.unwrap_or(self.r.crop);
            self.log.write(
                "stage",
                self.ts.step,
                json!({"stage": stage.stage, "crop": crop, "batch_size": stage.batch_size}),
            )?;
            self.say(format!("step {}: {line}", self.ts.step));
        } else {
            self.say(line);
        }
        Ok(())
    }

    /// A `train` line of the interval so far, and the progress message.
    pub fn log_train(&mut self, interval: &mut Interval, report: &StepReport, epoch: u64) -> Result<()> {
        let means = interval.loss_means();
        let mut v = interval.take();
        let ts = &self.ts;
        v["lr"] = json!(report.lr);
        if !report.loss_weights.is_empty() {
            v["loss_weights"] = json!(report.loss_weights);
        }
        v["epoch"] = json!(epoch);
        v["skipped_total"] = json!(ts.skipped_steps);
        v["skipped_rows_total"] = json!(ts.skipped_rows);
        v["images_seen"] = json!(ts.images_seen);
        v["elapsed_s"] = json!(ts.train_seconds);
        let ips = v["images_per_s"].as_f64().unwrap_or(0.0);
        self.log.write("train", ts.step, v)?;
        self.pb.set_message(short_losses(&means));
        if self.pb.is_hidden() && !self.opts.quiet {
            eprintln!("step {}/{}: {} ({ips:.1} img/s)", ts.step, self.r.config.run.steps, short_losses(&means));
        }
        Ok(())
    }

    /// A fatal error of the training loop: checkpoint first (see [`fail_after_checkpoint`]).
    pub fn fail(mut self, e: anyhow::Error, data_error: bool) -> anyhow::Error {
        self.pb.finish_and_clear();
        if !self.root {
            return e;
        }
        let (ts, last, dir) = (self.ts.clone(), self.last_ckpt, self.dir.clone());
        let recipe_step = self.recipe.step_count();
        fail_after_checkpoint(e, data_error, recipe_step, &ts, last, &dir, || {
            // Rank 0 alone (the others may be gone): without their replay buffers.
            self.write_checkpoint(false)?.ok_or_else(|| anyhow!("no checkpoint written"))
        })
    }

    /// The end of the session: a checkpoint of the last step; when the run is complete the final
    /// preview, evaluation (with the reference) and exports; the report.
    pub fn finish(mut self, interrupted: bool, time_limit_reached: bool, steps_per_s: f64) -> Result<RunOutcome> {
        if self.last_ckpt != Some(self.ts.step) {
            self.checkpoint()?;
        }
        let run = self.r.config.run.clone();
        let mut exported = Vec::new();
        if !self.root {
            // Rank 0 evaluates, exports and reports.
        } else if !interrupted {
            if !self.ts.step.is_multiple_of(run.preview_every.max(1)) || run.preview_every == 0 {
                self.preview()?;
            }
            self.eval(true)?;
            let (files, notes) = export(&self.recipe, &self.r, &self.dir, self.ts.step)?;
            for n in notes {
                self.say(n);
            }
            self.log.write("export", self.ts.step, json!({"files": files}))?;
            exported = files;
        } else {
            self.loss_curve()?;
        }
        let ts = &self.ts;
        self.log.write(
            "end",
            ts.step,
            json!({"interrupted": interrupted, "steps_per_s": steps_per_s, "skipped_total": ts.skipped_steps}),
        )?;
        if !self.root {
        } else if let Err(e) = crate::report::write(&self.dir) {
            self.say(format!("note: {} not written: {e:#}", crate::report::REPORT_FILE));
        }
        self.pb.finish_and_clear();
        Ok(RunOutcome {
            name: self.plan.name.clone(),
            dir: self.dir,
            step: self.ts.step,
            steps: run.steps,
            interrupted,
            time_limit_reached,
            resumed_from: self.resume_from.map(|(s, _)| s),
            skipped_steps: self.ts.skipped_steps,
            steps_per_s,
            final_eval: self.last_eval,
            exported,
        })
    }
}

/// Load a checkpoint into `recipe` after checking that it belongs to this run; its trainer state.
fn load_checkpoint(recipe: &mut Recipe, ck: &Path, r: &Resolved, seed: u64) -> Result<TrainerState> {
    let saved = checkpoint::read_state(ck)?;
    ensure!(
        saved.shard_rows == r.set.rows,
        "--resume: the shard folder {} now has {} rows, the run started with {}; the batch order would differ",
        r.set.dir.display(),
        r.set.rows,
        saved.shard_rows
    );
    ensure!(saved.seed == seed, "--resume: the run was started with seed {}, not {seed}", saved.seed);
    recipe.load_state(&ck.join(checkpoint::RECIPE_DIR)).with_context(|| format!("resuming from {}", ck.display()))?;
    ensure!(
        recipe.step_count() == saved.step,
        "{}: the recipe state is at step {}, the trainer state at {}",
        ck.display(),
        recipe.step_count(),
        saved.step
    );
    Ok(saved)
}

/// Every rank resumes from the checkpoint rank 0 chose (`root`: its choice; elsewhere
/// ignored): its step is broadcast, and every rank finds it in the run folder (which must be on
/// a filesystem all ranks see).
fn agree_checkpoint(d: &crate::dist::Dist, dir: &Path, root: Option<(u64, PathBuf)>) -> Result<Option<(u64, PathBuf)>> {
    let mut b = root.as_ref().map_or(u64::MAX, |(s, _)| *s).to_le_bytes();
    d.comm.broadcast_host(&mut b).context("agreeing on the checkpoint to resume from")?;
    let step = u64::from_le_bytes(b);
    if d.is_root() || step == u64::MAX {
        return Ok(root);
    }
    let found = checkpoint::list(dir)?.into_iter().find(|(s, _)| *s == step);
    found.map(Some).ok_or_else(|| {
        anyhow!(
            "rank {}: rank 0 resumes from step {step}, but {} has no such checkpoint here: the run folder must be on a filesystem every rank sees",
            d.rank(),
            dir.display()
        )
    })
}

impl EvalData {
    /// Nothing to evaluate or preview (a rank other than 0).
    fn none() -> EvalData {
        EvalData { set: EvalSet { rows: vec![] }, preview: None, reference: None, cycle_encoder: None }
    }

    /// The held-out split (or, without one, the first rows for previews) and the comparison
    /// models of the configuration.
    fn load(r: &Resolved, device: &Device) -> Result<EvalData> {
        let d = &r.config.data;
        let set = if d.eval_fraction > 0.0 {
            EvalSet::load(&r.set, Split::HeldOut(d.eval_fraction), d.eval_max_images)?
        } else {
            EvalSet { rows: vec![] }
        };
        // One row per source image where the shards hold several variants of each (a few more
        // rows than shown are read without a held-out split, for the other sources to be among them).
        let preview_rows = if set.is_empty() {
            EvalSet::load(&r.set, Split::All, d.preview_images.saturating_mul(4))?.one_per_source(d.preview_images)
        } else {
            set.one_per_source(d.preview_images)
        };
        let preview = if preview_rows.is_empty() || d.preview_images == 0 {
            None
        } else {
            Some(preview_rows.batch(0..preview_rows.len(), device)?)
        };
        let m = &r.config.model;
        let reference = match &m.reference_decoder {
            Some(p) => Some(
                crate::models::load(p, r.variant, device)?
                    .decoder
                    .ok_or_else(|| anyhow!("{} has no decoder", p.display()))?,
            ),
            None => None,
        };
        let cycle_encoder = match &m.cycle_encoder {
            Some(p) => Some(
                crate::models::load(p, r.variant, device)?
                    .encoder
                    .ok_or_else(|| anyhow!("{} has no encoder", p.display()))?,
            ),
            None => None,
        };
        Ok(EvalData { set, preview, reference, cycle_encoder })
    }
}

/// A fatal error of the training loop at trainer state `ts`: save a checkpoint of the steps done
/// (unless there is one at this step already, or no step was done), then return the error with
/// how to resume. The recipe's state is that of `ts.step` when its step counter says so: a failed
/// step writes nothing (its proposals are committed only at its end).
fn fail_after_checkpoint(
    e: anyhow::Error,
    data_error: bool,
    recipe_step: u64,
    ts: &TrainerState,
    last_ckpt: Option<u64>,
    run_dir: &Path,
    save: impl FnOnce() -> Result<PathBuf>,
) -> anyhow::Error {
    if ts.step == 0 {
        return e;
    }
    let skip = if data_error { " --set data.skip_bad_rows=true (to skip the bad data)" } else { "" };
    let resume = format!("resume with: train --resume --run-dir {}{skip}", run_dir.display());
    let saved = if last_ckpt == Some(ts.step) {
        Ok(format!("the checkpoint at step {} holds the run so far", ts.step))
    } else if recipe_step != ts.step {
        Err(anyhow!("the error came in the middle of step {recipe_step}'s update; the training state is not saved"))
    } else {
        save().map(|p| format!("checkpoint saved at step {} ({})", ts.step, p.display()))
    };
    match saved {
        Ok(note) => anyhow!("{e:#}\n{note}; {resume}"),
        Err(s) => {
            let last =
                last_ckpt.map_or("no checkpoint yet".to_string(), |k| format!("the last checkpoint is at step {k}"));
            anyhow!("{e:#}\ncould not save a checkpoint ({s:#}); {last}; {resume}")
        }
    }
}
