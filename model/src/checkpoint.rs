//! Reading checkpoints: PyTorch `.pth` pickles (read without running code) and `.safetensors`,
//! in any of the [`Layout`]s, fp16 / bf16 / fp32. The structure ([`TaesdConfig`]) is detected
//! from tensor names and shapes; every tensor is then checked against the structure, so a
//! missing, misshapen or stray tensor is an error naming the tensor and the file.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::Deserialize;
use taesd_schemas::LatentScaling;

use crate::arch::{param_shapes, Part};
use crate::error::{CandleContext, Result, TaesdError};
use crate::layouts::{split_index, Layout, COMFY_VAE_SCALE, COMFY_VAE_SHIFT};
use crate::variant::{Downscale, TaesdConfig, Variant};

/// Safetensors metadata key under which this crate records the variant of what it saves.
pub const META_VARIANT: &str = "taesd_variant";
/// Safetensors metadata key recording the layout.
pub const META_LAYOUT: &str = "taesd_layout";

/// Candidate weight files of a diffusers model folder, in order of preference.
pub const DIFFUSERS_WEIGHT_FILES: [&str; 4] = [
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
];

/// The tensors of one file, as stored (names, dtype), on the CPU.
#[derive(Debug, Clone)]
pub struct TensorFile {
    pub path: PathBuf,
    pub tensors: HashMap<String, Tensor>,
    /// safetensors `__metadata__` (empty for pickles).
    pub metadata: HashMap<String, String>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TaesdError + '_ {
    move |cause| TaesdError::Io { path: path.to_path_buf(), cause }
}

fn is_pickle(path: &Path) -> Result<bool> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_lowercase();
    match ext.as_str() {
        "safetensors" | "sft" => Ok(false),
        "pth" | "pt" | "bin" | "ckpt" => Ok(true),
        _ => {
            use std::io::Read;
            let mut magic = [0u8; 4];
            let mut f = std::fs::File::open(path).map_err(io_err(path))?;
            let n = f.read(&mut magic).map_err(io_err(path))?;
            Ok(n == 4 && magic == *b"PK\x03\x04")
        }
    }
}

/// Read every tensor of a `.safetensors` or PyTorch zip pickle (`.pth`, `.pt`, `.bin`, `.ckpt`;
/// a top-level `state_dict` entry is followed). Tensors keep their stored dtype.
pub fn read_tensor_file(path: impl AsRef<Path>) -> Result<TensorFile> {
    let path = path.as_ref();
    let ctx = || format!("{}", path.display());
    if !path.is_file() {
        return Err(TaesdError::Io {
            path: path.to_path_buf(),
            cause: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let (tensors, metadata) = if is_pickle(path)? {
        // Checked first: candle's reader allocates what the pickle declares (crate::pth_check).
        let damaged = |reason: String| TaesdError::Damaged { file: path.to_path_buf(), reason };
        crate::pth_check::check_pickles(path).map_err(damaged)?;
        let mut pth = candle_core::pickle::PthTensors::new(path, None).ctx(ctx)?;
        if pth.tensor_infos().is_empty() {
            if let Ok(p) = candle_core::pickle::PthTensors::new(path, Some("state_dict")) {
                pth = p;
            }
        }
        crate::pth_check::check_tensors(path, pth.tensor_infos()).map_err(damaged)?;
        let mut tensors = HashMap::with_capacity(pth.tensor_infos().len());
        for name in pth.tensor_infos().keys() {
            if let Some(t) = pth.get(name).ctx(ctx)? {
                // Fortran-ordered pickled tensors come back as permuted views.
                tensors.insert(name.clone(), t.contiguous().ctx(ctx)?);
            }
        }
        (tensors, HashMap::new())
    } else {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| TaesdError::UnknownLayout {
            file: path.to_path_buf(),
            reason: format!("not a safetensors file: {e}"),
        })?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).ctx(ctx)?;
        (tensors, metadata)
    };
    Ok(TensorFile { path: path.to_path_buf(), tensors, metadata })
}

/// What was found in a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointInfo {
    /// The structure, from the tensors.
    pub config: TaesdConfig,
    /// The named variant: the one asked for, else the one recorded in the file's metadata or
    /// named in its file name (when the structure fits), else the only variant with this
    /// structure. `None` for taesd/taesdxl and taesd3/taef1 files that nothing tells apart, and
    /// for custom channel counts.
    pub variant: Option<Variant>,
    pub layout: Layout,
    /// The file the encoder came from, if any.
    pub encoder_file: Option<PathBuf>,
    /// The file the decoder came from, if any.
    pub decoder_file: Option<PathBuf>,
    /// The stored dtype (of the first tensor).
    pub dtype: DType,
    /// ComfyUI's `vae_scale` / `vae_shift`, when the file holds them.
    pub vae_scaling: Option<LatentScaling>,
}

