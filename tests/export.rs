//! End to end: what other tools read, for every variant, against candle's own outputs.
//!
//! * `train export --format pth`: read back by our reader (bit-exact), and checked by Python's
//!   zipfile + pickletools + a restricted unpickler with torch's `weights_only` rules
//!   (tests/py/check_pth.py); the released TAEF2 weights come out as they went in.
//! * `train export --format onnx` (float32 and float16): run by ONNX Runtime through our own `ort`
//!   session and through Python's onnxruntime (tests/py/check_onnx.py, which also runs
//!   onnx.checker), on real images (../shared) at two sizes and batch sizes; float32 equals
//!   candle within 1e-4.
//!
//! Weights: the released taef2 encoder+decoder and taesana encoder from ../shared; random
//! weights (seeded) for the parts that have no released file here (taesd, taesdxl, taesd3, taef1,
//! taesana's decoder).

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use taesd::{Taesd, Variant};
use taesd_e2e::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Two inputs of other sizes and batch sizes, cut from the parity images: `[2, 3, 64, 96]` and
/// `[1, 3, 96, 64]` (taef2: its non-square parity image, `[1, 3, 192, 128]`).
fn inputs(v: Variant) -> Vec<Tensor> {
    let p = parity();
    let a = &p["image_a"];
    let crop = |y: usize, x: usize, h: usize, w: usize| a.narrow(2, y, h).unwrap().narrow(3, x, w).unwrap();
    let first = Tensor::cat(&[crop(0, 0, 64, 96), crop(100, 80, 64, 96)], 0).unwrap();
    let second = if v == Variant::Taef2 { p["image_b"].clone() } else { crop(64, 128, 96, 64) };
    vec![first, second]
}

fn ort_env() -> &'static ort::environment::Environment {
    static ENV: std::sync::OnceLock<ort::environment::Environment> = std::sync::OnceLock::new();
    ENV.get_or_init(|| precompute::ortlib::init(&precompute::ortlib::find(None).unwrap()).unwrap())
}

/// Run an ONNX file with our own `ort` session on `x` (f32 or f16 input by the model's type).
fn run_ort(model: &Path, x: &Tensor, half: bool) -> Vec<f32> {
    let mut session = ort::session::Session::builder(ort_env()).unwrap().commit_from_file(model).unwrap();
    let input = session.inputs()[0].name().to_string();
    let output = session.outputs()[0].name().to_string();
    let shape: Vec<usize> = x.dims().to_vec();
    let data = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let out = if half {
        let v: Vec<half::f16> = data.iter().map(|x| half::f16::from_f32(*x)).collect();
        let t = ort::value::Tensor::from_array((shape, v)).unwrap();
        let r = session.run(ort::inputs![input.as_str() => t]).unwrap();
        r[output.as_str()].try_extract_tensor::<half::f16>().unwrap().1.iter().map(|x| x.to_f32()).collect()
    } else {
        let t = ort::value::Tensor::from_array((shape, data)).unwrap();
        let r = session.run(ort::inputs![input.as_str() => t]).unwrap();
        r[output.as_str()].try_extract_tensor::<f32>().unwrap().1.to_vec()
    };
    out
}

fn max_abs(a: &[f32], b: &Tensor) -> (f32, f32) {
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let m = b.iter().map(|x| x.abs()).fold(0f32, f32::max);
    (d, m)
}

