//! taesd-data: what `precompute` and `train` share about data.
//!
//! * [`decode`]: input file bytes to an 8-bit RGB image, or a clear reason why not.
//! * [`policy`]: the deterministic resize / crop / flip / colour-augment policy.
//! * [`source`]: listing input folders and tar shards, reading their bytes.
//! * [`shard`]: the Parquet shard writer and reader for [`taesd_schemas::shard`].
//! * [`layout`]: where an output folder's shards are (`OUT/data/`, or beside the manifest).
//! * [`parts`]: `--part i/N`: which inputs a part takes, and a folder of parts read as one set.
pub mod decode;
pub mod layout;
pub mod parts;
pub mod policy;
pub mod shard;
pub mod source;

pub use decode::{
    decode_rgb8, decode_rgb8_named, decodes, DecodeError, DecodeLimits, ALPHA_BACKGROUND, DECODED_FORMATS,
};
pub use layout::OutputLayout;
pub use parts::{part_of, read_manifest_file, select_part, PartState, PartsFolder};
pub use policy::{check_source_size, default_min_side, is_upscaled, make_samples, AugmentConfig, CropRect, Sample};
pub use shard::{
    decode_latent, decode_stored_image, encode_image, encode_latent, is_temp_file, list_shards, temp_path,
    temp_path_in, write_shard, LatentRecord, ShardFileMeta, ShardReader, ShardRow, ShardWriter, ROW_GROUP_ROWS,
};
pub use source::{
    fingerprint, is_image_name, list_inputs, read_bytes, sha256_hex, InputItem, Listing, SourceError, SourceLoc,
    MAX_INPUT_BYTES,
};
