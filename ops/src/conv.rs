//! `act(conv2d(x, w) + b)` as one candle custom op, with its backward.
//!
//! Forward, backward-data and backward-filter run through cuDNN on CUDA (cached descriptors,
//! algorithm and workspace per shape; see [`crate::Settings`]), and through candle's own CPU
//! convolutions on the CPU (the same ops candle's backprop uses: exact). The bias add and the
//! ReLU are fused into the op: the graph keeps only `x`, `w`, `b` and the output (what PyTorch's
//! autograd keeps for conv + ReLU), and the backward is one kernel for the ReLU mask and the
//! bias gradient, then one cuDNN call each for the input and weight gradients (skipped for an
//! input or weight that needs no gradient).

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Device, Layout, Result, Shape, Tensor};

use crate::cpu;
use crate::format::{via_nchw, Format};
use crate::tape;
use crate::weight_grads::{collector_for, WeightGrads};

/// The activation fused after the bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Act {
    None,
    /// `max(z, 0)`, NaN kept; the gradient passes where the output is > 0 (PyTorch's rule).
    Relu,
}

/// Square stride and zero padding (dilation 1, one group: all that TAESD uses), and the
/// activations' [`Format`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvParams {
    pub stride: usize,
    pub padding: usize,
    pub format: Format,
}

impl ConvParams {
    /// NCHW activations.
    pub const fn new(stride: usize, padding: usize) -> Self {
        Self { stride, padding, format: Format::Nchw }
    }

    pub const fn with_format(self, format: Format) -> Self {
        Self { format, ..self }
    }

    #[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
    pub(crate) fn out_hw(&self, h: usize, w: usize, kh: usize, kw: usize) -> (usize, usize) {
        ((h + 2 * self.padding - kh) / self.stride + 1, (w + 2 * self.padding - kw) / self.stride + 1)
    }
}

/// `conv2d(x, w) + b`: `x` `[N, C_in, H, W]`, `w` `[C_out, C_in, kh, kw]`, `b` `[C_out]` (NCHW;
/// [`conv2d_act`] takes any format).
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    conv2d_act(x, w, b, ConvParams::new(stride, padding), Act::None)
}

/// `act(conv2d(x, w) + b)`, `x` in `p.format`, `w` `[C_out, C_in, kh, kw]` whatever the format.
/// `w` and `b` are cast to `x`'s dtype first (mixed precision: f32 master weights, bf16/f16
/// activations; the cast's backward gives f32 gradients).
pub fn conv2d_act(x: &Tensor, w: &Tensor, b: Option<&Tensor>, p: ConvParams, act: Act) -> Result<Tensor> {
    let (_, c_in, h, wd) = p.format.nchw(x.dims())?;
    let (c_out, wc_in, kh, kw) = w.dims4()?;
    if c_in != wc_in {
        bail!("conv2d: input has {c_in} channels, the weight {wc_in}");
    }
    if h + 2 * p.padding < kh || wd + 2 * p.padding < kw || p.stride == 0 {
        bail!("conv2d: input {h}x{wd} too small for a {kh}x{kw} kernel with padding {}", p.padding);
    }
    if let Some(b) = b {
        if b.dims() != [c_out] {
            bail!("conv2d: bias of shape {:?} for {c_out} output channels", b.dims());
        }
    }
    let dt = x.dtype();
    let cast = |t: &Tensor| -> Result<Tensor> {
        if t.dtype() == dt {
            t.contiguous()
        } else {
            t.to_dtype(dt)?.contiguous()
        }
    };
    let ws: Vec<&Tensor> = std::iter::once(w).chain(b).collect();
    let padded = p.format == Format::Nhwc && x.device().is_cuda() && (c_in % 8 != 0 || c_out % 8 != 0);
    if tape::is_open()
        && (padded || !fast_device(x.device()) || (collector_for(&ws).is_none() && ws.iter().any(|w| w.track_op())))
    {
        // Not recordable on a tape (padding or candle's ops; or weights whose gradients go
        // through the graph): on the graph, between taped runs.
        return tape::outside(x, |x| conv2d_act(x, w, b, p, act));
    }
    if padded {
        // cuDNN's NHWC tensor-core kernels take channel counts in multiples of 8; others ran
        // generic kernels 5-20x slower (H100: the discriminator's 35-channel input conv and its
        // 1-channel projections, 10 ms of a step). Zero channels are appended to the input and
        // weight (and output channels dropped again): the same sums, in the graph.
        let (pi, po) = (c_in.next_multiple_of(8) - c_in, c_out.next_multiple_of(8) - c_out);
        let xp = if pi > 0 { x.pad_with_zeros(3, 0, pi)? } else { x.clone() };
        let wp = w.pad_with_zeros(1, 0, pi)?.pad_with_zeros(0, 0, po)?;
        let bp = b.map(|b| b.pad_with_zeros(0, 0, po)).transpose()?;
        let y = conv2d_act(&xp, &wp, bp.as_ref(), p, act)?;
        return if po > 0 { y.narrow(3, 0, c_out)?.contiguous() } else { Ok(y) };
    }
    let x = x.contiguous()?;
    if !fast_device(x.device()) {
        return stock(&x, &cast(w)?, b.map(cast).transpose()?.as_ref(), p, act);
    }
    let (op, w, b) = match collector_for(&ws) {
        None => (ConvOp { p, act, sunk: None }, cast(&p.format.filter(w)?)?, b.map(cast).transpose()?),
        Some(grads) => {
            // The weights off the graph (crate::weight_grads): the op computes with detached
            // copies and keeps the variables as inputs that get no gradient.
            let sunk = Sunk {
                w: cast(&p.format.filter(&w.detach())?)?,
                b: b.map(|b| cast(&b.detach())).transpose()?,
                w_id: w.id(),
                b_id: b.map(|b| b.id()),
                grads,
            };
            (ConvOp { p, act, sunk: Some(sunk) }, w.clone(), b.cloned())
        }
    };
    if tape::is_open() {
        let op = Arc::new(op);
        let y = match &b {
            Some(b) => x.apply_op3_no_bwd(&w, b, op.as_ref())?,
            None => x.apply_op2_no_bwd(&w, op.as_ref())?,
        };
        let ws: Vec<&Tensor> = std::iter::once(&w).chain(&b).collect();
        let (xs, wk, bk) = (x.clone(), w.clone(), b.clone());
        tape::record(
            "conv2d",
            &[&x],
            &ws,
            &y,
            Box::new(move |y, dy, want| Ok(vec![op.backward(&xs, &wk, bk.as_ref(), y, dy, want[0])?.0])),
        )?;
        return Ok(y);
    }
    apply(&x, &w, b.as_ref(), op)
}

