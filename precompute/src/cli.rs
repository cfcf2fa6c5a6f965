//! Command-line interface of `precompute`.

use crate::device::DeviceList;
use crate::teacher::ConvSearch;
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use taesd_schemas::Part;

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
    #[arg(long, required_unless_present = "decode_only")]
    pub onnx: Option<PathBuf>,
    /// Folder of images (recursive: every file is an input, decoded if it is an image in any
    /// format the decoders know, else reported in errors.jsonl; webdataset .tar shards stand for
    /// their image members), or one image or .tar file.
    #[arg(long, required = true)]
    pub images: Option<PathBuf>,
    /// Output folder for the shards, manifest.json and errors.jsonl.
    #[arg(long, required_unless_present = "decode_only")]
    pub out: Option<PathBuf>,
    /// Side of the square crops the teacher sees.
    #[arg(long, default_value_t = 512)]
    pub resolution: u32,
    /// Images per teacher batch (at least 1).
    #[arg(long, default_value_t = 16, value_parser = at_least_one)]
    pub batch_size: usize,
    /// auto, cpu, cuda or cuda:N. `cuda` never falls back to the CPU; `auto` says what it got. A
    /// list (`cuda:0,cuda:1,...`, or `cpu,cpu`) runs one teacher session per entry in this process,
    /// fed by the one decode pool, each batch going to whichever session is free; the shards are
    /// the same as with one device.
    #[arg(long, default_value = "auto", conflicts_with = "gpus")]
    pub device: DeviceList,
    /// N GPUs: the same as --device cuda:0,cuda:1,...,cuda:N-1.
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub gpus: Option<usize>,
    /// Part I of N (I from 0): encode only the inputs of this part (by a hash of each input's path:
    /// an input stays in its part when files are added), with its own shards, manifest and errors
    /// file in the same --out. Run the N parts anywhere (a Slurm array, a Kubernetes Indexed Job);
    /// `train` and `precompute inspect` read the folder as one set. See docs/scale-out.md.
    #[arg(long, value_name = "I/N")]
    pub part: Option<Part>,
    /// CUDA: allow TF32 for float32 convolutions (faster; latents then differ from fp32 by ~5e-3
    /// relative). Off by default.
    #[arg(long)]
    pub tf32: bool,
    /// CUDA: cuDNN convolution algorithm search. `exhaustive` times every algorithm once per
    /// input shape, during the warm-up (--warmup), before anything is timed. Default `heuristic`:
    /// on an H100 (fp16 SDXL encoder, 512 px, TF32 off) exhaustive search ran at 22 images/s,
    /// heuristic at 106 (bench/results/2026-11-26-h100-precompute-vs-torch-sdxl-512.txt).
    #[arg(long, value_enum, default_value_t = ConvSearch::Heuristic)]
    pub conv_search: ConvSearch,
    /// CUDA: run convolutions channels-last (ONNX Runtime's `prefer_nhwc`).
    #[arg(long, default_value_t = false, action = ArgAction::Set, value_name = "BOOL")]
    pub nhwc: bool,
    /// CUDA: a device-resident input buffer bound to the session once (IO binding), filled from
    /// the pinned host batch; the output is bound to host memory. `false` (default): plain
    /// `Session::run` with host tensors. Experimental: on the H100 with ORT 1.31.1, device outputs
    /// could not be copied back (`gpu_data_transfer.cc: dst_data != src_data`); see docs/gpu.md.
    #[arg(long, default_value_t = false, action = ArgAction::Set, value_name = "BOOL")]
    pub io_binding: bool,
    /// CUDA: fix the model's symbolic batch/height/width to --batch-size/--resolution (ONNX
    /// Runtime free-dimension overrides); the last batch of each shard is padded with grey.
    #[arg(long, default_value_t = false, action = ArgAction::Set, value_name = "BOOL")]
    pub static_shapes: bool,
    /// CUDA: capture the encoder as a CUDA graph and replay it (implies --static-shapes; needs
    /// --io-binding true).
    #[arg(long, default_value_t = false, action = ArgAction::Set, value_name = "BOOL")]
    pub cuda_graph: bool,
    /// CUDA: another CUDA execution provider option, KEY=VALUE as ONNX Runtime names it
    /// (e.g. `cudnn_conv_use_max_workspace=1`, `use_ep_level_unified_stream=1`). Repeatable.
    #[arg(long = "cuda-option", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub cuda_options: Vec<(String, String)>,
    /// CUDA: grey batches run at the working shape before the timed run starts (cuDNN algorithm
    /// search, CUDA graph capture; at least 3 with --cuda-graph).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Measure the CPU side alone: read, hash, decode, crop, encode the stored image and convert
    /// to the encoder's input (f16 with --decode-dtype f16), then discard. No ONNX, no output.
    #[arg(long)]
    pub decode_only: bool,
    /// With --decode-only: the encoder input type to convert to (an fp16 export takes f16).
    #[arg(long, value_enum, default_value_t = LatentDtypeArg::F16)]
    pub decode_dtype: LatentDtypeArg,
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
    #[arg(long, default_value_t = 512, value_parser = at_least_one_u32)]
    pub shard_rows: u32,
    /// Refuse sources whose short side is below this many pixels (reported in errors.jsonl,
    /// stage `size`): their crops would be enlarged more than 2x. Default: half of --resolution;
    /// 0 keeps every image. Rows whose crop is enlarged at all are counted in the summary.
    #[arg(long, value_name = "PIXELS")]
    pub min_side: Option<u32>,
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

