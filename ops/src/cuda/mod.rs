//! CUDA implementations: our PTX kernels (`kernels`) and cuDNN convolutions (`conv`).

#[cfg(feature = "cudnn")]
pub(crate) mod bn;
#[cfg(feature = "cudnn")]
pub(crate) mod conv;
#[cfg(feature = "cudnn")]
pub(crate) mod graph;
pub(crate) mod kernels;

use candle_core::cuda::cudarc;
use candle_core::cuda::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Layout, Result, Shape, Storage, Tensor, WithDType};
use cudarc::driver::{CudaFunction, CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits};

/// The PTX of `src/kernels/ops.cu`, built by build.rs.
pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ops.ptx"));
const MODULE: &str = "taesd_ops";

pub(crate) fn err(e: impl std::fmt::Display + Send + Sync + 'static) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// Kernel `name` of our PTX module (loaded once per device).
pub(crate) fn func(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    Ok(dev.get_or_load_custom_func(name, MODULE, PTX)?.into_cuda_function())
}

#[cfg(feature = "cudnn")]
pub(crate) trait MaybeCudnn: cudarc::cudnn::CudnnDataType {}
#[cfg(feature = "cudnn")]
impl<T: cudarc::cudnn::CudnnDataType> MaybeCudnn for T {}
#[cfg(not(feature = "cudnn"))]
pub(crate) trait MaybeCudnn {}
#[cfg(not(feature = "cudnn"))]
impl<T> MaybeCudnn for T {}

/// The element types of our kernels.
pub(crate) trait Elem: CudaDType + DeviceRepr + ValidAsZeroBits + WithDType + MaybeCudnn + Unpin {
    /// The kernel name suffix.
    const SUFFIX: &'static str;
}

impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Elem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}
impl Elem for half::f16 {
    const SUFFIX: &'static str = "f16";
}

/// The contiguous region of a storage that `l` covers.
pub(crate) fn view<'a, T: Elem>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("taesd-ops: a CUDA operand is not contiguous");
    };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// An uninitialised device buffer (every element is written by the caller).
pub(crate) fn alloc<T: Elem>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: callers write every element before the buffer is read.
    unsafe { dev.alloc::<T>(n) }
}

/// A fresh tensor (outside the graph) owning `s`.
pub(crate) fn tensor<T: Elem>(s: CudaSlice<T>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    let st = CudaStorage::wrap_cuda_slice(s, dev.clone());
    Tensor::from_storage(Storage::Cuda(st), shape, BackpropOp::none(), false)
}

/// Runs `f::<T>` for the tensor's dtype (f32, bf16, f16).
macro_rules! by_dtype {
    ($dt:expr, $f:ident($($a:expr),*)) => {
        match $dt {
            candle_core::DType::F32 => $f::<f32>($($a),*),
            candle_core::DType::BF16 => $f::<half::bf16>($($a),*),
            candle_core::DType::F16 => $f::<half::f16>($($a),*),
            d => candle_core::bail!("taesd-ops: unsupported dtype {d:?} on CUDA"),
        }
    };
}
pub(crate) use by_dtype;

/// The CUDA storage of a tensor (read-locked while the guard lives).
pub(crate) struct Cuda<'a> {
    guard: candle_core::StorageRef<'a>,
    pub(crate) layout: &'a Layout,
}

impl<'a> Cuda<'a> {
    pub(crate) fn of(t: &'a Tensor) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        if !matches!(&*guard, Storage::Cuda(_)) {
            bail!("taesd-ops: expected a CUDA tensor");
        }
        Ok(Self { guard, layout })
    }

    pub(crate) fn storage(&self) -> &CudaStorage {
        match &*self.guard {
            Storage::Cuda(s) => s,
            _ => unreachable!(),
        }
    }

    pub(crate) fn view<T: Elem>(&self) -> Result<CudaView<'_, T>> {
        view(self.storage(), self.layout)
    }

    pub(crate) fn device(&self) -> &CudaDevice {
        &self.storage().device
    }
}

pub(crate) fn check_dtype(t: &Tensor, dt: DType) -> Result<()> {
    if t.dtype() != dt {
        bail!("taesd-ops: dtype {:?}, expected {dt:?}", t.dtype());
    }
    Ok(())
}

/// A 1-D launch over `n` elements (grid-stride loops in the kernels).
pub(crate) fn cfg_1d(n: usize) -> cudarc::driver::LaunchConfig {
    let threads = 256u32;
    let blocks = n.div_ceil(threads as usize).clamp(1, 132 * 32) as u32;
    cudarc::driver::LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}
