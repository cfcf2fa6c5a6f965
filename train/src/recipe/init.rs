//! Building a [`Recipe`]: the models (loaded, or fresh with PyTorch's default initialisation
//! from the seed), the optimisers, EMA, discriminator and replay buffer.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use taesd::{torch_default_init, Decoder, Encoder, Part, TaesdConfig};

use super::config::RecipeConfig;
use super::disc::{DiscConfig, Discriminator};
use super::ema::Ema;
use super::engine::{Gan, ModelInit, PartState_, Recipe, Trained};
use super::losses::FreqBasis;
use super::optim::{Adam, AdamConfig};
use super::precision::Precision;
use super::replay::ReplayBuffer;

pub(super) fn enc_adam(cfg: &RecipeConfig, lr: f64) -> AdamConfig {
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

pub(super) fn disc_adam(cfg: &RecipeConfig) -> AdamConfig {
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
        let (all, info) = taesd::load_varmap(path, None, DType::F32, device)
            .with_context(|| format!("loading the initial {} from {}", part.prefix(), path.display()))?;
        if info.config != *model_cfg {
            bail!(
                "{}: the checkpoint is {}, the run trains {}",
                path.display(),
                info.config.describe(),
                model_cfg.describe()
            );
        }
        if info.file(part).is_none() {
            bail!("{}: the checkpoint has no {}", path.display(), part.prefix());
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
    taesd::param_shapes(model_cfg, part).into_iter().map(|(n, s)| (format!("{}.{n}", part.prefix()), s)).collect()
}

fn build_trained(cfg: &RecipeConfig, vars: &[(String, Var)]) -> Result<Trained> {
    Ok(Trained {
        opt: Adam::new(vars.to_vec(), enc_adam(cfg, cfg.lr))?,
        ema: Ema::new(vars, cfg.ema_decay, cfg.ema_warmup)?,
        probes: cfg.ema_probe_decays.iter().map(|d| Ema::new(vars, *d, cfg.ema_warmup)).collect::<Result<_>>()?,
    })
}

impl Recipe {
    /// Build the models (from `init`, or from scratch with the decoder's output bias at 0.5),
    /// optimisers, EMA, discriminator and replay buffer on `device`; `seed` fixes every random
    /// choice.
    pub fn new(cfg: &RecipeConfig, model: TaesdConfig, init: &ModelInit, device: &Device, seed: u64) -> Result<Recipe> {
        cfg.validate()?;
        let mut init_rng = ChaCha8Rng::seed_from_u64(seed);
        init_rng.set_stream(1);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(0);

        let encoder = match part_varmap(Part::Encoder, &model, init.encoder.as_deref(), cfg.train_encoder, device)? {
            None => None,
            Some((vm, fresh)) => {
                let m = Encoder::new(&model, VarBuilder::from_varmap(&vm, DType::F32, device).pp("encoder"))
                    .context("building the encoder")?;
                if fresh {
                    torch_default_init(&vm, &full_shapes(&model, Part::Encoder), &mut init_rng, device)?;
                }
                let vars = sorted_vars(&vm);
                let trained = if cfg.train_encoder { Some(build_trained(cfg, &vars)?) } else { None };
                Some(PartState_ { vars, model: m, trained, _vm: vm })
            }
        };
        let decoder = match part_varmap(Part::Decoder, &model, init.decoder.as_deref(), cfg.train_decoder, device)? {
            None => None,
            Some((vm, fresh)) => {
                let m = Decoder::new(&model, VarBuilder::from_varmap(&vm, DType::F32, device).pp("decoder"))
                    .context("building the decoder")?;
                if fresh {
                    torch_default_init(&vm, &full_shapes(&model, Part::Decoder), &mut init_rng, device)?;
                    taesd::set_decoder_output_bias(&vm, model, 0.5)?;
                }
                let vars = sorted_vars(&vm);
                let trained = if cfg.train_decoder { Some(build_trained(cfg, &vars)?) } else { None };
                Some(PartState_ { vars, model: m, trained, _vm: vm })
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
        // The detail term's reference: a second, frozen copy of the initial decoder (loaded again,
        // so the trained one's updates never reach it).
        let initial_decoder = if cfg.train_decoder && cfg.detail_weight > 0.0 {
            let Some(path) = init.decoder.as_deref() else {
                bail!(
                    "recipe.detail_weight keeps the detail of the decoder the run starts from: set model.init_decoder"
                );
            };
            let (vm, _) =
                part_varmap(Part::Decoder, &model, Some(path), false, device)?.context("no initial decoder")?;
            let m = Decoder::new(&model, VarBuilder::from_varmap(&vm, DType::F32, device).pp("decoder"))
                .context("building the initial decoder (detail term)")?;
            Some(m)
        } else {
            None
        };
        if cfg.train_decoder && cfg.cycle_weight > 0.0 && encoder.is_none() {
            bail!(
                "recipe.cycle_weight encodes the decoded images again with the run's encoder: train one \
                 (recipe.train_encoder) or load one (model.init_encoder)"
            );
        }
        Ok(Recipe {
            cfg: cfg.clone(),
            model_cfg: model,
            device: device.clone(),
            seed,
            encoder,
            decoder,
            gan,
            freq,
            initial_decoder,
            rng,
            step: 0,
            skipped: 0,
            precision: Precision::F32,
            profile: None,
            schedule_end: None,
            save_replay: true,
            comm: None,
            rank: 0,
        })
    }
}
