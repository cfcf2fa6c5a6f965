//! TensorBoard event files in the run folder, so `tensorboard --logdir runs/` shows a run live
//! and sweeps side by side. Written by hand: TFRecord framing (`u64` length, masked CRC-32C of
//! the length, the record, masked CRC-32C of the record) around `Event` protobufs
//! (`tensorboard/compat/proto/event.proto`, `summary.proto`).
//!
//! Every line of `metrics.jsonl` goes there too ([`tags`] says under which tags); the preview
//! grids as images (tag [`PREVIEW_TAG`]). A session writes its own file,
//! `events.out.tfevents.<unix seconds>.<host>.<pid>.taesd-rs`; a resumed session first writes a
//! `SessionLog` START at the step after its checkpoint, so that TensorBoard drops the steps the
//! interrupted session logged past the checkpoint (they are trained again).

use anyhow::{Context, Result};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use taesd::crc::masked_crc32c;
use taesd::protobuf::Message;

/// The tag of the preview grid images.
pub const PREVIEW_TAG: &str = "preview";
/// What marks a file as an event file for TensorBoard.
pub const FILE_MARK: &str = "tfevents";

/// `Event` fields.
mod event {
    pub const WALL_TIME: u32 = 1;
    pub const STEP: u32 = 2;
    pub const FILE_VERSION: u32 = 3;
    pub const SUMMARY: u32 = 5;
    pub const SESSION_LOG: u32 = 7;
    /// `SessionLog.status` and its START value.
    pub const SESSION_STATUS: u32 = 1;
    pub const START: i64 = 1;
}

/// `Summary` / `Summary.Value` / `Summary.Image` fields.
mod summary {
    pub const VALUE: u32 = 1;
    pub const TAG: u32 = 1;
    pub const SIMPLE_VALUE: u32 = 2;
    pub const IMAGE: u32 = 4;
    pub const IMAGE_HEIGHT: u32 = 1;
    pub const IMAGE_WIDTH: u32 = 2;
    pub const IMAGE_COLORSPACE: u32 = 3;
    pub const IMAGE_ENCODED: u32 = 4;
}

/// One TFRecord: length, its masked CRC, the data, its masked CRC.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend(len);
    r.extend(masked_crc32c(&len).to_le_bytes());
    r.extend(data);
    r.extend(masked_crc32c(data).to_le_bytes());
    r
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn hostname() -> String {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let h: String = h.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.').collect();
    if h.is_empty() {
        "localhost".into()
    } else {
        h
    }
}

/// Appends events to one event file, flushed after each.
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl EventWriter {
    /// A new event file in `dir`, starting with the file-version event.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        let secs = now() as u64;
        let (host, pid) = (hostname(), std::process::id());
        let mut n = 0;
        let (path, file) = loop {
            // A new file each session, also for two sessions of one process in one second.
            let suffix = if n == 0 { String::new() } else { format!(".{n}") };
            let path = dir.join(format!("events.out.{FILE_MARK}.{secs:010}.{host}.{pid}{suffix}.taesd-rs"));
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
            }
        };
        let mut w = EventWriter { path, file };
        let mut e = Self::event(0);
        e.string(event::FILE_VERSION, "brain.Event:2");
        w.write(&e)?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn event(step: u64) -> Message {
        let mut e = Message::new();
        e.double(event::WALL_TIME, now()).varint(event::STEP, step as i64);
        e
    }

    fn write(&mut self, e: &Message) -> Result<()> {
        self.file
            .write_all(&record(e.as_bytes()))
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    /// Scalars at `step`, one event.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let mut s = Message::new();
        for (tag, v) in values {
            let mut val = Message::new();
            val.string(summary::TAG, tag).float(summary::SIMPLE_VALUE, *v as f32);
            s.message(summary::VALUE, &val);
        }
        let mut e = Self::event(step);
        e.message(event::SUMMARY, &s);
        self.write(&e)
    }

    /// A PNG image at `step`.
    pub fn image(&mut self, step: u64, tag: &str, png: &[u8]) -> Result<()> {
        let (w, h) = png_size(png).context("not a PNG image")?;
        let mut img = Message::new();
        img.varint(summary::IMAGE_HEIGHT, h as i64)
            .varint(summary::IMAGE_WIDTH, w as i64)
            .varint(summary::IMAGE_COLORSPACE, 3)
            .bytes(summary::IMAGE_ENCODED, png);
        let mut val = Message::new();
        val.string(summary::TAG, tag).message(summary::IMAGE, &img);
        let mut s = Message::new();
        s.message(summary::VALUE, &val);
        let mut e = Self::event(step);
        e.message(event::SUMMARY, &s);
        self.write(&e)
    }

    /// `SessionLog` START at `step`: TensorBoard forgets the events of steps >= `step` written
    /// before it (the steps a resumed run trains again).
    pub fn session_start(&mut self, step: u64) -> Result<()> {
        let mut log = Message::new();
        log.varint(event::SESSION_STATUS, event::START);
        let mut e = Self::event(step);
        e.message(event::SESSION_LOG, &log);
        self.write(&e)
    }

    /// Mirror one `metrics.jsonl` line: its scalars ([`tags`]), and for a `preview` line the
    /// image at its `path` (a missing file is skipped).
    pub fn metrics_line(&mut self, kind: &str, step: u64, fields: &Value) -> Result<()> {
        self.scalars(step, &tags(kind, fields))?;
        if kind == "preview" {
            if let Some(png) = fields["path"].as_str().and_then(|p| std::fs::read(p).ok()) {
                self.image(step, PREVIEW_TAG, &png)?;
            }
        }
        Ok(())
    }
}

