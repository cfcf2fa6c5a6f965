//! [`Recipe`]: the models, optimisers, EMA, discriminator, replay buffer and RNG of a run.
//! Built in [`super::init`], stepped in [`super::step`], saved and loaded in [`super::persist`].
//!
//! One [`Recipe::step`]:
//!
//! 1. **Encoder** (`train_encoder`): `MSE(encoder(images), latents)` (or L1) -> gradients ->
//!    proposed Adam update.
//! 2. **Decoder** (`train_decoder`): `fake = decoder(latents)`.
//!    * **Discriminator** (`gan_weight > 0`): the fakes are (virtually) added to the replay
//!      buffer; the disc batch is `B - floor(B * replay_fraction)` current fakes followed by
//!      replayed ones, each position then showing its fake or the real image by a coin flip
//!      (the latent travels with its image); training-mode forward, `MSE(scores, +1 fake /
//!      -1 real)`, proposed AdamW update and BatchNorm statistics.
//!    * **Correction**, with the *updated* discriminator in inference mode: the gradient of
//!      `sum_i MSE(D(real_i), D(fake_i + c_i))` at `c = 0`, negated and divided by its std;
//!      `target = fake + correction` (detached).
//!    * Loss: the weighted terms of [`super::terms::TERMS`], `gan_weight * MSE(fake, target) +
//!      lowres_mse_weight * MSE(pool8(fake), pool8(real)) (+ fullres MSE, optionally fading out
//!      over the run, + frequency-amplitude L1, + the detail term against the initial decoder, +
//!      the latent cycle MSE(encoder(fake), latents) through the encoder's frozen weights)`
//!      -> gradients -> proposed Adam update (skipped during `disc_warmup_steps`). In the pixel
//!      warm-up (`pixel_warmup_steps`) the loss is `MSE(fake, real)` alone and no correction is
//!      computed; the discriminator still trains.
//!
//!    Encoder and decoder learning rate: `RecipeConfig::lr_at` (warm-up, then the schedule
//!    towards the run's last step, [`Recipe::set_schedule_end`]).
//! 3. **Guard**: every loss, every gradient norm and the new BatchNorm statistics are read back
//!    in one transfer. If any is NaN/inf, nothing is written (weights, moments, EMA, disc,
//!    BatchNorm statistics, replay buffer, RNG all stay as they were) and the report says why.
//! 4. **Commit**: the proposals are written, the replay buffer takes the fakes, the EMAs are
//!    updated.
//!
//! The step counter counts every step, skipped ones included (a data loader position); the
//! optimisers' bias-correction counters count applied updates only.
//!
//! Randomness: one seeded `ChaCha8Rng` (stream 0 of `seed`) draws the replay slots, replay
//! samples and coin flips, in that order each step; fresh weights come from stream 1 of the same
//! seed (PyTorch's default init: uniform in ±1/sqrt(fan_in) for convs and their biases,
//! GroupNorm/BatchNorm weight 1 and bias 0). Nothing uses candle's unseeded RNG.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use taesd::{Decoder, Encoder, Layout, TaesdConfig, Variant};

use super::config::RecipeConfig;
use super::disc::{BnStats, DiscConfig};
use super::ema::Ema;
use super::losses::FreqBasis;
use super::optim::Adam;
use super::persist::copy_vars;
use super::precision::Precision;
use super::profile::Profile;
use super::replay::ReplayBuffer;

/// One training batch, on the training device.
pub struct Batch {
    /// `[B, 3, H, W]` f32 in [0, 1]; H and W multiples of 8 (of 32 for taesana).
    pub images: Tensor,
    /// `[B, C, H/s, W/s]` f32 teacher latents, already scaled (the mean, or a posterior sample
    /// drawn by the loader).
    pub latents: Tensor,
}

/// Where the encoder and decoder start: checkpoint files or folders for `taesd::load_varmap`
/// (any layout; only the named part is taken from each). `None`: from scratch if that part is
/// trained, absent otherwise.
#[derive(Clone, Debug, Default)]
pub struct ModelInit {
    pub encoder: Option<PathBuf>,
    pub decoder: Option<PathBuf>,
}

/// What one step did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StepReport {
    /// The step number after this step (1 for the first).
    pub step: u64,
    /// `encoder`, `decoder` (weighted total), `gan`, `lowres_mse`, `fullres_mse`, `freq`, `detail`,
    /// `disc`, `disc_acc` (fraction of disc-batch samples whose mean score has the target's
    /// sign), `correction_std` (std of the raw correction gradient), `decoder_mse` (full-res
    /// MSE to the real image, a metric): those that apply.
    pub losses: BTreeMap<String, f64>,
    /// Global gradient norms before clipping: `encoder`, `decoder`, `disc`.
    pub grad_norms: BTreeMap<String, f64>,
    /// Encoder/decoder learning rate of this step.
    pub lr: f64,
    /// The weight of each decoder loss term summed this step (by the names of `losses`; the pixel
    /// warm-up's `fullres_mse` at 1, a fading full-resolution MSE at its weight of the step).
    pub loss_weights: BTreeMap<String, f64>,
    /// Why the NaN guard skipped this step (nothing was written).
    pub skipped: Option<String>,
    /// Host seconds from the step's start to its readback: launching the forward and backward
    /// passes (the GPU runs them meanwhile; where this is most of a step, the host is the limit).
    pub issue_seconds: f64,
}

