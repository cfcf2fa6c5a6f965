//! The framing of the TCP links between the ranks: a message is a one-byte kind, an 8-byte
//! little-endian length and the payload. The ranks run the same sequence of collectives, so
//! each side knows which kind comes next; another kind is an error naming both.

use anyhow::{bail, Result};
use std::io::{Read, Write};

/// Largest payload accepted (a corrupt length must not allocate the machine away).
const MAX_PAYLOAD: u64 = 1 << 34;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A connecting rank's introduction (see [`super::rendezvous`]).
    Hello = 1,
    /// Rank 0's answer to a hello: the blob (e.g. the NCCL unique id).
    Welcome = 2,
    /// f32 values to be summed (little endian).
    Reduce = 3,
    /// The sum, or a broadcast payload.
    Result = 4,
    Barrier = 5,
    /// Bytes sent from rank 0 to every rank.
    Broadcast = 6,
    /// A failure: the payload is the reason (UTF-8).
    Abort = 7,
    /// A clean end of this rank's part (on the control link).
    Bye = 8,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        [Hello, Welcome, Reduce, Result, Barrier, Broadcast, Abort, Bye].into_iter().find(|k| *k as u8 == b)
    }
}

pub fn send(w: &mut impl Write, kind: Kind, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.flush()
}

/// One message; an I/O error as is (the caller names the peer).
pub fn recv(r: &mut impl Read) -> Result<(Kind, Vec<u8>)> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head)?;
    let Some(kind) = Kind::from_u8(head[0]) else {
        bail!("not a message of this protocol (kind byte {})", head[0]);
    };
    let len = u64::from_le_bytes(head[1..].try_into().expect("8 bytes"));
    if len > MAX_PAYLOAD {
        bail!("a message of {len} bytes: corrupt stream");
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    Ok((kind, buf))
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Values of a payload; `n` of them expected.
pub fn bytes_f32(b: &[u8], n: usize) -> Result<Vec<f32>> {
    if b.len() != 4 * n {
        bail!("{} values where {n} were expected (do the ranks run the same configuration?)", b.len() / 4);
    }
    Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let mut buf = Vec::new();
        send(&mut buf, Kind::Reduce, &f32_bytes(&[1.5, -2.0])).unwrap();
        send(&mut buf, Kind::Bye, &[]).unwrap();
        let mut r = &buf[..];
        let (k, p) = recv(&mut r).unwrap();
        assert_eq!((k, bytes_f32(&p, 2).unwrap()), (Kind::Reduce, vec![1.5, -2.0]));
        assert_eq!(recv(&mut r).unwrap(), (Kind::Bye, vec![]));
        assert!(recv(&mut r).is_err(), "end of stream");
        assert!(recv(&mut &[99u8; 9][..]).is_err());
        assert!(bytes_f32(&[0; 8], 3).unwrap_err().to_string().contains("same configuration"));
    }
}
