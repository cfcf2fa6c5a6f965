//! A TAESD encoder or decoder as an ONNX graph, layer by layer from the same [`LayerSpec`] list
//! that builds the candle model, so the two cannot drift apart.
//!
//! | layer | ONNX |
//! |---|---|
//! | 3x3 conv (stride 1/2), 1x1 skip / pool convs | `Conv` (pads 1 / 0) |
//! | ReLU | `Relu` |
//! | `Block` | three `Conv`s, two `Relu`s, `Add` with the input (or its 1x1 skip conv), `Relu` |
//! | TAEF2's pool `x + pool(x)` | 1x1 `Conv`, GroupNorm (below), `Relu`, 1x1 `Conv`, `Add` |
//! | GroupNorm(4 groups) | `Reshape` to `[N, 4, -1]`, `InstanceNormalization`, `Reshape` back, `Mul`/`Add` by the per-channel weight/bias (as PyTorch's exporter writes it; float32 also in a float16 model) |
//! | `nn.Upsample(scale_factor=2)` | `Resize` nearest, scales `[1, 1, 2, 2]`, asymmetric, floor |
//! | `Clamp` | `Div` by 3, `Tanh`, `Mul` by 3 |
//!
//! Node names are the reference module paths (`11.pool.1`, `3.conv.2`), initializers the
//! state-dict names (`11.pool.0.weight`), so an ONNX file and a `.pth` line up name by name.
//! Batch, height and width are symbolic (dynamic).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use taesd_schemas::conventions::{ONNX_IMAGE, ONNX_IMAGE_DIMS, ONNX_LATENT, ONNX_LATENT_DIMS};

use super::graph::{Builder, Precision};
use super::proto::{self, Attr, Dim, ElemType, Graph};
use crate::arch::{LayerSpec, Part, POOL_EPS, POOL_GROUPS};
use crate::checkpoint::{check_part, PartTensors};
use crate::error::{CandleContext, Result, TaesdError};
use crate::layouts::Layout;
use crate::variant::{TaesdConfig, Variant};

/// How to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnnxOptions {
    pub precision: Precision,
    /// Named in the metadata and the file names (default: the structure's unique variant).
    pub variant: Option<Variant>,
}

impl Default for OnnxOptions {
    fn default() -> Self {
        OnnxOptions { precision: Precision::F32, variant: None }
    }
}

/// Metadata keys written in every export (`metadata_props`).
pub mod keys {
    /// `encoder` or `decoder`.
    pub const PART: &str = "taesd.part";
    /// The variant name, or `custom`.
    pub const VARIANT: &str = "taesd.variant";
    pub const LATENT_CHANNELS: &str = "taesd.latent_channels";
    /// 8, or 32 for taesana.
    pub const SPATIAL_SCALE: &str = "taesd.spatial_scale";
    /// `float32` or `float16` (of the input, the output and the weights).
    pub const PRECISION: &str = "taesd.precision";
    /// Name of the graph input / output.
    pub const INPUT: &str = "taesd.input";
    pub const OUTPUT: &str = "taesd.output";
    /// What the input / output hold: shape, range, scaling.
    pub const INPUT_RANGE: &str = "taesd.input_range";
    pub const OUTPUT_RANGE: &str = "taesd.output_range";
    /// The VAE's latent scaling, where the variant has a scalar one: raw = latent / scale + shift.
    pub const VAE_SCALE: &str = "taesd.vae_scale";
    pub const VAE_SHIFT: &str = "taesd.vae_shift";
}

/// The range text of each tensor (metadata): the image one is `PixelRange`'s `0,1`.
const IMAGE_RANGE: &str = "0,1: RGB, NCHW, float in [0, 1] (taesd.py's images)";
const IMAGE_OUT_RANGE: &str =
    "0,1: RGB, NCHW, nominally [0, 1] and not clamped (clamp before quantising, as taesd.py's users do)";
