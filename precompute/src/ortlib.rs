//! Finding and loading the ONNX Runtime shared library.
//!
//! `ort` is built with `load-dynamic`: nothing is downloaded at build time, and the library is
//! looked up at run time, in this order:
//! 1. `--ort-lib PATH` (a file, or a folder holding `libonnxruntime.so*`),
//! 2. the `ORT_DYLIB_PATH` environment variable (same forms),
//! 3. a pip install of `onnxruntime` or `onnxruntime-gpu` (found by asking `python3`).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the library was found, for logs and the manifest.
#[derive(Debug, Clone)]
pub struct OrtLibrary {
    pub path: PathBuf,
    pub found_by: &'static str,
}

const FIX: &str = "install it with `pip install onnxruntime==1.31.1` (CPU) or `pip install onnxruntime-gpu` \
(CUDA), or point ORT_DYLIB_PATH / --ort-lib at libonnxruntime.so";

/// Locate the ONNX Runtime library (see the module docs for the order).
pub fn find(flag: Option<&Path>) -> Result<OrtLibrary> {
    if let Some(p) = flag {
        let path = resolve(p).with_context(|| format!("--ort-lib {}", p.display()))?;
        return Ok(OrtLibrary { path, found_by: "--ort-lib" });
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        let path = resolve(&p).with_context(|| format!("ORT_DYLIB_PATH={}", p.display()))?;
        return Ok(OrtLibrary { path, found_by: "ORT_DYLIB_PATH" });
    }
    for dir in pip_package_dirs() {
        if let Ok(path) = resolve(&dir.join("capi")) {
            return Ok(OrtLibrary { path, found_by: "pip onnxruntime" });
        }
    }
    bail!("ONNX Runtime library not found: no --ort-lib, no ORT_DYLIB_PATH, and no pip onnxruntime package; {FIX}")
}

/// A file as is; a folder: the `libonnxruntime.so*` (or .dylib / .dll) in it.
fn resolve(p: &Path) -> Result<PathBuf> {
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    if p.is_dir() {
        let mut found: Vec<PathBuf> = std::fs::read_dir(p)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| {
                let n = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
                n.starts_with("libonnxruntime.so") || n == "libonnxruntime.dylib" || n == "onnxruntime.dll"
            })
            .collect();
        // Prefer the versioned file name (libonnxruntime.so.1.31.1) the pip wheels ship.
        found.sort_by_key(|f| std::cmp::Reverse(f.as_os_str().len()));
        if let Some(f) = found.into_iter().next() {
            return Ok(f);
        }
        bail!("no libonnxruntime library in folder {}; {FIX}", p.display());
    }
    bail!("{} does not exist; {FIX}", p.display())
}

/// Package folders of `onnxruntime` as the local Python interpreters see them.
fn pip_package_dirs() -> Vec<PathBuf> {
    let script = "import importlib.util as u\nfor m in ('onnxruntime',):\n s=u.find_spec(m)\n if s and s.submodule_search_locations:\n  print(list(s.submodule_search_locations)[0])";
    let mut dirs = Vec::new();
    for py in ["python3", "python"] {
        if let Ok(out) = Command::new(py).args(["-c", script]).output() {
            if out.status.success() {
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    let d = PathBuf::from(line.trim());
                    if !line.trim().is_empty() && !dirs.contains(&d) {
                        dirs.push(d);
                    }
                }
            }
        }
    }
    dirs
}

/// Load the library and create the process-wide ORT environment (once).
pub fn init(lib: &OrtLibrary) -> Result<ort::environment::Environment> {
    let builder = ort::init_from(&lib.path).map_err(|e| {
        anyhow::anyhow!(
            "could not load ONNX Runtime from {} (found by {}): {e}; {FIX}",
            lib.path.display(),
            lib.found_by
        )
    })?;
    let env = builder
        .with_name("taesd-precompute")
        .build()
        .map_err(|e| anyhow::anyhow!("could not create the ONNX Runtime environment: {e}"))?;
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_path_is_a_clear_error_with_the_fix() {
        let e = find(Some(Path::new("/nonexistent/libonnxruntime.so"))).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("/nonexistent/libonnxruntime.so") && msg.contains("pip install onnxruntime"), "{msg}");
    }

    #[test]
    fn a_folder_resolves_to_the_library_inside() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("libonnxruntime_providers_shared.so"), b"").unwrap();
        std::fs::write(d.path().join("libonnxruntime.so.1.31.1"), b"").unwrap();
        let l = find(Some(d.path())).unwrap();
        assert!(l.path.ends_with("libonnxruntime.so.1.31.1"), "{:?}", l.path);
        let empty = tempfile::tempdir().unwrap();
        assert!(find(Some(empty.path())).is_err());
    }
}
