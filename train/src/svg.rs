//! Line charts as inline SVG (for `report.html`): axes with the loss curve's "nice" ticks
//! ([`crate::plot`]), a polyline per series, a legend; log scale on y when every value is
//! positive and they span more than a decade.

use crate::plot::{format_tick, nice_ticks, Series, PALETTE};
use std::fmt::Write;

/// Escape text for HTML/SVG.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn color(i: usize) -> String {
    let [r, g, b] = PALETTE[i % PALETTE.len()];
    format!("#{r:02x}{g:02x}{b:02x}")
}

/// A chart of `series` (points `(step, value)`), `width` x `height` px.
pub fn line_chart(title: &str, series: &[Series], width: u32, height: u32) -> String {
    let pts = || series.iter().flat_map(|s| s.points.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut y_min, mut y_max) = (f64::INFINITY, f64::NEG_INFINITY);
    for &(_, y) in pts() {
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    let log = pts().count() > 0 && y_min > 0.0 && y_max / y_min > 10.0;
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
    if y1 - y0 <= 1e-9 * y0.abs().max(1e-300) {
        // A flat line (a constant learning rate): a band of ±10% around it (±0.05 around 0).
        let d = if y0 != 0.0 { y0.abs() * 0.1 } else { 0.05 };
        y0 -= d;
        y1 += d;
    }
    let pad = (y1 - y0) * 0.05;
    (y0, y1) = (y0 - pad, y1 + pad);
    let (left, right, top, bottom) = (64.0, 16.0, 30.0, 40.0);
    let (pw, ph) = (width as f64 - left - right, height as f64 - top - bottom);
    let px = |x: f64| left + (x - x0) / (x1 - x0) * pw;
    let py = |v: f64| top + ph - (v - y0) / (y1 - y0) * ph;

    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{t}" class="chart"><title>{t}</title><rect width="100%" height="100%" fill="white"/>"#,
        t = escape(title)
    );
    let _ = write!(
        s,
        r#"<text x="{left}" y="18" font-size="14" font-weight="bold">{}{}</text>"#,
        escape(title),
        if log { " (log scale)" } else { "" }
    );
    // y ticks
    let yticks: Vec<(f64, String)> = if log {
        let mut t: Vec<(f64, String)> = (y0.floor() as i64..=y1.ceil() as i64)
            .flat_map(|d| [1.0, 2.0, 5.0].map(move |m| m * 10f64.powi(d as i32)))
            .map(|v| (v.log10(), format_tick(v)))
            .filter(|(v, _)| *v >= y0 && *v <= y1)
            .collect();
        if t.len() > 8 {
            t.retain(|(_, l)| l.starts_with('1'));
        }
        t
    } else {
        let t = nice_ticks(y0, y1, 5);
        let short: Vec<String> = t.iter().map(|v| format_tick(*v)).collect();
        let distinct = short.iter().collect::<std::collections::BTreeSet<_>>().len() == short.len();
        // Close ticks (a band around a constant) need more digits than the loss curve's labels.
        t.into_iter().zip(short).map(|(v, l)| (v, if distinct { l } else { format!("{v:.2e}") })).collect()
    };
    for (v, label) in &yticks {
        let y = py(*v);
        let _ = write!(
            s,
            r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
            left + pw,
            left - 6.0,
            y + 4.0,
            escape(label)
        );
    }
    for v in nice_ticks(x0, x1, 6) {
        let x = px(v);
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{:.1}" stroke="#e4e4e4"/><text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"##,
            top + ph,
            top + ph + 16.0,
            escape(&format_tick(v))
        );
    }
    let _ = write!(
        s,
        r##"<polyline points="{left},{top} {left},{b:.1} {r:.1},{b:.1}" fill="none" stroke="black"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">step</text>"##,
        left + pw / 2.0,
        top + ph + 34.0,
        b = top + ph,
        r = left + pw
    );
    for (i, se) in series.iter().enumerate() {
        // A break in the line where a value is missing or not finite.
        let mut runs: Vec<Vec<(f64, f64)>> = vec![vec![]];
        for &(x, y) in &se.points {
            if x.is_finite() && y.is_finite() && (!log || y > 0.0) {
                runs.last_mut().unwrap().push((px(x), py(ty(y))));
            } else if !runs.last().unwrap().is_empty() {
                runs.push(vec![]);
            }
        }
        for run in runs.iter().filter(|r| !r.is_empty()) {
            let p: Vec<String> = run.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            if run.len() == 1 {
                let _ = write!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{}"/>"#, run[0].0, run[0].1, color(i));
            } else {
                let _ = write!(
                    s,
                    r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="1.6"/>"#,
                    p.join(" "),
                    color(i)
                );
            }
        }
        let ly = top + 8.0 + i as f64 * 16.0;
        let lx = left + pw - 150.0;
        let _ = write!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="3"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
            lx + 16.0,
            color(i),
            lx + 22.0,
            ly + 4.0,
            escape(&se.name)
        );
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_has_a_line_per_series_and_escapes_text() {
        let s = vec![
            Series { name: "a<b".into(), points: (0..20).map(|i| (i as f64, 1.0 / (1.0 + i as f64))).collect() },
            Series { name: "c".into(), points: vec![(3.0, 0.5), (4.0, f64::NAN), (5.0, 0.25), (6.0, 0.2)] },
        ];
        let svg = line_chart("losses & more", &s, 400, 240);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("a&lt;b") && svg.contains("losses &amp; more"));
        // One polyline per unbroken run of each series, plus the axes; a lone point is a circle.
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert_eq!(svg.matches("<circle").count(), 1);
        assert!(svg.contains("(log scale)"), "spans more than a decade");
        // Degenerate inputs do not panic.
        assert!(line_chart("empty", &[], 200, 100).contains("</svg>"));
        let flat = line_chart("flat", &[Series { name: "f".into(), points: vec![(1.0, 2.0), (1.0, 2.0)] }], 200, 100);
        assert!(!flat.contains("NaN"), "{flat}");
        // A constant small value gets ticks around it, not around 0.
        let lr = line_chart("lr", &[Series { name: "lr".into(), points: vec![(0.0, 1e-5), (10.0, 1e-5)] }], 300, 200);
        assert!(lr.contains(">1.00e-5<") && lr.contains(">1.05e-5<") && !lr.contains(">-0.05<"), "{lr}");
    }
}
