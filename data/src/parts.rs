//! Partitioned runs (`precompute --part i/N`): which inputs fall in a part, and a folder of parts
//! read as one set.
//!
//! The partition is by name, not by position: an input belongs to part
//! `u64(sha256(container)[..8]) mod N`, where the container is the input's own path, or for a
//! member of a webdataset `.tar` the tar's path (a tar is read by one part only). An input thus
//! stays in its part whatever else is listed: files added later (an incremental run, which each
//! part does on its own) land in some part and nothing already encoded moves to another part,
//! which contiguous ranges or `index mod N` of the sorted list would do. Parts are balanced
//! statistically (hash), not exactly.
//!
//! A folder of parts holds each part's manifest and errors file beside each other and every
//! part's shards in `data/` ([`taesd_schemas::Part`] names them), so `OUT/data` stays one Parquet
//! dataset. [`PartsFolder`] reads them as one set: the shards of part 0 (by index), then part 1,
//! and so on, and names every part that is missing or unfinished.

use crate::source::InputItem;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use taesd_schemas::shard::DATA_DIR;
use taesd_schemas::{Manifest, Part, SCHEMA_VERSION};

/// What the partition hashes: the input's path, or the path of the tar it is a member of.
fn container(source: &str) -> &str {
    match source.find(".tar:") {
        Some(i) => &source[..i + 4],
        None => source,
    }
}

/// The part (of `count`) an input belongs to.
pub fn part_of(source: &str, count: u32) -> u32 {
    let h = Sha256::digest(container(source).as_bytes());
    (u64::from_le_bytes(h[..8].try_into().expect("8 bytes")) % count.max(1) as u64) as u32
}

/// The inputs of `items` (sorted; the order is kept) that fall in `part`.
pub fn select_part(items: Vec<InputItem>, part: Part) -> Vec<InputItem> {
    items.into_iter().filter(|i| part_of(&i.source, part.count) == part.index).collect()
}

