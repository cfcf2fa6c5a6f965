//! Turning the bytes of one input file into an 8-bit sRGB RGB image, or a clear reason why not.
//!
//! What [`decode_rgb8`] does, in order:
//!
//! 1. Refuses an empty file.
//! 2. Guesses the format from the content (magic bytes), not from the file name: a PNG named
//!    `.jpg` decodes fine, a text file named `.jpg` is "not an image". Every format the `image`
//!    crate decodes in this build is decoded ([`DECODED_FORMATS`]: JPEG, PNG, WebP, GIF (the
//!    first frame), BMP, TIFF (the first page), ICO, PNM, TGA, Radiance HDR, OpenEXR, farbfeld,
//!    QOI); a recognised format it cannot decode (AVIF, DDS, HEIF/HEIC, JPEG XL, PSD, SVG, ...)
//!    is reported as unsupported, naming the format. TGA has no signature: it is tried when the
//!    name ends in `.tga` ([`decode_rgb8_named`]), the one case where the name matters.
//! 3. Reads only the header, then refuses absurd dimensions (see [`DecodeLimits`]) before any
//!    pixel buffer is allocated: a 100 kB file can claim to be 60000 x 60000 (a decompression
//!    bomb). The `image` crate's own [`image::Limits`] are set as well, as a second line.
//! 4. For JPEG, checks that the file is structurally complete (every segment fits in the file
//!    and the entropy-coded data ends in an EOI marker). The JPEG decoder is lenient and
//!    returns a partly grey image for a truncated file; this check turns that into
//!    [`DecodeError::Truncated`].
//! 5. Decodes, applies the EXIF orientation (so a portrait photo stored landscape with
//!    orientation 6 comes out portrait), and converts to 8-bit RGB:
//!    grayscale is replicated to R = G = B, 16-bit samples are rounded to 8 bits, palettes are
//!    expanded by the decoder, CMYK / YCCK JPEGs are converted to RGB by the JPEG decoder
//!    (Adobe inverted-CMYK convention), and alpha is composited over [`ALPHA_BACKGROUND`]
//!    (white), in sRGB space, like pasting onto a white canvas in PIL. Float images (HDR,
//!    OpenEXR) are taken as [0, 1] values and clipped, without tone mapping.
//!
//! ICC profiles are not applied: the samples are taken as sRGB, as PIL and torchvision do
//! when they load training images.

use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, RgbImage};
use std::io::Cursor;

/// The colour transparent pixels are composited over: white, as in a browser or a document.
pub const ALPHA_BACKGROUND: [u8; 3] = [255, 255, 255];

/// Size limits checked against the image header before anything is decoded.
///
/// Dimensions are those of the image as stored (before EXIF rotation); with the default, square
/// limits that makes no difference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted width in pixels.
    pub max_width: u32,
    /// Largest accepted height in pixels.
    pub max_height: u32,
    /// Largest accepted width x height.
    pub max_pixels: u64,
    /// Largest buffer the decoder may allocate for the decoded image, in bytes.
    pub max_alloc: u64,
}

impl Default for DecodeLimits {
    /// 16384 px per side, 128 megapixels, 1 GiB for the decoded buffer: far above any training
    /// image, far below what takes a machine down.
    fn default() -> Self {
        DecodeLimits { max_width: 16_384, max_height: 16_384, max_pixels: 128 * 1024 * 1024, max_alloc: 1 << 30 }
    }
}

/// Why a file could not be turned into an RGB image. `Display` is a complete, human-readable
/// reason, meant for `errors.jsonl` and log lines.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Zero bytes.
    #[error("empty file (0 bytes)")]
    Empty,
    /// The content matches no known image signature.
    #[error("not an image: the content matches no known image format (starts with {head})")]
    NotAnImage {
        /// The first bytes, quoted printable text or hex.
        head: String,
    },
    /// A recognised image format this build does not decode.
    #[error("unsupported image format {format} (this build decodes {})", decoded_format_names())]
    UnsupportedFormat { format: String },
    /// The header claims dimensions over [`DecodeLimits`].
    #[error("image too large: {width}x{height} {reason}")]
    TooLarge { width: u32, height: u32, reason: String },
    /// The data ends before the image does.
    #[error("truncated {format} file: {detail}")]
    Truncated { format: String, detail: String },
    /// The data is malformed; `detail` is the decoder's message.
    #[error("corrupt {format} data: {detail}")]
    Corrupt { format: String, detail: String },
    /// The decoder hit its memory limit (a huge metadata chunk, say), size unknown.
    #[error("{format} decoder limit exceeded: {detail}")]
    LimitExceeded { format: String, detail: String },
    /// A valid file using a feature the decoder lacks (e.g. arithmetic-coded JPEG).
    #[error("unsupported {format} feature: {detail}")]
    UnsupportedFeature { format: String, detail: String },
}

