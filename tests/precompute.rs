//! End to end: `precompute` over real images from ../shared with the real taef2 ONNX teacher.

use std::path::Path;
use std::process::Command;
use taesd_e2e::*;

/// Flags shared by the runs here: the taef2 teacher on the CPU at a small size, so CI stays fast.
fn base_args<'a>(images: &'a str, out: &'a str, onnx: &'a str) -> Vec<&'a str> {
    vec![
        "--vae", "taef2", "--onnx", onnx, "--images", images, "--out", out, "--device", "cpu", "--resolution", "64",
        "--batch-size", "4", "--quiet",
    ]
}

/// Replace the value of `flag` in `args` (clap takes each flag once).
fn set<'a>(args: &mut Vec<&'a str>, flag: &'a str, value: &'a str) {
    match args.iter().position(|a| *a == flag) {
        Some(i) => args[i + 1] = value,
        None => args.extend([flag, value]),
    }
}

/// Our own check of "the stored image decodes to exactly what the teacher saw": decode sampled
/// stored images with the project's reader, rerun the ONNX teacher through precompute's Teacher,
/// compare with the stored latents (f16 rounding only).
fn rerun_teacher_in_rust(out: &Path) -> f32 {
    use precompute::{ortlib, teacher::{Teacher, TeacherOptions}};
    static ENV: std::sync::OnceLock<ort::environment::Environment> = std::sync::OnceLock::new();
    let env = ENV.get_or_init(|| ortlib::init(&ortlib::find(None).unwrap()).unwrap());
    let rows = read_rows(out);
    let res = rows[0].width as usize;
    let spec = taesd_schemas::preset("taef2").unwrap().spec();
    let mut teacher = Teacher::new(env, &taef2_onnx(), &spec, res as u32, TeacherOptions::default()).unwrap();
    let mut worst = 0f32;
    for r in rows.iter().step_by((rows.len() / 6).max(1)) {
        let img = taesd_data::decode_stored_image(&r.image).unwrap();
        let mut chw = vec![0f32; 3 * res * res];
        for (i, p) in img.pixels().enumerate() {
            for c in 0..3 {
                chw[c * res * res + i] = taesd_schemas::conventions::u8_to_unit(p[c]);
            }
        }
        let enc = teacher.encode(&chw, 1, res, res).unwrap();
        for (a, b) in enc.mean.iter().zip(&r.latent) {
            let err = (a - b).abs();
            assert!(err <= 1e-3 + 1e-3 * a.abs(), "{} v{}: stored latent {b} vs teacher {a}", r.source, r.variant);
            worst = worst.max(err);
        }
    }
    worst
}

