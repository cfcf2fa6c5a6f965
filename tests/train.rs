//! End to end: `train` on shards that `precompute` made from real pool images with the taef2
//! ONNX teacher (64 px), on the CPU. Kept small (32 px crops, a handful of steps): candle's CPU
//! backward pass is slow, and CI has two cores.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use taesd_e2e::*;

/// 48 pool images at 64 px in shards of 16 rows (three shards), made once per test process.
fn shards() -> &'static Path {
    train_shards()
}

fn reference_taef2() -> PathBuf {
    shared().join("reference/taef2")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `train` flags of the small CPU runs here (without --steps / --batch-size).
fn base_run(run_dir: &Path) -> Vec<String> {
    [
        "--shards",
        s(shards()),
        "--run-dir",
        s(run_dir),
        "--device",
        "cpu",
        "--crop",
        "32",
        "--quiet",
        "--set",
        "recipe.replay_capacity=16",
        "--set",
        "run.log_every=1",
        "--set",
        "data.shuffle_buffer=40",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect()
}

fn small_run(run_dir: &Path, steps: u32, batch: u32) -> Vec<String> {
    with(base_run(run_dir), &["--steps", &steps.to_string(), "--batch-size", &batch.to_string()])
}

fn train(args: &[String], ok: bool) -> std::process::Output {
    let a: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
    run("train", &a, ok)
}

fn with(mut v: Vec<String>, more: &[&str]) -> Vec<String> {
    v.extend(more.iter().map(|x| x.to_string()));
    v
}

fn json_lines(path: &Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == kind)
        .collect()
}

/// name -> (dtype, shape, bytes) of every tensor in a safetensors file.
fn tensors(path: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| (n, (format!("{:?}", t.dtype()), t.shape().to_vec(), t.data().to_vec())))
        .collect()
}

fn png_size(path: &Path) -> (u32, u32) {
    image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).into_rgb8().dimensions()
}

fn psnr(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    let mse: f64 = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>()
        / a.as_raw().len() as f64;
    10.0 * (255.0f64.powi(2) / mse).log10()
}

#[test]
fn a_short_run_learns_writes_previews_curve_metrics_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let args = with(
        small_run(&run_dir, 12, 4),
        &[
            "--set",
            "data.eval_fraction=0.15",
            "--set",
            "data.eval_max_images=4",
            "--set",
            "data.preview_images=3",
            "--set",
            "run.log_every=2",
            "--set",
            "run.preview_every=6",
            "--set",
            "run.eval_every=0",
            "--set",
            "run.plot_width=480",
            "--set",
            "run.plot_height=300",
            "--set",
            "recipe.lr=1e-3",
        ],
    );
    let out = train(&args, true);
    let text = stdout(&out);
    assert!(text.contains("finished: step 12"), "{text}");

    // The resolved configuration, recipe defaults included.
    let cfg = std::fs::read_to_string(run_dir.join("config.toml")).unwrap();
    for k in ["variant = \"taef2\"", "crop = 32", "steps = 12", "[recipe]", "lr = 0.001", "ema_decay = 0.999"] {
        assert!(cfg.contains(k), "config.toml lacks {k}:\n{cfg}");
    }

    // Metrics: a train line every 2 steps with losses, lr, throughput; losses fall.
    let metrics = run_dir.join("metrics.jsonl");
    let lines = json_lines(&metrics, "train");
    assert_eq!(lines.iter().map(|l| l["step"].as_u64().unwrap()).collect::<Vec<_>>(), [2, 4, 6, 8, 10, 12]);
    for l in &lines {
        assert!(l["images_per_s"].as_f64().unwrap() > 0.0 && l["lr"].as_f64().unwrap() > 0.0, "{l}");
        assert!(l["grad_norms"]["decoder"].as_f64().is_some() && l["grad_norms"]["encoder"].as_f64().is_some(), "{l}");
    }
    let loss = |l: &serde_json::Value, k: &str| l["losses"][k].as_f64().unwrap_or_else(|| panic!("no {k} in {l}"));
    let (first, last) = (&lines[0], &lines[lines.len() - 1]);
    assert!(loss(last, "encoder") < loss(first, "encoder"), "encoder loss did not fall: {first} -> {last}");
    // The decoder's losses move with the discriminator (its target is fake + correction), so a dozen
    // steps say little about them: the decoder's progress is measured on held-out images below.
    assert!(json_lines(&metrics, "skip").is_empty());

    // Held-out evaluation at step 0 and at the end: the trained model beats the step-0 one.
    let evals = json_lines(&metrics, "eval");
    let ema = |step: u64| {
        evals
            .iter()
            .find(|e| e["step"] == step && e["model"] == "ema")
            .unwrap_or_else(|| panic!("no ema eval at {step}"))
    };
    let (p0, p1) = (ema(0)["psnr"].as_f64().unwrap(), ema(12)["psnr"].as_f64().unwrap());
    assert!(p1 > p0 + 0.1, "held-out PSNR {p0:.3} -> {p1:.3}");
    let (m0, m1) = (ema(0)["encoder_mae"].as_f64().unwrap(), ema(12)["encoder_mae"].as_f64().unwrap());
    assert!(m1 < m0, "held-out encoder error {m0:.4} -> {m1:.4}");
    assert_eq!(ema(12)["images"], 4);

    // Previews at 0, 6, 12: 3 samples x (real, ours D(z), D(E(x)), teacher z, our z) of 64 px.
    for step in [0, 6, 12] {
        let p = run_dir.join(format!("previews/step-{step:08}.png"));
        let (w, h) = png_size(&p);
        assert_eq!((w, h), (5 * 66 + 2, 13 + 3 * 66 + 2), "{}", p.display());
    }
    assert_eq!(png_size(&run_dir.join("loss.png")), (480, 300));

    // Checkpoint and exports.
    assert!(run_dir.join("checkpoints/step-00000012/trainer.json").is_file());
    let enc = run_dir.join("export/taesd/taef2_encoder.safetensors");
    let dec = run_dir.join("export/taesd/taef2_decoder.safetensors");
    assert!(tensors(&enc).contains_key("0.weight") && tensors(&dec).contains_key("1.weight"));
    assert!(tensors(&run_dir.join("export/comfyui/taef2.safetensors")).keys().any(|k| k.starts_with("taesd_decoder.")));
    assert!(!run_dir.join("export/diffusers").exists(), "taef2 has no diffusers layout");

    // `train eval` on the run folder: its shards, its held-out split, its export.
    let j = dir.path().join("eval.json");
    let e =
        run("train", &["eval", "--model", s(&run_dir), "--device", "cpu", "--max-images", "4", "--json", s(&j)], true);
    assert!(stdout(&e).contains("psnr"), "{}", stdout(&e));
    let rep: serde_json::Value = serde_json::from_slice(&std::fs::read(&j).unwrap()).unwrap();
    let ours = &rep["models"]["ours"];
    for k in
        ["psnr", "ssim", "sharpness", "cycle_mae", "encoder_mae", "encoder_rmse", "roundtrip_psnr", "roundtrip_ssim"]
    {
        assert!(ours[k].as_f64().is_some_and(f64::is_finite), "{k} missing: {rep}");
    }
    assert_eq!(rep["images"], 4);
    assert!(rep["split"].as_str().unwrap().starts_with("heldout"));
    assert!(
        (ours["psnr"].as_f64().unwrap() - p1).abs() < 1e-3,
        "the command and the run agree: {} vs {p1}",
        ours["psnr"]
    );

    // Decode with the trained model.
    let png = dir.path().join("decoded");
    run(
        "train",
        &[
            "decode",
            "--model",
            s(&run_dir),
            "--latents",
            s(shards()),
            "--out",
            s(&png),
            "--limit",
            "2",
            "--device",
            "cpu",
        ],
        true,
    );
    assert_eq!(std::fs::read_dir(&png).unwrap().count(), 2);
}