impl DecodeError {
    /// A short, stable, machine-friendly name of the variant (for counting errors by kind).
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::NotAnImage { .. } => "not_an_image",
            DecodeError::UnsupportedFormat { .. } => "unsupported_format",
            DecodeError::TooLarge { .. } | DecodeError::LimitExceeded { .. } => "too_large",
            DecodeError::Truncated { .. } => "truncated",
            DecodeError::Corrupt { .. } => "corrupt",
            DecodeError::UnsupportedFeature { .. } => "unsupported_feature",
        }
    }
}

/// The formats this build decodes, in the order error messages list them.
pub const DECODED_FORMATS: &[ImageFormat] = &[
    ImageFormat::Jpeg,
    ImageFormat::Png,
    ImageFormat::WebP,
    ImageFormat::Gif,
    ImageFormat::Bmp,
    ImageFormat::Tiff,
    ImageFormat::Ico,
    ImageFormat::Pnm,
    ImageFormat::Tga,
    ImageFormat::Hdr,
    ImageFormat::OpenExr,
    ImageFormat::Farbfeld,
    ImageFormat::Qoi,
];

fn decoded_format_names() -> String {
    DECODED_FORMATS.iter().map(|f| format_name(*f)).collect::<Vec<_>>().join(", ")
}

/// Whether this build decodes `f` (the `image` crate's decoder is compiled in).
pub fn decodes(f: ImageFormat) -> bool {
    DECODED_FORMATS.contains(&f) && f.reading_enabled()
}

/// Decode an image file's bytes to 8-bit RGB. See the module documentation for the full list
/// of what is normalised; in short: format from content, EXIF orientation applied, alpha
/// composited over white ([`ALPHA_BACKGROUND`]), grayscale/16-bit/palette/CMYK converted.
pub fn decode_rgb8(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, DecodeError> {
    decode_rgb8_named(bytes, None, limits)
}

/// [`decode_rgb8`] for a file called `name`: its extension is used only where the content has no
/// signature (TGA), and to name a format this build does not decode.
pub fn decode_rgb8_named(bytes: &[u8], name: Option<&str>, limits: &DecodeLimits) -> Result<RgbImage, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let format = detect_format(bytes, name)?;
    let name = format_name(format);

    // Header only: the decoders parse headers at construction and allocate no pixel buffer.
    // Width/height limits are left off here so that we can report the actual dimensions.
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut alloc_only = image::Limits::default();
    alloc_only.max_alloc = Some(limits.max_alloc);
    reader.limits(alloc_only);
    let mut decoder = reader.into_decoder().map_err(|e| map_image_error(name, e))?;

    let (width, height) = decoder.dimensions();
    check_dimensions(name, width, height, limits)?;
    let mut strict = image::Limits::default();
    strict.max_image_width = Some(limits.max_width);
    strict.max_image_height = Some(limits.max_height);
    strict.max_alloc = Some(limits.max_alloc);
    decoder.set_limits(strict).map_err(|e| map_image_error(name, e))?;
    let total = decoder.total_bytes();
    if total > limits.max_alloc {
        return Err(DecodeError::TooLarge {
            width,
            height,
            reason: format!(
                "needs {total} bytes to decode ({:?}), more than the limit of {} bytes",
                decoder.color_type(),
                limits.max_alloc
            ),
        });
    }

    if format == ImageFormat::Jpeg {
        check_jpeg_complete(bytes).map_err(|e| match e {
            JpegStructure::Truncated(detail) => DecodeError::Truncated { format: name.into(), detail },
            JpegStructure::Corrupt(detail) => DecodeError::Corrupt { format: name.into(), detail },
        })?;
    }

    // A broken EXIF block is no reason to drop an otherwise fine image: fall back to "as stored".
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| map_image_error(name, e))?;
    img.apply_orientation(orientation);
    Ok(to_rgb8_over_background(img))
}

/// Extensions of image formats the `image` crate does not know, with their names (so that an
/// unrecognised file so named gets "unsupported image format X", and a tar member so named is an
/// input).
pub const OTHER_IMAGE_EXTENSIONS: &[(&str, &str)] = &[
    ("pcx", "PCX"),
    ("heic", "HEIF/HEIC"),
    ("heif", "HEIF/HEIC"),
    ("jxl", "JPEG XL"),
    ("jp2", "JPEG 2000"),
    ("j2k", "JPEG 2000"),
    ("psd", "Photoshop PSD"),
    ("svg", "SVG (vector graphics)"),
    ("cr2", "camera raw (Canon CR2)"),
    ("cr3", "camera raw (Canon CR3)"),
    ("nef", "camera raw (Nikon NEF)"),
    ("arw", "camera raw (Sony ARW)"),
    ("dng", "camera raw (DNG)"),
    ("raf", "camera raw (Fujifilm RAF)"),
    ("orf", "camera raw (Olympus ORF)"),
    ("rw2", "camera raw (Panasonic RW2)"),
];

