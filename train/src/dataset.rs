//! A folder of shards opened for training: consistency checks across shards, the manifest's
//! settings, and the list of row groups (the unit the loader reads and shuffles).
//!
//! A folder of `precompute --part I/N` parts is one set: the shards of part 0, then part 1, ...
//! ([`taesd_data::PartsFolder`]); a missing or unfinished part is an error naming it, unless
//! `data.allow_partial`.

use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use taesd_data::{OutputLayout, PartsFolder, ShardReader, ShardRow};
use taesd_schemas::shard::MANIFEST_FILE;
use taesd_schemas::{Manifest, VaeSpec};

/// One row group of one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unit {
    pub shard: u32,
    pub group: u32,
    pub rows: u32,
}

/// The shards of a `precompute` output folder.
#[derive(Debug)]
pub struct ShardSet {
    pub dir: PathBuf,
    pub readers: Vec<ShardReader>,
    /// `manifest.json`, when the folder has one.
    pub manifest: Option<Manifest>,
    pub vae: VaeSpec,
    /// Side of the stored square images.
    pub resolution: u32,
    /// `[C, h, w]` of every stored latent.
    pub latent_shape: [u32; 3],
    /// `precompute --hflip` mirrored the crops already.
    pub flipped: bool,
    pub units: Vec<Unit>,
    pub rows: u64,
    /// `data.skip_bad_rows`: row groups that cannot be read (and rows whose image does not
    /// decode, in the loader) are skipped with a warning instead of being an error.
    pub skip_bad_rows: bool,
}

impl ShardSet {
    /// Open every `shard-*.parquet` of the precompute output `dir` (in `dir/data/`, or beside the
    /// manifest in folders written before that layout; `dir` may also be the `data` folder) and
    /// check they hold one kind of data. A folder of parts must be complete.
    pub fn open(dir: &Path) -> Result<ShardSet> {
        ShardSet::open_with(dir, false)
    }

    /// [`ShardSet::open`]; `allow_partial` takes a folder of parts with parts missing or
    /// unfinished (their shards present so far), with a warning naming them.
    pub fn open_with(dir: &Path, allow_partial: bool) -> Result<ShardSet> {
        ensure!(dir.is_dir(), "shard folder {} does not exist (run `precompute --out` first)", dir.display());
        if let Some(parts) = PartsFolder::read(dir)? {
            parts.check_settings()?;
            let problems = parts.problems();
            if !problems.is_empty() {
                ensure!(
                    allow_partial,
                    "{}: the parts are not all finished: {}; run or finish them (`precompute --part I/{}` resumes), or train on the parts present with --set data.allow_partial=true",
                    parts.root.display(),
                    problems.join(", "),
                    parts.count
                );
                tracing::warn!(
                    "{}: training on the parts present (data.allow_partial): {}",
                    parts.root.display(),
                    problems.join(", ")
                );
            }
            let manifest = parts.first_manifest().cloned();
            return ShardSet::from_files(dir, parts.shard_files(), manifest, &parts.root);
        }
        let layout = OutputLayout::locate(dir);
        let files = layout.shard_files()?;
        ensure!(
            !files.is_empty(),
            "{} holds no shards (no {}/shard-*.parquet, nor shard-*.parquet beside a manifest)",
            dir.display(),
            taesd_schemas::shard::DATA_DIR
        );
        let manifest_path = layout.root.join(MANIFEST_FILE);
        let manifest: Option<Manifest> = if manifest_path.is_file() {
            let bytes =
                std::fs::read(&manifest_path).with_context(|| format!("cannot read {}", manifest_path.display()))?;
            Some(
                serde_json::from_slice(&bytes)
                    .with_context(|| format!("{} is not a valid manifest", manifest_path.display()))?,
            )
        } else {
            tracing::warn!("{} has no {MANIFEST_FILE}: assuming the shards were not flipped", dir.display());
            None
        };
        if let Some(m) = &manifest {
            if m.status != "complete" {
                tracing::warn!(
                    "{}: precompute has not finished (status {}); training on the shards present",
                    dir.display(),
                    m.status
                );
            }
        }
        ShardSet::from_files(dir, files, manifest, &manifest_path)
    }

