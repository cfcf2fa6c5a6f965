//! The conditional patch discriminator (seraena's `PatchDiscWithContext`).
//!
//! Input: the image mapped to [-1, 1], concatenated with the latent upsampled (nearest) to the
//! image size. Six conv + BatchNorm + ReLU blocks (64, 128 s2, 256 s2, 512 s2, 512, 512
//! channels; 4x4 kernels on the stride-2 convs, 3x3 otherwise, padding 1, no conv bias); after
//! each block a bias-free 1x1 projection to one channel, average-pooled to H/8 x W/8. Output:
//! the six maps concatenated, `[B, 6, H/8, W/8]`.
//!
//! Tensors are named as the PyTorch module's state dict (`blocks.{i}.0.weight` conv,
//! `blocks.{i}.1.{weight,bias,running_mean,running_var}` BatchNorm, `proj.{i}.weight`).
//!
//! The forward is functional ([`Discriminator::forward_with`]): parameters and BatchNorm
//! statistics are arguments, and a training-mode forward *returns* the updated running
//! statistics instead of writing them. This is what lets a step compute the correction with the
//! just-updated discriminator and still be discarded whole when something is non-finite.
//! (`candle_nn::BatchNorm::forward_t(train=true)` writes its running statistics into `Var`s as
//! a side effect of the forward pass, so it cannot be used that way.) The BatchNorm math is
//! PyTorch's: batch statistics with the biased variance for normalising, running variance
//! updated with the unbiased one, momentum 0.1, eps 1e-5.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder};
use taesd_ops::{Act, ConvParams, Format};

/// The discriminator's structure.
#[derive(Clone, Debug, PartialEq)]
pub struct DiscConfig {
    pub image_channels: usize,
    pub latent_channels: usize,
    /// Output channels of each block.
    pub widths: Vec<usize>,
    /// Stride of each block's conv (2: 4x4 kernel, else 3x3).
    pub strides: Vec<usize>,
    pub bn_eps: f64,
    pub bn_momentum: f64,
}

impl DiscConfig {
    /// seraena's discriminator for RGB images and `latent_channels`-channel latents.
    pub fn seraena(latent_channels: usize) -> Self {
        Self {
            image_channels: 3,
            latent_channels,
            widths: vec![64, 128, 256, 512, 512, 512],
            strides: vec![1, 2, 2, 2, 1, 1],
            bn_eps: 1e-5,
            bn_momentum: 0.1,
        }
    }

    pub fn n_blocks(&self) -> usize {
        self.widths.len()
    }

    fn kernel(stride: usize) -> usize {
        if stride == 2 {
            4
        } else {
            3
        }
    }

    /// Total downscale of the blocks: the output is at H / this (8).
    pub fn downscale(&self) -> usize {
        self.strides.iter().product()
    }

    /// Every trainable tensor, in the order [`Discriminator::forward_with`] takes them:
    /// per block conv weight, BN weight, BN bias; then the projections.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        let mut c_in = self.image_channels + self.latent_channels;
        for (i, (&w, &s)) in self.widths.iter().zip(&self.strides).enumerate() {
            let k = Self::kernel(s);
            out.push((format!("blocks.{i}.0.weight"), vec![w, c_in, k, k]));
            out.push((format!("blocks.{i}.1.weight"), vec![w]));
            out.push((format!("blocks.{i}.1.bias"), vec![w]));
            c_in = w;
        }
        for (i, &w) in self.widths.iter().enumerate() {
            out.push((format!("proj.{i}.weight"), vec![1, w, 1, 1]));
        }
        out
    }

    pub fn param_names(&self) -> Vec<String> {
        self.param_shapes().into_iter().map(|(n, _)| n).collect()
    }

    pub fn param_count(&self) -> usize {
        self.param_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }

    /// Names of the BatchNorm running statistics (not trainable).
    pub fn stat_names(&self, block: usize) -> (String, String) {
        (format!("blocks.{block}.1.running_mean"), format!("blocks.{block}.1.running_var"))
    }
}

/// BatchNorm running statistics, one `[C]` mean and variance per block.
#[derive(Clone, Debug)]
pub struct BnStats {
    pub mean: Vec<Tensor>,
    pub var: Vec<Tensor>,
}

