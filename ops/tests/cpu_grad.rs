//! CPU checks of taesd-ops against candle's stock ops (values and gradients) and against finite
//! differences, and of the fused Adam against the published update rule.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use taesd_ops::{adam_update, add_relu, conv2d_act, stock, upsample_nearest2x, Act, AdamStep, ConvParams, Format};

fn randn(rng: &mut ChaCha8Rng, shape: &[usize], dt: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dt).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a: Vec<f64> = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f64> = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

fn max_abs(a: &Tensor) -> f64 {
    a.to_dtype(DType::F64).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
}

fn assert_close(got: &Tensor, want: &Tensor, rel: f64, what: &str) {
    let d = max_abs_diff(got, want);
    let scale = max_abs(want).max(1e-12);
    assert!(d <= rel * scale, "{what}: max |diff| {d:e}, max |want| {scale:e}, rel {:e}", d / scale);
}

struct Case {
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    pad: usize,
    bias: bool,
    act: Act,
    hw: usize,
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for &(k, stride, pad) in &[(1, 1, 0), (3, 1, 1), (3, 1, 0), (3, 2, 1), (3, 2, 0), (4, 2, 1), (4, 1, 1), (1, 2, 0)] {
        for &bias in &[false, true] {
            for &act in &[Act::None, Act::Relu] {
                // Odd and even sizes (stride 2 drops a row for odd sizes).
                for &hw in &[8, 9] {
                    v.push(Case { c_in: 3, c_out: 5, k, stride, pad, bias, act, hw });
                }
            }
        }
    }
    v
}

/// Forward values and the gradients of `sum(y * r)` for x, w, b: ours vs candle's stock ops.
#[test]
fn conv_matches_candle_values_and_grads() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for c in cases() {
        let what = format!("k{} s{} p{} bias {} {:?} {}x{}", c.k, c.stride, c.pad, c.bias, c.act, c.hw, c.hw);
        let x = Var::from_tensor(&randn(&mut rng, &[2, c.c_in, c.hw, c.hw], DType::F32))?;
        let w = Var::from_tensor(&randn(&mut rng, &[c.c_out, c.c_in, c.k, c.k], DType::F32))?;
        let b = Var::from_tensor(&randn(&mut rng, &[c.c_out], DType::F32))?;
        let p = ConvParams::new(c.stride, c.pad);
        let bias = c.bias.then(|| b.as_tensor());
        let ours = conv2d_act(&x, &w, bias, p, c.act)?;
        let want = stock(&x, &w, bias, p, c.act)?;
        assert_close(&ours, &want, 1e-6, &format!("{what}: forward"));
        let r = randn(&mut rng, ours.dims(), DType::F32);
        let g_ours = (ours * &r)?.sum_all()?.backward()?;
        let g_want = (want * &r)?.sum_all()?.backward()?;
        for (name, v) in [("x", &x), ("w", &w)] {
            let a = g_ours.get(v).unwrap();
            let e = g_want.get(v).unwrap();
            assert_close(a, e, 1e-5, &format!("{what}: d{name}"));
        }
        if c.bias {
            assert_close(g_ours.get(&b).unwrap(), g_want.get(&b).unwrap(), 1e-5, &format!("{what}: db"));
        } else {
            assert!(g_ours.get(&b).is_none());
        }
    }
    Ok(())
}

