//! The Parquet shard writer and reader, for the schema in [`taesd_schemas::shard`].
//!
//! * Columns: [`taesd_schemas::shard::arrow_schema`]; one [`ShardRow`] per row.
//! * File key-value metadata: the keys of [`taesd_schemas::shard::meta`], written from a
//!   [`ShardFileMeta`] (plus the redundant, human-friendly preset name / scale / shift / input
//!   range, so `parquet-tools meta` tells what is inside without parsing JSON).
//! * Row groups of [`ROW_GROUP_ROWS`] rows, zstd-compressed; no dictionary and no min/max
//!   statistics on the large binary columns (they would be useless and bloat the footer).
//! * [`write_shard`] and [`ShardWriter`] (the same, streaming: row groups written as rows
//!   arrive) are atomic: they write `<final>.tmp-<pid>` beside the final file, fsync it, rename
//!   it into place and fsync the folder. A reader never sees a half-written file under a final
//!   name, and [`list_shards`] never lists a temp file.
//! * Latents are stored as raw little-endian bytes of the file's [`LatentDtype`], C-major
//!   (`[C, h, w]`); [`ShardRow`] holds them as `f32`.

use anyhow::{anyhow, bail, ensure, Context, Result};
use arrow::array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Int32Array, ListArray, RecordBatch, StringArray, StructArray,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Schema, SchemaRef};
use half::f16;
use image::RgbImage;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use taesd_schemas::shard::{arrow_schema, col, meta as key};
use taesd_schemas::{ErrorRecord, ImageFormat, InputRecord, LatentDtype, VaeSpec, SCHEMA_VERSION};

use crate::policy::CropRect;

/// Rows per Parquet row group: the unit the trainer shuffles and reads at a time.
pub const ROW_GROUP_ROWS: usize = 64;

/// zstd level of every column but the image column, which holds PNG or JPEG bytes: compressed
/// already, so zstd would only spend the writer's time (it is stored uncompressed).
const ZSTD_LEVEL: i32 = 3;

/// One row of a shard: one N x N sample of one source image and its teacher latent.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardRow {
    pub key: String,
    pub source: String,
    pub source_sha256: String,
    pub source_width: u32,
    pub source_height: u32,
    pub variant: u32,
    pub crop: CropRect,
    pub flip: bool,
    pub color_aug: bool,
    /// The encoded image (PNG or JPEG, see [`ShardFileMeta::image_format`]).
    pub image: Vec<u8>,
    pub width: u32,
    pub height: u32,
    /// TAESD-scaled latent, C-major, `latent_shape` = `[C, h, w]`.
    pub latent: Vec<f32>,
    pub latent_shape: [u32; 3],
    /// Posterior std, same shape and scale as `latent`, when the teacher gives one.
    pub latent_std: Option<Vec<f32>>,
}

/// The file-level metadata of a shard.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardFileMeta {
    pub vae: VaeSpec,
    pub onnx_sha256: String,
    pub latent_dtype: LatentDtype,
    pub image_format: ImageFormat,
    /// Side N of the stored images.
    pub resolution: u32,
    pub shard_index: u32,
    /// Inputs of this shard that produced no row, and why.
    pub errors: Vec<ErrorRecord>,
    /// Every input this shard covers (`None` in shards written before the key existed).
    pub inputs: Option<Vec<InputRecord>>,
}

/// The latent columns of one row, for statistics that need no images.
#[derive(Clone, Debug, PartialEq)]
pub struct LatentRecord {
    pub latent: Vec<f32>,
    pub latent_shape: [u32; 3],
    pub latent_std: Option<Vec<f32>>,
}

// ---------------------------------------------------------------------------------------------
// Latents and images

/// `f32` values to little-endian bytes of `dtype` (f16: round to nearest even; values beyond
/// ±65504 become ±inf, which [`write_shard`] refuses).
pub fn encode_latent(v: &[f32], dtype: LatentDtype) -> Vec<u8> {
    match dtype {
        LatentDtype::Float16 => v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
        LatentDtype::Float32 => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
    }
}

/// Little-endian bytes of `dtype` back to `f32`.
pub fn decode_latent(b: &[u8], dtype: LatentDtype) -> Result<Vec<f32>> {
    let size = dtype.size();
    ensure!(
        b.len().is_multiple_of(size),
        "latent byte length {} is not a multiple of {} ({})",
        b.len(),
        size,
        dtype.as_str()
    );
    Ok(match dtype {
        LatentDtype::Float16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        LatentDtype::Float32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
    })
}

/// Encode a sample for the `image` column: PNG (lossless; `jpeg_quality` ignored) or JPEG at
/// `jpeg_quality` (1..=100).
pub fn encode_image(rgb: &RgbImage, fmt: ImageFormat, jpeg_quality: u8) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    let (w, h) = rgb.dimensions();
    match fmt {
        // Fast (fdeflate) deflate: at 512 x 512 about 8x faster than the zlib default for files
        // about 10 % larger; PNG encoding would otherwise be the slowest step of precompute.
        ImageFormat::Png => image::codecs::png::PngEncoder::new_with_quality(
            &mut out,
            image::codecs::png::CompressionType::Fast,
            image::codecs::png::FilterType::Adaptive,
        )
        .write_image(rgb.as_raw(), w, h, image::ExtendedColorType::Rgb8)
        .context("PNG encoding failed")?,
        ImageFormat::Jpeg => {
            ensure!((1..=100).contains(&jpeg_quality), "JPEG quality {jpeg_quality} is outside 1..=100");
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, jpeg_quality)
                .write_image(rgb.as_raw(), w, h, image::ExtendedColorType::Rgb8)
                .context("JPEG encoding failed")?
        }
    }
    Ok(out)
}

/// Decode an `image` cell (PNG or JPEG as written by [`encode_image`]) to RGB.
pub fn decode_stored_image(bytes: &[u8]) -> Result<RgbImage> {
    let img = image::load_from_memory(bytes).context("stored image does not decode")?;
    ensure!(!img.color().has_alpha(), "stored image has an alpha channel ({:?}); shards hold RGB", img.color());
    Ok(img.into_rgb8())
}

// ---------------------------------------------------------------------------------------------
// Writing

/// The temp file [`write_shard`] writes before renaming to `final_path`.
pub fn temp_path(final_path: &Path) -> PathBuf {
    temp_path_in(final_path, final_path.parent().unwrap_or(Path::new(".")))
}

