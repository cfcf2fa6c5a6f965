//! [`Comm`]: the collectives data-parallel training needs, whatever carries them ([`super::tcp`]
//! on the CPU, [`super::nccl`] on CUDA). Every rank calls the same collectives in the same
//! order (the training loop is the same program on every rank); results are identical on every
//! rank.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

pub trait Comm: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// `tcp` or `nccl`.
    fn backend(&self) -> &'static str;

    /// Sum `buf` over the ranks, in place (host values: flags, losses).
    fn all_reduce_host(&self, buf: &mut [f32]) -> Result<()>;

    /// Rank 0's `buf` on every rank (the lengths must agree).
    fn broadcast_host(&self, buf: &mut [u8]) -> Result<()>;

    /// The sum over the ranks of an f32 tensor (any shape), on its device.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let mut v = t.to_dtype(DType::F32)?.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
        self.all_reduce_host(&mut v)?;
        Ok(Tensor::from_vec(v, t.shape(), &Device::Cpu)?.to_device(t.device())?)
    }

    /// Rank 0's value of an f32 tensor, on every rank.
    fn broadcast(&self, t: &Tensor) -> Result<Tensor> {
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
        let mut b = super::wire::f32_bytes(&v);
        self.broadcast_host(&mut b)?;
        let v = super::wire::bytes_f32(&b, v.len())?;
        Ok(Tensor::from_vec(v, t.shape(), &Device::Cpu)?.to_device(t.device())?)
    }

    /// Every rank has arrived here.
    fn barrier(&self) -> Result<()>;

    /// This rank failed with `cause`: the other ranks are told and stop. Pending and later
    /// collectives here fail.
    fn abort(&self, cause: &str);

    /// The job's first failure, if any (what a failed collective reports).
    fn failure(&self) -> Option<String>;

    /// A clean end of this rank's part (a goodbye to the watchdogs).
    fn close(&self);
}

/// The mean over the ranks of an f32 tensor: the sum, times 1/N.
pub fn all_reduce_mean(c: &dyn Comm, t: &Tensor) -> Result<Tensor> {
    let s = c.all_reduce_sum(t)?;
    Ok(s.affine(1.0 / c.world_size() as f64, 0.0)?)
}

/// Each rank's `flag`, on every rank (one small all-reduce).
pub fn gather_flags(c: &dyn Comm, flag: bool) -> Result<Vec<bool>> {
    let mut v = vec![0f32; c.world_size()];
    v[c.rank()] = if flag { 1.0 } else { 0.0 };
    c.all_reduce_host(&mut v)?;
    Ok(v.iter().map(|x| *x > 0.5).collect())
}

/// Whether any rank's `flag` is set.
pub fn any(c: &dyn Comm, flag: bool) -> Result<bool> {
    Ok(gather_flags(c, flag)?.into_iter().any(|f| f))
}

/// The ranks whose flag is set, as `1, 3`.
pub fn ranks_of(flags: &[bool]) -> String {
    flags.iter().enumerate().filter(|(_, f)| **f).map(|(r, _)| r.to_string()).collect::<Vec<_>>().join(", ")
}
