//! What a run's configuration leaves to its shards (variant, crop), checked against them; and
//! what a resume may change.

use crate::config::{differences, TrainConfig, RESOLVED_CONFIG, RESUME_MAY_CHANGE};
use crate::dataset::ShardSet;
use crate::sample::check_crop;
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::path::Path;
use std::sync::Arc;
use taesd::{TaesdConfig, Variant};

/// Everything resolved from the configuration and the shards.
pub struct Resolved {
    /// The configuration with what the shards decide filled in (variant, crop).
    pub config: TrainConfig,
    pub model: TaesdConfig,
    pub variant: Option<Variant>,
    pub crop: u32,
    pub set: Arc<ShardSet>,
}

/// Fill what the configuration leaves to the shards (variant, crop) and check it all fits.
pub fn resolve(config: &TrainConfig) -> Result<Resolved> {
    let mut config = config.clone();
    let shards =
        config.data.shards.clone().ok_or_else(|| anyhow!("no shards: pass --shards DIR or set data.shards"))?;
    let mut set = ShardSet::open_with(&shards, config.data.allow_partial)?;
    set.skip_bad_rows = config.data.skip_bad_rows;
    let set = Arc::new(set);
    let channels = set.latent_shape[0] as usize;
    let variant = match config.variant() {
        Some(v) => Some(v),
        None => match set.variant_name() {
            Some(n) => Some(Variant::parse(n).ok_or_else(|| {
                anyhow!(
                    "{}: the shards name the TAESD variant `{n}`, which this build does not know; set model.variant",
                    shards.display()
                )
            })?),
            None => None,
        },
    };
    let model = variant.map(|v| v.config()).unwrap_or_else(|| TaesdConfig::custom(channels));
    ensure!(
        model.latent_channels == channels,
        "model.variant {} has {} latent channels but the shards in {} hold {channels}-channel latents",
        model.describe(),
        model.latent_channels,
        shards.display()
    );
    let scale = model.spatial_scale() as u32;
    ensure!(
        set.vae.downscale as u32 == scale,
        "{} downsamples {}x but the shards' VAE downsamples {}x",
        model.describe(),
        scale,
        set.vae.downscale
    );
    let crop = config.data.crop.unwrap_or_else(|| (256.min(set.resolution) / scale) * scale);
    check_crop(crop, set.resolution, scale).context("data.crop")?;
    for (i, st) in config.data.stages.iter().enumerate() {
        if let Some(c) = st.crop {
            check_crop(c, set.resolution, scale).with_context(|| format!("data.stages[{i}].crop"))?;
        }
    }
    for (k, p) in
        [("model.init_encoder", &config.model.init_encoder), ("model.init_decoder", &config.model.init_decoder)]
    {
        if let Some(p) = p {
            ensure!(p.exists(), "{k} = {} does not exist", p.display());
        }
    }
    config.model.variant = variant.map(|v| v.to_string());
    config.data.crop = Some(crop);
    Ok(Resolved { config, model, variant, crop, set })
}

/// Compare a resumed run's configuration with the one it was started with. Returns the
/// differences that are allowed, as `key: old -> new` lines (said aloud by the caller).
pub(super) fn check_resume_config(run_dir: &Path, now: &TrainConfig) -> Result<Vec<String>> {
    let p = run_dir.join(RESOLVED_CONFIG);
    if !p.is_file() {
        return Ok(vec![]);
    }
    let saved = crate::config::read_table(&p)?;
    let allowed: Vec<String> = differences(&saved, &now.to_table()?)
        .into_iter()
        .filter(|(k, _)| RESUME_MAY_CHANGE.contains(&k.as_str()))
        .map(|(_, d)| d)
        .collect();
    let diffs: Vec<String> = differences(&saved, &now.to_table()?)
        .into_iter()
        .filter(|(k, _)| !RESUME_MAY_CHANGE.contains(&k.as_str()) && k != "data.shards")
        .map(|(_, d)| d)
        .collect();
    if !diffs.is_empty() {
        bail!(
            "--resume: the settings differ from those {} was started with:\n  {}\nresume with the same settings (only {} may change), or start a new run folder",
            run_dir.display(),
            diffs.join("\n  "),
            RESUME_MAY_CHANGE.join(", ")
        );
    }
    Ok(allowed)
}
