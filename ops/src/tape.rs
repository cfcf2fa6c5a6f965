//! Activation gradients off candle's graph: a run of taesd-ops as one graph node.
//!
//! candle's backprop gives every edge of its graph a zero-filled gradient buffer and adds the
//! edge's gradient into it: for an activation that one op makes and one op reads, a memset and a
//! full-size add that change nothing. On the H100 those adds (`badd`) were a quarter of a
//! training step's GPU time (256x256, batch 32: ~24 of 95 ms) and a fifth of its launches.
//! [`crate::WeightGrads`] took the weights' edges off the graph; this takes the activations'.
//!
//! Inside [`taped`] (while taping is on: [`enable_taping`]) the ops compute on detached tensors
//! and record themselves on a tape: their op, inputs, output. The run's result enters candle's
//! graph as one node whose backward walks the tape in reverse, handing each op's input gradient
//! to its producer directly (an add only where a tensor has two readers). The node's inputs are
//! the run's input and one weight variable of its ops (so that the node is in the graph when the
//! input is not); the weights' gradients go to the active [`crate::WeightGrads`] as before.
//!
//! Only taesd-ops record. Code that runs candle's own ops inside a taped run goes in
//! [`outside`] (the run is closed at its input and reopened at its result); an op given an
//! activation that no taped op made fails at its forward, so a forgotten `outside` is an error,
//! never a lost gradient. An op whose weights need a gradient through candle's graph (not taken
//! off by a `WeightGrads` collector) runs outside by itself.
//!
//! The gradients are the graph's: each op's backward is the same function, and the graph's
//! first add onto zeros is exact (a zero's sign aside). `model/tests/tape.rs` compares them.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, TensorId};

use crate::settings::settings;

/// An op's backward on the tape: its output, the output's gradient and, per activation input,
/// whether its gradient is wanted -> the activation inputs' gradients.
pub(crate) type Backward = Box<dyn Fn(&Tensor, &Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync>;

struct Entry {
    inputs: Vec<TensorId>,
    output: TensorId,
    /// The output, for the backward; `None` for the run's last op, whose output is the graph
    /// node's (the node's forward copies it, and the original is freed).
    y: Option<Tensor>,
    backward: Backward,
}

/// An open run: its graph input, the detached tensor the ops continue from, what they recorded.
struct Segment {
    graph_input: Tensor,
    input: TensorId,
    /// Tensors of this run: its input and every recorded output.
    known: HashSet<TensorId>,
    entries: Vec<Entry>,
    /// The first weight variable an op took off the graph.
    anchor: Option<Tensor>,
}

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(false) };
    static OPEN: RefCell<Option<Segment>> = const { RefCell::new(None) };
}

/// Keeps taping on; dropping it restores the state before.
pub struct Taping {
    prev: bool,
}

impl Drop for Taping {
    fn drop(&mut self) {
        ENABLED.with(|e| e.set(self.prev));
    }
}

/// Turns taping on for this thread (unless [`crate::Settings::tape`] is off) until the guard
/// drops: [`taped`] runs record. A training step turns it on around its forward passes.
pub fn enable_taping() -> Taping {
    let prev = ENABLED.with(|e| e.replace(settings().tape));
    Taping { prev }
}

/// Whether a [`taped`] run is open on this thread.
pub(crate) fn is_open() -> bool {
    OPEN.with(|o| o.borrow().is_some())
}

/// `f(x)`, its taesd-ops recorded on a tape and the result one graph node (see the module
/// docs). Without taping on, inside another run, or on a device without the ops' kernels:
/// `f(x)` as it is.
pub fn taped(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    if !ENABLED.with(|e| e.get()) || is_open() || !crate::block_on(x.device()) {
        return f(x);
    }
    let xd = open(x);
    let r = f(&xd);
    let seg = OPEN.with(|o| o.borrow_mut().take()).expect("the run opened above");
    seg.close(&r?)
}

/// `f(x)` on candle's graph inside a [`taped`] run: the run is closed at `x` (which must be the
/// latest tensor it made) and reopened at `f`'s result. Outside a run, `f(x)`.
pub fn outside(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let Some(seg) = OPEN.with(|o| o.borrow_mut().take()) else {
        return f(x);
    };
    let xg = seg.close(x)?;
    let y = f(&xg)?;
    Ok(open(&y))
}

fn open(x: &Tensor) -> Tensor {
    let xd = x.detach();
    OPEN.with(|o| {
        *o.borrow_mut() = Some(Segment {
            graph_input: x.clone(),
            input: xd.id(),
            known: HashSet::from([xd.id()]),
            entries: Vec::new(),
            anchor: None,
        })
    });
    xd
}

