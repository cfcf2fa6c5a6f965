//! The streaming training loader: a background thread walks the deterministic row order
//! ([`crate::order`]), reads each row group once per epoch when its first row comes up, drops
//! held-out rows, and cuts batches whose samples are decoded in parallel on a private rayon pool.
//! Batches come out in a fixed order through a bounded channel (prefetch).
//!
//! Memory: the rows of a row group stay in memory (as stored: encoded image + latent) only until
//! each has been used, so at most about `shuffle_buffer + 64` stored rows plus `prefetch` decoded
//! batches are held at any time.
//!
//! Determinism: batch k is a pure function of (seed, the shards, the start position); each
//! batch carries the position after its last row, which is what a checkpoint saves.
//!
//! Bad data: a row group that cannot be read, or a row whose stored image does not decode, is an
//! error naming the shard and row group; with `data.skip_bad_rows` (the set's
//! [`ShardSet::skip_bad_rows`]) it is skipped instead (the batch filled from the following rows,
//! so batches stay full and deterministic), and the batch reports it ([`HostBatch::skipped`]).

use crate::dataset::ShardSet;
use crate::order::{Position, RowRef, RowStream};
use crate::rng::{rng, tag};
use crate::sample::{make_sample, SampleSpec};
use crate::split::is_heldout;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use crossbeam_channel::{bounded, Receiver};
use rayon::prelude::*;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use taesd_data::ShardRow;

/// What the loader needs to know.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub sample: SampleSpec,
    pub shuffle_buffer: usize,
    pub prefetch: usize,
    /// Decoding threads (0 = all cores).
    pub workers: usize,
    /// Rows whose key is in this held-out fraction are never served.
    pub eval_fraction: f64,
    pub seed: u64,
    /// Data-parallel: this rank serves rows `[rank * batch_size, (rank + 1) * batch_size)` of
    /// each global batch of `batch_size * world_size` rows (see [`Producer::next_batch`]).
    /// 0 and 1 alone.
    pub rank: usize,
    pub world_size: usize,
}

/// A batch on the host, planar.
#[derive(Debug, Clone)]
pub struct HostBatch {
    /// `[B, 3, crop, crop]` 8-bit samples (see [`crate::sample::images_to_unit`]).
    pub images: Vec<u8>,
    /// `[B, C, crop/s, crop/s]`.
    pub latents: Vec<f32>,
    pub batch: usize,
    pub crop: usize,
    pub latent_shape: [usize; 3],
    /// Keys of the rows, in batch order.
    pub keys: Vec<String>,
    /// Stream position of each row.
    pub positions: Vec<Position>,
    /// The stream position after this batch: where a resumed run continues.
    pub next: Position,
    /// Rows of the global batch this one is a slice of (`batch` alone).
    pub global_batch: usize,
    /// Bad data skipped while this batch was cut (`data.skip_bad_rows`).
    pub skipped: Vec<Skipped>,
}

/// Data the loader skipped: what, why, and how many rows it held.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    /// `shard <path> row group <g>`, or that plus `row <key> (<source>)`.
    pub what: String,
    pub reason: String,
    pub rows: u64,
}

/// The context of a bad-data error when skipping is off.
const BAD_DATA: &str = "bad training data (set data.skip_bad_rows = true to skip it)";

impl HostBatch {
    /// `(images, latents)` on `device`, images f32 in [0, 1]: they travel as 8-bit samples and
    /// are scaled on the device.
    pub fn to_tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let [c, h, w] = self.latent_shape;
        let images =
            Tensor::from_slice(&self.images, (self.batch, 3, self.crop, self.crop), &Device::Cpu)?.to_device(device)?;
        let images = crate::sample::images_to_unit(&images)?;
        let latents = Tensor::from_slice(&self.latents, (self.batch, c, h, w), &Device::Cpu)?.to_device(device)?;
        Ok((images, latents))
    }
}