/// A trainable or frozen encoder/decoder.
pub(super) struct PartState_<M> {
    /// All variables of the part, sorted by name.
    pub(super) vars: Vec<(String, Var)>,
    /// Built on the variables (shares their storage).
    pub(super) model: M,
    pub(super) trained: Option<Trained>,
    /// Keeps the variables alive and named.
    pub(super) _vm: VarMap,
}

/// The models on one EMA probe's weights ([`Recipe::ema_probes`]).
pub struct EmaProbe {
    /// `ema<decay>`.
    pub name: String,
    pub encoder: Option<Encoder>,
    pub decoder: Option<Decoder>,
}

pub(super) struct Trained {
    pub(super) opt: Adam,
    pub(super) ema: Ema,
    /// `RecipeConfig::ema_probe_decays`' EMAs, in that order.
    pub(super) probes: Vec<Ema>,
}

impl Trained {
    /// Fold the optimiser's committed values into the EMA and every probe (one flat buffer:
    /// three kernels each).
    pub(super) fn update_emas(&mut self) -> Result<()> {
        let w = self.opt.flat_params()?;
        self.ema.update_flat(&w)?;
        for p in &mut self.probes {
            p.update_flat(&w)?;
        }
        Ok(())
    }
}

pub(super) struct Gan {
    pub(super) cfg: DiscConfig,
    /// In `cfg.param_names()` order.
    pub(super) vars: Vec<(String, Var)>,
    pub(super) stats: BnStats,
    pub(super) opt: Adam,
    pub(super) replay: ReplayBuffer,
    pub(super) _vm: VarMap,
}

impl Gan {
    pub(super) fn params(&self) -> Vec<Tensor> {
        self.vars.iter().map(|(_, v)| v.as_tensor().clone()).collect()
    }
}

/// The complete training state and step.
pub struct Recipe {
    pub(super) cfg: RecipeConfig,
    pub(super) model_cfg: TaesdConfig,
    pub(super) device: Device,
    pub(super) seed: u64,
    pub(super) encoder: Option<PartState_<Encoder>>,
    pub(super) decoder: Option<PartState_<Decoder>>,
    pub(super) gan: Option<Gan>,
    pub(super) freq: Option<FreqBasis>,
    /// The decoder the run started from, frozen, where the detail term is on.
    pub(super) initial_decoder: Option<Decoder>,
    pub(super) rng: ChaCha8Rng,
    pub(super) step: u64,
    pub(super) skipped: u64,
    pub(super) precision: Precision,
    pub(super) profile: Option<Profile>,
    /// The run's last step (`run.steps`), where a decaying learning-rate schedule ends.
    pub(super) schedule_end: Option<u64>,
    /// Whether [`Recipe::save_state`] writes the replay buffer (exact resume) or leaves it out.
    pub(super) save_replay: bool,
    /// Data-parallel training: the other ranks ([`Recipe::set_comm`]); `None` alone.
    pub(super) comm: Option<std::sync::Arc<dyn crate::dist::Comm>>,
    /// This process's rank (0 alone).
    pub(super) rank: usize,
}

impl Recipe {
    /// The run's last step, where a decaying learning-rate schedule (`recipe.lr_schedule`)
    /// ends; `None` (the default): no decay.
    pub fn set_schedule_end(&mut self, steps: Option<u64>) {
        self.schedule_end = steps;
    }

    /// Whether [`Recipe::save_state`] writes the replay buffer (the default: a resumed run then
    /// continues exactly). Without it a checkpoint is small (no GiBs of past fakes) and a
    /// resumed run's discriminator starts from an empty buffer, which refills from the fresh
    /// fakes of each step (at batch 32, 16384 entries in 512 steps).
    pub fn set_save_replay(&mut self, on: bool) {
        self.save_replay = on;
    }