impl CheckpointInfo {
    pub fn has_encoder(&self) -> bool {
        self.encoder_file.is_some()
    }
    pub fn has_decoder(&self) -> bool {
        self.decoder_file.is_some()
    }
    /// The parts present.
    pub fn parts(&self) -> Vec<Part> {
        Part::BOTH.into_iter().filter(|p| self.file(*p).is_some()).collect()
    }
    pub fn file(&self, part: Part) -> Option<&Path> {
        match part {
            Part::Encoder => self.encoder_file.as_deref(),
            Part::Decoder => self.decoder_file.as_deref(),
        }
    }
}

/// A checked checkpoint: tensors under this crate's names (`encoder.1.conv.0.weight`,
/// `decoder.19.bias`), as stored (dtype unchanged), on the CPU.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub info: CheckpointInfo,
    pub tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// The tensors of one part under their reference names (`1.conv.0.weight`).
    pub fn part_tensors(&self, part: Part) -> HashMap<String, Tensor> {
        let prefix = format!("{}.", part.prefix());
        self.tensors.iter().filter_map(|(n, t)| n.strip_prefix(&prefix).map(|l| (l.to_string(), t.clone()))).collect()
    }

    /// A `VarBuilder` over the tensors (converted to `dtype` on `device` as layers ask for them),
    /// for inference: `Encoder::new(&cfg, ck.var_builder(..).pp("encoder"))`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_tensors(self.tensors.clone(), dtype, device)
    }

    /// A `VarMap` holding a trainable copy of every tensor in `dtype` on `device`, under this
    /// crate's names; [`crate::Taesd::new`] on `VarBuilder::from_varmap` of it picks them up
    /// (and creates fresh variables for a part the checkpoint lacks).
    pub fn to_varmap(&self, dtype: DType, device: &Device) -> Result<VarMap> {
        let vm = VarMap::new();
        {
            let mut data = vm.data().lock().expect("fresh VarMap");
            for (name, t) in &self.tensors {
                let t = t.to_device(device).and_then(|t| t.to_dtype(dtype)).and_then(|t| Var::from_tensor(&t));
                data.insert(name.clone(), t.ctx(|| format!("{name}: to {dtype:?} on {device:?}"))?);
            }
        }
        Ok(vm)
    }
}

/// diffusers `AutoencoderTiny` config.json: the fields that change the structure.
#[derive(Debug, Clone, Deserialize)]
struct DiffusersTinyConfig {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    in_channels: Option<usize>,
    out_channels: Option<usize>,
    latent_channels: Option<usize>,
    encoder_block_out_channels: Option<Vec<usize>>,
    decoder_block_out_channels: Option<Vec<usize>>,
    num_encoder_blocks: Option<Vec<usize>>,
    num_decoder_blocks: Option<Vec<usize>>,
    upsampling_scaling_factor: Option<usize>,
    act_fn: Option<String>,
    upsample_fn: Option<String>,
}

