//! Save/load round trips in every layout (bit-exact), variant detection, and the errors for
//! bad checkpoints.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use taesd::{
    load_checkpoint, load_checkpoints, read_tensor_file, save_tensors, save_varmap, varmap_tensors, Layout,
    SaveOptions, Taesd, TaesdConfig, TaesdError, Variant,
};

const REF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/reference");

/// A model with random weights (GroupNorm affine too) in `dtype`.
fn random_varmap(cfg: &TaesdConfig, dtype: DType) -> VarMap {
    let vm = VarMap::new();
    Taesd::new(cfg, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu)).unwrap();
    let mut rng = common::rng(1);
    for (_, v) in common::sorted_vars(&vm) {
        let r = common::normal(&mut rng, v.dims(), 0.0, 1.0).to_dtype(dtype).unwrap();
        v.set(&r).unwrap();
    }
    vm
}

fn bits(t: &Tensor) -> (DType, Vec<usize>, Vec<u32>) {
    // f16/bf16 -> f32 is exact, so equal f32 bits mean equal stored bits.
    let v = t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
    (t.dtype(), t.dims().to_vec(), v.into_iter().map(f32::to_bits).collect())
}

fn assert_same(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>, what: &str) {
    let mut ka: Vec<_> = a.keys().collect();
    let mut kb: Vec<_> = b.keys().collect();
    ka.sort();
    kb.sort();
    assert_eq!(ka, kb, "{what}: names differ");
    for (n, t) in a {
        assert!(bits(t) == bits(&b[n]), "{what}: {n} differs");
    }
}

fn save_dest(dir: &Path, layout: Layout, v: Variant) -> std::path::PathBuf {
    match layout {
        Layout::TaesdPy => dir.join(v.name()),
        Layout::Diffusers => dir.join(format!("{v}-diffusers")),
        Layout::ComfyUi => dir.join(format!("{v}_comfy.safetensors")),
        Layout::Combined => dir.join(format!("{v}_combined.safetensors")),
    }
}

#[test]
fn every_layout_round_trips_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    for v in Variant::ALL {
        let cfg = v.config();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            if v == Variant::Taesana && dtype != DType::F16 {
                continue; // the big decoder: one dtype is enough
            }
            let vm = random_varmap(&cfg, dtype);
            let want = varmap_tensors(&vm);
            for layout in Layout::ALL {
                let dir = tmp.path().join(format!("{dtype:?}"));
                let dest = save_dest(&dir, layout, v);
                let opts = SaveOptions { variant: Some(v), ..Default::default() };
                let saved = save_varmap(&vm, &cfg, layout, &dest, &opts);
                if layout == Layout::Diffusers && !v.diffusers_supported() {
                    assert!(matches!(saved, Err(TaesdError::UnsupportedLayout { .. })), "{v} diffusers: {saved:?}");
                    continue;
                }
                let files = saved.unwrap();
                // taesd.py: load the pair as two files, and as the folder... of this variant only.
                let ck = match layout {
                    Layout::TaesdPy => load_checkpoints(&files, None).unwrap(),
                    _ => load_checkpoint(&dest, None).unwrap(),
                };
                let what = format!("{v} {dtype:?} {layout}");
                assert_eq!(ck.info.layout, layout, "{what}");
                assert_eq!(ck.info.config, cfg, "{what}");
                assert_eq!(ck.info.variant, Some(v), "{what}: variant from metadata");
                assert_eq!(ck.info.dtype, dtype, "{what}");
                assert_same(&want, &ck.tensors, &what);
                // ...and back out again through a VarMap.
                let vm2 = ck.to_varmap(dtype, &Device::Cpu).unwrap();
                assert_same(&want, &varmap_tensors(&vm2), &format!("{what} via VarMap"));
            }
        }
    }
}

