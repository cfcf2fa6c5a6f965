//! Preview grids: one row per sample, columns `real | reference D(z) | ours D(z) | ours D(E(x)) |
//! teacher z | our E(x)`, with a label row. Latents are shown through a fixed projection:
//! their first three channels, [-3, 3] (TAESD's latent range) mapped to [0, 255], upscaled with
//! nearest neighbours to the image size.

use crate::font::{draw_text, text_height};
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use image::{Rgb, RgbImage};
use std::path::Path;
use taesd::{Decoder, Encoder};

/// The column labels of a full grid (reference decoder, encoder and decoder), in order; a grid
/// without some model leaves its columns out.
pub const COLUMNS: [&str; 6] = ["real", "reference", "ours D(z)", "D(E(x))", "z teacher", "z ours"];

/// Models shown in a preview.
pub struct PreviewModels<'a> {
    pub encoder: Option<&'a Encoder>,
    pub decoder: Option<&'a Decoder>,
    pub reference: Option<&'a Decoder>,
}

/// `[3, H, W]` f32 in [0, 1] (clamped) to an image.
pub fn to_rgb(t: &Tensor) -> Result<RgbImage> {
    let (c, h, w) = t.dims3()?;
    ensure!(c == 3, "expected 3 channels, got {c}");
    let v = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
    let plane = h * w;
    Ok(RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let i = y as usize * w + x as usize;
        Rgb([0, 1, 2].map(|k| taesd_schemas::conventions::unit_to_u8(v[k * plane + i])))
    }))
}

/// A latent `[C, h, w]` as an RGB image of `h*s` x `w*s`: channels 0, 1, 2 (channel 0 repeated
/// when C < 3), [-3, 3] -> [0, 1].
pub fn latent_rgb(z: &Tensor, scale: usize) -> Result<RgbImage> {
    let (c, h, w) = z.dims3()?;
    let pick: Vec<usize> = (0..3).map(|k| if k < c { k } else { 0 }).collect();
    let idx = Tensor::new(pick.iter().map(|&k| k as u32).collect::<Vec<_>>().as_slice(), z.device())?;
    let rgb = z.to_dtype(DType::F32)?.index_select(&idx, 0)?.affine(1.0 / 6.0, 0.5)?;
    let up = rgb.unsqueeze(0)?.upsample_nearest2d(h * scale, w * scale)?.squeeze(0)?;
    to_rgb(&up)
}

/// Render the grid for images `[K, 3, H, W]` and their teacher latents `[K, C, h, w]`.
pub fn render(images: &Tensor, latents: &Tensor, m: &PreviewModels) -> Result<RgbImage> {
    let (k, _, h, w) = images.dims4()?;
    let (_, _, lh, _) = latents.dims4()?;
    let scale = h / lh.max(1);
    let [real, reference, ours_dz, ours_dex, z_teacher, z_ours] = COLUMNS;
    let mut columns: Vec<(&str, Tensor)> = vec![(real, images.clone())];
    if let Some(r) = m.reference {
        columns.push((reference, r.forward(latents).context("reference decoder")?));
    }
    let ours_latent = match m.encoder {
        Some(e) => Some(e.forward(images).context("encoder")?),
        None => None,
    };
    if let Some(d) = m.decoder {
        columns.push((ours_dz, d.forward(latents).context("decoder")?));
        if let Some(z) = &ours_latent {
            columns.push((ours_dex, d.forward(z).context("decoder")?));
        }
    }
    let mut latent_cols: Vec<(&str, &Tensor)> = vec![(z_teacher, latents)];
    if let Some(z) = &ours_latent {
        latent_cols.push((z_ours, z));
    }
    let ncols = columns.len() + latent_cols.len();
    let pad = 2u32;
    let label_h = text_height(1) + 6;
    let (tw, th) = (w as u32, h as u32);
    let mut grid = RgbImage::from_pixel(
        ncols as u32 * (tw + pad) + pad,
        label_h + k as u32 * (th + pad) + pad,
        Rgb([255, 255, 255]),
    );
    let labels: Vec<&str> = columns.iter().map(|c| c.0).chain(latent_cols.iter().map(|c| c.0)).collect();
    let fit = ((tw + 1) / 6).max(1) as usize;
    for (j, l) in labels.iter().enumerate() {
        // Cut to the tile's width.
        let l: String = l.chars().take(fit).collect();
        draw_text(&mut grid, (pad + j as u32 * (tw + pad)) as i64, 3, &l, Rgb([0, 0, 0]), 1);
    }
    for i in 0..k {
        let y0 = label_h + pad + i as u32 * (th + pad);
        let mut tiles: Vec<RgbImage> = Vec::with_capacity(ncols);
        for (_, t) in &columns {
            tiles.push(to_rgb(&t.get(i)?)?);
        }
        for (_, z) in &latent_cols {
            tiles.push(latent_rgb(&z.get(i)?, scale)?);
        }
        for (j, tile) in tiles.iter().enumerate() {
            let x0 = pad + j as u32 * (tw + pad);
            image::imageops::replace(&mut grid, tile, x0 as i64, y0 as i64);
        }
    }
    Ok(grid)
}

