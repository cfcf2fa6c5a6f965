//! cuDNN convolutions (forward, backward-data, backward-filter) through cudarc, with a plan cache.
//!
//! A plan holds the cuDNN descriptors of one convolution (device, dtype, input and weight
//! dims, stride, padding, settings) and the algorithm chosen for each direction with its
//! workspace size, picked on first use (cuDNN's heuristics, or by timing every algorithm once:
//! [`AlgoSearch`]); for bf16/f16, the backend API's execution plans instead (`graph.rs`). The
//! workspace is one buffer per device, grown to the largest need. Plans, handles and workspaces
//! live in thread-locals: cuDNN handles are neither `Send` nor `Sync` (candle does the same).
//!
//! Arithmetic: f32 convolutions use `CUDNN_FMA_MATH` (exact fp32 products) unless
//! [`F32Math::Tf32`]; bf16/f16 use tensor cores with f32 accumulation (compute type f32).

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc;
use candle_core::cuda::{CudaDevice, CudaStorage};
use candle_core::{DType, Layout, Result, Shape, Tensor};
use cudarc::cudnn::sys::{
    cudnnConvolutionBwdDataAlgo_t as BwdDataAlgo, cudnnConvolutionBwdFilterAlgo_t as BwdFilterAlgo,
    cudnnConvolutionFwdAlgo_t as FwdAlgo, cudnnConvolutionMode_t, cudnnMathType_t, cudnnTensorFormat_t,
};
use cudarc::cudnn::{
    ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, FilterDescriptor, TensorDescriptor,
};
use cudarc::driver::{CudaSlice, DevicePtr};

use super::graph::{self, Dir, GraphConv};
use super::{alloc, by_dtype, err, kernels, tensor, view, Cuda, Elem};
use crate::conv::{Act, ConvParams};
use crate::format::Format;
use crate::settings::{settings, AlgoSearch, F32Math, Settings};

type DevId = candle_core::cuda_backend::DeviceId;

/// What identifies a plan. `x` and `w` are logical dims (N, C, H, W) and (K, C, R, S); the
/// memory layout is `p.format`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    dev: DevId,
    dtype: DType,
    x: [usize; 4],
    w: [usize; 4],
    p: ConvParams,
    settings: Settings,
}

struct Plan<T: Elem> {
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    /// Each direction's algorithm and its workspace need in bytes, found on first use (asking
    /// cuDNN for the workspace size costs as much host time as the convolution call itself:
    /// cuDNN 9 builds an execution plan to answer).
    fwd: Option<(FwdAlgo, usize)>,
    bwd_data: Option<(BwdDataAlgo, usize)>,
    bwd_filter: Option<(BwdFilterAlgo, usize)>,
    /// Per direction ([`Dir`] as index): the backend-API plans and the one chosen, once tried
    /// (`Some(None)`: no engine plan runs this shape; the legacy call does).
    graph: [Option<Option<(GraphConv, usize)>>; 3],
}

thread_local! {
    static HANDLES: RefCell<HashMap<DevId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    static PLANS: RefCell<HashMap<Key, Box<dyn Any>>> = RefCell::new(HashMap::new());
    static WORKSPACES: RefCell<HashMap<DevId, CudaSlice<u8>>> = RefCell::new(HashMap::new());
    static GRAPH_HANDLES: RefCell<HashMap<DevId, std::rc::Rc<graph::Handle>>> = RefCell::new(HashMap::new());
}

/// Drops this thread's plans, workspaces and handles.
pub(crate) fn clear_caches() {
    PLANS.with(|p| p.borrow_mut().clear());
    WORKSPACES.with(|w| w.borrow_mut().clear());
    HANDLES.with(|h| h.borrow_mut().clear());
    GRAPH_HANDLES.with(|h| h.borrow_mut().clear());
}

fn graph_handle(dev: &CudaDevice) -> Result<std::rc::Rc<graph::Handle>> {
    GRAPH_HANDLES.with(|h| {
        if let Some(c) = h.borrow().get(&dev.id()) {
            return Ok(c.clone());
        }
        let c = std::rc::Rc::new(graph::Handle::new(dev.cuda_stream().cu_stream() as _)?);
        h.borrow_mut().insert(dev.id(), c.clone());
        Ok(c)
    })
}

