//! `--device cpu|cuda|cuda:N|auto` to a candle [`Device`], with a clear message when this build
//! has no CUDA.

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// Whether this binary was built with the `cuda` feature.
pub fn cuda_compiled() -> bool {
    cfg!(feature = "cuda")
}

/// What a device string asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// Open the device a string names. `cuda` never falls back to the CPU.
pub fn open(s: &str) -> Result<Device> {
    match DeviceSpec::parse(s)? {
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
    fn cuda_without_the_feature_says_how_to_get_it() {
        assert!(matches!(open("cpu").unwrap(), Device::Cpu));
        if !cuda_compiled() {
            let e = open("cuda:1").unwrap_err().to_string();
            assert!(e.contains("without CUDA support") && e.contains("--features cuda"), "{e}");
            assert!(matches!(open("auto").unwrap(), Device::Cpu));
        }
    }
}
