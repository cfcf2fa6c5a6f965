//! The loss terms: pixel and latent distances, the low-resolution MSE, the frequency-amplitude
//! term, and seraena's discriminator correction.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};

use super::disc::{BnStats, DiscConfig, Discriminator};

/// Mean squared error (0-dim).
pub fn mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a - b)?.sqr()?.mean_all()?)
}

/// Mean absolute error (0-dim).
pub fn l1(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a - b)?.abs()?.mean_all()?)
}

/// `MSE(avg_pool(decoded, f), avg_pool(real, f))`: the faint colour/low-frequency anchor. Rows
/// and columns beyond a multiple of `f` are ignored (as `avg_pool2d` does).
pub fn lowres_mse(decoded: &Tensor, real: &Tensor, factor: usize) -> Result<Tensor> {
    if factor <= 1 {
        return mse(decoded, real);
    }
    mse(&decoded.avg_pool2d(factor)?, &real.avg_pool2d(factor)?)
}

/// The part of `x` `[B, C, H, W]` that `f`-pooling removes: `x - upsample(avg_pool(x, f))`
/// (nearest upsampling), over the top-left `H/f*f x W/f*f` pixels: edges, texture, noise.
pub fn highpass(x: &Tensor, factor: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (h, w) = (h / factor * factor, w / factor * factor);
    if h == 0 || w == 0 {
        bail!("highpass: a {}x{} image is smaller than the pooling factor {factor}", x.dim(2)?, x.dim(3)?);
    }
    let x = x.narrow(2, 0, h)?.narrow(3, 0, w)?;
    Ok((&x - x.avg_pool2d(factor)?.upsample_nearest2d(h, w)?)?)
}

/// `MSE(highpass(decoded), highpass(anchor))`: the detail term. `anchor` is the initial
/// decoder's output on the same latents (detached), so a fine-tune keeps that decoder's detail
/// while the low-resolution term (the other band) moves its colours towards the images.
pub fn detail_mse(decoded: &Tensor, anchor: &Tensor, factor: usize) -> Result<Tensor> {
    mse(&highpass(decoded, factor)?, &highpass(&anchor.detach(), factor)?)
}

/// The orthonormal 2-D DFT of `p x p` patches as real matmuls: with
/// `C[k, n] = cos(2 pi k n / p) / sqrt(p)` and `S[k, n] = sin(2 pi k n / p) / sqrt(p)`, the
/// transform of a patch `P` is `F P F` with `F = C - iS` (symmetric), i.e.
/// `Re = C P C - S P S`, `Im = -(C P S + S P C)`.
#[derive(Clone, Debug)]
pub struct FreqBasis {
    pub patch: usize,
    cos: Tensor,
    sin: Tensor,
}

impl FreqBasis {
    pub fn new(patch: usize, device: &Device) -> Result<Self> {
        if patch < 2 {
            bail!("frequency patch must be >= 2, got {patch}");
        }
        let norm = 1.0 / (patch as f64).sqrt();
        let mut c = Vec::with_capacity(patch * patch);
        let mut s = Vec::with_capacity(patch * patch);
        for k in 0..patch {
            for n in 0..patch {
                // k * n mod p keeps the angle exact for large products.
                let a = 2.0 * std::f64::consts::PI * ((k * n) % patch) as f64 / patch as f64;
                c.push((a.cos() * norm) as f32);
                s.push((a.sin() * norm) as f32);
            }
        }
        Ok(Self {
            patch,
            cos: Tensor::from_vec(c, (patch, patch), device)?,
            sin: Tensor::from_vec(s, (patch, patch), device)?,
        })
    }

