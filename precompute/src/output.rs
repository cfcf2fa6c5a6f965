//! The output folder: what its finished shards cover, the plan of a run (which inputs are new),
//! its manifest, and the refusal to mix settings.
//!
//! A shard is done exactly when its final file name exists: shards are written under a temporary
//! name (in the output folder, outside `data/`) and renamed into `data/` when complete, so a run
//! killed at any moment leaves only finished shards and temp files (deleted on the next run).
//! Each shard records in its Parquet footer the inputs it covers (`taesd.inputs`) and those of
//! them that gave no row, with the reason (`taesd.errors`); the manifest is derived from the
//! shard files and rewritten atomically.
//!
//! Nothing is written before everything that can be checked was checked ([`Existing::read`],
//! [`Existing::check_settings`] and the teacher are read-only): a run refused for its settings or
//! its ONNX file leaves the folder as it was. A folder with no finished shard may be restarted
//! with other settings.
//!
//! Incremental runs: a run encodes only the listed inputs that no finished shard covers, into
//! new shards numbered after the last one ([`plan`]); inputs covered but no longer listed (or
//! listed with another size) are reported in the summary and the manifest, and their rows stay.
//!
//! Parts (`--part i/N`): each part is such a folder of its own within the shared one (its own
//! manifest, errors file and shard names, [`OutputLayout::for_part`]), so everything above holds
//! per part; [`Existing::check_partition`] refuses a whole run into a folder of parts, a part into
//! a whole run's folder, parts of another N, and parts with other settings than those finished.

use anyhow::{bail, Context, Result};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use taesd_data::{is_temp_file, is_upscaled, read_manifest_file, InputItem, OutputLayout, PartsFolder, ShardReader};
use taesd_schemas::{ErrorRecord, InputRecord, Manifest, OutputConfig, Part, ShardEntry, SCHEMA_VERSION};

/// A finished shard of an output folder.
#[derive(Debug, Clone)]
pub struct Finished {
    pub entry: ShardEntry,
    /// The inputs it covers; the size is `None` for shards that do not record their inputs
    /// (written before incremental runs: their inputs are the rows' and errors' sources).
    pub inputs: Vec<(String, Option<u64>)>,
}

/// What an output folder holds before a run (read without writing anything).
#[derive(Debug)]
pub struct Existing {
    pub layout: OutputLayout,
    pub manifest: Option<Manifest>,
    /// Sorted by index.
    pub shards: Vec<Finished>,
}

