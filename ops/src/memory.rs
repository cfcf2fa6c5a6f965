//! Device memory policy of the CUDA stream-ordered allocator.
//!
//! candle allocates with `cuMemAllocAsync` from the device's default memory pool. That pool's
//! release threshold is 0 by default: at every synchronisation (a training step synchronises
//! once, for the NaN guard) all freed memory goes back to the driver, and the next step maps
//! its gigabytes of activations again. [`retain_freed_memory`] keeps freed memory in the pool
//! for reuse, as PyTorch's caching allocator does; the process's reserved memory then stays at
//! its high-water mark.

use candle_core::{Device, Result};

/// Keep memory freed on `device` cached in its default memory pool (no-op on the CPU).
pub fn retain_freed_memory(device: &Device) -> Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => cuda_retain(d),
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
