//! Finding and loading a model for the preview commands and evaluation: any checkpoint
//! `taesd::load_checkpoint` reads, a run folder (the newer of its export and its latest
//! checkpoint), or one of a run's checkpoints (its EMA weights).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};
use taesd::{Checkpoint, Taesd, Variant};

/// Where a run's final export in the taesd.py layout goes.
pub fn export_dir(run_dir: &Path, layout: taesd::Layout) -> PathBuf {
    run_dir.join("export").join(layout.name())
}

/// `export/export.json` of a run folder: which step the export holds.
pub const EXPORT_INFO: &str = "export.json";

/// What `export/export.json` says.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ExportInfo {
    /// The step whose EMA weights were exported.
    pub step: u64,
    pub files: Vec<PathBuf>,
}

/// The step of a run folder's export: from `export/export.json`, else (runs from before it
/// existed) unknown.
fn export_step(run_dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(run_dir.join("export").join(EXPORT_INFO)).ok()?;
    serde_json::from_str::<ExportInfo>(&text).ok().map(|i| i.step)
}

/// Which weights a run folder stands for: its latest checkpoint when that is newer than the
/// export (a run resumed and trained on, or stopped before its end), else the export.
pub fn run_model(run_dir: &Path) -> Result<PathBuf> {
    let export = export_dir(run_dir, taesd::Layout::TaesdPy);
    let latest = crate::checkpoint::latest(run_dir)?;
    match (export.is_dir(), latest) {
        (true, Some((step, ck))) => match export_step(run_dir) {
            Some(e) if e >= step => Ok(export),
            Some(_) => Ok(ck),
            // An export without its step: the newer folder wins.
            None => {
                let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
                Ok(if mtime(&ck) > mtime(&export) { ck } else { export })
            }
        },
        (true, None) => Ok(export),
        (false, Some((_, ck))) => Ok(ck),
        (false, None) => bail!("run folder {} has neither an export nor a checkpoint yet", run_dir.display()),
    }
}

/// The checkpoint files `path` stands for.
pub fn checkpoint_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_dir() {
        // A run folder: the newer of its export and its latest checkpoint.
        if path.join(crate::config::RESOLVED_CONFIG).is_file() {
            let m = run_model(path)?;
            tracing::info!("{}: using {}", path.display(), m.display());
            return if m.join(crate::checkpoint::RECIPE_DIR).is_dir() { checkpoint_files(&m) } else { Ok(vec![m]) };
        }
        // A checkpoint of a run: its EMA weights.
        let state = path.join(crate::checkpoint::RECIPE_DIR);
        if state.is_dir() {
            let files: Vec<PathBuf> =
                ["ema_encoder.safetensors", "ema_decoder.safetensors", "encoder.safetensors", "decoder.safetensors"]
                    .iter()
                    .map(|f| state.join(f))
                    .filter(|p| p.is_file())
                    .collect();
            let ema: Vec<PathBuf> = files
                .iter()
                .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("ema_"))
                .cloned()
                .collect();
            // Untrained parts have no EMA file: take the plain weights of those.
            let mut out = ema.clone();
            for part in ["encoder", "decoder"] {
                if !out.iter().any(|p| p.file_name().unwrap().to_string_lossy().contains(part)) {
                    if let Some(p) =
                        files.iter().find(|p| p.file_name().unwrap().to_string_lossy() == format!("{part}.safetensors"))
                    {
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
            None => bail!("unknown variant `{v}` ({})", Variant::names()),
        },
    }
}