/// A count that must be positive.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn at_least_one_u32(s: &str) -> Result<u32, String> {
    at_least_one(s).and_then(|n| u32::try_from(n).map_err(|e| e.to_string()))
}

/// `KEY=VALUE`.
fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuning_flags_parse_with_safe_defaults() {
        let c = Cli::try_parse_from(["precompute", "--vae", "sd", "--onnx", "a.onnx", "--images", "i", "--out", "o"])
            .unwrap();
        assert_eq!(c.run.conv_search, ConvSearch::Heuristic);
        assert!(!c.run.io_binding && !c.run.nhwc && !c.run.static_shapes && !c.run.cuda_graph);
        assert!(c.run.cuda_options.is_empty() && !c.run.decode_only);
        let c = Cli::try_parse_from([
            "precompute",
            "--vae",
            "sd",
            "--onnx",
            "a.onnx",
            "--images",
            "i",
            "--out",
            "o",
            "--conv-search",
            "exhaustive",
            "--nhwc",
            "true",
            "--io-binding",
            "true",
            "--cuda-graph",
            "true",
            "--cuda-option",
            "a=1",
            "--cuda-option",
            "b = x",
            "--warmup",
            "5",
        ])
        .unwrap();
        assert_eq!(c.run.conv_search, ConvSearch::Exhaustive);
        assert!(c.run.nhwc && c.run.io_binding && c.run.cuda_graph);
        assert_eq!(c.run.cuda_options, vec![("a".into(), "1".into()), ("b".into(), "x".into())]);
        assert_eq!(c.run.warmup, 5);
        assert!(Cli::try_parse_from([
            "precompute",
            "--vae",
            "sd",
            "--onnx",
            "a",
            "--images",
            "i",
            "--out",
            "o",
            "--cuda-option",
            "x"
        ])
        .is_err());
        // --decode-only needs neither --onnx nor --out.
        let c = Cli::try_parse_from(["precompute", "--vae", "sdxl", "--images", "i", "--decode-only"]).unwrap();
        assert!(c.run.decode_only && c.run.onnx.is_none());
        assert!(Cli::try_parse_from(["precompute", "--vae", "sdxl", "--images", "i"]).is_err());
    }

    #[test]
    fn device_lists_gpus_and_parts_parse() {
        let base = ["precompute", "--vae", "sd", "--onnx", "a.onnx", "--images", "i", "--out", "o"];
        let c = Cli::try_parse_from(base.iter().copied().chain(["--device", "cpu,cpu", "--part", "2/8"])).unwrap();
        assert_eq!(c.run.device.to_string(), "cpu,cpu");
        assert_eq!(c.run.part, Some(Part { index: 2, count: 8 }));
        let c = Cli::try_parse_from(base.iter().copied().chain(["--gpus", "4"])).unwrap();
        assert_eq!(c.run.gpus, Some(4));
        assert!(Cli::try_parse_from(base.iter().copied().chain(["--gpus", "2", "--device", "cpu"])).is_err());
        assert!(Cli::try_parse_from(base.iter().copied().chain(["--part", "8/8"])).is_err());
        assert!(Cli::try_parse_from(base.iter().copied().chain(["--gpus", "0"])).is_err());
    }

    #[test]
    fn zero_counts_are_refused() {
        let base = ["precompute", "--vae", "sd", "--onnx", "a.onnx", "--images", "i", "--out", "o"];
        for (flag, v) in [("--batch-size", "0"), ("--shard-rows", "0")] {
            let e = Cli::try_parse_from(base.iter().copied().chain([flag, v])).unwrap_err().to_string();
            assert!(e.contains(flag) && e.contains("at least 1"), "{e}");
        }
        let c = Cli::try_parse_from(base.iter().copied().chain(["--batch-size", "3", "--min-side", "0"])).unwrap();
        assert_eq!((c.run.batch_size, c.run.min_side), (3, Some(0)));
    }
}
