//! Replay buffer of past fakes (decoded images) with their latents, for the discriminator.
//!
//! As in seraena: every step's fakes are added (appended while there is room, then each one
//! overwrites a uniformly random entry), and then `n` samples are drawn uniformly with
//! replacement from the buffer, so a sample may be one of the fakes just added.
//!
//! To keep a step discardable (the NaN guard), a step first makes a [`ReplayPlan`] (which slots
//! the new fakes will take, which entries are drawn: all random choices, nothing written),
//! gathers the samples as if the fakes were already in (a sample of a slot being written this
//! step is taken from the new fakes), and writes the fakes only on [`ReplayBuffer::commit`].
//! Plan + gather + commit gives exactly seraena's add-then-sample.
//!
//! Storage: one tensor per entry, `[3, H, W]` image and `[C, h, w]` latent, on the training
//! device, in [`ReplayDtype`] (f16 by default: 2 bytes a value, exact to 2^-11 relative, finer
//! than the 8-bit source pixels). Samples are read back as f32, and a sample of a fresh fake is
//! rounded through the storage dtype too, so it does not matter whether it was read before or
//! after the write. At 256x256 with 16384 entries the images take 16384 * 3 * 256 * 256 * 2 B
//! = 6.0 GiB, the latents of a 32-channel 8x model 16384 * 32 * 32 * 32 * 2 B = 1.0 GiB
//! ([`ReplayBuffer::bytes_at`]). Entries are allocated as the buffer fills.
//!
//! A batch of another image or latent shape than the stored entries (a change of training
//! resolution) empties the buffer: it is planned as empty and cleared on commit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::config::ReplayDtype;

/// Entries per file when saving.
pub const CHUNK: usize = 1024;

pub struct ReplayBuffer {
    capacity: usize,
    dtype: ReplayDtype,
    images: Vec<Tensor>,
    latents: Vec<Tensor>,
}

/// Where a drawn sample comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// An entry already stored (index into the buffer).
    Stored(usize),
    /// Fake `i` of the current batch (it is being written to a slot this step).
    Fresh(usize),
}

/// The random choices of one step: nothing is written until [`ReplayBuffer::commit`].
#[derive(Clone, Debug)]
pub struct ReplayPlan {
    /// Clear the buffer before writing (the batch's shapes differ from the stored ones).
    pub reset: bool,
    /// `(slot, batch index)` writes, in order (a later write to a slot wins).
    pub writes: Vec<(usize, usize)>,
    /// The drawn samples.
    pub samples: Vec<Source>,
}

