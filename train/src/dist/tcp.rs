//! [`TcpComm`]: the collectives over plain TCP in a star around rank 0, for where there is no
//! NCCL (the CPU; the tests). Rank 0 receives every rank's buffer, sums in rank order
//! (`((x0 + x1) + x2) + ...`, so the result is deterministic and the same on every rank) and
//! sends the sum back; a broadcast is rank 0 sending. Not fast (rank 0 moves 2(N-1) buffers per
//! all-reduce), and not meant to be: CUDA runs use [`super::nccl`].
//!
//! Also the host collectives and the control plane of the NCCL backend: the same links carry its
//! small host reductions, and their [`Watchdog`] its failure detection.

use super::comm::Comm;
use super::rendezvous::{self, Links, Timeouts};
use super::watchdog::Watchdog;
use super::wire::{self, Kind};
use super::world::World;
use anyhow::{anyhow, bail, Result};
use std::net::{Shutdown, TcpStream};
use std::sync::Mutex;

pub struct TcpComm {
    rank: usize,
    world_size: usize,
    /// Rank 0: (rank, data link) of ranks 1..N; elsewhere (0, the link to rank 0).
    data: Mutex<Vec<(usize, TcpStream)>>,
    watchdog: Watchdog,
}

impl TcpComm {
    /// Meet the other ranks of `w` (see [`rendezvous`]); `blob` (rank 0 only) is handed to
    /// every rank with the returned comm.
    pub fn connect(w: &World, t: Timeouts, blob: impl FnOnce() -> Result<Vec<u8>>) -> Result<(TcpComm, Vec<u8>)> {
        let (links, blob) = rendezvous::rendezvous(w, t, blob)?;
        let links = match links {
            Links::Root(l) => l,
            Links::Member(l) => vec![l],
        };
        let data: Vec<(usize, TcpStream)> =
            links.iter().map(|l| Ok((l.rank, l.data.try_clone()?))).collect::<Result<_>>()?;
        let control = links.iter().map(|l| Ok((l.rank, l.control.try_clone()?))).collect::<Result<Vec<_>>>()?;
        let watchdog = Watchdog::start(w.rank, control)?;
        // A failure anywhere unblocks this rank's pending collective at once.
        let shut: Vec<TcpStream> = data.iter().map(|(_, s)| s.try_clone()).collect::<std::io::Result<_>>()?;
        watchdog.state.on_abort(move || {
            for s in &shut {
                let _ = s.shutdown(Shutdown::Both);
            }
        });
        let comm = TcpComm { rank: w.rank, world_size: w.world_size, data: Mutex::new(data), watchdog };
        Ok((comm, blob))
    }

    /// The error of a failed exchange with `peer`: the job's failure when there is one (it is
    /// why the link broke), else the link's own error.
    fn link_error(&self, peer: usize, what: &str, e: anyhow::Error) -> anyhow::Error {
        // A broken link is mostly the echo of a failure the control link is about to report
        // (with its cause): give it a moment to arrive.
        let t0 = std::time::Instant::now();
        while t0.elapsed() < std::time::Duration::from_secs(1) {
            if let Some(r) = self.watchdog.state.reason() {
                return anyhow!("{r}");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let timed_out = e
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
        let e = if timed_out { anyhow!("no answer within the collective timeout (--dist-timeout)") } else { e };
        let msg = format!("rank {}: {what} with rank {peer}: {e:#}", self.rank);
        self.watchdog.state.trip(msg.clone());
        anyhow!(msg)
    }

    /// Run `f` when the job fails (at once if it has).
    pub fn on_abort(&self, f: impl Fn() + Send + 'static) {
        self.watchdog.state.on_abort(f);
    }

    /// A handle that reports this rank's failure (as [`Comm::abort`]) from another thread.
    pub fn abort_handle(&self) -> impl Fn(&str) + Send + 'static {
        let w = self.watchdog.clone();
        move |cause| w.abort(cause)
    }

    fn check(&self) -> Result<()> {
        match self.watchdog.state.reason() {
            Some(r) => bail!("{r}"),
            None => Ok(()),
        }
    }

    /// Rank 0 collects a message of `kind` from every rank (in rank order), `f` combines each;
    /// then sends `reply(payload)` to all. Elsewhere: send, then receive the reply.
    fn star(&self, kind: Kind, mine: &[u8], mut f: impl FnMut(usize, &[u8]) -> Result<()>) -> Result<Option<Vec<u8>>> {
        self.check()?;
        let mut links = self.data.lock().unwrap_or_else(|e| e.into_inner());
        if self.rank == 0 {
            for (peer, s) in links.iter_mut() {
                let (k, p) = wire::recv(s).map_err(|e| self.link_error(*peer, "a collective", e))?;
                if k == Kind::Abort {
                    bail!("{}", String::from_utf8_lossy(&p));
                }
                if k != kind {
                    return Err(self.link_error(
                        *peer,
                        "a collective",
                        anyhow!("it sent {k:?} where {kind:?} was due (the ranks run different programs?)"),
                    ));
                }
                f(*peer, &p).map_err(|e| self.link_error(*peer, "a collective", e))?;
            }
            Ok(None)
        } else {
            let (peer, s) = &mut links[0];
            wire::send(s, kind, mine).map_err(|e| self.link_error(*peer, "a collective", e.into()))?;
            let (k, p) = wire::recv(s).map_err(|e| self.link_error(*peer, "a collective", e))?;
            if k != Kind::Result {
                return Err(self.link_error(*peer, "a collective", anyhow!("it answered {k:?}")));
            }
            Ok(Some(p))
        }
    }

    /// Rank 0: `payload` to every other rank.
    fn reply_all(&self, payload: &[u8]) -> Result<()> {
        let mut links = self.data.lock().unwrap_or_else(|e| e.into_inner());
        for (peer, s) in links.iter_mut() {
            wire::send(s, Kind::Result, payload).map_err(|e| self.link_error(*peer, "a collective", e.into()))?;
        }
        Ok(())
    }
}

impl Drop for TcpComm {
    /// Links close; without [`Comm::close`] first, the others take it for this rank's death.
    fn drop(&mut self) {
        self.watchdog.shutdown();
        for (_, s) in self.data.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Comm for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn backend(&self) -> &'static str {
        "tcp"
    }

