//! Whole-recipe tests: NaN guard, exact resume, losses falling, init, export.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::*;

const REFERENCE: &str = "/work/shared/reference/taef2";

fn tiny_cfg() -> RecipeConfig {
    RecipeConfig {
        replay_capacity: 4,
        // Exercise every decoder term, and an EMA probe.
        fullres_mse_weight: 0.1,
        freq_weight: 0.01,
        cycle_weight: 0.1,
        ema_probe_decays: vec![0.9],
        ..Default::default()
    }
}

fn taesd_cfg() -> taesd::TaesdConfig {
    taesd::Variant::Taesd.config()
}

/// Batch `i` of a fixed, seeded sequence: [2, 3, 32, 32] images, [2, 4, 4, 4] latents.
fn batch(i: u64) -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(1000 + i);
    let im: Vec<f32> = (0..2 * 3 * 32 * 32).map(|_| rng.random::<f32>()).collect();
    let la: Vec<f32> = (0..2 * 4 * 4 * 4).map(|_| rng.sample::<f32, _>(StandardNormal)).collect();
    Batch {
        images: Tensor::from_vec(im, (2, 3, 32, 32), &Device::Cpu).unwrap(),
        latents: Tensor::from_vec(la, (2, 4, 4, 4), &Device::Cpu).unwrap(),
    }
}

/// Every tensor of a saved state (file/name -> raw bytes) plus the JSON minus nothing.
fn snapshot(r: &Recipe) -> (BTreeMap<String, Vec<u8>>, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    r.save_state(dir.path()).unwrap();
    read_state(dir.path())
}

fn read_state(dir: &Path) -> (BTreeMap<String, Vec<u8>>, serde_json::Value) {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            continue;
        }
        let file = p.file_name().unwrap().to_string_lossy().to_string();
        let t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
        for (n, t) in t {
            let bytes: Vec<u8> = match t.dtype() {
                DType::F32 => {
                    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect()
                }
                DType::F16 => t
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<half::f16>()
                    .unwrap()
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                d => panic!("unexpected dtype {d:?}"),
            };
            out.insert(format!("{file}:{n}"), bytes);
        }
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).unwrap()).unwrap();
    (out, json)
}

fn assert_same_state(
    a: &(BTreeMap<String, Vec<u8>>, serde_json::Value),
    b: &(BTreeMap<String, Vec<u8>>, serde_json::Value),
    what: &str,
) {
    assert_eq!(a.0.keys().collect::<Vec<_>>(), b.0.keys().collect::<Vec<_>>(), "{what}: tensor names");
    for (k, v) in &a.0 {
        assert!(v == &b.0[k], "{what}: {k} differs");
    }
    let strip = |j: &serde_json::Value| {
        let mut j = j.clone();
        j.as_object_mut().unwrap().remove("seed");
        j
    };
    assert_eq!(strip(&a.1), strip(&b.1), "{what}: state.json");
}

#[test]
fn steps_report_and_models_are_snapshots() {
    let mut r = Recipe::new(&tiny_cfg(), taesd_cfg(), &ModelInit::default(), &Device::Cpu, 5).unwrap();
    assert_eq!(r.disc_param_count(), 7_481_088);
    // From scratch: the decoder's output bias starts at 0.5.
    let dec0 = r.ema_decoder().unwrap().unwrap();
    let rep = r.step(&batch(0)).unwrap();
    assert!(rep.skipped.is_none());
    assert_eq!(rep.step, 1);
    for k in [
        "encoder",
        "decoder",
        "gan",
        "lowres_mse",
        "fullres_mse",
        "freq",
        "disc",
        "disc_acc",
        "correction_std",
        "decoder_mse",
    ] {
        assert!(rep.losses.get(k).is_some_and(|v| v.is_finite()), "missing {k}: {rep:?}");
    }
    // The GAN term is the mean square of the correction -g / (std(g) + 1e-5): at most ~1, and
    // well below while the raw gradient's std is under the 1e-5 floor (a fresh discriminator).
    let s = rep.losses["correction_std"];
    assert!(rep.losses["gan"] > 0.0 && rep.losses["gan"] <= 1.0 + 1e-3, "{rep:?}");
    assert!(rep.losses["gan"] >= 0.9 * (s / (s + 1e-5)).powi(2), "{rep:?}");
    for k in ["encoder", "decoder", "disc"] {
        assert!(rep.grad_norms[k] > 0.0);
    }
    assert_eq!(rep.lr, 3e-4);
    assert_eq!(r.replay_usage().0, 2);
    // Snapshots do not move with training; the raw model does change.
    let z = batch(1).latents;
    let before = dec0.forward(&z).unwrap();
    let raw1 = r.decoder().unwrap().unwrap().forward(&z).unwrap();
    r.step(&batch(1)).unwrap();
    let after = dec0.forward(&z).unwrap();
    let raw2 = r.decoder().unwrap().unwrap().forward(&z).unwrap();
    let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff(&before, &after), 0.0);
    assert!(diff(&raw1, &raw2) > 0.0);
    let mean0 = before.mean_all().unwrap().to_scalar::<f32>().unwrap();
    assert!((mean0 - 0.5).abs() < 0.2, "fresh decoder output mean {mean0}");
    // Export the EMA weights and load them back with the model crate.
    let dir = tempfile::tempdir().unwrap();
    let files = r.export(taesd::Layout::TaesdPy, &dir.path().join("taesd"), Some(taesd::Variant::Taesd)).unwrap();
    assert_eq!(files.len(), 2);
    let back = taesd::Taesd::load_files(&files, None, DType::F32, &Device::Cpu).unwrap();
    let ema = r.ema_decoder().unwrap().unwrap();
    assert_eq!(diff(&back.decode(&z).unwrap(), &ema.forward(&z).unwrap()), 0.0);
    // Batches that do not fit are errors, not skips.
    let bad = Batch {
        images: Tensor::zeros((2, 3, 32, 32), DType::F32, &Device::Cpu).unwrap(),
        latents: Tensor::zeros((2, 4, 8, 8), DType::F32, &Device::Cpu).unwrap(),
    };
    assert!(r.step(&bad).is_err());
}

