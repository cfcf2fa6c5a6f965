//! Seeded draws for the unit tests: a test's random inputs and weights are the same on every run,
//! so a failure reproduces (`Tensor::rand` and a `VarMap`'s default init draw from an unseeded
//! generator).

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// The generator of one test.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `shape` in `dt` on the CPU, uniform in `[lo, hi)`.
pub fn uniform(rng: &mut ChaCha8Rng, shape: &[usize], lo: f64, hi: f64, dt: DType) -> Tensor {
    let v: Vec<f64> = (0..shape.iter().product()).map(|_| lo + (hi - lo) * rng.random::<f64>()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dt).unwrap()
}

/// `shape` in `dt` on the CPU, normal with `mean` and `std`.
pub fn normal(rng: &mut ChaCha8Rng, shape: &[usize], mean: f64, std: f64, dt: DType) -> Tensor {
    let v: Vec<f64> = (0..shape.iter().product()).map(|_| mean + std * rng.sample::<f64, _>(StandardNormal)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dt).unwrap()
}
