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
//!
//! The parts: [`resolve`] (what the shards decide, what a resume may change), [`session`] (one
//! session of a run: open, evaluate, preview, checkpoint, finish), [`output`] (evaluations,
//! previews, exports), [`progress`] (the progress line), [`fit`] (`--fit-time`: a new run's
//! step counts scaled to a time budget on this machine); this file is the training loop.

pub mod fit;
mod output;
mod progress;
mod resolve;
mod session;

pub use resolve::{resolve, Resolved};

use crate::eval::Metrics;
use crate::loader::Loader;
use crate::metrics::Interval;
use crate::recipe::Batch;
use anyhow::{bail, Context, Result};
use session::Session;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

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
    /// Fit a fresh run's step counts to this many seconds on this machine ([`fit`]), timing
    /// `fit_steps` steps per crop and batch size.
    pub fit_time: Option<f64>,
    pub fit_steps: usize,
    /// Data-parallel: this rank, its device and the other ranks (`None`: alone).
    pub dist: Option<crate::dist::Dist>,
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

/// Run (or continue) one training run.
pub fn run(plan: &crate::config::RunPlan, opts: &RunOptions) -> Result<RunOutcome> {
    let mut s = Session::open(plan, opts)?;
    s.announce()?;
    if s.ts.step == 0 {
        s.eval(true)?;
        if !s.last_eval.is_empty() {
            s.say(format!("step 0 eval:\n{}", crate::eval::table(&s.last_eval)));
        }
        if s.cfg().run.preview_every > 0 {
            s.preview()?;
        }
    }
    let mut l = Loop::start(&mut s)?;
    // An error after step 1 saves a checkpoint first (as Ctrl-C does) and says how to resume.
    if let Err(e) = l.run(&mut s) {
        drop(l.loader);
        // The other ranks stop now (rank 0 then checkpoints the steps all have done).
        if let Some(d) = &opts.dist {
            d.comm.abort(&format!("{e:#}"));
        }
        return Err(s.fail(e, l.data_error));
    }
    drop(l.loader);
    let steps_per_s = (s.ts.step - l.first_step) as f64 / l.t0.elapsed().as_secs_f64().max(1e-9);
    s.finish(l.interrupted, l.time_limit_reached, steps_per_s)
}

/// The training loop's own state.
struct Loop {
    stage: crate::config::StageAt,
    loader: Loader,
    interval: Interval,
    t0: Instant,
    first_step: u64,
    interrupted: bool,
    time_limit_reached: bool,
    /// The loader failed (bad shard data): the resume hint suggests skipping it.
    data_error: bool,
    skips_in_a_row: u64,
}

impl Loop {
    fn start(s: &mut Session) -> Result<Loop> {
        let stage = s.cfg().data.stage_at(s.ts.step);
        let loader = s.start_loader(&stage)?;
        s.stage_started(&stage, false)?;
        let (t0, first_step) = (Instant::now(), s.ts.step);
        Ok(Loop {
            stage,
            loader,
            interval: Interval::default(),
            t0,
            first_step,
            interrupted: false,
            time_limit_reached: false,
            data_error: false,
            skips_in_a_row: 0,
        })
    }