/// The extension of a file name, lower case.
fn extension(name: &str) -> Option<String> {
    let file = name.rsplit(['/', '\\']).next().unwrap_or(name);
    file.rsplit_once('.').filter(|(stem, _)| !stem.is_empty()).map(|(_, e)| e.to_ascii_lowercase())
}

/// The format of `bytes`: from the content; for content without a signature, from the name's
/// extension (TGA only). A recognised format this build does not decode is an error naming it.
fn detect_format(bytes: &[u8], name: Option<&str>) -> Result<ImageFormat, DecodeError> {
    let ext = name.and_then(extension);
    let by_name = ext.as_deref().and_then(ImageFormat::from_extension);
    match image::guess_format(bytes) {
        Ok(f) if decodes(f) => Ok(f),
        Ok(other) => Err(DecodeError::UnsupportedFormat { format: format_name(other).to_string() }),
        Err(_) => {
            if let Some(what) = unsupported_signature(bytes) {
                return Err(DecodeError::UnsupportedFormat { format: what.to_string() });
            }
            match by_name {
                // TGA files carry no signature: the name is all there is.
                Some(ImageFormat::Tga) => Ok(ImageFormat::Tga),
                Some(f) if !decodes(f) => Err(DecodeError::UnsupportedFormat {
                    format: format!("{} (by the file name; the content is not recognised)", format_name(f)),
                }),
                Some(_) => Err(DecodeError::NotAnImage { head: describe_head(bytes) }),
                None => match OTHER_IMAGE_EXTENSIONS.iter().find(|(e, _)| Some(*e) == ext.as_deref()) {
                    Some((_, what)) => Err(DecodeError::UnsupportedFormat {
                        format: format!("{what} (by the file name; the content is not recognised)"),
                    }),
                    None => Err(DecodeError::NotAnImage { head: describe_head(bytes) }),
                },
            }
        }
    }
}

/// Image (and look-alike) formats the `image` crate does not recognise, by their signatures, so
/// that the error says what the file is.
fn unsupported_signature(b: &[u8]) -> Option<&'static str> {
    if b.len() >= 12 && &b[4..8] == b"ftyp" {
        // ISO base media files: the major brand says which.
        return Some(match &b[8..12] {
            b"avif" | b"avis" => "AVIF",
            b"heic" | b"heix" | b"hevc" | b"hevx" | b"heim" | b"heis" | b"mif1" | b"msf1" => "HEIF/HEIC",
            b"crx " => "Canon CR3 raw",
            _ => "ISO media (MP4/QuickTime video?), not a still image",
        });
    }
    let starts = |sig: &[u8]| b.starts_with(sig);
    if starts(&[0xFF, 0x0A]) || starts(b"\0\0\0\x0cJXL \r\n\x87\n") {
        return Some("JPEG XL");
    }
    if starts(b"8BPS") {
        return Some("Photoshop PSD");
    }
    if starts(b"%PDF") {
        return Some("PDF (a document, not an image)");
    }
    let head = String::from_utf8_lossy(&b[..b.len().min(512)]).to_ascii_lowercase();
    if head.trim_start().starts_with("<svg") || (head.trim_start().starts_with("<?xml") && head.contains("<svg")) {
        return Some("SVG (vector graphics)");
    }
    None
}

fn format_name(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Png => "PNG",
        ImageFormat::WebP => "WebP",
        ImageFormat::Gif => "GIF",
        ImageFormat::Tiff => "TIFF",
        ImageFormat::Bmp => "BMP",
        ImageFormat::Avif => "AVIF",
        ImageFormat::Ico => "ICO",
        ImageFormat::Pnm => "PNM",
        ImageFormat::Tga => "TGA",
        ImageFormat::Dds => "DDS",
        ImageFormat::Hdr => "HDR",
        ImageFormat::OpenExr => "OpenEXR",
        ImageFormat::Farbfeld => "farbfeld",
        ImageFormat::Qoi => "QOI",
        #[allow(deprecated)]
        ImageFormat::Pcx => "PCX",
        _ => "(unknown)",
    }
}

