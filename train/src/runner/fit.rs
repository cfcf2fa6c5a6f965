//! `train --fit-time SECONDS`: a fresh run's step counts fitted to a wall-time budget on this
//! machine, so a schedule written for one GPU ("25 minutes on an H100") fills the same minutes on
//! another, faster or slower, without guessing a scale.
//!
//! Each distinct crop and batch size of the run's stages is timed on a throwaway recipe built
//! like the run's (configuration, model, device, precision; the full step, past the warm-ups,
//! each on a random batch uploaded from the host as the loader's are), for at least the given
//! number of steps and at least `MIN_TIMED_SHARE` of the budget, then every step count —
//! `run.steps` and each `[[data.stages]]` entry's — is multiplied by one factor so that the
//! steps take the budget less a margin (`MARGIN`: the loader's waits, evaluations, previews and
//! checkpoints inside the loop, and a rate that wanders over a long run). The schedule keeps its shape: the
//! stages' proportions, the cosine's end at the last step; warm-ups and the checkpoint,
//! preview and evaluation intervals stay as written. Counts of 1000 or more are rounded to
//! multiples of 50. The fitted counts go into the run's `config.toml`, so a resume continues
//! the same schedule; the timings go into `metrics.jsonl` (a `fit` line).
//!
//! A few seconds of timing cannot say where a host-bound step's average over a long stage will
//! land (the 128 px step of taef2 on an H100 came -8% to +8.5% off it in three runs), so at each
//! stage switch of the session that fitted the run, the rest of the run is fitted again
//! ([`refit`]): the stages not yet started and the run's end scaled by one factor so that they
//! take what is left of the budget at the timed rates (a `refit` line; `config.toml` rewritten,
//! so a resume continues the refitted schedule). The stages already run are kept.
//!
//! Data-parallel: every rank times the same steps together, its throwaway recipe training
//! through the run's collectives (the gradient all-reduce is part of the step), and rank 0's
//! timings are broadcast, so every rank fits the same counts.

use crate::config::TrainConfig;
use crate::dist::comm::Comm;
use crate::loader::HostBatch;
use crate::recipe::Batch;
use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;
use taesd::TaesdConfig;

/// The share of the budget left to what is neither a step nor its batch's upload (both timed):
/// the loader's waits, evaluations, previews and checkpoints inside the loop, under 1% of the
/// loop's time in the 21- and 25-minute runs of 2026-12-06, and a rate that wanders. (At 5%, with
/// the upload outside the timing, those runs trained 90-91% of their budgets:
/// bench/results/2026-12-06-h100-scratch-25min.md.)
pub const MARGIN: f64 = 0.03;

/// The least and most a refit scales the rest of the run by: a stage that ran far off its
/// timing (a stall) should not empty the stages after it, nor a fast one double them.
pub const REFIT_BOUNDS: (f64, f64) = (0.5, 2.0);

/// Each crop and batch size is timed for at least this share of the budget (0.3%: 4.5 s of a
/// 1,500 s one), past the timed steps' minimum: a host-bound small-crop step's rate wanders by
/// ~10% between 50-step windows, and 30 steps of it (~1.2 s at 128 px on an H100) came out 7-8%
/// under the stage's average in both runs above.
pub const MIN_TIMED_SHARE: f64 = 0.003;

/// Steps timed per crop and batch size by default (after `warmup_steps(timed)` untimed ones).
pub const DEFAULT_TIMED_STEPS: usize = 30;

/// Untimed steps before the timed ones: the first steps pick cuDNN plans and grow the memory pool.
pub fn warmup_steps(timed: usize) -> usize {
    (timed / 3).clamp(1, 10)
}

/// A budget `--fit-time` accepts: a positive number of seconds.
pub fn check_budget(seconds: f64) -> Result<()> {
    ensure!(seconds.is_finite() && seconds > 0.0, "--fit-time {seconds}: give a positive number of seconds");
    Ok(())
}

