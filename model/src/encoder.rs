//! The TAESD encoder: [0, 1] NCHW images -> scaled latents.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::arch::{encoder_spec, Part};
use crate::layers::Sequential;
use crate::variant::TaesdConfig;

/// taesd.py `Encoder` (or taesana's 32x encoder). Tensors are named as the reference's
/// state dict (`0.weight`, `1.conv.0.weight`, ..., `14.bias`) under the given `VarBuilder`.
#[derive(Debug, Clone)]
pub struct Encoder {
    config: TaesdConfig,
    seq: Sequential,
    dtype: DType,
}

impl Encoder {
    /// Build from `vb`: a checkpoint's tensors, or a `VarMap` (new trainable variables under the
    /// same names). For a combined model use `vb.pp("encoder")` (what [`crate::Taesd::new`] does).
    pub fn new(config: &TaesdConfig, vb: VarBuilder) -> Result<Self> {
        let seq = Sequential::new(&encoder_spec(config), vb)?;
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
        Part::Encoder
    }
}

impl Module for Encoder {
    /// `[N, 3, H, W]` in [0, 1] -> `[N, C, H/s, W/s]` scaled latents (s = 8, or 32 for taesana;
    /// sizes round up), in the weights' dtype.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_in(x, self.dtype)
    }
}
