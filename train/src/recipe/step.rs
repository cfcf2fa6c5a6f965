//! [`Recipe::step`]: one optimisation step, phase by phase (see the [`super::engine`] docs for
//! what each does): [`encoder_phase`], the decoder's forward, [`disc_phase`] and
//! [`correction_phase`] (the GAN, when there is a discriminator), [`decoder_phase`] (the loss
//! terms of [`super::terms`], gradients, proposal), the [`guard`] (one readback, the NaN check)
//! and [`Recipe::commit`]. Nothing is written before the guard has passed.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::config::{EncoderLoss, RecipeConfig};
use super::disc::{BnStats, Discriminator};
use super::dist::{agree, mean_grads, mean_stats};
use super::engine::{Batch, Gan, Recipe, StepReport, Trained};
use super::losses;
use super::optim::{clip_scale, Proposal};
use super::precision::{to_f32, Precision};
use super::profile::{mark, Profile};
use super::replay::ReplayPlan;
use super::terms::{decoder_terms, TermInput};

/// What a step reads back, in one transfer.
#[derive(Default)]
struct Readback {
    /// (kind, name, tensor of any shape); all values must be finite.
    entries: Vec<(Kind, String, Tensor)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A reported loss (0-dim).
    Loss,
    /// A squared gradient norm (0-dim), reported as its root.
    NormSq,
    /// Only checked.
    Check,
    /// Per-sample mean discriminator scores (checked; gives `disc_acc`).
    DiscScores,
}

impl Readback {
    fn push(&mut self, kind: Kind, name: &str, t: Tensor) {
        self.entries.push((kind, name.to_string(), t));
    }

    /// Every entry's values, in order.
    fn fetch(&self) -> Result<Vec<Vec<f64>>> {
        if self.entries.is_empty() {
            return Ok(Vec::new());
        }
        let flat: Vec<Tensor> = self
            .entries
            .iter()
            .map(|(_, _, t)| t.to_dtype(DType::F32).and_then(|t| t.flatten_all()))
            .collect::<candle_core::Result<_>>()?;
        let all = Tensor::cat(&flat, 0)?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
        let mut out = Vec::with_capacity(flat.len());
        let mut k = 0;
        for t in &flat {
            let n = t.elem_count();
            out.push(all[k..k + n].iter().map(|v| *v as f64).collect());
            k += n;
        }
        Ok(out)
    }
}

/// What every phase of one step reads.
struct StepCtx<'a> {
    cfg: &'a RecipeConfig,
    /// `[B, 3, H, W]` f32 in [0, 1] and `[B, C, h, w]` f32, on the device.
    images: &'a Tensor,
    latents: &'a Tensor,
    /// 0-based.
    step: u64,
    /// Encoder/decoder learning rate of this step.
    lr: f64,
    /// The pixel warm-up: no corrections, the decoder learns from the pixel MSE.
    pixel_phase: bool,
    precision: Precision,
    /// The other ranks of a data-parallel run.
    comm: Option<&'a dyn crate::dist::Comm>,
}

/// The discriminator's proposed update, written only by [`Recipe::commit`].
struct DiscProposal {
    update: Proposal,
    stats: BnStats,
    replay: ReplayPlan,
    /// The fakes that go into the replay buffer.
    fakes: Tensor,
}

/// Everything a step proposes.
#[derive(Default)]
struct Proposals {
    encoder: Option<Proposal>,
    disc: Option<DiscProposal>,
    decoder: Option<Proposal>,
}

/// Global-norm clipping scale and the proposed update of an optimiser's flat gradients
/// (averaged over the ranks first, in a data-parallel run). `name`: the report's key of the
/// gradient norm; `what`: the part, for the error.
fn propose(
    ctx: &StepCtx,
    opt: &super::optim::Adam,
    g: super::optim::FlatGrads,
    (lr, clip): (f64, Option<f64>),
    (name, what): (&str, &str),
    rb: &mut Readback,
) -> Result<Proposal> {
    if !g.any() {
        bail!("the {what} got no gradients");
    }
    let g = &mean_grads(ctx.comm, g)?;
    let nsq = g.norm_sq()?;
    let scale = clip.map(|c| clip_scale(&nsq, c)).transpose()?;
    let p = opt.propose_flat(g, lr, scale.as_ref())?;
    rb.push(Kind::NormSq, name, nsq);
    Ok(p)
}

