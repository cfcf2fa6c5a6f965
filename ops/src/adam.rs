//! Adam / AMSGrad / AdamW as one fused update over flat f32 buffers: one CUDA kernel (or one CPU
//! loop) reads `p, g, m, v (, vmax)` and writes fresh `p', m', v' (, vmax')`, instead of ~15
//! tensor ops. The arithmetic is that of `train/src/recipe/optim.rs` (PyTorch's formulas), in
//! f32 with each product and sum rounded separately, so the CPU and CUDA results are identical.

use candle_core::{bail, DType, Device, Result, Tensor};

/// One update's hyperparameters. `step` is the 1-based step number of this update (PyTorch's
/// `state["step"]` after incrementing).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW: `p *= 1 - lr * wd` instead of `g += wd * p`.
    pub decoupled_weight_decay: bool,
    pub step: u64,
}

/// The f32 constants the kernel uses, rounded from f64 as candle's `affine` rounds its
/// arguments.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdamConsts {
    pub decay_mul: f32,
    pub wd: f32,
    pub decoupled: bool,
    pub one_minus_b1: f32,
    pub b2: f32,
    pub one_minus_b2: f32,
    pub inv_bc2_sqrt: f32,
    pub eps: f32,
    pub step_size: f32,
}

impl AdamStep {
    pub(crate) fn consts(&self) -> AdamConsts {
        let t = self.step.max(1) as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        AdamConsts {
            decay_mul: (1.0 - self.lr * self.weight_decay) as f32,
            wd: self.weight_decay as f32,
            decoupled: self.decoupled_weight_decay,
            one_minus_b1: (1.0 - self.beta1) as f32,
            b2: self.beta2 as f32,
            one_minus_b2: (1.0 - self.beta2) as f32,
            inv_bc2_sqrt: (1.0 / bc2.sqrt()) as f32,
            eps: self.eps as f32,
            step_size: (self.lr / bc1) as f32,
        }
    }
}

/// New parameters and moments (fresh tensors, outside the graph, in the inputs' shape).
#[derive(Clone, Debug)]
pub struct AdamOut {
    pub p: Tensor,
    pub m: Tensor,
    pub v: Tensor,
    /// `Some` iff `vmax` was given (AMSGrad).
    pub vmax: Option<Tensor>,
}

/// One fused Adam-family update of `p` (f32) with gradient `g` (cast to f32 if it is not), first
/// and second moments `m`, `v`, AMSGrad's running max `vmax` (or `None`), and an optional
/// 0-dim or 1-element f32 `grad_scale` that multiplies the gradient (read on the device). Every
/// tensor has `p`'s shape; nothing is modified.
pub fn adam_update(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    vmax: Option<&Tensor>,
    grad_scale: Option<&Tensor>,
    h: &AdamStep,
) -> Result<AdamOut> {
    for (name, t) in [("g", g), ("m", m), ("v", v)].into_iter().chain(vmax.map(|t| ("vmax", t))) {
        if t.shape() != p.shape() {
            bail!("adam_update: {name} has shape {:?}, p {:?}", t.dims(), p.dims());
        }
    }
    if p.dtype() != DType::F32 || m.dtype() != DType::F32 || v.dtype() != DType::F32 {
        bail!("adam_update: p, m, v must be f32");
    }
    if let Some(s) = grad_scale {
        if s.elem_count() != 1 {
            bail!("adam_update: grad_scale has {} elements", s.elem_count());
        }
    }
    let flat = |t: &Tensor| -> Result<Tensor> { t.detach().to_dtype(DType::F32)?.flatten_all()?.contiguous() };
    let (pf, gf, mf, vf) = (flat(p)?, flat(g)?, flat(m)?, flat(v)?);
    let vmf = vmax.map(flat).transpose()?;
    let sf = grad_scale.map(flat).transpose()?;
    let c = h.consts();
    let out = match p.device() {
        Device::Cpu => cpu_update(&pf, &gf, &mf, &vf, vmf.as_ref(), sf.as_ref(), &c)?,
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => crate::cuda::kernels::adam(&pf, &gf, &mf, &vf, vmf.as_ref(), sf.as_ref(), &c)?,
        d => bail!("adam_update: no implementation on {d:?}"),
    };
    let shape = p.shape();
    Ok(AdamOut {
        p: out.p.reshape(shape)?,
        m: out.m.reshape(shape)?,
        v: out.v.reshape(shape)?,
        vmax: out.vmax.map(|t| t.reshape(shape)).transpose()?,
    })
}

fn cpu_update(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    vmax: Option<&Tensor>,
    scale: Option<&Tensor>,
    c: &AdamConsts,
) -> Result<AdamOut> {
    let p: Vec<f32> = p.to_vec1()?;
    let g: Vec<f32> = g.to_vec1()?;
    let m: Vec<f32> = m.to_vec1()?;
    let v: Vec<f32> = v.to_vec1()?;
    let vmax: Option<Vec<f32>> = vmax.map(|t| t.to_vec1()).transpose()?;
    let scale: Option<f32> = scale.map(|t| t.to_vec1::<f32>().map(|v| v[0])).transpose()?;
    let n = p.len();
    let (mut po, mut mo, mut vo) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    let mut vmo = vmax.as_ref().map(|_| vec![0f32; n]);
    for i in 0..n {
        let mut gi = g[i];
        if let Some(s) = scale {
            gi *= s;
        }
        let mut pi = p[i];
        if c.wd != 0.0 {
            if c.decoupled {
                pi *= c.decay_mul;
            } else {
                gi += pi * c.wd;
            }
        }
        let mi = m[i] + (gi - m[i]) * c.one_minus_b1;
        let vi = v[i] * c.b2 + (gi * gi) * c.one_minus_b2;
        let mut s = vi;
        if let (Some(vm), Some(vmo)) = (&vmax, &mut vmo) {
            // fmaxf: a NaN argument loses to a number.
            s = vm[i].max(vi);
            vmo[i] = s;
        }
        let denom = s.sqrt() * c.inv_bc2_sqrt + c.eps;
        po[i] = pi - (mi / denom) * c.step_size;
        mo[i] = mi;
        vo[i] = vi;
    }
    let t = |v: Vec<f32>| Tensor::from_vec(v, n, &Device::Cpu);
    Ok(AdamOut { p: t(po)?, m: t(mo)?, v: t(vo)?, vmax: vmo.map(t).transpose()? })
}
