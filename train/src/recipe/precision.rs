//! The arithmetic of a training step: `f32`, `tf32` or `bf16` (mixed precision).
//!
//! The one convention: **parameters are always f32 (the master weights, their gradients, the
//! optimiser state, the EMA, BatchNorm statistics); a model's compute dtype is the dtype of its
//! input.** A layer casts its f32 weights to the input's dtype on use (taesd-ops' conv does;
//! the cast's backward hands f32 gradients to the weights), so the step only casts the batch
//! on the way in ([`Precision::compute`]) and the outputs on the way out (losses are f32).
//! BatchNorm and GroupNorm normalise in f32 whatever their input.
//!
//! bf16 keeps f32's exponent range, so no loss scaling is needed (fp16 would need it).

use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

/// How a step computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// f32 everywhere, cuDNN convolutions in full fp32 products (FMA): the exact mode, and the
    /// only one on the CPU.
    #[default]
    F32,
    /// f32 tensors, cuDNN convolutions on TF32 tensor cores (10-bit mantissa products, f32
    /// sums), as PyTorch does by default for convolutions.
    Tf32,
    /// bf16 activations and convolutions (tensor cores, f32 accumulation), f32 master weights,
    /// f32 losses and normalisation statistics.
    Bf16,
}

impl Precision {
    pub const NAMES: &'static str = "f32, tf32, bf16";

    pub fn parse(s: &str) -> anyhow::Result<Precision> {
        match s {
            "f32" | "fp32" => Ok(Precision::F32),
            "tf32" => Ok(Precision::Tf32),
            "bf16" => Ok(Precision::Bf16),
            other => anyhow::bail!("precision `{other}`: expected one of {}", Self::NAMES),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }

    /// The dtype of activations.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 | Precision::Tf32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }

    /// `x` in the compute dtype (a no-op in f32 modes).
    pub fn compute(self, x: &Tensor) -> Result<Tensor> {
        x.to_dtype(self.dtype())
    }

    /// The math taesd-ops uses for f32 convolutions in this mode (f32 convolutions are left
    /// only in the f32 modes; bf16 ones always use tensor cores).
    pub fn f32_math(self) -> taesd_ops::F32Math {
        match self {
            Precision::F32 => taesd_ops::F32Math::Exact,
            Precision::Tf32 | Precision::Bf16 => taesd_ops::F32Math::Tf32,
        }
    }

    /// Make taesd-ops' process-wide convolution settings follow this mode.
    pub fn apply_to_ops(self) {
        taesd_ops::update_settings(|s| s.f32_math = self.f32_math());
    }
}

/// `x` as f32 (the dtype losses are computed in).
pub fn to_f32(x: &Tensor) -> Result<Tensor> {
    x.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_names_are_refused() {
        for p in [Precision::F32, Precision::Tf32, Precision::Bf16] {
            assert_eq!(Precision::parse(p.name()).unwrap(), p);
        }
        let e = Precision::parse("fp16").unwrap_err().to_string();
        assert!(e.contains("fp16") && e.contains("bf16"), "{e}");
        assert_eq!(Precision::Bf16.dtype(), DType::BF16);
        assert_eq!(Precision::Tf32.dtype(), DType::F32);
    }
}