/// Phase 1, the encoder: its distillation loss against the teacher latents, gradients, proposal.
fn encoder_phase(ctx: &StepCtx, model: &taesd::Encoder, tr: &Trained, rb: &mut Readback) -> Result<Proposal> {
    // The ops hand the weights' gradients to `wg`, off candle's graph
    // (taesd_ops::WeightGrads; active during the forward, where the ops capture it).
    let wg = taesd_ops::WeightGrads::new();
    let active = wg.activate();
    let mut pred = to_f32(&model.forward_in(ctx.images, ctx.precision.dtype())?)?;
    drop(active);
    let mut target = ctx.latents.clone();
    let m = ctx.cfg.encoder_margin;
    if m > 0 {
        let (h, w) = (target.dim(2)?, target.dim(3)?);
        if 2 * m >= h.min(w) {
            bail!("recipe.encoder_margin {m} leaves nothing of a {h}x{w} latent crop");
        }
        let inner = |t: &Tensor| t.narrow(2, m, h - 2 * m)?.narrow(3, m, w - 2 * m);
        pred = inner(&pred)?;
        target = inner(&target)?;
    }
    let loss = match ctx.cfg.encoder_loss {
        EncoderLoss::Mse => losses::mse(&pred, &target)?,
        EncoderLoss::L1 => losses::l1(&pred, &target)?,
    };
    let grads = loss.backward()?;
    let g = tr.opt.flat_gradients_with(&grads, Some(&wg))?;
    drop(grads);
    let lr = ctx.lr * ctx.cfg.encoder_lr_scale;
    let p = propose(ctx, &tr.opt, g, (lr, ctx.cfg.grad_clip), ("encoder", "encoder"), rb)?;
    rb.push(Kind::Loss, "encoder", loss.detach());
    Ok(p)
}

/// Phase 2a, the discriminator: the fakes (virtually) join the replay buffer, the disc batch is
/// `B - floor(B * replay_fraction)` current fakes then replayed ones, each position shows its
/// fake or the real image by a coin flip (the latent travels with its image); training-mode
/// forward, `MSE(scores, +1 fake / -1 real)`, proposed AdamW update and BatchNorm statistics.
/// Returns the proposal and the coins (for `disc_acc`).
fn disc_phase(
    ctx: &StepCtx,
    gan: &Gan,
    rng: &mut ChaCha8Rng,
    fake_d: &Tensor,
    rb: &mut Readback,
) -> Result<(DiscProposal, Vec<f32>)> {
    let (images, latents, pc) = (ctx.images, ctx.latents, ctx.precision);
    let b = images.dim(0)?;
    let n_replay =
        if gan.replay.capacity() > 0 { ((b as f64 * ctx.cfg.replay_fraction).floor() as usize).min(b) } else { 0 };
    let n_fresh = b - n_replay;
    let plan = gan.replay.plan(fake_d, latents, n_replay, rng)?;
    let (fake_in, ctx_in) = match gan.replay.gather(&plan, fake_d, latents)? {
        None => (fake_d.clone(), latents.clone()),
        Some((ri, rl)) if n_fresh == 0 => (ri, rl),
        Some((ri, rl)) => (
            Tensor::cat(&[&fake_d.narrow(0, 0, n_fresh)?, &ri], 0)?,
            Tensor::cat(&[&latents.narrow(0, 0, n_fresh)?, &rl], 0)?,
        ),
    };
    let coins: Vec<f32> = (0..b).map(|_| if rng.random_bool(0.5) { 1.0 } else { 0.0 }).collect();
    let mask = Tensor::from_vec(coins.clone(), (b, 1, 1, 1), images.device())?;
    let not_mask = mask.affine(-1.0, 1.0)?;
    // Exact selection (x * 1 + y * 0), as the reference.
    let x = (mask.broadcast_mul(&fake_in)? + not_mask.broadcast_mul(images)?)?;
    let cond = (mask.broadcast_mul(&ctx_in)? + not_mask.broadcast_mul(latents)?)?;
    let disc_wg = taesd_ops::WeightGrads::new();
    let disc_active = disc_wg.activate();
    let (scores, new_stats) =
        Discriminator::forward_with(&gan.cfg, &gan.params(), &gan.stats, &pc.compute(&x)?, &pc.compute(&cond)?, true)?;
    drop(disc_active);
    // Batch statistics per rank; the running statistics the same everywhere (their mean).
    let new_stats = mean_stats(ctx.comm, new_stats.context("training-mode forward gave no statistics")?)?;
    let targets = mask.affine(2.0, -1.0)?.broadcast_as(scores.shape())?.contiguous()?;
    let disc_loss = losses::mse(&scores, &targets)?;
    let grads = disc_loss.backward()?;
    let g = gan.opt.flat_gradients_with(&grads, Some(&disc_wg))?;
    drop(grads);
    let update = propose(ctx, &gan.opt, g, (ctx.cfg.disc_lr, ctx.cfg.disc_grad_clip), ("disc", "discriminator"), rb)?;
    // What the report needs of the discriminator's step, detached: its graph (the training
    // forward's activations, ~1.3 GB at 256x256 batch 32) goes now, not after the correction's
    // forward and backward. (Shadowing would not drop the graph: the values are dropped by name.)
    let disc_loss_value = disc_loss.detach();
    let disc_scores = scores.detach().mean_keepdim((1, 2, 3))?;
    drop((disc_loss, scores, targets, x, cond, fake_in, ctx_in, mask, not_mask));
    rb.push(Kind::Loss, "disc", disc_loss_value);
    let stat_sum = Tensor::stack(
        &new_stats.mean.iter().chain(&new_stats.var).map(|t| t.sum_all()).collect::<candle_core::Result<Vec<_>>>()?,
        0,
    )?
    .sum_all()?;
    rb.push(Kind::Check, "disc BatchNorm statistics", stat_sum);
    rb.push(Kind::DiscScores, "disc scores", disc_scores);
    let p = DiscProposal { update, stats: new_stats, replay: plan, fakes: fake_d.clone() };
    Ok((p, coins))
}

