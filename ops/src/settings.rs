//! Process-wide settings of the CUDA paths (the CPU paths have none: they are exact).

use std::sync::RwLock;

/// The arithmetic of f32 convolutions on CUDA.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum F32Math {
    /// FMA kernels only (`CUDNN_FMA_MATH`): full fp32 products. candle's stock f32 conv (which
    /// leaves cuDNN at `CUDNN_DEFAULT_MATH`) gave 4e-4 relative error vs the CPU at real sizes on
    /// the H100, consistent with TF32; this mode is for parity runs.
    #[default]
    Exact,
    /// Tensor cores in TF32 allowed (`CUDNN_DEFAULT_MATH`), as PyTorch does by default
    /// (`torch.backends.cudnn.allow_tf32 = True`).
    Tf32,
}

/// How cuDNN algorithms are chosen, once per convolution shape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AlgoSearch {
    /// cuDNN's heuristics (`cudnnGetConvolution*Algorithm_v7`), PyTorch's default
    /// (`cudnn.benchmark = False`).
    Heuristic,
    /// Run every algorithm once on the first call of a shape and keep the fastest
    /// (`cudnn.benchmark = True`).
    #[default]
    Benchmark,
}

/// Settings of the cuDNN convolutions. A change applies to shapes seen afterwards and to shapes
/// seen before (plans are cached per setting).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Settings {
    pub f32_math: F32Math,
    pub algo_search: AlgoSearch,
    /// Largest cuDNN workspace an algorithm may use, in bytes (one workspace per device and
    /// thread, grown to the largest chosen algorithm's need).
    pub workspace_limit: usize,
    /// Only deterministic algorithms (no atomics in backward-data / backward-filter).
    pub deterministic: bool,
    /// Activations in NHWC on CUDA ([`crate::preferred_format`]; `crate::Format` says why). On by
    /// default (the `train` binary's switch `TAESD_CHANNELS_LAST=0` turns it off).
    pub channels_last: bool,
    /// Runs of taesd-ops as one graph node in training ([`crate::taped`]: no zero-filled
    /// gradient buffer and add per activation). On by default (`TAESD_TAPE=0` in `train`).
    pub tape: bool,
    /// cuDNN convolutions through the backend ("graph") API with plans finalised once
    /// (`cuda/graph.rs`), the legacy calls only where no engine plan runs a shape. On by default
    /// (`TAESD_CUDNN_GRAPH=0` in `train`).
    pub cudnn_graph: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            f32_math: F32Math::Exact,
            algo_search: AlgoSearch::Benchmark,
            workspace_limit: DEFAULT_WORKSPACE_LIMIT,
            deterministic: false,
            channels_last: true,
            tape: true,
            cudnn_graph: true,
        }
    }
}

/// 2 GiB. cuDNN's tensor-core algorithms for NCHW tensors transpose through the workspace: at
/// 32x64x256x256 bf16 the forward, backward-data and backward-filter need more than 512 MiB, and
/// with a 512 MiB limit only the legacy kernels were left (10-40 ms per call instead of ~1 ms:
/// the bf16 step at 256/bs32 ran 2x slower; docs/gpu.md). PyTorch lets cuDNN use what is free.
pub const DEFAULT_WORKSPACE_LIMIT: usize = 2 << 30;

static SETTINGS: RwLock<Option<Settings>> = RwLock::new(None);

/// The current settings (defaults until [`set_settings`]).
pub fn settings() -> Settings {
    if let Some(s) = *SETTINGS.read().unwrap() {
        return s;
    }
    *SETTINGS.write().unwrap().get_or_insert_with(Settings::default)
}

pub fn set_settings(s: Settings) {
    *SETTINGS.write().unwrap() = Some(s);
}

/// Change one field: `update_settings(|s| s.f32_math = F32Math::Tf32)`.
pub fn update_settings(f: impl FnOnce(&mut Settings)) {
    let mut g = SETTINGS.write().unwrap();
    let mut s = g.unwrap_or_default();
    f(&mut s);
    *g = Some(s);
}

static LOG_ALGORITHMS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Print every cuDNN algorithm choice (shape, candidates' times or errors) from now on.
pub fn set_log_algorithms(on: bool) {
    LOG_ALGORITHMS.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub fn log_algorithms() -> bool {
    LOG_ALGORITHMS.load(std::sync::atomic::Ordering::Relaxed)
}
