//! `--device cpu|cuda|cuda:N|auto` to a candle [`Device`], with a clear message when this build
//! has no CUDA.

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// Whether this binary was built with the `cuda` feature.
pub fn cuda_compiled() -> bool {
    cfg!(feature = "cuda")
}

/// What a device string asks for (`run.device`; serialised as its string).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    /// CUDA device 0 when this build has CUDA and a GPU answers, else the CPU (said in the log).
    Auto,
}

impl DeviceSpec {
    pub fn parse(s: &str) -> Result<DeviceSpec> {
        let t = s.trim().to_ascii_lowercase();
        Ok(match t.as_str() {
            "cpu" => DeviceSpec::Cpu,
            "cuda" | "gpu" => DeviceSpec::Cuda(0),
            "auto" => DeviceSpec::Auto,
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => DeviceSpec::Cuda(i),
                _ => bail!("`{s}` is not a device: use cpu, cuda, cuda:N or auto"),
            },
        })
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<Self> {
        DeviceSpec::parse(&s)
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        match d {
            DeviceSpec::Cpu => "cpu".into(),
            DeviceSpec::Cuda(0) => "cuda".into(),
            DeviceSpec::Cuda(i) => format!("cuda:{i}"),
            DeviceSpec::Auto => "auto".into(),
        }
    }
}

/// Open the device a string names. `cuda` never falls back to the CPU.
pub fn open(s: &str) -> Result<Device> {
    open_spec(DeviceSpec::parse(s)?)
}

/// Open a device. `cuda` never falls back to the CPU.
pub fn open_spec(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(i) => open_cuda(i),
        DeviceSpec::Auto => {
            if cuda_compiled() {
                match Device::new_cuda(0) {
                    Ok(d) => {
                        taesd_ops::tune_device(&d).context("cuda:0: setting up the allocator")?;
                        return Ok(d);
                    }
                    Err(e) => tracing::warn!("--device auto: CUDA device 0 did not open ({e}); using the CPU"),
                }
            } else {
                tracing::info!("--device auto: this build has no CUDA support; using the CPU");
            }
            Ok(Device::Cpu)
        }
    }
}

fn open_cuda(i: usize) -> Result<Device> {
    if !cuda_compiled() {
        bail!(
            "--device cuda:{i}: this `train` binary was built without CUDA support; rebuild it with \
             `cargo build --release -p train --features cuda` (or `cudnn`), see docs/gpu.md"
        );
    }
    match Device::new_cuda(i) {
        Ok(d) => {
            taesd_ops::tune_device(&d).with_context(|| format!("--device cuda:{i}: setting up the allocator"))?;
            Ok(d)
        }
        Err(candle_core::Error::NotCompiledWithCudaSupport) => {
            bail!("--device cuda:{i}: candle was built without CUDA support (enable the `cuda` feature of train)")
        }
        Err(e) => bail!("--device cuda:{i}: cannot open the GPU: {e}"),
    }
}

/// A short name for logs and metrics: `cpu`, `cuda:0`.
pub fn describe(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The CUDA memory pool's high-water marks in MiB, `(used, reserved)`, since the last reset
/// (`reset`: read, then start again from the current use). candle allocates with
/// `cuMemAllocAsync` from the device's default pool, so these are the analogues of PyTorch's
/// `max_memory_allocated` / `max_memory_reserved` (cuMemGetInfo after a synchronize misses a
/// step's transient peak). `None` on the CPU or when the driver does not answer.
pub fn pool_high_water_mib(dev: &Device, reset: bool) -> Option<(f64, f64)> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda::cudarc::driver::sys::CUmemPool_attribute::*;
        let used = pool_attribute(dev, CU_MEMPOOL_ATTR_USED_MEM_HIGH, reset)?;
        let reserved = pool_attribute(dev, CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, reset)?;
        Some((mib(used), mib(reserved)))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (dev, reset);
        None
    }
}

/// MiB of the memory pool in use now (allocations as issued, not as executed).
pub fn pool_used_mib(dev: &Device) -> Option<f64> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda::cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT;
        pool_attribute(dev, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, false).map(mib)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = dev;
        None
    }
}

static MEM_TRACE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turn [`trace_mem`]'s output on (the switch `TAESD_MEM_TRACE=1`, `crate::switches`).
pub fn set_mem_trace(on: bool) {
    MEM_TRACE.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// When on ([`set_mem_trace`]): prints the memory pool's use now and its high-water mark since
/// the last trace point (then resets it), labelled: where a step's memory goes, line by line.
/// (It resets the high-water mark that gpu_bench's peak and a profile's per-phase peaks read.)
/// The label is formatted only when tracing is on (`format_args!`): trace points sit on the
/// training step's path.
pub fn trace_mem(dev: &Device, label: std::fmt::Arguments) {
    if !MEM_TRACE.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    if let (Some(now), Some((high, _))) = (pool_used_mib(dev), pool_high_water_mib(dev, true)) {
        let label = label.to_string();
        eprintln!("mem {label:<48} now {now:8.0} MiB  high since last {high:8.0} MiB");
    }
}

#[cfg(feature = "cuda")]
fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// One attribute of the device's default memory pool (`reset`: set it to 0 after reading).
#[cfg(feature = "cuda")]
fn pool_attribute(
    dev: &Device,
    a: candle_core::cuda::cudarc::driver::sys::CUmemPool_attribute,
    reset: bool,
) -> Option<u64> {
    use candle_core::cuda::cudarc::driver::sys;
    let candle_core::DeviceLocation::Cuda { gpu_id } = dev.location() else {
        return None;
    };
    // SAFETY: plain driver queries on the device's default pool; `v` outlives each call.
    unsafe {
        let (mut d, mut pool): (sys::CUdevice, sys::CUmemoryPool) = (0, std::ptr::null_mut());
        if sys::cuDeviceGet(&mut d, gpu_id as i32) != sys::CUresult::CUDA_SUCCESS
            || sys::cuDeviceGetDefaultMemPool(&mut pool, d) != sys::CUresult::CUDA_SUCCESS
        {
            return None;
        }
        let mut v: u64 = 0;
        if sys::cuMemPoolGetAttribute(pool, a, &mut v as *mut u64 as *mut std::ffi::c_void)
            != sys::CUresult::CUDA_SUCCESS
        {
            return None;
        }
        if reset {
            let mut zero: u64 = 0;
            let _ = sys::cuMemPoolSetAttribute(pool, a, &mut zero as *mut u64 as *mut std::ffi::c_void);
        }
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(DeviceSpec::parse("CPU").unwrap(), DeviceSpec::Cpu);
        assert_eq!(DeviceSpec::parse("cuda").unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(DeviceSpec::parse("cuda:2").unwrap(), DeviceSpec::Cuda(2));
        assert_eq!(DeviceSpec::parse("auto").unwrap(), DeviceSpec::Auto);
        let e = DeviceSpec::parse("tpu").unwrap_err().to_string();
        assert!(e.contains("tpu") && e.contains("cuda:N"), "{e}");
        assert!(DeviceSpec::parse("cuda:x").is_err());
    }

    #[test]
    fn the_cpu_has_no_pool() {
        assert_eq!(pool_high_water_mib(&Device::Cpu, true), None);
    }

    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        assert!(matches!(open("cpu").unwrap(), Device::Cpu));
        if !cuda_compiled() {
            let e = open("cuda:1").unwrap_err().to_string();
            assert!(e.contains("without CUDA support") && e.contains("--features cuda"), "{e}");
            assert!(matches!(open("auto").unwrap(), Device::Cpu));
        }
    }
}
