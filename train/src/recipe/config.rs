//! Every hyperparameter of the training step, with the recipe's values as defaults.
//!
//! Deserialised from the `[recipe]` part of a run's config (TOML/JSON): unknown keys are errors,
//! missing keys take the defaults below.
//!
//! Why the defaults:
//!
//! * Encoder/decoder: Adam with AMSGrad, lr 3e-4, betas (0.9, 0.9) — the seed recipe. The short
//!   second-moment memory (0.9) follows the noisy, non-stationary GAN targets quickly; AMSGrad's
//!   running max keeps that from producing oversized steps when the gradient scale drops.
//! * Discriminator: `torch.optim.AdamW(lr=3e-4, betas=(0.9, 0.99))` as seraena creates it, which
//!   includes AdamW's default weight decay of 0.01.
//! * `gan_weight` 1: the decoder target is `fake + correction` with the correction scaled to unit
//!   std (once the discriminator is confident; while the raw gradient's std is below seraena's
//!   1e-5 floor the correction is proportionally smaller — see `correction_std` in the reports).
//! * `lowres_mse_weight` 1: per pixel, the low-resolution term's gradient is the 8x8 block-mean
//!   colour error `e` (in [0, 1] units) where the GAN term's is the correction (~1). At a typical
//!   converged colour error of 0.01-0.02 it is 1-2% of the GAN gradient — faint, it does not
//!   blur — but a colour drift of 0.1-0.2 pulls back with 10-20%, and early on (weak
//!   discriminator, small corrections) it is what teaches a fresh decoder its colours. It is
//!   blind to everything inside a block, so it cannot fight the GAN term on texture.
//! * `fullres_mse_weight`, `freq_weight`, `detail_weight`, `cycle_weight` 0: off in the recipe
//!   (full-resolution MSE blurs; the detail term is for fine-tuning a released decoder; the latent
//!   cycle term costs an encoder pass more per step).
//! * EMA decay 0.999 (an average over the last ~1000 steps) with warm-up, for previews/export.
//! * Replay buffer: seraena's 16384 entries, half of each discriminator batch replayed, stored as
//!   f16 (6 GiB at 256x256, see [`super::replay`]).

use serde::{Deserialize, Serialize};

/// The encoder's distillation loss against the teacher latents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EncoderLoss {
    /// Mean squared error (the recipe).
    #[default]
    Mse,
    /// Mean absolute error.
    L1,
}

/// The optimiser of the encoder and decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// `torch.optim.Adam(amsgrad=True)`; `weight_decay` is L2 (added to the gradient).
    #[default]
    AdamAmsgrad,
    /// `torch.optim.Adam`; `weight_decay` is L2.
    Adam,
    /// `torch.optim.AdamW` (no amsgrad); `weight_decay` is decoupled (`p *= 1 - lr * wd`).
    Adamw,
}

impl OptimizerKind {
    pub fn amsgrad(self) -> bool {
        matches!(self, OptimizerKind::AdamAmsgrad)
    }
    pub fn decoupled_weight_decay(self) -> bool {
        matches!(self, OptimizerKind::Adamw)
    }
}

/// How the encoder/decoder learning rate moves after its warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// `lr` throughout (the seed recipe).
    #[default]
    Constant,
    /// Half a cosine from `lr` down to `lr * lr_min_factor` over the last `lr_decay_steps`
    /// steps of the run.
    Cosine,
    /// A straight line from `lr` down to `lr * lr_min_factor` over the last `lr_decay_steps`
    /// steps of the run.
    Linear,
}

/// Storage dtype of the replay buffer's images and latents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReplayDtype {
    /// IEEE half: 11 significant bits, exact to ~2.4e-4 on [0.5, 1] (finer than 8-bit pixels),
    /// range ±65504. 2 bytes per value.
    #[default]
    F16,
    /// bfloat16: 8 significant bits, 2 bytes per value.
    Bf16,
    /// f32: exact, 4 bytes per value.
    F32,
}