/// Width and height from a PNG's IHDR chunk.
pub fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    if png.len() < 24 || &png[..8] != b"\x89PNG\r\n\x1a\n" || &png[12..16] != b"IHDR" {
        return None;
    }
    let be = |i: usize| u32::from_be_bytes(png[i..i + 4].try_into().unwrap());
    Some((be(16), be(20)))
}

/// The scalars of a `metrics.jsonl` line (`type` `kind`) as TensorBoard tags:
///
/// * `eval` lines: `eval/<metric>/<model>` (`eval/psnr/ema`, `eval/psnr/reference`);
/// * other lines: a top-level number `k` as `<kind>/k` (`train/lr`, `train/images_per_s`,
///   `train/steps_per_s`), a table of numbers `k` as `k/<key>` (`losses/decoder`,
///   `grad_norms/encoder`, `time_fractions/step`).
///
/// Booleans and strings are left out.
pub fn tags(kind: &str, fields: &Value) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let Some(obj) = fields.as_object() else { return out };
    if kind == "eval" {
        let model = fields["model"].as_str().unwrap_or("model");
        for (k, v) in obj {
            if let Some(x) = v.as_f64() {
                out.push((format!("eval/{k}/{model}"), x));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        return out;
    }
    for (k, v) in obj {
        if k == "type" || k == "step" {
            continue;
        }
        match v {
            Value::Number(n) => {
                if let Some(x) = n.as_f64() {
                    out.push((format!("{kind}/{k}"), x));
                }
            }
            Value::Object(sub) => {
                for (s, sv) in sub {
                    if let Some(x) = sv.as_f64().filter(|_| sv.is_number()) {
                        out.push((format!("{k}/{s}"), x));
                    }
                }
            }
            _ => {}
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Whether `dir` holds event files already.
pub fn has_event_files(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().contains(FILE_MARK)))
        .unwrap_or(false)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;
    use taesd::protobuf::read::{self, Value as F};

    /// Read the records of an event file back, checking both CRCs.
    pub fn read_records(path: &Path) -> Vec<Vec<u8>> {
        let b = std::fs::read(path).unwrap();
        let mut i = 0;
        let mut out = Vec::new();
        while i < b.len() {
            let len_bytes = &b[i..i + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            assert_eq!(u32::from_le_bytes(b[i + 8..i + 12].try_into().unwrap()), masked_crc32c(len_bytes));
            let data = &b[i + 12..i + 12 + len];
            assert_eq!(u32::from_le_bytes(b[i + 12 + len..i + 16 + len].try_into().unwrap()), masked_crc32c(data));
            out.push(data.to_vec());
            i += 16 + len;
        }
        out
    }

    #[test]
    fn events_frame_and_hold_scalars_images_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        assert!(has_event_files(dir.path()));
        w.metrics_line("train", 10, &json!({"lr": 1e-4, "losses": {"decoder": 0.5}, "resumed": true})).unwrap();
        let png = dir.path().join("p.png");
        image::RgbImage::from_pixel(5, 3, image::Rgb([1, 2, 3])).save(&png).unwrap();
        w.metrics_line("preview", 10, &json!({"path": png})).unwrap();
        w.session_start(11).unwrap();
        let recs = read_records(w.path());
        assert_eq!(recs.len(), 4);
        let e0 = read::fields(&recs[0]).unwrap();
        assert_eq!(read::strings(&e0, 3), ["brain.Event:2"]);
        let e1 = read::fields(&recs[1]).unwrap();
        assert_eq!(read::all(&e1, 2), [F::Varint(10)]);
        let vals = read::bytes(&read::fields(read::bytes(&e1, 5)[0]).unwrap(), 1)
            .into_iter()
            .map(|v| {
                let f = read::fields(v).unwrap();
                let F::Fixed32(bits) = read::all(&f, 2)[0] else { panic!() };
                (read::strings(&f, 1)[0].clone(), f32::from_bits(bits))
            })
            .collect::<Vec<_>>();
        assert_eq!(vals, [("losses/decoder".to_string(), 0.5), ("train/lr".to_string(), 1e-4)]);
        let e2 = read::fields(&recs[2]).unwrap();
        let v = read::fields(read::bytes(&read::fields(read::bytes(&e2, 5)[0]).unwrap(), 1)[0]).unwrap();
        let img = read::fields(read::bytes(&v, 4)[0]).unwrap();
        assert_eq!((read::all(&img, 1), read::all(&img, 2)), (vec![F::Varint(3)], vec![F::Varint(5)]));
        assert_eq!(read::bytes(&img, 4)[0], std::fs::read(&png).unwrap().as_slice());
        let e3 = read::fields(&recs[3]).unwrap();
        assert_eq!(read::all(&read::fields(read::bytes(&e3, 7)[0]).unwrap(), 1), [F::Varint(1)]);
    }

    #[test]
    fn tags_of_each_line_kind() {
        let t = tags("eval", &json!({"model": "ema", "psnr": 20.5, "ssim": null, "images": 4}));
        assert_eq!(t, [("eval/images/ema".to_string(), 4.0), ("eval/psnr/ema".to_string(), 20.5)]);
        let t = tags("train", &json!({"lr": 0.1, "time_fractions": {"step": 0.5}, "grad_norms": {"encoder": 2}}));
        assert_eq!(
            t,
            [
                ("grad_norms/encoder".to_string(), 2.0),
                ("time_fractions/step".to_string(), 0.5),
                ("train/lr".to_string(), 0.1)
            ]
        );
        assert!(tags("start", &json!({"resumed": false, "device": "cpu"})).is_empty());
        assert_eq!(png_size(b"not a png"), None);
    }
}
