//! The Parquet shard format written by `precompute` and read by `train`: columns, file metadata,
//! and the `manifest.json` beside the shards. docs/format.md is the prose version of this file.

use crate::presets::VaeSpec;
use arrow::datatypes::{DataType, Field, Fields, Schema};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// Bumped on any incompatible change to columns, metadata or manifest.
pub const SCHEMA_VERSION: u32 = 1;

/// Column names.
pub mod col {
    /// Sample id: file path relative to the input root without extension, or the tar member name
    /// without extension (img2dataset's key, joinable with its `.txt`/`.json` members).
    pub const KEY: &str = "key";
    /// Where the bytes came from: path relative to the input root, or `shard.tar:member`.
    /// `(source, variant)` is unique within an output folder.
    pub const SOURCE: &str = "source";
    /// sha256 of the source file's bytes, hex.
    pub const SOURCE_SHA256: &str = "source_sha256";
    /// Source image size after EXIF orientation.
    pub const SOURCE_WIDTH: &str = "source_width";
    pub const SOURCE_HEIGHT: &str = "source_height";
    /// 0 = the centre crop; 1.. = random-resized crops, deterministic from seed + source + variant.
    pub const VARIANT: &str = "variant";
    /// Struct {x, y, w, h}: the crop, in source pixels (after EXIF orientation).
    pub const CROP: &str = "crop";
    /// The crop was mirrored horizontally.
    pub const FLIP: &str = "flip";
    /// The colour augmentation was applied.
    pub const COLOR_AUG: &str = "color_aug";
    /// The encoded image the teacher saw (PNG by default, lossless; or JPEG).
    pub const IMAGE: &str = "image";
    pub const WIDTH: &str = "width";
    pub const HEIGHT: &str = "height";
    /// Raw little-endian latent bytes, dtype in file metadata `taesd.latent_dtype`, C-major.
    pub const LATENT: &str = "latent";
    /// `[C, h, w]` of `latent`.
    pub const LATENT_SHAPE: &str = "latent_shape";
    /// Posterior std (same dtype, shape and scale as `latent`); null when the teacher gives only a
    /// mean.
    pub const LATENT_STD: &str = "latent_std";
}

/// Parquet key-value metadata keys of every shard file.
pub mod meta {
    pub const SCHEMA_VERSION: &str = "taesd.schema_version";
    /// JSON of [`crate::presets::VaeSpec`].
    pub const VAE: &str = "taesd.vae";
    pub const VAE_PRESET: &str = "taesd.vae_preset";
    pub const SCALE: &str = "taesd.scale";
    pub const SHIFT: &str = "taesd.shift";
    pub const INPUT_RANGE: &str = "taesd.input_range";
    pub const ONNX_SHA256: &str = "taesd.onnx_sha256";
    pub const LATENT_DTYPE: &str = "taesd.latent_dtype";
    pub const IMAGE_FORMAT: &str = "taesd.image_format";
    pub const RESOLUTION: &str = "taesd.resolution";
    pub const SHARD_INDEX: &str = "taesd.shard_index";
    /// JSON list of [`ErrorRecord`]s for the inputs this shard covers.
    pub const ERRORS: &str = "taesd.errors";
    /// JSON list of the [`InputRecord`]s this shard covers (every input: those with rows and
    /// those in `taesd.errors`); absent in shards written before incremental runs.
    pub const INPUTS: &str = "taesd.inputs";
}

/// Element type of the `latent` / `latent_std` columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LatentDtype {
    #[default]
    Float16,
    Float32,
}

impl LatentDtype {
    pub fn size(self) -> usize {
        match self {
            LatentDtype::Float16 => 2,
            LatentDtype::Float32 => 4,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            LatentDtype::Float16 => "float16",
            LatentDtype::Float32 => "float32",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "float16" | "f16" | "fp16" => Some(LatentDtype::Float16),
            "float32" | "f32" | "fp32" => Some(LatentDtype::Float32),
            _ => None,
        }
    }
}

/// Encoding of the `image` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    #[default]
    Png,
    Jpeg,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpeg",
        }
    }
}

/// The Arrow schema of a shard (without file metadata).
pub fn arrow_schema() -> Schema {
    let i32f = |n: &str| Field::new(n, DataType::Int32, false);
    let crop = Fields::from(vec![i32f("x"), i32f("y"), i32f("w"), i32f("h")]);
    Schema::new(vec![
        Field::new(col::KEY, DataType::Utf8, false),
        Field::new(col::SOURCE, DataType::Utf8, false),
        Field::new(col::SOURCE_SHA256, DataType::Utf8, false),
        i32f(col::SOURCE_WIDTH),
        i32f(col::SOURCE_HEIGHT),
        i32f(col::VARIANT),
        Field::new(col::CROP, DataType::Struct(crop), false),
        Field::new(col::FLIP, DataType::Boolean, false),
        Field::new(col::COLOR_AUG, DataType::Boolean, false),
        Field::new(col::IMAGE, DataType::Binary, false),
        i32f(col::WIDTH),
        i32f(col::HEIGHT),
        Field::new(col::LATENT, DataType::Binary, false),
        Field::new(col::LATENT_SHAPE, DataType::List(Arc::new(Field::new("item", DataType::Int32, false))), false),
        Field::new(col::LATENT_STD, DataType::Binary, true),
    ])
}

/// An input that produced no row, and why. One JSON line each in `errors.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorRecord {
    /// Same meaning as the `source` column.
    pub source: String,
    /// `list` (unlistable), `read`, `decode`, `size` (below `--min-side`), `encode` (storing the
    /// crop) or `latent` (NaN/inf in the teacher output).
    pub stage: String,
    pub reason: String,
}

