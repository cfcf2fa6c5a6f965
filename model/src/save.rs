//! Writing checkpoints in each [`Layout`], as `.safetensors` (default) or as the `.pth` that
//! `torch.save` writes ([`FileFormat`]). Tensors are written as they are (or converted to
//! [`SaveOptions::dtype`]), so save-then-load is bit-exact.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use taesd_schemas::LatentScaling;

use crate::arch::{param_shapes, Part};
use crate::checkpoint::{check_part, varmap_tensors, Checkpoint, PartTensors, META_LAYOUT, META_VARIANT};
use crate::error::{CandleContext, Result, TaesdError};
use crate::layouts::{Layout, COMFY_VAE_SCALE, COMFY_VAE_SHIFT};
use crate::variant::{TaesdConfig, Variant};

/// The diffusers weight file name this crate writes.
pub const DIFFUSERS_WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
/// diffusers version recorded in the config.json this crate writes.
pub const DIFFUSERS_VERSION: &str = "0.32.0";

/// The file format of a checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum FileFormat {
    /// `.safetensors` (with the variant and layout in its metadata).
    #[default]
    Safetensors,
    /// PyTorch's zip `.pth` ([`crate::pth_write`]): what `taesd.py` and ComfyUI's `vae_approx`
    /// folder load with `torch.load(weights_only=True)`. Holds no metadata: the variant is in
    /// the file name (`taef2_encoder.pth`), as taesd.py expects.
    Pth,
}

impl FileFormat {
    pub fn extension(self) -> &'static str {
        match self {
            FileFormat::Safetensors => "safetensors",
            FileFormat::Pth => "pth",
        }
    }

    pub fn parse(s: &str) -> Option<FileFormat> {
        match s.trim().trim_start_matches('.').to_ascii_lowercase().as_str() {
            "safetensors" | "sft" => Some(FileFormat::Safetensors),
            "pth" | "pt" | "torch" => Some(FileFormat::Pth),
            _ => None,
        }
    }
}

/// How to save.
#[derive(Debug, Clone, Default)]
pub struct SaveOptions {
    /// Recorded in the files' metadata (so a reload tells taesd from taesdxl), names the files of
    /// the taesd.py layout when `dest` is a folder, and gives ComfyUI's `vae_scale`/`vae_shift`.
    pub variant: Option<Variant>,
    /// Convert to this dtype (e.g. `F16` for a release); `None` writes the tensors' own dtype.
    pub dtype: Option<DType>,
    /// ComfyUI `vae_scale` / `vae_shift`; `None` takes the variant's ([`Variant::vae_scaling`]),
    /// and with neither the file holds no scalars (ComfyUI then assumes 1 and 0).
    pub vae_scaling: Option<LatentScaling>,
    /// `.safetensors` (default) or `.pth`. The diffusers layout is written as safetensors only.
    pub format: FileFormat,
}

