//! [`Recipe`]: the models, optimisers, EMA, discriminator, replay buffer and RNG of a run, and
//! the training step over them.
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
//!    * Loss `gan_weight * MSE(fake, target) + lowres_mse_weight * MSE(pool8(fake), pool8(real))
//!      (+ fullres MSE, + frequency-amplitude L1)` -> gradients -> proposed Adam update
//!      (skipped during `disc_warmup_steps`). In the pixel warm-up (`pixel_warmup_steps`) the
//!      loss is `MSE(fake, real)` alone and no correction is computed; the discriminator still
//!      trains.
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

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use taesd::{Decoder, Encoder, Layout, Part, TaesdConfig, Variant};

use super::config::{EncoderLoss, RecipeConfig};
use super::disc::{BnStats, DiscConfig, Discriminator};
use super::ema::Ema;
use super::losses::{self, FreqBasis};
use super::optim::{clip_scale, Adam, AdamConfig, Proposal};
use super::precision::{to_f32, Precision};
use super::replay::{ReplayBuffer, ReplayPlan};
use super::state::{self, DiscState, PartState, RngState, StateFile};

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
    /// `encoder`, `decoder` (weighted total), `gan`, `lowres_mse`, `fullres_mse`, `freq`,
    /// `disc`, `disc_acc` (fraction of disc-batch samples whose mean score has the target's
    /// sign), `correction_std` (std of the raw correction gradient), `decoder_mse` (full-res
    /// MSE to the real image, a metric): those that apply.
    pub losses: BTreeMap<String, f64>,
    /// Global gradient norms before clipping: `encoder`, `decoder`, `disc`.
    pub grad_norms: BTreeMap<String, f64>,
    /// Encoder/decoder learning rate of this step.
    pub lr: f64,
    /// Why the NaN guard skipped this step (nothing was written).
    pub skipped: Option<String>,
    /// Host seconds from the step's start to its readback: launching the forward and backward
    /// passes (the GPU runs them meanwhile; where this is most of a step, the host is the limit).
    pub issue_seconds: f64,
}

/// A trainable or frozen encoder/decoder.
struct PartState_<M> {
    /// All variables of the part, sorted by name.
    vars: Vec<(String, Var)>,
    /// Built on the variables (shares their storage).
    model: M,
    trained: Option<Trained>,
    /// Keeps the variables alive and named.
    _vm: VarMap,
}

struct Trained {
    opt: Adam,
    ema: Ema,
}

struct Gan {
    cfg: DiscConfig,
    /// In `cfg.param_names()` order.
    vars: Vec<(String, Var)>,
    stats: BnStats,
    opt: Adam,
    replay: ReplayBuffer,
    _vm: VarMap,
}

impl Gan {
    fn params(&self) -> Vec<Tensor> {
        self.vars
            .iter()
            .map(|(_, v)| v.as_tensor().clone())
            .collect()
    }
}

/// The complete training state and step.
pub struct Recipe {
    cfg: RecipeConfig,
    model_cfg: TaesdConfig,
    device: Device,
    seed: u64,
    encoder: Option<PartState_<Encoder>>,
    decoder: Option<PartState_<Decoder>>,
    gan: Option<Gan>,
    freq: Option<FreqBasis>,
    rng: ChaCha8Rng,
    step: u64,
    skipped: u64,
    precision: Precision,
    profile: Option<Profile>,
    /// The run's last step (`run.steps`), where a decaying learning-rate schedule ends.
    schedule_end: Option<u64>,
    /// Whether [`Recipe::save_state`] writes the replay buffer (exact resume) or leaves it out.
    save_replay: bool,
}

/// Where a step's time and memory go (`Recipe::set_profiling`): the device is synchronised at
/// each phase boundary, so profiled steps are slower than plain ones; seconds accumulate per
/// phase, and on CUDA each phase's memory high-water mark is kept (the most over the steps).
#[derive(Clone, Debug, Default)]
pub struct Profile {
    pub seconds: BTreeMap<&'static str, f64>,
    /// MiB in use at the phase's peak (the memory pool's high-water mark; CUDA only).
    pub peak_mib: BTreeMap<&'static str, f64>,
    pub steps: u64,
    last: Option<std::time::Instant>,
}

impl Profile {
    fn start(&mut self, dev: &Device) -> Result<()> {
        dev.synchronize()?;
        crate::device::pool_high_water_mib(dev, true);
        self.last = Some(std::time::Instant::now());
        Ok(())
    }

    fn mark(&mut self, dev: &Device, phase: &'static str) -> Result<()> {
        dev.synchronize()?;
        let now = std::time::Instant::now();
        if let Some(t) = self.last.replace(now) {
            *self.seconds.entry(phase).or_default() += (now - t).as_secs_f64();
        }
        if let Some((used, _)) = crate::device::pool_high_water_mib(dev, true) {
            let m = self.peak_mib.entry(phase).or_default();
            *m = m.max(used);
        }
        Ok(())
    }
}