/// One stretch of the run at one crop and batch size, timed.
#[derive(Clone, Debug, Serialize)]
pub struct Segment {
    pub crop: u32,
    pub batch_size: usize,
    pub steps_before: u64,
    pub steps_after: u64,
    pub steps_per_s: f64,
    pub images_per_s: f64,
    /// Steps the rate was measured over.
    pub timed_steps: usize,
}

/// What the fit did (the `fit` line of metrics.jsonl).
#[derive(Clone, Debug, Serialize)]
pub struct Fit {
    pub budget_s: f64,
    /// The budget less the margin: what the steps are fitted to.
    pub steps_s: f64,
    pub factor: f64,
    pub run_steps_before: u64,
    pub run_steps_after: u64,
    pub segments: Vec<Segment>,
    /// The timing itself (not part of the budget).
    pub calibration_s: f64,
}

impl Fit {
    /// One line for the log.
    pub fn describe(&self) -> String {
        let rates: Vec<String> = self
            .segments
            .iter()
            .map(|s| {
                format!(
                    "{} px / batch {}: {:.1} images/s ({} steps)",
                    s.crop, s.batch_size, s.images_per_s, s.timed_steps
                )
            })
            .collect();
        format!(
            "--fit-time {:.0} s: measured {} ({:.1} s); every step count x {:.3}: run.steps {} -> {} (~{:.0} s of steps, {:.0}% left for the rest)",
            self.budget_s,
            rates.join(", "),
            self.calibration_s,
            self.factor,
            self.run_steps_before,
            self.run_steps_after,
            self.steps_s,
            MARGIN * 100.0
        )
    }
}

/// What a refit at a stage switch did (a `refit` line of metrics.jsonl).
#[derive(Clone, Debug, Serialize)]
pub struct Refit {
    /// The step the refitted rest of the run starts at (the switch).
    pub step: u64,
    /// Seconds of training so far (this session's loop), and what is left of the budget for
    /// the steps, less the margin.
    pub elapsed_s: f64,
    pub steps_s: f64,
    /// The factor on the rest's step counts (within [`REFIT_BOUNDS`]).
    pub factor: f64,
    pub run_steps_before: u64,
    pub run_steps_after: u64,
}

impl Refit {
    /// One line for the log.
    pub fn describe(&self) -> String {
        format!(
            "--fit-time: {:.0} s of training at step {}; the rest of the run x {:.3} to take the ~{:.0} s left: run.steps {} -> {}",
            self.elapsed_s, self.step, self.factor, self.steps_s, self.run_steps_before, self.run_steps_after
        )
    }
}

/// The run's stretches as `(crop, batch size, steps)`: the stages in order, then the rest of
/// the run at `[data]`'s crop and batch size (stages past `run.steps` cut there).
pub fn segments(cfg: &TrainConfig, default_crop: u32) -> Vec<(u32, usize, u64)> {
    let mut out = Vec::new();
    let mut left = cfg.run.steps;
    for st in &cfg.data.stages {
        let n = st.steps.min(left);
        out.push((st.crop.or(cfg.data.crop).unwrap_or(default_crop), st.batch_size.unwrap_or(cfg.data.batch_size), n));
        left -= n;
    }
    out.push((cfg.data.crop.unwrap_or(default_crop), cfg.data.batch_size, left));
    out
}

/// `n` times `factor`, rounded (to a multiple of 50 from 1000 on), at least 1 unless `n` is 0.
pub fn scale_count(n: u64, factor: f64) -> u64 {
    if n == 0 {
        return 0;
    }
    let x = n as f64 * factor;
    let r = if x >= 1000.0 { (x / 50.0).round() * 50.0 } else { x.round() };
    (r as u64).max(1)
}

/// The factor that makes `segments` (steps, steps per second) take `seconds`.
pub fn factor_for(segments: &[(u64, f64)], seconds: f64) -> f64 {
    let t: f64 = segments.iter().filter(|(n, _)| *n > 0).map(|(n, r)| *n as f64 / r).sum();
    if t > 0.0 {
        seconds / t
    } else {
        1.0
    }
}

