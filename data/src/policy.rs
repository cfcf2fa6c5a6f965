//! The resize / crop / augment policy: which N x N images the teacher sees for one source image.
//!
//! For a source of `w x h` pixels (after EXIF orientation), `short = min(w, h)` and output side
//! `N = resolution`, [`make_samples`] produces `variants` samples:
//!
//! * **Variant 0** is the centred square crop of side `short` (offset rounded down), i.e. the
//!   classic "resize the shorter side to N, centre-crop N x N".
//! * **Variants 1..** are random square crops: side uniform in
//!   `[min(short, max(N, short / 2)), short]`, position uniform over the places it fits. A crop is
//!   never smaller than N unless the whole image is, so crops do not upsample unless the image
//!   is smaller than N (then every crop is the full `short` square, upsampled).
//! * Each crop is resampled **once**, from source pixels straight to N x N, with a Lanczos3
//!   (a = 3) convolution whose support widens with the scale factor when downsampling (area
//!   anti-aliasing), by `fast_image_resize`. The crop is a window on the source: near its
//!   edges the filter reads the source pixels just outside it where there are any (as PIL's
//!   `resize(size, box=...)` does) instead of clamping at the crop border. Filtering happens on
//!   the 8-bit sRGB values (gamma space, no linearisation), as PIL's `Image.resize(..., LANCZOS)` and torchvision's
//!   `Resize` on PIL images do, so the images match what Python pipelines feed the teacher.
//! * **hflip** (if enabled): each sample is mirrored left-right with probability 1/2.
//! * **Colour augmentation** (madebyollin's recipe), for a fraction `color_augment` of samples:
//!   with `M = 0.5 + randn(3, 3)` and per-channel `t = rand(3)`, every pixel `p` (RGB in [0, 1])
//!   becomes `p + (clamp(M p, 0, 1) - p) * t`, quantised back to 8 bits (rounded).
//!
//! All randomness comes from one ChaCha8 stream per `(seed, source_id, variant)`, keyed by a
//! SHA-256 of those values, so a sample depends only on its own inputs: the same on every
//! machine, thread and run, and independent of which other images are in the batch. The draws
//! are taken in a fixed order (crop side, x, y for variants >= 1; flip coin; colour coin; the
//! nine matrix entries row-major and three blend weights when the colour coin says yes), and the
//! coins are always drawn, so turning `hflip` on or off does not change which samples get colour
//! augmentation, nor any crop.

