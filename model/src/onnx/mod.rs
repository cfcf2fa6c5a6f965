//! ONNX export of TAESD encoders and decoders, written from Rust (no torch, no onnx package):
//! [`proto`] encodes the ONNX messages, [`graph`] builds nodes and initializers, [`export`] turns
//! the layer list into a graph. Opset 17, dynamic batch/height/width, float32 or float16, with
//! the tensor names, shapes and ranges in the model's `metadata_props` ([`export::keys`]).
//!
//! ```no_run
//! # fn main() -> taesd::Result<()> {
//! let ck = taesd::load_checkpoint("runs/x/export/taesd", None)?;
//! let opts = taesd::onnx::OnnxOptions { precision: taesd::onnx::Precision::F16, variant: ck.info.variant };
//! let files = taesd::onnx::save_onnx(&ck.tensors, &ck.info.config, "out".as_ref(), &opts)?;
//! # Ok(()) }
//! ```

pub mod export;
pub mod graph;
pub mod proto;

pub use export::{file_name, keys, part_onnx, save_onnx, OnnxOptions};
pub use graph::Precision;