/// Exported weights and the complete saved state of two runs are identical.
fn assert_same_run(a: &Path, b: &Path, step: u64) {
    for f in ["export/taesd/taef2_encoder.safetensors", "export/taesd/taef2_decoder.safetensors"] {
        assert!(tensors(&a.join(f)) == tensors(&b.join(f)), "{f} differs between {} and {}", a.display(), b.display());
    }
    let ck = format!("checkpoints/step-{step:08}/recipe");
    for f in
        ["encoder", "decoder", "ema_encoder", "ema_decoder", "disc", "optim_encoder", "optim_decoder", "optim_disc"]
    {
        let f = format!("{ck}/{f}.safetensors");
        assert!(tensors(&a.join(&f)) == tensors(&b.join(&f)), "{f} differs");
    }
    let ta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join(format!("checkpoints/step-{step:08}/trainer.json"))).unwrap())
            .unwrap();
    let tb: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.join(format!("checkpoints/step-{step:08}/trainer.json"))).unwrap())
            .unwrap();
    assert_eq!(ta["data_position"], tb["data_position"]);
    assert_eq!(ta["images_seen"], tb["images_seen"]);
}

#[test]
fn resumed_and_interrupted_runs_end_with_the_same_weights_as_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let quiet = ["--set", "data.eval_fraction=0", "--set", "data.preview_images=0"];
    let (a, b, c) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));

    // A: 4 steps straight.
    train(&with(small_run(&a, 4, 2), &quiet), true);

    // B: 2 steps, then --resume (from the saved config) for 2 more.
    train(&with(small_run(&b, 2, 2), &quiet), true);
    assert!(b.join("export/taesd/taef2_decoder.safetensors").is_file());
    // Starting over a run folder is refused; so is resuming with other settings.
    let e = stderr(&train(&with(small_run(&b, 4, 2), &quiet), false));
    assert!(e.contains("already has a checkpoint at step 2") && e.contains("--resume"), "{e}");
    let e = stderr(&run(
        "train",
        &["--resume", "--run-dir", s(&b), "--steps", "4", "--set", "recipe.lr=1e-2", "--quiet"],
        false,
    ));
    assert!(e.contains("recipe.lr") && e.contains("0.0003 -> 0.01"), "{e}");
    let r = run("train", &["--resume", "--run-dir", s(&b), "--steps", "4", "--quiet"], true);
    assert!(stdout(&r).contains("finished: step 4"), "{}", stdout(&r));
    assert_same_run(&a, &b, 4);
    let steps: Vec<u64> =
        json_lines(&b.join("metrics.jsonl"), "train").iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3, 4], "one metrics line per step across the two sessions");

    // C: interrupted by SIGINT part-way (the handler checkpoints and exits), then resumed.
    let args = with(small_run(&c, 4, 2), &quiet);
    let child = Command::new(bin("train"))
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = c.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while !metrics.is_file() || json_lines(&metrics, "train").is_empty() {
        assert!(t0.elapsed().as_secs() < 300, "no training step after 300 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let st = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(130), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("interrupted at step") && text.contains("--resume"), "{text}");
    let ck: Vec<String> = std::fs::read_dir(c.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(ck.len(), 1, "{ck:?}");
    let k: u64 = ck[0].trim_start_matches("step-").parse().unwrap();
    assert!((1..4).contains(&k), "interrupted at step {k}");
    assert!(!c.join("export").exists(), "an interrupted run does not export");
    run("train", &["--resume", "--run-dir", s(&c), "--quiet"], true);
    assert_same_run(&a, &c, 4);
}

#[test]
fn a_sweep_runs_each_entry_in_its_own_folder() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("sweep.toml");
    std::fs::write(
        &sweep,
        "[base]\nrun.steps = 2\ndata.eval_fraction = 0\ndata.preview_images = 0\n\n[[runs]]\nname = \"lr-low\"\nrecipe.lr = 1e-4\n\n[[runs]]\nname = \"dec-only\"\nrecipe.train_encoder = false\nrecipe.lr = 5e-4\n\n[[runs]]\nname = \"no-export\"\nrun.export = []\n",
    )
    .unwrap();
    let root = dir.path().join("runs");
    // The steps come from the sweep's [base] (a --steps flag would override it).
    let out = train(&with(base_run(&root), &["--sweep", s(&sweep), "--batch-size", "2"]), true);
    let text = stdout(&out);
    assert!(text.contains("sweep summary") && text.contains("lr-low") && text.contains("dec-only"), "{text}");
    let lo = std::fs::read_to_string(root.join("lr-low/config.toml")).unwrap();
    let dec = std::fs::read_to_string(root.join("dec-only/config.toml")).unwrap();
    assert!(lo.contains("lr = 0.0001") && lo.contains("train_encoder = true"), "{lo}");
    assert!(dec.contains("lr = 0.0005") && dec.contains("train_encoder = false"), "{dec}");
    for r in ["lr-low", "dec-only"] {
        assert!(root.join(r).join("checkpoints/step-00000002/trainer.json").is_file(), "{r}");
        assert!(root.join(r).join("export/taesd/taef2_decoder.safetensors").is_file(), "{r}");
    }
    // The decoder-only run trains no encoder and exports none (it has none to start from).
    assert!(!root.join("dec-only/export/taesd/taef2_encoder.safetensors").exists());
    // `run.export = []`: the run ends normally and writes no export (nor an export.json).
    assert!(root.join("no-export/checkpoints/step-00000002/trainer.json").is_file());
    assert!(!root.join("no-export/export").exists());
    let l = json_lines(&root.join("dec-only/metrics.jsonl"), "train");
    assert!(l[0]["losses"].get("encoder").is_none(), "{}", l[0]);
}

#[test]
fn encode_decode_convert_and_eval_commands_with_the_released_taef2() {
    let dir = tempfile::tempdir().unwrap();
    let model = reference_taef2();
    let images = pool_subset(3);

    // encode: both formats, 64 x 64 squares.
    let lat = dir.path().join("latents");
    let o = run(
        "train",
        &[
            "encode",
            "--model",
            s(&model),
            "--images",
            s(images.path()),
            "--out",
            s(&lat),
            "--format",
            "both",
            "--size",
            "64",
            "--device",
            "cpu",
        ],
        true,
    );
    assert!(stdout(&o).contains("encoded 3 images"), "{}", stdout(&o));
    let mut st: Vec<PathBuf> = std::fs::read_dir(&lat).unwrap().map(|e| e.unwrap().path()).collect();
    st.sort();
    assert_eq!(st.len(), 6);
    let first = st.iter().find(|p| p.extension().unwrap() == "safetensors").unwrap().clone();
    let t = tensors(&first);
    assert_eq!(t["latent"].1, vec![32, 8, 8]);

    // decode the .safetensors files: close to the input squares.
    let only_st = dir.path().join("st");
    std::fs::create_dir(&only_st).unwrap();
    for p in st.iter().filter(|p| p.extension().unwrap() == "safetensors") {
        std::fs::copy(p, only_st.join(p.file_name().unwrap())).unwrap();
    }
    let png = dir.path().join("png");
    run(
        "train",
        &["decode", "--model", s(&model), "--latents", s(&only_st), "--out", s(&png), "--device", "cpu"],
        true,
    );
    let stem = first.file_stem().unwrap().to_str().unwrap().to_string();
    let decoded = image::open(png.join(format!("{stem}.png"))).unwrap().into_rgb8();
    assert_eq!(decoded.dimensions(), (64, 64));
    let src = std::fs::read_dir(images.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_stem().unwrap() == stem.as_str())
        .unwrap();
    let src = image::open(&src).unwrap().into_rgb8();
    let (w, h) = src.dimensions();
    let sq =
        image::imageops::resize(&src, 64 * w / w.min(h), 64 * h / w.min(h), image::imageops::FilterType::CatmullRom);
    let sq = image::imageops::crop_imm(&sq, (sq.width() - 64) / 2, (sq.height() - 64) / 2, 64, 64).to_image();
    let p = psnr(&decoded, &sq);
    assert!(p > 17.0, "released taef2 round trip at 64 px: {p:.2} dB");
    // A single .npy file, and a shard folder (teacher latents).
    let npy = st.iter().find(|p| p.extension().unwrap() == "npy").unwrap();
    let png2 = dir.path().join("png2");
    run("train", &["decode", "--model", s(&model), "--latents", s(npy), "--out", s(&png2), "--device", "cpu"], true);
    assert_eq!(png_size(&png2.join(format!("{}.png", npy.file_stem().unwrap().to_str().unwrap()))), (64, 64));
    let png3 = dir.path().join("png3");
    run(
        "train",
        &[
            "decode",
            "--model",
            s(&model),
            "--latents",
            s(shards()),
            "--out",
            s(&png3),
            "--limit",
            "3",
            "--device",
            "cpu",
        ],
        true,
    );
    assert_eq!(std::fs::read_dir(&png3).unwrap().count(), 3);

    // convert: .pth -> taesd safetensors -> comfyui -> taesd: the same tensors.
    let t0 = dir.path().join("t0");
    run("train", &["convert", "--model", s(&model), "--layout", "taesd", "--out", s(&t0)], true);
    let comfy = dir.path().join("taef2_comfy.safetensors");
    run("train", &["convert", "--model", s(&t0), "--layout", "comfyui", "--out", s(&comfy)], true);
    assert!(tensors(&comfy).keys().all(|k| k.starts_with("taesd_encoder.") || k.starts_with("taesd_decoder.")));
    let t1 = dir.path().join("t1");
    run("train", &["convert", "--model", s(&comfy), "--layout", "taesd", "--out", s(&t1)], true);
    for f in ["taef2_encoder.safetensors", "taef2_decoder.safetensors"] {
        let (x, y) = (tensors(&t0.join(f)), tensors(&t1.join(f)));
        assert!(!x.is_empty() && x == y, "{f} changed in the round trip");
    }
    let e = stderr(&run(
        "train",
        &["convert", "--model", s(&model), "--layout", "diffusers", "--out", s(&dir.path().join("d"))],
        false,
    ));
    assert!(e.contains("diffusers") && e.contains("taef2"), "{e}");

    // eval on all rows, with a reference decoder (the same weights: same numbers).
    let j = dir.path().join("eval.json");
    let o = run(
        "train",
        &[
            "eval",
            "--model",
            s(&t1),
            "--reference",
            s(&model),
            "--shards",
            s(shards()),
            "--split",
            "all",
            "--max-images",
            "6",
            "--device",
            "cpu",
            "--json",
            s(&j),
        ],
        true,
    );
    assert!(stdout(&o).contains("reference"), "{}", stdout(&o));
    let rep: serde_json::Value = serde_json::from_slice(&std::fs::read(&j).unwrap()).unwrap();
    assert_eq!(rep["images"], 6);
    let (ours, refd) = (&rep["models"]["ours"], &rep["models"]["reference"]);
    let psnr_ours = ours["psnr"].as_f64().unwrap();
    assert!(psnr_ours > 20.0, "released taef2 decoding its teacher's latents: {psnr_ours:.2} dB");
    assert!((psnr_ours - refd["psnr"].as_f64().unwrap()).abs() < 1e-6);
    assert!(ours["ssim"].as_f64().unwrap() > 0.5 && ours["sharpness"].as_f64().unwrap() > 0.3, "{ours}");
    assert!(ours["encoder_mae"].as_f64().unwrap() < 0.05, "our taef2 encoder vs the ONNX teacher: {ours}");
    assert!(refd["encoder_mae"].is_null(), "a decoder-only reference has no encoder metrics: {refd}");
}

#[test]
fn clear_errors_for_bad_settings() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().join("r");
    let e = stderr(&train(&with(small_run(&r, 1, 1), &["--set", "data.bach_size=2"]), false));
    assert!(e.contains("bach_size"), "{e}");
    // small_run(..) with one flag's value replaced (clap refuses a flag given twice).
    let replaced = |flag: &str, value: &str| -> Vec<String> {
        let mut v = small_run(&r, 1, 1);
        let i = v.iter().position(|a| a == flag).unwrap();
        v[i + 1] = value.into();
        v
    };
    let e = stderr(&train(&replaced("--crop", "36"), false));
    assert!(e.contains("crop 36") && e.contains("multiple"), "{e}");
    let e = stderr(&train(&with(small_run(&r, 1, 1), &["--set", "model.variant=taesdxl"]), false));
    assert!(e.contains("4 latent channels") && e.contains("32-channel"), "{e}");
    let e = stderr(&train(&replaced("--device", "cuda:0"), false));
    assert!(e.contains("without CUDA support") || e.contains("cannot open the GPU"), "{e}");
    let e = stderr(&run("train", &["--steps", "1", "--run-dir", s(&r), "--device", "cpu"], false));
    assert!(e.contains("--shards"), "{e}");
    // --resume of a run folder that is not there: "no such run", not "no shards".
    let missing = dir.path().join("no-such-run");
    let e = stderr(&run("train", &["--resume", "--run-dir", s(&missing)], false));
    assert!(e.contains("no such run") && e.contains("no-such-run") && !e.contains("shards"), "{e}");
    assert!(!missing.exists());
    // A missing file is said once ("x.pth: no such file", not "...: no such file: no such file").
    let e = stderr(&run(
        "train",
        &["convert", "--model", "/nowhere/x.pth", "--layout", "taesd", "--out", s(&dir.path().join("c"))],
        false,
    ));
    assert_eq!(e.matches("no such file").count(), 1, "{e}");
    assert!(e.contains("/nowhere/x.pth"), "{e}");
}

