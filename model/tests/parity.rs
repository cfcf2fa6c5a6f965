//! Parity with the reference taesd.py (fp32 CPU outputs stored in taef2_parity.safetensors),
//! using the released fp16 `.pth` weights loaded as f32.

use candle_core::{DType, Device, Module, Tensor};
use taesd::{Taesd, Variant};

const REF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/reference");
const TOL: f32 = 1e-4;

fn reference() -> std::collections::HashMap<String, Tensor> {
    let path = format!("{REF}/taef2/taef2_parity.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// The released taef2 encoder and decoder (`.pth`, fp16) loaded as f32.
fn taef2_f32(dev: &Device) -> Taesd {
    let files = [format!("{REF}/taef2/taef2_encoder.pth"), format!("{REF}/taef2/taef2_decoder.pth")];
    Taesd::load_files(&files, None, DType::F32, dev).unwrap()
}

#[test]
fn taef2_encoder_and_decoder_match_reference() {
    let r = reference();
    let dev = Device::Cpu;
    let model = taef2_f32(&dev);
    assert_eq!(model.variant, Some(Variant::Taef2));
    assert_eq!(model.config, Variant::Taef2.config());
    let enc = model.encoder.as_ref().unwrap();
    let dec = model.decoder.as_ref().unwrap();
    for s in ["a", "b"] {
        let image = &r[&format!("image_{s}")];
        let want_latent = &r[&format!("taef2_latent_{s}")];
        let latent = enc.forward(image).unwrap();
        let e_lat = max_abs(&latent, want_latent);
        // Decode the reference latent, so the decoder is measured on its own.
        let decoded = dec.forward(want_latent).unwrap();
        let e_img = max_abs(&decoded, &r[&format!("taef2_decoded_{s}")]);
        println!(
            "taef2 image_{s} {:?}: encoder max|err| = {e_lat:.3e}, decoder max|err| = {e_img:.3e} (tol {TOL:.0e})",
            image.dims()
        );
        assert!(e_lat <= TOL, "taef2 encoder image_{s}: {e_lat}");
        assert!(e_img <= TOL, "taef2 decoder image_{s}: {e_img}");
    }
}

/// Mixed precision (`forward_in(x, BF16)` with f32 weights, as training's bf16 mode): the whole
/// network computes in bf16 (the output is bf16, the weights are cast on use, the mid-block
/// GroupNorm normalises in f32) and stays within bf16 rounding of the reference.
#[test]
fn taef2_computes_in_bf16_with_f32_weights() {
    let r = reference();
    let dev = Device::Cpu;
    let model = taef2_f32(&dev);
    let enc = model.encoder.as_ref().unwrap();
    let dec = model.decoder.as_ref().unwrap();
    let rel = |got: &Tensor, want: &Tensor| -> f32 {
        let got = got.to_dtype(DType::F32).unwrap();
        let d = (&got - want).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        let n = want.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        (d / n).sqrt()
    };
    let image = &r["image_a"];
    let latent = enc.forward_in(image, DType::BF16).unwrap();
    assert_eq!(latent.dtype(), DType::BF16, "the encoder computed in f32");
    let want_latent = &r["taef2_latent_a"];
    let e_lat = rel(&latent, want_latent);
    let decoded = dec.forward_in(want_latent, DType::BF16).unwrap();
    assert_eq!(decoded.dtype(), DType::BF16, "the decoder computed in f32");
    let e_img = rel(&decoded, &r["taef2_decoded_a"]);
    println!("taef2 in bf16: encoder rel L2 {e_lat:.3e}, decoder rel L2 {e_img:.3e}");
    // bf16 keeps 8 bits of mantissa (rounding 2^-9 = 2e-3 per value) through ~40 layers.
    assert!(e_lat > 1e-4 && e_lat < 5e-2, "encoder bf16 rel L2 {e_lat}");
    assert!(e_img > 1e-4 && e_img < 5e-2, "decoder bf16 rel L2 {e_img}");
}

#[test]
fn taesana_encoder_matches_reference() {
    let r = reference();
    let model = Taesd::load(format!("{REF}/taesana/taesana_encoder.pth"), None, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.variant, Some(Variant::Taesana));
    assert!(model.decoder.is_none());
    let latent = model.encode(&r["image_a"]).unwrap();
    let e = max_abs(&latent, &r["taesana_latent_a"]);
    println!("taesana image_a [1, 3, 256, 256] -> {:?}: encoder max|err| = {e:.3e} (tol {TOL:.0e})", latent.dims());
    assert!(e <= TOL, "taesana encoder: {e}");
}

#[test]
fn reference_folder_loads_as_a_pair() {
    // The folder holds taef2_encoder.pth, taef2_decoder.pth (and an .onnx, ignored).
    let ck = taesd::load_checkpoint(format!("{REF}/taef2"), None).unwrap();
    assert_eq!(ck.info.variant, Some(Variant::Taef2));
    assert_eq!(ck.info.layout, taesd::Layout::TaesdPy);
    assert_eq!(ck.info.dtype, DType::F16);
    assert!(ck.info.has_encoder() && ck.info.has_decoder());
    assert_eq!(ck.tensors.len(), 79 + 79);
}
