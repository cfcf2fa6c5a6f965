//! Finding and loading a model for the preview commands and evaluation: any checkpoint
//! `taesd::load_checkpoint` reads, a run folder (its final export), or one of a run's
//! checkpoints (its EMA weights).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};
use taesd::{Checkpoint, Taesd, Variant};

/// Where a run's final export in the taesd.py layout goes.
pub fn export_dir(run_dir: &Path, layout: taesd::Layout) -> PathBuf {
    run_dir.join("export").join(layout.name())
}

/// The checkpoint files `path` stands for.
pub fn checkpoint_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_dir() {
        // A run folder: its export, else its latest checkpoint.
        if path.join(crate::config::RESOLVED_CONFIG).is_file() {
            let export = export_dir(path, taesd::Layout::TaesdPy);
            if export.is_dir() {
                return Ok(vec![export]);
            }
            if let Some((_, ck)) = crate::checkpoint::latest(path)? {
                return checkpoint_files(&ck);
            }
            bail!("run folder {} has neither an export nor a checkpoint yet", path.display());
        }
        // A checkpoint of a run: its EMA weights.
        let state = path.join(crate::checkpoint::RECIPE_DIR);
        if state.is_dir() {
            let files: Vec<PathBuf> = ["ema_encoder.safetensors", "ema_decoder.safetensors", "encoder.safetensors", "decoder.safetensors"]
                .iter()
                .map(|f| state.join(f))
                .filter(|p| p.is_file())
                .collect();
            let ema: Vec<PathBuf> = files.iter().filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("ema_")).cloned().collect();
            // Untrained parts have no EMA file: take the plain weights of those.
            let mut out = ema.clone();
            for part in ["encoder", "decoder"] {
                if !out.iter().any(|p| p.file_name().unwrap().to_string_lossy().contains(part)) {
                    if let Some(p) = files.iter().find(|p| p.file_name().unwrap().to_string_lossy() == format!("{part}.safetensors")) {
                        out.push(p.clone());
                    }
                }
            }
            if out.is_empty() {
                bail!("checkpoint {} holds no model weights", path.display());
            }
            return Ok(out);
        }
    }
    Ok(vec![path.to_path_buf()])
}

/// Read and check a checkpoint (see [`checkpoint_files`]).
pub fn load_checkpoint(path: &Path, variant: Option<Variant>) -> Result<Checkpoint> {
    let files = checkpoint_files(path)?;
    let ck = if files.len() == 1 {
        taesd::load_checkpoint(&files[0], variant)
    } else {
        taesd::load_checkpoints(&files, variant)
    };
    ck.with_context(|| format!("loading model {}", path.display()))
}

/// Load a model in f32 on `device`.
pub fn load(path: &Path, variant: Option<Variant>, device: &Device) -> Result<Taesd> {
    let ck = load_checkpoint(path, variant)?;
    Taesd::from_checkpoint(&ck, DType::F32, device).with_context(|| format!("building model {}", path.display()))
}

/// Parse a `--variant` value.
pub fn parse_variant(s: Option<&str>) -> Result<Option<Variant>> {
    match s {
        None => Ok(None),
        Some(v) => match Variant::parse(v) {
            Some(v) => Ok(Some(v)),
            None => bail!("unknown variant `{v}` (taesd, taesdxl, taesd3, taef1, taef2, taesana)"),
        },
    }
}