#[test]
fn diffusers_files_are_named_as_autoencoder_tiny() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = Variant::Taef1.config();
    let vm = random_varmap(&cfg, DType::F32);
    let dir = tmp.path().join("taef1");
    save_varmap(&vm, &cfg, Layout::Diffusers, &dir, &SaveOptions::default()).unwrap();
    let f = read_tensor_file(dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    for n in [
        "encoder.layers.0.weight",
        "encoder.layers.14.bias",
        "decoder.layers.0.weight",
        "decoder.layers.18.bias",
        "decoder.layers.16.weight",
    ] {
        assert!(f.tensors.contains_key(n), "{n}");
    }
    assert!(!f.tensors.contains_key("decoder.layers.19.bias"));
    assert_eq!(f.tensors["decoder.layers.0.weight"].dims(), [64, 16, 3, 3]);
    let v = &vm.data().lock().unwrap()["decoder.3.conv.0.weight"];
    assert!(bits(&f.tensors["decoder.layers.2.conv.0.weight"]) == bits(v.as_tensor()));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["_class_name"], "AutoencoderTiny");
    assert_eq!(config["latent_channels"], 16);
    assert_eq!(config["scaling_factor"], 1.0);
    // Only what AutoencoderTiny.__init__ takes (diffusers 0.42.1): it warns about any other key
    // (it did, on the GPU machine, about a `block_out_channels` we used to write).
    let accepted = [
        "_class_name",
        "_diffusers_version",
        "act_fn",
        "decoder_block_out_channels",
        "encoder_block_out_channels",
        "force_upcast",
        "in_channels",
        "latent_channels",
        "latent_magnitude",
        "latent_shift",
        "num_decoder_blocks",
        "num_encoder_blocks",
        "out_channels",
        "scaling_factor",
        "shift_factor",
        "upsample_fn",
        "upsampling_scaling_factor",
    ];
    for k in config.as_object().unwrap().keys() {
        assert!(accepted.contains(&k.as_str()), "config.json key {k} is not an AutoencoderTiny argument");
    }
    // Without our metadata, taesd3 and taef1 are the same structure: the folder name tells.
    let plain: HashMap<String, Tensor> = f.tensors.clone();
    let bare = tmp.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    candle_core::safetensors::save(&plain, bare.join("diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::copy(dir.join("config.json"), bare.join("config.json")).unwrap();
    let ck = load_checkpoint(&bare, None).unwrap();
    assert_eq!((ck.info.variant, ck.info.config), (None, cfg));
    let ck = load_checkpoint(&bare, Some(Variant::Taesd3)).unwrap();
    assert_eq!(ck.info.variant, Some(Variant::Taesd3));
    // A pipeline folder: weights under vae/.
    let pipe = tmp.path().join("taef1-pipeline");
    std::fs::create_dir_all(pipe.join("vae")).unwrap();
    for f in ["diffusion_pytorch_model.safetensors", "config.json"] {
        std::fs::copy(bare.join(f), pipe.join("vae").join(f)).unwrap();
    }
    assert_eq!(load_checkpoint(&pipe, None).unwrap().info.variant, Some(Variant::Taef1));
}

#[test]
fn comfyui_file_carries_vae_scaling() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = Variant::Taesd3.config();
    let vm = random_varmap(&cfg, DType::F16);
    let path = tmp.path().join("x.safetensors");
    save_varmap(
        &vm,
        &cfg,
        Layout::ComfyUi,
        &path,
        &SaveOptions { variant: Some(Variant::Taesd3), ..Default::default() },
    )
    .unwrap();
    let f = read_tensor_file(&path).unwrap();
    assert!(f.tensors.contains_key("taesd_encoder.0.weight") && f.tensors.contains_key("taesd_decoder.19.bias"));
    assert_eq!(f.tensors["vae_scale"].to_scalar::<f32>().unwrap(), 1.5305);
    assert_eq!(f.tensors["vae_shift"].to_scalar::<f32>().unwrap(), 0.0609);
    let ck = load_checkpoint(&path, None).unwrap();
    let s = ck.info.vae_scaling.unwrap();
    assert_eq!((s.scale as f32, s.shift as f32), (1.5305, 0.0609));
    assert_eq!(ck.tensors.len(), f.tensors.len() - 2);
}

#[test]
fn released_pth_round_trips_through_every_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let orig = load_checkpoint(format!("{REF}/taef2"), None).unwrap();
    assert_eq!(orig.info.dtype, DType::F16);
    for layout in [Layout::TaesdPy, Layout::ComfyUi, Layout::Combined] {
        let dest = save_dest(tmp.path(), layout, Variant::Taef2);
        let files = orig.save(layout, &dest, &SaveOptions::default()).unwrap();
        let back = if layout == Layout::TaesdPy {
            load_checkpoints(&files, None).unwrap()
        } else {
            load_checkpoint(&dest, None).unwrap()
        };
        assert_eq!(back.info.variant, Some(Variant::Taef2));
        assert_same(&orig.tensors, &back.tensors, &format!("taef2 pth -> {layout}"));
    }
    // fp16 -> f32 VarMap (fine-tuning) -> saved back as fp16: the original bits.
    let (vm, info) =
        taesd::load_varmap(format!("{REF}/taesana/taesana_encoder.pth"), None, DType::F32, &Device::Cpu).unwrap();
    assert_eq!((info.variant, info.has_encoder(), info.has_decoder()), (Some(Variant::Taesana), true, false));
    let dest = tmp.path().join("sana");
    let opts = SaveOptions { dtype: Some(DType::F16), variant: info.variant, ..Default::default() };
    let files = save_varmap(&vm, &info.config, Layout::TaesdPy, &dest, &opts).unwrap();
    assert_eq!(files, [tmp.path().join("sana_encoder.safetensors")]);
    let back = load_checkpoint(&files[0], None).unwrap();
    let orig = load_checkpoint(format!("{REF}/taesana/taesana_encoder.pth"), None).unwrap();
    assert_same(&orig.tensors, &back.tensors, "taesana f16 -> f32 -> f16");
    // The diffusers layout refuses taef2 with a clear error.
    let err = load_checkpoint(format!("{REF}/taef2"), None).unwrap().save(
        Layout::Diffusers,
        tmp.path().join("d"),
        &SaveOptions::default(),
    );
    let msg = err.unwrap_err().to_string();
    assert!(msg.contains("diffusers") && msg.contains("taef2") && msg.contains("pool"), "{msg}");
}

