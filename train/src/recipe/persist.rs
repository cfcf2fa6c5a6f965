//! Saving and loading a [`Recipe`]'s complete state (the `recipe/` folder of a checkpoint,
//! format in [`super::state`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};

use super::disc::BnStats;
use super::ema::{probe_name, Ema};
use super::engine::Recipe;
use super::init::{disc_adam, enc_adam};
use super::replay::ReplayBuffer;
use super::state::{self, DiscState, PartState, RngState, StateFile};

pub(super) fn copy_vars(vars: &[(String, Var)]) -> Result<HashMap<String, Tensor>> {
    vars.iter().map(|(n, v)| Ok((n.clone(), v.as_detached_tensor().copy()?))).collect()
}

/// Set every variable from `t` (all must be present with the right shape).
fn set_vars(vars: &[(String, Var)], t: &HashMap<String, Tensor>, what: &str) -> Result<()> {
    for (n, v) in vars {
        let x = t.get(n).with_context(|| format!("{what} lacks {n}"))?;
        if x.dims() != v.dims() {
            bail!("{what}: {n} has shape {:?}, expected {:?}", x.dims(), v.dims());
        }
        v.set(&x.to_dtype(DType::F32)?.to_device(v.device())?).with_context(|| format!("{what}: setting {n}"))?;
    }
    Ok(())
}

fn check_all_present(vars: &[(String, Var)], t: &HashMap<String, Tensor>, what: &str) -> Result<()> {
    for (n, v) in vars {
        match t.get(n) {
            None => bail!("{what} lacks {n}"),
            Some(x) if x.dims() != v.dims() => {
                bail!("{what}: {n} has shape {:?}, expected {:?}", x.dims(), v.dims())
            }
            _ => {}
        }
    }
    Ok(())
}

/// The length of a rank's saved replay buffer, beside its files.
const RANK_REPLAY_FILE: &str = "replay.json";

impl Recipe {
    /// Whether checkpoints hold the replay buffer (a discriminator, `run.checkpoint_replay` on).
    pub fn saves_replay(&self) -> bool {
        self.save_replay && self.gan.is_some()
    }

    /// This rank's replay buffer into `dir`, which must exist: a data-parallel rank other than
    /// 0's part of a checkpoint (rank 0's is in [`Recipe::save_state`]'s files). Nothing without
    /// a discriminator.
    pub fn save_rank_replay(&self, dir: &Path) -> Result<()> {
        let Some(g) = &self.gan else { return Ok(()) };
        g.replay.save(dir)?;
        let p = dir.join(RANK_REPLAY_FILE);
        std::fs::write(&p, serde_json::json!({ "len": g.replay.len() }).to_string() + "\n")
            .with_context(|| format!("cannot write {}", p.display()))
    }

