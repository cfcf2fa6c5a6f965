//! [`NcclComm`]: the collectives on CUDA through NCCL, loaded at run time (`dlopen` of
//! `libnccl.so.2`, or the file `--nccl-lib` names: e.g. the `nvidia-nccl-cu13` wheel's), so the
//! build needs neither NCCL nor its headers and a CPU machine never loads it. Seven functions of
//! NCCL's C API, declared here by hand (`nccl.h`, NCCL 2.x): `ncclGetUniqueId`,
//! `ncclCommInitRank`, `ncclAllReduce`, `ncclBroadcast`, `ncclCommAbort`, `ncclGetErrorString`,
//! `ncclCommGetAsyncError` (and `ncclCommDestroy`).
//!
//! The unique id travels through the TCP rendezvous ([`super::tcp`]), whose links stay as the
//! control plane: small host reductions (the NaN guard's verdict, the losses) and failure
//! detection. A failure anywhere (a rank's link closing, an abort from another rank, an
//! asynchronous NCCL error seen by the poller thread) calls `ncclCommAbort`, which ends the
//! pending collectives so that no rank hangs. Tensor collectives are enqueued on candle's CUDA
//! stream of the device, in order with the step's kernels (no extra synchronisation).

use super::comm::Comm;
use super::rendezvous::Timeouts;
use super::tcp::TcpComm;
use super::world::World;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::Tensor;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// `ncclUniqueId`: 128 opaque bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    pub internal: [c_char; 128],
}

type CommT = *mut c_void;
type StreamT = *mut c_void;
/// `ncclResult_t`.
type Status = c_int;
const SUCCESS: Status = 0;
const IN_PROGRESS: Status = 7;
/// `ncclFloat32`, `ncclSum`.
const FLOAT32: c_int = 7;
const SUM: c_int = 0;

/// NCCL's functions, resolved from the loaded library (which they keep loaded).
pub struct Api {
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> Status,
    comm_init_rank: unsafe extern "C" fn(*mut CommT, c_int, UniqueId, c_int) -> Status,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, CommT, StreamT) -> Status,
    broadcast: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, CommT, StreamT) -> Status,
    comm_abort: unsafe extern "C" fn(CommT) -> Status,
    comm_destroy: unsafe extern "C" fn(CommT) -> Status,
    error_string: unsafe extern "C" fn(Status) -> *const c_char,
    async_error: unsafe extern "C" fn(CommT, *mut Status) -> Status,
    _lib: libloading::Library,
}

/// Where NCCL is looked for without `--nccl-lib`.
pub const DEFAULT_LIBS: &[&str] = &["libnccl.so.2", "libnccl.so"];

impl Api {
    /// Load NCCL from `path`, or from the default names on the library search path.
    pub fn load(path: Option<&Path>) -> Result<Api> {
        let names: Vec<std::ffi::OsString> = match path {
            Some(p) => vec![p.as_os_str().to_owned()],
            None => DEFAULT_LIBS.iter().map(|n| (*n).into()).collect(),
        };
        let mut errors = Vec::new();
        for n in &names {
            // SAFETY: loading NCCL runs its library initialisers, which have no preconditions.
            match unsafe { libloading::Library::new(n) } {
                Ok(lib) => return Api::resolve(lib).with_context(|| format!("{}", Path::new(n).display())),
                Err(e) => errors.push(format!("{}: {e}", Path::new(n).display())),
            }
        }
        bail!(
            "NCCL could not be loaded ({}): install it (e.g. `pip install nvidia-nccl-cu13`) and give the library with --nccl-lib PATH or LD_LIBRARY_PATH",
            errors.join("; ")
        )
    }

    fn resolve(lib: libloading::Library) -> Result<Api> {
        /// A function of the library, as the type `T` (a fn pointer) it is stored as.
        fn sym<T: Copy>(lib: &libloading::Library, name: &str) -> Result<T> {
            // SAFETY: every `T` here is the signature of the symbol's prototype in nccl.h (NCCL
            // 2.x; these functions have kept their signatures since 2.0 / 2.4), and the pointer
            // is used only while `lib` stays loaded (the `Api` keeps it).
            let s = unsafe { lib.get::<T>(name) }.map_err(|e| anyhow!("no {name} in the library: {e}"))?;
            Ok(*s)
        }
        Ok(Api {
            get_unique_id: sym(&lib, "ncclGetUniqueId")?,
            comm_init_rank: sym(&lib, "ncclCommInitRank")?,
            all_reduce: sym(&lib, "ncclAllReduce")?,
            broadcast: sym(&lib, "ncclBroadcast")?,
            comm_abort: sym(&lib, "ncclCommAbort")?,
            comm_destroy: sym(&lib, "ncclCommDestroy")?,
            error_string: sym(&lib, "ncclGetErrorString")?,
            async_error: sym(&lib, "ncclCommGetAsyncError")?,
            _lib: lib,
        })
    }

