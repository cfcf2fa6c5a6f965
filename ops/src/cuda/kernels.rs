//! Launchers of our PTX kernels (src/kernels/ops.cu).

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaDevice, CudaStorage};
use candle_core::{bail, DType, Layout, Result, Shape, Tensor};

use super::{alloc, by_dtype, cfg_1d, check_dtype, err, func, tensor, view, Cuda, Elem};
use crate::adam::{AdamConsts, AdamOut};
use crate::conv::Act;
use crate::format::Format;

/// A null device pointer argument.
const NULL: u64 = 0;

fn threads_for(n: usize) -> u32 {
    (n.next_multiple_of(32)).clamp(32, 256) as u32
}

/// `y = act(y + b[c])` in place on an NCHW buffer of `planes = N * C` planes of `hw`.
pub(crate) fn bias_act<T: Elem>(
    dev: &CudaDevice,
    y: &mut CudaSlice<T>,
    b: Option<&CudaView<'_, T>>,
    c: usize,
    hw: usize,
    planes: usize,
    act: Act,
) -> Result<()> {
    let f = func(dev, &format!("bias_act_{}", T::SUFFIX))?;
    let stream = dev.cuda_stream();
    let (c32, hw32, planes32) = (c as u32, hw as u32, planes as u32);
    let relu = (act == Act::Relu) as i32;
    let threads = threads_for(hw);
    let gx = hw.div_ceil(threads as usize * 4).clamp(1, 1024) as u32;
    let gy = planes.clamp(1, 65535) as u32;
    let mut l = stream.launch_builder(&f);
    l.arg(y);
    match b {
        Some(b) => l.arg(b),
        None => l.arg(&NULL),
    };
    l.arg(&c32).arg(&hw32).arg(&planes32).arg(&relu);
    let cfg = LaunchConfig { grid_dim: (gx, gy, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the arguments are the kernel's parameters (ops.cu), in order and type; every buffer
    // holds the elements the launch grid indexes (all sized from the same shapes above).
    unsafe { l.launch(cfg) }.map_err(err)?;
    Ok(())
}

/// The launch of a channels-last kernel over `n` elements of `c` channels: blockDim a multiple
/// of `c` (ops.cu), about `per_thread` elements per thread, at most `max_blocks` blocks.
fn cl_launch(c: usize, n: usize, per_thread: usize, max_blocks: usize, shared: bool) -> Result<LaunchConfig> {
    if c == 0 || c > 1024 {
        bail!("taesd-ops: channels-last kernel with {c} channels (1..=1024)");
    }
    let threads = c * (256 / c).max(1);
    let blocks = n.div_ceil(threads * per_thread).clamp(1, max_blocks);
    Ok(LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: if shared { (threads * 4) as u32 } else { 0 },
    })
}

/// `y = act(y + b[c])` in place on an NHWC buffer of `n` elements, `c` channels.
pub(crate) fn bias_act_cl<T: Elem>(
    dev: &CudaDevice,
    y: &mut CudaSlice<T>,
    b: Option<&CudaView<'_, T>>,
    c: usize,
    n: usize,
    act: Act,
) -> Result<()> {
    let f = func(dev, &format!("bias_act_cl_{}", T::SUFFIX))?;
    let stream = dev.cuda_stream();
    let (c32, relu) = (c as u32, (act == Act::Relu) as i32);
    let cfg = cl_launch(c, n, 4, 132 * 16, false)?;
    let mut l = stream.launch_builder(&f);
    l.arg(y);
    match b {
        Some(b) => l.arg(b),
        None => l.arg(&NULL),
    };
    l.arg(&c32).arg(&n).arg(&relu);
    // SAFETY: the arguments are the kernel's parameters (ops.cu), in order and type; every buffer
    // holds the elements the launch grid indexes (all sized from the same shapes above).
    unsafe { l.launch(cfg) }.map_err(err)?;
    Ok(())
}

/// `y = act(y + b[c])` in place on a buffer of `format` with `(N, C, H, W)` = `dims`.
pub(crate) fn bias_act_in<T: Elem>(
    dev: &CudaDevice,
    y: &mut CudaSlice<T>,
    b: Option<&CudaView<'_, T>>,
    dims: [usize; 4],
    format: Format,
    act: Act,
) -> Result<()> {
    let [n, c, h, w] = dims;
    match format {
        Format::Nchw => bias_act(dev, y, b, c, h * w, n * c, act),
        Format::Nhwc => bias_act_cl(dev, y, b, c, n * c * h * w, act),
    }
}

/// Backward of `act(z + b)` from the output `y`: `(dz, db)`.
pub(crate) fn act_bias_bwd(
    dy: &Tensor,
    y: &Tensor,
    act: Act,
    bias: bool,
    format: Format,
) -> Result<(Tensor, Option<Tensor>)> {
    match format {
        Format::Nchw => by_dtype!(dy.dtype(), act_bias_bwd_t(dy, y, act, bias)),
        Format::Nhwc => by_dtype!(dy.dtype(), act_bias_bwd_cl_t(dy, y, act, bias)),
    }
}

/// `bias_grad_finish`: `db[c]` = the sum over `n` rows of `partial` `[n, c]`.
fn bias_grad_finish<T: Elem>(dev: &CudaDevice, partial: &CudaSlice<f32>, n: usize, c: usize) -> Result<Tensor> {
    let mut db = alloc::<T>(dev, c)?;
    let f = func(dev, &format!("bias_grad_finish_{}", T::SUFFIX))?;
    let (n32, c32) = (n as u32, c as u32);
    let stream = dev.cuda_stream();
    let mut l = stream.launch_builder(&f);
    l.arg(partial).arg(&mut db).arg(&n32).arg(&c32);
    let cfg = LaunchConfig { grid_dim: (c.div_ceil(128) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the arguments are the kernel's parameters (ops.cu), in order and type; every buffer
    // holds the elements the launch grid indexes (all sized from the same shapes above).
    unsafe { l.launch(cfg) }.map_err(err)?;
    Ok(tensor(db, dev, c))
}

fn act_bias_bwd_cl_t<T: Elem>(dy: &Tensor, y: &Tensor, act: Act, bias: bool) -> Result<(Tensor, Option<Tensor>)> {
    check_dtype(y, dy.dtype())?;
    let c = Format::Nhwc.nchw(dy.dims())?.1;
    let n = dy.elem_count();
    let relu = act == Act::Relu;
    let (dyc, yc) = (Cuda::of(dy)?, Cuda::of(y)?);
    let dev = dyc.device().clone();
    let stream = dev.cuda_stream();
    let (dyv, yv) = (dyc.view::<T>()?, yc.view::<T>()?);
    let cfg = cl_launch(c, n, 8, 1024, true)?;
    let blocks = cfg.grid_dim.0 as usize;
    let mut dz = if relu { Some(alloc::<T>(&dev, n)?) } else { None };
    let mut partial = if bias { Some(alloc::<f32>(&dev, blocks * c)?) } else { None };
    let f = func(&dev, &format!("act_bias_bwd_cl_{}", T::SUFFIX))?;
    let (c32, relu32) = (c as u32, relu as i32);
    let mut l = stream.launch_builder(&f);
    l.arg(&dyv).arg(&yv);
    match dz.as_mut() {
        Some(d) => l.arg(d),
        None => l.arg(&NULL),
    };
    match partial.as_mut() {
        Some(p) => l.arg(p),
        None => l.arg(&NULL),
    };
    l.arg(&c32).arg(&n).arg(&relu32);
    // SAFETY: the arguments are the kernel's parameters (ops.cu), in order and type; every buffer
    // holds the elements the launch grid indexes (all sized from the same shapes above).
    unsafe { l.launch(cfg) }.map_err(err)?;
    let db = partial.map(|p| bias_grad_finish::<T>(&dev, &p, blocks, c)).transpose()?;
    let dz = match dz {
        Some(d) => tensor(d, &dev, dy.shape().clone()),
        None => dy.clone(),
    };
    Ok((dz, db))
}

fn act_bias_bwd_t<T: Elem>(dy: &Tensor, y: &Tensor, act: Act, bias: bool) -> Result<(Tensor, Option<Tensor>)> {
    check_dtype(y, dy.dtype())?;
    let (n, c, h, w) = dy.dims4()?;
    let hw = h * w;
    let relu = act == Act::Relu;
    let (dz, partial) = {
        let dyc = Cuda::of(dy)?;
        let yc = Cuda::of(y)?;
        let dev = dyc.device().clone();
        let stream = dev.cuda_stream();
        let (dyv, yv) = (dyc.view::<T>()?, yc.view::<T>()?);
        let mut dz = if relu { Some(alloc::<T>(&dev, dy.elem_count())?) } else { None };
        let mut partial = if bias { Some(alloc::<f32>(&dev, n * c)?) } else { None };
        let f = func(&dev, &format!("act_bias_bwd_{}", T::SUFFIX))?;
        let (c32, hw32, relu32) = (c as u32, hw as u32, relu as i32);
        let mut l = stream.launch_builder(&f);
        l.arg(&dyv).arg(&yv);
        match dz.as_mut() {
            Some(d) => l.arg(d),
            None => l.arg(&NULL),
        };
        match partial.as_mut() {
            Some(p) => l.arg(p),
            None => l.arg(&NULL),
        };
        l.arg(&c32).arg(&hw32).arg(&relu32);
        if c > 65535 {
            bail!("act_bias_bwd: {c} channels");
        }
        let cfg = LaunchConfig {
            grid_dim: (n as u32, c as u32, 1),
            block_dim: (threads_for(hw).max(128), 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments are the kernel's parameters (ops.cu), in order and type; every buffer
        // holds the elements the launch grid indexes (all sized from the same shapes above).
        unsafe { l.launch(cfg) }.map_err(err)?;
        let db = partial.map(|p| bias_grad_finish::<T>(&dev, &p, n, c)).transpose()?;
        (dz.map(|d| tensor(d, &dev, dy.shape().clone())), db)
    };
    Ok((dz.unwrap_or_else(|| dy.clone()), partial))
}

pub(crate) fn add_relu(a: (&CudaStorage, &Layout), b: (&CudaStorage, &Layout)) -> Result<(CudaStorage, Shape)> {
    by_dtype!(a.0.dtype(), add_relu_t(a, b))
}

fn add_relu_t<T: Elem>(a: (&CudaStorage, &Layout), b: (&CudaStorage, &Layout)) -> Result<(CudaStorage, Shape)> {
    let dev = &a.0.device;
    let (av, bv) = (view::<T>(a.0, a.1)?, view::<T>(b.0, b.1)?);
    let n = a.1.shape().elem_count();
    let mut out = alloc::<T>(dev, n)?;
    let f = func(dev, &format!("add_relu_{}", T::SUFFIX))?;
    let stream = dev.cuda_stream();
    let mut l = stream.launch_builder(&f);
    l.arg(&av).arg(&bv).arg(&mut out).arg(&n);
    // SAFETY: the arguments are the kernel's parameters (ops.cu), in order and type; every buffer
    // holds the elements the launch grid indexes (all sized from the same shapes above).
    unsafe { l.launch(cfg_1d(n)) }.map_err(err)?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), a.1.shape().clone()))
}

/// `relu(a + b)` of two CUDA tensors (same shape and dtype), as a fresh storage.
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
pub(crate) fn add_relu_tensors(a: &Tensor, b: &Tensor) -> Result<(CudaStorage, Shape)> {
    check_dtype(b, a.dtype())?;
    if a.shape() != b.shape() {
        bail!("taesd-ops: add_relu of {:?} and {:?}", a.dims(), b.dims());
    }
    let (ac, bc) = (Cuda::of(a)?, Cuda::of(b)?);
    add_relu((ac.storage(), ac.layout), (bc.storage(), bc.layout))
}

pub(crate) fn relu_bwd(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    by_dtype!(dy.dtype(), relu_bwd_t(dy, y))
}

fn relu_bwd_t<T: Elem>(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    check_dtype(y, dy.dtype())?;
    let (dyc, yc) = (Cuda::of(dy)?, Cuda::of(y)?);
    let dev = dyc.device().clone();
    let n = dy.elem_count();
    let mut out = alloc::<T>(&dev, n)?;
    let f = func(&dev, &format!("relu_bwd_{}", T::SUFFIX))?;
    let stream = dev.cuda_stream();
    let (dyv, yv) = (dyc.view::<T>()?, yc.view::<T>()?);
    let mut l = stream.launch_builder(&f);
    l.arg(&dyv).arg(&yv).arg(&mut out).arg(&n);
    // SAFETY: the arguments are the kernel's parameters (ops.cu), in order and type; every buffer
    // holds the elements the launch grid indexes (all sized from the same shapes above).
    unsafe { l.launch(cfg_1d(n)) }.map_err(err)?;
    Ok(tensor(out, &dev, dy.shape().clone()))
}

pub(crate) fn upsample2x(x: (&CudaStorage, &Layout), format: Format) -> Result<(CudaStorage, Shape)> {
    by_dtype!(x.0.dtype(), upsample2x_t(x, format))
}

/// The kernel name and its two size arguments of the 2x up/down kernels in `format`
/// (`(h, w)` NCHW, `(w, c)` NHWC), for an activation of logical `(n, c, h, w)`.
fn resample_args(kernel: &str, format: Format, c: usize, h: usize, w: usize) -> (String, u32, u32) {
    match format {
        Format::Nchw => (kernel.to_string(), h as u32, w as u32),
        Format::Nhwc => (format!("{kernel}_cl"), w as u32, c as u32),
    }
}

fn upsample2x_t<T: Elem>(x: (&CudaStorage, &Layout), format: Format) -> Result<(CudaStorage, Shape)> {
    let dev = &x.0.device;
    let (n, c, h, w) = format.nchw(x.1.dims())?;
    let xv = view::<T>(x.0, x.1)?;
    let count = n * c * h * w;
    let mut out = alloc::<T>(dev, 4 * count)?;
    let (name, a, b) = resample_args("upsample2x", format, c, h, w);
    let f = func(dev, &format!("{name}_{}", T::SUFFIX))?;
    let stream = dev.cuda_stream();
    let mut l = stream.launch_builder(&f);
    l.arg(&xv).arg(&mut out).arg(&a).arg(&b).arg(&count);
    // SAFETY: the arguments are the kernel's parameters (ops.cu), in order and type; every buffer
    // holds the elements the launch grid indexes (all sized from the same shapes above).
    unsafe { l.launch(cfg_1d(count)) }.map_err(err)?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from(format.dims(n, c, 2 * h, 2 * w).to_vec())))
}

