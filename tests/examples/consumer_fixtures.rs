//! Fixtures for the check of our exports with real torch, taesd.py and diffusers on the GPU
//! machine (bench/gpu_torch_consumers.sh, made by bench/prepare_torch_consumers.sh):
//!
//!   cargo run -p taesd-e2e --example consumer_fixtures -- OUT
//!
//! Per variant, `OUT/<variant>/`: our `.pth` pair (the writer of `train export --format pth` and
//! of a run's `export/taesd/`), the diffusers folder where AutoencoderTiny can hold the variant,
//! `image.npy` (the non-square parity photo of ../shared, `[1, 3, 192, 128]` in [0, 1]),
//! `latent.npy` (candle's encoder of it) and `decoded.npy` (candle's decoder of that latent), and
//! `model/` (the safetensors they all come from). Weights: the released taef2 and taesana encoder,
//! seeded random ones elsewhere. `OUT/fixtures.json` lists the variants.

use candle_core::{DType, Device, Module};
use taesd::{FileFormat, Layout, SaveOptions, Taesd, Variant};
use taesd_e2e::{model_folder, parity, write_npy};

fn main() {
    let out = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: consumer_fixtures OUT"));
    std::fs::create_dir_all(&out).unwrap();
    let image = parity()["image_b"].clone();
    let mut variants = Vec::new();
    for v in Variant::ALL {
        let dir = out.join(v.name());
        let model = model_folder(v, &dir.join("model-src"));
        std::fs::rename(&model, dir.join("model")).unwrap();
        std::fs::remove_dir_all(dir.join("model-src")).unwrap();
        let ck = taesd::load_checkpoint(dir.join("model"), Some(v)).unwrap();
        let pth = SaveOptions { variant: Some(v), format: FileFormat::Pth, ..Default::default() };
        let files = ck.save(Layout::TaesdPy, &dir, &pth).unwrap();
        if v.diffusers_supported() {
            ck.save(Layout::Diffusers, dir.join("diffusers"), &SaveOptions { variant: Some(v), ..Default::default() }).unwrap();
        }
        let m = Taesd::from_checkpoint(&ck, DType::F32, &Device::Cpu).unwrap();
        let z = m.encoder.as_ref().unwrap().forward(&image).unwrap();
        let y = m.decoder.as_ref().unwrap().forward(&z).unwrap();
        write_npy(&dir.join("image.npy"), &image);
        write_npy(&dir.join("latent.npy"), &z);
        write_npy(&dir.join("decoded.npy"), &y);
        println!("{v}: {} + image {:?} -> latent {:?} -> {:?}", files.iter().map(|f| f.file_name().unwrap().to_string_lossy()).collect::<Vec<_>>().join(", "), image.dims(), z.dims(), y.dims());
        variants.push(v.name());
    }
    let manifest = serde_json::json!({
        "variants": variants,
        "image": "../shared/reference/taef2/taef2_parity.safetensors image_b",
        "weights": "released taef2 (encoder, decoder) and taesana encoder; seeded random elsewhere",
        "made_by": format!("taesd-rs {} consumer_fixtures", env!("CARGO_PKG_VERSION")),
    });
    std::fs::write(out.join("fixtures.json"), serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
    println!("wrote {}", out.display());
}
