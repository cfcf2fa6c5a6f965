//! The run configuration: one TOML file with every hyperparameter, command-line overrides, and
//! sweeps (several runs in one command).
//!
//! ```toml
//! [data]
//! shards = "latents"          # folder written by `precompute`
//! batch_size = 16
//! crop = 256                  # random crops aligned to the latent grid; default min(256, resolution)
//!
//! [model]
//! variant = "taef2"           # default: the shards' manifest `vae.taesd_variant`
//! init_decoder = "taef2_decoder.pth"
//!
//! [run]
//! steps = 100000
//! device = "cuda"
//! precision = "bf16"         # f32 (default, exact), tf32, bf16 (mixed): recipe::precision
//!
//! [recipe]                    # the training recipe (losses, optimisers, EMA, ...)
//! lr = 1e-4
//! ```
//!
//! Layers, later wins: built-in defaults, `--config FILE`, the sweep's `[base]`, one sweep entry,
//! `--set section.key=value`, then the direct flags (`--steps`, `--batch-size`, ...). Relative
//! paths are relative to the current directory; the resolved configuration saved in the run
//! folder holds them absolute, so `--resume` works from anywhere.

use crate::device::DeviceSpec;
use crate::recipe::{Precision, RecipeConfig};
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// File name of the resolved configuration inside a run folder.
pub const RESOLVED_CONFIG: &str = "config.toml";

/// `[data]`: where batches come from and how they are cut.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Shard folder written by `precompute` (`--shards`).
    pub shards: Option<PathBuf>,
    pub batch_size: usize,
    /// Side of the square training crops, a multiple of the variant's spatial scale. Default:
    /// min(256, the shards' resolution).
    pub crop: Option<u32>,
    /// Mirror crops (image and latent) with probability 0.5 — only when the shards were not
    /// flipped by `precompute --hflip` already. Off by default: a mirrored teacher latent is not
    /// the latent of the mirrored image (the TAESD-family encoders are not mirror-equivariant:
    /// for the released taef2 encoder on 128 px pool images, MSE(E(x), z) was 2e-8 unflipped and
    /// 0.05-0.17 with this on), so such pairs teach both networks a wrong mapping. Mirror with
    /// `precompute --hflip` instead: there the teacher sees the mirrored image.
    pub hflip: bool,
    /// Sample latents from the teacher posterior (`latent + std * noise`) where the shards hold
    /// `latent_std`; otherwise (default) train on the posterior mean.
    pub sample_posterior: bool,
    /// Rows in the shuffle buffer (bounds the loader's memory together with `prefetch`).
    pub shuffle_buffer: usize,
    /// Batches decoded ahead of the training step.
    pub prefetch: usize,
    /// Image decoding threads (0 = all cores).
    pub workers: usize,
    /// Fraction of source keys held out for evaluation (by key hash: the same rows for every run
    /// over the same shards, and all variants of one source image on the same side).
    pub eval_fraction: f64,
    /// At most this many held-out rows are used by in-run evaluation and previews.
    pub eval_max_images: usize,
    pub eval_batch_size: usize,
    /// Samples in each preview grid: held-out rows, one per source image first (variants of an
    /// image only when there are fewer sources).
    pub preview_images: usize,
    /// Skip a row group that cannot be read (a corrupt page, a truncated file) or a row whose
    /// image does not decode, instead of ending the run: each skip is a `bad_data` line in
    /// metrics.jsonl and counts in `skipped_rows_total`. Off by default: bad data is an error
    /// (after a checkpoint) that names the shard and row group; resume with this on to go past it.
    pub skip_bad_rows: bool,
    /// Train on a folder of `precompute --part I/N` parts that is not complete yet (the parts
    /// present; a missing or unfinished part is then a warning instead of an error that names it).
    pub allow_partial: bool,
    /// A crop / batch-size schedule: the run starts with these stages, in order, each for its
    /// `steps`, then goes on with `crop` and `batch_size` above to the end. E.g. most of a
    /// from-scratch run on 128 px crops of 256 px shards (about 3x the images/s of 256 px
    /// crops on the GPU), then the last part at full size:
    ///
    /// ```toml
    /// [[data.stages]]
    /// steps = 20000
    /// crop = 128
    /// ```
    ///
    /// The loader restarts at each boundary at the same place in the row order, so a resumed run
    /// stays exact; the replay buffer empties when the crop size changes (its fakes have the old
    /// size). Evaluation always decodes the stored images whole.
    pub stages: Vec<DataStage>,
}

/// One stage of [`DataConfig::stages`]: a stage's value left out is the one of `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataStage {
    /// Steps of this stage.
    pub steps: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
}

/// What the loader serves at some step: `stage` is the index into [`DataConfig::stages`]
/// (`stages.len()` for the rest of the run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageAt {
    pub stage: usize,
    /// `None`: the default crop (resolved from the shards).
    pub crop: Option<u32>,
    pub batch_size: usize,
    /// First step (0-based) after this stage (`u64::MAX` for the last one).
    pub until: u64,
}