impl ReplayDtype {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            ReplayDtype::F16 => candle_core::DType::F16,
            ReplayDtype::Bf16 => candle_core::DType::BF16,
            ReplayDtype::F32 => candle_core::DType::F32,
        }
    }
    pub fn bytes(self) -> usize {
        match self {
            ReplayDtype::F16 | ReplayDtype::Bf16 => 2,
            ReplayDtype::F32 => 4,
        }
    }
}

/// Every hyperparameter of the recipe. `Default` is the recipe (madebyollin's seed recipe,
/// "seraena" conditional-GAN corrections for the decoder).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecipeConfig {
    /// Train the encoder (distillation to the teacher latents).
    pub train_encoder: bool,
    /// Train the decoder (GAN corrections + low-resolution MSE).
    pub train_decoder: bool,
    /// Encoder loss: `mse` (recipe) or `l1`.
    pub encoder_loss: EncoderLoss,
    /// Latent pixels left out of the encoder loss at each edge of the crop (0: none). The teacher
    /// encoded the whole stored image, so near the edge of a smaller training crop its latent
    /// depends on pixels the encoder does not see (released taef2 encoder, 64 px crops of 128 px
    /// pool images: MSE 0.09-0.13 where full crops give 2e-8; margins 1/2/3 leave 0.07/0.06/0.05:
    /// the encoder's receptive field is wide). Best: crop = the shards' resolution.
    pub encoder_margin: usize,

    /// Encoder/decoder optimiser: `adam_amsgrad` (recipe), `adam`, `adamw`.
    pub optimizer: OptimizerKind,
    /// Encoder/decoder learning rate (3e-4).
    pub lr: f64,
    /// The encoder's learning rate as a multiple of the decoder's (the schedule's `lr` at each
    /// step; 1: the same). The encoder learns from its own MSE to the teacher latents alone, so
    /// its rate changes nothing of the decoder's training (tested) unless the latent cycle term
    /// (`cycle_weight`) reads the decoder's output through it: tune it by the encoder error.
    pub encoder_lr_scale: f64,
    /// Encoder/decoder Adam betas ((0.9, 0.9): the recipe's short second-moment memory).
    pub betas: (f64, f64),
    /// Adam epsilon (1e-8, PyTorch's).
    pub eps: f64,
    /// Encoder/decoder weight decay (0): L2 for `adam*`, decoupled for `adamw`.
    pub weight_decay: f64,
    /// Linear learning-rate warm-up of the encoder/decoder over this many steps (0: none).
    pub lr_warmup_steps: u64,
    /// The encoder/decoder learning rate after the warm-up: `constant` (the recipe), `cosine`
    /// or `linear` decay to `lr * lr_min_factor` at the run's last step (`run.steps`). A
    /// decaying schedule anneals the weights at the end of a run of known length: the last
    /// steps average out the noise of the GAN corrections instead of adding to it.
    pub lr_schedule: LrSchedule,
    /// Steps over which the learning rate decays, ending at the run's last step (0: every step
    /// after the warm-up). A decay over the last part only keeps the peak rate longer
    /// ("warm-up, stable, decay").
    pub lr_decay_steps: u64,
    /// The learning rate at the run's last step, as a fraction of `lr` (0).
    pub lr_min_factor: f64,
    /// Clip the global gradient norm of the encoder and of the decoder (each on its own) to this
    /// (`torch.nn.utils.clip_grad_norm_`); `None`: no clipping (the recipe).
    pub grad_clip: Option<f64>,

    /// Decay of the EMA copy of the weights used for previews, evaluation and export.
    pub ema_decay: f64,
    /// Ramp the EMA decay up as `min(ema_decay, (1 + n) / (10 + n))` (n = EMA updates so far), so
    /// the EMA of a model trained from scratch does not remember its random start for thousands of
    /// steps. Fine-tuning is unaffected apart from the first few hundred steps.
    pub ema_warmup: bool,
    /// More EMAs of the weights at these decays (at most 4), beside the main one: each is
    /// evaluated with the others (`ema<decay>` in a run's evaluations, e.g. `ema0.9995`) and
    /// checkpointed, never exported or previewed. An EMA-decay A/B within one run, for a few
    /// more kernels per step. `[]`: none (the default).
    pub ema_probe_decays: Vec<f64>,

    /// Weight of the GAN term `MSE(decoded, decoded + correction)`; 0 disables the
    /// discriminator (and its replay buffer) entirely.
    pub gan_weight: f64,
    /// Weight of the faint low-resolution term `MSE(avg_pool(decoded), avg_pool(real))`.
    pub lowres_mse_weight: f64,
    /// Pooling factor of the low-resolution term (8: one value per latent pixel of an 8x model).
    pub lowres_factor: usize,
    /// Weight of a full-resolution `MSE(decoded, real)` (0: off; it blurs).
    pub fullres_mse_weight: f64,
    /// Fade-out of the full-resolution MSE, as a fraction of the run (`run.steps`): 0 keeps its
    /// weight for the whole run; `f` in (0, 1] lowers it linearly from `fullres_mse_weight` at the
    /// first step after the pixel warm-up to 0 at step `f * run.steps` (the pixel loss while the
    /// decoder is far off, the GAN term alone for the detail at the end). A fraction, so a run
    /// scaled to another length keeps its shape. Needs another decoder term to take over.
    pub fullres_mse_fade: f64,
    /// Weight of the frequency-amplitude term (0: off): L1 between the DFT amplitudes of
    /// non-overlapping `freq_patch` x `freq_patch` patches of decoded and real.
    pub freq_weight: f64,
    /// Patch size of the frequency-amplitude term (8).
    pub freq_patch: usize,
    /// Weight of the detail term (0: off): `MSE(highpass(decoded), highpass(initial))`, where
    /// `highpass(x) = x - upsample(avg_pool(x, lowres_factor))` and `initial` is the output of the
    /// decoder the run started from (`model.init_decoder`, kept frozen) on the same latents. For
    /// fine-tuning: the low-resolution term moves the colours, this keeps the released decoder's
    /// edges and texture (without it every fine-tune measured lost sharpness within 250 steps).
    pub detail_weight: f64,
    /// Weight of the latent cycle term (0: off): `MSE(encoder(decoded), latents)`, the decoded
    /// image encoded again by the run's encoder (its weights of the step, frozen for this term: the
    /// gradient reaches the decoder only), against the latents it was decoded from. The
    /// evaluation's `cycle_mae` as a loss: the decoder is held to images that encode back to their
    /// latents, a content (perceptual) term whose features are the encoder's, not the pixels' (it
    /// does not average the detail the way a pixel MSE does). Needs an encoder, trained or loaded
    /// (`model.init_encoder`); an encoder forward and backward more per step.
    pub cycle_weight: f64,

    /// Discriminator learning rate (3e-4).
    pub disc_lr: f64,
    /// Discriminator AdamW betas ((0.9, 0.99)).
    pub disc_betas: (f64, f64),
    /// Discriminator AdamW epsilon (1e-8).
    pub disc_eps: f64,
    /// Discriminator decoupled weight decay (0.01: `torch.optim.AdamW`'s default, which the
    /// recipe leaves in place).
    pub disc_weight_decay: f64,
    /// Clip the discriminator's global gradient norm (`None`: no clipping, the recipe).
    pub disc_grad_clip: Option<f64>,
    /// For this many steps (after the pixel warm-up, if any) the discriminator trains but the
    /// decoder is not updated (its corrections are meaningless while the discriminator is
    /// fresh). 0: the recipe; a few hundred protect a pretrained (or pixel-warmed) decoder from
    /// a fresh discriminator.
    pub disc_warmup_steps: u64,
    /// Pixel warm start of a decoder trained from scratch: for this many first steps the
    /// decoder learns from the full-resolution `MSE(decoded, real)` alone (no corrections, no
    /// low-resolution term), while the discriminator trains as usual on its fakes. An MSE decoder
    /// gets its colours and coarse structure in a few hundred steps, which the GAN corrections
    /// (unit-std nudges) teach slowly. The discriminator must train throughout: a fresh one
    /// started against an already good (blurry) decoder stayed at chance for 1,400 steps in an
    /// A/B (disc loss 1.0, corrections ~0, sharpness ratio 0.08; bench/results
    /// 2026-12-05-h100-quality-ab-128.md), where one that grows up with the decoder from its
    /// random start separates real from fake within 50 steps. 0: the recipe (GAN from the start).
    pub pixel_warmup_steps: u64,

    /// Replay buffer of past fakes (with their latents) for the discriminator: capacity in
    /// samples (16384); entries are replaced at random once full. 0 disables it.
    pub replay_capacity: usize,
    /// Fraction of the discriminator's fakes drawn from the replay buffer (0.5); the rest are
    /// the current step's fakes. `floor(batch * fraction)` samples are replayed.
    pub replay_fraction: f64,
    /// Storage dtype of replay entries (`f16`).
    pub replay_dtype: ReplayDtype,
}