    /// `[B, C, H, W]` -> DFT amplitudes `[B * C * (H/p) * (W/p), p, p]` of its non-overlapping
    /// `p x p` patches (`sqrt(Re^2 + Im^2 + 1e-8)`; rows/columns beyond a multiple of p are
    /// dropped).
    pub fn amplitudes(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.patch;
        let (b, c, h, w) = x.dims4()?;
        let (nh, nw) = (h / p, w / p);
        if nh == 0 || nw == 0 {
            bail!("frequency term: image {h}x{w} is smaller than one {p}x{p} patch");
        }
        let x = if nh * p != h || nw * p != w { x.narrow(2, 0, nh * p)?.narrow(3, 0, nw * p)? } else { x.clone() };
        let patches = x.reshape(vec![b, c, nh, p, nw, p])?.permute(vec![0, 1, 2, 4, 3, 5])?.contiguous()?.reshape((
            b * c * nh * nw,
            p,
            p,
        ))?;
        let cos = self.cos.to_dtype(x.dtype())?;
        let sin = self.sin.to_dtype(x.dtype())?;
        let n = b * c * nh * nw;
        // Only plain 2-D matmuls ([n * p, p] x [p, p]); C and S are symmetric, so the left
        // products are right products of the transposes: C A = (A^T C)^T.
        let right = |x: &Tensor, m: &Tensor| -> candle_core::Result<Tensor> {
            x.reshape((n * p, p))?.matmul(m)?.reshape((n, p, p))
        };
        let a = right(&patches, &cos)?; // P C
        let bs = right(&patches, &sin)?; // P S
        let at = a.transpose(1, 2)?.contiguous()?;
        let bt = bs.transpose(1, 2)?.contiguous()?;
        // Re^T = (P C)^T C - (P S)^T S, Im^T = -((P S)^T C + (P C)^T S).
        let re_t = (right(&at, &cos)? - right(&bt, &sin)?)?;
        let im_t = (right(&bt, &cos)? + right(&at, &sin)?)?;
        let amp_t = (re_t.sqr()? + im_t.sqr()?)?.affine(1.0, 1e-8)?.sqrt()?;
        // [.., k_y, k_x]
        Ok(amp_t.transpose(1, 2)?)
    }

    /// L1 between the patch DFT amplitudes of `decoded` and `real`: penalises missing or extra
    /// energy per spatial frequency (texture, sharpness) while ignoring its phase (exact
    /// placement) within each patch.
    pub fn amplitude_l1(&self, decoded: &Tensor, real: &Tensor) -> Result<Tensor> {
        l1(&self.amplitudes(decoded)?, &self.amplitudes(&real.detach())?)
    }
}

/// The gradient, with respect to a zero tensor added to `fake`, of
/// `sum_i mean_{c,h,w} (D(real_i) - D(fake_i + corr_i))^2` with the discriminator in inference
/// mode (running BatchNorm statistics, so each sample's term depends on that sample only).
/// `params` are the discriminator's parameters (detached here: no gradient reaches them).
pub fn correction_grad(
    cfg: &DiscConfig,
    params: &[Tensor],
    stats: &BnStats,
    real: &Tensor,
    fake: &Tensor,
    latents: &Tensor,
) -> Result<Tensor> {
    let params: Vec<Tensor> = params.iter().map(|p| p.detach()).collect();
    let (real, fake, latents) = (real.detach(), fake.detach(), latents.detach());
    let dev = fake.device();
    crate::device::trace_mem(dev, format_args!("correction: start"));
    let (reference, _) = Discriminator::forward_with(cfg, &params, stats, &real, &latents, false)?;
    crate::device::trace_mem(dev, format_args!("correction: reference forward"));
    let corr = Var::zeros(fake.shape(), fake.dtype(), fake.device())?;
    let x = (&fake + corr.as_tensor())?;
    let (scores, _) = Discriminator::forward_with(cfg, &params, stats, &x, &latents, false)?;
    crate::device::trace_mem(dev, format_args!("correction: forward with graph"));
    let per_sample = (reference - scores)?.sqr()?.mean_keepdim((1, 2, 3))?;
    let grads = per_sample.sum_all()?.backward()?;
    crate::device::trace_mem(dev, format_args!("correction: backward"));
    let g = grads.get(corr.as_tensor()).context("the correction has no gradient")?.detach();
    Ok(g)
}