fn verify_with_python(out: &Path) -> serde_json::Value {
    let script = repo().join("tests/py/verify_shards.py");
    let o = Command::new("python3")
        .arg(&script)
        .arg(out)
        .arg(taef2_onnx())
        .output()
        .expect("python3 is needed for the independent reader check (pyarrow, pillow, onnxruntime)");
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "independent check failed:\n{text}\n{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

#[test]
fn pool_and_odd_inputs_give_one_row_per_decodable_image_and_report_the_rest() {
    let images = pool_subset(20);
    let odd_src = shared().join("data/odd");
    let odd_dst = images.path().join("odd");
    std::fs::create_dir(&odd_dst).unwrap();
    let mut odd_images = 0;
    for e in std::fs::read_dir(&odd_src).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x != "md") {
            std::fs::copy(&p, odd_dst.join(p.file_name().unwrap())).unwrap();
            odd_images += 1;
        }
    }
    let broken = ["odd/empty.png", "odd/not_an_image.jpg", "odd/truncated.jpg"];
    let out = tempfile::tempdir().unwrap();
    let (i, o, x) = (images.path().to_str().unwrap(), out.path().to_str().unwrap(), taef2_onnx());
    let mut args = base_args(i, o, x.to_str().unwrap());
    args.extend(["--shard-rows", "8"]);
    let res = run("precompute", &args, true);
    let summary = stdout(&res);

    let decodable = 20 + odd_images - broken.len();
    let rows = read_rows(out.path());
    assert_eq!(rows.len(), decodable, "one row per decodable input\n{summary}");
    for r in &rows {
        assert_eq!((r.width, r.height, r.latent_shape), (64, 64, [32, 8, 8]));
        assert_eq!(r.latent.len(), 32 * 8 * 8);
        assert!(r.latent_std.is_none(), "taef2 outputs a plain latent");
    }
    // Every odd-but-valid image made it; every broken one is reported with a reason.
    for ok in ["odd/cmyk.jpg", "odd/exif_orientation_6.jpg", "odd/grayscale_16bit.png", "odd/panorama_8x1.jpg", "odd/tiny_24px.png", "odd/lossy.webp"] {
        assert!(rows.iter().any(|r| r.source == ok), "{ok} missing");
    }
    let errors = std::fs::read_to_string(out.path().join("errors.jsonl")).unwrap();
    let errors: Vec<serde_json::Value> = errors.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut bad: Vec<&str> = errors.iter().map(|e| e["source"].as_str().unwrap()).collect();
    bad.sort();
    assert_eq!(bad, broken);
    for e in &errors {
        assert_eq!(e["stage"], "decode");
        assert!(e["reason"].as_str().unwrap().len() > 5);
    }
    for b in broken {
        assert!(summary.contains(b), "summary names {b}:\n{summary}");
    }
    assert!(summary.contains("skipped          3"), "{summary}");

    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(out.path().join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["status"], "complete");
    assert_eq!(manifest["rows"].as_u64().unwrap() as usize, decodable);

    // Teacher rerun on the stored images, through our reader and through an independent one.
    rerun_teacher_in_rust(out.path());
    let v = verify_with_python(out.path());
    assert_eq!(v["rows"].as_u64().unwrap() as usize, decodable);
    assert!(v["checked"].as_u64().unwrap() >= 8);

    let ins = run("precompute", &["inspect", o], true);
    let text = stdout(&ins);
    assert!(text.contains(&format!("rows          {decodable}")), "{text}");
    assert!(text.contains("ch 31"), "per-channel statistics:\n{text}");
    assert!(text.contains("3 x") || text.contains("1 x decode"), "errors summary:\n{text}");
}