impl DataConfig {
    /// The stage in force at (0-based) `step`.
    pub fn stage_at(&self, step: u64) -> StageAt {
        let mut start = 0u64;
        for (i, s) in self.stages.iter().enumerate() {
            let until = start.saturating_add(s.steps);
            if step < until {
                return StageAt {
                    stage: i,
                    crop: s.crop.or(self.crop),
                    batch_size: s.batch_size.unwrap_or(self.batch_size),
                    until,
                };
            }
            start = until;
        }
        StageAt { stage: self.stages.len(), crop: self.crop, batch_size: self.batch_size, until: u64::MAX }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            shards: None,
            batch_size: 16,
            crop: None,
            hflip: false,
            sample_posterior: false,
            shuffle_buffer: 1024,
            prefetch: 4,
            workers: 0,
            eval_fraction: 0.02,
            eval_max_images: 128,
            eval_batch_size: 8,
            preview_images: 6,
            skip_bad_rows: false,
            allow_partial: false,
            stages: Vec::new(),
        }
    }
}

/// `[model]`: what is trained and what it starts from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// A name of `taesd::Variant::ALL` (taesd, taesdxl, taesd3, taef1, taef2, taesana). Default: the shards' `vae.taesd_variant`;
    /// shards of a custom VAE train a custom 8x TAESD with its channel count.
    pub variant: Option<String>,
    /// Start the encoder / decoder from these checkpoints (any layout `taesd` loads).
    pub init_encoder: Option<PathBuf>,
    pub init_decoder: Option<PathBuf>,
    /// A decoder to compare against in previews and evaluation (e.g. the released one).
    pub reference_decoder: Option<PathBuf>,
    /// The encoder of evaluation's latent-cycle error |E(D(z)) - z|; default: ours.
    pub cycle_encoder: Option<PathBuf>,
}

/// `[run]`: length, cadence, device, where things go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Run name (default: the config file's stem, plus the sweep entry's name).
    pub name: Option<String>,
    /// Run folder (default `runs/<name>`).
    pub dir: Option<PathBuf>,
    /// Total optimisation steps (a resumed run continues up to this).
    pub steps: u64,
    pub seed: u64,
    /// cpu, cuda, cuda:N or auto.
    pub device: DeviceSpec,
    /// Step arithmetic: f32 (exact), tf32 (TF32 tensor-core convolutions), bf16 (bf16
    /// activations, f32 master weights; see `recipe::precision`).
    pub precision: Precision,
    /// Checkpoint every N steps (and always at exit); 0 = only at exit.
    pub checkpoint_every: u64,
    /// Checkpoints kept (older ones are deleted once a newer one is complete).
    pub keep_checkpoints: usize,
    /// Save the discriminator's replay buffer in checkpoints (default): a resumed run then
    /// continues exactly as an uninterrupted one. `false` leaves it out (at 256 px the buffer is
    /// up to 7 GiB; without it a checkpoint is a few tens of MB and can leave a machine): a
    /// resumed run's buffer then starts empty and refills from each step's fakes, so its
    /// discriminator sees fewer old fakes for `replay_capacity / batch_size` steps.
    pub checkpoint_replay: bool,
    /// Preview grid + loss curve every N steps (0 = only at the end).
    pub preview_every: u64,
    /// Held-out evaluation every N steps (also at step 0 and at the end; 0 = only those).
    pub eval_every: u64,
    /// Metrics line every N steps (losses averaged over the interval).
    pub log_every: u64,
    /// The NaN guard gives up after this many skipped steps in a row (the run has diverged): the
    /// run then ends with an error, after a checkpoint. 0 = never give up.
    pub max_skips_in_a_row: u64,
    /// The final EMA export: the layouts taesd (safetensors and the `.pth` pair taesd.py and
    /// ComfyUI load), diffusers, comfyui, combined (layouts the variant cannot be saved in, e.g.
    /// diffusers for taef2, are skipped with a note), and `onnx` (encoder and decoder, float32
    /// and float16; `crate::export`).
    pub export: Vec<String>,
    /// Loss curve size in pixels.
    pub plot_width: u32,
    pub plot_height: u32,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            name: None,
            dir: None,
            steps: 100_000,
            seed: 0,
            device: DeviceSpec::Auto,
            precision: Precision::F32,
            checkpoint_every: 1000,
            keep_checkpoints: 3,
            checkpoint_replay: true,
            preview_every: 500,
            eval_every: 5000,
            log_every: 10,
            max_skips_in_a_row: 100,
            export: vec!["taesd".into(), "diffusers".into(), "comfyui".into()],
            plot_width: 960,
            plot_height: 540,
        }
    }
}

