//! `train --gpus N ...`: start the N ranks of this node as child processes of this binary with
//! the same arguments (less `--gpus`), each with `RANK = LOCAL_RANK = r`, `WORLD_SIZE = N`,
//! `MASTER_ADDR = 127.0.0.1` and a free `MASTER_PORT` (bound here and handed to rank 0 open,
//! `TAESD_RENDEZVOUS_FD`); rank r then uses `cuda:r` (or, with
//! `--device cpu`, the CPU: N CPU processes, what the tests run).
//!
//! Their output comes through this process, each line prefixed `[rank r]` (only rank 0 prints
//! progress). When a rank fails (an error, a signal, a crash) the others stop on their own
//! within moments (see [`super::watchdog`]); whatever still runs after a grace period is killed,
//! and the exit status names the rank and how it ended. Ctrl-C / SIGTERM here is forwarded to
//! every rank (they agree on a step boundary, rank 0 checkpoints, all stop). A rank whose
//! launcher dies gets SIGTERM (checkpoint and stop) rather than running on alone.

use super::world::RENDEZVOUS_FD;
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::io::{BufRead, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the other ranks get to stop on their own after one failed, before they are killed.
pub const GRACE: Duration = Duration::from_secs(30);

/// `args` without `--gpus N` / `--gpus=N`.
pub fn strip_gpus(args: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        match a.to_str() {
            Some("--gpus") => skip = true,
            Some(s) if s.starts_with("--gpus=") => {}
            _ => out.push(a.clone()),
        }
    }
    out
}

/// How a rank ended, in words.
pub fn describe_exit(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(sig)) => {
            let name = match sig {
                libc::SIGKILL => " (SIGKILL: killed, e.g. by the out-of-memory killer)",
                libc::SIGSEGV => " (SIGSEGV: crashed)",
                libc::SIGABRT => " (SIGABRT: aborted)",
                libc::SIGTERM => " (SIGTERM)",
                libc::SIGINT => " (SIGINT)",
                libc::SIGBUS => " (SIGBUS: crashed)",
                _ => "",
            };
            format!("was killed by signal {sig}{name}")
        }
        _ => "ended".into(),
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on the pid of a child this process started and has not reaped yet (the
    // pid cannot have been reused).
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// Copy a child's stream line by line with a prefix.
fn relay(src: impl std::io::Read + Send + 'static, prefix: String, to_stderr: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let r = std::io::BufReader::new(src);
        for line in r.split(b'\n') {
            let Ok(line) = line else { return };
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches('\r');
            if to_stderr {
                let _ = writeln!(std::io::stderr().lock(), "{prefix}{text}");
            } else {
                let _ = writeln!(std::io::stdout().lock(), "{prefix}{text}");
            }
        }
    })
}

/// Run `exe args` as `n` local ranks; returns the exit code for this process: 0 when all
/// finished, 130 when interrupted, else 1 (after saying which rank failed and how).
pub fn launch(exe: &Path, args: &[OsString], n: usize, stop: Arc<AtomicBool>) -> Result<i32> {
    if n == 0 {
        bail!("--gpus 0: at least one");
    }
    // The rendezvous socket, bound here and handed open to rank 0 (which listens on it): the port
    // stays ours from now on, so no other process can take it before rank 0 starts.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the rendezvous port")?;
    let port = listener.local_addr()?.port();
    let fd = listener.as_raw_fd();
    let mut children: Vec<Option<Child>> = Vec::with_capacity(n);
    let mut relays = Vec::new();
    for r in 0..n {
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .env("RANK", r.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if r == 0 {
            cmd.env(RENDEZVOUS_FD, fd.to_string());
        }
        // SAFETY: the closure runs in the child between fork and exec and calls only prctl(2) and
        // fcntl(2), which are async-signal-safe; `fd` stays open in this process until every rank
        // is started.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
                // Rank 0 keeps the rendezvous socket across exec (Rust opens it close-on-exec).
                if r == 0 && libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("starting rank {r} ({})", exe.display()))?;
        let prefix = format!("[rank {r}] ");
        relays.push(relay(child.stdout.take().expect("piped"), prefix.clone(), false));
        relays.push(relay(child.stderr.take().expect("piped"), prefix, true));
        children.push(Some(child));
    }
    drop(listener); // rank 0 has its own copy
    eprintln!("started {n} ranks (rank 0 at 127.0.0.1:{port})");
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; n];
    let mut first_failure: Option<(usize, String, Instant)> = None;
    let mut forwarded = false;
    loop {
        if stop.load(Ordering::SeqCst) && !forwarded {
            forwarded = true;
            for c in children.iter().flatten() {
                signal(c, libc::SIGINT);
            }
        }
        for r in 0..n {
            let Some(c) = children[r].as_mut() else { continue };
            if let Some(st) = c.try_wait().context("waiting for a rank")? {
                statuses[r] = Some(st);
                children[r] = None;
                let interrupted = st.code() == Some(130);
                if !st.success() && !interrupted && first_failure.is_none() {
                    let how = describe_exit(st);
                    eprintln!("rank {r} {how}; stopping the other ranks");
                    first_failure = Some((r, how, Instant::now()));
                }
            }
        }
        if children.iter().all(|c| c.is_none()) {
            break;
        }
        if let Some((_, _, t)) = &first_failure {
            if t.elapsed() > GRACE {
                for (r, c) in children.iter().enumerate() {
                    if let Some(c) = c {
                        eprintln!("rank {r} still runs {} s after the failure: killing it", GRACE.as_secs());
                        signal(c, libc::SIGKILL);
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for h in relays {
        let _ = h.join();
    }
    if let Some((r, how, _)) = first_failure {
        eprintln!("error: rank {r} {how} (the first rank to fail; its output above says why)");
        return Ok(1);
    }
    if statuses.iter().flatten().any(|s| s.code() == Some(130)) {
        return Ok(130);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_flag_is_removed_in_both_forms() {
        let a: Vec<OsString> =
            ["--gpus", "2", "--steps", "4", "--gpus=3", "--device", "cpu"].iter().map(OsString::from).collect();
        let want: Vec<OsString> = ["--steps", "4", "--device", "cpu"].iter().map(OsString::from).collect();
        assert_eq!(strip_gpus(&a), want);
    }

    #[test]
    fn exits_in_words() {
        assert_eq!(describe_exit(ExitStatus::from_raw(1 << 8)), "exited with code 1");
        assert!(describe_exit(ExitStatus::from_raw(9)).contains("signal 9 (SIGKILL"));
    }

    #[test]
    fn a_failing_rank_is_named_and_the_others_finish() {
        // `sh -c`: rank 1 fails, the others succeed.
        let args: Vec<OsString> =
            ["-c", "echo hi from $RANK of $WORLD_SIZE; test $RANK != 1"].iter().map(OsString::from).collect();
        let code = launch(Path::new("/bin/sh"), &args, 3, Arc::new(AtomicBool::new(false))).unwrap();
        assert_eq!(code, 1);
        let args: Vec<OsString> = ["-c", "exit 0"].iter().map(OsString::from).collect();
        assert_eq!(launch(Path::new("/bin/sh"), &args, 2, Arc::new(AtomicBool::new(false))).unwrap(), 0);
    }
}