/// Phase 2b, the correction, with the *updated* discriminator in inference mode: the gradient of
/// `sum_i MSE(D(real_i), D(fake_i + c_i))` at `c = 0`, negated and divided by its std. Returns
/// the decoder's GAN target `fake + correction` (detached).
fn correction_phase(
    ctx: &StepCtx,
    gan: &Gan,
    disc: &DiscProposal,
    fake_d: &Tensor,
    rb: &mut Readback,
) -> Result<Tensor> {
    let pc = ctx.precision;
    let cg = losses::correction_grad(
        &gan.cfg,
        &disc.update.params,
        &disc.stats,
        &pc.compute(ctx.images)?,
        &pc.compute(fake_d)?,
        &pc.compute(ctx.latents)?,
    )?;
    let (corr, raw_std) = losses::normalize_correction(&cg)?;
    rb.push(Kind::Loss, "correction_std", raw_std);
    Ok((fake_d + corr)?)
}

/// Phase 2c, the decoder: the weighted sum of its loss terms, gradients and proposal (none during
/// the discriminator's warm-up).
fn decoder_phase(
    ctx: &StepCtx,
    tr: &Trained,
    input: &TermInput,
    wg: &taesd_ops::WeightGrads,
    rb: &mut Readback,
    weights: &mut BTreeMap<String, f64>,
) -> Result<Option<Proposal>> {
    let terms = decoder_terms(input, ctx.pixel_phase)?;
    let mut total: Option<Tensor> = None;
    for (name, w, t) in &terms {
        weights.insert(name.to_string(), *w);
        let wt = t.affine(*w, 0.0)?;
        total = Some(match total {
            None => wt,
            Some(acc) => (acc + wt)?,
        });
        rb.push(Kind::Loss, name, t.detach());
    }
    let total = total.context("no decoder loss term is on")?;
    rb.push(Kind::Loss, "decoder", total.detach());
    rb.push(Kind::Loss, "decoder_mse", losses::mse(&input.fake.detach(), input.real)?);
    if !ctx.cfg.decoder_updates(ctx.step) {
        return Ok(None);
    }
    let grads = total.backward()?;
    let g = tr.opt.flat_gradients_with(&grads, Some(wg))?;
    drop(grads);
    Ok(Some(propose(ctx, &tr.opt, g, (ctx.lr, ctx.cfg.grad_clip), ("decoder", "decoder"), rb)?))
}