/// seraena's correction from the raw gradient: `-g / (std(g) + 1e-5)` with the population
/// standard deviation over the whole batch. Returns the correction and `std(g)` (0-dim).
pub fn normalize_correction(g: &Tensor) -> Result<(Tensor, Tensor)> {
    let g = g.to_dtype(DType::F32)?;
    let mean = g.mean_all()?;
    let std = g.broadcast_sub(&mean)?.sqr()?.mean_all()?.sqrt()?;
    let corr = g.neg()?.broadcast_div(&std.affine(1.0, 1e-5)?)?;
    Ok((corr, std))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use candle_nn::{VarBuilder, VarMap};

    fn scalar(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    /// The correction gradient against central finite differences, in f64, along random
    /// directions and single coordinates. Seeded throughout (weights as the recipe initialises
    /// them), so a run is the same on every machine.
    #[test]
    fn correction_gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let mut rng = testing::rng(11);
        let cfg = DiscConfig::seraena(4);
        let vm = VarMap::new();
        let d = Discriminator::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
        taesd::torch_default_init(&vm, &cfg.param_shapes(), &mut rng, &dev).unwrap();
        let params: Vec<Tensor> = d.params().iter().map(|p| p.to_dtype(DType::F64).unwrap()).collect();
        let (b, h, w) = (2, 16, 16);
        let real = testing::uniform(&mut rng, &[b, 3, h, w], 0.0, 1.0, DType::F64);
        let fake = testing::uniform(&mut rng, &[b, 3, h, w], 0.0, 1.0, DType::F64);
        let lat = testing::normal(&mut rng, &[b, 4, h / 8, w / 8], 0.0, 1.0, DType::F64);
        // Non-trivial running statistics: a few training-mode batches.
        let mut stats = BnStats::fresh(&cfg, &dev).unwrap();
        stats.mean = stats.mean.iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect();
        stats.var = stats.var.iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect();
        for _ in 0..3 {
            let (_, s) = Discriminator::forward_with(&cfg, &params, &stats, &real, &lat, true).unwrap();
            stats = s.unwrap();
        }
        let g = correction_grad(&cfg, &params, &stats, &real, &fake, &lat).unwrap();
        assert_eq!(g.dims(), fake.dims());
        let loss = |c: &Tensor| -> f64 {
            let (r, _) = Discriminator::forward_with(&cfg, &params, &stats, &real, &lat, false).unwrap();
            let x = (&fake + c).unwrap();
            let (s, _) = Discriminator::forward_with(&cfg, &params, &stats, &x, &lat, false).unwrap();
            let per = (r - s).unwrap().sqr().unwrap().mean_keepdim((1, 2, 3)).unwrap();
            scalar(&per.sum_all().unwrap())
        };
        // The loss is piecewise smooth (ReLU kinks): a step that crosses a kink shows as one-sided
        // slopes that disagree, and is retried with a smaller one. (Unseeded, with one step size
        // and a 100x looser tolerance, this test failed about 1 run in 150: CI, 2026-12-06.)
        let mut dirs = Vec::new();
        for _ in 0..3 {
            dirs.push(testing::normal(&mut rng, fake.dims(), 0.0, 1.0, DType::F64));
        }
        // Single coordinates in each sample.
        for idx in [5usize, 3 * h * w + 77] {
            let mut v = vec![0f64; fake.elem_count()];
            v[idx] = 1.0;
            dirs.push(Tensor::from_vec(v, fake.shape(), &dev).unwrap());
        }
        let at_zero = loss(&fake.zeros_like().unwrap());
        for u in dirs {
            let an = scalar(&(&g * &u).unwrap().sum_all().unwrap());
            let smooth = [1e-6, 1e-7, 1e-8].into_iter().find_map(|eps| {
                let (plus, minus) = (loss(&u.affine(eps, 0.0).unwrap()), loss(&u.affine(-eps, 0.0).unwrap()));
                let (fwd, bwd) = ((plus - at_zero) / eps, (at_zero - minus) / eps);
                let tol = 1e-9 + 1e-5 * an.abs().max(fwd.abs());
                ((fwd - bwd).abs() <= tol).then_some(((plus - minus) / (2.0 * eps), tol))
            });
            let (fd, tol) = smooth.expect("every step down to 1e-8 crosses a kink");
            assert!((fd - an).abs() <= tol, "finite difference {fd} vs gradient {an}");
        }
        // Normalised: -g / (std(g) + 1e-5), std over the whole batch (population).
        let (corr, std) = normalize_correction(&g).unwrap();
        let std = scalar(&std);
        let gm = scalar(&g.mean_all().unwrap());
        let want_std =
            scalar(&g.broadcast_sub(&g.mean_all().unwrap()).unwrap().sqr().unwrap().mean_all().unwrap()).sqrt();
        assert!((std - want_std).abs() <= 1e-6 * want_std && gm.is_finite());
        let want = g.affine(-1.0 / (want_std + 1e-5), 0.0).unwrap();
        let err = scalar(&(corr.to_dtype(DType::F64).unwrap() - want).unwrap().abs().unwrap().max_all().unwrap());
        assert!(err < 1e-5, "normalised correction off by {err}");
    }

    #[test]
    fn lowres_mse_compares_block_means() {
        let dev = Device::Cpu;
        // A checkerboard and flat grey have equal 2x2 means: zero low-res error.
        let cb: Vec<f32> = (0..16).map(|i| if (i / 4 + i % 4) % 2 == 0 { 1.0 } else { 0.0 }).collect();
        let cb = Tensor::from_vec(cb, (1, 1, 4, 4), &dev).unwrap();
        let grey = Tensor::full(0.5f32, (1, 1, 4, 4), &dev).unwrap();
        assert_eq!(lowres_mse(&cb, &grey, 2).unwrap().to_scalar::<f32>().unwrap(), 0.0);
        assert_eq!(mse(&cb, &grey).unwrap().to_scalar::<f32>().unwrap(), 0.25);
        let brighter = (&grey + 0.1).unwrap();
        let v = lowres_mse(&brighter, &grey, 2).unwrap().to_scalar::<f32>().unwrap();
        assert!((v - 0.01).abs() < 1e-6);
    }

    #[test]
    fn highpass_is_what_pooling_removes() {
        let dev = Device::Cpu;
        let cb: Vec<f32> = (0..16).map(|i| if (i / 4 + i % 4) % 2 == 0 { 1.0 } else { 0.0 }).collect();
        let cb = Tensor::from_vec(cb, (1, 1, 4, 4), &dev).unwrap();
        // A checkerboard is all detail (its 2x2 means are 0.5), a flat image has none.
        let hp = highpass(&cb, 2).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(hp.iter().all(|v| (v.abs() - 0.5).abs() < 1e-6), "{hp:?}");
        let flat = Tensor::full(0.3f32, (1, 1, 4, 4), &dev).unwrap();
        assert_eq!(highpass(&flat, 2).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        // highpass + upsample(pool) = the image: the two bands split it exactly.
        let x = testing::uniform(&mut testing::rng(12), &[2, 3, 8, 8], 0.0, 1.0, DType::F32);
        let low = x.avg_pool2d(4).unwrap().upsample_nearest2d(8, 8).unwrap();
        let back = (highpass(&x, 4).unwrap() + low).unwrap();
        assert!(mse(&back, &x).unwrap().to_scalar::<f32>().unwrap() < 1e-12);
        // Colour shifts are invisible to the detail term, a lost texture is not.
        let brighter = (&cb + 0.2).unwrap();
        assert!(detail_mse(&brighter, &cb, 2).unwrap().to_scalar::<f32>().unwrap() < 1e-12);
        let d = detail_mse(&flat, &cb, 2).unwrap().to_scalar::<f32>().unwrap();
        assert!((d - 0.25).abs() < 1e-6, "{d}");
        // Rows and columns past a multiple of the factor are left out; too small an image is an error.
        assert_eq!(highpass(&Tensor::zeros((1, 1, 5, 6), DType::F32, &dev).unwrap(), 4).unwrap().dims(), [1, 1, 4, 4]);
        assert!(highpass(&Tensor::zeros((1, 1, 3, 8), DType::F32, &dev).unwrap(), 4).is_err());
    }

    #[test]
    fn dft_amplitudes_of_known_patches() {
        let dev = Device::Cpu;
        let basis = FreqBasis::new(4, &dev).unwrap();
        // Constant patch of 1: only DC, amplitude p * 1 (orthonormal: sum / sqrt(p^2)) = 4.
        let one = Tensor::ones((1, 1, 4, 4), DType::F32, &dev).unwrap();
        let a = basis.amplitudes(&one).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((a[0] - 4.0).abs() < 1e-4);
        assert!(a[1..].iter().all(|x| x.abs() < 1e-3));
        // A horizontal cosine of frequency 1 and a shifted copy: same amplitudes, energy split
        // between k = 1 and k = 3 (= -1): each 4 * 0.5 = 2 (Parseval: total energy 8).
        let wave = |shift: usize| -> Tensor {
            let v: Vec<f32> = (0..16)
                .map(|i| {
                    let x = (i % 4 + shift) as f64;
                    (2.0 * std::f64::consts::PI * x / 4.0).cos() as f32
                })
                .collect();
            Tensor::from_vec(v, (1, 1, 4, 4), &dev).unwrap()
        };
        let a0 = basis.amplitudes(&wave(0)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let a1 = basis.amplitudes(&wave(1)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((a0[1] - 2.0).abs() < 1e-3 && (a0[3] - 2.0).abs() < 1e-3, "{a0:?}");
        for (x, y) in a0.iter().zip(&a1) {
            assert!((x - y).abs() < 1e-3, "shift changed amplitudes: {a0:?} {a1:?}");
        }
        let l = basis.amplitude_l1(&wave(0), &wave(1)).unwrap().to_scalar::<f32>().unwrap();
        assert!(l < 1e-3);
        // A random patch against the DFT summed directly: |sum_{y,x} P e^{-2 pi i (ky y + kx x) / p}| / p.
        let p = 8usize;
        let b8 = FreqBasis::new(p, &dev).unwrap();
        let r = testing::uniform(&mut testing::rng(13), &[1, 1, p, p], 0.0, 1.0, DType::F32);
        let got = b8.amplitudes(&r).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let pv = r.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for ky in 0..p {
            for kx in 0..p {
                let (mut re, mut im) = (0f64, 0f64);
                for y in 0..p {
                    for x in 0..p {
                        let a = -2.0 * std::f64::consts::PI * ((ky * y + kx * x) as f64) / p as f64;
                        re += pv[y * p + x] as f64 * a.cos();
                        im += pv[y * p + x] as f64 * a.sin();
                    }
                }
                let want = (re * re + im * im).sqrt() / p as f64;
                let g = got[ky * p + kx] as f64;
                assert!((g - want).abs() < 1e-4, "[{ky}, {kx}]: {g} vs {want}");
            }
        }
        // Gradients are finite at zero amplitude (where they vanish) and flow elsewhere.
        let target = one.repeat((1, 1, 2, 2)).unwrap();
        let grad_sum = |v: &Var| {
            let loss = basis.amplitude_l1(v.as_tensor(), &target).unwrap();
            let g = loss.backward().unwrap();
            g.get(v.as_tensor()).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
        };
        let zero = Var::zeros((1, 1, 8, 8), DType::F32, &dev).unwrap();
        assert!(grad_sum(&zero).is_finite());
        let some =
            Var::from_tensor(&testing::uniform(&mut testing::rng(14), &[1, 1, 8, 8], 0.0, 1.0, DType::F32)).unwrap();
        let g = grad_sum(&some);
        assert!(g.is_finite() && g > 0.0);
    }
}