/// The temp file for `final_path` in folder `staging` (a reader of the final folder, e.g. a
/// Parquet dataset reader, never sees it there).
pub fn temp_path_in(final_path: &Path, staging: &Path) -> PathBuf {
    let name = final_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    staging.join(format!("{name}.tmp-{}", std::process::id()))
}

/// Whether a file name is a (possibly stale) temp file of [`write_shard`].
pub fn is_temp_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.rsplit_once(".tmp-"))
        .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// The finished shards in `dir` (`shard-*.parquet`, as named by
/// [`taesd_schemas::shard::shard_file_name`]), sorted by name. Temp files are never listed.
pub fn list_shards(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list shard folder {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list shard folder {}", dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("shard-") && name.ends_with(".parquet") && entry.file_type().is_ok_and(|t| t.is_file()) {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

fn kv_pairs(meta: &ShardFileMeta) -> Result<Vec<KeyValue>> {
    let pairs: Vec<(&str, String)> = vec![
        (key::SCHEMA_VERSION, SCHEMA_VERSION.to_string()),
        (key::VAE, serde_json::to_string(&meta.vae)?),
        (key::VAE_PRESET, meta.vae.name.clone()),
        (key::SCALE, meta.vae.scaling.scale.to_string()),
        (key::SHIFT, meta.vae.scaling.shift.to_string()),
        (key::INPUT_RANGE, meta.vae.input_range.as_str().to_string()),
        (key::ONNX_SHA256, meta.onnx_sha256.clone()),
        (key::LATENT_DTYPE, meta.latent_dtype.as_str().to_string()),
        (key::IMAGE_FORMAT, meta.image_format.as_str().to_string()),
        (key::RESOLUTION, meta.resolution.to_string()),
        (key::SHARD_INDEX, meta.shard_index.to_string()),
        (key::ERRORS, serde_json::to_string(&meta.errors)?),
    ];
    let mut kv: Vec<KeyValue> = pairs.into_iter().map(|(k, v)| KeyValue::new(k.to_string(), v)).collect();
    if let Some(inputs) = &meta.inputs {
        kv.push(KeyValue::new(key::INPUTS.to_string(), serde_json::to_string(inputs)?));
    }
    Ok(kv)
}

fn writer_properties(kv: Vec<KeyValue>) -> Result<WriterProperties> {
    let mut b = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(ZSTD_LEVEL)?))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_key_value_metadata(Some(kv))
        .set_created_by(format!("taesd-data {}", env!("CARGO_PKG_VERSION")));
    for big in [col::IMAGE, col::LATENT, col::LATENT_STD] {
        b = b
            .set_column_dictionary_enabled(ColumnPath::from(big), false)
            .set_column_statistics_enabled(ColumnPath::from(big), EnabledStatistics::None);
    }
    b = b.set_column_compression(ColumnPath::from(col::IMAGE), Compression::UNCOMPRESSED);
    Ok(b.build())
}

fn to_i32(v: u32, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow!("{what} = {v} does not fit the Int32 column"))
}

/// Check a row against the file metadata before anything is written.
fn validate_row(r: &ShardRow, meta: &ShardFileMeta) -> Result<()> {
    let [c, lh, lw] = r.latent_shape;
    let n = c as usize * lh as usize * lw as usize;
    ensure!(
        r.latent.len() == n,
        "latent has {} values but latent_shape {:?} needs {n}",
        r.latent.len(),
        r.latent_shape
    );
    if let Some(std) = &r.latent_std {
        ensure!(std.len() == n, "latent_std has {} values but latent_shape {:?} needs {n}", std.len(), r.latent_shape);
    }
    ensure!(
        c as usize == meta.vae.channels,
        "latent has {c} channels but the VAE spec '{}' has {}",
        meta.vae.name,
        meta.vae.channels
    );
    ensure!(
        r.width == meta.resolution && r.height == meta.resolution,
        "image is {}x{} but the shard resolution is {}",
        r.width,
        r.height,
        meta.resolution
    );
    let d = meta.vae.downscale as u32;
    if d > 0 {
        ensure!(
            lh * d == r.height && lw * d == r.width,
            "latent is {lh}x{lw} but a {}x{} image with downscale {d} gives {}x{}",
            r.width,
            r.height,
            r.height / d,
            r.width / d
        );
    }
    ensure!(!r.image.is_empty(), "image bytes are empty");
    let limit = match meta.latent_dtype {
        LatentDtype::Float16 => f16::MAX.to_f32(),
        LatentDtype::Float32 => f32::MAX,
    };
    for (name, v) in std::iter::once(("latent", &r.latent)).chain(r.latent_std.as_ref().map(|s| ("latent_std", s))) {
        if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite() || x.abs() > limit) {
            bail!("{name}[{i}] = {x} is not a finite {} value", meta.latent_dtype.as_str());
        }
    }
    for (v, what) in [
        (r.source_width, "source_width"),
        (r.source_height, "source_height"),
        (r.variant, "variant"),
        (r.crop.x, "crop.x"),
        (r.crop.y, "crop.y"),
        (r.crop.w, "crop.w"),
        (r.crop.h, "crop.h"),
        (r.width, "width"),
        (r.height, "height"),
        (c, "latent_shape[0]"),
        (lh, "latent_shape[1]"),
        (lw, "latent_shape[2]"),
    ] {
        to_i32(v, what)?;
    }
    Ok(())
}

