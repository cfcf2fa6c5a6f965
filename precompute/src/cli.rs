//! Command-line interface of `precompute`.

use crate::device::DeviceRequest;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "precompute",
    version,
    about = "Run a VAE encoder (ONNX) over a folder of images and write Parquet shards of image/latent pairs",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Summarise an output folder: schema, rows, per-channel latent statistics, errors.
    Inspect {
        /// The output folder of a precompute run.
        dir: PathBuf,
        /// Rows to read for the latent statistics (0 = all).
        #[arg(long, default_value_t = 0)]
        max_rows: u64,
    },
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
pub enum ImageFormatArg {
    Png,
    Jpeg,
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
pub enum LatentDtypeArg {
    F16,
    F32,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// VAE preset: sd, sdxl, sdxl-fp16-fix, sd3, flux1, taef2, or custom (then --channels,
    /// --scale, --shift, --input-range).
    #[arg(long, required = true)]
    pub vae: Option<String>,
    /// The VAE encoder as an ONNX file (see tools/export_vae_onnx.py).
    #[arg(long, required = true)]
    pub onnx: Option<PathBuf>,
    /// Folder of images (recursive; jpg/jpeg/png/webp and webdataset .tar shards), or one file.
    #[arg(long, required = true)]
    pub images: Option<PathBuf>,
    /// Output folder for the shards, manifest.json and errors.jsonl.
    #[arg(long, required = true)]
    pub out: Option<PathBuf>,
    /// Side of the square crops the teacher sees.
    #[arg(long, default_value_t = 512)]
    pub resolution: u32,
    /// Images per teacher batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// auto, cpu, cuda or cuda:N. `cuda` never falls back to the CPU; `auto` says what it got.
    #[arg(long, default_value = "auto")]
    pub device: DeviceRequest,
    /// CUDA: allow TF32 for float32 convolutions (faster; latents then differ from fp32 by ~5e-3
    /// relative). Off by default.
    #[arg(long)]
    pub tf32: bool,
    /// Decode/resize threads (default: all cores).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Threads ONNX Runtime may use on the CPU (default: its own choice).
    #[arg(long)]
    pub ort_threads: Option<usize>,
    /// Seed of every random choice (crops, flips, colour augmentation).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Crops per image: variant 0 is the centre crop, the others random-resized crops.
    #[arg(long, default_value_t = 1)]
    pub variants: u32,
    /// Mirror each crop with probability 0.5.
    #[arg(long)]
    pub hflip: bool,
    /// Fraction of crops that get the colour augmentation.
    #[arg(long, default_value_t = 0.0)]
    pub color_augment: f32,
    /// Encoding of the stored images (png is lossless).
    #[arg(long, value_enum, default_value_t = ImageFormatArg::Png)]
    pub image_format: ImageFormatArg,
    /// JPEG quality, with --image-format jpeg.
    #[arg(long, default_value_t = 95)]
    pub quality: u8,
    /// Element type of stored latents.
    #[arg(long, value_enum, default_value_t = LatentDtypeArg::F16)]
    pub latent_dtype: LatentDtypeArg,
    /// Rows per shard (approximately: shards cover shard_rows / variants source images).
    #[arg(long, default_value_t = 512)]
    pub shard_rows: u32,
    /// Use only the first N inputs (sorted order): quick trials.
    #[arg(long)]
    pub limit: Option<usize>,
    /// ONNX Runtime library (file or folder); else ORT_DYLIB_PATH; else a pip onnxruntime.
    #[arg(long)]
    pub ort_lib: Option<PathBuf>,
    /// Refuse images with more pixels than this (decompression bombs).
    #[arg(long, default_value_t = 128_000_000)]
    pub max_pixels: u64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// custom: latent channels.
    #[arg(long)]
    pub channels: Option<usize>,
    /// custom: scale factor (TAESD latent = (z - shift) * scale).
    #[arg(long)]
    pub scale: Option<f64>,
    /// custom: shift factor.
    #[arg(long)]
    pub shift: Option<f64>,
    /// custom: image range the encoder expects: "0,1" or "-1,1".
    #[arg(long, allow_hyphen_values = true)]
    pub input_range: Option<String>,
    /// custom: spatial downscale factor.
    #[arg(long, default_value_t = 8)]
    pub downscale: usize,
}