impl ReplayBuffer {
    pub fn new(capacity: usize, dtype: ReplayDtype) -> Self {
        Self { capacity, dtype, images: Vec::new(), latents: Vec::new() }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    pub fn dtype(&self) -> ReplayDtype {
        self.dtype
    }

    /// Bytes the buffer takes when full of `[3, h, w]` images and `[c, h/s, w/s]` latents.
    pub fn bytes_at(capacity: usize, dtype: ReplayDtype, h: usize, w: usize, c: usize, s: usize) -> u64 {
        let per = 3 * h * w + c * h.div_ceil(s) * w.div_ceil(s);
        capacity as u64 * per as u64 * dtype.bytes() as u64
    }

    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
        self.images.iter().chain(&self.latents).map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64).sum()
    }

    fn shapes_match(&self, images: &Tensor, latents: &Tensor) -> bool {
        match (self.images.first(), self.latents.first()) {
            (Some(i), Some(l)) => i.dims() == &images.dims()[1..] && l.dims() == &latents.dims()[1..],
            _ => true,
        }
    }

    /// Choose the slots of `batch` new fakes and `n_samples` draws. Random numbers, in order:
    /// one `random_range(0..len)` per write once full, then one `random_range(0..len)` per draw.
    pub fn plan(
        &self,
        images: &Tensor,
        latents: &Tensor,
        n_samples: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<ReplayPlan> {
        let batch = images.dim(0)?;
        if latents.dim(0)? != batch {
            bail!("replay: {batch} images but {} latents", latents.dim(0)?);
        }
        let reset = !self.shapes_match(images, latents);
        let mut len = if reset { 0 } else { self.len() };
        let mut writes = Vec::with_capacity(batch);
        if self.capacity > 0 {
            for i in 0..batch {
                if len < self.capacity {
                    writes.push((len, i));
                    len += 1;
                } else {
                    writes.push((rng.random_range(0..len), i));
                }
            }
        }
        let mut samples = Vec::with_capacity(n_samples);
        if n_samples > 0 {
            if len == 0 {
                bail!("replay: {n_samples} samples asked of an empty buffer (capacity 0)");
            }
            // slot -> batch index of the last write to it this step
            let written: HashMap<usize, usize> = writes.iter().copied().collect();
            for _ in 0..n_samples {
                let k = rng.random_range(0..len);
                samples.push(match written.get(&k) {
                    Some(&i) => Source::Fresh(i),
                    None => Source::Stored(k),
                });
            }
        }
        Ok(ReplayPlan { reset, writes, samples })
    }

    /// The drawn samples as f32 `[n, 3, H, W]` images and `[n, C, h, w]` latents on the batch's
    /// device (`None` when the plan draws nothing).
    pub fn gather(&self, plan: &ReplayPlan, images: &Tensor, latents: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        if plan.samples.is_empty() {
            return Ok(None);
        }
        let st = self.dtype.dtype();
        let mut im = Vec::with_capacity(plan.samples.len());
        let mut la = Vec::with_capacity(plan.samples.len());
        for s in &plan.samples {
            let (i, l) = match *s {
                Source::Stored(k) => (self.images[k].clone(), self.latents[k].clone()),
                Source::Fresh(b) => (images.get(b)?.to_dtype(st)?, latents.get(b)?.to_dtype(st)?),
            };
            im.push(i);
            la.push(l);
        }
        let im = Tensor::stack(&im, 0)?.to_dtype(DType::F32)?;
        let la = Tensor::stack(&la, 0)?.to_dtype(DType::F32)?;
        Ok(Some((im, la)))
    }

    /// Write the plan's new fakes (detached copies in the storage dtype).
    pub fn commit(&mut self, plan: &ReplayPlan, images: &Tensor, latents: &Tensor) -> Result<()> {
        if plan.reset {
            self.images.clear();
            self.latents.clear();
        }
        for &(slot, i) in &plan.writes {
            let im = own(&images.get(i)?.detach(), self.dtype.dtype())?;
            let la = own(&latents.get(i)?.detach(), self.dtype.dtype())?;
            if slot == self.images.len() {
                self.images.push(im);
                self.latents.push(la);
            } else if slot < self.images.len() {
                self.images[slot] = im;
                self.latents[slot] = la;
            } else {
                bail!("replay: write to slot {slot} of a buffer of {}", self.images.len());
            }
        }
        Ok(())
    }

    /// The stored entries (shallow copies), for checks.
    pub fn entries(&self) -> (&[Tensor], &[Tensor]) {
        (&self.images, &self.latents)
    }

    /// Save to `replay_NNNNN.safetensors` files in `dir` (`images`, `latents`, [`CHUNK`]
    /// entries each, in the storage dtype: bit-exact). Returns the files written.
    pub fn save(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        for (c, start) in (0..self.len()).step_by(CHUNK).enumerate() {
            let end = (start + CHUNK).min(self.len());
            let path = dir.join(format!("replay_{c:05}.safetensors"));
            let im = Tensor::stack(&self.images[start..end], 0)?.to_device(&Device::Cpu)?;
            let la = Tensor::stack(&self.latents[start..end], 0)?.to_device(&Device::Cpu)?;
            let map = HashMap::from([("images".to_string(), im), ("latents".to_string(), la)]);
            candle_core::safetensors::save(&map, &path).with_context(|| format!("writing {}", path.display()))?;
            files.push(path);
        }
        Ok(files)
    }

    /// Load `len` entries saved by [`ReplayBuffer::save`] from `dir` onto `device`, replacing
    /// the contents. Entries beyond the capacity are dropped (the capacity was lowered).
    pub fn load(&mut self, dir: &Path, len: usize, device: &Device) -> Result<()> {
        let mut images = Vec::with_capacity(len.min(self.capacity));
        let mut latents = Vec::with_capacity(len.min(self.capacity));
        let n_chunks = len.div_ceil(CHUNK);
        'chunks: for c in 0..n_chunks {
            let path = dir.join(format!("replay_{c:05}.safetensors"));
            let map = candle_core::safetensors::load(&path, &Device::Cpu)
                .with_context(|| format!("reading {}", path.display()))?;
            let im = map.get("images").with_context(|| format!("{}: no `images`", path.display()))?;
            let la = map.get("latents").with_context(|| format!("{}: no `latents`", path.display()))?;
            let n = im.dim(0)?;
            if la.dim(0)? != n {
                bail!("{}: {n} images but {} latents", path.display(), la.dim(0)?);
            }
            let st = self.dtype.dtype();
            // One host-to-device copy per chunk (not two per entry), then an own copy per entry.
            let (im, la) = (im.to_dtype(st)?.to_device(device)?, la.to_dtype(st)?.to_device(device)?);
            for k in 0..n {
                if images.len() >= self.capacity || images.len() >= len {
                    break 'chunks;
                }
                images.push(own(&im.get(k)?, st)?);
                latents.push(own(&la.get(k)?, st)?);
            }
        }
        if images.len() != len.min(self.capacity) {
            bail!("replay buffer in {}: found {} entries, the state says {len}", dir.display(), images.len());
        }
        self.images = images;
        self.latents = latents;
        Ok(())
    }
}

