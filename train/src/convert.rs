//! `train convert`: a checkpoint in one layout to another (taesd.py, diffusers, ComfyUI,
//! combined), optionally in another dtype.

use anyhow::{bail, Context, Result};
use candle_core::DType;
use std::path::{Path, PathBuf};
use taesd::{Layout, SaveOptions, Variant};

pub struct ConvertArgs {
    pub model: PathBuf,
    pub variant: Option<Variant>,
    pub layout: Layout,
    pub out: PathBuf,
    pub dtype: Option<DType>,
}

pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" | "fp32" => DType::F32,
        "f16" | "float16" | "fp16" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        other => bail!("--dtype {other}: use f32, f16 or bf16"),
    })
}

/// Where the files go: `taesd` and `diffusers` write into the folder `out` (created); the
/// single-file layouts write the file `out` (or `<out>/<variant>.safetensors` when `out` is a
/// folder).
pub fn destination(layout: Layout, out: &Path, name: &str) -> Result<PathBuf> {
    match layout {
        Layout::TaesdPy | Layout::Diffusers => {
            std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
            Ok(out.to_path_buf())
        }
        Layout::ComfyUi | Layout::Combined => {
            if out.is_dir() {
                Ok(out.join(format!("{name}.safetensors")))
            } else {
                Ok(out.to_path_buf())
            }
        }
    }
}

pub fn run(a: &ConvertArgs) -> Result<Vec<PathBuf>> {
    let ck = crate::models::load_checkpoint(&a.model, a.variant)?;
    let name = ck.info.variant.map(|v| v.name().to_string()).unwrap_or_else(|| "taesd".into());
    let dest = destination(a.layout, &a.out, &name)?;
    let opts = SaveOptions { variant: a.variant.or(ck.info.variant), dtype: a.dtype, ..Default::default() };
    ck.save(a.layout, &dest, &opts)
        .with_context(|| format!("converting {} to the {} layout", a.model.display(), a.layout))
}
