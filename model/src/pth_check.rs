//! Checks of a PyTorch zip checkpoint (`.pth`) before candle's pickle reader builds tensors from
//! it. That reader allocates what the bytes declare before it reads them (a string's length, a
//! tensor's shape), so a damaged or hostile file could make it ask for gigabytes. Here, reading
//! only the bytes the file has:
//!
//! * every `data.pkl` is walked opcode by opcode (nothing is run): a length it declares must fit
//!   in the bytes that are left, and an unknown opcode is an error;
//! * every tensor the pickle names must fit in its data entry, and every entry in the file.
//!
//! So a checkpoint read never allocates more than the file's size at once.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::pickle::TensorInfo;

/// Why a file is not a readable PyTorch checkpoint.
pub type Problem = String;

/// Check the pickles of the zip checkpoint at `path` (see the module documentation).
pub fn check_pickles(path: &Path) -> Result<(), Problem> {
    let file_len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    let mut zip = open(path)?;
    let names: Vec<String> = zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()).map_err(|e| format!("a file name in the zip: {e}")))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|n| n.ends_with("data.pkl"))
        .collect();
    if names.is_empty() {
        return Err("the zip holds no data.pkl (not a PyTorch checkpoint)".into());
    }
    for name in names {
        let entry = zip.by_name(&name).map_err(|e| format!("{name}: {e}"))?;
        if entry.size() > file_len {
            return Err(format!("{name} claims {} bytes in a {file_len}-byte file", entry.size()));
        }
        let mut bytes = Vec::new();
        entry.take(file_len).read_to_end(&mut bytes).map_err(|e| format!("{name}: {e}"))?;
        walk(&bytes).map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(())
}

/// Check that each tensor `infos` names fits in its data entry, and each entry in the file.
pub fn check_tensors(path: &Path, infos: &HashMap<String, TensorInfo>) -> Result<(), Problem> {
    let file_len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    let mut zip = open(path)?;
    for (name, info) in infos {
        let entry = zip.by_name(&info.path).map_err(|e| format!("tensor `{name}`: data entry {}: {e}", info.path))?;
        let have = entry.size();
        if have > file_len {
            return Err(format!(
                "tensor `{name}`: data entry {} claims {have} bytes in a {file_len}-byte file",
                info.path
            ));
        }
        let elems = info.layout.shape().elem_count() as u64;
        let need = (info.layout.start_offset() as u64)
            .checked_add(elems)
            .and_then(|n| n.checked_mul(info.dtype.size_in_bytes() as u64));
        match need {
            Some(n) if n <= have => {}
            _ => {
                return Err(format!(
                    "tensor `{name}` of shape {:?} ({:?}) needs more bytes than its data entry {} holds ({have})",
                    info.layout.dims(),
                    info.dtype,
                    info.path
                ))
            }
        }
    }
    Ok(())
}

fn open(path: &Path) -> Result<zip::ZipArchive<std::io::BufReader<std::fs::File>>, Problem> {
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    zip::ZipArchive::new(std::io::BufReader::new(f)).map_err(|e| format!("not a readable zip: {e}"))
}

/// What follows an opcode.
enum Arg {
    None,
    Fixed(usize),
    /// A length of this many bytes (little-endian), then that many bytes.
    Counted(usize),
    /// `FRAME`: an 8-byte length of what follows (not skipped).
    Frame,
    /// Newline-terminated lines.
    Lines(usize),
}