const LATENT_RANGE: &str =
    "scaled: the VAE's latent z as TAESD takes it, (z - shift) * scale (taesd.py's latents; about [-3, 3])";

struct Ctx<'a> {
    b: Builder,
    t: &'a PartTensors,
}

impl Ctx<'_> {
    fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.t.get(name).map(|(_, t)| t).ok_or_else(|| TaesdError::Other(format!("missing tensor {name}")))
    }

    /// `Conv` named `name` with `{name}.weight` (and `{name}.bias`).
    fn conv(&mut self, name: &str, x: &str, stride: usize, pad: usize, bias: bool) -> Result<String> {
        let wt = self.tensor(&format!("{name}.weight"))?.clone();
        let k = wt.dims()[2] as i64;
        let w = self.b.weight(&format!("{name}.weight"), &wt)?;
        let mut inputs = vec![x.to_string(), w];
        if bias {
            let bt = self.tensor(&format!("{name}.bias"))?.clone();
            inputs.push(self.b.weight(&format!("{name}.bias"), &bt)?);
        }
        let inputs: Vec<&str> = inputs.iter().map(|s| s.as_str()).collect();
        let (s, p) = (stride as i64, pad as i64);
        Ok(self.b.op(
            "Conv",
            name,
            &inputs,
            &[
                ("dilations", Attr::Ints(vec![1, 1])),
                ("group", Attr::Int(1)),
                ("kernel_shape", Attr::Ints(vec![k, k])),
                ("pads", Attr::Ints(vec![p, p, p, p])),
                ("strides", Attr::Ints(vec![s, s])),
            ],
        ))
    }

    fn relu(&mut self, name: &str, x: &str) -> String {
        self.b.op("Relu", name, &[x], &[])
    }

    /// GroupNorm(POOL_GROUPS) with `{name}.weight` / `{name}.bias`, in float32.
    fn group_norm(&mut self, name: &str, x: &str) -> Result<String> {
        let half = self.b.precision == Precision::F16;
        let x = if half {
            self.b.op("Cast", &format!("{name}.to_float"), &[x], &[("to", Attr::Int(ElemType::Float as i64))])
        } else {
            x.into()
        };
        let shape = self.b.op("Shape", &format!("{name}.shape"), &[&x], &[]);
        let groups = self.b.constant_i64(&format!("{name}.groups"), &[0, POOL_GROUPS as i64, -1]);
        let grouped = self.b.op("Reshape", &format!("{name}.group"), &[&x, &groups], &[("allowzero", Attr::Int(0))]);
        let g = POOL_GROUPS;
        let ones = self.b.constant(&format!("{name}.unit_scale"), &[g], &vec![1.0; g], Precision::F32);
        let zeros = self.b.constant(&format!("{name}.unit_bias"), &[g], &vec![0.0; g], Precision::F32);
        let normed = self.b.op(
            "InstanceNormalization",
            &format!("{name}.norm"),
            &[&grouped, &ones, &zeros],
            &[("epsilon", Attr::Float(POOL_EPS as f32))],
        );
        let back = self.b.op("Reshape", &format!("{name}.ungroup"), &[&normed, &shape], &[("allowzero", Attr::Int(0))]);
        let wt = self.tensor(&format!("{name}.weight"))?;
        let c = wt.dims()[0];
        let gamma = wt.reshape((c, 1, 1)).ctx(|| name.to_string())?;
        let beta = self.tensor(&format!("{name}.bias"))?.reshape((c, 1, 1)).ctx(|| name.to_string())?;
        let gamma = self.b.weight_as(&format!("{name}.weight"), &gamma, Precision::F32)?;
        let beta = self.b.weight_as(&format!("{name}.bias"), &beta, Precision::F32)?;
        let scaled = self.b.op("Mul", &format!("{name}.scale"), &[&back, &gamma], &[]);
        let shifted = self.b.op("Add", &format!("{name}.shift"), &[&scaled, &beta], &[]);
        Ok(if half {
            self.b.op("Cast", &format!("{name}.to_half"), &[&shifted], &[("to", Attr::Int(ElemType::Float16 as i64))])
        } else {
            shifted
        })
    }

    /// taesd.py's `Block` at index `i` (with TAEF2's pool when `pool`).
    fn block(&mut self, i: usize, x: &str, c_in: usize, c_out: usize, pool: bool) -> Result<String> {
        let x = if pool {
            let h = self.conv(&format!("{i}.pool.0"), x, 1, 0, false)?;
            let h = self.group_norm(&format!("{i}.pool.1"), &h)?;
            let h = self.relu(&format!("{i}.pool.2"), &h);
            let h = self.conv(&format!("{i}.pool.3"), &h, 1, 0, false)?;
            self.b.op("Add", &format!("{i}.pool.add"), &[x, &h], &[])
        } else {
            x.to_string()
        };
        let h = self.conv(&format!("{i}.conv.0"), &x, 1, 1, true)?;
        let h = self.relu(&format!("{i}.conv.1"), &h);
        let h = self.conv(&format!("{i}.conv.2"), &h, 1, 1, true)?;
        let h = self.relu(&format!("{i}.conv.3"), &h);
        let h = self.conv(&format!("{i}.conv.4"), &h, 1, 1, true)?;
        let skip = if c_in != c_out { self.conv(&format!("{i}.skip"), &x, 1, 0, false)? } else { x };
        let sum = self.b.op("Add", &format!("{i}.add"), &[&h, &skip], &[]);
        Ok(self.relu(&format!("{i}.fuse"), &sum))
    }

    fn layer(&mut self, i: usize, l: &LayerSpec, x: &str) -> Result<String> {
        Ok(match *l {
            LayerSpec::Conv { stride, bias, .. } => self.conv(&i.to_string(), x, stride, 1, bias)?,
            LayerSpec::Block { c_in, c_out, pool } => self.block(i, x, c_in, c_out, pool)?,
            LayerSpec::Relu => self.relu(&i.to_string(), x),
            LayerSpec::Upsample => {
                let scales = self.b.constant(&format!("{i}.scales"), &[4], &[1.0, 1.0, 2.0, 2.0], Precision::F32);
                self.b.op(
                    "Resize",
                    &i.to_string(),
                    &[x, "", &scales],
                    &[
                        ("coordinate_transformation_mode", Attr::Str("asymmetric".into())),
                        ("mode", Attr::Str("nearest".into())),
                        ("nearest_mode", Attr::Str("floor".into())),
                    ],
                )
            }
            LayerSpec::Clamp => {
                let three = self.b.constant(&format!("{i}.three"), &[], &[3.0], self.b.precision);
                let d = self.b.op("Div", &format!("{i}.div"), &[x, &three], &[]);
                let t = self.b.op("Tanh", &format!("{i}.tanh"), &[&d], &[]);
                self.b.op("Mul", &format!("{i}.mul"), &[&t, &three], &[])
            }
        })
    }
}