#[test]
fn nan_batch_is_skipped_and_writes_nothing() {
    let mut r = Recipe::new(&tiny_cfg(), taesd_cfg(), &ModelInit::default(), &Device::Cpu, 11).unwrap();
    for i in 0..2 {
        r.step(&batch(i)).unwrap();
    }
    let before = snapshot(&r);
    // One NaN pixel in one image.
    let b = batch(3);
    let mut im = b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    im[1234] = f32::NAN;
    let nan = Batch { images: Tensor::from_vec(im, (2, 3, 32, 32), &Device::Cpu).unwrap(), latents: b.latents.clone() };
    let rep = r.step(&nan).unwrap();
    let why = rep.skipped.clone().expect("the NaN step must be skipped");
    assert!(why.contains("NaN"), "{why}");
    assert_eq!(r.step_count(), 3);
    assert_eq!(r.skipped_steps(), 1);
    let after = snapshot(&r);
    // Every tensor (weights, EMA, moments, disc + BatchNorm statistics, replay) and the RNG
    // are unchanged; only the step counters moved.
    let mut want_json = before.1.clone();
    want_json["step"] = 3.into();
    want_json["skipped_steps"] = 1.into();
    assert_same_state(&(before.0.clone(), want_json), &after, "after a NaN step");
    // A NaN latent (decoder and discriminator path) is skipped too.
    let mut la = b.latents.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    la[7] = f32::NAN;
    let rep = r
        .step(&Batch { images: b.images.clone(), latents: Tensor::from_vec(la, (2, 4, 4, 4), &Device::Cpu).unwrap() })
        .unwrap();
    assert!(rep.skipped.is_some());
    let mut want_json = before.1.clone();
    want_json["step"] = 4.into();
    want_json["skipped_steps"] = 2.into();
    assert_same_state(&(before.0.clone(), want_json), &snapshot(&r), "after two bad steps");
    // Training goes on normally.
    assert!(r.step(&batch(3)).unwrap().skipped.is_none());
}

#[test]
fn resume_is_bit_exact() {
    let cfg = tiny_cfg();
    let (m, n) = (2u64, 2u64);
    // Uninterrupted: m + n steps.
    let mut u = Recipe::new(&cfg, taesd_cfg(), &ModelInit::default(), &Device::Cpu, 21).unwrap();
    for i in 0..m {
        u.step(&batch(i)).unwrap();
    }
    let u_at_m = snapshot(&u);
    for i in m..m + n {
        u.step(&batch(i)).unwrap();
    }
    let u_end = snapshot(&u);
    // Interrupted: m steps, save, drop.
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = Recipe::new(&cfg, taesd_cfg(), &ModelInit::default(), &Device::Cpu, 21).unwrap();
        for i in 0..m {
            s.step(&batch(i)).unwrap();
        }
        s.save_state(dir.path()).unwrap();
    }
    // Same seed, same steps: same state (deterministic init and step).
    assert_same_state(&u_at_m, &read_state(dir.path()), "two runs of m steps");
    // Resumed: a recipe built with another seed (other fresh weights and RNG), loaded, n steps.
    let mut r = Recipe::new(&cfg, taesd_cfg(), &ModelInit::default(), &Device::Cpu, 999).unwrap();
    r.load_state(dir.path()).unwrap();
    assert_eq!(r.step_count(), m);
    assert_eq!(r.replay_usage().0, 4);
    assert_same_state(&u_at_m, &snapshot(&r), "just after loading");
    for i in m..m + n {
        r.step(&batch(i)).unwrap();
    }
    assert_same_state(&u_end, &snapshot(&r), "resumed vs uninterrupted");
    // The EMA probe is part of the state compared.
    assert!(u_end.0.keys().any(|k| k.starts_with("ema0.9_decoder.safetensors:")), "{:?}", u_end.0.keys());
    assert_eq!(u_end.1["decoder"]["ema_probe_updates"]["ema0.9"], 4);
}