/// One Arrow record batch from rows (already validated).
fn rows_to_batch(schema: &SchemaRef, rows: &[ShardRow], dtype: LatentDtype) -> Result<RecordBatch> {
    let i32col = |f: &dyn Fn(&ShardRow) -> u32| -> ArrayRef {
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| f(r) as i32)))
    };
    let DataType::Struct(crop_fields) = schema.field_with_name(col::CROP)?.data_type().clone() else {
        bail!("schema: crop is not a struct");
    };
    let crop = StructArray::try_new(
        crop_fields,
        vec![i32col(&|r| r.crop.x), i32col(&|r| r.crop.y), i32col(&|r| r.crop.w), i32col(&|r| r.crop.h)],
        None,
    )?;
    let DataType::List(item_field) = schema.field_with_name(col::LATENT_SHAPE)?.data_type().clone() else {
        bail!("schema: latent_shape is not a list");
    };
    let shape_values = Int32Array::from_iter_values(rows.iter().flat_map(|r| r.latent_shape.map(|v| v as i32)));
    let shapes = ListArray::try_new(
        item_field,
        OffsetBuffer::from_lengths(rows.iter().map(|_| 3)),
        Arc::new(shape_values),
        None,
    )?;
    let latents: Vec<Vec<u8>> = rows.iter().map(|r| encode_latent(&r.latent, dtype)).collect();
    let stds: Vec<Option<Vec<u8>>> =
        rows.iter().map(|r| r.latent_std.as_ref().map(|s| encode_latent(s, dtype))).collect();

    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.key.as_str()))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.source.as_str()))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.source_sha256.as_str()))),
        i32col(&|r| r.source_width),
        i32col(&|r| r.source_height),
        i32col(&|r| r.variant),
        Arc::new(crop),
        Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(r.flip)))),
        Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(r.color_aug)))),
        Arc::new(BinaryArray::from_iter_values(rows.iter().map(|r| r.image.as_slice()))),
        i32col(&|r| r.width),
        i32col(&|r| r.height),
        Arc::new(BinaryArray::from_iter_values(latents.iter())),
        Arc::new(shapes),
        Arc::new(BinaryArray::from_iter(stds.iter().map(|s| s.as_deref()))),
    ];
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// Write `rows` and `meta` as one shard file at `final_path`, atomically (see the module
/// documentation). Zero rows give a valid, empty shard that still carries `meta.errors`.
/// Rows are validated (latent length vs shape, channels and spatial size vs the VAE spec and
/// resolution, finite values within the dtype's range); an invalid row leaves nothing behind.
/// A [`ShardWriter`] with all rows at once.
pub fn write_shard(final_path: &Path, rows: &[ShardRow], meta: &ShardFileMeta) -> Result<()> {
    let mut w = ShardWriter::create(final_path, meta)?;
    for (i, r) in rows.iter().enumerate() {
        w.validate(i as u64, r)?;
    }
    for group in rows.chunks(ROW_GROUP_ROWS) {
        w.write_group(group)?;
    }
    w.finish(&meta.errors, meta.inputs.as_deref())
}

/// One shard written while its rows arrive: each complete row group ([`ROW_GROUP_ROWS`] rows)
/// goes to the temp file at once, so memory holds at most one row group and, when the last row
/// is in, only that row group and the footer are left to write. [`ShardWriter::finish`] adds the
/// shard's errors and inputs (known only then) to the footer's key-value metadata, fsyncs and
/// renames the file into place; a writer dropped unfinished (an error, a stop) deletes its temp
/// file. Rows are validated as they are pushed, with the same checks and messages as
/// [`write_shard`].
pub struct ShardWriter {
    final_path: PathBuf,
    tmp: PathBuf,
    meta: ShardFileMeta,
    schema: SchemaRef,
    /// `None` once finished.
    writer: Option<ArrowWriter<File>>,
    pending: Vec<ShardRow>,
    written: u64,
}

impl ShardWriter {
    /// Start the shard `final_path` (its temp file beside it) for rows matching `meta`;
    /// `meta.errors` and `meta.inputs` are not used (see [`ShardWriter::finish`]).
    pub fn create(final_path: &Path, meta: &ShardFileMeta) -> Result<ShardWriter> {
        Self::create_staged(final_path, final_path.parent().unwrap_or(Path::new(".")), meta)
    }

    /// [`ShardWriter::create`] with the temp file in folder `staging` (same file system), so that
    /// the final folder only ever holds finished shards.
    pub fn create_staged(final_path: &Path, staging: &Path, meta: &ShardFileMeta) -> Result<ShardWriter> {
        // The same key-value pairs also go on the Arrow schema, so that pyarrow's
        // `read_table(f).schema.metadata` shows them, not only the Parquet footer. All but the
        // errors and inputs: the Arrow schema is fixed when the file starts (see docs/format.md).
        let kv: Vec<KeyValue> =
            kv_pairs(meta)?.into_iter().filter(|p| p.key != key::ERRORS && p.key != key::INPUTS).collect();
        let schema_kv: HashMap<String, String> =
            kv.iter().filter_map(|p| p.value.clone().map(|v| (p.key.clone(), v))).collect();
        let schema: SchemaRef = Arc::new(arrow_schema().with_metadata(schema_kv));
        let props = writer_properties(kv)?;
        let tmp = temp_path_in(final_path, staging);
        let file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let writer = match ArrowWriter::try_new(file, schema.clone(), Some(props)) {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e).with_context(|| format!("writing shard {}", final_path.display()));
            }
        };
        Ok(ShardWriter {
            final_path: final_path.to_path_buf(),
            tmp,
            meta: meta.clone(),
            schema,
            writer: Some(writer),
            pending: Vec::with_capacity(ROW_GROUP_ROWS),
            written: 0,
        })
    }

    /// Rows pushed so far.
    pub fn rows(&self) -> u64 {
        self.written + self.pending.len() as u64
    }

    /// Add one row (validated first); a full row group is written at once.
    pub fn push(&mut self, row: ShardRow) -> Result<()> {
        self.validate(self.rows(), &row)?;
        self.pending.push(row);
        if self.pending.len() >= ROW_GROUP_ROWS {
            self.write_pending()?;
        }
        Ok(())
    }

    /// `row`, the shard's row `i`, against the shard's metadata.
    fn validate(&self, i: u64, row: &ShardRow) -> Result<()> {
        validate_row(row, &self.meta).with_context(|| {
            format!(
                "shard {}: row {i} (source {:?}, variant {}) is invalid",
                self.final_path.display(),
                row.source,
                row.variant
            )
        })
    }

    fn write_pending(&mut self) -> Result<()> {
        let rows = std::mem::take(&mut self.pending);
        self.write_group(&rows)?;
        self.pending = rows;
        self.pending.clear();
        Ok(())
    }

    /// Write validated `rows` as one row group (nothing for none).
    fn write_group(&mut self, rows: &[ShardRow]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let w =
            self.writer.as_mut().ok_or_else(|| anyhow!("shard {} is already finished", self.final_path.display()))?;
        let batch = rows_to_batch(&self.schema, rows, self.meta.latent_dtype)?;
        w.write(&batch)
            .and_then(|()| w.flush())
            .with_context(|| format!("writing shard {}", self.final_path.display()))?;
        self.written += rows.len() as u64;
        Ok(())
    }

    /// Write what is left, the footer with `errors` (the shard's inputs that gave no row) and
    /// `inputs` (every input it covers), fsync, and rename the file into place (then fsync the
    /// folder). On failure nothing is left behind.
    pub fn finish(mut self, errors: &[ErrorRecord], inputs: Option<&[InputRecord]>) -> Result<()> {
        let result = self.finish_inner(errors, inputs);
        if result.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        result.with_context(|| format!("writing shard {}", self.final_path.display()))
    }

    fn finish_inner(&mut self, errors: &[ErrorRecord], inputs: Option<&[InputRecord]>) -> Result<()> {
        self.write_pending()?;
        let mut w = self.writer.take().ok_or_else(|| anyhow!("already finished"))?;
        w.append_key_value_metadata(KeyValue::new(key::ERRORS.to_string(), serde_json::to_string(errors)?));
        if let Some(inputs) = inputs {
            w.append_key_value_metadata(KeyValue::new(key::INPUTS.to_string(), serde_json::to_string(inputs)?));
        }
        let file = w.into_inner()?;
        file.sync_all().with_context(|| format!("fsync {}", self.tmp.display()))?;
        std::fs::rename(&self.tmp, &self.final_path)
            .with_context(|| format!("cannot rename {} to {}", self.tmp.display(), self.final_path.display()))?;
        sync_parent_dir(&self.final_path)
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if let Some(w) = self.writer.take() {
            drop(w);
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Make a rename in `path`'s folder durable.
fn sync_parent_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    #[cfg(unix)]
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("fsync folder {}", dir.display()))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Reading

/// An opened, validated shard. Cheap to keep open: it holds the parsed footer, not the data.
pub struct ShardReader {
    path: PathBuf,
    meta: ShardFileMeta,
    arrow_meta: ArrowReaderMetadata,
}

impl std::fmt::Debug for ShardReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardReader").field("path", &self.path).field("rows", &self.num_rows()).finish()
    }
}