impl BnStats {
    /// PyTorch's initial statistics: mean 0, variance 1.
    pub fn fresh(cfg: &DiscConfig, device: &Device) -> Result<Self> {
        let mut mean = Vec::new();
        let mut var = Vec::new();
        for &w in &cfg.widths {
            mean.push(Tensor::zeros(w, DType::F32, device)?);
            var.push(Tensor::ones(w, DType::F32, device)?);
        }
        Ok(Self { mean, var })
    }

    /// Named as the PyTorch state dict.
    pub fn to_map(&self, cfg: &DiscConfig) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for i in 0..self.mean.len() {
            let (m, v) = cfg.stat_names(i);
            out.insert(m, self.mean[i].clone());
            out.insert(v, self.var[i].clone());
        }
        out
    }

    pub fn from_map(cfg: &DiscConfig, t: &HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        let mut mean = Vec::new();
        let mut var = Vec::new();
        for (i, &w) in cfg.widths.iter().enumerate() {
            let (m, v) = cfg.stat_names(i);
            for (name, dst) in [(m, &mut mean), (v, &mut var)] {
                let x = t.get(&name).with_context(|| format!("discriminator state lacks {name}"))?;
                if x.dims() != [w] {
                    bail!("discriminator {name} has shape {:?}, expected [{w}]", x.dims());
                }
                dst.push(x.to_dtype(DType::F32)?.to_device(device)?);
            }
        }
        Ok(Self { mean, var })
    }
}

/// The discriminator: its structure, parameters and BatchNorm statistics.
#[derive(Clone, Debug)]
pub struct Discriminator {
    cfg: DiscConfig,
    params: Vec<Tensor>,
    stats: BnStats,
}

impl Discriminator {
    /// Parameters from `vb` (with `VarBuilder::from_varmap`: new trainable variables, conv and
    /// projection weights uniform in ±1/sqrt(fan_in) as PyTorch's default init, BatchNorm
    /// weight 1 and bias 0); fresh running statistics.
    pub fn new(cfg: &DiscConfig, vb: VarBuilder) -> Result<Self> {
        let mut params = Vec::new();
        for (name, shape) in cfg.param_shapes() {
            let init = if shape.len() == 4 {
                let fan_in: usize = shape[1..].iter().product();
                let b = 1.0 / (fan_in as f64).sqrt();
                Init::Uniform { lo: -b, up: b }
            } else if name.ends_with(".weight") {
                Init::Const(1.0)
            } else {
                Init::Const(0.0)
            };
            params.push(vb.get_with_hints(shape, &name, init)?);
        }
        let stats = BnStats::fresh(cfg, vb.device())?;
        Ok(Self { cfg: cfg.clone(), params, stats })
    }

    pub fn config(&self) -> &DiscConfig {
        &self.cfg
    }

    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    pub fn stats(&self) -> &BnStats {
        &self.stats
    }

    pub fn set_stats(&mut self, stats: BnStats) {
        self.stats = stats;
    }

    /// Forward with this discriminator's own parameters and statistics. `train`: batch
    /// statistics, and the updated running statistics are returned (not stored).
    pub fn forward_t(&self, images: &Tensor, latents: &Tensor, train: bool) -> Result<(Tensor, Option<BnStats>)> {
        Self::forward_with(&self.cfg, &self.params, &self.stats, images, latents, train)
    }

    /// `images` `[B, 3, H, W]` in [0, 1] (H, W multiples of 8), `latents` `[B, C, h, w]` ->
    /// scores `[B, 6, H/8, W/8]` (f32 for half-precision inputs); with `train`, also the running statistics after this
    /// batch. Computes in `images`' dtype (`super::precision`): f32 parameters are cast on use;
    /// training-mode BatchNorm takes its statistics in f32 (cuDNN, or the plain ops in f32), the
    /// inference-mode affine map runs in the activations' dtype.
    ///
    /// The blocks run on activations in [`taesd_ops::preferred_format`] (NHWC on CUDA);
    /// [`Discriminator::forward_in_format`] chooses.
    pub fn forward_with(
        cfg: &DiscConfig,
        params: &[Tensor],
        stats: &BnStats,
        images: &Tensor,
        latents: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Option<BnStats>)> {
        let f = taesd_ops::preferred_format(images.device());
        Self::forward_in_format(cfg, params, stats, images, latents, train, f)
    }

