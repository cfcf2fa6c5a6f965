//! Property tests of the parsers that read untrusted bytes here: the image decoder path
//! ([`decode_rgb8_named`], every format it decodes) and the shard reader ([`ShardReader`]).
//! Valid files are cut short, have bytes flipped and size fields overwritten with huge values,
//! from a fixed seed. For every case: no panic, no single allocation beyond the stated cap, and an
//! error (when there is one) that says what is wrong and where.
//!
//! Caps: the image decoder allocates at most [`DecodeLimits::max_alloc`] at once (set to 32 MiB
//! here); the shard reader at most [`SHARD_CAP`] for a shard file of a few hundred kB.

#[path = "support/alloc_probe.rs"]
mod probe;

#[global_allocator]
static PROBE: probe::Probe = probe::Probe;

use image::{DynamicImage, ImageFormat, RgbImage};
use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use taesd_data::{
    decode_rgb8_named, write_shard, CropRect, DecodeLimits, ShardFileMeta, ShardReader, ShardRow, DECODED_FORMATS,
};
use taesd_schemas::{preset, ImageFormat as Stored, LatentDtype};

/// The largest single allocation the shard reader may make for the small shards here.
const SHARD_CAP: usize = 64 << 20;

/// xorshift64*: a fixed, portable stream of cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A damaged copy of `valid` and what was done to it.
fn mutate(valid: &[u8], rng: &mut Rng) -> (Vec<u8>, String) {
    let mut b = valid.to_vec();
    match rng.below(4) {
        0 => {
            let n = rng.below(b.len());
            b.truncate(n);
            (b, format!("cut to {n} bytes"))
        }
        1 => {
            let k = 1 + rng.below(8);
            for _ in 0..k {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            (b, format!("{k} bit flips"))
        }
        2 => {
            // A size field, little- or big-endian, overwritten with a huge value: early bytes are
            // headers, so aim there more often.
            let span = if rng.below(2) == 0 { b.len().min(64) } else { b.len() };
            let i = rng.below(span.saturating_sub(4));
            let v: u32 = [0xFFFF_FFFF, 0x7FFF_FFFF, 0x4000_0000, 0x0010_0000, 60_000][rng.below(5)];
            let bytes = if rng.below(2) == 0 { v.to_le_bytes() } else { v.to_be_bytes() };
            b[i..i + 4].copy_from_slice(&bytes);
            (b, format!("0x{v:x} at byte {i}"))
        }
        _ => {
            let i = rng.below(b.len());
            let n = 1 + rng.below(64);
            let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            b.splice(i..(i + n).min(b.len()), junk);
            (b, format!("{n} random bytes at {i}"))
        }
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

/// A valid file of `format` (64 x 48, with an alpha gradient where the format has alpha).
fn fixture(format: ImageFormat) -> Vec<u8> {
    let rgb = RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, ((x * y) % 256) as u8]));
    let img = match format {
        ImageFormat::Hdr | ImageFormat::OpenExr => {
            DynamicImage::ImageRgb32F(DynamicImage::ImageRgb8(rgb).into_rgb32f())
        }
        ImageFormat::Farbfeld => DynamicImage::ImageRgba16(DynamicImage::ImageRgb8(rgb).into_rgba16()),
        ImageFormat::Png | ImageFormat::Tiff | ImageFormat::Qoi | ImageFormat::Tga | ImageFormat::Ico => {
            let mut rgba = DynamicImage::ImageRgb8(rgb).into_rgba8();
            for (x, _, p) in rgba.enumerate_pixels_mut() {
                p[3] = (x * 4) as u8;
            }
            DynamicImage::ImageRgba8(rgba)
        }
        _ => DynamicImage::ImageRgb8(rgb),
    };
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), format).unwrap_or_else(|e| panic!("{format:?}: {e}"));
    out
}