pub(crate) fn downsum2x(dy: &Tensor, format: Format) -> Result<Tensor> {
    // The NCHW kernel reads element pairs: the view must start at an even element.
    let dy = if format == Format::Nchw && dy.layout().start_offset() % 2 != 0 { dy.copy()? } else { dy.clone() };
    by_dtype!(dy.dtype(), downsum2x_t(&dy, format))
}

fn downsum2x_t<T: Elem>(dy: &Tensor, format: Format) -> Result<Tensor> {
    let (n, c, h2, w2) = format.nchw(dy.dims())?;
    let (h, w) = (h2 / 2, w2 / 2);
    let dyc = Cuda::of(dy)?;
    let dev = dyc.device().clone();
    let count = n * c * h * w;
    let mut out = alloc::<T>(&dev, count)?;
    let (name, a, b) = resample_args("downsum2x", format, c, h, w);
    let f = func(&dev, &format!("{name}_{}", T::SUFFIX))?;
    let stream = dev.cuda_stream();
    let dyv = dyc.view::<T>()?;
    let mut l = stream.launch_builder(&f);
    l.arg(&dyv).arg(&mut out).arg(&a).arg(&b).arg(&count);
    // SAFETY: the arguments are the kernel's parameters (ops.cu), in order and type; every buffer
    // holds the elements the launch grid indexes (all sized from the same shapes above).
    unsafe { l.launch(cfg_1d(count)) }.map_err(err)?;
    Ok(tensor(out, &dev, format.dims(n, c, h, w).to_vec()))
}