/// Overwrite the first page header of the `latent` column of shard `file`'s row group 0 with
/// garbage: the footer stays valid (the shard opens), reading that row group fails.
fn corrupt_row_group(file: &Path) {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use std::io::{Seek, SeekFrom, Write};
    let offset = {
        let r = SerializedFileReader::new(std::fs::File::open(file).unwrap()).unwrap();
        let rg = r.metadata().row_group(0);
        rg.columns().iter().find(|c| c.column_path().string() == "latent").unwrap().data_page_offset() as u64
    };
    let mut f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&[0xFF; 24]).unwrap();
}

/// Copy the test shards (the data/ layout) into `dst`.
fn copy_shards(dst: &Path) {
    std::fs::create_dir_all(dst.join("data")).unwrap();
    std::fs::copy(shards().join("manifest.json"), dst.join("manifest.json")).unwrap();
    for f in shard_files(shards()) {
        std::fs::copy(&f, dst.join("data").join(f.file_name().unwrap())).unwrap();
    }
}

/// A corrupt row group met after step 1 ends the run with a checkpoint and the command that
/// resumes it; resumed with data.skip_bad_rows, the run skips it (counted) and finishes.
#[test]
fn bad_shard_data_mid_run_checkpoints_first_and_is_skippable() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("latents");
    copy_shards(&data);
    // With a one-row shuffle buffer the row groups are read one after the other, in the epoch's
    // order: 16 rows each, so with batches of 2 the second one is reached at step 9.
    let units: Vec<u32> =
        shard_files(&data).iter().map(|f| taesd_data::ShardReader::open(f).unwrap().num_rows() as u32).collect();
    assert_eq!(units, [16, 16, 16]);
    let order: Vec<train::order::RowRef> = train::order::EpochOrder::new(&units, 0, 0, 1).collect();
    let second = order[16].unit as usize;
    assert!(order[..16].iter().all(|r| r.unit != second as u32));
    let bad = shard_files(&data)[second].clone();
    corrupt_row_group(&bad);

    let run_dir = dir.path().join("run");
    let args: Vec<String> = [
        "--shards",
        s(&data),
        "--run-dir",
        s(&run_dir),
        "--device",
        "cpu",
        "--crop",
        "32",
        "--quiet",
        "--steps",
        "10",
        "--batch-size",
        "2",
        "--set",
        "recipe.replay_capacity=16",
        "--set",
        "run.log_every=1",
        "--set",
        "data.shuffle_buffer=1",
        "--set",
        "data.eval_fraction=0",
        "--set",
        "data.preview_images=0",
        "--set",
        "run.checkpoint_every=0",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    let e = stderr(&train(&args, false));
    let name = bad.file_name().unwrap().to_str().unwrap();
    assert!(e.contains(name) && e.contains("row group 0"), "names the shard and row group: {e}");
    assert!(e.contains("checkpoint saved at step 8"), "{e}");
    assert!(
        e.contains(&format!("resume with: train --resume --run-dir {}", run_dir.display()))
            && e.contains("data.skip_bad_rows=true"),
        "{e}"
    );
    assert!(run_dir.join("checkpoints/step-00000008/trainer.json").is_file());

    let r = run("train", &["--resume", "--run-dir", s(&run_dir), "--set", "data.skip_bad_rows=true", "--quiet"], true);
    assert!(stdout(&r).contains("finished: step 10"), "{}", stdout(&r));
    let metrics = run_dir.join("metrics.jsonl");
    let bad_lines = json_lines(&metrics, "bad_data");
    assert_eq!(bad_lines.len(), 1, "{bad_lines:?}");
    assert_eq!(bad_lines[0]["rows"], 16);
    assert!(bad_lines[0]["what"].as_str().unwrap().contains(name), "{}", bad_lines[0]);
    let last = json_lines(&metrics, "train").pop().unwrap();
    assert_eq!((last["step"].as_u64(), last["skipped_rows_total"].as_u64()), (Some(10), Some(16)), "{last}");
}

