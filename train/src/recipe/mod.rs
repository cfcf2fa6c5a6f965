//! The training recipe: one optimisation step of encoder and decoder, and all the state it keeps.
//!
//! * [`config`]: [`RecipeConfig`], every hyperparameter with the recipe's defaults.
//! * [`precision`]: [`Precision`] (f32, tf32, bf16 mixed precision) and its one dtype convention.
//! * [`optim`]: Adam / AMSGrad / AdamW (PyTorch's update rules), propose-then-commit.
//! * [`ema`]: the EMA copy of the weights.
//! * [`disc`]: seraena's conditional patch discriminator (functional BatchNorm).
//! * [`replay`]: the replay buffer of past fakes (f16 on the training device).
//! * [`losses`]: MSE/L1, the low-resolution MSE, the DFT-amplitude term, the correction.
//! * [`state`]: the saved-state folder format.
//! * [`engine`]: [`Recipe`] (what a run trains and keeps), its accessors, models and export.
//! * [`init`]: building a [`Recipe`] (fresh or loaded weights, optimisers, discriminator).
//! * [`step`]: one training step, phase by phase (encoder, discriminator, correction, decoder,
//!   guard, commit).
//! * [`terms`]: the decoder's loss as a table of named, weighted terms.
//! * [`persist`]: saving and loading the complete state.
//! * `dist`: data-parallel training (gradients averaged over the ranks, the guard agreed).
//! * [`profile`]: per-phase time and memory of profiled steps.
//!
//! ```no_run
//! # use train::recipe::*;
//! # fn main() -> anyhow::Result<()> {
//! let dev = candle_core::Device::Cpu;
//! let cfg = RecipeConfig::default();
//! let init = ModelInit { encoder: None, decoder: Some("taesd_decoder.pth".into()) };
//! let mut recipe = Recipe::new(&cfg, taesd::Variant::Taesd.config(), &init, &dev, 0)?;
//! # let batch: Batch = unimplemented!();
//! let report = recipe.step(&batch)?;
//! if let Some(why) = &report.skipped { eprintln!("step {} skipped: {why}", report.step); }
//! recipe.export(taesd::Layout::TaesdPy, std::path::Path::new("out/taesd"), Some(taesd::Variant::Taesd))?;
//! # Ok(()) }
//! ```

pub mod config;
pub mod disc;
mod dist;
pub mod ema;
pub mod engine;
mod init;
pub mod losses;
pub mod optim;
mod persist;
pub mod precision;
pub mod profile;
pub mod replay;
pub mod state;
mod step;
pub mod terms;

#[cfg(test)]
mod tests;

pub use config::{EncoderLoss, LrSchedule, OptimizerKind, RecipeConfig, ReplayDtype};
pub use disc::{BnStats, DiscConfig, Discriminator};
pub use engine::{Batch, EmaProbe, ModelInit, Recipe, StepReport};
pub use precision::Precision;
pub use profile::Profile;
