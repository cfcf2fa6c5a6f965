//! The precompute pipeline: three stages joined by bounded queues, so memory stays bounded
//! whatever the folder size.
//!
//! ```text
//!  producer (rayon pool, --workers)   teacher thread (ORT)        writer thread (+ a thread
//!  read + sha256 + decode + crop  ->  batches of --batch-size ->  for the files): rows -> shard
//!  + augment + encode stored image    samples, per shard          files (temp + rename), manifest
//! ```
//!
//! Batches never straddle a shard, so a shard's content does not depend on which shards were
//! already done: a resumed run writes the same rows as an uninterrupted one.
//!
//! Several teachers (`--device cuda:0,cuda:1`, `--gpus N`): one runner thread per session, all
//! taking the batches the one batcher forms from one queue, each the next batch when it is free.
//! The batches are cut from the input order alone (never from timing), every batch's results go
//! back to the slots that named its samples, and finished inputs leave in input order, so the
//! shards are the same whichever session encoded which batch (given sessions that compute alike:
//! one kind of device). One device is the same code with one runner.

use crate::teacher::{HostAllocator, HostBatch, InputFormat, SamplePixels, Teacher};
use anyhow::{anyhow, bail, Result};
use crossbeam_channel::{bounded, Receiver, Sender};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};
use taesd_data::{
    check_source_size, decode_rgb8_named, decode_stored_image, encode_image, is_upscaled, make_samples, read_bytes,
    AugmentConfig, CropRect, DecodeLimits, InputItem, ShardFileMeta, ShardRow, ShardWriter,
};
use taesd_schemas::{ErrorRecord, ImageFormat, InputRecord, LatentDtype, ShardEntry, VaeSpec};

use crate::output::OutputDir;

/// Settings of one pipeline run.
#[derive(Clone)]
pub struct PipelineConfig {
    /// The encoder's input type and range: workers convert each crop to it.
    pub input_format: InputFormat,
    pub batch_size: usize,
    pub workers: usize,
    pub augment: AugmentConfig,
    pub image_format: ImageFormat,
    pub jpeg_quality: u8,
    pub limits: DecodeLimits,
    /// Sources whose short side is below this are refused (stage `size`).
    pub min_side: u32,
    pub latent_dtype: LatentDtype,
    pub vae: VaeSpec,
    pub onnx_sha256: String,
    pub progress: bool,
}

/// One crop of one input, ready for the teacher.
struct PreparedSample {
    variant: u32,
    crop: CropRect,
    flip: bool,
    color_aug: bool,
    /// The stored encoding of the image.
    image: Vec<u8>,
    /// `3 x N x N` encoder input (type and range of [`PipelineConfig::input_format`]): exactly the
    /// pixels `image` decodes to.
    pixels: SamplePixels,
}

struct PreparedInput {
    source: String,
    key: String,
    sha256: String,
    width: u32,
    height: u32,
    samples: Vec<PreparedSample>,
}

enum Work {
    Input(PreparedInput),
    Failed(ErrorRecord),
    ShardEnd(u32),
}

/// Teacher output for one input: its rows and the samples that failed.
enum Done {
    Input { rows: Vec<ShardRow>, errors: Vec<ErrorRecord> },
    Failed(ErrorRecord),
    ShardEnd(u32),
}

/// What one run did.
#[derive(Debug, Default, Clone)]
pub struct RunStats {
    pub inputs: u64,
    pub rows: u64,
    /// Rows whose crop was enlarged to the resolution (the source was smaller).
    pub upscaled: u64,
    /// Inputs that gave no row at all (each has at least one error record).
    pub inputs_without_rows: u64,
    pub shards_written: u32,
    pub errors: Vec<ErrorRecord>,
    pub elapsed: Duration,
    /// Time the teacher spent inside `Session::run` (and input/output conversion), summed over
    /// its sessions.
    pub teacher_busy: Duration,
    /// Teacher sessions (devices) that ran.
    pub sessions: u32,
    /// Where the rest went: the batcher waiting for decoded inputs (the CPU side too slow) and
    /// for the writer to take finished inputs (backpressure), the shard files' writing (off the
    /// teacher's path), and the run's end after the last teacher batch (the last shard's file).
    pub waits: Waits,
}

