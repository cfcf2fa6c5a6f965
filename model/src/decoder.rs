//! The TAESD decoder: scaled latents -> [0, 1] NCHW images (unclamped, as the reference).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::arch::{decoder_spec, Part};
use crate::layers::Sequential;
use crate::variant::TaesdConfig;

/// taesd.py `Decoder` (or taesana's 32x decoder). Index 0 is the parameter-free `Clamp`, so the
/// tensors start at `1.weight` and end at `19.bias` (`29.bias` for taesana).
#[derive(Debug, Clone)]
pub struct Decoder {
    config: TaesdConfig,
    seq: Sequential,
    dtype: DType,
}

impl Decoder {
    /// Build from `vb` (see [`crate::Encoder::new`]); for a combined model use `vb.pp("decoder")`.
    pub fn new(config: &TaesdConfig, vb: VarBuilder) -> Result<Self> {
        let seq = Sequential::new(&decoder_spec(config), vb)?;
        let dtype = seq.dtype().unwrap_or(DType::F32);
        Ok(Self { config: *config, seq, dtype })
    }

    pub fn config(&self) -> &TaesdConfig {
        &self.config
    }

    /// The weights' dtype; inputs are converted to it.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The forward pass computed in `dtype` (the input is cast to it), whatever the weights'
    /// dtype: weights are cast on use (mixed precision: f32 master weights, bf16 activations;
    /// the casts' backward hands f32 gradients to the weights). [`Module::forward`] computes in
    /// the weights' dtype.
    pub fn forward_in(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        self.seq.forward(&x.to_dtype(dtype)?)
    }

    /// [`Self::forward_in`] with the activations in `format` instead of the device's preferred
    /// one (`taesd_ops::preferred_format`); input and output NCHW either way.
    pub fn forward_in_format(&self, x: &Tensor, dtype: DType, format: taesd_ops::Format) -> Result<Tensor> {
        self.seq.forward_in_format(&x.to_dtype(dtype)?, format)
    }

    pub fn part(&self) -> Part {
        Part::Decoder
    }
}

impl Module for Decoder {
    /// `[N, C, h, w]` scaled latents -> `[N, 3, h*s, w*s]` images, nominally [0, 1] but not
    /// clamped (clamp before quantising; training losses want the raw output).
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        self.forward_in(z, self.dtype)
    }
}