fn parse_meta(kv: &HashMap<String, String>) -> Result<ShardFileMeta> {
    let get = |k: &str| kv.get(k).map(String::as_str).ok_or_else(|| anyhow!("missing key-value metadata '{k}'"));
    let num = |k: &str| -> Result<u32> {
        let v = get(k)?;
        v.trim().parse().map_err(|_| anyhow!("metadata '{k}' = {v:?} is not a number"))
    };
    let version = get(key::SCHEMA_VERSION).context("not a taesd shard")?;
    ensure!(
        version.trim() == SCHEMA_VERSION.to_string(),
        "shard schema version {version} is not supported (this build reads version {SCHEMA_VERSION})"
    );
    let vae: VaeSpec = serde_json::from_str(get(key::VAE)?).context("metadata 'taesd.vae' is not a valid VAE spec")?;
    let dtype_s = get(key::LATENT_DTYPE)?;
    let latent_dtype = LatentDtype::parse(dtype_s).ok_or_else(|| anyhow!("unknown latent dtype {dtype_s:?}"))?;
    let fmt_s = get(key::IMAGE_FORMAT)?;
    let image_format: ImageFormat = serde_json::from_value(serde_json::Value::String(fmt_s.to_string()))
        .map_err(|_| anyhow!("unknown image format {fmt_s:?}"))?;
    let errors: Vec<ErrorRecord> =
        serde_json::from_str(get(key::ERRORS)?).context("metadata 'taesd.errors' is not a list of error records")?;
    let inputs: Option<Vec<InputRecord>> = kv
        .get(key::INPUTS)
        .map(|v| serde_json::from_str(v).context("metadata 'taesd.inputs' is not a list of input records"))
        .transpose()?;
    Ok(ShardFileMeta {
        vae,
        onnx_sha256: get(key::ONNX_SHA256)?.to_string(),
        latent_dtype,
        image_format,
        resolution: num(key::RESOLUTION)?,
        shard_index: num(key::SHARD_INDEX)?,
        errors,
        inputs,
    })
}

/// The columns the file must have, with their types (nullability and field metadata aside).
fn check_schema(found: &Schema) -> Result<()> {
    for want in arrow_schema().fields() {
        let got = found.field_with_name(want.name()).map_err(|_| anyhow!("column '{}' is missing", want.name()))?;
        ensure!(
            got.data_type().equals_datatype(want.data_type()),
            "column '{}' has type {} but the schema says {}",
            want.name(),
            got.data_type(),
            want.data_type()
        );
    }
    Ok(())
}

/// Every column chunk the footer lists lies inside the file (the reader allocates a chunk's
/// declared size before reading it: a damaged footer must not make it ask for terabytes), and the
/// row counts are not negative.
fn check_chunks(m: &parquet::file::metadata::ParquetMetaData, file_len: u64) -> Result<()> {
    ensure!(m.file_metadata().num_rows() >= 0, "the footer gives a negative row count");
    for (g, rg) in m.row_groups().iter().enumerate() {
        ensure!(rg.num_rows() >= 0, "row group {g}: the footer gives a negative row count");
        for c in rg.columns() {
            let (start, n) = c.byte_range();
            ensure!(
                start.checked_add(n).is_some_and(|end| end <= file_len),
                "row group {g}: column '{}' claims bytes {start}..{} of a {file_len}-byte file (a damaged footer)",
                c.column_path(),
                start.saturating_add(n)
            );
        }
    }
    Ok(())
}

impl ShardReader {
    /// Open a shard: reads the footer, checks the schema version, metadata and columns, and that
    /// the footer's column chunks lie inside the file.
    pub fn open(path: &Path) -> Result<ShardReader> {
        let ctx = || format!("shard {}", path.display());
        let file = File::open(path).with_context(|| format!("cannot open shard {}", path.display()))?;
        let arrow_meta = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new())
            .context("not a readable Parquet file (truncated or not Parquet)")
            .with_context(ctx)?;
        let kv: HashMap<String, String> = arrow_meta
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .map(|v| v.iter().filter_map(|k| Some((k.key.clone(), k.value.clone()?))).collect())
            .unwrap_or_default();
        let meta = parse_meta(&kv).with_context(ctx)?;
        check_schema(arrow_meta.schema()).with_context(ctx)?;
        let len = file.metadata().with_context(|| format!("cannot read the size of shard {}", path.display()))?.len();
        check_chunks(arrow_meta.metadata(), len).with_context(ctx)?;
        Ok(ShardReader { path: path.to_path_buf(), meta, arrow_meta })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn meta(&self) -> &ShardFileMeta {
        &self.meta
    }

    pub fn num_rows(&self) -> u64 {
        self.arrow_meta.metadata().file_metadata().num_rows().max(0) as u64
    }

