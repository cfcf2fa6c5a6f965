//! Where the files of a `precompute` output folder are.
//!
//! ```text
//! OUT/
//!   manifest.json
//!   errors.jsonl
//!   data/shard-00000.parquet ...   the shards: OUT/data is a plain Parquet dataset
//! ```
//!
//! Folders written before the `data/` layout hold the shards beside `manifest.json`; readers
//! ([`OutputLayout::locate`]) take either, and also the `data` folder itself. Temp files of
//! shards being written live in `OUT/`, never in `OUT/data/`, so that a dataset reader that
//! lists the folder (`pyarrow.parquet.read_table`, `polars.read_parquet`) only sees finished
//! shards.
//!
//! A part of a partitioned run (`--part i/N`, [`Part`]) has its own manifest, errors file and
//! shard names in the same folder ([`OutputLayout::for_part`]); [`crate::parts`] reads a folder of
//! parts as one set.

use crate::shard::list_shards;
use anyhow::Result;
use std::path::{Path, PathBuf};
use taesd_schemas::shard::{shard_file_name, DATA_DIR, ERRORS_FILE, MANIFEST_FILE};
use taesd_schemas::Part;

/// The folders of one output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLayout {
    /// The output folder (`manifest.json`, `errors.jsonl`).
    pub root: PathBuf,
    /// The folder of the shards: `root/data`, or `root` itself in the old layout.
    pub shards: PathBuf,
    /// The part of a partitioned run whose files these are; `None` for a whole run.
    pub part: Option<Part>,
}

impl OutputLayout {
    /// The layout of a new output folder.
    pub fn new(root: &Path) -> OutputLayout {
        OutputLayout { root: root.to_path_buf(), shards: root.join(DATA_DIR), part: None }
    }

    /// The files of part `part` of a partitioned run into the output folder `root` (always the
    /// `data/` layout).
    pub fn for_part(root: &Path, part: Part) -> OutputLayout {
        OutputLayout { part: Some(part), ..OutputLayout::new(root) }
    }

    /// The layout of `dir`, whichever way it was written: `dir/data/` when it exists; the shards
    /// beside the manifest when `dir` holds `shard-*.parquet` files (the layout before `data/`);
    /// `dir` itself when it is the `data` folder of an output; else a new output at `dir`.
    pub fn locate(dir: &Path) -> OutputLayout {
        if dir.join(DATA_DIR).is_dir() {
            return OutputLayout::new(dir);
        }
        if list_shards(dir).is_ok_and(|v| !v.is_empty()) {
            let parent_has_manifest = dir.parent().is_some_and(|p| p.join(MANIFEST_FILE).is_file());
            if !dir.join(MANIFEST_FILE).is_file()
                && parent_has_manifest
                && dir.file_name().is_some_and(|n| n == DATA_DIR)
            {
                // The `data` folder of an output was given.
                return OutputLayout {
                    root: dir.parent().expect("checked").to_path_buf(),
                    shards: dir.to_path_buf(),
                    part: None,
                };
            }
            return OutputLayout { root: dir.to_path_buf(), shards: dir.to_path_buf(), part: None };
        }
        OutputLayout::new(dir)
    }

    /// Whether the shards lie beside the manifest (folders written before `data/`).
    pub fn is_legacy(&self) -> bool {
        self.shards == self.root
    }

    /// Final path of shard `index`.
    pub fn shard_path(&self, index: u32) -> PathBuf {
        self.shards.join(self.shard_file_name(index))
    }

    /// File name of shard `index` (`shard-00012.parquet`, or the part's
    /// `part-00003-of-00008-shard-00012.parquet`).
    pub fn shard_file_name(&self, index: u32) -> String {
        match self.part {
            Some(p) => p.shard_file(index),
            None => shard_file_name(index),
        }
    }

    /// The index of a shard file of this layout (whole run or this part), from its name.
    pub fn shard_index(&self, path: &Path) -> Option<u32> {
        let name = path.file_name()?.to_str()?;
        match self.part {
            Some(p) => Part::of_shard_file(name).filter(|(q, _)| *q == p).map(|(_, i)| i),
            None => name.strip_prefix("shard-")?.strip_suffix(".parquet")?.parse().ok(),
        }
    }

    /// Shard `index` as the manifest names it: relative to the root, `/`-separated.
    pub fn shard_entry_name(&self, index: u32) -> String {
        if self.is_legacy() {
            self.shard_file_name(index)
        } else {
            format!("{DATA_DIR}/{}", self.shard_file_name(index))
        }
    }

    /// Where temp files of shards being written go: the root, outside the dataset folder.
    pub fn staging(&self) -> &Path {
        &self.root
    }