fn arg_of(op: u8) -> Option<Arg> {
    use Arg::*;
    Some(match op {
        // No argument.
        b'(' | b'.' | b'0' | b'1' | b'2' | b'N' | b'R' | b'a' | b'b' | b'd' | b'}' | b'e' | b'l' | b']' | b'o'
        | b's' | b't' | b')' | b'u' | b'Q' | 0x81 | 0x85 | 0x86 | 0x87 | 0x88 | 0x89 | 0x8f | 0x90 | 0x91 | 0x92
        | 0x93 | 0x94 | 0x97 | 0x98 => None,
        // Fixed-size arguments.
        b'K' | b'h' | b'q' | 0x80 | 0x82 => Fixed(1),
        b'M' | 0x83 => Fixed(2),
        b'J' | b'j' | b'r' | 0x84 => Fixed(4),
        b'G' => Fixed(8),
        // Length-prefixed data.
        b'U' | b'C' | 0x8c | 0x8a => Counted(1),
        b'T' | b'B' | b'X' | 0x8b => Counted(4),
        0x8d | 0x8e | 0x96 => Counted(8),
        0x95 => Frame,
        // Text arguments.
        b'I' | b'L' | b'F' | b'S' | b'V' | b'P' | b'g' | b'p' => Lines(1),
        b'i' | b'c' => Lines(2),
        _ => return Option::None,
    })
}

/// Walk a pickle's opcodes up to STOP, checking every declared length against the bytes left.
pub fn walk(b: &[u8]) -> Result<(), Problem> {
    let mut i = 0usize;
    while i < b.len() {
        let op = b[i];
        let at = i;
        i += 1;
        if op == b'.' {
            return Ok(());
        }
        let left = |i: usize| b.len().saturating_sub(i);
        match arg_of(op).ok_or_else(|| format!("unknown pickle opcode 0x{op:02x} at byte {at}"))? {
            Arg::None => {}
            Arg::Fixed(n) => {
                if n > left(i) {
                    return Err(format!("opcode 0x{op:02x} at byte {at}: the pickle ends inside its argument"));
                }
                i += n;
            }
            Arg::Counted(w) if w > left(i) => {
                return Err(format!("opcode 0x{op:02x} at byte {at}: the pickle ends inside its length"));
            }
            Arg::Frame if 8 > left(i) => {
                return Err(format!("frame at byte {at}: the pickle ends inside its length"));
            }
            Arg::Counted(w) => {
                let mut len = [0u8; 8];
                len[..w].copy_from_slice(&b[i..i + w]);
                let n = u64::from_le_bytes(len);
                // BINSTRING / LONG4 lengths are signed.
                if (op == b'T' || op == 0x8b) && n >= 1 << 31 {
                    return Err(format!("opcode 0x{op:02x} at byte {at}: negative length"));
                }
                i += w;
                if n > left(i) as u64 {
                    return Err(format!("opcode 0x{op:02x} at byte {at} declares {n} bytes, {} are left", left(i)));
                }
                i += n as usize;
            }
            Arg::Frame => {
                let n = u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
                i += 8;
                if n > left(i) as u64 {
                    return Err(format!("frame at byte {at} declares {n} bytes, {} are left", left(i)));
                }
            }
            Arg::Lines(k) => {
                for _ in 0..k {
                    match b[i..].iter().position(|&c| c == b'\n') {
                        Some(p) => i += p + 1,
                        None => {
                            return Err(format!(
                                "opcode 0x{op:02x} at byte {at}: the pickle ends inside its text argument"
                            ))
                        }
                    }
                }
            }
        }
    }
    Err("the pickle ends without a STOP opcode".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_checked_against_the_bytes_left() {
        // PROTO 2, SHORT_BINUNICODE "ab", BINUNICODE "xyz", STOP.
        let ok = [&[0x80, 2, 0x8c, 2][..], b"ab", &[b'X', 3, 0, 0, 0][..], b"xyz", b"."].concat();
        assert_eq!(walk(&ok), Ok(()));
        // A BINUNICODE that claims 4 GB.
        let bad = [&[0x80, 2, b'X', 0xFF, 0xFF, 0xFF, 0xFF][..], b"xyz."].concat();
        let e = walk(&bad).unwrap_err();
        assert!(e.contains("declares 4294967295 bytes"), "{e}");
        assert!(walk(&[0x80, 2, 0xFE]).unwrap_err().contains("unknown pickle opcode 0xfe"));
        assert!(walk(&[0x80, 2, b'(']).unwrap_err().contains("without a STOP"));
        assert!(walk(b"cmodule\nname").unwrap_err().contains("text argument"));
        assert!(walk(&[0x80, 2, b'J', 1]).unwrap_err().contains("inside its argument"));
    }
}