/// Everything a run is made from: the typed result of the layers (defaults, config file, sweep
/// entry, `--set`, then the direct flags: [`plan`]), parsed once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub data: DataConfig,
    pub model: ModelConfig,
    pub run: RunConfig,
    /// The training recipe (`crate::recipe::config` lists every key and its default).
    pub recipe: RecipeConfig,
}

/// The direct flags of `train` (`--steps`, `--shards`, ...): the last layer, applied to the
/// typed configuration (after `--set`).
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub shards: Option<PathBuf>,
    pub steps: Option<u64>,
    pub batch_size: Option<usize>,
    pub crop: Option<u32>,
    pub device: Option<DeviceSpec>,
    pub precision: Option<Precision>,
    pub run_dir: Option<PathBuf>,
    pub seed: Option<u64>,
}

impl Flags {
    pub fn apply(&self, c: &mut TrainConfig) {
        if let Some(v) = &self.shards {
            c.data.shards = Some(v.clone());
        }
        if let Some(v) = self.steps {
            c.run.steps = v;
        }
        if let Some(v) = self.batch_size {
            c.data.batch_size = v;
        }
        if let Some(v) = self.crop {
            c.data.crop = Some(v);
        }
        if let Some(v) = self.device {
            c.run.device = v;
        }
        if let Some(v) = self.precision {
            c.run.precision = v;
        }
        if let Some(v) = &self.run_dir {
            c.run.dir = Some(v.clone());
        }
        if let Some(v) = self.seed {
            c.run.seed = v;
        }
    }
}

/// Keys a `--resume` may change: how long and how often, not what is trained; and where things
/// are (a run folder carried to another machine: `tools/checkpoint_parts.sh`). The initial
/// weights (`model.init_*`) only matter at step 0: a resumed run loads its checkpoint.
pub const RESUME_MAY_CHANGE: &[&str] = &[
    "run.dir",
    "model.init_encoder",
    "model.init_decoder",
    "run.steps",
    "run.device",
    "run.precision",
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "run.checkpoint_replay",
    "run.preview_every",
    "run.eval_every",
    "run.log_every",
    "run.max_skips_in_a_row",
    "run.export",
    "run.plot_width",
    "run.plot_height",
    "data.prefetch",
    "data.workers",
    "data.preview_images",
    "data.skip_bad_rows",
    "model.reference_decoder",
    "model.cycle_encoder",
];

impl TrainConfig {
    /// Parse and [`validate`](Self::validate).
    pub fn from_table(t: toml::Table) -> Result<TrainConfig> {
        let cfg = TrainConfig::parse(t)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The typed configuration of a (merged) table: unknown keys and ill-typed values are
    /// errors naming the key; missing keys take the defaults.
    pub fn parse(t: toml::Table) -> Result<TrainConfig> {
        t.try_into().map_err(|e: toml::de::Error| anyhow!("{}", e.to_string().trim()))
    }

    pub fn to_table(&self) -> Result<toml::Table> {
        toml::Table::try_from(self).context("configuration does not serialise to TOML")
    }

    /// TOML text, sections in the order data, model, run, recipe.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).context("configuration does not serialise to TOML")
    }

    /// Read a configuration file (every section optional).
    pub fn load(path: &Path) -> Result<TrainConfig> {
        TrainConfig::from_table(read_table(path)?).with_context(|| format!("config {}", path.display()))
    }

    /// Checks of values serde cannot express.
    pub fn validate(&self) -> Result<()> {
        let d = &self.data;
        ensure!(d.batch_size >= 1, "data.batch_size must be at least 1");
        ensure!(d.eval_batch_size >= 1, "data.eval_batch_size must be at least 1");
        ensure!(d.shuffle_buffer >= 1, "data.shuffle_buffer must be at least 1");
        ensure!(d.prefetch >= 1, "data.prefetch must be at least 1");
        ensure!((0.0..1.0).contains(&d.eval_fraction), "data.eval_fraction = {} must be in [0, 1)", d.eval_fraction);
        if let Some(c) = d.crop {
            ensure!(c > 0, "data.crop must be positive");
        }
        for (i, st) in d.stages.iter().enumerate() {
            ensure!(st.steps >= 1, "data.stages[{i}].steps must be at least 1");
            ensure!(st.crop != Some(0), "data.stages[{i}].crop must be positive");
            ensure!(st.batch_size != Some(0), "data.stages[{i}].batch_size must be at least 1");
        }
        let r = &self.run;
        ensure!(r.log_every >= 1, "run.log_every must be at least 1");
        ensure!(r.keep_checkpoints >= 1, "run.keep_checkpoints must be at least 1");
        ensure!(r.plot_width >= 160 && r.plot_height >= 120, "run.plot_width x plot_height must be at least 160 x 120");
        for l in &r.export {
            ensure!(
                taesd::Layout::parse(l).is_some() || crate::export::RUN_FORMATS.contains(&l.as_str()),
                "run.export: unknown layout or format `{l}` (taesd, diffusers, comfyui, combined, onnx)"
            );
        }
        if let Some(v) = &self.model.variant {
            ensure!(
                taesd::Variant::parse(v).is_some(),
                "model.variant: unknown variant `{v}` ({})",
                taesd::Variant::names()
            );
        }
        self.recipe.validate()
    }

