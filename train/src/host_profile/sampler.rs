//! The SIGPROF sampler behind [`HostProfile`] (feature `host-profile`, the `pprof` crate).
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use super::clean_name;

/// A running profile; samples until [`HostProfile::write`] (or drop).
///
/// The timer asks for `hz` samples per second of CPU time, but the kernel delivers at most one
/// per scheduler tick (about 250 per second on the H100 machine): weigh samples as shares, and
/// take seconds from [`super::process_cpu_seconds`].
pub struct HostProfile {
    guard: pprof::ProfilerGuard<'static>,
}

impl HostProfile {
    /// Starts sampling every thread's CPU time at `hz` samples per second.
    pub fn start(hz: i32) -> Result<Self> {
        // Not from inside the unwinder itself (libgcc_s) or the vDSO: a sample taken there can
        // deadlock or fault while walking the stack.
        let guard = pprof::ProfilerGuardBuilder::default()
            .frequency(hz)
            .blocklist(&["libgcc_s", "vdso"])
            .build()
            .context("starting the host profiler")?;
        Ok(Self { guard })
    }

    /// Writes the folded stacks to `path`; returns the number of samples.
    pub fn write(&self, path: &Path) -> Result<i64> {
        let report = self.guard.report().build().context("building the host profile")?;
        let mut folded: HashMap<String, i64> = HashMap::new();
        for (frames, &count) in &report.data {
            let stack: Vec<String> = frames
                .frames
                .iter()
                .rev()
                .flat_map(|inlined| inlined.iter().rev().map(|s| clean_name(&s.name())))
                .collect();
            // Threads share the process name (rayon's workers too): name and id.
            let thread = format!("{}#{:x}", frames.thread_name, frames.thread_id);
            *folded.entry(format!("{thread};{}", stack.join(";"))).or_default() += count as i64;
        }
        let mut lines: Vec<_> = folded.into_iter().collect();
        lines.sort_by(|a, b| b.1.cmp(&a.1));
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        );
        let mut total = 0;
        for (stack, n) in &lines {
            writeln!(f, "{stack} {n}")?;
            total += n;
        }
        f.flush()?;
        Ok(total)
    }
}
