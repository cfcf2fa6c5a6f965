//! cuDNN BatchNorm (training mode, per channel over N, H, W) for [`crate::batch_norm`], through
//! cudarc's raw cuDNN bindings (its safe API has no BatchNorm), on NCHW. NHWC runs our own
//! kernels (`kernels::bn_forward_cl`): cuDNN's NHWC BatchNorm kernels were 7-10x slower than its
//! NCHW ones on the H100 (32x64x256x256 bf16: forward 21 ms vs 2.1 ms in spatial mode, 15 ms in
//! persistent mode; forward+backward 51-63 ms vs 16 ms). One cuDNN handle per device and
//! thread, on candle's stream; descriptors are made per call (cheap next to the kernels).

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc;
use candle_core::cuda::{CudaDevice, CudaStorage};
use candle_core::{bail, DType, Layout, Result, Shape, Tensor};
use cudarc::cudnn::sys as c;
use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::kernels::{bn_backward_cl, bn_forward_cl};
use super::{alloc, by_dtype, kernels, tensor, view, Cuda, Elem};
use crate::conv::Act;
use crate::format::Format;

type DevId = candle_core::cuda_backend::DeviceId;

struct Handle(c::cudnnHandle_t);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreate, destroyed once.
        unsafe {
            c::cudnnDestroy(self.0);
        }
    }
}

thread_local! {
    static HANDLES: RefCell<HashMap<DevId, Handle>> = RefCell::new(HashMap::new());
}

fn check(s: c::cudnnStatus_t, what: &str) -> Result<()> {
    if s == c::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        bail!("taesd-ops: cuDNN {what} failed: {s:?}")
    }
}

fn handle(dev: &CudaDevice) -> Result<c::cudnnHandle_t> {
    HANDLES.with(|h| {
        if let Some(x) = h.borrow().get(&dev.id()) {
            return Ok(x.0);
        }
        let mut raw: c::cudnnHandle_t = std::ptr::null_mut();
        // SAFETY: cuDNN writes the new handle to `raw`.
        check(unsafe { c::cudnnCreate(&mut raw) }, "cudnnCreate")?;
        let handle = Handle(raw);
        let stream = dev.cuda_stream();
        // SAFETY: the handle was just created; the stream is the device's (kept alive by candle).
        check(unsafe { c::cudnnSetStream(raw, stream.cu_stream() as c::cudaStream_t) }, "cudnnSetStream")?;
        h.borrow_mut().insert(dev.id(), handle);
        Ok(raw)
    })
}

struct Desc(c::cudnnTensorDescriptor_t);

impl Desc {
    fn new() -> Result<Self> {
        let mut d: c::cudnnTensorDescriptor_t = std::ptr::null_mut();
        // SAFETY: cuDNN writes the new descriptor to `d`.
        check(unsafe { c::cudnnCreateTensorDescriptor(&mut d) }, "cudnnCreateTensorDescriptor")?;
        Ok(Self(d))
    }

    /// An NCHW descriptor of logical dims `(N, C, H, W)` in `dtype`.
    fn nchw(dtype: DType, dims: [usize; 4]) -> Result<Self> {
        let dt = match dtype {
            DType::F32 => c::cudnnDataType_t::CUDNN_DATA_FLOAT,
            DType::BF16 => c::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
            DType::F16 => c::cudnnDataType_t::CUDNN_DATA_HALF,
            d => bail!("taesd-ops: BatchNorm on {d:?}"),
        };
        let d = Self::new()?;
        let [n, ch, h, w] = dims.map(|v| v as i32);
        check(
            // SAFETY: a descriptor this module created; plain integer arguments.
            unsafe { c::cudnnSetTensor4dDescriptor(d.0, c::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW, dt, n, ch, h, w) },
            "cudnnSetTensor4dDescriptor",
        )?;
        Ok(d)
    }

    /// The scale/bias/mean/variance descriptor for `x` (f32 for half-precision `x`).
    fn bn_params(x: &Desc) -> Result<Self> {
        let d = Self::new()?;
        // SAFETY: both descriptors were created here and `x` is set.
        check(unsafe { c::cudnnDeriveBNTensorDescriptor(d.0, x.0, MODE) }, "cudnnDeriveBNTensorDescriptor")?;
        Ok(d)
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateTensorDescriptor, destroyed once.
        unsafe {
            c::cudnnDestroyTensorDescriptor(self.0);
        }
    }
}

/// Logical `(N, C, H, W)` of an activation of `dims` in `format`.
fn logical(format: Format, dims: &[usize]) -> Result<[usize; 4]> {
    let (n, ch, h, w) = format.nchw(dims)?;
    Ok([n, ch, h, w])
}

/// The handle, the activations' descriptor and the parameters' descriptor of one call.
fn setup(dev: &CudaDevice, dtype: DType, dims: [usize; 4]) -> Result<(c::cudnnHandle_t, Desc, Desc)> {
    let xd = Desc::nchw(dtype, dims)?;
    let pd = Desc::bn_params(&xd)?;
    Ok((handle(dev)?, xd, pd))
}

const MODE: c::cudnnBatchNormMode_t = c::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL;
const ONE: f32 = 1.0;
const ZERO: f32 = 0.0;

fn ptr(p: &f32) -> *const std::ffi::c_void {
    p as *const f32 as *const std::ffi::c_void
}

/// Forward: `(y, shape, mean, invstd)`; `y = relu(BN(x) * w + b)` in `x`'s dtype.
pub(crate) fn forward(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    eps: f64,
    format: Format,
    act: Act,
) -> Result<(CudaStorage, Shape, Tensor, Tensor)> {
    match format {
        Format::Nchw => by_dtype!(x.0.dtype(), forward_t(x, w, b, eps, act)),
        Format::Nhwc => by_dtype!(x.0.dtype(), bn_forward_cl(x, w, b, eps)),
    }
}