fn dims(names: [&str; 4], channels: usize) -> Vec<Dim> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| if i == 1 { Dim::Fixed(channels) } else { Dim::Named(n.to_string()) })
        .collect()
}

/// One part as ONNX model bytes. `tensors`: the part's tensors under their reference names
/// (`1.conv.0.weight`), checked against `cfg`.
pub fn part_onnx(
    cfg: &TaesdConfig,
    part: Part,
    tensors: &HashMap<String, Tensor>,
    opts: &OnnxOptions,
) -> Result<Vec<u8>> {
    let t: PartTensors = tensors.iter().map(|(n, t)| (n.clone(), (n.clone(), t.clone()))).collect::<BTreeMap<_, _>>();
    check_part(cfg, part, &t, Path::new("(onnx export)"), Layout::TaesdPy)?;
    let p = opts.precision;
    let c = cfg.latent_channels;
    let (input, in_dims, output, out_dims) = match part {
        Part::Encoder => (ONNX_IMAGE, dims(ONNX_IMAGE_DIMS, 3), ONNX_LATENT, dims(ONNX_LATENT_DIMS, c)),
        Part::Decoder => (ONNX_LATENT, dims(ONNX_LATENT_DIMS, c), ONNX_IMAGE, dims(ONNX_IMAGE_DIMS, 3)),
    };
    let (in_range, out_range) = match part {
        Part::Encoder => (IMAGE_RANGE, LATENT_RANGE),
        Part::Decoder => (LATENT_RANGE, IMAGE_OUT_RANGE),
    };
    let mut ctx = Ctx { b: Builder::new(p), t: &t };
    let mut x = input.to_string();
    for (i, l) in part.spec(cfg).iter().enumerate() {
        x = ctx.layer(i, l, &x)?;
    }
    ctx.b.op_into("Identity", "output", &[&x], output, &[]);

    let variant = opts.variant.or_else(|| cfg.unique_variant());
    let vname = variant.map(|v| v.name().to_string()).unwrap_or_else(|| "custom".into());
    let s = cfg.spatial_scale();
    let what = match part {
        Part::Encoder => format!("[0, 1] RGB image [batch, 3, H, W] -> TAESD latent [batch, {c}, H/{s}, W/{s}]"),
        Part::Decoder => {
            format!("TAESD latent [batch, {c}, h, w] -> [0, 1] RGB image [batch, 3, h*{s}, w*{s}], unclamped")
        }
    };
    let doc = format!("TAESD {} {} ({}, {}): {what}", vname, part.prefix(), cfg.describe(), p.name());
    let graph = Graph {
        name: format!("{vname}_{}", part.prefix()),
        doc: doc.clone(),
        nodes: ctx.b.nodes,
        initializers: ctx.b.initializers,
        inputs: vec![proto::value_info(input, p.elem(), &in_dims, in_range)],
        outputs: vec![proto::value_info(output, p.elem(), &out_dims, out_range)],
    };
    let mut meta = vec![
        (keys::PART.to_string(), part.prefix().to_string()),
        (keys::VARIANT.to_string(), vname),
        (keys::LATENT_CHANNELS.to_string(), c.to_string()),
        (keys::SPATIAL_SCALE.to_string(), s.to_string()),
        (keys::PRECISION.to_string(), p.name().to_string()),
        (keys::INPUT.to_string(), input.to_string()),
        (keys::OUTPUT.to_string(), output.to_string()),
        (keys::INPUT_RANGE.to_string(), in_range.to_string()),
        (keys::OUTPUT_RANGE.to_string(), out_range.to_string()),
    ];
    if let Some(sc) = variant.and_then(|v| v.vae_scaling()) {
        meta.push((keys::VAE_SCALE.to_string(), sc.scale.to_string()));
        meta.push((keys::VAE_SHIFT.to_string(), sc.shift.to_string()));
    }
    Ok(proto::model(&graph, "taesd-rs", env!("CARGO_PKG_VERSION"), &doc, &meta))
}

