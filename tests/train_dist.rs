//! End to end: data-parallel `train` (`--gpus N --device cpu`: N CPU processes through the TCP
//! backend, the same code path as NCCL on GPUs but for the collectives' transport) on the
//! shards of tests/train.rs. Small: 32 px crops, a few steps.
//!
//! What must hold, and why the settings are what they are:
//! * Without the GAN (`recipe.gan_weight = 0`: encoder MSE and the decoder's low-resolution
//!   MSE), an N-rank run with batch B equals one process with batch N*B up to float summation
//!   order: the same rows, the mean of the ranks' mean losses is the global mean, and the
//!   gradients are averaged. With the GAN the encoder still must (its loss does not involve the
//!   discriminator); the decoder legitimately differs (BatchNorm batch statistics, coin flips
//!   and replay buffer per rank), so it is only checked to have trained.
//! * A resumed 2-rank run equals an uninterrupted one bit for bit, the GAN and its per-rank
//!   replay buffers included (each rank's buffer is in the checkpoint).
//! * Rank 0 alone writes the run folder; a killed rank stops the others, naming it.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use taesd_e2e::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The flags of every run here.
fn args(run_dir: &Path, steps: u32, batch: u32, more: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "--shards",
        s(train_shards()),
        "--run-dir",
        s(run_dir),
        "--device",
        "cpu",
        "--crop",
        "32",
        "--quiet",
        "--steps",
        &steps.to_string(),
        "--batch-size",
        &batch.to_string(),
        "--set",
        "run.log_every=1",
        "--set",
        "data.shuffle_buffer=40",
        "--set",
        "data.eval_fraction=0",
        "--set",
        "data.preview_images=0",
        "--set",
        "data.workers=1",
        "--set",
        "run.export=[\"taesd\"]",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    v.extend(more.iter().map(|x| x.to_string()));
    v
}

fn train(a: &[String], ok: bool) -> std::process::Output {
    let a: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
    run("train", &a, ok)
}

fn gpus(n: usize, a: Vec<String>) -> Vec<String> {
    let mut v = vec!["--gpus".to_string(), n.to_string()];
    v.extend(a);
    v
}

/// f32 values of every tensor of a safetensors file.
fn floats(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{n}");
            (n, t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
        })
        .collect()
}

fn ckpt(run: &Path, step: u64, file: &str) -> std::path::PathBuf {
    run.join(format!("checkpoints/step-{step:08}/recipe/{file}.safetensors"))
}

/// Largest |a - b| over all tensors, and the largest |a|.
fn max_diff(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> (f32, f32) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut d = 0f32;
    let mut m = 0f32;
    for (k, x) in a {
        for (p, q) in x.iter().zip(&b[k]) {
            d = d.max((p - q).abs());
            m = m.max(p.abs());
        }
    }
    (d, m)
}

fn trainer(run: &Path, step: u64) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(run.join(format!("checkpoints/step-{step:08}/trainer.json"))).unwrap())
        .unwrap()
}

fn train_steps(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "train")
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn n_rank_runs_equal_one_process_with_the_global_batch() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let no_gan = ["--set", "recipe.gan_weight=0"];
    // Without the GAN: 1 x 6, 2 x 3, 3 x 2.
    train(&args(&d("one"), 3, 6, &no_gan), true);
    train(&gpus(2, args(&d("two"), 3, 3, &no_gan)), true);
    train(&gpus(3, args(&d("three"), 3, 2, &no_gan)), true);
    for part in ["encoder", "decoder", "ema_encoder", "ema_decoder"] {
        let one = floats(&ckpt(&d("one"), 3, part));
        for n in ["two", "three"] {
            let (diff, max) = max_diff(&one, &floats(&ckpt(&d(n), 3, part)));
            // Summation order only: a few ulps of the gradients, through Adam's first steps
            // (whose update is ~lr * sign(g), so a near-zero gradient may flip by 2 lr = 6e-4).
            assert!(diff <= 1e-3, "{part}: {n} ranks differ from one process by {diff} (values up to {max})");
        }
    }
    for n in ["two", "three"] {
        let (a, b) = (trainer(&d("one"), 3), trainer(&d(n), 3));
        assert_eq!(a["data_position"], b["data_position"], "{n}: the same rows were used");
        assert_eq!(a["images_seen"], b["images_seen"]);
        assert_eq!(train_steps(&d(n)), [1, 2, 3], "{n}: one metrics line per step (rank 0's)");
    }
    // With the GAN (replay, BatchNorm): the encoder as one process; the decoder its own way.
    train(&args(&d("one-gan"), 2, 4, &["--set", "recipe.replay_capacity=8"]), true);
    train(&gpus(2, args(&d("two-gan"), 2, 2, &["--set", "recipe.replay_capacity=8"])), true);
    let (diff, _) = max_diff(&floats(&ckpt(&d("one-gan"), 2, "encoder")), &floats(&ckpt(&d("two-gan"), 2, "encoder")));
    assert!(diff <= 1e-3, "encoder with the GAN on: {diff}");
    let (diff, _) = max_diff(&floats(&ckpt(&d("one-gan"), 2, "decoder")), &floats(&ckpt(&d("two-gan"), 2, "decoder")));
    assert!(diff.is_finite() && diff < 0.1, "decoder with the GAN on: {diff}");
}