    fn check(&self, s: Status, what: &str) -> Result<()> {
        if s == SUCCESS {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
        let msg = unsafe { CStr::from_ptr((self.error_string)(s)) }.to_string_lossy().into_owned();
        bail!("{what}: NCCL error {s}: {msg}")
    }

    pub fn unique_id(&self) -> Result<UniqueId> {
        let mut id = UniqueId { internal: [0; 128] };
        // SAFETY: `id` is a valid ncclUniqueId to write.
        self.check(unsafe { (self.get_unique_id)(&mut id) }, "ncclGetUniqueId")?;
        Ok(id)
    }
}

/// The communicator handle, shared with the poller thread (which may abort it).
struct Handle {
    api: Arc<Api>,
    comm: CommT,
    /// Aborted (or destroyed): never touched again.
    dead: AtomicBool,
}

// SAFETY: an ncclComm_t may be used from any thread; NCCL documents ncclCommAbort and
// ncclCommGetAsyncError as callable concurrently with operations on the communicator, and this
// crate issues the operations themselves from the training thread only.
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

impl Handle {
    fn abort(&self) {
        if !self.dead.swap(true, Ordering::SeqCst) {
            // SAFETY: `comm` is a live communicator (the flag makes this the only abort/destroy).
            let _ = unsafe { (self.api.comm_abort)(self.comm) };
        }
    }

    /// An asynchronous error of the communicator (NCCL's own watchdog: a peer's network failed).
    fn async_error(&self) -> Option<String> {
        if self.dead.load(Ordering::SeqCst) {
            return None;
        }
        let mut s: Status = SUCCESS;
        // SAFETY: `comm` is live; `s` is a valid ncclResult_t to write.
        let r = unsafe { (self.api.async_error)(self.comm, &mut s) };
        match (r, s) {
            (SUCCESS, SUCCESS | IN_PROGRESS) => None,
            (SUCCESS, e) | (e, _) => Some(self.api.check(e, "NCCL").unwrap_err().to_string()),
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if !self.dead.swap(true, Ordering::SeqCst) {
            // SAFETY: the last user of a live communicator frees it.
            let _ = unsafe { (self.api.comm_destroy)(self.comm) };
        }
    }
}

/// NCCL for the tensors, [`TcpComm`] for the host values and failures.
pub struct NcclComm {
    tcp: TcpComm,
    handle: Arc<Handle>,
    stop_poller: Arc<AtomicBool>,
}

impl NcclComm {
    /// Rendezvous through TCP (the unique id as the blob), then `ncclCommInitRank` on `device`
    /// (this rank's GPU; its CUDA context is made current on this thread).
    pub fn connect(w: &World, t: Timeouts, device: &candle_core::Device, lib: Option<&Path>) -> Result<NcclComm> {
        if !device.is_cuda() {
            bail!("the NCCL backend needs a CUDA device (this rank has {device:?})");
        }
        let api = Arc::new(Api::load(lib)?);
        let (tcp, blob) = TcpComm::connect(w, t, || {
            let id = api.unique_id()?;
            Ok(id.internal.iter().map(|c| *c as u8).collect())
        })?;
        if blob.len() != 128 {
            bail!("rank {}: the NCCL unique id from rank 0 has {} bytes, not 128", w.rank, blob.len());
        }
        let mut id = UniqueId { internal: [0; 128] };
        for (d, s) in id.internal.iter_mut().zip(&blob) {
            *d = *s as c_char;
        }
        glue::bind(device)?;
        let mut comm: CommT = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; the id is the one rank 0 created; the device's
        // context is current on this thread.
        let s = unsafe { (api.comm_init_rank)(&mut comm, w.world_size as c_int, id, w.rank as c_int) };
        if let Err(e) = api.check(s, "ncclCommInitRank") {
            let e = e.context(format!("rank {}: starting NCCL", w.rank));
            tcp.abort(&format!("{e:#}"));
            return Err(e);
        }
        let handle = Arc::new(Handle { api, comm, dead: AtomicBool::new(false) });
        // Any failure of the job ends the pending NCCL operations here.
        let h = handle.clone();
        tcp.on_abort(move || h.abort());
        // NCCL's asynchronous errors become the job's failure.
        let stop_poller = Arc::new(AtomicBool::new(false));
        let (h, stop, rank) = (Arc::downgrade(&handle), stop_poller.clone(), w.rank);
        let trip = tcp.abort_handle();
        std::thread::Builder::new().name("nccl-poller".into()).spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(500));
                let Some(h) = h.upgrade() else { return };
                if let Some(e) = h.async_error() {
                    tracing::debug!("rank {rank}: NCCL reported an asynchronous error");
                    trip(&e);
                    return;
                }
            }
        })?;
        Ok(NcclComm { tcp, handle, stop_poller })
    }

    fn live(&self) -> Result<CommT> {
        if let Some(r) = self.tcp.failure() {
            bail!("{r}");
        }
        if self.handle.dead.load(Ordering::SeqCst) {
            bail!("the NCCL communicator was aborted");
        }
        Ok(self.handle.comm)
    }

    /// A fresh f32 copy of `t` on its device, for an in-place collective.
    fn fresh(t: &Tensor) -> Result<Tensor> {
        Ok(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.copy()?)
    }

    fn failed(&self, e: anyhow::Error) -> anyhow::Error {
        match self.tcp.failure() {
            Some(r) => anyhow!("{r}"),
            None => e,
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        self.stop_poller.store(true, Ordering::SeqCst);
    }
}

