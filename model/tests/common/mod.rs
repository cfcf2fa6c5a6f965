//! Helpers shared by the layer tests.

use candle_core::{Tensor, Var};
use candle_nn::VarMap;

/// The gradient of `loss` for every variable of `vm`, sorted by name.
pub fn grads_of(vm: &VarMap, loss: &Tensor) -> Vec<(String, Tensor)> {
    let g = loss.backward().unwrap();
    let data = vm.data().lock().unwrap();
    let mut v: Vec<(String, Tensor)> = data
        .iter()
        .map(|(k, var): (&String, &Var)| (k.clone(), g.get(var).expect(k).clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
