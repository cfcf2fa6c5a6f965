//! Weight gradients collected by the ops off candle's graph (`taesd_ops::WeightGrads`) vs the
//! graph's own: equal bit for bit for every parameter, encoder and decoder, f32 and bf16
//! activations, NCHW and NHWC, on the CPU; and none of the collected weights is left in the graph.

mod common;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use taesd::{Taesd, Variant};
use taesd_ops::{Format, WeightGrads};

#[test]
fn collected_weight_gradients_equal_the_graphs() {
    for variant in [Variant::Taef2, Variant::Taesd] {
        let cfg = variant.config();
        let vm = VarMap::new();
        let m = Taesd::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        let (enc, dec) = (m.encoder.clone().unwrap(), m.decoder.clone().unwrap());
        common::seeded_init(&vm, 1);
        let x = common::uniform(&mut common::rng(2), &[2, 3, 32, 40], 0.0, 1.0);
        let vars = common::sorted_vars(&vm);
        for dt in [DType::F32, DType::BF16] {
            for f in [Format::Nchw, Format::Nhwc] {
                let run = |collect: bool| {
                    let wg = WeightGrads::new();
                    let active = collect.then(|| wg.activate());
                    let z = enc.forward_in_format(&x, dt, f).unwrap().to_dtype(DType::F32).unwrap();
                    let y = dec.forward_in_format(&z, dt, f).unwrap().to_dtype(DType::F32).unwrap();
                    drop(active);
                    let loss = ((&y - &x).unwrap().sqr().unwrap().mean_all().unwrap()
                        + z.sqr().unwrap().mean_all().unwrap())
                    .unwrap();
                    let g = loss.backward().unwrap();
                    let mut in_graph = 0;
                    let grads: Vec<Vec<f32>> = vars
                        .iter()
                        .map(|(name, v)| {
                            let (a, b) = (g.get(v.as_tensor()), wg.get(v.as_tensor()));
                            in_graph += a.is_some() as usize;
                            let t = match (a, b) {
                                (Some(a), None) => a.clone(),
                                (None, Some(b)) => b,
                                (a, b) => panic!("{name}: graph {} collected {}", a.is_some(), b.is_some()),
                            };
                            assert_eq!(t.dims(), v.dims(), "{name}");
                            t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
                        })
                        .collect();
                    (grads, in_graph, wg.len())
                };
                let (g0, graph0, collected0) = run(false);
                let (g1, graph1, collected1) = run(true);
                assert_eq!(collected0, 0);
                assert_eq!(graph0, vars.len());
                // Every conv weight and bias is collected; only the pools' GroupNorms (candle_nn) stay.
                assert!(
                    collected1 > 0 && graph1 + collected1 == vars.len(),
                    "{variant:?}: {graph1} in the graph, {collected1} collected"
                );
                let norms = vars.iter().filter(|(n, _)| n.contains(".pool.1.")).count();
                assert_eq!(graph1, norms, "{variant:?} {dt:?} {f:?}: weights left in the graph");
                for ((name, _), (a, b)) in vars.iter().zip(g0.iter().zip(&g1)) {
                    assert_eq!(a, b, "{variant:?} {dt:?} {f:?} {name}");
                }
            }
        }
    }
}
