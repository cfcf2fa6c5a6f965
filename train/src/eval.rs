//! Evaluation: PSNR, SSIM, sharpness ratio and latent errors of a decoder / encoder on shard
//! rows, and `train eval`.
//!
//! Per image, then averaged over images:
//! * `psnr`, `ssim`: the decoder's output for the teacher latent, clamped to [0, 1], against the
//!   stored image (SSIM: 11x11 Gaussian window, sigma 1.5, per channel, K1 = 0.01, K2 = 0.03).
//! * `sharpness`: Laplacian energy of the output over that of the input (1 = as sharp as the
//!   input; a blurry decoder scores below 1). Flat inputs (no energy) are left out.
//! * `cycle_mae`: mean |E(D(z)) - z| with our encoder or a given one.
//! * `encoder_mae`, `encoder_rmse`: |E(x) - z| of the encoder against the teacher latent.
//! * `roundtrip_psnr`, `roundtrip_ssim`: D(E(x)) against x.

use crate::dataset::ShardSet;
use crate::sample::full_sample;
use crate::split::is_heldout;
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use serde::Serialize;
use taesd::{Decoder, Encoder};
use taesd_data::ShardRow;

/// Rows to evaluate on (stored, decoded batch by batch).
pub struct EvalSet {
    pub rows: Vec<ShardRow>,
}

/// Which rows `EvalSet::load` takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Split {
    /// The held-out rows of this fraction (never trained on).
    HeldOut(f64),
    /// Every row.
    All,
}

impl EvalSet {
    /// Up to `max` rows of `split`, in file order.
    pub fn load(set: &ShardSet, split: Split, max: usize) -> Result<EvalSet> {
        let mut rows = Vec::new();
        if max > 0 {
            set.scan(|r| {
                let keep = match split {
                    Split::HeldOut(f) => is_heldout(&r.key, f),
                    Split::All => true,
                };
                if keep {
                    rows.push(r);
                }
                Ok(rows.len() < max)
            })?;
        }
        Ok(EvalSet { rows })
    }

    /// Up to `n` rows, one per source image first (its first variant, in file order), then the
    /// other variants: a preview of shards made with `--variants` shows different images, not the
    /// same one twice.
    pub fn one_per_source(&self, n: usize) -> EvalSet {
        let mut seen = std::collections::HashSet::new();
        let (first, rest): (Vec<&ShardRow>, Vec<&ShardRow>) =
            self.rows.iter().partition(|r| seen.insert(r.key.as_str()));
        EvalSet { rows: first.into_iter().chain(rest).take(n).cloned().collect() }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// `(images [B,3,N,N], latents [B,C,h,w])` of rows `range`, on `device`.
    pub fn batch(&self, range: std::ops::Range<usize>, device: &Device) -> Result<(Tensor, Tensor)> {
        let rows = &self.rows[range];
        ensure!(!rows.is_empty(), "empty evaluation batch");
        let (w, h) = (rows[0].width as usize, rows[0].height as usize);
        let [c, lh, lw] = rows[0].latent_shape.map(|v| v as usize);
        let mut images = Vec::with_capacity(rows.len() * 3 * w * h);
        let mut latents = Vec::with_capacity(rows.len() * c * lh * lw);
        for r in rows {
            ensure!(
                (r.width as usize, r.height as usize) == (w, h) && r.latent_shape.map(|v| v as usize) == [c, lh, lw],
                "row `{}` has another size than row `{}`",
                r.key,
                rows[0].key
            );
            let s = full_sample(r)?;
            images.extend_from_slice(&s.image);
            latents.extend_from_slice(&s.latent);
        }
        let n = rows.len();
        Ok((
            crate::sample::images_to_unit(&Tensor::from_vec(images, (n, 3, h, w), &Device::Cpu)?.to_device(device)?)?,
            Tensor::from_vec(latents, (n, c, lh, lw), &Device::Cpu)?.to_device(device)?,
        ))
    }
}

/// The metrics of one model; `None` where the model lacks the part a metric needs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Metrics {
    pub images: usize,
    pub psnr: Option<f64>,
    pub ssim: Option<f64>,
    pub sharpness: Option<f64>,
    pub cycle_mae: Option<f64>,
    pub encoder_mae: Option<f64>,
    pub encoder_rmse: Option<f64>,
    pub roundtrip_psnr: Option<f64>,
    pub roundtrip_ssim: Option<f64>,
}

