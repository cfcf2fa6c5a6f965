//! The named TAESD variants and the structural configuration a model is built from.
//!
//! [`Variant`] is the name a user picks (`taesd`, `taef2`, ...); [`TaesdConfig`] is what the
//! network is built from (latent channels, mid-block pool, 8x or 32x). Some variants share one
//! structure (taesd/taesdxl, taesd3/taef1) and differ only in their trained weights, so a
//! checkpoint's tensors give its config, and its variant only when the structure is unique.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use taesd_schemas::{preset, LatentScaling};

use crate::error::TaesdError;

/// The released TAESD family. Serialised by name (`"taesdxl"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// Stable Diffusion 1.x/2.x, 4 latent channels.
    Taesd,
    /// SDXL, 4 latent channels.
    Taesdxl,
    /// Stable Diffusion 3, 16 latent channels.
    Taesd3,
    /// FLUX.1, 16 latent channels.
    Taef1,
    /// FLUX.2, 32 latent channels, GroupNorm mid-block pool.
    Taef2,
    /// Sana (DC-AE), 32 latent channels at 32x downscale.
    Taesana,
}

impl Variant {
    pub const ALL: [Variant; 6] =
        [Variant::Taesd, Variant::Taesdxl, Variant::Taesd3, Variant::Taef1, Variant::Taef2, Variant::Taesana];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Taesd => "taesd",
            Variant::Taesdxl => "taesdxl",
            Variant::Taesd3 => "taesd3",
            Variant::Taef1 => "taef1",
            Variant::Taef2 => "taef2",
            Variant::Taesana => "taesana",
        }
    }

    /// Every variant's name, comma-separated (help texts and error messages).
    pub fn names() -> String {
        Variant::ALL.map(Variant::name).join(", ")
    }

    /// Parse a variant name (case-insensitive, `-`/`_` ignored: `TAESD-XL` is taesdxl).
    pub fn parse(s: &str) -> Option<Variant> {
        let s: String = s.trim().chars().filter(|c| *c != '-' && *c != '_').collect::<String>().to_lowercase();
        Variant::ALL.into_iter().find(|v| v.name() == s)
    }

    /// Latent channels C.
    pub fn latent_channels(self) -> usize {
        match self {
            Variant::Taesd | Variant::Taesdxl => 4,
            Variant::Taesd3 | Variant::Taef1 => 16,
            Variant::Taef2 | Variant::Taesana => 32,
        }
    }

    /// Spatial downscale factor of the encoder (upscale of the decoder): 8, or 32 for taesana.
    pub fn spatial_scale(self) -> usize {
        self.config().spatial_scale()
    }

    /// Whether the variant has TAEF2's GroupNorm mid-block pool.
    pub fn has_midblock_pool(self) -> bool {
        matches!(self, Variant::Taef2)
    }

    /// The structure this variant is built from.
    pub fn config(self) -> TaesdConfig {
        TaesdConfig {
            latent_channels: self.latent_channels(),
            midblock_pool: self.has_midblock_pool(),
            downscale: if self == Variant::Taesana { Downscale::X32 } else { Downscale::X8 },
        }
    }

    /// Whether diffusers' `AutoencoderTiny` can represent this variant. It has neither TAEF2's
    /// mid-block pool nor TAESANA's stem and 256/128-channel decoder.
    pub fn diffusers_supported(self) -> bool {
        self.config().diffusers_supported()
    }

    /// The raw-VAE <-> TAESD latent scaling of the VAE this variant stands in for, from the
    /// preset table (what ComfyUI stores as `vae_scale` / `vae_shift`). `None` where the
    /// project has no scalar scaling for it (taef2: FLUX.2 normalises per channel; taesana).
    pub fn vae_scaling(self) -> Option<LatentScaling> {
        let name = match self {
            Variant::Taesd => "sd",
            Variant::Taesdxl => "sdxl",
            Variant::Taesd3 => "sd3",
            Variant::Taef1 => "flux1",
            Variant::Taef2 | Variant::Taesana => return None,
        };
        preset(name).map(|p| LatentScaling { scale: p.scale, shift: p.shift })
    }

    /// A variant named in a file or folder name (`taesdxl_decoder.pth`, `taef1/`, `taesd3_...`),
    /// longest name first so `taesdxl` is not read as `taesd`.
    pub fn from_file_name(name: &str) -> Option<Variant> {
        let lower = name.to_lowercase();
        let mut all = Variant::ALL;
        all.sort_by_key(|v| std::cmp::Reverse(v.name().len()));
        all.into_iter().find(|v| lower.contains(v.name()))
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Variant {
    type Err = TaesdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Variant::parse(s).ok_or_else(|| TaesdError::UnknownVariant(s.to_string()))
    }
}

