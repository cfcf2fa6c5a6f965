//! TAESD's residual block as one graph node: `relu(c2(relu(c1(relu(c0(x))))) + skip(x))`, the
//! three 3x3 convs with bias, `skip` a bias-free 1x1 conv (or the identity).
//!
//! Built from the same convolutions, bias/ReLU epilogues and backward pieces as [`conv2d_act`] and
//! [`add_relu`], so its values and gradients equal those of the composed ops (bit for bit on the
//! CPU: same kernels, same order). What changes is the autograd graph: one node instead of about
//! eight per block. candle's backprop gives every node's input a zero-filled gradient buffer and
//! adds each contribution into it (one read-read-write pass over the activation per edge, 28 ms
//! of a 197 ms training step at 256x256 batch 32 on an H100, bench/results/2026-11-27-*-kprof-*);
//! inside this node the intermediate gradients are simply handed from one backward piece to the
//! next. The weights travel as two packed inputs (a custom op has at most three), cast to the
//! activations' dtype once per block instead of once per tensor.
//!
//! [`conv2d_act`]: crate::conv2d_act

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, TensorId};

use crate::conv::{act_bias_bwd, conv_bwd_data, conv_bwd_filter, conv_op, fast_device, Act, ConvParams};
use crate::cpu;
use crate::elementwise::{add_relu, kernels_on, relu_bwd};
use crate::format::Format;
use crate::tape;
use crate::weight_grads::{collector_for, WeightGrads};

/// The block's parameters: `(weight [C_out, C_in, 3, 3], bias [C_out])` of the three convs, and
/// the skip conv's weight `[C_out, C_in, 1, 1]` when the channel count changes; the activations'
/// format.
pub struct BlockParams<'a> {
    pub convs: [(&'a Tensor, &'a Tensor); 3],
    pub skip: Option<&'a Tensor>,
    pub format: Format,
}

/// The 3x3 convs' and the 1x1 skip's parameters in `f`.
fn p3(f: Format) -> ConvParams {
    ConvParams::new(1, 1).with_format(f)
}

fn p1(f: Format) -> ConvParams {
    ConvParams::new(1, 0).with_format(f)
}

/// Whether [`block`] runs as one node on this device (CPU, or CUDA with the `cudnn` feature).
pub fn block_on(d: &candle_core::Device) -> bool {
    fast_device(d) && kernels_on(d)
}

