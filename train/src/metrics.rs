//! `metrics.jsonl` of a run: one JSON object per line, each with a `type`:
//!
//! * `train`: `step`, `epoch`, `lr`, `losses` and `grad_norms` (means over the steps since the
//!   previous line), `images_per_s`, `steps_per_s` (wall clock, pauses for evaluation and
//!   previews included), `data_wait` (fraction of the interval spent waiting for the loader),
//!   `time_fractions` (fraction of the interval in each part of the loop: `loader_wait`,
//!   `upload` (batch to the device), `step` (the training step, its readback included),
//!   `pauses` (evaluation, previews, checkpoints, metrics); the rest is unaccounted),
//!   `skipped_total`, `images_seen`, `elapsed_s`.
//! * `skip`: `step`, `reason` — a step the NaN/inf guard skipped.
//! * `eval`: `step`, `model` (`ema`, `raw`, `reference`) and the [`crate::eval::Metrics`] fields.
//! * `checkpoint`, `preview`, `export`, `start`, `end`: `step` and what was written.
//! * `fit` (a run started with `--fit-time`): the budget, the factor every step count was
//!   multiplied by, and per crop and batch size the measured rate and the steps before and
//!   after ([`crate::runner::fit::Fit`]).
//! * `refit` (at each stage switch of the session that fitted the run): the training time so
//!   far, the factor on the rest of the run and `run.steps` before and after
//!   ([`crate::runner::fit::Refit`]).
//!
//! Every line also goes to the run's TensorBoard event file ([`crate::tensorboard`]): its
//! numbers as scalars, a preview line's grid as an image.

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::tensorboard::{has_event_files, EventWriter};

pub const METRICS_FILE: &str = "metrics.jsonl";

/// Appends lines to a run's metrics file, flushed line by line, and mirrors them into a
/// TensorBoard event file of this session.
pub struct MetricsLog {
    path: PathBuf,
    /// `None`: a log that writes nothing (the ranks other than 0 of a data-parallel run).
    out: Option<(std::fs::File, EventWriter)>,
}

impl MetricsLog {
    /// Open for appending. `keep_up_to`: drop lines of steps after it first (a resumed run
    /// repeats the steps after its checkpoint, so their old lines would be duplicates); in
    /// TensorBoard, a session start at the step after it does the same.
    pub fn open(run_dir: &Path, keep_up_to: Option<u64>) -> Result<MetricsLog> {
        let path = run_dir.join(METRICS_FILE);
        let restart = keep_up_to.filter(|_| has_event_files(run_dir));
        let mut tensorboard = EventWriter::create(run_dir)?;
        if let Some(step) = restart {
            tensorboard.session_start(step + 1)?;
        }
        if let (Some(limit), true) = (keep_up_to, path.is_file()) {
            let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<Value>(l).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s <= limit)
                })
                .collect();
            let tmp = path.with_extension("jsonl.tmp");
            std::fs::write(&tmp, kept.iter().map(|l| format!("{l}\n")).collect::<String>())
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            std::fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(MetricsLog { path, out: Some((file, tensorboard)) })
    }

    /// A log that writes nothing (a data-parallel rank other than 0: rank 0 logs the run).
    pub fn disabled(run_dir: &Path) -> MetricsLog {
        MetricsLog { path: run_dir.join(METRICS_FILE), out: None }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write one line: `{"type": kind, "step": step, ...fields}`.
    pub fn write(&mut self, kind: &str, step: u64, fields: Value) -> Result<()> {
        let mut obj = Map::new();
        obj.insert("type".into(), json!(kind));
        obj.insert("step".into(), json!(step));
        if let Value::Object(f) = fields {
            obj.extend(f);
        }
        let obj = Value::Object(obj);
        let Some((file, tensorboard)) = self.out.as_mut() else {
            return Ok(());
        };
        let line = serde_json::to_string(&obj)?;
        writeln!(file, "{line}").with_context(|| format!("cannot write {}", self.path.display()))?;
        file.flush().with_context(|| format!("cannot write {}", self.path.display()))?;
        tensorboard.metrics_line(kind, step, &obj)
    }

    /// This session's TensorBoard event file (none for a disabled log).
    pub fn tensorboard_file(&self) -> Option<&Path> {
        self.out.as_ref().map(|(_, t)| t.path())
    }
}

/// Means of per-step values between two metrics lines, plus throughput.
pub struct Interval {
    losses: BTreeMap<String, (f64, u64)>,
    grads: BTreeMap<String, (f64, u64)>,
    steps: u64,
    images: u64,
    /// Seconds per part of the loop (`loader_wait`, `upload`, `step`, `pauses`).
    times: BTreeMap<&'static str, f64>,
    start: Instant,
}