    /// The set of `files` (in this order) with the manifest that describes them (`manifest_at`
    /// names it in errors).
    fn from_files(dir: &Path, files: Vec<PathBuf>, manifest: Option<Manifest>, manifest_at: &Path) -> Result<ShardSet> {
        ensure!(!files.is_empty(), "{} holds no finished shards yet", dir.display());
        let mut readers = Vec::with_capacity(files.len());
        for f in &files {
            readers.push(ShardReader::open(f)?);
        }
        let first = readers[0].meta().clone();
        for r in &readers[1..] {
            let m = r.meta();
            let what = if m.vae != first.vae {
                Some(format!("VAE {:?} vs {:?}", m.vae.name, first.vae.name))
            } else if m.onnx_sha256 != first.onnx_sha256 {
                Some("teacher ONNX sha256".to_string())
            } else if m.resolution != first.resolution {
                Some(format!("resolution {} vs {}", m.resolution, first.resolution))
            } else {
                None
            };
            if let Some(w) = what {
                bail!(
                    "{} and {} were written with different settings ({w}); keep one precompute output per folder",
                    r.path().display(),
                    readers[0].path().display()
                );
            }
        }
        if let Some(m) = &manifest {
            ensure!(
                m.config.vae == first.vae && m.config.resolution == first.resolution,
                "{} disagrees with the shards' metadata (VAE or resolution)",
                manifest_at.display()
            );
        }
        let d = first.vae.downscale as u32;
        ensure!(
            d > 0 && first.resolution % d == 0,
            "resolution {} is not a multiple of the VAE downscale {d}",
            first.resolution
        );
        let latent_shape = [first.vae.channels as u32, first.resolution / d, first.resolution / d];
        let mut units = Vec::new();
        let mut rows = 0;
        for (s, r) in readers.iter().enumerate() {
            for g in 0..r.num_row_groups() {
                let n = r.row_group_num_rows(g).unwrap_or(0) as u32;
                if n > 0 {
                    units.push(Unit { shard: s as u32, group: g as u32, rows: n });
                    rows += n as u64;
                }
            }
        }
        ensure!(rows > 0, "{} holds shards but no rows", dir.display());
        Ok(ShardSet {
            dir: dir.to_path_buf(),
            flipped: manifest.as_ref().is_some_and(|m| m.config.hflip),
            manifest,
            vae: first.vae,
            resolution: first.resolution,
            latent_shape,
            readers,
            units,
            rows,
            skip_bad_rows: false,
        })
    }

    /// The TAESD variant the shards were made for (manifest / shard metadata `taesd_variant`).
    pub fn variant_name(&self) -> Option<&str> {
        self.vae.taesd_variant.as_deref()
    }

    /// The rows of one unit, checked against the set's shapes.
    pub fn read_unit(&self, unit: usize) -> Result<Vec<ShardRow>> {
        let u = self.units[unit];
        let reader = &self.readers[u.shard as usize];
        let rows = reader.read_row_group(u.group as usize)?;
        ensure!(
            rows.len() == u.rows as usize,
            "shard {}: row group {} has {} rows, its footer says {}",
            reader.path().display(),
            u.group,
            rows.len(),
            u.rows
        );
        for r in &rows {
            self.check_row(r).with_context(|| format!("shard {} row group {}", reader.path().display(), u.group))?;
        }
        Ok(rows)
    }

    fn check_row(&self, r: &ShardRow) -> Result<()> {
        ensure!(
            r.width == self.resolution && r.height == self.resolution,
            "row `{}` is {}x{}, the shards' resolution is {}",
            r.key,
            r.width,
            r.height,
            self.resolution
        );
        ensure!(
            r.latent_shape == self.latent_shape,
            "row `{}` has latent shape {:?}, expected {:?}",
            r.key,
            r.latent_shape,
            self.latent_shape
        );
        Ok(())
    }

    /// Every row in file order (shards by name, row groups in order), one unit in memory at a
    /// time; `f` returns false to stop. An unreadable row group is an error, or skipped with a
    /// warning when [`ShardSet::skip_bad_rows`].
    pub fn scan(&self, mut f: impl FnMut(ShardRow) -> Result<bool>) -> Result<()> {
        for u in 0..self.units.len() {
            let rows = match self.read_unit(u) {
                Ok(rows) => rows,
                Err(e) if self.skip_bad_rows => {
                    tracing::warn!("skipping an unreadable row group (data.skip_bad_rows): {e:#}");
                    continue;
                }
                Err(e) => return Err(e.context("bad data (set data.skip_bad_rows = true to skip it)")),
            };
            for r in rows {
                if !f(r)? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}
