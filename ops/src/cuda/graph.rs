//! One convolution direction through cuDNN's backend ("graph") API: its operation graph and
//! execution plans are built once, and a call is a variant pack and `cudnnBackendExecute`.
//!
//! cuDNN 9 answers each legacy call (`cudnnConvolutionForward` and the backward ones) by
//! building and finalising an execution plan, with its engine checks and cuBLASLt heuristics:
//! on the H100 that was ~40% of a training step's host time (256x256 batch 32, bf16), when the
//! host issues the step's ~3,600 launches. The plans here are the same engines, finalised once.
//!
//! Tensors are described by logical dims (N, C, H, W) / (K, C, R, S) and the strides of the
//! layout ([`Format`]), with unique ids 1 (the activation input or its gradient), 2 (the
//! weight or its gradient) and 3 (the output or its gradient), whatever the direction.

use std::ffi::c_void;

use candle_core::cuda::cudarc::cudnn::sys;
use candle_core::{bail, Result};
use sys::cudnnBackendAttributeName_t as A;
use sys::cudnnBackendAttributeType_t as T;
use sys::cudnnBackendDescriptorType_t as D;

use crate::format::Format;

/// Which convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Dir {
    Forward,
    BackwardData,
    BackwardFilter,
}

/// A backend descriptor, destroyed on drop.
struct Desc(sys::cudnnBackendDescriptor_t);

fn check(s: sys::cudnnStatus_t, what: &str) -> Result<()> {
    if s == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        bail!("taesd-ops cuDNN graph: {what}: {s:?}")
    }
}

impl Desc {
    fn new(ty: D) -> Result<Self> {
        let mut d: sys::cudnnBackendDescriptor_t = std::ptr::null_mut();
        // SAFETY: cuDNN writes the new descriptor to `d`.
        check(unsafe { sys::cudnnBackendCreateDescriptor(ty, &mut d) }, "create descriptor")?;
        Ok(Self(d))
    }

    /// Sets attribute `name` to `vals` (of cuDNN type `ty`, whose size must be `V`'s).
    fn set<V>(&self, name: A, ty: T, vals: &[V]) -> Result<()> {
        // SAFETY: `vals` holds `vals.len()` elements of the type `ty` names; cuDNN copies them.
        let s = unsafe {
            sys::cudnnBackendSetAttribute(self.0, name, ty, vals.len() as i64, vals.as_ptr() as *const c_void)
        };
        check(s, &format!("set {name:?}"))
    }

    fn set_desc(&self, name: A, ds: &[&Desc]) -> Result<()> {
        let raw: Vec<sys::cudnnBackendDescriptor_t> = ds.iter().map(|d| d.0).collect();
        self.set(name, T::CUDNN_TYPE_BACKEND_DESCRIPTOR, &raw)
    }

    fn finalize(&self, what: &str) -> Result<()> {
        // SAFETY: a descriptor this module created, with its attributes set.
        check(unsafe { sys::cudnnBackendFinalize(self.0) }, what)
    }

    /// Reads attribute `name` (of cuDNN type `ty`, whose size must be `V`'s) into `out`; returns
    /// how many elements it has (all of them when `out` is empty: a count query).
    fn get<V>(&self, name: A, ty: T, out: &mut [V]) -> Result<usize> {
        let mut n = 0i64;
        let p = if out.is_empty() { std::ptr::null_mut() } else { out.as_mut_ptr() as *mut c_void };
        // SAFETY: `out` has room for `out.len()` elements of the type `ty` names.
        let s = unsafe { sys::cudnnBackendGetAttribute(self.0, name, ty, out.len() as i64, &mut n, p) };
        check(s, &format!("get {name:?}"))?;
        Ok(n.max(0) as usize)
    }

