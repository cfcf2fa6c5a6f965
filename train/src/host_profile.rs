//! A sampling profile of the host side of this process (feature `host-profile`; `gpu_bench
//! --host-profile PATH`). The GPU machine has neither `perf` nor `gdb`, and a training step there
//! is host-bound (launching takes most of the step), so the process samples itself: a CPU-time
//! timer (SIGPROF, through the `pprof` crate) walks the stack of whichever thread is running.
//!
//! Output: one line per distinct stack in the "folded" format of flame-graph tools, the thread
//! (`name#id`) then the frames root first, joined by `;`, then a space and the number of samples
//! (`bench/host_profile.py` turns it into self and inclusive tables). Function names are
//! demangled, without Rust's hash suffix; a frame without a symbol is `?`.
use anyhow::{Context, Result};

#[cfg(feature = "host-profile")]
pub use sampler::HostProfile;

#[cfg(feature = "host-profile")]
mod sampler;

/// CPU time of this process so far, user + system, in seconds (`/proc/self/stat`, in the
/// kernel's USER_HZ = 100 ticks per second).
pub fn process_cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
    // Fields after the command name (which may hold spaces) in parentheses: utime is the 14th
    // field of the line, stime the 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("/proc/self/stat without a command name")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> { Ok(f.get(i).context("/proc/self/stat too short")?.parse::<f64>()?) };
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// A demangled name without Rust's `::h0123456789abcdef` suffix, and without the characters the
/// folded format uses (`;` and trailing spaces).
#[cfg_attr(not(feature = "host-profile"), allow(dead_code))]
fn clean_name(name: &str) -> String {
    let name = match name.rfind("::h") {
        Some(i) if name.len() - i == 19 && name[i + 3..].chars().all(|c| c.is_ascii_hexdigit()) => &name[..i],
        _ => name,
    };
    let name = if name == "Unknown" { "?" } else { name };
    name.replace(';', ",").replace(' ', "_")
}

#[cfg(test)]
mod tests {
    use super::{clean_name, process_cpu_seconds};

    #[test]
    fn cpu_time_grows_with_work() {
        let t0 = process_cpu_seconds().unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed().as_secs_f64() < 0.3 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let dt = process_cpu_seconds().unwrap() - t0;
        assert!(dt > 0.1 && dt < 5.0, "{dt} s of CPU for 0.3 s of spinning");
    }

    #[test]
    fn names_lose_the_hash_and_the_separators() {
        assert_eq!(
            clean_name("candle_core::tensor::Tensor::add::h0123456789abcdef"),
            "candle_core::tensor::Tensor::add"
        );
        assert_eq!(clean_name("foo::hash_map"), "foo::hash_map");
        assert_eq!(clean_name("<a as b>::c"), "<a_as_b>::c");
        assert_eq!(clean_name("Unknown"), "?");
        assert_eq!(clean_name("x;y"), "x,y");
    }
}
