//! Failure detection: a thread per control link notices at once when a peer dies (its links
//! close without a goodbye: killed, crashed) or reports a failure (an [`Kind::Abort`] with the
//! cause), and trips the process's [`AbortState`], whose hooks unblock whatever waits on the
//! peers (the TCP collectives' sockets are shut down; NCCL's communicator is aborted). Rank 0
//! relays a failure to every other rank, so all stop within moments, each naming the rank and
//! the cause.

use super::wire::{self, Kind};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};

type Hook = Box<dyn Fn() + Send>;

/// The first failure of the job as this process knows it; hooks run once when it trips.
#[derive(Default)]
pub struct AbortState {
    reason: Mutex<Option<String>>,
    hooks: Mutex<Vec<Hook>>,
    /// This process is ending cleanly: links closing now are no failure.
    closing: std::sync::atomic::AtomicBool,
}

impl AbortState {
    pub fn reason(&self) -> Option<String> {
        self.reason.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Record `reason` (the first one wins) and run the hooks; whether this call tripped it.
    pub fn trip(&self, reason: String) -> bool {
        {
            let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            if r.is_some() {
                return false;
            }
            *r = Some(reason);
        }
        for h in self.hooks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            h();
        }
        true
    }

    /// Run `f` when the state trips (at once if it has).
    pub fn on_abort(&self, f: impl Fn() + Send + 'static) {
        if self.reason().is_some() {
            f();
        }
        self.hooks.lock().unwrap_or_else(|e| e.into_inner()).push(Box::new(f));
    }

    fn closing(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The control side of this rank's links: watches them, and says goodbye or reports a failure.
#[derive(Clone)]
pub struct Watchdog {
    rank: usize,
    pub state: Arc<AbortState>,
    /// Write halves of the control links (rank, stream).
    out: Arc<Mutex<Vec<(usize, TcpStream)>>>,
}

impl Watchdog {
    /// Watch `links` (rank, control stream): on rank 0 one per other rank, elsewhere rank 0's.
    pub fn start(rank: usize, links: Vec<(usize, TcpStream)>) -> std::io::Result<Watchdog> {
        let state = Arc::new(AbortState::default());
        let mut out = Vec::new();
        for (peer, s) in links {
            out.push((peer, s.try_clone()?));
            let st = state.clone();
            std::thread::Builder::new().name(format!("watchdog-{peer}")).spawn(move || watch(rank, peer, s, &st))?;
        }
        let out = Arc::new(Mutex::new(out));
        if rank == 0 {
            // Rank 0 relays the job's first failure to every other rank.
            let (o, st) = (out.clone(), Arc::downgrade(&state));
            state.on_abort(move || {
                let reason = st.upgrade().and_then(|s| s.reason()).unwrap_or_default();
                for (_, s) in o.lock().unwrap_or_else(|e| e.into_inner()).iter_mut() {
                    let _ = wire::send(s, Kind::Abort, reason.as_bytes());
                }
            });
        }
        Ok(Watchdog { rank, state, out })
    }

    /// This rank failed: tell the others why (rank 0 relays it), and trip locally.
    pub fn abort(&self, cause: &str) {
        let reason = format!("rank {} failed: {cause}", self.rank);
        if self.rank != 0 {
            for (_, s) in self.out.lock().unwrap_or_else(|e| e.into_inner()).iter_mut() {
                let _ = wire::send(s, Kind::Abort, reason.as_bytes());
            }
        }
        self.state.trip(reason);
    }

    /// Close the control links (after [`Watchdog::close`], or as a vanishing rank).
    pub fn shutdown(&self) {
        self.state.closing.store(true, std::sync::atomic::Ordering::SeqCst);
        for (_, s) in self.out.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// This rank ends cleanly: a goodbye on every control link.
    pub fn close(&self) {
        self.state.closing.store(true, std::sync::atomic::Ordering::SeqCst);
        if self.state.reason().is_some() {
            return;
        }
        for (_, s) in self.out.lock().unwrap_or_else(|e| e.into_inner()).iter_mut() {
            let _ = wire::send(s, Kind::Bye, &[]);
        }
    }
}

/// Read one control link until the peer says goodbye, fails or vanishes.
fn watch(me: usize, peer: usize, mut s: TcpStream, state: &AbortState) {
    let vanished = |how: String| {
        if peer == 0 {
            format!("rank 0 died ({how}): killed, crashed or out of memory?")
        } else {
            format!("rank {peer} died ({how}): killed, crashed or out of memory?")
        }
    };
    let reason = match wire::recv(&mut s) {
        Ok((Kind::Bye, _)) => return,
        Ok((Kind::Abort, why)) => String::from_utf8_lossy(&why).into_owned(),
        Ok((k, _)) => format!("rank {peer} sent {k:?} on its control link (a protocol error)"),
        Err(_) if state.closing() => return,
        Err(e) => vanished(match e.downcast_ref::<std::io::Error>() {
            Some(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => "its connection closed".to_string(),
            _ => format!("its connection failed: {e}"),
        }),
    };
    if state.trip(reason.clone()) {
        tracing::debug!("rank {me}: {reason}");
    }
}