    /// [`Discriminator::forward_with`] with the blocks' activations in `f` (inputs and scores
    /// NCHW either way).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_in_format(
        cfg: &DiscConfig,
        params: &[Tensor],
        stats: &BnStats,
        images: &Tensor,
        latents: &Tensor,
        train: bool,
        f: Format,
    ) -> Result<(Tensor, Option<BnStats>)> {
        let n_blocks = cfg.n_blocks();
        if params.len() != 4 * n_blocks {
            bail!("discriminator: {} parameters, expected {}", params.len(), 4 * n_blocks);
        }
        let (b, c, h, w) = images.dims4()?;
        let (lb, lc, _, _) = latents.dims4()?;
        let ds = cfg.downscale();
        if c != cfg.image_channels || lc != cfg.latent_channels || lb != b {
            bail!(
                "discriminator: images {:?} / latents {:?}, expected [B, {}, H, W] / [B, {}, h, w]",
                images.dims(),
                latents.dims(),
                cfg.image_channels,
                cfg.latent_channels
            );
        }
        if h % ds != 0 || w % ds != 0 || h == 0 || w == 0 {
            bail!("discriminator: image size {h}x{w} is not a multiple of {ds}");
        }
        let (oh, ow) = (h / ds, w / ds);
        let dt = images.dtype();
        let mut x = Tensor::cat(
            &[&f.from_nchw(&images.affine(2.0, -1.0)?)?, &context(latents, dt, h, w, f)?],
            f.channel_axis(),
        )?;
        crate::device::trace_mem(images.device(), format_args!("disc: input"));
        let mut outs = Vec::with_capacity(n_blocks);
        let mut new_stats =
            train.then(|| BnStats { mean: Vec::with_capacity(n_blocks), var: Vec::with_capacity(n_blocks) });
        for i in 0..n_blocks {
            let (conv_w, bn_w, bn_b) = (&params[3 * i], &params[3 * i + 1], &params[3 * i + 2]);
            let proj = &params[3 * n_blocks + i];
            let s = cfg.strides[i];
            // BatchNorm + ReLU, in and out in the activations' dtype (batch_norm_train /
            // conv_batch_norm_eval say how each computes).
            x = match &mut new_stats {
                Some(ns) => {
                    let (y, m, v) = batch_norm_train(
                        &taesd_ops::conv2d_act(&x, conv_w, None, ConvParams::new(s, 1).with_format(f), Act::None)?,
                        bn_w,
                        bn_b,
                        &stats.mean[i],
                        &stats.var[i],
                        cfg.bn_eps,
                        cfg.bn_momentum,
                        Act::Relu,
                        f,
                    )?;
                    ns.mean.push(m);
                    ns.var.push(v);
                    y
                }
                None => conv_batch_norm_eval(
                    &x,
                    conv_w,
                    ConvParams::new(s, 1).with_format(f),
                    bn_w,
                    bn_b,
                    &stats.mean[i],
                    &stats.var[i],
                    cfg.bn_eps,
                    Act::Relu,
                )?,
            };
            let o =
                f.to_nchw(&taesd_ops::conv2d_act(&x, proj, None, ConvParams::new(1, 0).with_format(f), Act::None)?)?;
            let (_, _, hi, wi) = o.dims4()?;
            let o = if (hi, wi) != (oh, ow) {
                if hi % oh != 0 || wi % ow != 0 {
                    bail!("discriminator: block {i} output {hi}x{wi} does not pool to {oh}x{ow}");
                }
                o.avg_pool2d((hi / oh, wi / ow))?
            } else {
                o
            };
            outs.push(o);
            crate::device::trace_mem(images.device(), format_args!("disc: block {i}"));
        }
        Ok((Tensor::cat(&outs, 1)?.to_dtype(stat_dtype(dt))?, new_stats))
    }
}

