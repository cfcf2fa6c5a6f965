//! Taped runs (`taesd_ops::taped`: the layers as one graph node, activation gradients handed
//! along the tape) vs candle's graph: the same outputs and the same gradients for every
//! parameter and for the input, encoder and decoder, f32 and bf16, NCHW and NHWC, on the CPU;
//! with the weights' gradients collected (`WeightGrads`, as training runs) and without.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use taesd::{Taesd, Variant};
use taesd_ops::{Format, WeightGrads};

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn taped_gradients_equal_the_graphs() {
    for variant in [Variant::Taef2, Variant::Taesd] {
        let cfg = variant.config();
        let vm = VarMap::new();
        let m = Taesd::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        let (enc, dec) = (m.encoder.clone().unwrap(), m.decoder.clone().unwrap());
        common::seeded_init(&vm, 1);
        let x = Var::from_tensor(&common::uniform(&mut common::rng(2), &[2, 3, 32, 40], 0.0, 1.0)).unwrap();
        let vars = common::sorted_vars(&vm);
        for dt in [DType::F32, DType::BF16] {
            for f in [Format::Nchw, Format::Nhwc] {
                for collect in [false, true] {
                    let run = |tape: bool| {
                        let wg = WeightGrads::new();
                        let active = collect.then(|| wg.activate());
                        let taping = tape.then(taesd_ops::enable_taping);
                        let z = enc.forward_in_format(&x, dt, f).unwrap().to_dtype(DType::F32).unwrap();
                        let y = dec.forward_in_format(&z, dt, f).unwrap().to_dtype(DType::F32).unwrap();
                        drop((active, taping));
                        let loss = ((&y - x.as_tensor()).unwrap().sqr().unwrap().mean_all().unwrap()
                            + z.sqr().unwrap().mean_all().unwrap())
                        .unwrap();
                        let nodes = loss.sorted_nodes().len();
                        let g = loss.backward().unwrap();
                        let mut out = vec![("output".to_string(), values(&y)), ("latents".to_string(), values(&z))];
                        out.push(("input gradient".into(), values(g.get(&x).expect("input gradient"))));
                        for (name, v) in &vars {
                            let t = match (g.get(v.as_tensor()), wg.get(v.as_tensor())) {
                                (Some(a), None) => a.clone(),
                                (None, Some(b)) => b,
                                (a, b) => panic!("{name}: graph {} collected {}", a.is_some(), b.is_some()),
                            };
                            assert_eq!(t.dims(), v.dims(), "{name}");
                            out.push((name.clone(), values(&t)));
                        }
                        (out, nodes)
                    };
                    let (graph, graph_nodes) = run(false);
                    let (taped, taped_nodes) = run(true);
                    // Taping took effect: with the weights collected, the layers' runs are a few
                    // nodes; what remains is the format conversions, the losses and (TAEF2 on
                    // the CPU) the mid-block pools' candle GroupNorm (CPU: Taesd ~105 -> ~25,
                    // Taef2 ~280 -> ~210).
                    if collect {
                        let ok = match variant {
                            Variant::Taesd => taped_nodes * 3 < graph_nodes,
                            _ => taped_nodes + 60 < graph_nodes,
                        };
                        assert!(ok, "{variant:?}: {taped_nodes} nodes taped vs {graph_nodes}");
                    }
                    for ((name, a), (_, b)) in graph.iter().zip(&taped) {
                        // `==` on values: the graph's first add onto zeros may turn a -0.0 into +0.0.
                        assert!(a == b, "{variant:?} {dt:?} {f:?} collect={collect}: {name} differs");
                    }
                }
            }
        }
    }
}

/// A taped run takes candle's own ops only through `taesd_ops::outside`: an activation they made
/// reaching a taped op is an error at the forward, not a lost gradient. Its tape serves one backward.
#[test]
fn an_untaped_activation_is_an_error() {
    let dev = Device::Cpu;
    let mut rng = common::rng(3);
    let w = Var::from_tensor(&common::normal(&mut rng, &[8, 8, 3, 3], 0.0, 0.1)).unwrap();
    let b = Var::from_tensor(&Tensor::zeros(8, DType::F32, &dev).unwrap()).unwrap();
    let x = common::normal(&mut rng, &[1, 8, 6, 6], 0.0, 1.0);
    let wg = WeightGrads::new();
    let _a = wg.activate();
    let _t = taesd_ops::enable_taping();
    let p = taesd_ops::ConvParams::new(1, 1);
    let conv = |h: &Tensor| taesd_ops::conv2d_act(h, w.as_tensor(), Some(b.as_tensor()), p, taesd_ops::Act::Relu);
    let err = taesd_ops::taped(&x, |h| conv(&(conv(h)? * 2.0)?)).unwrap_err();
    assert!(err.to_string().contains("taesd_ops::outside"), "{err}");
    // Through `outside` it runs, and the weights get their gradients.
    let y = taesd_ops::taped(&x, |h| conv(&taesd_ops::outside(&conv(h)?, |h| h * 2.0)?)).unwrap();
    y.sum_all().unwrap().backward().unwrap();
    assert!(wg.get(w.as_tensor()).is_some() && wg.get(b.as_tensor()).is_some());
    // The backward lets the run's saved tensors go as it walks the tape: a second backward through
    // the same run is an error, not a silent zero gradient.
    let err = y.sum_all().unwrap().backward().unwrap_err();
    assert!(err.to_string().contains("backpropagated twice"), "{err}");
}