    pub fn num_row_groups(&self) -> usize {
        self.arrow_meta.metadata().num_row_groups()
    }

    /// Rows in row group `i`.
    pub fn row_group_num_rows(&self, i: usize) -> Option<u64> {
        (i < self.num_row_groups()).then(|| self.arrow_meta.metadata().row_group(i).num_rows().max(0) as u64)
    }

    fn builder(&self) -> Result<ParquetRecordBatchReaderBuilder<File>> {
        let file = File::open(&self.path).with_context(|| format!("cannot open shard {}", self.path.display()))?;
        Ok(ParquetRecordBatchReaderBuilder::new_with_metadata(file, self.arrow_meta.clone())
            .with_batch_size(ROW_GROUP_ROWS))
    }

    /// Every row, in file order.
    pub fn read_all(&self) -> Result<Vec<ShardRow>> {
        self.rows()?.collect()
    }

    /// Rows of row group `i` (0-based).
    pub fn read_row_group(&self, i: usize) -> Result<Vec<ShardRow>> {
        ensure!(
            i < self.num_row_groups(),
            "shard {}: row group {i} does not exist (the file has {})",
            self.path.display(),
            self.num_row_groups()
        );
        let reader = self.builder()?.with_row_groups(vec![i]).build()?;
        let mut out = Vec::new();
        for batch in reader {
            let batch = batch.with_context(|| format!("shard {}: reading row group {i}", self.path.display()))?;
            out.extend(
                batch_to_rows(&batch, self.meta.latent_dtype)
                    .with_context(|| format!("shard {}", self.path.display()))?,
            );
        }
        Ok(out)
    }

    /// Streams the rows, one record batch (at most [`ROW_GROUP_ROWS`] rows) in memory at a time.
    pub fn rows(&self) -> Result<impl Iterator<Item = Result<ShardRow>> + Send + 'static> {
        let reader = self.builder()?.build()?;
        let (path, dtype) = (self.path.clone(), self.meta.latent_dtype);
        Ok(reader.flat_map(move |batch| {
            let rows = batch
                .map_err(anyhow::Error::from)
                .and_then(|b| batch_to_rows(&b, dtype))
                .with_context(|| format!("shard {}", path.display()));
            let (ok, err) = match rows {
                Ok(rows) => (rows, None),
                Err(e) => (Vec::new(), Some(Err(e))),
            };
            ok.into_iter().map(Ok).chain(err)
        }))
    }

    /// A reader of only the named top-level columns.
    fn projected(&self, columns: &[&str]) -> Result<parquet::arrow::arrow_reader::ParquetRecordBatchReader> {
        let schema = self.arrow_meta.schema();
        let roots: Vec<usize> = columns.iter().map(|c| schema.index_of(c)).collect::<std::result::Result<_, _>>()?;
        let mask = ProjectionMask::roots(self.arrow_meta.parquet_schema(), roots);
        Ok(self.builder()?.with_projection(mask).build()?)
    }

    /// The `source` of every row, in file order (only that column is read).
    pub fn sources(&self) -> Result<Vec<String>> {
        let mut out = Vec::with_capacity(self.num_rows() as usize);
        for batch in self.projected(&[col::SOURCE])? {
            let batch = batch.with_context(|| format!("shard {}: reading the source column", self.path.display()))?;
            out.extend(column::<StringArray>(&batch, col::SOURCE)?.iter().map(|s| s.unwrap_or_default().to_string()));
        }
        Ok(out)
    }

    /// The `crop` of every row, in file order (only that column is read).
    pub fn crops(&self) -> Result<Vec<CropRect>> {
        let mut out = Vec::with_capacity(self.num_rows() as usize);
        for batch in self.projected(&[col::CROP])? {
            let batch = batch.with_context(|| format!("shard {}: reading the crop column", self.path.display()))?;
            let crop = column::<StructArray>(&batch, col::CROP)?;
            let f = |name: &str| -> Result<&Int32Array> {
                crop.column_by_name(name)
                    .and_then(|c| c.as_any().downcast_ref::<Int32Array>())
                    .ok_or_else(|| anyhow!("crop field '{name}' is missing or not Int32"))
            };
            let (x, y, w, h) = (f("x")?, f("y")?, f("w")?, f("h")?);
            for i in 0..batch.num_rows() {
                out.push(CropRect {
                    x: u32_at(x, i, "crop.x")?,
                    y: u32_at(y, i, "crop.y")?,
                    w: u32_at(w, i, "crop.w")?,
                    h: u32_at(h, i, "crop.h")?,
                });
            }
        }
        Ok(out)
    }

    /// Streams only the latent columns (the images are not even read from disk).
    pub fn latents(&self) -> Result<impl Iterator<Item = Result<LatentRecord>> + Send + 'static> {
        let reader = self.projected(&[col::LATENT, col::LATENT_SHAPE, col::LATENT_STD])?;
        let (path, dtype) = (self.path.clone(), self.meta.latent_dtype);
        Ok(reader.flat_map(move |batch| {
            let recs = batch
                .map_err(anyhow::Error::from)
                .and_then(|b| batch_to_latents(&b, dtype))
                .with_context(|| format!("shard {}", path.display()));
            let (ok, err) = match recs {
                Ok(r) => (r, None),
                Err(e) => (Vec::new(), Some(Err(e))),
            };
            ok.into_iter().map(Ok).chain(err)
        }))
    }
}

fn column<'a, T: Array + 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a T> {
    batch
        .column_by_name(name)
        .ok_or_else(|| anyhow!("column '{name}' is missing"))?
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| anyhow!("column '{name}' has an unexpected type"))
}

fn u32_at(a: &Int32Array, i: usize, name: &str) -> Result<u32> {
    let v = a.value(i);
    u32::try_from(v).map_err(|_| anyhow!("column '{name}' row {i} is negative ({v})"))
}

fn shape_at(shapes: &ListArray, i: usize) -> Result<[u32; 3]> {
    let v = shapes.value(i);
    let v = v.as_any().downcast_ref::<Int32Array>().ok_or_else(|| anyhow!("latent_shape items are not Int32"))?;
    ensure!(v.len() == 3, "latent_shape of row {i} has {} entries, not 3", v.len());
    let mut s = [0u32; 3];
    for (k, out) in s.iter_mut().enumerate() {
        *out = u32_at(v, k, col::LATENT_SHAPE)?;
    }
    Ok(s)
}