/// The running loader. Dropping it stops the thread.
pub struct Loader {
    rx: Option<Receiver<Result<HostBatch>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Loader {
    /// Start serving batches from `start`.
    pub fn start(set: Arc<ShardSet>, cfg: LoaderConfig, start: Position) -> Result<Loader> {
        crate::sample::check_crop(cfg.sample.crop, set.resolution, cfg.sample.scale)?;
        let threads = if cfg.workers == 0 {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
        } else {
            cfg.workers
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("decode-{i}"))
            .build()
            .context("cannot start the decoding threads")?;
        let (tx, rx) = bounded(cfg.prefetch.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name("loader".into())
            .spawn(move || {
                let mut producer = Producer::new(&set, &cfg, start);
                while !stop2.load(Ordering::Relaxed) {
                    let batch = pool.install(|| producer.next_batch());
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        return;
                    }
                }
            })
            .context("cannot start the loader thread")?;
        Ok(Loader { rx: Some(rx), stop, handle: Some(handle) })
    }

    /// The next batch (blocks until it is decoded).
    pub fn next_batch(&mut self) -> Result<HostBatch> {
        let rx = self.rx.as_ref().ok_or_else(|| anyhow!("the loader was stopped"))?;
        match rx.recv() {
            Ok(b) => b,
            Err(_) => Err(anyhow!("the loader thread stopped unexpectedly")),
        }
    }
}

impl Loader {
    /// Stop the thread (what dropping the loader does): a loader that is being replaced lets
    /// its memory go before the next one starts.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver makes a blocked send fail, so the thread ends.
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The loader's work, on its own thread (also usable synchronously, e.g. in tests).
pub struct Producer<'a> {
    set: &'a ShardSet,
    cfg: LoaderConfig,
    stream: RowStream,
    /// Loaded row groups: their rows not yet served, and how many are left.
    cache: HashMap<u32, (Vec<Option<ShardRow>>, usize)>,
    /// Training rows seen in the current epoch, to stop on an all-held-out set.
    epoch_rows: (u64, u64),
    /// Row groups found unreadable (skipped from then on).
    bad_units: HashSet<u32>,
    /// Skipped since the last batch.
    skipped: Vec<Skipped>,
}

/// A row picked for a batch: its stream position, where it is, and the row.
#[derive(Debug)]
pub struct Picked {
    pub pos: Position,
    pub at: RowRef,
    pub row: ShardRow,
}

impl<'a> Producer<'a> {
    pub fn new(set: &'a ShardSet, cfg: &LoaderConfig, start: Position) -> Producer<'a> {
        let unit_rows: Vec<u32> = set.units.iter().map(|u| u.rows).collect();
        Producer {
            set,
            cfg: cfg.clone(),
            stream: RowStream::new(&unit_rows, cfg.seed, cfg.shuffle_buffer, start),
            cache: HashMap::new(),
            epoch_rows: (start.epoch, 1),
            bad_units: HashSet::new(),
            skipped: Vec::new(),
        }
    }

    /// `shard <path> row group <g>` of a unit.
    fn unit_name(&self, unit: u32) -> String {
        let u = self.set.units[unit as usize];
        format!("shard {} row group {}", self.set.readers[u.shard as usize].path().display(), u.group)
    }

    /// The row `r`; `None` when its row group is unreadable and skipped.
    fn take_row(&mut self, r: RowRef) -> Result<Option<ShardRow>> {
        if self.bad_units.contains(&r.unit) {
            return Ok(None);
        }
        if !self.cache.contains_key(&r.unit) {
            let rows = match self.set.read_unit(r.unit as usize) {
                Ok(rows) => rows,
                Err(e) if self.set.skip_bad_rows => {
                    let what = self.unit_name(r.unit);
                    tracing::warn!("skipping {what}: {e:#}");
                    self.bad_units.insert(r.unit);
                    self.skipped.push(Skipped {
                        what,
                        reason: format!("{e:#}"),
                        rows: self.set.units[r.unit as usize].rows as u64,
                    });
                    return Ok(None);
                }
                Err(e) => return Err(e.context(BAD_DATA)),
            };
            let n = rows.len();
            self.cache.insert(r.unit, (rows.into_iter().map(Some).collect(), n));
        }
        let entry = self.cache.get_mut(&r.unit).expect("just inserted");
        let row = entry.0[r.row as usize].take().ok_or_else(|| anyhow!("row {:?} served twice in one epoch", r))?;
        entry.1 -= 1;
        if entry.1 == 0 {
            self.cache.remove(&r.unit);
        }
        Ok(Some(row))
    }

    /// Stored rows currently held (for the memory bound).
    pub fn cached_rows(&self) -> usize {
        self.cache.values().map(|(_, n)| *n).sum()
    }

    /// The next batch's rows and their positions (no decoding).
    pub fn next_rows(&mut self) -> Result<(Vec<Picked>, Position)> {
        self.next_n_rows(self.cfg.batch_size)
    }

    /// The next `n` training rows (no decoding).
    fn next_n_rows(&mut self, n: usize) -> Result<(Vec<Picked>, Position)> {
        let mut picked = Vec::with_capacity(n);
        while picked.len() < n {
            let (pos, r) = self.stream.next_row();
            if pos.epoch != self.epoch_rows.0 {
                if self.epoch_rows.1 == 0 {
                    if !self.bad_units.is_empty() {
                        bail!(
                            "no usable training rows in {}: {} row group(s) were skipped as unreadable, the rest is held out (data.eval_fraction = {})",
                            self.set.dir.display(),
                            self.bad_units.len(),
                            self.cfg.eval_fraction
                        );
                    }
                    bail!(
                        "no training rows in {}: every row is in the held-out split (data.eval_fraction = {})",
                        self.set.dir.display(),
                        self.cfg.eval_fraction
                    );
                }
                self.epoch_rows = (pos.epoch, 0);
                // Every row of the last epoch was served. Row groups still cached are ones that a
                // resumed run started part-way (their rows served before the checkpoint are never
                // asked for again): drop them, or the next epoch would find those rows taken.
                self.cache.clear();
            }
            let Some(row) = self.take_row(r)? else { continue };
            if is_heldout(&row.key, self.cfg.eval_fraction) {
                continue;
            }
            self.epoch_rows.1 += 1;
            picked.push(Picked { pos, at: r, row });
        }
        Ok((picked, self.stream.position()))
    }

    /// The next batch, decoded (in parallel on the current rayon pool, in a fixed order).
    ///
    /// Data-parallel (`world_size > 1`): the next global batch of `batch_size * world_size`
    /// training rows, the rows one process with that batch size would take, of which this rank
    /// decodes and serves its slice. A row of the slice whose sample cannot be cut is an error,
    /// or with `data.skip_bad_rows` left out (this rank's batch is one row smaller: the other
    /// ranks cannot see it, and the global order must stay the same on every rank).
    pub fn next_batch(&mut self) -> Result<HostBatch> {
        if self.cfg.world_size > 1 {
            return self.next_slice();
        }
        let mut rows: Vec<(Position, ShardRow)> = Vec::with_capacity(self.cfg.batch_size);
        let mut samples = Vec::with_capacity(self.cfg.batch_size);
        let mut next = self.stream.position();
        // Rows whose sample cannot be cut are replaced by the following ones when skipping.
        while rows.len() < self.cfg.batch_size {
            let (picked, after) = self.next_n_rows(self.cfg.batch_size - rows.len())?;
            next = after;
            self.cut(picked, &mut rows, &mut samples)?;
        }
        let n = rows.len();
        Ok(self.host_batch(rows, samples, next, n))
    }

    /// [`Producer::next_batch`] of a data-parallel rank.
    fn next_slice(&mut self) -> Result<HostBatch> {
        let b = self.cfg.batch_size;
        let global = b * self.cfg.world_size;
        let (mut picked, next) = self.next_n_rows(global)?;
        let mine: Vec<Picked> = picked.drain(self.cfg.rank * b..(self.cfg.rank + 1) * b).collect();
        let mut rows = Vec::with_capacity(b);
        let mut samples = Vec::with_capacity(b);
        self.cut(mine, &mut rows, &mut samples)?;
        if rows.is_empty() {
            bail!("rank {}: no row of its slice of a global batch could be used (bad data)", self.cfg.rank);
        }
        Ok(self.host_batch(rows, samples, next, global))
    }

    /// Cut the samples of `picked` (in parallel on the current rayon pool, in a fixed order) onto
    /// `rows` / `samples`; a row whose sample cannot be cut is an error, or with
    /// `data.skip_bad_rows` left out and counted.
    fn cut(
        &mut self,
        picked: Vec<Picked>,
        rows: &mut Vec<(Position, ShardRow)>,
        samples: &mut Vec<crate::sample::Sample>,
    ) -> Result<()> {
        let (spec, seed) = (self.cfg.sample, self.cfg.seed);
        let cut: Vec<Result<crate::sample::Sample>> = picked
            .par_iter()
            .map(|p| make_sample(&p.row, &spec, &mut rng(seed, tag::SAMPLE, &[p.pos.epoch, p.pos.index])))
            .collect();
        for (p, s) in picked.into_iter().zip(cut) {
            match s {
                Ok(s) => {
                    samples.push(s);
                    rows.push((p.pos, p.row));
                }
                Err(e) => {
                    let what = format!("{} row `{}` ({})", self.unit_name(p.at.unit), p.row.key, p.row.source);
                    if !self.set.skip_bad_rows {
                        return Err(e.context(what).context(BAD_DATA));
                    }
                    tracing::warn!("skipping {what}: {e:#}");
                    self.skipped.push(Skipped { what, reason: format!("{e:#}"), rows: 1 });
                }
            }
        }
        Ok(())
    }

    /// The batch of `samples` (of `rows`), with the rows skipped since the last one.
    fn host_batch(
        &mut self,
        rows: Vec<(Position, ShardRow)>,
        samples: Vec<crate::sample::Sample>,
        next: Position,
        global_batch: usize,
    ) -> HostBatch {
        let spec = self.cfg.sample;
        let crop = spec.crop as usize;
        let ls = spec.latent_side() as usize;
        let c = self.set.latent_shape[0] as usize;
        let mut images = Vec::with_capacity(rows.len() * 3 * crop * crop);
        let mut latents = Vec::with_capacity(rows.len() * c * ls * ls);
        for s in &samples {
            images.extend_from_slice(&s.image);
            latents.extend_from_slice(&s.latent);
        }
        HostBatch {
            images,
            latents,
            batch: rows.len(),
            crop,
            latent_shape: [c, ls, ls],
            keys: rows.iter().map(|(_, r)| r.key.clone()).collect(),
            positions: rows.iter().map(|(p, _)| *p).collect(),
            next,
            global_batch,
            skipped: std::mem::take(&mut self.skipped),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sample::tests::test_row;
    use taesd_data::{write_shard, ShardFileMeta};
    use taesd_schemas::{preset, ImageFormat, LatentDtype, VaeSpec};

    /// A shard folder of `n` 32 px rows (4-channel latents) in shards of `per_shard`.
    pub fn fixture(n: usize, per_shard: usize) -> tempfile::TempDir {
        fixture_with(n, per_shard, |_| {})
    }

    /// [`fixture`], with `edit` applied to the rows before they are written.
    pub fn fixture_with(n: usize, per_shard: usize, edit: impl FnOnce(&mut Vec<ShardRow>)) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let vae = VaeSpec { channels: 4, ..preset("sd").unwrap().spec() };
        let mut rows: Vec<ShardRow> = (0..n).map(|i| test_row(&format!("img{i:04}"), false)).collect();
        edit(&mut rows);
        for (s, chunk) in rows.chunks(per_shard).enumerate() {
            let meta = ShardFileMeta {
                vae: vae.clone(),
                onnx_sha256: "ab".into(),
                latent_dtype: LatentDtype::Float32,
                image_format: ImageFormat::Png,
                resolution: 32,
                shard_index: s as u32,
                errors: vec![],
                inputs: None,
            };
            write_shard(&dir.path().join(taesd_schemas::shard::shard_file_name(s as u32)), chunk, &meta).unwrap();
        }
        dir
    }

    fn cfg(batch: usize, fraction: f64) -> LoaderConfig {
        LoaderConfig {
            batch_size: batch,
            sample: SampleSpec { crop: 16, scale: 8, hflip: true, sample_posterior: false },
            shuffle_buffer: 50,
            prefetch: 2,
            workers: 2,
            eval_fraction: fraction,
            seed: 5,
            rank: 0,
            world_size: 1,
        }
    }

    /// The ranks' slices of the global batches are, in rank order, exactly the batches of one
    /// process with the global batch size, and resume the same from any batch's `next`.
    #[test]
    fn ranks_slice_the_global_batches_of_one_process() {
        let dir = fixture(150, 70);
        let set = ShardSet::open(dir.path()).unwrap();
        for world in [2usize, 3] {
            let one = LoaderConfig { batch_size: 4 * world, ..cfg(0, 0.2) };
            let mut p = Producer::new(&set, &one, Position::default());
            let whole: Vec<HostBatch> = (0..25).map(|_| p.next_batch().unwrap()).collect();
            let mut ranks: Vec<Producer> = (0..world)
                .map(|rank| {
                    Producer::new(
                        &set,
                        &LoaderConfig { batch_size: 4, rank, world_size: world, ..cfg(0, 0.2) },
                        Position::default(),
                    )
                })
                .collect();
            for (k, w) in whole.iter().enumerate() {
                let parts: Vec<HostBatch> = ranks.iter_mut().map(|r| r.next_batch().unwrap()).collect();
                let keys: Vec<String> = parts.iter().flat_map(|b| b.keys.clone()).collect();
                let images: Vec<u8> = parts.iter().flat_map(|b| b.images.clone()).collect();
                let latents: Vec<f32> = parts.iter().flat_map(|b| b.latents.clone()).collect();
                assert_eq!((&keys, &images, &latents), (&w.keys, &w.images, &w.latents), "world {world} batch {k}");
                assert!(parts.iter().all(|b| b.next == w.next && b.global_batch == 4 * world && b.batch == 4));
            }
            // A rank resumed from a batch's `next` continues with its slices.
            let mut r1 = Producer::new(
                &set,
                &LoaderConfig { batch_size: 4, rank: 1, world_size: world, ..cfg(0, 0.2) },
                whole[10].next,
            );
            assert_eq!(r1.next_batch().unwrap().keys, whole[11].keys[4..8]);
        }
    }

    #[test]
    fn batches_are_deterministic_resumable_and_never_held_out() {
        let dir = fixture(150, 70);
        let set = Arc::new(ShardSet::open(dir.path()).unwrap());
        assert_eq!(set.units.len(), 5, "shards of 70, 70, 10 rows in row groups of at most 64");
        assert_eq!(set.rows, 150);
        let c = cfg(7, 0.2);
        let mut loader = Loader::start(set.clone(), c.clone(), Position::default()).unwrap();
        let batches: Vec<HostBatch> = (0..40).map(|_| loader.next_batch().unwrap()).collect();
        drop(loader);
        let held: usize = (0..150).filter(|i| is_heldout(&format!("img{i:04}"), 0.2)).count();
        assert!(held > 10 && held < 60, "{held}");
        let train_rows = 150 - held;
        // The first epoch serves every training row exactly once, and no held-out row ever.
        let first_epoch: Vec<&String> = batches
            .iter()
            .flat_map(|b| b.keys.iter().zip(&b.positions))
            .filter(|(_, p)| p.epoch == 0)
            .map(|(k, _)| k)
            .collect();
        let mut uniq = first_epoch.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!((first_epoch.len(), uniq.len()), (train_rows, train_rows));
        assert!(batches.iter().flat_map(|b| &b.keys).all(|k| !is_heldout(k, 0.2)));
        assert!(batches.last().unwrap().next.epoch >= 1, "40 x 7 rows cross an epoch");
        assert_eq!(batches[0].images.len(), 7 * 3 * 16 * 16);
        assert_eq!(batches[0].latents.len(), 7 * 4 * 2 * 2);

        // Restarting from any batch's `next` reproduces the rest exactly, across epochs too.
        for k in [0, 5, 17, 33] {
            let mut l = Loader::start(set.clone(), c.clone(), batches[k].next).unwrap();
            for b in &batches[k + 1..] {
                let got = l.next_batch().unwrap();
                assert_eq!(got.keys, b.keys);
                assert_eq!(got.images, b.images, "decoded pixels, including crops and flips");
                assert_eq!(got.latents, b.latents);
                assert_eq!(got.next, b.next);
            }
        }
        // Another seed, another order.
        let mut l = Loader::start(set.clone(), LoaderConfig { seed: 6, ..c.clone() }, Position::default()).unwrap();
        assert_ne!(l.next_batch().unwrap().keys, batches[0].keys);
    }

    #[test]
    fn memory_stays_bounded_by_the_shuffle_buffer() {
        let dir = fixture(300, 300);
        let set = ShardSet::open(dir.path()).unwrap();
        let c = LoaderConfig { shuffle_buffer: 20, ..cfg(4, 0.0) };
        let mut p = Producer::new(&set, &c, Position::default());
        let mut max = 0;
        for _ in 0..150 {
            p.next_rows().unwrap();
            max = max.max(p.cached_rows());
        }
        assert!(max <= 20 + 64, "held {max} rows");
    }

    /// Overwrite the first page header of `file`'s `latent` column in row group 0: the shard
    /// opens, that row group does not read.
    fn damage_row_group(file: &std::path::Path) {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        use std::io::{Seek, SeekFrom, Write};
        let offset = {
            let r = SerializedFileReader::new(std::fs::File::open(file).unwrap()).unwrap();
            let rg = r.metadata().row_group(0);
            rg.columns().iter().find(|c| c.column_path().string() == "latent").unwrap().data_page_offset() as u64
        };
        let mut f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(&[0xFF; 24]).unwrap();
    }

    #[test]
    fn bad_row_groups_and_rows_are_errors_or_skipped_and_reported() {
        // Three shards of 20 rows: shard 1's row group does not read, row 45's image is damaged.
        let dir = fixture_with(60, 20, |rows| rows[45].image = b"\x89PNG but not really".to_vec());
        damage_row_group(&dir.path().join(taesd_schemas::shard::shard_file_name(1)));
        let c = LoaderConfig { shuffle_buffer: 100, ..cfg(6, 0.0) };

        let set = ShardSet::open(dir.path()).unwrap();
        let mut p = Producer::new(&set, &c, Position::default());
        let e = (0..10).map(|_| p.next_batch()).find_map(Result::err).expect("the bad data is met within an epoch");
        let e = format!("{e:#}");
        let unit = e.contains("shard-00001.parquet") && e.contains("row group 0");
        assert!(e.contains("skip_bad_rows") && (unit || e.contains("img0045")), "{e}");

        let mut set = ShardSet::open(dir.path()).unwrap();
        set.skip_bad_rows = true;
        let mut p = Producer::new(&set, &c, Position::default());
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for _ in 0..20 {
            let b = p.next_batch().unwrap();
            assert_eq!(b.batch, 6, "batches stay full");
            keys.extend(b.keys.iter().zip(&b.positions).filter(|(_, p)| p.epoch == 0).map(|(k, _)| k.clone()));
            skipped.extend(b.skipped);
        }
        // The first epoch served every good row once: 60 - 20 (shard 1) - 1 (row 45).
        let mut uniq = keys.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!((keys.len(), uniq.len()), (39, 39));
        assert!(!keys.iter().any(|k| k == "img0045" || (20..40).any(|i| *k == format!("img{i:04}"))));
        let unit = skipped.iter().find(|s| s.rows == 20).expect("the row group was reported");
        assert!(unit.what.contains("shard-00001.parquet row group 0") && !unit.reason.is_empty(), "{unit:?}");
        let row = skipped.iter().find(|s| s.rows == 1).expect("the row was reported");
        assert!(row.what.contains("img0045") && row.reason.contains("does not decode"), "{row:?}");
        // Reported once each per loader, not once per epoch.
        assert_eq!(skipped.iter().filter(|s| s.rows == 20).count(), 1);
    }

    #[test]
    fn an_all_held_out_set_is_an_error_not_a_hang() {
        let dir = fixture(3, 3);
        let set = ShardSet::open(dir.path()).unwrap();
        let mut p = Producer::new(&set, &cfg(2, 0.999_999), Position::default());
        let e = p.next_rows().unwrap_err().to_string();
        assert!(e.contains("held-out split"), "{e}");
    }
}