impl Comm for NcclComm {
    fn rank(&self) -> usize {
        self.tcp.rank()
    }

    fn world_size(&self) -> usize {
        self.tcp.world_size()
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce_host(&self, buf: &mut [f32]) -> Result<()> {
        self.tcp.all_reduce_host(buf)
    }

    fn broadcast_host(&self, buf: &mut [u8]) -> Result<()> {
        self.tcp.broadcast_host(buf)
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if !t.device().is_cuda() {
            return self.tcp.all_reduce_sum(t);
        }
        let comm = self.live()?;
        let out = Self::fresh(t)?;
        let api = &self.handle.api;
        glue::with_ptr(&out, |ptr, n, stream| {
            // SAFETY: `ptr` holds `n` f32 of `out`, a buffer only this call uses (a fresh copy,
            // enqueued after the copy on the same stream); NCCL reads and writes it in place.
            let s = unsafe { (api.all_reduce)(ptr, ptr, n, FLOAT32, SUM, comm, stream) };
            api.check(s, "ncclAllReduce")
        })
        .map_err(|e| self.failed(e))?;
        Ok(out.reshape(t.shape())?)
    }

    fn broadcast(&self, t: &Tensor) -> Result<Tensor> {
        if !t.device().is_cuda() {
            return self.tcp.broadcast(t);
        }
        let comm = self.live()?;
        let out = Self::fresh(t)?;
        let api = &self.handle.api;
        glue::with_ptr(&out, |ptr, n, stream| {
            // SAFETY: as in all_reduce_sum; root 0 sends its buffer, the others receive into theirs.
            let s = unsafe { (api.broadcast)(ptr, ptr, n, FLOAT32, 0, comm, stream) };
            api.check(s, "ncclBroadcast")
        })
        .map_err(|e| self.failed(e))?;
        Ok(out.reshape(t.shape())?)
    }

    fn barrier(&self) -> Result<()> {
        self.tcp.barrier()
    }

    fn abort(&self, cause: &str) {
        self.tcp.abort(cause);
        self.handle.abort();
    }

    fn failure(&self) -> Option<String> {
        self.tcp.failure()
    }

    fn close(&self) {
        self.tcp.close();
    }
}

/// The CUDA side: device pointers and the stream of candle tensors.
#[cfg(feature = "cuda")]
mod glue {
    use anyhow::{bail, Result};
    use candle_core::cuda::cudarc::driver::DevicePtr;
    use candle_core::{Device, Storage, Tensor};
    use std::ffi::c_void;

    /// Make `device`'s CUDA context current on this thread (NCCL initialises on it).
    pub fn bind(device: &Device) -> Result<()> {
        if let Device::Cuda(d) = device {
            d.cuda_stream().context().bind_to_thread()?;
        }
        Ok(())
    }

    /// `f(device pointer, element count, stream)` of a contiguous f32 CUDA tensor.
    pub fn with_ptr<R>(t: &Tensor, f: impl FnOnce(*mut c_void, usize, *mut c_void) -> Result<R>) -> Result<R> {
        let Device::Cuda(dev) = t.device() else { bail!("not a CUDA tensor") };
        if !t.is_contiguous() || t.dtype() != candle_core::DType::F32 {
            bail!("NCCL buffers are contiguous f32");
        }
        let stream = dev.cuda_stream();
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else { bail!("not a CUDA tensor") };
        let slice = cs.as_cuda_slice::<f32>()?;
        let (ptr, _sync) = slice.device_ptr(&stream);
        let ptr = ptr + (layout.start_offset() * std::mem::size_of::<f32>()) as u64;
        f(ptr as *mut c_void, t.elem_count(), stream.cu_stream() as *mut c_void)
    }
}

/// Without CUDA there is nothing for NCCL to work on.
#[cfg(not(feature = "cuda"))]
mod glue {
    use anyhow::{bail, Result};
    use std::ffi::c_void;

    pub fn bind(_: &candle_core::Device) -> Result<()> {
        bail!("this build has no CUDA support (build with --features cuda for NCCL)")
    }

    pub fn with_ptr<R>(
        _: &candle_core::Tensor,
        _: impl FnOnce(*mut c_void, usize, *mut c_void) -> Result<R>,
    ) -> Result<R> {
        bail!("this build has no CUDA support")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_a_clear_error() {
        let e = Api::load(Some(Path::new("/nonexistent/libnccl.so.2"))).err().expect("no such file");
        let e = format!("{e:#}");
        assert!(e.contains("NCCL could not be loaded") && e.contains("--nccl-lib"), "{e}");
    }

    #[test]
    fn unique_id_is_128_bytes() {
        assert_eq!(std::mem::size_of::<UniqueId>(), 128);
    }
}