/// What to evaluate.
pub struct Subject<'a> {
    pub encoder: Option<&'a Encoder>,
    pub decoder: Option<&'a Decoder>,
    /// Encoder of the latent-cycle error (default: `encoder`).
    pub cycle_encoder: Option<&'a Encoder>,
}

/// Per-image values `[B]` -> host.
fn per_image(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// Mean over all but the batch dimension.
fn mean_per_image(t: &Tensor) -> Result<Tensor> {
    Ok(t.flatten_from(1)?.mean(1)?)
}

/// PSNR (dB) per image of [0, 1] images (peak 1). Identical images give +inf.
pub fn psnr(a: &Tensor, b: &Tensor) -> Result<Vec<f64>> {
    let mse = per_image(&mean_per_image(&(a - b)?.sqr()?)?)?;
    Ok(mse.into_iter().map(|m| -10.0 * m.log10()).collect())
}

fn gaussian_window(size: usize, sigma: f64, device: &Device) -> Result<Tensor> {
    let c = (size as f64 - 1.0) / 2.0;
    let g: Vec<f64> = (0..size).map(|i| (-((i as f64 - c).powi(2)) / (2.0 * sigma * sigma)).exp()).collect();
    let s: f64 = g.iter().sum();
    let mut k = Vec::with_capacity(size * size);
    for y in &g {
        for x in &g {
            k.push((y * x / (s * s)) as f32);
        }
    }
    Ok(Tensor::from_vec(k, (1, 1, size, size), device)?)
}

/// SSIM per image of [0, 1] images `[B, 3, H, W]` (mean over channels and valid positions).
pub fn ssim(a: &Tensor, b: &Tensor) -> Result<Vec<f64>> {
    let (n, c, h, w) = a.dims4()?;
    let size = 11.min(h).min(w);
    let size = if size % 2 == 0 { size - 1 } else { size };
    let win = gaussian_window(size, 1.5, a.device())?;
    let a = a.to_dtype(DType::F32)?.reshape((n * c, 1, h, w))?;
    let b = b.to_dtype(DType::F32)?.reshape((n * c, 1, h, w))?;
    let f = |x: &Tensor| x.conv2d(&win, 0, 1, 1, 1);
    let (mu_a, mu_b) = (f(&a)?, f(&b)?);
    let (mu_aa, mu_bb, mu_ab) = (mu_a.sqr()?, mu_b.sqr()?, (&mu_a * &mu_b)?);
    let s_aa = (f(&a.sqr()?)? - &mu_aa)?;
    let s_bb = (f(&b.sqr()?)? - &mu_bb)?;
    let s_ab = (f(&(&a * &b)?)? - &mu_ab)?;
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    let num = ((mu_ab.affine(2.0, c1))? * s_ab.affine(2.0, c2)?)?;
    let den = ((mu_aa + mu_bb)?.affine(1.0, c1)? * (s_aa + s_bb)?.affine(1.0, c2)?)?;
    let map = (num / den)?;
    let (_, _, mh, mw) = map.dims4()?;
    per_image(&map.reshape((n, c * mh * mw))?.mean(1)?)
}

/// Laplacian energy per image: mean of the squared 4-neighbour Laplacian over channels.
pub fn laplacian_energy(x: &Tensor) -> Result<Vec<f64>> {
    let (n, c, h, w) = x.dims4()?;
    let k = Tensor::from_vec(vec![0f32, 1., 0., 1., -4., 1., 0., 1., 0.], (1, 1, 3, 3), x.device())?;
    let lap = x.to_dtype(DType::F32)?.reshape((n * c, 1, h, w))?.conv2d(&k, 0, 1, 1, 1)?;
    let (_, _, lh, lw) = lap.dims4()?;
    per_image(&lap.sqr()?.reshape((n, c * lh * lw))?.mean(1)?)
}

/// Running means of per-image values.
#[derive(Default)]
struct Acc {
    sum: f64,
    n: usize,
}

impl Acc {
    fn add(&mut self, v: impl IntoIterator<Item = f64>) {
        for x in v {
            if x.is_finite() {
                self.sum += x;
                self.n += 1;
            }
        }
    }
    fn mean(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / self.n as f64)
    }
}

