//! `train`: stage two of taesd-rs — train TAESD encoders/decoders with candle from the Parquet
//! shards `precompute` wrote, plus evaluation, previews and checkpoint conversion.
//!
//! * [`recipe`]: the training step itself (losses, discriminator, optimisers, EMA, replay buffer)
//!   and its complete, resumable state.
pub mod recipe;