#[test]
fn variant_comes_from_the_tensors_not_the_file_name() {
    let tmp = tempfile::tempdir().unwrap();
    // taef2 weights in a file named like a taesd file.
    let lie = tmp.path().join("taesd_encoder.pth");
    std::fs::copy(format!("{REF}/taef2/taef2_encoder.pth"), &lie).unwrap();
    let ck = load_checkpoint(&lie, None).unwrap();
    assert_eq!((ck.info.variant, ck.info.has_encoder()), (Some(Variant::Taef2), true));
    // A decoder file named "encoder" is still a decoder.
    let lie = tmp.path().join("model_encoder.pth");
    std::fs::copy(format!("{REF}/taef2/taef2_decoder.pth"), &lie).unwrap();
    let ck = load_checkpoint(&lie, None).unwrap();
    assert!(ck.info.has_decoder() && !ck.info.has_encoder());
    // No metadata, neutral names: C=4 is taesd or taesdxl, the name decides when it can.
    let cfg = Variant::Taesd.config();
    let t = varmap_tensors(&random_varmap(&cfg, DType::F32));
    let enc: HashMap<String, Tensor> =
        t.iter().filter_map(|(n, t)| n.strip_prefix("encoder.").map(|n| (n.to_string(), t.clone()))).collect();
    for (name, want) in [("model_encoder.safetensors", None), ("taesdxl_encoder.safetensors", Some(Variant::Taesdxl))] {
        let p = tmp.path().join(name);
        candle_core::safetensors::save(&enc, &p).unwrap();
        let ck = load_checkpoint(&p, None).unwrap();
        assert_eq!((ck.info.config, ck.info.variant), (cfg, want), "{name}");
    }
    // A custom channel count is a config without a variant.
    let custom = TaesdConfig::custom(8);
    let p = tmp.path().join("c8.safetensors");
    save_varmap(&random_varmap(&custom, DType::F32), &custom, Layout::Combined, &p, &SaveOptions::default()).unwrap();
    let ck = load_checkpoint(&p, None).unwrap();
    assert_eq!((ck.info.config, ck.info.variant), (custom, None));
}

/// Save a taesd diffusers checkpoint, rewrite its weights with `edit`, and load it.
fn load_edited(
    edit: impl FnOnce(&mut HashMap<String, Tensor>),
) -> (std::path::PathBuf, taesd::Result<taesd::Checkpoint>, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = Variant::Taesd.config();
    let dir = tmp.path().join("taesd-diffusers");
    save_varmap(&random_varmap(&cfg, DType::F32), &cfg, Layout::Diffusers, &dir, &SaveOptions::default()).unwrap();
    let file = dir.join("diffusion_pytorch_model.safetensors");
    let mut t = read_tensor_file(&file).unwrap().tensors;
    edit(&mut t);
    candle_core::safetensors::save(&t, &file).unwrap();
    let r = load_checkpoint(&dir, None);
    (file, r, tmp)
}

