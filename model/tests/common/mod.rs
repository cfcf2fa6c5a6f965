//! Helpers shared by the layer tests.

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// The variables of `vm`, sorted by name.
pub fn sorted_vars(vm: &VarMap) -> Vec<(String, Var)> {
    let data = vm.data().lock().unwrap();
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, var)| (k.clone(), var.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The gradient of `loss` for every variable of `vm`, sorted by name.
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn grads_of(vm: &VarMap, loss: &Tensor) -> Vec<(String, Tensor)> {
    let g = loss.backward().unwrap();
    sorted_vars(vm)
        .into_iter()
        .map(|(k, var)| {
            let t = g.get(&var).expect(&k).clone();
            (k, t)
        })
        .collect()
}

/// The generator of one test: its random inputs and weights are the same on every run, so a
/// failure reproduces (`Tensor::rand` and a `VarMap`'s default init draw from an unseeded one).
#[allow(dead_code)]
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `shape` normal with `mean` and `std` from `rng`, f32 on the CPU.
#[allow(dead_code)]
pub fn normal(rng: &mut ChaCha8Rng, shape: &[usize], mean: f32, std: f32) -> Tensor {
    let v: Vec<f32> = (0..shape.iter().product()).map(|_| mean + std * rng.sample::<f32, _>(StandardNormal)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `shape` uniform in [lo, hi) from `rng`, f32 on the CPU.
#[allow(dead_code)]
pub fn uniform(rng: &mut ChaCha8Rng, shape: &[usize], lo: f32, hi: f32) -> Tensor {
    let v: Vec<f32> = (0..shape.iter().product()).map(|_| lo + (hi - lo) * rng.random::<f32>()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Every variable of `vm` from `seed`, as PyTorch initialises them ([`taesd::torch_default_init`]).
/// candle's own init draws from an unseeded generator at a larger scale (Kaiming normal): a test
/// whose tolerance depends on the weights then passes on most runs only.
#[allow(dead_code)]
pub fn seeded_init(vm: &VarMap, seed: u64) {
    let shapes: Vec<(String, Vec<usize>)> = sorted_vars(vm).into_iter().map(|(n, v)| (n, v.dims().to_vec())).collect();
    taesd::torch_default_init(vm, &shapes, &mut rng(seed), &Device::Cpu).unwrap();
}