/// The file name of one part's export: `<name>_<part>.onnx`, `<name>_<part>.fp16.onnx`.
pub fn file_name(name: &str, part: Part, precision: Precision) -> String {
    match precision {
        Precision::F32 => format!("{name}_{}.onnx", part.prefix()),
        Precision::F16 => format!("{name}_{}.fp16.onnx", part.prefix()),
    }
}

/// Export the parts present in `tensors` (this crate's names, `encoder.…` / `decoder.…`) into
/// the folder `dir` (created) as [`file_name`]s, named after the variant (`taesd-c<C>` for a
/// custom structure). Returns the files written.
pub fn save_onnx(
    tensors: &HashMap<String, Tensor>,
    cfg: &TaesdConfig,
    dir: &Path,
    opts: &OnnxOptions,
) -> Result<Vec<PathBuf>> {
    if let Some(v) = opts.variant {
        if v.config() != *cfg {
            return Err(TaesdError::WrongVariant {
                file: dir.to_path_buf(),
                expected: v.to_string(),
                found: cfg.describe(),
            });
        }
    }
    let name = opts
        .variant
        .or_else(|| cfg.unique_variant())
        .map(|v| v.name().to_string())
        .unwrap_or_else(|| format!("taesd-c{}", cfg.latent_channels));
    std::fs::create_dir_all(dir).map_err(|cause| TaesdError::Io { path: dir.to_path_buf(), cause })?;
    let mut written = Vec::new();
    for part in Part::BOTH {
        let prefix = format!("{}.", part.prefix());
        let t: HashMap<String, Tensor> =
            tensors.iter().filter_map(|(n, t)| n.strip_prefix(&prefix).map(|l| (l.to_string(), t.clone()))).collect();
        if t.is_empty() {
            continue;
        }
        let bytes = part_onnx(cfg, part, &t, opts)?;
        let path = dir.join(file_name(&name, part, opts.precision));
        std::fs::write(&path, bytes).map_err(|cause| TaesdError::Io { path: path.clone(), cause })?;
        written.push(path);
    }
    if written.is_empty() {
        return Err(TaesdError::Other(format!(
            "nothing to export to {}: no `encoder.*` or `decoder.*` tensors",
            dir.display()
        )));
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protobuf::read;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    fn op_types(model: &[u8]) -> Vec<String> {
        let m = read::fields(model).unwrap();
        let g = read::fields(read::bytes(&m, 7)[0]).unwrap();
        read::bytes(&g, 1).iter().map(|n| read::strings(&read::fields(n).unwrap(), 4)[0].clone()).collect()
    }

    #[test]
    fn graph_follows_the_layer_list() {
        let cfg = Variant::Taef2.config();
        let vm = VarMap::new();
        crate::Taesd::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        let all = crate::varmap_tensors(&vm);
        let enc: HashMap<String, Tensor> =
            all.iter().filter_map(|(n, t)| n.strip_prefix("encoder.").map(|l| (l.to_string(), t.clone()))).collect();
        let bytes = part_onnx(&cfg, Part::Encoder, &enc, &OnnxOptions::default()).unwrap();
        let ops = op_types(&bytes);
        let count = |op: &str| ops.iter().filter(|o| *o == op).count();
        // 1 stem + 3 downsamples + 1 final conv + 10 blocks x 3 + 3 pools x 2 (1x1 convs).
        assert_eq!(count("Conv"), 41);
        assert_eq!(count("InstanceNormalization"), 3);
        assert_eq!(count("Resize"), 0);
        assert_eq!(ops.last().unwrap(), "Identity");
        // The decoder: three upsamples and the clamp.
        let dec: HashMap<String, Tensor> =
            all.iter().filter_map(|(n, t)| n.strip_prefix("decoder.").map(|l| (l.to_string(), t.clone()))).collect();
        let opts = OnnxOptions { precision: Precision::F16, variant: None };
        let ops = op_types(&part_onnx(&cfg, Part::Decoder, &dec, &opts).unwrap());
        assert_eq!(ops.iter().filter(|o| *o == "Resize").count(), 3);
        assert_eq!(ops.iter().filter(|o| *o == "Tanh").count(), 1);
        assert_eq!(ops.iter().filter(|o| *o == "Cast").count(), 6, "float32 GroupNorm in a float16 graph");
        // A missing tensor is named.
        let mut short = enc.clone();
        short.remove("11.pool.1.bias");
        let e = part_onnx(&cfg, Part::Encoder, &short, &OnnxOptions::default()).unwrap_err().to_string();
        assert!(e.contains("11.pool.1.bias"), "{e}");
        assert_eq!(file_name("taef2", Part::Decoder, Precision::F16), "taef2_decoder.fp16.onnx");
    }
}