/// The block's output, in `x`'s dtype (the weights are cast to it, as [`crate::conv2d_act`] does).
pub fn block(x: &Tensor, p: &BlockParams) -> Result<Tensor> {
    if !block_on(x.device()) {
        bail!("taesd-ops block: no fused block on {:?}", x.device());
    }
    let f = p.format;
    let (_, c_in, _, _) = f.nchw(x.dims())?;
    let c_out = p.convs[0].0.dim(0)?;
    for (i, (w, b)) in p.convs.iter().enumerate() {
        let want_in = if i == 0 { c_in } else { c_out };
        if w.dims() != [c_out, want_in, 3, 3] || b.dims() != [c_out] {
            bail!(
                "taesd-ops block: conv {i} has weight {:?} and bias {:?} for {want_in} -> {c_out} channels",
                w.dims(),
                b.dims()
            );
        }
    }
    match p.skip {
        Some(s) if s.dims() != [c_out, c_in, 1, 1] => {
            bail!("taesd-ops block: skip weight {:?} for {c_in} -> {c_out}", s.dims())
        }
        None if c_in != c_out => bail!("taesd-ops block: {c_in} -> {c_out} channels needs a skip conv"),
        _ => {}
    }
    // With a weight-gradient collector active (and variables for weights) the weights stay off
    // the graph (crate::weight_grads): packed detached, their gradients handed to the collector.
    let weights: Vec<&Tensor> = p.convs.iter().map(|(w, _)| *w).chain(p.skip).collect();
    let biases = [p.convs[0].1, p.convs[1].1, p.convs[2].1];
    let grads = collector_for(&weights.iter().chain(&biases).copied().collect::<Vec<_>>());
    let taping = tape::is_open();
    if taping && grads.is_none() && weights.iter().chain(&biases).any(|w| w.track_op()) {
        // Weights whose gradients go through the graph: not recordable on a tape.
        return tape::outside(x, |x| block(x, p));
    }
    let src = |t: &Tensor| if grads.is_some() { t.detach() } else { t.clone() };
    // Pack in the weights' dtype and the format's filter layout, then one cast: the graph keeps
    // the cast's and the pack's backward (gradients in the weights' dtype), as conv2d_act's
    // per-tensor casts did.
    let ws: Vec<Tensor> = weights.iter().map(|w| f.filter(&src(w))?.flatten_all()).collect::<Result<_>>()?;
    let dt = x.dtype();
    let wpack = Tensor::cat(&ws, 0)?.to_dtype(dt)?;
    let bpack = Tensor::cat(&biases.map(src), 0)?.to_dtype(dt)?;
    let layout = Packing { c_in, c_out, skip: p.skip.is_some(), format: f };

    // The forward on detached operands (no graph), its intermediates kept for the backward.
    let xd = x.detach().contiguous()?;
    let (w, b) = layout.unpack(&wpack.detach(), &bpack.detach())?;
    let h0 = conv_op(&xd, &w[0], Some(&b[0]), p3(f), Act::Relu)?;
    let h1 = conv_op(&h0, &w[1], Some(&b[1]), p3(f), Act::Relu)?;
    let h2 = conv_op(&h1, &w[2], Some(&b[2]), p3(f), Act::None)?;
    let s = match &w.get(3) {
        Some(ws) => conv_op(&xd, ws, None, p1(f), Act::None)?,
        None => xd.clone(),
    };
    if !(taping || x.track_op() || wpack.track_op() || bpack.track_op() || grads.is_some()) {
        // No graph (inference): nothing to keep for a backward.
        drop((h0, h1));
        return add_relu(&h2, &s);
    }
    let x = x.contiguous()?;
    let (wd, bd) = (wpack.detach(), bpack.detach());
    if taping {
        // On the tape: the op's inputs are the variables standing in for the weights (sunk) or
        // the detached packs; its forward reads only the kept intermediates.
        let (a, b) = match &grads {
            Some(_) => (weights[0].clone(), biases[0].clone()),
            None => (wd.clone(), bd.clone()),
        };
        let sunk = grads.map(|g| (g, weights.iter().map(|w| w.id()).collect(), biases.map(|b| b.id()).to_vec()));
        let op = Arc::new(BlockOp { layout, saved: Saved { h0, h1, h2, s }, packs: (wd, bd), sunk });
        let y = x.apply_op3_no_bwd(&a, &b, op.as_ref())?;
        let xs = x.clone();
        tape::record(
            "block",
            &[&x],
            &[&a, &b],
            &y,
            Box::new(move |y, dy, want| Ok(vec![op.backward(&xs, want[0], false, y, dy)?.0])),
        )?;
        return Ok(y);
    }
    match grads {
        Some(grads) => {
            // The first conv's variables stand in for the weights (they get no gradient).
            let sunk = Some((grads, weights.iter().map(|w| w.id()).collect(), biases.map(|b| b.id()).to_vec()));
            let op = BlockOp { layout, saved: Saved { h0, h1, h2, s }, packs: (wd, bd), sunk };
            x.apply_op3_arc(weights[0], biases[0], Arc::new(Box::new(op)))
        }
        None => {
            let op = BlockOp { layout, saved: Saved { h0, h1, h2, s }, packs: (wd, bd), sunk: None };
            x.apply_op3_arc(&wpack, &bpack, Arc::new(Box::new(op)))
        }
    }
}

/// Where each conv's weight and bias sit in the packed inputs.
#[derive(Clone, Copy, Debug)]
struct Packing {
    c_in: usize,
    c_out: usize,
    skip: bool,
    format: Format,
}

impl Packing {
    /// The weights' dims in the format's filter layout.
    fn weight_dims(&self) -> Vec<Vec<usize>> {
        let (i, o) = (self.c_in, self.c_out);
        let mut d = vec![(o, i, 3), (o, o, 3), (o, o, 3)];
        if self.skip {
            d.push((o, i, 1));
        }
        d.into_iter()
            .map(|(o, i, k)| match self.format {
                Format::Nchw => vec![o, i, k, k],
                Format::Nhwc => vec![o, k, k, i],
            })
            .collect()
    }

    /// Views of the packed tensors: the weights (3 or 4) and the 3 biases.
    fn unpack(&self, wpack: &Tensor, bpack: &Tensor) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let mut off = 0;
        let mut w = Vec::new();
        for d in self.weight_dims() {
            let n: usize = d.iter().product();
            w.push(wpack.narrow(0, off, n)?.reshape(d.as_slice())?);
            off += n;
        }
        let b = (0..3).map(|i| bpack.narrow(0, i * self.c_out, self.c_out)).collect::<Result<_>>()?;
        Ok((w, b))
    }
}

/// The forward's intermediates: the convs' activations and the skip branch.
struct Saved {
    h0: Tensor,
    h1: Tensor,
    h2: Tensor,
    s: Tensor,
}

