//! The VAE presets `precompute --vae NAME` knows: one row each, in one table.

use crate::conventions::{LatentScaling, PixelRange};
use serde::{Deserialize, Serialize};

/// Everything `precompute` needs to know about a teacher encoder to turn its ONNX output into
/// TAESD latents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeSpec {
    /// Preset name (`custom` for one built from flags).
    pub name: String,
    /// Latent channels C (the ONNX output has C channels, or 2C posterior moments).
    pub channels: usize,
    /// raw -> TAESD latent. Identity when the encoder already outputs TAESD-scale latents.
    pub scaling: LatentScaling,
    /// Range the ONNX encoder expects its image input in.
    pub input_range: PixelRange,
    /// Spatial downscale factor of the encoder (8 for every SD-family VAE).
    pub downscale: usize,
    /// The TAESD variant whose latents these are (`taesd`, `taesdxl`, `taesd3`, `taef1`, `taef2`).
    pub taesd_variant: Option<String>,
}

/// One row of the preset table.
pub struct Preset {
    pub name: &'static str,
    pub about: &'static str,
    pub channels: usize,
    pub scale: f64,
    pub shift: f64,
    pub input_range: PixelRange,
    pub taesd_variant: &'static str,
    /// Where users get the VAE whose encoder this preset describes.
    pub source: &'static str,
}

use PixelRange::{MinusOneOne, ZeroOne};

/// The preset table. `custom` is not a row: it is built from command-line flags.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "sd",
        about: "Stable Diffusion 1.x/2.x VAE (sd-vae-ft-ema / ft-mse)",
        channels: 4,
        scale: 0.18215,
        shift: 0.0,
        input_range: MinusOneOne,
        taesd_variant: "taesd",
        source: "stabilityai/sd-vae-ft-mse",
    },
    Preset {
        name: "sdxl",
        about: "SDXL VAE (runs in fp32; NaNs in fp16)",
        channels: 4,
        scale: 0.13025,
        shift: 0.0,
        input_range: MinusOneOne,
        taesd_variant: "taesdxl",
        source: "stabilityai/sdxl-vae",
    },
    Preset {
        name: "sdxl-fp16-fix",
        about: "SDXL VAE fp16-fix (madebyollin), safe in fp16",
        channels: 4,
        scale: 0.13025,
        shift: 0.0,
        input_range: MinusOneOne,
        taesd_variant: "taesdxl",
        source: "madebyollin/sdxl-vae-fp16-fix",
    },
    Preset {
        name: "sd3",
        about: "Stable Diffusion 3 VAE",
        channels: 16,
        scale: 1.5305,
        shift: 0.0609,
        input_range: MinusOneOne,
        taesd_variant: "taesd3",
        source: "stabilityai/stable-diffusion-3-medium-diffusers (subfolder vae)",
    },
    Preset {
        name: "flux1",
        about: "FLUX.1 VAE",
        channels: 16,
        scale: 0.3611,
        shift: 0.1159,
        input_range: MinusOneOne,
        taesd_variant: "taef1",
        source: "black-forest-labs/FLUX.1-schnell (subfolder vae)",
    },
    Preset {
        name: "taef2",
        about: "TAEF2 encoder as teacher (input [0,1], 32 ch, already TAESD-scaled)",
        channels: 32,
        scale: 1.0,
        shift: 0.0,
        input_range: ZeroOne,
        taesd_variant: "taef2",
        source: "madebyollin/taesd (taef2_encoder), exported to ONNX",
    },
];

/// Look a preset up by name.
pub fn preset(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

/// Names of all presets plus `custom`, for help texts and error messages.
pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|p| p.name).chain(std::iter::once("custom")).collect()
}

impl Preset {
    pub fn spec(&self) -> VaeSpec {
        VaeSpec {
            name: self.name.to_string(),
            channels: self.channels,
            scaling: LatentScaling { scale: self.scale, shift: self.shift },
            input_range: self.input_range,
            downscale: 8,
            taesd_variant: Some(self.taesd_variant.to_string()),
        }
    }
}

impl VaeSpec {
    /// A `custom` spec from flags.
    pub fn custom(channels: usize, scale: f64, shift: f64, input_range: PixelRange, downscale: usize) -> VaeSpec {
        VaeSpec {
            name: "custom".into(),
            channels,
            scaling: LatentScaling { scale, shift },
            input_range,
            downscale,
            taesd_variant: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tools/export_vae_onnx.py` repeats (channels, scale, shift) of the diffusers presets: they
    /// must be the numbers here.
    #[test]
    fn the_python_export_tool_has_the_same_preset_numbers() {
        let py = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tools/export_vae_onnx.py")).unwrap();
        let start = py.find("PRESETS = {").expect("PRESETS in the export tool");
        let body = &py[start..start + py[start..].find("\n}").unwrap()];
        let mut seen = 0;
        for line in body.lines().skip(1) {
            // `    "sd": (4, 0.18215, 0.0),`
            let (name, rest) = line.trim().split_once(':').unwrap();
            let name = name.trim().trim_matches('"');
            let nums: Vec<f64> = rest
                .trim()
                .trim_start_matches('(')
                .trim_end_matches("),")
                .split(',')
                .map(|x| x.trim().parse().unwrap())
                .collect();
            let p = preset(name).unwrap_or_else(|| panic!("the export tool's preset `{name}` is not in presets.rs"));
            assert_eq!((p.channels as f64, p.scale, p.shift), (nums[0], nums[1], nums[2]), "preset {name}");
            assert_eq!(p.input_range, MinusOneOne, "the export tool's presets all take [-1, 1]: {name}");
            seen += 1;
        }
        // Every diffusers preset (all but the taef2 teacher, which is not a diffusers VAE).
        assert_eq!(seen, PRESETS.iter().filter(|p| p.input_range == MinusOneOne).count());
    }

    #[test]
    fn table_has_the_published_numbers() {
        let sdxl = preset("sdxl-fp16-fix").unwrap().spec();
        assert_eq!((sdxl.channels, sdxl.scaling.scale, sdxl.scaling.shift), (4, 0.13025, 0.0));
        let flux = preset("flux1").unwrap().spec();
        assert_eq!((flux.channels, flux.scaling.scale, flux.scaling.shift), (16, 0.3611, 0.1159));
        let sd3 = preset("sd3").unwrap();
        assert_eq!((sd3.scale, sd3.shift), (1.5305, 0.0609));
        assert_eq!(preset("sd").unwrap().scale, 0.18215);
        let t = preset("taef2").unwrap().spec();
        assert_eq!((t.channels, t.input_range, t.scaling), (32, PixelRange::ZeroOne, LatentScaling::IDENTITY));
        assert!(preset("nope").is_none());
        let names = preset_names();
        assert!(names.contains(&"custom") && names.len() == PRESETS.len() + 1);
    }
}
