//! `train`: stage two of taesd-rs — train TAESD encoders/decoders with candle from the Parquet
//! shards `precompute` wrote, plus evaluation, previews and checkpoint conversion.
//!
//! * [`recipe`]: the training step itself (losses, discriminator, optimisers, EMA, replay buffer)
//!   and its complete, resumable state.
//! * [`config`]: the run configuration (TOML, overrides, sweeps).
//! * [`dataset`], [`order`], [`sample`], [`split`], [`loader`]: the deterministic streaming loader.
//! * [`device`], [`rng`]: `--device` parsing; seeded randomness of the data pipeline.
//! * [`dist`]: data-parallel training over processes (`--gpus N`, torchrun, Slurm): ranks,
//!   rendezvous, the TCP and NCCL collectives, failure propagation.
//! * [`export`], [`tensorboard`], [`report`]: what other tools read: `.pth` / ONNX exports,
//!   TensorBoard event files, the one-page `report.html`.
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod convert;
pub mod dataset;
pub mod decode;
pub mod device;
pub mod dist;
pub mod encode;
pub mod eval;
pub mod export;
pub mod font;
pub mod host_profile;
pub mod loader;
pub mod metrics;
pub mod models;
pub mod order;
pub mod plot;
pub mod preview;
pub mod recipe;
pub mod report;
pub mod rng;
pub mod runner;
pub mod sample;
pub mod split;
pub mod svg;
pub mod switches;
pub mod tensorboard;
#[cfg(test)]
mod testing;
