//! Launchers of our PTX kernels (src/kernels/ops.cu).

use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaDevice, CudaStorage};
use candle_core::backend::BackendStorage;
use candle_core::{bail, DType, Layout, Result, Shape, Tensor};

use super::{alloc, by_dtype, cfg_1d, check_dtype, err, func, tensor, view, Cuda, Elem};
use crate::adam::{AdamConsts, AdamOut};
use crate::conv::Act;

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
    let cfg = LaunchConfig {
        grid_dim: (gx, gy, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { l.launch(cfg) }.map_err(err)?;
    Ok(())
}

/// Backward of `act(z + b)` from the output `y`: `(dz, db)`.
pub(crate) fn act_bias_bwd(
    dy: &Tensor,
    y: &Tensor,
    act: Act,
    bias: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    by_dtype!(dy.dtype(), act_bias_bwd_t(dy, y, act, bias))
}

fn act_bias_bwd_t<T: Elem>(
    dy: &Tensor,
    y: &Tensor,
    act: Act,
    bias: bool,
) -> Result<(Tensor, Option<Tensor>)> {
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
        unsafe { l.launch(cfg) }.map_err(err)?;
        let db = match partial {
            Some(p) => {
                let mut db = alloc::<T>(&dev, c)?;
                let f = func(&dev, &format!("bias_grad_finish_{}", T::SUFFIX))?;
                let (n32, c32) = (n as u32, c as u32);
                let mut l = stream.launch_builder(&f);
                l.arg(&p).arg(&mut db).arg(&n32).arg(&c32);
                let cfg = LaunchConfig {
                    grid_dim: (c.div_ceil(128) as u32, 1, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                };
                unsafe { l.launch(cfg) }.map_err(err)?;
                Some(tensor(db, &dev, c))
            }
            None => None,
        };
        (dz.map(|d| tensor(d, &dev, dy.shape().clone())), db)
    };
    Ok((dz.unwrap_or_else(|| dy.clone()), partial))
}

pub(crate) fn add_relu(
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    by_dtype!(a.0.dtype(), add_relu_t(a, b))
}

fn add_relu_t<T: Elem>(
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let dev = &a.0.device;
    let (av, bv) = (view::<T>(a.0, a.1)?, view::<T>(b.0, b.1)?);
    let n = a.1.shape().elem_count();
    let mut out = alloc::<T>(dev, n)?;
    let f = func(dev, &format!("add_relu_{}", T::SUFFIX))?;
    let stream = dev.cuda_stream();
    let mut l = stream.launch_builder(&f);
    l.arg(&av).arg(&bv).arg(&mut out).arg(&n);
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
    unsafe { l.launch(cfg_1d(n)) }.map_err(err)?;
    Ok(tensor(out, &dev, dy.shape().clone()))
}

pub(crate) fn upsample2x(x: (&CudaStorage, &Layout)) -> Result<(CudaStorage, Shape)> {
    by_dtype!(x.0.dtype(), upsample2x_t(x))
}

fn upsample2x_t<T: Elem>(x: (&CudaStorage, &Layout)) -> Result<(CudaStorage, Shape)> {
    let dev = &x.0.device;
    let (n, c, h, w) = x.1.shape().dims4()?;
    let xv = view::<T>(x.0, x.1)?;
    let count = n * c * h * w;
    let mut out = alloc::<T>(dev, 4 * count)?;
    let f = func(dev, &format!("upsample2x_{}", T::SUFFIX))?;
    let stream = dev.cuda_stream();
    let (h32, w32) = (h as u32, w as u32);
    let mut l = stream.launch_builder(&f);
    l.arg(&xv).arg(&mut out).arg(&h32).arg(&w32).arg(&count);
    unsafe { l.launch(cfg_1d(count)) }.map_err(err)?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((n, c, 2 * h, 2 * w)),
    ))
}

pub(crate) fn downsum2x(dy: &Tensor) -> Result<Tensor> {
    // The kernel reads element pairs: the view must start at an even element.
    let dy = if dy.layout().start_offset() % 2 != 0 {
        dy.copy()?
    } else {
        dy.clone()
    };
    by_dtype!(dy.dtype(), downsum2x_t(&dy))
}

fn downsum2x_t<T: Elem>(dy: &Tensor) -> Result<Tensor> {
    let (n, c, h2, w2) = dy.dims4()?;
    let (h, w) = (h2 / 2, w2 / 2);
    let dyc = Cuda::of(dy)?;
    let dev = dyc.device().clone();
    let count = n * c * h * w;
    let mut out = alloc::<T>(&dev, count)?;
    let f = func(&dev, &format!("downsum2x_{}", T::SUFFIX))?;
    let stream = dev.cuda_stream();
    let dyv = dyc.view::<T>()?;
    let (h32, w32) = (h as u32, w as u32);
    let mut l = stream.launch_builder(&f);
    l.arg(&dyv).arg(&mut out).arg(&h32).arg(&w32).arg(&count);
    unsafe { l.launch(cfg_1d(count)) }.map_err(err)?;
    Ok(tensor(out, &dev, (n, c, h, w)))
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
    let (pv, gv, mv, vv) = (
        pc.view::<f32>()?,
        gc.view::<f32>()?,
        mc.view::<f32>()?,
        vc.view::<f32>()?,
    );
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
    unsafe { l.launch(cfg_1d(n)) }.map_err(err)?;
    Ok(AdamOut {
        p: tensor(po, &dev, n),
        m: tensor(mo, &dev, n),
        v: tensor(vo, &dev, n),
        vmax: vmo.map(|x| tensor(x, &dev, n)),
    })
}
