//! Exports for the tools people run TAESD in, beside the checkpoint layouts of
//! [`crate::convert`]: `train export --format onnx|pth`, and the run's own `export/` (the
//! `onnx` entry of `run.export`, the `.pth` pair beside the taesd-layout safetensors).
//!
//! | format | files | for |
//! |---|---|---|
//! | `pth` | `<variant>_encoder.pth`, `<variant>_decoder.pth` | taesd.py's `TAESD(encoder_path, decoder_path)`; ComfyUI's `models/vae_approx/` |
//! | `onnx` | `<variant>_{encoder,decoder}.onnx` (float32), `.fp16.onnx` (float16) | ONNX Runtime, web demos; `precompute --onnx` as a teacher |

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use taesd::onnx::{OnnxOptions, Precision};
use taesd::{FileFormat, Layout, SaveOptions, TaesdConfig, Variant};

/// `run.export` entries that are formats rather than checkpoint layouts.
pub const RUN_FORMATS: [&str; 1] = ["onnx"];

/// What `train export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// taesd.py's `.pth` pair.
    Pth,
    /// ONNX encoder and decoder.
    Onnx,
}

impl ExportFormat {
    pub fn parse(s: &str) -> Result<ExportFormat> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "pth" | "pt" | "torch" => ExportFormat::Pth,
            "onnx" => ExportFormat::Onnx,
            other => bail!("--format {other}: use onnx or pth (checkpoint layouts: train convert)"),
        })
    }
}

/// `--dtype` of an export: f32 (default) or f16.
pub fn parse_precision(s: &str) -> Result<Precision> {
    Ok(match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" => Precision::F32,
        "f16" | "fp16" | "float16" | "half" => Precision::F16,
        other => bail!("--dtype {other}: use f32 or f16"),
    })
}

pub struct ExportArgs {
    pub model: PathBuf,
    pub variant: Option<Variant>,
    pub format: ExportFormat,
    /// Folder (created).
    pub out: PathBuf,
    pub precision: Precision,
}

/// `train export`: returns the files written.
pub fn run(a: &ExportArgs) -> Result<Vec<PathBuf>> {
    let ck = crate::models::load_checkpoint(&a.model, a.variant)?;
    let variant = a.variant.or(ck.info.variant);
    std::fs::create_dir_all(&a.out).with_context(|| format!("cannot create {}", a.out.display()))?;
    match a.format {
        ExportFormat::Onnx => {
            let opts = OnnxOptions { precision: a.precision, variant };
            taesd::onnx::save_onnx(&ck.tensors, &ck.info.config, &a.out, &opts)
                .with_context(|| format!("exporting {} as ONNX", a.model.display()))
        }
        ExportFormat::Pth => {
            let dtype = match a.precision {
                Precision::F32 => None,
                Precision::F16 => Some(candle_core::DType::F16),
            };
            let opts = SaveOptions { variant, dtype, format: FileFormat::Pth, ..Default::default() };
            ck.save(Layout::TaesdPy, &a.out, &opts).with_context(|| format!("exporting {} as .pth", a.model.display()))
        }
    }
}

/// The `.pth` pair of `tensors` (this crate's names) in the folder `dir`, beside the
/// taesd-layout safetensors of a run's export.
pub fn pth_files(
    tensors: &HashMap<String, Tensor>,
    cfg: TaesdConfig,
    variant: Option<Variant>,
    dir: &Path,
) -> Result<Vec<PathBuf>> {
    let opts = SaveOptions { variant, format: FileFormat::Pth, ..Default::default() };
    Ok(taesd::save_tensors(tensors, &cfg, Layout::TaesdPy, dir, &opts)?)
}

/// A `run.export` entry of [`RUN_FORMATS`] into `run_dir/export/<entry>/` (written into a
/// temporary folder first, then renamed into place). `onnx`: float32 and float16 files.
pub fn run_export(
    entry: &str,
    tensors: &HashMap<String, Tensor>,
    cfg: TaesdConfig,
    variant: Option<Variant>,
    run_dir: &Path,
) -> Result<Vec<PathBuf>> {
    if entry != "onnx" {
        bail!("run.export: unknown entry `{entry}`");
    }
    let export = run_dir.join("export");
    let final_dir = export.join(entry);
    let tmp = export.join(format!(".tmp-{entry}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    let mut names = Vec::new();
    for precision in [Precision::F32, Precision::F16] {
        let opts = OnnxOptions { precision, variant };
        let written = taesd::onnx::save_onnx(tensors, &cfg, &tmp, &opts).context("exporting ONNX")?;
        names.extend(written.iter().filter_map(|p| p.file_name().map(|n| n.to_owned())));
    }
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).with_context(|| format!("cannot replace {}", final_dir.display()))?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), final_dir.display()))?;
    Ok(names.into_iter().map(|n| final_dir.join(n)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    #[test]
    fn run_export_writes_both_precisions_and_pth_beside() {
        let cfg = Variant::Taesd.config();
        let vm = VarMap::new();
        taesd::Taesd::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        let t = taesd::varmap_tensors(&vm);
        let dir = tempfile::tempdir().unwrap();
        let files = run_export("onnx", &t, cfg, Some(Variant::Taesdxl), dir.path()).unwrap();
        let names: Vec<String> = files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(
            names,
            ["taesdxl_encoder.onnx", "taesdxl_decoder.onnx", "taesdxl_encoder.fp16.onnx", "taesdxl_decoder.fp16.onnx"]
        );
        assert!(files.iter().all(|f| f.is_file() && f.starts_with(dir.path().join("export/onnx"))));
        assert!(!dir.path().join("export/.tmp-onnx").exists());
        // Again: replaced in place.
        assert_eq!(run_export("onnx", &t, cfg, Some(Variant::Taesdxl), dir.path()).unwrap().len(), 4);
        assert!(run_export("tflite", &t, cfg, None, dir.path()).is_err());

        let pth = pth_files(&t, cfg, Some(Variant::Taesdxl), dir.path()).unwrap();
        assert_eq!(pth, [dir.path().join("taesdxl_encoder.pth"), dir.path().join("taesdxl_decoder.pth")]);
        let back = taesd::load_checkpoints(&pth, None).unwrap();
        assert_eq!(back.info.variant, Some(Variant::Taesdxl), "named by the file");
        assert_eq!(back.tensors.len(), t.len());
        assert_eq!(ExportFormat::parse("ONNX").unwrap(), ExportFormat::Onnx);
        assert!(ExportFormat::parse("diffusers").is_err());
        assert_eq!(parse_precision("fp16").unwrap(), Precision::F16);
    }
}