impl DiffusersTinyConfig {
    fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let cfg: Self =
            serde_json::from_str(&text).map_err(|cause| TaesdError::Json { path: path.to_path_buf(), cause })?;
        cfg.check(path)?;
        Ok(cfg)
    }

    /// Reject configs this crate's structure cannot express.
    fn check(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, got: String, want: &str| TaesdError::UnsupportedLayout {
            layout: Layout::Diffusers.to_string(),
            what: format!("{}", path.display()),
            reason: format!("{field} is {got}, only {want} (the taesd.py structure) is supported"),
        };
        if let Some(c) = &self.class_name {
            if c != "AutoencoderTiny" {
                return Err(bad("_class_name", c.clone(), "AutoencoderTiny"));
            }
        }
        let check_vec = |field: &str, v: &Option<Vec<usize>>, want: &[usize]| match v {
            Some(v) if v.as_slice() != want => Err(bad(field, format!("{v:?}"), &format!("{want:?}"))),
            _ => Ok(()),
        };
        check_vec("encoder_block_out_channels", &self.encoder_block_out_channels, &[64; 4])?;
        check_vec("decoder_block_out_channels", &self.decoder_block_out_channels, &[64; 4])?;
        check_vec("num_encoder_blocks", &self.num_encoder_blocks, &[1, 3, 3, 3])?;
        check_vec("num_decoder_blocks", &self.num_decoder_blocks, &[3, 3, 3, 1])?;
        for (field, v) in [("in_channels", self.in_channels), ("out_channels", self.out_channels)] {
            if let Some(v) = v.filter(|v| *v != 3) {
                return Err(bad(field, v.to_string(), "3"));
            }
        }
        if let Some(f) = self.upsampling_scaling_factor.filter(|f| *f != 2) {
            return Err(bad("upsampling_scaling_factor", f.to_string(), "2"));
        }
        if let Some(a) = self.act_fn.as_ref().filter(|a| a.as_str() != "relu") {
            return Err(bad("act_fn", a.clone(), "relu"));
        }
        if let Some(u) = self.upsample_fn.as_ref().filter(|u| u.as_str() != "nearest") {
            return Err(bad("upsample_fn", u.clone(), "nearest"));
        }
        Ok(())
    }
}

/// One part of one file: reference name -> (name in the file, tensor).
pub(crate) type PartTensors = BTreeMap<String, (String, Tensor)>;

/// One file, split into parts.
struct Unit {
    path: PathBuf,
    layout: Layout,
    parts: Vec<(Part, PartTensors)>,
    metadata: HashMap<String, String>,
    vae_scaling: Option<LatentScaling>,
}

fn shape_of(t: &Tensor) -> Vec<usize> {
    t.dims().to_vec()
}

