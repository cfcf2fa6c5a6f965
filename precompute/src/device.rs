//! `--device auto|cpu|cuda[:i]`, or a list of devices (`cuda:0,cuda:1`, `cpu,cpu`): one teacher
//! session per entry.

use std::fmt;
use std::str::FromStr;

/// Where the teacher should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    /// CUDA device 0 if the CUDA execution provider loads, else the CPU — said loudly.
    Auto,
    Cpu,
    /// This CUDA device, or an error: never a silent CPU fallback.
    Cuda(i32),
}

impl FromStr for DeviceRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" | "gpu" => Ok(DeviceRequest::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(|i| i.parse::<i32>()) {
                Some(Ok(i)) if i >= 0 => Ok(DeviceRequest::Cuda(i)),
                _ => Err(format!("`{s}` is not a device: use auto, cpu, cuda or cuda:N")),
            },
        }
    }
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRequest::Auto => f.write_str("auto"),
            DeviceRequest::Cpu => f.write_str("cpu"),
            DeviceRequest::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// `--device` as given: one device, or several (one teacher session each, fed by the one decode
/// pool). A list names one kind of device only (every `cuda:N`, or every `cpu`): sessions on
/// different kinds would compute a batch differently, and the shards must not depend on which
/// session encoded a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceList(pub Vec<DeviceRequest>);

impl DeviceList {
    /// `--gpus N`: `cuda:0` .. `cuda:N-1`.
    pub fn gpus(n: usize) -> DeviceList {
        DeviceList((0..n as i32).map(DeviceRequest::Cuda).collect())
    }

    pub fn single(d: DeviceRequest) -> DeviceList {
        DeviceList(vec![d])
    }
}

impl FromStr for DeviceList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let list = s.split(',').map(str::parse).collect::<Result<Vec<DeviceRequest>, String>>()?;
        if list.len() > 1 {
            if list.contains(&DeviceRequest::Auto) {
                return Err(format!("`{s}`: `auto` stands alone; list devices as cuda:0,cuda:1 or cpu,cpu"));
            }
            if list.contains(&DeviceRequest::Cpu) && list.iter().any(|d| matches!(d, DeviceRequest::Cuda(_))) {
                return Err(format!(
                    "`{s}` mixes the CPU and CUDA: their latents differ, so the shards would depend on which session encoded a batch; list one kind"
                ));
            }
        }
        Ok(DeviceList(list))
    }
}

impl fmt::Display for DeviceList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lists_parse_and_refuse_mixtures() {
        assert_eq!("cuda".parse(), Ok(DeviceList(vec![DeviceRequest::Cuda(0)])));
        assert_eq!("cpu,cpu".parse(), Ok(DeviceList(vec![DeviceRequest::Cpu; 2])));
        assert_eq!("cuda:0, cuda:1".parse(), Ok(DeviceList::gpus(2)));
        assert_eq!(DeviceList::gpus(3).to_string(), "cuda:0,cuda:1,cuda:2");
        assert!("cpu,cuda:1".parse::<DeviceList>().unwrap_err().contains("mixes"));
        assert!("auto,cuda:1".parse::<DeviceList>().unwrap_err().contains("auto"));
        assert!("cuda:0,".parse::<DeviceList>().is_err());
    }

    #[test]
    fn parses_every_form() {
        assert_eq!("auto".parse(), Ok(DeviceRequest::Auto));
        assert_eq!("CPU".parse(), Ok(DeviceRequest::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceRequest::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceRequest::Cuda(3)));
        assert!("cuda:x".parse::<DeviceRequest>().is_err());
        assert!("tpu".parse::<DeviceRequest>().unwrap_err().contains("tpu"));
    }
}