/// A device pointer (as cuDNN takes it). Its stream-sync guard is dropped at once: one stream.
fn ptr<E, P: DevicePtr<E>>(dev: &CudaDevice, p: &P) -> u64 {
    p.device_ptr(&dev.cuda_stream()).0
}

/// Runs `dir` of the plan's convolution through the backend API (`cuda/graph.rs`) on pointers to
/// (input or its gradient, weight or its gradient, output or its gradient); `Ok(false)`: the
/// caller makes the legacy call (the setting is off, no engine plan runs the shape, or a pointer
/// is not aligned as the plans assume). The first use builds the plans and picks one as [`choose`]
/// picks an algorithm.
fn run_graph<T: Elem>(dev: &CudaDevice, plan: &mut Plan<T>, what: &Key, dir: Dir, ptrs: [u64; 3]) -> Result<bool> {
    let s = what.settings;
    // Half precision only: for f32 the heuristic's first engines (cut at graph::MAX_PLANS)
    // missed the legacy search's fastest FMA kernels (H100, 64->64 3x3 at 256x256: forward
    // 1.53 -> 2.11 ms), and f32 steps are GPU-bound, so the legacy calls' host time costs little.
    if !s.cudnn_graph || T::DTYPE == DType::F32 || ptrs.iter().any(|p| *p as usize % graph::ALIGNMENT != 0) {
        return Ok(false);
    }
    let h = graph_handle(dev)?;
    let exec = |g: &GraphConv, i: usize, bytes: usize| {
        // SAFETY: the plan was finalised for these shapes; `ptrs` are live device buffers of them and the
        // workspace has the plan's size.
        with_workspace(dev, bytes, |ws| unsafe { g.execute(&h, i, ptrs, ws.map_or(0, |w| ptr(dev, w))) })
    };
    let slot = &mut plan.graph[dir as usize];
    if slot.is_none() {
        let dtype = <T as cudarc::cudnn::CudnnDataType>::DATA_TYPE;
        let [n, _, hh, ww] = what.x;
        let [co, _, kh, kw] = what.w;
        let (ho, wo) = what.p.out_hw(hh, ww, kh, kw);
        let allowed = graph::Allowed {
            exact_f32: T::DTYPE == DType::F32 && s.f32_math == F32Math::Exact,
            deterministic: s.deterministic,
            workspace_limit: s.workspace_limit,
        };
        let built = GraphConv::new(
            &h,
            dir,
            dtype,
            what.x,
            what.w,
            [n, co, ho, wo],
            what.p.format,
            what.p.stride,
            what.p.padding,
            allowed,
        );
        let built = match built {
            Ok(b) => b,
            Err(e) => {
                if log_on() {
                    eprintln!("taesd-ops: {} {dir:?}: no backend-API plan ({e}); legacy call", describe(what));
                }
                None
            }
        };
        let chosen = match built {
            None => None,
            Some(g) => {
                let cands: Vec<(usize, bool)> = (0..g.len()).map(|i| (i, true)).collect();
                let i = choose(dev, what, &s, Some(0), &cands, &|i| Some(g.workspace(i)), &mut |i, bytes| {
                    exec(&g, i, bytes)
                })?;
                Some((g, i))
            }
        };
        *slot = Some(chosen);
    }
    let Some(Some((g, i))) = slot.as_ref() else {
        return Ok(false);
    };
    exec(g, *i, g.workspace(*i))?;
    Ok(true)
}

fn handle(dev: &CudaDevice) -> Result<Arc<Cudnn>> {
    HANDLES.with(|h| {
        if let Some(c) = h.borrow().get(&dev.id()) {
            return Ok(c.clone());
        }
        let c = Cudnn::new(dev.cuda_stream()).map_err(err)?;
        h.borrow_mut().insert(dev.id(), c.clone());
        Ok(c)
    })
}

fn i32s(d: [usize; 4]) -> [i32; 4] {
    d.map(|v| v as i32)
}

