//! End to end: `precompute` over real images from ../shared with the real taef2 ONNX teacher.

use std::path::Path;
use std::process::Command;
use taesd_e2e::*;

/// Flags shared by the runs here: the taef2 teacher on the CPU at a small size, so CI stays fast.
fn base_args<'a>(images: &'a str, out: &'a str, onnx: &'a str) -> Vec<&'a str> {
    vec![
        "--vae",
        "taef2",
        "--onnx",
        onnx,
        "--images",
        images,
        "--out",
        out,
        "--device",
        "cpu",
        "--resolution",
        "64",
        "--batch-size",
        "4",
        "--quiet",
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
    use precompute::{
        ortlib,
        teacher::{Teacher, TeacherOptions},
    };
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
    // Below the default --min-side (half of --resolution 64): refused, with the reason.
    let too_small = ["odd/tiny_24px.png"];
    let out = tempfile::tempdir().unwrap();
    let (i, o, x) = (images.path().to_str().unwrap(), out.path().to_str().unwrap(), taef2_onnx());
    let mut args = base_args(i, o, x.to_str().unwrap());
    args.extend(["--shard-rows", "8"]);
    let res = run("precompute", &args, true);
    let summary = stdout(&res);

    let decodable = 20 + odd_images - broken.len() - too_small.len();
    let rows = read_rows(out.path());
    assert_eq!(rows.len(), decodable, "one row per decodable input\n{summary}");
    for r in &rows {
        assert_eq!((r.width, r.height, r.latent_shape), (64, 64, [32, 8, 8]));
        assert_eq!(r.latent.len(), 32 * 8 * 8);
        assert!(r.latent_std.is_none(), "taef2 outputs a plain latent");
    }
    // Every odd-but-valid image made it; every broken one is reported with a reason.
    for ok in [
        "odd/cmyk.jpg",
        "odd/exif_orientation_6.jpg",
        "odd/grayscale_16bit.png",
        "odd/panorama_8x1.jpg",
        "odd/lossy.webp",
    ] {
        assert!(rows.iter().any(|r| r.source == ok), "{ok} missing");
    }
    let errors = error_lines(out.path());
    let mut bad: Vec<&str> = errors.iter().map(|e| e["source"].as_str().unwrap()).collect();
    bad.sort();
    let mut want: Vec<&str> = broken.iter().chain(&too_small).copied().collect();
    want.sort();
    assert_eq!(bad, want);
    for e in &errors {
        let stage = if too_small.contains(&e["source"].as_str().unwrap()) { "size" } else { "decode" };
        assert_eq!(e["stage"], stage, "{e}");
        assert!(e["reason"].as_str().unwrap().len() > 5);
    }
    let small = errors.iter().find(|e| e["stage"] == "size").unwrap()["reason"].as_str().unwrap();
    assert!(small.contains("24x24") && small.contains("--min-side 32"), "{small}");
    for b in broken.iter().chain(&too_small) {
        assert!(summary.contains(b), "summary names {b}:\n{summary}");
    }
    assert!(summary.contains("skipped          4"), "{summary}");
    assert!(summary.contains(&format!("= {decodable} with rows + 4 without")), "{summary}");

    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("manifest.json")).unwrap()).unwrap();
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
    assert!(text.contains("1 x size") && text.contains("1 x decode"), "errors summary:\n{text}");
    // `precompute inspect DIR | head`: a reader that has gone away ends it quietly (SIGPIPE), not
    // with a "Broken pipe" panic. The pipe's read end is closed before the first write.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let piped = Command::new(bin("precompute")).args(["inspect", o]).stdout(writer).output().unwrap();
    let err = String::from_utf8_lossy(&piped.stderr);
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
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
    let first = b.path().join("data/shard-00001.parquet");
    let t0 = std::time::Instant::now();
    while !first.exists() {
        assert!(t0.elapsed().as_secs() < 300, "no shard after 300 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let done = shard_files(b.path());
    assert!(done.len() < 16, "the run finished before it was killed ({} shards)", done.len());
    // Whatever is under a final name is a whole shard.
    for d in &done {
        taesd_data::ShardReader::open(d).expect("a finished shard is readable");
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

/// A failed first run must not block its output folder: a preset/ONNX mismatch and a .pth given
/// as --onnx are refused before anything is written, and a folder whose run never finished a
/// shard (as earlier versions left it) takes a run with other settings.
#[test]
fn a_failed_first_run_leaves_its_output_folder_usable() {
    let images = pool_subset(3);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (i, o, x) = (images.path().to_str().unwrap(), out.to_str().unwrap(), taef2_onnx());
    let mut args = base_args(i, o, x.to_str().unwrap());
    args[1] = "sdxl";
    let e = stderr(&run("precompute", &args, false));
    assert!(e.contains("4-channel"), "{e}");
    assert!(!out.exists(), "a refused run wrote {}", out.display());
    // A PyTorch checkpoint as --onnx: named for what it is, nothing written.
    let pth = shared().join("reference/taef2/taef2_encoder.pth");
    let e = stderr(&run("precompute", &base_args(i, o, pth.to_str().unwrap()), false));
    assert!(e.contains("taef2_encoder.pth") && e.contains("PyTorch") && e.contains("export_vae_onnx.py"), "{e}");
    assert!(!out.exists());
    // The corrected command succeeds into the same folder.
    run("precompute", &base_args(i, o, x.to_str().unwrap()), true);
    assert_eq!(read_rows(&out).len(), 3);

    // A folder whose manifest is there but no shard was finished (an earlier version's failed
    // first run): another setting starts it over instead of "written with other settings".
    let stale = dir.path().join("stale");
    std::fs::create_dir_all(stale.join("data")).unwrap();
    let mut m = manifest(&out);
    m["status"] = "in_progress".into();
    m["shards"] = serde_json::json!([]);
    m["config"]["resolution"] = 128.into();
    std::fs::write(stale.join("manifest.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let res = run("precompute", &base_args(i, stale.to_str().unwrap(), x.to_str().unwrap()), true);
    let e = stderr(&res);
    assert!(e.contains("no finished shard") && e.contains("resolution: 128 -> 64"), "{e}");
    assert_eq!(read_rows(&stale).len(), 3);
    assert_eq!(manifest(&stale)["config"]["resolution"], 64);
    // With a finished shard, other settings are still refused, and nothing is touched.
    let before = std::fs::read(&shard_files(&stale)[0]).unwrap();
    let mut args = base_args(i, stale.to_str().unwrap(), x.to_str().unwrap());
    set(&mut args, "--resolution", "128");
    let e = stderr(&run("precompute", &args, false));
    assert!(e.contains("resolution: 64 -> 128") && e.contains("new --out"), "{e}");
    assert_eq!(std::fs::read(&shard_files(&stale)[0]).unwrap(), before);
}

/// Every file under --images ends as rows or as a line of errors.jsonl, for every file type the
/// `image` crate knows and for junk: none is dropped while listing (GIF, BMP, TIFF, ... used to
/// be filtered out by extension, unreported).
#[test]
fn every_file_under_images_ends_as_a_row_or_an_error() {
    use image::{DynamicImage, ImageFormat, RgbImage};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("in");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    let img = RgbImage::from_fn(80, 72, |x, y| image::Rgb([(x * 3) as u8, (y * 3) as u8, ((x * y) % 251) as u8]));
    let mut files: Vec<String> = Vec::new();
    let mut decodable: Vec<String> = Vec::new();
    let mut unsupported: Vec<(String, &str)> = Vec::new();
    let put = |name: &str, bytes: &[u8], files: &mut Vec<String>| {
        std::fs::write(root.join(name), bytes).unwrap();
        files.push(name.to_string());
    };
    for f in ImageFormat::all() {
        let name = format!("image.{}", f.extensions_str()[0]);
        if f.writing_enabled() {
            let src = match f {
                ImageFormat::Hdr | ImageFormat::OpenExr => {
                    DynamicImage::ImageRgb32F(DynamicImage::ImageRgb8(img.clone()).into_rgb32f())
                }
                ImageFormat::Farbfeld => DynamicImage::ImageRgba16(DynamicImage::ImageRgb8(img.clone()).into_rgba16()),
                // The ICO decoder takes only RGBA PNGs inside.
                ImageFormat::Ico => DynamicImage::ImageRgba8(DynamicImage::ImageRgb8(img.clone()).into_rgba8()),
                _ => DynamicImage::ImageRgb8(img.clone()),
            };
            let mut bytes = Vec::new();
            src.write_to(&mut std::io::Cursor::new(&mut bytes), f).unwrap_or_else(|e| panic!("{f:?}: {e}"));
            put(&name, &bytes, &mut files);
            decodable.push(name);
        } else {
            // No encoder in this build: the format's signature (or for PCX, none) and a header.
            let (bytes, what): (Vec<u8>, &str) = match f {
                ImageFormat::Avif => ([&b"\0\0\0\x1cftypavif\0\0\0\0avifmif1miaf"[..], &[0u8; 64]].concat(), "AVIF"),
                ImageFormat::Dds => ([&b"DDS \x7c\0\0\0"[..], &[0u8; 120]].concat(), "DDS"),
                _ => ([&[0x0Au8, 0x05, 0x01, 0x08][..], &[0u8; 124]].concat(), "PCX"),
            };
            put(&name, &bytes, &mut files);
            unsupported.push((name, what));
        }
    }
    // Content decides, not the name: a PNG without an extension and a GIF named .jpg are images.
    let mut png = Vec::new();
    DynamicImage::ImageRgb8(img.clone()).write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png).unwrap();
    put("sub/no_extension", &png, &mut files);
    decodable.push("sub/no_extension".into());
    let mut gif = Vec::new();
    DynamicImage::ImageRgb8(img.clone()).write_to(&mut std::io::Cursor::new(&mut gif), ImageFormat::Gif).unwrap();
    put("sub/gif_named.jpg", &gif, &mut files);
    decodable.push("sub/gif_named.jpg".into());
    // A real photo.
    let photo = std::fs::read(pool().join("photo-00010.jpg")).unwrap();
    put("sub/photo.jpg", &photo, &mut files);
    decodable.push("sub/photo.jpg".into());
    // Junk.
    let junk: Vec<(&str, Vec<u8>)> = vec![
        ("notes.txt", b"a caption, not an image".to_vec()),
        ("empty.png", vec![]),
        ("page.jpg", b"<!DOCTYPE html><html>404</html>".to_vec()),
        ("cut.png", png[..png.len() / 2].to_vec()),
        ("sub/.DS_Store", vec![0, 0, 0, 1, 66, 117, 100, 49, 0, 0, 16, 0]),
        ("noise.bin", (0..3000u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect()),
        ("movie.mp4", [&b"\0\0\0\x20ftypisom\0\0\x02\0"[..], &[0u8; 64]].concat()),
        ("vector.svg", b"<svg xmlns='http://www.w3.org/2000/svg' width='80' height='72'/>".to_vec()),
    ];
    for (name, bytes) in &junk {
        put(name, bytes, &mut files);
    }
    files.sort();

    let out = dir.path().join("out");
    let x = taef2_onnx();
    let mut args = base_args(root.to_str().unwrap(), out.to_str().unwrap(), x.to_str().unwrap());
    args.extend(["--shard-rows", "8"]);
    let summary = stdout(&run("precompute", &args, true));

    let rows = read_rows(&out);
    let errors = error_lines(&out);
    let with_rows: std::collections::BTreeSet<String> = rows.iter().map(|r| r.source.clone()).collect();
    let with_errors: std::collections::BTreeSet<String> =
        errors.iter().map(|e| e["source"].as_str().unwrap().to_string()).collect();
    assert!(with_rows.is_disjoint(&with_errors), "{with_rows:?} / {with_errors:?}");
    let accounted: Vec<String> =
        with_rows.iter().chain(&with_errors).cloned().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    assert_eq!(accounted, files, "rows + errors must be every file\n{summary}");
    assert_eq!(with_rows.len() + with_errors.len(), files.len());
    for d in &decodable {
        assert!(
            with_rows.contains(d),
            "{d} should have decoded: {:?}",
            errors.iter().find(|e| e["source"] == d.as_str())
        );
    }
    for (name, what) in &unsupported {
        let e = errors.iter().find(|e| e["source"] == name.as_str()).unwrap();
        let reason = e["reason"].as_str().unwrap();
        assert!(reason.contains("unsupported image format") && reason.contains(what), "{name}: {reason}");
    }
    let reason = |n: &str| errors.iter().find(|e| e["source"] == n).unwrap()["reason"].as_str().unwrap().to_string();
    assert!(reason("movie.mp4").contains("video"), "{}", reason("movie.mp4"));
    assert!(reason("vector.svg").contains("SVG"), "{}", reason("vector.svg"));
    assert!(reason("notes.txt").contains("not an image"), "{}", reason("notes.txt"));
    // The summary accounts for every file.
    assert!(summary.contains(&format!("inputs           {} under --images", files.len())), "{summary}");
    assert!(summary.contains(&format!("= {} with rows + {} without", with_rows.len(), with_errors.len())), "{summary}");
    let m = manifest(&out);
    assert_eq!(m["inputs_total"].as_u64().unwrap() as usize, files.len());
    assert_eq!(m["errors"].as_u64().unwrap() as usize, with_errors.len());
}

/// --min-side refuses sources too small for the resolution (default: half of it), reported with
/// the reason; rows made from enlarged crops are counted.
#[test]
fn tiny_and_sliver_images_are_refused_and_upscaled_rows_counted() {
    let images = tempfile::tempdir().unwrap();
    for (name, w, h) in [
        ("one_pixel.png", 1, 1),
        ("sliver.png", 4000, 10),
        ("narrow.png", 20, 40),
        ("small.png", 64, 48),
        ("big.png", 160, 128),
    ] {
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x % 256) as u8, (y * 5 % 256) as u8, 90]))
            .save(images.path().join(name))
            .unwrap();
    }
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let x = taef2_onnx();
    let i = images.path().to_str().unwrap();
    let summary = stdout(&run("precompute", &base_args(i, a.path().to_str().unwrap(), x.to_str().unwrap()), true));
    let rows = read_rows(a.path());
    let mut ok: Vec<&str> = rows.iter().map(|r| r.source.as_str()).collect();
    ok.sort();
    assert_eq!(ok, ["big.png", "small.png"], "{summary}");
    let errors = error_lines(a.path());
    assert_eq!(errors.len(), 3, "{errors:?}");
    for e in &errors {
        assert_eq!(e["stage"], "size", "{e}");
        assert!(e["reason"].as_str().unwrap().contains("--min-side 32"), "{e}");
    }
    let sliver = errors.iter().find(|e| e["source"] == "sliver.png").unwrap()["reason"].as_str().unwrap();
    assert!(sliver.contains("4000x10") && sliver.contains("6.4x"), "{sliver}");
    // small.png (48 px short side) is enlarged to 64: counted.
    assert!(summary.contains("upscaled         1 row(s) now, 1 in the output"), "{summary}");
    assert_eq!(manifest(a.path())["upscaled_rows"], 1);
    assert_eq!(manifest(a.path())["config"]["min_side"], 32);
    // --min-side 0 keeps everything, and counts every enlarged row.
    let mut args = base_args(i, b.path().to_str().unwrap(), x.to_str().unwrap());
    args.extend(["--min-side", "0"]);
    let summary = stdout(&run("precompute", &args, true));
    assert_eq!(read_rows(b.path()).len(), 5, "{summary}");
    assert_eq!(manifest(b.path())["upscaled_rows"], 4, "{summary}");
    let ins = stdout(&run("precompute", &["inspect", b.path().to_str().unwrap()], true));
    assert!(ins.contains("upscaled      4 rows"), "{ins}");
}

/// Adding images and rerunning encodes only the new ones into new shards and says so; removed
/// inputs are reported, never silently kept; the rows are those a fresh run over the final
/// folder gives.
#[test]
fn a_grown_folder_is_encoded_incrementally() {
    let all = pool_subset(9);
    let mut names: Vec<String> =
        std::fs::read_dir(all.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    let images = tempfile::tempdir().unwrap();
    let copy = |n: &str| std::fs::copy(all.path().join(n), images.path().join(n)).unwrap();
    for n in &names[..6] {
        copy(n);
    }
    let (out, fresh) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let x = taef2_onnx();
    let (i, o) = (images.path().to_str().unwrap(), out.path().to_str().unwrap());
    let mut args = base_args(i, o, x.to_str().unwrap());
    args.extend(["--shard-rows", "4"]);
    run("precompute", &args, true);
    let first: Vec<(std::path::PathBuf, Vec<u8>)> =
        shard_files(out.path()).into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect();
    assert_eq!(first.len(), 2);

    // Three more images: only they are encoded, into new shards; the old ones are untouched.
    for n in &names[6..] {
        copy(n);
    }
    let res = run("precompute", &args, true);
    let (text, err) = (stdout(&res), stderr(&res));
    assert!(err.contains("incremental run: 3 new input(s)") && err.contains("shard(s) 2"), "{err}");
    assert!(text.contains("3 processed now") && text.contains("6 already done in 2 earlier shard(s)"), "{text}");
    for (p, bytes) in &first {
        assert_eq!(&std::fs::read(p).unwrap(), bytes, "{} changed", p.display());
    }
    assert_eq!(shard_files(out.path()).len(), 3);
    let m = manifest(out.path());
    assert_eq!(
        (m["status"].as_str(), m["rows"].as_u64(), m["inputs_total"].as_u64()),
        (Some("complete"), Some(9), Some(9))
    );
    // The same rows as one run over the nine images.
    let mut fresh_args = base_args(i, fresh.path().to_str().unwrap(), x.to_str().unwrap());
    fresh_args.extend(["--shard-rows", "4"]);
    run("precompute", &fresh_args, true);
    let key = |r: &taesd_data::ShardRow| (r.source.clone(), r.variant);
    let mut inc = read_rows(out.path());
    let mut one = read_rows(fresh.path());
    inc.sort_by_key(key);
    one.sort_by_key(key);
    assert_eq!(inc.len(), 9);
    for (a, b) in inc.iter().zip(&one) {
        assert_eq!((key(a), &a.image, &a.latent), (key(b), &b.image, &b.latent));
    }

    // Nothing new: nothing to do.
    let again = stdout(&run("precompute", &args, true));
    assert!(again.contains("0 processed now"), "{again}");

    // An image removed from the folder: reported (summary, stderr, manifest), its rows kept.
    std::fs::remove_file(images.path().join(&names[1])).unwrap();
    let res = run("precompute", &args, true);
    let (text, err) = (stdout(&res), stderr(&res));
    assert!(err.contains("no longer under --images") && err.contains(names[1].as_str()), "{err}");
    assert!(text.contains("removed          1 input(s)") && text.contains(names[1].as_str()), "{text}");
    let m = manifest(out.path());
    assert_eq!(m["removed_inputs"], serde_json::json!([names[1]]));
    assert_eq!(m["rows"], 9);
    let ins = stdout(&run("precompute", &["inspect", o], true));
    assert!(ins.contains("removed       1 input(s)"), "{ins}");
}

/// The one-liners of docs/format.md (pyarrow, polars, duckdb), run as written in `cwd` (which
/// holds the output folder `latents`): each must print `rows`.
fn assert_dataset_one_liners_count(cwd: &Path, rows: usize) {
    let doc = std::fs::read_to_string(repo().join("docs/format.md")).unwrap();
    let block = doc
        .split("<!-- dataset one-liners: run by tests/precompute.rs -->")
        .nth(1)
        .and_then(|rest| rest.split("```python").nth(1))
        .and_then(|b| b.split("```").next())
        .expect("docs/format.md has the dataset one-liners block");
    let mut tried = 0;
    for line in block.lines().map(str::trim).filter(|l| l.starts_with("print(")) {
        let script = format!("import pyarrow.parquet as pq, polars as pl, duckdb\n{line}\n");
        let o = Command::new("python3").arg("-c").arg(&script).current_dir(cwd).output().expect("python3");
        let text = String::from_utf8_lossy(&o.stdout).trim().to_string();
        assert!(o.status.success(), "{line}\n{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(text, rows.to_string(), "{line}");
        tried += 1;
    }
    assert_eq!(tried, 3, "pyarrow, polars and duckdb:\n{block}");
}

/// The output folder's data/ is a Parquet dataset: the one-liners of docs/format.md (pyarrow,
/// polars, duckdb) run as written and each counts every row. `precompute inspect` and the
/// readers take the old layout (shards beside manifest.json) too.
#[test]
fn the_shard_folder_reads_as_a_dataset_with_the_documented_one_liners() {
    let images = pool_subset(5);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("latents");
    let x = taef2_onnx();
    let mut args = base_args(images.path().to_str().unwrap(), out.to_str().unwrap(), x.to_str().unwrap());
    args.extend(["--shard-rows", "2"]);
    run("precompute", &args, true);
    assert_eq!(shard_files(&out).len(), 3);
    assert!(shard_files(&out).iter().all(|p| p.parent().unwrap().ends_with("latents/data")));
    assert_dataset_one_liners_count(dir.path(), 5);
    verify_with_python(&out);

    // The old layout: shards beside the manifest. Inspect and the readers still take it.
    let old = dir.path().join("old");
    std::fs::create_dir(&old).unwrap();
    for f in shard_files(&out) {
        std::fs::copy(&f, old.join(f.file_name().unwrap())).unwrap();
    }
    let mut m = manifest(&out);
    for s in m["shards"].as_array_mut().unwrap() {
        let f = s["file"].as_str().unwrap().trim_start_matches("data/").to_string();
        s["file"] = f.into();
    }
    std::fs::write(old.join("manifest.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    std::fs::copy(out.join("errors.jsonl"), old.join("errors.jsonl")).unwrap();
    for d in [&old, &out, &out.join("data")] {
        let ins = stdout(&run("precompute", &["inspect", d.to_str().unwrap()], true));
        assert!(ins.contains("rows          5") && ins.contains("3 of 3 shards"), "{}: {ins}", d.display());
    }
    assert_eq!(read_rows(&old), read_rows(&out));
    verify_with_python(&old);
}

/// Small things seen: an empty --images folder warns and writes nothing; no ANSI escape codes in
/// logs that are not a terminal; errors say their cause once.
#[test]
fn empty_folders_warn_logs_have_no_escape_codes_and_errors_say_things_once() {
    let empty = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let x = taef2_onnx();
    let res =
        run("precompute", &base_args(empty.path().to_str().unwrap(), out.to_str().unwrap(), x.to_str().unwrap()), true);
    let e = stderr(&res);
    assert!(e.contains("warning") && e.contains("holds no input files"), "{e}");
    assert!(!out.exists(), "nothing to write, nothing written");

    // --device auto on a machine without CUDA warns through the log: plain text when stderr is a
    // pipe (as here, or a log file).
    let images = pool_subset(2);
    let mut args = base_args(images.path().to_str().unwrap(), out.to_str().unwrap(), x.to_str().unwrap());
    set(&mut args, "--device", "auto");
    let res = run("precompute", &args, true);
    let e = stderr(&res);
    assert!(!e.contains('\x1b'), "escape codes in a non-terminal log: {e:?}");

    let missing = dir.path().join("nowhere");
    let e = stderr(&run(
        "precompute",
        &base_args(missing.to_str().unwrap(), out.to_str().unwrap(), x.to_str().unwrap()),
        false,
    ));
    assert_eq!(e.matches("does not exist").count(), 1, "{e}");
    assert_eq!(e.matches("nowhere").count(), 1, "{e}");
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
    run(
        "precompute",
        &base_args(dir.path().to_str().unwrap(), out.path().to_str().unwrap(), x.to_str().unwrap()),
        true,
    );
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
        args.extend([
            "--variants",
            "3",
            "--hflip",
            "--color-augment",
            "0.5",
            "--image-format",
            "jpeg",
            "--quality",
            "90",
            "--seed",
            "7",
        ]);
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
        "--vae",
        "custom",
        "--channels",
        "3",
        "--scale",
        "1",
        "--input-range",
        "0,1",
        "--onnx",
        onnx.to_str().unwrap(),
        "--images",
        i,
        "--out",
        o,
        "--device",
        "cpu",
        "--resolution",
        "64",
        "--batch-size",
        "3",
        "--quiet",
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
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["status"], "complete");
}

/// `--decode-only` runs the CPU side alone: no ONNX, no output folder, a rate.
#[test]
fn decode_only_measures_the_cpu_side_without_a_teacher() {
    let images = pool_subset(6);
    let o = run(
        "precompute",
        &[
            "--vae",
            "sdxl",
            "--images",
            images.path().to_str().unwrap(),
            "--resolution",
            "64",
            "--decode-only",
            "--quiet",
            "--workers",
            "2",
        ],
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

/// `--device cpu,cpu`: two teacher sessions in one process, fed by one decode pool, each batch to
/// whichever is free, write the same shard files byte for byte as one session. The batches are cut
/// from the input order alone and results return to their samples' slots, so which session
/// encoded a batch cannot show; two CPU sessions compute a batch identically, and the Parquet
/// writer puts nothing time- or process-dependent in a file (the manifest's `extra.device` says
/// `cpu,cpu`, and it is the only difference).
#[test]
fn scale_out_two_cpu_sessions_write_the_same_shards_as_one() {
    let images = pool_subset(10);
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let x = taef2_onnx();
    let i = images.path().to_str().unwrap();
    let (o1, o2, xs) = (one.path().to_str().unwrap(), two.path().to_str().unwrap(), x.to_str().unwrap());
    let args = |device: &'static str, out| {
        let mut a = base_args(i, out, xs);
        set(&mut a, "--device", device);
        // Small batches and shards: many batches in flight, on both sessions.
        set(&mut a, "--batch-size", "1");
        a.extend(["--shard-rows", "4", "--ort-threads", "1"]);
        a
    };
    run("precompute", &args("cpu", o1), true);
    let res = run("precompute", &args("cpu,cpu", o2), true);
    assert!(stdout(&res).contains("teacher device   cpu,cpu"), "{}", stdout(&res));
    let (f1, f2) = (shard_files(one.path()), shard_files(two.path()));
    assert_eq!(f1.len(), 3);
    assert_eq!(
        f1.iter().map(|p| p.file_name()).collect::<Vec<_>>(),
        f2.iter().map(|p| p.file_name()).collect::<Vec<_>>()
    );
    for (a, b) in f1.iter().zip(&f2) {
        assert!(std::fs::read(a).unwrap() == std::fs::read(b).unwrap(), "{} differs", b.display());
    }
    assert_eq!(manifest(two.path())["extra"]["device"], "cpu,cpu");
    assert_eq!(manifest(one.path())["shards"], manifest(two.path())["shards"]);
}

/// `--part I/N`: three parts into one folder make the rows of one whole run, no row twice, the
/// errors of the whole run each in one part's errors file; `OUT/data` stays one dataset. Missing
/// and unfinished parts are named by `precompute inspect` and refused by `train` (with the flag
/// that allows it); a part resumes on its own; parts of another N, other settings or a whole run
/// into the folder are refused before anything is written.
#[test]
fn scale_out_parts_make_the_whole_run_and_name_what_is_missing() {
    let images = pool_subset(9);
    std::fs::write(images.path().join("notes.txt"), "not an image").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (whole, parts) = (dir.path().join("whole"), dir.path().join("latents"));
    let x = taef2_onnx();
    let i = images.path().to_str().unwrap();
    let (w, p) = (whole.to_str().unwrap(), parts.to_str().unwrap());
    let with = |out: &str, extra: &[&str]| -> Vec<String> {
        let o = if out == "whole" { w } else { p };
        let mut a: Vec<String> = base_args(i, o, x.to_str().unwrap()).into_iter().map(String::from).collect();
        a.extend(["--shard-rows", "2"].iter().chain(extra).map(|s| s.to_string()));
        a
    };
    let go = |a: Vec<String>, ok: bool| run("precompute", &a.iter().map(|s| s.as_str()).collect::<Vec<_>>(), ok);
    go(with("whole", &[]), true);
    let part_files = |k: u32| {
        let tag = taesd_schemas::Part { index: k, count: 3 }.tag();
        std::fs::read_dir(parts.join("data"))
            .map(|r| {
                let mut v: Vec<_> = r
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(&tag))
                    .collect();
                v.sort();
                v
            })
            .unwrap_or_default()
    };
    // Parts 0 and 2 only: part 1 is missing.
    go(with("parts", &["--part", "0/3"]), true);
    let res = go(with("parts", &["--part", "2/3"]), true);
    assert!(stdout(&res).contains("part             2/3:"), "{}", stdout(&res));
    let ins = stdout(&run("precompute", &["inspect", p], true));
    assert!(ins.contains("part 1/3 missing") && ins.contains("status        incomplete"), "{ins}");
    let run_dir = dir.path().join("run");
    let train_args = ["--shards", p, "--run-dir", run_dir.to_str().unwrap(), "--device", "cpu", "--steps", "1"];
    let e = stderr(&run("train", &train_args, false));
    assert!(e.contains("part 1/3 missing") && e.contains("data.allow_partial=true"), "{e}");
    let partial = train::dataset::ShardSet::open_with(&parts, true).unwrap();
    assert_eq!(partial.readers.len(), part_files(0).len() + part_files(2).len());

    // Refused before anything is written: another N, other settings, a whole run into the folder.
    let e = stderr(&go(with("parts", &["--part", "1/4"]), false));
    assert!(e.contains("I/3") && e.contains("part 1/4"), "{e}");
    let e = stderr(&go(with("parts", &["--part", "1/3", "--seed", "7"]), false));
    assert!(e.contains("other settings") && e.contains("seed"), "{e}");
    let e = stderr(&go(with("parts", &[]), false));
    assert!(e.contains("add --part"), "{e}");
    let e = stderr(&go(with("whole", &["--part", "1/3"]), false));
    assert!(e.contains("whole run"), "{e}");
    assert!(part_files(1).is_empty() && !parts.join("manifest.part-00001-of-00003.json").exists());

    go(with("parts", &["--part", "1/3"]), true);
    let ins = stdout(&run("precompute", &["inspect", p], true));
    assert!(ins.contains("3 part(s), all complete") && ins.contains("status        complete"), "{ins}");

    // The union of the parts is the whole run: the same rows, none twice; the same errors.
    let key = |r: &taesd_data::ShardRow| (r.source.clone(), r.variant);
    let mut a = read_rows(&whole);
    a.sort_by_key(key);
    let set = train::dataset::ShardSet::open(&parts).unwrap();
    let files: Vec<_> = set.readers.iter().map(|r| r.path().to_path_buf()).collect();
    assert_eq!(files, (0..3).flat_map(part_files).collect::<Vec<_>>(), "part by part, shard by shard");
    let mut b: Vec<taesd_data::ShardRow> =
        files.iter().flat_map(|f| taesd_data::ShardReader::open(f).unwrap().read_all().unwrap()).collect();
    b.sort_by_key(key);
    assert_eq!(a.len(), 9);
    assert_eq!(a.len(), b.len(), "no row twice, none missing");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((key(x), &x.image, &x.latent), (key(y), &y.image, &y.latent));
    }
    let errors_of =
        |f: &Path| -> Vec<String> { std::fs::read_to_string(f).unwrap().lines().map(String::from).collect() };
    let mut part_errors: Vec<String> =
        (0..3).flat_map(|k| errors_of(&parts.join(taesd_schemas::Part { index: k, count: 3 }.errors_file()))).collect();
    part_errors.sort();
    assert_eq!(part_errors, errors_of(&whole.join("errors.jsonl")));
    assert_eq!(part_errors.len(), 1);
    assert_dataset_one_liners_count(dir.path(), 9);
    let ins = stdout(&run("precompute", &["inspect", parts.join("data").to_str().unwrap()], true));
    assert!(ins.contains("rows          9") && ins.contains("errors        1"), "{ins}");

    // A part resumes on its own: the part with the most shards loses its last one (as if killed
    // before it), and leaves a temp file, as does another part's run in progress.
    let k = (0..3).max_by_key(|k| part_files(*k).len()).unwrap();
    let other = (k + 1) % 3;
    let files = part_files(k);
    assert!(files.len() >= 2, "{files:?}");
    let last = files.last().unwrap().clone();
    let bytes = std::fs::read(&last).unwrap();
    std::fs::remove_file(&last).unwrap();
    let mpath = parts.join(taesd_schemas::Part { index: k, count: 3 }.manifest_file());
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    m["status"] = "in_progress".into();
    m["shards"].as_array_mut().unwrap().pop();
    std::fs::write(&mpath, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let own_tmp = parts.join(format!("{}.tmp-99999", last.file_name().unwrap().to_str().unwrap()));
    let other_tmp = parts.join(format!("{}.tmp-99999", taesd_schemas::Part { index: other, count: 3 }.shard_file(9)));
    std::fs::write(&own_tmp, "x").unwrap();
    std::fs::write(&other_tmp, "x").unwrap();
    let ins = stdout(&run("precompute", &["inspect", p], true));
    let want = format!("part {k}/3 in progress (");
    assert!(ins.contains(&want) && ins.contains(" inputs)"), "{ins}");
    let e = stderr(&run("train", &train_args, false));
    assert!(e.contains(&want), "{e}");
    let part_arg = format!("{k}/3");
    let res = go(with("parts", &["--part", &part_arg]), true);
    assert!(stdout(&res).contains("already done"), "{}", stdout(&res));
    assert_eq!(std::fs::read(&last).unwrap(), bytes, "the resumed part wrote the same shard");
    assert!(!own_tmp.exists() && other_tmp.exists(), "a part removes its own temp files only");
    std::fs::remove_file(&other_tmp).unwrap();
    let ins = stdout(&run("precompute", &["inspect", p], true));
    assert!(ins.contains("all complete") && ins.contains("rows          9"), "{ins}");
}
