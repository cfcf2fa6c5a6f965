//! One training sample from one shard row: a random crop aligned to the latent grid (image and
//! the matching latent window), an optional mirror, and optionally a posterior sample of the
//! latent. All randomness comes from the generator handed in (seeded per position, see
//! [`crate::rng`]).

use anyhow::{ensure, Context, Result};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use taesd_data::{decode_stored_image, ShardRow};

/// How samples are cut.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleSpec {
    /// Crop side in pixels (multiple of `scale`, at most the stored resolution).
    pub crop: u32,
    /// Pixels per latent cell (the variant's spatial scale).
    pub scale: u32,
    /// Mirror with probability 0.5.
    pub hflip: bool,
    /// Use `latent + std * N(0, 1)` where the row has `latent_std`.
    pub sample_posterior: bool,
}

impl SampleSpec {
    pub fn latent_side(&self) -> u32 {
        self.crop / self.scale
    }
}

/// A decoded sample, planar: image `[3, crop, crop]` as 8-bit samples (to [0, 1] with
/// [`images_to_unit`]), latent `[C, crop/s, crop/s]` f32.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub image: Vec<u8>,
    pub latent: Vec<f32>,
    /// What was chosen: crop offset in pixels and whether it was mirrored.
    pub x: u32,
    pub y: u32,
    pub flipped: bool,
}

/// Check a crop against the stored resolution and the latent grid.
pub fn check_crop(crop: u32, resolution: u32, scale: u32) -> Result<()> {
    ensure!(
        crop > 0 && crop.is_multiple_of(scale),
        "crop {crop} is not a multiple of the variant's spatial scale {scale} (latent cells must line up)"
    );
    ensure!(crop <= resolution, "crop {crop} is larger than the shards' images ({resolution} px)");
    Ok(())
}

/// Cut a sample. Draws, in order: x cell, y cell, flip, then one normal per latent value (only
/// with `sample_posterior` and a stored std).
pub fn make_sample(row: &ShardRow, spec: &SampleSpec, rng: &mut impl Rng) -> Result<Sample> {
    let ctx = || format!("row `{}` ({})", row.key, row.source);
    let img = decode_stored_image(&row.image).with_context(ctx)?;
    let (w, h) = img.dimensions();
    let [c, lh, lw] = row.latent_shape;
    let s = spec.scale;
    ensure!(lh * s == h && lw * s == w, "{}: a {w}x{h} image with a {lw}x{lh} latent is not on a {s}x grid", ctx());
    check_crop(spec.crop, w.min(h), s).with_context(ctx)?;
    let cells = spec.crop / s;
    let x_cell = rng.random_range(0..=(lw - cells));
    let y_cell = rng.random_range(0..=(lh - cells));
    let flipped = spec.hflip && rng.random_bool(0.5);
    let (x, y) = (x_cell * s, y_cell * s);
    let n = spec.crop as usize;

    // Image: HWC -> CHW, cropped and maybe mirrored, in one pass.
    let raw = img.as_raw();
    let mut image = vec![0u8; 3 * n * n];
    let (r_plane, rest) = image.split_at_mut(n * n);
    let (g_plane, b_plane) = rest.split_at_mut(n * n);
    for row_i in 0..n {
        let src_row = (y as usize + row_i) * w as usize;
        for col_i in 0..n {
            let src_col = if flipped { x as usize + n - 1 - col_i } else { x as usize + col_i };
            let p = (src_row + src_col) * 3;
            let o = row_i * n + col_i;
            r_plane[o] = raw[p];
            g_plane[o] = raw[p + 1];
            b_plane[o] = raw[p + 2];
        }
    }

    // Latent: the matching window of cells.
    let m = cells as usize;
    let (lh, lw) = (lh as usize, lw as usize);
    let std = if spec.sample_posterior { row.latent_std.as_ref() } else { None };
    let mut latent = Vec::with_capacity(c as usize * m * m);
    for ch in 0..c as usize {
        for yy in 0..m {
            let base = ch * lh * lw + (y_cell as usize + yy) * lw;
            for xx in 0..m {
                let xc = if flipped { x_cell as usize + m - 1 - xx } else { x_cell as usize + xx };
                latent.push(row.latent[base + xc]);
            }
        }
    }
    if let Some(std) = std {
        let mut k = 0;
        for ch in 0..c as usize {
            for yy in 0..m {
                let base = ch * lh * lw + (y_cell as usize + yy) * lw;
                for xx in 0..m {
                    let xc = if flipped { x_cell as usize + m - 1 - xx } else { x_cell as usize + xx };
                    let e: f32 = StandardNormal.sample(rng);
                    latent[k] += std[base + xc] * e;
                    k += 1;
                }
            }
        }
    }
    Ok(Sample { image, latent, x, y, flipped })
}

/// `[B, 3, H, W]` 8-bit images (uploaded as they are: a quarter of the bytes of f32) to f32 in
/// [0, 1] on their device, by [`taesd_schemas::conventions::u8_to_unit`]'s arithmetic.
pub fn images_to_unit(images: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    let scale = candle_core::Tensor::new(taesd_schemas::conventions::UNIT_PER_U8, images.device())?;
    images.to_dtype(candle_core::DType::F32)?.broadcast_mul(&scale)
}