use fast_image_resize::{images::Image, images::ImageRef, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use sha2::{Digest, Sha256};
use taesd_schemas::conventions::{u8_to_unit, unit_to_u8};

/// Domain separation for the per-sample RNG key; bump if the draw order ever changes.
const RNG_DOMAIN: &[u8] = b"taesd-data/policy/v1\0";

/// A crop in source pixels (after EXIF orientation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropRect {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

/// The sampling settings (a subset of [`taesd_schemas::OutputConfig`]).
#[derive(Clone, Debug)]
pub struct AugmentConfig {
    /// Output side N: every sample is N x N.
    pub resolution: u32,
    /// Samples per source image (0 is treated as 1).
    pub variants: u32,
    /// Mirror each sample with probability 1/2.
    pub hflip: bool,
    /// Probability in [0, 1] that a sample gets the colour augmentation.
    pub color_augment: f32,
    /// Global seed.
    pub seed: u64,
}

impl AugmentConfig {
    /// The settings from an output folder's configuration.
    pub fn from_output_config(c: &taesd_schemas::OutputConfig) -> Self {
        AugmentConfig {
            resolution: c.resolution,
            variants: c.variants,
            hflip: c.hflip,
            color_augment: c.color_augment,
            seed: c.seed,
        }
    }
}

/// The default smallest short side of a source: half the resolution. A smaller source would be
/// enlarged more than 2x (a 1x1 image becomes a flat square, a 4000x10 sliver a 10x10 crop
/// blown up 25x): such images teach nothing but blur.
pub fn default_min_side(resolution: u32) -> u32 {
    resolution / 2
}

/// Whether a `w x h` source (after EXIF orientation) may become samples: its short side is at
/// least `min_side` pixels. Else the reason, for `errors.jsonl`.
pub fn check_source_size(w: u32, h: u32, min_side: u32, resolution: u32) -> Result<(), String> {
    let short = w.min(h);
    if short >= min_side {
        return Ok(());
    }
    Err(format!(
        "image is {w}x{h}: its short side of {short} px is below --min-side {min_side} (crops would be enlarged {:.1}x to \
         {resolution} px; pass a smaller --min-side to keep such images)",
        resolution as f64 / short.max(1) as f64
    ))
}

/// Whether a sample's crop is smaller than the output: its pixels were enlarged (an image whose
/// short side is below the resolution; see the module documentation).
pub fn is_upscaled(crop: &CropRect, resolution: u32) -> bool {
    crop.w < resolution || crop.h < resolution
}

/// One N x N image made from a source, and how it was made.
#[derive(Clone, Debug)]
pub struct Sample {
    pub variant: u32,
    /// The crop, in source pixels.
    pub crop: CropRect,
    /// Mirrored left-right (after cropping).
    pub flip: bool,
    /// The colour augmentation was applied.
    pub color_aug: bool,
    /// `resolution x resolution` RGB.
    pub rgb: RgbImage,
}

/// The random decisions for one sample, before any pixel work.
#[derive(Clone, Debug)]
struct Plan {
    crop: CropRect,
    flip: bool,
    /// `(M, t)` of the colour augmentation, when chosen.
    color: Option<([[f32; 3]; 3], [f32; 3])>,
}

/// The samples of one source image; see the module documentation for the policy.
///
/// # Panics
/// If `cfg.resolution` is 0 or `src` is empty.
pub fn make_samples(src: &RgbImage, source_id: &str, cfg: &AugmentConfig) -> Vec<Sample> {
    let n = cfg.resolution;
    assert!(n > 0, "resolution must be positive");
    assert!(src.width() > 0 && src.height() > 0, "empty source image");
    let src_view = ImageRef::new(src.width(), src.height(), src.as_raw(), PixelType::U8x3)
        .expect("an RgbImage buffer always fits its dimensions");
    let mut resizer = Resizer::new();
    (0..cfg.variants.max(1))
        .map(|variant| {
            let plan = plan(src.width(), src.height(), source_id, variant, cfg);
            let mut rgb = resize_crop(&mut resizer, &src_view, plan.crop, n);
            if plan.flip {
                image::imageops::flip_horizontal_in_place(&mut rgb);
            }
            if let Some((m, t)) = plan.color {
                color_mix(&mut rgb, &m, &t);
            }
            Sample { variant, crop: plan.crop, flip: plan.flip, color_aug: plan.color.is_some(), rgb }
        })
        .collect()
}

/// The RNG of one sample.
fn sample_rng(seed: u64, source_id: &str, variant: u32) -> ChaCha8Rng {
    let mut h = Sha256::new();
    h.update(RNG_DOMAIN);
    h.update(seed.to_le_bytes());
    h.update(variant.to_le_bytes());
    h.update(source_id.as_bytes());
    ChaCha8Rng::from_seed(h.finalize().into())
}

fn plan(w: u32, h: u32, source_id: &str, variant: u32, cfg: &AugmentConfig) -> Plan {
    let mut rng = sample_rng(cfg.seed, source_id, variant);
    let short = w.min(h);
    let crop = if variant == 0 {
        CropRect { x: (w - short) / 2, y: (h - short) / 2, w: short, h: short }
    } else {
        let lo = short.min(cfg.resolution.max(short / 2));
        let side = rng.random_range(lo..=short);
        let x = rng.random_range(0..=w - side);
        let y = rng.random_range(0..=h - side);
        CropRect { x, y, w: side, h: side }
    };
    let flip_coin = rng.random_bool(0.5);
    let color_coin: f32 = rng.random();
    let color = (color_coin < cfg.color_augment).then(|| {
        let mut m = [[0f32; 3]; 3];
        for row in &mut m {
            for v in row.iter_mut() {
                *v = 0.5 + rng.sample::<f32, _>(StandardNormal);
            }
        }
        let t: [f32; 3] = [rng.random(), rng.random(), rng.random()];
        (m, t)
    });
    Plan { crop, flip: cfg.hflip && flip_coin, color }
}

/// Resample `crop` of `src` to `n x n` in one Lanczos3 pass.
fn resize_crop(resizer: &mut Resizer, src: &ImageRef<'_>, crop: CropRect, n: u32) -> RgbImage {
    let mut dst = Image::new(n, n, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3)).crop(
        crop.x as f64,
        crop.y as f64,
        crop.w as f64,
        crop.h as f64,
    );
    resizer.resize(src, &mut dst, &options).expect("same pixel type and a crop inside the source");
    RgbImage::from_raw(n, n, dst.into_vec()).expect("n*n*3 bytes")
}