fn forward_t<T: Elem>(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    eps: f64,
    act: Act,
) -> Result<(CudaStorage, Shape, Tensor, Tensor)> {
    let dev = x.0.device.clone();
    let dims = logical(Format::Nchw, x.1.dims())?;
    let ch = dims[1];
    let xv = view::<T>(x.0, x.1)?;
    let wv = view::<f32>(w.0, w.1)?;
    let bv = view::<f32>(b.0, b.1)?;
    let mut y = alloc::<T>(&dev, dims.iter().product())?;
    let mut mean = alloc::<f32>(&dev, ch)?;
    let mut invstd = alloc::<f32>(&dev, ch)?;
    let (h, xd, pd) = setup(&dev, T::DTYPE, dims)?;
    let stream = dev.cuda_stream();
    {
        let (xp, _g1) = xv.device_ptr(&stream);
        let (wp, _g2) = wv.device_ptr(&stream);
        let (bp, _g3) = bv.device_ptr(&stream);
        let (yp, _g4) = y.device_ptr_mut(&stream);
        let (mp, _g5) = mean.device_ptr_mut(&stream);
        let (ip, _g6) = invstd.device_ptr_mut(&stream);
        check(
            // SAFETY: a cuDNN call on a handle/descriptor this module owns; device pointers come from views
            // whose guards live for the call, sized for the descriptors' shapes.
            unsafe {
                c::cudnnBatchNormalizationForwardTraining(
                    h,
                    MODE,
                    ptr(&ONE),
                    ptr(&ZERO),
                    xd.0,
                    xp as *const _,
                    xd.0,
                    yp as *mut _,
                    pd.0,
                    wp as *const _,
                    bp as *const _,
                    0.0,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    eps,
                    mp as *mut _,
                    ip as *mut _,
                )
            },
            "cudnnBatchNormalizationForwardTraining",
        )?;
    }
    if act != Act::None {
        kernels::bias_act_in::<T>(&dev, &mut y, None, dims, Format::Nchw, act)?;
    }
    let mean = tensor(mean, &dev, ch);
    let invstd = tensor(invstd, &dev, ch);
    Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from(dims.to_vec()), mean, invstd))
}

/// Backward of the BatchNorm (the ReLU's mask already applied to `dz`): `(dx, dw, db)`.
pub(crate) fn backward(
    x: &Tensor,
    dz: &Tensor,
    w: &Tensor,
    mean: &Tensor,
    invstd: &Tensor,
    eps: f64,
    format: Format,
) -> Result<(Tensor, Tensor, Tensor)> {
    let x = x.contiguous()?;
    let dz = dz.contiguous()?;
    match format {
        Format::Nchw => by_dtype!(x.dtype(), backward_t(&x, &dz, w, mean, invstd, eps)),
        Format::Nhwc => by_dtype!(x.dtype(), bn_backward_cl(&x, &dz, w, mean, invstd)),
    }
}

fn backward_t<T: Elem>(
    x: &Tensor,
    dz: &Tensor,
    w: &Tensor,
    mean: &Tensor,
    invstd: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dims = logical(Format::Nchw, x.dims())?;
    let ch = dims[1];
    let (xc, dzc, wc, mc, ic) = (Cuda::of(x)?, Cuda::of(dz)?, Cuda::of(w)?, Cuda::of(mean)?, Cuda::of(invstd)?);
    let dev = xc.device().clone();
    let (xv, dzv) = (xc.view::<T>()?, dzc.view::<T>()?);
    let (wv, mv, iv) = (wc.view::<f32>()?, mc.view::<f32>()?, ic.view::<f32>()?);
    let mut dx = alloc::<T>(&dev, dims.iter().product())?;
    let mut dw = alloc::<f32>(&dev, ch)?;
    let mut db = alloc::<f32>(&dev, ch)?;
    let (h, xd, pd) = setup(&dev, T::DTYPE, dims)?;
    let stream = dev.cuda_stream();
    {
        let (xp, _g1) = xv.device_ptr(&stream);
        let (dzp, _g2) = dzv.device_ptr(&stream);
        let (wp, _g3) = wv.device_ptr(&stream);
        let (mp, _g4) = mv.device_ptr(&stream);
        let (ip, _g5) = iv.device_ptr(&stream);
        let (dxp, _g6) = dx.device_ptr_mut(&stream);
        let (dwp, _g7) = dw.device_ptr_mut(&stream);
        let (dbp, _g8) = db.device_ptr_mut(&stream);
        check(
            // SAFETY: a cuDNN call on a handle/descriptor this module owns; device pointers come from views
            // whose guards live for the call, sized for the descriptors' shapes.
            unsafe {
                c::cudnnBatchNormalizationBackward(
                    h,
                    MODE,
                    ptr(&ONE),
                    ptr(&ZERO),
                    ptr(&ONE),
                    ptr(&ZERO),
                    xd.0,
                    xp as *const _,
                    xd.0,
                    dzp as *const _,
                    xd.0,
                    dxp as *mut _,
                    pd.0,
                    wp as *const _,
                    dwp as *mut _,
                    dbp as *mut _,
                    eps,
                    mp as *const _,
                    ip as *const _,
                )
            },
            "cudnnBatchNormalizationBackward",
        )?;
    }
    Ok((tensor(dx, &dev, dims.to_vec()), tensor(dw, &dev, ch), tensor(db, &dev, ch)))
}
