//! Adam, Adam with AMSGrad, and AdamW, as PyTorch's `torch.optim.Adam` / `AdamW` compute them
//! (candle-nn has AdamW only, and no AMSGrad).
//!
//! For step `t` (1-based), gradient `g`, parameter `p`:
//!
//! ```text
//! g  = g + wd * p                      (Adam: L2 weight decay)
//! p  = p * (1 - lr * wd)               (AdamW: decoupled weight decay)
//! m  = m + (g - m) * (1 - b1)          (exp_avg.lerp_(g, 1 - b1))
//! v  = v * b2 + (1 - b2) * g * g       (exp_avg_sq)
//! vmax = max(vmax, v)                  (AMSGrad: max_exp_avg_sq)
//! denom = sqrt(vmax or v) / sqrt(1 - b2^t) + eps
//! p  = p - lr / (1 - b1^t) * m / denom
//! ```
//!
//! The update is split in two so a step can be checked before anything is written:
//! [`Adam::propose`] computes the new parameters and moments as fresh tensors (nothing is
//! modified), [`Adam::commit`] writes them (parameters copied into the `Var`s in place, moments
//! swapped). A proposal that is dropped leaves the optimiser and the weights untouched.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{backprop::GradStore, DType, Tensor, Var};

/// Adam-family hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub amsgrad: bool,
    /// AdamW: weight decay multiplies the parameter instead of adding to the gradient.
    pub decoupled_weight_decay: bool,
}

impl AdamConfig {
    /// `torch.optim.Adam(amsgrad=True)` defaults but for `lr` and `betas`.
    pub fn amsgrad(lr: f64, betas: (f64, f64)) -> Self {
        Self {
            lr,
            beta1: betas.0,
            beta2: betas.1,
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: true,
            decoupled_weight_decay: false,
        }
    }

    /// `torch.optim.AdamW` with its default weight decay (0.01) but for `lr` and `betas`.
    pub fn adamw(lr: f64, betas: (f64, f64)) -> Self {
        Self {
            lr,
            beta1: betas.0,
            beta2: betas.1,
            eps: 1e-8,
            weight_decay: 0.01,
            amsgrad: false,
            decoupled_weight_decay: true,
        }
    }
}

/// Optimiser state names as in PyTorch's `state_dict()["state"][i]`.
const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";
const MAX_EXP_AVG_SQ: &str = "max_exp_avg_sq";

/// Adam / AMSGrad / AdamW over a fixed, named list of variables.
///
/// The moments are kept as one flat f32 buffer each (the variables concatenated in order), and
/// an update is ~15 tensor ops on the flat buffers whatever the number of variables, plus one
/// copy per variable to write it (instead of ~15 ops per variable).
pub struct Adam {
    cfg: AdamConfig,
    vars: Vec<(String, Var)>,
    /// (offset, element count) of each variable in the flat buffers.
    spans: Vec<(usize, usize)>,
    m: Tensor,
    v: Tensor,
    /// `Some` iff `cfg.amsgrad`.
    vmax: Option<Tensor>,
    /// Updates applied so far (PyTorch's per-parameter `step`, shared here).
    t: u64,
    /// One fused kernel per update (taesd-ops) instead of the op sequence: `None` = on CUDA
    /// only. Both give the same f32 arithmetic (bit-identical on the CPU, tested).
    fused: Option<bool>,
    /// The variables' values as one flat buffer, as the last commit wrote them: what
    /// [`Adam::flat_params`] gives without gathering every variable again (one copy kernel per
    /// variable). `None` before the first commit and after [`Adam::params_changed`].
    flat_p: Option<Tensor>,
}

/// Gradients of an optimiser's variables, flattened into one buffer (zeros where a variable
/// had none; those variables are left entirely alone by the update, as PyTorch does).
pub struct FlatGrads {
    pub flat: Tensor,
    pub missing: Vec<bool>,
}

impl FlatGrads {
    /// Sum of squares (0-dim).
    pub fn norm_sq(&self) -> Result<Tensor> {
        Ok(self.flat.sqr()?.sum_all()?)
    }

    pub fn any(&self) -> bool {
        self.missing.iter().any(|m| !m)
    }
}

