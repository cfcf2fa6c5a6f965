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
use ort::session::Session;
use ort::value::{Tensor, TensorElementType, ValueType};
use std::path::Path;
use taesd_schemas::conventions::std_from_logvar;
use taesd_schemas::VaeSpec;

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

/// How to run the teacher.
#[derive(Debug, Clone, Copy)]
pub struct TeacherOptions {
    pub device: DeviceRequest,
    /// ONNX Runtime's CPU thread count (None: its default).
    pub intra_threads: Option<usize>,
    /// Let the CUDA EP use TF32 for float32 convolutions and matmuls: faster, but latents then
    /// differ from an fp32 reference by ~5e-3 relative (measured on an H100, docs/gpu.md). Off by
    /// default: the teacher is the ground truth the student learns.
    pub tf32: bool,
}

impl Default for TeacherOptions {
    fn default() -> Self {
        TeacherOptions { device: DeviceRequest::Cpu, intra_threads: None, tf32: false }
    }
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

impl Teacher {
    /// Open `onnx` for `spec` on `device`, and check its input/output signature against the preset
    /// and the working resolution.
    pub fn new(
        env: &Environment,
        onnx: &Path,
        spec: &VaeSpec,
        resolution: u32,
        opts: TeacherOptions,
    ) -> Result<Teacher> {
        if !onnx.is_file() {
            bail!("ONNX file {} does not exist", onnx.display());
        }
        let (session, device_used) = match opts.device {
            DeviceRequest::Cpu => (Self::session(env, onnx, None, &opts)?, "cpu".to_string()),
            DeviceRequest::Cuda(i) => {
                let s = Self::session(env, onnx, Some(i), &opts).with_context(|| {
                    format!("the CUDA execution provider (device {i}) could not be used; nothing falls back to the CPU when cuda is asked for — use --device cpu or auto")
                })?;
                (s, format!("cuda:{i}"))
            }
            DeviceRequest::Auto => match Self::session(env, onnx, Some(0), &opts) {
                Ok(s) => (s, "cuda:0".to_string()),
                Err(e) => {
                    tracing::warn!("--device auto: CUDA execution provider unavailable ({e:#}); USING THE CPU");
                    eprintln!("warning: --device auto: CUDA is not available ({e:#}); running the teacher on the CPU");
                    (Self::session(env, onnx, None, &opts)?, "cpu".to_string())
                }
            },
        };
        let mut t = Teacher {
            input_name: String::new(),
            output_name: String::new(),
            input_type: TensorElementType::Float32,
            output_kind: None,
            fixed_batch: None,
            spec: spec.clone(),
            device: device_used,
            session,
        };
        t.validate(onnx, resolution)?;
        Ok(t)
    }

    fn session(env: &Environment, onnx: &Path, cuda: Option<i32>, opts: &TeacherOptions) -> Result<Session> {
        let mut b = Session::builder(env).map_err(ort_err)?;
        if let Some(n) = opts.intra_threads {
            b = b.with_intra_threads(n).map_err(ort_err)?;
        }
        if let Some(i) = cuda {
            let ep = ort::ep::CUDA::default().with_device_id(i).with_tf32(opts.tf32).build().error_on_failure();
            b = b.with_execution_providers([ep]).map_err(ort_err)?;
        }
        b.commit_from_file(onnx).map_err(|e| anyhow!("could not load ONNX model {}: {e}", onnx.display()))
    }

    fn validate(&mut self, onnx: &Path, resolution: u32) -> Result<()> {
        let name = onnx.display();
        let c = self.spec.channels as i64;
        let ds = self.spec.downscale as u32;
        if resolution % ds != 0 {
            bail!("--resolution {resolution} is not a multiple of the encoder's downscale factor {ds}");
        }
        let inp = self.session.inputs().first().ok_or_else(|| anyhow!("{name}: the model has no input"))?;
        let (ity, idims) = tensor_sig(inp.dtype()).ok_or_else(|| anyhow!("{name}: input `{}` is not a tensor", inp.name()))?;
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
        let (oty, odims) = tensor_sig(out.dtype()).ok_or_else(|| anyhow!("{name}: output `{}` is not a tensor", out.name()))?;
        if odims.len() != 4 {
            bail!("{name}: output `{}` has shape {odims:?}; expected [batch, C, H/{ds}, W/{ds}]", out.name());
        }
        if !matches!(oty, TensorElementType::Float32 | TensorElementType::Float16) {
            bail!("{name}: output `{}` is {oty:?}; expected float32 or float16", out.name());
        }
        self.output_kind = Self::kind_for(odims[1], c).map_err(|e| anyhow!("{name}: output `{}`: {e} (preset `{}`)", out.name(), self.spec.name))?;
        for d in [odims[2], odims[3]] {
            if d > 0 && d != (resolution / ds) as i64 {
                bail!("{name}: output `{}` has spatial size {d}; expected {} (= {resolution} / {ds}) for preset `{}`", out.name(), resolution / ds, self.spec.name);
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
            x => bail!("{x} channels, but the preset has {c}-channel latents (expected {c}, or {} for posterior moments)", 2 * c),
        }
    }

    /// Encode `n` images (`n x 3 x h x w`, [0, 1], row-major) into TAESD-scale latents.
    pub fn encode(&mut self, images: &[f32], n: usize, h: usize, w: usize) -> Result<Encoded> {
        assert_eq!(images.len(), n * 3 * h * w, "image buffer size");
        let run_n = self.fixed_batch.unwrap_or(n).max(n);
        if let Some(fb) = self.fixed_batch {
            if n > fb {
                bail!("batch of {n} images exceeds the model's fixed batch size {fb}; use --batch-size {fb}");
            }
        }
        let range = self.spec.input_range;
        let mut buf: Vec<f32> = Vec::with_capacity(run_n * 3 * h * w);
        buf.extend(images.iter().map(|&x| range.from_unit(x)));
        buf.resize(run_n * 3 * h * w, range.from_unit(0.5)); // pad a fixed batch with grey
        let shape = [run_n as i64, 3, h as i64, w as i64];
        let (oshape, raw): (Vec<i64>, Vec<f32>) = {
            let outputs = match self.input_type {
                TensorElementType::Float16 => {
                    let v: Vec<f16> = buf.iter().map(|&x| f16::from_f32(x)).collect();
                    let t = Tensor::from_array((shape, v)).map_err(ort_err)?;
                    self.session.run(ort::inputs![self.input_name.as_str() => t]).map_err(ort_err)?
                }
                _ => {
                    let t = Tensor::from_array((shape, buf)).map_err(ort_err)?;
                    self.session.run(ort::inputs![self.input_name.as_str() => t]).map_err(ort_err)?
                }
            };
            let v = outputs.get(&self.output_name).ok_or_else(|| anyhow!("output `{}` missing", self.output_name))?;
            match v.data_type() {
                TensorElementType::Float16 => {
                    let (s, d) = v.try_extract_tensor::<f16>().map_err(ort_err)?;
                    (s.to_vec(), d.iter().map(|x| x.to_f32()).collect())
                }
                _ => {
                    let (s, d) = v.try_extract_tensor::<f32>().map_err(ort_err)?;
                    (s.to_vec(), d.to_vec())
                }
            }
        };
        let c = self.spec.channels;
        let ds = self.spec.downscale;
        if oshape.len() != 4 || oshape[0] as usize != run_n || oshape[2] as usize != h / ds || oshape[3] as usize != w / ds {
            bail!("teacher output has shape {oshape:?}; expected [{run_n}, C, {}, {}]", h / ds, w / ds);
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