/// Mixed precision on the CPU: bf16 activations with f32 master weights (cast on use, as the
/// model does). Values and gradients equal the f32 computation on the same bf16-valued operands
/// rounded once (tensor-core semantics), within one bf16 rounding (2^-8 relative); the weight
/// and bias gradients come back f32.
#[test]
fn bf16_conv_is_the_f32_conv_of_bf16_operands_rounded_once() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for c in cases() {
        let what = format!("bf16 k{} s{} p{} bias {} {:?} {}", c.k, c.stride, c.pad, c.bias, c.act, c.hw);
        let round = |t: Tensor| t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
        let x0 = round(randn(&mut rng, &[2, c.c_in, c.hw, c.hw], DType::F32));
        let w0 = round(randn(&mut rng, &[c.c_out, c.c_in, c.k, c.k], DType::F32));
        let b0 = round(randn(&mut rng, &[c.c_out], DType::F32));
        let p = ConvParams::new(c.stride, c.pad);
        // bf16 activations, f32 weights.
        let xh = Var::from_tensor(&x0.to_dtype(DType::BF16)?)?;
        let (wh, bh) = (Var::from_tensor(&w0)?, Var::from_tensor(&b0)?);
        let yh = conv2d_act(&xh, &wh, c.bias.then(|| bh.as_tensor()), p, c.act)?;
        assert_eq!(yh.dtype(), DType::BF16, "{what}");
        // f32 reference on the same values.
        let (xf, wf, bf) = (Var::from_tensor(&x0)?, Var::from_tensor(&w0)?, Var::from_tensor(&b0)?);
        let yf = conv2d_act(&xf, &wf, c.bias.then(|| bf.as_tensor()), p, c.act)?;
        assert_close(&yh, &yf, 1e-2, &format!("{what}: forward"));
        let r = round(randn(&mut rng, yf.dims(), DType::F32));
        let gh = (yh.to_dtype(DType::F32)? * &r)?.sum_all()?.backward()?;
        let gf = (yf * &r)?.sum_all()?.backward()?;
        assert_eq!(gh.get(&xh).unwrap().dtype(), DType::BF16, "{what}");
        assert_eq!(gh.get(&wh).unwrap().dtype(), DType::F32, "{what}: master weight gradient");
        assert_close(gh.get(&xh).unwrap(), gf.get(&xf).unwrap(), 2e-2, &format!("{what}: dx"));
        assert_close(gh.get(&wh).unwrap(), gf.get(&wf).unwrap(), 2e-2, &format!("{what}: dw"));
        if c.bias {
            assert_close(gh.get(&bh).unwrap(), gf.get(&bf).unwrap(), 2e-2, &format!("{what}: db"));
        }
    }
    Ok(())
}

/// A directional finite difference of `L(t) = sum(f(t) * r)` in f64 vs the backward.
fn check_fd(
    what: &str,
    inputs: &[Var],
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    rng: &mut ChaCha8Rng,
    eps: f64,
    tol: f64,
) -> Result<()> {
    let xs: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&xs)?;
    let r = randn(rng, y.dims(), DType::F64);
    let grads = (&y * &r)?.sum_all()?.backward()?;
    for (i, v) in inputs.iter().enumerate() {
        let d = randn(rng, v.dims(), DType::F64);
        let loss = |sign: f64| -> Result<f64> {
            let mut xs: Vec<Tensor> = inputs.iter().map(|v| v.as_detached_tensor()).collect();
            xs[i] = (&xs[i] + (&d * (sign * eps))?)?;
            (f(&xs)? * &r)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()
        };
        let fd = (loss(1.0)? - loss(-1.0)?) / (2.0 * eps);
        let an = (grads.get(v).unwrap() * &d)?.sum_all()?.to_scalar::<f64>()?;
        let err = (fd - an).abs() / an.abs().max(1.0);
        assert!(err < tol, "{what} input {i}: finite difference {fd}, backward {an}, rel err {err:e}");
    }
    Ok(())
}

#[test]
fn conv_matches_finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for c in cases().into_iter().filter(|c| c.hw == 9 || c.stride == 1) {
        let what = format!("conv k{} s{} p{} bias {} {:?}", c.k, c.stride, c.pad, c.bias, c.act);
        let x = Var::from_tensor(&randn(&mut rng, &[2, c.c_in, c.hw, c.hw], DType::F64))?;
        let w = Var::from_tensor(&randn(&mut rng, &[c.c_out, c.c_in, c.k, c.k], DType::F64))?;
        let b = Var::from_tensor(&randn(&mut rng, &[c.c_out], DType::F64))?;
        let p = ConvParams::new(c.stride, c.pad);
        let (bias, act) = (c.bias, c.act);
        let f = move |t: &[Tensor]| conv2d_act(&t[0], &t[1], if bias { Some(&t[2]) } else { None }, p, act);
        let vars = if bias { vec![x, w, b] } else { vec![x, w] };
        // In f64 the ops are exact; the ReLU has many kinks near 0 (small 1x1 outputs): a tiny
        // step, a tight tolerance.
        let eps = if act == Act::Relu { 1e-7 } else { 1e-3 };
        check_fd(&what, &vars, &f, &mut rng, eps, 1e-6)?;
    }
    Ok(())
}