/// Time spent waiting in the pipeline (see [`RunStats::waits`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct Waits {
    pub for_inputs: Duration,
    pub for_writer: Duration,
    pub writing_files: Duration,
    pub after_teacher: Duration,
}

fn err(source: &str, stage: &str, reason: impl ToString) -> ErrorRecord {
    ErrorRecord { source: source.to_string(), stage: stage.to_string(), reason: reason.to_string() }
}

/// Read, decode, crop/augment and encode one input (runs in the rayon pool).
fn prepare(item: &InputItem, cfg: &PipelineConfig) -> Result<PreparedInput, ErrorRecord> {
    let bytes = read_bytes(item).map_err(|e| err(&item.source, "read", e))?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let rgb = decode_rgb8_named(&bytes, Some(&item.source), &cfg.limits).map_err(|e| err(&item.source, "decode", e))?;
    drop(bytes);
    let (width, height) = rgb.dimensions();
    check_source_size(width, height, cfg.min_side, cfg.augment.resolution).map_err(|e| err(&item.source, "size", e))?;
    let samples = make_samples(&rgb, &item.source, &cfg.augment)
        .into_iter()
        .map(|s| {
            let image = encode_image(&s.rgb, cfg.image_format, cfg.jpeg_quality)
                .map_err(|e| err(&item.source, "encode", format!("{e:#}")))?;
            // The teacher must see exactly what a reader of the shard will decode.
            let seen = match cfg.image_format {
                ImageFormat::Png => s.rgb,
                ImageFormat::Jpeg => {
                    decode_stored_image(&image).map_err(|e| err(&item.source, "encode", format!("{e:#}")))?
                }
            };
            let pixels = cfg.input_format.convert(&seen);
            Ok(PreparedSample { variant: s.variant, crop: s.crop, flip: s.flip, color_aug: s.color_aug, image, pixels })
        })
        .collect::<Result<Vec<_>, ErrorRecord>>()?;
    Ok(PreparedInput { source: item.source.clone(), key: item.key.clone(), sha256, width, height, samples })
}

/// Run the pipeline over `shards` (index, the inputs it covers), writing into `out`, with one
/// teacher session or several (at least one).
pub fn run(
    shards: Vec<(u32, Vec<InputItem>)>,
    teachers: Vec<Teacher>,
    out: &mut OutputDir,
    cfg: &PipelineConfig,
) -> Result<RunStats> {
    if teachers.is_empty() {
        bail!("internal: no teacher session");
    }
    let sessions = teachers.len() as u32;
    let total_inputs: u64 = shards.iter().map(|(_, v)| v.len() as u64).sum();
    let order: Vec<(u32, Vec<InputRecord>)> =
        shards.iter().map(|(i, v)| (*i, crate::output::input_records(v))).collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.workers.max(1))
        .thread_name(|i| format!("decode-{i}"))
        .build()?;
    let chunk = (cfg.batch_size * 2).max(cfg.workers * 2).max(16);
    let (work_tx, work_rx) = bounded::<Work>(chunk * 2);
    let (done_tx, done_rx) = bounded::<Done>(chunk * 2);
    let bar = progress_bar(total_inputs, cfg.progress);
    let start = Instant::now();

    let stats = std::thread::scope(|scope| -> Result<RunStats> {
        let producer = scope.spawn(|| {
            let work_tx = work_tx;
            for (index, items) in &shards {
                for part in items.chunks(chunk) {
                    let prepared: Vec<Work> = pool.install(|| {
                        use rayon::prelude::*;
                        part.par_iter()
                            .map(|it| match prepare(it, cfg) {
                                Ok(p) => Work::Input(p),
                                Err(e) => Work::Failed(e),
                            })
                            .collect()
                    });
                    for w in prepared {
                        if work_tx.send(w).is_err() {
                            return; // a later stage stopped; its error is reported
                        }
                    }
                }
                if work_tx.send(Work::ShardEnd(*index)).is_err() {
                    return;
                }
            }
        });
        let teacher_thread = scope.spawn(move || {
            let r = teacher_stage(teachers, work_rx, done_tx, cfg.batch_size);
            (r, Instant::now())
        });
        let writer_result = writer_stage(out, &order, done_rx, cfg, &bar);
        let writer_end = Instant::now();
        let (teacher_result, teacher_end) = teacher_thread.join().map_err(|_| anyhow!("teacher thread panicked"))?;
        producer.join().map_err(|_| anyhow!("decode thread panicked"))?;
        let (teacher_busy, waits) = teacher_result?;
        let mut stats = writer_result?;
        stats.teacher_busy = teacher_busy;
        stats.sessions = sessions;
        stats.waits = Waits {
            writing_files: stats.waits.writing_files,
            after_teacher: writer_end.saturating_duration_since(teacher_end),
            ..waits
        };
        Ok(stats)
    });
    bar.finish_and_clear();
    let mut stats = stats?;
    stats.elapsed = start.elapsed();
    Ok(stats)
}