#[test]
fn damaged_images_of_every_format_fail_cleanly_within_the_cap() {
    let limits = DecodeLimits { max_alloc: 32 << 20, ..DecodeLimits::default() };
    let cap = limits.max_alloc as usize;
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let mut problems = Vec::new();
    let mut cases = 0;
    let mut errors = 0;
    for &format in DECODED_FORMATS {
        if !format.writing_enabled() {
            continue;
        }
        let valid = fixture(format);
        let name = format!("case.{}", format.extensions_str()[0]);
        assert!(decode_rgb8_named(&valid, Some(&name), &limits).is_ok(), "{format:?} fixture");
        for _ in 0..250 {
            let (bytes, what) = mutate(&valid, &mut rng);
            cases += 1;
            let (r, largest) =
                probe::largest(|| catch_unwind(AssertUnwindSafe(|| decode_rgb8_named(&bytes, Some(&name), &limits))));
            match r {
                Err(p) => problems.push(format!("{format:?}, {what}: panicked: {}", panic_message(p))),
                Ok(Err(e)) => {
                    errors += 1;
                    let msg = e.to_string();
                    if msg.len() < 10 {
                        problems.push(format!("{format:?}, {what}: unclear error {msg:?}"));
                    }
                }
                Ok(Ok(img)) => {
                    // A flipped pixel bit may well decode: then it is a whole image.
                    if img.width() == 0 || img.height() == 0 {
                        problems.push(format!("{format:?}, {what}: an empty image"));
                    }
                }
            }
            if largest > cap {
                problems.push(format!("{format:?}, {what}: allocated {largest} bytes at once (cap {cap})"));
            }
        }
    }
    assert!(problems.is_empty(), "{} of {cases} cases:\n{}", problems.len(), problems.join("\n"));
    assert!(errors > cases / 4, "the damage was noticed in only {errors} of {cases} cases");
}

/// A header that declares an enormous image is refused from the header alone, for every format
/// with a size in its header, before any pixel buffer.
#[test]
fn huge_declared_sizes_are_refused_before_allocation() {
    let limits = DecodeLimits::default();
    let cap = 1 << 20;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("bmp", {
            let mut b = fixture(ImageFormat::Bmp);
            b[18..22].copy_from_slice(&60_000i32.to_le_bytes());
            b[22..26].copy_from_slice(&60_000i32.to_le_bytes());
            b
        }),
        ("gif", {
            let mut b = fixture(ImageFormat::Gif);
            b[6..8].copy_from_slice(&60_000u16.to_le_bytes());
            b[8..10].copy_from_slice(&60_000u16.to_le_bytes());
            b
        }),
        ("qoi", {
            let mut b = fixture(ImageFormat::Qoi);
            b[4..8].copy_from_slice(&60_000u32.to_be_bytes());
            b[8..12].copy_from_slice(&60_000u32.to_be_bytes());
            b
        }),
        ("ff", {
            let mut b = fixture(ImageFormat::Farbfeld);
            b[8..12].copy_from_slice(&60_000u32.to_be_bytes());
            b[12..16].copy_from_slice(&60_000u32.to_be_bytes());
            b
        }),
        ("pnm", b"P6\n60000 60000\n255\n\x01\x02\x03".to_vec()),
        ("hdr", b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 60000 +X 60000\n\x01\x02\x03\x04".to_vec()),
    ];
    for (ext, bytes) in cases {
        let name = format!("bomb.{ext}");
        let (r, largest) =
            probe::largest(|| catch_unwind(AssertUnwindSafe(|| decode_rgb8_named(&bytes, Some(&name), &limits))));
        let e = match r {
            Ok(Err(e)) => e.to_string(),
            Ok(Ok(_)) => panic!("{name}: a 60000x60000 header decoded"),
            Err(p) => panic!("{name}: panicked: {}", panic_message(p)),
        };
        assert!(e.contains("too large") || e.contains("60000"), "{name}: {e}");
        assert!(largest <= cap, "{name}: allocated {largest} bytes before refusing");
    }
}

fn shard_row(i: u32) -> ShardRow {
    let img = RgbImage::from_fn(16, 16, |x, y| image::Rgb([(x * 16) as u8, (y * 16) as u8, (i * 40) as u8]));
    let latent: Vec<f32> = (0..4 * 2 * 2).map(|k| (k as f32 - 8.0) * 0.25 + i as f32).collect();
    ShardRow {
        key: format!("k{i}"),
        source: format!("dir/k{i}.jpg"),
        source_sha256: format!("{i:064x}"),
        source_width: 300,
        source_height: 200,
        variant: 0,
        crop: CropRect { x: i, y: 0, w: 200, h: 200 },
        flip: false,
        color_aug: false,
        image: taesd_data::encode_image(&img, Stored::Png, 95).unwrap(),
        width: 16,
        height: 16,
        latent_std: Some(latent.iter().map(|v| v.abs()).collect()),
        latent,
        latent_shape: [4, 2, 2],
    }
}

fn valid_shard(dir: &Path) -> PathBuf {
    let path = dir.join("shard-00000.parquet");
    let meta = ShardFileMeta {
        vae: preset("sdxl").unwrap().spec(),
        onnx_sha256: "ab".repeat(32),
        latent_dtype: LatentDtype::Float16,
        image_format: Stored::Png,
        resolution: 16,
        shard_index: 0,
        errors: vec![],
        inputs: None,
    };
    let rows: Vec<ShardRow> = (0..150).map(shard_row).collect();
    write_shard(&path, &rows, &meta).unwrap();
    path
}

