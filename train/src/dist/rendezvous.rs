//! The rendezvous at `MASTER_ADDR:MASTER_PORT`: rank 0 listens, every other rank connects (with
//! retries until a deadline: rank 0 may start later) and opens two links, `data` (the
//! collectives of [`super::tcp`], in lockstep) and `control` (failures only: watched by
//! [`super::watchdog`]). When all are in, rank 0 sends each a blob (the NCCL unique id, or
//! nothing), which is also the start barrier.

use super::wire::{self, Kind};
use super::world::World;
use anyhow::{bail, Context, Result};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Protocol version in every hello (ranks of different builds refuse each other).
const VERSION: u32 = 1;

/// Deadlines of the rendezvous and of the collectives.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// How long rank 0 waits for all ranks, and a rank keeps trying to reach rank 0.
    pub connect: Duration,
    /// How long a collective waits for a peer (rank 0 may be evaluating or checkpointing
    /// meanwhile; a dead peer is noticed at once through its closed links, not this).
    pub op: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { connect: Duration::from_secs(300), op: Duration::from_secs(1800) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channel {
    Data = 0,
    Control = 1,
}

/// One rank's two links to rank 0 (or, on rank 0, to it).
pub struct Link {
    pub rank: usize,
    pub data: TcpStream,
    pub control: TcpStream,
}

/// What the rendezvous leaves: on rank 0 a link per other rank (in rank order), elsewhere the
/// link to rank 0.
pub enum Links {
    Root(Vec<Link>),
    Member(Link),
}

fn hello(rank: usize, world: usize, ch: Channel) -> Vec<u8> {
    let mut v = Vec::with_capacity(13);
    v.extend(VERSION.to_le_bytes());
    v.extend((rank as u32).to_le_bytes());
    v.extend((world as u32).to_le_bytes());
    v.push(ch as u8);
    v
}

/// Meet the other ranks. `blob` is called on rank 0 only; every rank returns it.
pub fn rendezvous(w: &World, t: Timeouts, blob: impl FnOnce() -> Result<Vec<u8>>) -> Result<(Links, Vec<u8>)> {
    if w.rank == 0 {
        root(w, t, blob)
    } else {
        member(w, t)
    }
}

fn root(w: &World, t: Timeouts, blob: impl FnOnce() -> Result<Vec<u8>>) -> Result<(Links, Vec<u8>)> {
    let listener = match w.listen_fd {
        Some(fd) => inherited_listener(fd)?,
        None => TcpListener::bind(("0.0.0.0", w.master_port)).with_context(|| {
            format!("rank 0 cannot listen on port {} (MASTER_PORT; in use by another job?)", w.master_port)
        })?,
    };
    listener.set_nonblocking(true)?;
    let blob = blob()?;
    let n = w.world_size;
    let mut data: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut control: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let deadline = Instant::now() + t.connect;
    let missing = |d: &[Option<TcpStream>], c: &[Option<TcpStream>]| -> Vec<usize> {
        (1..n).filter(|&r| d[r].is_none() || c[r].is_none()).collect()
    };
    while !missing(&data, &control).is_empty() {
        let (s, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let m: Vec<String> = missing(&data, &control).iter().map(|r| r.to_string()).collect();
                    bail!(
                        "rank 0 waited {} s at port {} for rank(s) {} of {n}: did every rank start, with the same MASTER_ADDR/MASTER_PORT and WORLD_SIZE?",
                        t.connect.as_secs(),
                        w.master_port,
                        m.join(", ")
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => return Err(e).context("rank 0: accepting a connection"),
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let (kind, p) = match wire::recv(&mut &s) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("rendezvous: ignoring a connection from {peer} that sent no hello ({e:#})");
                continue;
            }
        };
        if kind != Kind::Hello || p.len() != 13 {
            tracing::warn!("rendezvous: ignoring a connection from {peer} that is not a rank of this job");
            continue;
        }
        let u = |i: usize| u32::from_le_bytes(p[i..i + 4].try_into().expect("4 bytes")) as usize;
        let (version, rank, size, ch) = (u(0) as u32, u(4), u(8), p[12]);
        if version != VERSION {
            bail!("rank {rank} at {peer} speaks rendezvous version {version}, rank 0 {VERSION}: the same build everywhere");
        }
        if size != n {
            bail!("rank {rank} at {peer} was started with a world size of {size}, rank 0 with {n}");
        }
        if rank == 0 || rank >= n {
            bail!("a process at {peer} claims rank {rank} in a world of {n}");
        }
        let slot = if ch == Channel::Data as u8 { &mut data[rank] } else { &mut control[rank] };
        if slot.is_some() {
            bail!("two processes claim rank {rank} (the second from {peer}): each rank must be started once");
        }
        s.set_nodelay(true)?;
        *slot = Some(s);
    }
    let mut links = Vec::with_capacity(n - 1);
    for r in 1..n {
        let d = data[r].take().expect("all in");
        let c = control[r].take().expect("all in");
        d.set_read_timeout(Some(t.op))?;
        c.set_read_timeout(None)?;
        wire::send(&mut &d, Kind::Welcome, &blob).with_context(|| format!("rank 0: welcoming rank {r}"))?;
        links.push(Link { rank: r, data: d, control: c });
    }
    Ok((Links::Root(links), blob))
}

/// The listening socket `train --gpus N` bound and left open for rank 0 (descriptor `fd`).
fn inherited_listener(fd: i32) -> Result<TcpListener> {
    use std::os::fd::FromRawFd;
    let mut listening: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes at most `len` bytes into `listening`, a c_int we own; on a
    // descriptor that is not a socket it fails with ENOTSOCK/EBADF and writes nothing.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut listening as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || listening == 0 {
        bail!(
            "{}={fd} is not a listening socket (set by `train --gpus N` for its rank 0 only)",
            super::world::RENDEZVOUS_FD
        );
    }
    // SAFETY: `fd` is an open listening socket (checked above) that the launcher handed to this
    // process alone; nothing else here owns or closes it, so the listener may take it over.
    Ok(unsafe { TcpListener::from_raw_fd(fd) })
}

fn connect(w: &World, deadline: Instant) -> Result<TcpStream> {
    let mut last = None;
    while Instant::now() < deadline {
        match TcpStream::connect((w.master_addr.as_str(), w.master_port)) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "rank {} could not reach rank 0 at {}:{} (MASTER_ADDR:MASTER_PORT): {}",
        w.rank,
        w.master_addr,
        w.master_port,
        last.map(|e| e.to_string()).unwrap_or_else(|| "timed out".into())
    )
}

fn member(w: &World, t: Timeouts) -> Result<(Links, Vec<u8>)> {
    let deadline = Instant::now() + t.connect;
    let data = connect(w, deadline)?;
    data.set_nodelay(true)?;
    wire::send(&mut &data, Kind::Hello, &hello(w.rank, w.world_size, Channel::Data))?;
    let control = connect(w, deadline)?;
    wire::send(&mut &control, Kind::Hello, &hello(w.rank, w.world_size, Channel::Control))?;
    data.set_read_timeout(Some(t.connect))?;
    let blob = match wire::recv(&mut &data) {
        Ok((Kind::Welcome, b)) => b,
        Ok((k, _)) => bail!("rank {}: rank 0 answered the hello with {k:?}", w.rank),
        Err(e) => {
            return Err(e).context(format!(
                "rank {}: no welcome from rank 0 within {} s (are all {} ranks started?)",
                w.rank,
                t.connect.as_secs(),
                w.world_size
            ))
        }
    };
    data.set_read_timeout(Some(t.op))?;
    Ok((Links::Member(Link { rank: 0, data, control }), blob))
}
