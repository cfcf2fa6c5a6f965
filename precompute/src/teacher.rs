//! The teacher: a VAE encoder exported to ONNX, run through ONNX Runtime.
//!
//! Two export shapes are accepted (checked against the preset before anything runs):
//! * output = C channels: the latent (or posterior mean) itself;
//! * output = 2C channels: posterior moments `[mean, logvar]` — we keep the mean and the std.
//!
//! Raw latents are turned into TAESD latents with the preset's [`LatentScaling`]; the input image
//! is mapped from [0, 1] into the encoder's [`PixelRange`].

use crate::device::DeviceRequest;
use anyhow::{anyhow, bail, Context, Result};
use half::f16;
use ort::environment::Environment;
use ort::ep::cuda::ConvAlgorithmSearch;
use ort::ep::ArbitrarilyConfigurableExecutionProvider;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session};
use ort::value::{DynTensor, TensorElementType, ValueType};
use std::path::Path;
use std::time::{Duration, Instant};
use taesd_schemas::conventions::{std_from_logvar, u8_to_unit};
use taesd_schemas::{PixelRange, VaeSpec};

/// What the encoder's output holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// C channels.
    Latent,
    /// 2C channels: mean then logvar.
    Moments,
}

/// One batch of teacher output, already in TAESD scale. `mean`/`std` are `n x C x h x w`.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub mean: Vec<f32>,
    pub std: Option<Vec<f32>>,
    /// `[C, h, w]` of one sample.
    pub shape: [usize; 3],
}

/// How the CUDA execution provider runs the teacher. Every field is a `precompute` flag; the
/// defaults are what worked fastest on an H100 (bench/results/, docs/gpu.md): heuristic
/// algorithm choice, no IO binding (it failed there).
#[derive(Debug, Clone, PartialEq)]
pub struct CudaTuning {
    /// cuDNN convolution algorithm search (`cudnn_conv_algo_search`).
    pub conv_search: ConvSearch,
    /// `prefer_nhwc`: let ONNX Runtime run convolutions channels-last.
    pub prefer_nhwc: bool,
    /// Device-resident input/output buffers bound once (IoBinding): each batch is copied from a
    /// pinned host buffer into the same device buffer, the output back into a pinned one.
    pub io_binding: bool,
    /// Fix the model's symbolic batch/height/width to the run's (free-dimension overrides), so ONNX
    /// Runtime folds the shape computations; the last batch of a shard is padded.
    pub static_shapes: bool,
    /// Capture the run as a CUDA graph and replay it (needs static shapes and io_binding).
    pub cuda_graph: bool,
    /// More CUDA provider options, `key=value` as ONNX Runtime names them.
    pub extra: Vec<(String, String)>,
}

impl Default for CudaTuning {
    fn default() -> Self {
        CudaTuning {
            conv_search: ConvSearch::Heuristic,
            prefer_nhwc: false,
            io_binding: false,
            static_shapes: false,
            cuda_graph: false,
            extra: Vec::new(),
        }
    }
}

/// `cudnn_conv_algo_search`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConvSearch {
    /// Time every algorithm at the first run of each shape (like `torch.backends.cudnn.benchmark`).
    Exhaustive,
    /// cuDNN's heuristics.
    Heuristic,
    /// Always IMPLICIT_PRECOMP_GEMM.
    Default,
}

/// How to run the teacher.
#[derive(Debug, Clone)]
pub struct TeacherOptions {
    pub device: DeviceRequest,
    /// ONNX Runtime's CPU thread count (None: its default).
    pub intra_threads: Option<usize>,
    /// Let the CUDA EP use TF32 for float32 convolutions and matmuls: faster, but latents then
    /// differ from an fp32 reference by ~5e-3 relative (measured on an H100, docs/gpu.md). Off by
    /// default: the teacher is the ground truth the student learns.
    pub tf32: bool,
    pub cuda: CudaTuning,
    /// Images per run: the shape of the warm-up runs, the pinned buffers and the static shape.
    pub batch: usize,
    /// Runs of a grey batch at the working shape before any timing (cuDNN's algorithm search and
    /// the CUDA graph capture happen there). CUDA only.
    pub warmup: usize,
}