impl<T: Elem> Plan<T> {
    fn new(dev: &CudaDevice, key: &Key) -> Result<Self> {
        let c = handle(dev)?;
        let p = key.p;
        let (s, pd) = (p.stride as i32, p.padding as i32);
        let mut conv = c
            .create_conv2d::<f32>([pd, pd], [s, s], [1, 1], cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION)
            .map_err(err)?;
        let math = match (key.dtype, key.settings.f32_math) {
            (DType::F32, F32Math::Exact) => cudnnMathType_t::CUDNN_FMA_MATH,
            (DType::F32, F32Math::Tf32) => cudnnMathType_t::CUDNN_DEFAULT_MATH,
            _ => cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
        };
        conv.set_math_type(math).map_err(err)?;
        let [n, _, h, w] = key.x;
        let [co, _, kh, kw] = key.w;
        let (ho, wo) = p.out_hw(h, w, kh, kw);
        // The dims are logical (N, C, H, W) / (K, C, R, S) in either format.
        let fmt = match p.format {
            Format::Nchw => cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
            Format::Nhwc => cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
        };
        Ok(Self {
            x: c.create_4d_tensor::<T>(fmt, i32s(key.x)).map_err(err)?,
            w: c.create_4d_filter::<T>(fmt, i32s(key.w)).map_err(err)?,
            y: c.create_4d_tensor::<T>(fmt, i32s([n, co, ho, wo])).map_err(err)?,
            conv,
            fwd: None,
            bwd_data: None,
            bwd_filter: None,
            graph: [None, None, None],
        })
    }
}

/// Runs `f` with the plan for `key` (created on first use).
fn with_plan<T: Elem, R>(dev: &CudaDevice, key: Key, f: impl FnOnce(&mut Plan<T>) -> Result<R>) -> Result<R> {
    // Taken out of the map while in use (no borrow is held across cuDNN calls).
    let mut plan: Box<dyn Any> = match PLANS.with(|p| p.borrow_mut().remove(&key)) {
        Some(p) => p,
        None => Box::new(Plan::<T>::new(dev, &key)?),
    };
    let r = match plan.downcast_mut::<Plan<T>>() {
        Some(p) => f(p),
        None => Err(candle_core::Error::Msg("taesd-ops: plan of another dtype".into())),
    };
    PLANS.with(|p| p.borrow_mut().insert(key, plan));
    r
}

/// Runs `f` with a workspace of at least `bytes` (None for 0).
fn with_workspace<R>(
    dev: &CudaDevice,
    bytes: usize,
    f: impl FnOnce(Option<&mut CudaSlice<u8>>) -> Result<R>,
) -> Result<R> {
    if bytes == 0 {
        return f(None);
    }
    let mut ws = match WORKSPACES.with(|w| w.borrow_mut().remove(&dev.id())) {
        Some(ws) if ws.len() >= bytes => ws,
        old => {
            // The old buffer's free is stream-ordered: work queued on it finishes first.
            drop(old);
            // SAFETY: cuDNN's scratch space; never read before cuDNN writes it.
            unsafe { dev.alloc::<u8>(bytes) }?
        }
    };
    let r = f(Some(&mut ws));
    WORKSPACES.with(|w| w.borrow_mut().insert(dev.id(), ws));
    r
}

const FWD_ALGOS: [FwdAlgo; 8] = [
    FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
    FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
    FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
    FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
    FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
    FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
    FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
    FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
];
/// ALGO_0 accumulates with atomics (non-deterministic).
const BWD_DATA_ALGOS: [(BwdDataAlgo, bool); 6] = [
    (BwdDataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0, false),
    (BwdDataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1, true),
    (BwdDataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT, true),
    (BwdDataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING, true),
    (BwdDataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD, true),
    (BwdDataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED, true),
];
/// ALGO_0 and ALGO_3 accumulate with atomics (non-deterministic).
const BWD_FILTER_ALGOS: [(BwdFilterAlgo, bool); 7] = [
    (BwdFilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0, false),
    (BwdFilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1, true),
    (BwdFilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT, true),
    (BwdFilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3, false),
    (BwdFilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD, true),
    (BwdFilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED, true),
    (BwdFilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING, true),
];

