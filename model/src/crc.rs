//! The two CRC-32s of the file formats this project writes by hand: zip's (IEEE 802.3
//! polynomial, in the `.pth` archives of [`crate::pth_write`]) and CRC-32C (Castagnoli, with
//! TFRecord's mask, in TensorBoard event files). Table-driven, reflected, init and final xor
//! `0xFFFF_FFFF`.

/// A reflected CRC-32 with its byte table.
pub struct Crc32 {
    table: [u32; 256],
}

impl Crc32 {
    /// The table of a reflected polynomial.
    const fn new(poly: u32) -> Crc32 {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { poly ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        Crc32 { table }
    }

    /// Continue a checksum `crc` (0 to start) over `bytes`.
    pub fn update(&self, crc: u32, bytes: &[u8]) -> u32 {
        let mut c = !crc;
        for &b in bytes {
            c = self.table[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8);
        }
        !c
    }

    pub fn checksum(&self, bytes: &[u8]) -> u32 {
        self.update(0, bytes)
    }
}

/// zip / gzip / PNG's CRC-32 (polynomial 0x04C11DB7, reflected 0xEDB88320).
pub static CRC32: Crc32 = Crc32::new(0xEDB8_8320);
/// CRC-32C (Castagnoli, polynomial 0x1EDC6F41, reflected 0x82F63B78).
pub static CRC32C: Crc32 = Crc32::new(0x82F6_3B78);

/// TFRecord's masked CRC-32C of `bytes`: rotated right by 15 bits plus a constant, so that a
/// checksum of data that holds checksums stays well distributed.
pub fn masked_crc32c(bytes: &[u8]) -> u32 {
    let c = CRC32C.checksum(bytes);
    c.rotate_right(15).wrapping_add(0xA282_EAD8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_check_values() {
        // The standard check value of each CRC: the checksum of "123456789".
        assert_eq!(CRC32.checksum(b"123456789"), 0xCBF4_3926);
        assert_eq!(CRC32C.checksum(b"123456789"), 0xE306_9283);
        assert_eq!(CRC32.checksum(b""), 0);
        // Incremental equals whole.
        let c = CRC32.update(CRC32.checksum(b"12345"), b"6789");
        assert_eq!(c, 0xCBF4_3926);
        // TFRecord's mask of the 8-byte little-endian length 0 (a value TensorFlow's
        // record writer produces for an empty record).
        let m = masked_crc32c(&0u64.to_le_bytes());
        let c = CRC32C.checksum(&0u64.to_le_bytes());
        assert_eq!(m, c.rotate_right(15).wrapping_add(0xA282_EAD8));
        assert_ne!(m, c);
    }
}
