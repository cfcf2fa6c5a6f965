//! Writing a state dict as the zip file `torch.save` writes (`.pth`), without torch, so that the
//! reference `taesd.py` (`torch.load(path, weights_only=True)`) and ComfyUI's `vae_approx`
//! loader take our exports as they take the released weights.
//!
//! The archive `<stem>/` holds `data.pkl` (the pickle), `.format_version`, `.storage_alignment`,
//! `byteorder`, one `data/<i>` record per tensor (raw little-endian, contiguous, 64-byte
//! aligned) and `version`. The pickle is protocol 2 and uses only what torch's `weights_only`
//! unpickler allows: the globals [`ALLOWED_GLOBALS`] and the opcodes [`OPCODES`]. It is an
//! `OrderedDict` of name -> `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False,
//! OrderedDict())`, each storage a persistent id `("storage", torch.<T>Storage, "<i>", "cpu",
//! numel)`: tensors only, no module metadata, no custom classes.

use std::io::BufWriter;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{CandleContext, Result, TaesdError};
use crate::zip_store::{ZipStore, ALIGNMENT};

/// The globals the pickle refers to (`module.name`), all on torch's `weights_only` allow list.
pub const ALLOWED_GLOBALS: [&str; 6] = [
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch.FloatStorage",
    "torch.HalfStorage",
    "torch.BFloat16Storage",
    "torch.DoubleStorage",
];

/// The pickle opcodes this writer emits (names as `pickletools` gives them), all handled by
/// torch's `weights_only` unpickler.
pub const OPCODES: [&str; 17] = [
    "PROTO",
    "GLOBAL",
    "EMPTY_TUPLE",
    "REDUCE",
    "MARK",
    "BINUNICODE",
    "TUPLE",
    "TUPLE1",
    "TUPLE2",
    "TUPLE3",
    "BINPERSID",
    "BININT1",
    "BININT2",
    "BININT",
    "NEWFALSE",
    "SETITEMS",
    "STOP",
];

/// The serialization format version torch writes in `version` (3 since PyTorch 1.6).
const FILE_VERSION: &str = "3\n";

/// torch's storage class of a dtype.
fn storage_class(dtype: DType) -> Option<&'static str> {
    Some(match dtype {
        DType::F32 => "FloatStorage",
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::F64 => "DoubleStorage",
        _ => return None,
    })
}

/// A protocol-2 pickle being built.
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, op: u8) {
        self.0.push(op);
    }
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0.extend(format!("{module}\n{name}\n").as_bytes());
    }
    fn string(&mut self, s: &str) {
        self.0.push(b'X'); // BINUNICODE
        self.0.extend((s.len() as u32).to_le_bytes());
        self.0.extend(s.as_bytes());
    }
    fn int(&mut self, v: usize) {
        if v < 0x100 {
            self.0.extend([b'K', v as u8]); // BININT1
        } else if v < 0x1_0000 {
            self.0.push(b'M'); // BININT2
            self.0.extend((v as u16).to_le_bytes());
        } else {
            let v = i32::try_from(v).expect("tensor sizes fit an i32 here");
            self.0.push(b'J'); // BININT
            self.0.extend(v.to_le_bytes());
        }
    }
    fn tuple_of_ints(&mut self, v: &[usize]) {
        match v.len() {
            0 => self.op(b')'), // EMPTY_TUPLE
            n => {
                if n > 3 {
                    self.op(b'('); // MARK
                }
                for &x in v {
                    self.int(x);
                }
                self.op(match n {
                    1 => 0x85, // TUPLE1
                    2 => 0x86, // TUPLE2
                    3 => 0x87, // TUPLE3
                    _ => b't', // TUPLE
                });
            }
        }
    }
    fn empty_ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.op(b')');
        self.op(b'R'); // REDUCE
    }
}

/// Contiguous row-major strides of `dims`.
fn strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

/// The raw little-endian bytes of a tensor.
fn tensor_bytes(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    let t = t.to_device(&Device::Cpu)?.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => t.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F64 => t.to_vec1::<f64>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => t.to_vec1::<half::f16>()?.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        DType::BF16 => t.to_vec1::<half::bf16>()?.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        d => candle_core::bail!("no torch storage for {d:?}"),
    })
}

/// The archive's folder name: the file stem, reduced to `[A-Za-z0-9_.-]`.
pub fn archive_name(path: &Path) -> String {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("archive");
    let s: String =
        stem.chars().map(|c| if c.is_ascii_alphanumeric() || "_-.".contains(c) { c } else { '_' }).collect();
    if s.is_empty() {
        "archive".into()
    } else {
        s
    }
}