#[test]
fn damaged_shards_fail_cleanly_within_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let valid = std::fs::read(valid_shard(dir.path())).unwrap();
    let mut rng = Rng(0x5EED_1234_ABCD_0002);
    let path = dir.path().join("damaged.parquet");
    let mut problems = Vec::new();
    let mut errors = 0;
    let cases = 300;
    for case in 0..cases {
        let (mut bytes, mut what) = mutate(&valid, &mut rng);
        if case % 5 == 0 && bytes.len() > 12 {
            // The footer length (the 4 bytes before the closing "PAR1").
            let n = bytes.len();
            bytes[n - 8..n - 4].copy_from_slice(&(0x7FFF_FFF0u32 - case as u32).to_le_bytes());
            what += ", huge footer length";
        }
        std::fs::write(&path, &bytes).unwrap();
        let read = || -> anyhow::Result<usize> {
            let r = ShardReader::open(&path)?;
            let mut n = 0;
            for g in 0..r.num_row_groups() {
                n += r.read_row_group(g)?.len();
            }
            n += r.sources()?.len() + r.crops()?.len();
            n += r.latents()?.count();
            Ok(n)
        };
        let (r, largest) = probe::largest(|| catch_unwind(AssertUnwindSafe(read)));
        match r {
            Err(p) => problems.push(format!("{what}: panicked: {}", panic_message(p))),
            Ok(Err(e)) => {
                errors += 1;
                let msg = format!("{e:#}");
                if !msg.contains("damaged.parquet") {
                    problems.push(format!("{what}: the error does not name the file: {msg}"));
                }
            }
            Ok(Ok(_)) => {}
        }
        if largest > SHARD_CAP {
            problems.push(format!("{what}: allocated {largest} bytes at once (cap {SHARD_CAP})"));
        }
    }
    assert!(problems.is_empty(), "{} of {cases} cases:\n{}", problems.len(), problems.join("\n"));
    assert!(errors > cases / 4, "the damage was noticed in only {errors} of {cases} cases");
}

/// A footer whose column chunk claims gigabytes (the reader allocates a chunk's declared size
/// before reading it) is refused from the footer, naming the file and the column.
#[test]
fn a_footer_claiming_huge_column_chunks_is_refused_before_allocation() {
    use parquet::file::metadata::{ParquetMetaDataReader, ParquetMetaDataWriter};
    let dir = tempfile::tempdir().unwrap();
    let path = valid_shard(dir.path());
    let valid = std::fs::read(&path).unwrap();
    let footer_len = u32::from_le_bytes(valid[valid.len() - 8..valid.len() - 4].try_into().unwrap()) as usize;
    let data_end = valid.len() - 8 - footer_len;
    let meta = ParquetMetaDataReader::new().parse_and_finish(&std::fs::File::open(&path).unwrap()).unwrap();
    for (what, size, offset) in
        [("3 GiB chunk", 3i64 << 30, None), ("chunk past the end", 1000, Some(valid.len() as i64 + 10))]
    {
        let mut b = meta.clone().into_builder();
        let mut groups = Vec::new();
        for rg in meta.row_groups() {
            let cols = rg
                .columns()
                .iter()
                .map(|c| {
                    if c.column_path().string() != "latent" {
                        return c.clone();
                    }
                    let mut cb = c.clone().into_builder().set_total_compressed_size(size);
                    if let Some(o) = offset {
                        cb = cb.set_data_page_offset(o);
                    }
                    cb.build().unwrap()
                })
                .collect();
            groups.push(rg.clone().into_builder().set_column_metadata(cols).build().unwrap());
        }
        b = b.set_row_groups(groups);
        let mut bytes = valid[..data_end].to_vec();
        ParquetMetaDataWriter::new(&mut bytes, &b.build()).finish().unwrap();
        let damaged = dir.path().join("damaged.parquet");
        std::fs::write(&damaged, &bytes).unwrap();
        let read = || -> anyhow::Result<usize> {
            let r = ShardReader::open(&damaged)?;
            Ok(r.read_all()?.len())
        };
        let (r, largest) = probe::largest(|| catch_unwind(AssertUnwindSafe(read)));
        let e = match r {
            Ok(Err(e)) => format!("{e:#}"),
            Ok(Ok(n)) => panic!("{what}: read {n} rows"),
            Err(p) => panic!("{what}: panicked: {}", panic_message(p)),
        };
        assert!(e.contains("damaged.parquet") && e.contains("latent") && e.contains("damaged footer"), "{what}: {e}");
        assert!(largest <= SHARD_CAP, "{what}: allocated {largest} bytes at once");
    }
}
