//! Every environment switch of the shipped binaries, read once at start-up by the binary (and
//! the GPU examples) and handed to the libraries, which read no environment themselves.
//!
//! A/B switches (each names the mechanism it turns off, for comparisons on a shipped binary):
//! the README's table lists the same switches (a test checks it).

/// One switch: its variable, the value that changes the default, and what it does.
pub struct Switch {
    pub var: &'static str,
    /// The value that turns the non-default behaviour on (any other value, or unset: the default).
    pub on: &'static str,
    pub what: &'static str,
    apply: fn(bool),
}

/// The switches, in the README's order.
pub const SWITCHES: &[Switch] = &[
    Switch {
        var: "TAESD_STOCK_OPS",
        on: "1",
        what: "candle's stock ops instead of taesd-ops (the layers' convolutions, ReLUs, upsample)",
        apply: |on| taesd::layers::set_use_ops(!on),
    },
    Switch {
        var: "TAESD_FUSED_BLOCKS",
        on: "0",
        what: "each residual block as single ops instead of one graph node (same values and gradients)",
        apply: |on| taesd::layers::set_fused_blocks(!on),
    },
    Switch {
        var: "TAESD_CHANNELS_LAST",
        on: "0",
        what: "NCHW activations on CUDA instead of NHWC (same values up to cuDNN's summation order)",
        apply: |on| taesd_ops::update_settings(|s| s.channels_last = !on),
    },
    Switch {
        var: "TAESD_TAPE",
        on: "0",
        what: "layers on candle's autograd graph instead of taped runs",
        apply: |on| taesd_ops::update_settings(|s| s.tape = !on),
    },
    Switch {
        var: "TAESD_CUDNN_GRAPH",
        on: "0",
        what: "cuDNN's legacy convolution calls instead of execution plans finalised once",
        apply: |on| taesd_ops::update_settings(|s| s.cudnn_graph = !on),
    },
    Switch {
        var: "TAESD_OPS_LOG",
        on: "1",
        what: "print every cuDNN algorithm choice (shape, candidates' times or errors)",
        apply: taesd_ops::set_log_algorithms,
    },
    Switch {
        var: "TAESD_MEM_TRACE",
        on: "1",
        what: "print the GPU memory pool's use at each phase of a training step",
        apply: crate::device::set_mem_trace,
    },
];

/// Read every switch from the environment once and apply it; returns the ones set to their
/// `on` value (for a start-up line).
pub fn apply_from_env() -> Vec<&'static str> {
    apply_from(|var| std::env::var(var).ok())
}

/// Every switch and whether `get` turns it on.
pub fn read(get: impl Fn(&str) -> Option<String>) -> Vec<(&'static Switch, bool)> {
    SWITCHES.iter().map(|s| (s, get(s.var).is_some_and(|v| v.trim() == s.on))).collect()
}

/// Apply [`read`]'s values; returns the switches that are on.
pub fn apply_from(get: impl Fn(&str) -> Option<String>) -> Vec<&'static str> {
    read(get)
        .into_iter()
        .map(|(s, on)| {
            (s.apply)(on);
            (s, on)
        })
        .filter(|(_, on)| *on)
        .map(|(s, _)| s.var)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_lists_every_switch() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        for s in SWITCHES {
            let row = format!("| `{}={}` |", s.var, s.on);
            assert!(readme.contains(&row), "README.md has no row `{row}`");
        }
    }

    #[test]
    fn only_the_on_value_switches() {
        // (Reading only: applying would change process-wide settings under the other tests.)
        let on: Vec<&str> = read(|v| match v {
            "TAESD_FUSED_BLOCKS" => Some(" 0".into()),
            "TAESD_TAPE" => Some("1".into()),
            "TAESD_STOCK_OPS" => Some("yes".into()),
            _ => None,
        })
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(s, _)| s.var)
        .collect();
        assert_eq!(on, ["TAESD_FUSED_BLOCKS"]);
        assert!(read(|_| None).iter().all(|(_, on)| !on));
        let mut vars: Vec<&str> = SWITCHES.iter().map(|s| s.var).collect();
        vars.sort();
        vars.dedup();
        assert_eq!(vars.len(), SWITCHES.len());
    }
}