    fn get_i64(&self, name: A) -> Result<i64> {
        let mut v = [0i64];
        self.get(name, T::CUDNN_TYPE_INT64, &mut v)?;
        Ok(v[0])
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnBackendCreateDescriptor, destroyed once.
        unsafe { sys::cudnnBackendDestroyDescriptor(self.0) };
    }
}

/// A cuDNN handle of our own on a stream (cudarc keeps its handle private).
pub(crate) struct Handle(pub(crate) sys::cudnnHandle_t);

impl Handle {
    pub(crate) fn new(stream: sys::cudaStream_t) -> Result<Self> {
        let mut h: sys::cudnnHandle_t = std::ptr::null_mut();
        // SAFETY: cuDNN writes the handle; the stream outlives it (the device's, kept by candle).
        check(unsafe { sys::cudnnCreate(&mut h) }, "cudnnCreate")?;
        let h = Self(h);
        // SAFETY: the handle was just created; the stream is the device's (kept alive by candle).
        check(unsafe { sys::cudnnSetStream(h.0, stream) }, "cudnnSetStream")?;
        Ok(h)
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreate, destroyed once.
        unsafe { sys::cudnnDestroy(self.0) };
    }
}

/// What the plans must not use: tensor cores / down-converted inputs for exact f32, atomics when
/// deterministic results are asked for.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Allowed {
    pub exact_f32: bool,
    pub deterministic: bool,
    pub workspace_limit: usize,
}

/// The finalised execution plans of one convolution direction, with their workspace sizes.
pub(crate) struct GraphConv {
    plans: Vec<(Desc, usize)>,
    /// The operation graph and what it refers to (kept for the plans' lifetime).
    _keep: Vec<Desc>,
}

fn tensor(uid: i64, dtype: sys::cudnnDataType_t, dims: [usize; 4], f: Format) -> Result<Desc> {
    let [_, c, h, w] = dims.map(|v| v as i64);
    let strides = match f {
        Format::Nchw => [c * h * w, h * w, w, 1],
        Format::Nhwc => [h * w * c, 1, w * c, c],
    };
    let d = Desc::new(D::CUDNN_BACKEND_TENSOR_DESCRIPTOR)?;
    d.set(A::CUDNN_ATTR_TENSOR_DATA_TYPE, T::CUDNN_TYPE_DATA_TYPE, &[dtype])?;
    d.set(A::CUDNN_ATTR_TENSOR_DIMENSIONS, T::CUDNN_TYPE_INT64, &dims.map(|v| v as i64))?;
    d.set(A::CUDNN_ATTR_TENSOR_STRIDES, T::CUDNN_TYPE_INT64, &strides)?;
    d.set(A::CUDNN_ATTR_TENSOR_UNIQUE_ID, T::CUDNN_TYPE_INT64, &[uid])?;
    d.set(A::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, T::CUDNN_TYPE_INT64, &[ALIGNMENT as i64])?;
    d.finalize("tensor")?;
    Ok(d)
}

/// The byte alignment the plans assume of every pointer ([`GraphConv::execute`] checks it).
pub(crate) const ALIGNMENT: usize = 16;

/// Most plans kept (the heuristic's first ones that finalise and are allowed).
pub(crate) const MAX_PLANS: usize = 8;

