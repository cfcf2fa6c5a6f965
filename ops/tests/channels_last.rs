//! Every op in NHWC against the same op in NCHW on the CPU: values and gradients (input, weights,
//! biases) must be equal bit for bit once the NHWC results are turned back into NCHW (the CPU
//! runs NHWC by converting: `taesd_ops::Format`). The CUDA kernels of the NHWC paths are checked
//! against these on the GPU (train/examples/gpu_check.rs).

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use taesd_ops::{add_relu, block, conv2d_act, upsample_nearest2x, Act, BlockParams, ConvParams, Format};

fn randn(rng: &mut ChaCha8Rng, shape: &[usize], dt: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (rng.random::<f64>() * 2.0 - 1.0) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dt).unwrap()
}

fn bits(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// A TAESD-like chain in `f` on NCHW input `x`: conv-ReLU, 4x4 stride-2 conv, a fused block with
/// a skip conv, upsample, 1x1 conv, residual add_relu, 3-channel output conv. Returns NCHW.
fn chain(x: &Tensor, ws: &[Var], f: Format) -> Result<Tensor> {
    let p = |s, pad| ConvParams::new(s, pad).with_format(f);
    let h = f.from_nchw(x)?;
    let h = conv2d_act(&h, &ws[0], Some(&ws[1]), p(1, 1), Act::Relu)?;
    let h = conv2d_act(&h, &ws[2], None, p(2, 1), Act::None)?;
    let bp =
        BlockParams { convs: [(&ws[3], &ws[4]), (&ws[5], &ws[6]), (&ws[7], &ws[8])], skip: Some(&ws[9]), format: f };
    let h = block(&h, &bp)?;
    let h = upsample_nearest2x(&h, f)?;
    let s = conv2d_act(&h, &ws[10], None, p(1, 0), Act::None)?;
    let h = add_relu(&h, &s)?;
    let y = conv2d_act(&h, &ws[11], Some(&ws[12]), p(1, 1), Act::None)?;
    f.to_nchw(&y)
}

fn check(dt: DType, seed: u64) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let shapes: Vec<Vec<usize>> = vec![
        vec![8, 5, 3, 3],
        vec![8],
        vec![6, 8, 4, 4],
        vec![7, 6, 3, 3],
        vec![7],
        vec![7, 7, 3, 3],
        vec![7],
        vec![7, 7, 3, 3],
        vec![7],
        vec![7, 6, 1, 1],
        vec![7, 7, 1, 1],
        vec![3, 7, 3, 3],
        vec![3],
    ];
    let ws: Vec<Var> = shapes
        .iter()
        .map(|s| Var::from_tensor(&randn(&mut rng, s, DType::F32).affine(0.4, 0.0).unwrap()).unwrap())
        .collect();
    let x = Var::from_tensor(&randn(&mut rng, &[2, 5, 8, 10], dt))?;
    let r = randn(&mut rng, &[2, 3, 8, 10], DType::F32);
    let run = |f: Format| -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
        let y = chain(x.as_tensor(), &ws, f)?;
        let g = (y.to_dtype(DType::F32)? * &r)?.sum_all()?.backward()?;
        let mut grads = vec![bits(g.get(x.as_tensor()).expect("input gradient"))];
        for w in &ws {
            grads.push(bits(g.get(w.as_tensor()).expect("weight gradient")));
        }
        Ok((bits(&y), grads))
    };
    let (y0, g0) = run(Format::Nchw)?;
    let (y1, g1) = run(Format::Nhwc)?;
    assert!(y0.iter().any(|v| *v != 0.0));
    assert_eq!(y0, y1, "{dt:?} forward");
    for (i, (a, b)) in g0.iter().zip(&g1).enumerate() {
        assert!(a.iter().any(|v| *v != 0.0), "{dt:?} gradient {i} is all zero");
        assert_eq!(a, b, "{dt:?} gradient {i} (0 = input, then the weights in order)");
    }
    Ok(())
}

#[test]
fn nhwc_equals_nchw_f32() -> Result<()> {
    check(DType::F32, 1)
}

#[test]
fn nhwc_equals_nchw_bf16_activations() -> Result<()> {
    check(DType::BF16, 2)
}

#[test]
fn nhwc_refuses_a_wrong_channel_count() {
    let d = Device::Cpu;
    let x = Tensor::zeros((1, 4, 4, 3), DType::F32, &d).unwrap(); // NHWC, 3 channels
    let w = Tensor::zeros((2, 4, 3, 3), DType::F32, &d).unwrap(); // expects 4 channels
    let e = conv2d_act(&x, &w, None, ConvParams::new(1, 1).with_format(Format::Nhwc), Act::None).unwrap_err();
    assert!(e.to_string().contains("3 channels"), "{e}");
    // The same tensor read as NCHW has 4 channels and passes.
    assert!(conv2d_act(&x, &w, None, ConvParams::new(1, 1), Act::None).is_ok());
}