/// The bytes of a `.pth` holding `tensors` in this order, under the archive folder `archive`.
pub fn pth_bytes(archive: &str, tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut p = Pickle(Vec::new());
    p.0.extend([0x80, 2]); // PROTO 2
    p.empty_ordered_dict();
    let mut records = Vec::with_capacity(tensors.len());
    if !tensors.is_empty() {
        p.op(b'('); // MARK
    }
    for (i, (name, t)) in tensors.iter().enumerate() {
        let class = storage_class(t.dtype()).ok_or_else(|| {
            TaesdError::Other(format!("{name}: a .pth cannot hold {:?} tensors here (f32, f16, bf16, f64)", t.dtype()))
        })?;
        let dims = t.dims().to_vec();
        let numel: usize = dims.iter().product();
        p.string(name);
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.op(b'(');
        // The storage: a persistent id, resolved by torch from `data/<i>`.
        p.op(b'(');
        p.string("storage");
        p.global("torch", class);
        p.string(&i.to_string());
        p.string("cpu");
        p.int(numel);
        p.op(b't');
        p.op(b'Q'); // BINPERSID
        p.int(0); // storage offset
        p.tuple_of_ints(&dims);
        p.tuple_of_ints(&strides(&dims));
        p.op(0x89); // NEWFALSE: requires_grad
        p.empty_ordered_dict(); // backward hooks
        p.op(b't');
        p.op(b'R');
        records.push(tensor_bytes(t).ctx(|| name.clone())?);
    }
    if !tensors.is_empty() {
        p.op(b'u'); // SETITEMS
    }
    p.op(b'.'); // STOP

    let mut z = ZipStore::new(Vec::new());
    let io = |e: std::io::Error| TaesdError::Other(format!("writing the .pth archive: {e}"));
    z.add(&format!("{archive}/data.pkl"), &p.0).map_err(io)?;
    z.add(&format!("{archive}/.format_version"), b"1").map_err(io)?;
    z.add(&format!("{archive}/.storage_alignment"), ALIGNMENT.to_string().as_bytes()).map_err(io)?;
    z.add(&format!("{archive}/byteorder"), b"little").map_err(io)?;
    for (i, r) in records.iter().enumerate() {
        z.add(&format!("{archive}/data/{i}"), r).map_err(io)?;
    }
    z.add(&format!("{archive}/version"), FILE_VERSION.as_bytes()).map_err(io)?;
    z.finish().map_err(io)
}

/// Write `tensors` (in this order) as a `.pth` state dict at `path` (parent folders created).
pub fn write_pth(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let io = |cause| TaesdError::Io { path: path.to_path_buf(), cause };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let bytes = pth_bytes(&archive_name(path), tensors)?;
    let mut f = BufWriter::new(std::fs::File::create(path).map_err(io)?);
    std::io::Write::write_all(&mut f, &bytes).map_err(io)?;
    std::io::Write::flush(&mut f).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_through_candles_pickle_reader() {
        let dev = Device::Cpu;
        let w = Tensor::arange(0f32, 64.0 * 3.0 * 9.0, &dev).unwrap().reshape((64, 3, 3, 3)).unwrap();
        let b = Tensor::new(&[0.5f32, -1.25], &dev).unwrap().to_dtype(DType::F16).unwrap();
        let big = Tensor::ones((300, 300), DType::BF16, &dev).unwrap(); // BININT sizes
        let s = Tensor::new(0.13025f32, &dev).unwrap(); // a 0-d scalar (ComfyUI's vae_scale)
        let tensors = vec![
            ("0.weight".to_string(), w.clone()),
            ("0.bias".to_string(), b.clone()),
            ("big".to_string(), big.clone()),
            ("vae_scale".to_string(), s.clone()),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x_encoder.pth");
        write_pth(&path, &tensors).unwrap();
        let back = candle_core::pickle::read_all_with_key(&path, None).unwrap();
        assert_eq!(back.len(), 4);
        for (name, t) in &tensors {
            let bt = &back.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} missing")).1;
            assert_eq!(t.dtype(), bt.dtype(), "{name}");
            assert_eq!(t.dims(), bt.dims(), "{name}");
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(f(t), f(bt), "{name}");
        }
        assert_eq!(archive_name(&path), "x_encoder");
        assert_eq!(archive_name(Path::new("a b/c d.pth")), "c_d");
        assert!(pth_bytes("a", &[("i".into(), Tensor::new(&[1u32], &dev).unwrap())]).is_err());
    }

    #[test]
    fn strides_are_row_major() {
        assert_eq!(strides(&[64, 3, 3, 3]), [27, 9, 3, 1]);
        assert_eq!(strides(&[5]), [1]);
        assert!(strides(&[]).is_empty());
    }
}