#[test]
fn kill_dash_nine_then_rerun_gives_the_same_rows_as_an_uninterrupted_run() {
    let images = pool_subset(32);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let x = taef2_onnx();
    let i = images.path().to_str().unwrap();
    let args = |o: &str| -> Vec<String> {
        let mut v: Vec<String> = base_args(i, o, x.to_str().unwrap()).into_iter().map(String::from).collect();
        let i = v.iter().position(|a| a == "--resolution").unwrap();
        v[i + 1] = "128".into();
        v.extend(["--shard-rows", "4", "--variants", "2", "--hflip"].map(String::from));
        v
    };
    let (a_path, b_path) = (a.path().to_str().unwrap(), b.path().to_str().unwrap());
    run("precompute", &args(a_path).iter().map(|s| s.as_str()).collect::<Vec<_>>(), true);

    let mut child = Command::new(bin("precompute")).args(args(b_path)).spawn().unwrap();
    let first = b.path().join("shard-00001.parquet");
    let t0 = std::time::Instant::now();
    while !first.exists() {
        assert!(t0.elapsed().as_secs() < 300, "no shard after 300 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let done: Vec<_> = std::fs::read_dir(b.path()).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().ends_with(".parquet")).collect();
    assert!(done.len() < 16, "the run finished before it was killed ({} shards)", done.len());
    // Whatever is under a final name is a whole shard.
    for d in &done {
        taesd_data::ShardReader::open(&d.path()).expect("a finished shard is readable");
    }
    let rerun = run("precompute", &args(b_path).iter().map(|s| s.as_str()).collect::<Vec<_>>(), true);
    assert!(stdout(&rerun).contains("already done"), "{}", stdout(&rerun));

    let (ra, rb) = (read_rows(a.path()), read_rows(b.path()));
    assert_eq!(ra.len(), 64);
    assert_eq!(ra.len(), rb.len());
    for (x, y) in ra.iter().zip(&rb) {
        assert_eq!((&x.source, x.variant, x.crop, x.flip), (&y.source, y.variant, y.crop, y.flip));
        assert_eq!(x.image, y.image, "{} v{}: stored image differs", x.source, x.variant);
        assert_eq!(x.latent, y.latent, "{} v{}: latent differs", x.source, x.variant);
    }
    // A second rerun has nothing to do.
    let again = run("precompute", &args(b_path).iter().map(|s| s.as_str()).collect::<Vec<_>>(), true);
    assert!(stdout(&again).contains("0 processed now"), "{}", stdout(&again));
}

#[test]
fn changing_settings_into_an_existing_output_is_refused() {
    let images = pool_subset(4);
    let out = tempfile::tempdir().unwrap();
    let x = taef2_onnx();
    let (i, o) = (images.path().to_str().unwrap(), out.path().to_str().unwrap());
    run("precompute", &base_args(i, o, x.to_str().unwrap()), true);
    let before = read_rows(out.path());
    let mut args = base_args(i, o, x.to_str().unwrap());
    set(&mut args, "--resolution", "128");
    let e = stderr(&run("precompute", &args, false));
    assert!(e.contains("resolution: 64 -> 128") && e.contains("new --out"), "{e}");
    let mut args = base_args(i, o, x.to_str().unwrap());
    args.extend(["--color-augment", "0.5"]);
    let e = stderr(&run("precompute", &args, false));
    assert!(e.contains("color_augment"), "{e}");
    // Nothing already done was touched.
    let after = read_rows(out.path());
    assert_eq!(before.len(), after.len());
    assert!(before.iter().zip(&after).all(|(a, b)| a.latent == b.latent && a.image == b.image));
}

#[test]
fn an_onnx_file_that_disagrees_with_the_preset_is_a_clear_error() {
    let images = pool_subset(2);
    let out = tempfile::tempdir().unwrap();
    let x = taef2_onnx();
    let mut args = base_args(images.path().to_str().unwrap(), out.path().to_str().unwrap(), x.to_str().unwrap());
    args[1] = "sdxl-fp16-fix";
    let e = stderr(&run("precompute", &args, false));
    assert!(e.contains("taef2_encoder.onnx") && e.contains("32 channels") && e.contains("4-channel"), "{e}");
}

#[test]
fn a_missing_onnx_runtime_library_is_a_clear_error_with_the_fix() {
    let images = pool_subset(2);
    let out = tempfile::tempdir().unwrap();
    let x = taef2_onnx();
    let mut args = base_args(images.path().to_str().unwrap(), out.path().to_str().unwrap(), x.to_str().unwrap());
    args.extend(["--ort-lib", "/nonexistent/libonnxruntime.so"]);
    let e = stderr(&run("precompute", &args, false));
    assert!(e.contains("/nonexistent/libonnxruntime.so") && e.contains("pip install onnxruntime"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn webdataset_tar_members_become_rows_keyed_by_member_name() {
    let images = pool_subset(5);
    let dir = tempfile::tempdir().unwrap();
    let tar_path = dir.path().join("00000.tar");
    let mut t = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
    let mut names = vec![];
    for (k, e) in std::fs::read_dir(images.path()).unwrap().enumerate() {
        let p = e.unwrap().path();
        let key = format!("{k:09}");
        t.append_path_with_name(&p, format!("{key}.jpg")).unwrap();
        let caption = b"a caption";
        let mut h = tar::Header::new_gnu();
        h.set_size(caption.len() as u64);
        h.set_cksum();
        t.append_data(&mut h, format!("{key}.txt"), &caption[..]).unwrap();
        names.push(key);
    }
    t.finish().unwrap();
    drop(t);
    let out = tempfile::tempdir().unwrap();
    let x = taef2_onnx();
    run("precompute", &base_args(dir.path().to_str().unwrap(), out.path().to_str().unwrap(), x.to_str().unwrap()), true);
    let rows = read_rows(out.path());
    let mut keys: Vec<_> = rows.iter().map(|r| r.key.clone()).collect();
    keys.sort();
    names.sort();
    assert_eq!(keys, names);
    assert!(rows.iter().all(|r| r.source.starts_with("00000.tar:")), "{:?}", rows[0].source);
    verify_with_python(out.path());
}

#[test]
fn augmented_jpeg_shards_are_deterministic_and_match_the_teacher() {
    let images = pool_subset(6);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let x = taef2_onnx();
    let i = images.path().to_str().unwrap();
    for o in [a.path(), b.path()] {
        let mut args = base_args(i, o.to_str().unwrap(), x.to_str().unwrap());
        args.extend(["--variants", "3", "--hflip", "--color-augment", "0.5", "--image-format", "jpeg", "--quality", "90", "--seed", "7"]);
        run("precompute", &args, true);
    }
    let (ra, rb) = (read_rows(a.path()), read_rows(b.path()));
    assert_eq!(ra.len(), 18);
    assert!(ra.iter().zip(&rb).all(|(x, y)| x.image == y.image && x.latent == y.latent && x.crop == y.crop));
    assert!(ra.iter().any(|r| r.flip) && ra.iter().any(|r| !r.flip));
    assert!(ra.iter().any(|r| r.color_aug) && ra.iter().any(|r| !r.color_aug));
    assert_eq!(ra.iter().filter(|r| r.variant == 0).count(), 6);
    assert!(ra[0].image.starts_with(&[0xFF, 0xD8]), "stored as JPEG");
    // The teacher saw the decoded JPEG, not the pre-JPEG pixels: exactly with our decoder, within
    // a looser bound with Pillow's.
    let worst = rerun_teacher_in_rust(a.path());
    assert!(worst < 2e-3, "{worst}");
    verify_with_python(a.path());
}

/// An fp16 teacher that gives NaN latents for dark images (tests/py/make_nan_onnx.py): those rows
/// are skipped and reported in errors.jsonl with the file and the reason; the others are written.
#[test]
fn nan_latents_are_skipped_and_reported_with_the_file_and_reason() {
    let images = tempfile::tempdir().unwrap();
    for (name, v) in [("black.png", 0u8), ("white.png", 255), ("grey.png", 200), ("dark.png", 30)] {
        image::RgbImage::from_pixel(80, 64, image::Rgb([v, v, v])).save(images.path().join(name)).unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let onnx = repo().join("tests/data/nan_encoder_f16.onnx");
    let (i, o) = (images.path().to_str().unwrap(), out.path().to_str().unwrap());
    let args = [
        "--vae", "custom", "--channels", "3", "--scale", "1", "--input-range", "0,1", "--onnx", onnx.to_str().unwrap(),
        "--images", i, "--out", o, "--device", "cpu", "--resolution", "64", "--batch-size", "3", "--quiet",
    ];
    let summary = stdout(&run("precompute", &args, true));
    let rows = read_rows(out.path());
    let mut ok: Vec<&str> = rows.iter().map(|r| r.source.as_str()).collect();
    ok.sort();
    assert_eq!(ok, ["grey.png", "white.png"], "{summary}");
    for r in &rows {
        assert!(r.latent.iter().all(|x| x.is_finite()) && r.latent_shape == [3, 8, 8]);
    }
    let errors: Vec<serde_json::Value> = std::fs::read_to_string(out.path().join("errors.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut bad: Vec<&str> = errors.iter().map(|e| e["source"].as_str().unwrap()).collect();
    bad.sort();
    assert_eq!(bad, ["black.png", "dark.png"], "{summary}");
    for e in &errors {
        assert_eq!(e["stage"], "latent");
        let reason = e["reason"].as_str().unwrap();
        assert!(reason.contains("192 NaN and 0 inf values (of 192)") && reason.contains("fp16-fix"), "{reason}");
    }
    assert!(summary.contains("skipped          2") && summary.contains("black.png"), "{summary}");
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(out.path().join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["status"], "complete");
}

/// `--decode-only` runs the CPU side alone: no ONNX, no output folder, a rate.
#[test]
fn decode_only_measures_the_cpu_side_without_a_teacher() {
    let images = pool_subset(6);
    let o = run(
        "precompute",
        &["--vae", "sdxl", "--images", images.path().to_str().unwrap(), "--resolution", "64", "--decode-only", "--quiet", "--workers", "2"],
        true,
    );
    let text = stdout(&o);
    assert!(text.contains("inputs           6 (0 failed)") && text.contains("images/s"), "{text}");
}

/// tools/export_vae_onnx.py's conv-bias fold (CUDA-only operators) keeps the graph's outputs,
/// checked by tools/test_export_vae_onnx.py with a NumPy interpreter of those operators.
#[test]
fn export_tool_conv_bias_fold_keeps_the_outputs() {
    let o = Command::new("python3")
        .arg(repo().join("tools/test_export_vae_onnx.py"))
        .output()
        .expect("python3 is needed (onnx, numpy, onnxruntime)");
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{text}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("2 passed"), "{text}");
}