#[test]
fn the_encoders_lr_scale_changes_the_encoder_and_nothing_else() {
    // The files of the saved state that differ between two runs of 2 steps whose configs differ
    // in the encoder's lr.
    let differ = |cfg: RecipeConfig| {
        let run = |cfg: &RecipeConfig| {
            let mut r = Recipe::new(cfg, taesd_cfg(), &ModelInit::default(), &Device::Cpu, 6).unwrap();
            for i in 0..2 {
                r.step(&batch(i)).unwrap();
            }
            snapshot(&r).0
        };
        let (a, b) = (run(&cfg), run(&RecipeConfig { encoder_lr_scale: 3.0, ..cfg }));
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        let mut differ = std::collections::BTreeSet::new();
        for (k, v) in &a {
            if b[k] != *v {
                differ.insert(k.split(':').next().unwrap().to_string());
            }
        }
        differ.into_iter().collect::<Vec<_>>()
    };
    // Without the latent cycle term the encoder's weights, moments and EMAs move; the decoder,
    // discriminator and replay buffer are bit for bit the same.
    let encoder = ["ema0.9_encoder", "ema_encoder", "encoder", "optim_encoder"].map(|f| format!("{f}.safetensors"));
    assert_eq!(differ(RecipeConfig { cycle_weight: 0.0, ..tiny_cfg() }), encoder);
    // With it the second step's decoder learns through the encoder the first one moved.
    let coupled = differ(tiny_cfg());
    assert!(coupled.contains(&"decoder.safetensors".to_string()) && coupled.len() > encoder.len(), "{coupled:?}");
}

#[test]
fn ema_probes_track_their_own_decay_and_start_fresh_where_a_checkpoint_lacks_them() {
    // No warm-up: it would hold every decay at (1 + n) / (10 + n) < 0.5 for these few steps.
    let cfg = RecipeConfig { ema_probe_decays: vec![0.999, 0.5], ema_warmup: false, ..tiny_cfg() };
    assert_eq!(cfg.ema_decay, 0.999);
    let z = batch(7).latents;
    let diff = |a: &taesd::Decoder, b: &taesd::Decoder| {
        let d = (a.forward(&z).unwrap() - b.forward(&z).unwrap()).unwrap();
        d.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    };
    let mut r = Recipe::new(&cfg, taesd_cfg(), &ModelInit::default(), &Device::Cpu, 4).unwrap();
    for i in 0..3 {
        r.step(&batch(i)).unwrap();
    }
    let probes = r.ema_probes().unwrap();
    let names: Vec<&str> = probes.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["ema0.999", "ema0.5"]);
    let (main, raw) = (r.ema_decoder().unwrap().unwrap(), r.decoder().unwrap().unwrap());
    let (same, fast) = (probes[0].decoder.as_ref().unwrap(), probes[1].decoder.as_ref().unwrap());
    // The probe at the main decay is the main EMA; a faster one sits between it and the raw weights.
    assert_eq!(diff(&main, same), 0.0);
    assert!(diff(&main, fast) > 0.0 && diff(fast, &raw) > 0.0);
    assert!(diff(fast, &raw) < diff(&main, &raw));
    // A checkpoint saved without probes, resumed with them: they start at the resumed weights.
    let dir = tempfile::tempdir().unwrap();
    let plain = RecipeConfig { ema_probe_decays: vec![], ..cfg.clone() };
    let mut p = Recipe::new(&plain, taesd_cfg(), &ModelInit::default(), &Device::Cpu, 4).unwrap();
    p.step(&batch(0)).unwrap();
    p.save_state(dir.path()).unwrap();
    let mut q = Recipe::new(&cfg, taesd_cfg(), &ModelInit::default(), &Device::Cpu, 9).unwrap();
    q.load_state(dir.path()).unwrap();
    let raw_q = q.decoder().unwrap().unwrap();
    for p in q.ema_probes().unwrap() {
        assert_eq!(diff(p.decoder.as_ref().unwrap(), &raw_q), 0.0, "{}", p.name);
    }
    assert!(diff(&q.ema_decoder().unwrap().unwrap(), &raw_q) > 0.0);
}

#[test]
fn pixel_warmup_trains_the_discriminator_without_corrections_and_the_lr_follows_the_schedule() {
    // The full-resolution MSE (0.1) fades out at 0.8 of the 5-step run: from step 2 (after the
    // pixel warm-up) to 0 at step 4.
    let cfg = RecipeConfig {
        pixel_warmup_steps: 2,
        lr_warmup_steps: 1,
        lr_schedule: LrSchedule::Linear,
        fullres_mse_fade: 0.8,
        ..tiny_cfg()
    };
    let mut r = Recipe::new(&cfg, taesd_cfg(), &ModelInit::default(), &Device::Cpu, 3).unwrap();
    r.set_schedule_end(Some(5));
    for i in 0..5u64 {
        let rep = r.step(&batch(i)).unwrap();
        assert!(rep.skipped.is_none());
        let has = |k: &str| rep.losses.contains_key(k);
        // The discriminator trains in every step; the decoder always gets an update.
        assert!(has("disc") && rep.grad_norms.contains_key("disc"), "step {i}: {:?}", rep.losses);
        assert!(rep.grad_norms.contains_key("decoder"), "step {i}");
        if i < 2 {
            // Pixel warm-up: the full-resolution MSE alone, no correction computed.
            assert!(
                has("fullres_mse") && !has("gan") && !has("correction_std") && !has("lowres_mse"),
                "{:?}",
                rep.losses
            );
            assert_eq!(rep.losses["decoder"], rep.losses["fullres_mse"]);
            assert_eq!(rep.loss_weights, BTreeMap::from([("fullres_mse".to_string(), 1.0)]));
        } else {
            assert!(has("gan") && has("correction_std") && has("lowres_mse"), "{:?}", rep.losses);
            let fullres = [0.1, 0.05, 0.0][i as usize - 2];
            assert!((rep.loss_weights.get("fullres_mse").copied().unwrap_or(0.0) - fullres).abs() < 1e-12, "step {i}");
            assert_eq!(has("fullres_mse"), fullres > 0.0, "step {i}: {:?}", rep.losses);
            assert_eq!((rep.loss_weights["gan"], rep.loss_weights["lowres_mse"]), (1.0, 1.0));
        }
        assert_eq!(rep.lr, cfg.lr_at(i, Some(5)), "step {i}");
    }
    // Warm-up (1 step), then linear from 3e-4 over steps 1..=4 of 5: step 3 is half-way + one.
    assert!((cfg.lr_at(3, Some(5)) - 3e-4 * 0.25).abs() < 1e-15);
}

