//! Training-mode BatchNorm over (N, H, W) followed by a ReLU, as one candle custom op on cuDNN.
//!
//! `relu(BN(x) * weight + bias)` with batch statistics: cuDNN's
//! `cudnnBatchNormalizationForwardTraining` / `Backward` (statistics, scale and shift in f32
//! whatever the activation dtype, so bf16 activations need no f32 copy), and taesd-ops' ReLU
//! kernels around them. The graph keeps `x`, the f32 parameters and the output; the batch mean and
//! inverse standard deviation cuDNN saves ride in the op for its backward.
//!
//! Only on CUDA with the `cudnn` feature: [`batch_norm_relu_train`] returns `None` elsewhere and
//! the caller keeps its plain-op formulation (the exact reference, which the GPU check compares
//! this op against).

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::conv::{conv2d_act, Act, ConvParams};
use crate::format::Format;

/// The op's outputs: `y` (in `x`'s dtype, in the graph) and the batch mean and biased variance
/// (f32 `[C]`, detached) for the running statistics.
pub struct BnOut {
    pub y: Tensor,
    pub mean: Tensor,
    pub var: Tensor,
}

/// cuDNN's smallest epsilon (`CUDNN_BN_MIN_EPSILON`).
pub const MIN_EPS: f64 = 1e-5;

/// `relu(batch_norm(x) * weight + bias)` over (N, H, W) with this batch's statistics. `x`
/// in `format` (f32, bf16 or f16), `weight` and `bias` f32 `[C]`. `None` where this op does
/// not run (not CUDA, no `cudnn` feature, `eps` below cuDNN's minimum, non-f32 parameters).
pub fn batch_norm_relu_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    format: Format,
) -> Result<Option<BnOut>> {
    batch_norm_train_act(x, weight, bias, eps, format, Act::Relu)
}

/// [`batch_norm_relu_train`] followed by `act` (NCHW only without the ReLU).
pub fn batch_norm_train_act(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    format: Format,
    act: Act,
) -> Result<Option<BnOut>> {
    if !cfg!(feature = "cudnn") || !x.device().is_cuda() || eps < MIN_EPS {
        return Ok(None);
    }
    if act != Act::Relu && format == Format::Nhwc {
        return Ok(None);
    }
    if weight.dtype() != candle_core::DType::F32 || bias.dtype() != candle_core::DType::F32 {
        return Ok(None);
    }
    let (n, c, h, w) = format.nchw(x.dims())?;
    if weight.dims() != [c] || bias.dims() != [c] {
        bail!("batch_norm_relu_train: weight {:?} / bias {:?} for {c} channels", weight.dims(), bias.dims());
    }
    if n * h * w < 2 {
        bail!("BatchNorm in training mode needs more than one value per channel");
    }
    let op = BnReluOp { eps, format, act, saved: Arc::new(Mutex::new(None)) };
    let saved = op.saved.clone();
    let y = x.contiguous()?.apply_op3_arc(&weight.contiguous()?, &bias.contiguous()?, Arc::new(Box::new(op)))?;
    let (mean, invstd) = saved
        .lock()
        .unwrap()
        .clone()
        .ok_or_else(|| candle_core::Error::Msg("batch_norm_relu_train: no statistics saved".into()))?;
    // var = 1 / invstd^2 - eps (cuDNN saves 1 / sqrt(var + eps), var biased).
    let var = invstd.sqr()?.recip()?.affine(1.0, -eps)?;
    Ok(Some(BnOut { y, mean, var }))
}

struct BnReluOp {
    #[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
    eps: f64,
    #[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
    format: Format,
    act: Act,
    /// (mean, 1 / sqrt(var + eps)), f32 `[C]`, written by the forward.
    saved: Arc<Mutex<Option<(Tensor, Tensor)>>>,
}

