//! `precompute inspect DIR`: what is in an output folder, and a quick check of the latent scale
//! (TAESD latents of a well-scaled VAE have per-channel std near 1, mean near 0).
//!
//! A folder of parts (`--part i/N`) reads as one set: the rows of every part, and the parts that
//! are missing or unfinished named (`part 3/8 missing`, `part 5/8 in progress (412 of 1000 inputs)`).

use crate::output::read_manifest;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use taesd_data::{OutputLayout, PartsFolder, ShardReader};
use taesd_schemas::Manifest;

pub struct ChannelStats {
    pub mean: f64,
    pub std: f64,
}

pub struct InspectReport {
    pub manifest: Manifest,
    pub schema: String,
    pub rows: u64,
    pub rows_read: u64,
    pub latent_shape: Option<[u32; 3]>,
    pub channels: Vec<ChannelStats>,
    pub errors_by_reason: BTreeMap<String, u64>,
    /// A folder of parts: each part's state (the manifest above is then their sum).
    pub parts: Option<PartsFolder>,
}

/// The manifests of a folder of parts as one: the first part's settings, every part's shards (in
/// the set's order), the counts summed; status `complete` only when every part is.
fn combined_manifest(f: &PartsFolder) -> Result<Manifest> {
    f.check_settings()?;
    let mut m = f
        .first_manifest()
        .cloned()
        .with_context(|| format!("{}: no part has a manifest yet ({})", f.root.display(), f.summary()))?;
    let all: Vec<&Manifest> = f.parts.iter().filter_map(|p| p.manifest.as_ref()).collect();
    m.shards = all.iter().flat_map(|p| p.shards.iter().cloned()).collect();
    m.shards_total = all.iter().map(|p| p.shards_total).sum();
    m.inputs_total = all.iter().map(|p| p.inputs_total).sum();
    m.rows = all.iter().map(|p| p.rows).sum();
    m.errors = all.iter().map(|p| p.errors).sum();
    m.upscaled_rows = all.iter().map(|p| p.upscaled_rows).sum();
    m.removed_inputs = all.iter().flat_map(|p| p.removed_inputs.iter().cloned()).collect();
    m.changed_inputs = all.iter().flat_map(|p| p.changed_inputs.iter().cloned()).collect();
    m.status = if f.problems().is_empty() { "complete".into() } else { "incomplete".into() };
    m.part = None;
    Ok(m)
}

/// The Arrow schema of a shard file as `name: type` pairs.
fn file_schema(path: &Path) -> Result<String> {
    let f = std::fs::File::open(path)?;
    let b = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)?;
    Ok(b.schema().fields().iter().map(|f| format!("{}: {}", f.name(), f.data_type())).collect::<Vec<_>>().join(", "))
}

/// Inspect an output folder (`OUT`, or its `OUT/data`; old folders with the shards beside the
/// manifest too).
pub fn inspect(dir: &Path, max_rows: u64) -> Result<InspectReport> {
    let parts = PartsFolder::read(dir)?;
    let (root, manifest) = match &parts {
        Some(f) => (f.root.clone(), combined_manifest(f)?),
        None => {
            let layout = OutputLayout::locate(dir);
            let m = read_manifest(&layout.root)?;
            (layout.root, m)
        }
    };
    let dir = root.as_path();
    let mut schema = String::new();
    let mut rows = 0u64;
    let mut rows_read = 0u64;
    let mut latent_shape = None;
    let mut sums: Vec<(f64, f64, u64)> = Vec::new();
    let mut errors_by_reason = BTreeMap::new();
    for s in &manifest.shards {
        let path = dir.join(&s.file);
        let reader = ShardReader::open(&path).with_context(|| format!("shard {}", path.display()))?;
        rows += reader.num_rows();
        if schema.is_empty() {
            schema = file_schema(&path)?;
        }
        for e in &reader.meta().errors {
            *errors_by_reason.entry(format!("{}: {}", e.stage, e.reason)).or_insert(0) += 1;
        }
        for row in reader.latents()? {
            if max_rows > 0 && rows_read >= max_rows {
                break;
            }
            let row = row?;
            let [c, h, w] = row.latent_shape;
            latent_shape.get_or_insert(row.latent_shape);
            let hw = (h * w) as usize;
            if sums.is_empty() {
                sums = vec![(0.0, 0.0, 0); c as usize];
            }
            for (ch, acc) in sums.iter_mut().enumerate().take(c as usize) {
                for &v in &row.latent[ch * hw..(ch + 1) * hw] {
                    acc.0 += v as f64;
                    acc.1 += (v as f64) * (v as f64);
                }
                acc.2 += hw as u64;
            }
            rows_read += 1;
        }
    }
    let channels = sums
        .iter()
        .map(|&(s, s2, n)| {
            let n = n.max(1) as f64;
            let mean = s / n;
            ChannelStats { mean, std: (s2 / n - mean * mean).max(0.0).sqrt() }
        })
        .collect();
    Ok(InspectReport { manifest, schema, rows, rows_read, latent_shape, channels, errors_by_reason, parts })
}

impl InspectReport {
    pub fn print(&self) {
        let m = &self.manifest;
        let c = &m.config;
        println!("status        {} ({} of {} shards)", m.status, m.shards.len(), m.shards_total);
        if let Some(f) = &self.parts {
            println!("parts         {}", f.summary());
        }
        println!(
            "vae           {} ({} ch, scale {}, shift {}, input {}, onnx sha256 {}...)",
            c.vae.name,
            c.vae.channels,
            c.vae.scaling.scale,
            c.vae.scaling.shift,
            c.vae.input_range.as_str(),
            &c.onnx_sha256[..12.min(c.onnx_sha256.len())]
        );
        println!(
            "crops         {}x{}, {} variant(s), hflip {}, color augment {}, seed {}, images {}, latents {}",
            c.resolution,
            c.resolution,
            c.variants,
            c.hflip,
            c.color_augment,
            c.seed,
            c.image_format.as_str(),
            c.latent_dtype.as_str()
        );
        println!("inputs        {} from {}", m.inputs_total, m.inputs_root);
        if !m.removed_inputs.is_empty() {
            println!(
                "removed       {} input(s) encoded earlier, no longer under the input folder (rows kept)",
                m.removed_inputs.len()
            );
        }
        if !m.changed_inputs.is_empty() {
            println!(
                "changed       {} input(s) changed size after they were encoded (rows of the old files)",
                m.changed_inputs.len()
            );
        }
        println!("rows          {}", self.rows);
        println!("upscaled      {} rows (crops smaller than {} px, enlarged)", m.upscaled_rows, c.resolution);
        if let Some(s) = self.latent_shape {
            println!("latent shape  {:?}", s);
        }
        println!("schema        {}", self.schema);
        if !self.channels.is_empty() {
            println!("latent statistics over {} rows (TAESD scale: expect mean ~0, std ~1):", self.rows_read);
            for (i, ch) in self.channels.iter().enumerate() {
                println!("  ch {i:>2}  mean {:+.4}  std {:.4}", ch.mean, ch.std);
            }
            let mean_std = self.channels.iter().map(|c| c.std).sum::<f64>() / self.channels.len() as f64;
            println!("  all    mean std {mean_std:.4}");
        }
        let total: u64 = self.errors_by_reason.values().sum();
        println!("errors        {total}");
        for (reason, n) in &self.errors_by_reason {
            println!("  {n:>5} x {reason}");
        }
    }
}