    /// Steps until the run's end, Ctrl-C or the time limit.
    fn run(&mut self, s: &mut Session) -> Result<()> {
        let every = |n: u64, k: u64| n > 0 && k.is_multiple_of(n);
        let run = &s.cfg().run;
        let (mut total, log, ckpt, preview, eval) =
            (run.steps, run.log_every, run.checkpoint_every, run.preview_every, run.eval_every);
        while s.ts.step < total {
            self.time_limit_reached = s.opts.time_limit.is_some_and(|l| self.t0.elapsed() >= l);
            let mut stop = s.opts.stop.load(Ordering::SeqCst);
            if let Some(d) = &s.opts.dist {
                // The ranks stop at the same step: when any of them is told to.
                let mut v = [stop as u8 as f32, self.time_limit_reached as u8 as f32];
                d.comm.all_reduce_host(&mut v).context("agreeing on a stop")?;
                (stop, self.time_limit_reached) = (v[0] > 0.5, v[1] > 0.5);
            }
            if stop || self.time_limit_reached {
                self.interrupted = true;
                return Ok(());
            }
            if s.ts.step >= self.stage.until {
                // A fitted run fits its rest again (every rank on rank 0's clock); then the next
                // data stage: the loader restarts where the last one stopped.
                if s.fitted() {
                    let mut elapsed = self.t0.elapsed().as_secs_f64().to_le_bytes();
                    if let Some(d) = &s.opts.dist {
                        d.comm.broadcast_host(&mut elapsed).context("rank 0's training time")?;
                    }
                    s.refit(f64::from_le_bytes(elapsed))?;
                    total = s.cfg().run.steps;
                }
                self.stage = s.cfg().data.stage_at(s.ts.step);
                self.loader.stop();
                self.loader = s.start_loader(&self.stage)?;
                s.stage_started(&self.stage, true)?;
            }
            let (report, epoch) = self.step(s)?;
            let pause = Instant::now();
            s.pb.set_position(s.ts.step);
            if every(log, s.ts.step) || s.ts.step == total {
                s.log_train(&mut self.interval, &report, epoch)?;
            }
            if every(ckpt, s.ts.step) {
                s.checkpoint()?;
            }
            if every(preview, s.ts.step) {
                s.preview()?;
            }
            if every(eval, s.ts.step) && s.ts.step < total {
                s.eval(false)?;
            }
            self.interval.time("pauses", pause.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// One batch through one step; the trainer state follows it. Returns the step's report and
    /// the data epoch after it.
    fn step(&mut self, s: &mut Session) -> Result<(crate::recipe::StepReport, u64)> {
        let tw = Instant::now();
        let hb = self.loader.next_batch().inspect_err(|_| self.data_error = true)?;
        for b in &hb.skipped {
            s.ts.skipped_rows += b.rows;
            let line = serde_json::json!({"what": b.what, "reason": b.reason, "rows": b.rows, "skipped_rows_total": s.ts.skipped_rows});
            s.log.write("bad_data", s.ts.step, line)?;
            s.say(format!("step {}: skipped bad data (data.skip_bad_rows): {}: {}", s.ts.step, b.what, b.reason));
        }
        let loaded = tw.elapsed().as_secs_f64();
        let (images, latents) = hb.to_tensors(&s.device)?;
        let uploaded = tw.elapsed().as_secs_f64();
        let report =
            s.recipe.step(&Batch { images, latents }).with_context(|| format!("training step {}", s.ts.step + 1))?;
        let stepped = tw.elapsed().as_secs_f64();
        self.interval.time("loader_wait", loaded);
        self.interval.time("upload", uploaded - loaded);
        self.interval.time("step", stepped - uploaded);
        let ts = &mut s.ts;
        ts.train_seconds += stepped;
        ts.step = s.recipe.step_count();
        ts.data_position = hb.next;
        ts.images_seen += hb.global_batch as u64;
        match &report.skipped {
            Some(why) => {
                ts.skipped_steps += 1;
                self.skips_in_a_row += 1;
                self.interval.count(hb.global_batch as u64);
                let (step, total) = (ts.step, ts.skipped_steps);
                s.log.write("skip", step, serde_json::json!({"reason": why, "skipped_total": total}))?;
                s.say(format!("step {step}: skipped ({why})"));
                let most = s.cfg().run.max_skips_in_a_row;
                if most > 0 && self.skips_in_a_row >= most {
                    bail!(
                        "the NaN guard skipped {} steps in a row (run.max_skips_in_a_row), the last at step {step} ({why}): \
                         giving up, the run has diverged (a lower recipe.lr or grad_clip, or --precision f32, may help in a new run)",
                        self.skips_in_a_row
                    );
                }
            }
            None => {
                self.skips_in_a_row = 0;
                self.interval.add_step(&report.losses, &report.grad_norms, hb.global_batch as u64)
            }
        }
        Ok((report, hb.next.epoch))
    }
}
