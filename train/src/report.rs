//! `report.html`: one self-contained page of a run (no scripts, no network: CSS inline, charts
//! as inline SVG, the preview grid as a base64 PNG), from what the run folder holds:
//!
//! | section (`id`) | from |
//! |---|---|
//! | `summary` | `config.toml`, the `start` / `end` lines of `metrics.jsonl`, the latest checkpoint |
//! | `curves` | `train` lines (losses, learning rate, grad norms), `eval` lines (PSNR, SSIM, ...) |
//! | `eval` | `eval.json` (the latest evaluation: ours against the reference decoder) |
//! | `preview` | the newest `previews/step-N.png` |
//! | `throughput` | images/s over the run, where the loop's time went (`time_fractions`), sessions |
//! | `exports` | `export/export.json`: each file, what reads it, its size and sha256 |
//! | `config` | `config.toml`, as resolved |
//!
//! Written at the end of every run (and of an interrupted session) and by `train report RUN`.

use crate::eval::Metrics;
use crate::metrics::METRICS_FILE;
use crate::plot::Series;
use crate::svg::{escape, line_chart};
use anyhow::{Context, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

pub const REPORT_FILE: &str = "report.html";
/// The section ids, in page order.
pub const SECTIONS: [&str; 7] = ["summary", "curves", "eval", "preview", "throughput", "exports", "config"];

const CHART_W: u32 = 560;
const CHART_H: u32 = 260;

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 16px}\
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}\
.sub{color:#666;font-size:13px}table{border-collapse:collapse;font-size:13px;margin:8px 0}\
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}\
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{border:1px solid #eee}pre{background:#f7f7f7;padding:10px;font-size:12px;overflow:auto;max-height:520px}\
code{font-size:12px}.kv td:first-child{text-align:left;color:#555}img.preview{max-width:100%;image-rendering:pixelated;border:1px solid #ddd}\
.ok{color:#1a7f37}.warn{color:#b35900}";

/// Standard base64 (RFC 4648, with padding).
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut o = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                o.push(A[(n >> shift & 63) as usize] as char);
            } else {
                o.push('=');
            }
        }
    }
    o
}

/// `YYYY-MM-DD HH:MM UTC` of a Unix time.
fn utc(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let (h, m) = ((secs % 86400) / 3600, (secs % 3600) / 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02} UTC")
}