impl GraphConv {
    /// Plans for `dir` of the convolution of `x` (N, C, H, W) with `w` (K, C, R, S) giving `y`,
    /// in `f`, stride `stride`, padding `pad`; in the heuristic's order (mode A). `Ok(None)`: no
    /// engine runs it within `allowed` (use the legacy API).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        handle: &Handle,
        dir: Dir,
        dtype: sys::cudnnDataType_t,
        x: [usize; 4],
        w: [usize; 4],
        y: [usize; 4],
        f: Format,
        stride: usize,
        pad: usize,
        allowed: Allowed,
    ) -> Result<Option<Self>> {
        let (xd, wd, yd) = (tensor(1, dtype, x, f)?, tensor(2, dtype, w, f)?, tensor(3, dtype, y, f)?);
        let conv = Desc::new(D::CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR)?;
        conv.set(
            A::CUDNN_ATTR_CONVOLUTION_COMP_TYPE,
            T::CUDNN_TYPE_DATA_TYPE,
            &[sys::cudnnDataType_t::CUDNN_DATA_FLOAT],
        )?;
        conv.set(
            A::CUDNN_ATTR_CONVOLUTION_CONV_MODE,
            T::CUDNN_TYPE_CONVOLUTION_MODE,
            &[sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION],
        )?;
        conv.set(A::CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, T::CUDNN_TYPE_INT64, &[2i64])?;
        conv.set(A::CUDNN_ATTR_CONVOLUTION_DILATIONS, T::CUDNN_TYPE_INT64, &[1i64, 1])?;
        conv.set(A::CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES, T::CUDNN_TYPE_INT64, &[stride as i64; 2])?;
        conv.set(A::CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS, T::CUDNN_TYPE_INT64, &[pad as i64; 2])?;
        conv.set(A::CUDNN_ATTR_CONVOLUTION_POST_PADDINGS, T::CUDNN_TYPE_INT64, &[pad as i64; 2])?;
        conv.finalize("convolution")?;
        let (op_ty, names) = match dir {
            Dir::Forward => (
                D::CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR,
                [
                    A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X,
                    A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W,
                    A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y,
                    A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC,
                    A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA,
                    A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA,
                ],
            ),
            Dir::BackwardData => (
                D::CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_DATA_DESCRIPTOR,
                [
                    A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DX,
                    A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_W,
                    A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DY,
                    A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_CONV_DESC,
                    A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_ALPHA,
                    A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_BETA,
                ],
            ),
            Dir::BackwardFilter => (
                D::CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_FILTER_DESCRIPTOR,
                [
                    A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_X,
                    A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DW,
                    A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DY,
                    A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_CONV_DESC,
                    A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_ALPHA,
                    A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_BETA,
                ],
            ),
        };
        let op = Desc::new(op_ty)?;
        op.set_desc(names[0], &[&xd])?;
        op.set_desc(names[1], &[&wd])?;
        op.set_desc(names[2], &[&yd])?;
        op.set_desc(names[3], &[&conv])?;
        op.set(names[4], T::CUDNN_TYPE_FLOAT, &[1.0f32])?;
        op.set(names[5], T::CUDNN_TYPE_FLOAT, &[0.0f32])?;
        op.finalize("convolution operation")?;
        let graph = Desc::new(D::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
        graph.set(A::CUDNN_ATTR_OPERATIONGRAPH_HANDLE, T::CUDNN_TYPE_HANDLE, &[handle.0])?;
        graph.set_desc(A::CUDNN_ATTR_OPERATIONGRAPH_OPS, &[&op])?;
        graph.finalize("operation graph")?;
        let heur = Desc::new(D::CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR)?;
        heur.set_desc(A::CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, &[&graph])?;
        heur.set(
            A::CUDNN_ATTR_ENGINEHEUR_MODE,
            T::CUDNN_TYPE_HEUR_MODE,
            &[sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_A],
        )?;
        heur.finalize("engine heuristics")?;
        let count = heur.get::<sys::cudnnBackendDescriptor_t>(
            A::CUDNN_ATTR_ENGINEHEUR_RESULTS,
            T::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            &mut [],
        )?;
        // cuDNN fills engine-config descriptors made here.
        let cfgs: Vec<Desc> =
            (0..count).map(|_| Desc::new(D::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR)).collect::<Result<_>>()?;
        let mut raw: Vec<sys::cudnnBackendDescriptor_t> = cfgs.iter().map(|d| d.0).collect();
        let got = heur.get(A::CUDNN_ATTR_ENGINEHEUR_RESULTS, T::CUDNN_TYPE_BACKEND_DESCRIPTOR, &mut raw)?;
        let mut plans = Vec::new();
        for cfg in cfgs.iter().take(got) {
            if plans.len() == MAX_PLANS {
                break;
            }
            if !notes_allowed(cfg, allowed)? {
                continue;
            }
            let plan = Desc::new(D::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)?;
            plan.set(A::CUDNN_ATTR_EXECUTION_PLAN_HANDLE, T::CUDNN_TYPE_HANDLE, &[handle.0])?;
            plan.set_desc(A::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, &[cfg])?;
            // An engine that does not support this shape fails here: skipped.
            if plan.finalize("execution plan").is_err() {
                continue;
            }
            let ws = plan.get_i64(A::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE)? as usize;
            if ws <= allowed.workspace_limit {
                plans.push((plan, ws));
            }
        }
        if plans.is_empty() {
            return Ok(None);
        }
        let mut keep = vec![xd, wd, yd, conv, op, graph, heur];
        keep.extend(cfgs);
        Ok(Some(Self { plans, _keep: keep }))
    }

    /// How many plans there are (candidates `0..len`, the heuristic's first at 0).
    pub(crate) fn len(&self) -> usize {
        self.plans.len()
    }

    /// Plan `i`'s workspace need in bytes.
    pub(crate) fn workspace(&self, i: usize) -> usize {
        self.plans[i].1
    }

    /// Runs plan `i` on device pointers to the tensors with ids 1, 2, 3 (see the module docs)
    /// and a workspace of at least [`GraphConv::workspace`] bytes (null for 0).
    ///
    /// # Safety
    /// The pointers must be live device allocations of the described sizes on the handle's
    /// stream, the output one not aliasing the inputs.
    pub(crate) unsafe fn execute(&self, handle: &Handle, i: usize, ptrs: [u64; 3], ws: u64) -> Result<()> {
        if let Some(p) = ptrs.iter().find(|p| **p as usize % ALIGNMENT != 0) {
            bail!("taesd-ops cuDNN graph: a pointer ({p:#x}) is not {ALIGNMENT}-byte aligned");
        }
        let vp = Desc::new(D::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)?;
        let raw: [*mut c_void; 3] = ptrs.map(|p| p as *mut c_void);
        vp.set(A::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, T::CUDNN_TYPE_INT64, &[1i64, 2, 3])?;
        vp.set(A::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, T::CUDNN_TYPE_VOID_PTR, &raw)?;
        vp.set(A::CUDNN_ATTR_VARIANT_PACK_WORKSPACE, T::CUDNN_TYPE_VOID_PTR, &[ws as *mut c_void])?;
        vp.finalize("variant pack")?;
        check(sys::cudnnBackendExecute(handle.0, self.plans[i].0 .0, vp.0), "execute")
    }
}

/// Whether an engine config's numerical notes are within `allowed`.
fn notes_allowed(cfg: &Desc, allowed: Allowed) -> Result<bool> {
    use sys::cudnnBackendNumericalNote_t as N;
    let engine = Desc::new(D::CUDNN_BACKEND_ENGINE_DESCRIPTOR)?;
    // cuDNN fills the engine descriptor made here.
    cfg.get(A::CUDNN_ATTR_ENGINECFG_ENGINE, T::CUDNN_TYPE_BACKEND_DESCRIPTOR, &mut [engine.0])?;
    let mut notes = [N::CUDNN_NUMERICAL_NOTE_TYPE_COUNT; 16];
    let k = engine.get(A::CUDNN_ATTR_ENGINE_NUMERICAL_NOTE, T::CUDNN_TYPE_NUMERICAL_NOTE, &mut notes)?;
    Ok(notes[..k.min(notes.len())].iter().all(|note| match note {
        N::CUDNN_NUMERICAL_NOTE_TENSOR_CORE | N::CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS => !allowed.exact_f32,
        N::CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC => !allowed.deterministic,
        _ => true,
    }))
}
