//! Time the pieces of a training step on the CPU (dev tool, not part of the tests).
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let args: Vec<String> = std::env::args().collect();
    let crop: usize = args.get(1).map(|s| s.parse().unwrap()).unwrap_or(64);
    let b: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(4);
    let cfg = taesd::Variant::Taef2.config();
    let vm = VarMap::new();
    let m = taesd::Taesd::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    let x = Tensor::rand(0f32, 1f32, (b, 3, crop, crop), &dev)?;
    let z = Tensor::rand(-1f32, 1f32, (b, 32, crop / 8, crop / 8), &dev)?;
    let t = |name: &str, f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<()> {
        f()?;
        let t0 = Instant::now();
        let n = 3;
        for _ in 0..n {
            f()?;
        }
        println!("{name:<28} {:8.1} ms", t0.elapsed().as_secs_f64() * 1000.0 / n as f64);
        Ok(())
    };
    let enc = m.encoder.clone().unwrap();
    let dec = m.decoder.clone().unwrap();
    t("encoder fwd", &mut || {
        enc.forward(&x)?;
        Ok(())
    })?;
    t("decoder fwd", &mut || {
        dec.forward(&z)?;
        Ok(())
    })?;
    t("encoder fwd+bwd", &mut || {
        let l = enc.forward(&x)?.sqr()?.mean_all()?;
        l.backward()?;
        Ok(())
    })?;
    t("decoder fwd+bwd", &mut || {
        let l = dec.forward(&z)?.sqr()?.mean_all()?;
        l.backward()?;
        Ok(())
    })?;
    let w = Tensor::rand(-0.1f32, 0.1, (64, 64, 3, 3), &dev)?;
    let xi = Tensor::rand(0f32, 1f32, (b, 64, crop, crop), &dev)?;
    t("conv 64->64 fwd", &mut || {
        xi.conv2d(&w, 1, 1, 1, 1)?;
        Ok(())
    })?;
    let wv = candle_core::Var::from_tensor(&w)?;
    let xv = candle_core::Var::from_tensor(&xi)?;
    t("conv 64->64 fwd+bwd", &mut || {
        let l = xv.as_tensor().conv2d(wv.as_tensor(), 1, 1, 1, 1)?.sum_all()?;
        l.backward()?;
        Ok(())
    })?;
    let y = xi.conv2d(&w, 1, 1, 1, 1)?;
    t("conv_transpose 64->64", &mut || {
        y.conv_transpose2d(&w, 1, 0, 1, 1)?;
        Ok(())
    })?;
    let mut recipe = train::recipe::Recipe::new(
        &train::recipe::RecipeConfig { replay_capacity: 64, ..Default::default() },
        cfg,
        &Default::default(),
        &dev,
        0,
    )?;
    let batch = train::recipe::Batch { images: x.clone(), latents: z.clone() };
    t("recipe step", &mut || {
        recipe.step(&batch)?;
        Ok(())
    })?;
    Ok(())
}