    /// Relative paths made absolute against `cwd` (the resolved configuration saved in a run
    /// folder holds them absolute, so `--resume` works from anywhere).
    pub fn absolutize(&mut self, cwd: &Path) {
        let abs = |p: &mut Option<PathBuf>| {
            if let Some(x) = p.as_mut().filter(|x| x.is_relative()) {
                *x = cwd.join(&*x);
            }
        };
        abs(&mut self.data.shards);
        abs(&mut self.model.init_encoder);
        abs(&mut self.model.init_decoder);
        abs(&mut self.model.reference_decoder);
        abs(&mut self.model.cycle_encoder);
        abs(&mut self.run.dir);
    }

    /// The variant named in the configuration, if any.
    pub fn variant(&self) -> Option<taesd::Variant> {
        self.model.variant.as_deref().and_then(taesd::Variant::parse)
    }
}

/// Read a TOML file as a table.
pub fn read_table(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.parse::<toml::Table>().map_err(|e| anyhow!("{}: not valid TOML: {}", path.display(), e.to_string().trim()))
}

/// Merge `over` into `base`: tables merge key by key, anything else is replaced.
pub fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Parse `section.key=value` (value as TOML: `1e-4`, `true`, `"x"`, `["a", "b"]`; anything that
/// is not valid TOML is taken as a plain string, so `model.variant=taef2` works).
pub fn parse_override(s: &str) -> Result<(Vec<String>, toml::Value)> {
    let (key, value) = s.split_once('=').ok_or_else(|| anyhow!("--set `{s}`: expected section.key=value"))?;
    let path: Vec<String> = key.trim().split('.').map(|p| p.trim().to_string()).collect();
    ensure!(
        path.len() >= 2 && path.iter().all(|p| !p.is_empty()),
        "--set `{s}`: the key must name a section and a field, e.g. recipe.lr=1e-4"
    );
    let value = value.trim();
    let parsed = value.parse::<toml::Value>().unwrap_or_else(|_| toml::Value::String(value.to_string()));
    Ok((path, parsed))
}

/// Set a dotted path in a table (creating sections as needed).
pub fn set_path(t: &mut toml::Table, path: &[String], value: toml::Value) -> Result<()> {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut cur = t;
    for (i, p) in parents.iter().enumerate() {
        let entry = cur.entry(p.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry.as_table_mut().ok_or_else(|| anyhow!("`{}` is a value, not a section", path[..=i].join(".")))?;
    }
    cur.insert(last.clone(), value);
    Ok(())
}

/// Read a dotted path.
pub fn get_path<'a>(t: &'a toml::Table, path: &str) -> Option<&'a toml::Value> {
    let mut parts = path.split('.');
    let mut v = t.get(parts.next()?)?;
    for p in parts {
        v = v.as_table()?.get(p)?;
    }
    Some(v)
}

/// Every leaf of a table as `(dotted.key, value)`, sorted.
pub fn leaves(t: &toml::Table) -> Vec<(String, toml::Value)> {
    fn walk(prefix: &str, t: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
        for (k, v) in t {
            let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            match v {
                toml::Value::Table(sub) => walk(&key, sub, out),
                other => out.push((key, other.clone())),
            }
        }
    }
    let mut out = Vec::new();
    walk("", t, &mut out);
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The keys whose values differ between two tables (missing counts as different), as
/// `key: old -> new` lines.
pub fn differences(old: &toml::Table, new: &toml::Table) -> Vec<(String, String)> {
    let (a, b) = (leaves(old), leaves(new));
    let find = |v: &[(String, toml::Value)], k: &str| v.iter().find(|(x, _)| x == k).map(|(_, v)| v.to_string());
    let mut keys: Vec<&String> = a.iter().chain(b.iter()).map(|(k, _)| k).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let (x, y) = (find(&a, k), find(&b, k));
            (x != y).then(|| {
                let show = |v: Option<String>| v.unwrap_or_else(|| "(unset)".into());
                (k.clone(), format!("{k}: {} -> {}", show(x), show(y)))
            })
        })
        .collect()
}

/// What the command line asked for, before resolution into runs.
#[derive(Debug, Clone, Default)]
pub struct PlanRequest {
    /// `--config` files, each its own run (or its own sweep base).
    pub configs: Vec<PathBuf>,
    /// `--sweep` file: `[base]` plus `[[runs]]` entries, each with a `name`.
    pub sweep: Option<PathBuf>,
    /// `--set` overrides (TOML values by key path).
    pub overrides: Vec<String>,
    /// The direct flags, applied last.
    pub flags: Flags,
    /// `--resume`: with no `--config`, the run folder's saved config is the base.
    pub resume: bool,
    /// `--only`: run just these entries of the sweep (by name; empty: all).
    pub only: Vec<String>,
}