/// The outcome of one update, not yet written. `params[i]` is the new value of variable `i`
/// (detached, a view into one flat buffer; the current value where the variable had no
/// gradient).
pub struct Proposal {
    pub params: Vec<Tensor>,
    /// `params` as one flat buffer (they are views of it).
    flat: Tensor,
    m: Tensor,
    v: Tensor,
    vmax: Option<Tensor>,
}

impl Adam {
    /// Zero moments for `vars` (kept in the given order; names must be unique).
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamConfig) -> Result<Self> {
        let mut spans = Vec::with_capacity(vars.len());
        let mut total = 0;
        let device = match vars.first() {
            Some((_, v)) => v.device().clone(),
            None => bail!("optimiser: no variables"),
        };
        for (name, var) in &vars {
            if var.dtype() != DType::F32 {
                bail!("optimiser: {name} is {:?}, only f32 weights are trained", var.dtype());
            }
            if !var.device().same_device(&device) {
                bail!("optimiser: {name} is on another device than the other variables");
            }
            spans.push((total, var.elem_count()));
            total += var.elem_count();
        }
        let m = Tensor::zeros(total, DType::F32, &device)?;
        let v = m.zeros_like()?;
        let vmax = if cfg.amsgrad { Some(m.zeros_like()?) } else { None };
        Ok(Self { cfg, vars, spans, m, v, vmax, t: 0, fused: None, flat_p: None })
    }

    /// Force the fused update on or off (`None`: fused on CUDA when taesd-ops has its kernels).
    pub fn set_fused(&mut self, fused: Option<bool>) {
        self.fused = fused;
    }

    fn use_fused(&self) -> bool {
        let dev = self.m.device();
        self.fused.unwrap_or(dev.is_cuda()) && taesd_ops::kernels_on(dev)
    }

    pub fn config(&self) -> &AdamConfig {
        &self.cfg
    }

    /// Change hyperparameters (e.g. on resume with another learning rate). AMSGrad cannot be
    /// switched on or off once state exists.
    pub fn set_config(&mut self, cfg: AdamConfig) -> Result<()> {
        if cfg.amsgrad != self.cfg.amsgrad {
            bail!("optimiser: amsgrad cannot change on an existing optimiser");
        }
        self.cfg = cfg;
        Ok(())
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Updates applied so far.
    pub fn step_count(&self) -> u64 {
        self.t
    }

    /// The flat gradients of this optimiser's variables in `grads`.
    pub fn flat_gradients(&self, grads: &GradStore) -> Result<FlatGrads> {
        self.flat_gradients_with(grads, None)
    }

    /// The flat gradients of this optimiser's variables: candle's `grads` plus those the ops
    /// collected off the graph (`taesd_ops::WeightGrads`), summed where a variable has both.
    pub fn flat_gradients_with(
        &self,
        grads: &GradStore,
        collected: Option<&taesd_ops::WeightGrads>,
    ) -> Result<FlatGrads> {
        let list = self
            .vars
            .iter()
            .map(|(_, v)| {
                let graph = grads.get(v.as_tensor()).map(|g| g.detach());
                Ok(match (graph, collected.and_then(|c| c.get(v.as_tensor()))) {
                    (Some(a), Some(b)) => Some((a.to_dtype(DType::F32)? + b)?),
                    (a, b) => a.or(b),
                })
            })
            .collect::<Result<Vec<Option<Tensor>>>>()?;
        self.flatten(&list)
    }

    /// Flatten per-variable gradients (aligned with [`Adam::vars`]; `None`: no gradient).
    pub fn flatten(&self, grads: &[Option<Tensor>]) -> Result<FlatGrads> {
        if grads.len() != self.vars.len() {
            bail!("optimiser: {} gradients for {} variables", grads.len(), self.vars.len());
        }
        let mut parts = Vec::with_capacity(grads.len());
        let mut missing = Vec::with_capacity(grads.len());
        for ((name, var), g) in self.vars.iter().zip(grads) {
            match g {
                Some(g) => {
                    if g.dims() != var.dims() {
                        bail!("optimiser: gradient of {name} has shape {:?}", g.dims());
                    }
                    parts.push(g.detach().to_dtype(DType::F32)?.flatten_all()?);
                    missing.push(false);
                }
                None => {
                    parts.push(Tensor::zeros(var.elem_count(), DType::F32, var.device())?);
                    missing.push(true);
                }
            }
        }
        Ok(FlatGrads { flat: Tensor::cat(&parts, 0)?, missing })
    }

    /// The current parameters as one flat buffer, in the variables' order (not to be
    /// modified: it may be the last commit's buffer).
    pub fn flat_params(&self) -> Result<Tensor> {
        if let Some(p) = &self.flat_p {
            return Ok(p.clone());
        }
        let parts = self
            .vars
            .iter()
            .map(|(_, v)| v.as_detached_tensor().flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Variable `i`'s slice of a flat buffer, in the variable's shape (a view).
    fn unflat(&self, flat: &Tensor, i: usize) -> Result<Tensor> {
        let (o, n) = self.spans[i];
        Ok(flat.narrow(0, o, n)?.reshape(self.vars[i].1.shape())?)
    }

    /// `new` with the slices of variables without a gradient taken from `old`.
    fn keep_missing(&self, new: Tensor, old: &Tensor, missing: &[bool]) -> Result<Tensor> {
        if !missing.iter().any(|m| *m) {
            return Ok(new);
        }
        let parts = self
            .spans
            .iter()
            .zip(missing)
            .map(|(&(o, n), &miss)| if miss { old.narrow(0, o, n) } else { new.narrow(0, o, n) })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The new parameters and moments for the gradients `g`, learning rate `lr`, and an
    /// optional scalar gradient multiplier `grad_scale` (a 0-dim tensor, e.g. from gradient
    /// clipping). Nothing is modified.
    pub fn propose_flat(&self, g: &FlatGrads, lr: f64, grad_scale: Option<&Tensor>) -> Result<Proposal> {
        let c = &self.cfg;
        let t = self.t + 1;
        let bc1 = 1.0 - c.beta1.powi(t as i32);
        let bc2 = 1.0 - c.beta2.powi(t as i32);
        let step_size = lr / bc1;
        let inv_bc2_sqrt = 1.0 / bc2.sqrt();
        let p0 = self.flat_params()?;
        let (p, m, v, vmax) = if self.use_fused() {
            let o = taesd_ops::adam_update(
                &p0,
                &g.flat,
                &self.m,
                &self.v,
                self.vmax.as_ref(),
                grad_scale,
                &taesd_ops::AdamStep {
                    lr,
                    beta1: c.beta1,
                    beta2: c.beta2,
                    eps: c.eps,
                    weight_decay: c.weight_decay,
                    decoupled_weight_decay: c.decoupled_weight_decay,
                    step: t,
                },
            )?;
            (o.p, o.m, o.v, o.vmax)
        } else {
            let mut grad = g.flat.clone();
            if let Some(s) = grad_scale {
                grad = grad.broadcast_mul(s)?;
            }
            let mut p = p0.clone();
            if c.weight_decay != 0.0 {
                if c.decoupled_weight_decay {
                    p = p.affine(1.0 - lr * c.weight_decay, 0.0)?;
                } else {
                    grad = (grad + p.affine(c.weight_decay, 0.0)?)?;
                }
            }
            let m = (&self.m + (&grad - &self.m)?.affine(1.0 - c.beta1, 0.0)?)?;
            let v = (self.v.affine(c.beta2, 0.0)? + grad.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
            let vmax = match &self.vmax {
                Some(old) => Some(old.maximum(&v)?),
                None => None,
            };
            let second = vmax.as_ref().unwrap_or(&v);
            let denom = second.sqrt()?.affine(inv_bc2_sqrt, c.eps)?;
            let p = (p - (&m / denom)?.affine(step_size, 0.0)?)?;
            (p, m, v, vmax)
        };

        let p = self.keep_missing(p, &p0, &g.missing)?;
        let m = self.keep_missing(m, &self.m, &g.missing)?;
        let v = self.keep_missing(v, &self.v, &g.missing)?;
        let vmax = match (vmax, &self.vmax) {
            (Some(new), Some(old)) => Some(self.keep_missing(new, old, &g.missing)?),
            _ => None,
        };
        let params = (0..self.vars.len()).map(|i| self.unflat(&p, i)).collect::<Result<Vec<_>>>()?;
        Ok(Proposal { params, flat: p, m, v, vmax })
    }

    /// [`Adam::propose_flat`] from per-variable gradients (aligned with [`Adam::vars`]).
    pub fn propose(&self, grads: &[Option<Tensor>], lr: f64, grad_scale: Option<&Tensor>) -> Result<Proposal> {
        let g = self.flatten(grads)?;
        self.propose_flat(&g, lr, grad_scale)
    }

    /// Write a proposal: parameters into the variables, moments into the state, `t += 1`.
    pub fn commit(&mut self, p: Proposal) -> Result<()> {
        for ((name, var), new) in self.vars.iter().zip(&p.params) {
            var.set(new).with_context(|| format!("writing {name}"))?;
        }
        self.flat_p = Some(p.flat);
        self.m = p.m;
        self.v = p.v;
        self.vmax = p.vmax;
        self.t += 1;
        Ok(())
    }

    /// The variables were written other than by [`Adam::commit`] (a resume, an initialisation):
    /// forget the committed flat buffer.
    pub fn params_changed(&mut self) {
        self.flat_p = None;
    }

    /// One plain step: propose from `grads` and commit.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let g = self.flat_gradients(grads)?;
        let p = self.propose_flat(&g, self.cfg.lr, None)?;
        self.commit(p)
    }

    /// The moments per variable, named `exp_avg.<var>`, `exp_avg_sq.<var>` (and
    /// `max_exp_avg_sq.<var>`), in the variables' shapes.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("{EXP_AVG}.{name}"), self.unflat(&self.m, i)?);
            out.insert(format!("{EXP_AVG_SQ}.{name}"), self.unflat(&self.v, i)?);
            if let Some(vmax) = &self.vmax {
                out.insert(format!("{MAX_EXP_AVG_SQ}.{name}"), self.unflat(vmax, i)?);
            }
        }
        Ok(out)
    }

    /// Restore moments written by [`Adam::state_tensors`] and the step count. Every moment
    /// must be present with the variable's shape; they are moved to the variables' device.
    /// Nothing changes on error.
    pub fn load_state_tensors(&mut self, t: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        let flat = |kind: &str| -> Result<Tensor> {
            let mut parts = Vec::with_capacity(self.vars.len());
            for (name, var) in &self.vars {
                let key = format!("{kind}.{name}");
                let x = t.get(&key).with_context(|| format!("optimiser state lacks {key}"))?;
                if x.dims() != var.dims() {
                    bail!("optimiser state {key} has shape {:?}, the variable {:?}", x.dims(), var.dims());
                }
                parts.push(x.to_dtype(DType::F32)?.flatten_all()?);
            }
            Ok(Tensor::cat(&parts, 0)?.to_device(self.m.device())?)
        };
        let m = flat(EXP_AVG)?;
        let v = flat(EXP_AVG_SQ)?;
        let vmax = if self.cfg.amsgrad { Some(flat(MAX_EXP_AVG_SQ)?) } else { None };
        self.m = m;
        self.v = v;
        self.vmax = vmax;
        self.t = steps;
        Ok(())
    }
}

/// `clip_grad_norm_`'s multiplier `min(1, max_norm / (norm + 1e-6))` as a 0-dim tensor.
pub fn clip_scale(norm_sq: &Tensor, max_norm: f64) -> Result<Tensor> {
    let norm = norm_sq.sqrt()?;
    Ok((norm + 1e-6)?.recip()?.affine(max_norm, 0.0)?.clamp(0f32, 1f32)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(v: &[f32]) -> Var {
        Var::from_slice(v, v.len(), &Device::Cpu).unwrap()
    }

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap()
    }

    fn close(got: &[f32], want: &[f64], what: &str) {
        for (g, w) in got.iter().zip(want) {
            let tol = 1e-6 * w.abs().max(1.0);
            assert!((*g as f64 - w).abs() <= tol, "{what}: got {got:?}, want {want:?}");
        }
    }

    /// Expected values: PyTorch's update rule evaluated by hand (in f64) for
    /// p0 = [1, -2, 0.5], g1 = [0.5, -1, 0.1], g2 = [-0.3, 2, 0.1], g3 = [0.2, -0.1, -0.4],
    /// lr = 0.1, betas = (0.9, 0.9), eps = 1e-8 — AMSGrad, no weight decay.
    ///
    /// step 1: m = 0.1 g1, v = 0.1 g1², vmax = v; bc1 = 0.1, sqrt(bc2) = sqrt(0.1):
    ///   m/bc1 = g1, sqrt(v)/sqrt(bc2) = |g1|  => p1 = p0 - 0.1 sign(g1) (up to eps)
    ///   = [0.9, -1.9, 0.4]
    /// step 2: m = [0.015, 0.11, 0.019], v = [0.0315, 0.49, 0.0019], vmax = max(v, v1)
    ///   = [0.0315, 0.49, 0.0019]; bc1 = 0.19, bc2 = 0.19
    ///   p2 = p1 - 0.1/0.19 * m / (sqrt(vmax)/sqrt(0.19) + 1e-8)
    /// step 3: m = [0.0335, 0.089, -0.0229], v = [0.03235, 0.442, 0.01771],
    ///   vmax = [0.03235, 0.49 (kept: v fell), 0.01771]; bc1 = bc2 = 0.271
    /// `flat_params` after a commit is the committed buffer (no gather): it equals the
    /// variables; after a write elsewhere and `params_changed` it follows the variables again.
    #[test]
    fn flat_params_follow_commits_and_external_writes() {
        let a = var(&[1.0, 2.0]);
        let b = var(&[-1.0]);
        let mut opt =
            Adam::new(vec![("a".into(), a.clone()), ("b".into(), b.clone())], AdamConfig::amsgrad(0.1, (0.9, 0.99)))
                .unwrap();
        let gathered =
            |a: &Var, b: &Var| Tensor::cat(&[a.as_tensor(), b.as_tensor()], 0).unwrap().to_vec1::<f32>().unwrap();
        let p = opt.propose(&[Some(t(&[0.5, -0.5])), Some(t(&[1.0]))], 0.1, None).unwrap();
        opt.commit(p).unwrap();
        assert!(opt.flat_p.is_some());
        assert_eq!(opt.flat_params().unwrap().to_vec1::<f32>().unwrap(), gathered(&a, &b));
        assert_ne!(gathered(&a, &b), vec![1.0, 2.0, -1.0]);
        a.set(&t(&[7.0, 8.0])).unwrap();
        opt.params_changed();
        assert_eq!(
            opt.flat_params().unwrap().to_vec1::<f32>().unwrap(),
            vec![7.0, 8.0, b.as_tensor().to_vec1::<f32>().unwrap()[0]]
        );
    }

    #[test]
    fn amsgrad_matches_pytorch_update_rule() {
        let p = var(&[1.0, -2.0, 0.5]);
        let mut opt = Adam::new(vec![("p".into(), p.clone())], AdamConfig::amsgrad(0.1, (0.9, 0.9))).unwrap();
        let grads = [[0.5f32, -1.0, 0.1], [-0.3, 2.0, 0.1], [0.2, -0.1, -0.4]];
        let want = [
            [0.9000000020, -1.9000000010, 0.4000000100],
            [0.8806108341, -1.9360510447, 0.3000000200],
            [0.8448322618, -1.9604745119, 0.3330553532],
        ];
        for (g, w) in grads.iter().zip(&want) {
            let pr = opt.propose(&[Some(t(g))], 0.1, None).unwrap();
            opt.commit(pr).unwrap();
            close(&p.as_tensor().to_vec1::<f32>().unwrap(), w, "amsgrad");
        }
        assert_eq!(opt.step_count(), 3);
        // The max is kept where the second moment fell (element 1 at step 3).
        let st = opt.state_tensors().unwrap();
        close(&st["max_exp_avg_sq.p"].to_vec1::<f32>().unwrap(), &[0.03235, 0.49, 0.01771], "max_exp_avg_sq");
        close(&st["exp_avg_sq.p"].to_vec1::<f32>().unwrap(), &[0.03235, 0.442, 0.01771], "exp_avg_sq");
        close(&st["exp_avg.p"].to_vec1::<f32>().unwrap(), &[0.0335, 0.089, -0.0229], "exp_avg");
    }

    /// AdamW (no amsgrad), lr 0.1, betas (0.9, 0.99), eps 1e-8, weight decay 0.1, same p0 and
    /// gradients as above. Each step first scales p by (1 - 0.1 * 0.1) = 0.99, then
    /// p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) with bc2 = 1 - 0.99^t.
    #[test]
    fn adamw_matches_pytorch_update_rule() {
        let p = var(&[1.0, -2.0, 0.5]);
        let mut cfg = AdamConfig::adamw(0.1, (0.9, 0.99));
        cfg.weight_decay = 0.1;
        let mut opt = Adam::new(vec![("p".into(), p.clone())], cfg).unwrap();
        let grads = [[0.5f32, -1.0, 0.1], [-0.3, 2.0, 0.1], [0.2, -0.1, -0.4]];
        let want = [
            [0.8900000020, -1.8800000010, 0.3950000100],
            [0.8619297731, -1.8977607721, 0.2910500199],
            [0.8184805395, -1.9042221191, 0.3224934526],
        ];
        for (g, w) in grads.iter().zip(&want) {
            let pr = opt.propose(&[Some(t(g))], 0.1, None).unwrap();
            opt.commit(pr).unwrap();
            close(&p.as_tensor().to_vec1::<f32>().unwrap(), w, "adamw");
        }
        assert!(!opt.state_tensors().unwrap().contains_key("max_exp_avg_sq.p"));
    }

    /// Adam with L2 weight decay 0.5 (added to the gradient), one step from p0 = [2]:
    /// g' = 1 + 0.5*2 = 2; m/bc1 = 2, sqrt(v)/sqrt(bc2) = 2 => p = 2 - 0.1 * 2/(2 + 1e-8).
    #[test]
    fn adam_l2_weight_decay_enters_the_gradient() {
        let p = var(&[2.0]);
        let mut cfg = AdamConfig::amsgrad(0.1, (0.9, 0.9));
        cfg.weight_decay = 0.5;
        let mut opt = Adam::new(vec![("p".into(), p.clone())], cfg).unwrap();
        let pr = opt.propose(&[Some(t(&[1.0]))], 0.1, None).unwrap();
        opt.commit(pr).unwrap();
        close(&p.as_tensor().to_vec1::<f32>().unwrap(), &[1.9000000005], "adam l2");
        close(&opt.state_tensors().unwrap()["exp_avg.p"].to_vec1::<f32>().unwrap(), &[0.2], "adam l2 exp_avg");
    }

    #[test]
    fn dropped_proposal_changes_nothing_and_state_round_trips() {
        let p = var(&[1.0, 2.0]);
        let mut opt = Adam::new(vec![("p".into(), p.clone())], AdamConfig::amsgrad(0.1, (0.9, 0.9))).unwrap();
        let pr = opt.propose(&[Some(t(&[1.0, 1.0]))], 0.1, None).unwrap();
        opt.commit(pr).unwrap();
        let before = p.as_tensor().to_vec1::<f32>().unwrap();
        let state = opt.state_tensors().unwrap();
        let _dropped = opt.propose(&[Some(t(&[f32::NAN, 1.0]))], 0.1, None).unwrap();
        assert_eq!(p.as_tensor().to_vec1::<f32>().unwrap(), before);
        assert_eq!(opt.step_count(), 1);
        // A second optimiser loaded from the state continues identically.
        let p2 = var(&before);
        let mut opt2 = Adam::new(vec![("p".into(), p2.clone())], AdamConfig::amsgrad(0.1, (0.9, 0.9))).unwrap();
        opt2.load_state_tensors(&state, 1).unwrap();
        for o in [&mut opt, &mut opt2] {
            let pr = o.propose(&[Some(t(&[0.3, -0.7]))], 0.1, None).unwrap();
            o.commit(pr).unwrap();
        }
        assert_eq!(p.as_tensor().to_vec1::<f32>().unwrap(), p2.as_tensor().to_vec1::<f32>().unwrap());
    }

    /// Several variables in one flat buffer update exactly as each alone; a variable without a
    /// gradient keeps its value and moments (PyTorch skips it).
    #[test]
    fn flat_buffer_matches_per_variable_and_skips_missing() {
        let dev = Device::Cpu;
        let a = Var::from_slice(&[1.0f32, 2.0, 3.0, 4.0], (2, 2), &dev).unwrap();
        let b = var(&[-1.0, 0.5]);
        let c = var(&[7.0]);
        let cfg = AdamConfig::amsgrad(0.05, (0.9, 0.9));
        let mut joint =
            Adam::new(vec![("a".into(), a.clone()), ("b".into(), b.clone()), ("c".into(), c.clone())], cfg).unwrap();
        let a1 = Var::from_slice(&[1.0f32, 2.0, 3.0, 4.0], (2, 2), &dev).unwrap();
        let b1 = var(&[-1.0, 0.5]);
        let mut oa = Adam::new(vec![("a".into(), a1.clone())], cfg).unwrap();
        let mut ob = Adam::new(vec![("b".into(), b1.clone())], cfg).unwrap();
        for k in 0..3 {
            let ga = Tensor::from_slice(&[0.1f32 * k as f32, -0.2, 0.3, 0.05], (2, 2), &dev).unwrap();
            let gb = t(&[0.7, -0.1 * k as f32]);
            let pr = joint.propose(&[Some(ga.clone()), Some(gb.clone()), None], 0.05, None).unwrap();
            joint.commit(pr).unwrap();
            let pr = oa.propose(&[Some(ga)], 0.05, None).unwrap();
            oa.commit(pr).unwrap();
            let pr = ob.propose(&[Some(gb)], 0.05, None).unwrap();
            ob.commit(pr).unwrap();
        }
        let flat = |v: &Var| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&a), flat(&a1));
        assert_eq!(flat(&b), flat(&b1));
        assert_eq!(flat(&c), [7.0]);
        let st = joint.state_tensors().unwrap();
        assert_eq!(st["exp_avg.a"].dims(), [2, 2]);
        assert_eq!(st["max_exp_avg_sq.c"].to_vec1::<f32>().unwrap(), [0.0]);
        assert_eq!(
            st["exp_avg_sq.b"].to_vec1::<f32>().unwrap(),
            ob.state_tensors().unwrap()["exp_avg_sq.b"].to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn clipping_scale_matches_clip_grad_norm() {
        let p = var(&[0.0, 0.0]);
        let opt = Adam::new(vec![("p".into(), p)], AdamConfig::amsgrad(0.1, (0.9, 0.9))).unwrap();
        let n = opt.flatten(&[Some(t(&[3.0, 4.0]))]).unwrap().norm_sq().unwrap();
        assert_eq!(n.to_scalar::<f32>().unwrap(), 25.0);
        let s = clip_scale(&n, 1.0).unwrap().to_scalar::<f32>().unwrap();
        assert!((s - 1.0 / (5.0 + 1e-6)).abs() < 1e-7);
        let s = clip_scale(&n, 10.0).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(s, 1.0);
    }

    /// The fused update (taesd-ops' kernel; its CPU loop here) equals the op sequence bit for
    /// bit: AMSGrad and AdamW, a variable without a gradient, a gradient scale, several steps.
    #[test]
    fn fused_update_is_bit_identical() {
        for cfg in [
            AdamConfig::amsgrad(1e-3, (0.9, 0.99)),
            AdamConfig::adamw(3e-4, (0.5, 0.999)),
            AdamConfig { weight_decay: 0.05, ..AdamConfig::amsgrad(1e-2, (0.8, 0.9)) },
        ] {
            let mk = || {
                vec![
                    ("a".to_string(), var(&[0.5, -1.0, 2.0, 0.25])),
                    ("b".to_string(), var(&[1.5, -0.5])),
                    ("c".to_string(), var(&[0.1, 0.2, 0.3])),
                ]
            };
            let (va, vb) = (mk(), mk());
            let mut plain = Adam::new(va.clone(), cfg).unwrap();
            let mut fused = Adam::new(vb.clone(), cfg).unwrap();
            plain.set_fused(Some(false));
            fused.set_fused(Some(true));
            let scale = Tensor::new(0.75f32, &Device::Cpu).unwrap();
            for step in 0..4 {
                let k = step as f32 + 1.0;
                let grads = [
                    Some(t(&[0.1 * k, -0.3, 0.7 / k, 1e-4])),
                    (step % 2 == 0).then(|| t(&[-2.0 * k, 0.05])),
                    Some(t(&[3.0, -k, 0.0])),
                ];
                let s = (step % 2 == 1).then_some(&scale);
                let pp = plain.propose(&grads, cfg.lr, s).unwrap();
                let pf = fused.propose(&grads, cfg.lr, s).unwrap();
                plain.commit(pp).unwrap();
                fused.commit(pf).unwrap();
                for ((_, a), (_, b)) in va.iter().zip(&vb) {
                    let a: Vec<f32> = a.as_tensor().to_vec1().unwrap();
                    let b: Vec<f32> = b.as_tensor().to_vec1().unwrap();
                    assert_eq!(a, b, "step {step} {cfg:?}");
                }
            }
            let (sa, sb) = (plain.state_tensors().unwrap(), fused.state_tensors().unwrap());
            for (k, a) in &sa {
                let a: Vec<f32> = a.to_vec1().unwrap();
                let b: Vec<f32> = sb[k].to_vec1().unwrap();
                assert_eq!(a, b, "{k}");
            }
        }
    }
}
