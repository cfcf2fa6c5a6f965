//! The building blocks: taesd.py's `Block` (with TAEF2's optional mid-block pool), and one
//! runtime layer per [`LayerSpec`].
//!
//! Convolutions, ReLUs, the residual `relu(a + b)` and the 2x upsample run through taesd-ops
//! (a conv followed by a ReLU is one fused op; cuDNN forward and backward on CUDA with the
//! `cudnn` feature, candle's own convolution forward on the CPU, so CPU outputs equal candle's
//! stock ops bit for bit). [`set_use_ops`]`(false)` goes back to candle's stock ops. A whole
//! `Block` is one graph node ([`taesd_ops::block`]; [`set_fused_blocks`]`(false)` for its single
//! ops): same values and gradients, less autograd bookkeeping.
//!
//! Inside a [`Sequential`] the activations are in [`taesd_ops::preferred_format`] (NHWC on CUDA,
//! where cuDNN's kernels work in it; NCHW elsewhere): its input and output are NCHW whatever the
//! format, converted once at each end.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Module, Result, Tensor};
use candle_nn::{conv2d, conv2d_no_bias, Conv2d, Conv2dConfig, GroupNorm, VarBuilder};
use taesd_ops::{Act, ConvParams, Format};

use crate::arch::{LayerSpec, POOL_EPS, POOL_EXPANSION, POOL_GROUPS};

// Process-wide; the binaries set them from their environment switches (`train::switches`).
static USE_OPS: AtomicBool = AtomicBool::new(true);
static FUSED_BLOCKS: AtomicBool = AtomicBool::new(true);

/// Whether a `Block` with taesd-ops runs as one graph node ([`taesd_ops::block`], the default)
/// or as its single ops (the same values and gradients; more autograd bookkeeping).
pub fn set_fused_blocks(on: bool) {
    FUSED_BLOCKS.store(on, Ordering::Relaxed);
}

pub fn fused_blocks() -> bool {
    FUSED_BLOCKS.load(Ordering::Relaxed)
}

/// Whether the layers use taesd-ops (the default) or candle's stock ops (process-wide).
pub fn set_use_ops(on: bool) {
    USE_OPS.store(on, Ordering::Relaxed);
}

pub fn use_ops() -> bool {
    USE_OPS.load(Ordering::Relaxed)
}

/// `act(conv(x))` for a candle-nn `Conv2d` (its weight, bias, stride and padding), `x` in `f`.
pub fn conv_act(c: &Conv2d, x: &Tensor, relu: bool, f: Format) -> Result<Tensor> {
    let cfg = c.config();
    if !use_ops() || cfg.dilation != 1 || cfg.groups != 1 {
        return taesd_ops::outside(x, |x| {
            let y = f.from_nchw(&c.forward(&f.to_nchw(x)?)?)?;
            if relu {
                y.relu()
            } else {
                Ok(y)
            }
        });
    }
    let act = if relu { Act::Relu } else { Act::None };
    taesd_ops::conv2d_act(x, c.weight(), c.bias(), ConvParams::new(cfg.stride, cfg.padding).with_format(f), act)
}

fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if use_ops() {
        taesd_ops::add_relu(a, b)
    } else {
        (a + b)?.relu()
    }
}

fn upsample2x(x: &Tensor, f: Format) -> Result<Tensor> {
    if use_ops() {
        taesd_ops::upsample_nearest2x(x, f)
    } else {
        let (_, _, h, w) = x.dims4()?;
        taesd_ops::outside(x, |x| f.from_nchw(&f.to_nchw(x)?.upsample_nearest2d(h * 2, w * 2)?))
    }
}

/// 3x3 conv, padding 1, as the reference's `conv(n_in, n_out, **kwargs)`.
pub fn conv3x3(c_in: usize, c_out: usize, stride: usize, bias: bool, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig { padding: 1, stride, ..Default::default() };
    if bias {
        conv2d(c_in, c_out, 3, cfg, vb)
    } else {
        conv2d_no_bias(c_in, c_out, 3, cfg, vb)
    }
}

fn conv1x1_no_bias(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv2d_no_bias(c_in, c_out, 1, Conv2dConfig::default(), vb)
}