fn split_file(file: TensorFile) -> Result<Unit> {
    let TensorFile { path, mut tensors, metadata } = file;
    let unknown = |reason: String| TaesdError::UnknownLayout { file: path.clone(), reason };
    if tensors.is_empty() {
        return Err(unknown("it holds no tensors".into()));
    }
    let layout = Layout::detect(tensors.keys().map(|s| s.as_str())).ok_or_else(|| {
        let mut names: Vec<_> = tensors.keys().take(6).cloned().collect();
        names.sort();
        unknown(format!(
            "its tensor names ({}, ...) are none of the taesd.py, diffusers, ComfyUI or combined layouts",
            names.join(", ")
        ))
    })?;

    let mut vae_scaling = None;
    if layout == Layout::ComfyUi {
        let scalar = |t: &Tensor| t.flatten_all().and_then(|t| t.to_dtype(DType::F64)).and_then(|t| t.to_vec1::<f64>());
        let scale = tensors.remove(COMFY_VAE_SCALE);
        let shift = tensors.remove(COMFY_VAE_SHIFT);
        if let Some(s) = scale {
            let scale = scalar(&s).ctx(|| format!("{}: {COMFY_VAE_SCALE}", path.display()))?;
            let shift = match shift {
                Some(t) => scalar(&t).ctx(|| format!("{}: {COMFY_VAE_SHIFT}", path.display()))?,
                None => vec![0.0],
            };
            if let (Some(&scale), Some(&shift)) = (scale.first(), shift.first()) {
                vae_scaling = Some(LatentScaling { scale, shift });
            }
        }
    }

    // A taesd.py file is one part: the encoder's index 0 is a conv, the decoder's the Clamp.
    let file_part = (layout == Layout::TaesdPy).then(|| {
        if tensors.keys().any(|n| split_index(n).map(|(i, _)| i) == Some(0)) {
            Part::Encoder
        } else {
            Part::Decoder
        }
    });
    let mut parts: Vec<(Part, PartTensors)> = Vec::new();
    let mut names: Vec<_> = tensors.into_iter().collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, t) in names {
        let Some((part, local)) = layout.local_name(&name, file_part) else {
            return Err(TaesdError::UnexpectedTensor {
                file: path.clone(),
                shape: shape_of(&t),
                name,
                what: format!("{layout}-layout checkpoint (not a name of that layout)"),
            });
        };
        match parts.iter_mut().find(|(p, _)| *p == part) {
            Some((_, m)) => {
                m.insert(local, (name, t));
            }
            None => parts.push((part, BTreeMap::from([(local, (name, t))]))),
        }
    }
    parts.sort_by_key(|(p, _)| *p);
    Ok(Unit { path, layout, parts, metadata, vae_scaling })
}

/// The structure one part's tensors describe. Lenient: strict checking comes after.
/// `fallback_c`: latent channels to assume when the tensors that tell it are missing.
fn detect_part_config(part: Part, t: &PartTensors, fallback_c: Option<usize>, unit: &Unit) -> Result<TaesdConfig> {
    let max_index = t.keys().filter_map(|n| split_index(n).map(|(i, _)| i)).max().unwrap_or(0);
    let midblock_pool = t.keys().any(|n| n.contains(".pool."));
    let dim = |name: &str, d: usize| t.get(name).and_then(|(_, t)| t.dims().get(d).copied());
    let (downscale, c) = match part {
        Part::Encoder => {
            let x32 = max_index > 14 || (dim("0.weight", 0) == Some(32) && t.contains_key("2.weight"));
            let last = if x32 { 17 } else { 14 };
            let c = dim(&format!("{last}.weight"), 0).or_else(|| dim(&format!("{last}.bias"), 0));
            (if x32 { Downscale::X32 } else { Downscale::X8 }, c)
        }
        Part::Decoder => {
            let x32 = max_index > 19 || dim("1.weight", 0) == Some(256);
            (if x32 { Downscale::X32 } else { Downscale::X8 }, dim("1.weight", 1))
        }
    };
    let latent_channels = match c.or(fallback_c) {
        Some(c) => c,
        None => {
            let (name, shape) = match (part, downscale) {
                (Part::Encoder, Downscale::X8) => ("14.weight", "[C, 64, 3, 3]"),
                (Part::Encoder, Downscale::X32) => ("17.weight", "[C, 64, 3, 3]"),
                (Part::Decoder, Downscale::X8) => ("1.weight", "[64, C, 3, 3]"),
                (Part::Decoder, Downscale::X32) => ("1.weight", "[256, C, 3, 3]"),
            };
            return Err(TaesdError::MissingTensor {
                file: unit.path.clone(),
                name: unit.layout.external_name(part, name),
                expected: shape.to_string(),
                what: format!("{} (it gives the latent channel count)", part.prefix()),
            });
        }
    };
    Ok(TaesdConfig { latent_channels, midblock_pool, downscale })
}