/// One input a shard covers: where it came from and its size in bytes when it was listed. An
/// incremental run encodes only the inputs no finished shard covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRecord {
    /// Same meaning as the `source` column.
    pub source: String,
    pub size: u64,
}

/// The settings that define what an output folder contains. Two runs may write into one folder
/// only when these are equal; anything else would silently mix shards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputConfig {
    pub vae: VaeSpec,
    pub onnx_sha256: String,
    pub resolution: u32,
    pub variants: u32,
    pub hflip: bool,
    pub color_augment: f32,
    pub seed: u64,
    pub image_format: ImageFormat,
    pub jpeg_quality: u8,
    pub latent_dtype: LatentDtype,
    /// Source images per shard (a shard holds up to this many x `variants` rows).
    pub inputs_per_shard: u32,
    /// Sources whose short side is below this many pixels are refused (stage `size`). Folders
    /// written before the setting existed read as 0 (none refused).
    #[serde(default)]
    pub min_side: u32,
}

impl OutputConfig {
    /// Human-readable list of the fields that differ, for the refusal message.
    pub fn differences(&self, other: &OutputConfig) -> Vec<String> {
        let a = serde_json::to_value(self).expect("serialisable");
        let b = serde_json::to_value(other).expect("serialisable");
        let (a, b) = (a.as_object().unwrap(), b.as_object().unwrap());
        a.iter()
            .filter(|(k, v)| b.get(*k) != Some(*v))
            .map(|(k, v)| format!("{k}: {} -> {}", v, b.get(k).cloned().unwrap_or_default()))
            .collect()
    }
}

/// One finished shard, as listed in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub file: String,
    pub index: u32,
    pub rows: u64,
    /// Inputs (source images) this shard covers, including skipped ones.
    pub inputs: u64,
    pub errors: u64,
    /// Rows whose crop was smaller than the resolution: the source pixels were enlarged.
    #[serde(default)]
    pub upscaled: u64,
}

/// `manifest.json`, rewritten atomically as shards complete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema_version: u32,
    pub tool: String,
    /// `in_progress` or `complete`.
    pub status: String,
    pub config: OutputConfig,
    /// Path of the ONNX file the run used (informational; the sha256 in `config` is what counts).
    pub onnx_path: String,
    /// Input root and a fingerprint of the ordered input list (sources and sizes).
    pub inputs_root: String,
    pub inputs_total: u64,
    pub inputs_fingerprint: String,
    /// Shards finished plus those the latest run planned.
    pub shards_total: u32,
    /// `file` is relative to the folder: `data/shard-00000.parquet` (or `shard-00000.parquet` in
    /// folders written before the `data/` layout).
    pub shards: Vec<ShardEntry>,
    pub rows: u64,
    pub errors: u64,
    /// Rows made from enlarged crops (sum of the shards' `upscaled`).
    #[serde(default)]
    pub upscaled_rows: u64,
    /// Inputs encoded by an earlier run that the latest run no longer found under `--images`
    /// (their rows stay in the shards).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_inputs: Vec<String>,
    /// Inputs encoded by an earlier run whose size has changed since (the rows are of the old
    /// content; write to a new folder to encode the new one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed_inputs: Vec<String>,
    /// `--part i/N`: which part of a partitioned run this manifest describes (its inputs are
    /// those of the listing that fall in the part); absent for a whole run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<crate::part::Part>,
    /// Anything else worth keeping (device used, timings, ...).
    #[serde(default)]
    pub extra: HashMap<String, serde_json::Value>,
}

pub const MANIFEST_FILE: &str = "manifest.json";
pub const ERRORS_FILE: &str = "errors.jsonl";
/// The folder of an output's shards, so that the folder reads as one Parquet dataset
/// (`pyarrow.parquet.read_table("OUT/data")`). Folders written before it hold the shards beside
/// `manifest.json`.
pub const DATA_DIR: &str = "data";

/// File name of shard `index`.
pub fn shard_file_name(index: u32) -> String {
    format!("shard-{index:05}.parquet")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets::preset;

    fn cfg() -> OutputConfig {
        OutputConfig {
            vae: preset("taef2").unwrap().spec(),
            onnx_sha256: "ab".into(),
            resolution: 256,
            variants: 1,
            hflip: false,
            color_augment: 0.0,
            seed: 0,
            image_format: ImageFormat::Png,
            jpeg_quality: 95,
            latent_dtype: LatentDtype::Float16,
            inputs_per_shard: 512,
            min_side: 128,
        }
    }

    #[test]
    fn differences_name_the_changed_fields() {
        let a = cfg();
        let mut b = cfg();
        assert!(a.differences(&b).is_empty());
        b.resolution = 512;
        b.vae = preset("sdxl").unwrap().spec();
        let d = a.differences(&b);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d.iter().any(|s| s.starts_with("resolution: 256 -> 512")));
    }

    #[test]
    fn schema_has_every_column_once() {
        let s = arrow_schema();
        for c in [col::KEY, col::SOURCE, col::IMAGE, col::LATENT, col::LATENT_SHAPE, col::LATENT_STD, col::CROP] {
            assert!(s.index_of(c).is_ok(), "{c}");
        }
        assert!(s.field_with_name(col::LATENT_STD).unwrap().is_nullable());
        assert_eq!(shard_file_name(3), "shard-00003.parquet");
        assert_eq!(LatentDtype::parse("f16"), Some(LatentDtype::Float16));
    }
}