/// TAEF2's mid-block pool: `1x1 (C->4C, no bias), GroupNorm(4, 4C), ReLU, 1x1 (4C->C, no bias)`,
/// state-dict indices 0, 1, (2), 3. The block adds it to its input.
#[derive(Debug, Clone)]
pub struct MidBlockPool {
    expand: Conv2d,
    norm: GroupNorm,
    /// The GroupNorm's weight and bias (candle_nn's GroupNorm does not give them out), for
    /// `taesd_ops::group_norm_relu`.
    norm_affine: (Tensor, Tensor),
    project: Conv2d,
}

impl MidBlockPool {
    pub fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        let g = c * POOL_EXPANSION;
        let vn = vb.pp("1");
        let weight = vn.get_with_hints(g, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vn.get_with_hints(g, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self {
            expand: conv1x1_no_bias(c, g, vb.pp("0"))?,
            norm: GroupNorm::new(weight.clone(), bias.clone(), g, POOL_GROUPS, POOL_EPS)?,
            norm_affine: (weight, bias),
            project: conv1x1_no_bias(g, c, vb.pp("3"))?,
        })
    }
}

impl MidBlockPool {
    /// Computes in `x`'s dtype; the GroupNorm runs in its weights' dtype when that differs
    /// (bf16 activations with f32 master weights: normalised in f32, then cast back), on NCHW.
    /// With taesd-ops on CUDA the GroupNorm + ReLU is `taesd_ops::group_norm_relu` (cuDNN
    /// statistics, bf16 in and out).
    pub fn forward_in(&self, x: &Tensor, f: Format) -> Result<Tensor> {
        let h = conv_act(&self.expand, x, false, f)?;
        if use_ops() {
            let (w, b) = &self.norm_affine;
            if let Some(y) = taesd_ops::group_norm_relu(&h, w, b, POOL_GROUPS, POOL_EPS, f)? {
                return conv_act(&self.project, &y, false, f);
            }
        }
        let h = f.to_nchw(&h)?;
        let w_dt = self.expand.weight().dtype();
        let h = if h.dtype() == w_dt {
            self.norm.forward(&h)?
        } else {
            self.norm.forward(&h.to_dtype(w_dt)?)?.to_dtype(h.dtype())?
        };
        conv_act(&self.project, &f.from_nchw(&h.relu()?)?, false, f)
    }
}

impl Module for MidBlockPool {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_in(x, Format::Nchw)
    }
}

/// taesd.py `Block`: `relu(conv(x) + skip(x))`, `conv` = conv-ReLU-conv-ReLU-conv, `skip` a
/// bias-free 1x1 conv only when the channel count changes; with a pool, `x + pool(x)` first.
#[derive(Debug, Clone)]
pub struct Block {
    convs: [Conv2d; 3],
    skip: Option<Conv2d>,
    pool: Option<MidBlockPool>,
}

impl Block {
    pub fn new(c_in: usize, c_out: usize, pool: bool, vb: VarBuilder) -> Result<Self> {
        let vc = vb.pp("conv");
        let convs = [
            conv3x3(c_in, c_out, 1, true, vc.pp("0"))?,
            conv3x3(c_out, c_out, 1, true, vc.pp("2"))?,
            conv3x3(c_out, c_out, 1, true, vc.pp("4"))?,
        ];
        let skip = if c_in != c_out { Some(conv1x1_no_bias(c_in, c_out, vb.pp("skip"))?) } else { None };
        let pool = if pool { Some(MidBlockPool::new(c_in, vb.pp("pool"))?) } else { None };
        Ok(Self { convs, skip, pool })
    }
}

impl Block {
    /// The block on `x` in `f`.
    pub fn forward_in(&self, x: &Tensor, f: Format) -> Result<Tensor> {
        let pooled;
        let x = match &self.pool {
            // candle's add and GroupNorm: on the graph (between taped runs).
            Some(pool) => {
                pooled = taesd_ops::outside(x, |x| x + pool.forward_in(x, f)?)?;
                &pooled
            }
            None => x,
        };
        if use_ops() && fused_blocks() && taesd_ops::block_on(x.device()) {
            if let (Some(b0), Some(b1), Some(b2)) = (self.convs[0].bias(), self.convs[1].bias(), self.convs[2].bias()) {
                let p = taesd_ops::BlockParams {
                    convs: [(self.convs[0].weight(), b0), (self.convs[1].weight(), b1), (self.convs[2].weight(), b2)],
                    skip: self.skip.as_ref().map(|s| s.weight()),
                    format: f,
                };
                return taesd_ops::block(x, &p);
            }
        }
        let h = conv_act(&self.convs[0], x, true, f)?;
        let h = conv_act(&self.convs[1], &h, true, f)?;
        let h = conv_act(&self.convs[2], &h, false, f)?;
        let s = match &self.skip {
            Some(skip) => conv_act(skip, x, false, f)?,
            None => x.clone(),
        };
        add_relu(&h, &s)
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_in(x, Format::Nchw)
    }
}

