//! A zip archive writer of stored (uncompressed) entries, as `torch.save` writes them: each
//! entry's data starts on a 64-byte boundary (the local header's extra field is padded with a
//! `FB` record of `Z`s, as PyTorch's own writer does), so the archive can be memory-mapped.
//! No zip64: entries and the archive stay under 4 GiB (a TAESD is a few MB).

use std::io::{self, Write};

use crate::crc::CRC32;

/// Alignment of each entry's data (PyTorch's `.storage_alignment`).
pub const ALIGNMENT: u64 = 64;

const LOCAL_HEADER: u32 = 0x0403_4B50;
const CENTRAL_HEADER: u32 = 0x0201_4B50;
const END_OF_CENTRAL: u32 = 0x0605_4B50;
/// Version 2.0 (stored entries, no zip64).
const VERSION: u16 = 20;
/// 1980-01-01 00:00 in MS-DOS date/time (the earliest a zip can say; fixed, so that one model
/// always gives the same bytes).
const DOS_DATE: u16 = (1 << 5) | 1;
const DOS_TIME: u16 = 0;
/// Extra-field id of PyTorch's alignment padding (`"FB"`).
const PAD_ID: u16 = 0x4246;

struct Entry {
    name: String,
    crc: u32,
    size: u32,
    offset: u32,
}

/// Writes entries one after another, then the central directory on [`ZipStore::finish`].
pub struct ZipStore<W: Write> {
    out: W,
    offset: u64,
    entries: Vec<Entry>,
}

fn too_big(what: &str) -> io::Error {
    io::Error::other(format!("{what} is too large for a zip without zip64"))
}

impl<W: Write> ZipStore<W> {
    pub fn new(out: W) -> Self {
        ZipStore { out, offset: 0, entries: Vec::new() }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Add one stored entry named `name` (forward slashes) holding `data`.
    pub fn add(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| too_big(name))?;
        let offset = u32::try_from(self.offset).map_err(|_| too_big("the archive"))?;
        let name_len = u16::try_from(name.len()).map_err(|_| too_big(name))?;
        let crc = CRC32.checksum(data);
        // Pad so that the data starts on an ALIGNMENT boundary: header (30) + name + extra.
        let unpadded = self.offset + 30 + name.len() as u64 + 4;
        let pad = ((ALIGNMENT - unpadded % ALIGNMENT) % ALIGNMENT) as u16;
        let mut h = Vec::with_capacity(30 + name.len() + 4 + pad as usize);
        h.extend(LOCAL_HEADER.to_le_bytes());
        h.extend(VERSION.to_le_bytes());
        h.extend(0u16.to_le_bytes()); // flags
        h.extend(0u16.to_le_bytes()); // method: stored
        h.extend(DOS_TIME.to_le_bytes());
        h.extend(DOS_DATE.to_le_bytes());
        h.extend(crc.to_le_bytes());
        h.extend(size.to_le_bytes()); // compressed
        h.extend(size.to_le_bytes()); // uncompressed
        h.extend(name_len.to_le_bytes());
        h.extend((4 + pad).to_le_bytes()); // extra field length
        h.extend(name.as_bytes());
        h.extend(PAD_ID.to_le_bytes());
        h.extend(pad.to_le_bytes());
        h.extend(std::iter::repeat_n(b'Z', pad as usize));
        self.put(&h)?;
        debug_assert_eq!(self.offset % ALIGNMENT, 0);
        self.put(data)?;
        self.entries.push(Entry { name: name.to_string(), crc, size, offset });
        Ok(())
    }