/// Check one part's tensors against the structure: every tensor present, right shape, no extras.
pub(crate) fn check_part(cfg: &TaesdConfig, part: Part, t: &PartTensors, file: &Path, layout: Layout) -> Result<()> {
    let what = format!("{} {}", cfg.describe(), part.prefix());
    let expected = param_shapes(cfg, part);
    for (local, shape) in &expected {
        match t.get(local) {
            None => {
                return Err(TaesdError::MissingTensor {
                    file: file.to_path_buf(),
                    name: layout.external_name(part, local),
                    expected: format!("{shape:?}"),
                    what,
                })
            }
            Some((name, tensor)) if tensor.dims() != shape.as_slice() => {
                return Err(TaesdError::ShapeMismatch {
                    file: file.to_path_buf(),
                    name: name.clone(),
                    expected: shape.clone(),
                    got: shape_of(tensor),
                    what,
                })
            }
            Some(_) => {}
        }
    }
    if t.len() != expected.len() {
        let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        if let Some((_, (name, tensor))) = t.iter().find(|(l, _)| !known.contains(l.as_str())) {
            return Err(TaesdError::UnexpectedTensor {
                file: file.to_path_buf(),
                name: name.clone(),
                shape: shape_of(tensor),
                what,
            });
        }
    }
    Ok(())
}

/// The variant a path's names hint at: the file name, else its folder's or the one above
/// (`taef1/vae/diffusion_pytorch_model.safetensors`).
fn name_hint(path: &Path) -> Option<Variant> {
    path.ancestors().take(3).find_map(|p| p.file_name().and_then(|n| n.to_str()).and_then(Variant::from_file_name))
}

/// Check and merge files (each one or two parts) into one checkpoint.
fn assemble(
    units: Vec<Unit>,
    expected: Option<Variant>,
    diffusers_cfg: Option<(&Path, &DiffusersTinyConfig)>,
) -> Result<Checkpoint> {
    let first = units.first().ok_or_else(|| TaesdError::Other("no checkpoint files given".into()))?;
    let layout = first.layout;
    let fallback_c = expected.map(|v| v.latent_channels());

    // Detect every part's structure, and require one structure for all of them.
    let mut found: Option<(TaesdConfig, PathBuf, Part)> = None;
    let mut seen: HashMap<Part, PathBuf> = HashMap::new();
    for unit in &units {
        for (part, t) in &unit.parts {
            if let Some(prev) = seen.insert(*part, unit.path.clone()) {
                return Err(TaesdError::Other(format!(
                    "two {}s given: {} and {}",
                    part.prefix(),
                    prev.display(),
                    unit.path.display()
                )));
            }
            let cfg = detect_part_config(*part, t, fallback_c, unit)?;
            if let Some(v) = expected {
                if v.config() != cfg {
                    return Err(TaesdError::WrongVariant {
                        file: unit.path.clone(),
                        expected: v.to_string(),
                        found: format!("{} {}", cfg.describe(), part.prefix()),
                    });
                }
            }
            match &found {
                None => found = Some((cfg, unit.path.clone(), *part)),
                Some((c0, p0, part0)) if *c0 != cfg => {
                    return Err(TaesdError::Config {
                        path: unit.path.clone(),
                        reason: format!(
                            "its {} is {}, but the {} from {} is {}",
                            part.prefix(),
                            cfg.describe(),
                            part0.prefix(),
                            p0.display(),
                            c0.describe()
                        ),
                    })
                }
                Some(_) => {}
            }
        }
    }
    let (config, _, _) = found.ok_or_else(|| TaesdError::UnknownLayout {
        file: first.path.clone(),
        reason: "no encoder or decoder tensors".into(),
    })?;

    if let Some((path, dc)) = diffusers_cfg {
        if let Some(c) = dc.latent_channels.filter(|c| *c != config.latent_channels) {
            return Err(TaesdError::Config {
                path: path.to_path_buf(),
                reason: format!("latent_channels is {c}, but the weights have {}", config.latent_channels),
            });
        }
    }
    // diffusers-named weights of a structure AutoencoderTiny cannot build (madebyollin's
    // `taef2.safetensors` is one: diffusers names plus `pool` tensors) still load here.

    for unit in &units {
        for (part, t) in &unit.parts {
            check_part(&config, *part, t, &unit.path, unit.layout)?;
        }
    }

    let candidates = config.variants();
    let fits = |v: &Variant| candidates.contains(v);
    let variant = expected
        .or_else(|| {
            units.iter().find_map(|u| u.metadata.get(META_VARIANT).and_then(|s| Variant::parse(s))).filter(fits)
        })
        .or_else(|| units.iter().find_map(|u| name_hint(&u.path)).filter(fits))
        .or_else(|| config.unique_variant());

    let mut info = CheckpointInfo {
        config,
        variant,
        layout,
        encoder_file: seen.get(&Part::Encoder).cloned(),
        decoder_file: seen.get(&Part::Decoder).cloned(),
        dtype: DType::F32,
        vae_scaling: units.iter().find_map(|u| u.vae_scaling),
    };
    let mut tensors = HashMap::new();
    for unit in units {
        for (part, t) in unit.parts {
            for (local, (_, tensor)) in t {
                tensors.insert(format!("{}.{local}", part.prefix()), tensor);
            }
        }
    }
    if let Some(t) = tensors.values().next() {
        info.dtype = t.dtype();
    }
    Ok(Checkpoint { info, tensors })
}

