//! PyTorch's default initialisation of fresh variables, from a seeded generator (the same
//! weights on every machine, for a run's seed or a test's).

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::error::{CandleContext, Result, TaesdError};

/// PyTorch's default initialisation, drawn from `rng` in the order of `shapes`: weights of
/// rank 4 (convs) and the biases beside them uniform in ±1/sqrt(fan_in); other `*.weight`
/// (norms) 1, other `*.bias` 0. The variables are f32, on `device`.
pub fn torch_default_init(
    vm: &VarMap,
    shapes: &[(String, Vec<usize>)],
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Result<()> {
    let rank4: HashMap<&str, &Vec<usize>> =
        shapes.iter().filter(|(_, s)| s.len() == 4).map(|(n, s)| (n.as_str(), s)).collect();
    let data = vm.data().lock().expect("VarMap lock");
    for (name, shape) in shapes {
        let var = data.get(name).ok_or_else(|| TaesdError::Other(format!("initialising: no variable {name}")))?;
        let n: usize = shape.iter().product();
        let conv_shape = if shape.len() == 4 {
            Some(shape)
        } else {
            name.strip_suffix(".bias").and_then(|p| rank4.get(format!("{p}.weight").as_str()).copied())
        };
        let values: Vec<f32> = match conv_shape {
            Some(w) => {
                let fan_in: usize = w[1..].iter().product();
                let bound = 1.0 / (fan_in as f32).sqrt();
                (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * bound).collect()
            }
            None if name.ends_with(".weight") => vec![1.0; n],
            None => vec![0.0; n],
        };
        Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)
            .and_then(|t| t.to_device(device))
            .and_then(|t| var.set(&t))
            .ctx(|| format!("initialising {name}"))?;
    }
    Ok(())
}