/// The first bytes of a file, for "not an image" messages: quoted if they are printable text
/// (an HTML error page saved as `.jpg` is the classic), hex otherwise.
fn describe_head(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(16)];
    let printable = head.iter().all(|&b| b == b'\t' || b == b'\n' || b == b'\r' || (0x20..0x7f).contains(&b));
    if printable {
        format!("{:?}", String::from_utf8_lossy(head))
    } else {
        let hex: Vec<String> = head.iter().map(|b| format!("{b:02x}")).collect();
        format!("bytes {}", hex.join(" "))
    }
}

fn check_dimensions(format: &str, width: u32, height: u32, limits: &DecodeLimits) -> Result<(), DecodeError> {
    let too_large = |reason: String| Err(DecodeError::TooLarge { width, height, reason });
    if width == 0 || height == 0 {
        return Err(DecodeError::Corrupt {
            format: format.into(),
            detail: format!("the header gives an empty size {width}x{height}"),
        });
    }
    if width > limits.max_width || height > limits.max_height {
        return too_large(format!("exceeds the maximum size of {}x{} pixels", limits.max_width, limits.max_height));
    }
    let pixels = width as u64 * height as u64;
    if pixels > limits.max_pixels {
        return too_large(format!("has {pixels} pixels, more than the limit of {}", limits.max_pixels));
    }
    Ok(())
}

fn map_image_error(format: &str, e: ImageError) -> DecodeError {
    let format = format.to_string();
    match e {
        ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            DecodeError::Truncated { format, detail: io.to_string() }
        }
        ImageError::Unsupported(u) => DecodeError::UnsupportedFeature { format, detail: u.to_string() },
        ImageError::Limits(l) => DecodeError::LimitExceeded { format, detail: l.to_string() },
        other => {
            let detail = other.to_string();
            let lower = detail.to_ascii_lowercase();
            if ["end of file", "eof", "truncated", "no more data", "not enough data", "unexpected end"]
                .iter()
                .any(|p| lower.contains(p))
            {
                DecodeError::Truncated { format, detail }
            } else {
                DecodeError::Corrupt { format, detail }
            }
        }
    }
}

/// Outcome of the JPEG structure walk.
enum JpegStructure {
    Truncated(String),
    Corrupt(String),
}

/// Walks the marker segments of a JPEG file and checks that it ends properly.
///
/// Header segments are skipped by their length fields; after each SOS (start of scan) the
/// entropy-coded data is scanned for the next marker (in entropy-coded data every 0xFF byte is
/// followed by a stuffed 0x00, a restart marker or fill bytes, so the first other marker ends
/// the scan). The walk succeeds at the first EOI marker; reaching the end of the bytes first
/// means the file was cut short. Data after EOI (trailers some cameras append) is ignored.
fn check_jpeg_complete(b: &[u8]) -> Result<(), JpegStructure> {
    use JpegStructure::{Corrupt, Truncated};
    if b.len() < 4 || b[0] != 0xFF || b[1] != 0xD8 {
        return Err(Corrupt("missing the start-of-image marker".into()));
    }
    let mut pos = 2;
    let mut scans = 0usize;
    loop {
        // Find the next marker; tolerate junk between segments as libjpeg does.
        match b[pos..].iter().position(|&x| x == 0xFF) {
            Some(off) => pos += off,
            None => {
                return Err(Truncated(format!("the data ends after {scans} scan(s) without an end-of-image marker")))
            }
        }
        while pos < b.len() && b[pos] == 0xFF {
            pos += 1; // 0xFF fill bytes
        }
        let Some(&marker) = b.get(pos) else {
            return Err(Truncated("the data ends inside a marker".into()));
        };
        pos += 1;
        match marker {
            0xD9 => {
                return if scans == 0 {
                    Err(Corrupt("end-of-image marker before any image data".into()))
                } else {
                    Ok(())
                };
            }
            // Standalone markers without a length: restart markers, TEM, stray SOI.
            0xD0..=0xD8 | 0x01 | 0x00 => continue,
            _ => {}
        }
        if pos + 2 > b.len() {
            return Err(Truncated(format!("the data ends inside the header of marker 0xFF{marker:02X}")));
        }
        let len = u16::from_be_bytes([b[pos], b[pos + 1]]) as usize;
        if len < 2 {
            return Err(Corrupt(format!("marker 0xFF{marker:02X} has an invalid length {len}")));
        }
        if pos + len > b.len() {
            return Err(Truncated(format!(
                "segment 0xFF{marker:02X} at byte {} needs {len} bytes but the file ends after {}",
                pos - 2,
                b.len() - pos
            )));
        }
        pos += len;
        if marker == 0xDA {
            scans += 1;
            // Entropy-coded data: stop at the first real marker.
            loop {
                match b[pos..].iter().position(|&x| x == 0xFF) {
                    Some(off) => pos += off,
                    None => {
                        return Err(Truncated(format!(
                            "the data ends inside scan {scans} without an end-of-image marker ({} bytes)",
                            b.len()
                        )))
                    }
                }
                match b.get(pos + 1) {
                    None => return Err(Truncated(format!("the data ends inside scan {scans}"))),
                    Some(0x00) | Some(0xD0..=0xD7) => pos += 2,
                    Some(0xFF) => pos += 1,
                    Some(_) => break,
                }
            }
        }
    }
}