#[test]
fn a_resumed_two_rank_run_equals_an_uninterrupted_one_and_rank_0_alone_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    // The replay buffer holds 8 fakes: each rank's has 4 of its own at the resume, and draws
    // from them in steps 3 and 4.
    let gan = ["--set", "recipe.replay_capacity=8"];
    train(&gpus(2, args(&a, 4, 2, &gan)), true);
    train(&gpus(2, args(&b, 2, 2, &gan)), true);
    let own = b.join("checkpoints/step-00000002/recipe/rank-1/replay.json");
    let len: serde_json::Value = serde_json::from_slice(&std::fs::read(&own).expect("rank 1's replay buffer")).unwrap();
    assert_eq!(len["len"], 4, "{}", own.display());
    assert!(!b.join("checkpoints/step-00000002/recipe/rank-0").exists(), "rank 0's buffer is the recipe's own");
    let out = run("train", &["--gpus", "2", "--resume", "--run-dir", s(&b), "--steps", "4", "--quiet"], true);
    let text = stdout(&out);
    assert!(text.lines().any(|l| l.starts_with("[rank 0] run `") && l.contains("finished: step 4")), "{text}");
    assert!(!text.contains("[rank 1] run"), "only rank 0 reports: {text}");
    for f in
        ["encoder", "decoder", "ema_encoder", "ema_decoder", "disc", "optim_encoder", "optim_decoder", "optim_disc"]
    {
        assert!(floats(&ckpt(&a, 4, f)) == floats(&ckpt(&b, 4, f)), "{f} differs after the resume");
    }
    assert_eq!(trainer(&a, 4)["data_position"], trainer(&b, 4)["data_position"]);
    // Rank 0 alone wrote: one metrics line per step, one TensorBoard file per session, one
    // checkpoint folder per save.
    assert_eq!(train_steps(&b), [1, 2, 3, 4]);
    let names = |p: &Path| -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    };
    let events = names(&a).iter().filter(|n| n.starts_with("events.out.tfevents")).count();
    assert_eq!(events, 1, "{:?}", names(&a));
    let events = names(&b).iter().filter(|n| n.starts_with("events.out.tfevents")).count();
    assert_eq!(events, 2, "{:?}", names(&b));
    let starts = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap().matches("\"type\":\"start\"").count();
    assert_eq!(starts, 1);
}

/// The pids of the children of `pid` (Linux).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

fn rank_of(pid: u32) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0).find_map(|v| v.strip_prefix(b"RANK=").map(|r| String::from_utf8_lossy(r).into_owned()))
}

#[test]
fn a_killed_rank_stops_the_others_within_seconds_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("k");
    let a = gpus(2, args(&run_dir, 1000, 2, &["--set", "recipe.replay_capacity=0"]));
    let child = Command::new(bin("train")).args(&a).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    while !run_dir.join("metrics.jsonl").is_file() || train_steps(&run_dir).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(300), "no training step after 300 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rank1 = children(child.id()).into_iter().find(|p| rank_of(*p).as_deref() == Some("1")).expect("rank 1");
    let st = Command::new("kill").args(["-KILL", &rank1.to_string()]).status().unwrap();
    assert!(st.success());
    let killed = Instant::now();
    let out = child.wait_with_output().unwrap();
    let took = killed.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{err}");
    assert!(took < Duration::from_secs(20), "the launcher took {took:?} to stop:\n{err}");
    assert!(err.contains("rank 1 was killed by signal 9"), "{err}");
    // Rank 0 noticed by itself (its link to rank 1 closed), named rank 1, and saved a checkpoint.
    assert!(err.lines().any(|l| l.starts_with("[rank 0] error:") && l.contains("rank 1 died")), "{err}");
    assert!(err.contains("checkpoint saved at step"), "{err}");
}

#[test]
fn two_ranks_fit_the_same_step_counts_to_a_time_budget() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().join("fit");
    let more = ["--set", "data.stages=[{steps = 2, crop = 16}]", "--fit-time", "5", "--fit-steps", "2"];
    train(&gpus(2, args(&r, 4, 2, &more)), true);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(r.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let fits: Vec<&serde_json::Value> = lines.iter().filter(|l| l["type"] == "fit").collect();
    assert_eq!(fits.len(), 1, "rank 0 alone logs the fit");
    let fitted = fits[0]["run_steps_after"].as_u64().unwrap();
    let segs = fits[0]["segments"].as_array().unwrap();
    assert_eq!(segs.iter().map(|s| s["steps_after"].as_u64().unwrap()).sum::<u64>(), fitted, "{}", fits[0]);
    // At the stage switch the rest was fitted again, on rank 0's clock.
    let refits: Vec<&serde_json::Value> = lines.iter().filter(|l| l["type"] == "refit").collect();
    assert_eq!(refits.len(), 1, "{refits:?}");
    assert_eq!(refits[0]["run_steps_before"].as_u64(), Some(fitted), "{}", refits[0]);
    let total = refits[0]["run_steps_after"].as_u64().unwrap();
    // Both ranks ran the refitted schedule to its end together (a rank with other counts would
    // have left the other waiting in a collective).
    assert_eq!(train_steps(&r), (1..=total).collect::<Vec<u64>>());
    assert_eq!(trainer(&r, total)["images_seen"], total * 4, "2 ranks x batch 2 per step");
    let cfg = std::fs::read_to_string(r.join("config.toml")).unwrap();
    assert!(cfg.contains(&format!("steps = {total}\n")), "{cfg}");
}