#[test]
fn upsample_and_add_relu_match_candle_and_finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for &(h, w) in &[(4, 4), (3, 5), (1, 1)] {
        let x = Var::from_tensor(&randn(&mut rng, &[2, 3, h, w], DType::F32))?;
        let ours = upsample_nearest2x(&x, Format::Nchw)?;
        let want = x.upsample_nearest2d(2 * h, 2 * w)?;
        assert_eq!(max_abs_diff(&ours, &want), 0.0, "upsample {h}x{w}");
        let r = randn(&mut rng, ours.dims(), DType::F32);
        let go = (ours * &r)?.sum_all()?.backward()?;
        let gw = (want * &r)?.sum_all()?.backward()?;
        assert_close(go.get(&x).unwrap(), gw.get(&x).unwrap(), 1e-6, "upsample grad");

        let a = Var::from_tensor(&randn(&mut rng, &[2, 3, h, w], DType::F32))?;
        let b = Var::from_tensor(&randn(&mut rng, &[2, 3, h, w], DType::F32))?;
        let ours = add_relu(&a, &b)?;
        let want = (a.as_tensor() + b.as_tensor())?.relu()?;
        assert_eq!(max_abs_diff(&ours, &want), 0.0, "add_relu {h}x{w}");
        let r = randn(&mut rng, ours.dims(), DType::F32);
        let go = (ours * &r)?.sum_all()?.backward()?;
        let gw = (want * &r)?.sum_all()?.backward()?;
        for v in [&a, &b] {
            assert_eq!(max_abs_diff(go.get(v).unwrap(), gw.get(v).unwrap()), 0.0, "add_relu grad");
        }
    }
    let x = Var::from_tensor(&randn(&mut rng, &[2, 3, 3, 4], DType::F64))?;
    check_fd("upsample", &[x], &|t| upsample_nearest2x(&t[0], Format::Nchw), &mut rng, 1e-2, 1e-6)?;
    let a = Var::from_tensor(&randn(&mut rng, &[2, 3, 3, 4], DType::F64))?;
    let b = Var::from_tensor(&randn(&mut rng, &[2, 3, 3, 4], DType::F64))?;
    check_fd("add_relu", &[a, b], &|t| add_relu(&t[0], &t[1]), &mut rng, 1e-3, 1e-2)?;
    Ok(())
}