#[test]
fn checkpoints_may_leave_the_replay_buffer_out() {
    let cfg = tiny_cfg();
    let mut r = Recipe::new(&cfg, taesd_cfg(), &ModelInit::default(), &Device::Cpu, 8).unwrap();
    for i in 0..2 {
        r.step(&batch(i)).unwrap();
    }
    assert_eq!(r.replay_usage().0, 4);
    r.set_save_replay(false);
    let dir = tempfile::tempdir().unwrap();
    r.save_state(dir.path()).unwrap();
    let files: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!files.iter().any(|f| f.contains("replay")), "{files:?}");
    let mut back = Recipe::new(&cfg, taesd_cfg(), &ModelInit::default(), &Device::Cpu, 8).unwrap();
    back.load_state(dir.path()).unwrap();
    assert_eq!((back.step_count(), back.replay_usage().0), (2, 0), "resumed with an empty buffer");
    // Everything else came back: the next steps run and refill the buffer.
    back.step(&batch(2)).unwrap();
    assert_eq!(back.replay_usage().0, 2);
    // With it (the default), the buffer is saved.
    r.set_save_replay(true);
    let dir2 = tempfile::tempdir().unwrap();
    r.save_state(dir2.path()).unwrap();
    assert!(std::fs::read_dir(dir2.path()).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("replay")));
}