/// Render and write a PNG.
pub fn write(path: &Path, images: &Tensor, latents: &Tensor, m: &PreviewModels) -> Result<()> {
    let grid = render(images, latents, m)?;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    grid.save(path).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::{VarBuilder, VarMap};

    #[test]
    fn grid_has_a_column_per_view_and_a_row_per_sample() {
        let dev = Device::Cpu;
        let cfg = taesd::Variant::Taesd.config();
        let vm = VarMap::new();
        let model = taesd::Taesd::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
        let mut rng = crate::testing::rng(1);
        let images = crate::testing::uniform(&mut rng, &[2, 3, 16, 16], 0.0, 1.0, DType::F32);
        let latents = crate::testing::uniform(&mut rng, &[2, 4, 2, 2], -3.0, 3.0, DType::F32);
        let m = PreviewModels {
            encoder: model.encoder.as_ref(),
            decoder: model.decoder.as_ref(),
            reference: model.decoder.as_ref(),
        };
        let g = render(&images, &latents, &m).unwrap();
        let label_h = text_height(1) + 6;
        assert_eq!(g.dimensions(), (6 * 18 + 2, label_h + 2 * 18 + 2));
        // The first tile is the real image.
        let real = to_rgb(&images.get(0).unwrap()).unwrap();
        assert_eq!(g.get_pixel(2, label_h + 2), real.get_pixel(0, 0));
        let only_real =
            render(&images, &latents, &PreviewModels { encoder: None, decoder: None, reference: None }).unwrap();
        assert_eq!(only_real.width(), 2 * 18 + 2);
    }

    /// The README describes the grid as it is: the column count and the columns in order.
    #[test]
    fn the_readme_describes_the_preview_columns() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        let line =
            readme.lines().find(|l| l.contains("previews/step-N.png")).expect("README describes previews/step-N.png");
        let para: String =
            readme.split(line).nth(1).unwrap().lines().take(3).fold(line.to_string(), |a, l| a + " " + l.trim());
        assert!(para.contains(&format!("{} columns", COLUMNS.len())), "{para}");
        assert!(para.contains(&COLUMNS.join(" | ")), "README: {para}\ncode: {}", COLUMNS.join(" | "));
    }

    #[test]
    fn latent_projection_is_fixed() {
        let z = Tensor::from_vec(vec![-3f32, 0.0, 3.0, 9.0], (4, 1, 1), &Device::Cpu).unwrap();
        let img = latent_rgb(&z, 8).unwrap();
        assert_eq!(img.dimensions(), (8, 8));
        assert_eq!(img.get_pixel(7, 7).0, [0, 128, 255]);
        let one = Tensor::from_vec(vec![3f32], (1, 1, 1), &Device::Cpu).unwrap();
        assert_eq!(latent_rgb(&one, 1).unwrap().get_pixel(0, 0).0, [255, 255, 255]);
    }
}