/// `train` reads shard folders of the layout before data/ (shards beside manifest.json), and
/// folders without a manifest; its log has no escape codes when it is not a terminal.
#[test]
fn old_layout_shard_folders_still_train() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old");
    std::fs::create_dir(&old).unwrap();
    for f in shard_files(shards()) {
        std::fs::copy(&f, old.join(f.file_name().unwrap())).unwrap();
    }
    let run_dir = dir.path().join("run");
    let mut args = small_run(&run_dir, 1, 2);
    let i = args.iter().position(|a| a == "--shards").unwrap();
    args[i + 1] = s(&old).to_string();
    args.extend(["--set", "data.eval_fraction=0", "--set", "data.preview_images=0"].map(String::from));
    let out = train(&args, true);
    assert!(stdout(&out).contains("finished: step 1"), "{}", stdout(&out));
    let e = stderr(&out);
    assert!(e.contains("no manifest.json"), "the missing manifest is warned about: {e}");
    assert!(!e.contains('\x1b'), "escape codes in a non-terminal log: {e:?}");
    let png = dir.path().join("png");
    run(
        "train",
        &[
            "decode",
            "--model",
            s(&reference_taef2()),
            "--latents",
            s(&old),
            "--out",
            s(&png),
            "--limit",
            "1",
            "--device",
            "cpu",
        ],
        true,
    );
    assert_eq!(std::fs::read_dir(&png).unwrap().count(), 1);
}