/// Spatial factor between image and latent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Downscale {
    /// 8x: taesd.py's `Encoder` / `Decoder` (all variants but taesana).
    X8,
    /// 32x: taesana's two stride-2 stem convs and 256/128/64-channel decoder.
    X32,
}

impl Downscale {
    pub fn factor(self) -> usize {
        match self {
            Downscale::X8 => 8,
            Downscale::X32 => 32,
        }
    }
}

/// What a TAESD network is built from. Any latent channel count is allowed (a TAESD for a VAE
/// outside the named variants); the named ones come from [`Variant::config`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TaesdConfig {
    pub latent_channels: usize,
    /// TAEF2's `x + pool(x)` before the encoder's last three and the decoder's first three blocks.
    pub midblock_pool: bool,
    pub downscale: Downscale,
}

impl TaesdConfig {
    /// The 8x taesd.py structure with `latent_channels` channels and no pool.
    pub fn custom(latent_channels: usize) -> TaesdConfig {
        TaesdConfig { latent_channels, midblock_pool: false, downscale: Downscale::X8 }
    }

    pub fn spatial_scale(&self) -> usize {
        self.downscale.factor()
    }

    /// The named variants with exactly this structure (two for C=4 and C=16, none for a custom C).
    pub fn variants(&self) -> Vec<Variant> {
        Variant::ALL.into_iter().filter(|v| v.config() == *self).collect()
    }

    /// The variant when the structure names exactly one.
    pub fn unique_variant(&self) -> Option<Variant> {
        match self.variants().as_slice() {
            [v] => Some(*v),
            _ => None,
        }
    }

    /// Whether diffusers' `AutoencoderTiny` can represent this structure.
    pub fn diffusers_supported(&self) -> bool {
        !self.midblock_pool && self.downscale == Downscale::X8
    }

    /// A short description for messages: `taef2`, `taesd/taesdxl`, or `custom (C=8, 8x)`.
    pub fn describe(&self) -> String {
        let names = self.variants();
        if names.is_empty() {
            format!(
                "custom (C={}, {}x{})",
                self.latent_channels,
                self.spatial_scale(),
                if self.midblock_pool { ", mid-block pool" } else { "" }
            )
        } else {
            names.iter().map(|v| v.name()).collect::<Vec<_>>().join("/")
        }
    }
}

impl From<Variant> for TaesdConfig {
    fn from(v: Variant) -> Self {
        v.config()
    }
}

impl fmt::Display for TaesdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_display() {
        for v in Variant::ALL {
            assert_eq!(Variant::parse(v.name()), Some(v));
            assert_eq!(v.to_string().parse::<Variant>().unwrap(), v);
        }
        assert_eq!(Variant::parse("TAESD-XL"), Some(Variant::Taesdxl));
        assert!("taesd4".parse::<Variant>().is_err());
        assert_eq!(Variant::from_file_name("taesdxl_decoder.pth"), Some(Variant::Taesdxl));
        assert_eq!(Variant::from_file_name("/x/taef2_encoder.pth"), Some(Variant::Taef2));
        assert_eq!(Variant::from_file_name("taesd_encoder.safetensors"), Some(Variant::Taesd));
        assert_eq!(Variant::from_file_name("vae.pth"), None);
        for v in Variant::ALL {
            assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{v}\""));
        }
        let cfg: TaesdConfig =
            serde_json::from_str(&serde_json::to_string(&Variant::Taesana.config()).unwrap()).unwrap();
        assert_eq!(cfg, Variant::Taesana.config());
    }

    #[test]
    fn structure_of_each_variant() {
        let c: Vec<_> = Variant::ALL.iter().map(|v| (v.latent_channels(), v.spatial_scale())).collect();
        assert_eq!(c, [(4, 8), (4, 8), (16, 8), (16, 8), (32, 8), (32, 32)]);
        assert_eq!(Variant::Taesd.config().variants(), [Variant::Taesd, Variant::Taesdxl]);
        assert_eq!(Variant::Taef2.config().unique_variant(), Some(Variant::Taef2));
        assert_eq!(Variant::Taesana.config().unique_variant(), Some(Variant::Taesana));
        assert_eq!(TaesdConfig::custom(8).unique_variant(), None);
        let supported: Vec<_> = Variant::ALL.into_iter().filter(|v| v.diffusers_supported()).collect();
        assert_eq!(supported, [Variant::Taesd, Variant::Taesdxl, Variant::Taesd3, Variant::Taef1]);
        assert_eq!(Variant::Taesdxl.vae_scaling().unwrap().scale, 0.13025);
        assert_eq!(Variant::Taef1.vae_scaling().unwrap().shift, 0.1159);
        assert!(Variant::Taef2.vae_scaling().is_none());
    }
}