/// The fused Adam update on flat contiguous f32 tensors.
pub(crate) fn adam(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    vmax: Option<&Tensor>,
    scale: Option<&Tensor>,
    c: &AdamConsts,
) -> Result<AdamOut> {
    for t in [p, g, m, v].into_iter().chain(vmax).chain(scale) {
        check_dtype(t, DType::F32)?;
    }
    let n = p.elem_count();
    let (pc, gc, mc, vc) = (Cuda::of(p)?, Cuda::of(g)?, Cuda::of(m)?, Cuda::of(v)?);
    let vmc = vmax.map(Cuda::of).transpose()?;
    let sc = scale.map(Cuda::of).transpose()?;
    let dev = pc.device().clone();
    let (pv, gv, mv, vv) = (pc.view::<f32>()?, gc.view::<f32>()?, mc.view::<f32>()?, vc.view::<f32>()?);
    let vmv = vmc.as_ref().map(|c| c.view::<f32>()).transpose()?;
    let sv = sc.as_ref().map(|c| c.view::<f32>()).transpose()?;
    let mut po = alloc::<f32>(&dev, n)?;
    let mut mo = alloc::<f32>(&dev, n)?;
    let mut vo = alloc::<f32>(&dev, n)?;
    let mut vmo = match vmax {
        Some(_) => Some(alloc::<f32>(&dev, n)?),
        None => None,
    };
    let f = func(&dev, "adam_f32")?;
    let stream = dev.cuda_stream();
    let decoupled = c.decoupled as i32;
    let mut l = stream.launch_builder(&f);
    l.arg(&pv).arg(&gv).arg(&mv).arg(&vv);
    match &vmv {
        Some(x) => l.arg(x),
        None => l.arg(&NULL),
    };
    match &sv {
        Some(x) => l.arg(x),
        None => l.arg(&NULL),
    };
    l.arg(&mut po).arg(&mut mo).arg(&mut vo);
    match vmo.as_mut() {
        Some(x) => l.arg(x),
        None => l.arg(&NULL),
    };
    l.arg(&n)
        .arg(&c.decay_mul)
        .arg(&c.wd)
        .arg(&decoupled)
        .arg(&c.one_minus_b1)
        .arg(&c.b2)
        .arg(&c.one_minus_b2)
        .arg(&c.inv_bc2_sqrt)
        .arg(&c.eps)
        .arg(&c.step_size);
    // SAFETY: the arguments are the kernel's parameters (ops.cu), in order and type; every buffer
    // holds the elements the launch grid indexes (all sized from the same shapes above).
    unsafe { l.launch(cfg_1d(n)) }.map_err(err)?;
    Ok(AdamOut {
        p: tensor(po, &dev, n),
        m: tensor(mo, &dev, n),
        v: tensor(vo, &dev, n),
        vmax: vmo.map(|x| tensor(x, &dev, n)),
    })
}