#[test]
fn bad_checkpoints_name_the_tensor_and_the_file() {
    let (file, r, _tmp) = load_edited(|t| {
        t.remove("decoder.layers.4.conv.2.bias");
    });
    let err = r.unwrap_err();
    println!("{err}");
    match &err {
        TaesdError::MissingTensor { file: f, name, .. } => {
            assert_eq!((f, name.as_str()), (&file, "decoder.layers.4.conv.2.bias"))
        }
        e => panic!("{e:?}"),
    }
    assert!(
        err.to_string().contains("diffusion_pytorch_model.safetensors")
            && err.to_string().contains("decoder.layers.4.conv.2.bias")
    );

    let (file, r, _tmp) = load_edited(|t| {
        t.insert(
            "encoder.layers.3.conv.0.weight".into(),
            Tensor::zeros((64, 64, 1, 1), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = r.unwrap_err();
    println!("{err}");
    match &err {
        TaesdError::ShapeMismatch { file: f, name, expected, got, .. } => {
            assert_eq!((f, name.as_str()), (&file, "encoder.layers.3.conv.0.weight"));
            assert_eq!((expected.as_slice(), got.as_slice()), (&[64, 64, 3, 3][..], &[64, 64, 1, 1][..]));
        }
        e => panic!("{e:?}"),
    }

    let (_, r, _tmp) = load_edited(|t| {
        t.insert(
            "encoder.layers.1.skip.weight".into(),
            Tensor::zeros((64, 64, 1, 1), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = r.unwrap_err();
    println!("{err}");
    assert!(
        matches!(&err, TaesdError::UnexpectedTensor { name, .. } if name == "encoder.layers.1.skip.weight"),
        "{err:?}"
    );

    // The latent-channel tensor itself missing.
    let (_, r, _tmp) = load_edited(|t| {
        t.remove("decoder.layers.0.weight");
    });
    let err = r.unwrap_err();
    println!("{err}");
    assert!(matches!(&err, TaesdError::MissingTensor { name, .. } if name == "decoder.layers.0.weight"), "{err:?}");

    // config.json that disagrees with the weights.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = Variant::Taesd.config();
    let dir = tmp.path().join("d");
    save_varmap(&random_varmap(&cfg, DType::F32), &cfg, Layout::Diffusers, &dir, &SaveOptions::default()).unwrap();
    let text = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"latent_channels\": 4", "\"latent_channels\": 16");
    std::fs::write(dir.join("config.json"), text).unwrap();
    let err = load_checkpoint(&dir, None).unwrap_err();
    println!("{err}");
    assert!(matches!(&err, TaesdError::Config { .. }) && err.to_string().contains("latent_channels"), "{err:?}");
}

#[test]
fn wrong_variant_and_foreign_files_are_refused() {
    let enc = format!("{REF}/taef2/taef2_encoder.pth");
    let err = load_checkpoint(&enc, Some(Variant::Taesd)).unwrap_err();
    println!("{err}");
    assert!(matches!(&err, TaesdError::WrongVariant { expected, .. } if expected == "taesd"), "{err:?}");
    assert!(err.to_string().contains("taef2_encoder.pth") && err.to_string().contains("taef2"));
    // The variant's structure must match even where the name is compatible-looking.
    assert!(load_checkpoint(format!("{REF}/taesana/taesana_encoder.pth"), Some(Variant::Taef2)).is_err());
    // An encoder of one variant with a decoder of another.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = Variant::Taesd.config();
    let files = save_varmap(
        &random_varmap(&cfg, DType::F16),
        &cfg,
        Layout::TaesdPy,
        tmp.path().join("x"),
        &SaveOptions::default(),
    )
    .unwrap();
    let err = load_checkpoints(&[enc.clone(), files[1].display().to_string()], None).unwrap_err();
    println!("{err}");
    assert!(err.to_string().contains("taef2") && err.to_string().contains("taesd"), "{err}");
    // Not a TAESD checkpoint.
    let p = tmp.path().join("other.safetensors");
    let t = HashMap::from([("model.weight".to_string(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap())]);
    candle_core::safetensors::save(&t, &p).unwrap();
    let err = load_checkpoint(&p, None).unwrap_err();
    println!("{err}");
    assert!(matches!(err, TaesdError::UnknownLayout { .. }));
    // Saving the wrong structure under a variant's name.
    let err = save_tensors(
        &varmap_tensors(&random_varmap(&cfg, DType::F32)),
        &Variant::Taef1.config(),
        Layout::Combined,
        tmp.path().join("y.safetensors"),
        &SaveOptions::default(),
    )
    .unwrap_err();
    println!("{err}");
    assert!(matches!(err, TaesdError::ShapeMismatch { .. }));
}

#[test]
fn diffusers_named_taef2_weights_load() {
    // madebyollin's taef2.safetensors: diffusers names (decoder index - 1) plus pool tensors,
    // without an AutoencoderTiny config. Build one from the released .pth files.
    let tmp = tempfile::tempdir().unwrap();
    let orig = load_checkpoint(format!("{REF}/taef2"), None).unwrap();
    let mut renamed = HashMap::new();
    for (name, t) in &orig.tensors {
        let (part, local) = taesd::Layout::Combined.local_name(name, None).unwrap();
        renamed.insert(Layout::Diffusers.external_name(part, &local), t.clone());
    }
    assert!(renamed.contains_key("decoder.layers.2.pool.0.weight"));
    let p = tmp.path().join("taef2.safetensors");
    candle_core::safetensors::save(&renamed, &p).unwrap();
    let ck = load_checkpoint(&p, None).unwrap();
    assert_eq!((ck.info.layout, ck.info.variant), (Layout::Diffusers, Some(Variant::Taef2)));
    assert_same(&orig.tensors, &ck.tensors, "taef2 diffusers-named");
}