/// The op itself: `x` contiguous in `p.format`, `w` in the format's filter layout
/// ([`Format::filter`]) and `b` in `x`'s dtype, contiguous.
pub(crate) fn conv_op(x: &Tensor, w: &Tensor, b: Option<&Tensor>, p: ConvParams, act: Act) -> Result<Tensor> {
    apply(x, w, b, ConvOp { p, act, sunk: None })
}

/// `op` in the graph: a two-input node without a bias, three-input with one.
fn apply(x: &Tensor, w: &Tensor, b: Option<&Tensor>, op: ConvOp) -> Result<Tensor> {
    match b {
        Some(b) => x.apply_op3_arc(w, b, Arc::new(Box::new(op))),
        None => x.apply_op2_arc(w, Arc::new(Box::new(op))),
    }
}

/// candle's own ops, for devices without our path (CUDA without the `cudnn` feature, Metal).
/// `w` `[C_out, C_in, kh, kw]`.
pub fn stock(x: &Tensor, w: &Tensor, b: Option<&Tensor>, p: ConvParams, act: Act) -> Result<Tensor> {
    via_nchw(p.format, &[x], |x| {
        let mut y = x[0].conv2d(w, p.padding, p.stride, 1, 1)?;
        if let Some(b) = b {
            y = y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?;
        }
        match act {
            Act::None => Ok(y),
            Act::Relu => y.relu(),
        }
    })
}

/// Whether conv2d runs our op on this device.
pub fn fast_device(d: &Device) -> bool {
    match d {
        Device::Cpu => true,
        Device::Cuda(_) => cfg!(feature = "cudnn"),
        _ => false,
    }
}

/// Weights taken off the graph: the detached copies the op computes with (filter layout, the
/// activations' dtype) and where their gradients go.
struct Sunk {
    w: Tensor,
    b: Option<Tensor>,
    w_id: candle_core::TensorId,
    b_id: Option<candle_core::TensorId>,
    grads: WeightGrads,
}

struct ConvOp {
    p: ConvParams,
    act: Act,
    /// `Some`: the weight (and bias) inputs are variables standing in for `Sunk`'s copies.
    sunk: Option<Sunk>,
}