/// Evaluate `subject` on every row of `set` in batches of `batch`.
pub fn evaluate(set: &EvalSet, subject: &Subject, batch: usize, device: &Device) -> Result<Metrics> {
    ensure!(!set.is_empty(), "nothing to evaluate: the evaluation set is empty");
    let cycle_encoder = subject.cycle_encoder.or(subject.encoder);
    let mut acc: [Acc; 8] = Default::default();
    let [psnr_a, ssim_a, sharp_a, cycle_a, emae_a, ermse_a, rtp_a, rts_a] = &mut acc;
    for start in (0..set.len()).step_by(batch.max(1)) {
        let end = (start + batch.max(1)).min(set.len());
        let (x, z) = set.batch(start..end, device)?;
        let input_energy = laplacian_energy(&x)?;
        if let Some(dec) = subject.decoder {
            let y = dec.forward(&z).context("decoder forward")?.to_dtype(DType::F32)?.clamp(0f32, 1f32)?;
            psnr_a.add(psnr(&y, &x)?);
            ssim_a.add(ssim(&y, &x)?);
            let e = laplacian_energy(&y)?;
            sharp_a.add(e.iter().zip(&input_energy).filter(|(_, i)| **i > 1e-12).map(|(o, i)| o / i));
            if let Some(enc) = cycle_encoder {
                let z2 = enc.forward(&y).context("cycle encoder forward")?.to_dtype(DType::F32)?;
                cycle_a.add(per_image(&mean_per_image(&(z2 - &z)?.abs()?)?)?);
            }
        }
        if let Some(enc) = subject.encoder {
            let zh = enc.forward(&x).context("encoder forward")?.to_dtype(DType::F32)?;
            let d = (&zh - &z)?;
            emae_a.add(per_image(&mean_per_image(&d.abs()?)?)?);
            ermse_a.add(per_image(&mean_per_image(&d.sqr()?)?)?.into_iter().map(f64::sqrt));
            if let Some(dec) = subject.decoder {
                let y = dec.forward(&zh)?.to_dtype(DType::F32)?.clamp(0f32, 1f32)?;
                rtp_a.add(psnr(&y, &x)?);
                rts_a.add(ssim(&y, &x)?);
            }
        }
    }
    Ok(Metrics {
        images: set.len(),
        psnr: acc[0].mean(),
        ssim: acc[1].mean(),
        sharpness: acc[2].mean(),
        cycle_mae: acc[3].mean(),
        encoder_mae: acc[4].mean(),
        encoder_rmse: acc[5].mean(),
        roundtrip_psnr: acc[6].mean(),
        roundtrip_ssim: acc[7].mean(),
    })
}