#[test]
fn load_state_rejects_another_structure() {
    let cfg = tiny_cfg();
    let mut a = Recipe::new(&cfg, taesd_cfg(), &ModelInit::default(), &Device::Cpu, 1).unwrap();
    a.step(&batch(0)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    a.save_state(dir.path()).unwrap();
    let enc_only = RecipeConfig { train_decoder: false, ..cfg.clone() };
    let mut b = Recipe::new(&enc_only, taesd_cfg(), &ModelInit::default(), &Device::Cpu, 1).unwrap();
    assert!(b.load_state(dir.path()).is_err());
    let mut c = Recipe::new(&cfg, taesd::TaesdConfig::custom(8), &ModelInit::default(), &Device::Cpu, 1).unwrap();
    assert!(c.load_state(dir.path()).is_err());
    // Changed learning rate: allowed.
    let mut d =
        Recipe::new(&RecipeConfig { lr: 1e-4, ..cfg }, taesd_cfg(), &ModelInit::default(), &Device::Cpu, 1).unwrap();
    d.load_state(dir.path()).unwrap();
    assert_eq!(d.step(&batch(1)).unwrap().lr, 1e-4);
}

/// Side of the real crops (small: candle's CPU convolution backward is slow).
const CROP: u32 = 16;

/// A fixed real batch: two CROP x CROP crops of the reference photo, latents from the released
/// taef2 encoder. `None` when the reference files are missing.
fn real_batch() -> Option<(Batch, taesd::Taesd)> {
    let dir = Path::new(REFERENCE);
    if !dir.join("parity_source.jpg").is_file() {
        eprintln!("skipping: {REFERENCE} not present");
        return None;
    }
    let img = image::open(dir.join("parity_source.jpg")).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    let mut data = Vec::new();
    for (x0, y0) in [(w / 3, h / 3), (w / 2, h / 2)] {
        let n = (CROP * CROP) as usize;
        let mut chw = vec![0f32; 3 * n];
        for y in 0..CROP {
            for x in 0..CROP {
                let p = img.get_pixel(x0 + x, y0 + y);
                for c in 0..3 {
                    chw[c * n + (y * CROP + x) as usize] = taesd_schemas::conventions::u8_to_unit(p[c]);
                }
            }
        }
        data.extend(chw);
    }
    let c = CROP as usize;
    let images = Tensor::from_vec(data, (2, 3, c, c), &Device::Cpu).unwrap();
    let teacher = taesd::Taesd::load(dir, Some(taesd::Variant::Taef2), DType::F32, &Device::Cpu).unwrap();
    let latents = teacher.encode(&images).unwrap();
    Some((Batch { images, latents }, teacher))
}

#[test]
fn losses_fall_on_a_fixed_real_batch() {
    let Some((b, _)) = real_batch() else { return };
    let cfg = RecipeConfig { replay_capacity: 16, ..Default::default() };
    let mut r = Recipe::new(&cfg, taesd::Variant::Taef2.config(), &ModelInit::default(), &Device::Cpu, 3).unwrap();
    let mut enc = Vec::new();
    let mut low = Vec::new();
    let mut dmse = Vec::new();
    for _ in 0..20 {
        let rep = r.step(&b).unwrap();
        assert!(rep.skipped.is_none());
        enc.push(rep.losses["encoder"]);
        low.push(rep.losses["lowres_mse"]);
        dmse.push(rep.losses["decoder_mse"]);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    eprintln!("encoder {:.4} -> {:.4}", mean(&enc[..3]), mean(&enc[15..]));
    eprintln!("lowres  {:.5} -> {:.5}", mean(&low[..3]), mean(&low[15..]));
    eprintln!("dec mse {:.5} -> {:.5}", mean(&dmse[..3]), mean(&dmse[15..]));
    assert!(mean(&enc[15..]) < 0.5 * mean(&enc[..3]), "encoder loss {enc:?}");
    assert!(mean(&low[15..]) < 0.7 * mean(&low[..3]), "low-res MSE {low:?}");
    assert!(mean(&dmse[15..]) < mean(&dmse[..3]), "decoder MSE {dmse:?}");
}

#[test]
fn fine_tuning_starts_from_the_released_decoder() {
    let Some((b, teacher)) = real_batch() else {
        return;
    };
    let cfg = RecipeConfig { train_encoder: false, replay_capacity: 4, ..Default::default() };
    let init = ModelInit { encoder: None, decoder: Some(REFERENCE.into()) };
    let mut r = Recipe::new(&cfg, taesd::Variant::Taef2.config(), &init, &Device::Cpu, 0).unwrap();
    assert!(r.encoder().unwrap().is_none() && r.ema_encoder().unwrap().is_none());
    let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let want = teacher.decode(&b.latents).unwrap();
    let got = r.ema_decoder().unwrap().unwrap().forward(&b.latents).unwrap();
    assert_eq!(diff(&want, &got), 0.0, "the initial decoder is the released one (bias not reset)");
    let rep = r.step(&b).unwrap();
    assert!(!rep.losses.contains_key("encoder"));
    // A pretrained decoder starts close to the image.
    assert!(rep.losses["decoder_mse"] < 0.02, "{rep:?}");
    // The encoder of a decoder-only run can still come from a checkpoint (frozen).
    let init = ModelInit { encoder: Some(REFERENCE.into()), decoder: Some(REFERENCE.into()) };
    let r2 = Recipe::new(&cfg, taesd::Variant::Taef2.config(), &init, &Device::Cpu, 0).unwrap();
    let e = r2.ema_encoder().unwrap().unwrap();
    assert_eq!(diff(&e.forward(&b.images).unwrap(), &b.latents), 0.0);
}

#[test]
fn detail_term_holds_the_initial_decoders_detail() {
    let Some((b, teacher)) = real_batch() else {
        return;
    };
    // No discriminator (so no warm-up: the decoder learns from step 1), a large lr to move it.
    let cfg =
        RecipeConfig { train_encoder: false, gan_weight: 0.0, detail_weight: 1.0, lr: 1e-3, ..Default::default() };
    let no_init = Recipe::new(&cfg, taesd::Variant::Taef2.config(), &ModelInit::default(), &Device::Cpu, 0);
    let err = format!("{:#}", no_init.err().expect("the detail term without an initial decoder"));
    assert!(err.contains("model.init_decoder"), "{err}");
    let init = ModelInit { encoder: None, decoder: Some(REFERENCE.into()) };
    let mut r = Recipe::new(&cfg, taesd::Variant::Taef2.config(), &init, &Device::Cpu, 0).unwrap();
    // Step 1: the trained decoder is still the initial one.
    let rep = r.step(&b).unwrap();
    assert_eq!(rep.losses["detail"], 0.0, "{rep:?}");
    for _ in 0..2 {
        r.step(&b).unwrap();
    }
    let rep = r.step(&b).unwrap();
    assert!(rep.losses["detail"] > 0.0, "{rep:?}");
    // The reference stays the released decoder while the trained one moves.
    let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let want = teacher.decode(&b.latents).unwrap();
    let initial = r.initial_decoder.as_ref().unwrap().forward(&b.latents).unwrap();
    assert_eq!(diff(&want, &initial), 0.0);
    assert!(diff(&want, &r.decoder().unwrap().unwrap().forward(&b.latents).unwrap()) > 0.0);
}

#[test]
fn the_cycle_term_trains_the_decoder_through_the_frozen_encoder() {
    let Some((b, _)) = real_batch() else {
        return;
    };
    // The cycle term alone: no discriminator, no pixel term; a fresh decoder.
    let cfg = RecipeConfig {
        train_encoder: false,
        gan_weight: 0.0,
        lowres_mse_weight: 0.0,
        cycle_weight: 1.0,
        lr: 1e-3,
        ..Default::default()
    };
    let no_encoder = Recipe::new(&cfg, taesd::Variant::Taef2.config(), &ModelInit::default(), &Device::Cpu, 0);
    let err = format!("{:#}", no_encoder.err().expect("the cycle term without an encoder"));
    assert!(err.contains("model.init_encoder"), "{err}");
    let init = ModelInit { encoder: Some(REFERENCE.into()), decoder: None };
    let mut r = Recipe::new(&cfg, taesd::Variant::Taef2.config(), &init, &Device::Cpu, 0).unwrap();
    // MSE(E(D(z)), z) of the run's encoder and decoder as they are now.
    let cycle_now = |r: &Recipe| {
        let x = r.decoder().unwrap().unwrap().forward(&b.latents).unwrap();
        let z = r.encoder().unwrap().unwrap().forward(&x).unwrap();
        (z - &b.latents).unwrap().sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap() as f64
    };
    let first = cycle_now(&r);
    let mut cycle = Vec::new();
    for _ in 0..12 {
        let rep = r.step(&b).unwrap();
        assert!(rep.skipped.is_none() && rep.grad_norms["decoder"] > 0.0, "{rep:?}");
        assert_eq!(rep.loss_weights.keys().collect::<Vec<_>>(), ["cycle"]);
        cycle.push(rep.losses["cycle"]);
    }
    // The reported value is the evaluation's error of the decoder the step started from ...
    assert!((cycle[0] - first).abs() <= 1e-5 * first, "step 1 reported {}, the models give {first}", cycle[0]);
    // ... and the decoder learns what the encoder reads back (the term's gradient reaches it
    // through the encoder).
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(mean(&cycle[9..]) < 0.7 * mean(&cycle[..3]), "cycle {cycle:?}");
    assert!(cycle_now(&r) < cycle[11], "{} after the last step, {} before it", cycle_now(&r), cycle[11]);
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Throughput and the state machinery on a GPU (`--ignored`; skips without CUDA). Settings from
/// `RECIPE_BENCH_{VARIANT,SIZE,BATCH,STEPS,REPLAY}` (taef2, 256, 8, 10, 256).
#[test]
#[ignore]
fn gpu_step_timing_and_state() {
    use std::time::Instant;
    let dev = match Device::cuda_if_available(0) {
        Ok(d) if d.is_cuda() => d,
        _ => {
            eprintln!("skipping: no CUDA device");
            return;
        }
    };
    let variant = taesd::Variant::parse(&env_or("RECIPE_BENCH_VARIANT", "taef2".to_string())).unwrap();
    let size: usize = env_or("RECIPE_BENCH_SIZE", 256);
    let bsz: usize = env_or("RECIPE_BENCH_BATCH", 8);
    let steps: usize = env_or("RECIPE_BENCH_STEPS", 10);
    let mcfg = variant.config();
    let cfg = RecipeConfig { replay_capacity: env_or("RECIPE_BENCH_REPLAY", 256), ..Default::default() };
    let t = Instant::now();
    let mut r = Recipe::new(&cfg, mcfg, &ModelInit::default(), &dev, 0).unwrap();
    dev.synchronize().unwrap();
    eprintln!("{variant} {size}x{size} batch {bsz}: built in {:?}", t.elapsed());
    let s = mcfg.spatial_scale();
    let mk = |seed: u64| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let im: Vec<f32> = (0..bsz * 3 * size * size).map(|_| rng.random::<f32>()).collect();
        let n = bsz * mcfg.latent_channels * (size / s) * (size / s);
        let la: Vec<f32> = (0..n).map(|_| rng.sample::<f32, _>(StandardNormal)).collect();
        Batch {
            images: Tensor::from_vec(im, (bsz, 3, size, size), &dev).unwrap(),
            latents: Tensor::from_vec(la, (bsz, mcfg.latent_channels, size / s, size / s), &dev).unwrap(),
        }
    };
    let batches: Vec<Batch> = (0..4).map(mk).collect();
    for b in batches.iter().take(2) {
        let rep = r.step(b).unwrap();
        assert!(rep.skipped.is_none(), "{rep:?}");
    }
    dev.synchronize().unwrap();
    let t = Instant::now();
    let mut last = None;
    for i in 0..steps {
        last = Some(r.step(&batches[i % 4]).unwrap());
    }
    dev.synchronize().unwrap();
    let per = t.elapsed() / steps as u32;
    eprintln!("step: {per:?} ({:.1} images/s); last report {:?}", bsz as f64 / per.as_secs_f64(), last.unwrap());
    let (n, bytes) = r.replay_usage();
    eprintln!("replay: {n} entries, {:.1} MiB", bytes as f64 / (1 << 20) as f64);

    // NaN guard on the device.
    let mut im = batches[0].images.to_device(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    im[17] = f32::NAN;
    let nan = Batch {
        images: Tensor::from_vec(im, (bsz, 3, size, size), &dev).unwrap(),
        latents: batches[0].latents.clone(),
    };
    let rep = r.step(&nan).unwrap();
    assert!(rep.skipped.is_some(), "{rep:?}");

    // Save / load on the device: the loaded state is the saved one.
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    r.save_state(dir.path()).unwrap();
    eprintln!("save_state: {:?}", t.elapsed());
    let mut r2 = Recipe::new(&cfg, mcfg, &ModelInit::default(), &dev, 7).unwrap();
    let t = Instant::now();
    r2.load_state(dir.path()).unwrap();
    eprintln!("load_state: {:?}", t.elapsed());
    assert_same_state(&read_state(dir.path()), &snapshot(&r2), "GPU save/load");

    // Per-phase timings (synchronised), for the record.
    let b = &batches[0];
    let enc = r.encoder().unwrap().unwrap();
    let decm = r.decoder().unwrap().unwrap();
    let time = |what: &str, f: &dyn Fn()| {
        f();
        dev.synchronize().unwrap();
        let t = Instant::now();
        for _ in 0..3 {
            f();
        }
        dev.synchronize().unwrap();
        eprintln!("  {what}: {:?}", t.elapsed() / 3);
    };
    time("encoder forward", &|| {
        enc.forward(&b.images).unwrap();
    });
    time("decoder forward", &|| {
        decm.forward(&b.latents).unwrap();
    });
    let vm = candle_nn::VarMap::new();
    let tr = taesd::Taesd::new(&mcfg, candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    time("encoder forward+backward", &|| {
        let y = tr.encode(&b.images).unwrap();
        losses::mse(&y, &b.latents).unwrap().backward().unwrap();
    });
    time("decoder forward+backward", &|| {
        let y = tr.decode(&b.latents).unwrap();
        losses::mse(&y, &b.images).unwrap().backward().unwrap();
    });
    let dcfg = DiscConfig::seraena(mcfg.latent_channels);
    let dvm = candle_nn::VarMap::new();
    let d = Discriminator::new(&dcfg, candle_nn::VarBuilder::from_varmap(&dvm, DType::F32, &dev)).unwrap();
    time("disc forward+backward (train)", &|| {
        let (y, _) = d.forward_t(&b.images, &b.latents, true).unwrap();
        y.sqr().unwrap().mean_all().unwrap().backward().unwrap();
    });
    let params: Vec<Tensor> = d.params().iter().map(|p| p.detach()).collect();
    time("correction", &|| {
        losses::correction_grad(&dcfg, &params, d.stats(), &b.images, &b.images, &b.latents).unwrap();
    });
}

/// `t` (f32) as a NumPy `.npy` file.
fn write_npy(path: &Path, t: &Tensor) {
    let t = t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    let shape: Vec<String> = t.dims().iter().map(|d| d.to_string()).collect();
    let shape = match shape.len() {
        0 => "()".to_string(),
        1 => format!("({},)", shape[0]),
        _ => format!("({})", shape.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    for v in t.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
        out.extend(v.to_le_bytes());
    }
    std::fs::write(path, out).unwrap();
}

/// Writes one discriminator step, correction and AMSGrad run computed here as `.npy` files into
/// `$RECIPE_PARITY_DIR`, for a PyTorch script to recompute and compare (`--ignored`).
#[test]
#[ignore]
fn export_pytorch_parity_case() {
    let Ok(out) = std::env::var("RECIPE_PARITY_DIR") else {
        eprintln!("skipping: RECIPE_PARITY_DIR not set");
        return;
    };
    let out = Path::new(&out);
    std::fs::create_dir_all(out).unwrap();
    let dev = Device::Cpu;
    let c = 4;
    let (b, h) = (4, 32);
    // seraena's structure at 1/8 of its widths (keeps the files small).
    let dcfg = DiscConfig { widths: vec![8, 16, 32, 64, 64, 64], ..DiscConfig::seraena(c) };
    let vm = candle_nn::VarMap::new();
    let d = Discriminator::new(&dcfg, candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    std::fs::write(out.join("widths.json"), serde_json::to_string(&dcfg.widths).unwrap()).unwrap();
    let vars: Vec<(String, candle_core::Var)> = {
        let data = vm.data().lock().unwrap();
        dcfg.param_names().into_iter().map(|n| (n.clone(), data[&n].clone())).collect()
    };
    let mut rng = crate::testing::rng(77);
    let real = crate::testing::uniform(&mut rng, &[b, 3, h, h], 0.0, 1.0, DType::F32);
    let fake = crate::testing::uniform(&mut rng, &[b, 3, h, h], 0.0, 1.0, DType::F32);
    let lat = crate::testing::normal(&mut rng, &[b, c, h / 8, h / 8], 0.0, 1.0, DType::F32);
    let mask = Tensor::new(&[1f32, 0., 1., 0.], &dev).unwrap().reshape((b, 1, 1, 1)).unwrap();
    let x =
        (mask.broadcast_mul(&fake).unwrap() + mask.affine(-1.0, 1.0).unwrap().broadcast_mul(&real).unwrap()).unwrap();
    let mut names = Vec::new();
    for (n, v) in &vars {
        write_npy(&out.join(format!("init.{n}.npy")), v.as_tensor());
        names.push(n.clone());
    }
    std::fs::write(out.join("names.json"), serde_json::to_string(&names).unwrap()).unwrap();
    for (n, t) in [("real", &real), ("fake", &fake), ("latents", &lat), ("mask", &mask)] {
        write_npy(&out.join(format!("{n}.npy")), t);
    }
    let params: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
    let (scores, stats) = Discriminator::forward_with(&dcfg, &params, d.stats(), &x, &lat, true).unwrap();
    let stats = stats.unwrap();
    let targets = mask.affine(2.0, -1.0).unwrap().broadcast_as(scores.shape()).unwrap().contiguous().unwrap();
    let loss = losses::mse(&scores, &targets).unwrap();
    let grads = loss.backward().unwrap();
    write_npy(&out.join("scores.npy"), &scores);
    write_npy(&out.join("disc_loss.npy"), &loss);
    let opt = optim::Adam::new(vars.clone(), optim::AdamConfig::adamw(3e-4, (0.9, 0.99))).unwrap();
    let g = opt.flat_gradients(&grads).unwrap();
    let prop = opt.propose_flat(&g, 3e-4, None).unwrap();
    for (i, (n, v)) in vars.iter().enumerate() {
        write_npy(&out.join(format!("grad.{n}.npy")), grads.get(v.as_tensor()).unwrap());
        write_npy(&out.join(format!("step1.{n}.npy")), &prop.params[i]);
    }
    for (n, t) in stats.to_map(&dcfg) {
        write_npy(&out.join(format!("step1.{n}.npy")), &t);
    }
    let cg = losses::correction_grad(&dcfg, &prop.params, &stats, &real, &fake, &lat).unwrap();
    let (corr, _) = losses::normalize_correction(&cg).unwrap();
    write_npy(&out.join("correction_grad.npy"), &cg);
    write_npy(&out.join("correction.npy"), &corr);
    // AMSGrad, lr 1e-2, betas (0.9, 0.9), five steps.
    let p = candle_core::Var::from_tensor(&crate::testing::normal(&mut rng, &[64], 0.0, 1.0, DType::F32)).unwrap();
    write_npy(&out.join("ams.p0.npy"), p.as_tensor());
    let mut ams =
        optim::Adam::new(vec![("p".into(), p.clone())], optim::AdamConfig::amsgrad(1e-2, (0.9, 0.9))).unwrap();
    for k in 0..5 {
        let g = crate::testing::normal(&mut rng, &[64], 0.0, 1.0, DType::F32)
            .affine(if k == 3 { 0.1 } else { 1.0 }, 0.0)
            .unwrap();
        write_npy(&out.join(format!("ams.g{k}.npy")), &g);
        let pr = ams.propose(&[Some(g)], 1e-2, None).unwrap();
        ams.commit(pr).unwrap();
        write_npy(&out.join(format!("ams.p{}.npy", k + 1)), p.as_tensor());
    }
    eprintln!("wrote the parity case to {}", out.display());
}

#[test]
fn recipe_is_send() {
    fn send<T: Send>() {}
    send::<Recipe>();
    send::<StepReport>();
}

/// Mixed precision: from the same seed and batch, a bf16 step gives the f32 step's losses and
/// gradient norms to within bf16 rounding, keeps every saved tensor f32 (master weights,
/// optimiser moments, EMA, BatchNorm statistics) and moves the weights as the f32 step does.
#[test]
fn bf16_step_tracks_the_f32_step_and_keeps_f32_state() {
    let run = |p: Precision| {
        let mut r = Recipe::new(&tiny_cfg(), taesd_cfg(), &ModelInit::default(), &Device::Cpu, 8).unwrap();
        r.set_precision(p);
        let reps: Vec<StepReport> = (0..2).map(|i| r.step(&batch(i)).unwrap()).collect();
        (reps, r)
    };
    let (f, rf) = run(Precision::F32);
    let (b, rb) = run(Precision::Bf16);
    for rb_ in &b {
        assert!(rb_.skipped.is_none(), "{:?}", rb_.skipped);
        assert!(rb_.losses.values().chain(rb_.grad_norms.values()).all(|v| v.is_finite()));
    }
    assert_ne!(f[0].losses["decoder"], b[0].losses["decoder"], "the bf16 run computed in f32");
    // Step 1 starts from the same weights: only the arithmetic differs. (From step 2 the
    // discriminator's corrections, chaotic in its weights, make the decoder terms diverge.)
    for (rf_, rb_) in f.iter().zip(&b).take(1) {
        for (k, want) in &rf_.losses {
            let got = rb_.losses[k];
            // disc_acc counts signs; the correction's std is a ratio of tiny gradients.
            if k == "disc_acc" || k == "correction_std" {
                assert!(got.is_finite(), "{k}");
                continue;
            }
            let rel = (got - want).abs() / want.abs().max(1e-3);
            assert!(rel < 0.01, "loss {k}: bf16 {got} vs f32 {want} ({rel:.4} rel)");
        }
        for (k, want) in &rf_.grad_norms {
            let got = rb_.grad_norms[k];
            let rel = (got - want).abs() / want.abs();
            // The decoder's is the GAN correction's: a normalised input gradient of the
            // discriminator, the most rounding-sensitive quantity of the step (3% measured).
            assert!(rel < 0.06, "grad norm {k}: bf16 {got} vs f32 {want} ({rel:.4} rel)");
        }
    }
    let (sf, sb) = (snapshot(&rf), snapshot(&rb));
    let s0 = snapshot(&Recipe::new(&tiny_cfg(), taesd_cfg(), &ModelInit::default(), &Device::Cpu, 8).unwrap());
    assert_eq!(sf.0.keys().collect::<Vec<_>>(), sb.0.keys().collect::<Vec<_>>());
    // Every tensor keeps its dtype and size (read_state accepts only f32 and f16); the two runs'
    // weight updates (after - before, per part) point the same way.
    let f32s =
        |v: &[u8]| -> Vec<f64> { v.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect() };
    for part in ["encoder", "decoder"] {
        let (mut dot, mut nf, mut nb) = (0f64, 0f64, 0f64);
        for (k, a) in &sf.0 {
            assert_eq!(a.len(), sb.0[k].len(), "{k}");
            if !k.starts_with(&format!("{part}.safetensors:")) {
                continue;
            }
            let (w0, wf, wb) = (f32s(&s0.0[k]), f32s(a), f32s(&sb.0[k]));
            for i in 0..w0.len() {
                let (df, db) = (wf[i] - w0[i], wb[i] - w0[i]);
                dot += df * db;
                nf += df * df;
                nb += db * db;
            }
        }
        assert!(nf > 0.0, "{part}: no weight moved");
        let cos = dot / (nf.sqrt() * nb.sqrt());
        eprintln!("{part}: cosine of the bf16 and f32 updates {cos:.4}, norms {:.3e} {:.3e}", nf.sqrt(), nb.sqrt());
        assert!(cos > 0.9, "{part}: bf16 and f32 weight updates have cosine {cos}");
    }
}