impl Default for TeacherOptions {
    fn default() -> Self {
        TeacherOptions {
            device: DeviceRequest::Cpu,
            intra_threads: None,
            tf32: false,
            cuda: CudaTuning::default(),
            batch: 1,
            warmup: 0,
        }
    }
}

/// Element type and pixel range the encoder takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputFormat {
    pub half: bool,
    pub range: PixelRange,
}

impl InputFormat {
    /// u8 -> encoder input value, exactly as `range.from_unit(u8_to_unit(v))` (then f16).
    fn lut(&self) -> [f32; 256] {
        std::array::from_fn(|v| self.range.from_unit(u8_to_unit(v as u8)))
    }

    /// An RGB image as a CHW sample in this format.
    pub fn convert(&self, img: &image::RgbImage) -> SamplePixels {
        let (w, h) = img.dimensions();
        let plane = (w * h) as usize;
        let lut = self.lut();
        let raw = img.as_raw();
        if self.half {
            let lut16: [f16; 256] = std::array::from_fn(|i| f16::from_f32(lut[i]));
            let mut out = vec![f16::ZERO; 3 * plane];
            let (r, rest) = out.split_at_mut(plane);
            let (g, b) = rest.split_at_mut(plane);
            for (i, px) in raw.chunks_exact(3).enumerate() {
                r[i] = lut16[px[0] as usize];
                g[i] = lut16[px[1] as usize];
                b[i] = lut16[px[2] as usize];
            }
            SamplePixels::F16(out)
        } else {
            let mut out = vec![0f32; 3 * plane];
            let (r, rest) = out.split_at_mut(plane);
            let (g, b) = rest.split_at_mut(plane);
            for (i, px) in raw.chunks_exact(3).enumerate() {
                r[i] = lut[px[0] as usize];
                g[i] = lut[px[1] as usize];
                b[i] = lut[px[2] as usize];
            }
            SamplePixels::F32(out)
        }
    }

    /// `[0, 1]` CHW values (the old `encode` input) in this format.
    pub fn convert_unit(&self, unit: &[f32]) -> SamplePixels {
        if self.half {
            SamplePixels::F16(unit.iter().map(|&x| f16::from_f32(self.range.from_unit(x))).collect())
        } else {
            SamplePixels::F32(unit.iter().map(|&x| self.range.from_unit(x)).collect())
        }
    }

    /// The value of a grey pixel (padding).
    pub fn grey(&self) -> f32 {
        self.range.from_unit(0.5)
    }
}

