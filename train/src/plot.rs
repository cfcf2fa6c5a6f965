//! The loss curve: one PNG with axes, tick labels, a legend and a line per loss, drawn with the
//! image crate. The y axis is logarithmic when every value is positive.

use crate::font::{draw_text, text_height, text_width};
use anyhow::{Context, Result};
use image::{Rgb, RgbImage};
use std::collections::BTreeMap;
use std::path::Path;

/// A named line: `(x, y)` points, x increasing.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Line colours (matplotlib's tab10), shared with the report's SVG charts.
pub const PALETTE: [[u8; 3]; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

const BLACK: Rgb<u8> = Rgb([0, 0, 0]);
const GRID: Rgb<u8> = Rgb([228, 228, 228]);

/// "Nice" tick values covering [lo, hi] (about `n` of them).
// `!(hi > lo)` on purpose: NaN bounds take this branch too.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
pub fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    if !(hi > lo) {
        return vec![lo];
    }
    let raw = (hi - lo) / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    let mut out = Vec::new();
    let mut v = first;
    while v <= hi + step * 1e-9 {
        out.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        v += step;
    }
    out
}

/// A short label: `1e-3`, `0.25`, `1200`, `2.5e4`.
pub fn format_tick(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if (1e-2..1e5).contains(&a) {
        let s = format!("{v:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        return s.to_string();
    }
    let e = a.log10().floor() as i32;
    let m = v / 10f64.powi(e);
    if (m.round() - m).abs() < 1e-6 {
        format!("{}e{e}", m.round() as i64)
    } else {
        format!("{m:.1}e{e}")
    }
}

fn line(img: &mut RgbImage, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    loop {
        if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
            img.put_pixel(x as u32, y as u32, c);
        }
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

/// Draw the series into a `width` x `height` image.
pub fn draw(series: &[Series], width: u32, height: u32, title: &str) -> RgbImage {
    let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let pts = || series.iter().flat_map(|s| s.points.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let log = pts().count() > 0 && pts().all(|(_, y)| *y > 0.0);
    let ty = |y: f64| if log { y.log10() } else { y };
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in pts() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(ty(y));
        y1 = y1.max(ty(y));
    }
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-9 {
        y0 -= 0.5;
        y1 += 0.5;
    }
    let pad = (y1 - y0) * 0.05;
    (y0, y1) = (y0 - pad, y1 + pad);

    let (left, right, top, bottom) = (64i64, 16i64, 28i64, 36i64);
    let (pw, ph) = (width as i64 - left - right, height as i64 - top - bottom);
    let px = |x: f64| left + ((x - x0) / (x1 - x0) * (pw - 1) as f64).round() as i64;
    let py = |v: f64| top + ph - 1 - ((v - y0) / (y1 - y0) * (ph - 1) as f64).round() as i64;

    // Grid and ticks.
    let yticks: Vec<(f64, String)> = if log {
        let (lo, hi) = (y0.floor() as i64, y1.ceil() as i64);
        let decades: Vec<i64> = (lo..=hi).collect();
        let mut t: Vec<(f64, String)> = decades
            .iter()
            .map(|&d| (d as f64, format_tick(10f64.powi(d as i32))))
            .filter(|(v, _)| *v >= y0 && *v <= y1)
            .collect();
        if t.len() < 3 {
            for &d in &decades {
                for m in [2.0, 5.0] {
                    let v = (m * 10f64.powi(d as i32)).log10();
                    if v >= y0 && v <= y1 {
                        t.push((v, format_tick(m * 10f64.powi(d as i32))));
                    }
                }
            }
        }
        t
    } else {
        nice_ticks(y0, y1, 6).into_iter().map(|v| (v, format_tick(v))).collect()
    };
    for (v, label) in &yticks {
        let y = py(*v);
        line(&mut img, (left, y), (left + pw - 1, y), GRID);
        line(&mut img, (left - 4, y), (left, y), BLACK);
        let w = text_width(label, 1) as i64;
        draw_text(&mut img, left - 7 - w, y - 3, label, BLACK, 1);
    }
    for v in nice_ticks(x0, x1, 6) {
        let x = px(v);
        line(&mut img, (x, top), (x, top + ph - 1), GRID);
        line(&mut img, (x, top + ph), (x, top + ph + 4), BLACK);
        let label = format_tick(v);
        let w = text_width(&label, 1) as i64;
        draw_text(&mut img, x - w / 2, top + ph + 8, &label, BLACK, 1);
    }
    // Axes.
    line(&mut img, (left, top), (left, top + ph), BLACK);
    line(&mut img, (left, top + ph), (left + pw - 1, top + ph), BLACK);
    let xlabel = "step";
    draw_text(&mut img, left + pw / 2 - text_width(xlabel, 1) as i64 / 2, top + ph + 20, xlabel, BLACK, 1);
    let title = if log { format!("{title} (log scale)") } else { title.to_string() };
    draw_text(&mut img, left, 8, &title, BLACK, 2);

    // Lines.
    for (i, s) in series.iter().enumerate() {
        let c = Rgb(PALETTE[i % PALETTE.len()]);
        let mut prev: Option<(i64, i64)> = None;
        for &(x, y) in &s.points {
            if !(x.is_finite() && y.is_finite()) || (log && y <= 0.0) {
                prev = None;
                continue;
            }
            let p = (px(x), py(ty(y)));
            match prev {
                Some(q) => line(&mut img, q, p, c),
                None => line(&mut img, p, p, c),
            }
            prev = Some(p);
        }
    }
    // Legend, top right inside the plot.
    let lh = text_height(1) as i64 + 4;
    let lw = series.iter().map(|s| text_width(&s.name, 1)).max().unwrap_or(0) as i64 + 22;
    let (lx, ly) = (left + pw - lw - 6, top + 6);
    for (i, s) in series.iter().enumerate() {
        let c = Rgb(PALETTE[i % PALETTE.len()]);
        let y = ly + i as i64 * lh;
        for dy in 0..3 {
            line(&mut img, (lx, y + 2 + dy), (lx + 14, y + 2 + dy), c);
        }
        draw_text(&mut img, lx + 20, y, &s.name, BLACK, 1);
    }
    img
}

/// Entries of `losses` that are diagnostics on another scale, left out of the loss curve (they
/// stay in `metrics.jsonl`).
pub const NOT_PLOTTED: &[&str] = &["disc_acc", "correction_std"];

/// The loss series of a `metrics.jsonl`: every `"type": "train"` line's `losses` (but
/// [`NOT_PLOTTED`]).
pub fn loss_series(metrics: &Path) -> Result<Vec<Series>> {
    let text = std::fs::read_to_string(metrics).with_context(|| format!("cannot read {}", metrics.display()))?;
    let mut by_name: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if v["type"] != "train" {
            continue;
        }
        let Some(step) = v["step"].as_f64() else { continue };
        if let Some(losses) = v["losses"].as_object() {
            for (k, x) in losses {
                if NOT_PLOTTED.contains(&k.as_str()) {
                    continue;
                }
                if let Some(x) = x.as_f64() {
                    by_name.entry(k.clone()).or_default().push((step, x));
                }
            }
        }
    }
    Ok(by_name.into_iter().map(|(name, points)| Series { name, points }).collect())
}

/// Draw a run's loss curve from its metrics file into `out` (PNG).
pub fn write_loss_curve(metrics: &Path, out: &Path, width: u32, height: u32) -> Result<()> {
    let series = loss_series(metrics)?;
    let img = draw(&series, width, height, "training losses");
    img.save(out).with_context(|| format!("cannot write {}", out.display()))
}

/// One value of a run's `"type": "train"` lines over the steps, by dotted path into the line
/// (`losses.decoder_mse`, `lr`, `images_per_s`, `time_fractions.step`), or of its `"type":
/// "eval"` lines of the EMA model with `eval.` (`eval.psnr`).
pub fn metric_series(metrics: &Path, key: &str) -> Result<Vec<(f64, f64)>> {
    let text = std::fs::read_to_string(metrics).with_context(|| format!("cannot read {}", metrics.display()))?;
    let (kind, path) = match key.strip_prefix("eval.") {
        Some(rest) => ("eval", rest),
        None => ("train", key),
    };
    let mut out = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if v["type"] != kind || (kind == "eval" && v["model"] != "ema") {
            continue;
        }
        let Some(step) = v["step"].as_f64() else { continue };
        let x = path.split('.').fold(&v, |v, k| &v[k]);
        if let Some(x) = x.as_f64() {
            out.push((step, x));
        }
    }
    Ok(out)
}