impl Existing {
    /// Read what `dir` holds for a whole run (`part` None) or for part `part`: the manifest, and
    /// for each finished shard its counts and the inputs it covers. A shard that cannot be read is
    /// an error naming it.
    pub fn read(dir: &Path, part: Option<Part>) -> Result<Existing> {
        let layout = match part {
            None => OutputLayout::locate(dir),
            Some(p) => OutputLayout::for_part(dir, p),
        };
        if !dir.exists() {
            return Ok(Existing { layout, manifest: None, shards: vec![] });
        }
        if !dir.is_dir() {
            bail!("--out {} is a file, not a folder", dir.display());
        }
        let manifest =
            if layout.manifest_path().is_file() { Some(read_manifest_file(&layout.manifest_path())?) } else { None };
        if let (None, Some(part)) = (&manifest, layout.part) {
            if !layout.shard_files()?.is_empty() {
                bail!(
                    "{} holds shards of part {part} but not its manifest {}; refusing to write into it",
                    dir.display(),
                    layout.manifest_path().display()
                );
            }
        }
        if manifest.is_none() && layout.part.is_none() && PartsFolder::read(&layout.root)?.is_none() {
            let parquet_in = |d: &Path| {
                std::fs::read_dir(d)
                    .map(|r| r.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().ends_with(".parquet")))
                    .unwrap_or(false)
            };
            if parquet_in(&layout.root) || parquet_in(&layout.shards) {
                bail!(
                    "{} holds .parquet files but no {}; refusing to write into it (use an empty or new --out)",
                    dir.display(),
                    taesd_schemas::shard::MANIFEST_FILE
                );
            }
        }
        let mut shards = Vec::new();
        for path in layout.shard_files()? {
            let Some(index) = layout.shard_index(&path) else { continue };
            let unreadable =
                || format!("finished shard {} is unreadable; delete it to encode its inputs again", path.display());
            let r = ShardReader::open(&path).with_context(unreadable)?;
            let meta = r.meta();
            let resolution = meta.resolution;
            let upscaled =
                r.crops().with_context(unreadable)?.iter().filter(|c| is_upscaled(c, resolution)).count() as u64;
            let inputs: Vec<(String, Option<u64>)> = match &meta.inputs {
                Some(list) => list.iter().map(|i| (i.source.clone(), Some(i.size))).collect(),
                None => {
                    let mut seen = HashSet::new();
                    let mut v = Vec::new();
                    for s in r
                        .sources()
                        .with_context(unreadable)?
                        .into_iter()
                        .chain(meta.errors.iter().map(|e| e.source.clone()))
                    {
                        if seen.insert(s.clone()) {
                            v.push((s, None));
                        }
                    }
                    v
                }
            };
            shards.push(Finished {
                entry: ShardEntry {
                    file: layout.shard_entry_name(index),
                    index,
                    rows: r.num_rows(),
                    inputs: inputs.len() as u64,
                    errors: meta.errors.len() as u64,
                    upscaled,
                },
                inputs,
            });
        }
        shards.sort_by_key(|s| s.entry.index);
        Ok(Existing { layout, manifest, shards })
    }

    /// Whether this run's kind fits the folder: a whole run into a folder of parts, a part into a
    /// whole run's folder, a part of another N, or a part with other settings than a part with
    /// finished shards are refused (read-only; before anything is written).
    pub fn check_partition(&self, config: &OutputConfig) -> Result<()> {
        let root = &self.layout.root;
        let parts = PartsFolder::read(root)?;
        let Some(me) = self.layout.part else {
            if let Some(f) = parts {
                bail!(
                    "{} holds the parts of a `--part I/{}` run ({}); a run without --part writes a whole folder: add --part, or use a new --out",
                    root.display(),
                    f.count,
                    f.summary()
                );
            }
            return Ok(());
        };
        let whole = OutputLayout::locate(root);
        if whole.manifest_path().is_file() || !whole.shard_files()?.is_empty() {
            bail!(
                "{} holds a whole run (manifest.json / shard-*.parquet); a --part run writes into a folder of parts only: use a new --out",
                root.display()
            );
        }
        let Some(f) = parts else { return Ok(()) };
        if f.count != me.count {
            bail!(
                "{} holds the parts of a `--part I/{}` run; this is part {me}: every part of one folder has the same N (use a new --out)",
                root.display(),
                f.count
            );
        }
        for other in f.parts.iter().filter(|p| p.part != me) {
            let Some(m) = other.manifest.as_ref().filter(|m| !m.shards.is_empty()) else { continue };
            let diffs = m.config.differences(config);
            if !diffs.is_empty() {
                bail!(
                    "{}: part {} was written with other settings ({} finished shard(s)); the parts of one folder must agree (write to a new --out):\n  {}",
                    root.display(),
                    other.part,
                    m.shards.len(),
                    diffs.join("\n  ")
                );
            }
        }
        Ok(())
    }

    /// The index of the next new shard.
    pub fn next_index(&self) -> u32 {
        self.shards.last().map_or(0, |s| s.entry.index + 1)
    }

    /// Whether a run with `config` may write here: `Ok(None)` for the same settings or a new
    /// folder; `Ok(Some(note))` when the settings differ but no shard was finished (the run starts
    /// the folder over, and the note says so); an error listing the differences otherwise.
    pub fn check_settings(&self, config: &OutputConfig) -> Result<Option<String>> {
        let Some(m) = &self.manifest else { return Ok(None) };
        let diffs = m.config.differences(config);
        if diffs.is_empty() {
            return Ok(None);
        }
        if self.shards.is_empty() {
            return Ok(Some(format!(
                "{} has no finished shard: starting it over with the new settings ({})",
                self.layout.root.display(),
                diffs.join(", ")
            )));
        }
        bail!(
            "{} was written with other settings ({} finished shard(s)); refusing to mix them into one output (write to a new --out):\n  {}",
            self.layout.root.display(),
            self.shards.len(),
            diffs.join("\n  ")
        );
    }
}

/// What a run is to do.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// New shards: index and the inputs each covers (in sorted order).
    pub pending: Vec<(u32, Vec<InputItem>)>,
    /// Listed inputs that finished shards cover already.
    pub already: u64,
    /// Inputs finished shards cover that are no longer listed (sorted).
    pub removed: Vec<String>,
    /// Inputs finished shards cover whose size changed since (sorted).
    pub changed: Vec<String>,
}

impl Plan {
    pub fn new_inputs(&self) -> u64 {
        self.pending.iter().map(|(_, v)| v.len() as u64).sum()
    }
}

