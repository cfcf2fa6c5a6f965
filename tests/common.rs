//! Helpers for the end-to-end tests: where ../shared is, and the workspace binaries (built on
//! first use with the same cargo and profile as the tests).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

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

/// Path of workspace binary `name` (package of the same name), built once per test process with
/// the cargo and profile that run the tests.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    // target/<profile>/deps/<test exe> -> target/<profile>
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|b| b == name) {
        let profile = profile_dir.file_name().unwrap().to_str().unwrap().to_string();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(repo()).args(["build", "-q", "-p", name, "--bin", name]);
        if profile == "release" {
            cmd.arg("--release");
        } else if profile != "debug" {
            cmd.args(["--profile", &profile]);
        }
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "building the {name} binary failed");
        built.push(name.to_string());
    }
    profile_dir.join(name)
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

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// All rows of all shards of an output folder, in shard order.
pub fn read_rows(dir: &Path) -> Vec<taesd_data::ShardRow> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| taesd_data::ShardReader::open(f).unwrap().read_all().unwrap())
        .collect()
}