    /// Write the central directory and return the writer.
    pub fn finish(mut self) -> io::Result<W> {
        let start = u32::try_from(self.offset).map_err(|_| too_big("the archive"))?;
        let count = u16::try_from(self.entries.len()).map_err(|_| too_big("the entry count"))?;
        let mut c = Vec::new();
        for e in &self.entries {
            c.extend(CENTRAL_HEADER.to_le_bytes());
            c.extend(VERSION.to_le_bytes()); // made by (MS-DOS, 2.0)
            c.extend(VERSION.to_le_bytes()); // needed
            c.extend(0u16.to_le_bytes()); // flags
            c.extend(0u16.to_le_bytes()); // stored
            c.extend(DOS_TIME.to_le_bytes());
            c.extend(DOS_DATE.to_le_bytes());
            c.extend(e.crc.to_le_bytes());
            c.extend(e.size.to_le_bytes());
            c.extend(e.size.to_le_bytes());
            c.extend((e.name.len() as u16).to_le_bytes());
            c.extend(0u16.to_le_bytes()); // extra
            c.extend(0u16.to_le_bytes()); // comment
            c.extend(0u16.to_le_bytes()); // disk
            c.extend(0u16.to_le_bytes()); // internal attributes
            c.extend(0u32.to_le_bytes()); // external attributes
            c.extend(e.offset.to_le_bytes());
            c.extend(e.name.as_bytes());
        }
        let size = u32::try_from(c.len()).map_err(|_| too_big("the central directory"))?;
        c.extend(END_OF_CENTRAL.to_le_bytes());
        c.extend(0u16.to_le_bytes()); // this disk
        c.extend(0u16.to_le_bytes()); // disk of the directory
        c.extend(count.to_le_bytes());
        c.extend(count.to_le_bytes());
        c.extend(size.to_le_bytes());
        c.extend(start.to_le_bytes());
        c.extend(0u16.to_le_bytes()); // comment
        self.put(&c)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], i: usize) -> u16 {
        u16::from_le_bytes([b[i], b[i + 1]])
    }
    fn u32_at(b: &[u8], i: usize) -> u32 {
        u32::from_le_bytes(b[i..i + 4].try_into().unwrap())
    }

    /// Read entries back through the central directory, as zip readers do.
    fn read_back(z: &[u8]) -> Vec<(String, Vec<u8>, usize)> {
        let eocd = z.len() - 22;
        assert_eq!(u32_at(z, eocd), END_OF_CENTRAL);
        let n = u16_at(z, eocd + 10) as usize;
        let mut p = u32_at(z, eocd + 16) as usize;
        let mut out = Vec::new();
        for _ in 0..n {
            assert_eq!(u32_at(z, p), CENTRAL_HEADER);
            let (crc, size) = (u32_at(z, p + 16), u32_at(z, p + 20) as usize);
            let name_len = u16_at(z, p + 28) as usize;
            let name = String::from_utf8(z[p + 46..p + 46 + name_len].to_vec()).unwrap();
            let local = u32_at(z, p + 42) as usize;
            assert_eq!(u32_at(z, local), LOCAL_HEADER);
            let data_at = local + 30 + u16_at(z, local + 26) as usize + u16_at(z, local + 28) as usize;
            let data = z[data_at..data_at + size].to_vec();
            assert_eq!(CRC32.checksum(&data), crc, "{name}");
            out.push((name, data, data_at));
            p += 46 + name_len;
        }
        out
    }

    #[test]
    fn entries_are_aligned_and_read_back() {
        let mut z = ZipStore::new(Vec::new());
        z.add("a/data.pkl", b"\x80\x02}q\x00.").unwrap();
        z.add("a/data/0", &[7u8; 1000]).unwrap();
        z.add("a/byteorder", b"little").unwrap();
        let bytes = z.finish().unwrap();
        let back = read_back(&bytes);
        assert_eq!(back.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(), ["a/data.pkl", "a/data/0", "a/byteorder"]);
        assert_eq!(back[1].1, vec![7u8; 1000]);
        for (name, _, at) in &back {
            assert_eq!(*at as u64 % ALIGNMENT, 0, "{name} starts at {at}");
        }
        // Deterministic: the same entries give the same bytes.
        let mut z2 = ZipStore::new(Vec::new());
        z2.add("a/data.pkl", b"\x80\x02}q\x00.").unwrap();
        z2.add("a/data/0", &[7u8; 1000]).unwrap();
        z2.add("a/byteorder", b"little").unwrap();
        assert_eq!(z2.finish().unwrap(), bytes);
    }
}