/// Per-channel sums over a channels-last buffer of `n` elements (`bn_sums_cl` in `mode`),
/// finished to f32 `[C]` tensors: (p1, p2 when `mode` is 2).
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
fn bn_sums<T: Elem>(
    dev: &CudaDevice,
    a: &CudaView<'_, T>,
    b: Option<&CudaView<'_, T>>,
    mean: Option<&CudaView<'_, f32>>,
    invstd: Option<&CudaView<'_, f32>>,
    c: usize,
    n: usize,
    mode: i32,
) -> Result<(Tensor, Option<Tensor>)> {
    let mut cfg = cl_launch(c, n, 8, 1024, true)?;
    cfg.shared_mem_bytes *= 2;
    let blocks = cfg.grid_dim.0 as usize;
    let mut p1 = alloc::<f32>(dev, blocks * c)?;
    let mut p2 = if mode == 2 { Some(alloc::<f32>(dev, blocks * c)?) } else { None };
    let f = func(dev, &format!("bn_sums_cl_{}", T::SUFFIX))?;
    let stream = dev.cuda_stream();
    let c32 = c as u32;
    let mut l = stream.launch_builder(&f);
    l.arg(a);
    match b {
        Some(v) => l.arg(v),
        None => l.arg(&NULL),
    };
    match mean {
        Some(v) => l.arg(v),
        None => l.arg(&NULL),
    };
    match invstd {
        Some(v) => l.arg(v),
        None => l.arg(&NULL),
    };
    l.arg(&mut p1);
    match p2.as_mut() {
        Some(v) => l.arg(v),
        None => l.arg(&NULL),
    };
    l.arg(&c32).arg(&n).arg(&mode);
    // SAFETY: the arguments are the kernel's parameters (ops.cu), in order and type; every buffer
    // holds the elements the launch grid indexes (all sized from the same shapes above).
    unsafe { l.launch(cfg) }.map_err(err)?;
    let s1 = bias_grad_finish::<f32>(dev, &p1, blocks, c)?;
    let s2 = p2.map(|p| bias_grad_finish::<f32>(dev, &p, blocks, c)).transpose()?;
    Ok((s1, s2))
}