/// The weight file and config of a diffusers folder (`path` itself or its `vae/` subfolder).
fn diffusers_files(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    for d in [dir.to_path_buf(), dir.join("vae")] {
        let config = d.join("config.json");
        if config.is_file() {
            if let Some(w) = DIFFUSERS_WEIGHT_FILES.iter().map(|f| d.join(f)).find(|p| p.is_file()) {
                return Some((w, config));
            }
        }
    }
    None
}

/// The taesd.py pair in a folder: `<name>_encoder.*` and `<name>_decoder.*` (safetensors
/// preferred over pickles); with several names, the one `expected` names.
fn taesd_py_files(dir: &Path, expected: Option<Variant>) -> Result<Vec<PathBuf>> {
    // name -> [encoder, decoder], each (rank: 0 safetensors, 1 pickle; path)
    let mut by_stem: BTreeMap<String, [Option<(u8, PathBuf)>; 2]> = BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(io_err(dir))?;
    for e in entries {
        let p = e.map_err(io_err(dir))?.path();
        let (Some(stem), Some(ext)) = (p.file_stem().and_then(|s| s.to_str()), p.extension().and_then(|s| s.to_str()))
        else {
            continue;
        };
        let rank = match ext {
            "safetensors" => 0u8,
            "pth" | "pt" => 1,
            _ => continue,
        };
        for (i, suffix) in ["_encoder", "_decoder"].into_iter().enumerate() {
            if let Some(name) = stem.strip_suffix(suffix) {
                let slot = &mut by_stem.entry(name.to_string()).or_default()[i];
                if slot.as_ref().is_none_or(|(r, _)| rank < *r) {
                    *slot = Some((rank, p.clone()));
                }
            }
        }
    }
    let mut names: Vec<_> = by_stem.keys().cloned().collect();
    if names.len() > 1 {
        if let Some(v) = expected {
            names.retain(|n| Variant::from_file_name(n) == Some(v));
        }
    }
    match names.as_slice() {
        [one] => Ok(by_stem.remove(one).unwrap().into_iter().flatten().map(|(_, p)| p).collect()),
        [] => Err(TaesdError::UnknownLayout {
            file: dir.to_path_buf(),
            reason: "a folder with neither config.json + diffusion_pytorch_model.* (diffusers) nor *_encoder / *_decoder files (taesd.py)".into(),
        }),
        many => Err(TaesdError::UnknownLayout {
            file: dir.to_path_buf(),
            reason: format!("several taesd.py checkpoints ({}); name one file or the variant", many.join(", ")),
        }),
    }
}