/// `mark` on an optional profile (and a memory trace point: train::device::trace_mem).
fn mark(p: &mut Option<Profile>, dev: &Device, phase: &'static str) -> Result<()> {
    crate::device::trace_mem(dev, format_args!("{phase}"));
    match p {
        Some(p) => p.mark(dev, phase),
        None => Ok(()),
    }
}

fn enc_adam(cfg: &RecipeConfig, lr: f64) -> AdamConfig {
    AdamConfig {
        lr,
        beta1: cfg.betas.0,
        beta2: cfg.betas.1,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
        amsgrad: cfg.optimizer.amsgrad(),
        decoupled_weight_decay: cfg.optimizer.decoupled_weight_decay(),
    }
}

fn disc_adam(cfg: &RecipeConfig) -> AdamConfig {
    AdamConfig {
        lr: cfg.disc_lr,
        beta1: cfg.disc_betas.0,
        beta2: cfg.disc_betas.1,
        eps: cfg.disc_eps,
        weight_decay: cfg.disc_weight_decay,
        amsgrad: false,
        decoupled_weight_decay: true,
    }
}

/// PyTorch's default initialisation, drawn from `rng` in the order of `shapes`: weights of
/// rank 4 (convs) and the biases beside them uniform in ±1/sqrt(fan_in); other `*.weight`
/// (norms) 1, other `*.bias` 0.
fn torch_default_init(
    vm: &VarMap,
    shapes: &[(String, Vec<usize>)],
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Result<()> {
    let rank4: HashMap<&str, &Vec<usize>> = shapes
        .iter()
        .filter(|(_, s)| s.len() == 4)
        .map(|(n, s)| (n.as_str(), s))
        .collect();
    let data = vm.data().lock().expect("VarMap lock");
    for (name, shape) in shapes {
        let var = data
            .get(name)
            .with_context(|| format!("initialising: no variable {name}"))?;
        let n: usize = shape.iter().product();
        let conv_shape = if shape.len() == 4 {
            Some(shape)
        } else {
            name.strip_suffix(".bias")
                .and_then(|p| rank4.get(format!("{p}.weight").as_str()).copied())
        };
        let values: Vec<f32> = match conv_shape {
            Some(w) => {
                let fan_in: usize = w[1..].iter().product();
                let bound = 1.0 / (fan_in as f32).sqrt();
                (0..n)
                    .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * bound)
                    .collect()
            }
            None if name.ends_with(".weight") => vec![1.0; n],
            None => vec![0.0; n],
        };
        let t = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?.to_device(device)?;
        var.set(&t)
            .with_context(|| format!("initialising {name}"))?;
    }
    Ok(())
}