#[test]
fn data_stages_resume_across_a_boundary_and_stints_end_at_a_time_limit() {
    let dir = tempfile::tempdir().unwrap();
    let quiet = ["--set", "data.eval_fraction=0", "--set", "data.preview_images=0"];
    // 16 px crops for 2 steps, then the 32 px crops of the data section.
    let stages = ["--set", "data.stages=[{steps = 2, crop = 16}]"];
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));

    // A: 4 steps straight; the loader switches at step 2.
    train(&with(with(small_run(&a, 4, 2), &quiet), &stages), true);
    let st = json_lines(&a.join("metrics.jsonl"), "stage");
    assert_eq!(st.len(), 1, "{st:?}");
    assert_eq!((st[0]["step"].as_u64(), st[0]["crop"].as_u64(), st[0]["stage"].as_u64()), (Some(2), Some(32), Some(1)));
    let cfg = std::fs::read_to_string(a.join("config.toml")).unwrap();
    assert!(cfg.contains("[[data.stages]]") && cfg.contains("crop = 16"), "{cfg}");
    // Every train line says where the time went.
    for l in json_lines(&a.join("metrics.jsonl"), "train") {
        for k in ["loader_wait", "upload", "step"] {
            assert!(l["time_fractions"][k].as_f64().is_some_and(|v| (0.0..=1.0).contains(&v)), "{k}: {l}");
        }
    }

    // B: 2 steps (the end of the first stage), then resumed to 4: the same weights as A.
    train(&with(with(small_run(&b, 2, 2), &quiet), &stages), true);
    run("train", &["--resume", "--run-dir", s(&b), "--steps", "4", "--quiet"], true);
    assert_same_run(&a, &b, 4);

    // The run folder moves (to another machine: tools/checkpoint_parts.sh) and goes on there.
    let moved = dir.path().join("moved");
    std::fs::rename(&b, &moved).unwrap();
    let b = moved;
    // A stint: resumed with a later end and a time limit, B stops part-way with exit 0 and a
    // checkpoint (no replay buffer in it: run.checkpoint_replay = false).
    let out = run(
        "train",
        &[
            "--resume",
            "--run-dir",
            s(&b),
            "--steps",
            "1000",
            "--time-limit",
            "3",
            "--set",
            "run.checkpoint_replay=false",
            "--quiet",
        ],
        true,
    );
    let text = stdout(&out);
    assert!(text.contains("stopped at the time limit") && text.contains("--resume"), "{text}");
    let (k, ck) = std::fs::read_dir(b.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().trim_start_matches("step-").parse::<u64>().unwrap(), p))
        .max()
        .unwrap();
    assert!((5..1000).contains(&k), "stopped at step {k}");
    assert!(!std::fs::read_dir(ck.join("recipe")).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("replay")));
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.join("export/export.json")).unwrap()).unwrap();
    assert_eq!(info["step"], 4, "the export is still the one of step 4");

    // `train eval --model RUN` takes the newer weights: the checkpoint of step k, not the export.
    let j = dir.path().join("eval.json");
    let e = run(
        "train",
        &["eval", "--model", s(&b), "--device", "cpu", "--split", "all", "--max-images", "2", "--json", s(&j)],
        true,
    );
    let want = format!("step-{k:08}");
    assert!(stdout(&e).contains(&want), "{}", stdout(&e));
    let rep: serde_json::Value = serde_json::from_slice(&std::fs::read(&j).unwrap()).unwrap();
    assert!(rep["model_files"].as_array().unwrap().iter().all(|f| f.as_str().unwrap().contains(&want)), "{rep}");
}

