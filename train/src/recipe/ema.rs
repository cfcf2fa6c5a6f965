//! Exponential moving average of a set of weights: `ema = d * ema + (1 - d) * w` after every
//! applied update, with `d = min(decay, (1 + n) / (10 + n))` when warm-up is on (n = updates
//! so far). The EMA tensors are never modified in place: every update makes new tensors, so a
//! model built on them (a preview, an export) is a stable snapshot.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};

pub struct Ema {
    decay: f64,
    warmup: bool,
    /// (name, tensor), in the order of the tracked variables.
    tensors: Vec<(String, Tensor)>,
    updates: u64,
}

impl Ema {
    /// Start the average at the variables' current values (a copy).
    pub fn new(vars: &[(String, Var)], decay: f64, warmup: bool) -> Result<Self> {
        let tensors = vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_detached_tensor().copy()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            decay,
            warmup,
            tensors,
            updates: 0,
        })
    }

    pub fn set_decay(&mut self, decay: f64, warmup: bool) {
        self.decay = decay;
        self.warmup = warmup;
    }

    /// The decay the next update uses.
    pub fn current_decay(&self) -> f64 {
        if self.warmup {
            let n = self.updates as f64;
            self.decay.min((1.0 + n) / (10.0 + n))
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
            bail!(
                "EMA: {} variables for {} tracked",
                vars.len(),
                self.tensors.len()
            );
        }
        let d = self.current_decay();
        let mut next = Vec::with_capacity(self.tensors.len());
        for ((name, e), (vname, v)) in self.tensors.iter().zip(vars) {
            debug_assert_eq!(name, vname);
            let w = v.as_detached_tensor();
            let e = (e.affine(d, 0.0)? + w.affine(1.0 - d, 0.0)?)
                .with_context(|| format!("EMA of {name}"))?;
            next.push((name.clone(), e));
        }
        self.tensors = next;
        self.updates += 1;
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
        let mut next = Vec::with_capacity(self.tensors.len());
        for (name, cur) in &self.tensors {
            let x = t
                .get(name)
                .with_context(|| format!("EMA state lacks {name}"))?;
            if x.dims() != cur.dims() {
                bail!(
                    "EMA state {name} has shape {:?}, expected {:?}",
                    x.dims(),
                    cur.dims()
                );
            }
            next.push((
                name.clone(),
                x.to_dtype(DType::F32)?.to_device(cur.device())?,
            ));
        }
        self.tensors = next;
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
        w.set(&Tensor::new(&[3.0f32, 1.0], &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(ema.tensors()[0].1.to_vec1::<f32>().unwrap(), [1.0, -1.0]);
        ema.update(&vars).unwrap();
        // 0.9 * [1, -1] + 0.1 * [3, 1] = [1.2, -0.8]
        let e = ema.tensors()[0].1.to_vec1::<f32>().unwrap();
        assert!(
            (e[0] - 1.2).abs() < 1e-6 && (e[1] + 0.8).abs() < 1e-6,
            "{e:?}"
        );
        ema.update(&vars).unwrap();
        // 0.9 * [1.2, -0.8] + 0.1 * [3, 1] = [1.38, -0.62]
        let e = ema.tensors()[0].1.to_vec1::<f32>().unwrap();
        assert!(
            (e[0] - 1.38).abs() < 1e-6 && (e[1] + 0.62).abs() < 1e-6,
            "{e:?}"
        );
        assert_eq!(ema.updates(), 2);
    }

    #[test]
    fn warmup_ramps_the_decay() {
        let w = Var::from_slice(&[0.0f32], 1, &Device::Cpu).unwrap();
        let vars = vec![("w".to_string(), w.clone())];
        let mut ema = Ema::new(&vars, 0.999, true).unwrap();
        assert!((ema.current_decay() - 0.1).abs() < 1e-12);
        w.set(&Tensor::new(&[1.0f32], &Device::Cpu).unwrap())
            .unwrap();
        ema.update(&vars).unwrap();
        // d = 1/10: 0.1 * 0 + 0.9 * 1
        assert!((ema.tensors()[0].1.to_vec1::<f32>().unwrap()[0] - 0.9).abs() < 1e-6);
        assert!((ema.current_decay() - 2.0 / 11.0).abs() < 1e-12);
        let mut late = Ema::new(&vars, 0.999, true).unwrap();
        late.updates = 1_000_000;
        assert_eq!(late.current_decay(), 0.999);
    }
}