/// Save the tensors named as this crate names them (`encoder.…`, `decoder.…`; other names, e.g.
/// a discriminator's in the same `VarMap`, are skipped) in `layout`. Returns the files written.
///
/// `dest` per layout: `taesd`: a path prefix (`out/taef2` writes `out/taef2_encoder.safetensors`
/// and `out/taef2_decoder.safetensors`, or `.pth` with [`FileFormat::Pth`]), or an existing
/// folder (files named after the variant);
/// `diffusers`: a folder (`diffusion_pytorch_model.safetensors` + `config.json`; needs both
/// parts); `comfyui`, `combined`: the file.
pub fn save_tensors(
    tensors: &HashMap<String, Tensor>,
    cfg: &TaesdConfig,
    layout: Layout,
    dest: impl AsRef<Path>,
    opts: &SaveOptions,
) -> Result<Vec<PathBuf>> {
    let dest = dest.as_ref();
    if let Some(v) = opts.variant {
        if v.config() != *cfg {
            return Err(TaesdError::WrongVariant {
                file: dest.to_path_buf(),
                expected: v.to_string(),
                found: cfg.describe(),
            });
        }
    }
    if layout == Layout::Diffusers && opts.format != FileFormat::Safetensors {
        return Err(TaesdError::UnsupportedLayout {
            layout: layout.to_string(),
            what: format!("a .{} file", opts.format.extension()),
            reason: "the diffusers folder is written as diffusion_pytorch_model.safetensors".into(),
        });
    }
    if layout == Layout::Diffusers && !cfg.diffusers_supported() {
        return Err(TaesdError::UnsupportedLayout {
            layout: layout.to_string(),
            what: cfg.describe(),
            reason: "diffusers' AutoencoderTiny has neither TAEF2's mid-block pool nor TAESANA's 32x stem and \
                     256/128-channel decoder; save it in the taesd, comfyui or combined layout"
                .into(),
        });
    }

    // Split by part, check against the structure, convert.
    let mut parts: BTreeMap<Part, PartTensors> = BTreeMap::new();
    for (name, t) in tensors {
        for part in Part::BOTH {
            if let Some(local) = name.strip_prefix(part.prefix()).and_then(|r| r.strip_prefix('.')) {
                let t = match opts.dtype {
                    Some(d) => t.to_dtype(d).ctx(|| format!("{name} to {d:?}"))?,
                    None => t.clone(),
                };
                parts.entry(part).or_default().insert(local.to_string(), (name.clone(), t));
            }
        }
    }
    if parts.is_empty() {
        return Err(TaesdError::Other(format!(
            "nothing to save to {}: no `encoder.*` or `decoder.*` tensors",
            dest.display()
        )));
    }
    for (part, t) in &parts {
        check_part(cfg, *part, t, dest, Layout::Combined)?;
    }
    if layout == Layout::Diffusers && parts.len() != 2 {
        return Err(TaesdError::UnsupportedLayout {
            layout: layout.to_string(),
            what: "a lone encoder or decoder".into(),
            reason: "AutoencoderTiny loads both parts from one file".into(),
        });
    }

    let mut metadata =
        HashMap::from([("format".to_string(), "pt".to_string()), (META_LAYOUT.to_string(), layout.to_string())]);
    if let Some(v) = opts.variant.or_else(|| cfg.unique_variant()) {
        metadata.insert(META_VARIANT.to_string(), v.to_string());
    }
    // In the reference's module order (what torch.save of a state dict gives).
    let rename = |part: Part, t: &PartTensors| -> Vec<(String, Tensor)> {
        param_shapes(cfg, part)
            .iter()
            .filter_map(|(local, _)| {
                t.get(local).map(|(_, tensor)| (layout.external_name(part, local), tensor.clone()))
            })
            .collect()
    };
    let write = |path: &Path, tensors: Vec<(String, Tensor)>| match opts.format {
        FileFormat::Safetensors => write_safetensors(path, tensors, &metadata),
        FileFormat::Pth => crate::pth_write::write_pth(path, &tensors),
    };

    let mut written = Vec::new();
    match layout {
        Layout::TaesdPy => {
            let prefix = if dest.is_dir() {
                let name = opts.variant.or_else(|| cfg.unique_variant()).map(|v| v.name()).unwrap_or("taesd");
                dest.join(name)
            } else {
                dest.to_path_buf()
            };
            for (part, t) in &parts {
                let mut name = prefix.file_name().map(|n| n.to_os_string()).unwrap_or_default();
                name.push(format!("_{}.{}", part.prefix(), opts.format.extension()));
                let path = prefix.with_file_name(name);
                write(&path, rename(*part, t))?;
                written.push(path);
            }
        }
        Layout::Diffusers => {
            std::fs::create_dir_all(dest).map_err(|cause| TaesdError::Io { path: dest.to_path_buf(), cause })?;
            let all: Vec<_> = parts.iter().flat_map(|(p, t)| rename(*p, t)).collect();
            let path = dest.join(DIFFUSERS_WEIGHTS);
            write_safetensors(&path, all, &metadata)?;
            written.push(path);
            let config = dest.join("config.json");
            let text = serde_json::to_string_pretty(&diffusers_config(cfg)).expect("json");
            std::fs::write(&config, text + "\n").map_err(|cause| TaesdError::Io { path: config.clone(), cause })?;
            written.push(config);
        }
        Layout::ComfyUi | Layout::Combined => {
            let mut all: Vec<_> = parts.iter().flat_map(|(p, t)| rename(*p, t)).collect();
            if layout == Layout::ComfyUi {
                if let Some(s) = opts
                    .vae_scaling
                    .or_else(|| opts.variant.or_else(|| cfg.unique_variant()).and_then(|v| v.vae_scaling()))
                {
                    let dev = candle_core::Device::Cpu;
                    let scalar = |x: f64| Tensor::new(x as f32, &dev).ctx(|| "vae_scale".into());
                    all.push((COMFY_VAE_SCALE.to_string(), scalar(s.scale)?));
                    all.push((COMFY_VAE_SHIFT.to_string(), scalar(s.shift)?));
                }
            }
            write(dest, all)?;
            written.push(dest.to_path_buf());
        }
    }
    Ok(written)
}

