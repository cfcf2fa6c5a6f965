//! CPU implementations: candle's own CPU ops where one exists (convolutions), plain f32 loops
//! otherwise, with the same arithmetic as the CUDA kernels (f32, one rounding on store).

use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, Shape, Tensor};

use crate::conv::{Act, ConvParams};

/// A CPU storage region as a (contiguous, CPU) tensor.
pub(crate) fn to_tensor(s: &CpuStorage, l: &Layout) -> Result<Tensor> {
    fn go<T: candle_core::WithDType>(v: &[T], l: &Layout) -> Result<Tensor> {
        match l.contiguous_offsets() {
            Some((a, b)) => Tensor::from_slice(&v[a..b], l.shape(), &Device::Cpu),
            None => {
                let data: Vec<T> = strided(l).into_iter().map(|i| v[i]).collect();
                Tensor::from_vec(data, l.shape(), &Device::Cpu)
            }
        }
    }
    match s {
        CpuStorage::F32(v) => go(v, l),
        CpuStorage::F64(v) => go(v, l),
        CpuStorage::BF16(v) => go(v, l),
        CpuStorage::F16(v) => go(v, l),
        _ => bail!("taesd-ops: unsupported dtype (f32, f64, bf16, f16 only)"),
    }
}

/// The storage positions of a layout's elements, in row-major order.
fn strided(l: &Layout) -> Vec<usize> {
    let (dims, stride) = (l.dims(), l.stride());
    let mut idx = vec![l.start_offset()];
    for (&d, &s) in dims.iter().zip(stride) {
        idx = idx.iter().flat_map(|&b| (0..d).map(move |i| b + i * s)).collect();
    }
    idx
}

/// A CPU tensor's elements as a fresh storage, with its shape.
pub(crate) fn to_storage(t: &Tensor) -> Result<(CpuStorage, Shape)> {
    let flat = t.flatten_all()?;
    let s = match t.dtype() {
        DType::F32 => CpuStorage::F32(flat.to_vec1()?),
        DType::F64 => CpuStorage::F64(flat.to_vec1()?),
        DType::BF16 => CpuStorage::BF16(flat.to_vec1()?),
        DType::F16 => CpuStorage::F16(flat.to_vec1()?),
        d => bail!("taesd-ops: unsupported dtype {d:?}"),
    };
    Ok((s, t.shape().clone()))
}

/// Elements as f32 (a copy), and back to `dtype` (round to nearest even).
pub(crate) fn f32s(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

/// Elements as f64 (the bias/ReLU epilogue: exact for f32 and f64 data, one rounding on store).
pub(crate) fn f64s(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()
}

pub(crate) fn from_f64s(v: Vec<f64>, shape: &Shape, dtype: DType) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
}

pub(crate) fn from_f32s(v: Vec<f32>, shape: &Shape, dtype: DType) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
}

fn relu<F: PartialOrd + Default>(v: F) -> F {
    // Keeps NaN, as torch.relu and the CUDA kernel.
    if v < F::default() {
        F::default()
    } else {
        v
    }
}

/// Half-precision (bf16, f16) operands of a convolution are widened to f32 and the result is
/// rounded once on store: what tensor-core convolutions compute (exact products, f32 sums).
/// (candle's CPU matmul has no bf16 kernel.) Other dtypes pass through.
fn widen(t: &Tensor) -> Result<Tensor> {
    match t.dtype() {
        DType::BF16 | DType::F16 => t.to_dtype(DType::F32),
        _ => Ok(t.clone()),
    }
}

/// `act(conv(x, w) + b)` with candle's CPU convolution.
pub(crate) fn conv_fwd(x: &Tensor, w: &Tensor, b: Option<&Tensor>, p: ConvParams, act: Act) -> Result<Tensor> {
    let dt = x.dtype();
    let y = widen(x)?.conv2d(&widen(w)?, p.padding, p.stride, 1, 1)?;
    if b.is_none() && act == Act::None {
        return y.to_dtype(dt);
    }
    let (_, c, h, wd) = y.dims4()?;
    let hw = h * wd;
    let mut v = f64s(&y)?;
    let bias = match b {
        Some(b) => f64s(b)?,
        None => vec![0.0; c],
    };
    for (i, e) in v.iter_mut().enumerate() {
        let z = *e + bias[(i / hw) % c];
        *e = if act == Act::Relu { relu(z) } else { z };
    }
    from_f64s(v, y.shape(), dt)
}

/// Backward of `act(z + b)` given the output `y` and its gradient: (dz, db). `dz` is `dy`
/// itself without ReLU.
pub(crate) fn act_bias_bwd(dy: &Tensor, y: &Tensor, act: Act, bias: bool) -> Result<(Tensor, Option<Tensor>)> {
    let (n, c, h, w) = dy.dims4()?;
    let hw = h * w;
    let dz = if act == Act::Relu {
        let g = f64s(dy)?;
        let yv = f64s(y)?;
        let v = g.iter().zip(&yv).map(|(&g, &y)| if y > 0.0 { g } else { 0.0 }).collect();
        from_f64s(v, dy.shape(), dy.dtype())?
    } else {
        dy.clone()
    };
    let db = if bias {
        // Per plane, then over the batch in order (the CUDA kernel's order), in f64.
        let g = f64s(&dz)?;
        let mut partial = vec![0f64; n * c];
        for (p, s) in partial.iter_mut().enumerate() {
            *s = g[p * hw..(p + 1) * hw].iter().sum();
        }
        let mut db = vec![0f64; c];
        for (j, d) in db.iter_mut().enumerate() {
            for k in 0..n {
                *d += partial[k * c + j];
            }
        }
        Some(from_f64s(db, &Shape::from(c), dy.dtype())?)
    } else {
        None
    };
    Ok((dz, db))
}