    fn all_reduce_host(&self, buf: &mut [f32]) -> Result<()> {
        let n = buf.len();
        match self.star(Kind::Reduce, &wire::f32_bytes(buf), |_, p| {
            for (a, b) in buf.iter_mut().zip(wire::bytes_f32(p, n)?) {
                *a += b;
            }
            Ok(())
        })? {
            None => self.reply_all(&wire::f32_bytes(buf)),
            Some(sum) => {
                buf.copy_from_slice(&wire::bytes_f32(&sum, n)?);
                Ok(())
            }
        }
    }

    fn broadcast_host(&self, buf: &mut [u8]) -> Result<()> {
        let len = buf.len();
        match self.star(Kind::Broadcast, &[], |_, _| Ok(()))? {
            None => self.reply_all(buf),
            Some(p) if p.len() == len => {
                buf.copy_from_slice(&p);
                Ok(())
            }
            Some(p) => bail!("broadcast of {} bytes from rank 0, {len} expected here (the ranks differ?)", p.len()),
        }
    }

    fn barrier(&self) -> Result<()> {
        if self.star(Kind::Barrier, &[], |_, _| Ok(()))?.is_none() {
            self.reply_all(&[])?;
        }
        Ok(())
    }

    fn abort(&self, cause: &str) {
        self.watchdog.abort(cause);
    }

    fn failure(&self) -> Option<String> {
        self.watchdog.state.reason()
    }

    fn close(&self) {
        self.watchdog.close();
    }
}

#[cfg(test)]
/// In-process ranks for tests (threads talking over loopback TCP), here and in other modules'
/// tests of collective code.
pub(crate) mod testing {
    use super::*;
    use crate::dist::world::Launcher;
    use std::time::Duration;

