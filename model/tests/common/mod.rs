//! Helpers shared by the layer tests.

use candle_core::{Tensor, Var};
use candle_nn::VarMap;

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
