//! Fused elementwise ops with a backward that reads only their output: `relu(a + b)` (the
//! TAESD block's residual; any layout) and nearest 2x upsampling (NCHW or NHWC).

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Device, Layout, Result, Shape, Tensor};

use crate::cpu;
use crate::format::{via_nchw, Format};
use crate::tape;

/// `relu(a + b)` (same shapes), one kernel; the backward is one kernel too
/// (`dy * (out > 0)`, given to both inputs).
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() {
        bail!("add_relu: shapes {:?} and {:?}", a.dims(), b.dims());
    }
    if a.dtype() != b.dtype() {
        bail!("add_relu: dtypes {:?} and {:?}", a.dtype(), b.dtype());
    }
    if !kernels_on(a.device()) {
        return (a + b)?.relu();
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    if tape::is_open() {
        let y = a.apply_op2_no_bwd(&b, &AddRelu)?;
        tape::record(
            "add_relu",
            &[&a, &b],
            &[],
            &y,
            Box::new(|y, dy, want| AddRelu::backward(dy, y, want[0], want[1])),
        )?;
        return Ok(y);
    }
    a.apply_op2(&b, AddRelu)
}

/// Nearest-neighbour 2x upsampling of an activation in `format`. Its backward sums each 2x2
/// block (one kernel on CUDA; a reshape + sum on the CPU) instead of candle's grouped
/// convolution.
pub fn upsample_nearest2x(x: &Tensor, format: Format) -> Result<Tensor> {
    let (_, _, h, w) = format.nchw(x.dims())?;
    if !kernels_on(x.device()) {
        return via_nchw(format, &[x], |x| x[0].upsample_nearest2d(2 * h, 2 * w));
    }
    let x = x.contiguous()?;
    if tape::is_open() {
        let y = x.apply_op1_no_bwd(&Upsample2x { format })?;
        tape::record(
            "upsample_nearest2x",
            &[&x],
            &[],
            &y,
            Box::new(move |_, dy, want| Ok(vec![want[0].then(|| downsum2x(dy, format)).transpose()?])),
        )?;
        return Ok(y);
    }
    x.apply_op1(Upsample2x { format })
}

/// Whether our kernels exist for this device.
pub fn kernels_on(d: &Device) -> bool {
    match d {
        Device::Cpu => true,
        Device::Cuda(_) => cfg!(feature = "cuda"),
        _ => false,
    }
}

struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "taesd-add-relu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu::to_storage(&cpu::add_relu(&cpu::to_tensor(s1, l1)?, &cpu::to_tensor(s2, l2)?)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::kernels::add_relu((s1, l1), (s2, l2))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut g = AddRelu::backward(dy, y, a.track_op(), b.track_op())?.into_iter();
        Ok((g.next().flatten(), g.next().flatten()))
    }
}

impl AddRelu {
    /// The inputs' gradients (both `dy * (y > 0)`), where wanted.
    fn backward(dy: &Tensor, y: &Tensor, want_a: bool, want_b: bool) -> Result<Vec<Option<Tensor>>> {
        if !want_a && !want_b {
            return Ok(vec![None, None]);
        }
        let d = relu_bwd(&dy.contiguous()?, y)?;
        Ok(vec![want_a.then(|| d.clone()), want_b.then_some(d)])
    }
}

/// `dy * (y > 0)`, outside the graph.
pub fn relu_bwd(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    match dy.device() {
        Device::Cpu => cpu::relu_bwd(dy, y),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => crate::cuda::kernels::relu_bwd(dy, y),
        d => bail!("taesd-ops: no relu backward on {d:?}"),
    }
}

/// The sum of each 2x2 block of an activation in `format` of size 2H x 2W (the upsample's
/// backward), outside the graph.
pub fn downsum2x(dy: &Tensor, format: Format) -> Result<Tensor> {
    let (_, _, h2, w2) = format.nchw(dy.dims())?;
    if h2 % 2 != 0 || w2 % 2 != 0 {
        bail!("downsum2x: odd size {h2}x{w2}");
    }
    match (dy.device(), format) {
        (Device::Cpu, _) => via_nchw(format, &[dy], |d| cpu::downsum2x(&d[0])),
        #[cfg(feature = "cuda")]
        (Device::Cuda(_), _) => crate::cuda::kernels::downsum2x(&dy.contiguous()?, format),
        (d, _) => bail!("taesd-ops: no downsum on {d:?}"),
    }
}

struct Upsample2x {
    format: Format,
}

impl CustomOp1 for Upsample2x {
    fn name(&self) -> &'static str {
        "taesd-upsample-nearest2x"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu::to_tensor(s, l)?;
        cpu::to_storage(&via_nchw(self.format, &[&x], |x| cpu::upsample2x(&x[0]))?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::kernels::upsample2x((s, l), self.format)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        Ok(Some(downsum2x(dy, self.format)?))
    }
}
