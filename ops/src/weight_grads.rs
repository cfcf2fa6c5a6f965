//! Weight gradients outside candle's graph.
//!
//! candle's backprop gives every graph edge a zero-filled gradient buffer and adds each
//! contribution into it. A trained weight reaches a convolution through a cast (f32 master weights,
//! bf16 activations), a permute (NHWC's filter layout) and, in a fused block, a flatten and a
//! concatenation: four or five edges, each a memset and an add (some strided, with a host-to-device
//! copy of its strides), per weight and step — about a third of a training step's ~5,000 launches
//! on the H100, where the host, not the GPU, had become the limit.
//!
//! While a [`WeightGrads`] collector is active on the thread ([`WeightGrads::activate`]), the ops
//! take the weights that are candle variables off the graph: they compute with detached copies
//! in the compute dtype and layout, keep the variables only as graph inputs that get no gradient
//! (so that the op is still in the graph when its activation input is not), and their backward adds
//! each weight's gradient (f32, the variable's own layout and shape) into the collector, summed over
//! the weight's uses. The caller reads them next to candle's `GradStore`, which no longer has them.
//! The sums are the same as the graph's (each contribution converted the same way; the graph's
//! first add is onto zeros): equal bit for bit (`model/tests/weight_grads.rs`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Result, Tensor, TensorId};

/// A collector of weight gradients, shared by the ops that captured it at their forward.
#[derive(Clone, Default)]
pub struct WeightGrads(Arc<Mutex<HashMap<TensorId, Tensor>>>);

thread_local! {
    static ACTIVE: RefCell<Option<WeightGrads>> = const { RefCell::new(None) };
}

/// Keeps a collector active; dropping it restores the one active before.
pub struct Active {
    prev: Option<WeightGrads>,
}

impl Drop for Active {
    fn drop(&mut self) {
        ACTIVE.with(|a| *a.borrow_mut() = self.prev.take());
    }
}

impl WeightGrads {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes this collector the one the ops on this thread use, until the guard drops. Ops
    /// capture it at their forward: activate it before the forward whose backward it collects.
    pub fn activate(&self) -> Active {
        let prev = ACTIVE.with(|a| a.borrow_mut().replace(self.clone()));
        Active { prev }
    }

    /// Adds `g` (converted to f32) to the gradient collected for `id`.
    pub(crate) fn add(&self, id: TensorId, g: &Tensor) -> Result<()> {
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        let mut m = self.0.lock().unwrap();
        let sum = match m.remove(&id) {
            Some(old) => (old + g)?,
            None => g,
        };
        m.insert(id, sum);
        Ok(())
    }

    /// The gradient collected for `w` (f32, `w`'s shape), if any.
    pub fn get(&self, w: &Tensor) -> Option<Tensor> {
        self.0.lock().unwrap().get(&w.id()).cloned()
    }

    /// How many weights have a gradient.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The active collector when every one of `ws` is a variable (weights the ops then take off the
/// graph); `None` otherwise.
pub(crate) fn collector_for(ws: &[&Tensor]) -> Option<WeightGrads> {
    if ws.is_empty() || !ws.iter().all(|w| w.is_variable()) {
        return None;
    }
    ACTIVE.with(|a| a.borrow().clone())
}