fn progress_bar(total: u64, enabled: bool) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} images  {per_sec}  ETA {eta}  {msg}",
        )
        .expect("valid template"),
    );
    bar
}

/// A prepared input whose samples are (partly) encoded.
enum InFlight {
    Input { input: PreparedInput, out: Vec<Option<SampleOut>> },
    Failed(ErrorRecord),
}

type SampleOut = Result<(Vec<f32>, Option<Vec<f32>>, [usize; 3]), ErrorRecord>;

/// Orders samples into teacher batches and hands finished inputs on, in input order.
///
/// Two stages overlap: this thread fills a host buffer (pinned on CUDA) with the next batch while
/// the runner threads have their sessions encode earlier ones ([`PIPELINE_DEPTH`] buffers per
/// session).
struct Batcher {
    /// Host input buffers (pinned on CUDA) not in use by the runner.
    free: Vec<HostBatch>,
    host: HostAllocator,
    /// Buffers allocated so far (at most `depth`).
    allocated: usize,
    /// Buffers in all: [`PIPELINE_DEPTH`] per session.
    depth: usize,
    /// Always run full batches (the last one of a shard padded with grey): on CUDA, so that the
    /// shape never changes (a new shape means a new cuDNN algorithm search, or a static graph),
    /// and with a fixed-batch model.
    pad: bool,
    grey: f32,
    queue: VecDeque<InFlight>,
    /// Id of the queue's front input (inputs are numbered as they arrive): slots of batches in
    /// flight name inputs by id, since the queue's front may move meanwhile.
    base: u64,
    /// Next sample to encode: (index into queue, sample index).
    cursor: (usize, usize),
    batch: usize,
    /// Batches handed to the runners, by sequence number: their slots (input id, sample index).
    /// Runners finish in any order; each result finds its slots by its number.
    in_flight: HashMap<u64, Vec<(u64, usize)>>,
    next_seq: u64,
    submit: Sender<Job>,
    results: Receiver<RunResult>,
    busy: Duration,
    waits: Waits,
}

/// A batch for a runner: its sequence number, the buffer, the samples in it (the rest is padding).
type Job = (u64, HostBatch, usize);

/// What a runner hands back: the batch's sequence number and buffer, the teacher's output, the
/// time it took.
type RunResult = (u64, HostBatch, Result<crate::teacher::Encoded>, Duration);

/// Host buffers per teacher session: one being filled while one is encoded.
const PIPELINE_DEPTH: usize = 2;

impl Batcher {
    /// Samples queued but not yet handed to the teacher.
    fn pending(&self) -> usize {
        self.queue
            .iter()
            .enumerate()
            .skip(self.cursor.0)
            .map(|(i, f)| match f {
                InFlight::Input { input, .. } => {
                    input.samples.len() - if i == self.cursor.0 { self.cursor.1 } else { 0 }
                }
                InFlight::Failed(_) => 0,
            })
            .sum()
    }