/// Phase 3, the guard: every loss, gradient norm and the new BatchNorm statistics read back in one
/// transfer; the report, with `skipped` set when any is NaN/inf.
fn guard(rb: &Readback, coins: &[f32], mut report: StepReport) -> Result<StepReport> {
    let vals = rb.fetch()?;
    let mut bad = Vec::new();
    for ((kind, name, _), v) in rb.entries.iter().zip(&vals) {
        if let Some(x) = v.iter().find(|x| !x.is_finite()) {
            let what = match kind {
                Kind::Loss => "loss",
                Kind::NormSq => "gradient norm^2",
                Kind::Check | Kind::DiscScores => "",
            };
            bad.push(format!("{name} {what} = {x}").replace("  ", " "));
        }
        match kind {
            Kind::Loss => {
                report.losses.insert(name.clone(), v[0]);
            }
            Kind::NormSq => {
                report.grad_norms.insert(name.clone(), v[0].sqrt());
            }
            Kind::Check => {}
            Kind::DiscScores => {
                let hits = v.iter().zip(coins).filter(|(s, c)| (**s > 0.0) == (**c > 0.5)).count();
                report.losses.insert("disc_acc".into(), hits as f64 / coins.len().max(1) as f64);
            }
        }
    }
    if !bad.is_empty() {
        report.skipped = Some(format!("non-finite values: {}", bad.join(", ")));
    }
    Ok(report)
}

impl Recipe {
    fn check_batch(&self, batch: &Batch) -> Result<(Tensor, Tensor)> {
        let images = batch.images.to_device(&self.device)?.to_dtype(DType::F32)?;
        let latents = batch.latents.to_device(&self.device)?.to_dtype(DType::F32)?;
        let (b, c, h, w) = images.dims4().context("batch images must be [B, 3, H, W]")?;
        let (lb, lc, lh, lw) = latents.dims4().context("batch latents must be [B, C, h, w]")?;
        let s = self.model_cfg.spatial_scale();
        let m = s.max(8);
        if b == 0 || c != 3 || lb != b || lc != self.model_cfg.latent_channels || lh * s != h || lw * s != w {
            bail!(
                "batch: images {:?} and latents {:?} do not fit {} (expect [B, 3, H, W] and [B, {}, H/{s}, W/{s}])",
                images.dims(),
                latents.dims(),
                self.model_cfg.describe(),
                self.model_cfg.latent_channels
            );
        }
        if h % m != 0 || w % m != 0 {
            bail!("batch: image size {h}x{w} must be a multiple of {m}");
        }
        Ok((images, latents))
    }

    /// One full step (encoder, discriminator, decoder as configured). Increments the step
    /// counter, also when the NaN guard skips the step. A step that fails before its commit
    /// (an out-of-memory error, say) leaves the state as it was before it, random draws included,
    /// so that a checkpoint taken then resumes exactly.
    pub fn step(&mut self, batch: &Batch) -> Result<StepReport> {
        let mut prof = self.profile.take();
        if let Some(p) = prof.as_mut() {
            p.start(&self.device)?;
            p.steps += 1;
        }
        let (step_before, rng_before) = (self.step, self.rng.clone());
        let r = self.step_inner(batch, &mut prof);
        if r.is_err() && self.step == step_before {
            self.rng = rng_before;
        }
        self.profile = prof;
        r
    }