/// `(step, value)` of one tag, from tests/py/read_tensorboard.py's output.
fn tb_scalars(tb: &serde_json::Value, tag: &str) -> Vec<(u64, f64)> {
    tb["scalars"][tag]
        .as_array()
        .unwrap_or_else(|| {
            panic!(
                "no scalar tag {tag} in {}",
                tb["scalars"].as_object().unwrap().keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
        .collect()
}

/// A run as other tools see it: its TensorBoard files read back by the tensorboard package (tags,
/// steps and values as in metrics.jsonl, the previews as images), its report.html parsed by
/// Python (every section, the preview inline, the exports' sha256), its .pth pair under torch's
/// weights_only rules, and its ONNX encoder used by `precompute --onnx --vae custom` as a teacher
/// (the latents equal our encoder's).
#[test]
fn a_run_logs_tensorboard_writes_a_report_and_exports_for_other_tools() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let reference = reference_taef2().join("taef2_decoder.pth");
    let args = with(
        small_run(&run_dir, 6, 2),
        &[
            "--set",
            "data.eval_fraction=0.15",
            "--set",
            "data.eval_max_images=2",
            "--set",
            "data.preview_images=2",
            "--set",
            "run.log_every=2",
            "--set",
            "run.preview_every=3",
            "--set",
            "run.eval_every=0",
            "--set",
            "run.export=[\"taesd\", \"comfyui\", \"onnx\"]",
            "--set",
            &format!("model.reference_decoder=\"{}\"", s(&reference)),
            "--set",
            "recipe.ema_probe_decays=[0.99]",
        ],
    );
    // Not quiet: the run's notes go to stderr.
    let args: Vec<String> = args.into_iter().filter(|a| a != "--quiet").collect();
    let out = train(&args, true);
    assert!(stdout(&out).contains("finished: step 6"), "{}", stdout(&out));
    // 6 steps are too few for the EMA warm-up to reach either decay: the run says so.
    assert!(
        stderr(&out).contains("note: the EMAs at decays [0.999, 0.99] are one and the same average in this run"),
        "{}",
        stderr(&out)
    );
    let metrics = run_dir.join("metrics.jsonl");

    // TensorBoard, through its own reader: every train line's numbers, every eval, every preview.
    let tb = py("read_tensorboard.py", &[s(&run_dir)]);
    assert_eq!(tb["files"], 1);
    let lines = json_lines(&metrics, "train");
    for (tag, path) in [
        ("train/lr", &["lr"][..]),
        ("train/images_per_s", &["images_per_s"]),
        ("losses/encoder", &["losses", "encoder"]),
        ("losses/decoder", &["losses", "decoder"]),
        ("grad_norms/decoder", &["grad_norms", "decoder"]),
        ("time_fractions/step", &["time_fractions", "step"]),
        ("loss_weights/gan", &["loss_weights", "gan"]),
    ] {
        let got = tb_scalars(&tb, tag);
        let want: Vec<f64> = lines.iter().map(|l| path.iter().fold(l, |v, k| &v[*k]).as_f64().unwrap()).collect();
        assert_eq!(got.iter().map(|p| p.0).collect::<Vec<_>>(), [2, 4, 6], "{tag}");
        for ((_, g), w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-30), "{tag}: {g} vs {w} (f32 of the metrics line)");
        }
    }
    let evals = json_lines(&metrics, "eval");
    // The EMA probe is evaluated beside the main EMA.
    for model in ["ema", "ema0.99", "raw", "reference"] {
        let got = tb_scalars(&tb, &format!("eval/psnr/{model}"));
        let want: Vec<(u64, f64)> = evals
            .iter()
            .filter(|e| e["model"] == model)
            .map(|e| (e["step"].as_u64().unwrap(), e["psnr"].as_f64().unwrap()))
            .collect();
        assert_eq!(got.len(), want.len(), "eval/psnr/{model}");
        assert_eq!(got.iter().map(|p| p.0).collect::<Vec<_>>(), [0, 6], "eval/psnr/{model}");
        for (g, w) in got.iter().zip(&want) {
            assert!((g.1 - w.1).abs() <= 1e-5 * w.1.abs(), "eval/psnr/{model}: {g:?} vs {w:?}");
        }
    }
    let previews: Vec<(u64, u32, u32)> = tb["images"]["preview"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_u64().unwrap() as u32, p[2].as_u64().unwrap() as u32))
        .collect();
    assert_eq!(previews.iter().map(|p| p.0).collect::<Vec<_>>(), [0, 3, 6]);
    let (pw, ph) = png_size(&run_dir.join("previews/step-00000006.png"));
    assert_eq!((previews[2].1, previews[2].2), (pw, ph));

    // report.html: one well-formed page with every section, written at the end of the run.
    let report = run_dir.join("report.html");
    let rep = py("check_report.py", &[s(&report)]);
    assert_eq!(
        rep["sections"],
        serde_json::json!(["summary", "curves", "eval", "preview", "throughput", "exports", "config"])
    );
    assert_eq!(rep["images"], serde_json::json!([[pw, ph]]), "the newest preview, inline");
    assert!(rep["svg"].as_u64().unwrap() >= 8, "{rep}");
    let text = |sec: &str| rep["text"][sec].as_str().unwrap().to_string();
    assert!(text("summary").contains("finished at step 6"), "{}", text("summary"));
    assert!(text("eval").contains("reference") && text("eval").contains("ema \u{2212} reference"), "{}", text("eval"));
    let onnx_enc = run_dir.join("export/onnx/taef2_encoder.onnx");
    let sha = Command::new("sha256sum").arg(&onnx_enc).output().unwrap();
    let sha = String::from_utf8_lossy(&sha.stdout).split_whitespace().next().unwrap().to_string();
    assert!(text("exports").contains(&sha) && text("exports").contains("ONNX Runtime"), "{}", text("exports"));
    assert!(text("config").contains("[recipe]"));
    // On demand: the same sections again.
    std::fs::remove_file(&report).unwrap();
    let o = run("train", &["report", s(&run_dir)], true);
    assert!(stdout(&o).contains("report.html") && report.is_file());
    assert!(stderr(&run("train", &["report", s(dir.path())], false)).contains("not a run folder"));

    // Exports: the .pth pair beside the safetensors, ONNX in both precisions, all in export.json.
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("export/export.json")).unwrap()).unwrap();
    let listed: Vec<String> =
        info["files"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect();
    for f in [
        "export/taesd/taef2_encoder.pth",
        "export/taesd/taef2_decoder.pth",
        "export/onnx/taef2_encoder.onnx",
        "export/onnx/taef2_decoder.fp16.onnx",
        "export/comfyui/taef2.safetensors",
    ] {
        assert!(listed.iter().any(|l| l.ends_with(f)) && run_dir.join(f).is_file(), "{f} not exported: {listed:?}");
    }
    let pth = [run_dir.join("export/taesd/taef2_encoder.pth"), run_dir.join("export/taesd/taef2_decoder.pth")];
    let j = py("check_pth.py", &[s(&pth[0]), s(&pth[1])]);
    assert_eq!(j[s(&pth[0])].as_object().unwrap().len(), 79);
    let st = tensors(&run_dir.join("export/taesd/taef2_encoder.safetensors"));
    assert_eq!(j[s(&pth[0])]["14.bias"]["shape"], serde_json::json!(st["14.bias"].1));

    // The trained encoder, exported as ONNX, is a precompute teacher (a custom VAE of 32 channels
    // already in TAESD scale, [0, 1] input); the latents it stores are our encoder's.
    let images = pool_subset(4);
    let latents = dir.path().join("latents");
    run(
        "precompute",
        &[
            "--vae",
            "custom",
            "--channels",
            "32",
            "--scale",
            "1",
            "--shift",
            "0",
            "--input-range",
            "0,1",
            "--downscale",
            "8",
            "--onnx",
            s(&onnx_enc),
            "--images",
            s(images.path()),
            "--out",
            s(&latents),
            "--device",
            "cpu",
            "--resolution",
            "64",
            "--batch-size",
            "2",
            "--quiet",
        ],
        true,
    );
    let rows = read_rows(&latents);
    assert_eq!(rows.len(), 4);
    let ours =
        taesd::Taesd::load(run_dir.join("export/taesd"), None, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    let enc = ours.encoder.unwrap();
    let mut worst = 0f32;
    for r in &rows {
        assert_eq!(r.latent_shape, [32, 8, 8]);
        let img = taesd_data::decode_stored_image(&r.image).unwrap();
        let (w, h) = img.dimensions();
        let mut chw = vec![0f32; (3 * w * h) as usize];
        for (i, p) in img.pixels().enumerate() {
            for c in 0..3 {
                chw[c * (w * h) as usize + i] = taesd_schemas::conventions::u8_to_unit(p[c]);
            }
        }
        let x = candle_core::Tensor::from_vec(chw, (1, 3, h as usize, w as usize), &candle_core::Device::Cpu).unwrap();
        let z = candle_core::Module::forward(&enc, &x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in z.iter().zip(&r.latent) {
            let err = (a - b).abs();
            assert!(err <= 1e-3 + 1e-3 * a.abs(), "{}: stored latent {b} vs our encoder {a}", r.source);
            worst = worst.max(err);
        }
    }
    println!("precompute with our exported ONNX encoder: worst |stored - candle| {worst:.2e} (f16 storage)");
}

#[test]
fn fit_time_scales_a_new_runs_step_counts_to_the_time_on_this_machine() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let quiet = ["--set", "data.eval_fraction=0", "--set", "data.preview_images=0"];
    let stages = ["--set", "data.stages=[{steps = 4, crop = 16}]"];
    let fit = ["--fit-time", "5", "--fit-steps", "2"];
    train(&with(with(with(small_run(&a, 8, 2), &quiet), &stages), &fit), true);
    let f = json_lines(&a.join("metrics.jsonl"), "fit");
    assert_eq!(f.len(), 1, "{f:?}");
    let f = &f[0];
    let segs = f["segments"].as_array().unwrap();
    assert_eq!(segs.len(), 2, "{f}");
    assert_eq!((segs[0]["crop"].as_u64(), segs[1]["crop"].as_u64()), (Some(16), Some(32)));
    assert_eq!((segs[0]["steps_before"].as_u64(), segs[1]["steps_before"].as_u64()), (Some(4), Some(4)));
    let (first, total) = (segs[0]["steps_after"].as_u64().unwrap(), f["run_steps_after"].as_u64().unwrap());
    assert_eq!(segs[1]["steps_after"].as_u64(), Some(total - first));
    // The run is the fitted one up to its stage switch; there the rest of the run was fitted
    // again to the time left: the config, the schedule's end and the run's end are the refit's.
    let st = json_lines(&a.join("metrics.jsonl"), "stage");
    assert_eq!(st[0]["step"].as_u64(), Some(first), "{st:?}");
    let rf = json_lines(&a.join("metrics.jsonl"), "refit");
    assert_eq!(rf.len(), 1, "{rf:?}");
    let rf = &rf[0];
    assert_eq!((rf["step"].as_u64(), rf["run_steps_before"].as_u64()), (Some(first), Some(total)), "{rf}");
    let refit_total = rf["run_steps_after"].as_u64().unwrap();
    let k = rf["factor"].as_f64().unwrap();
    assert!((0.5..=2.0).contains(&k), "{rf}");
    let x = (total - first) as f64 * k;
    let rest = if x >= 1000.0 { (x / 50.0).round() * 50.0 } else { x.round() };
    assert_eq!(refit_total, first + (rest as u64).max(1), "{rf}");
    let cfg = std::fs::read_to_string(a.join("config.toml")).unwrap();
    assert!(cfg.contains(&format!("steps = {refit_total}\n")) && cfg.contains(&format!("steps = {first}\n")), "{cfg}");
    assert_eq!(json_lines(&a.join("metrics.jsonl"), "end")[0]["step"].as_u64(), Some(refit_total));
    // The factor makes the old counts take 97% of the 5 s at the measured rates; each new count
    // is the old one times it, rounded (at least 1).
    let factor = f["factor"].as_f64().unwrap();
    let t: f64 = segs.iter().map(|s| s["steps_before"].as_f64().unwrap() / s["steps_per_s"].as_f64().unwrap()).sum();
    assert!((factor * t - 4.85).abs() < 1e-9, "{f}");
    assert!(segs.iter().all(|s| s["timed_steps"].as_u64() >= Some(2)), "{f}");
    for s in segs {
        let want = ((s["steps_before"].as_f64().unwrap() * factor).round() as u64).max(1);
        assert_eq!(s["steps_after"].as_u64(), Some(want), "{f}");
    }

    let out = train(&with(small_run(&dir.path().join("b"), 8, 2), &["--fit-time", "0"]), false);
    assert!(stderr(&out).contains("--fit-time 0: give a positive number of seconds"), "{}", stderr(&out));
}