impl Default for Interval {
    fn default() -> Self {
        Interval {
            losses: BTreeMap::new(),
            grads: BTreeMap::new(),
            steps: 0,
            images: 0,
            times: BTreeMap::new(),
            start: Instant::now(),
        }
    }
}

fn add(map: &mut BTreeMap<String, (f64, u64)>, values: &BTreeMap<String, f64>) {
    for (k, v) in values {
        if v.is_finite() {
            let e = map.entry(k.clone()).or_insert((0.0, 0));
            e.0 += v;
            e.1 += 1;
        }
    }
}

fn means(map: &BTreeMap<String, (f64, u64)>) -> Value {
    Value::Object(map.iter().map(|(k, (s, n))| (k.clone(), json!(s / (*n).max(1) as f64))).collect())
}

impl Interval {
    /// A finished (not skipped) step.
    pub fn add_step(&mut self, losses: &BTreeMap<String, f64>, grads: &BTreeMap<String, f64>, images: u64) {
        add(&mut self.losses, losses);
        add(&mut self.grads, grads);
        self.count(images);
    }

    /// A step that consumed a batch (skipped or not).
    pub fn count(&mut self, images: u64) {
        self.steps += 1;
        self.images += images;
    }

    /// Time spent in one part of the loop (`loader_wait`, `upload`, `step`, `pauses`).
    pub fn time(&mut self, part: &'static str, seconds: f64) {
        *self.times.entry(part).or_insert(0.0) += seconds;
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The loss means so far (for the progress bar).
    pub fn loss_means(&self) -> Vec<(String, f64)> {
        self.losses.iter().map(|(k, (s, n))| (k.clone(), s / (*n).max(1) as f64)).collect()
    }

    /// The fields of a `train` line; resets the interval.
    pub fn take(&mut self) -> Value {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let v = json!({
            "losses": means(&self.losses),
            "grad_norms": means(&self.grads),
            "images_per_s": self.images as f64 / secs,
            "steps_per_s": self.steps as f64 / secs,
            "data_wait": (self.times.get("loader_wait").copied().unwrap_or(0.0) / secs).min(1.0),
            "time_fractions": Value::Object(self.times.iter().map(|(k, t)| (k.to_string(), json!((t / secs).min(1.0)))).collect()),
        });
        *self = Interval::default();
        v
    }
}

/// Lines of a metrics file of one `type`.
pub fn read_lines(path: &Path, kind: &str) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter(|v| v["type"] == kind).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_interval_means_and_truncation_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(dir.path(), None).unwrap();
        let mut iv = Interval::default();
        for s in 1..=4u64 {
            let l = BTreeMap::from([("decoder".to_string(), s as f64)]);
            iv.add_step(&l, &BTreeMap::new(), 2);
            iv.time("step", 0.0);
            if s % 2 == 0 {
                log.write("train", s, iv.take()).unwrap();
            }
        }
        log.write("skip", 5, json!({"reason": "nan"})).unwrap();
        let lines = read_lines(log.path(), "train").unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["losses"]["decoder"], 1.5);
        assert_eq!(lines[1]["losses"]["decoder"], 3.5);
        assert_eq!(lines[1]["step"], 4);
        assert!(lines[0]["images_per_s"].as_f64().unwrap() > 0.0);
        assert_eq!(lines[0]["time_fractions"]["step"], 0.0);
        assert_eq!(lines[0]["data_wait"], 0.0);
        drop(log);
        let mut log = MetricsLog::open(dir.path(), Some(2)).unwrap();
        log.write("train", 3, json!({"lr": 0.5})).unwrap();
        let steps: Vec<u64> =
            read_lines(log.path(), "train").unwrap().iter().map(|v| v["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, [2, 3]);
        assert!(read_lines(log.path(), "skip").unwrap().is_empty());
        // Each session its own event file; the resumed one starts with a session start at step 3.
        let recs = crate::tensorboard::tests::read_records(log.tensorboard_file().expect("an open log"));
        assert_eq!(recs.len(), 3, "file version, session start, one line");
        let start = taesd::protobuf::read::fields(&recs[1]).unwrap();
        assert_eq!(taesd::protobuf::read::all(&start, 2), [taesd::protobuf::read::Value::Varint(3)]);
        let files = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains("tfevents"))
            .count();
        assert!(files >= 1);
    }
}