#[test]
fn onnx_exports_equal_candle_for_every_variant_in_ort_and_onnxruntime() {
    let tmp = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    for v in Variant::ALL {
        let model = model_folder(v, tmp.path());
        let out = tmp.path().join(format!("{v}-onnx"));
        for dtype in ["f32", "f16"] {
            let o = run(
                "train",
                &["export", "--model", s(&model), "--format", "onnx", "--out", s(&out), "--dtype", dtype],
                true,
            );
            assert!(stdout(&o).contains("wrote"), "{}", stdout(&o));
        }
        let taesd = Taesd::load(&model, Some(v), DType::F32, &Device::Cpu).unwrap();
        let (enc, dec) = (taesd.encoder.as_ref().unwrap(), taesd.decoder.as_ref().unwrap());
        for (part, file_stem) in [("encoder", format!("{v}_encoder")), ("decoder", format!("{v}_decoder"))] {
            let mut pairs = Vec::new();
            let mut cases = Vec::new();
            for (i, x) in inputs(v).iter().enumerate() {
                let (input, want) = if part == "encoder" {
                    (x.clone(), enc.forward(x).unwrap())
                } else {
                    let z = enc.forward(x).unwrap();
                    let y = dec.forward(&z).unwrap();
                    (z, y)
                };
                let (xi, wi) = (
                    tmp.path().join(format!("{v}-{part}-{i}-in.npy")),
                    tmp.path().join(format!("{v}-{part}-{i}-want.npy")),
                );
                write_npy(&xi, &input);
                write_npy(&wi, &want);
                pairs.push(xi);
                pairs.push(wi);
                cases.push((input, want));
            }
            let pair_args: Vec<&str> = pairs.iter().map(|p| s(p)).collect();
            for (precision, suffix) in [("float32", ".onnx"), ("float16", ".fp16.onnx")] {
                let file = out.join(format!("{file_stem}{suffix}"));
                assert!(file.is_file(), "{}", file.display());
                // Python: onnx.checker (full) + onnxruntime.
                let mut args = vec![s(&file)];
                args.extend(&pair_args);
                let j = py("check_onnx.py", &args);
                assert_eq!(j["metadata"]["taesd.precision"], precision);
                assert_eq!(j["metadata"]["taesd.variant"], v.name());
                assert_eq!(j["metadata"]["taesd.part"], part);
                assert!(j["opset"].as_i64().unwrap() >= 17);
                for (r, (input, want)) in j["runs"].as_array().unwrap().iter().zip(&cases) {
                    let (d, m) = (r["max_abs"].as_f64().unwrap(), r["max_ref"].as_f64().unwrap());
                    // Ours through the `ort` crate.
                    let (d_ort, _) = max_abs(&run_ort(&file, input, precision == "float16"), want);
                    let tol = if precision == "float32" { 1e-4 } else { 2e-2 * m.max(1.0) };
                    assert!(
                        d <= tol && (d_ort as f64) <= tol,
                        "{v} {part} {precision} {:?}: onnxruntime {d:.3e}, ort {d_ort:.3e} (max |y| {m:.3})",
                        input.dims()
                    );
                    report.push(format!("{v} {part} {precision} {:?}: max |onnx - candle| {d:.2e} (ort crate {d_ort:.2e}), max |y| {m:.2}", input.dims()));
                }
            }
        }
    }
    println!("{}", report.join("\n"));
}

#[test]
fn pth_exports_read_back_and_pass_the_weights_only_rules_for_every_variant() {
    let tmp = tempfile::tempdir().unwrap();
    for v in Variant::ALL {
        let model = model_folder(v, tmp.path());
        let out = tmp.path().join(format!("{v}-pth"));
        run("train", &["export", "--model", s(&model), "--format", "pth", "--out", s(&out)], true);
        let files = [out.join(format!("{v}_encoder.pth")), out.join(format!("{v}_decoder.pth"))];
        // Our reader: the same tensors, bit for bit, and the variant from the file names.
        let back = taesd::load_checkpoints(&files, None).unwrap();
        let orig = taesd::load_checkpoint(&model, Some(v)).unwrap();
        assert_eq!(back.info.variant, Some(v), "{v}: variant from the file name");
        assert_eq!(back.tensors.len(), orig.tensors.len());
        for (n, t) in &orig.tensors {
            let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = back.tensors[n].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(a == b, "{v} {n} differs");
        }
        // Python: zipfile + pickletools + torch's weights_only rules; the sums agree with ours.
        let j = py("check_pth.py", &[s(&files[0]), s(&files[1])]);
        for (f, part) in files.iter().zip(["encoder", "decoder"]) {
            let entries = j[s(f)].as_object().unwrap();
            let want: Vec<(String, Vec<usize>)> = taesd::param_shapes(
                &v.config(),
                if part == "encoder" { taesd::Part::Encoder } else { taesd::Part::Decoder },
            );
            let names: Vec<&String> = entries.keys().collect();
            assert_eq!(names.len(), want.len(), "{v} {part}");
            for (name, shape) in &want {
                let e = &entries[name];
                assert_eq!(
                    e["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect::<Vec<_>>(),
                    *shape
                );
                assert_eq!(e["dtype"], "FloatStorage");
                let sum: f64 = orig.tensors[&format!("{part}.{name}")]
                    .to_dtype(DType::F64)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                let got = e["sum"].as_f64().unwrap();
                assert!((got - sum).abs() <= 1e-6 * sum.abs().max(1.0), "{v} {part} {name}: {got} vs {sum}");
            }
        }
    }

    // The released TAEF2 files, through our reader and writer (as stored: fp16), come out with the
    // same tensors as torch.save wrote them.
    let out = tmp.path().join("taef2-released");
    let released = shared().join("reference/taef2");
    run("train", &["export", "--model", s(&released), "--format", "pth", "--out", s(&out)], true);
    for part in ["encoder", "decoder"] {
        let ours = out.join(format!("taef2_{part}.pth"));
        let theirs = released.join(format!("taef2_{part}.pth"));
        let j = py("check_pth.py", &[s(&ours), s(&theirs)]);
        assert_eq!(j[s(&ours)], j[s(&theirs)], "taef2 {part}: names, dtypes, shapes, sums");
    }
}