/// Picks an algorithm among `candidates`: the heuristic's choice if allowed (and within the
/// workspace limit), else by timing each candidate once (after one warm-up run) with `run`.
/// `workspace(a)` is the algorithm's workspace need (Err: unsupported for this shape).
fn choose<A: Copy + std::fmt::Debug>(
    dev: &CudaDevice,
    what: &Key,
    s: &Settings,
    heuristic: Option<A>,
    candidates: &[(A, bool)],
    workspace: &dyn Fn(A) -> Option<usize>,
    run: &mut dyn FnMut(A, usize) -> Result<()>,
) -> Result<A> {
    let allowed = |a: A, det: bool| -> Option<usize> {
        if s.deterministic && !det {
            return None;
        }
        workspace(a).filter(|&b| b <= s.workspace_limit)
    };
    if s.algo_search == AlgoSearch::Heuristic {
        if let Some(h) = heuristic {
            let det = candidates
                .iter()
                .find(|(a, _)| std::mem::discriminant(a) == std::mem::discriminant(&h))
                .map_or(true, |c| c.1);
            if allowed(h, det).is_some() {
                if log_on() {
                    eprintln!("taesd-ops: {} heuristic algorithm {h:?}", describe(what));
                }
                return Ok(h);
            }
        }
    }
    let stream = dev.cuda_stream();
    let mut best: Option<(A, f64)> = None;
    let mut seen = Vec::new();
    stream.synchronize().map_err(err)?;
    for &(a, det) in candidates {
        let Some(bytes) = allowed(a, det) else {
            seen.push(format!("{a:?}: not allowed"));
            continue;
        };
        // An algorithm that fails on this shape is skipped.
        if let Err(e) = run(a, bytes).and_then(|_| stream.synchronize().map_err(err)) {
            seen.push(format!("{a:?}: {e}"));
            continue;
        }
        let t0 = Instant::now();
        if run(a, bytes).is_err() {
            continue;
        }
        stream.synchronize().map_err(err)?;
        let t = t0.elapsed().as_secs_f64();
        seen.push(format!("{a:?}: {:.3} ms", t * 1e3));
        if best.is_none_or(|(_, bt)| t < bt) {
            best = Some((a, t));
        }
    }
    if log_on() {
        eprintln!("taesd-ops: {} timed: chose {best:?} (heuristic {heuristic:?}); {}", describe(what), seen.join(", "));
    }
    match best {
        Some((a, _)) => Ok(a),
        None => Err(candle_core::Error::Msg(format!(
            "taesd-ops: no cuDNN algorithm runs this convolution within the settings ({s:?})"
        ))),
    }
}

/// Every algorithm choice is printed (shape, candidates' times or errors):
/// [`crate::set_log_algorithms`].
fn log_on() -> bool {
    crate::settings::log_algorithms()
}

fn describe(k: &Key) -> String {
    format!(
        "{:?} x{:?} w{:?} stride {} pad {} {:?} {:?}",
        k.dtype, k.x, k.w, k.p.stride, k.p.padding, k.p.format, k.settings.f32_math
    )
}

/// Logical (N, C, H, W) of an activation in `f`.
fn nchw(f: Format, d: &[usize]) -> Result<[usize; 4]> {
    let (n, c, h, w) = f.nchw(d)?;
    Ok([n, c, h, w])
}

/// Logical (K, C, R, S) of a weight in `f`'s filter layout.
fn oihw(f: Format, d: &[usize]) -> Result<[usize; 4]> {
    let (o, i, kh, kw) = f.filter_oihw(d)?;
    Ok([o, i, kh, kw])
}

fn key(dev: &CudaDevice, dtype: DType, x: [usize; 4], w: [usize; 4], p: ConvParams) -> Key {
    Key { dev: dev.id(), dtype, x, w, p, settings: settings() }
}

/// `act(conv2d(x, w) + b)`: cuDNN forward, then one kernel for bias and activation.
pub(crate) fn forward(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: Option<(&CudaStorage, &Layout)>,
    p: ConvParams,
    act: Act,
) -> Result<(CudaStorage, Shape)> {
    by_dtype!(x.0.dtype(), forward_t(x, w, b, p, act))
}