/// The latents (NCHW) in `dt`, upsampled (nearest) to `h x w`, in `f`: converted at the latent
/// resolution and upsampled by taesd-ops' 2x kernel when the factor is a power of two (the
/// discriminator's 8), else candle's upsampling on NCHW. Converting the full-size 35-channel
/// input instead (3 image + 32 latent channels for TAEF2) took ~7 ms of a training step (strided
/// copies and their gradient adds, H100 256/bs32).
fn context(latents: &Tensor, dt: DType, h: usize, w: usize, f: Format) -> Result<Tensor> {
    let latents = latents.to_dtype(dt)?;
    let (_, _, lh, lw) = latents.dims4()?;
    let factor = h / lh.max(1);
    if lh * factor == h && lw * factor == w && factor.is_power_of_two() && taesd_ops::kernels_on(latents.device()) {
        let mut ctx = f.from_nchw(&latents)?;
        for _ in 0..factor.trailing_zeros() {
            ctx = taesd_ops::upsample_nearest2x(&ctx, f)?;
        }
        return Ok(ctx);
    }
    Ok(f.from_nchw(&latents.upsample_nearest2d(h, w)?)?)
}

/// Per-channel sums, `[C]`. NCHW: over H, W first (contiguous rows), then over N (candle
/// reduces (N, H, W) in one go ~10x slower: 2.5 ms vs 0.26 ms at 32x64x256x256 f32 on the H100;
/// docs/gpu.md). NHWC: the column sums of `[N*H*W, C]`.
fn channel_sum(x: &Tensor, f: Format) -> Result<Tensor> {
    Ok(match f {
        Format::Nchw => x.sum_keepdim((2, 3))?.sum_keepdim(0)?.flatten_all()?,
        Format::Nhwc => {
            let c = x.dim(3)?;
            x.reshape(((), c))?.sum(0)?
        }
    })
}

/// Training-mode BatchNorm over (N, H, W), then `act`: returns the output (in `x`'s dtype) and
/// the new running mean and variance (detached). With a ReLU on CUDA: cuDNN's BatchNorm
/// (`taesd_ops::batch_norm_relu_train`, statistics in f32 for any input dtype). Elsewhere the
/// plain ops, on an f32 copy of half-precision input ([`stat_dtype`]): two-pass statistics (mean,
/// then the mean square of `x - mean`) as PyTorch; the centring and the affine map are
/// `taesd_ops::channel_affine`s.
#[allow(clippy::too_many_arguments)]
fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
    momentum: f64,
    act: Act,
    f: Format,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, c, h, w) = f.nchw(x.dims())?;
    let n = (b * h * w) as f64;
    if n < 2.0 {
        bail!("BatchNorm in training mode needs more than one value per channel");
    }
    if act == Act::Relu {
        if let Some(out) = taesd_ops::batch_norm_relu_train(x, weight, bias, eps, f)? {
            let (m, v) = running_update(running_mean, running_var, &out.mean, &out.var, n, momentum)?;
            return Ok((out.y, m, v));
        }
    }
    let dt = x.dtype();
    let x = &x.to_dtype(stat_dtype(dt))?;
    let mean = channel_sum(x, f)?.affine(1.0 / n, 0.0)?;
    let ones = Tensor::ones(c, x.dtype(), x.device())?;
    let xc = taesd_ops::channel_affine(x, &ones, &mean.neg()?, Act::None, f)?;
    let var = channel_sum(&xc.sqr()?, f)?.affine(1.0 / n, 0.0)?;
    let scale = (var.affine(1.0, eps)?.sqrt()?.recip()? * weight)?;
    let y = taesd_ops::channel_affine(&xc, &scale, bias, act, f)?.to_dtype(dt)?;
    let (new_mean, new_var) = running_update(running_mean, running_var, &mean, &var, n, momentum)?;
    Ok((y, new_mean, new_var))
}

/// The dtype BatchNorm statistics (and the discriminator's scores) are computed in: f32 for
/// half-precision activations (precision.rs; candle's half-precision sums are not accurate).
fn stat_dtype(dt: DType) -> DType {
    if matches!(dt, DType::BF16 | DType::F16) {
        DType::F32
    } else {
        dt
    }
}