    fn step_inner(&mut self, batch: &Batch, prof: &mut Option<Profile>) -> Result<StepReport> {
        let t_start = std::time::Instant::now();
        let (images, latents) = self.check_batch(batch)?;
        if let Some(r) = self.rank_rng() {
            self.rng = r;
        }
        let ctx = StepCtx {
            cfg: &self.cfg,
            images: &images,
            latents: &latents,
            step: self.step,
            lr: self.cfg.lr_at(self.step, self.schedule_end),
            pixel_phase: self.cfg.pixel_phase(self.step),
            precision: self.precision,
            comm: self.comm.as_deref(),
        };
        let rng_before = self.rng.clone();
        let mut rb = Readback::default();
        let mut props = Proposals::default();
        let mut coins = Vec::new();
        let mut loss_weights = BTreeMap::new();
        // The models' layers as taped runs: one graph node each (taesd_ops::taped).
        let _taping = taesd_ops::enable_taping();

        // 1. Encoder.
        if let Some((enc, tr)) = self.encoder.as_ref().and_then(|e| Some((e, e.trained.as_ref()?))) {
            props.encoder = Some(encoder_phase(&ctx, &enc.model, tr, &mut rb)?);
        }
        mark(prof, &self.device, "encoder fwd+bwd")?;

        // 2. Decoder (+ discriminator and correction).
        if let Some((dec, tr)) = self.decoder.as_ref().and_then(|d| Some((d, d.trained.as_ref()?))) {
            let wg = taesd_ops::WeightGrads::new();
            let active = wg.activate();
            let fake = to_f32(&dec.model.forward_in(&latents, ctx.precision.dtype())?)?;
            drop(active);
            mark(prof, &self.device, "decoder fwd")?;
            let fake_d = fake.detach();
            let mut target = None;
            if let Some(gan) = &self.gan {
                let (disc, c) = disc_phase(&ctx, gan, &mut self.rng, &fake_d, &mut rb)?;
                coins = c;
                mark(prof, &self.device, "disc fwd+bwd (replay, BatchNorm)")?;
                // No corrections in the pixel warm-up: the decoder learns from the pixel MSE
                // while the discriminator keeps up with it.
                if !ctx.pixel_phase {
                    target = Some(correction_phase(&ctx, gan, &disc, &fake_d, &mut rb)?);
                }
                props.disc = Some(disc);
            }
            mark(prof, &self.device, "correction (2 disc fwd + input grad)")?;
            let initial = match &self.initial_decoder {
                Some(m) if !ctx.pixel_phase => Some(to_f32(&m.forward_in(&latents, ctx.precision.dtype())?)?.detach()),
                _ => None,
            };
            // The latent cycle: the encoder's weights of this step, detached (no gradient to
            // them); the gradient flows through it to `fake`.
            let cycle = if self.cfg.cycle_weight > 0.0 && !ctx.pixel_phase {
                let enc = self.detached_encoder()?.context("the latent cycle term has no encoder")?;
                let z = to_f32(&enc.forward_in(&fake, ctx.precision.dtype())?)?;
                mark(prof, &self.device, "cycle encoder fwd")?;
                Some(z)
            } else {
                None
            };
            let input = TermInput {
                cfg: &self.cfg,
                step: self.step,
                end: self.schedule_end,
                fake: &fake,
                real: &images,
                latents: &latents,
                target: target.as_ref(),
                freq: self.freq.as_ref(),
                initial: initial.as_ref(),
                cycle: cycle.as_ref(),
            };
            props.decoder = decoder_phase(&ctx, tr, &input, &wg, &mut rb, &mut loss_weights)?;
        }
        mark(prof, &self.device, "decoder losses + bwd")?;

        // 3. Guard: one transfer.
        let report = StepReport {
            step: ctx.step + 1,
            lr: ctx.lr,
            loss_weights,
            issue_seconds: t_start.elapsed().as_secs_f64(),
            ..Default::default()
        };
        let report = agree(ctx.comm, guard(&rb, &coins, report)?)?;
        self.step += 1;
        if let Some(reason) = &report.skipped {
            self.rng = rng_before;
            self.skipped += 1;
            tracing::warn!(step = report.step, "skipped step: {reason}");
            return Ok(report);
        }
        mark(prof, &self.device, "readback (NaN guard)")?;

        // 4. Commit.
        self.commit(props, &latents)?;
        mark(prof, &self.device, "commit (Adam, EMA, replay)")?;
        Ok(report)
    }

    /// Phase 4: write what the step proposed: weights and moments, the replay buffer's new fakes,
    /// BatchNorm statistics, the EMAs.
    fn commit(&mut self, props: Proposals, latents: &Tensor) -> Result<()> {
        if let (Some(p), Some(enc)) = (props.encoder, self.encoder.as_mut()) {
            let tr = enc.trained.as_mut().expect("a proposal implies training");
            tr.opt.commit(p)?;
            tr.update_emas()?;
        }
        if let (Some(d), Some(gan)) = (props.disc, self.gan.as_mut()) {
            gan.opt.commit(d.update)?;
            gan.stats = d.stats;
            gan.replay.commit(&d.replay, &d.fakes, latents)?;
        }
        if let (Some(p), Some(dec)) = (props.decoder, self.decoder.as_mut()) {
            let tr = dec.trained.as_mut().expect("a proposal implies training");
            tr.opt.commit(p)?;
            tr.update_emas()?;
        }
        Ok(())
    }
}