/// The input gradient of a convolution: a stride-1 conv2d of `dz` (zero-inserted for stride > 1,
/// zero-padded) with the weight transposed (in/out) and flipped. candle's backprop uses
/// `conv_transpose2d`, whose CPU kernel is a naive loop (~50x slower); the result is the same sum
/// in another order. Falls back to `conv_transpose2d` when padding exceeds `k - 1`.
pub(crate) fn conv_bwd_data(dz: &Tensor, w: &Tensor, x_dims: &[usize], p: ConvParams) -> Result<Tensor> {
    conv_bwd_data_wide(&widen(dz)?, &widen(w)?, x_dims, p)?.to_dtype(dz.dtype())
}

fn conv_bwd_data_wide(dz: &Tensor, w: &Tensor, x_dims: &[usize], p: ConvParams) -> Result<Tensor> {
    let (_, _, ho, wo) = dz.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    let (h, wd) = (x_dims[2], x_dims[3]);
    let s = p.stride;
    let (hd, wdd) = ((ho - 1) * s + 1, (wo - 1) * s + 1);
    let pads = |k: usize, full: usize, dil: usize| -> Option<(usize, usize)> {
        let left = (k - 1).checked_sub(p.padding)?;
        let right = (full + k - 1).checked_sub(dil + left)?;
        Some((left, right))
    };
    let (Some((t, b)), Some((l, r))) = (pads(kh, h, hd), pads(kw, wd, wdd)) else {
        return conv_bwd_data_transposed(dz, w, x_dims, p);
    };
    let mut g = dz.contiguous()?;
    if s > 1 {
        let (n, c, _, _) = g.dims4()?;
        g = g
            .reshape((n, c, ho, 1, wo, 1))?
            .pad_with_zeros(3, 0, s - 1)?
            .pad_with_zeros(5, 0, s - 1)?
            .reshape((n, c, ho * s, wo * s))?
            .narrow(2, 0, hd)?
            .narrow(3, 0, wdd)?;
    }
    let g = g.pad_with_zeros(2, t, b)?.pad_with_zeros(3, l, r)?;
    let wf = w.transpose(0, 1)?.contiguous()?.flip(&[2, 3])?;
    g.conv2d(&wf, 0, 1, 1, 1)
}

/// The input gradient exactly as candle's backprop computes it (`conv_transpose2d`).
pub(crate) fn conv_bwd_data_transposed(dz: &Tensor, w: &Tensor, x_dims: &[usize], p: ConvParams) -> Result<Tensor> {
    let grad_h = dz.dim(2)?;
    let k_h = w.dim(2)?;
    let out_size = (grad_h - 1) * p.stride + (k_h - 1) + 1 - 2 * p.padding;
    let out_padding = x_dims[2] - out_size;
    dz.conv_transpose2d(w, p.padding, out_padding, p.stride, 1)
}

/// The weight gradient of a convolution, as candle's backprop computes it.
pub(crate) fn conv_bwd_filter(x: &Tensor, dz: &Tensor, w_dims: &[usize], p: ConvParams) -> Result<Tensor> {
    let g = widen(x)?
        .transpose(0, 1)?
        .conv2d(&widen(dz)?.transpose(0, 1)?, p.padding, 1, p.stride, 1)?
        .transpose(0, 1)?
        .to_dtype(x.dtype())?;
    let (_, _, g0, g1) = g.dims4()?;
    let g = if g0 != w_dims[2] || g1 != w_dims[3] { g.narrow(2, 0, w_dims[2])?.narrow(3, 0, w_dims[3])? } else { g };
    g.contiguous()
}

pub(crate) fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let av = f32s(a)?;
    let bv = f32s(b)?;
    let v = av.iter().zip(&bv).map(|(&a, &b)| relu(a + b)).collect();
    from_f32s(v, a.shape(), a.dtype())
}

pub(crate) fn relu_bwd(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    let g = f32s(dy)?;
    let yv = f32s(y)?;
    let v = g.iter().zip(&yv).map(|(&g, &y)| if y > 0.0 { g } else { 0.0 }).collect();
    from_f32s(v, dy.shape(), dy.dtype())
}

/// Nearest 2x upsample (candle's own CPU op).
pub(crate) fn upsample2x(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    x.upsample_nearest2d(2 * h, 2 * w)
}

/// Its backward: sum of each 2x2 block, as a reshape + sum, in f32 then rounded once.
pub(crate) fn downsum2x(dy: &Tensor) -> Result<Tensor> {
    let (n, c, h2, w2) = dy.dims4()?;
    let (h, w) = (h2 / 2, w2 / 2);
    dy.to_dtype(DType::F32)?.reshape((n, c, h, 2, w, 2))?.sum(5)?.sum(3)?.to_dtype(dy.dtype())
}