    /// Time the phases of the following steps (see [`Profile`]); `false` stops and drops it.
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on.then(Profile::default);
    }

    pub fn profile(&self) -> Option<&Profile> {
        self.profile.as_ref()
    }

    /// Compute the steps in `p` from now on (f32 by default). Also sets taesd-ops' process-wide
    /// convolution math to match. Not part of the saved state: a run may resume in another
    /// precision.
    pub fn set_precision(&mut self, p: Precision) {
        p.apply_to_ops();
        self.precision = p;
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Steps taken (skipped ones included).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Steps the NaN guard skipped.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped
    }

    pub fn config(&self) -> &RecipeConfig {
        &self.cfg
    }

    pub fn model_config(&self) -> &TaesdConfig {
        &self.model_cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Entries in the replay buffer and the bytes they take.
    pub fn replay_usage(&self) -> (usize, u64) {
        self.gan.as_ref().map(|g| (g.replay.len(), g.replay.bytes())).unwrap_or((0, 0))
    }

    /// Trainable parameters of the discriminator (0 without one).
    pub fn disc_param_count(&self) -> usize {
        self.gan.as_ref().map(|g| g.cfg.param_count()).unwrap_or(0)
    }

    fn model_from(&self, tensors: HashMap<String, Tensor>) -> VarBuilder<'static> {
        VarBuilder::from_tensors(tensors, DType::F32, &self.device)
    }

    /// One average of a part's weights (`pick`: the EMA or a probe), or its loaded weights
    /// when the part is not trained.
    fn averaged(p: &PartState_<impl Sized>, pick: impl Fn(&Trained) -> &Ema) -> Result<HashMap<String, Tensor>> {
        match &p.trained {
            Some(tr) => Ok(pick(tr).tensor_map()),
            None => copy_vars(&p.vars),
        }
    }

    fn ema_or_raw(p: &PartState_<impl Sized>) -> Result<HashMap<String, Tensor>> {
        Self::averaged(p, |tr| &tr.ema)
    }

    /// The encoder on an average of its weights (see [`Recipe::averaged`]), a snapshot.
    fn encoder_on(&self, pick: impl Fn(&Trained) -> &Ema) -> Result<Option<Encoder>> {
        let Some(p) = &self.encoder else {
            return Ok(None);
        };
        let vb = self.model_from(Self::averaged(p, pick)?);
        Ok(Some(Encoder::new(&self.model_cfg, vb.pp("encoder"))?))
    }

    /// The decoder on an average of its weights (see [`Recipe::averaged`]), a snapshot.
    fn decoder_on(&self, pick: impl Fn(&Trained) -> &Ema) -> Result<Option<Decoder>> {
        let Some(p) = &self.decoder else {
            return Ok(None);
        };
        let vb = self.model_from(Self::averaged(p, pick)?);
        Ok(Some(Decoder::new(&self.model_cfg, vb.pp("decoder"))?))
    }

    /// The encoder on the EMA weights (the loaded weights when it is not trained); `None` when
    /// the run has no encoder. A snapshot: later steps do not change it.
    pub fn ema_encoder(&self) -> Result<Option<Encoder>> {
        self.encoder_on(|tr| &tr.ema)
    }

    /// The decoder on the EMA weights (see [`Recipe::ema_encoder`]).
    pub fn ema_decoder(&self) -> Result<Option<Decoder>> {
        self.decoder_on(|tr| &tr.ema)
    }

    /// The models on each EMA probe's weights (`RecipeConfig::ema_probe_decays`), named
    /// `ema<decay>`; a part that is not trained is on its loaded weights in every probe.
    pub fn ema_probes(&self) -> Result<Vec<EmaProbe>> {
        let mut out = Vec::new();
        for (i, d) in self.cfg.ema_probe_decays.iter().enumerate() {
            out.push(EmaProbe {
                name: super::ema::probe_name(*d),
                encoder: self.encoder_on(|tr| &tr.probes[i])?,
                decoder: self.decoder_on(|tr| &tr.probes[i])?,
            });
        }
        Ok(out)
    }

    /// The encoder on its current weights, detached: it shares their storage (no copy) and gives
    /// them no gradient, so a pass through it carries gradients to its input alone (the latent
    /// cycle term's encoder, built each step).
    pub(super) fn detached_encoder(&self) -> Result<Option<Encoder>> {
        let Some(p) = &self.encoder else {
            return Ok(None);
        };
        let t = p.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect();
        Ok(Some(Encoder::new(&self.model_cfg, self.model_from(t).pp("encoder"))?))
    }

    /// The encoder on the raw (non-EMA) weights, a snapshot copy.
    pub fn encoder(&self) -> Result<Option<Encoder>> {
        let Some(p) = &self.encoder else {
            return Ok(None);
        };
        let vb = self.model_from(copy_vars(&p.vars)?);
        Ok(Some(Encoder::new(&self.model_cfg, vb.pp("encoder"))?))
    }

    /// The decoder on the raw (non-EMA) weights, a snapshot copy.
    pub fn decoder(&self) -> Result<Option<Decoder>> {
        let Some(p) = &self.decoder else {
            return Ok(None);
        };
        let vb = self.model_from(copy_vars(&p.vars)?);
        Ok(Some(Decoder::new(&self.model_cfg, vb.pp("decoder"))?))
    }

    /// The EMA weights (loaded weights for an untrained part) of every part present, named
    /// `encoder.*` / `decoder.*`.
    pub fn ema_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut t = HashMap::new();
        if let Some(p) = &self.encoder {
            t.extend(Self::ema_or_raw(p)?);
        }
        if let Some(p) = &self.decoder {
            t.extend(Self::ema_or_raw(p)?);
        }
        Ok(t)
    }

    /// Export the EMA weights (see [`Recipe::ema_tensors`]) with `taesd::save_tensors` in
    /// `layout` to `dest`; returns the files written.
    pub fn export(&self, layout: Layout, dest: &Path, variant: Option<Variant>) -> Result<Vec<PathBuf>> {
        let t = self.ema_tensors()?;
        let opts = taesd::SaveOptions { variant, ..Default::default() };
        Ok(taesd::save_tensors(&t, &self.model_cfg, layout, dest, &opts)?)
    }
}