/// A column of [`table`]: header, value, decimals.
type Column = (&'static str, fn(&Metrics) -> Option<f64>, usize);

/// A fixed-width table of named metrics.
pub fn table(rows: &[(String, Metrics)]) -> String {
    let cols: [Column; 8] = [
        ("psnr", |m| m.psnr, 2),
        ("ssim", |m| m.ssim, 4),
        ("sharpness", |m| m.sharpness, 3),
        ("cycle_mae", |m| m.cycle_mae, 4),
        ("enc_mae", |m| m.encoder_mae, 4),
        ("enc_rmse", |m| m.encoder_rmse, 4),
        ("rt_psnr", |m| m.roundtrip_psnr, 2),
        ("rt_ssim", |m| m.roundtrip_ssim, 4),
    ];
    let name_w = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(5).max(5);
    let mut out = format!("{:<name_w$} {:>6}", "model", "images");
    for (c, _, _) in &cols {
        out += &format!(" {c:>10}");
    }
    out.push('\n');
    for (name, m) in rows {
        out += &format!("{name:<name_w$} {:>6}", m.images);
        for (_, f, prec) in &cols {
            match f(m) {
                Some(v) => out += &format!(" {v:>10.prec$}"),
                None => out += &format!(" {:>10}", "-"),
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(seed: u64, n: usize, h: usize, w: usize) -> Tensor {
        let mut s = seed;
        let v: Vec<f32> = (0..n * 3 * h * w)
            .map(|_| {
                s = crate::rng::mix64(s);
                (s >> 40) as f32 / (1u64 << 24) as f32
            })
            .collect();
        Tensor::from_vec(v, (n, 3, h, w), &Device::Cpu).unwrap()
    }

    #[test]
    fn previews_take_one_variant_per_source_before_repeating_one() {
        let row = |key: &str, variant: u32| ShardRow { variant, ..crate::sample::tests::test_row(key, false) };
        let set = EvalSet { rows: vec![row("a", 0), row("a", 1), row("b", 0), row("b", 1), row("c", 0)] };
        let got = |n| set.one_per_source(n).rows.iter().map(|r| format!("{}{}", r.key, r.variant)).collect::<Vec<_>>();
        assert_eq!(got(2), ["a0", "b0"]);
        assert_eq!(got(4), ["a0", "b0", "c0", "a1"]);
        assert_eq!(got(9), ["a0", "b0", "c0", "a1", "b1"]);
        assert!(got(0).is_empty());
    }

    #[test]
    fn psnr_matches_the_formula() {
        let a = Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let b =
            Tensor::cat(&[&Tensor::full(0.1f32, (1, 3, 4, 4), &Device::Cpu).unwrap(), &a.narrow(0, 0, 1).unwrap()], 0)
                .unwrap();
        let p = psnr(&a, &b).unwrap();
        assert!((p[0] - 20.0).abs() < 1e-4, "{p:?}");
        assert!(p[1].is_infinite());
    }

    #[test]
    fn ssim_is_one_for_identical_and_drops_with_noise_and_blur() {
        let x = img(1, 2, 32, 32);
        let s = ssim(&x, &x).unwrap();
        assert!(s.iter().all(|v| (v - 1.0).abs() < 1e-4), "{s:?}");
        let noisy = ((&x * 0.5).unwrap() + (img(2, 2, 32, 32) * 0.5).unwrap()).unwrap();
        let s2 = ssim(&noisy, &x).unwrap();
        assert!(s2.iter().all(|v| *v < 0.9 && *v > -1.0), "{s2:?}");
        // A constant image against a textured one: low SSIM.
        let flat = Tensor::full(0.5f32, (2, 3, 32, 32), &Device::Cpu).unwrap();
        assert!(ssim(&flat, &x).unwrap().iter().all(|v| *v < 0.1));
    }

    #[test]
    fn laplacian_energy_orders_sharp_over_blurred() {
        let x = img(3, 1, 32, 32);
        let blur = x.avg_pool2d(2).unwrap().upsample_nearest2d(32, 32).unwrap();
        let (e, eb) = (laplacian_energy(&x).unwrap()[0], laplacian_energy(&blur).unwrap()[0]);
        assert!(eb < e * 0.8, "{eb} vs {e}");
        let flat = Tensor::full(0.3f32, (1, 3, 8, 8), &Device::Cpu).unwrap();
        assert!(laplacian_energy(&flat).unwrap()[0].abs() < 1e-12);
    }

    #[test]
    fn table_shows_missing_metrics_as_dashes() {
        let m = Metrics { images: 3, psnr: Some(25.5), ..Default::default() };
        let t = table(&[("ours".into(), m)]);
        assert!(t.contains("psnr") && t.contains("25.50") && t.contains(" -"), "{t}");
    }
}

/// `train eval`.
pub struct EvalArgs {
    pub model: std::path::PathBuf,
    pub variant: Option<taesd::Variant>,
    pub reference: Option<std::path::PathBuf>,
    pub cycle_encoder: Option<std::path::PathBuf>,
    pub shards: Option<std::path::PathBuf>,
    /// `None`: the held-out split of the run's (or the default) fraction.
    pub split: Option<Split>,
    pub max_images: usize,
    pub batch_size: usize,
    pub device: Device,
}

/// The report of `train eval`.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// The weights evaluated as "ours" (for a run folder: the newer of its export and its
    /// latest checkpoint).
    pub model_files: Vec<std::path::PathBuf>,
    pub shards: std::path::PathBuf,
    pub split: String,
    pub images: usize,
    pub resolution: u32,
    pub models: std::collections::BTreeMap<String, Metrics>,
}

/// Evaluate `--model` (and `--reference`) on shards. A run folder as `--model` brings its
/// shards, held-out fraction and reference decoder along as defaults.
pub fn command(a: &EvalArgs) -> Result<EvalReport> {
    let run_cfg = {
        let p = a.model.join(crate::config::RESOLVED_CONFIG);
        if p.is_file() {
            Some(crate::config::TrainConfig::load(&p)?)
        } else {
            None
        }
    };
    let shards = a
        .shards
        .clone()
        .or_else(|| run_cfg.as_ref().and_then(|c| c.data.shards.clone()))
        .ok_or_else(|| anyhow::anyhow!("pass --shards DIR (or a run folder as --model)"))?;
    let split = a.split.unwrap_or(Split::HeldOut(
        run_cfg.as_ref().map(|c| c.data.eval_fraction).unwrap_or(crate::config::DataConfig::default().eval_fraction),
    ));
    let variant = a.variant.or_else(|| run_cfg.as_ref().and_then(|c| c.variant()));
    let set = ShardSet::open(&shards)?;
    let eval_set = EvalSet::load(&set, split, a.max_images)?;
    ensure!(
        !eval_set.is_empty(),
        "{}: no rows in the {} split",
        shards.display(),
        match split {
            Split::All => "`all`".to_string(),
            Split::HeldOut(f) => format!("held-out ({f})"),
        }
    );
    let model_files = crate::models::checkpoint_files(&a.model)?;
    let model = crate::models::load(&a.model, variant, &a.device)?;
    let reference_path =
        a.reference.clone().or_else(|| run_cfg.as_ref().and_then(|c| c.model.reference_decoder.clone()));
    let reference = match &reference_path {
        Some(p) => Some(crate::models::load(p, variant.or(model.variant), &a.device)?),
        None => None,
    };
    let cycle = match &a.cycle_encoder {
        Some(p) => Some(crate::models::load(p, variant.or(model.variant), &a.device)?),
        None => None,
    };
    let cycle_enc = cycle.as_ref().and_then(|m| m.encoder.as_ref());
    let mut models = std::collections::BTreeMap::new();
    let s = Subject { encoder: model.encoder.as_ref(), decoder: model.decoder.as_ref(), cycle_encoder: cycle_enc };
    models.insert("ours".to_string(), evaluate(&eval_set, &s, a.batch_size, &a.device)?);
    if let Some(r) = &reference {
        let s =
            Subject { encoder: None, decoder: r.decoder.as_ref(), cycle_encoder: cycle_enc.or(model.encoder.as_ref()) };
        ensure!(s.decoder.is_some(), "the reference {} has no decoder", reference_path.unwrap().display());
        models.insert("reference".to_string(), evaluate(&eval_set, &s, a.batch_size, &a.device)?);
    }
    Ok(EvalReport {
        model_files,
        shards,
        split: match split {
            Split::All => "all".into(),
            Split::HeldOut(f) => format!("heldout:{f}"),
        },
        images: eval_set.len(),
        resolution: set.resolution,
        models,
    })
}