fn latent_at(bytes: &[u8], shape: [u32; 3], dtype: LatentDtype, i: usize, name: &str) -> Result<Vec<f32>> {
    let v = decode_latent(bytes, dtype).with_context(|| format!("row {i}: column '{name}'"))?;
    let n = shape.iter().map(|&d| d as usize).product::<usize>();
    ensure!(v.len() == n, "row {i}: '{name}' has {} values but latent_shape {shape:?} needs {n}", v.len());
    Ok(v)
}

fn batch_to_latents(batch: &RecordBatch, dtype: LatentDtype) -> Result<Vec<LatentRecord>> {
    let latent = column::<BinaryArray>(batch, col::LATENT)?;
    let shapes = column::<ListArray>(batch, col::LATENT_SHAPE)?;
    let std = column::<BinaryArray>(batch, col::LATENT_STD)?;
    (0..batch.num_rows())
        .map(|i| {
            let shape = shape_at(shapes, i)?;
            Ok(LatentRecord {
                latent: latent_at(latent.value(i), shape, dtype, i, col::LATENT)?,
                latent_shape: shape,
                latent_std: if std.is_null(i) {
                    None
                } else {
                    Some(latent_at(std.value(i), shape, dtype, i, col::LATENT_STD)?)
                },
            })
        })
        .collect()
}