/// The variables of `vm`, sorted by name.
fn sorted_vars(vm: &VarMap) -> Vec<(String, Var)> {
    let data = vm.data().lock().expect("VarMap lock");
    let mut v: Vec<_> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// A part's VarMap: loaded from `init`, or fresh (deterministic init) when `trained`, or none.
fn part_varmap(
    part: Part,
    model_cfg: &TaesdConfig,
    init: Option<&Path>,
    trained: bool,
    device: &Device,
) -> Result<Option<(VarMap, bool)>> {
    let prefix = format!("{}.", part.prefix());
    if let Some(path) = init {
        let (all, info) =
            taesd::load_varmap(path, None, DType::F32, device).with_context(|| {
                format!(
                    "loading the initial {} from {}",
                    part.prefix(),
                    path.display()
                )
            })?;
        if info.config != *model_cfg {
            bail!(
                "{}: the checkpoint is {}, the run trains {}",
                path.display(),
                info.config.describe(),
                model_cfg.describe()
            );
        }
        if info.file(part).is_none() {
            bail!(
                "{}: the checkpoint has no {}",
                path.display(),
                part.prefix()
            );
        }
        let vm = VarMap::new();
        {
            let src = all.data().lock().expect("VarMap lock");
            let mut dst = vm.data().lock().expect("VarMap lock");
            for (n, v) in src.iter().filter(|(n, _)| n.starts_with(&prefix)) {
                dst.insert(n.clone(), v.clone());
            }
        }
        return Ok(Some((vm, false)));
    }
    if !trained {
        return Ok(None);
    }
    Ok(Some((VarMap::new(), true)))
}

fn full_shapes(model_cfg: &TaesdConfig, part: Part) -> Vec<(String, Vec<usize>)> {
    taesd::param_shapes(model_cfg, part)
        .into_iter()
        .map(|(n, s)| (format!("{}.{n}", part.prefix()), s))
        .collect()
}

fn build_trained(cfg: &RecipeConfig, vars: &[(String, Var)]) -> Result<Trained> {
    Ok(Trained {
        opt: Adam::new(vars.to_vec(), enc_adam(cfg, cfg.lr))?,
        ema: Ema::new(vars, cfg.ema_decay, cfg.ema_warmup)?,
    })
}

fn copy_vars(vars: &[(String, Var)]) -> Result<HashMap<String, Tensor>> {
    vars.iter()
        .map(|(n, v)| Ok((n.clone(), v.as_detached_tensor().copy()?)))
        .collect()
}

/// Set every variable from `t` (all must be present with the right shape).
fn set_vars(vars: &[(String, Var)], t: &HashMap<String, Tensor>, what: &str) -> Result<()> {
    for (n, v) in vars {
        let x = t.get(n).with_context(|| format!("{what} lacks {n}"))?;
        if x.dims() != v.dims() {
            bail!(
                "{what}: {n} has shape {:?}, expected {:?}",
                x.dims(),
                v.dims()
            );
        }
        v.set(&x.to_dtype(DType::F32)?.to_device(v.device())?)
            .with_context(|| format!("{what}: setting {n}"))?;
    }
    Ok(())
}

fn check_all_present(
    vars: &[(String, Var)],
    t: &HashMap<String, Tensor>,
    what: &str,
) -> Result<()> {
    for (n, v) in vars {
        match t.get(n) {
            None => bail!("{what} lacks {n}"),
            Some(x) if x.dims() != v.dims() => {
                bail!(
                    "{what}: {n} has shape {:?}, expected {:?}",
                    x.dims(),
                    v.dims()
                )
            }
            _ => {}
        }
    }
    Ok(())
}

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
        let all = Tensor::cat(&flat, 0)?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?;
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

impl Recipe {
    /// Build the models (from `init`, or from scratch with the decoder's output bias at 0.5),
    /// optimisers, EMA, discriminator and replay buffer on `device`; `seed` fixes every random
    /// choice.
    pub fn new(
        cfg: &RecipeConfig,
        model: TaesdConfig,
        init: &ModelInit,
        device: &Device,
        seed: u64,
    ) -> Result<Recipe> {
        cfg.validate()?;
        let mut init_rng = ChaCha8Rng::seed_from_u64(seed);
        init_rng.set_stream(1);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(0);

        let encoder = match part_varmap(
            Part::Encoder,
            &model,
            init.encoder.as_deref(),
            cfg.train_encoder,
            device,
        )? {
            None => None,
            Some((vm, fresh)) => {
                let m = Encoder::new(
                    &model,
                    VarBuilder::from_varmap(&vm, DType::F32, device).pp("encoder"),
                )
                .context("building the encoder")?;
                if fresh {
                    torch_default_init(
                        &vm,
                        &full_shapes(&model, Part::Encoder),
                        &mut init_rng,
                        device,
                    )?;
                }
                let vars = sorted_vars(&vm);
                let trained = if cfg.train_encoder {
                    Some(build_trained(cfg, &vars)?)
                } else {
                    None
                };
                Some(PartState_ {
                    vars,
                    model: m,
                    trained,
                    _vm: vm,
                })
            }
        };
        let decoder = match part_varmap(
            Part::Decoder,
            &model,
            init.decoder.as_deref(),
            cfg.train_decoder,
            device,
        )? {
            None => None,
            Some((vm, fresh)) => {
                let m = Decoder::new(
                    &model,
                    VarBuilder::from_varmap(&vm, DType::F32, device).pp("decoder"),
                )
                .context("building the decoder")?;
                if fresh {
                    torch_default_init(
                        &vm,
                        &full_shapes(&model, Part::Decoder),
                        &mut init_rng,
                        device,
                    )?;
                    taesd::set_decoder_output_bias(&vm, model, 0.5)?;
                }
                let vars = sorted_vars(&vm);
                let trained = if cfg.train_decoder {
                    Some(build_trained(cfg, &vars)?)
                } else {
                    None
                };
                Some(PartState_ {
                    vars,
                    model: m,
                    trained,
                    _vm: vm,
                })
            }
        };

        let gan = if cfg.uses_disc() {
            let dcfg = DiscConfig::seraena(model.latent_channels);
            let vm = VarMap::new();
            let disc = Discriminator::new(&dcfg, VarBuilder::from_varmap(&vm, DType::F32, device))
                .context("building the discriminator")?;
            torch_default_init(&vm, &dcfg.param_shapes(), &mut init_rng, device)?;
            let data = vm.data().lock().expect("VarMap lock").clone();
            let vars: Vec<(String, Var)> = dcfg
                .param_names()
                .into_iter()
                .map(|n| {
                    let v = data.get(&n).cloned().with_context(|| format!("no {n}"))?;
                    Ok((n, v))
                })
                .collect::<Result<_>>()?;
            Some(Gan {
                opt: Adam::new(vars.clone(), disc_adam(cfg))?,
                stats: disc.stats().clone(),
                cfg: dcfg,
                vars,
                replay: ReplayBuffer::new(cfg.replay_capacity, cfg.replay_dtype),
                _vm: vm,
            })
        } else {
            None
        };
        let freq = if cfg.train_decoder && cfg.freq_weight > 0.0 {
            Some(FreqBasis::new(cfg.freq_patch, device)?)
        } else {
            None
        };
        Ok(Recipe {
            cfg: cfg.clone(),
            model_cfg: model,
            device: device.clone(),
            seed,
            encoder,
            decoder,
            gan,
            freq,
            rng,
            step: 0,
            skipped: 0,
            precision: Precision::F32,
            profile: None,
            schedule_end: None,
            save_replay: true,
        })
    }

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
        self.gan
            .as_ref()
            .map(|g| (g.replay.len(), g.replay.bytes()))
            .unwrap_or((0, 0))
    }

    /// Trainable parameters of the discriminator (0 without one).
    pub fn disc_param_count(&self) -> usize {
        self.gan.as_ref().map(|g| g.cfg.param_count()).unwrap_or(0)
    }

    fn check_batch(&self, batch: &Batch) -> Result<(Tensor, Tensor)> {
        let images = batch.images.to_device(&self.device)?.to_dtype(DType::F32)?;
        let latents = batch
            .latents
            .to_device(&self.device)?
            .to_dtype(DType::F32)?;
        let (b, c, h, w) = images
            .dims4()
            .context("batch images must be [B, 3, H, W]")?;
        let (lb, lc, lh, lw) = latents
            .dims4()
            .context("batch latents must be [B, C, h, w]")?;
        let s = self.model_cfg.spatial_scale();
        let m = s.max(8);
        if b == 0
            || c != 3
            || lb != b
            || lc != self.model_cfg.latent_channels
            || lh * s != h
            || lw * s != w
        {
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
    /// counter, also when the NaN guard skips the step.
    pub fn step(&mut self, batch: &Batch) -> Result<StepReport> {
        let mut prof = self.profile.take();
        if let Some(p) = prof.as_mut() {
            p.start(&self.device)?;
            p.steps += 1;
        }
        let r = self.step_inner(batch, &mut prof);
        self.profile = prof;
        r
    }

    fn step_inner(&mut self, batch: &Batch, prof: &mut Option<Profile>) -> Result<StepReport> {
        let t_start = std::time::Instant::now();
        let (images, latents) = self.check_batch(batch)?;
        let step_idx = self.step;
        let lr = self.cfg.lr_at(step_idx, self.schedule_end);
        let pixel_phase = self.cfg.pixel_phase(step_idx);
        let rng_before = self.rng.clone();
        let mut rb = Readback::default();
        let pc = self.precision;
        // The models' layers as taped runs: one graph node each (taesd_ops::taped).
        let _taping = taesd_ops::enable_taping();

        // 1. Encoder.
        let mut enc_prop: Option<Proposal> = None;
        if let Some(enc) = &self.encoder {
            if let Some(tr) = &enc.trained {
                // The ops hand the weights' gradients to `wg`, off candle's graph (taesd_ops::WeightGrads).
                // (Active during the forward, where the ops capture it.)
                let wg = taesd_ops::WeightGrads::new();
                let active = wg.activate();
                let mut pred = to_f32(&enc.model.forward_in(&images, pc.dtype())?)?;
                drop(active);
                let mut target = latents.clone();
                let m = self.cfg.encoder_margin;
                if m > 0 {
                    let (h, w) = (target.dim(2)?, target.dim(3)?);
                    if 2 * m >= h.min(w) {
                        bail!("recipe.encoder_margin {m} leaves nothing of a {h}x{w} latent crop");
                    }
                    let inner = |t: &Tensor| t.narrow(2, m, h - 2 * m)?.narrow(3, m, w - 2 * m);
                    pred = inner(&pred)?;
                    target = inner(&target)?;
                }
                let loss = match self.cfg.encoder_loss {
                    EncoderLoss::Mse => losses::mse(&pred, &target)?,
                    EncoderLoss::L1 => losses::l1(&pred, &target)?,
                };
                let grads = loss.backward()?;
                let g = tr.opt.flat_gradients_with(&grads, Some(&wg))?;
                drop(grads);
                if !g.any() {
                    bail!("the encoder got no gradients");
                }
                let nsq = g.norm_sq()?;
                let scale = self
                    .cfg
                    .grad_clip
                    .map(|c| clip_scale(&nsq, c))
                    .transpose()?;
                enc_prop = Some(tr.opt.propose_flat(&g, lr, scale.as_ref())?);
                rb.push(Kind::Loss, "encoder", loss.detach());
                rb.push(Kind::NormSq, "encoder", nsq);
            }
        }

        mark(prof, &self.device, "encoder fwd+bwd")?;

        // 2. Decoder (+ discriminator).
        let mut dec_prop: Option<Proposal> = None;
        let mut disc_commit: Option<(Proposal, BnStats, ReplayPlan, Tensor)> = None;
        let mut coins: Vec<f32> = Vec::new();
        if let Some(dec) = &self.decoder {
            if let Some(tr) = &dec.trained {
                let dec_wg = taesd_ops::WeightGrads::new();
                let dec_active = dec_wg.activate();
                let fake = to_f32(&dec.model.forward_in(&latents, pc.dtype())?)?;
                drop(dec_active);
                mark(prof, &self.device, "decoder fwd")?;
                let fake_d = fake.detach();
                let mut terms: Vec<(&str, f64, Tensor)> = Vec::new();
                if pixel_phase {
                    // The pixel warm start: the full-resolution MSE alone.
                    terms.push(("fullres_mse", 1.0, losses::mse(&fake, &images)?));
                }
                if let Some(gan) = &self.gan {
                    let b = images.dim(0)?;
                    let n_replay = if gan.replay.capacity() > 0 {
                        ((b as f64 * self.cfg.replay_fraction).floor() as usize).min(b)
                    } else {
                        0
                    };
                    let n_fresh = b - n_replay;
                    let plan = gan
                        .replay
                        .plan(&fake_d, &latents, n_replay, &mut self.rng)?;
                    let (fake_in, ctx_in) = match gan.replay.gather(&plan, &fake_d, &latents)? {
                        None => (fake_d.clone(), latents.clone()),
                        Some((ri, rl)) if n_fresh == 0 => (ri, rl),
                        Some((ri, rl)) => (
                            Tensor::cat(&[&fake_d.narrow(0, 0, n_fresh)?, &ri], 0)?,
                            Tensor::cat(&[&latents.narrow(0, 0, n_fresh)?, &rl], 0)?,
                        ),
                    };
                    coins = (0..b)
                        .map(|_| if self.rng.random_bool(0.5) { 1.0 } else { 0.0 })
                        .collect();
                    let mask = Tensor::from_vec(coins.clone(), (b, 1, 1, 1), &self.device)?;
                    let not_mask = mask.affine(-1.0, 1.0)?;
                    // Exact selection (x * 1 + y * 0), as the reference.
                    let x = (mask.broadcast_mul(&fake_in)? + not_mask.broadcast_mul(&images)?)?;
                    let ctx = (mask.broadcast_mul(&ctx_in)? + not_mask.broadcast_mul(&latents)?)?;
                    let disc_wg = taesd_ops::WeightGrads::new();
                    let disc_active = disc_wg.activate();
                    let (scores, new_stats) = Discriminator::forward_with(
                        &gan.cfg,
                        &gan.params(),
                        &gan.stats,
                        &pc.compute(&x)?,
                        &pc.compute(&ctx)?,
                        true,
                    )?;
                    drop(disc_active);
                    let new_stats =
                        new_stats.context("training-mode forward gave no statistics")?;
                    let targets = mask
                        .affine(2.0, -1.0)?
                        .broadcast_as(scores.shape())?
                        .contiguous()?;
                    let disc_loss = losses::mse(&scores, &targets)?;
                    let grads = disc_loss.backward()?;
                    let g = gan.opt.flat_gradients_with(&grads, Some(&disc_wg))?;
                    drop(grads);
                    if !g.any() {
                        bail!("the discriminator got no gradients");
                    }
                    let nsq = g.norm_sq()?;
                    let scale = self
                        .cfg
                        .disc_grad_clip
                        .map(|c| clip_scale(&nsq, c))
                        .transpose()?;
                    let prop = gan.opt.propose_flat(&g, self.cfg.disc_lr, scale.as_ref())?;
                    // What the report needs of the discriminator's step, detached: its graph (the
                    // training forward's activations, ~1.3 GB at 256x256 batch 32) goes now, not
                    // after the correction's forward and backward.
                    // (Shadowing would not drop the graph: the values are dropped by name.)
                    let disc_loss_value = disc_loss.detach();
                    let disc_scores = scores.detach().mean_keepdim((1, 2, 3))?;
                    drop((disc_loss, scores, targets, x, ctx, fake_in, ctx_in, mask, not_mask));
                    // Correction with the updated discriminator (not in the pixel warm-up,
                    // where the decoder learns from the pixel MSE while the discriminator keeps
                    // up with it).
                    mark(prof, &self.device, "disc fwd+bwd (replay, BatchNorm)")?;
                    if !pixel_phase {
                        let cg = losses::correction_grad(
                            &gan.cfg,
                            &prop.params,
                            &new_stats,
                            &pc.compute(&images)?,
                            &pc.compute(&fake_d)?,
                            &pc.compute(&latents)?,
                        )?;
                        let (corr, raw_std) = losses::normalize_correction(&cg)?;
                        let target = (&fake_d + corr)?;
                        terms.push(("gan", self.cfg.gan_weight, losses::mse(&fake, &target)?));
                        rb.push(Kind::Loss, "correction_std", raw_std);
                    }
                    rb.push(Kind::Loss, "disc", disc_loss_value);
                    rb.push(Kind::NormSq, "disc", nsq);
                    let stat_sum = Tensor::stack(
                        &new_stats
                            .mean
                            .iter()
                            .chain(&new_stats.var)
                            .map(|t| t.sum_all())
                            .collect::<candle_core::Result<Vec<_>>>()?,
                        0,
                    )?
                    .sum_all()?;
                    rb.push(Kind::Check, "disc BatchNorm statistics", stat_sum);
                    rb.push(Kind::DiscScores, "disc scores", disc_scores);
                    disc_commit = Some((prop, new_stats, plan, fake_d.clone()));
                }
                mark(prof, &self.device, "correction (2 disc fwd + input grad)")?;
                if self.cfg.lowres_mse_weight > 0.0 && !pixel_phase {
                    terms.push((
                        "lowres_mse",
                        self.cfg.lowres_mse_weight,
                        losses::lowres_mse(&fake, &images, self.cfg.lowres_factor)?,
                    ));
                }
                if self.cfg.fullres_mse_weight > 0.0 && !pixel_phase {
                    terms.push((
                        "fullres_mse",
                        self.cfg.fullres_mse_weight,
                        losses::mse(&fake, &images)?,
                    ));
                }
                if let Some(fb) = self.freq.as_ref().filter(|_| !pixel_phase) {
                    terms.push((
                        "freq",
                        self.cfg.freq_weight,
                        fb.amplitude_l1(&fake, &images)?,
                    ));
                }
                let mut total: Option<Tensor> = None;
                for (name, w, t) in &terms {
                    let wt = t.affine(*w, 0.0)?;
                    total = Some(match total {
                        None => wt,
                        Some(acc) => (acc + wt)?,
                    });
                    rb.push(Kind::Loss, name, t.detach());
                }
                let total = total.context("no decoder loss term is on")?;
                rb.push(Kind::Loss, "decoder", total.detach());
                rb.push(Kind::Loss, "decoder_mse", losses::mse(&fake_d, &images)?);
                if self.cfg.decoder_updates(step_idx) {
                    let grads = total.backward()?;
                    let g = tr.opt.flat_gradients_with(&grads, Some(&dec_wg))?;
                    drop(grads);
                    if !g.any() {
                        bail!("the decoder got no gradients");
                    }
                    let nsq = g.norm_sq()?;
                    let scale = self
                        .cfg
                        .grad_clip
                        .map(|c| clip_scale(&nsq, c))
                        .transpose()?;
                    dec_prop = Some(tr.opt.propose_flat(&g, lr, scale.as_ref())?);
                    rb.push(Kind::NormSq, "decoder", nsq);
                }
            }
        }

        mark(prof, &self.device, "decoder losses + bwd")?;

        // 3. Guard: one transfer.
        let issue_seconds = t_start.elapsed().as_secs_f64();
        let vals = rb.fetch()?;
        let mut report = StepReport {
            step: step_idx + 1,
            lr,
            issue_seconds,
            ..Default::default()
        };
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
                    let hits = v
                        .iter()
                        .zip(&coins)
                        .filter(|(s, c)| (**s > 0.0) == (**c > 0.5))
                        .count();
                    report
                        .losses
                        .insert("disc_acc".into(), hits as f64 / coins.len().max(1) as f64);
                }
            }
        }
        self.step += 1;
        if !bad.is_empty() {
            self.rng = rng_before;
            self.skipped += 1;
            let reason = format!("non-finite values: {}", bad.join(", "));
            tracing::warn!(step = step_idx + 1, "skipped step: {reason}");
            report.skipped = Some(reason);
            return Ok(report);
        }

        mark(prof, &self.device, "readback (NaN guard)")?;

        // 4. Commit.
        if let (Some(p), Some(enc)) = (enc_prop, self.encoder.as_mut()) {
            let tr = enc.trained.as_mut().expect("a proposal implies training");
            tr.opt.commit(p)?;
            // The committed values as the optimiser's flat buffer: three kernels, not three
            // per tensor.
            tr.ema.update_flat(&tr.opt.flat_params()?)?;
        }
        if let (Some((p, stats, plan, fake_d)), Some(gan)) = (disc_commit, self.gan.as_mut()) {
            gan.opt.commit(p)?;
            gan.stats = stats;
            gan.replay.commit(&plan, &fake_d, &latents)?;
        }
        if let (Some(p), Some(dec)) = (dec_prop, self.decoder.as_mut()) {
            let tr = dec.trained.as_mut().expect("a proposal implies training");
            tr.opt.commit(p)?;
            tr.ema.update_flat(&tr.opt.flat_params()?)?;
        }
        mark(prof, &self.device, "commit (Adam, EMA, replay)")?;
        Ok(report)
    }

    fn model_from(&self, tensors: HashMap<String, Tensor>) -> VarBuilder<'static> {
        VarBuilder::from_tensors(tensors, DType::F32, &self.device)
    }

    fn ema_or_raw(p: &PartState_<impl Sized>) -> Result<HashMap<String, Tensor>> {
        match &p.trained {
            Some(tr) => Ok(tr.ema.tensor_map()),
            None => copy_vars(&p.vars),
        }
    }

    /// The encoder on the EMA weights (the loaded weights when it is not trained); `None` when
    /// the run has no encoder. A snapshot: later steps do not change it.
    pub fn ema_encoder(&self) -> Result<Option<Encoder>> {
        let Some(p) = &self.encoder else {
            return Ok(None);
        };
        let vb = self.model_from(Self::ema_or_raw(p)?);
        Ok(Some(Encoder::new(&self.model_cfg, vb.pp("encoder"))?))
    }

    /// The decoder on the EMA weights (see [`Recipe::ema_encoder`]).
    pub fn ema_decoder(&self) -> Result<Option<Decoder>> {
        let Some(p) = &self.decoder else {
            return Ok(None);
        };
        let vb = self.model_from(Self::ema_or_raw(p)?);
        Ok(Some(Decoder::new(&self.model_cfg, vb.pp("decoder"))?))
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
    pub fn export(
        &self,
        layout: Layout,
        dest: &Path,
        variant: Option<Variant>,
    ) -> Result<Vec<PathBuf>> {
        let t = self.ema_tensors()?;
        let opts = taesd::SaveOptions {
            variant,
            ..Default::default()
        };
        Ok(taesd::save_tensors(
            &t,
            &self.model_cfg,
            layout,
            dest,
            &opts,
        )?)
    }

    /// Write every piece of state into `dir` (which must exist; files are overwritten).
    /// `state.json` is written last.
    pub fn save_state(&self, dir: &Path) -> Result<()> {
        if !dir.is_dir() {
            bail!("save_state: {} is not a folder", dir.display());
        }
        let mut part_states = [None, None];
        for (i, (name, p)) in [
            (
                "encoder",
                self.encoder.as_ref().map(|p| (&p.vars, &p.trained)),
            ),
            (
                "decoder",
                self.decoder.as_ref().map(|p| (&p.vars, &p.trained)),
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let Some((vars, trained)) = p else { continue };
            let raw: HashMap<String, Tensor> = vars
                .iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
                .collect();
            state::write_tensors(dir, &format!("{name}.safetensors"), &raw)?;
            part_states[i] = Some(match trained {
                Some(tr) => {
                    state::write_tensors(
                        dir,
                        &format!("ema_{name}.safetensors"),
                        &tr.ema.tensor_map(),
                    )?;
                    state::write_tensors(
                        dir,
                        &format!("optim_{name}.safetensors"),
                        &tr.opt.state_tensors()?,
                    )?;
                    PartState {
                        trained: true,
                        optimizer_steps: tr.opt.step_count(),
                        ema_updates: tr.ema.updates(),
                    }
                }
                None => PartState {
                    trained: false,
                    optimizer_steps: 0,
                    ema_updates: 0,
                },
            });
        }
        let disc = match &self.gan {
            None => None,
            Some(g) => {
                let mut t: HashMap<String, Tensor> = g
                    .vars
                    .iter()
                    .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
                    .collect();
                t.extend(g.stats.to_map(&g.cfg));
                state::write_tensors(dir, "disc.safetensors", &t)?;
                state::write_tensors(dir, "optim_disc.safetensors", &g.opt.state_tensors()?)?;
                let replay_len = if self.save_replay {
                    g.replay.save(dir)?;
                    g.replay.len()
                } else {
                    0
                };
                Some(DiscState {
                    optimizer_steps: g.opt.step_count(),
                    replay_len,
                })
            }
        };
        let [encoder, decoder] = part_states;
        StateFile {
            format: state::FORMAT.into(),
            version: state::VERSION,
            step: self.step,
            skipped_steps: self.skipped,
            seed: self.seed,
            rng: RngState::of(&self.rng),
            recipe: self.cfg.clone(),
            model: self.model_cfg,
            encoder,
            decoder,
            disc,
        }
        .write(dir)
    }

    /// Load state written by [`Recipe::save_state`] into this recipe, built with the same model
    /// and the same parts trained. Everything is read and checked before anything is changed.
    /// Hyperparameters that differ from the saved run's (learning rates, loss weights, ...)
    /// take this recipe's values, with a warning.
    pub fn load_state(&mut self, dir: &Path) -> Result<()> {
        let st = StateFile::read(dir)?;
        if st.model != self.model_cfg {
            bail!(
                "{}: saved for {}, this run trains {}",
                dir.display(),
                st.model.describe(),
                self.model_cfg.describe()
            );
        }
        let structural = |what: &str, saved: String, now: String| -> Result<()> {
            if saved != now {
                bail!(
                    "{}: saved with {what} = {saved}, this run has {now}",
                    dir.display()
                );
            }
            Ok(())
        };
        structural(
            "train_encoder",
            st.recipe.train_encoder.to_string(),
            self.cfg.train_encoder.to_string(),
        )?;
        structural(
            "train_decoder",
            st.recipe.train_decoder.to_string(),
            self.cfg.train_decoder.to_string(),
        )?;
        structural(
            "amsgrad",
            st.recipe.optimizer.amsgrad().to_string(),
            self.cfg.optimizer.amsgrad().to_string(),
        )?;
        structural(
            "a discriminator",
            st.disc.is_some().to_string(),
            self.gan.is_some().to_string(),
        )?;
        structural(
            "an encoder",
            st.encoder.is_some().to_string(),
            self.encoder.is_some().to_string(),
        )?;
        structural(
            "a decoder",
            st.decoder.is_some().to_string(),
            self.decoder.is_some().to_string(),
        )?;
        if st.recipe != self.cfg {
            let a = serde_json::to_value(&st.recipe)?;
            let b = serde_json::to_value(&self.cfg)?;
            let changed: Vec<String> = a
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, v)| b.get(k.as_str()) != Some(v))
                .map(|(k, v)| format!("{k}: {v} -> {}", b[k.as_str()]))
                .collect();
            tracing::warn!(
                "resuming with changed hyperparameters: {}",
                changed.join(", ")
            );
        }

        // Read and check everything.
        struct TrainedLoad {
            ema: HashMap<String, Tensor>,
            opt: HashMap<String, Tensor>,
            saved: PartState,
        }
        struct PartLoad {
            raw: HashMap<String, Tensor>,
            trained: Option<TrainedLoad>,
        }
        let mut loads: Vec<Option<PartLoad>> = Vec::new();
        for (name, saved, vars, trained) in [
            (
                "encoder",
                &st.encoder,
                self.encoder.as_ref().map(|p| &p.vars),
                self.encoder.as_ref().map(|p| p.trained.is_some()),
            ),
            (
                "decoder",
                &st.decoder,
                self.decoder.as_ref().map(|p| &p.vars),
                self.decoder.as_ref().map(|p| p.trained.is_some()),
            ),
        ] {
            let (Some(saved), Some(vars)) = (saved, vars) else {
                loads.push(None);
                continue;
            };
            let raw = state::read_tensors(dir, &format!("{name}.safetensors"))?;
            check_all_present(vars, &raw, &format!("{name}.safetensors"))?;
            let tr = if trained == Some(true) {
                if !saved.trained {
                    bail!(
                        "{}: the {name} was not trained in the saved run",
                        dir.display()
                    );
                }
                let ema = state::read_tensors(dir, &format!("ema_{name}.safetensors"))?;
                check_all_present(vars, &ema, &format!("ema_{name}.safetensors"))?;
                let opt = state::read_tensors(dir, &format!("optim_{name}.safetensors"))?;
                Some(TrainedLoad {
                    ema,
                    opt,
                    saved: saved.clone(),
                })
            } else {
                None
            };
            loads.push(Some(PartLoad { raw, trained: tr }));
        }
        let disc_load = match (&st.disc, &self.gan) {
            (Some(ds), Some(g)) => {
                let t = state::read_tensors(dir, "disc.safetensors")?;
                check_all_present(&g.vars, &t, "disc.safetensors")?;
                let stats = BnStats::from_map(&g.cfg, &t, &self.device)?;
                let opt = state::read_tensors(dir, "optim_disc.safetensors")?;
                let mut replay = ReplayBuffer::new(self.cfg.replay_capacity, self.cfg.replay_dtype);
                replay.load(dir, ds.replay_len, &self.device)?;
                Some((t, stats, opt, replay, ds.clone()))
            }
            _ => None,
        };
        let rng = st.rng.restore()?;

        // Apply. The optimiser/EMA loads check their tensors before replacing anything; a
        // failure here means a corrupt state folder and leaves this recipe unusable.
        let enc_adam_cfg = enc_adam(&self.cfg, self.cfg.lr);
        let mut loads = loads.into_iter();
        for p in [
            self.encoder.as_mut().map(|p| (&p.vars, &mut p.trained)),
            self.decoder.as_mut().map(|p| (&p.vars, &mut p.trained)),
        ] {
            let l = loads.next().flatten();
            let (Some((vars, trained)), Some(l)) = (p, l) else {
                continue;
            };
            if let (
                Some(tr),
                Some(TrainedLoad {
                    ema,
                    opt,
                    saved: ps,
                }),
            ) = (trained.as_mut(), &l.trained)
            {
                tr.opt.set_config(enc_adam_cfg)?;
                tr.opt.load_state_tensors(opt, ps.optimizer_steps)?;
                tr.ema.set_decay(self.cfg.ema_decay, self.cfg.ema_warmup);
                tr.ema.load(ema, ps.ema_updates)?;
            }
            set_vars(vars, &l.raw, "saved weights")?;
            if let Some(tr) = trained.as_mut() {
                tr.opt.params_changed();
            }
        }
        if let (Some((t, stats, opt, replay, ds)), Some(g)) = (disc_load, self.gan.as_mut()) {
            g.opt.set_config(disc_adam(&self.cfg))?;
            g.opt.load_state_tensors(&opt, ds.optimizer_steps)?;
            set_vars(&g.vars, &t, "disc.safetensors")?;
            g.opt.params_changed();
            g.stats = stats;
            g.replay = replay;
        }
        self.rng = rng;
        self.step = st.step;
        self.skipped = st.skipped_steps;
        Ok(())
    }
}