/// Training-mode BatchNorm + ReLU on NHWC `x` (our kernels; crate::cuda::bn says why):
/// two-pass statistics (mean, then the mean square of `x - mean`) in f32, then
/// `y = relu((x - mean) * invstd * w + b)`. Returns `(y, shape, mean, invstd)` as cuDNN's path.
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
pub(crate) fn bn_forward_cl<T: Elem>(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    eps: f64,
) -> Result<(CudaStorage, Shape, Tensor, Tensor)> {
    let dev = x.0.device.clone();
    let (nb, h, wd, c) = x.1.shape().dims4()?;
    let n = nb * h * wd * c;
    let m = (nb * h * wd) as f64;
    let xv = view::<T>(x.0, x.1)?;
    let (wv, bv) = (view::<f32>(w.0, w.1)?, view::<f32>(b.0, b.1)?);
    let (sum, _) = bn_sums::<T>(&dev, &xv, None, None, None, c, n, 0)?;
    let mean = sum.affine(1.0 / m, 0.0)?;
    let sq = {
        let mc = Cuda::of(&mean)?;
        let mv = mc.view::<f32>()?;
        bn_sums::<T>(&dev, &xv, None, Some(&mv), None, c, n, 1)?.0
    };
    let invstd = sq.affine(1.0 / m, eps)?.sqrt()?.recip()?;
    let mut y = alloc::<T>(&dev, n)?;
    {
        let (mc, ic) = (Cuda::of(&mean)?, Cuda::of(&invstd)?);
        let (mv, iv) = (mc.view::<f32>()?, ic.view::<f32>()?);
        let f = func(&dev, &format!("bn_apply_relu_cl_{}", T::SUFFIX))?;
        let stream = dev.cuda_stream();
        let c32 = c as u32;
        let cfg = cl_launch(c, n, 4, 132 * 16, false)?;
        let mut l = stream.launch_builder(&f);
        l.arg(&xv).arg(&mut y).arg(&mv).arg(&iv).arg(&wv).arg(&bv).arg(&c32).arg(&n);
        // SAFETY: the arguments are the kernel's parameters (ops.cu), in order and type; every buffer
        // holds the elements the launch grid indexes (all sized from the same shapes above).
        unsafe { l.launch(cfg) }.map_err(err)?;
    }
    Ok((CudaStorage::wrap_cuda_slice(y, dev), x.1.shape().clone(), mean, invstd))
}