/// The run's work: the listed inputs (`items`, sorted) that no finished shard covers, in shards of
/// `inputs_per_shard` numbered from [`Existing::next_index`]. A first run (no shard yet) thus
/// gives shard `i` inputs `[i*k, (i+1)*k)` of the list, and a run resumed after a kill the same
/// shards as an uninterrupted one (shards are finished in order).
pub fn plan(existing: &Existing, items: &[InputItem], inputs_per_shard: u32) -> Plan {
    let covered: HashMap<&str, Option<u64>> =
        existing.shards.iter().flat_map(|s| s.inputs.iter().map(|(src, size)| (src.as_str(), *size))).collect();
    let listed: HashSet<&str> = items.iter().map(|i| i.source.as_str()).collect();
    let mut plan = Plan::default();
    let mut new = Vec::new();
    for it in items {
        match covered.get(it.source.as_str()) {
            None => new.push(it.clone()),
            Some(size) => {
                plan.already += 1;
                if size.is_some_and(|s| s != it.size) {
                    plan.changed.push(it.source.clone());
                }
            }
        }
    }
    plan.removed = covered.keys().filter(|s| !listed.contains(*s)).map(|s| s.to_string()).collect();
    plan.removed.sort();
    plan.changed.sort();
    let first = existing.next_index();
    plan.pending =
        new.chunks(inputs_per_shard.max(1) as usize).enumerate().map(|(i, c)| (first + i as u32, c.to_vec())).collect();
    plan
}

/// What defines the inputs of a run, for the manifest.
pub struct InputsInfo {
    pub root: String,
    pub total: u64,
    pub fingerprint: String,
}

/// An output folder open for writing.
pub struct OutputDir {
    pub layout: OutputLayout,
    pub manifest: Manifest,
}

