//! The output folder: its manifest, which shards are done, and the refusal to mix settings.
//!
//! A shard is done exactly when its final file name exists: shards are written under a temporary
//! name and renamed when complete, so a run killed at any moment leaves only finished shards and
//! temp files (deleted on the next run). The manifest is derived from the shard files and
//! rewritten atomically; each shard carries its own errors in its Parquet metadata.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use taesd_data::ShardReader;
use taesd_schemas::shard::{shard_file_name, ERRORS_FILE, MANIFEST_FILE};
use taesd_schemas::{ErrorRecord, Manifest, OutputConfig, ShardEntry, SCHEMA_VERSION};

pub struct OutputDir {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// What defines the inputs of a run, for the manifest and the resume check.
pub struct InputsInfo {
    pub root: String,
    pub total: u64,
    pub fingerprint: String,
}

impl OutputDir {
    /// Open `dir` for a run with `config`: create it, or check that what is there was made with
    /// the same settings and inputs. Leftover temp files of a killed run are removed.
    pub fn open(dir: &Path, config: &OutputConfig, inputs: &InputsInfo, onnx_path: &Path, shards_total: u32) -> Result<OutputDir> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create output folder {}", dir.display()))?;
        let mpath = dir.join(MANIFEST_FILE);
        let manifest = if mpath.exists() {
            let m = read_manifest(dir)?;
            let diffs = m.config.differences(config);
            if !diffs.is_empty() {
                bail!(
                    "{} was written with other settings; refusing to mix them into one output (write to a new --out):\n  {}",
                    dir.display(),
                    diffs.join("\n  ")
                );
            }
            if m.inputs_fingerprint != inputs.fingerprint {
                bail!(
                    "the inputs changed since {} was started ({} inputs then, {} now, or different files); refusing to mix them (write to a new --out)",
                    dir.display(),
                    m.inputs_total,
                    inputs.total
                );
            }
            m
        } else {
            let stray: Vec<_> = std::fs::read_dir(dir)?
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".parquet"))
                .collect();
            if !stray.is_empty() {
                bail!("{} holds .parquet files but no {MANIFEST_FILE}; refusing to write into it (use an empty or new --out)", dir.display());
            }
            Manifest {
                schema_version: SCHEMA_VERSION,
                tool: format!("precompute {}", env!("CARGO_PKG_VERSION")),
                status: "in_progress".into(),
                config: config.clone(),
                onnx_path: onnx_path.display().to_string(),
                inputs_root: inputs.root.clone(),
                inputs_total: inputs.total,
                inputs_fingerprint: inputs.fingerprint.clone(),
                shards_total,
                shards: vec![],
                rows: 0,
                errors: 0,
                extra: Default::default(),
            }
        };
        for e in std::fs::read_dir(dir)?.filter_map(|e| e.ok()) {
            if e.file_name().to_string_lossy().contains(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let mut out = OutputDir { dir: dir.to_path_buf(), manifest };
        out.rescan()?;
        out.save()?;
        Ok(out)
    }

    /// Rebuild the shard list from the shard files present (the source of truth).
    pub fn rescan(&mut self) -> Result<()> {
        let mut shards = Vec::new();
        for i in 0..self.manifest.shards_total {
            let p = self.shard_path(i);
            if p.exists() {
                let r = ShardReader::open(&p).with_context(|| format!("finished shard {} is unreadable; delete it to redo it", p.display()))?;
                shards.push(ShardEntry {
                    file: shard_file_name(i),
                    index: i,
                    rows: r.num_rows(),
                    inputs: self.shard_inputs(i),
                    errors: r.meta().errors.len() as u64,
                });
            }
        }
        self.manifest.shards = shards;
        self.recount();
        Ok(())
    }

    /// Inputs shard `index` covers: shard i holds inputs [i*k, (i+1)*k) of the sorted list.
    pub fn shard_inputs(&self, index: u32) -> u64 {
        let k = self.manifest.config.inputs_per_shard as u64;
        self.manifest.inputs_total.saturating_sub(index as u64 * k).min(k)
    }

    fn recount(&mut self) {
        self.manifest.rows = self.manifest.shards.iter().map(|s| s.rows).sum();
        self.manifest.errors = self.manifest.shards.iter().map(|s| s.errors).sum();
    }

    pub fn shard_path(&self, index: u32) -> PathBuf {
        self.dir.join(shard_file_name(index))
    }

    pub fn is_done(&self, index: u32) -> bool {
        self.manifest.shards.iter().any(|s| s.index == index)
    }

    /// Record a shard that was just renamed into place.
    pub fn add_shard(&mut self, entry: ShardEntry) -> Result<()> {
        self.manifest.shards.retain(|s| s.index != entry.index);
        self.manifest.shards.push(entry);
        self.manifest.shards.sort_by_key(|s| s.index);
        self.recount();
        self.save()
    }

    /// Write the manifest atomically.
    pub fn save(&self) -> Result<()> {
        let json = serde_json::to_vec_pretty(&self.manifest)?;
        write_atomic(&self.dir.join(MANIFEST_FILE), &json)
    }

    /// Mark complete when every shard is there, and write `errors.jsonl` from the shards' own
    /// records plus `extra_errors` (inputs that could not even be listed).
    pub fn finish(&mut self, extra_errors: &[ErrorRecord]) -> Result<Vec<ErrorRecord>> {
        let mut all = extra_errors.to_vec();
        for s in &self.manifest.shards {
            let r = ShardReader::open(&self.dir.join(&s.file))?;
            all.extend(r.meta().errors.iter().cloned());
        }
        let mut lines = Vec::new();
        for e in &all {
            lines.extend(serde_json::to_vec(e)?);
            lines.push(b'\n');
        }
        write_atomic(&self.dir.join(ERRORS_FILE), &lines)?;
        self.manifest.errors = all.len() as u64;
        if self.manifest.shards.len() as u32 == self.manifest.shards_total {
            self.manifest.status = "complete".into();
        }
        self.save()?;
        Ok(all)
    }
}

pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let p = dir.join(MANIFEST_FILE);
    let bytes = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let m: Manifest = serde_json::from_slice(&bytes).with_context(|| format!("{} is not a valid manifest", p.display()))?;
    if m.schema_version != SCHEMA_VERSION {
        bail!("{} has schema version {}, this build reads {SCHEMA_VERSION}", p.display(), m.schema_version);
    }
    Ok(m)
}

/// Write to a temp file in the same folder, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} into place", path.display()))?;
    Ok(())
}