/// A TAESD-like chain (conv-ReLU, conv, residual add_relu, upsample, stride-2 conv): ours vs
/// candle's stock ops end to end.
#[test]
fn chain_matches_candle() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let x = Var::from_tensor(&randn(&mut rng, &[2, 4, 8, 8], DType::F32))?;
    let w1 = Var::from_tensor(&randn(&mut rng, &[8, 4, 3, 3], DType::F32))?;
    let b1 = Var::from_tensor(&randn(&mut rng, &[8], DType::F32))?;
    let w2 = Var::from_tensor(&randn(&mut rng, &[4, 8, 3, 3], DType::F32))?;
    let b2 = Var::from_tensor(&randn(&mut rng, &[4], DType::F32))?;
    let w3 = Var::from_tensor(&randn(&mut rng, &[4, 4, 3, 3], DType::F32))?;
    let p1 = ConvParams::new(1, 1);
    let p2 = ConvParams::new(2, 1);
    let ours = {
        let h = conv2d_act(&x, &w1, Some(&b1), p1, Act::Relu)?;
        let h = conv2d_act(&h, &w2, Some(&b2), p1, Act::None)?;
        let h = add_relu(&h, &x)?;
        let h = upsample_nearest2x(&h, Format::Nchw)?;
        conv2d_act(&h, &w3, None, p2, Act::None)?
    };
    let want = {
        let h = stock(&x, &w1, Some(&b1), p1, Act::Relu)?;
        let h = stock(&h, &w2, Some(&b2), p1, Act::None)?;
        let h = (h + x.as_tensor())?.relu()?;
        let h = h.upsample_nearest2d(16, 16)?;
        stock(&h, &w3, None, p2, Act::None)?
    };
    assert_close(&ours, &want, 1e-5, "chain forward");
    let go = ours.sqr()?.sum_all()?.backward()?;
    let gw = want.sqr()?.sum_all()?.backward()?;
    for (n, v) in [("x", &x), ("w1", &w1), ("b1", &b1), ("w2", &w2), ("b2", &b2), ("w3", &w3)] {
        assert_close(go.get(v).unwrap(), gw.get(v).unwrap(), 1e-5, n);
    }
    Ok(())
}

/// Adam / AMSGrad / AdamW: the fused update vs the published rule in f64 (PyTorch's
/// formulation), over several steps.
#[test]
fn adam_matches_reference_rule() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let n = 257;
    for &(amsgrad, decoupled, wd, scaled) in &[
        (false, false, 0.0, false),
        (true, false, 0.0, false),
        (true, false, 0.1, true),
        (false, true, 0.01, false),
        (true, true, 0.01, true),
    ] {
        let mut p: Vec<f64> = (0..n).map(|_| rng.random::<f64>() - 0.5).collect();
        let (mut m, mut v, mut vm) = (vec![0f64; n], vec![0f64; n], vec![0f64; n]);
        let f32t = |x: &[f64]| Tensor::from_vec(x.iter().map(|&a| a as f32).collect::<Vec<_>>(), n, &Device::Cpu);
        let mut pt = f32t(&p)?;
        let mut mt = f32t(&m)?;
        let mut vt = f32t(&v)?;
        let mut vmt = amsgrad.then(|| f32t(&vm)).transpose()?;
        let (lr, b1, b2, eps) = (1e-3, 0.9, 0.99, 1e-8);
        for step in 1..=5u64 {
            let g: Vec<f64> =
                (0..n).map(|_| (rng.random::<f64>() - 0.5) * 10f64.powi(rng.random_range(-3..2))).collect();
            let scale = if scaled { 0.5 } else { 1.0 };
            let h =
                AdamStep { lr, beta1: b1, beta2: b2, eps, weight_decay: wd, decoupled_weight_decay: decoupled, step };
            let st = Tensor::new(scale as f32, &Device::Cpu)?;
            let out = adam_update(&pt, &f32t(&g)?, &mt, &vt, vmt.as_ref(), scaled.then_some(&st), &h)?;
            // The reference, in f64.
            let bc1 = 1.0 - b1.powi(step as i32);
            let bc2 = 1.0 - b2.powi(step as i32);
            for i in 0..n {
                let mut gi = g[i] * scale;
                if decoupled {
                    p[i] *= 1.0 - lr * wd;
                } else {
                    gi += wd * p[i];
                }
                m[i] = b1 * m[i] + (1.0 - b1) * gi;
                v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                vm[i] = vm[i].max(v[i]);
                let s = if amsgrad { vm[i] } else { v[i] };
                p[i] -= lr / bc1 * m[i] / (s.sqrt() / bc2.sqrt() + eps);
            }
            let what = format!("amsgrad {amsgrad} decoupled {decoupled} wd {wd} step {step}");
            assert_close(&out.p, &Tensor::new(p.as_slice(), &Device::Cpu)?, 1e-6, &format!("{what}: p"));
            assert_close(&out.m, &Tensor::new(m.as_slice(), &Device::Cpu)?, 1e-5, &format!("{what}: m"));
            assert_close(&out.v, &Tensor::new(v.as_slice(), &Device::Cpu)?, 1e-5, &format!("{what}: v"));
            assert_eq!(out.vmax.is_some(), amsgrad);
            pt = out.p;
            mt = out.m;
            vt = out.v;
            vmt = out.vmax;
        }
    }
    Ok(())
}