/// The whole stored image and latent, unchanged (evaluation and previews).
pub fn full_sample(row: &ShardRow) -> Result<Sample> {
    let img = decode_stored_image(&row.image).with_context(|| format!("row `{}` ({})", row.key, row.source))?;
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut image = vec![0u8; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for ch in 0..3 {
            image[ch * plane + i] = px.0[ch];
        }
    }
    Ok(Sample { image, latent: row.latent.clone(), x: 0, y: 0, flipped: false })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::rng::{rng, tag};
    use image::RgbImage;
    use taesd_data::{encode_image, CropRect};
    use taesd_schemas::ImageFormat;

    /// A 32x32 row with an 4x4x4 latent whose values encode (channel, y, x), and an image whose
    /// pixels encode (x, y).
    pub fn test_row(key: &str, with_std: bool) -> ShardRow {
        let img = RgbImage::from_fn(32, 32, |x, y| image::Rgb([x as u8 * 4, y as u8 * 4, 7]));
        let latent: Vec<f32> = (0..4 * 4 * 4).map(|k| k as f32).collect();
        ShardRow {
            key: key.into(),
            source: format!("{key}.jpg"),
            source_sha256: "0".repeat(64),
            source_width: 32,
            source_height: 32,
            variant: 0,
            crop: CropRect { x: 0, y: 0, w: 32, h: 32 },
            flip: false,
            color_aug: false,
            image: encode_image(&img, ImageFormat::Png, 95).unwrap(),
            width: 32,
            height: 32,
            latent_std: with_std.then(|| vec![1.0; 64]),
            latent,
            latent_shape: [4, 4, 4],
        }
    }

    #[test]
    fn crops_line_up_with_latent_cells_and_flips_mirror_both() {
        let row = test_row("a", false);
        let spec = SampleSpec { crop: 16, scale: 8, hflip: true, sample_posterior: false };
        let mut seen_flip = [false, false];
        for i in 0..40 {
            let s = make_sample(&row, &spec, &mut rng(0, tag::SAMPLE, &[0, i])).unwrap();
            assert_eq!(s.image.len(), 3 * 16 * 16);
            assert_eq!(s.latent.len(), 4 * 2 * 2);
            assert!(s.x.is_multiple_of(8) && s.y.is_multiple_of(8) && s.x <= 16 && s.y <= 16);
            seen_flip[s.flipped as usize] = true;
            let (xc, yc) = (s.x / 8, s.y / 8);
            for ch in 0..4 {
                for yy in 0..2 {
                    for xx in 0..2 {
                        let src_x = if s.flipped { xc + 1 - xx } else { xc + xx };
                        let want = (ch * 16 + (yc + yy) * 4 + src_x) as f32;
                        assert_eq!(s.latent[(ch * 4 + yy * 2 + xx) as usize], want);
                    }
                }
            }
            // Pixel (col 0, row 0) of the crop comes from source x = x (or x + 15 mirrored).
            let src_x = if s.flipped { s.x + 15 } else { s.x };
            assert_eq!(s.image[0], (src_x * 4) as u8);
            assert_eq!(s.image[16 * 16], (s.y * 4) as u8);
            assert_eq!(s.image[2 * 16 * 16], 7);
        }
        assert!(seen_flip[0] && seen_flip[1]);
        let a = make_sample(&row, &spec, &mut rng(0, tag::SAMPLE, &[0, 3])).unwrap();
        let b = make_sample(&row, &spec, &mut rng(0, tag::SAMPLE, &[0, 3])).unwrap();
        assert_eq!(a, b, "a pure function of the generator");
    }

    #[test]
    fn posterior_sampling_only_when_asked_and_stored() {
        let spec = SampleSpec { crop: 32, scale: 8, hflip: false, sample_posterior: true };
        let with = make_sample(&test_row("a", true), &spec, &mut rng(0, tag::SAMPLE, &[1])).unwrap();
        let mean: Vec<f32> = (0..64).map(|k| k as f32).collect();
        assert_ne!(with.latent, mean);
        let d: f32 = with.latent.iter().zip(&mean).map(|(a, b)| (a - b).powi(2)).sum::<f32>() / 64.0;
        assert!((0.3..3.0).contains(&d), "unit-variance noise, got {d}");
        let without = make_sample(&test_row("a", false), &spec, &mut rng(0, tag::SAMPLE, &[1])).unwrap();
        assert_eq!(without.latent, mean);
        let off = SampleSpec { sample_posterior: false, ..spec };
        assert_eq!(make_sample(&test_row("a", true), &off, &mut rng(0, tag::SAMPLE, &[1])).unwrap().latent, mean);
        let full = full_sample(&test_row("a", true)).unwrap();
        assert_eq!((full.image.len(), full.latent), (3 * 32 * 32, mean));
    }

    #[test]
    fn images_scale_to_unit_as_the_convention() {
        let v: Vec<u8> = (0..=255).collect();
        let t = candle_core::Tensor::from_vec(v.clone(), (1, 1, 16, 16), &candle_core::Device::Cpu).unwrap();
        let got: Vec<f32> = images_to_unit(&t).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = v.iter().map(|&x| taesd_schemas::conventions::u8_to_unit(x)).collect();
        assert_eq!(got, want);
        assert_eq!((got[0], got[255]), (0.0, 1.0));
    }

    #[test]
    fn bad_crops_are_refused_with_the_reason() {
        let row = test_row("a", false);
        let e = make_sample(
            &row,
            &SampleSpec { crop: 12, scale: 8, hflip: false, sample_posterior: false },
            &mut rng(0, 0, &[]),
        );
        assert!(format!("{:#}", e.unwrap_err()).contains("multiple of the variant's spatial scale 8"));
        let e = make_sample(
            &row,
            &SampleSpec { crop: 40, scale: 8, hflip: false, sample_posterior: false },
            &mut rng(0, 0, &[]),
        );
        assert!(format!("{:#}", e.unwrap_err()).contains("larger than the shards' images (32 px)"));
    }
}
