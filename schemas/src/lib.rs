//! Shared definitions of taesd-rs: tensor conventions, VAE presets, the shard format.
pub mod conventions;
pub mod part;
pub mod presets;
pub mod shard;

pub use conventions::{LatentScaling, PixelRange};
pub use part::Part;
pub use presets::{preset, preset_names, Preset, VaeSpec, PRESETS};
pub use shard::{
    ErrorRecord, ImageFormat, InputRecord, LatentDtype, Manifest, OutputConfig, ShardEntry, SCHEMA_VERSION,
};