    /// A port for one test's rendezvous, below Linux's ephemeral range (32768-60999): a port the
    /// OS handed out and we closed again could be taken as another test's connection's local
    /// port before rank 0 listens on it ("Address already in use"). Each call a new one, free
    /// at the time.
    pub fn free_port() -> u16 {
        use std::sync::atomic::{AtomicU16, Ordering};
        static NEXT: AtomicU16 = AtomicU16::new(0);
        let base = 20000 + (std::process::id() % 500) as u16 * 20;
        loop {
            let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % 2000;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }

    pub fn world(rank: usize, n: usize, port: u16) -> World {
        World {
            rank,
            world_size: n,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            launcher: Launcher::Torchrun,
            visible_gpus: None,
            listen_fd: None,
        }
    }

    pub const T: Timeouts = Timeouts { connect: Duration::from_secs(20), op: Duration::from_secs(20) };

    /// `n` ranks as threads, each running `f(comm)`; results in rank order.
    pub fn ranks<R: Send + 'static>(n: usize, f: impl Fn(TcpComm, Vec<u8>) -> R + Send + Sync + 'static) -> Vec<R> {
        let port = free_port();
        let f = std::sync::Arc::new(f);
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let f = f.clone();
                std::thread::spawn(move || {
                    let (c, blob) = TcpComm::connect(&world(r, n, port), T, || Ok(b"unique id".to_vec())).unwrap();
                    f(c, blob)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::dist::comm::{all_reduce_mean, gather_flags};
    use std::time::Duration;

    #[test]
    fn all_reduce_sums_in_rank_order_and_broadcast_barrier_work() {
        let out = ranks(3, |c, blob| {
            assert_eq!(blob, b"unique id");
            let r = c.rank() as f32;
            // Values whose f32 sum depends on the order: rank order is (1e8 + 1) + -1e8 = 0.
            let mut v = [[1e8f32, 1.0, -1e8][c.rank()], r, 0.5];
            c.all_reduce_host(&mut v).unwrap();
            let mut b = if c.rank() == 0 { b"from rank 0".to_vec() } else { vec![0; 11] };
            c.broadcast_host(&mut b).unwrap();
            c.barrier().unwrap();
            let t = candle_core::Tensor::new(&[[r, 2.0 * r]], &candle_core::Device::Cpu).unwrap();
            let m = all_reduce_mean(&c, &t).unwrap();
            let bt = c.broadcast(&t).unwrap();
            let flags = gather_flags(&c, c.rank() == 2).unwrap();
            c.close();
            (v, b, m.to_vec2::<f32>().unwrap(), bt.to_vec2::<f32>().unwrap(), flags)
        });
        for (v, b, m, bt, flags) in &out {
            assert_eq!(*v, [0.0, 3.0, 1.5]);
            assert_eq!(b, b"from rank 0");
            assert_eq!(*m, vec![vec![1.0, 2.0]]);
            assert_eq!(*bt, vec![vec![0.0, 0.0]]);
            assert_eq!(*flags, vec![false, false, true]);
        }
    }

    #[test]
    fn rank_0_listens_on_a_socket_bound_before_it_started() {
        use std::os::fd::IntoRawFd;
        // As `train --gpus N` does: the port is bound (here, by the OS's choice) before rank 0
        // runs and handed to it open; rank 0 must not bind it again.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let fd = l.into_raw_fd();
        let hs: Vec<_> = (0..2)
            .map(|r| {
                std::thread::spawn(move || {
                    let w = World { listen_fd: (r == 0).then_some(fd), ..world(r, 2, port) };
                    let (c, blob) = TcpComm::connect(&w, T, || Ok(b"id".to_vec())).unwrap();
                    let mut v = [r as f32 + 1.0];
                    c.all_reduce_host(&mut v).unwrap();
                    c.close();
                    (blob, v[0])
                })
            })
            .collect();
        for h in hs {
            assert_eq!(h.join().unwrap(), (b"id".to_vec(), 3.0));
        }
        // A descriptor that is not a listening socket is refused with the variable's name.
        let f = tempfile::tempfile().unwrap();
        use std::os::fd::AsRawFd;
        let w = World { listen_fd: Some(f.as_raw_fd()), ..world(0, 2, port) };
        let e = format!("{:#}", TcpComm::connect(&w, T, || Ok(vec![])).err().unwrap());
        assert!(e.contains("TAESD_RENDEZVOUS_FD") && e.contains("not a listening socket"), "{e}");
    }

    #[test]
    fn a_vanished_rank_fails_the_others_with_its_number() {
        let out = ranks(3, |c, _| {
            if c.rank() == 2 {
                // Gone without a goodbye (as a killed process).
                drop(c);
                return String::new();
            }
            let t0 = std::time::Instant::now();
            let e = c.all_reduce_host(&mut [1.0]).unwrap_err();
            assert!(t0.elapsed() < Duration::from_secs(5));
            format!("{e:#}")
        });
        assert!(out[0].contains("rank 2"), "{}", out[0]);
        assert!(out[1].contains("rank 2"), "{}", out[1]);
    }

    #[test]
    fn an_abort_reaches_every_rank_with_its_cause() {
        let out = ranks(3, |c, _| {
            if c.rank() == 1 {
                c.abort("CUDA out of memory");
                std::thread::sleep(Duration::from_millis(200));
                return String::new();
            }
            format!("{:#}", c.barrier().unwrap_err())
        });
        for e in [&out[0], &out[2]] {
            assert!(e.contains("rank 1 failed: CUDA out of memory"), "{e}");
        }
    }

    #[test]
    fn mismatched_lengths_are_an_error() {
        let out = ranks(2, |c, _| {
            let mut v = vec![1.0; 2 + c.rank()];
            c.all_reduce_host(&mut v).is_err()
        });
        assert_eq!(out, [true, true]);
    }
}