impl Default for RecipeConfig {
    fn default() -> Self {
        Self {
            train_encoder: true,
            train_decoder: true,
            encoder_loss: EncoderLoss::Mse,
            encoder_margin: 0,
            optimizer: OptimizerKind::AdamAmsgrad,
            lr: 3e-4,
            encoder_lr_scale: 1.0,
            betas: (0.9, 0.9),
            eps: 1e-8,
            weight_decay: 0.0,
            lr_warmup_steps: 0,
            lr_schedule: LrSchedule::Constant,
            lr_decay_steps: 0,
            lr_min_factor: 0.0,
            grad_clip: None,
            ema_decay: 0.999,
            ema_warmup: true,
            ema_probe_decays: Vec::new(),
            gan_weight: 1.0,
            lowres_mse_weight: 1.0,
            lowres_factor: 8,
            fullres_mse_weight: 0.0,
            fullres_mse_fade: 0.0,
            freq_weight: 0.0,
            freq_patch: 8,
            detail_weight: 0.0,
            cycle_weight: 0.0,
            disc_lr: 3e-4,
            disc_betas: (0.9, 0.99),
            disc_eps: 1e-8,
            disc_weight_decay: 0.01,
            disc_grad_clip: None,
            disc_warmup_steps: 0,
            pixel_warmup_steps: 0,
            replay_capacity: 16384,
            replay_fraction: 0.5,
            replay_dtype: ReplayDtype::F16,
        }
    }
}

