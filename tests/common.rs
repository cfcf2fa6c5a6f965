//! Helpers for the end-to-end tests: where ../shared is, and the workspace binaries (built on
//! first use with the same cargo and profile as the tests); models of every variant (released
//! weights where ../shared has them, seeded random ones elsewhere), real input images, `.npy`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use taesd::{Layout, SaveOptions, Taesd, Variant};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// `../shared` beside the repository (CI has it there too). Override with TAESD_SHARED.
pub fn shared() -> PathBuf {
    let p = std::env::var_os("TAESD_SHARED").map(PathBuf::from).unwrap_or_else(|| repo().join("../shared"));
    assert!(p.join("data/pool").is_dir(), "../shared not found at {} (set TAESD_SHARED)", p.display());
    p
}

pub fn pool() -> PathBuf {
    shared().join("data/pool")
}

pub fn taef2_onnx() -> PathBuf {
    shared().join("reference/taef2/taef2_encoder.onnx")
}

/// The first `n` pool images (sorted), copied into a fresh folder.
pub fn pool_subset(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut files: Vec<_> = std::fs::read_dir(pool())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    files.sort();
    // Spread over the kinds of images (photos, clipart, ...) rather than the first n of one kind.
    let step = (files.len() / n).max(1);
    for f in files.iter().step_by(step).take(n) {
        std::fs::copy(f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    dir
}

/// Path of workspace binary `name` (package of the same name). The first call in a test process
/// builds every binary of the workspace with the cargo and profile that run the tests: with
/// `--workspace`, as `cargo test --workspace` does, so the dependencies resolve to the same features
/// and nothing is recompiled (`-p precompute` alone resolved serde, half, regex, ... with fewer
/// features and rebuilt most of the dependency tree in the middle of the tests).
pub fn bin(name: &str) -> PathBuf {
    static BUILT: Mutex<bool> = Mutex::new(false);
    // target/<profile>/deps/<test exe> -> target/<profile>
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !*built {
        let profile = profile_dir.file_name().unwrap().to_str().unwrap().to_string();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(repo()).args(["build", "-q", "--workspace", "--bins"]);
        if profile == "release" {
            cmd.arg("--release");
        } else if profile != "debug" {
            cmd.args(["--profile", &profile]);
        }
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "building the workspace's binaries failed");
        *built = true;
    }
    let path = profile_dir.join(name);
    assert!(path.is_file(), "no binary {} after building the workspace's binaries", path.display());
    path
}

/// Run a binary, returning its output; panics with stdout+stderr when `expect_ok` disagrees.
pub fn run(name: &str, args: &[&str], expect_ok: bool) -> Output {
    let out = Command::new(bin(name)).args(args).output().expect("spawn");
    if out.status.success() != expect_ok {
        panic!(
            "{name} {args:?}: exit {:?} (expected {})\n--- stdout\n{}\n--- stderr\n{}",
            out.status.code(),
            if expect_ok { "success" } else { "failure" },
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Run `tests/py/SCRIPT ARGS` with python3; its last stdout line, as JSON (panics with its
/// output when it fails).
pub fn py(script: &str, args: &[&str]) -> serde_json::Value {
    let o = Command::new("python3").arg(repo().join("tests/py").join(script)).args(args).output().expect("python3");
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{script} {args:?} failed:\n{text}\n{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The shard files of an output folder (`OUT/data/`, or beside the manifest in the old layout),
/// sorted.
pub fn shard_files(dir: &Path) -> Vec<PathBuf> {
    taesd_data::OutputLayout::locate(dir).shard_files().unwrap()
}

/// All rows of all shards of an output folder, in shard order.
pub fn read_rows(dir: &Path) -> Vec<taesd_data::ShardRow> {
    shard_files(dir).iter().flat_map(|f| taesd_data::ShardReader::open(f).unwrap().read_all().unwrap()).collect()
}

/// The lines of `errors.jsonl`.
pub fn error_lines(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("errors.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `manifest.json`.
pub fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// A [N, C, H, W] f32 tensor as a .npy file.
pub fn write_npy(path: &Path, t: &Tensor) {
    let dims = t.dims();
    let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let shape = dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ");
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({shape},), }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(v.iter().flat_map(|x| x.to_le_bytes()));
    std::fs::write(path, out).unwrap();
}

/// The parity images of ../shared: image_a 256x256, image_b 192x128 (real photos, [0, 1]).
pub fn parity() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(shared().join("reference/taef2/taef2_parity.safetensors"), &Device::Cpu).unwrap()
}

/// Random weights (candle's initialisation, then every tensor redrawn from a seeded stream).
pub fn random_tensors(v: Variant, seed: u64) -> HashMap<String, Tensor> {
    let vm = VarMap::new();
    let cfg = v.config();
    Taesd::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let mut names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        // xorshift64*: uniform in [-1, 1)
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        ((state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let data = vm.data().lock().unwrap();
    let mut out = HashMap::new();
    for n in names {
        let var = &data[&n];
        let dims = var.dims().to_vec();
        // Kaiming-uniform-like scale for conv weights (fan in), small for biases, ~1 for norms.
        let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
        let scale = if n.ends_with("weight") && dims.len() == 4 {
            (3.0 / fan_in as f32).sqrt()
        } else if n.contains(".pool.1.weight") {
            1.0
        } else {
            0.05
        };
        let numel: usize = dims.iter().product();
        let vals: Vec<f32> =
            (0..numel).map(|_| next() * scale + if n.contains(".pool.1.weight") { 1.0 } else { 0.0 }).collect();
        out.insert(n, Tensor::from_vec(vals, dims, &Device::Cpu).unwrap());
    }
    out
}

/// A checkpoint folder (taesd layout, safetensors) of variant `v` for the tests: released
/// weights where ../shared has them.
pub fn model_folder(v: Variant, root: &Path) -> PathBuf {
    let dir = root.join(format!("{v}-model"));
    let mut tensors = random_tensors(v, v as u64 + 1);
    let released: Vec<PathBuf> = match v {
        Variant::Taef2 => {
            vec![shared().join("reference/taef2/taef2_encoder.pth"), shared().join("reference/taef2/taef2_decoder.pth")]
        }
        Variant::Taesana => vec![shared().join("reference/taesana/taesana_encoder.pth")],
        _ => vec![],
    };
    if !released.is_empty() {
        let ck = taesd::load_checkpoints(&released, Some(v)).unwrap();
        for (n, t) in ck.tensors {
            tensors.insert(n, t.to_dtype(DType::F32).unwrap());
        }
    }
    std::fs::create_dir_all(&dir).unwrap();
    let opts = SaveOptions { variant: Some(v), ..Default::default() };
    taesd::save_tensors(&tensors, &v.config(), Layout::TaesdPy, &dir, &opts).unwrap();
    dir
}

/// 48 pool images at 64 px in shards of 16 rows (three shards) that `precompute` made with the
/// taef2 ONNX teacher on the CPU: the `train` tests' data, made once per test process.
pub fn train_shards() -> &'static Path {
    static SHARDS: std::sync::OnceLock<(tempfile::TempDir, tempfile::TempDir)> = std::sync::OnceLock::new();
    let (_, out) = SHARDS.get_or_init(|| {
        let images = pool_subset(48);
        let out = tempfile::tempdir().unwrap();
        let x = taef2_onnx();
        run(
            "precompute",
            &[
                "--vae",
                "taef2",
                "--onnx",
                x.to_str().unwrap(),
                "--images",
                images.path().to_str().unwrap(),
                "--out",
                out.path().to_str().unwrap(),
                "--device",
                "cpu",
                "--resolution",
                "64",
                "--batch-size",
                "8",
                "--shard-rows",
                "16",
                "--quiet",
            ],
            true,
        );
        (images, out)
    });
    out.path()
}