/// One run of a command.
#[derive(Debug, Clone)]
pub struct RunPlan {
    pub name: String,
    pub dir: PathBuf,
    pub config: TrainConfig,
}

/// A sweep file.
#[derive(Debug, Clone, Default)]
pub struct Sweep {
    pub base: toml::Table,
    /// (name, partial configuration) per run.
    pub runs: Vec<(String, toml::Table)>,
}

impl Sweep {
    pub fn load(path: &Path) -> Result<Sweep> {
        let mut t = read_table(path)?;
        let ctx = || format!("sweep {}", path.display());
        let base = match t.remove("base") {
            None => toml::Table::new(),
            Some(toml::Value::Table(b)) => b,
            Some(_) => return Err(anyhow!("`base` must be a table ([base])")).with_context(ctx),
        };
        let runs = match t.remove("runs") {
            Some(toml::Value::Array(a)) => a,
            _ => return Err(anyhow!("no [[runs]] entries")).with_context(ctx),
        };
        if let Some(k) = t.keys().next() {
            return Err(anyhow!("unknown top-level key `{k}` (a sweep has [base] and [[runs]])")).with_context(ctx);
        }
        let mut out = Vec::new();
        for (i, r) in runs.into_iter().enumerate() {
            let toml::Value::Table(mut r) = r else {
                return Err(anyhow!("runs[{i}] is not a table")).with_context(ctx);
            };
            let name = match r.remove("name") {
                Some(toml::Value::String(s)) if valid_name(&s) => s,
                Some(v) => return Err(anyhow!("runs[{i}].name = {v} is not a usable folder name")).with_context(ctx),
                None => return Err(anyhow!("runs[{i}] has no `name` (it names the run folder)")).with_context(ctx),
            };
            ensure!(!out.iter().any(|(n, _)| *n == name), "{}: two runs are named `{name}`", path.display());
            out.push((name, r));
        }
        ensure!(!out.is_empty(), "{}: [[runs]] is empty", path.display());
        Ok(Sweep { base, runs: out })
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.+=".contains(c))
}

/// Turn a request into runs: one per config file (or one with defaults), times the sweep
/// entries. Several runs that would share a folder get `<dir>/<name>` each.
pub fn plan(req: &PlanRequest, run_dir_flag: Option<&Path>) -> Result<Vec<RunPlan>> {
    let mut bases: Vec<(Option<String>, toml::Table)> = Vec::new();
    for c in &req.configs {
        let t = read_table(c)?;
        // Fail early, naming the file, on a config that does not parse on its own.
        TrainConfig::from_table(t.clone()).with_context(|| format!("config {}", c.display()))?;
        let stem = c.file_stem().map(|s| s.to_string_lossy().into_owned());
        bases.push((stem, t));
    }
    if bases.is_empty() {
        let saved = run_dir_flag.map(|d| d.join(RESOLVED_CONFIG)).filter(|p| req.resume && p.is_file());
        match saved {
            Some(p) => {
                let t = read_table(&p)?;
                bases.push((None, t));
            }
            None => bases.push((None, toml::Table::new())),
        }
    }
    let sweep = req.sweep.as_deref().map(Sweep::load).transpose()?;
    let entries: Vec<(Option<String>, toml::Table)> = match &sweep {
        None => {
            ensure!(req.only.is_empty(), "--only names sweep entries: pass --sweep FILE too");
            vec![(None, toml::Table::new())]
        }
        Some(s) => {
            for o in &req.only {
                ensure!(
                    s.runs.iter().any(|(n, _)| n == o),
                    "--only {o}: the sweep has no entry `{o}` (it has {})",
                    s.runs.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
                );
            }
            s.runs
                .iter()
                .filter(|(n, _)| req.only.is_empty() || req.only.contains(n))
                .map(|(n, t)| {
                    let mut m = s.base.clone();
                    merge(&mut m, t);
                    (Some(n.clone()), m)
                })
                .collect()
        }
    };
    let overrides = req.overrides.iter().map(|s| parse_override(s)).collect::<Result<Vec<_>>>()?;
    let cwd = std::env::current_dir().context("cannot read the current directory")?;

    let mut plans = Vec::new();
    for (stem, base) in &bases {
        for (entry, partial) in &entries {
            let mut t = base.clone();
            merge(&mut t, partial);
            for (path, v) in &overrides {
                set_path(&mut t, path, v.clone())?;
            }
            let explicit = get_path(&t, "run.name").and_then(|v| v.as_str()).map(String::from);
            let base_name = explicit.clone().or_else(|| stem.clone());
            let name = match (entry, &base_name) {
                (Some(e), Some(b)) if bases.len() > 1 || explicit.is_some() => format!("{b}-{e}"),
                (Some(e), _) => e.clone(),
                (None, Some(b)) => b.clone(),
                (None, None) => "train".to_string(),
            };
            ensure!(valid_name(&name), "run name `{name}` is not a usable folder name");
            let label = match entry {
                Some(e) => format!("run `{name}` (sweep entry `{e}`)"),
                None => format!("run `{name}`"),
            };
            // The one typed parse of the merged layers; then the flags, the name, absolute paths.
            let mut config = TrainConfig::parse(t).with_context(|| label.clone())?;
            req.flags.apply(&mut config);
            config.run.name = Some(name.clone());
            config.absolutize(&cwd);
            config.validate().with_context(|| label.clone())?;
            plans.push(RunPlan { name, dir: PathBuf::new(), config });
        }
    }
    // Run folders: the configured one, or runs/<name>; shared ones get a subfolder per run.
    let dirs: Vec<PathBuf> =
        plans.iter().map(|p| p.config.run.dir.clone().unwrap_or_else(|| cwd.join("runs").join(&p.name))).collect();
    for (i, p) in plans.iter_mut().enumerate() {
        let shared = dirs.iter().filter(|d| **d == dirs[i]).count() > 1;
        p.dir = if shared { dirs[i].join(&p.name) } else { dirs[i].clone() };
        p.config.run.dir = Some(p.dir.clone());
    }
    for (i, p) in plans.iter().enumerate() {
        if plans[..i].iter().any(|q| q.dir == p.dir) {
            bail!("two runs would share the folder {} (give them distinct names)", p.dir.display());
        }
    }
    Ok(plans)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Every shipped configuration loads, and every shipped sweep entry is a valid configuration
    /// over each of them (a renamed or mistyped key in configs/ fails here, not on the GPU).
    #[test]
    fn the_shipped_configs_and_sweeps_are_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let files = |dir: &Path| {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                .collect();
            v.sort();
            v
        };
        let configs = files(&root);
        assert!(configs.len() >= 3, "{configs:?}");
        for c in &configs {
            TrainConfig::load(c).unwrap_or_else(|e| panic!("{e:#}"));
        }
        let sweeps = files(&root.join("ab"));
        assert!(!sweeps.is_empty());
        for sw in &sweeps {
            let sweep = Sweep::load(sw).unwrap_or_else(|e| panic!("{e:#}"));
            for c in &configs {
                for (name, entry) in &sweep.runs {
                    let mut t = read_table(c).unwrap();
                    merge(&mut t, &sweep.base);
                    merge(&mut t, entry);
                    TrainConfig::from_table(t)
                        .unwrap_or_else(|e| panic!("{} entry {name} over {}: {e:#}", sw.display(), c.display()));
                }
            }
        }
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let c = TrainConfig::default();
        let text = c.to_toml().unwrap();
        let back = TrainConfig::from_table(text.parse().unwrap()).unwrap();
        assert_eq!(back, c);
        assert_eq!(TrainConfig::from_table(toml::Table::new()).unwrap(), c, "every section is optional");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = TrainConfig::from_table("[data]\nbach_size = 3".parse().unwrap()).unwrap_err().to_string();
        assert!(e.contains("bach_size"), "{e}");
        let e = TrainConfig::from_table("[data]\nbatch_size = \"x\"".parse().unwrap()).unwrap_err().to_string();
        assert!(e.contains("batch_size") || e.contains("integer"), "{e}");
        let e = TrainConfig::from_table("[run]\ndevice = \"tpu\"".parse().unwrap()).unwrap_err();
        assert!(format!("{e:#}").contains("tpu"), "{e:#}");
        let e = TrainConfig::from_table("[model]\nvariant = \"taef3\"".parse().unwrap()).unwrap_err().to_string();
        assert!(e.contains("taef3"), "{e}");
        let e = TrainConfig::from_table("[run]\nexport = [\"tflite\"]".parse().unwrap()).unwrap_err().to_string();
        assert!(e.contains("tflite"), "{e}");
        assert!(TrainConfig::from_table("[run]\nexport = [\"onnx\", \"taesd\"]".parse().unwrap()).is_ok());
        let e = TrainConfig::from_table("[data]\neval_fraction = 1.5".parse().unwrap()).unwrap_err().to_string();
        assert!(e.contains("eval_fraction"), "{e}");
    }