/// Records an op of the open run: `acts` its activation inputs, `weights` its other inputs
/// (variables among them must have been taken off the graph by the op), `out` its result.
pub(crate) fn record(
    name: &str,
    acts: &[&Tensor],
    weights: &[&Tensor],
    out: &Tensor,
    backward: Backward,
) -> Result<()> {
    OPEN.with(|o| {
        let mut o = o.borrow_mut();
        let seg = o.as_mut().expect("record() inside an open run");
        if let Some(a) = acts.iter().find(|a| !seg.known.contains(&a.id())) {
            bail!(
                "taesd-ops tape: {name} got an activation {:?} that no taped op made (candle ops inside a \
                 taped run belong in taesd_ops::outside)",
                a.dims()
            );
        }
        if seg.anchor.is_none() {
            seg.anchor = weights.iter().find(|w| w.is_variable()).map(|w| (*w).clone());
        }
        seg.known.insert(out.id());
        seg.entries.push(Entry {
            inputs: acts.iter().map(|a| a.id()).collect(),
            output: out.id(),
            y: Some(out.clone()),
            backward,
        });
        Ok(())
    })
}

impl Segment {
    /// The graph tensor equal to `h`, the run's result.
    fn close(mut self, h: &Tensor) -> Result<Tensor> {
        if h.id() == self.input {
            return Ok(self.graph_input);
        }
        if self.entries.last().map(|e| e.output) != Some(h.id()) {
            bail!("taesd-ops tape: a taped run must end with the tensor its last op made ({:?})", h.dims());
        }
        let input_wanted = self.graph_input.track_op();
        if !input_wanted && self.anchor.is_none() {
            // Nothing in it needs a gradient.
            return Ok(h.clone());
        }
        if let Some(last) = self.entries.last_mut() {
            last.y = None;
        }
        let node = TapeNode {
            entries: Mutex::new(self.entries),
            input: self.input,
            input_wanted,
            output: h.id(),
            out: Mutex::new(Some(h.clone())),
        };
        match self.anchor {
            Some(a) => self.graph_input.apply_op2_arc(&a, Arc::new(Box::new(node))),
            None => self.graph_input.apply_op1_arc(Arc::new(Box::new(node))),
        }
    }
}

/// The graph node of a closed run: its forward hands out a copy of the result (and lets the
/// original go), its backward walks the tape.
struct TapeNode {
    /// Taken by the backward, which lets each entry (its output, and the inputs its backward
    /// holds) go once its gradient is handed on, as PyTorch frees a node's saved tensors: the
    /// run's activations do not all live until the whole graph is dropped.
    entries: Mutex<Vec<Entry>>,
    input: TensorId,
    input_wanted: bool,
    output: TensorId,
    /// The result, until the forward has copied it.
    out: Mutex<Option<Tensor>>,
}

impl TapeNode {
    fn take_out(&self) -> Result<Tensor> {
        match self.out.lock().unwrap().take() {
            Some(t) => Ok(t),
            None => bail!("taesd-ops tape: a taped run's node ran its forward twice"),
        }
    }

    fn fwd_cpu(&self) -> Result<(CpuStorage, Shape)> {
        crate::cpu::to_storage(&self.take_out()?)
    }

    #[cfg(feature = "cuda")]
    fn fwd_cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let out = self.take_out()?;
        let c = crate::cuda::Cuda::of(&out)?;
        Ok((c.storage().try_clone(c.layout)?, out.shape().clone()))
    }

    /// The run input's gradient, from the result `res` and its gradient.
    fn backward(&self, res: &Tensor, dres: &Tensor) -> Result<Option<Tensor>> {
        let mut entries = std::mem::take(&mut *self.entries.lock().unwrap());
        if entries.is_empty() {
            bail!("taesd-ops tape: a taped run backpropagated twice (its tape is freed by the first backward)");
        }
        let mut grads: HashMap<TensorId, Tensor> = HashMap::from([(self.output, dres.clone())]);
        // Last op first; each entry is dropped at the end of its iteration.
        while let Some(e) = entries.pop() {
            let Some(dy) = grads.remove(&e.output) else {
                continue;
            };
            let wanted: Vec<bool> = e.inputs.iter().map(|id| *id != self.input || self.input_wanted).collect();
            let gs = (e.backward)(e.y.as_ref().unwrap_or(res), &dy, &wanted)?;
            for ((id, g), w) in e.inputs.iter().zip(gs).zip(&wanted) {
                let (Some(g), true) = (g, *w) else { continue };
                let sum = match grads.remove(id) {
                    Some(prev) => (prev + g)?,
                    None => g,
                };
                grads.insert(*id, sum);
            }
        }
        let dx = grads.remove(&self.input);
        if !grads.is_empty() {
            bail!("taesd-ops tape: {} gradients reached no taped op", grads.len());
        }
        Ok(dx.filter(|_| self.input_wanted))
    }
}

impl CustomOp1 for TapeNode {
    fn name(&self) -> &'static str {
        "taesd-taped-run"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.fwd_cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.fwd_cuda()
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, dres: &Tensor) -> Result<Option<Tensor>> {
        self.backward(res, dres)
    }
}

impl CustomOp2 for TapeNode {
    fn name(&self) -> &'static str {
        "taesd-taped-run"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.fwd_cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.fwd_cuda()
    }

    /// The anchor variable gets no gradient (the ops gave theirs to the collector).
    fn bwd(
        &self,
        _x: &Tensor,
        _anchor: &Tensor,
        res: &Tensor,
        dres: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((self.backward(res, dres)?, None))
    }
}