    pub fn manifest_path(&self) -> PathBuf {
        match self.part {
            Some(p) => self.root.join(p.manifest_file()),
            None => self.root.join(MANIFEST_FILE),
        }
    }

    pub fn errors_path(&self) -> PathBuf {
        match self.part {
            Some(p) => self.root.join(p.errors_file()),
            None => self.root.join(ERRORS_FILE),
        }
    }

    /// Whether a temp file (of a killed run) belongs to this layout's run: a part's own files
    /// only, so that a part never deletes what another part is writing into the same folder.
    pub fn owns_temp_file(&self, path: &Path) -> bool {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        match self.part {
            Some(p) => name.contains(&p.tag()),
            None => !name.contains("part-"),
        }
    }

    /// The finished shards of this layout (the whole run's `shard-*.parquet`, or this part's),
    /// sorted by name (none when the shard folder does not exist yet).
    pub fn shard_files(&self) -> Result<Vec<PathBuf>> {
        if !self.shards.is_dir() {
            return Ok(Vec::new());
        }
        match self.part {
            None => list_shards(&self.shards),
            Some(_) => Ok(crate::parts::list_part_shards(&self.shards)?
                .into_iter()
                .filter(|(_, _, path)| self.shard_index(path).is_some())
                .map(|(_, _, path)| path)
                .collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_old_and_data_folder_layouts_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // Nothing there yet: a new output with a data/ folder.
        let l = OutputLayout::locate(&root.join("out"));
        assert_eq!(l, OutputLayout::new(&root.join("out")));
        assert_eq!(l.shard_path(3), root.join("out/data/shard-00003.parquet"));
        assert_eq!(l.shard_entry_name(3), "data/shard-00003.parquet");
        assert_eq!(l.staging(), root.join("out"));
        assert!(l.shard_files().unwrap().is_empty());

        // The old layout: shards beside the manifest.
        let old = root.join("old");
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join(MANIFEST_FILE), "{}").unwrap();
        std::fs::write(old.join("shard-00000.parquet"), "x").unwrap();
        let l = OutputLayout::locate(&old);
        assert!(l.is_legacy());
        assert_eq!(l.shard_entry_name(1), "shard-00001.parquet");
        assert_eq!(l.shard_files().unwrap(), vec![old.join("shard-00000.parquet")]);

        // The new layout, given as the output or as its data folder.
        let new = root.join("new");
        std::fs::create_dir_all(new.join(DATA_DIR)).unwrap();
        std::fs::write(new.join(MANIFEST_FILE), "{}").unwrap();
        std::fs::write(new.join("data/shard-00000.parquet"), "x").unwrap();
        let l = OutputLayout::locate(&new);
        assert!(!l.is_legacy());
        assert_eq!(l.shards, new.join(DATA_DIR));
        let l2 = OutputLayout::locate(&new.join(DATA_DIR));
        assert_eq!((l2.root.clone(), l2.shards.clone()), (new.clone(), new.join(DATA_DIR)));
        assert_eq!(l2.shard_files().unwrap(), vec![new.join("data/shard-00000.parquet")]);
        // A manifest-less folder of shards reads as such.
        let bare = root.join("bare");
        std::fs::create_dir(&bare).unwrap();
        std::fs::write(bare.join("shard-00002.parquet"), "x").unwrap();
        assert!(OutputLayout::locate(&bare).is_legacy());

        // A part's files: its own names in the same folder.
        let p = OutputLayout::for_part(&new, Part { index: 1, count: 3 });
        assert_eq!(p.shard_entry_name(2), "data/part-00001-of-00003-shard-00002.parquet");
        assert_eq!(p.manifest_path(), new.join("manifest.part-00001-of-00003.json"));
        assert_eq!(p.errors_path(), new.join("errors.part-00001-of-00003.jsonl"));
        assert!(p.shard_files().unwrap().is_empty(), "the whole run's shards are not the part's");
        std::fs::write(p.shard_path(4), "x").unwrap();
        std::fs::write(new.join("data/part-00002-of-00003-shard-00000.parquet"), "x").unwrap();
        assert_eq!(p.shard_files().unwrap(), vec![p.shard_path(4)]);
        assert_eq!(p.shard_index(&p.shard_path(4)), Some(4));
        assert_eq!(OutputLayout::locate(&new).shard_files().unwrap(), vec![new.join("data/shard-00000.parquet")]);
        assert!(p.owns_temp_file(Path::new("part-00001-of-00003-shard-00004.parquet.tmp-7")));
        assert!(!p.owns_temp_file(Path::new("part-00002-of-00003-shard-00004.parquet.tmp-7")));
        assert!(!OutputLayout::new(&new).owns_temp_file(Path::new("part-00002-of-00003-shard-00004.parquet.tmp-7")));
    }
}