/// Any decoded image to 8-bit RGB, compositing alpha over [`ALPHA_BACKGROUND`].
fn to_rgb8_over_background(img: DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        // L8/L16 replicate to R=G=B; 16-bit and float round to 8 bits.
        return img.into_rgb8();
    }
    let (w, h) = (img.width(), img.height());
    let bg = ALPHA_BACKGROUND;
    if matches!(img, DynamicImage::ImageLumaA8(_) | DynamicImage::ImageRgba8(_)) {
        let rgba = img.into_rgba8();
        RgbImage::from_fn(w, h, |x, y| {
            let [r, g, b, a] = rgba.get_pixel(x, y).0;
            let a = a as u32;
            let mix = |c: u8, k: u8| ((c as u32 * a + k as u32 * (255 - a) + 127) / 255) as u8;
            image::Rgb([mix(r, bg[0]), mix(g, bg[1]), mix(b, bg[2])])
        })
    } else {
        // 16-bit with alpha: composite at 16 bits and round once to 8 (integers, 8 bytes/pixel).
        const MAX: u64 = 65535;
        let rgba = img.into_rgba16();
        RgbImage::from_fn(w, h, |x, y| {
            let [r, g, b, a] = rgba.get_pixel(x, y).0;
            let a = a as u64;
            let mix = |c: u16, k: u8| {
                let num = c as u64 * a + k as u64 * 257 * (MAX - a); // in units of 1 / 65535^2
                ((num * 255 + MAX * MAX / 2) / (MAX * MAX)) as u8
            };
            image::Rgb([mix(r, bg[0]), mix(g, bg[1]), mix(b, bg[2])])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn odd(name: &str) -> Vec<u8> {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/odd").join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn pool(name: &str) -> Vec<u8> {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/pool").join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn dec(name: &str) -> Result<RgbImage, DecodeError> {
        decode_rgb8(&odd(name), &DecodeLimits::default())
    }

    /// Mean absolute difference per sample of two same-sized images.
    fn mad(a: &RgbImage, b: &RgbImage) -> f64 {
        assert_eq!(a.dimensions(), b.dimensions());
        let s: u64 =
            a.as_raw().iter().zip(b.as_raw()).map(|(&x, &y)| (x as i32 - y as i32).unsigned_abs() as u64).sum();
        s as f64 / a.as_raw().len() as f64
    }

    fn channel_means(img: &RgbImage) -> [f64; 3] {
        let mut s = [0f64; 3];
        for p in img.pixels() {
            for (acc, &v) in s.iter_mut().zip(&p.0) {
                *acc += v as f64;
            }
        }
        let n = (img.width() * img.height()) as f64;
        s.map(|v| v / n)
    }

    #[test]
    fn invalid_files_are_errors_with_reasons() {
        let e = dec("empty.png").unwrap_err();
        assert!(matches!(e, DecodeError::Empty), "{e}");
        assert_eq!(e.to_string(), "empty file (0 bytes)");

        let e = dec("not_an_image.jpg").unwrap_err();
        assert!(matches!(e, DecodeError::NotAnImage { .. }), "{e}");
        assert!(e.to_string().contains("this is a text f"), "{e}");

        let e = dec("truncated.jpg").unwrap_err();
        assert!(matches!(e, DecodeError::Truncated { .. }), "{e}");
        assert!(e.to_string().starts_with("truncated JPEG file"), "{e}");
    }

    #[test]
    fn truncation_is_an_error_for_every_format() {
        for name in ["progressive.jpg", "exif_orientation_6.jpg", "palette.png", "alpha_rgba.png", "lossy.webp"] {
            let full = odd(name);
            assert!(decode_rgb8(&full, &DecodeLimits::default()).is_ok(), "{name}");
            for frac in [0.3, 0.6, 0.9] {
                let cut = &full[..(full.len() as f64 * frac) as usize];
                match decode_rgb8(cut, &DecodeLimits::default()) {
                    Ok(_) => panic!("{name} cut to {} bytes decoded without error", cut.len()),
                    Err(e) => {
                        assert!(matches!(e, DecodeError::Truncated { .. } | DecodeError::Corrupt { .. }), "{name}: {e}")
                    }
                }
            }
        }
        // Losing just the final EOI marker is reported too.
        let full = odd("progressive.jpg");
        let e = decode_rgb8(&full[..full.len() - 2], &DecodeLimits::default()).unwrap_err();
        assert!(matches!(e, DecodeError::Truncated { .. }), "{e}");
    }

    #[test]
    fn trailing_bytes_after_eoi_are_fine() {
        let mut b = odd("progressive.jpg");
        b.extend_from_slice(b"\0\0trailer written by some camera");
        assert!(decode_rgb8(&b, &DecodeLimits::default()).is_ok());
    }

    #[test]
    fn exif_orientation_6_is_rotated() {
        let bytes = odd("exif_orientation_6.jpg");
        // As stored, the JPEG is 256 wide and 340 high.
        let raw = image::load_from_memory(&bytes).unwrap();
        assert_eq!((raw.width(), raw.height()), (256, 340));
        let img = dec("exif_orientation_6.jpg").unwrap();
        assert_eq!(img.dimensions(), (340, 256));
        // Orientation 6 = rotate 90 degrees clockwise to display.
        let expect = image::imageops::rotate90(&raw.to_rgb8());
        assert_eq!(img, expect);
    }

    #[test]
    fn grayscale_is_replicated() {
        for name in ["grayscale.png", "grayscale_16bit.png"] {
            let img = dec(name).unwrap();
            assert_eq!(img.dimensions(), (340, 256), "{name}");
            assert!(img.pixels().all(|p| p[0] == p[1] && p[1] == p[2]), "{name}");
            let distinct: std::collections::HashSet<u8> = img.pixels().map(|p| p[0]).collect();
            assert!(distinct.len() > 50, "{name}: only {} grey levels", distinct.len());
        }
        // The 16-bit file reduced to 8 bits is the same picture as the 8-bit one.
        let (a, b) = (dec("grayscale.png").unwrap(), dec("grayscale_16bit.png").unwrap());
        assert!(mad(&a, &b) < 1.5, "mad {}", mad(&a, &b));
    }

    #[test]
    fn sixteen_bit_is_rounded_not_truncated() {
        let img = image::ImageBuffer::<image::Luma<u16>, _>::from_fn(4, 1, |x, _| {
            image::Luma([[0u16, 257 * 100 + 128, 65535, 257 * 7][x as usize]])
        });
        let mut png = Vec::new();
        DynamicImage::ImageLuma16(img).write_to(&mut Cursor::new(&mut png), ImageFormat::Png).unwrap();
        let out = decode_rgb8(&png, &DecodeLimits::default()).unwrap();
        let row: Vec<u8> = out.pixels().map(|p| p[0]).collect();
        assert_eq!(row, vec![0, 100, 255, 7]);
    }

    #[test]
    fn alpha_is_composited_over_white() {
        let bytes = odd("alpha_rgba.png");
        let rgba = image::load_from_memory(&bytes).unwrap().to_rgba8();
        let img = decode_rgb8(&bytes, &DecodeLimits::default()).unwrap();
        assert_eq!(img.dimensions(), rgba.dimensions());
        let (mut transparent, mut opaque) = (0, 0);
        for (p, q) in rgba.pixels().zip(img.pixels()) {
            let a = p[3] as f64 / 255.0;
            for c in 0..3 {
                let want = p[c] as f64 * a + 255.0 * (1.0 - a);
                assert!((q[c] as f64 - want).abs() <= 0.51, "{p:?} -> {q:?}");
            }
            if p[3] == 0 {
                transparent += 1;
                assert_eq!(q.0, ALPHA_BACKGROUND);
            } else if p[3] == 255 {
                opaque += 1;
            }
        }
        assert!(transparent > 0 && opaque > 0, "fixture has both transparent and opaque pixels");
    }

    #[test]
    fn sixteen_bit_alpha_over_white() {
        let img = image::ImageBuffer::<image::Rgba<u16>, _>::from_fn(2, 1, |x, _| {
            if x == 0 {
                image::Rgba([0, 0, 0, 0])
            } else {
                image::Rgba([0, 65535, 0, 32768])
            }
        });
        let mut png = Vec::new();
        DynamicImage::ImageRgba16(img).write_to(&mut Cursor::new(&mut png), ImageFormat::Png).unwrap();
        let out = decode_rgb8(&png, &DecodeLimits::default()).unwrap();
        assert_eq!(out.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(out.get_pixel(1, 0).0, [127, 255, 127]);
    }

    #[test]
    fn palette_matches_the_expanded_colours() {
        let bytes = odd("palette.png");
        let img = decode_rgb8(&bytes, &DecodeLimits::default()).unwrap();
        assert_eq!(img.dimensions(), (340, 256));
        let reference = image::load_from_memory(&bytes).unwrap();
        assert!(!matches!(reference, DynamicImage::ImageLuma8(_)));
        assert_eq!(img, reference.to_rgb8());
        let distinct: std::collections::HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
        assert!(distinct.len() > 16 && distinct.len() <= 256, "{} colours", distinct.len());
    }

    /// The odd-file fixtures at 340x256 are conversions of pool photo-00010 (the brambling);
    /// the converted ones must look like it.
    #[test]
    fn conversions_match_the_original_photo() {
        let original = decode_rgb8(&pool("photo-00010.jpg"), &DecodeLimits::default()).unwrap();
        for (name, tolerance) in
            [("progressive.jpg", 4.0), ("lossy.webp", 8.0), ("cmyk.jpg", 8.0), ("palette.png", 8.0)]
        {
            let img = dec(name).unwrap();
            let d = mad(&img, &original);
            assert!(d < tolerance, "{name}: mean abs diff {d:.2} vs the original photo");
        }
    }

    #[test]
    fn cmyk_is_not_inverted() {
        let img = dec("cmyk.jpg").unwrap();
        let original = decode_rgb8(&pool("photo-00010.jpg"), &DecodeLimits::default()).unwrap();
        let (m, o) = (channel_means(&img), channel_means(&original));
        for c in 0..3 {
            assert!((m[c] - o[c]).abs() < 6.0, "channel {c}: {:.1} vs {:.1}", m[c], o[c]);
        }
        // An inverted decode would be far away.
        let inverted = RgbImage::from_fn(img.width(), img.height(), |x, y| {
            let p = img.get_pixel(x, y).0;
            image::Rgb([255 - p[0], 255 - p[1], 255 - p[2]])
        });
        assert!(mad(&inverted, &original) > 40.0);
    }

    #[test]
    fn every_valid_odd_file_decodes() {
        for (name, dims) in [
            ("alpha_rgba.png", (512, 512)),
            ("cmyk.jpg", (340, 256)),
            ("exif_orientation_6.jpg", (340, 256)),
            ("grayscale.png", (340, 256)),
            ("grayscale_16bit.png", (340, 256)),
            ("lossy.webp", (340, 256)),
            ("palette.png", (340, 256)),
            ("panorama_8x1.jpg", (1600, 200)),
            ("progressive.jpg", (340, 256)),
            ("tiny_24px.png", (24, 24)),
        ] {
            let img = dec(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(img.dimensions(), dims, "{name}");
            // Not a flat grey placeholder.
            let distinct: std::collections::HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
            assert!(distinct.len() > 10, "{name}: {} colours", distinct.len());
        }
    }

    #[test]
    fn format_comes_from_content_not_name() {
        // A PNG's bytes decode whatever the file is called; the API never sees the name anyway,
        // but a JPEG-looking name must not matter for the detection either.
        let png = odd("tiny_24px.png");
        assert_eq!(decode_rgb8(&png, &DecodeLimits::default()).unwrap().dimensions(), (24, 24));
        // An AVIF is recognised and named, not "not an image".
        let avif = b"\0\0\0\x1cftypavif\0\0\0\0avifmif1miaf";
        let e = decode_rgb8(avif, &DecodeLimits::default()).unwrap_err();
        assert!(matches!(e, DecodeError::UnsupportedFormat { .. }), "{e}");
        assert!(e.to_string().contains("AVIF") && e.to_string().contains("GIF"), "{e}");
        let e = decode_rgb8(&[0x00, 0x01, 0xfe, 0x7f, 0x80], &DecodeLimits::default()).unwrap_err();
        assert!(e.to_string().contains("bytes 00 01 fe 7f 80"), "{e}");
        // Only where the content has no signature does the name count: TGA.
        let img = RgbImage::from_fn(20, 10, |x, y| image::Rgb([x as u8 * 9, y as u8 * 20, 77]));
        let mut tga = Vec::new();
        DynamicImage::ImageRgb8(img.clone()).write_to(&mut Cursor::new(&mut tga), ImageFormat::Tga).unwrap();
        assert!(matches!(decode_rgb8(&tga, &DecodeLimits::default()), Err(DecodeError::NotAnImage { .. })));
        assert_eq!(decode_rgb8_named(&tga, Some("dir/x.TGA"), &DecodeLimits::default()).unwrap(), img);
        let e = decode_rgb8_named(b"\x0a\x05\x01\x08rest", Some("old.pcx"), &DecodeLimits::default()).unwrap_err();
        assert!(e.to_string().contains("unsupported image format PCX"), "{e}");
    }

    /// Every format the `image` crate can write is decoded back to the same picture (lossless
    /// ones exactly), with the alpha of formats that have one composited over white.
    #[test]
    fn every_format_the_image_crate_writes_decodes() {
        let img = RgbImage::from_fn(40, 24, |x, y| image::Rgb([(x * 6) as u8, (y * 10) as u8, ((x + y) * 3) as u8]));
        let mut seen = Vec::new();
        for f in ImageFormat::all().filter(|f| f.writing_enabled()) {
            let mut bytes = Vec::new();
            let src = match f {
                // Float and alpha-only encoders (the ICO decoder takes only RGBA PNGs inside).
                ImageFormat::Hdr | ImageFormat::OpenExr => {
                    DynamicImage::ImageRgb32F(DynamicImage::ImageRgb8(img.clone()).into_rgb32f())
                }
                ImageFormat::Farbfeld => DynamicImage::ImageRgba16(DynamicImage::ImageRgb8(img.clone()).into_rgba16()),
                ImageFormat::Ico => DynamicImage::ImageRgba8(DynamicImage::ImageRgb8(img.clone()).into_rgba8()),
                _ => DynamicImage::ImageRgb8(img.clone()),
            };
            if let Err(e) = src.write_to(&mut Cursor::new(&mut bytes), f) {
                panic!("{f:?}: cannot write the fixture: {e}");
            }
            let name = format!("x.{}", f.extensions_str()[0]);
            let out = decode_rgb8_named(&bytes, Some(&name), &DecodeLimits::default())
                .unwrap_or_else(|e| panic!("{f:?}: {e}"));
            assert_eq!(out.dimensions(), (40, 24), "{f:?}");
            let d = mad(&out, &img);
            let tolerance = match f {
                ImageFormat::Jpeg => 6.0,
                ImageFormat::Gif => 12.0, // 256-colour palette
                ImageFormat::Hdr => 2.0,  // shared-exponent RGBE
                _ => 0.51,
            };
            assert!(d <= tolerance, "{f:?}: mean abs diff {d:.2}");
            seen.push(f);
        }
        for f in [
            ImageFormat::Gif,
            ImageFormat::Bmp,
            ImageFormat::Tiff,
            ImageFormat::Tga,
            ImageFormat::Qoi,
            ImageFormat::OpenExr,
        ] {
            assert!(seen.contains(&f), "{f:?} was not covered");
        }
    }

    /// A PNG header claiming an enormous size is refused from the header alone.
    #[test]
    fn decompression_bombs_are_refused_before_allocation() {
        let mut png = odd("tiny_24px.png");
        // IHDR width/height live at bytes 16..24; the CRC is then wrong, so the check below must
        // come first for the message to name the size.
        png[16..20].copy_from_slice(&60_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&60_000u32.to_be_bytes());
        let crc = crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        let e = decode_rgb8(&png, &DecodeLimits::default()).unwrap_err();
        assert!(matches!(e, DecodeError::TooLarge { width: 60_000, height: 60_000, .. }), "{e}");
        assert!(e.to_string().contains("60000x60000"), "{e}");

        let limits = DecodeLimits { max_pixels: 1000, ..DecodeLimits::default() };
        let e = decode_rgb8(&odd("progressive.jpg"), &limits).unwrap_err();
        assert!(e.to_string().contains("340x256") && e.to_string().contains("1000"), "{e}");

        let limits = DecodeLimits { max_alloc: 10_000, ..DecodeLimits::default() };
        let e = decode_rgb8(&odd("progressive.jpg"), &limits).unwrap_err();
        assert!(matches!(e, DecodeError::TooLarge { .. }), "{e}");

        let limits = DecodeLimits { max_width: 300, ..DecodeLimits::default() };
        let e = decode_rgb8(&odd("panorama_8x1.jpg"), &limits).unwrap_err();
        assert!(e.to_string().contains("1600x200") && e.to_string().contains("300x16384"), "{e}");
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    #[test]
    fn panics_never_escape_on_garbage() {
        // Valid signatures followed by noise: errors, not panics.
        let mut seed = 0x1234_5678u32;
        let mut noise = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed as u8
                })
                .collect()
        };
        for prefix in [&b"\xFF\xD8\xFF\xE0"[..], b"\x89PNG\r\n\x1a\n", b"RIFF\x10\x00\x00\x00WEBPVP8 "] {
            for n in [0, 10, 200, 5000] {
                let mut b = prefix.to_vec();
                b.extend(noise(n));
                assert!(decode_rgb8(&b, &DecodeLimits::default()).is_err());
            }
        }
    }
}