impl CustomOp3 for BnReluOp {
    fn name(&self) -> &'static str {
        "taesd-batch-norm-relu"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("taesd-batch-norm-relu runs on CUDA only (batch_norm_relu_train returns None on the CPU)")
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (y, shape, mean, invstd) =
            crate::cuda::bn::forward((s1, l1), (s2, l2), (s3, l3), self.eps, self.format, self.act)?;
        *self.saved.lock().unwrap() = Some((mean, invstd));
        Ok((y, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some((mean, invstd)) = self.saved.lock().unwrap().clone() else {
            bail!("taesd-batch-norm-relu: backward before forward");
        };
        let dz = match self.act {
            Act::Relu => crate::relu_bwd(&dy.contiguous()?, y)?,
            Act::None => dy.contiguous()?,
        };
        #[cfg(feature = "cudnn")]
        {
            let (dx, dw, db) = crate::cuda::bn::backward(x, &dz, w, &mean, &invstd, self.eps, self.format)?;
            Ok((Some(dx), Some(dw), Some(db)))
        }
        #[cfg(not(feature = "cudnn"))]
        {
            let _ = (x, w, dz, mean, invstd);
            bail!("taesd-batch-norm-relu needs the cudnn feature")
        }
    }
}

/// `act(x * scale[c] + shift[c])` (`x` in `format`) as one 1x1 convolution with the diagonal weight
/// `diag(scale)` and bias `shift`. candle's broadcast ops over full-size activations run a strided
/// kernel ~5x slower than a contiguous one and reduce over (N, H, W) in their backward; the
/// conv's backward is cuDNN plus one bias-gradient kernel. The products are exact (one nonzero
/// term per output) with f32 FMA math and on the CPU.
pub fn channel_affine(x: &Tensor, scale: &Tensor, shift: &Tensor, act: Act, format: Format) -> Result<Tensor> {
    let c = scale.dim(0)?;
    let w =
        identity(c, scale.dtype(), scale.device())?.broadcast_mul(&scale.reshape((c, 1))?)?.reshape((c, c, 1, 1))?;
    conv2d_act(x, &w, Some(shift), ConvParams::new(1, 0).with_format(format), act)
}

/// The `c x c` identity, made once per size, dtype and device on this thread (`Tensor::eye`
/// uploads an index vector from the host on every call).
fn identity(c: usize, dtype: candle_core::DType, device: &candle_core::Device) -> Result<Tensor> {
    thread_local! {
        static CACHE: std::cell::RefCell<Vec<Tensor>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(t) =
            cache.iter().find(|t| t.dim(0).ok() == Some(c) && t.dtype() == dtype && t.device().same_device(device))
        {
            return Ok(t.clone());
        }
        let t = Tensor::eye(c, dtype, device)?;
        cache.push(t.clone());
        Ok(t)
    })
}

/// `relu(group_norm(x) * gamma[c] + beta[c])` with `groups` groups (PyTorch's GroupNorm: biased
/// variance per sample and group), `x` in `format`, `gamma`/`beta` f32 `[C]`, on CUDA: the
/// statistics are cuDNN's BatchNorm over an NCHW view `[1, N * groups, C / groups * H * W, 1]`
/// (a sample's group is one "channel" there), the affine map and the ReLU one [`channel_affine`].
/// candle_nn's GroupNorm on half-precision activations (f32 copies, a dozen full-size ops and
/// their backward) took 25 ms of a 123 ms training step for TAEF2's six mid-block pools (H100,
/// 256/bs32). `None` where the BatchNorm op does not run (the caller keeps its plain ops).
pub fn group_norm_relu(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
    format: Format,
) -> Result<Option<Tensor>> {
    let (n, c, h, w) = format.nchw(x.dims())?;
    if groups == 0 || c % groups != 0 {
        bail!("group_norm_relu: {c} channels in {groups} groups");
    }
    if !cfg!(feature = "cudnn") || !x.device().is_cuda() || eps < MIN_EPS || (c / groups) * h * w < 2 {
        return Ok(None);
    }
    let view = format.to_nchw(x)?.reshape((1, n * groups, (c / groups) * h * w, 1))?;
    let ones = Tensor::ones(n * groups, candle_core::DType::F32, x.device())?;
    let zeros = ones.zeros_like()?;
    let Some(out) = batch_norm_train_act(&view, &ones, &zeros, eps, Format::Nchw, Act::None)? else {
        return Ok(None);
    };
    let y = format.from_nchw(&out.y.reshape((n, c, h, w))?)?;
    Ok(Some(channel_affine(&y, gamma, beta, Act::Relu, format)?))
}
