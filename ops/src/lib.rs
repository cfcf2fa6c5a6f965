//! Training ops for TAESD in candle, fast on CUDA and exact on the CPU.
//!
//! - [`conv2d_act`]: `act(conv2d(x, w) + b)` as one custom op with its backward; on CUDA (feature
//!   `cudnn`) forward, backward-data and backward-filter call cuDNN with cached descriptors,
//!   algorithm and workspace per shape; on the CPU candle's own convolution forward and a
//!   conv2d-based backward (see [`cpu`](crate::conv_bwd_data)).
//! - [`upsample_nearest2x`]: nearest 2x upsampling whose backward sums 2x2 blocks.
//! - [`add_relu`]: `relu(a + b)`, the TAESD block's residual, backward from the output.
//! - [`block`]: the whole TAESD residual block as one graph node (the same pieces, a hand-written
//!   backward: no per-node gradient buffers inside the block).
//! - [`batch_norm_relu_train`]: training-mode BatchNorm + ReLU on cuDNN (CUDA only; `None`
//!   elsewhere, where callers keep their plain-op formulation).
//! - [`Format`]: every op takes NCHW or NHWC ("channels last", cuDNN's native layout on the
//!   H100; [`preferred_format`] on CUDA) activations.
//! - [`WeightGrads`]: weight gradients collected by the ops' backward, off candle's graph.
//! - [`taped`]: a run of these ops as one graph node (activation gradients off candle's graph;
//!   [`outside`] for candle's own ops inside a run).
//! - [`adam_update`]: one fused Adam / AMSGrad / AdamW update over flat f32 buffers.
//! - [`tune_device`]: a CUDA device set up for training (freed memory kept cached, no
//!   per-allocation events).
//!
//! Features: `cuda` (our PTX kernels: bias/ReLU, upsample, Adam), `cudnn` (conv2d through cuDNN;
//! without it conv2d on CUDA uses candle's stock ops). Other devices use candle's stock ops.

mod adam;
mod batch_norm;
mod block;
mod conv;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod device;
mod elementwise;
mod format;
mod settings;
mod tape;
mod weight_grads;

pub use adam::{adam_update, AdamOut, AdamStep};
pub use batch_norm::{batch_norm_relu_train, batch_norm_train_act, channel_affine, group_norm_relu, BnOut};
pub use block::{block, block_on, BlockParams};
pub use conv::{act_bias_bwd, conv2d, conv2d_act, conv_bwd_data, conv_bwd_filter, fast_device, stock, Act, ConvParams};
pub use device::tune_device;
pub use elementwise::{add_relu, downsum2x, kernels_on, relu_bwd, upsample_nearest2x};
pub use format::{preferred_format, Format};
pub use settings::{
    log_algorithms, set_log_algorithms, set_settings, settings, update_settings, AlgoSearch, F32Math, Settings,
};
pub use tape::{enable_taping, outside, taped, Taping};
pub use weight_grads::{Active as WeightGradsActive, WeightGrads};

/// Drops this thread's cached cuDNN plans and workspaces (all devices). A no-op without `cudnn`.
pub fn clear_caches() {
    #[cfg(feature = "cudnn")]
    cuda::conv::clear_caches();
}