/// Its backward, given `dz` (the ReLU's mask applied): `(dx, dw, db)`, dw and db f32.
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
pub(crate) fn bn_backward_cl<T: Elem>(
    x: &Tensor,
    dz: &Tensor,
    w: &Tensor,
    mean: &Tensor,
    invstd: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    check_dtype(dz, x.dtype())?;
    let (nb, h, wd, c) = x.dims4()?;
    let n = nb * h * wd * c;
    let inv_m = 1.0f32 / (nb * h * wd) as f32;
    let (xc, dzc, wc, mc, ic) = (Cuda::of(x)?, Cuda::of(dz)?, Cuda::of(w)?, Cuda::of(mean)?, Cuda::of(invstd)?);
    let dev = xc.device().clone();
    let (xv, dzv) = (xc.view::<T>()?, dzc.view::<T>()?);
    let (wv, mv, iv) = (wc.view::<f32>()?, mc.view::<f32>()?, ic.view::<f32>()?);
    let (db, dw) = bn_sums::<T>(&dev, &dzv, Some(&xv), Some(&mv), Some(&iv), c, n, 2)?;
    let dw = dw.ok_or_else(|| candle_core::Error::Msg("bn_sums: no second sum".into()))?;
    let mut dx = alloc::<T>(&dev, n)?;
    {
        let (dbc, dwc) = (Cuda::of(&db)?, Cuda::of(&dw)?);
        let (dbv, dwv) = (dbc.view::<f32>()?, dwc.view::<f32>()?);
        let f = func(&dev, &format!("bn_bwd_dx_cl_{}", T::SUFFIX))?;
        let stream = dev.cuda_stream();
        let c32 = c as u32;
        let cfg = cl_launch(c, n, 4, 132 * 16, false)?;
        let mut l = stream.launch_builder(&f);
        l.arg(&dzv).arg(&xv).arg(&mut dx).arg(&mv).arg(&iv).arg(&wv).arg(&dbv).arg(&dwv).arg(&inv_m).arg(&c32).arg(&n);
        // SAFETY: the arguments are the kernel's parameters (ops.cu), in order and type; every buffer
        // holds the elements the launch grid indexes (all sized from the same shapes above).
        unsafe { l.launch(cfg) }.map_err(err)?;
    }
    Ok((tensor(dx, &dev, x.shape().clone()), dw, db))
}