/// The part shard files in `dir`: (part, shard index, path), sorted by part then index.
pub fn list_part_shards(dir: &Path) -> Result<Vec<(Part, u32, PathBuf)>> {
    let mut out = Vec::new();
    if !dir.is_dir() {
        return Ok(out);
    }
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list shard folder {}", dir.display()))? {
        let e = e.with_context(|| format!("cannot list shard folder {}", dir.display()))?;
        if let Some((p, i)) = e.file_name().to_str().and_then(Part::of_shard_file) {
            if e.file_type().is_ok_and(|t| t.is_file()) {
                out.push((p, i, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The part manifests in `root`: (part, path), sorted.
pub fn list_part_manifests(root: &Path) -> Result<Vec<(Part, PathBuf)>> {
    let mut out = Vec::new();
    if !root.is_dir() {
        return Ok(out);
    }
    for e in std::fs::read_dir(root).with_context(|| format!("cannot list {}", root.display()))? {
        let e = e.with_context(|| format!("cannot list {}", root.display()))?;
        if let Some(p) = e.file_name().to_str().and_then(Part::of_manifest_file) {
            out.push((p, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Read a manifest file (the whole run's or a part's), checking its schema version.
pub fn read_manifest_file(path: &Path) -> Result<Manifest> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let m: Manifest =
        serde_json::from_slice(&bytes).with_context(|| format!("{} is not a valid manifest", path.display()))?;
    if m.schema_version != SCHEMA_VERSION {
        bail!("{} has schema version {}, this build reads {SCHEMA_VERSION}", path.display(), m.schema_version);
    }
    Ok(m)
}

/// One part of a [`PartsFolder`].
#[derive(Debug, Clone)]
pub struct PartState {
    pub part: Part,
    /// Its manifest, when the part has started.
    pub manifest: Option<Manifest>,
    /// Its finished shards, by index.
    pub shards: Vec<PathBuf>,
}

impl PartState {
    /// Finished, by its manifest.
    pub fn is_complete(&self) -> bool {
        self.manifest.as_ref().is_some_and(|m| m.status == "complete")
    }

    /// What is wrong with this part for a reader of the whole set: `None` when it is complete,
    /// else e.g. `part 3/8 missing` or `part 5/8 in progress (412 of 1000 inputs)`.
    pub fn problem(&self) -> Option<String> {
        match &self.manifest {
            _ if self.is_complete() => None,
            None if self.shards.is_empty() => Some(format!("part {} missing", self.part)),
            None => Some(format!("part {} has {} shard(s) but no manifest", self.part, self.shards.len())),
            Some(m) => {
                let done: u64 = m.shards.iter().map(|s| s.inputs).sum();
                Some(format!("part {} in progress ({done} of {} inputs)", self.part, m.inputs_total))
            }
        }
    }
}

/// A folder of parts, read as one set.
#[derive(Debug, Clone)]
pub struct PartsFolder {
    /// The output folder (the parts' manifests; their shards in `root/data`).
    pub root: PathBuf,
    /// N of the `--part i/N` runs.
    pub count: u32,
    /// Every part `0..count`, in order (missing ones without manifest or shards).
    pub parts: Vec<PartState>,
}

impl PartsFolder {
    /// The parts in `dir` (the output folder or its `data` folder); `None` when it holds no part
    /// files (a whole run's folder, or a new one). Parts of different N are an error.
    pub fn read(dir: &Path) -> Result<Option<PartsFolder>> {
        let root = if !dir.join(DATA_DIR).is_dir() && dir.file_name().is_some_and(|n| n == DATA_DIR) {
            dir.parent().unwrap_or(dir).to_path_buf()
        } else {
            dir.to_path_buf()
        };
        let manifests = list_part_manifests(&root)?;
        let shards = list_part_shards(&root.join(DATA_DIR))?;
        let mut counts: Vec<u32> =
            manifests.iter().map(|(p, _)| p.count).chain(shards.iter().map(|s| s.0.count)).collect();
        counts.sort();
        counts.dedup();
        let count = match counts.as_slice() {
            [] => return Ok(None),
            [n] => *n,
            several => bail!(
                "{} holds parts of different partitions (of {}); a folder takes the parts of one `--part I/N` run (one N)",
                root.display(),
                several.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" and of ")
            ),
        };
        let mut parts: Vec<PartState> =
            (0..count).map(|index| PartState { part: Part { index, count }, manifest: None, shards: vec![] }).collect();
        for (p, path) in manifests {
            parts[p.index as usize].manifest = Some(read_manifest_file(&path)?);
        }
        for (p, _, path) in shards {
            parts[p.index as usize].shards.push(path);
        }
        Ok(Some(PartsFolder { root, count, parts }))
    }

    /// Every part that is missing or unfinished, named (empty when the set is complete).
    pub fn problems(&self) -> Vec<String> {
        self.parts.iter().filter_map(|p| p.problem()).collect()
    }

    /// The finished shards of every part: part 0's by index, then part 1's, ...
    pub fn shard_files(&self) -> Vec<PathBuf> {
        self.parts.iter().flat_map(|p| p.shards.iter().cloned()).collect()
    }

    /// The manifest of the first part that has one (the set's settings, once [`Self::check_settings`]
    /// passed).
    pub fn first_manifest(&self) -> Option<&Manifest> {
        self.parts.iter().find_map(|p| p.manifest.as_ref())
    }

    /// All parts were written with the same settings (an error naming the parts that differ).
    pub fn check_settings(&self) -> Result<()> {
        let mut with = self.parts.iter().filter_map(|p| p.manifest.as_ref().map(|m| (p.part, m)));
        let Some((p0, m0)) = with.next() else { return Ok(()) };
        for (p, m) in with {
            let diffs = m0.config.differences(&m.config);
            if !diffs.is_empty() {
                bail!(
                    "{}: part {p} was written with other settings than part {p0}; the parts of one folder must agree:\n  {}",
                    self.root.display(),
                    diffs.join("\n  ")
                );
            }
        }
        Ok(())
    }

    /// One line on the set: `8 parts: 6 complete; part 3/8 missing, part 5/8 in progress (...)`.
    pub fn summary(&self) -> String {
        let complete = self.parts.iter().filter(|p| p.is_complete()).count();
        let problems = self.problems();
        if problems.is_empty() {
            format!("{} part(s), all complete", self.count)
        } else {
            format!("{} part(s): {complete} complete; {}", self.count, problems.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SourceLoc;

    fn item(source: &str) -> InputItem {
        InputItem { source: source.into(), key: source.into(), loc: SourceLoc::File(source.into()), size: 1 }
    }

    #[test]
    fn the_partition_is_by_name_and_keeps_tars_whole() {
        let names: Vec<String> = (0..400).map(|i| format!("dir/img{i:04}.jpg")).collect();
        let items: Vec<InputItem> = names.iter().map(|n| item(n)).collect();
        let parts: Vec<Vec<InputItem>> =
            (0..4).map(|index| select_part(items.clone(), Part { index, count: 4 })).collect();
        // Every input in exactly one part, each part in sorted order and not far from a quarter.
        let mut union: Vec<&str> = parts.iter().flatten().map(|i| i.source.as_str()).collect();
        union.sort();
        assert_eq!(union, names.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        for p in &parts {
            assert!(p.windows(2).all(|w| w[0].source < w[1].source));
            assert!((60..140).contains(&p.len()), "{}", p.len());
        }
        // Adding inputs moves none of the others.
        let mut grown = items.clone();
        grown.insert(3, item("dir/img0002b.jpg"));
        for (index, before) in parts.iter().enumerate() {
            let after = select_part(grown.clone(), Part { index: index as u32, count: 4 });
            assert!(before.iter().all(|i| after.contains(i)));
        }
        // A tar's members share its part; the value is fixed (a portable hash).
        let p = part_of("shards/000.tar", 8);
        assert!((0..50).all(|m| part_of(&format!("shards/000.tar:m/{m}.jpg"), 8) == p));
        assert_eq!(part_of("a.jpg", 1), 0);
        assert_eq!((part_of("a.jpg", 1000), part_of("b.jpg", 1000)), (part_of("a.jpg", 1000), part_of("b.jpg", 1000)));
    }

    #[test]
    fn a_folder_of_parts_names_what_is_missing_or_unfinished() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert!(PartsFolder::read(root).unwrap().is_none());
        std::fs::create_dir(root.join(DATA_DIR)).unwrap();
        let p = |index| Part { index, count: 3 };
        std::fs::write(root.join(DATA_DIR).join(p(2).shard_file(0)), "x").unwrap();
        std::fs::write(root.join(DATA_DIR).join(p(0).shard_file(1)), "x").unwrap();
        std::fs::write(root.join(DATA_DIR).join(p(0).shard_file(0)), "x").unwrap();
        let f = PartsFolder::read(root).unwrap().unwrap();
        assert_eq!(f.count, 3);
        assert_eq!(
            f.shard_files(),
            vec![
                root.join("data").join(p(0).shard_file(0)),
                root.join("data").join(p(0).shard_file(1)),
                root.join("data").join(p(2).shard_file(0))
            ]
        );
        let problems = f.problems();
        assert_eq!(problems[1], "part 1/3 missing");
        assert!(problems[0].starts_with("part 0/3 has 2 shard(s) but no manifest"), "{problems:?}");
        // The data folder itself finds the same set.
        assert_eq!(PartsFolder::read(&root.join(DATA_DIR)).unwrap().unwrap().count, 3);
        // Parts of another N in the same folder are refused.
        std::fs::write(root.join(DATA_DIR).join(Part { index: 0, count: 4 }.shard_file(0)), "x").unwrap();
        let e = PartsFolder::read(root).unwrap_err().to_string();
        assert!(e.contains("of 3 and of 4"), "{e}");
    }
}