fn batch_to_rows(batch: &RecordBatch, dtype: LatentDtype) -> Result<Vec<ShardRow>> {
    let s = |n| column::<StringArray>(batch, n);
    let n = |name| column::<Int32Array>(batch, name);
    let (keys, sources, shas) = (s(col::KEY)?, s(col::SOURCE)?, s(col::SOURCE_SHA256)?);
    let (sw, sh, variant, width, height) =
        (n(col::SOURCE_WIDTH)?, n(col::SOURCE_HEIGHT)?, n(col::VARIANT)?, n(col::WIDTH)?, n(col::HEIGHT)?);
    let crop = column::<StructArray>(batch, col::CROP)?;
    let crop_col = |f: &str| -> Result<&Int32Array> {
        crop.column_by_name(f)
            .and_then(|c| c.as_any().downcast_ref::<Int32Array>())
            .ok_or_else(|| anyhow!("crop field '{f}' is missing or not Int32"))
    };
    let (cx, cy, cw, ch) = (crop_col("x")?, crop_col("y")?, crop_col("w")?, crop_col("h")?);
    let flip = column::<BooleanArray>(batch, col::FLIP)?;
    let color_aug = column::<BooleanArray>(batch, col::COLOR_AUG)?;
    let image = column::<BinaryArray>(batch, col::IMAGE)?;
    let latents = batch_to_latents(batch, dtype)?;
    latents
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            Ok(ShardRow {
                key: keys.value(i).to_string(),
                source: sources.value(i).to_string(),
                source_sha256: shas.value(i).to_string(),
                source_width: u32_at(sw, i, col::SOURCE_WIDTH)?,
                source_height: u32_at(sh, i, col::SOURCE_HEIGHT)?,
                variant: u32_at(variant, i, col::VARIANT)?,
                crop: CropRect {
                    x: u32_at(cx, i, "crop.x")?,
                    y: u32_at(cy, i, "crop.y")?,
                    w: u32_at(cw, i, "crop.w")?,
                    h: u32_at(ch, i, "crop.h")?,
                },
                flip: flip.value(i),
                color_aug: color_aug.value(i),
                image: image.value(i).to_vec(),
                width: u32_at(width, i, col::WIDTH)?,
                height: u32_at(height, i, col::HEIGHT)?,
                latent: l.latent,
                latent_shape: l.latent_shape,
                latent_std: l.latent_std,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::Field;
    use taesd_schemas::preset;

    fn meta(dtype: LatentDtype) -> ShardFileMeta {
        ShardFileMeta {
            vae: preset("sdxl").unwrap().spec(),
            onnx_sha256: "ab".repeat(32),
            latent_dtype: dtype,
            image_format: ImageFormat::Png,
            resolution: 16,
            shard_index: 7,
            errors: vec![ErrorRecord {
                source: "bad.jpg".into(),
                stage: "decode".into(),
                reason: "truncated JPEG file: ...".into(),
            }],
            inputs: Some(vec![
                InputRecord { source: "bad.jpg".into(), size: 123 },
                InputRecord { source: "dir/k0.jpg".into(), size: 4567 },
            ]),
        }
    }

    fn row(i: u32, with_std: bool) -> ShardRow {
        let img = RgbImage::from_fn(16, 16, |x, y| image::Rgb([(x * 16) as u8, (y * 16) as u8, (i * 40) as u8]));
        // Values exactly representable in f16, so both dtypes round-trip exactly.
        let latent: Vec<f32> = (0..4 * 2 * 2).map(|k| (k as f32 - 8.0) * 0.25 + i as f32).collect();
        ShardRow {
            key: format!("k{i}"),
            source: format!("dir/k{i}.jpg"),
            source_sha256: format!("{i:064x}"),
            source_width: 300 + i,
            source_height: 200,
            variant: i % 3,
            crop: CropRect { x: i, y: 0, w: 200, h: 200 },
            flip: i.is_multiple_of(2),
            color_aug: i.is_multiple_of(5),
            image: encode_image(&img, ImageFormat::Png, 95).unwrap(),
            width: 16,
            height: 16,
            latent_std: with_std.then(|| latent.iter().map(|v| v.abs() * 0.5).collect()),
            latent,
            latent_shape: [4, 2, 2],
        }
    }

    #[test]
    fn reader_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ShardReader>();
        assert_send_sync::<ShardRow>();
    }

    #[test]
    fn latent_encoding_round_trips() {
        let v = [0.0f32, -1.5, 3.25, 65504.0, -0.000061035156, 1e-8];
        let f32s = decode_latent(&encode_latent(&v, LatentDtype::Float32), LatentDtype::Float32).unwrap();
        assert_eq!(f32s, v);
        let b16 = encode_latent(&v, LatentDtype::Float16);
        assert_eq!(b16.len(), 12);
        assert_eq!(&b16[2..4], &[0x00, 0xBE], "-1.5 as little-endian f16");
        let f16s = decode_latent(&b16, LatentDtype::Float16).unwrap();
        assert_eq!(&f16s[..5], &v[..5]);
        assert!(f16s[5].abs() < 1e-7);
        assert!(decode_latent(&[1, 2, 3], LatentDtype::Float16).unwrap_err().to_string().contains("multiple of 2"));
    }

    #[test]
    fn images_round_trip() {
        let img = RgbImage::from_fn(33, 20, |x, y| image::Rgb([x as u8 * 7, y as u8 * 11, (x + y) as u8]));
        let png = encode_image(&img, ImageFormat::Png, 0).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        assert_eq!(decode_stored_image(&png).unwrap(), img);
        let jpg = encode_image(&img, ImageFormat::Jpeg, 95).unwrap();
        assert_eq!(&jpg[..2], &[0xFF, 0xD8]);
        let back = decode_stored_image(&jpg).unwrap();
        assert_eq!(back.dimensions(), (33, 20));
        assert!(encode_image(&img, ImageFormat::Jpeg, 0).is_err());
        assert!(decode_stored_image(b"nope").is_err());
    }

    #[test]
    fn round_trip_rows_and_metadata() {
        for dtype in [LatentDtype::Float16, LatentDtype::Float32] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("shard-00007.parquet");
            let rows: Vec<ShardRow> = (0..150).map(|i| row(i, i % 4 != 0)).collect();
            let m = meta(dtype);
            write_shard(&path, &rows, &m).unwrap();

            let r = ShardReader::open(&path).unwrap();
            assert_eq!(r.meta(), &m);
            assert_eq!(r.num_rows(), 150);
            assert_eq!(r.num_row_groups(), 3, "64 + 64 + 22");
            assert_eq!(r.row_group_num_rows(2), Some(22));
            assert_eq!(r.read_all().unwrap(), rows, "{dtype:?}");
            assert_eq!(r.read_row_group(1).unwrap(), rows[64..128].to_vec());
            assert!(r.read_row_group(3).unwrap_err().to_string().contains("does not exist"));
            let streamed: Vec<ShardRow> = r.rows().unwrap().map(Result::unwrap).collect();
            assert_eq!(streamed, rows);
            assert_eq!(r.sources().unwrap(), rows.iter().map(|r| r.source.clone()).collect::<Vec<_>>());
            assert_eq!(r.crops().unwrap(), rows.iter().map(|r| r.crop).collect::<Vec<_>>());
            let lat: Vec<LatentRecord> = r.latents().unwrap().map(Result::unwrap).collect();
            assert_eq!(lat.len(), 150);
            assert_eq!(lat[5].latent, rows[5].latent);
            assert_eq!(lat[4].latent_std, None);
            assert_eq!(lat[5].latent_std, rows[5].latent_std);
            assert_eq!(decode_stored_image(&rows[3].image).unwrap().dimensions(), (16, 16));
            assert_eq!(list_shards(dir.path()).unwrap(), vec![path.clone()]);
            // No temp file left behind.
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        }
    }

    #[test]
    fn zero_row_shard_is_valid_and_keeps_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard-00000.parquet");
        let m = meta(LatentDtype::Float16);
        write_shard(&path, &[], &m).unwrap();
        let r = ShardReader::open(&path).unwrap();
        assert_eq!(r.num_rows(), 0);
        assert_eq!(r.num_row_groups(), 0);
        assert_eq!(r.meta().errors, m.errors);
        assert!(r.read_all().unwrap().is_empty());
        assert_eq!(r.rows().unwrap().count(), 0);
    }

    #[test]
    fn key_value_metadata_is_readable_by_plain_parquet() {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard-00001.parquet");
        write_shard(&path, &[row(1, false)], &meta(LatentDtype::Float16)).unwrap();
        let reader = SerializedFileReader::new(File::open(&path).unwrap()).unwrap();
        let kv: HashMap<String, Option<String>> = reader
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .unwrap()
            .iter()
            .map(|k| (k.key.clone(), k.value.clone()))
            .collect();
        let get = |k: &str| kv.get(k).cloned().flatten().unwrap_or_else(|| panic!("missing {k}"));
        assert_eq!(get(key::SCHEMA_VERSION), SCHEMA_VERSION.to_string());
        assert_eq!(get(key::VAE_PRESET), "sdxl");
        assert_eq!(get(key::SCALE), "0.13025");
        assert_eq!(get(key::SHIFT), "0");
        assert_eq!(get(key::INPUT_RANGE), "-1,1");
        assert_eq!(get(key::LATENT_DTYPE), "float16");
        assert_eq!(get(key::IMAGE_FORMAT), "png");
        assert_eq!(get(key::RESOLUTION), "16");
        assert_eq!(get(key::SHARD_INDEX), "7");
        let errors: Vec<ErrorRecord> = serde_json::from_str(&get(key::ERRORS)).unwrap();
        assert_eq!(errors[0].source, "bad.jpg");
        let vae: VaeSpec = serde_json::from_str(&get(key::VAE)).unwrap();
        assert_eq!(vae, preset("sdxl").unwrap().spec());
        // zstd everywhere but on the (PNG) image column, no statistics on the image column.
        let rg = reader.metadata().row_group(0);
        for c in rg.columns() {
            if c.column_path().string() == col::IMAGE {
                assert_eq!(c.compression(), Compression::UNCOMPRESSED);
            } else {
                assert!(matches!(c.compression(), Compression::ZSTD(_)), "{:?}", c.column_path());
            }
        }
        let image_col = rg.columns().iter().find(|c| c.column_path().string() == col::IMAGE).unwrap();
        assert!(image_col.statistics().is_none_or(|s| s.min_bytes_opt().is_none()));
    }

    #[test]
    fn shard_writer_streams_row_groups_and_finishes_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard-00007.parquet");
        let m = meta(LatentDtype::Float16);
        let rows: Vec<ShardRow> = (0..150).map(|i| row(i, i % 2 == 0)).collect();
        let mut w = ShardWriter::create(&path, &m).unwrap();
        for r in &rows[..130] {
            w.push(r.clone()).unwrap();
        }
        // Two full row groups are on disk already, under the temp name only.
        assert_eq!(w.rows(), 130);
        assert!(!path.exists());
        let tmp = temp_path(&path);
        let on_disk = std::fs::metadata(&tmp).unwrap().len();
        let one_image = rows[0].image.len() as u64;
        assert!(on_disk > 128 * one_image, "{on_disk} bytes on disk after 130 rows");
        for r in &rows[130..] {
            w.push(r.clone()).unwrap();
        }
        w.finish(&m.errors, m.inputs.as_deref()).unwrap();
        assert!(!tmp.exists());
        let r = ShardReader::open(&path).unwrap();
        assert_eq!(r.num_rows(), 150);
        assert_eq!(
            (0..r.num_row_groups()).map(|i| r.row_group_num_rows(i).unwrap()).collect::<Vec<_>>(),
            vec![64, 64, 22]
        );
        assert_eq!(r.read_all().unwrap(), rows);
        assert_eq!(r.meta(), &m, "metadata incl. the errors added at the end");
    }

    #[test]
    fn unfinished_shard_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard-00001.parquet");
        let m = meta(LatentDtype::Float32);
        let mut w = ShardWriter::create(&path, &m).unwrap();
        for i in 0..70 {
            w.push(row(i, true)).unwrap();
        }
        drop(w); // a failed run: the temp file goes, no shard appears
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // A row that fails validation mid-shard: the error names the row, nothing is left.
        let mut w = ShardWriter::create(&path, &m).unwrap();
        w.push(row(0, true)).unwrap();
        let mut bad = row(1, true);
        bad.latent.pop();
        let e = format!("{:#}", w.push(bad).unwrap_err());
        assert!(e.contains("row 1") && e.contains("shard-00001"), "{e}");
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn crashed_temp_file_is_never_a_shard() {
        let dir = tempfile::tempdir().unwrap();
        let final_path = dir.path().join("shard-00002.parquet");
        // A complete write, then a crash mid-way through rewriting the same shard: the temp file
        // holds the first half of a valid file.
        write_shard(&final_path, &[row(1, true), row(2, true)], &meta(LatentDtype::Float32)).unwrap();
        let bytes = std::fs::read(&final_path).unwrap();
        std::fs::remove_file(&final_path).unwrap();
        let stale = dir.path().join("shard-00002.parquet.tmp-99999");
        std::fs::write(&stale, &bytes[..bytes.len() / 2]).unwrap();
        assert!(is_temp_file(&stale));
        assert!(!is_temp_file(&final_path));
        assert!(list_shards(dir.path()).unwrap().is_empty(), "a temp file must not be listed");
        let e = ShardReader::open(&stale).unwrap_err();
        assert!(format!("{e:#}").contains("shard-00002.parquet.tmp-99999"), "{e:#}");
        assert!(format!("{e:#}").contains("not a readable Parquet file"), "{e:#}");
        // Writing the shard again succeeds; the stale file of another pid is left alone.
        write_shard(&final_path, &[row(1, true)], &meta(LatentDtype::Float32)).unwrap();
        assert_eq!(list_shards(dir.path()).unwrap(), vec![final_path.clone()]);
        assert!(stale.exists());
        assert_eq!(temp_path(&final_path).parent(), final_path.parent());
        assert!(is_temp_file(&temp_path(&final_path)));
    }

    #[test]
    fn invalid_rows_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard-00003.parquet");
        let m = meta(LatentDtype::Float16);
        let cases: Vec<(ShardRow, &str)> = vec![
            (ShardRow { latent: vec![0.0; 3], ..row(0, false) }, "needs 16"),
            (ShardRow { latent_std: Some(vec![0.0; 2]), ..row(0, false) }, "latent_std has 2"),
            (
                ShardRow {
                    latent: {
                        let mut l = row(0, false).latent;
                        l[3] = f32::NAN;
                        l
                    },
                    ..row(0, false)
                },
                "latent[3] = NaN",
            ),
            (
                ShardRow {
                    latent: {
                        let mut l = row(0, false).latent;
                        l[0] = 1e6;
                        l
                    },
                    ..row(0, false)
                },
                "float16",
            ),
            (ShardRow { width: 32, ..row(0, false) }, "resolution is 16"),
            (ShardRow { latent_shape: [4, 4, 1], ..row(0, false) }, "downscale 8"),
            (ShardRow { latent_shape: [2, 2, 4], ..row(0, false) }, "has 2 channels"),
            (ShardRow { crop: CropRect { x: u32::MAX, y: 0, w: 1, h: 1 }, ..row(0, false) }, "crop.x"),
        ];
        for (bad, want) in cases {
            let e = write_shard(&path, &[row(1, false), bad], &m).unwrap_err();
            let msg = format!("{e:#}");
            assert!(msg.contains(want) && msg.contains("row 1") && msg.contains("shard-00003"), "{msg}");
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing written for {want}");
        }
    }

    #[test]
    fn foreign_or_incompatible_files_are_refused_with_reasons() {
        let dir = tempfile::tempdir().unwrap();
        // A Parquet file without taesd metadata.
        let plain = dir.path().join("plain.parquet");
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int32, false)]));
        let mut w = ArrowWriter::try_new(File::create(&plain).unwrap(), schema.clone(), None).unwrap();
        w.write(&RecordBatch::try_new(schema, vec![Arc::new(Int32Array::from(vec![1]))]).unwrap()).unwrap();
        w.close().unwrap();
        let e = format!("{:#}", ShardReader::open(&plain).unwrap_err());
        assert!(e.contains("plain.parquet") && e.contains("missing key-value metadata 'taesd.schema_version'"), "{e}");

        // A future schema version.
        let mut kv = kv_pairs(&meta(LatentDtype::Float16)).unwrap();
        kv[0] = KeyValue::new(key::SCHEMA_VERSION.to_string(), "999".to_string());
        let map: HashMap<String, String> = kv.into_iter().map(|k| (k.key, k.value.unwrap())).collect();
        let e = format!("{:#}", parse_meta(&map).unwrap_err());
        assert!(e.contains("version 999 is not supported"), "{e}");

        // taesd metadata but a missing column.
        let partial = dir.path().join("partial.parquet");
        let schema = Arc::new(Schema::new(vec![Field::new(col::KEY, DataType::Utf8, false)]));
        let props = WriterProperties::builder()
            .set_key_value_metadata(Some(kv_pairs(&meta(LatentDtype::Float16)).unwrap()))
            .build();
        let mut w = ArrowWriter::try_new(File::create(&partial).unwrap(), schema.clone(), Some(props)).unwrap();
        w.write(&RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(vec!["k"]))]).unwrap()).unwrap();
        w.close().unwrap();
        let e = format!("{:#}", ShardReader::open(&partial).unwrap_err());
        assert!(e.contains("partial.parquet") && e.contains("column 'source' is missing"), "{e}");

        let e = format!("{:#}", ShardReader::open(&dir.path().join("nope.parquet")).unwrap_err());
        assert!(e.contains("cannot open shard") && e.contains("nope.parquet"), "{e}");
    }
}
