//! How a CUDA device is set up for training: its allocator's policy.
//!
//! - Freed memory stays cached. candle allocates with `cuMemAllocAsync` from the device's default
//!   memory pool, whose release threshold is 0 by default: at every synchronisation (a training
//!   step synchronises once, for the NaN guard) all freed memory went back to the driver, and
//!   the next step mapped its gigabytes of activations again. The threshold is raised to keep it
//!   for reuse, as PyTorch's caching allocator does; the process's reserved memory then stays at
//!   its high-water mark.
//! - No per-allocation events. cudarc gives every allocation a read and a write event (two
//!   `cuEventCreate` and two `cuEventDestroy` per tensor) so that tensors can be shared between
//!   streams. Everything here runs on candle's one stream of the thread that opened the device
//!   (data loading makes CPU tensors only), so they are turned off: a few thousand allocations
//!   per training step, four driver calls fewer each.

use candle_core::{Device, Result};

/// Sets `device` up as the module docs say (no-op on the CPU). Call it right after opening the
/// device, before any tensor is made on it, and use the device's tensors from that thread only.
pub fn tune_device(device: &Device) -> Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            cuda_retain(d)?;
            // SAFETY: one stream (see the module docs): no tensor is used on another stream.
            unsafe { d.disable_event_tracking() };
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(feature = "cuda")]
fn cuda_retain(d: &candle_core::CudaDevice) -> Result<()> {
    use candle_core::cuda::cudarc::driver::sys;
    let cu_dev = d.cuda_stream().context().cu_device();
    let check = |r: sys::CUresult, what: &str| -> Result<()> {
        if r == sys::CUresult::CUDA_SUCCESS {
            Ok(())
        } else {
            Err(candle_core::Error::Msg(format!("taesd-ops: {what} failed: {r:?}")))
        }
    };
    // SAFETY: plain driver calls on a device candle has initialised; `v` outlives them.
    unsafe {
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        check(sys::cuDeviceGetDefaultMemPool(&mut pool, cu_dev), "cuDeviceGetDefaultMemPool")?;
        let mut v: u64 = u64::MAX;
        check(
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut v as *mut u64 as *mut std::ffi::c_void,
            ),
            "setting the memory pool's release threshold",
        )
    }
}