impl ConvOp {
    fn cpu(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<(CpuStorage, Shape)> {
        let (w, b) = match &self.sunk {
            Some(s) => (&s.w, s.b.as_ref()),
            None => (w, b),
        };
        let f = self.p.format;
        let w = f.filter_to_oihw(w)?;
        cpu::to_storage(&via_nchw(f, &[x], |x| cpu::conv_fwd(&x[0], &w, b, self.p, self.act))?)
    }

    /// The forward on CUDA, with the sunk copies in place of the weight inputs.
    #[cfg(feature = "cudnn")]
    fn cuda(
        &self,
        x: (&candle_core::CudaStorage, &Layout),
        w: (&candle_core::CudaStorage, &Layout),
        b: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let Some(s) = &self.sunk else {
            return crate::cuda::conv::forward(x, w, b, self.p, self.act);
        };
        let wc = crate::cuda::Cuda::of(&s.w)?;
        let bc = s.b.as_ref().map(crate::cuda::Cuda::of).transpose()?;
        crate::cuda::conv::forward(
            x,
            (wc.storage(), wc.layout),
            bc.as_ref().map(|c| (c.storage(), c.layout)),
            self.p,
            self.act,
        )
    }

    /// `want_x`: whether `x`'s gradient is wanted (the graph's `x.track_op()`; a tape says).
    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        y: &Tensor,
        dy: &Tensor,
        want_x: bool,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        if let Some(s) = &self.sunk {
            let (dz, db) = act_bias_bwd(&dy, y, self.act, s.b.is_some(), self.p.format)?;
            let dx = if want_x { Some(conv_bwd_data(&dz, &s.w, x.dims(), self.p)?) } else { None };
            let dw = conv_bwd_filter(x, &dz, s.w.dims(), self.p)?;
            s.grads.add(s.w_id, &self.p.format.filter_to_oihw(&dw)?)?;
            if let (Some(db), Some(id)) = (db, s.b_id) {
                s.grads.add(id, &db)?;
            }
            return Ok((dx, None, None));
        }
        let want_b = b.is_some_and(|b| b.track_op());
        let (dz, db) = act_bias_bwd(&dy, y, self.act, want_b, self.p.format)?;
        let dx = if want_x { Some(conv_bwd_data(&dz, w, x.dims(), self.p)?) } else { None };
        let dw = if w.track_op() { Some(conv_bwd_filter(x, &dz, w.dims(), self.p)?) } else { None };
        Ok((dx, dw, db))
    }
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "taesd-conv2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu(&cpu::to_tensor(s1, l1)?, &cpu::to_tensor(s2, l2)?, None)
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda((s1, l1), (s2, l2), None)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.backward(x, w, None, y, dy, x.track_op())?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "taesd-conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu(&cpu::to_tensor(s1, l1)?, &cpu::to_tensor(s2, l2)?, Some(&cpu::to_tensor(s3, l3)?))
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
        self.cuda((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward(x, w, Some(b), y, dy, x.track_op())
    }
}

// Backward pieces, by device. They take and give contiguous tensors, outside the graph.

/// Backward of `act(z + b)` on activations in `format`: `(dz, db)`.
pub fn act_bias_bwd(dy: &Tensor, y: &Tensor, act: Act, bias: bool, format: Format) -> Result<(Tensor, Option<Tensor>)> {
    if act == Act::None && !bias {
        return Ok((dy.clone(), None));
    }
    match dy.device() {
        Device::Cpu => match format {
            Format::Nchw => cpu::act_bias_bwd(dy, y, act, bias),
            Format::Nhwc => {
                let (dy, y) = (format.to_nchw(dy)?, format.to_nchw(y)?);
                let (dz, db) = cpu::act_bias_bwd(&dy, &y, act, bias)?;
                Ok((format.from_nchw(&dz)?, db))
            }
        },
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => crate::cuda::kernels::act_bias_bwd(dy, y, act, bias, format),
        d => bail!("taesd-ops: no backward on {d:?}"),
    }
}

/// The gradient of `conv2d(x, w)` with respect to `x` (of dims `x_dims`), given `dz`; `w` in
/// `p.format`'s filter layout.
pub fn conv_bwd_data(dz: &Tensor, w: &Tensor, x_dims: &[usize], p: ConvParams) -> Result<Tensor> {
    match dz.device() {
        Device::Cpu => {
            let f = p.format;
            let w = f.filter_to_oihw(w)?;
            let (n, c, h, wd) = f.nchw(x_dims)?;
            via_nchw(f, &[dz], |dz| cpu::conv_bwd_data(&dz[0], &w, &[n, c, h, wd], p))
        }
        #[cfg(feature = "cudnn")]
        Device::Cuda(_) => crate::cuda::conv::backward_data(dz, w, x_dims, p),
        d => bail!("taesd-ops: no conv backward on {d:?}"),
    }
}

/// The gradient of `conv2d(x, w)` with respect to `w` (of dims `w_dims`, `p.format`'s filter
/// layout), given `dz`.
pub fn conv_bwd_filter(x: &Tensor, dz: &Tensor, w_dims: &[usize], p: ConvParams) -> Result<Tensor> {
    match dz.device() {
        Device::Cpu => {
            let f = p.format;
            let (o, i, kh, kw) = f.filter_oihw(w_dims)?;
            let (x, dz) = (f.to_nchw(x)?, f.to_nchw(dz)?);
            f.filter(&cpu::conv_bwd_filter(&x, &dz, &[o, i, kh, kw], p)?)?.contiguous()
        }
        #[cfg(feature = "cudnn")]
        Device::Cuda(_) => crate::cuda::conv::backward_filter(x, dz, w_dims, p),
        d => bail!("taesd-ops: no conv backward on {d:?}"),
    }
}
