//! Property tests of the checkpoint readers on untrusted bytes: the PyTorch `.pth` reader (a zip
//! holding a pickle, read without running it) and the `.safetensors` reader, through
//! [`read_tensor_file`] and [`load_checkpoint`]. The released TAEF2 weights are cut short, have
//! bytes flipped and size fields overwritten with huge values, from a fixed seed. For every case:
//! no panic, no single allocation beyond [`CAP`], and an error naming the file.

#[path = "../../data/tests/support/alloc_probe.rs"]
mod probe;

#[global_allocator]
static PROBE: probe::Probe = probe::Probe;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use taesd::{load_checkpoint, read_tensor_file};

/// The largest single allocation reading a checkpoint of a few MB may make: a few times the
/// file (the file's bytes, its tensors, their f32 copies).
const CAP: usize = 64 << 20;

const REF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/reference/taef2");

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A damaged copy of `valid`: the structure (the first 4 kB: zip local header and pickle, or the
/// safetensors header; the last 2 kB: the zip directory) is hit more often than tensor data.
fn mutate(valid: &[u8], rng: &mut Rng) -> (Vec<u8>, String) {
    let mut b = valid.to_vec();
    let n = b.len();
    let pos = |rng: &mut Rng| match rng.below(4) {
        0 | 1 => rng.below(n.min(4096)),
        2 => n - 1 - rng.below(n.min(2048)),
        _ => rng.below(n),
    };
    match rng.below(4) {
        0 => {
            let k = if rng.below(2) == 0 { rng.below(n.min(4096)) } else { rng.below(n) };
            b.truncate(k);
            (b, format!("cut to {k} bytes"))
        }
        1 => {
            let k = 1 + rng.below(8);
            for _ in 0..k {
                let i = pos(rng);
                b[i] ^= 1 << rng.below(8);
            }
            (b, format!("{k} bit flips"))
        }
        2 => {
            let i = pos(rng).min(n - 8);
            let v: u64 = [u64::MAX, 0x7FFF_FFFF, 0xFFFF_FFFF, 1 << 40, 1 << 31][rng.below(5)];
            let width = if rng.below(2) == 0 { 4 } else { 8 };
            b[i..i + width].copy_from_slice(&v.to_le_bytes()[..width]);
            (b, format!("0x{v:x} ({width} bytes) at byte {i}"))
        }
        _ => {
            let i = pos(rng);
            let k = 1 + rng.below(64);
            let junk: Vec<u8> = (0..k).map(|_| rng.next() as u8).collect();
            b.splice(i..(i + k).min(n), junk);
            (b, format!("{k} random bytes at {i}"))
        }
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

/// `cases` damaged copies of `valid`, each written as `dir/name` and read both ways.
// The closures return catch_unwind's Result, whose Err is the panic payload (large, and the point).
#[allow(clippy::result_large_err)]
fn check(valid: &[u8], dir: &Path, name: &str, seed: u64, cases: usize) {
    let path = dir.join(name);
    let mut rng = Rng(seed);
    let mut problems = Vec::new();
    let mut errors = 0;
    for _ in 0..cases {
        let (bytes, what) = mutate(valid, &mut rng);
        std::fs::write(&path, &bytes).unwrap();
        for (how, (r, largest)) in [
            (
                "read_tensor_file",
                probe::largest(|| catch_unwind(AssertUnwindSafe(|| read_tensor_file(&path).map(|_| ())))),
            ),
            (
                "load_checkpoint",
                probe::largest(|| catch_unwind(AssertUnwindSafe(|| load_checkpoint(&path, None).map(|_| ())))),
            ),
        ] {
            match r {
                Err(p) => problems.push(format!("{name}, {what}: {how} panicked: {}", panic_message(p))),
                Ok(Err(e)) => {
                    errors += 1;
                    let msg = format!("{:#}", anyhow::Error::from(e));
                    if !msg.contains(name) {
                        problems.push(format!("{name}, {what}: {how}'s error does not name the file: {msg}"));
                    }
                }
                Ok(Ok(())) => {}
            }
            if largest > CAP {
                problems.push(format!("{name}, {what}: {how} allocated {largest} bytes at once (cap {CAP})"));
            }
        }
    }
    assert!(problems.is_empty(), "{} problems in {cases} cases:\n{}", problems.len(), problems.join("\n"));
    assert!(errors > cases / 4, "{name}: the damage was noticed in only {errors} of {} reads", 2 * cases);
}

#[test]
fn damaged_pth_pickles_fail_cleanly_within_the_cap() {
    let valid = std::fs::read(Path::new(REF).join("taef2_decoder.pth")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    check(&valid, dir.path(), "damaged_decoder.pth", 0x5EED_0000_0000_0003, 120);
}

#[test]
fn damaged_safetensors_fail_cleanly_within_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    // The released decoder as safetensors (what `train convert` writes).
    let t = read_tensor_file(Path::new(REF).join("taef2_decoder.pth")).unwrap();
    let st = dir.path().join("taef2_decoder.safetensors");
    candle_core::safetensors::save(&t.tensors, &st).unwrap();
    let valid = std::fs::read(&st).unwrap();
    check(&valid, dir.path(), "damaged_decoder.safetensors", 0x5EED_0000_0000_0004, 150);
}
