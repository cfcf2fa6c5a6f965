//! bench/torch_train.py (the PyTorch replica of `train` for issue 17's equal-steps A/B) must hold
//! out the same rows and follow the same learning-rate schedule as `train`: its `key_unit` and
//! `lr_at` (`--check`, no torch needed) against `train::split::key_unit` and
//! `RecipeConfig::lr_at`.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use train::recipe::{LrSchedule, RecipeConfig};

fn close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-15 * a.abs().max(b.abs())
}

#[test]
fn torch_replica_holds_out_the_same_keys_and_follows_the_same_lr_schedule() {
    let keys: Vec<String> = ["a", "b", "", "img/000001", "photos/IMG 0042", "ümlaut/ß-é", "wallpapers/x.y.z"]
        .iter()
        .map(|s| s.to_string())
        .chain((0..200).map(|i| format!("pool/{i:05}")))
        .collect();

    let schedule = |s: LrSchedule| match s {
        LrSchedule::Constant => "constant",
        LrSchedule::Cosine => "cosine",
        LrSchedule::Linear => "linear",
    };
    let configs = [
        RecipeConfig::default(),
        RecipeConfig { lr_warmup_steps: 4, ..Default::default() },
        RecipeConfig {
            lr: 1e-3,
            lr_warmup_steps: 10,
            lr_schedule: LrSchedule::Cosine,
            lr_min_factor: 0.1,
            ..Default::default()
        },
        RecipeConfig {
            lr: 1e-3,
            lr_warmup_steps: 10,
            lr_schedule: LrSchedule::Linear,
            lr_decay_steps: 20,
            ..Default::default()
        },
        // configs/scratch-taef2-25min.toml's schedule, as bench/gpu_torch_ab.sh runs it.
        RecipeConfig {
            lr: 1e-3,
            lr_warmup_steps: 200,
            lr_schedule: LrSchedule::Cosine,
            lr_min_factor: 0.02,
            ..Default::default()
        },
    ];
    let mut cases = Vec::new();
    let mut want_lr = Vec::new();
    for c in &configs {
        for end in [None, Some(110u64), Some(2000)] {
            let steps = (0..20u64).chain((20..2100).step_by(37)).chain([109, 110, 199, 200, 1999, 2000, 5000]);
            for step in steps {
                cases.push(json!({
                    "step": step, "end": end, "lr": c.lr, "warmup": c.lr_warmup_steps,
                    "schedule": schedule(c.lr_schedule), "decay_steps": c.lr_decay_steps, "min_factor": c.lr_min_factor,
                }));
                want_lr.push(c.lr_at(step, end));
            }
        }
    }

    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/torch_train.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .arg("--check")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is needed");
    let query = json!({ "key_unit": keys, "lr_at": cases });
    child.stdin.take().unwrap().write_all(query.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();

    let units = got["key_unit"].as_array().unwrap();
    assert_eq!(units.len(), keys.len());
    for (k, u) in keys.iter().zip(units) {
        let (py, rs) = (u.as_f64().unwrap(), train::split::key_unit(k));
        assert!(close(py, rs), "key_unit({k:?}): python {py}, rust {rs}");
        for f in [0.02, 0.1, 0.5] {
            assert_eq!(py < f, train::split::is_heldout(k, f), "held-out({k:?}, {f})");
        }
    }
    let lrs = got["lr_at"].as_array().unwrap();
    assert_eq!(lrs.len(), want_lr.len());
    for ((case, py), rs) in cases.iter().zip(lrs).zip(&want_lr) {
        let py = py.as_f64().unwrap();
        assert!(close(py, *rs), "lr_at {case}: python {py}, rust {rs}");
    }
}
