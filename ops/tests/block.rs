//! The fused block (`taesd_ops::block`) against the same block composed of taesd-ops' conv and
//! add-relu ops: values and gradients of the input and of every weight, on the CPU, with f32
//! master weights and f32 or bf16 activations, with and without a skip conv, with a loss that
//! reaches the block's output more than once.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use taesd_ops::{add_relu, block, conv2d_act, Act, BlockParams, ConvParams, Format};

fn randn(rng: &mut ChaCha8Rng, shape: &[usize], scale: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * scale) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

struct Params {
    w: Vec<Var>,
    b: Vec<Var>,
    skip: Option<Var>,
}

impl Params {
    fn new(rng: &mut ChaCha8Rng, c_in: usize, c_out: usize) -> Params {
        let w = (0..3)
            .map(|i| Var::from_tensor(&randn(rng, &[c_out, if i == 0 { c_in } else { c_out }, 3, 3], 0.3)).unwrap())
            .collect();
        let b = (0..3).map(|_| Var::from_tensor(&randn(rng, &[c_out], 0.1)).unwrap()).collect();
        let skip = (c_in != c_out).then(|| Var::from_tensor(&randn(rng, &[c_out, c_in, 1, 1], 0.5)).unwrap());
        Params { w, b, skip }
    }

    fn fused(&self, x: &Tensor) -> Result<Tensor> {
        let p = BlockParams {
            convs: [
                (self.w[0].as_tensor(), self.b[0].as_tensor()),
                (self.w[1].as_tensor(), self.b[1].as_tensor()),
                (self.w[2].as_tensor(), self.b[2].as_tensor()),
            ],
            skip: self.skip.as_ref().map(|s| s.as_tensor()),
            format: Format::Nchw,
        };
        block(x, &p)
    }

    /// model/src/layers.rs's Block::forward with taesd-ops.
    fn composed(&self, x: &Tensor) -> Result<Tensor> {
        let p3 = ConvParams::new(1, 1);
        let h = conv2d_act(x, &self.w[0], Some(&self.b[0]), p3, Act::Relu)?;
        let h = conv2d_act(&h, &self.w[1], Some(&self.b[1]), p3, Act::Relu)?;
        let h = conv2d_act(&h, &self.w[2], Some(&self.b[2]), p3, Act::None)?;
        let s = match &self.skip {
            Some(s) => conv2d_act(x, s, None, ConvParams::new(1, 0), Act::None)?,
            None => x.clone(),
        };
        add_relu(&h, &s)
    }

    fn all(&self) -> Vec<&Var> {
        self.w.iter().chain(&self.b).chain(&self.skip).collect()
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    d.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
}

/// A loss that uses the output twice (a square and a shifted sum), in f32.
fn loss(y: &Tensor) -> Result<Tensor> {
    let y = y.to_dtype(DType::F32)?;
    (y.sqr()?.sum_all()? + (y * 0.7)?.sum_all()?)? / 3.0
}

fn check(c_in: usize, c_out: usize, dt: DType, seed: u64) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let p = Params::new(&mut rng, c_in, c_out);
    let x = Var::from_tensor(&randn(&mut rng, &[2, c_in, 7, 6], 1.0))?;
    let xin = x.as_tensor().to_dtype(dt)?;
    let yf = p.fused(&xin)?;
    let yc = p.composed(&xin)?;
    assert_eq!(yf.dtype(), dt);
    let what = format!("{c_in}->{c_out} {dt:?}");
    assert_eq!(max_abs_diff(&yf, &yc), 0.0, "{what}: outputs");
    let gf = loss(&yf)?.backward()?;
    let gc = loss(&yc)?.backward()?;
    let mut vars = vec![&x];
    vars.extend(p.all());
    for (i, v) in vars.iter().enumerate() {
        let a = gf.get(v.as_tensor()).unwrap_or_else(|| panic!("{what}: no fused gradient for tensor {i}"));
        let b = gc.get(v.as_tensor()).unwrap_or_else(|| panic!("{what}: no composed gradient for tensor {i}"));
        assert_eq!(a.dtype(), DType::F32, "{what}: gradient {i} in the master weights' dtype");
        let d = max_abs_diff(a, b);
        assert_eq!(d, 0.0, "{what}: gradient of tensor {i} (0 = x, then w0..w2, b0..b2, skip) differs by {d:e}");
        assert!(
            b.abs()?.max_all()?.to_scalar::<f32>()? > 0.0,
            "{what}: gradient {i} is all zero: the check would prove nothing"
        );
    }
    Ok(())
}

#[test]
fn fused_block_equals_the_composed_ops_f32() -> Result<()> {
    check(4, 4, DType::F32, 1)?;
    check(3, 5, DType::F32, 2)
}

#[test]
fn fused_block_equals_the_composed_ops_bf16_activations() -> Result<()> {
    check(4, 4, DType::BF16, 3)?;
    check(5, 3, DType::BF16, 4)
}

/// Frozen weights (a generator step through a fixed model): only the input's gradient.
#[test]
fn fused_block_gives_the_input_gradient_alone_for_frozen_weights() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let p = Params::new(&mut rng, 3, 4);
    let frozen = |v: &Var| v.as_tensor().detach();
    let (w, b): (Vec<Tensor>, Vec<Tensor>) = (p.w.iter().map(frozen).collect(), p.b.iter().map(frozen).collect());
    let s = p.skip.as_ref().map(frozen);
    let x = Var::from_tensor(&randn(&mut rng, &[1, 3, 5, 5], 1.0))?;
    let bp =
        BlockParams { convs: [(&w[0], &b[0]), (&w[1], &b[1]), (&w[2], &b[2])], skip: s.as_ref(), format: Format::Nchw };
    let g = loss(&block(x.as_tensor(), &bp)?)?.backward()?;
    let gc = loss(&p.composed(x.as_tensor())?)?.backward()?;
    assert_eq!(max_abs_diff(g.get(x.as_tensor()).unwrap(), gc.get(x.as_tensor()).unwrap()), 0.0);
    assert!(g.get(&w[0]).is_none());
    Ok(())
}

#[test]
fn fused_block_refuses_mismatched_weights() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let p = Params::new(&mut rng, 3, 4);
    let x = randn(&mut rng, &[1, 3, 5, 5], 1.0);
    let bp = BlockParams {
        convs: [
            (p.w[0].as_tensor(), p.b[0].as_tensor()),
            (p.w[1].as_tensor(), p.b[1].as_tensor()),
            (p.w[2].as_tensor(), p.b[2].as_tensor()),
        ],
        skip: None,
        format: Format::Nchw,
    };
    let e = block(&x, &bp).unwrap_err().to_string();
    assert!(e.contains("needs a skip conv"), "{e}");
}
