//! The protocol-buffers wire format, write side only: enough to write ONNX models
//! ([`crate::onnx`]) and TensorBoard events (the `train` crate) by hand, without a protobuf
//! compiler or runtime. A message is built field by field into a byte buffer; a nested message
//! is a length-delimited field holding another buffer.
//!
//! Repeated scalars are written one field per element (proto2's default, which proto3 parsers
//! accept too).

/// Wire types.
const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

/// One message's encoded fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    buf: Vec<u8>,
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

impl Message {
    pub fn new() -> Self {
        Self::default()
    }

    fn key(&mut self, field: u32, wire: u32) {
        put_varint(&mut self.buf, ((field as u64) << 3) | wire as u64);
    }

    /// `int32`, `int64`, `uint64`, `bool` and enums: a varint (negative numbers as 10 bytes of
    /// two's complement, as protobuf does for int32/int64).
    pub fn varint(&mut self, field: u32, v: i64) -> &mut Self {
        self.key(field, VARINT);
        put_varint(&mut self.buf, v as u64);
        self
    }

    /// `float`.
    pub fn float(&mut self, field: u32, v: f32) -> &mut Self {
        self.key(field, FIXED32);
        self.buf.extend(v.to_le_bytes());
        self
    }

    /// `double`.
    pub fn double(&mut self, field: u32, v: f64) -> &mut Self {
        self.key(field, FIXED64);
        self.buf.extend(v.to_le_bytes());
        self
    }

    /// `bytes`.
    pub fn bytes(&mut self, field: u32, v: &[u8]) -> &mut Self {
        self.key(field, LEN);
        put_varint(&mut self.buf, v.len() as u64);
        self.buf.extend_from_slice(v);
        self
    }

    /// `string`.
    pub fn string(&mut self, field: u32, v: &str) -> &mut Self {
        self.bytes(field, v.as_bytes())
    }

    /// A nested message.
    pub fn message(&mut self, field: u32, m: &Message) -> &mut Self {
        self.bytes(field, &m.buf)
    }

    /// The encoded message.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

/// A minimal reader of the wire format, for tests: the fields of one message in order, as
/// `(field, value)`.
#[doc(hidden)]
pub mod read {
    #[derive(Debug, Clone, PartialEq)]
    pub enum Value<'a> {
        Varint(u64),
        Fixed64(u64),
        Len(&'a [u8]),
        Fixed32(u32),
    }

    fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*i)?;
            *i += 1;
            v |= ((byte & 0x7F) as u64) << shift;
            if byte < 0x80 {
                return Some(v);
            }
        }
        None
    }

    /// Every field of the message `b`; `None` on malformed input.
    pub fn fields(b: &[u8]) -> Option<Vec<(u32, Value<'_>)>> {
        let mut i = 0;
        let mut out = Vec::new();
        while i < b.len() {
            let key = varint(b, &mut i)?;
            let field = (key >> 3) as u32;
            let v = match key & 7 {
                0 => Value::Varint(varint(b, &mut i)?),
                1 => {
                    let v = u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?);
                    i += 8;
                    Value::Fixed64(v)
                }
                2 => {
                    let n = varint(b, &mut i)? as usize;
                    let v = b.get(i..i + n)?;
                    i += n;
                    Value::Len(v)
                }
                5 => {
                    let v = u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?);
                    i += 4;
                    Value::Fixed32(v)
                }
                _ => return None,
            };
            out.push((field, v));
        }
        Some(out)
    }

    /// The values of `field`.
    pub fn all<'a>(fields: &[(u32, Value<'a>)], field: u32) -> Vec<Value<'a>> {
        fields.iter().filter(|(f, _)| *f == field).map(|(_, v)| v.clone()).collect()
    }

    /// The length-delimited values of `field`.
    pub fn bytes<'a>(fields: &[(u32, Value<'a>)], field: u32) -> Vec<&'a [u8]> {
        fields
            .iter()
            .filter_map(|(f, v)| match v {
                Value::Len(b) if *f == field => Some(*b),
                _ => None,
            })
            .collect()
    }

    /// The string values of `field`.
    pub fn strings(fields: &[(u32, Value<'_>)], field: u32) -> Vec<String> {
        bytes(fields, field).into_iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_as_protobuf_does() {
        // The examples of the protobuf encoding guide: field 1 = 150 -> 08 96 01;
        // field 2 = "testing" -> 12 07 74 65 73 74 69 6e 67; field 3 = {field 1 = 150}.
        let mut m = Message::new();
        m.varint(1, 150);
        assert_eq!(m.as_bytes(), [0x08, 0x96, 0x01]);
        let mut s = Message::new();
        s.string(2, "testing");
        assert_eq!(s.as_bytes(), b"\x12\x07testing");
        let mut outer = Message::new();
        outer.message(3, &m);
        assert_eq!(outer.as_bytes(), [0x1a, 0x03, 0x08, 0x96, 0x01]);
        // int64 -1: ten bytes; float and double little-endian.
        let mut n = Message::new();
        n.varint(1, -1).float(2, 1.5).double(3, -2.0);
        let f = read::fields(n.as_bytes()).unwrap();
        assert_eq!(f[0], (1, read::Value::Varint(u64::MAX)));
        assert_eq!(n.as_bytes().len(), 1 + 10 + 1 + 4 + 1 + 8);
        assert_eq!(f[1], (2, read::Value::Fixed32(1.5f32.to_bits())));
        assert_eq!(f[2], (3, read::Value::Fixed64((-2.0f64).to_bits())));
        // Large field numbers take a multi-byte key.
        let mut big = Message::new();
        big.varint(20, 7);
        assert_eq!(big.as_bytes(), [0xa0, 0x01, 0x07]);
        assert_eq!(read::fields(&[0x08]), None, "truncated");
    }
}
