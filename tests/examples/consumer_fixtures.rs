//! Fixtures for the check of our exports with real torch, taesd.py and diffusers on the GPU
//! machine (bench/gpu_torch_consumers.sh, made by bench/prepare_torch_consumers.sh):
//!
//!   cargo run -p taesd-e2e --example consumer_fixtures -- OUT [VARIANT ...]
//!
//! Default variants: all but taesdxl, whose files differ from taesd's only in their name (same
//! structure, and taesd.py's name guess takes the same branch for both), to stay under the
//! device tool's 64 MiB.
//!
//! Per variant, `OUT/<variant>/`: our `.pth` pair (the writer of `train export --format pth` and
//! of a run's `export/taesd/`), the diffusers folder for taesd (AutoencoderTiny's structures
//! differ only in the latent channel count), `image.npy` (the non-square parity photo of
//! ../shared, its top `[1, 3, 96, 64]` in [0, 1]), `latent.npy` (candle's encoder of it) and
//! `decoded.npy` (candle's decoder of that latent). Weights: the released taef2 and taesana
//! encoder, seeded random ones elsewhere; stored float16 (as the released files; it keeps the
//! folder, with the diffusers wheels, under the device tool's 64 MiB) but taesd's encoder in
//! float32 (a run's export dtype), candle computing from the same stored values.
//! `OUT/fixtures.json` lists them.

use candle_core::{DType, Device, Module};
use taesd::{FileFormat, Layout, SaveOptions, Taesd, Variant};
use taesd_e2e::{model_folder, parity, write_npy};

fn main() {
    let mut args = std::env::args().skip(1);
    let out = std::path::PathBuf::from(args.next().expect("usage: consumer_fixtures OUT [VARIANT ...]"));
    let mut wanted: Vec<Variant> =
        args.map(|a| Variant::parse(&a).unwrap_or_else(|| panic!("unknown variant {a}"))).collect();
    if wanted.is_empty() {
        wanted = Variant::ALL.into_iter().filter(|v| *v != Variant::Taesdxl).collect();
    }
    std::fs::create_dir_all(&out).unwrap();
    let image = parity()["image_b"].narrow(2, 0, 96).unwrap().narrow(3, 0, 64).unwrap().contiguous().unwrap();
    let mut variants = Vec::new();
    for v in wanted {
        let dir = out.join(v.name());
        let model = model_folder(v, &dir.join("model-src"));
        std::fs::rename(&model, dir.join("model")).unwrap();
        std::fs::remove_dir_all(dir.join("model-src")).unwrap();
        let mut ck = taesd::load_checkpoint(dir.join("model"), Some(v)).unwrap();
        std::fs::remove_dir_all(dir.join("model")).unwrap();
        for (name, t) in ck.tensors.iter_mut() {
            let dtype = if v == Variant::Taesd && name.starts_with("encoder.") { DType::F32 } else { DType::F16 };
            *t = t.to_dtype(dtype).unwrap();
        }
        let pth = SaveOptions { variant: Some(v), format: FileFormat::Pth, ..Default::default() };
        let files = ck.save(Layout::TaesdPy, &dir, &pth).unwrap();
        if v == Variant::Taesd {
            ck.save(Layout::Diffusers, dir.join("diffusers"), &SaveOptions { variant: Some(v), ..Default::default() })
                .unwrap();
        }
        let m = Taesd::from_checkpoint(&ck, DType::F32, &Device::Cpu).unwrap();
        let z = m.encoder.as_ref().unwrap().forward(&image).unwrap();
        let y = m.decoder.as_ref().unwrap().forward(&z).unwrap();
        write_npy(&dir.join("image.npy"), &image);
        write_npy(&dir.join("latent.npy"), &z);
        write_npy(&dir.join("decoded.npy"), &y);
        println!(
            "{v}: {} + image {:?} -> latent {:?} -> {:?}",
            files.iter().map(|f| f.file_name().unwrap().to_string_lossy()).collect::<Vec<_>>().join(", "),
            image.dims(),
            z.dims(),
            y.dims()
        );
        variants.push(v.name());
    }
    let manifest = serde_json::json!({
        "variants": variants,
        "image": "../shared/reference/taef2/taef2_parity.safetensors image_b, top-left 96 x 64",
        "weights": "released taef2 (encoder, decoder) and taesana encoder; seeded random elsewhere; float16, but taesd's encoder float32",
        "made_by": format!("taesd-rs {} consumer_fixtures", env!("CARGO_PKG_VERSION")),
    });
    std::fs::write(out.join("fixtures.json"), serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
    println!("wrote {}", out.display());
}