/// Save a `VarMap` built by [`crate::Taesd::new`] (see [`save_tensors`]).
pub fn save_varmap(
    varmap: &VarMap,
    cfg: &TaesdConfig,
    layout: Layout,
    dest: impl AsRef<Path>,
    opts: &SaveOptions,
) -> Result<Vec<PathBuf>> {
    save_tensors(&varmap_tensors(varmap), cfg, layout, dest, opts)
}

impl Checkpoint {
    /// Save in `layout` (see [`save_tensors`]); the checkpoint's variant and ComfyUI scaling
    /// fill what `opts` leaves out.
    pub fn save(&self, layout: Layout, dest: impl AsRef<Path>, opts: &SaveOptions) -> Result<Vec<PathBuf>> {
        let opts = SaveOptions {
            variant: opts.variant.or(self.info.variant),
            dtype: opts.dtype,
            vae_scaling: opts.vae_scaling.or(self.info.vae_scaling),
            format: opts.format,
        };
        save_tensors(&self.tensors, &self.info.config, layout, dest, &opts)
    }
}

/// diffusers `AutoencoderTiny` config.json for a structure it supports. Latents are TAESD's
/// (already scaled), so `scaling_factor` is 1 and `shift_factor` 0, as in madebyollin's repos.
pub fn diffusers_config(cfg: &TaesdConfig) -> serde_json::Value {
    serde_json::json!({
        "_class_name": "AutoencoderTiny",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "relu",
        "decoder_block_out_channels": [64, 64, 64, 64],
        "encoder_block_out_channels": [64, 64, 64, 64],
        "force_upcast": false,
        "in_channels": 3,
        "latent_channels": cfg.latent_channels,
        "latent_magnitude": 3,
        "latent_shift": 0.5,
        "num_decoder_blocks": [3, 3, 3, 1],
        "num_encoder_blocks": [1, 3, 3, 3],
        "out_channels": 3,
        "scaling_factor": 1.0,
        "shift_factor": 0.0,
        "upsample_fn": "nearest",
        "upsampling_scaling_factor": 2
    })
}

fn write_safetensors(path: &Path, tensors: Vec<(String, Tensor)>, metadata: &HashMap<String, String>) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|cause| TaesdError::Io { path: dir.to_path_buf(), cause })?;
    }
    let tensors = tensors
        .into_iter()
        .map(|(n, t)| t.contiguous().map(|t| (n.clone(), t)).ctx(|| n.clone()))
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(tensors, Some(metadata.clone()), path)
        .map_err(|cause| TaesdError::Write { path: path.to_path_buf(), cause })
}