/// Multiply every step count of `cfg` by `factor`: each stage's, and `run.steps` as the sum of
/// its stretches scaled (a stage the run ends inside keeps ending it at the same fraction).
pub fn scale_steps(cfg: &mut TrainConfig, default_crop: u32, factor: f64) {
    scale_steps_from(cfg, default_crop, 0, factor)
}

/// [`scale_steps`] on the stretches that start at `from` or later: their stage entries scaled,
/// the stretches before kept, `run.steps` the sum of them all.
pub fn scale_steps_from(cfg: &mut TrainConfig, default_crop: u32, from: u64, factor: f64) {
    let (mut start, mut total) = (0u64, 0u64);
    for (i, (_, _, n)) in segments(cfg, default_crop).into_iter().enumerate() {
        if start >= from {
            if let Some(st) = cfg.data.stages.get_mut(i) {
                st.steps = scale_count(st.steps, factor);
            }
            total += scale_count(n, factor);
        } else {
            total += n;
        }
        start += n;
    }
    cfg.run.steps = total;
}

/// Fit the rest of a run again at a stage switch: `elapsed_s` seconds into the run that `fit`
/// fitted, at `step`, every stretch that starts at `step` or later (the stages not yet run, the
/// rest of the run) is scaled by one factor so that they take what is left of the budget less
/// the margin at the fit's timed rates; the stretches before `step` keep their counts, so the
/// steps already run stay where they are. `None` when nothing is left to scale or the fit
/// timed no rate for a stretch left. The scaled configuration must still be valid.
pub fn refit(cfg: &mut TrainConfig, default_crop: u32, fit: &Fit, step: u64, elapsed_s: f64) -> Result<Option<Refit>> {
    let rate =
        |crop, batch| fit.segments.iter().find(|s| (s.crop, s.batch_size) == (crop, batch)).map(|s| s.steps_per_s);
    // (steps, steps per second) of the stretches from `step` on.
    let mut rest = Vec::new();
    let mut start = 0u64;
    for (crop, batch, n) in segments(cfg, default_crop) {
        if start >= step && n > 0 {
            let Some(r) = rate(crop, batch) else { return Ok(None) };
            rest.push((n, r));
        }
        start += n;
    }
    if rest.is_empty() {
        return Ok(None);
    }
    let steps_s = (fit.budget_s - elapsed_s).max(0.0) * (1.0 - MARGIN);
    let factor = factor_for(&rest, steps_s).clamp(REFIT_BOUNDS.0, REFIT_BOUNDS.1);
    let mut new = cfg.clone();
    scale_steps_from(&mut new, default_crop, step, factor);
    new.validate().context("--fit-time: the refitted configuration")?;
    let r = Refit { step, elapsed_s, steps_s, factor, run_steps_before: cfg.run.steps, run_steps_after: new.run.steps };
    *cfg = new;
    Ok(Some(r))
}

/// Seconds per step of the full recipe at `crop` and `batch` on `device`, its batch's upload
/// included, and how many steps were timed: at least `timed` steps and at least `min_seconds`
/// (at most 21x `timed`) after `warmup_steps(timed)`, on a recipe built like the run's (its
/// warm-ups skipped: the full step is timed; a replay buffer of four batches), data-parallel
/// through `comm` when given (rank 0 decides how many steps).
#[allow(clippy::too_many_arguments)]
pub fn time_step(
    cfg: &TrainConfig,
    model: TaesdConfig,
    device: &Device,
    comm: Option<&Arc<dyn Comm>>,
    crop: u32,
    batch: usize,
    timed: usize,
    min_seconds: f64,
) -> Result<(f64, usize)> {
    let mut rc = cfg.recipe.clone();
    rc.pixel_warmup_steps = 0;
    rc.disc_warmup_steps = 0;
    rc.replay_capacity = rc.replay_capacity.min(4 * batch);
    let mut recipe = super::session::build_recipe(cfg, &rc, model, device).context("building the recipe to time")?;
    recipe.set_comm(comm.cloned())?;
    let side = crop as usize / model.spatial_scale();
    let hb = random_host_batch(batch, crop as usize, [model.latent_channels, side, side])?;
    let mut step = || -> Result<()> {
        let (images, latents) = hb.to_tensors(device)?;
        recipe.step(&Batch { images, latents })?;
        Ok(())
    };
    for _ in 0..warmup_steps(timed) {
        step()?;
    }
    device.synchronize()?;
    let t0 = Instant::now();
    let mut n = timed.max(1);
    for _ in 0..n {
        step()?;
    }
    device.synchronize()?;
    // Too short a sample of a wandering rate: more steps, as many as `min_seconds` takes at the
    // rate so far (every rank the same count, rank 0's: the step has collectives).
    let so_far = t0.elapsed().as_secs_f64();
    let per_step = (so_far / n as f64).max(1e-6);
    let mut more = (((min_seconds - so_far).max(0.0) / per_step).ceil() as u64).min(20 * n as u64);
    if let Some(c) = comm {
        let mut bytes = more.to_le_bytes();
        c.broadcast_host(&mut bytes).context("rank 0's count of timed steps")?;
        more = u64::from_le_bytes(bytes);
    }
    for _ in 0..more {
        step()?;
    }
    device.synchronize()?;
    n += more as usize;
    Ok((t0.elapsed().as_secs_f64() / n as f64, n))
}