/// Load and check a checkpoint: one file of any layout, a diffusers folder (or a pipeline folder
/// with `vae/`), or a folder holding one taesd.py `<name>_encoder` / `<name>_decoder` pair.
/// `expected`: the variant the caller wants; a checkpoint of another structure is
/// [`TaesdError::WrongVariant`].
pub fn load_checkpoint(path: impl AsRef<Path>, expected: Option<Variant>) -> Result<Checkpoint> {
    let path = path.as_ref();
    if path.is_dir() {
        if let Some((weights, config)) = diffusers_files(path) {
            let dc = DiffusersTinyConfig::read(&config)?;
            let unit = split_file(read_tensor_file(&weights)?)?;
            if unit.layout != Layout::Diffusers {
                return Err(TaesdError::UnknownLayout {
                    file: weights,
                    reason: format!(
                        "beside a diffusers config.json, but its tensors are in the {} layout",
                        unit.layout
                    ),
                });
            }
            return assemble(vec![unit], expected, Some((config.as_path(), &dc)));
        }
        let files = taesd_py_files(path, expected)?;
        return load_checkpoints(&files, expected);
    }
    let unit = split_file(read_tensor_file(path)?)?;
    // A lone diffusers weight file: use the config beside it when there is one.
    if unit.layout == Layout::Diffusers {
        let config = path.with_file_name("config.json");
        if config.is_file() {
            let dc = DiffusersTinyConfig::read(&config)?;
            return assemble(vec![unit], expected, Some((config.as_path(), &dc)));
        }
    }
    assemble(vec![unit], expected, None)
}

/// Load several files as one checkpoint (e.g. a taesd.py `_encoder` and `_decoder` pair); each
/// part may come from one file only, and all must have one structure.
pub fn load_checkpoints<P: AsRef<Path>>(paths: &[P], expected: Option<Variant>) -> Result<Checkpoint> {
    let units = paths.iter().map(|p| read_tensor_file(p.as_ref()).and_then(split_file)).collect::<Result<Vec<_>>>()?;
    assemble(units, expected, None)
}

/// Load a checkpoint (see [`load_checkpoint`]) into a `VarMap` of `dtype` on `device`, for
/// fine-tuning. The variables are named as [`crate::Taesd::new`] asks for them.
pub fn load_varmap(
    path: impl AsRef<Path>,
    expected: Option<Variant>,
    dtype: DType,
    device: &Device,
) -> Result<(VarMap, CheckpointInfo)> {
    let ck = load_checkpoint(path, expected)?;
    let vm = ck.to_varmap(dtype, device)?;
    Ok((vm, ck.info))
}

/// The tensors of a `VarMap` (a shallow copy: they share storage with the variables).
pub fn varmap_tensors(varmap: &VarMap) -> HashMap<String, Tensor> {
    let data = varmap.data().lock().expect("VarMap lock");
    data.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect()
}

/// Set the decoder's output bias (all three channels) to `value` in a `VarMap` built by
/// [`crate::Taesd::new`] or [`crate::Decoder::new`] under `decoder` (0.5: start at mid-grey).
pub fn set_decoder_output_bias(varmap: &VarMap, cfg: impl Into<TaesdConfig>, value: f64) -> Result<()> {
    let name = crate::arch::decoder_last_conv_bias_name(cfg);
    let data = varmap.data().lock().expect("VarMap lock");
    let var = data.get(&name).ok_or_else(|| TaesdError::Other(format!("the VarMap has no `{name}`")))?;
    let t = var.as_tensor();
    let full = Tensor::full(value, t.shape(), t.device()).and_then(|f| f.to_dtype(t.dtype()));
    full.and_then(|f| var.set(&f)).ctx(|| name.clone())
}
