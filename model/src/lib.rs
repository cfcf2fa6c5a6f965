//! The TAESD family of tiny autoencoders (madebyollin's taesd.py) in candle: taesd, taesdxl,
//! taesd3, taef1, taef2 (mid-block GroupNorm pool) and taesana (32x), with every checkpoint
//! layout (taesd.py `.pth`/`.safetensors`, diffusers `AutoencoderTiny`, ComfyUI, combined), and
//! exports for the tools people run TAESD in: `.pth` written without torch ([`pth_write`]) and
//! ONNX written without onnx ([`onnx`]).
//!
//! Tensor conventions are those of [`taesd_schemas::conventions`]: the encoder takes [0, 1]
//! NCHW images and gives scaled latents; the decoder gives [0, 1] images, unclamped.
//!
//! ```no_run
//! use candle_core::{DType, Device, Module};
//! # fn main() -> taesd::Result<()> {
//! let dev = Device::Cpu;
//! // Released weights (a folder with taef2_encoder.pth + taef2_decoder.pth):
//! let model = taesd::Taesd::load("taef2", None, DType::F32, &dev)?;
//! // A trainable model: variables in a VarMap, named as the `combined` layout.
//! let vm = candle_nn::VarMap::new();
//! let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &dev);
//! let cfg = taesd::Variant::Taef2.config();
//! let fresh = taesd::Taesd::new(&cfg, vb)?;
//! taesd::set_decoder_output_bias(&vm, cfg, 0.5)?;
//! taesd::save_varmap(&vm, &cfg, taesd::Layout::TaesdPy, "out/taef2", &Default::default())?;
//! # Ok(()) }
//! ```

pub mod arch;
pub mod checkpoint;
pub mod crc;
pub mod decoder;
pub mod encoder;
pub mod error;
pub mod init;
pub mod layers;
pub mod layouts;
pub mod onnx;
pub mod protobuf;
pub mod pth_check;
pub mod pth_write;
pub mod save;
pub mod taesd;
pub mod variant;
pub mod zip_store;

pub use arch::{decoder_last_conv_bias_name, decoder_last_conv_index, param_count, param_shapes, LayerSpec, Part};
pub use checkpoint::{
    load_checkpoint, load_checkpoints, load_varmap, read_tensor_file, set_decoder_output_bias, varmap_tensors,
    Checkpoint, CheckpointInfo, TensorFile,
};
pub use decoder::Decoder;
pub use encoder::Encoder;
pub use error::{Result, TaesdError};
pub use init::torch_default_init;
pub use layouts::Layout;
pub use save::{diffusers_config, save_tensors, save_varmap, FileFormat, SaveOptions};
pub use taesd::Taesd;
pub use variant::{Downscale, TaesdConfig, Variant};