    /// Load a replay buffer [`Recipe::save_rank_replay`] wrote; a missing `dir` (saved without
    /// replay buffers, or after a failure, or by fewer ranks) leaves this rank's buffer empty.
    pub fn load_rank_replay(&mut self, dir: &Path) -> Result<()> {
        let Some(g) = self.gan.as_mut() else { return Ok(()) };
        if !dir.is_dir() {
            return Ok(());
        }
        let p = dir.join(RANK_REPLAY_FILE);
        let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        let len = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["len"].as_u64())
            .with_context(|| format!("{}: no `len`", p.display()))? as usize;
        let mut replay = ReplayBuffer::new(self.cfg.replay_capacity, self.cfg.replay_dtype);
        replay.load(dir, len, &self.device)?;
        g.replay = replay;
        Ok(())
    }

    /// Write every piece of state into `dir` (which must exist; files are overwritten).
    /// `state.json` is written last.
    pub fn save_state(&self, dir: &Path) -> Result<()> {
        if !dir.is_dir() {
            bail!("save_state: {} is not a folder", dir.display());
        }
        let mut part_states = [None, None];
        for (i, (name, p)) in [
            ("encoder", self.encoder.as_ref().map(|p| (&p.vars, &p.trained))),
            ("decoder", self.decoder.as_ref().map(|p| (&p.vars, &p.trained))),
        ]
        .into_iter()
        .enumerate()
        {
            let Some((vars, trained)) = p else { continue };
            let raw: HashMap<String, Tensor> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect();
            state::write_tensors(dir, &format!("{name}.safetensors"), &raw)?;
            part_states[i] = Some(match trained {
                Some(tr) => {
                    state::write_tensors(dir, &format!("ema_{name}.safetensors"), &tr.ema.tensor_map())?;
                    state::write_tensors(dir, &format!("optim_{name}.safetensors"), &tr.opt.state_tensors()?)?;
                    let mut ema_probe_updates = BTreeMap::new();
                    for (d, p) in self.cfg.ema_probe_decays.iter().zip(&tr.probes) {
                        let probe = probe_name(*d);
                        state::write_tensors(dir, &format!("{probe}_{name}.safetensors"), &p.tensor_map())?;
                        ema_probe_updates.insert(probe, p.updates());
                    }
                    PartState {
                        trained: true,
                        optimizer_steps: tr.opt.step_count(),
                        ema_updates: tr.ema.updates(),
                        ema_probe_updates,
                    }
                }
                None => {
                    PartState { trained: false, optimizer_steps: 0, ema_updates: 0, ema_probe_updates: BTreeMap::new() }
                }
            });
        }
        let disc = match &self.gan {
            None => None,
            Some(g) => {
                let mut t: HashMap<String, Tensor> =
                    g.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect();
                t.extend(g.stats.to_map(&g.cfg));
                state::write_tensors(dir, "disc.safetensors", &t)?;
                state::write_tensors(dir, "optim_disc.safetensors", &g.opt.state_tensors()?)?;
                let replay_len = if self.save_replay {
                    g.replay.save(dir)?;
                    g.replay.len()
                } else {
                    0
                };
                Some(DiscState { optimizer_steps: g.opt.step_count(), replay_len })
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
                bail!("{}: saved with {what} = {saved}, this run has {now}", dir.display());
            }
            Ok(())
        };
        structural("train_encoder", st.recipe.train_encoder.to_string(), self.cfg.train_encoder.to_string())?;
        structural("train_decoder", st.recipe.train_decoder.to_string(), self.cfg.train_decoder.to_string())?;
        structural("amsgrad", st.recipe.optimizer.amsgrad().to_string(), self.cfg.optimizer.amsgrad().to_string())?;
        structural("a discriminator", st.disc.is_some().to_string(), self.gan.is_some().to_string())?;
        structural("an encoder", st.encoder.is_some().to_string(), self.encoder.is_some().to_string())?;
        structural("a decoder", st.decoder.is_some().to_string(), self.decoder.is_some().to_string())?;
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
            tracing::warn!("resuming with changed hyperparameters: {}", changed.join(", "));
        }

        // Read and check everything.
        struct TrainedLoad {
            ema: HashMap<String, Tensor>,
            opt: HashMap<String, Tensor>,
            saved: PartState,
            /// Per configured EMA probe: its saved tensors and update count, if it was saved.
            probes: Vec<Option<(HashMap<String, Tensor>, u64)>>,
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
                    bail!("{}: the {name} was not trained in the saved run", dir.display());
                }
                let ema = state::read_tensors(dir, &format!("ema_{name}.safetensors"))?;
                check_all_present(vars, &ema, &format!("ema_{name}.safetensors"))?;
                let opt = state::read_tensors(dir, &format!("optim_{name}.safetensors"))?;
                let mut probes = Vec::new();
                for d in &self.cfg.ema_probe_decays {
                    let probe = probe_name(*d);
                    probes.push(match saved.ema_probe_updates.get(&probe) {
                        Some(n) => {
                            let file = format!("{probe}_{name}.safetensors");
                            let t = state::read_tensors(dir, &file)?;
                            check_all_present(vars, &t, &file)?;
                            Some((t, *n))
                        }
                        None => None,
                    });
                }
                Some(TrainedLoad { ema, opt, saved: saved.clone(), probes })
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
            if let (Some(tr), Some(TrainedLoad { ema, opt, saved: ps, .. })) = (trained.as_mut(), &l.trained) {
                tr.opt.set_config(enc_adam_cfg)?;
                tr.opt.load_state_tensors(opt, ps.optimizer_steps)?;
                tr.ema.set_decay(self.cfg.ema_decay, self.cfg.ema_warmup);
                tr.ema.load(ema, ps.ema_updates)?;
            }
            set_vars(vars, &l.raw, "saved weights")?;
            if let Some(tr) = trained.as_mut() {
                tr.opt.params_changed();
            }
            // The EMA probes: as saved, or (a probe the saved run did not keep) from the resumed weights.
            if let (Some(tr), Some(TrainedLoad { probes, .. })) = (trained.as_mut(), &l.trained) {
                for ((d, p), saved) in self.cfg.ema_probe_decays.iter().zip(&mut tr.probes).zip(probes) {
                    match saved {
                        Some((t, n)) => p.load(t, *n)?,
                        None => {
                            tracing::warn!(
                                "EMA probe {} starts at step {} (not in the checkpoint)",
                                probe_name(*d),
                                st.step
                            );
                            *p = Ema::new(vars, *d, self.cfg.ema_warmup)?;
                        }
                    }
                }
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
