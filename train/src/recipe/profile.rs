//! [`Profile`]: where a step's time and memory go, phase by phase.

use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::Device;

/// Where a step's time and memory go (`Recipe::set_profiling`): the device is synchronised at
/// each phase boundary, so profiled steps are slower than plain ones; seconds accumulate per
/// phase, and on CUDA each phase's memory high-water mark is kept (the most over the steps).
#[derive(Clone, Debug, Default)]
pub struct Profile {
    pub seconds: BTreeMap<&'static str, f64>,
    /// MiB in use at the phase's peak (the memory pool's high-water mark; CUDA only).
    pub peak_mib: BTreeMap<&'static str, f64>,
    pub steps: u64,
    last: Option<std::time::Instant>,
}

impl Profile {
    pub(super) fn start(&mut self, dev: &Device) -> Result<()> {
        dev.synchronize()?;
        crate::device::pool_high_water_mib(dev, true);
        self.last = Some(std::time::Instant::now());
        Ok(())
    }

    pub(super) fn mark(&mut self, dev: &Device, phase: &'static str) -> Result<()> {
        dev.synchronize()?;
        let now = std::time::Instant::now();
        if let Some(t) = self.last.replace(now) {
            *self.seconds.entry(phase).or_default() += (now - t).as_secs_f64();
        }
        if let Some((used, _)) = crate::device::pool_high_water_mib(dev, true) {
            let m = self.peak_mib.entry(phase).or_default();
            *m = m.max(used);
        }
        Ok(())
    }
}

/// `mark` on an optional profile (and a memory trace point: train::device::trace_mem).
pub(super) fn mark(p: &mut Option<Profile>, dev: &Device, phase: &'static str) -> Result<()> {
    crate::device::trace_mem(dev, format_args!("{phase}"));
    match p {
        Some(p) => p.mark(dev, phase),
        None => Ok(()),
    }
}
