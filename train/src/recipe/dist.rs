//! The recipe's data-parallel part (see `crate::dist` for the whole picture): the start from
//! rank 0's state, gradients averaged over the ranks, the NaN guard's verdict and the losses
//! agreed, the discriminator's BatchNorm running statistics averaged, and the random draws of
//! ranks other than 0. Without a comm (one process) none of this runs: no copies, no
//! collectives.

use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{Tensor, Var};
use rand_chacha::ChaCha8Rng;

use super::disc::BnStats;
use super::engine::{Recipe, StepReport};
use super::optim::FlatGrads;
use super::replay::ReplayBuffer;
use crate::dist::comm::{all_reduce_mean, ranks_of, Comm};

/// The variables as one flat buffer, replaced by `f` of it.
fn map_vars(vars: &[(String, Var)], f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<()> {
    let parts =
        vars.iter().map(|(_, v)| v.as_detached_tensor().flatten_all()).collect::<candle_core::Result<Vec<_>>>()?;
    let flat = f(&Tensor::cat(&parts, 0)?)?;
    let mut off = 0;
    for (name, v) in vars {
        let n = v.elem_count();
        v.set(&flat.narrow(0, off, n)?.reshape(v.shape())?).with_context(|| format!("setting {name}"))?;
        off += n;
    }
    Ok(())
}

/// The statistics as one flat buffer, `f` of it, and back.
fn map_stats(s: &BnStats, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<BnStats> {
    let all: Vec<&Tensor> = s.mean.iter().chain(&s.var).collect();
    let parts = all.iter().map(|t| t.flatten_all()).collect::<candle_core::Result<Vec<_>>>()?;
    let flat = f(&Tensor::cat(&parts, 0)?)?;
    let mut off = 0;
    let mut out = Vec::with_capacity(all.len());
    for t in all {
        let n = t.elem_count();
        out.push(flat.narrow(0, off, n)?.reshape(t.shape())?.to_dtype(t.dtype())?);
        off += n;
    }
    let var = out.split_off(s.mean.len());
    Ok(BnStats { mean: out, var })
}

impl Recipe {
    /// Train data-parallel through `comm` (`None`: alone, the default). Rank 0's parameters,
    /// EMAs and BatchNorm statistics are broadcast to every rank (after a resume too: every
    /// rank loaded the same checkpoint, this makes sure); a rank other than 0 starts with an
    /// empty replay buffer of its own (a resume gave it rank 0's), then loads its own from the
    /// checkpoint where there is one ([`Recipe::load_rank_replay`]).
    pub fn set_comm(&mut self, comm: Option<Arc<dyn Comm>>) -> Result<()> {
        self.comm = comm;
        let Some(c) = self.comm.clone() else {
            self.rank = 0;
            return Ok(());
        };
        self.rank = c.rank();
        let bcast = |t: &Tensor| c.broadcast(t);
        for p in [
            self.encoder.as_mut().map(|p| (&p.vars, &mut p.trained)),
            self.decoder.as_mut().map(|p| (&p.vars, &mut p.trained)),
        ]
        .into_iter()
        .flatten()
        {
            map_vars(p.0, bcast).context("broadcasting rank 0's weights")?;
            if let Some(tr) = p.1.as_mut() {
                tr.opt.params_changed();
                for ema in std::iter::once(&mut tr.ema).chain(tr.probes.iter_mut()) {
                    let w = c.broadcast(ema.flat())?;
                    ema.set_flat(w)?;
                }
            }
        }
        if let Some(g) = self.gan.as_mut() {
            map_vars(&g.vars, bcast).context("broadcasting rank 0's discriminator")?;
            g.opt.params_changed();
            g.stats = map_stats(&g.stats, bcast)?;
            if self.rank != 0 {
                g.replay = ReplayBuffer::new(self.cfg.replay_capacity, self.cfg.replay_dtype);
            }
        }
        Ok(())
    }

    pub fn comm(&self) -> Option<&Arc<dyn Comm>> {
        self.comm.as_ref()
    }

    /// The generator of this step's draws on a rank other than 0: a stream of (seed, rank,
    /// step), so it needs no saved state. `None` on rank 0 (the run's generator, as alone).
    pub(super) fn rank_rng(&self) -> Option<ChaCha8Rng> {
        (self.rank > 0).then(|| crate::rng::rng(self.seed, crate::rng::tag::RANK_STEP, &[self.rank as u64, self.step]))
    }
}

/// The gradients averaged over the ranks (unchanged alone).
pub(super) fn mean_grads(comm: Option<&dyn Comm>, g: FlatGrads) -> Result<FlatGrads> {
    match comm {
        None => Ok(g),
        Some(c) => {
            Ok(FlatGrads { flat: all_reduce_mean(c, &g.flat).context("averaging gradients")?, missing: g.missing })
        }
    }
}

/// BatchNorm running statistics averaged over the ranks (unchanged alone).
pub(super) fn mean_stats(comm: Option<&dyn Comm>, s: BnStats) -> Result<BnStats> {
    match comm {
        None => Ok(s),
        Some(c) => map_stats(&s, |t| all_reduce_mean(c, t)).context("averaging the BatchNorm statistics"),
    }
}

/// The ranks agree on a step's report: it is skipped everywhere when any rank saw a non-finite
/// value (naming the ranks), and the losses become the ranks' means. One small host
/// all-reduce.
pub(super) fn agree(comm: Option<&dyn Comm>, mut report: StepReport) -> Result<StepReport> {
    let Some(c) = comm else { return Ok(report) };
    let n = c.world_size();
    let mut buf: Vec<f32> = vec![0.0; n];
    buf[c.rank()] = if report.skipped.is_some() { 1.0 } else { 0.0 };
    buf.extend(report.losses.values().map(|v| *v as f32));
    c.all_reduce_host(&mut buf).context("agreeing on the step's verdict")?;
    let flags: Vec<bool> = buf[..n].iter().map(|x| *x > 0.5).collect();
    for (v, sum) in report.losses.values_mut().zip(&buf[n..]) {
        *v = *sum as f64 / n as f64;
    }
    if flags.iter().any(|f| *f) {
        let mine = report.skipped.take();
        report.skipped = Some(match mine {
            Some(why) => format!("rank {}: {why} (ranks with non-finite values: {})", c.rank(), ranks_of(&flags)),
            None => format!("non-finite values on rank(s) {}", ranks_of(&flags)),
        });
    }
    Ok(report)
}