/// One CHW sample in the encoder's input type and range.
#[derive(Debug, Clone)]
pub enum SamplePixels {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl SamplePixels {
    pub fn len(&self) -> usize {
        match self {
            SamplePixels::F16(v) => v.len(),
            SamplePixels::F32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A host buffer of `rows x 3 x h x w` encoder inputs: pinned (page-locked) memory from the CUDA
/// provider when the teacher runs on CUDA, so that copies to the device run at full speed.
pub struct HostBatch {
    tensor: DynTensor,
    half: bool,
    rows: usize,
    /// Elements per row.
    per: usize,
}

impl HostBatch {
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn shape(&self) -> (usize, usize) {
        let s = self.tensor.shape();
        (s[2] as usize, s[3] as usize)
    }

    /// Copy one sample into row `row`.
    pub fn write(&mut self, row: usize, px: &SamplePixels) -> Result<()> {
        if px.len() != self.per || row >= self.rows {
            bail!("sample of {} values for row {row} of a {}x{} batch buffer", px.len(), self.rows, self.per);
        }
        let r = row * self.per..(row + 1) * self.per;
        match (px, self.half) {
            (SamplePixels::F16(v), true) => {
                self.tensor.try_extract_tensor_mut::<f16>().map_err(ort_err)?.1[r].copy_from_slice(v)
            }
            (SamplePixels::F32(v), false) => {
                self.tensor.try_extract_tensor_mut::<f32>().map_err(ort_err)?.1[r].copy_from_slice(v)
            }
            (SamplePixels::F32(v), true) => {
                for (d, s) in self.tensor.try_extract_tensor_mut::<f16>().map_err(ort_err)?.1[r].iter_mut().zip(v) {
                    *d = f16::from_f32(*s);
                }
            }
            (SamplePixels::F16(v), false) => {
                for (d, s) in self.tensor.try_extract_tensor_mut::<f32>().map_err(ort_err)?.1[r].iter_mut().zip(v) {
                    *d = s.to_f32();
                }
            }
        }
        Ok(())
    }

    /// Fill rows `from..` with one value (the padding of a fixed-size batch).
    pub fn fill_from(&mut self, from: usize, value: f32) -> Result<()> {
        let r = from * self.per..;
        if self.half {
            self.tensor.try_extract_tensor_mut::<f16>().map_err(ort_err)?.1[r].fill(f16::from_f32(value));
        } else {
            self.tensor.try_extract_tensor_mut::<f32>().map_err(ort_err)?.1[r].fill(value);
        }
        Ok(())
    }
}

/// Allocates [`HostBatch`]es for one teacher (pinned on CUDA). Send, to live in the batching thread.
pub struct HostAllocator {
    alloc: Allocator,
    half: bool,
    pub pinned: bool,
}

impl HostAllocator {
    pub fn batch(&self, rows: usize, h: usize, w: usize) -> Result<HostBatch> {
        let ty = if self.half { TensorElementType::Float16 } else { TensorElementType::Float32 };
        let tensor = DynTensor::new(&self.alloc, ty, [rows, 3, h, w]).map_err(ort_err)?;
        Ok(HostBatch { tensor, half: self.half, rows, per: 3 * h * w })
    }
}

/// Device-resident input/output buffers bound to the session once (io_binding).
struct Bound {
    binding: IoBinding,
    dev_in: DynTensor,
    // The output is bound to host memory that ONNX Runtime allocates (`bind_output_to_device`
    // with a CPU MemoryInfo: the device->host copy of a plain run). On the H100 with ORT 1.31.1
    // both other ways failed with `gpu_data_transfer.cc: dst_data != src_data`: a device output
    // copied back with ort's `copy_into`, and an output bound to a pinned host tensor.
    shape: [usize; 4],
}

pub struct Teacher {
    session: Session,
    input_name: String,
    output_name: String,
    input_type: TensorElementType,
    /// None until the first run when the ONNX channel dimension is symbolic.
    output_kind: Option<OutputKind>,
    fixed_batch: Option<usize>,
    spec: VaeSpec,
    /// The execution provider actually in use: `cpu` or `cuda:N`.
    pub device: String,
    /// How the session is set up, for the summary and the manifest.
    pub setup: String,
    /// Time spent in the warm-up runs (cuDNN search, graph capture).
    pub warmup_time: Duration,
    cuda: Option<i32>,
    tuning: CudaTuning,
    bound: Option<Bound>,
}

fn ort_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("{e}")
}

/// `(element type, dims)` of a tensor input/output; -1 for symbolic dims.
fn tensor_sig(t: &ValueType) -> Option<(TensorElementType, Vec<i64>)> {
    match t {
        ValueType::Tensor { ty, shape, .. } => Some((*ty, shape.to_vec())),
        _ => None,
    }
}

/// Names of the input's symbolic dimensions, `[batch, channels, height, width]` (empty if fixed).
fn input_symbols(session: &Session) -> Vec<String> {
    match session.inputs().first().map(|i| i.dtype()) {
        Some(ValueType::Tensor { dimension_symbols, .. }) => dimension_symbols.to_vec(),
        _ => Vec::new(),
    }
}

/// Refuse, with the fix, a `--onnx` file that is missing or plainly another kind of file (a
/// PyTorch checkpoint, a safetensors file, an archive): ONNX Runtime's own message for those is
/// a protobuf parse error. Reads the first bytes only.
pub fn check_onnx_file(onnx: &Path) -> Result<()> {
    use std::io::Read;
    if !onnx.is_file() {
        bail!("ONNX file {} does not exist", onnx.display());
    }
    let mut head = [0u8; 16];
    let n = std::fs::File::open(onnx)
        .and_then(|mut f| f.read(&mut head))
        .with_context(|| format!("cannot read the ONNX file {}", onnx.display()))?;
    let head = &head[..n];
    let hint = "export the VAE encoder to ONNX first (tools/export_vae_onnx.py; see the README)";
    let what = if n == 0 {
        Some("an empty file".to_string())
    } else if head.starts_with(b"PK\x03\x04") {
        Some("a zip archive (a PyTorch .pth/.pt checkpoint is one), not an ONNX model".to_string())
    } else if head[0] == 0x80 && (2..=5).contains(&head.get(1).copied().unwrap_or(0)) {
        Some("a Python pickle (a PyTorch checkpoint), not an ONNX model".to_string())
    } else if n >= 9 && head[8] == b'{' && u64::from_le_bytes(head[..8].try_into().expect("8 bytes")) < (1 << 32) {
        Some("a safetensors file (weights only), not an ONNX model".to_string())
    } else if head.starts_with(b"\x89HDF") {
        Some("an HDF5 file (Keras weights?), not an ONNX model".to_string())
    } else {
        None
    };
    match what {
        Some(w) => bail!("--onnx {} is {w}: {hint}", onnx.display()),
        None => Ok(()),
    }
}

impl Teacher {
    /// Open `onnx` for `spec` on `device`, and check its input/output signature against the preset
    /// and the working resolution; on CUDA, run the warm-up batches.
    pub fn new(
        env: &Environment,
        onnx: &Path,
        spec: &VaeSpec,
        resolution: u32,
        opts: TeacherOptions,
    ) -> Result<Teacher> {
        check_onnx_file(onnx)?;
        let res = resolution as i64;
        let (session, device_used) = match opts.device {
            DeviceRequest::Cpu => (Self::session(env, onnx, None, &opts, res)?, "cpu".to_string()),
            DeviceRequest::Cuda(i) => {
                let s = Self::session(env, onnx, Some(i), &opts, res).with_context(|| {
                    format!("the CUDA execution provider (device {i}) could not be used; nothing falls back to the CPU when cuda is asked for — use --device cpu or auto")
                })?;
                (s, format!("cuda:{i}"))
            }
            DeviceRequest::Auto => match Self::session(env, onnx, Some(0), &opts, res) {
                Ok(s) => (s, "cuda:0".to_string()),
                Err(e) => {
                    tracing::warn!("--device auto: CUDA execution provider unavailable ({e:#}); USING THE CPU");
                    eprintln!("warning: --device auto: CUDA is not available ({e:#}); running the teacher on the CPU");
                    (Self::session(env, onnx, None, &opts, res)?, "cpu".to_string())
                }
            },
        };
        let cuda = device_used.strip_prefix("cuda:").map(|i| i.parse::<i32>().expect("device id"));
        let t = &opts.cuda;
        let setup = match cuda {
            None => "cpu".to_string(),
            Some(_) => format!(
                "conv search {:?}, nhwc {}, io binding {}, static shapes {}, cuda graph {}{}",
                t.conv_search,
                t.prefer_nhwc,
                t.io_binding,
                t.static_shapes || t.cuda_graph,
                t.cuda_graph,
                t.extra.iter().map(|(k, v)| format!(", {k}={v}")).collect::<String>()
            ),
        };
        let mut t = Teacher {
            input_name: String::new(),
            output_name: String::new(),
            input_type: TensorElementType::Float32,
            output_kind: None,
            fixed_batch: None,
            spec: spec.clone(),
            device: device_used,
            setup,
            warmup_time: Duration::ZERO,
            cuda,
            tuning: opts.cuda.clone(),
            bound: None,
            session,
        };
        t.validate(onnx, resolution)?;
        if t.cuda.is_some()
            && t.session.metadata().ok().and_then(|m| m.custom("taesd.optimized")).as_deref() == Some("none")
        {
            // tools/export_vae_onnx.py writes this key; 1.8x measured at 512 and 1024 (docs/gpu.md).
            eprintln!(
                "note: {} is a plain export; on CUDA an export with `tools/export_vae_onnx.py --optimize` (fused GroupNorm, NHWC convolutions) encodes ~1.8x faster",
                onnx.display()
            );
        }
        if t.cuda.is_some() && opts.warmup > 0 {
            let start = Instant::now();
            let rows = t.fixed_batch.unwrap_or(opts.batch.max(1));
            let side = resolution as usize;
            let alloc = t.host_allocator()?;
            let mut b = alloc.batch(rows, side, side)?;
            b.fill_from(0, t.input_format().grey())?;
            for _ in 0..opts.warmup.max(if t.tuning.cuda_graph { 3 } else { 1 }) {
                t.run(&b, rows)?;
            }
            t.warmup_time = start.elapsed();
            tracing::info!(
                "teacher warm-up ({} runs of {rows}x3x{side}x{side}): {:.1} s",
                opts.warmup,
                t.warmup_time.as_secs_f64()
            );
        }
        Ok(t)
    }

    fn builder(
        env: &Environment,
        cuda: Option<i32>,
        opts: &TeacherOptions,
    ) -> Result<ort::session::builder::SessionBuilder> {
        let mut b = Session::builder(env).map_err(ort_err)?;
        if let Some(n) = opts.intra_threads {
            b = b.with_intra_threads(n).map_err(ort_err)?;
        }
        if let Some(i) = cuda {
            let t = &opts.cuda;
            let search = match t.conv_search {
                ConvSearch::Exhaustive => ConvAlgorithmSearch::Exhaustive,
                ConvSearch::Heuristic => ConvAlgorithmSearch::Heuristic,
                ConvSearch::Default => ConvAlgorithmSearch::Default,
            };
            let mut ep = ort::ep::CUDA::default()
                .with_device_id(i)
                .with_tf32(opts.tf32)
                .with_conv_algorithm_search(search)
                .with_prefer_nhwc(t.prefer_nhwc)
                .with_cuda_graph(t.cuda_graph);
            for (k, v) in &t.extra {
                ep = ep.with_arbitrary_config(k, v);
            }
            b = b.with_execution_providers([ep.build().error_on_failure()]).map_err(ort_err)?;
        }
        Ok(b)
    }

    fn session(env: &Environment, onnx: &Path, cuda: Option<i32>, opts: &TeacherOptions, res: i64) -> Result<Session> {
        let load = |mut b: ort::session::builder::SessionBuilder| {
            b.commit_from_file(onnx).map_err(|e| anyhow!("could not load ONNX model {}: {e}", onnx.display()))
        };
        let static_shapes = cuda.is_some() && (opts.cuda.static_shapes || opts.cuda.cuda_graph);
        if !static_shapes {
            return load(Self::builder(env, cuda, opts)?);
        }
        // Free-dimension overrides: first the names tools/export_vae_onnx.py gives, then whatever
        // symbols the model turns out to use.
        let batch = opts.batch.max(1) as i64;
        let mut names: Vec<(String, i64)> =
            vec![("batch".into(), batch), ("height".into(), res), ("width".into(), res)];
        for _ in 0..2 {
            let mut b = Self::builder(env, cuda, opts)?;
            for (n, v) in &names {
                b = b.with_dimension_override(n, *v).map_err(ort_err)?;
            }
            let s = load(b)?;
            let dims = s.inputs().first().and_then(|i| tensor_sig(i.dtype())).map(|(_, d)| d).unwrap_or_default();
            let syms = input_symbols(&s);
            let missing: Vec<(String, i64)> = dims
                .iter()
                .zip(syms.iter())
                .enumerate()
                .filter(|(_, (d, sym))| **d < 0 && !sym.is_empty() && !names.iter().any(|(n, _)| n == *sym))
                .map(|(axis, (_, sym))| (sym.clone(), if axis == 0 { batch } else { res }))
                .collect();
            if missing.is_empty() {
                if dims.iter().any(|d| *d < 0) {
                    tracing::warn!("static shapes: the input still has unnamed symbolic dimensions {dims:?}");
                }
                return Ok(s);
            }
            names.extend(missing);
        }
        bail!("could not make the input shape of {} static", onnx.display())
    }

    /// The encoder's input element type and range: what [`HostBatch`]es hold.
    pub fn input_format(&self) -> InputFormat {
        InputFormat { half: self.input_type == TensorElementType::Float16, range: self.spec.input_range }
    }

    /// An allocator of input buffers: pinned memory on CUDA (plain memory if that fails), else the CPU's.
    pub fn host_allocator(&self) -> Result<HostAllocator> {
        let half = self.input_type == TensorElementType::Float16;
        if self.cuda.is_some() {
            let info = MemoryInfo::new(AllocationDevice::CUDA_PINNED, 0, AllocatorType::Device, MemoryType::CPUOutput)
                .map_err(ort_err)?;
            // Check that the host can write into what it gives (ort refuses to extract from
            // memory it does not see as host-accessible).
            let usable = Allocator::new(&self.session, info).and_then(|alloc| {
                let mut probe = DynTensor::new(&alloc, TensorElementType::Float32, [1usize, 4])?;
                probe.try_extract_tensor_mut::<f32>()?.1.fill(0.0);
                drop(probe);
                Ok(alloc)
            });
            match usable {
                Ok(alloc) => return Ok(HostAllocator { alloc, half, pinned: true }),
                Err(e) => {
                    tracing::warn!("no usable pinned host memory from the CUDA provider ({e}); using pageable memory")
                }
            }
        }
        Ok(HostAllocator { alloc: Allocator::default(), half, pinned: false })
    }

    fn validate(&mut self, onnx: &Path, resolution: u32) -> Result<()> {
        let name = onnx.display();
        let c = self.spec.channels as i64;
        let ds = self.spec.downscale as u32;
        if !resolution.is_multiple_of(ds) {
            bail!("--resolution {resolution} is not a multiple of the encoder's downscale factor {ds}");
        }
        let inp = self.session.inputs().first().ok_or_else(|| anyhow!("{name}: the model has no input"))?;
        let (ity, idims) =
            tensor_sig(inp.dtype()).ok_or_else(|| anyhow!("{name}: input `{}` is not a tensor", inp.name()))?;
        if idims.len() != 4 {
            bail!("{name}: input `{}` has shape {idims:?}; expected [batch, 3, H, W]", inp.name());
        }
        if idims[1] != 3 && idims[1] != -1 {
            bail!("{name}: input `{}` has {} channels; expected 3 (RGB, NCHW)", inp.name(), idims[1]);
        }
        for (d, what) in [(idims[2], "height"), (idims[3], "width")] {
            if d > 0 && d != resolution as i64 {
                bail!("{name}: input {what} is fixed to {d} but --resolution is {resolution}; export the encoder with dynamic size or match the resolution");
            }
        }
        if !matches!(ity, TensorElementType::Float32 | TensorElementType::Float16) {
            bail!("{name}: input `{}` is {ity:?}; expected float32 or float16", inp.name());
        }
        self.input_type = ity;
        self.fixed_batch = (idims[0] > 0).then_some(idims[0] as usize);
        self.input_name = inp.name().to_string();

        let outs = self.session.outputs();
        let out = outs
            .iter()
            .find(|o| matches!(o.name(), "latent" | "latent_dist" | "moments" | "latent_mean"))
            .or_else(|| outs.first())
            .ok_or_else(|| anyhow!("{name}: the model has no output"))?;
        let (oty, odims) =
            tensor_sig(out.dtype()).ok_or_else(|| anyhow!("{name}: output `{}` is not a tensor", out.name()))?;
        if odims.len() != 4 {
            bail!("{name}: output `{}` has shape {odims:?}; expected [batch, C, H/{ds}, W/{ds}]", out.name());
        }
        if !matches!(oty, TensorElementType::Float32 | TensorElementType::Float16) {
            bail!("{name}: output `{}` is {oty:?}; expected float32 or float16", out.name());
        }
        self.output_kind = Self::kind_for(odims[1], c)
            .map_err(|e| anyhow!("{name}: output `{}`: {e} (preset `{}`)", out.name(), self.spec.name))?;
        for d in [odims[2], odims[3]] {
            if d > 0 && d != (resolution / ds) as i64 {
                bail!(
                    "{name}: output `{}` has spatial size {d}; expected {} (= {resolution} / {ds}) for preset `{}`",
                    out.name(),
                    resolution / ds,
                    self.spec.name
                );
            }
        }
        self.output_name = out.name().to_string();
        Ok(())
    }

    /// The output kind for an output channel count (`-1` = decide at the first run).
    fn kind_for(ch: i64, c: i64) -> Result<Option<OutputKind>> {
        match ch {
            -1 => Ok(None),
            x if x == c => Ok(Some(OutputKind::Latent)),
            x if x == 2 * c => Ok(Some(OutputKind::Moments)),
            x => bail!(
                "{x} channels, but the preset has {c}-channel latents (expected {c}, or {} for posterior moments)",
                2 * c
            ),
        }
    }

    /// Encode `n` images (`n x 3 x h x w`, [0, 1], row-major) into TAESD-scale latents.
    pub fn encode(&mut self, images: &[f32], n: usize, h: usize, w: usize) -> Result<Encoded> {
        assert_eq!(images.len(), n * 3 * h * w, "image buffer size");
        if let Some(fb) = self.fixed_batch {
            if n > fb {
                bail!("batch of {n} images exceeds the model's fixed batch size {fb}; use --batch-size {fb}");
            }
        }
        let rows = self.fixed_batch.unwrap_or(n).max(n);
        let fmt = self.input_format();
        let mut b = self.host_allocator()?.batch(rows, h, w)?;
        let per = 3 * h * w;
        for i in 0..n {
            b.write(i, &fmt.convert_unit(&images[i * per..(i + 1) * per]))?;
        }
        if rows > n {
            b.fill_from(n, fmt.grey())?; // pad a fixed batch with grey
        }
        self.run(&b, n)
    }

    /// Encode the first `n` rows of `batch` (the other rows are padding) into TAESD-scale latents.
    pub fn run(&mut self, batch: &HostBatch, n: usize) -> Result<Encoded> {
        let (h, w) = batch.shape();
        let rows = batch.rows();
        if n > rows {
            bail!("{n} samples in a buffer of {rows} rows");
        }
        if let Some(fb) = self.fixed_batch {
            if rows != fb {
                bail!("batch of {rows} rows but the model's batch size is fixed to {fb}; use --batch-size {fb}");
            }
        }
        let shape = [rows, 3, h, w];
        let use_binding = self.cuda.is_some() && self.tuning.io_binding;
        if use_binding && self.output_kind.is_some() && self.bound.as_ref().is_none_or(|b| b.shape != shape) {
            self.bind(shape)?;
        }
        let (oshape, raw): (Vec<i64>, Vec<f32>) = match self.bound.as_mut().filter(|b| use_binding && b.shape == shape)
        {
            Some(b) => {
                batch.tensor.copy_into(&mut b.dev_in).map_err(|e| anyhow!("copy to the device: {e}"))?;
                let outputs = self.session.run_binding(&b.binding).map_err(ort_err)?;
                let v =
                    outputs.get(&self.output_name).ok_or_else(|| anyhow!("output `{}` missing", self.output_name))?;
                extract(v)?
            }
            None => {
                let outputs =
                    self.session.run(ort::inputs![self.input_name.as_str() => &batch.tensor]).map_err(ort_err)?;
                let v =
                    outputs.get(&self.output_name).ok_or_else(|| anyhow!("output `{}` missing", self.output_name))?;
                extract(v)?
            }
        };
        self.finish(&oshape, &raw, rows, n, h, w)
    }

    /// Allocate the device buffers for `shape` and bind them (io_binding).
    fn bind(&mut self, shape: [usize; 4]) -> Result<()> {
        self.bound = None;
        let dev = self.cuda.expect("cuda");
        let cuda = Allocator::new(
            &self.session,
            MemoryInfo::new(AllocationDevice::CUDA, dev, AllocatorType::Device, MemoryType::Default)
                .map_err(ort_err)?,
        )
        .map_err(|e| anyhow!("CUDA allocator: {e}"))?;
        let dev_in = DynTensor::new(&cuda, self.input_type, shape).map_err(ort_err)?;
        let mut binding = self.session.create_binding().map_err(ort_err)?;
        binding.bind_input(self.input_name.as_str(), &dev_in).map_err(ort_err)?;
        let host =
            MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default).map_err(ort_err)?;
        binding.bind_output_to_device(self.output_name.as_str(), &host).map_err(ort_err)?;
        self.bound = Some(Bound { binding, dev_in, shape });
        Ok(())
    }

    /// Raw output `[rows, och, h/ds, w/ds]` -> the first `n` samples, in TAESD scale.
    fn finish(&mut self, oshape: &[i64], raw: &[f32], rows: usize, n: usize, h: usize, w: usize) -> Result<Encoded> {
        let c = self.spec.channels;
        let ds = self.spec.downscale;
        if oshape.len() != 4
            || oshape[0] as usize != rows
            || oshape[2] as usize != h / ds
            || oshape[3] as usize != w / ds
        {
            bail!("teacher output has shape {oshape:?}; expected [{rows}, C, {}, {}]", h / ds, w / ds);
        }
        let kind = match self.output_kind {
            Some(k) => k,
            None => {
                let k = Self::kind_for(oshape[1], c as i64)?.expect("concrete channel count");
                self.output_kind = Some(k);
                k
            }
        };
        let hw = (h / ds) * (w / ds);
        let och = oshape[1] as usize;
        let scaling = self.spec.scaling;
        let mut mean = Vec::with_capacity(n * c * hw);
        let mut std = (kind == OutputKind::Moments).then(|| Vec::with_capacity(n * c * hw));
        for i in 0..n {
            let sample = &raw[i * och * hw..(i + 1) * och * hw];
            mean.extend(sample[..c * hw].iter().map(|&z| scaling.to_scaled(z)));
            if let Some(std) = std.as_mut() {
                std.extend(sample[c * hw..2 * c * hw].iter().map(|&lv| scaling.std_to_scaled(std_from_logvar(lv))));
            }
        }
        Ok(Encoded { mean, std, shape: [c, h / ds, w / ds] })
    }

    pub fn output_kind(&self) -> Option<OutputKind> {
        self.output_kind
    }

    pub fn fixed_batch(&self) -> Option<usize> {
        self.fixed_batch
    }
}

/// `(shape, values as f32)` of an f16/f32 tensor on the host.
fn extract<T: ort::value::TensorValueTypeMarker + ?Sized>(v: &ort::value::Value<T>) -> Result<(Vec<i64>, Vec<f32>)> {
    match v.dtype() {
        ValueType::Tensor { ty: TensorElementType::Float16, .. } => {
            let (s, d) = v.try_extract_tensor::<f16>().map_err(ort_err)?;
            Ok((s.to_vec(), d.iter().map(|x| x.to_f32()).collect()))
        }
        _ => {
            let (s, d) = v.try_extract_tensor::<f32>().map_err(ort_err)?;
            Ok((s.to_vec(), d.to_vec()))
        }
    }
}
