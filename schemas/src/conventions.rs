//! Every tensor convention of the project, stated once. Code elsewhere converts through these
//! functions instead of writing `x * 2.0 - 1.0` or `* 0.13025` inline.
//!
//! * Images in taesd.py (and in this project's model) are float NCHW in **[0, 1]**.
//! * TAESD latents are the VAE's **scaled** latents: `scaled = (raw - shift) * scale`
//!   (SD x0.18215, SDXL x0.13025, SD3 (z-0.0609)x1.5305, FLUX.1 (z-0.1159)x0.3611). The per-VAE
//!   numbers live in [`crate::presets`].
//! * diffusers `AutoencoderKL` takes and gives images in **[-1, 1]** and raw (unscaled) latents.
//! * diffusers `AutoencoderTiny` takes and gives images in **[-1, 1]**, with `scaling_factor = 1.0`
//!   (its latents are already the scaled ones).
//! * Stored shard images are 8-bit sRGB, `u8 / 255` gives the [0, 1] image the teacher saw.
//! * Latents in shards are C-major (`[C, h, w]`, row-major) and already scaled.
//! * Exports for other tools keep taesd.py's conventions: the `.pth` state dicts are taesd.py's
//!   own; the ONNX encoder takes `image` (float NCHW in [0, 1]) and gives `latent` (scaled), the
//!   ONNX decoder takes `latent` and gives `image` ([0, 1] nominally, not clamped), with the
//!   symbolic dimensions [`ONNX_IMAGE_DIMS`] / [`ONNX_LATENT_DIMS`] (the names the taef2 teacher
//!   ONNX in ../shared uses for its input, and that `precompute --onnx` looks for).

use serde::{Deserialize, Serialize};

/// The value range an image tensor is expressed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PixelRange {
    /// [0, 1]: taesd.py, this project's model, stored shard images (`u8 / 255`).
    #[serde(rename = "0,1")]
    ZeroOne,
    /// [-1, 1]: diffusers AutoencoderKL and AutoencoderTiny.
    #[serde(rename = "-1,1")]
    MinusOneOne,
}

impl PixelRange {
    /// Map a value in [0, 1] into this range.
    #[inline]
    pub fn from_unit(self, x: f32) -> f32 {
        match self {
            PixelRange::ZeroOne => x,
            PixelRange::MinusOneOne => x * 2.0 - 1.0,
        }
    }

    /// Map a value in this range back to [0, 1].
    #[inline]
    pub fn to_unit(self, x: f32) -> f32 {
        match self {
            PixelRange::ZeroOne => x,
            PixelRange::MinusOneOne => (x + 1.0) * 0.5,
        }
    }

    /// `(mul, add)` such that `from_unit(x) == x * mul + add`, for tensor code.
    pub fn affine_from_unit(self) -> (f64, f64) {
        match self {
            PixelRange::ZeroOne => (1.0, 0.0),
            PixelRange::MinusOneOne => (2.0, -1.0),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PixelRange::ZeroOne => "0,1",
            PixelRange::MinusOneOne => "-1,1",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "0,1" | "[0,1]" | "0..1" | "unit" => Some(PixelRange::ZeroOne),
            "-1,1" | "[-1,1]" | "-1..1" | "signed" => Some(PixelRange::MinusOneOne),
            _ => None,
        }
    }
}

/// Name of the image tensor of an ONNX export (input of the encoder, output of the decoder).
pub const ONNX_IMAGE: &str = "image";
/// Name of the latent tensor of an ONNX export (output of the encoder, input of the decoder).
pub const ONNX_LATENT: &str = "latent";
/// Symbolic dimensions of [`ONNX_IMAGE`]: `[batch, 3, height, width]` (the channel count fixed).
pub const ONNX_IMAGE_DIMS: [&str; 4] = ["batch", "3", "height", "width"];
/// Symbolic dimensions of [`ONNX_LATENT`]: `[batch, C, latent_height, latent_width]`.
pub const ONNX_LATENT_DIMS: [&str; 4] = ["batch", "C", "latent_height", "latent_width"];