/// `train plot`: one metric of several runs in one chart (a line per run, named by its folder).
pub fn write_comparison(runs: &[std::path::PathBuf], key: &str, out: &Path, width: u32, height: u32) -> Result<()> {
    let mut series = Vec::new();
    for r in runs {
        let metrics = if r.is_dir() { r.join(crate::metrics::METRICS_FILE) } else { r.clone() };
        let points = metric_series(&metrics, key)?;
        anyhow::ensure!(!points.is_empty(), "{}: no `{key}` values", metrics.display());
        let name = if r.is_dir() { r.file_name() } else { r.parent().and_then(|p| p.file_name()) };
        series.push(Series {
            name: name.map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| r.display().to_string()),
            points,
        });
    }
    draw(&series, width, height, key).save(out).with_context(|| format!("cannot write {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_one_metric_across_runs() {
        let dir = tempfile::tempdir().unwrap();
        for (run, k) in [("a", 1.0), ("b", 2.0)] {
            std::fs::create_dir_all(dir.path().join(run)).unwrap();
            std::fs::write(
                dir.path().join(run).join("metrics.jsonl"),
                format!(
                    "{{\"type\":\"train\",\"step\":10,\"lr\":0.1,\"losses\":{{\"d\":{k}}}}}\n\
                     {{\"type\":\"eval\",\"step\":10,\"model\":\"raw\",\"psnr\":9.0}}\n\
                     {{\"type\":\"eval\",\"step\":10,\"model\":\"ema\",\"psnr\":{}}}\n",
                    20.0 + k
                ),
            )
            .unwrap();
        }
        let m = dir.path().join("b/metrics.jsonl");
        assert_eq!(metric_series(&m, "losses.d").unwrap(), vec![(10.0, 2.0)]);
        assert_eq!(metric_series(&m, "lr").unwrap(), vec![(10.0, 0.1)]);
        assert_eq!(metric_series(&m, "eval.psnr").unwrap(), vec![(10.0, 22.0)], "the EMA model's");
        let out = dir.path().join("cmp.png");
        write_comparison(&[dir.path().join("a"), dir.path().join("b")], "losses.d", &out, 320, 200).unwrap();
        assert_eq!(image::open(&out).unwrap().into_rgb8().dimensions(), (320, 200));
        let e = write_comparison(&[dir.path().join("a")], "losses.nope", &out, 320, 200).unwrap_err();
        assert!(e.to_string().contains("no `losses.nope` values"), "{e}");
    }

    #[test]
    fn ticks_and_labels() {
        assert_eq!(nice_ticks(0.0, 100.0, 5), vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        assert_eq!(nice_ticks(3.0, 3.9, 4), vec![3.0, 3.25, 3.5, 3.75]);
        assert_eq!(format_tick(0.001), "1e-3");
        assert_eq!(format_tick(0.25), "0.25");
        assert_eq!(format_tick(1200.0), "1200");
        assert_eq!(format_tick(250000.0), "2.5e5");
        assert_eq!(format_tick(0.0), "0");
    }

    #[test]
    fn curve_has_the_size_and_draws_each_series() {
        let s = vec![
            Series {
                name: "decoder".into(),
                points: (0..50).map(|i| (i as f64 * 10.0, 1.0 / (1.0 + i as f64))).collect(),
            },
            Series {
                name: "encoder".into(),
                points: (0..50).map(|i| (i as f64 * 10.0, 0.5 * (-0.05 * i as f64).exp())).collect(),
            },
        ];
        let img = draw(&s, 400, 300, "losses");
        assert_eq!(img.dimensions(), (400, 300));
        for c in &PALETTE[..2] {
            let n = img.pixels().filter(|p| p.0 == *c).count();
            assert!(n > 100, "series colour {c:?} drawn {n} px");
        }
        // Degenerate inputs do not panic.
        draw(&[], 200, 150, "empty");
        draw(&[Series { name: "flat".into(), points: vec![(5.0, 0.0), (5.0, -1.0)] }], 200, 150, "flat");
    }

    #[test]
    fn reads_series_from_metrics_lines() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("metrics.jsonl");
        std::fs::write(
            &m,
            "{\"type\":\"train\",\"step\":10,\"losses\":{\"a\":1.0,\"b\":2.0}}\n{\"type\":\"eval\",\"step\":10}\nnot json\n{\"type\":\"train\",\"step\":20,\"losses\":{\"a\":0.5}}\n",
        )
        .unwrap();
        let s = loss_series(&m).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].points, vec![(10.0, 1.0), (20.0, 0.5)]);
        let out = dir.path().join("loss.png");
        write_loss_curve(&m, &out, 320, 200).unwrap();
        assert_eq!(image::open(&out).unwrap().into_rgb8().dimensions(), (320, 200));
    }
}
