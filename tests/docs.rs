//! The scripts and documents say what they do: `demo.sh` announces each long step (the first
//! build above all, which takes many minutes) and its time estimate matches the README's.

use std::process::Command;
use taesd_e2e::repo;

#[test]
fn demo_script_says_what_it_is_doing() {
    let path = repo().join("demo.sh");
    let text = std::fs::read_to_string(&path).unwrap();
    let st = Command::new("bash").arg("-n").arg(&path).status().expect("bash");
    assert!(st.success(), "demo.sh does not parse");
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    // Every long-running command comes after an `echo "== ..."` that says what it is.
    let mut said = false;
    for l in &lines {
        if l.starts_with("echo \"==") {
            said = true;
        }
        let long = l.starts_with("cargo build") || l.starts_with("\"$BIN/") || l.contains("pip install");
        if long {
            assert!(said, "demo.sh runs `{l}` without saying what it is doing first");
            assert!(!l.contains("--quiet") || l.contains("pip"), "`{l}` hides its progress");
        }
    }
    // The build's time is announced, with the number the header and the README give.
    let minutes = |s: &str, key: &str| -> Option<String> {
        let i = s.find(key)?;
        Some(s[i + key.len()..].split_whitespace().next()?.trim_start_matches('~').to_string())
    };
    let header = minutes(&text, "of the two binaries (candle, arrow/parquet, ONNX Runtime's\n# bindings; debug profile with optimised dependencies) takes").expect("the header gives the build time");
    let echoed = minutes(&text, "the first build takes").expect("the build step announces its time");
    assert_eq!(header, echoed, "demo.sh's header and its build message disagree");
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let readme_minutes = minutes(&readme, "(the first build takes").expect("README gives the build time");
    assert_eq!(readme_minutes, header, "README and demo.sh disagree on the build time");
    assert!(header.chars().next().is_some_and(|c| c.is_ascii_digit()), "a number of minutes, not `{header}`");
}