    #[test]
    fn overrides_parse_as_toml_or_plain_strings() {
        let (p, v) = parse_override("recipe.lr=1e-4").unwrap();
        assert_eq!(p, vec!["recipe", "lr"]);
        assert_eq!(v.as_float(), Some(1e-4));
        assert_eq!(parse_override("model.variant=taef2").unwrap().1.as_str(), Some("taef2"));
        assert_eq!(parse_override("run.steps = 30").unwrap().1.as_integer(), Some(30));
        assert_eq!(parse_override("data.hflip=false").unwrap().1.as_bool(), Some(false));
        assert_eq!(parse_override("run.export=[\"taesd\"]").unwrap().1.as_array().unwrap().len(), 1);
        assert!(parse_override("lr=3").unwrap_err().to_string().contains("section"));
        assert!(parse_override("recipe.lr").unwrap_err().to_string().contains("section.key=value"));
        let mut t = toml::Table::new();
        set_path(&mut t, &["recipe".into(), "gan".into(), "w".into()], toml::Value::Integer(2)).unwrap();
        assert_eq!(get_path(&t, "recipe.gan.w").unwrap().as_integer(), Some(2));
        let e = set_path(&mut t, &["recipe".into(), "gan".into(), "w".into(), "x".into()], toml::Value::Integer(1))
            .unwrap_err();
        assert!(e.to_string().contains("recipe.gan.w"), "{e}");
    }