/// The factor from 8-bit samples to the [0, 1] range: `v as f32 * UNIT_PER_U8`. Training
/// batches travel to the GPU as 8-bit planes and are scaled there by this same f32 product.
pub const UNIT_PER_U8: f32 = 1.0 / 255.0;

/// An 8-bit sample to the [0, 1] range.
#[inline]
pub fn u8_to_unit(v: u8) -> f32 {
    v as f32 * UNIT_PER_U8
}

/// A [0, 1] sample to 8 bits (rounded, clamped).
#[inline]
pub fn unit_to_u8(x: f32) -> u8 {
    (x.clamp(0.0, 1.0) * 255.0 + 0.5) as u8
}

/// How a VAE's raw latent `z` relates to the TAESD (scaled) latent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatentScaling {
    pub scale: f64,
    pub shift: f64,
}

impl LatentScaling {
    /// Latents that are already in TAESD scale (taef2's ONNX encoder, AutoencoderTiny).
    pub const IDENTITY: LatentScaling = LatentScaling { scale: 1.0, shift: 0.0 };

    /// raw VAE latent -> TAESD latent: `(z - shift) * scale`.
    #[inline]
    pub fn to_scaled(&self, z: f32) -> f32 {
        ((z as f64 - self.shift) * self.scale) as f32
    }

    /// TAESD latent -> raw VAE latent: `s / scale + shift`.
    #[inline]
    pub fn to_raw(&self, s: f32) -> f32 {
        (s as f64 / self.scale + self.shift) as f32
    }

    /// A standard deviation of a raw latent, in TAESD scale (shift does not apply).
    #[inline]
    pub fn std_to_scaled(&self, std: f32) -> f32 {
        (std as f64 * self.scale) as f32
    }
}

/// Standard deviation of a diagonal Gaussian posterior from its log-variance, clamped the way
/// diffusers' `DiagonalGaussianDistribution` clamps it (logvar in [-30, 20]).
#[inline]
pub fn std_from_logvar(logvar: f32) -> f32 {
    (0.5 * logvar.clamp(-30.0, 20.0)).exp()
}

/// TAESD's decoder input clamp: `tanh(x / 3) * 3`.
#[inline]
pub fn taesd_latent_clamp(x: f32) -> f32 {
    (x / 3.0).tanh() * 3.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_ranges_round_trip() {
        for r in [PixelRange::ZeroOne, PixelRange::MinusOneOne] {
            for x in [0.0f32, 0.25, 1.0] {
                assert!((r.to_unit(r.from_unit(x)) - x).abs() < 1e-7);
                let (m, a) = r.affine_from_unit();
                assert!(((x as f64 * m + a) as f32 - r.from_unit(x)).abs() < 1e-7);
            }
            assert_eq!(PixelRange::parse(r.as_str()), Some(r));
        }
        assert_eq!(PixelRange::MinusOneOne.from_unit(0.0), -1.0);
        assert_eq!(PixelRange::MinusOneOne.from_unit(1.0), 1.0);
    }

    #[test]
    fn latent_scaling_matches_published_formulas() {
        let sd3 = LatentScaling { scale: 1.5305, shift: 0.0609 };
        let z = 0.7f32;
        assert!((sd3.to_scaled(z) - (0.7 - 0.0609) * 1.5305).abs() < 1e-6);
        assert!((sd3.to_raw(sd3.to_scaled(z)) - z).abs() < 1e-6);
        assert_eq!(LatentScaling::IDENTITY.to_scaled(z), z);
    }

    #[test]
    fn u8_conversion_is_exact_round_trip() {
        for v in 0..=255u8 {
            assert_eq!(unit_to_u8(u8_to_unit(v)), v);
        }
    }
}