impl OutputDir {
    /// Create the folder (or take the existing one, checked by [`Existing::check_settings`]) for a
    /// run of `plan` with `config`: leftover temp files of a killed run are removed and the
    /// manifest is written.
    pub fn open(
        existing: Existing,
        config: &OutputConfig,
        inputs: &InputsInfo,
        onnx_path: &Path,
        plan: &Plan,
    ) -> Result<OutputDir> {
        let layout = existing.layout;
        std::fs::create_dir_all(&layout.shards)
            .with_context(|| format!("cannot create output folder {}", layout.shards.display()))?;
        for d in [&layout.root, &layout.shards] {
            for e in std::fs::read_dir(d)?.filter_map(|e| e.ok()) {
                // Only this run's own: another part may be writing into the same folder.
                if is_temp_file(&e.path()) && layout.owns_temp_file(&e.path()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let keep = existing.manifest.filter(|m| m.config == *config);
        let extra = keep.as_ref().map(|m| m.extra.clone()).unwrap_or_default();
        let shards: Vec<ShardEntry> = existing.shards.iter().map(|s| s.entry.clone()).collect();
        let manifest = Manifest {
            schema_version: SCHEMA_VERSION,
            tool: format!("precompute {}", env!("CARGO_PKG_VERSION")),
            status: "in_progress".into(),
            config: config.clone(),
            onnx_path: onnx_path.display().to_string(),
            inputs_root: inputs.root.clone(),
            inputs_total: inputs.total,
            inputs_fingerprint: inputs.fingerprint.clone(),
            shards_total: (shards.len() + plan.pending.len()) as u32,
            shards,
            rows: 0,
            errors: 0,
            upscaled_rows: 0,
            removed_inputs: plan.removed.clone(),
            changed_inputs: plan.changed.clone(),
            part: layout.part,
            extra,
        };
        let mut out = OutputDir { layout, manifest };
        out.recount();
        out.save()?;
        Ok(out)
    }

    fn recount(&mut self) {
        let m = &mut self.manifest;
        m.rows = m.shards.iter().map(|s| s.rows).sum();
        m.errors = m.shards.iter().map(|s| s.errors).sum();
        m.upscaled_rows = m.shards.iter().map(|s| s.upscaled).sum();
    }

    /// Final path of shard `index`.
    pub fn shard_path(&self, index: u32) -> PathBuf {
        self.layout.shard_path(index)
    }

    /// Shard `index` as the manifest names it.
    pub fn shard_entry_name(&self, index: u32) -> String {
        self.layout.shard_entry_name(index)
    }

    /// Where shards are written before they are renamed into place.
    pub fn staging(&self) -> &Path {
        self.layout.staging()
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
        write_atomic(&self.layout.manifest_path(), &json)
    }

    /// Mark complete when every planned shard is there, and write `errors.jsonl` from the shards'
    /// own records plus `extra_errors` (what could not even be listed).
    pub fn finish(&mut self, extra_errors: &[ErrorRecord]) -> Result<Vec<ErrorRecord>> {
        let mut all = extra_errors.to_vec();
        for s in &self.manifest.shards {
            let r = ShardReader::open(&self.layout.root.join(&s.file))?;
            all.extend(r.meta().errors.iter().cloned());
        }
        let mut lines = Vec::new();
        for e in &all {
            lines.extend(serde_json::to_vec(e)?);
            lines.push(b'\n');
        }
        write_atomic(&self.layout.errors_path(), &lines)?;
        self.manifest.errors = all.len() as u64;
        if self.manifest.shards.len() as u32 == self.manifest.shards_total {
            self.manifest.status = "complete".into();
        }
        self.save()?;
        Ok(all)
    }
}

/// The inputs of a shard, as its footer records them.
pub fn input_records(items: &[InputItem]) -> Vec<InputRecord> {
    items.iter().map(|i| InputRecord { source: i.source.clone(), size: i.size }).collect()
}

/// Read the manifest of the output folder `root` (a whole run's).
pub fn read_manifest(root: &Path) -> Result<Manifest> {
    read_manifest_file(&root.join(taesd_schemas::shard::MANIFEST_FILE))
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

#[cfg(test)]
mod tests {
    use super::*;
    use taesd_data::SourceLoc;

    fn item(source: &str, size: u64) -> InputItem {
        InputItem { source: source.into(), key: source.into(), loc: SourceLoc::File(source.into()), size }
    }

    fn finished(index: u32, inputs: &[(&str, Option<u64>)]) -> Finished {
        Finished {
            entry: ShardEntry {
                file: format!("data/shard-{index:05}.parquet"),
                index,
                rows: 0,
                inputs: inputs.len() as u64,
                errors: 0,
                upscaled: 0,
            },
            inputs: inputs.iter().map(|(s, n)| (s.to_string(), *n)).collect(),
        }
    }

    #[test]
    fn a_plan_encodes_only_new_inputs_into_new_shards_and_names_the_removed() {
        let dir = tempfile::tempdir().unwrap();
        let empty = Existing { layout: OutputLayout::new(dir.path()), manifest: None, shards: vec![] };
        let items: Vec<InputItem> = ["a", "b", "c", "d", "e"].iter().map(|s| item(s, 10)).collect();
        // A first run: shard i covers inputs [i*k, (i+1)*k).
        let p = plan(&empty, &items, 2);
        let sources = |p: &Plan| -> Vec<(u32, Vec<String>)> {
            p.pending.iter().map(|(i, v)| (*i, v.iter().map(|x| x.source.clone()).collect())).collect()
        };
        assert_eq!(
            sources(&p),
            vec![(0, vec!["a".into(), "b".into()]), (1, vec!["c".into(), "d".into()]), (2, vec!["e".into()])]
        );
        assert_eq!((p.already, p.new_inputs()), (0, 5));

        // Killed after shards 0 and 1: the rest is the same shard 2 as before.
        let mut ex = Existing { layout: OutputLayout::new(dir.path()), manifest: None, shards: vec![] };
        ex.shards =
            vec![finished(0, &[("a", Some(10)), ("b", Some(10))]), finished(1, &[("c", Some(10)), ("d", Some(10))])];
        let p = plan(&ex, &items, 2);
        assert_eq!(sources(&p), vec![(2, vec!["e".into()])]);

        // Inputs added (b2, f), removed (c), changed (d), and an older shard without sizes.
        ex.shards.push(finished(2, &[("e", None)]));
        let grown: Vec<InputItem> =
            vec![item("a", 10), item("b", 10), item("b2", 7), item("d", 11), item("e", 99), item("f", 1)];
        let p = plan(&ex, &grown, 2);
        assert_eq!(sources(&p), vec![(3, vec!["b2".into(), "f".into()])]);
        assert_eq!(p.already, 4);
        assert_eq!(p.removed, vec!["c".to_string()]);
        assert_eq!(p.changed, vec!["d".to_string()], "e's old shard has no size: no claim either way");
        // Nothing new: nothing to do.
        let p = plan(&ex, &items[..2], 2);
        assert!(p.pending.is_empty());
        assert_eq!(p.removed, vec!["c", "d", "e"]);
    }

    #[test]
    fn shard_names_give_their_index() {
        let whole = OutputLayout::new(Path::new("x"));
        assert_eq!(whole.shard_index(Path::new("x/data/shard-00012.parquet")), Some(12));
        assert_eq!(whole.shard_index(Path::new("x/shard-00012.parquet.tmp-3")), None);
        assert_eq!(whole.shard_index(Path::new("x/other.parquet")), None);
        assert_eq!(whole.shard_index(Path::new("x/data/part-00001-of-00002-shard-00012.parquet")), None);
        let part = OutputLayout::for_part(Path::new("x"), Part { index: 1, count: 2 });
        assert_eq!(part.shard_index(Path::new("x/data/part-00001-of-00002-shard-00012.parquet")), Some(12));
        assert_eq!(part.shard_index(Path::new("x/data/part-00000-of-00002-shard-00012.parquet")), None);
    }
}