/// The candle op sequence of train/src/recipe/optim.rs (PyTorch's formulas, f32): the fused CPU
/// update is bit-identical to it.
#[test]
fn adam_is_bit_identical_to_the_op_sequence() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let n = 1000;
    let p = randn(&mut rng, &[n], DType::F32);
    let g = (randn(&mut rng, &[n], DType::F32) * 0.3)?;
    let m = (randn(&mut rng, &[n], DType::F32) * 0.01)?;
    let v = randn(&mut rng, &[n], DType::F32).sqr()?.affine(1e-4, 0.0)?;
    let vmax = (v.clone() * 1.5)?;
    let scale = Tensor::new(0.7f32, &Device::Cpu)?;
    for &(decoupled, wd) in &[(false, 0.0), (false, 0.05), (true, 0.01)] {
        let (lr, b1, b2, eps, t) = (3e-4, 0.9, 0.999, 1e-8, 7);
        let h =
            AdamStep { lr, beta1: b1, beta2: b2, eps, weight_decay: wd, decoupled_weight_decay: decoupled, step: t };
        let out = adam_update(&p, &g, &m, &v, Some(&vmax), Some(&scale), &h)?;
        let bc1 = 1.0 - f64::powi(b1, t as i32);
        let bc2 = 1.0 - f64::powi(b2, t as i32);
        let mut grad = g.broadcast_mul(&scale)?;
        let mut pp = p.clone();
        if wd != 0.0 {
            if decoupled {
                pp = pp.affine(1.0 - lr * wd, 0.0)?;
            } else {
                grad = (grad + pp.affine(wd, 0.0)?)?;
            }
        }
        let m2 = (&m + (&grad - &m)?.affine(1.0 - b1, 0.0)?)?;
        let v2 = (v.affine(b2, 0.0)? + grad.sqr()?.affine(1.0 - b2, 0.0)?)?;
        let vm2 = vmax.maximum(&v2)?;
        let denom = vm2.sqrt()?.affine(1.0 / bc2.sqrt(), eps)?;
        let p2 = (pp - (&m2 / denom)?.affine(lr / bc1, 0.0)?)?;
        for (a, b, what) in
            [(&out.p, &p2, "p"), (&out.m, &m2, "m"), (&out.v, &v2, "v"), (out.vmax.as_ref().unwrap(), &vm2, "vmax")]
        {
            assert_eq!(max_abs_diff(a, b), 0.0, "{what} (decoupled {decoupled}, wd {wd})");
        }
    }
    Ok(())
}

/// The CPU backward-data path (conv2d of the flipped weight) is much faster than candle's
/// conv_transpose2d; print the time of one 4x64x32x32 3x3 conv fwd+bwd (informative).
#[test]
fn cpu_conv_backward_time() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let x = Var::from_tensor(&randn(&mut rng, &[4, 64, 32, 32], DType::F32))?;
    let w = Var::from_tensor(&randn(&mut rng, &[64, 64, 3, 3], DType::F32))?;
    let b = Var::from_tensor(&randn(&mut rng, &[64], DType::F32))?;
    let p = ConvParams::new(1, 1);
    for (name, ours) in [("taesd-ops", true), ("candle", false)] {
        let t0 = std::time::Instant::now();
        let reps = 3;
        for _ in 0..reps {
            let y =
                if ours { conv2d_act(&x, &w, Some(&b), p, Act::Relu)? } else { stock(&x, &w, Some(&b), p, Act::Relu)? };
            let _ = y.sum_all()?.backward()?;
        }
        println!("{name}: 4x64x32x32 3x3 conv fwd+bwd {:.1} ms", t0.elapsed().as_secs_f64() * 1e3 / reps as f64);
    }
    Ok(())
}