struct BlockOp {
    layout: Packing,
    saved: Saved,
    /// The packed weights and biases (detached), in the activations' dtype.
    packs: (Tensor, Tensor),
    /// Weights off the graph: the collector and the ids of the weights (conv 0-2, skip) and
    /// biases, in packing order.
    sunk: Option<(WeightGrads, Vec<TensorId>, Vec<TensorId>)>,
}

impl CustomOp3 for BlockOp {
    fn name(&self) -> &'static str {
        "taesd-block"
    }

    /// The last step, `relu(h2 + s)`, from the kept intermediates (the inputs' storages were
    /// already read by the detached forward).
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu::to_storage(&cpu::add_relu(&self.saved.h2, &self.saved.s)?)
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::kernels::add_relu_tensors(&self.saved.h2, &self.saved.s)
    }

    fn bwd(
        &self,
        x: &Tensor,
        wpack: &Tensor,
        bpack: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward(x, x.track_op(), wpack.track_op() || bpack.track_op(), y, dy)
    }
}

impl BlockOp {
    /// `want_x`: whether `x`'s gradient is wanted; `want_packs`: the packed weights' (when not
    /// sunk). Sunk weights' gradients always go to the collector.
    fn backward(
        &self,
        x: &Tensor,
        want_x: bool,
        want_packs: bool,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want_w = self.sunk.is_some() || want_packs;
        if !want_x && !want_w {
            return Ok((None, None, None));
        }
        let Saved { h0, h1, .. } = &self.saved;
        let (w, _) = self.layout.unpack(&self.packs.0, &self.packs.1)?;
        let x = x.detach();
        // relu(h2 + s): the same gradient for both branches.
        let dz = relu_bwd(&dy.contiguous()?, y)?;
        let f = self.layout.format;
        let (dz2, db2) = act_bias_bwd(&dz, &dz, Act::None, want_w, f)?;
        let dh1 = conv_bwd_data(&dz2, &w[2], h1.dims(), p3(f))?;
        let dw2 = want_w.then(|| conv_bwd_filter(h1, &dz2, w[2].dims(), p3(f))).transpose()?;
        let (dz1, db1) = act_bias_bwd(&dh1, h1, Act::Relu, want_w, f)?;
        let dh0 = conv_bwd_data(&dz1, &w[1], h0.dims(), p3(f))?;
        let dw1 = want_w.then(|| conv_bwd_filter(h0, &dz1, w[1].dims(), p3(f))).transpose()?;
        let (dz0, db0) = act_bias_bwd(&dh0, h0, Act::Relu, want_w, f)?;
        let dw0 = want_w.then(|| conv_bwd_filter(&x, &dz0, w[0].dims(), p3(f))).transpose()?;
        let dws = match (w.get(3), want_w) {
            (Some(ws), true) => Some(conv_bwd_filter(&x, &dz, ws.dims(), p1(f))?),
            _ => None,
        };
        let dx = if want_x {
            let main = conv_bwd_data(&dz0, &w[0], x.dims(), p3(f))?;
            let skip = match w.get(3) {
                Some(ws) => conv_bwd_data(&dz, ws, x.dims(), p1(f))?,
                None => dz.clone(),
            };
            Some((main + skip)?)
        } else {
            None
        };
        if let Some((grads, w_ids, b_ids)) = &self.sunk {
            let dws = [dw0, dw1, dw2].into_iter().chain(dws.map(Some));
            for (id, d) in w_ids.iter().zip(dws) {
                grads.add(*id, &f.filter_to_oihw(&d.expect("wanted"))?)?;
            }
            for (id, d) in b_ids.iter().zip([db0, db1, db2]) {
                grads.add(*id, &d.expect("wanted"))?;
            }
            return Ok((dx, None, None));
        }
        let (dwp, dbp) = if want_w {
            let mut parts = vec![
                dw0.expect("wanted").flatten_all()?,
                dw1.expect("wanted").flatten_all()?,
                dw2.expect("wanted").flatten_all()?,
            ];
            if let Some(d) = dws {
                parts.push(d.flatten_all()?);
            }
            let db = [db0, db1, db2]
                .into_iter()
                .map(|d| d.ok_or_else(|| candle_core::Error::Msg("bias gradient".into())))
                .collect::<Result<Vec<_>>>()?;
            (Some(Tensor::cat(&parts, 0)?), Some(Tensor::cat(&db, 0)?))
        } else {
            (None, None)
        };
        Ok((dx, dwp, dbp))
    }
}