    #[test]
    fn layers_apply_in_order_and_name_runs() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.toml", "[data]\nbatch_size = 2\n[run]\nsteps = 5\n[recipe]\nlr = 0.5\n");
        let b = write(dir.path(), "b.toml", "[data]\nbatch_size = 3\n");
        let runs_dir = dir.path().join("out");
        let req =
            PlanRequest { configs: vec![a.clone(), b], overrides: vec!["run.steps=7".into()], ..Default::default() };
        let p = plan(&req, None).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].name.as_str(), p[0].config.data.batch_size, p[0].config.run.steps), ("a", 2, 7));
        assert_eq!((p[1].name.as_str(), p[1].config.data.batch_size, p[1].config.run.steps), ("b", 3, 7));
        assert_eq!(p[0].config.recipe.lr, 0.5);
        assert!(p[0].dir.ends_with("runs/a") && p[0].dir.is_absolute(), "{}", p[0].dir.display());

        // Two runs with one --run-dir: a subfolder each.
        let req2 = PlanRequest {
            configs: req.configs.clone(),
            overrides: vec![format!("run.dir={}", runs_dir.display())],
            ..Default::default()
        };
        let p = plan(&req2, None).unwrap();
        assert_eq!(p[0].dir, runs_dir.join("a"));
        assert_eq!(p[1].dir, runs_dir.join("b"));
        assert_eq!(p[1].config.run.dir.as_deref(), Some(runs_dir.join("b").as_path()));

        // One run: exactly the folder asked for.
        let req3 = PlanRequest { configs: vec![a], overrides: req2.overrides.clone(), ..Default::default() };
        assert_eq!(plan(&req3, None).unwrap()[0].dir, runs_dir);
    }

    #[test]
    fn sweeps_expand_over_a_base() {
        let dir = tempfile::tempdir().unwrap();
        let s = write(
            dir.path(),
            "sweep.toml",
            "[base]\nrun.steps = 11\n[[runs]]\nname = \"lo\"\nrecipe.lr = 1e-4\n[[runs]]\nname = \"hi\"\nrecipe.lr = 1e-3\nrun.steps = 12\n",
        );
        let req = PlanRequest {
            sweep: Some(s),
            overrides: vec![format!("run.dir={}", dir.path().join("sw").display())],
            ..Default::default()
        };
        let p = plan(&req, None).unwrap();
        assert_eq!(p.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["lo", "hi"]);
        assert_eq!((p[0].config.run.steps, p[1].config.run.steps), (11, 12));
        assert_eq!(p[1].config.recipe.lr, 1e-3);
        assert_eq!(p[0].dir, dir.path().join("sw/lo"));

        let bad = write(dir.path(), "bad.toml", "[[runs]]\nrecipe.lr = 1\n");
        let e = Sweep::load(&bad).unwrap_err();
        assert!(format!("{e:#}").contains("no `name`"), "{e:#}");
        let dup = write(dir.path(), "dup.toml", "[[runs]]\nname = \"x\"\n[[runs]]\nname = \"x\"\n");
        assert!(format!("{:#}", Sweep::load(&dup).unwrap_err()).contains("two runs are named `x`"));
        // --only picks entries by name, and names a missing one.
        let req_only = PlanRequest { only: vec!["hi".into()], ..req.clone() };
        let p = plan(&req_only, None).unwrap();
        assert_eq!((p.len(), p[0].name.as_str(), p[0].config.run.steps), (1, "hi", 12));
        let e = plan(&PlanRequest { only: vec!["mid".into()], ..req.clone() }, None).unwrap_err().to_string();
        assert!(e.contains("no entry `mid`") && e.contains("lo, hi"), "{e}");
        let typo = write(dir.path(), "typo.toml", "[[runs]]\nname = \"x\"\ndata.bach_size = 1\n");
        let e = plan(&PlanRequest { sweep: Some(typo), ..Default::default() }, None).unwrap_err();
        assert!(format!("{e:#}").contains("bach_size") && format!("{e:#}").contains("sweep entry `x`"), "{e:#}");
    }

    #[test]
    fn relative_paths_become_absolute_and_resume_reads_the_saved_config() {
        let dir = tempfile::tempdir().unwrap();
        let req = PlanRequest {
            overrides: vec!["data.shards=some/where".into(), "run.steps=3".into()],
            ..Default::default()
        };
        let p = plan(&req, None).unwrap();
        let shards = p[0].config.data.shards.clone().unwrap();
        assert!(shards.is_absolute() && shards.ends_with("some/where"), "{}", shards.display());

        let run = dir.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        let mut saved = p[0].config.clone();
        saved.run.steps = 40;
        std::fs::write(run.join(RESOLVED_CONFIG), saved.to_toml().unwrap()).unwrap();
        let req = PlanRequest { resume: true, overrides: vec!["run.steps=50".into()], ..Default::default() };
        let p = plan(&req, Some(&run)).unwrap();
        assert_eq!(p[0].config.run.steps, 50);
        assert_eq!(p[0].config.data.shards.as_deref(), Some(shards.as_path()));
    }

    #[test]
    fn flags_come_last_and_values_are_typed_once() {
        let req = PlanRequest {
            overrides: vec!["run.steps=7".into(), "run.device=\"cpu\"".into(), "recipe.lr_schedule=\"cosine\"".into()],
            flags: Flags { steps: Some(9), precision: Some(Precision::Bf16), crop: Some(64), ..Default::default() },
            ..Default::default()
        };
        let c = &plan(&req, None).unwrap()[0].config;
        assert_eq!(
            (c.run.steps, c.run.device, c.run.precision, c.data.crop),
            (9, DeviceSpec::Cpu, Precision::Bf16, Some(64))
        );
        assert_eq!(c.recipe.lr_schedule, crate::recipe::LrSchedule::Cosine);
        // Typed values round-trip through the resolved config's TOML.
        let text = c.to_toml().unwrap();
        assert!(
            text.contains("device = \"cpu\"")
                && text.contains("precision = \"bf16\"")
                && text.contains("lr_schedule = \"cosine\""),
            "{text}"
        );
        assert_eq!(&TrainConfig::from_table(text.parse().unwrap()).unwrap(), c);
        // Bad values are named by their key, recipe keys included.
        for (set, key) in [
            ("run.device=\"tpu\"", "tpu"),
            ("run.precision=\"fp8\"", "fp8"),
            ("recipe.lr=-1.0", "lr"),
            ("recipe.lrr=1.0", "lrr"),
        ] {
            let e = plan(&PlanRequest { overrides: vec![set.into()], ..Default::default() }, None).unwrap_err();
            assert!(format!("{e:#}").contains(key), "{set}: {e:#}");
        }
        // A flag that breaks a rule is refused as a --set would be.
        let e = plan(
            &PlanRequest { flags: Flags { batch_size: Some(0), ..Default::default() }, ..Default::default() },
            None,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("data.batch_size"), "{e:#}");
    }

    #[test]
    fn stages_come_first_then_the_data_section() {
        let t: toml::Table =
            "[data]\ncrop = 256\nbatch_size = 32\n[[data.stages]]\nsteps = 10\ncrop = 128\nbatch_size = 64\n\
                              [[data.stages]]\nsteps = 5\ncrop = 192\n"
                .parse()
                .unwrap();
        let c = TrainConfig::from_table(t).unwrap();
        let d = &c.data;
        assert_eq!(d.stage_at(0), StageAt { stage: 0, crop: Some(128), batch_size: 64, until: 10 });
        assert_eq!(d.stage_at(9).stage, 0);
        assert_eq!(d.stage_at(10), StageAt { stage: 1, crop: Some(192), batch_size: 32, until: 15 });
        assert_eq!(d.stage_at(15), StageAt { stage: 2, crop: Some(256), batch_size: 32, until: u64::MAX });
        assert_eq!(d.stage_at(1_000_000).stage, 2);
        // Round trip through the resolved config's TOML.
        let back = TrainConfig::from_table(c.to_toml().unwrap().parse().unwrap()).unwrap();
        assert_eq!(back, c);
        // No stages: the data section throughout.
        assert_eq!(DataConfig::default().stage_at(0).batch_size, 16);
        let e = TrainConfig::from_table("[[data.stages]]\nsteps = 0\n".parse().unwrap()).unwrap_err().to_string();
        assert!(e.contains("data.stages[0].steps"), "{e}");
        let e = TrainConfig::from_table("[[data.stages]]\nsteps = 3\ncrops = 1\n".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("crops"), "{e}");
    }

    #[test]
    fn differences_list_changed_leaves() {
        let a: toml::Table = "[run]\nsteps = 1\nseed = 2\n[recipe]\nlr = 1.0".parse().unwrap();
        let b: toml::Table = "[run]\nsteps = 1\nseed = 3\n[recipe]\nlr = 1.0\nbeta = 2".parse().unwrap();
        let d = differences(&a, &b);
        assert_eq!(d.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["recipe.beta", "run.seed"]);
        assert_eq!(d[1].1, "run.seed: 2 -> 3");
        assert!(d[0].1.contains("(unset) -> 2"));
    }
}