/// `p + (clamp(M p, 0, 1) - p) * t` on every pixel, in [0, 1] units.
fn color_mix(img: &mut RgbImage, m: &[[f32; 3]; 3], t: &[f32; 3]) {
    for px in img.pixels_mut() {
        let p = px.0.map(u8_to_unit);
        for c in 0..3 {
            let aug = (m[c][0] * p[0] + m[c][1] * p[1] + m[c][2] * p[2]).clamp(0.0, 1.0);
            px.0[c] = unit_to_u8(p[c] + (aug - p[c]) * t[c]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn cfg(variants: u32) -> AugmentConfig {
        AugmentConfig { resolution: 64, variants, hflip: false, color_augment: 0.0, seed: 7 }
    }

    fn odd(name: &str) -> RgbImage {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/odd").join(name);
        crate::decode::decode_rgb8(&std::fs::read(p).unwrap(), &Default::default()).unwrap()
    }

    /// A test image with structure in both directions (no mirror symmetry).
    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 255 / w.max(2)) as u8, (y * 255 / h.max(2)) as u8, ((x * 7 + y * 3) % 256) as u8])
        })
    }

    #[test]
    fn small_sources_are_refused_and_enlarged_crops_are_named() {
        assert_eq!(default_min_side(256), 128);
        assert!(check_source_size(300, 128, 128, 256).is_ok());
        let e = check_source_size(1, 1, 128, 256).unwrap_err();
        assert!(e.contains("1x1") && e.contains("--min-side 128") && e.contains("256.0x"), "{e}");
        let e = check_source_size(4000, 10, 32, 64).unwrap_err();
        assert!(e.contains("4000x10") && e.contains("short side of 10 px"), "{e}");
        assert!(check_source_size(1, 1, 0, 256).is_ok(), "--min-side 0 keeps everything");
        // The tiny fixture's crops are enlarged; a pool-sized image's are not.
        let tiny = make_samples(&odd("tiny_24px.png"), "t", &AugmentConfig { resolution: 64, ..cfg(3) });
        assert!(tiny.iter().all(|s| is_upscaled(&s.crop, 64)));
        let big = make_samples(&gradient(300, 200), "b", &cfg(3));
        assert!(big.iter().all(|s| !is_upscaled(&s.crop, 64)));
    }

    #[test]
    fn same_inputs_same_samples() {
        let src = odd("progressive.jpg");
        let c = AugmentConfig { resolution: 96, variants: 4, hflip: true, color_augment: 0.5, seed: 11 };
        let a = make_samples(&src, "a/b.jpg", &c);
        let b = make_samples(&src, "a/b.jpg", &c);
        // From another thread, too.
        let src2 = src.clone();
        let c2 = c.clone();
        let t = std::thread::spawn(move || make_samples(&src2, "a/b.jpg", &c2)).join().unwrap();
        for ((x, y), z) in a.iter().zip(&b).zip(&t) {
            assert_eq!((x.variant, x.crop, x.flip, x.color_aug), (y.variant, y.crop, y.flip, y.color_aug));
            assert_eq!(x.rgb, y.rgb);
            assert_eq!(x.rgb, z.rgb);
        }
        // Another source id or seed gives other random crops.
        let other = make_samples(&src, "a/c.jpg", &c);
        assert!(a.iter().zip(&other).skip(1).any(|(x, y)| x.crop != y.crop));
        let reseeded = make_samples(&src, "a/b.jpg", &AugmentConfig { seed: 12, ..c.clone() });
        assert!(a.iter().zip(&reseeded).skip(1).any(|(x, y)| x.crop != y.crop));
    }

    /// Pins the RNG stream: a change in rand / rand_chacha / the draw order shows up here.
    #[test]
    fn random_stream_is_pinned() {
        let c = AugmentConfig { resolution: 256, variants: 3, hflip: true, color_augment: 0.5, seed: 42 };
        let plans: Vec<(CropRect, bool, bool)> =
            (0..3).map(|v| plan(1000, 700, "x.jpg", v, &c)).map(|p| (p.crop, p.flip, p.color.is_some())).collect();
        let again: Vec<(CropRect, bool, bool)> =
            (0..3).map(|v| plan(1000, 700, "x.jpg", v, &c)).map(|p| (p.crop, p.flip, p.color.is_some())).collect();
        assert_eq!(plans, again);
        assert_eq!(
            plans,
            vec![
                (CropRect { x: 150, y: 0, w: 700, h: 700 }, false, false),
                (CropRect { x: 134, y: 9, w: 691, h: 691 }, true, false),
                (CropRect { x: 84, y: 19, w: 641, h: 641 }, true, false),
            ]
        );
        let (m, t) = plan(1000, 700, "x.jpg", 2, &AugmentConfig { color_augment: 1.0, ..c }).color.unwrap();
        let want_m = [
            [-0.080295086, 0.98443806, -0.69146764],
            [1.6332138, 0.7740584, -0.23065555],
            [0.91880393, 0.3906547, 1.941763],
        ];
        let want_t = [0.9295099, 0.39599437, 0.29679787];
        for i in 0..3 {
            assert!((t[i] - want_t[i]).abs() < 1e-6, "t {t:?}");
            for j in 0..3 {
                assert!((m[i][j] - want_m[i][j]).abs() < 1e-6, "M {m:?}");
            }
        }
    }

    #[test]
    fn crops_stay_inside_the_source_and_respect_the_size_rule() {
        for (w, h) in [(340, 256), (1600, 200), (24, 24), (64, 64), (65, 300), (100, 40), (4000, 3000), (1, 1)] {
            let short = w.min(h);
            for res in [32u32, 64, 256] {
                let c = AugmentConfig { resolution: res, variants: 40, hflip: true, color_augment: 0.3, seed: 3 };
                for v in 0..c.variants {
                    let p = plan(w, h, "s", v, &c).crop;
                    assert!(p.x + p.w <= w && p.y + p.h <= h, "{p:?} outside {w}x{h}");
                    assert_eq!(p.w, p.h);
                    let lo = short.min(res.max(short / 2));
                    assert!(p.w >= lo && p.w <= short, "{w}x{h} res {res}: side {}", p.w);
                }
            }
        }
    }

    #[test]
    fn random_crops_vary_in_size_and_position() {
        let c = AugmentConfig { resolution: 64, variants: 50, hflip: false, color_augment: 0.0, seed: 1 };
        let crops: Vec<CropRect> = (1..50).map(|v| plan(800, 600, "s", v, &c).crop).collect();
        let sides: std::collections::HashSet<u32> = crops.iter().map(|c| c.w).collect();
        let xs: std::collections::HashSet<u32> = crops.iter().map(|c| c.x).collect();
        assert!(sides.len() > 20 && xs.len() > 20);
        assert!(crops.iter().all(|c| c.w >= 300));
    }

    #[test]
    fn variant_zero_is_the_centre_crop() {
        let src = gradient(300, 200);
        let s = &make_samples(&src, "g", &cfg(1))[0];
        assert_eq!(s.crop, CropRect { x: 50, y: 0, w: 200, h: 200 });
        // Same as cropping first and resizing the crop, away from the border: the filter may
        // read source pixels just outside the crop (like PIL's `resize(box=...)`), a crop-first
        // resize clamps there instead.
        let cropped = image::imageops::crop_imm(&src, 50, 0, 200, 200).to_image();
        let direct = make_samples(&cropped, "g", &cfg(1));
        assert_eq!(direct[0].crop, CropRect { x: 0, y: 0, w: 200, h: 200 });
        let border = 4; // Lanczos3 support 3 x scale 200/64 < 10 source px < 4 output px
        for y in border..64 - border {
            for x in border..64 - border {
                assert_eq!(direct[0].rgb.get_pixel(x, y), s.rgb.get_pixel(x, y), "({x}, {y})");
            }
        }
        let tall = make_samples(&gradient(90, 301), "t", &cfg(1));
        assert_eq!(tall[0].crop, CropRect { x: 0, y: 105, w: 90, h: 90 });
    }

    #[test]
    fn outputs_are_n_by_n_for_odd_shapes() {
        for name in ["tiny_24px.png", "panorama_8x1.jpg", "exif_orientation_6.jpg"] {
            let src = odd(name);
            let c = AugmentConfig { resolution: 128, variants: 3, hflip: true, color_augment: 0.5, seed: 5 };
            let samples = make_samples(&src, name, &c);
            assert_eq!(samples.len(), 3);
            for s in &samples {
                assert_eq!(s.rgb.dimensions(), (128, 128), "{name}");
                assert!(s.crop.x + s.crop.w <= src.width() && s.crop.y + s.crop.h <= src.height());
            }
        }
        // Tiny image: every crop is the whole 24 x 24 square.
        let tiny = make_samples(&odd("tiny_24px.png"), "t", &AugmentConfig { resolution: 128, ..cfg(5) });
        assert!(tiny.iter().all(|s| s.crop == CropRect { x: 0, y: 0, w: 24, h: 24 }));
        // Panorama: crops are 200 x 200 somewhere along the 1600 px.
        let pano = make_samples(&odd("panorama_8x1.jpg"), "p", &AugmentConfig { resolution: 128, ..cfg(5) });
        assert_eq!(pano[0].crop, CropRect { x: 700, y: 0, w: 200, h: 200 });
        assert!(pano.iter().all(|s| s.crop.w == 200 || (s.crop.w >= 128 && s.crop.w <= 200)));
        assert_eq!(make_samples(&odd("tiny_24px.png"), "t", &cfg(0)).len(), 1);
    }

    #[test]
    fn identity_resize_keeps_pixels() {
        let src = gradient(64, 64);
        let s = &make_samples(&src, "g", &cfg(1))[0];
        assert_eq!(s.rgb, src);
    }

    #[test]
    fn downscale_preserves_flat_colour_and_means() {
        let flat = RgbImage::from_pixel(500, 400, image::Rgb([12, 200, 99]));
        let s = &make_samples(&flat, "f", &cfg(3));
        for x in s {
            assert!(x.rgb.pixels().all(|p| p.0 == [12, 200, 99]));
        }
    }

    #[test]
    fn hflip_mirrors() {
        let src = gradient(200, 150);
        let on = AugmentConfig { resolution: 64, variants: 16, hflip: true, color_augment: 0.0, seed: 9 };
        let off = AugmentConfig { hflip: false, ..on.clone() };
        let a = make_samples(&src, "g", &on);
        let b = make_samples(&src, "g", &off);
        let flipped = a.iter().filter(|s| s.flip).count();
        assert!(flipped > 2 && flipped < 14, "{flipped} of 16 flipped");
        assert!(b.iter().all(|s| !s.flip));
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.crop, y.crop, "hflip must not change crops");
            if x.flip {
                assert_eq!(x.rgb, image::imageops::flip_horizontal(&y.rgb));
                assert_ne!(x.rgb, y.rgb);
            } else {
                assert_eq!(x.rgb, y.rgb);
            }
        }
    }

    #[test]
    fn color_augment_only_when_chosen() {
        let src = odd("progressive.jpg");
        let base = AugmentConfig { resolution: 64, variants: 20, hflip: true, color_augment: 0.0, seed: 4 };
        let plain = make_samples(&src, "p", &base);
        assert!(plain.iter().all(|s| !s.color_aug), "P = 0 never augments");

        let all = make_samples(&src, "p", &AugmentConfig { color_augment: 1.0, ..base.clone() });
        assert!(all.iter().all(|s| s.color_aug), "P = 1 always augments");

        let half = make_samples(&src, "p", &AugmentConfig { color_augment: 0.5, ..base.clone() });
        let n = half.iter().filter(|s| s.color_aug).count();
        assert!(n > 3 && n < 17, "{n} of 20 augmented at P = 0.5");
        for ((h, p), a) in half.iter().zip(&plain).zip(&all) {
            assert_eq!((h.crop, h.flip), (p.crop, p.flip), "colour must not change crops or flips");
            if h.color_aug {
                assert_ne!(h.rgb, p.rgb, "variant {} augmented but unchanged", h.variant);
                assert_eq!(h.rgb, a.rgb, "same draws whatever P");
            } else {
                assert_eq!(h.rgb, p.rgb, "variant {} changed without augmentation", h.variant);
            }
        }
    }

    #[test]
    fn color_mix_follows_the_formula() {
        let mut img = RgbImage::from_pixel(1, 1, image::Rgb([255, 0, 51]));
        // Identity matrix with t = 1 keeps the pixel; swap R and B with t = (1, 0, 0.5).
        color_mix(&mut img, &[[1., 0., 0.], [0., 1., 0.], [0., 0., 1.]], &[1.0; 3]);
        assert_eq!(img.get_pixel(0, 0).0, [255, 0, 51]);
        color_mix(&mut img, &[[0., 0., 1.], [0., 1., 0.], [1., 0., 0.]], &[1.0, 0.0, 0.5]);
        // R -> 0.2 (t = 1), G unchanged, B -> 0.2 + (1 - 0.2) * 0.5 = 0.6.
        assert_eq!(img.get_pixel(0, 0).0, [51, 0, 153]);
        // Clamping: a matrix of 2s saturates to 1 before blending.
        let mut img = RgbImage::from_pixel(1, 1, image::Rgb([102, 102, 102]));
        color_mix(&mut img, &[[2.0; 3]; 3], &[1.0, 0.5, 0.0]);
        assert_eq!(img.get_pixel(0, 0).0, [255, 179, 102]);
    }

    /// The SIMD code paths of fast_image_resize must give the same bytes as the portable one,
    /// or samples would differ between machines.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn resize_is_identical_across_cpu_extensions() {
        use fast_image_resize::CpuExtensions;
        let src = odd("progressive.jpg");
        let view = ImageRef::new(src.width(), src.height(), src.as_raw(), PixelType::U8x3).unwrap();
        let crops = [
            CropRect { x: 0, y: 0, w: 256, h: 256 },
            CropRect { x: 17, y: 3, w: 201, h: 201 },
            CropRect { x: 40, y: 40, w: 20, h: 20 },
        ];
        for &crop in &crops {
            for n in [64, 100, 256] {
                let mut best = Resizer::new();
                let reference = resize_crop(&mut best, &view, crop, n);
                for ext in [CpuExtensions::None, CpuExtensions::Sse4_1, CpuExtensions::Avx2] {
                    if !ext.is_supported() {
                        continue;
                    }
                    let mut r = Resizer::new();
                    // SAFETY: only extensions the CPU reports as supported are selected.
                    unsafe { r.set_cpu_extensions(ext) };
                    assert_eq!(resize_crop(&mut r, &view, crop, n), reference, "{ext:?} crop {crop:?} n {n}");
                }
            }
        }
    }
}
