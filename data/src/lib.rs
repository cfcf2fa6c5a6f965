//! taesd-data: what `precompute` and `train` share about data.
//!
//! * [`decode`]: input file bytes to an 8-bit RGB image, or a clear reason why not.
//! * [`policy`]: the deterministic resize / crop / flip / colour-augment policy.
//! * [`source`]: listing input folders and tar shards, reading their bytes.
//! * [`shard`]: the Parquet shard writer and reader for [`taesd_schemas::shard`].
pub mod decode;
pub mod policy;
pub mod shard;
pub mod source;

pub use decode::{decode_rgb8, DecodeError, DecodeLimits, ALPHA_BACKGROUND};
pub use policy::{make_samples, AugmentConfig, CropRect, Sample};
pub use shard::{
    decode_latent, decode_stored_image, encode_image, encode_latent, is_temp_file, list_shards, temp_path, write_shard,
    LatentRecord, ShardFileMeta, ShardReader, ShardRow, ShardWriter, ROW_GROUP_ROWS,
};
pub use source::{
    fingerprint, list_inputs, read_bytes, sha256_hex, InputItem, Listing, SourceError, SourceLoc, IMAGE_EXTENSIONS,
    MAX_INPUT_BYTES,
};