fn forward_t<T: Elem>(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: Option<(&CudaStorage, &Layout)>,
    p: ConvParams,
    act: Act,
) -> Result<(CudaStorage, Shape)> {
    let dev = x.0.device.clone();
    let xd = nchw(p.format, x.1.dims())?;
    let wd = oihw(p.format, w.1.dims())?;
    let (ho, wo) = p.out_hw(xd[2], xd[3], wd[2], wd[3]);
    let out = [xd[0], wd[0], ho, wo];
    let xv = view::<T>(x.0, x.1)?;
    let wv = view::<T>(w.0, w.1)?;
    let mut y = alloc::<T>(&dev, out.iter().product())?;
    let k = key(&dev, T::DTYPE, xd, wd, p);
    let s = k.settings;
    let what = k.clone();
    with_plan::<T, _>(&dev, k, |plan| {
        if run_graph(&dev, plan, &what, Dir::Forward, [ptr(&dev, &xv), ptr(&dev, &wv), ptr(&dev, &y)])? {
            return Ok(());
        }
        let op = ConvForward { conv: &plan.conv, x: &plan.x, w: &plan.w, y: &plan.y };
        let one_zero = (T::from_f64(1.0), T::from_f64(0.0));
        let (algo, bytes) = match plan.fwd {
            Some(a) => a,
            None => {
                let cands: Vec<(FwdAlgo, bool)> = FWD_ALGOS.iter().map(|&a| (a, true)).collect();
                let a = choose(
                    &dev,
                    &what,
                    &s,
                    op.pick_algorithm().ok(),
                    &cands,
                    &|a| op.get_workspace_size(a).ok(),
                    &mut |a, bytes| {
                        with_workspace(&dev, bytes, |ws| {
                            // SAFETY: the views are sized for the descriptors' shapes and the workspace for the algorithm's
                            // request; cuDNN reads and writes nothing else.
                            unsafe { op.launch(a, ws, one_zero, &xv, &wv, &mut y) }.map_err(err)
                        })
                    },
                )?;
                let chosen = (a, op.get_workspace_size(a).map_err(err)?);
                plan.fwd = Some(chosen);
                chosen
            }
        };
        with_workspace(&dev, bytes, |ws| {
            // SAFETY: the views are sized for the descriptors' shapes and the workspace for the algorithm's
            // request; cuDNN reads and writes nothing else.
            unsafe { op.launch(algo, ws, one_zero, &xv, &wv, &mut y) }.map_err(err)
        })
    })?;
    if b.is_some() || act != Act::None {
        let bv = b.map(|(s, l)| view::<T>(s, l)).transpose()?;
        kernels::bias_act_in::<T>(&dev, &mut y, bv.as_ref(), out, p.format, act)?;
    }
    let [n, c, h, w] = out;
    Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from(p.format.dims(n, c, h, w).to_vec())))
}

/// The input gradient (dims `x_dims`) of `conv2d(x, w)` given `dz`.
pub(crate) fn backward_data(dz: &Tensor, w: &Tensor, x_dims: &[usize], p: ConvParams) -> Result<Tensor> {
    let dz = dz.contiguous()?;
    let w = w.contiguous()?;
    by_dtype!(dz.dtype(), backward_data_t(&dz, &w, x_dims, p))
}