/// A batch of random 8-bit images and normal latents on the host, as the loader hands them over.
fn random_host_batch(batch: usize, crop: usize, [c, h, w]: [usize; 3]) -> Result<HostBatch> {
    let host = |t: Tensor| t.flatten_all()?.to_vec1::<f32>();
    let images = host(Tensor::rand(0f32, 255.0, (batch, 3, crop, crop), &Device::Cpu)?)?;
    Ok(HostBatch {
        images: images.into_iter().map(|v| v as u8).collect(),
        latents: host(Tensor::randn(0f32, 1.0, (batch, c, h, w), &Device::Cpu)?)?,
        batch,
        crop,
        latent_shape: [c, h, w],
        keys: Vec::new(),
        positions: Vec::new(),
        next: Default::default(),
        global_batch: batch,
        skipped: Vec::new(),
    })
}

/// Time each crop and batch size of `cfg`'s run and scale its step counts to fill `budget_s`
/// (every rank of `comm` together, rank 0's timings deciding).
pub fn fit(
    cfg: &mut TrainConfig,
    model: TaesdConfig,
    default_crop: u32,
    device: &Device,
    comm: Option<&Arc<dyn Comm>>,
    budget_s: f64,
    timed: usize,
) -> Result<Fit> {
    check_budget(budget_s)?;
    let t0 = Instant::now();
    let segs = segments(cfg, default_crop);
    // (crop, batch size), steps per second, steps timed.
    let mut rates: Vec<((u32, usize), f64, usize)> = Vec::new();
    for &(crop, batch, n) in &segs {
        if n == 0 || rates.iter().any(|(k, ..)| *k == (crop, batch)) {
            continue;
        }
        let (sec, n) = time_step(cfg, model, device, comm, crop, batch, timed, budget_s * MIN_TIMED_SHARE)
            .with_context(|| format!("--fit-time: timing the step at crop {crop}, batch {batch}"))?;
        rates.push(((crop, batch), 1.0 / sec, n));
    }
    if let Some(c) = comm {
        let mut bytes: Vec<u8> = rates.iter().flat_map(|r| r.1.to_le_bytes()).collect();
        c.broadcast_host(&mut bytes).context("--fit-time: rank 0's timings")?;
        for (r, b) in rates.iter_mut().zip(bytes.chunks_exact(8)) {
            r.1 = f64::from_le_bytes(b.try_into().expect("8 bytes"));
        }
    }
    let timing = |crop, batch| rates.iter().find(|(k, ..)| *k == (crop, batch)).map_or((f64::NAN, 0), |r| (r.1, r.2));
    let rate = |crop, batch| timing(crop, batch).0;
    let steps_s = budget_s * (1.0 - MARGIN);
    let factor = factor_for(&segs.iter().map(|&(c, b, n)| (n, rate(c, b))).collect::<Vec<_>>(), steps_s);
    let run_steps_before = cfg.run.steps;
    scale_steps(cfg, default_crop, factor);
    cfg.validate().context("--fit-time: the fitted configuration")?;
    let after = segments(cfg, default_crop);
    let segments = segs
        .iter()
        .zip(&after)
        .filter(|((_, _, n), _)| *n > 0)
        .map(|(&(crop, batch_size, steps_before), a)| {
            let (r, timed_steps) = timing(crop, batch_size);
            Segment {
                crop,
                batch_size,
                steps_before,
                steps_after: a.2,
                steps_per_s: r,
                images_per_s: r * batch_size as f64,
                timed_steps,
            }
        })
        .collect();
    Ok(Fit {
        budget_s,
        steps_s,
        factor,
        run_steps_before,
        run_steps_after: cfg.run.steps,
        segments,
        calibration_s: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> TrainConfig {
        TrainConfig::from_table(text.parse().unwrap()).unwrap()
    }

    #[test]
    fn segments_are_the_stages_then_the_rest() {
        let c = cfg("[data]\ncrop = 256\nbatch_size = 32\n[[data.stages]]\nsteps = 29000\ncrop = 128\n\
                     [[data.stages]]\nsteps = 10\nbatch_size = 8\n[run]\nsteps = 33000\n");
        assert_eq!(segments(&c, 64), vec![(128, 32, 29000), (256, 8, 10), (256, 32, 3990)]);
        // Stages past the run's end are cut there; no crop anywhere: the shards' default.
        let c = cfg("[[data.stages]]\nsteps = 50\ncrop = 16\n[[data.stages]]\nsteps = 50\n[run]\nsteps = 70\n");
        assert_eq!(segments(&c, 64), vec![(16, 16, 50), (64, 16, 20), (64, 16, 0)]);
    }

    #[test]
    fn the_factor_fills_the_time_and_scaling_keeps_the_shape() {
        // 29000 steps at 30 steps/s + 4000 at 10: 966.7 + 400 s.
        let f = factor_for(&[(29000, 30.0), (4000, 10.0), (0, f64::NAN)], 1500.0);
        assert!((f - 1500.0 / (29000.0 / 30.0 + 400.0)).abs() < 1e-12, "{f}");
        let mut c = cfg("[data]\ncrop = 256\n[[data.stages]]\nsteps = 29000\ncrop = 128\n[run]\nsteps = 33000\n");
        scale_steps(&mut c, 256, 0.82);
        // 29000 -> 23780 -> 23800 and the rest 4000 -> 3280 -> 3300 (bench/gpu_scratch_run.sh
        // SCALE=0.82 rounded run.steps itself: 27050).
        assert_eq!((c.data.stages[0].steps, c.run.steps), (23800, 27100));
        let mut c = cfg("[data]\ncrop = 32\n[[data.stages]]\nsteps = 3\ncrop = 16\n[run]\nsteps = 5\n");
        scale_steps(&mut c, 32, 2.6);
        assert_eq!((c.data.stages[0].steps, c.run.steps), (8, 13));
        scale_steps(&mut c, 32, 0.01);
        assert_eq!((c.data.stages[0].steps, c.run.steps), (1, 2), "never below one step per stretch");
        // The run ends inside its second stage (50 + 20 of 50): it still does, at 2x.
        let mut c = cfg("[[data.stages]]\nsteps = 50\ncrop = 16\n[[data.stages]]\nsteps = 50\n[run]\nsteps = 70\n");
        scale_steps(&mut c, 64, 2.0);
        assert_eq!((c.data.stages[0].steps, c.data.stages[1].steps, c.run.steps), (100, 100, 140));
        assert_eq!(segments(&c, 64), vec![(16, 16, 100), (64, 16, 40), (64, 16, 0)]);
        assert_eq!((scale_count(0, 5.0), scale_count(999, 1.0), scale_count(1024, 1.0)), (0, 999, 1000));
    }

    /// A fit of `budget_s` that timed `rates` ((crop, batch size, steps per second)).
    fn timed(budget_s: f64, rates: &[(u32, usize, f64)]) -> Fit {
        let segments = rates
            .iter()
            .map(|&(crop, batch_size, r)| Segment {
                crop,
                batch_size,
                steps_before: 0,
                steps_after: 0,
                steps_per_s: r,
                images_per_s: r * batch_size as f64,
                timed_steps: 30,
            })
            .collect();
        Fit {
            budget_s,
            steps_s: 0.0,
            factor: 1.0,
            run_steps_before: 0,
            run_steps_after: 0,
            segments,
            calibration_s: 0.0,
        }
    }

    #[test]
    fn a_refit_scales_the_rest_of_the_run_to_the_budget_left() {
        // The 17-minute run of 2026-12-06: fitted to 1000 s at 24.71 / 9.017 steps/s, its 128 px
        // stage took 765.4 s where the fit expected 704 s.
        let fitted =
            "[data]\ncrop = 256\nbatch_size = 32\n[[data.stages]]\nsteps = 17400\ncrop = 128\n[run]\nsteps = 19800\n";
        let fit = timed(1000.0, &[(128, 32, 24.71), (256, 32, 9.017)]);
        let mut c = cfg(fitted);
        let r = refit(&mut c, 256, &fit, 17400, 765.4).unwrap().unwrap();
        // (1000 - 765.4) * 0.97 = 227.6 s left for 2400 steps of 266.2 s: x 0.855, 2052 -> 2050.
        assert!(
            (r.steps_s - 234.6 * 0.97).abs() < 1e-9 && (r.factor - r.steps_s / (2400.0 / 9.017)).abs() < 1e-12,
            "{r:?}"
        );
        assert_eq!((r.step, r.run_steps_before, r.run_steps_after), (17400, 19800, 19450));
        assert_eq!((c.data.stages[0].steps, c.run.steps), (17400, 19450), "the stage already run is kept");
        // Far over the budget: the rest is halved, not emptied; far under it: doubled at most.
        let mut c = cfg(fitted);
        assert_eq!(refit(&mut c, 256, &fit, 17400, 990.0).unwrap().unwrap().factor, REFIT_BOUNDS.0);
        assert_eq!(c.run.steps, 17400 + 1200);
        let mut c = cfg(fitted);
        assert_eq!(refit(&mut c, 256, &fit, 17400, 10.0).unwrap().unwrap().factor, REFIT_BOUNDS.1);
        assert_eq!(c.run.steps, 17400 + 4800);
        // At the start, on time, a refit keeps the fit's counts (the factor 1 up to the rounding).
        let mut c = cfg(fitted);
        let on_time = timed((17400.0 / 24.71 + 2400.0 / 9.017) / (1.0 - MARGIN), &[(128, 32, 24.71), (256, 32, 9.017)]);
        let at0 = refit(&mut c, 256, &on_time, 0, 0.0).unwrap().unwrap();
        assert!((at0.factor - 1.0).abs() < 1e-9, "{at0:?}");
        assert_eq!((c.data.stages[0].steps, c.run.steps), (17400, 19800));
        // Three stretches, the switch into the second: the second stage and the rest scale, the
        // first stays; a stretch without a timed rate, or nothing left: no refit.
        let three = "[data]\ncrop = 64\nbatch_size = 16\n[[data.stages]]\nsteps = 50\ncrop = 16\n[[data.stages]]\nsteps = 50\ncrop = 32\n[run]\nsteps = 120\n";
        let fit3 = timed(100.0, &[(16, 16, 10.0), (32, 16, 5.0), (64, 16, 2.0)]);
        let mut c = cfg(three);
        // 60 s in: 40 * 0.97 = 38.8 s for 50 / 5 + 20 / 2 = 20 s: x 1.94.
        let r = refit(&mut c, 64, &fit3, 50, 60.0).unwrap().unwrap();
        assert!((r.factor - 1.94).abs() < 1e-9, "{r:?}");
        assert_eq!((c.data.stages[0].steps, c.data.stages[1].steps, c.run.steps), (50, 97, 50 + 97 + 39));
        assert_eq!(segments(&c, 64), vec![(16, 16, 50), (32, 16, 97), (64, 16, 39)]);
        let mut c = cfg(three);
        assert!(refit(&mut c, 64, &timed(100.0, &[(16, 16, 10.0), (32, 16, 5.0)]), 50, 60.0).unwrap().is_none());
        assert!(refit(&mut c, 64, &fit3, 120, 60.0).unwrap().is_none());
        assert_eq!(c.run.steps, 120, "unchanged where there was no refit");
    }

    #[test]
    fn the_timing_runs_the_steps_asked_and_more_for_a_minimum_time() {
        let c = cfg("[data]\ncrop = 16\nbatch_size = 1\n[run]\nsteps = 10\nprecision = \"f32\"\n[recipe]\nreplay_capacity = 4\n");
        let model = taesd::Variant::Taesd.config();
        let (sec, n) = time_step(&c, model, &Device::Cpu, None, 16, 1, 1, 0.0).unwrap();
        assert_eq!(n, 1);
        assert!(sec > 0.0, "{sec}");
        // ~4 steps' time asked: more steps (at most 20x the asked count), the span about that long.
        let want = 4.0 * sec;
        let (sec2, n2) = time_step(&c, model, &Device::Cpu, None, 16, 1, 1, want).unwrap();
        assert!(n2 > 1 && n2 <= 1 + 20, "{n2} steps for {want} s at {sec} s/step");
        assert!(sec2 * n2 as f64 >= 0.5 * want, "{n2} steps of {sec2} s for {want} s");
    }

    #[test]
    fn every_rank_times_rank_0s_count_of_steps() {
        // Rank 0 asks for no more than the one timed step, rank 1 for far more (20 more steps,
        // the cap): both time rank 0's count (a rank that went on alone would wait in the step's
        // gradient all-reduce until its timeout).
        let n = crate::dist::tcp::testing::ranks(2, |c, _| {
            let c: Arc<dyn Comm> = Arc::new(c);
            let cfg = cfg("[data]\ncrop = 16\nbatch_size = 1\n[run]\nsteps = 10\nprecision = \"f32\"\n[recipe]\nreplay_capacity = 4\n");
            let min_seconds = if c.rank() == 0 { 0.0 } else { 1e9 };
            time_step(&cfg, taesd::Variant::Taesd.config(), &Device::Cpu, Some(&c), 16, 1, 1, min_seconds).unwrap().1
        });
        assert_eq!(n, vec![1, 1]);
    }

    #[test]
    fn fit_times_each_crop_once_and_scales_to_the_budget() {
        let mut c = cfg("[data]\ncrop = 32\nbatch_size = 1\n[[data.stages]]\nsteps = 40\ncrop = 16\n\
                         [run]\nsteps = 60\nprecision = \"f32\"\n[recipe]\nreplay_capacity = 4\n");
        let model = taesd::Variant::Taesd.config();
        let f = fit(&mut c, model, 32, &Device::Cpu, None, 10.0, 2).unwrap();
        assert_eq!(f.segments.len(), 2, "{f:?}");
        assert_eq!((f.segments[0].crop, f.segments[1].crop), (16, 32));
        assert_eq!((f.run_steps_before, f.run_steps_after), (60, c.run.steps));
        assert_eq!(f.segments[0].steps_after, c.data.stages[0].steps);
        assert_eq!(f.segments[1].steps_after, c.run.steps - c.data.stages[0].steps);
        // The factor makes the steps take the budget less the margin at the measured rates, and
        // every count is the old one times it.
        let t: f64 = f.segments.iter().map(|s| s.steps_before as f64 / s.steps_per_s).sum();
        assert!((f.factor * t - 10.0 * (1.0 - MARGIN)).abs() < 1e-9, "{f:?}");
        for s in &f.segments {
            assert_eq!(s.steps_after, scale_count(s.steps_before, f.factor), "{f:?}");
            assert!(s.timed_steps >= 2, "{f:?}");
            assert!((s.images_per_s - s.steps_per_s).abs() < 1e-12, "batch 1: {f:?}");
        }
        assert!(fit(&mut c, model, 32, &Device::Cpu, None, 0.0, 2).is_err());
    }
}
