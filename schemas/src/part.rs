//! `--part i/N`: one of N parts of a precompute run, and the names its files take in the shared
//! output folder (`docs/format.md`, "Parts"). Parts are numbered from 0 (a Slurm array index or a
//! Kubernetes completion index as it is).
//!
//! ```text
//! OUT/manifest.part-00003-of-00008.json         part 3 of 8's manifest
//! OUT/errors.part-00003-of-00008.jsonl          its errors
//! OUT/data/part-00003-of-00008-shard-00000.parquet  its shards: OUT/data stays one Parquet dataset
//! ```

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Part `index` of `count` (`index < count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Part {
    pub index: u32,
    pub count: u32,
}

impl Part {
    /// `part-00003-of-00008`: the tag in every file name of the part.
    pub fn tag(&self) -> String {
        format!("part-{:05}-of-{:05}", self.index, self.count)
    }

    /// The part a tag names (`part-00003-of-00008`), if it is one.
    pub fn from_tag(tag: &str) -> Option<Part> {
        let (i, n) = tag.strip_prefix("part-")?.split_once("-of-")?;
        if i.len() != 5 || n.len() != 5 || !(i.bytes().chain(n.bytes())).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let p = Part { index: i.parse().ok()?, count: n.parse().ok()? };
        (p.index < p.count).then_some(p)
    }

    /// File name of the part's manifest.
    pub fn manifest_file(&self) -> String {
        format!("manifest.{}.json", self.tag())
    }

    /// File name of the part's errors.
    pub fn errors_file(&self) -> String {
        format!("errors.{}.jsonl", self.tag())
    }

    /// File name of the part's shard `index`.
    pub fn shard_file(&self, index: u32) -> String {
        format!("{}-{}", self.tag(), crate::shard::shard_file_name(index))
    }

    /// The part a manifest file name belongs to.
    pub fn of_manifest_file(name: &str) -> Option<Part> {
        Part::from_tag(name.strip_prefix("manifest.")?.strip_suffix(".json")?)
    }

    /// The part and shard index of a part's shard file name.
    pub fn of_shard_file(name: &str) -> Option<(Part, u32)> {
        let rest = name.strip_suffix(".parquet")?;
        let (tag, shard) = rest.split_once("-shard-")?;
        Some((Part::from_tag(tag)?, shard.parse().ok()?))
    }
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Part {
    type Err = String;
    fn from_str(s: &str) -> Result<Part, String> {
        let bad = || format!("`{s}` is not a part: use I/N with 0 <= I < N (e.g. 0/8 .. 7/8)");
        let (i, n) = s.trim().split_once('/').ok_or_else(bad)?;
        let (index, count): (u32, u32) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if count == 0 || index >= count || count > 99_999 {
            return Err(bad());
        }
        Ok(Part { index, count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_parse_print_and_name_their_files() {
        let p: Part = "3/8".parse().unwrap();
        assert_eq!(p, Part { index: 3, count: 8 });
        assert_eq!(p.to_string(), "3/8");
        for bad in ["8/8", "1/0", "x/2", "3", "-1/4"] {
            assert!(bad.parse::<Part>().is_err(), "{bad}");
        }
        assert_eq!(p.tag(), "part-00003-of-00008");
        assert_eq!(p.manifest_file(), "manifest.part-00003-of-00008.json");
        assert_eq!(p.errors_file(), "errors.part-00003-of-00008.jsonl");
        assert_eq!(p.shard_file(12), "part-00003-of-00008-shard-00012.parquet");
        assert_eq!(Part::of_manifest_file(&p.manifest_file()), Some(p));
        assert_eq!(Part::of_shard_file(&p.shard_file(12)), Some((p, 12)));
        assert_eq!(Part::of_shard_file("shard-00012.parquet"), None);
        assert_eq!(Part::of_shard_file("part-00003-of-00008-shard-00012.parquet.tmp-5"), None);
        assert_eq!(Part::of_manifest_file("manifest.json"), None);
        assert_eq!(Part::from_tag("part-00009-of-00008"), None);
    }
}
