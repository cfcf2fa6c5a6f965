//! The held-out split: a row is held out when a hash of its `key` falls below the configured
//! fraction. Keys, not rows: every variant of one source image is on the same side, and the split
//! is the same for every run (any seed) over the same shards.

use sha2::{Digest, Sha256};

/// A key's position in [0, 1).
pub fn key_unit(key: &str) -> f64 {
    let h = Sha256::new().chain_update(b"taesd-rs held-out split\0").chain_update(key.as_bytes()).finalize();
    let v = u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
    (v >> 11) as f64 / (1u64 << 53) as f64
}

/// Whether a key belongs to the held-out split of `fraction`.
pub fn is_heldout(key: &str, fraction: f64) -> bool {
    fraction > 0.0 && key_unit(key) < fraction
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_stable_and_near_the_fraction() {
        let n = 20_000;
        let held = (0..n).filter(|i| is_heldout(&format!("img/{i:06}"), 0.1)).count();
        assert!((1700..2300).contains(&held), "{held}");
        assert!(!(0..1000).any(|i| is_heldout(&format!("{i}"), 0.0)));
        // Monotone in the fraction: a larger split contains the smaller one.
        for i in 0..500 {
            let k = format!("k{i}");
            if is_heldout(&k, 0.05) {
                assert!(is_heldout(&k, 0.2));
            }
        }
        assert_eq!(key_unit("a"), key_unit("a"));
        assert_ne!(key_unit("a"), key_unit("b"));
    }
}