fn fmt_num(v: f64, prec: usize) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    if v != 0.0 && (v.abs() < 1e-3 || v.abs() >= 1e6) {
        format!("{v:.3e}")
    } else {
        format!("{v:.prec$}")
    }
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn sha256_file(p: &Path) -> Result<String> {
    let mut f = std::fs::File::open(p).with_context(|| format!("cannot read {}", p.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// What reads an exported file.
pub fn consumer(path: &Path) -> &'static str {
    let s = path.to_string_lossy();
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if name.ends_with(".onnx") {
        if name.ends_with(".fp16.onnx") {
            "ONNX Runtime (float16)"
        } else {
            "ONNX Runtime (float32); precompute --onnx --vae custom"
        }
    } else if name.ends_with(".pth") {
        "taesd.py TAESD(encoder_path, decoder_path); ComfyUI models/vae_approx/"
    } else if s.contains("/diffusers/") || name == "config.json" {
        "diffusers AutoencoderTiny.from_pretrained(folder)"
    } else if s.contains("/comfyui/") {
        "ComfyUI models/vae/ (encoder and decoder in one file)"
    } else if s.contains("/taesd/") {
        "taesd.py layout as safetensors; train eval / encode / decode"
    } else {
        "checkpoint"
    }
}

/// Lines of `metrics.jsonl` (empty when there is none).
fn metrics_lines(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join(METRICS_FILE))
        .map(|t| t.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect())
        .unwrap_or_default()
}

/// The series of `key` (a nested table of numbers) over `train` lines, one per entry.
fn nested_series(lines: &[Value], kind: &str, key: &str, skip: &[&str]) -> Vec<Series> {
    let mut by: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for l in lines.iter().filter(|l| l["type"] == kind) {
        let Some(step) = l["step"].as_f64() else { continue };
        if let Some(o) = l[key].as_object() {
            for (k, v) in o {
                if let Some(x) = v.as_f64().filter(|_| !skip.contains(&k.as_str())) {
                    by.entry(k.clone()).or_default().push((step, x));
                }
            }
        }
    }
    by.into_iter().map(|(name, points)| Series { name, points }).collect()
}

/// One top-level number of `kind` lines as a series.
fn scalar_series(lines: &[Value], kind: &str, key: &str, name: &str) -> Vec<Series> {
    let points: Vec<(f64, f64)> = lines
        .iter()
        .filter(|l| l["type"] == kind)
        .filter_map(|l| Some((l["step"].as_f64()?, l[key].as_f64()?)))
        .collect();
    if points.is_empty() {
        vec![]
    } else {
        vec![Series { name: name.to_string(), points }]
    }
}

/// An eval metric over the run, one series per model.
fn eval_series(lines: &[Value], metric: &str) -> Vec<Series> {
    let mut by: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for l in lines.iter().filter(|l| l["type"] == "eval") {
        if let (Some(step), Some(m), Some(v)) = (l["step"].as_f64(), l["model"].as_str(), l[metric].as_f64()) {
            by.entry(m.to_string()).or_default().push((step, v));
        }
    }
    by.into_iter().map(|(name, points)| Series { name, points }).collect()
}

fn chart_or_note(out: &mut String, title: &str, series: &[Series]) {
    if series.iter().all(|s| s.points.is_empty()) {
        let _ = write!(out, "<p class=\"sub\">{}: nothing logged yet.</p>", escape(title));
    } else {
        out.push_str(&line_chart(title, series, CHART_W, CHART_H));
    }
}

/// The newest preview grid: `(step, path)`.
fn latest_preview(run_dir: &Path) -> Option<(u64, PathBuf)> {
    std::fs::read_dir(run_dir.join("previews"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let step = p.file_stem()?.to_str()?.strip_prefix("step-")?.parse::<u64>().ok()?;
            (p.extension()? == "png").then_some((step, p))
        })
        .max_by_key(|(s, _)| *s)
}

const EVAL_COLUMNS: [(&str, usize); 8] = [
    ("psnr", 2),
    ("ssim", 4),
    ("sharpness", 3),
    ("cycle_mae", 4),
    ("encoder_mae", 4),
    ("encoder_rmse", 4),
    ("roundtrip_psnr", 2),
    ("roundtrip_ssim", 4),
];

fn eval_table(out: &mut String, eval: &Value) {
    let Some(models) = eval["models"].as_object() else {
        out.push_str("<p class=\"sub\">No evaluation yet (eval.json is written at step 0, every run.eval_every steps and at the end, when data.eval_fraction &gt; 0).</p>");
        return;
    };
    let _ = write!(
        out,
        "<p class=\"sub\">Held-out rows: {} images, step {}. <b>ema</b>: the exported (EMA) weights; <b>ema&lt;decay&gt;</b>: more EMAs (<code>recipe.ema_probe_decays</code>), not exported; <b>raw</b>: the trained weights; <b>reference</b>: the reference decoder (<code>model.reference_decoder</code>) on the same teacher latents.</p>",
        eval["images"],
        eval["step"]
    );
    out.push_str("<table><tr><th class=\"l\">model</th><th>images</th>");
    for (c, _) in EVAL_COLUMNS {
        let _ = write!(out, "<th>{c}</th>");
    }
    out.push_str("</tr>");
    let parsed: Vec<(String, Metrics)> = models
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), serde_json::from_value::<Metrics>(v.clone()).ok()?)))
        .collect();
    let get = |m: &Metrics, c: &str| -> Option<f64> { serde_json::to_value(m).ok()?.get(c)?.as_f64() };
    for (name, m) in &parsed {
        let _ = write!(out, "<tr><td class=\"l\">{}</td><td>{}</td>", escape(name), m.images);
        for (c, prec) in EVAL_COLUMNS {
            match get(m, c) {
                Some(v) => {
                    let _ = write!(out, "<td>{}</td>", fmt_num(v, prec));
                }
                None => out.push_str("<td>-</td>"),
            }
        }
        out.push_str("</tr>");
    }
    let find = |n: &str| parsed.iter().find(|(k, _)| k == n).map(|(_, m)| m);
    if let (Some(ema), Some(r)) = (find("ema"), find("reference")) {
        out.push_str("<tr><td class=\"l\"><b>ema &minus; reference</b></td><td></td>");
        for (c, prec) in EVAL_COLUMNS {
            match (get(ema, c), get(r, c)) {
                (Some(a), Some(b)) => {
                    let d = a - b;
                    let _ = write!(out, "<td><b>{}{}</b></td>", if d >= 0.0 { "+" } else { "" }, fmt_num(d, prec));
                }
                _ => out.push_str("<td></td>"),
            }
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
    if find("reference").is_none() {
        out.push_str("<p class=\"sub\">No reference decoder in this evaluation: set <code>model.reference_decoder</code> (e.g. the released decoder) to compare.</p>");
    }
}

/// Mean of each `time_fractions` entry over the train lines.
fn time_fractions(lines: &[Value]) -> Vec<(String, f64)> {
    let mut sums: BTreeMap<String, (f64, u64)> = BTreeMap::new();
    for l in lines.iter().filter(|l| l["type"] == "train") {
        if let Some(o) = l["time_fractions"].as_object() {
            for (k, v) in o {
                if let Some(x) = v.as_f64() {
                    let e = sums.entry(k.clone()).or_insert((0.0, 0));
                    e.0 += x;
                    e.1 += 1;
                }
            }
        }
    }
    sums.into_iter().map(|(k, (s, n))| (k, s / n.max(1) as f64)).collect()
}

fn kv(out: &mut String, rows: &[(&str, String)]) {
    out.push_str("<table class=\"kv\">");
    for (k, v) in rows {
        let _ = write!(out, "<tr><td>{}</td><td class=\"l\">{v}</td></tr>", escape(k));
    }
    out.push_str("</table>");
}

/// The page of `run_dir`.
pub fn render(run_dir: &Path) -> Result<String> {
    let config_text = std::fs::read_to_string(run_dir.join(crate::config::RESOLVED_CONFIG)).ok();
    let config: toml::Table = config_text.as_deref().and_then(|t| t.parse().ok()).unwrap_or_default();
    let cfg = |path: &str| crate::config::get_path(&config, path).map(|v| v.to_string().trim_matches('"').to_string());
    let lines = metrics_lines(run_dir);
    let last = |kind: &str| lines.iter().rev().find(|l| l["type"] == kind);
    let name = cfg("run.name")
        .unwrap_or_else(|| run_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    let total = cfg("run.steps").and_then(|s| s.parse::<u64>().ok());
    let latest_ckpt = crate::checkpoint::latest(run_dir).ok().flatten().map(|(s, _)| s);
    let step = lines.iter().filter_map(|l| l["step"].as_u64()).max().or(latest_ckpt).unwrap_or(0);
    let generated =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);

    let mut o = String::new();
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t} — taesd-rs run report</title><style>{STYLE}</style></head><body>",
        t = escape(&name)
    );
    let _ = write!(
        o,
        "<header><h1>Run <code>{}</code></h1><div class=\"sub\">{} &middot; report generated {} by taesd-rs {}</div></header>",
        escape(&name),
        escape(&run_dir.display().to_string()),
        utc(generated),
        env!("CARGO_PKG_VERSION")
    );

    // Summary.
    o.push_str("<section id=\"summary\"><h2>Summary</h2>");
    let end = last("end");
    let status = match (end, total) {
        (Some(e), Some(t)) if e["interrupted"] == false && e["step"].as_u64() == Some(t) => {
            format!("<span class=\"ok\">finished</span> at step {t}")
        }
        (Some(e), Some(t)) if e["interrupted"] == true => {
            format!(
                "<span class=\"warn\">stopped</span> at step {} of {t} (continue with <code>train --resume</code>)",
                e["step"]
            )
        }
        (_, Some(t)) => format!("<span class=\"warn\">running or stopped</span> at step {step} of {t}"),
        _ => format!("step {step}"),
    };
    let start = last("start");
    let train_last = last("train");
    let mut rows: Vec<(&str, String)> = vec![
        ("status", status),
        ("model", escape(&cfg("model.variant").unwrap_or_else(|| "custom".into()))),
        ("device", escape(start.and_then(|s| s["device"].as_str()).unwrap_or("-"))),
        ("precision", escape(start.and_then(|s| s["precision"].as_str()).unwrap_or("-"))),
        (
            "shards",
            format!(
                "{} ({} rows, {} held out)",
                escape(&cfg("data.shards").unwrap_or_default()),
                start.map(|s| s["rows"].to_string()).unwrap_or("-".into()),
                start.map(|s| s["eval_rows"].to_string()).unwrap_or("-".into())
            ),
        ),
        (
            "crop, batch",
            format!("{} px, {}", cfg("data.crop").unwrap_or("-".into()), cfg("data.batch_size").unwrap_or("-".into())),
        ),
    ];
    if let Some(t) = train_last {
        rows.push(("images seen", t["images_seen"].to_string()));
        if let Some(e) = t["elapsed_s"].as_f64() {
            rows.push(("training time", format!("{:.1} min ({:.0} s, loop time over all sessions)", e / 60.0, e)));
        }
    }
    if let Some(c) = latest_ckpt {
        rows.push(("latest checkpoint", format!("step {c}")));
    }
    kv(&mut o, &rows);
    o.push_str("</section>");

    // Curves.
    o.push_str("<section id=\"curves\"><h2>Loss and evaluation curves</h2><div class=\"charts\">");
    let losses = crate::plot::loss_series(&run_dir.join(METRICS_FILE)).unwrap_or_default();
    chart_or_note(&mut o, "training losses", &losses);
    chart_or_note(&mut o, "learning rate", &scalar_series(&lines, "train", "lr", "lr"));
    chart_or_note(&mut o, "gradient norms", &nested_series(&lines, "train", "grad_norms", &[]));
    let diagnostics: Vec<Series> = nested_series(&lines, "train", "losses", &[])
        .into_iter()
        .filter(|s| crate::plot::NOT_PLOTTED.contains(&s.name.as_str()))
        .collect();
    chart_or_note(&mut o, "discriminator diagnostics", &diagnostics);
    for (metric, title) in [
        ("psnr", "held-out PSNR (dB)"),
        ("ssim", "held-out SSIM"),
        ("sharpness", "held-out sharpness ratio"),
        ("encoder_mae", "held-out encoder MAE"),
    ] {
        chart_or_note(&mut o, title, &eval_series(&lines, metric));
    }
    o.push_str("</div></section>");

    // Eval table.
    o.push_str("<section id=\"eval\"><h2>Evaluation against the reference decoder</h2>");
    let eval: Value = std::fs::read_to_string(run_dir.join("eval.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    eval_table(&mut o, &eval);
    o.push_str("</section>");

    // Preview.
    o.push_str("<section id=\"preview\"><h2>Latest preview</h2>");
    match latest_preview(run_dir) {
        Some((s, p)) => {
            let png = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
            let _ = write!(
                o,
                "<p class=\"sub\">Step {s} ({}): held-out images; columns real | reference D(z) | ours D(z) | ours D(E(x)) | teacher z | our E(x) (latents: first three channels, [-3, 3]).</p><img class=\"preview\" alt=\"preview grid at step {s}\" src=\"data:image/png;base64,{}\">",
                escape(&p.strip_prefix(run_dir).unwrap_or(&p).display().to_string()),
                base64(&png)
            );
        }
        None => o.push_str("<p class=\"sub\">No preview yet.</p>"),
    }
    o.push_str("</section>");

    // Throughput and timings.
    o.push_str("<section id=\"throughput\"><h2>Throughput and timings</h2><div class=\"charts\">");
    chart_or_note(
        &mut o,
        "images/s (wall clock, pauses included)",
        &scalar_series(&lines, "train", "images_per_s", "images/s"),
    );
    chart_or_note(&mut o, "share of the loop's time", &nested_series(&lines, "train", "time_fractions", &[]));
    o.push_str("</div>");
    let ips: Vec<f64> =
        lines.iter().filter(|l| l["type"] == "train").filter_map(|l| l["images_per_s"].as_f64()).collect();
    if !ips.is_empty() {
        let mut sorted = ips.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let _ = write!(
            o,
            "<p>images/s over {} metrics lines: median <b>{}</b>, min {}, max {}.</p>",
            ips.len(),
            fmt_num(sorted[sorted.len() / 2], 1),
            fmt_num(sorted[0], 1),
            fmt_num(sorted[sorted.len() - 1], 1)
        );
    }
    let fr = time_fractions(&lines);
    if !fr.is_empty() {
        o.push_str("<table><tr><th class=\"l\">part of the loop</th><th>mean share</th></tr>");
        for (k, v) in &fr {
            let _ = write!(o, "<tr><td class=\"l\">{}</td><td>{:.1} %</td></tr>", escape(k), v * 100.0);
        }
        let rest = 1.0 - fr.iter().map(|(_, v)| v).sum::<f64>();
        let _ = write!(o, "<tr><td class=\"l\">unaccounted</td><td>{:.1} %</td></tr></table>", rest.max(0.0) * 100.0);
    }
    let starts: Vec<&Value> = lines.iter().filter(|l| l["type"] == "start").collect();
    let ends: Vec<&Value> = lines.iter().filter(|l| l["type"] == "end").collect();
    if !starts.is_empty() {
        o.push_str("<table><tr><th class=\"l\">session</th><th>from step</th><th>to step</th><th>steps/s</th><th class=\"l\">device</th><th class=\"l\">precision</th><th class=\"l\">ended</th></tr>");
        for (i, s) in starts.iter().enumerate() {
            let from = s["step"].as_u64().unwrap_or(0);
            let e = ends.iter().find(|e| {
                e["step"].as_u64().unwrap_or(0) >= from
                    && starts.get(i + 1).is_none_or(|n| e["step"].as_u64() <= n["step"].as_u64())
            });
            let _ = write!(
                o,
                "<tr><td class=\"l\">{}</td><td>{from}</td><td>{}</td><td>{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td></tr>",
                i + 1,
                e.map(|e| e["step"].to_string()).unwrap_or("-".into()),
                e.and_then(|e| e["steps_per_s"].as_f64()).map(|v| fmt_num(v, 3)).unwrap_or("-".into()),
                escape(s["device"].as_str().unwrap_or("-")),
                escape(s["precision"].as_str().unwrap_or("-")),
                match e {
                    Some(e) if e["interrupted"] == true => "interrupted",
                    Some(_) => "finished",
                    None => "-",
                }
            );
        }
        o.push_str("</table>");
    }
    o.push_str("</section>");

    // Exports.
    o.push_str("<section id=\"exports\"><h2>Exports</h2>");
    let info: Option<crate::models::ExportInfo> =
        std::fs::read_to_string(run_dir.join("export").join(crate::models::EXPORT_INFO))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
    match info {
        Some(info) => {
            let _ = write!(o, "<p class=\"sub\">EMA weights of step {}.</p>", info.step);
            o.push_str("<table><tr><th class=\"l\">file</th><th class=\"l\">for</th><th>size</th><th class=\"l\">sha256</th></tr>");
            for f in &info.files {
                let shown = f.strip_prefix(run_dir).unwrap_or(f).display().to_string();
                let (sz, sha) = match (std::fs::metadata(f), sha256_file(f)) {
                    (Ok(m), Ok(h)) => (size(m.len()), h),
                    _ => ("-".into(), "(missing)".into()),
                };
                let _ = write!(
                    o,
                    "<tr><td class=\"l\"><code>{}</code></td><td class=\"l\">{}</td><td>{sz}</td><td class=\"l\"><code>{sha}</code></td></tr>",
                    escape(&shown),
                    escape(consumer(f))
                );
            }
            o.push_str("</table>");
        }
        None => o.push_str("<p class=\"sub\">No export yet (written when the run reaches its last step).</p>"),
    }
    o.push_str("</section>");

    // Config.
    o.push_str("<section id=\"config\"><h2>Resolved configuration</h2>");
    match &config_text {
        Some(t) => {
            let _ = write!(o, "<pre>{}</pre>", escape(t));
        }
        None => o.push_str("<p class=\"sub\">No config.toml.</p>"),
    }
    o.push_str("</section></body></html>\n");
    Ok(o)
}

/// Write `run_dir/report.html` (atomically); returns its path.
pub fn write(run_dir: &Path) -> Result<PathBuf> {
    let html = render(run_dir)?;
    let path = run_dir.join(REPORT_FILE);
    let tmp = run_dir.join(format!(".{REPORT_FILE}.tmp"));
    std::fs::write(&tmp, html).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_dates() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(951_782_400 + 3600 + 120), "2000-02-29 01:02 UTC");
        assert_eq!(consumer(Path::new("r/export/onnx/taef2_decoder.fp16.onnx")), "ONNX Runtime (float16)");
        assert!(consumer(Path::new("r/export/taesd/taef2_decoder.pth")).contains("taesd.py"));
    }

    #[test]
    fn a_run_folder_gives_every_section() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("config.toml"), "[run]\nname = \"x<y\"\nsteps = 4\n[model]\nvariant = \"taef2\"\n")
            .unwrap();
        let lines = [
            r#"{"type":"start","step":0,"device":"cpu","precision":"f32","rows":10,"eval_rows":2}"#,
            r#"{"type":"eval","step":0,"model":"ema","images":2,"psnr":10.0}"#,
            r#"{"type":"train","step":2,"lr":0.001,"losses":{"decoder":0.5,"disc_acc":0.9},"grad_norms":{"decoder":1.0},"images_per_s":3.0,"time_fractions":{"step":0.9},"images_seen":8,"elapsed_s":2.0}"#,
            r#"{"type":"train","step":4,"lr":0.001,"losses":{"decoder":0.4,"disc_acc":0.8},"grad_norms":{"decoder":0.8},"images_per_s":4.0,"time_fractions":{"step":0.8},"images_seen":16,"elapsed_s":4.0}"#,
            r#"{"type":"eval","step":4,"model":"ema","images":2,"psnr":12.0}"#,
            r#"{"type":"end","step":4,"interrupted":false,"steps_per_s":1.0}"#,
        ];
        std::fs::write(d.join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
        std::fs::write(
            d.join("eval.json"),
            r#"{"step":4,"images":2,"models":{"ema":{"images":2,"psnr":12.0,"ssim":0.5},"reference":{"images":2,"psnr":20.0,"ssim":0.9}}}"#,
        )
        .unwrap();
        std::fs::create_dir_all(d.join("previews")).unwrap();
        image::RgbImage::new(4, 4).save(d.join("previews/step-00000002.png")).unwrap();
        image::RgbImage::new(6, 6).save(d.join("previews/step-00000004.png")).unwrap();
        std::fs::create_dir_all(d.join("export/onnx")).unwrap();
        std::fs::write(d.join("export/onnx/taef2_encoder.onnx"), b"abc").unwrap();
        let files = vec![d.join("export/onnx/taef2_encoder.onnx")];
        std::fs::write(
            d.join("export/export.json"),
            serde_json::to_string(&crate::models::ExportInfo { step: 4, files }).unwrap(),
        )
        .unwrap();

        let p = write(d).unwrap();
        let html = std::fs::read_to_string(p).unwrap();
        for s in SECTIONS {
            assert!(html.contains(&format!("<section id=\"{s}\">")), "no {s}");
        }
        assert!(html.contains("x&lt;y") && !html.contains("x<y"));
        assert!(html.contains("finished"));
        // sha256("abc")
        assert!(html.contains("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
        assert!(html.contains("<b>-8.00</b>"), "ema - reference psnr");
        let newest = base64(&std::fs::read(d.join("previews/step-00000004.png")).unwrap());
        assert!(html.contains(&newest), "the newest preview is embedded");
        assert!(html.matches("<svg").count() >= 5);
        assert!(
            !html.contains("http://")
                || html.matches("http://").count() == html.matches("xmlns=\"http://www.w3.org/2000/svg\"").count(),
            "no links out"
        );
        // An empty folder still gives a page.
        let empty = tempfile::tempdir().unwrap();
        let html = render(empty.path()).unwrap();
        assert!(html.contains("No preview yet") && html.contains("No export yet"));
    }
}