    /// Hand the next `n` samples (fewer at the end of the queue) to the runner.
    fn run_batch(&mut self, n: usize) -> Result<()> {
        let mut slots = Vec::with_capacity(n);
        let mut side = 0usize;
        while slots.len() < n {
            match self.queue.get(self.cursor.0) {
                Some(InFlight::Input { input, .. }) if self.cursor.1 < input.samples.len() => {
                    side = sample_side(&input.samples[self.cursor.1]);
                    slots.push((self.base + self.cursor.0 as u64, self.cursor.1));
                    self.cursor.1 += 1;
                }
                Some(_) => self.cursor = (self.cursor.0 + 1, 0),
                None => break,
            }
        }
        if slots.is_empty() {
            return Ok(());
        }
        let rows = if self.pad { self.batch.max(slots.len()) } else { slots.len() };
        // A buffer: a free one of the right shape, a new one while fewer than `depth` exist, else
        // the next one a runner gives back.
        let mut buf = loop {
            if let Some(i) = self.free.iter().position(|b| b.rows() == rows && b.shape() == (side, side)) {
                break self.free.swap_remove(i);
            }
            if let Some(old) = self.free.pop() {
                drop(old); // wrong shape (a short last batch on the CPU): replace it
                self.allocated -= 1;
            }
            if self.allocated < self.depth {
                self.allocated += 1;
                break self.host.batch(rows, side, side)?;
            }
            self.collect_one()?;
        };
        for (j, (id, si)) in slots.iter().enumerate() {
            if let InFlight::Input { input, .. } = &self.queue[(id - self.base) as usize] {
                buf.write(j, &input.samples[*si].pixels)?;
            }
        }
        if rows > slots.len() {
            buf.fill_from(slots.len(), self.grey)?;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.submit.send((seq, buf, slots.len())).is_err() {
            // A runner stops after a failed batch: report that failure, not the stop.
            while let Ok((_, _, r, _)) = self.results.try_recv() {
                r?;
            }
            bail!("the teacher runner stopped");
        }
        self.in_flight.insert(seq, slots);
        Ok(())
    }

    /// Wait for the next batch a runner finishes and store its latents in the queue.
    fn collect_one(&mut self) -> Result<()> {
        if self.in_flight.is_empty() {
            bail!("internal: no teacher batch in flight");
        }
        let (seq, buf, enc, took) = self.results.recv().map_err(|_| anyhow!("the teacher runner stopped"))?;
        self.free.push(buf);
        self.busy += took;
        let enc = enc?;
        let slots = self.in_flight.remove(&seq).ok_or_else(|| anyhow!("internal: teacher batch {seq} unknown"))?;
        let per = enc.shape.iter().product::<usize>();
        for (j, (id, si)) in slots.into_iter().enumerate() {
            if let InFlight::Input { input, out } = &mut self.queue[(id - self.base) as usize] {
                let mean = enc.mean[j * per..(j + 1) * per].to_vec();
                let std = enc.std.as_ref().map(|s| s[j * per..(j + 1) * per].to_vec());
                out[si] = Some(match nonfinite(&mean, std.as_deref()) {
                    None => Ok((mean, std, enc.shape)),
                    Some(what) => Err(err(
                        &input.source,
                        "latent",
                        format!(
                            "teacher produced {what} in the latent of variant {} (an fp16 VAE that overflows? use sdxl-fp16-fix or an fp32 export)",
                            input.samples[si].variant
                        ),
                    )),
                });
            }
        }
        Ok(())
    }

    /// Store every result the runner has already finished (without waiting), then keep at most
    /// `keep` batches in flight.
    fn collect(&mut self, keep: usize) -> Result<()> {
        while self.in_flight.len() > keep || (!self.in_flight.is_empty() && !self.results.is_empty()) {
            self.collect_one()?;
        }
        Ok(())
    }

    /// Send every finished input at the front of the queue. False when the writer has stopped.
    fn emit_ready(&mut self, tx: &Sender<Done>) -> bool {
        while let Some(front) = self.queue.front() {
            let ready = match front {
                InFlight::Input { out, .. } => out.iter().all(|o| o.is_some()),
                InFlight::Failed(_) => true,
            };
            if !ready {
                break;
            }
            let done = match self.queue.pop_front().expect("front exists") {
                InFlight::Failed(e) => Done::Failed(e),
                InFlight::Input { input, out } => finish_input(input, out),
            };
            self.base += 1;
            // The cursor is relative to the front. A popped front was fully encoded, so a cursor
            // still on it stands at its end: the next sample is the new front's first.
            self.cursor = if self.cursor.0 > 0 { (self.cursor.0 - 1, self.cursor.1) } else { (0, 0) };
            let t0 = Instant::now();
            let sent = tx.send(done).is_ok();
            self.waits.for_writer += t0.elapsed();
            if !sent {
                return false;
            }
        }
        true
    }
}

/// `None` when every value of a sample's latent mean (and std) is finite; else what was found,
/// e.g. `12 NaN and 3 inf values (of 16384)`.
pub fn nonfinite(mean: &[f32], std: Option<&[f32]>) -> Option<String> {
    let all = || mean.iter().chain(std.unwrap_or(&[]));
    if all().all(|x| x.is_finite()) {
        return None;
    }
    let nan = all().filter(|x| x.is_nan()).count();
    let inf = all().filter(|x| x.is_infinite()).count();
    Some(format!("{nan} NaN and {inf} inf values (of {})", mean.len() + std.map_or(0, |s| s.len())))
}

fn sample_side(s: &PreparedSample) -> usize {
    ((s.pixels.len() / 3) as f64).sqrt().round() as usize
}

/// Batch samples through the teachers, in order; flush at every shard end. Returns the time spent
/// in the teachers and the batcher's waits. Each teacher session runs on a thread of its own (a
/// runner), so that the next batch is staged while the current ones are encoded; the runners take
/// batches from one queue, each when it is free.
fn teacher_stage(
    teachers: Vec<Teacher>,
    rx: Receiver<Work>,
    tx: Sender<Done>,
    batch: usize,
) -> Result<(Duration, Waits)> {
    // Every session opened the same ONNX file on one kind of device: the first speaks for all.
    let first = &teachers[0];
    let batch = first.fixed_batch().unwrap_or(batch.max(1));
    // Buffers for every session from the first one's allocator (pinned host memory on CUDA is
    // usable by every device of the process).
    let host = first.host_allocator()?;
    let pad = first.device != "cpu" || first.fixed_batch().is_some();
    let grey = first.input_format().grey();
    let depth = PIPELINE_DEPTH * teachers.len();
    let (submit, jobs) = bounded::<Job>(depth);
    let (done, results) = bounded::<RunResult>(depth);
    let several = teachers.len() > 1;
    std::thread::scope(|scope| {
        let mut runners = Vec::with_capacity(teachers.len());
        for (k, mut teacher) in teachers.into_iter().enumerate() {
            let (jobs, done) = (jobs.clone(), done.clone());
            let name = if several { format!("teacher-run-{k}") } else { "teacher-run".into() };
            runners.push(
                std::thread::Builder::new()
                    .name(name)
                    .spawn_scoped(scope, move || {
                        for (seq, buf, n) in jobs {
                            let t0 = Instant::now();
                            let enc = teacher.run(&buf, n);
                            let failed = enc.is_err();
                            if done.send((seq, buf, enc, t0.elapsed())).is_err() || failed {
                                return;
                            }
                        }
                    })
                    .expect("spawn a teacher runner"),
            );
        }
        drop((jobs, done));
        let mut b = Batcher {
            free: Vec::new(),
            host,
            allocated: 0,
            depth,
            pad,
            grey,
            queue: VecDeque::new(),
            base: 0,
            cursor: (0, 0),
            batch,
            in_flight: HashMap::new(),
            next_seq: 0,
            submit,
            results,
            busy: Duration::ZERO,
            waits: Waits::default(),
        };
        let r = batch_loop(&mut b, rx, &tx);
        drop(b); // closes the runners' job queue
        for runner in runners {
            runner.join().map_err(|_| anyhow!("teacher runner panicked"))?;
        }
        r
    })
}

fn batch_loop(b: &mut Batcher, rx: Receiver<Work>, tx: &Sender<Done>) -> Result<(Duration, Waits)> {
    loop {
        let t0 = Instant::now();
        let Ok(work) = rx.recv() else { break };
        b.waits.for_inputs += t0.elapsed();
        match work {
            Work::Input(input) => {
                let n = input.samples.len();
                b.queue.push_back(InFlight::Input { input, out: (0..n).map(|_| None).collect() });
            }
            Work::Failed(e) => b.queue.push_back(InFlight::Failed(e)),
            Work::ShardEnd(index) => {
                while b.pending() > 0 {
                    b.run_batch(b.batch)?;
                }
                b.collect(0)?;
                if !b.emit_ready(tx) || tx.send(Done::ShardEnd(index)).is_err() {
                    return Ok((b.busy, b.waits));
                }
                b.cursor = (0, 0);
                continue;
            }
        }
        while b.pending() >= b.batch {
            b.run_batch(b.batch)?;
        }
        b.collect(b.depth - 1)?;
        if !b.emit_ready(tx) {
            return Ok((b.busy, b.waits));
        }
    }
    b.collect(0)?;
    Ok((b.busy, b.waits))
}

fn finish_input(input: PreparedInput, out: Vec<Option<SampleOut>>) -> Done {
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for (s, o) in input.samples.into_iter().zip(out) {
        let side = sample_side(&s) as u32;
        match o.expect("encoded") {
            Ok((latent, latent_std, shape)) => rows.push(ShardRow {
                key: input.key.clone(),
                source: input.source.clone(),
                source_sha256: input.sha256.clone(),
                source_width: input.width,
                source_height: input.height,
                variant: s.variant,
                crop: s.crop,
                flip: s.flip,
                color_aug: s.color_aug,
                width: side,
                height: side,
                image: s.image,
                latent,
                latent_shape: [shape[0] as u32, shape[1] as u32, shape[2] as u32],
                latent_std,
            }),
            Err(e) => errors.push(e),
        }
    }
    Done::Input { rows, errors }
}

/// What the collector hands the file thread: finished rows, as they come, and each shard's end.
/// Rows belong to the shard being filled: shards come in the run's order, each one's rows before
/// its end (batches never straddle shards).
enum ToFiles {
    Rows(Vec<ShardRow>),
    End(ShardEnd),
}

/// The end of one shard: its inputs that produced no row and how many inputs it covered.
#[derive(Default)]
struct ShardEnd {
    index: u32,
    errors: Vec<ErrorRecord>,
    inputs: u64,
    without_rows: u64,
}

/// Finished inputs on their way to the file thread (each a few rows): enough to ride out a
/// slow write without holding a shard's worth of images in memory.
const INPUTS_IN_WRITING: usize = 256;

/// Hands finished rows to a thread of its own that writes them into the current shard's file as
/// they come (row group by row group, [`ShardWriter`]), so that the teacher never waits for a
/// file and, after the last batch, only the last row group and the footer are left to write (a
/// whole 512-row shard of 1024 px images takes ~2 s).
fn writer_stage(
    out: &mut OutputDir,
    order: &[(u32, Vec<InputRecord>)],
    rx: Receiver<Done>,
    cfg: &PipelineConfig,
    bar: &ProgressBar,
) -> Result<RunStats> {
    let (files_tx, files_rx) = bounded::<ToFiles>(INPUTS_IN_WRITING);
    std::thread::scope(|scope| {
        let files = std::thread::Builder::new()
            .name("shard-writer".into())
            .spawn_scoped(scope, move || write_shards(out, order, files_rx, cfg, bar))
            .expect("spawn the shard writer");
        let mut end = ShardEnd::default();
        for done in rx {
            let msg = match done {
                Done::Input { rows, errors } => {
                    end.errors.extend(errors);
                    end.inputs += 1;
                    bar.inc(1);
                    if rows.is_empty() {
                        end.without_rows += 1;
                        continue;
                    }
                    ToFiles::Rows(rows)
                }
                Done::Failed(e) => {
                    end.errors.push(e);
                    end.inputs += 1;
                    end.without_rows += 1;
                    bar.inc(1);
                    continue;
                }
                Done::ShardEnd(index) => {
                    end.index = index;
                    ToFiles::End(std::mem::take(&mut end))
                }
            };
            if files_tx.send(msg).is_err() {
                break; // the file writer failed: its error is reported below
            }
        }
        drop(files_tx);
        files.join().map_err(|_| anyhow!("shard writer panicked"))?
    })
}

/// Write each shard's file as its rows arrive (temp + rename at its end) and record it in the
/// manifest, in `order` (the run's shards and the inputs each covers). A shard left unfinished
/// (an error upstream) leaves no file.
fn write_shards(
    out: &mut OutputDir,
    order: &[(u32, Vec<InputRecord>)],
    msgs: Receiver<ToFiles>,
    cfg: &PipelineConfig,
    bar: &ProgressBar,
) -> Result<RunStats> {
    let mut stats = RunStats::default();
    let meta = |index: u32| ShardFileMeta {
        vae: cfg.vae.clone(),
        onnx_sha256: cfg.onnx_sha256.clone(),
        latent_dtype: cfg.latent_dtype,
        image_format: cfg.image_format,
        resolution: cfg.augment.resolution,
        shard_index: index,
        errors: Vec::new(),
        inputs: None,
    };
    let resolution = cfg.augment.resolution;
    let mut upcoming = order.iter();
    // The shard being filled: its index and inputs, and its writer once its first row came.
    let mut current = upcoming.next();
    let mut open: Option<ShardWriter> = None;
    let mut upscaled = 0u64;
    for msg in msgs {
        let t0 = Instant::now();
        match msg {
            ToFiles::Rows(rows) => {
                let index = current.map(|c| c.0).ok_or_else(|| anyhow!("internal: rows after the run's last shard"))?;
                let w = match &mut open {
                    Some(w) => w,
                    None => {
                        open.insert(ShardWriter::create_staged(&out.shard_path(index), out.staging(), &meta(index))?)
                    }
                };
                for r in rows {
                    upscaled += is_upscaled(&r.crop, resolution) as u64;
                    w.push(r)?;
                }
            }
            ToFiles::End(mut end) => {
                let Some((index, inputs)) = current.filter(|c| c.0 == end.index) else {
                    bail!(
                        "internal: shard {} ended while shard {:?} was being filled",
                        end.index,
                        current.map(|c| c.0)
                    );
                };
                let w = match open.take() {
                    Some(w) => w,
                    // A shard without rows.
                    None => ShardWriter::create_staged(&out.shard_path(*index), out.staging(), &meta(*index))?,
                };
                current = upcoming.next();
                let rows = w.rows();
                w.finish(&end.errors, Some(inputs))?;
                out.add_shard(ShardEntry {
                    file: out.shard_entry_name(end.index),
                    index: end.index,
                    rows,
                    inputs: end.inputs,
                    errors: end.errors.len() as u64,
                    upscaled,
                })?;
                stats.rows += rows;
                stats.upscaled += std::mem::take(&mut upscaled);
                stats.inputs_without_rows += end.without_rows;
                stats.inputs += end.inputs;
                stats.shards_written += 1;
                stats.errors.append(&mut end.errors);
                bar.set_message(format!("{} shards written", stats.shards_written));
            }
        }
        stats.waits.writing_files += t0.elapsed();
    }
    Ok(stats)
}

/// What `--decode-only` did.
#[derive(Debug, Default, Clone)]
pub struct DecodeStats {
    pub inputs: u64,
    pub samples: u64,
    pub failed: u64,
    pub elapsed: Duration,
}

/// The CPU side alone: `prepare` every input on `cfg.workers` threads (the same chunking as
/// [`run`]) and drop the result. Measures the rate the teacher could at most be fed at.
pub fn decode_only(items: &[InputItem], cfg: &PipelineConfig) -> Result<DecodeStats> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.workers.max(1))
        .thread_name(|i| format!("decode-{i}"))
        .build()?;
    let chunk = (cfg.batch_size * 2).max(cfg.workers * 2).max(16);
    let bar = progress_bar(items.len() as u64, cfg.progress);
    let start = Instant::now();
    let mut stats = DecodeStats::default();
    for part in items.chunks(chunk) {
        let done: Vec<Option<usize>> = pool.install(|| {
            use rayon::prelude::*;
            part.par_iter().map(|it| prepare(it, cfg).ok().map(|p| p.samples.len())).collect()
        });
        for d in done {
            stats.inputs += 1;
            match d {
                Some(n) => stats.samples += n as u64,
                None => stats.failed += 1,
            }
        }
        bar.inc(part.len() as u64);
    }
    bar.finish_and_clear();
    stats.elapsed = start.elapsed();
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonfinite_latents_are_found_and_counted() {
        assert_eq!(nonfinite(&[0.0, -3.5, 1e30], None), None);
        assert_eq!(nonfinite(&[0.0], Some(&[1.0, 2.0])), None);
        assert_eq!(nonfinite(&[f32::NAN, 1.0, f32::INFINITY], None).unwrap(), "1 NaN and 1 inf values (of 3)");
        // A finite mean with a non-finite std is still refused.
        assert_eq!(nonfinite(&[1.0, 2.0], Some(&[f32::NEG_INFINITY, 0.0])).unwrap(), "0 NaN and 1 inf values (of 4)");
    }
}