/// `t` in `dtype` with storage of its own holding just its elements (never a view of a larger
/// tensor, which would keep that alive). Not `Tensor::copy`: that clones the whole underlying
/// storage, so entry `k` of a loaded 1024-entry chunk kept a copy of the entire chunk (a CUDA
/// resume ran out of memory that way).
fn own(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        Ok(t.detach().force_contiguous()?)
    } else {
        Ok(t.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn batch(base: f32, b: usize) -> (Tensor, Tensor) {
        let dev = Device::Cpu;
        let im: Vec<f32> = (0..b * 3 * 8 * 8).map(|i| base + (i / (3 * 64)) as f32).collect();
        let la: Vec<f32> = (0..b * 2).map(|i| base + (i / 2) as f32).collect();
        (Tensor::from_vec(im, (b, 3, 8, 8), &dev).unwrap(), Tensor::from_vec(la, (b, 2, 1, 1), &dev).unwrap())
    }

    fn first_values(buf: &ReplayBuffer) -> Vec<f32> {
        buf.entries()
            .0
            .iter()
            .map(|t| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().get(0).unwrap().to_scalar::<f32>().unwrap())
            .collect()
    }

    #[test]
    fn fills_then_replaces_at_random_within_capacity() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut buf = ReplayBuffer::new(5, ReplayDtype::F16);
        let (im, la) = batch(0.0, 3);
        let plan = buf.plan(&im, &la, 0, &mut rng).unwrap();
        assert_eq!(plan.writes, [(0, 0), (1, 1), (2, 2)]);
        buf.commit(&plan, &im, &la).unwrap();
        assert_eq!(buf.len(), 3);
        // Next batch: two appends, then a random replacement among the 5 slots.
        let (im, la) = batch(10.0, 3);
        let plan = buf.plan(&im, &la, 0, &mut rng).unwrap();
        assert_eq!(&plan.writes[..2], &[(3, 0), (4, 1)]);
        assert!(plan.writes[2].0 < 5);
        buf.commit(&plan, &im, &la).unwrap();
        assert_eq!(buf.len(), 5);
        // Many more batches: never above capacity, and old entries get replaced.
        for step in 0..20 {
            let (im, la) = batch(100.0 + 10.0 * step as f32, 3);
            let plan = buf.plan(&im, &la, 2, &mut rng).unwrap();
            assert!(plan.writes.iter().all(|(s, _)| *s < 5));
            buf.commit(&plan, &im, &la).unwrap();
            assert_eq!(buf.len(), 5);
        }
        let v = first_values(&buf);
        assert!(v.iter().all(|x| *x >= 100.0), "old entries remain: {v:?}");
        // Per entry in f16: (3*8*8 + 2) values of 2 bytes.
        assert_eq!(buf.bytes(), 5 * (3 * 64 + 2) * 2);
        assert_eq!(
            ReplayBuffer::bytes_at(16384, ReplayDtype::F16, 256, 256, 32, 8),
            16384 * (3 * 256 * 256 + 32 * 32 * 32) * 2
        );
    }

    #[test]
    fn gathered_samples_equal_add_then_sample() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut buf = ReplayBuffer::new(4, ReplayDtype::F16);
        for step in 0..6 {
            let (im, la) = batch(step as f32 * 10.0 + 0.1, 2);
            let plan = buf.plan(&im, &la, 3, &mut rng).unwrap();
            let (gi, gl) = buf.gather(&plan, &im, &la).unwrap().unwrap();
            assert_eq!(gi.dims(), [3, 3, 8, 8]);
            assert_eq!(gl.dims(), [3, 2, 1, 1]);
            buf.commit(&plan, &im, &la).unwrap();
            // After the write, each sample equals the entry at its drawn slot.
            for (j, s) in plan.samples.iter().enumerate() {
                let slot = match *s {
                    Source::Stored(k) => k,
                    Source::Fresh(b) => plan.writes.iter().rev().find(|w| w.1 == b).unwrap().0,
                };
                let want = buf.entries().0[slot].to_dtype(DType::F32).unwrap();
                let diff = (gi.get(j).unwrap() - want).unwrap().abs().unwrap().sum_all().unwrap();
                assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
            }
        }
    }

    #[test]
    fn shape_change_resets_and_save_load_round_trips() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut buf = ReplayBuffer::new(4, ReplayDtype::Bf16);
        let (im, la) = batch(1.0, 3);
        let plan = buf.plan(&im, &la, 1, &mut rng).unwrap();
        buf.commit(&plan, &im, &la).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let files = buf.save(dir.path()).unwrap();
        assert_eq!(files.len(), 1);
        let mut back = ReplayBuffer::new(4, ReplayDtype::Bf16);
        back.load(dir.path(), 3, &Device::Cpu).unwrap();
        assert_eq!(first_values(&back), first_values(&buf));
        // Each loaded entry owns storage of its own size, not the whole chunk's.
        for t in back.entries().0.iter().chain(back.entries().1) {
            assert_eq!(t.layout().start_offset(), 0);
            let elems = match &*t.storage_and_layout().0 {
                candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(v)) => v.len(),
                other => panic!("unexpected storage {:?}", other.dtype()),
            };
            assert_eq!(elems, t.elem_count());
        }
        // Lowered capacity keeps the first entries.
        let mut small = ReplayBuffer::new(2, ReplayDtype::Bf16);
        small.load(dir.path(), 3, &Device::Cpu).unwrap();
        assert_eq!(small.len(), 2);
        // Another resolution empties the buffer first.
        let im2 = Tensor::zeros((1, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
        let la2 = Tensor::zeros((1, 2, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let plan = buf.plan(&im2, &la2, 1, &mut rng).unwrap();
        assert!(plan.reset);
        assert_eq!(plan.samples, [Source::Fresh(0)]);
        buf.commit(&plan, &im2, &la2).unwrap();
        assert_eq!(buf.len(), 1);
        assert_eq!(buf.entries().0[0].dims(), [3, 16, 16]);
    }
}
