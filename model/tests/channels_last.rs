//! The layers on NHWC activations (as on CUDA) vs NCHW, on the CPU. Its own test binary: the
//! other layer tests switch process-wide settings (`taesd::layers::set_use_ops`).

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use taesd::{Taesd, Variant};

mod common;
use common::grads_of;

/// Encoder and decoder with their activations in NHWC (as on CUDA) vs NCHW, on the CPU (where the
/// NHWC ops convert and run the NCHW code): identical outputs and gradients, f32 and bf16.
#[test]
fn channels_last_layers_match_nchw() {
    use taesd_ops::Format;
    for variant in [Variant::Taef2, Variant::Taesd] {
        let cfg = variant.config();
        let vm = VarMap::new();
        let m = Taesd::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        let (enc, dec) = (m.encoder.clone().unwrap(), m.decoder.clone().unwrap());
        common::seeded_init(&vm, 1);
        let x = common::uniform(&mut common::rng(2), &[2, 3, 32, 48], 0.0, 1.0);
        for dt in [DType::F32, DType::BF16] {
            let run = |f: Format| {
                let z = enc.forward_in_format(&x, dt, f).unwrap().to_dtype(DType::F32).unwrap();
                let y = dec.forward_in_format(&z, dt, f).unwrap().to_dtype(DType::F32).unwrap();
                let loss = ((&y - &x).unwrap().sqr().unwrap().mean_all().unwrap()
                    + z.sqr().unwrap().mean_all().unwrap())
                .unwrap();
                (z, y, grads_of(&vm, &loss))
            };
            let (z0, y0, g0) = run(Format::Nchw);
            let (z1, y1, g1) = run(Format::Nhwc);
            assert_eq!(z1.dims(), z0.dims());
            assert_eq!(y1.dims(), [2, 3, 32, 48]);
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(v(&z0), v(&z1), "{variant:?} {dt:?} encoder forward");
            assert_eq!(v(&y0), v(&y1), "{variant:?} {dt:?} decoder forward");
            assert_eq!(g0.len(), g1.len());
            for ((n0, a), (n1, b)) in g0.iter().zip(&g1) {
                assert_eq!(n0, n1);
                let (a, b) = (a.to_dtype(DType::F32).unwrap(), b.to_dtype(DType::F32).unwrap());
                assert_eq!(v(&a), v(&b), "{variant:?} {dt:?} grad {n0}");
            }
        }
    }
}