/// taesd.py `Clamp`: `tanh(x / 3) * 3`, the decoder's soft latent clamp.
pub fn latent_clamp(x: &Tensor) -> Result<Tensor> {
    (x / 3.0)?.tanh()? * 3.0
}

/// One runtime layer of the encoder/decoder list.
#[derive(Debug, Clone)]
pub enum Layer {
    Conv(Conv2d),
    Block(Box<Block>),
    Relu,
    Upsample,
    Clamp,
}

impl Layer {
    /// Build the layer of `spec`, its tensors under `vb` (already at the layer's index).
    pub fn new(spec: &LayerSpec, vb: VarBuilder) -> Result<Self> {
        Ok(match *spec {
            LayerSpec::Conv { c_in, c_out, stride, bias } => Layer::Conv(conv3x3(c_in, c_out, stride, bias, vb)?),
            LayerSpec::Block { c_in, c_out, pool } => Layer::Block(Box::new(Block::new(c_in, c_out, pool, vb)?)),
            LayerSpec::Relu => Layer::Relu,
            LayerSpec::Upsample => Layer::Upsample,
            LayerSpec::Clamp => Layer::Clamp,
        })
    }
}

impl Layer {
    /// The layer on `x` in `f`.
    pub fn forward_in(&self, x: &Tensor, f: Format) -> Result<Tensor> {
        match self {
            Layer::Conv(c) => conv_act(c, x, false, f),
            Layer::Block(b) => b.forward_in(x, f),
            Layer::Relu => taesd_ops::outside(x, |x| x.relu()),
            Layer::Upsample => upsample2x(x, f),
            Layer::Clamp => taesd_ops::outside(x, latent_clamp),
        }
    }
}

impl Module for Layer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_in(x, Format::Nchw)
    }
}

/// An `nn.Sequential`: the layers of `specs`, layer `i` under `vb.pp(i)`.
#[derive(Debug, Clone)]
pub struct Sequential {
    layers: Vec<Layer>,
}

impl Sequential {
    pub fn new(specs: &[LayerSpec], vb: VarBuilder) -> Result<Self> {
        let layers =
            specs.iter().enumerate().map(|(i, s)| Layer::new(s, vb.pp(i.to_string()))).collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The dtype of the weights (that of the first conv).
    pub fn dtype(&self) -> Option<candle_core::DType> {
        self.layers.iter().find_map(|l| match l {
            Layer::Conv(c) => Some(c.weight().dtype()),
            _ => None,
        })
    }
}

impl Sequential {
    /// NCHW `x` -> NCHW output, the layers running on activations in `f` (one conversion at each
    /// end; values equal NCHW's, bit for bit on the CPU).
    ///
    /// While taping is on (`taesd_ops::enable_taping`, in training) the layers run as taped
    /// runs of taesd-ops (`taesd_ops::taped`): one graph node each instead of one per op.
    pub fn forward_in_format(&self, x: &Tensor, f: Format) -> Result<Tensor> {
        let layers = |x: &Tensor| -> Result<Tensor> {
            let mut h = x.clone();
            let mut i = 0;
            while i < self.layers.len() {
                // conv -> ReLU: one fused op.
                if let (Layer::Conv(c), Some(Layer::Relu)) = (&self.layers[i], self.layers.get(i + 1)) {
                    h = conv_act(c, &h, true, f)?;
                    i += 2;
                    continue;
                }
                h = self.layers[i].forward_in(&h, f)?;
                i += 1;
            }
            Ok(h)
        };
        let h = f.from_nchw(x)?;
        let h = if use_ops() { taesd_ops::taped(&h, layers)? } else { layers(&h)? };
        f.to_nchw(&h)
    }
}

impl Module for Sequential {
    /// In [`taesd_ops::preferred_format`] for `x`'s device (NCHW with candle's stock ops).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let f = if use_ops() { taesd_ops::preferred_format(x.device()) } else { Format::Nchw };
        self.forward_in_format(x, f)
    }
}
