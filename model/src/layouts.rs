//! The checkpoint layouts and how their tensor names map onto this crate's names.
//!
//! This crate's names (a `VarMap` built by [`crate::Taesd::new`], and the `combined` layout) are
//! the reference's `nn.Sequential` names under an `encoder.` / `decoder.` prefix:
//! `encoder.1.conv.0.weight`, `decoder.19.bias`.
//!
//! | layout      | encoder tensor              | decoder tensor                | files |
//! |-------------|-----------------------------|-------------------------------|-------|
//! | `taesd`     | `1.conv.0.weight`           | `3.conv.0.weight`             | `<name>_encoder.*`, `<name>_decoder.*` (taesd.py) |
//! | `diffusers` | `encoder.layers.1.conv.0.weight` | `decoder.layers.2.conv.0.weight` | `diffusion_pytorch_model.safetensors` + `config.json` |
//! | `comfyui`   | `taesd_encoder.1.conv.0.weight` | `taesd_decoder.3.conv.0.weight` | one file, optional `vae_scale` / `vae_shift` |
//! | `combined`  | `encoder.1.conv.0.weight`   | `decoder.3.conv.0.weight`     | one file (what `VarMap::save` writes) |
//!
//! diffusers' `DecoderTiny` has no `Clamp` module (it applies `tanh(x/3)*3` in `forward`), so its
//! decoder index is the reference's minus one. `AutoencoderTiny` has neither TAEF2's mid-block
//! pool nor TAESANA's stem/decoder, so this crate *saves* the diffusers layout for taesd, taesdxl,
//! taesd3, taef1 (and custom channel counts) only. It *loads* diffusers-named files of any
//! structure (madebyollin's `taef2.safetensors` uses diffusers names plus `pool` tensors).

use std::fmt;
use std::str::FromStr;

use crate::arch::Part;
use crate::error::TaesdError;

/// A checkpoint layout. Serialised by [`Layout::name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// madebyollin/taesd: one file per part, names are the `nn.Sequential` indices.
    #[serde(rename = "taesd")]
    TaesdPy,
    /// diffusers `AutoencoderTiny`: `encoder.layers.i`, `decoder.layers.(i-1)`, with `config.json`.
    Diffusers,
    /// ComfyUI's combined TAESD: `taesd_encoder.` / `taesd_decoder.` prefixes.
    ComfyUi,
    /// One file with this crate's `encoder.` / `decoder.` names.
    Combined,
}

/// ComfyUI's latent scaling scalars, beside the two parts in its combined file.
pub const COMFY_VAE_SCALE: &str = "vae_scale";
pub const COMFY_VAE_SHIFT: &str = "vae_shift";

impl Layout {
    pub const ALL: [Layout; 4] = [Layout::TaesdPy, Layout::Diffusers, Layout::ComfyUi, Layout::Combined];

