//! `train encode`: images to latents with a TAESD encoder, written as `.safetensors` (tensor
//! `latent`, `[C, h, w]` f32, metadata: source, size, variant) and/or `.npy`.

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use taesd_data::{decode_rgb8, list_inputs, read_bytes, DecodeLimits, InputItem};

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Formats {
    pub safetensors: bool,
    pub npy: bool,
}

impl Formats {
    pub fn parse(s: &str) -> Result<Formats> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "safetensors" => Formats { safetensors: true, npy: false },
            "npy" => Formats { safetensors: false, npy: true },
            "both" | "safetensors,npy" | "npy,safetensors" => Formats { safetensors: true, npy: true },
            other => bail!("--format {other}: use safetensors, npy or both"),
        })
    }
}

pub struct EncodeArgs {
    pub model: PathBuf,
    pub variant: Option<taesd::Variant>,
    pub images: PathBuf,
    pub out: PathBuf,
    pub formats: Formats,
    pub batch_size: usize,
    /// Resize (short side) and centre-crop to N x N first; else native size.
    pub size: Option<u32>,
    pub device: Device,
}

/// What was done.
#[derive(Debug, Default)]
pub struct EncodeSummary {
    pub encoded: usize,
    pub files: Vec<PathBuf>,
    /// (source, reason) of inputs that could not be read or decoded.
    pub failed: Vec<(String, String)>,
}

/// Short side to `n`, then the centre `n x n` (Catmull-Rom).
pub fn square(img: &image::RgbImage, n: u32) -> image::RgbImage {
    let (w, h) = img.dimensions();
    let s = n as f64 / w.min(h) as f64;
    let (rw, rh) = (((w as f64 * s).round() as u32).max(n), ((h as f64 * s).round() as u32).max(n));
    let resized = image::imageops::resize(img, rw, rh, image::imageops::FilterType::CatmullRom);
    image::imageops::crop_imm(&resized, (rw - n) / 2, (rh - n) / 2, n, n).to_image()
}

fn to_tensor(img: &image::RgbImage) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut v = vec![0f32; 3 * plane];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            v[c * plane + i] = taesd_schemas::conventions::u8_to_unit(p.0[c]);
        }
    }
    v
}

/// Output path for an item key, with `ext`.
fn out_path(out: &Path, key: &str, ext: &str) -> PathBuf {
    let rel: PathBuf = key.split(['/', ':']).filter(|p| !p.is_empty() && *p != "..").collect();
    let mut p = out.join(rel);
    let name = format!("{}.{ext}", p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    p.set_file_name(name);
    p
}

pub fn run(a: &EncodeArgs) -> Result<EncodeSummary> {
    let model = crate::models::load(&a.model, a.variant, &a.device)?;
    let encoder = model.encoder().map_err(|e| anyhow::anyhow!("{}: {e}", a.model.display()))?;
    let variant = model.variant.map(|v| v.to_string()).unwrap_or_else(|| model.config.describe());
    let listing = list_inputs(&a.images).with_context(|| format!("listing {}", a.images.display()))?;
    ensure!(!listing.items.is_empty(), "no images under {}", a.images.display());
    let mut summary = EncodeSummary { failed: listing.errors.clone(), ..Default::default() };
    let limits = DecodeLimits::default();
    let load = |item: &InputItem| -> Result<image::RgbImage> {
        let bytes = read_bytes(item).with_context(|| format!("cannot read {}", item.source))?;
        let img = decode_rgb8(&bytes, &limits).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(match a.size {
            Some(n) => square(&img, n),
            None => img,
        })
    };
    // Batches of consecutive same-size images.
    let mut pending: Vec<(&InputItem, image::RgbImage)> = Vec::new();
    let flush = |pending: &mut Vec<(&InputItem, image::RgbImage)>, summary: &mut EncodeSummary| -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let (w, h) = pending[0].1.dimensions();
        let data: Vec<f32> = pending.iter().flat_map(|(_, img)| to_tensor(img)).collect();
        let x =
            Tensor::from_vec(data, (pending.len(), 3, h as usize, w as usize), &Device::Cpu)?.to_device(&a.device)?;
        let z = encoder.forward(&x).context("encoder forward")?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        for (i, (item, _)) in pending.iter().enumerate() {
            let zi = z.get(i)?;
            if a.formats.safetensors {
                let p = out_path(&a.out, &item.key, "safetensors");
                write_latent_safetensors(
                    &p,
                    &zi,
                    &[("source", item.source.as_str()), ("variant", &variant), ("image_size", &format!("{w}x{h}"))],
                )?;
                summary.files.push(p);
            }
            if a.formats.npy {
                let p = out_path(&a.out, &item.key, "npy");
                create_parent(&p)?;
                zi.write_npy(&p).with_context(|| format!("cannot write {}", p.display()))?;
                summary.files.push(p);
            }
            summary.encoded += 1;
        }
        pending.clear();
        Ok(())
    };
    for item in &listing.items {
        match load(item) {
            Ok(img) => {
                if pending.first().is_some_and(|(_, p)| p.dimensions() != img.dimensions())
                    || pending.len() >= a.batch_size.max(1)
                {
                    flush(&mut pending, &mut summary)?;
                }
                pending.push((item, img));
            }
            Err(e) => summary.failed.push((item.source.clone(), format!("{e:#}"))),
        }
    }
    flush(&mut pending, &mut summary)?;
    Ok(summary)
}

fn create_parent(p: &Path) -> Result<()> {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    Ok(())
}

/// Write one latent as `latent` with string metadata.
pub fn write_latent_safetensors(path: &Path, z: &Tensor, meta: &[(&str, &str)]) -> Result<()> {
    create_parent(path)?;
    let meta: HashMap<String, String> = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let z = z.contiguous()?;
    safetensors::serialize_to_file(vec![("latent".to_string(), z)], Some(meta), path)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_safe_paths_and_squares_are_square() {
        let out = Path::new("/o");
        assert_eq!(out_path(out, "a/b", "npy"), Path::new("/o/a/b.npy"));
        assert_eq!(out_path(out, "../x", "npy"), Path::new("/o/x.npy"));
        assert_eq!(out_path(out, "00000.tar:000001", "safetensors"), Path::new("/o/00000.tar/000001.safetensors"));
        let img = image::RgbImage::new(300, 200);
        assert_eq!(square(&img, 64).dimensions(), (64, 64));
        assert!(Formats::parse("both").unwrap().npy && Formats::parse("npy").is_ok() && Formats::parse("png").is_err());
    }
}
