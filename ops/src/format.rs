//! Where the channels sit in a 4-D activation tensor.
//!
//! candle's (and PyTorch's) default is NCHW. cuDNN's tensor-core kernels on the H100 work in NHWC:
//! given NCHW tensors, cuDNN transposes every operand into NHWC and the result back, inside each
//! convolution call (31 ms of a 153 ms training step at 256x256 batch 32 in bf16, for PyTorch's
//! AMP step as for ours: bench/results/2026-11-27-h100-kprof-full-256-fused.md). In NHWC
//! ("channels last") the convolutions read and write the activations as they are.
//!
//! A tensor does not carry its format: the op that reads it is told ([`crate::ConvParams`]'s
//! `format`, the `format` argument of the other ops). An NHWC activation is a candle tensor of
//! dims `[N, H, W, C]`, contiguous; its convolution weights stay `[C_out, C_in, kh, kw]` for the
//! caller (checkpoints, optimisers) and are laid out as `[C_out, kh, kw, C_in]` inside the op.
//! On the CPU an NHWC op converts to NCHW, runs the NCHW code and converts back: the same values,
//! bit for bit (this is what the CPU tests of the NHWC paths rely on).

use candle_core::{bail, Device, Result, Tensor};

use crate::settings::settings;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Format {
    /// `[N, C, H, W]`.
    #[default]
    Nchw,
    /// `[N, H, W, C]` (channels last).
    Nhwc,
}

impl Format {
    /// `(N, C, H, W)` of a tensor of `dims` in this format.
    pub fn nchw(self, dims: &[usize]) -> Result<(usize, usize, usize, usize)> {
        let &[a, b, c, d] = dims else {
            bail!("taesd-ops: expected a 4-D activation, got dims {dims:?}");
        };
        Ok(match self {
            Format::Nchw => (a, b, c, d),
            Format::Nhwc => (a, d, b, c),
        })
    }

    /// The dims, in this format, of a tensor with `(N, C, H, W)`.
    pub fn dims(self, n: usize, c: usize, h: usize, w: usize) -> [usize; 4] {
        match self {
            Format::Nchw => [n, c, h, w],
            Format::Nhwc => [n, h, w, c],
        }
    }

    /// The channel axis (1 or 3).
    pub fn channel_axis(self) -> usize {
        match self {
            Format::Nchw => 1,
            Format::Nhwc => 3,
        }
    }

    /// An NCHW tensor in this format (contiguous; in the graph).
    pub fn from_nchw(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Format::Nchw => x.contiguous(),
            Format::Nhwc => x.permute((0, 2, 3, 1))?.contiguous(),
        }
    }

    /// A tensor in this format as NCHW (contiguous; in the graph).
    pub fn to_nchw(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Format::Nchw => x.contiguous(),
            Format::Nhwc => x.permute((0, 3, 1, 2))?.contiguous(),
        }
    }

    /// A `[C_out, C_in, kh, kw]` convolution weight in the layout this format's ops take
    /// (`[C_out, kh, kw, C_in]` for NHWC). A view, in the graph (callers make it contiguous).
    pub fn filter(self, w: &Tensor) -> Result<Tensor> {
        match self {
            Format::Nchw => Ok(w.clone()),
            Format::Nhwc => w.permute((0, 2, 3, 1)),
        }
    }

    /// The inverse of [`Format::filter`].
    pub fn filter_to_oihw(self, w: &Tensor) -> Result<Tensor> {
        match self {
            Format::Nchw => Ok(w.clone()),
            Format::Nhwc => w.permute((0, 3, 1, 2)),
        }
    }

    /// `(C_out, C_in, kh, kw)` of a weight of `dims` in this format's filter layout.
    pub fn filter_oihw(self, dims: &[usize]) -> Result<(usize, usize, usize, usize)> {
        let &[o, a, b, c] = dims else {
            bail!("taesd-ops: expected a 4-D convolution weight, got dims {dims:?}");
        };
        Ok(match self {
            Format::Nchw => (o, a, b, c),
            Format::Nhwc => (o, c, a, b),
        })
    }
}

/// The format activations use on `device`: NHWC on CUDA with cuDNN (unless
/// [`crate::Settings::channels_last`] is off), NCHW elsewhere.
pub fn preferred_format(device: &Device) -> Format {
    if device.is_cuda() && cfg!(feature = "cudnn") && settings().channels_last {
        Format::Nhwc
    } else {
        Format::Nchw
    }
}

/// Runs `f` on NCHW copies of NHWC operands and gives its result back in `format`: how the CPU
/// runs the NHWC ops.
pub(crate) fn via_nchw(format: Format, xs: &[&Tensor], f: impl FnOnce(&[Tensor]) -> Result<Tensor>) -> Result<Tensor> {
    match format {
        Format::Nchw => f(&xs.iter().map(|x| (*x).clone()).collect::<Vec<_>>()),
        Format::Nhwc => {
            let xs = xs.iter().map(|x| Format::Nhwc.to_nchw(x)).collect::<Result<Vec<_>>>()?;
            Format::Nhwc.from_nchw(&f(&xs)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_dims() {
        let d = Device::Cpu;
        let x = Tensor::arange(0f32, 120.0, &d).unwrap().reshape((2, 3, 4, 5)).unwrap();
        let y = Format::Nhwc.from_nchw(&x).unwrap();
        assert_eq!(y.dims(), [2, 4, 5, 3]);
        assert_eq!(Format::Nhwc.nchw(y.dims()).unwrap(), (2, 3, 4, 5));
        assert_eq!(Format::Nhwc.dims(2, 3, 4, 5), [2, 4, 5, 3]);
        // Element (n=1, c=2, h=3, w=4) sits at [1, 3, 4, 2].
        let want = x.get(1).unwrap().get(2).unwrap().get(3).unwrap().get(4).unwrap().to_scalar::<f32>().unwrap();
        let got = y.get(1).unwrap().get(3).unwrap().get(4).unwrap().get(2).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(want, got);
        let back = Format::Nhwc.to_nchw(&y).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let w = Tensor::zeros((8, 3, 3, 3), candle_core::DType::F32, &d).unwrap();
        let wf = Format::Nhwc.filter(&w).unwrap();
        assert_eq!(wf.dims(), [8, 3, 3, 3]);
        let w2 = Tensor::zeros((8, 4, 1, 1), candle_core::DType::F32, &d).unwrap();
        let wf2 = Format::Nhwc.filter(&w2).unwrap();
        assert_eq!(wf2.dims(), [8, 1, 1, 4]);
        assert_eq!(Format::Nhwc.filter_oihw(wf2.dims()).unwrap(), (8, 4, 1, 1));
        assert_eq!(Format::Nhwc.filter_to_oihw(&wf2).unwrap().dims(), [8, 4, 1, 1]);
        assert_eq!(preferred_format(&d), Format::Nchw);
    }
}
