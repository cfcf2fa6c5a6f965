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

use crate::shard::list_shards;
use anyhow::Result;
use std::path::{Path, PathBuf};
use taesd_schemas::shard::{shard_file_name, DATA_DIR, MANIFEST_FILE};

/// The folders of one output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLayout {
    /// The output folder (`manifest.json`, `errors.jsonl`).
    pub root: PathBuf,
    /// The folder of the shards: `root/data`, or `root` itself in the old layout.
    pub shards: PathBuf,
}

impl OutputLayout {
    /// The layout of a new output folder.
    pub fn new(root: &Path) -> OutputLayout {
        OutputLayout { root: root.to_path_buf(), shards: root.join(DATA_DIR) }
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
                return OutputLayout { root: dir.parent().expect("checked").to_path_buf(), shards: dir.to_path_buf() };
            }
            return OutputLayout { root: dir.to_path_buf(), shards: dir.to_path_buf() };
        }
        OutputLayout::new(dir)
    }

    /// Whether the shards lie beside the manifest (folders written before `data/`).
    pub fn is_legacy(&self) -> bool {
        self.shards == self.root
    }

    /// Final path of shard `index`.
    pub fn shard_path(&self, index: u32) -> PathBuf {
        self.shards.join(shard_file_name(index))
    }

    /// Shard `index` as the manifest names it: relative to the root, `/`-separated.
    pub fn shard_entry_name(&self, index: u32) -> String {
        if self.is_legacy() {
            shard_file_name(index)
        } else {
            format!("{DATA_DIR}/{}", shard_file_name(index))
        }
    }

    /// Where temp files of shards being written go: the root, outside the dataset folder.
    pub fn staging(&self) -> &Path {
        &self.root
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.root.join(MANIFEST_FILE)
    }

    /// The finished shards, sorted by name (none when the shard folder does not exist yet).
    pub fn shard_files(&self) -> Result<Vec<PathBuf>> {
        if !self.shards.is_dir() {
            return Ok(Vec::new());
        }
        list_shards(&self.shards)
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
    }
}