    pub fn name(self) -> &'static str {
        match self {
            Layout::TaesdPy => "taesd",
            Layout::Diffusers => "diffusers",
            Layout::ComfyUi => "comfyui",
            Layout::Combined => "combined",
        }
    }

    pub fn parse(s: &str) -> Option<Layout> {
        match s.trim().to_lowercase().as_str() {
            "taesd" | "taesd.py" | "taesd-py" | "taesd_py" | "taesdpy" | "reference" => Some(Layout::TaesdPy),
            "diffusers" | "autoencodertiny" => Some(Layout::Diffusers),
            "comfyui" | "comfy" => Some(Layout::ComfyUi),
            "combined" | "candle" | "varmap" => Some(Layout::Combined),
            _ => None,
        }
    }

    /// Whether one file holds both parts (all but `taesd`).
    pub fn single_file(self) -> bool {
        self != Layout::TaesdPy
    }

    /// This layout's name of a tensor, from its part and reference (`nn.Sequential`) name.
    pub fn external_name(self, part: Part, local: &str) -> String {
        match self {
            Layout::TaesdPy => local.to_string(),
            Layout::Combined => format!("{}.{local}", part.prefix()),
            Layout::ComfyUi => format!("taesd_{}.{local}", part.prefix()),
            Layout::Diffusers => {
                let (idx, rest) = split_index(local).expect("reference names start with an index");
                let idx = match part {
                    Part::Encoder => idx,
                    Part::Decoder => idx.checked_sub(1).expect("the decoder's index 0 holds no tensors"),
                };
                format!("{}.layers.{idx}.{rest}", part.prefix())
            }
        }
    }

    /// The part and reference name of one of this layout's tensor names, or `None` when the name
    /// is not one of this layout's. For `taesd`, `part` says which file it is.
    pub fn local_name(self, external: &str, part: Option<Part>) -> Option<(Part, String)> {
        let with_index = |p: Part, rest: &str| split_index(rest).map(|_| (p, rest.to_string()));
        match self {
            Layout::TaesdPy => with_index(part?, external),
            Layout::Combined => {
                for p in Part::BOTH {
                    if let Some(rest) = external.strip_prefix(p.prefix()).and_then(|r| r.strip_prefix('.')) {
                        return with_index(p, rest);
                    }
                }
                None
            }
            Layout::ComfyUi => {
                for p in Part::BOTH {
                    if let Some(rest) = external
                        .strip_prefix("taesd_")
                        .and_then(|r| r.strip_prefix(p.prefix()))
                        .and_then(|r| r.strip_prefix('.'))
                    {
                        return with_index(p, rest);
                    }
                }
                None
            }
            Layout::Diffusers => {
                for p in Part::BOTH {
                    if let Some(rest) = external.strip_prefix(p.prefix()).and_then(|r| r.strip_prefix(".layers.")) {
                        let (idx, tail) = split_index(rest)?;
                        let idx = if p == Part::Decoder { idx + 1 } else { idx };
                        return Some((p, format!("{idx}.{tail}")));
                    }
                }
                None
            }
        }
    }

    /// Guess the layout of one file from its tensor names.
    pub fn detect<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<Layout> {
        let mut found = None;
        for n in names {
            let l = if n.starts_with("taesd_encoder.") || n.starts_with("taesd_decoder.") {
                Layout::ComfyUi
            } else if n.starts_with("encoder.layers.") || n.starts_with("decoder.layers.") {
                Layout::Diffusers
            } else if Layout::Combined.local_name(n, None).is_some() {
                Layout::Combined
            } else if split_index(n).is_some() {
                Layout::TaesdPy
            } else {
                continue;
            };
            match found {
                None => found = Some(l),
                Some(f) if f == l => {}
                Some(_) => return None,
            }
        }
        found
    }
}

/// `"12.conv.0.weight"` -> `(12, "conv.0.weight")`.
pub(crate) fn split_index(name: &str) -> Option<(usize, &str)> {
    let (idx, rest) = name.split_once('.')?;
    if rest.is_empty() {
        return None;
    }
    Some((idx.parse().ok()?, rest))
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Layout {
    type Err = TaesdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Layout::parse(s).ok_or_else(|| TaesdError::UnknownLayoutName(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        let cases = [
            (Layout::TaesdPy, Part::Decoder, "3.conv.0.weight", "3.conv.0.weight"),
            (Layout::Diffusers, Part::Decoder, "3.conv.0.weight", "decoder.layers.2.conv.0.weight"),
            (Layout::Diffusers, Part::Decoder, "1.weight", "decoder.layers.0.weight"),
            (Layout::Diffusers, Part::Encoder, "14.bias", "encoder.layers.14.bias"),
            (Layout::ComfyUi, Part::Encoder, "11.pool.1.bias", "taesd_encoder.11.pool.1.bias"),
            (Layout::Combined, Part::Decoder, "19.bias", "decoder.19.bias"),
        ];
        for (layout, part, local, ext) in cases {
            assert_eq!(layout.external_name(part, local), ext);
            let hint = if layout == Layout::TaesdPy { Some(part) } else { None };
            assert_eq!(layout.local_name(ext, hint), Some((part, local.to_string())));
            assert_eq!(Layout::parse(layout.name()), Some(layout));
            assert_eq!(serde_json::to_string(&layout).unwrap(), format!("\"{layout}\""));
        }
        assert_eq!(Layout::ComfyUi.local_name(COMFY_VAE_SCALE, None), None);
        assert_eq!(Layout::detect(["1.weight", "1.bias"]), Some(Layout::TaesdPy));
        assert_eq!(Layout::detect(["decoder.layers.0.weight", "encoder.layers.0.weight"]), Some(Layout::Diffusers));
        assert_eq!(Layout::detect(["taesd_decoder.1.weight", "vae_scale"]), Some(Layout::ComfyUi));
        assert_eq!(Layout::detect(["decoder.1.weight"]), Some(Layout::Combined));
        assert_eq!(Layout::detect(["decoder.1.weight", "1.weight"]), None);
        assert_eq!(Layout::detect(["model.x"]), None);
    }
}