fn backward_data_t<T: Elem>(dz: &Tensor, w: &Tensor, x_dims: &[usize], p: ConvParams) -> Result<Tensor> {
    let xd = nchw(p.format, x_dims)?;
    let wd = oihw(p.format, w.dims())?;
    let (dzc, wc) = (Cuda::of(dz)?, Cuda::of(w)?);
    let dev = dzc.device().clone();
    let (dzv, wv) = (dzc.view::<T>()?, wc.view::<T>()?);
    let mut dx = alloc::<T>(&dev, xd.iter().product())?;
    let k = key(&dev, T::DTYPE, xd, wd, p);
    let s = k.settings;
    let what = k.clone();
    with_plan::<T, _>(&dev, k, |plan| {
        if run_graph(&dev, plan, &what, Dir::BackwardData, [ptr(&dev, &dx), ptr(&dev, &wv), ptr(&dev, &dzv)])? {
            return Ok(());
        }
        let op = ConvBackwardData { conv: &plan.conv, dx: &plan.x, w: &plan.w, dy: &plan.y };
        let one_zero = (T::from_f64(1.0), T::from_f64(0.0));
        let (algo, bytes) = match plan.bwd_data {
            Some(a) => a,
            None => {
                let a = choose(
                    &dev,
                    &what,
                    &s,
                    op.pick_algorithm().ok(),
                    &BWD_DATA_ALGOS,
                    &|a| op.get_workspace_size(a).ok(),
                    &mut |a, bytes| {
                        with_workspace(&dev, bytes, |ws| {
                            // SAFETY: the views are sized for the descriptors' shapes and the workspace for the algorithm's
                            // request; cuDNN reads and writes nothing else.
                            unsafe { op.launch(a, ws, one_zero, &mut dx, &wv, &dzv) }.map_err(err)
                        })
                    },
                )?;
                let chosen = (a, op.get_workspace_size(a).map_err(err)?);
                plan.bwd_data = Some(chosen);
                chosen
            }
        };
        with_workspace(&dev, bytes, |ws| {
            // SAFETY: the views are sized for the descriptors' shapes and the workspace for the algorithm's
            // request; cuDNN reads and writes nothing else.
            unsafe { op.launch(algo, ws, one_zero, &mut dx, &wv, &dzv) }.map_err(err)
        })
    })?;
    Ok(tensor(dx, &dev, x_dims.to_vec()))
}

/// The weight gradient (dims `w_dims`) of `conv2d(x, w)` given `dz`.
pub(crate) fn backward_filter(x: &Tensor, dz: &Tensor, w_dims: &[usize], p: ConvParams) -> Result<Tensor> {
    let dz = dz.contiguous()?;
    let x = x.contiguous()?;
    by_dtype!(dz.dtype(), backward_filter_t(&x, &dz, w_dims, p))
}

fn backward_filter_t<T: Elem>(x: &Tensor, dz: &Tensor, w_dims: &[usize], p: ConvParams) -> Result<Tensor> {
    let xd = nchw(p.format, x.dims())?;
    let wd = oihw(p.format, w_dims)?;
    let (xc, dzc) = (Cuda::of(x)?, Cuda::of(dz)?);
    let dev = dzc.device().clone();
    let (xv, dzv) = (xc.view::<T>()?, dzc.view::<T>()?);
    let mut dw = alloc::<T>(&dev, wd.iter().product())?;
    let k = key(&dev, T::DTYPE, xd, wd, p);
    let s = k.settings;
    let what = k.clone();
    with_plan::<T, _>(&dev, k, |plan| {
        if run_graph(&dev, plan, &what, Dir::BackwardFilter, [ptr(&dev, &xv), ptr(&dev, &dw), ptr(&dev, &dzv)])? {
            return Ok(());
        }
        let op = ConvBackwardFilter { conv: &plan.conv, x: &plan.x, dw: &plan.w, dy: &plan.y };
        let one_zero = (T::from_f64(1.0), T::from_f64(0.0));
        let (algo, bytes) = match plan.bwd_filter {
            Some(a) => a,
            None => {
                let a = choose(
                    &dev,
                    &what,
                    &s,
                    op.pick_algorithm().ok(),
                    &BWD_FILTER_ALGOS,
                    &|a| op.get_workspace_size(a).ok(),
                    &mut |a, bytes| {
                        with_workspace(&dev, bytes, |ws| {
                            // SAFETY: the views are sized for the descriptors' shapes and the workspace for the algorithm's
                            // request; cuDNN reads and writes nothing else.
                            unsafe { op.launch(a, ws, one_zero, &xv, &mut dw, &dzv) }.map_err(err)
                        })
                    },
                )?;
                let chosen = (a, op.get_workspace_size(a).map_err(err)?);
                plan.bwd_filter = Some(chosen);
                chosen
            }
        };
        with_workspace(&dev, bytes, |ws| {
            // SAFETY: the views are sized for the descriptors' shapes and the workspace for the algorithm's
            // request; cuDNN reads and writes nothing else.
            unsafe { op.launch(algo, ws, one_zero, &xv, &mut dw, &dzv) }.map_err(err)
        })
    })?;
    Ok(tensor(dw, &dev, w_dims.to_vec()))
}
