//! What a run writes besides its checkpoints: evaluations, previews, exports.

use super::resolve::Resolved;
use crate::eval::{evaluate, EvalSet, Metrics, Subject};
use crate::recipe::Recipe;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use taesd::Layout;

pub(super) fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Models evaluated in a run, by name.
pub(super) fn run_eval(
    recipe: &Recipe,
    set: &EvalSet,
    reference: Option<&taesd::Decoder>,
    cycle: Option<&taesd::Encoder>,
    batch: usize,
    device: &Device,
    with_reference: bool,
) -> Result<Vec<(String, Metrics)>> {
    let mut out = Vec::new();
    let (ee, ed) = (recipe.ema_encoder()?, recipe.ema_decoder()?);
    let s = Subject { encoder: ee.as_ref(), decoder: ed.as_ref(), cycle_encoder: cycle };
    out.push(("ema".to_string(), evaluate(set, &s, batch, device)?));
    for p in recipe.ema_probes()? {
        let s = Subject { encoder: p.encoder.as_ref(), decoder: p.decoder.as_ref(), cycle_encoder: cycle };
        out.push((p.name, evaluate(set, &s, batch, device)?));
    }
    let (re, rd) = (recipe.encoder()?, recipe.decoder()?);
    let s = Subject { encoder: re.as_ref(), decoder: rd.as_ref(), cycle_encoder: cycle };
    out.push(("raw".to_string(), evaluate(set, &s, batch, device)?));
    if let (Some(r), true) = (reference, with_reference) {
        let s = Subject { encoder: None, decoder: Some(r), cycle_encoder: cycle.or(ee.as_ref()) };
        out.push(("reference".to_string(), evaluate(set, &s, batch, device)?));
    }
    Ok(out)
}

/// Write a preview grid of the fixed preview samples.
pub(super) fn write_preview(
    recipe: &Recipe,
    samples: &(Tensor, Tensor),
    reference: Option<&taesd::Decoder>,
    path: &Path,
) -> Result<()> {
    let (enc, dec) = (recipe.ema_encoder()?, recipe.ema_decoder()?);
    let m = crate::preview::PreviewModels { encoder: enc.as_ref(), decoder: dec.as_ref(), reference };
    crate::preview::write(path, &samples.0, &samples.1, &m)
}

/// Export the EMA weights in each configured layout under `export/`, and say in
/// `export/export.json` which step they are of.
pub(super) fn export(recipe: &Recipe, r: &Resolved, run_dir: &Path, step: u64) -> Result<(Vec<PathBuf>, Vec<String>)> {
    let mut files = Vec::new();
    let mut notes = Vec::new();
    if r.config.run.export.is_empty() {
        // `run.export = []`: no exports, and no export.json claiming some.
        return Ok((files, notes));
    }
    let name = r.variant.map(|v| v.name().to_string()).unwrap_or_else(|| format!("taesd-c{}", r.model.latent_channels));
    for l in &r.config.run.export {
        let Some(layout) = Layout::parse(l) else {
            // A format beside the layouts (`onnx`): crate::export.
            files.extend(crate::export::run_export(l, &recipe.ema_tensors()?, r.model, r.variant, run_dir)?);
            continue;
        };
        if layout == Layout::Diffusers && !r.model.diffusers_supported() {
            notes.push(format!("diffusers export skipped: AutoencoderTiny cannot hold {}", r.model.describe()));
            continue;
        }
        let final_dir = crate::models::export_dir(run_dir, layout);
        let tmp = run_dir.join("export").join(format!(".tmp-{}", layout.name()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let dest = match layout {
            Layout::TaesdPy | Layout::Diffusers => tmp.clone(),
            Layout::ComfyUi | Layout::Combined => tmp.join(format!("{name}.safetensors")),
        };
        let mut written =
            recipe.export(layout, &dest, r.variant).with_context(|| format!("exporting the {layout} layout"))?;
        if layout == Layout::TaesdPy {
            // The same pair as .pth: what taesd.py and ComfyUI's vae_approx folder load.
            written.extend(crate::export::pth_files(&recipe.ema_tensors()?, r.model, r.variant, &tmp)?);
        }
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).with_context(|| format!("cannot replace {}", final_dir.display()))?;
        }
        std::fs::rename(&tmp, &final_dir)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), final_dir.display()))?;
        files.extend(written.iter().map(|p| final_dir.join(p.strip_prefix(&tmp).unwrap_or(p))));
    }
    let info = crate::models::ExportInfo { step, files: files.clone() };
    write_atomic(&run_dir.join("export").join(crate::models::EXPORT_INFO), &serde_json::to_string_pretty(&info)?)?;
    Ok((files, notes))
}
