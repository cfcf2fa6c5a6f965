//! Exponential moving average of a set of weights: `ema = d * ema + (1 - d) * w` after every
//! applied update, with `d = min(decay, (1 + n) / (10 + n))` when warm-up is on (n = updates
//! so far). The EMA tensors are never modified in place: every update makes new tensors, so a
//! model built on them (a preview, an export) is a stable snapshot. The values live in one flat
//! buffer (per-tensor updates were 3 kernels per tensor, ~420 launches a step for taef2).

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};

pub struct Ema {
    decay: f64,
    warmup: bool,
    /// All averaged values in one f32 buffer, the variables' order (an update is three kernels,
    /// not three per tensor).
    flat: Tensor,
    /// (name, tensor): views of `flat` in the variables' shapes.
    tensors: Vec<(String, Tensor)>,
    updates: u64,
}

/// `(name, view)` of each tensor of `shapes` in `flat` (consecutive, in order).
fn views(flat: &Tensor, shapes: &[(String, Vec<usize>)]) -> Result<Vec<(String, Tensor)>> {
    let mut off = 0;
    let mut out = Vec::with_capacity(shapes.len());
    for (name, dims) in shapes {
        let n: usize = dims.iter().product();
        out.push((name.clone(), flat.narrow(0, off, n)?.reshape(dims.as_slice())?));
        off += n;
    }
    Ok(out)
}

/// The tensors flattened and concatenated, in f32: a new buffer (candle's `cat` of one
/// contiguous tensor is that tensor itself, which would alias a variable).
fn flatten(ts: &[Tensor]) -> Result<Tensor> {
    let parts = ts.iter().map(|t| t.to_dtype(DType::F32)?.flatten_all()).collect::<candle_core::Result<Vec<_>>>()?;
    let flat = Tensor::cat(&parts, 0)?;
    Ok(if parts.len() == 1 { flat.copy()? } else { flat })
}

/// The name of an EMA probe of decay `d` in evaluations and checkpoint files: `ema0.9995`.
pub fn probe_name(d: f64) -> String {
    format!("ema{d}")
}

/// The warm-up's cap on the decay of update `n` (0-based): `(1 + n) / (10 + n)`.
fn warmup_ramp(n: u64) -> f64 {
    (1.0 + n as f64) / (10.0 + n as f64)
}

/// The first update at which the warm-up ramp ([`warmup_ramp`]) reaches `decay`, so that the
/// EMA averages at that decay from then on; before it, every EMA whose decay the ramp has not
/// reached is the same average (0.999: update 8990; 0.9995: 17990).
pub fn warmup_reaches(decay: f64) -> u64 {
    if decay >= 1.0 {
        return u64::MAX;
    }
    let on = |n: u64| warmup_ramp(n) >= decay;
    // The closed form (10d - 1) / (1 - d), then the ramp's own floating-point comparison.
    let mut n = ((10.0 * decay - 1.0) / (1.0 - decay)).ceil().max(0.0) as u64;
    while n > 0 && on(n - 1) {
        n -= 1;
    }
    while !on(n) {
        n += 1;
    }
    n
}

/// The decays among `decays` that the warm-up ramp has not reached within `updates` updates:
/// with warm-up on, EMAs at these decays are one and the same average over those updates.
pub fn still_on_ramp(decays: &[f64], updates: u64) -> Vec<f64> {
    decays.iter().copied().filter(|d| warmup_reaches(*d) >= updates).collect()
}

impl Ema {
    /// Start the average at the variables' current values (a copy).
    pub fn new(vars: &[(String, Var)], decay: f64, warmup: bool) -> Result<Self> {
        let flat = flatten(&vars.iter().map(|(_, v)| v.as_detached_tensor()).collect::<Vec<_>>())?;
        let shapes: Vec<(String, Vec<usize>)> = vars.iter().map(|(n, v)| (n.clone(), v.dims().to_vec())).collect();
        Ok(Self { decay, warmup, tensors: views(&flat, &shapes)?, flat, updates: 0 })
    }

    fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.tensors.iter().map(|(n, t)| (n.clone(), t.dims().to_vec())).collect()
    }

    pub fn set_decay(&mut self, decay: f64, warmup: bool) {
        self.decay = decay;
        self.warmup = warmup;
    }

    /// The decay the next update uses.
    pub fn current_decay(&self) -> f64 {
        if self.warmup {
            self.decay.min(warmup_ramp(self.updates))
        } else {
            self.decay
        }
    }

    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Fold in the variables' current values (same list and order as at construction).
    pub fn update(&mut self, vars: &[(String, Var)]) -> Result<()> {
        if vars.len() != self.tensors.len() {
            bail!("EMA: {} variables for {} tracked", vars.len(), self.tensors.len());
        }
        for ((name, e), (vname, v)) in self.tensors.iter().zip(vars) {
            if name != vname || e.dims() != v.dims() {
                bail!("EMA: variable {vname} {:?} where {name} {:?} is tracked", v.dims(), e.dims());
            }
        }
        self.update_flat(&flatten(&vars.iter().map(|(_, v)| v.as_detached_tensor()).collect::<Vec<_>>())?)
    }

    /// Fold in the variables' current values given as one flat f32 buffer in the tracked order
    /// (the optimiser's, `Adam::flat_params`).
    pub fn update_flat(&mut self, w: &Tensor) -> Result<()> {
        if w.dims() != self.flat.dims() {
            bail!("EMA: a flat buffer of {:?} for {:?} tracked values", w.dims(), self.flat.dims());
        }
        let d = self.current_decay();
        let flat = (self.flat.affine(d, 0.0)? + w.affine(1.0 - d, 0.0)?).context("EMA update")?;
        self.tensors = views(&flat, &self.shapes())?;
        self.flat = flat;
        self.updates += 1;
        Ok(())
    }

    /// The averaged values as one flat f32 buffer, in the tracked order.
    pub fn flat(&self) -> &Tensor {
        &self.flat
    }

    /// Replace the averaged values with a flat buffer of the same size (e.g. rank 0's, in a
    /// data-parallel run); the update count stays.
    pub fn set_flat(&mut self, w: Tensor) -> Result<()> {
        if w.dims() != self.flat.dims() {
            bail!("EMA: a flat buffer of {:?} for {:?} tracked values", w.dims(), self.flat.dims());
        }
        self.tensors = views(&w, &self.shapes())?;
        self.flat = w;
        Ok(())
    }

    pub fn tensors(&self) -> &[(String, Tensor)] {
        &self.tensors
    }

    /// The averaged tensors by name (shallow copies).
    pub fn tensor_map(&self) -> HashMap<String, Tensor> {
        self.tensors.iter().cloned().collect()
    }

    /// Restore tensors (every tracked name, same shapes) and the update count.
    pub fn load(&mut self, t: &HashMap<String, Tensor>, updates: u64) -> Result<()> {
        let mut parts = Vec::with_capacity(self.tensors.len());
        for (name, cur) in &self.tensors {
            let x = t.get(name).with_context(|| format!("EMA state lacks {name}"))?;
            if x.dims() != cur.dims() {
                bail!("EMA state {name} has shape {:?}, expected {:?}", x.dims(), cur.dims());
            }
            parts.push(x.to_device(cur.device())?);
        }
        let flat = flatten(&parts)?;
        self.tensors = views(&flat, &self.shapes())?;
        self.flat = flat;
        self.updates = updates;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn ema_math() {
        let w = Var::from_slice(&[1.0f32, -1.0], 2, &Device::Cpu).unwrap();
        let vars = vec![("w".to_string(), w.clone())];
        let mut ema = Ema::new(&vars, 0.9, false).unwrap();
        // The EMA is a copy, not an alias of the variable.
        w.set(&Tensor::new(&[3.0f32, 1.0], &Device::Cpu).unwrap()).unwrap();
        assert_eq!(ema.tensors()[0].1.to_vec1::<f32>().unwrap(), [1.0, -1.0]);
        ema.update(&vars).unwrap();
        // 0.9 * [1, -1] + 0.1 * [3, 1] = [1.2, -0.8]
        let e = ema.tensors()[0].1.to_vec1::<f32>().unwrap();
        assert!((e[0] - 1.2).abs() < 1e-6 && (e[1] + 0.8).abs() < 1e-6, "{e:?}");
        ema.update(&vars).unwrap();
        // 0.9 * [1.2, -0.8] + 0.1 * [3, 1] = [1.38, -0.62]
        let e = ema.tensors()[0].1.to_vec1::<f32>().unwrap();
        assert!((e[0] - 1.38).abs() < 1e-6 && (e[1] + 0.62).abs() < 1e-6, "{e:?}");
        assert_eq!(ema.updates(), 2);
    }

    /// The flat update equals the per-variable one, bit for bit; shapes and names are checked.
    #[test]
    fn flat_update_equals_update() {
        let a = Var::from_slice(&[1.0f32, -1.0, 0.5, 2.0], (2, 2), &Device::Cpu).unwrap();
        let b = Var::from_slice(&[0.25f32, 3.0, -7.0], 3, &Device::Cpu).unwrap();
        let vars = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
        let mut e1 = Ema::new(&vars, 0.99, true).unwrap();
        let mut e2 = Ema::new(&vars, 0.99, true).unwrap();
        a.set(&Tensor::new(&[[0.3f32, 0.1], [9.0, -2.0]], &Device::Cpu).unwrap()).unwrap();
        b.set(&Tensor::new(&[1.5f32, -0.5, 4.0], &Device::Cpu).unwrap()).unwrap();
        e1.update(&vars).unwrap();
        let flat = Tensor::new(&[0.3f32, 0.1, 9.0, -2.0, 1.5, -0.5, 4.0], &Device::Cpu).unwrap();
        e2.update_flat(&flat).unwrap();
        for ((n1, t1), (n2, t2)) in e1.tensors().iter().zip(e2.tensors()) {
            assert_eq!(n1, n2);
            assert_eq!(t1.dims(), t2.dims());
            assert_eq!(
                t1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                t2.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        assert_eq!(e1.tensors()[0].1.dims(), [2, 2]);
        assert!(e2.update_flat(&flat.narrow(0, 0, 6).unwrap()).is_err());
        let swapped = vec![vars[1].clone(), vars[0].clone()];
        assert!(e1.update(&swapped).is_err());
    }

    #[test]
    fn warmup_ramps_the_decay() {
        let w = Var::from_slice(&[0.0f32], 1, &Device::Cpu).unwrap();
        let vars = vec![("w".to_string(), w.clone())];
        let mut ema = Ema::new(&vars, 0.999, true).unwrap();
        assert!((ema.current_decay() - 0.1).abs() < 1e-12);
        w.set(&Tensor::new(&[1.0f32], &Device::Cpu).unwrap()).unwrap();
        ema.update(&vars).unwrap();
        // d = 1/10: 0.1 * 0 + 0.9 * 1
        assert!((ema.tensors()[0].1.to_vec1::<f32>().unwrap()[0] - 0.9).abs() < 1e-6);
        assert!((ema.current_decay() - 2.0 / 11.0).abs() < 1e-12);
        let mut late = Ema::new(&vars, 0.999, true).unwrap();
        late.updates = 1_000_000;
        assert_eq!(late.current_decay(), 0.999);
    }

    #[test]
    fn the_ramp_reaches_each_decay_where_warmup_reaches_says() {
        let w = Var::from_slice(&[0.0f32], 1, &Device::Cpu).unwrap();
        let vars = vec![("w".to_string(), w)];
        for (d, at) in [(0.999, 8990), (0.9995, 17990), (0.998, 4490), (0.5, 8), (0.05, 0)] {
            assert_eq!(warmup_reaches(d), at, "decay {d}");
            let mut ema = Ema::new(&vars, d, true).unwrap();
            ema.updates = at;
            assert_eq!(ema.current_decay(), d, "decay {d} at update {at}");
            if at > 0 {
                ema.updates = at - 1;
                assert!(ema.current_decay() < d, "decay {d} before update {at}");
            }
        }
        assert_eq!(warmup_reaches(1.0), u64::MAX);
        // Round 4's 4950-step A/B: 0.999 and 0.9995 were one average, 0.998 had its own.
        assert_eq!(still_on_ramp(&[0.999, 0.998, 0.9995], 4950), vec![0.999, 0.9995]);
        assert_eq!(still_on_ramp(&[0.999, 0.998, 0.9995], 33000), Vec::<f64>::new());
    }
}