/// PyTorch's running statistics after a batch of `n` values per channel with mean `mean` and
/// biased variance `var` (the running variance takes the unbiased one). Detached.
fn running_update(
    running_mean: &Tensor,
    running_var: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    n: f64,
    momentum: f64,
) -> Result<(Tensor, Tensor)> {
    let new_mean = (running_mean.affine(1.0 - momentum, 0.0)? + mean.detach().affine(momentum, 0.0)?)?;
    let new_var = (running_var.affine(1.0 - momentum, 0.0)? + var.detach().affine(momentum * n / (n - 1.0), 0.0)?)?;
    Ok((new_mean, new_var))
}

/// The 3x3/4x4 convolution (no bias, padding 1), then inference-mode BatchNorm with the running
/// statistics, then `act`, as one convolution: BatchNorm is then a per-channel affine map, so it
/// folds into the weights (`w * scale[o]`, in f32, rounded to `x`'s dtype once on use) and a
/// bias (`shift`) in the convolution's epilogue. Mathematically the same as the three steps; in
/// f32 equal to rounding (test), in bf16 within one rounding of the activations. No
/// full-size intermediate, and the correction's backward through it is one backward-data pass.
#[allow(clippy::too_many_arguments)]
fn conv_batch_norm_eval(
    x: &Tensor,
    conv_w: &Tensor,
    p: ConvParams,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
    act: Act,
) -> Result<Tensor> {
    let scale = (running_var.affine(1.0, eps)?.sqrt()?.recip()? * weight)?;
    let shift = (bias - (running_mean * &scale)?)?;
    let w = conv_w.broadcast_mul(&scale.reshape((scale.dim(0)?, 1, 1, 1))?)?;
    Ok(taesd_ops::conv2d_act(x, &w, Some(&shift), p, act)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use candle_nn::{ModuleT, VarMap};

    #[test]
    fn output_shape_and_parameter_count() {
        let cfg = DiscConfig::seraena(4);
        // By hand: convs 7*64*9 + 64*128*16 + 128*256*16 + 256*512*16 + 2 * 512*512*9,
        // BatchNorms 2 * (64+128+256+512*3), projections 64+128+256+512*3.
        let by_hand = 7 * 64 * 9
            + 64 * 128 * 16
            + 128 * 256 * 16
            + 256 * 512 * 16
            + 2 * 512 * 512 * 9
            + 2 * (64 + 128 + 256 + 3 * 512)
            + (64 + 128 + 256 + 3 * 512);
        assert_eq!(by_hand, 7_481_088);
        assert_eq!(cfg.param_count(), by_hand);
        assert_eq!(DiscConfig::seraena(32).param_count(), by_hand + 28 * 64 * 9);

        let vm = VarMap::new();
        let dev = Device::Cpu;
        let d = Discriminator::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
        let n: usize = vm.all_vars().iter().map(|v| v.elem_count()).sum();
        assert_eq!(n, by_hand, "the VarMap holds exactly the trainable parameters");
        let mut rng = testing::rng(1);
        let x = testing::uniform(&mut rng, &[2, 3, 32, 48], 0.0, 1.0, DType::F32);
        let z = testing::normal(&mut rng, &[2, 4, 4, 6], 0.0, 1.0, DType::F32);
        let (y, st) = d.forward_t(&x, &z, true).unwrap();
        assert_eq!(y.dims(), [2, 6, 4, 6]);
        let st = st.unwrap();
        assert_eq!(st.mean.len(), 6);
        assert_eq!(st.var[3].dims(), [512]);
        let (y, st) = d.forward_t(&x, &z, false).unwrap();
        assert_eq!(y.dims(), [2, 6, 4, 6]);
        assert!(st.is_none());
        assert!(d.forward_t(&x.narrow(2, 0, 28).unwrap(), &z, false).is_err());
    }

    /// The BatchNorm here against candle-nn's (PyTorch semantics) in both modes, including the
    /// running statistics.
    /// BatchNorm + ReLU in candle's plain broadcast ops: the reference for the gradients.
    fn bn_relu_plain(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
        let c = x.dim(1).unwrap();
        let mean = x.mean_keepdim((0, 2, 3)).unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim((0, 2, 3)).unwrap();
        let scale = (var.affine(1.0, eps).unwrap().sqrt().unwrap().recip().unwrap() * w.reshape((1, c, 1, 1)).unwrap())
            .unwrap();
        xc.broadcast_mul(&scale).unwrap().broadcast_add(&b.reshape((1, c, 1, 1)).unwrap()).unwrap().relu().unwrap()
    }

    /// Values and gradients (input, weight, bias) of the training-mode BatchNorm + ReLU against
    /// the plain-op formulation, in f64.
    #[test]
    fn batch_norm_relu_gradients_match_plain_ops() {
        use candle_core::Var;
        let dev = Device::Cpu;
        let mut rng = testing::rng(2);
        let x0 = testing::normal(&mut rng, &[3, 4, 5, 6], 0.3, 1.5, DType::F64);
        let w0 = Tensor::new(&[1.0f64, 0.5, -1.0, 2.0], &dev).unwrap();
        let b0 = Tensor::new(&[0.0f64, 0.1, -0.2, 0.3], &dev).unwrap();
        let r = testing::normal(&mut rng, &[3, 4, 5, 6], 0.0, 1.0, DType::F64);
        let run = |ours: bool| {
            let (x, w, b) =
                (Var::from_tensor(&x0).unwrap(), Var::from_tensor(&w0).unwrap(), Var::from_tensor(&b0).unwrap());
            let y = if ours {
                let ones = Tensor::ones(4, DType::F64, &dev).unwrap();
                let zeros = Tensor::zeros(4, DType::F64, &dev).unwrap();
                batch_norm_train(&x, &w, &b, &zeros, &ones, 1e-5, 0.1, Act::Relu, Format::Nchw).unwrap().0
            } else {
                bn_relu_plain(&x, &w, &b, 1e-5)
            };
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gs: Vec<Tensor> = [&x, &w, &b].iter().map(|v| g.get(v).unwrap().clone()).collect();
            (y, gs)
        };
        let (yo, go) = run(true);
        let (yp, gp) = run(false);
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
        };
        assert!(diff(&yo, &yp) < 1e-12, "y {}", diff(&yo, &yp));
        for (name, (a, b)) in ["dx", "dw", "db"].iter().zip(go.iter().zip(&gp)) {
            assert!(diff(a, b) < 1e-10, "{name}: {}", diff(a, b));
        }
    }

    /// The discriminator with its blocks on NHWC activations (as on CUDA) vs NCHW, on the CPU:
    /// scores, running statistics, parameter and input gradients, training and inference mode.
    /// The BatchNorm sums run in another order in NHWC, so within f32 rounding, not bit for bit.
    #[test]
    fn channels_last_matches_nchw() {
        let cfg = DiscConfig::seraena(4);
        let vm = VarMap::new();
        let dev = Device::Cpu;
        let d = Discriminator::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
        // Seeded weights and inputs (candle's CPU rng cannot be seeded): the same case every run.
        let mut rng = testing::rng(3);
        taesd::torch_default_init(&vm, &cfg.param_shapes(), &mut rng, &dev).unwrap();
        let x =
            candle_core::Var::from_tensor(&testing::uniform(&mut rng, &[2, 3, 32, 24], 0.0, 1.0, DType::F32)).unwrap();
        let z = testing::uniform(&mut rng, &[2, 4, 4, 3], -1.0, 1.0, DType::F32);
        let rel = |a: &Tensor, b: &Tensor| {
            let d: f32 = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            let s: f32 = b.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            d / s.max(1e-12)
        };
        for train in [true, false] {
            let run = |f: Format| {
                let (y, st) = Discriminator::forward_in_format(&cfg, d.params(), d.stats(), &x, &z, train, f).unwrap();
                let g = (y.sqr().unwrap().sum_all().unwrap() + y.sum_all().unwrap()).unwrap().backward().unwrap();
                let mut grads = vec![g.get(&x).unwrap().clone()];
                grads.extend(d.params().iter().map(|p| g.get(p).unwrap().clone()));
                (y, st, grads)
            };
            let (y0, s0, g0) = run(Format::Nchw);
            let (y1, s1, g1) = run(Format::Nhwc);
            assert_eq!(y1.dims(), y0.dims());
            assert!(rel(&y1, &y0) < 1e-5, "train {train}: scores {}", rel(&y1, &y0));
            for (i, (a, b)) in g0.iter().zip(&g1).enumerate() {
                assert!(rel(b, a) < 1e-4, "train {train}: gradient {i} (0 = input) {}", rel(b, a));
            }
            match (s0, s1) {
                (Some(a), Some(b)) => {
                    for (u, v) in a.mean.iter().chain(&a.var).zip(b.mean.iter().chain(&b.var)) {
                        assert!(rel(v, u) < 1e-5, "running statistics {}", rel(v, u));
                    }
                }
                (None, None) => assert!(!train),
                _ => panic!("statistics in one format only"),
            }
        }
    }

    #[test]
    fn batch_norm_matches_candle_nn() {
        let dev = Device::Cpu;
        let mut rng = testing::rng(4);
        let x = testing::normal(&mut rng, &[3, 5, 4, 4], 0.7, 2.0, DType::F32);
        let w = Tensor::new(&[1.0f32, 0.5, -1.0, 2.0, 0.3], &dev).unwrap();
        let b = Tensor::new(&[0.0f32, 0.1, -0.2, 0.3, 1.0], &dev).unwrap();
        let rm = Tensor::new(&[0.1f32, -0.1, 0.0, 0.2, 0.5], &dev).unwrap();
        let rv = Tensor::new(&[1.0f32, 0.5, 2.0, 1.5, 0.9], &dev).unwrap();
        let reference = candle_nn::BatchNorm::new_with_momentum(
            5,
            rm.copy().unwrap(),
            rv.copy().unwrap(),
            w.clone(),
            b.clone(),
            1e-5,
            0.1,
        )
        .unwrap();
        let max_diff = |a: &Tensor, b: &Tensor| {
            (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
        };
        // Inference mode: convolution + BatchNorm folded into one convolution, against the
        // convolution then candle_nn's BatchNorm; values and the input gradient, stride 1 and 2.
        for (k, stride) in [(3, 1), (4, 2)] {
            let cw = testing::normal(&mut rng, &[5, 5, k, k], 0.0, 0.3, DType::F32);
            let xv = candle_core::Var::from_tensor(&x).unwrap();
            let r = testing::normal(&mut rng, &[3, 5, 4 / stride, 4 / stride], 0.0, 1.0, DType::F32);
            let want_eval = reference.forward_t(&xv.conv2d(&cw, 1, stride, 1, 1).unwrap(), false).unwrap();
            let got_eval =
                conv_batch_norm_eval(&xv, &cw, ConvParams::new(stride, 1), &w, &b, &rm, &rv, 1e-5, Act::None).unwrap();
            assert_eq!(got_eval.dims(), want_eval.dims());
            assert!(max_diff(&want_eval, &got_eval) < 1e-5, "k{k} s{stride}: {}", max_diff(&want_eval, &got_eval));
            let grad = |y: &Tensor| (y * &r).unwrap().sum_all().unwrap().backward().unwrap().get(&xv).unwrap().clone();
            let (gw, gg) = (grad(&want_eval), grad(&got_eval));
            assert!(max_diff(&gw, &gg) < 1e-5, "dx k{k} s{stride}: {}", max_diff(&gw, &gg));
            // With the ReLU: the reference's ReLU on the same values.
            let got_relu =
                conv_batch_norm_eval(&xv, &cw, ConvParams::new(stride, 1), &w, &b, &rm, &rv, 1e-5, Act::Relu).unwrap();
            assert!(max_diff(&want_eval.relu().unwrap(), &got_relu) < 1e-5);
        }
        let want = reference.forward_t(&x, true).unwrap();
        let (got, m, v) = batch_norm_train(&x, &w, &b, &rm, &rv, 1e-5, 0.1, Act::None, Format::Nchw).unwrap();
        assert!(max_diff(&want, &got) < 1e-5);
        assert!(max_diff(reference.running_mean(), &m) < 1e-6);
        assert!(max_diff(reference.running_var(), &v) < 1e-5);
    }
}
