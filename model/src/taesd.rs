//! Encoder and decoder together, as loaded from a checkpoint or built for training.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::arch::Part;
use crate::checkpoint::{load_checkpoint, load_checkpoints, Checkpoint};
use crate::decoder::Decoder;
use crate::encoder::Encoder;
use crate::error::{CandleContext, Result, TaesdError};
use crate::variant::{TaesdConfig, Variant};

/// A TAESD: either part may be absent (taesd.py ships them as separate files).
#[derive(Debug, Clone)]
pub struct Taesd {
    pub config: TaesdConfig,
    pub variant: Option<Variant>,
    pub encoder: Option<Encoder>,
    pub decoder: Option<Decoder>,
}

impl Taesd {
    /// Both parts from `vb`, under `encoder.` and `decoder.`: with `VarBuilder::from_varmap`
    /// this creates (or reuses) trainable variables named as the `combined` layout.
    pub fn new(config: &TaesdConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            config: *config,
            variant: config.unique_variant(),
            encoder: Some(Encoder::new(config, vb.pp(Part::Encoder.prefix()))?),
            decoder: Some(Decoder::new(config, vb.pp(Part::Decoder.prefix()))?),
        })
    }

    /// The parts a checked checkpoint holds, in `dtype` on `device`.
    pub fn from_checkpoint(ck: &Checkpoint, dtype: DType, device: &Device) -> Result<Self> {
        let vb = ck.var_builder(dtype, device);
        let cfg = ck.info.config;
        let encoder = match &ck.info.encoder_file {
            Some(f) => Some(
                Encoder::new(&cfg, vb.pp(Part::Encoder.prefix()))
                    .ctx(|| format!("{}: building the encoder", f.display()))?,
            ),
            None => None,
        };
        let decoder = match &ck.info.decoder_file {
            Some(f) => Some(
                Decoder::new(&cfg, vb.pp(Part::Decoder.prefix()))
                    .ctx(|| format!("{}: building the decoder", f.display()))?,
            ),
            None => None,
        };
        Ok(Self { config: cfg, variant: ck.info.variant, encoder, decoder })
    }

    /// Load any checkpoint file or folder (see [`load_checkpoint`]).
    pub fn load(path: impl AsRef<Path>, expected: Option<Variant>, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_checkpoint(&load_checkpoint(path, expected)?, dtype, device)
    }

    /// Load parts from several files, e.g. `taef2_encoder.pth` and `taef2_decoder.pth`.
    pub fn load_files<P: AsRef<Path>>(
        paths: &[P],
        expected: Option<Variant>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::from_checkpoint(&load_checkpoints(paths, expected)?, dtype, device)
    }

    pub fn encoder(&self) -> Result<&Encoder> {
        self.encoder.as_ref().ok_or_else(|| TaesdError::Other(format!("this {} has no encoder loaded", self.config)))
    }

    pub fn decoder(&self) -> Result<&Decoder> {
        self.decoder.as_ref().ok_or_else(|| TaesdError::Other(format!("this {} has no decoder loaded", self.config)))
    }

    /// [0, 1] images -> scaled latents.
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        Ok(self.encoder()?.forward(images)?)
    }

    /// Scaled latents -> [0, 1] images (unclamped).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(self.decoder()?.forward(latents)?)
    }
}