impl RecipeConfig {
    /// Whether the discriminator (and replay buffer) exist in this run.
    pub fn uses_disc(&self) -> bool {
        self.train_decoder && self.gan_weight > 0.0
    }

    /// Reject values the step cannot work with, naming the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::bail;
        if !self.train_encoder && !self.train_decoder {
            bail!("recipe: neither train_encoder nor train_decoder is set: nothing to train");
        }
        let pos = |name: &str, v: f64| -> anyhow::Result<()> {
            if !(v.is_finite() && v > 0.0) {
                bail!("recipe: {name} must be a positive number, got {v}");
            }
            Ok(())
        };
        let nonneg = |name: &str, v: f64| -> anyhow::Result<()> {
            if !(v.is_finite() && v >= 0.0) {
                bail!("recipe: {name} must be a finite number >= 0, got {v}");
            }
            Ok(())
        };
        let beta = |name: &str, (b1, b2): (f64, f64)| -> anyhow::Result<()> {
            for (i, b) in [b1, b2].into_iter().enumerate() {
                if !(0.0..1.0).contains(&b) {
                    bail!("recipe: {name}.{i} must be in [0, 1), got {b}");
                }
            }
            Ok(())
        };
        pos("lr", self.lr)?;
        pos("eps", self.eps)?;
        beta("betas", self.betas)?;
        nonneg("weight_decay", self.weight_decay)?;
        if !(0.0..=1.0).contains(&self.lr_min_factor) {
            bail!("recipe: lr_min_factor must be in [0, 1], got {}", self.lr_min_factor);
        }
        if let Some(c) = self.grad_clip {
            pos("grad_clip", c)?;
        }
        pos("encoder_lr_scale", self.encoder_lr_scale)?;
        if !(0.0..1.0).contains(&self.ema_decay) {
            bail!("recipe: ema_decay must be in [0, 1), got {}", self.ema_decay);
        }
        if self.ema_probe_decays.len() > 4 {
            bail!("recipe: ema_probe_decays has {} decays, at most 4 are kept", self.ema_probe_decays.len());
        }
        for (i, d) in self.ema_probe_decays.iter().enumerate() {
            if !(0.0..1.0).contains(d) || self.ema_probe_decays[..i].contains(d) {
                bail!("recipe: ema_probe_decays must be distinct decays in [0, 1), got {:?}", self.ema_probe_decays);
            }
        }
        nonneg("gan_weight", self.gan_weight)?;
        nonneg("lowres_mse_weight", self.lowres_mse_weight)?;
        nonneg("fullres_mse_weight", self.fullres_mse_weight)?;
        if !(0.0..=1.0).contains(&self.fullres_mse_fade) {
            bail!("recipe: fullres_mse_fade must be a fraction of the run in [0, 1], got {}", self.fullres_mse_fade);
        }
        // The decoder's terms other than the full-resolution MSE are all off.
        let others_off = self.gan_weight == 0.0
            && self.lowres_mse_weight == 0.0
            && self.freq_weight == 0.0
            && self.detail_weight == 0.0
            && self.cycle_weight == 0.0;
        if self.fullres_mse_fade > 0.0 && self.train_decoder && others_off {
            bail!("recipe: fullres_mse_fade fades out the full-resolution MSE, but no other decoder loss weight is set to take over");
        }
        nonneg("freq_weight", self.freq_weight)?;
        nonneg("detail_weight", self.detail_weight)?;
        nonneg("cycle_weight", self.cycle_weight)?;
        if self.lowres_factor == 0 {
            bail!("recipe: lowres_factor must be >= 1");
        }
        if self.freq_patch < 2 {
            bail!("recipe: freq_patch must be >= 2, got {}", self.freq_patch);
        }
        pos("disc_lr", self.disc_lr)?;
        pos("disc_eps", self.disc_eps)?;
        beta("disc_betas", self.disc_betas)?;
        nonneg("disc_weight_decay", self.disc_weight_decay)?;
        if let Some(c) = self.disc_grad_clip {
            pos("disc_grad_clip", c)?;
        }
        if !(0.0..=1.0).contains(&self.replay_fraction) {
            bail!("recipe: replay_fraction must be in [0, 1], got {}", self.replay_fraction);
        }
        if self.train_decoder && others_off && self.fullres_mse_weight == 0.0 {
            bail!("recipe: train_decoder is set but every decoder loss weight is 0");
        }
        Ok(())
    }

    /// Encoder/decoder learning rate at (0-based) step `step` of a run whose last step is
    /// `end` (`run.steps`; `None`: unknown, then a decaying schedule stays at `lr`).
    pub fn lr_at(&self, step: u64, end: Option<u64>) -> f64 {
        if self.lr_warmup_steps > 0 && step < self.lr_warmup_steps {
            return self.lr * (step + 1) as f64 / self.lr_warmup_steps as f64;
        }
        let Some(end) = end else { return self.lr };
        let shape: fn(f64) -> f64 = match self.lr_schedule {
            LrSchedule::Constant => return self.lr,
            // Fraction of the decay done (0..=1) -> remaining fraction of the way to the floor.
            LrSchedule::Cosine => |t| 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
            LrSchedule::Linear => |t| 1.0 - t,
        };
        let after_warmup = end.saturating_sub(self.lr_warmup_steps);
        let span = match self.lr_decay_steps {
            0 => after_warmup,
            n => n.min(after_warmup),
        };
        let start = end - span;
        if span == 0 || step < start {
            return self.lr;
        }
        // Step `end - 1` (the last one) gets the floor exactly.
        let t = ((step - start + 1) as f64 / span as f64).min(1.0);
        self.lr * (self.lr_min_factor + (1.0 - self.lr_min_factor) * shape(t))
    }

    /// Weight of the full-resolution MSE at (0-based) `step` of a run whose last step is `end`
    /// (`None`: unknown, then no fade): see [`Self::fullres_mse_fade`].
    pub fn fullres_mse_weight_at(&self, step: u64, end: Option<u64>) -> f64 {
        let w = self.fullres_mse_weight;
        let Some(end) = end.filter(|_| self.fullres_mse_fade > 0.0) else { return w };
        let start = self.pixel_warmup_steps as f64;
        let stop = (self.fullres_mse_fade * end as f64).max(start + 1.0);
        w * ((stop - step as f64) / (stop - start)).clamp(0.0, 1.0)
    }

    /// Whether the decoder learns from the pixel MSE alone (no corrections) at (0-based) `step`.
    pub fn pixel_phase(&self, step: u64) -> bool {
        step < self.pixel_warmup_steps
    }

    /// Whether the decoder is updated at (0-based) `step`: in the pixel warm-up, and after the
    /// discriminator's warm-up that follows it (none without a discriminator).
    pub fn decoder_updates(&self, step: u64) -> bool {
        self.pixel_phase(step) || !self.uses_disc() || step >= self.pixel_warmup_steps + self.disc_warmup_steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_recipe_and_round_trip() {
        let c = RecipeConfig::default();
        c.validate().unwrap();
        assert_eq!(c.lr, 3e-4);
        assert_eq!(c.betas, (0.9, 0.9));
        assert_eq!(c.disc_betas, (0.9, 0.99));
        assert_eq!(c.replay_capacity, 16384);
        assert!(c.optimizer.amsgrad());
        let json = serde_json::to_string(&c).unwrap();
        let back: RecipeConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
        // Partial TOML: missing keys default, enum names are snake_case.
        let t: RecipeConfig =
            toml::from_str("optimizer = \"adamw\"\nbetas = [0.9, 0.999]\ngrad_clip = 1.0\nencoder_loss = \"l1\"\n")
                .unwrap();
        assert_eq!(t.optimizer, OptimizerKind::Adamw);
        assert_eq!(t.betas, (0.9, 0.999));
        assert_eq!(t.grad_clip, Some(1.0));
        assert_eq!(t.encoder_loss, EncoderLoss::L1);
        assert_eq!(t.lr, 3e-4);
        assert!(toml::from_str::<RecipeConfig>("learning_rate = 1.0").is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = RecipeConfig { replay_fraction: 1.5, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("replay_fraction"));
        c.replay_fraction = 0.5;
        c.betas = (0.9, 1.0);
        assert!(c.validate().unwrap_err().to_string().contains("betas"));
        c.betas = (0.9, 0.9);
        c.train_encoder = false;
        c.train_decoder = false;
        assert!(c.validate().is_err());
        // A fade is a fraction of the run, and something must take over from the faded term.
        let f = RecipeConfig { fullres_mse_weight: 1.0, fullres_mse_fade: 1.5, ..Default::default() };
        assert!(f.validate().unwrap_err().to_string().contains("fullres_mse_fade"));
        let alone = RecipeConfig { fullres_mse_fade: 0.5, gan_weight: 0.0, lowres_mse_weight: 0.0, ..f.clone() };
        assert!(alone.validate().unwrap_err().to_string().contains("no other decoder loss"));
        assert!(RecipeConfig { fullres_mse_fade: 0.5, ..f }.validate().is_ok());
        let e = RecipeConfig { encoder_lr_scale: 0.0, ..Default::default() };
        assert!(e.validate().unwrap_err().to_string().contains("encoder_lr_scale"));
    }

    #[test]
    fn lr_warmup_is_linear() {
        let c = RecipeConfig { lr_warmup_steps: 4, ..Default::default() };
        assert_eq!(c.lr_at(0, None), 3e-4 * 0.25);
        assert_eq!(c.lr_at(3, None), 3e-4);
        assert_eq!(c.lr_at(100, Some(200)), 3e-4);
    }

    #[test]
    fn decaying_schedules_end_at_the_floor_of_the_last_step() {
        let mut c = RecipeConfig {
            lr: 1e-3,
            lr_warmup_steps: 10,
            lr_schedule: LrSchedule::Cosine,
            lr_min_factor: 0.1,
            ..Default::default()
        };
        // Warm-up first, then from the peak down to lr * 0.1 at step 109 (the 110th and last).
        assert!((c.lr_at(0, Some(110)) - 1e-4).abs() < 1e-15);
        assert!(c.lr_at(10, Some(110)) < 1e-3 && c.lr_at(10, Some(110)) > 0.99e-3);
        assert!((c.lr_at(59, Some(110)) - 0.55e-3).abs() < 1e-12, "{}", c.lr_at(59, Some(110)));
        assert!((c.lr_at(109, Some(110)) - 1e-4).abs() < 1e-15);
        let lrs: Vec<f64> = (10..110).map(|s| c.lr_at(s, Some(110))).collect();
        assert!(lrs.windows(2).all(|w| w[1] < w[0]), "monotone decay");
        // Unknown end: no decay.
        assert_eq!(c.lr_at(100, None), 1e-3);
        // Linear over the last 20 steps only: the peak until then.
        c.lr_schedule = LrSchedule::Linear;
        c.lr_decay_steps = 20;
        c.lr_min_factor = 0.0;
        assert_eq!(c.lr_at(89, Some(110)), 1e-3);
        assert!((c.lr_at(90, Some(110)) - 1e-3 * 19.0 / 20.0).abs() < 1e-15);
        assert!((c.lr_at(99, Some(110)) - 0.5e-3).abs() < 1e-15);
        assert_eq!(c.lr_at(109, Some(110)), 0.0);
        // Past the end (a run extended on resume without a new end) stays at the floor.
        assert_eq!(c.lr_at(500, Some(110)), 0.0);
        // Constant ignores the end.
        c.lr_schedule = LrSchedule::Constant;
        assert_eq!(c.lr_at(109, Some(110)), 1e-3);
    }

    #[test]
    fn pixel_then_disc_warmup_then_gan() {
        let c = RecipeConfig { pixel_warmup_steps: 3, disc_warmup_steps: 2, ..Default::default() };
        let phases: Vec<(bool, bool)> = (0..7).map(|s| (c.pixel_phase(s), c.decoder_updates(s))).collect();
        assert_eq!(
            phases,
            [(true, true), (true, true), (true, true), (false, false), (false, false), (false, true), (false, true)]
        );
        let plain = RecipeConfig::default();
        assert!(!plain.pixel_phase(0) && plain.decoder_updates(0));
        // Without a discriminator there is nothing to warm up: the decoder learns from step 0.
        let no_disc = RecipeConfig { gan_weight: 0.0, disc_warmup_steps: 500, ..Default::default() };
        assert!(no_disc.decoder_updates(0));
    }
}
