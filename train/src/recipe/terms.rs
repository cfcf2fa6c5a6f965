//! The decoder's loss: a table of named, weighted terms. A new term is one `RecipeConfig`
//! field for its weight and one entry in [`TERMS`]; the step sums the terms whose weight is
//! not 0 (in the table's order) and reports each under its name.

use anyhow::Result;
use candle_core::Tensor;

use super::config::RecipeConfig;
use super::losses::{self, FreqBasis};

/// What a term may look at.
pub struct TermInput<'a> {
    pub cfg: &'a RecipeConfig,
    /// The (0-based) step, and the run's last step where known, for weights that change over a run.
    pub step: u64,
    pub end: Option<u64>,
    /// The decoder's output for the batch's latents (on the graph), f32 `[B, 3, H, W]`.
    pub fake: &'a Tensor,
    /// The batch's images.
    pub real: &'a Tensor,
    /// The batch's latents, `[B, C, h, w]` f32.
    pub latents: &'a Tensor,
    /// `fake + correction` (detached), where the GAN ran this step.
    pub target: Option<&'a Tensor>,
    /// The DFT basis of the frequency term, where its weight is not 0.
    pub freq: Option<&'a FreqBasis>,
    /// The initial (frozen) decoder's output for the same latents, where the detail term's
    /// weight is not 0.
    pub initial: Option<&'a Tensor>,
    /// `fake` encoded again by the run's encoder (on the graph through `fake` only), where the
    /// cycle term's weight is not 0.
    pub cycle: Option<&'a Tensor>,
}

/// One term of the decoder's loss.
pub struct DecoderTerm {
    /// Its name in the step report and `metrics.jsonl`.
    pub name: &'static str,
    /// Its weight at this step (0: off).
    pub weight: fn(&TermInput) -> f64,
    /// Its value (a scalar), or `None` where it does not apply this step.
    pub value: fn(&TermInput) -> Result<Option<Tensor>>,
}

/// The terms, in the order they are summed.
pub const TERMS: &[DecoderTerm] = &[
    // seraena's: pull the decoder's output towards `fake + correction`.
    DecoderTerm {
        name: "gan",
        weight: |i| i.cfg.gan_weight,
        value: |i| i.target.map(|t| losses::mse(i.fake, t)).transpose(),
    },
    // The faint colour term: MSE of `lowres_factor`-pooled images.
    DecoderTerm {
        name: "lowres_mse",
        weight: |i| i.cfg.lowres_mse_weight,
        value: |i| Ok(Some(losses::lowres_mse(i.fake, i.real, i.cfg.lowres_factor)?)),
    },
    // Full-resolution MSE (blurs on its own; may fade out over the run).
    DecoderTerm {
        name: "fullres_mse",
        weight: |i| i.cfg.fullres_mse_weight_at(i.step, i.end),
        value: |i| Ok(Some(losses::mse(i.fake, i.real)?)),
    },
    // L1 between DFT amplitudes of patches.
    DecoderTerm {
        name: "freq",
        weight: |i| i.cfg.freq_weight,
        value: |i| i.freq.map(|fb| fb.amplitude_l1(i.fake, i.real)).transpose(),
    },
    // The initial decoder's detail (what lowres_factor-pooling removes), for fine-tuning.
    DecoderTerm {
        name: "detail",
        weight: |i| i.cfg.detail_weight,
        value: |i| i.initial.map(|a| losses::detail_mse(i.fake, a, i.cfg.lowres_factor)).transpose(),
    },
    // The latent cycle: the decoded image encoded again, against the latents it was decoded from.
    DecoderTerm {
        name: "cycle",
        weight: |i| i.cfg.cycle_weight,
        value: |i| i.cycle.map(|z| losses::mse(z, i.latents)).transpose(),
    },
];

/// This step's `(name, weight, value)` terms: in the pixel warm-up the full-resolution MSE alone
/// (weight 1), else every term of [`TERMS`] with a weight and a value.
pub fn decoder_terms(input: &TermInput, pixel_phase: bool) -> Result<Vec<(&'static str, f64, Tensor)>> {
    if pixel_phase {
        return Ok(vec![("fullres_mse", 1.0, losses::mse(input.fake, input.real)?)]);
    }
    let mut out = Vec::new();
    for t in TERMS {
        let w = (t.weight)(input);
        if w == 0.0 {
            continue;
        }
        if let Some(v) = (t.value)(input)? {
            out.push((t.name, w, v));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn terms_with_a_weight_and_a_value_in_table_order() {
        let fake = Tensor::new(&[[[[0.2f32, 0.4], [0.6, 0.8]]]], &Device::Cpu).unwrap().repeat((1, 3, 4, 4)).unwrap();
        let real = (fake.clone() + 0.1).unwrap();
        let target = (fake.clone() + 1.0).unwrap();
        let cfg = RecipeConfig { fullres_mse_weight: 0.5, ..Default::default() };
        let names = |ts: &[(&str, f64, Tensor)]| ts.iter().map(|(n, w, _)| (n.to_string(), *w)).collect::<Vec<_>>();
        let with_gan = TermInput {
            cfg: &cfg,
            step: 0,
            end: None,
            fake: &fake,
            real: &real,
            latents: &real,
            target: Some(&target),
            freq: None,
            initial: None,
            cycle: None,
        };
        let t = decoder_terms(&with_gan, false).unwrap();
        assert_eq!(names(&t), [("gan".into(), 1.0), ("lowres_mse".into(), 1.0), ("fullres_mse".into(), 0.5)]);
        let v = |i: usize| t[i].2.to_scalar::<f32>().unwrap();
        assert!((v(0) - 1.0).abs() < 1e-6 && (v(1) - 0.01).abs() < 1e-6 && (v(2) - 0.01).abs() < 1e-6);
        // No GAN this step (no target): the term is left out; a zero weight turns a term off.
        let no_gan = TermInput { target: None, ..with_gan };
        let cfg0 = RecipeConfig { lowres_mse_weight: 0.0, ..cfg.clone() };
        let no_gan0 = TermInput { cfg: &cfg0, ..no_gan };
        assert_eq!(names(&decoder_terms(&no_gan0, false).unwrap()), [("fullres_mse".into(), 0.5)]);
        // The pixel warm-up: the full-resolution MSE alone, at weight 1.
        assert_eq!(names(&decoder_terms(&no_gan, true).unwrap()), [("fullres_mse".into(), 1.0)]);
        // The detail term needs the initial decoder's output: left out without it.
        let cfg_d = RecipeConfig { detail_weight: 2.0, ..cfg0.clone() };
        let no_gan_d = TermInput { cfg: &cfg_d, ..no_gan0 };
        assert_eq!(names(&decoder_terms(&no_gan_d, false).unwrap()), [("fullres_mse".into(), 0.5)]);
        let with_initial = TermInput { initial: Some(&real), ..no_gan_d };
        let t = decoder_terms(&with_initial, false).unwrap();
        assert_eq!(names(&t), [("fullres_mse".into(), 0.5), ("detail".into(), 2.0)]);
        // fake and real differ by a constant: no detail difference.
        assert!(t[1].2.to_scalar::<f32>().unwrap().abs() < 1e-9);
        // The cycle term needs the re-encoded latents: left out without them, MSE to the latents
        // with them (here `real + 0.5` against `real`: 0.25).
        let cfg_c = RecipeConfig { cycle_weight: 0.5, ..cfg0.clone() };
        let no_gan_c = TermInput { cfg: &cfg_c, ..no_gan0 };
        assert_eq!(names(&decoder_terms(&no_gan_c, false).unwrap()), [("fullres_mse".into(), 0.5)]);
        let reencoded = (real.clone() + 0.5).unwrap();
        let t = decoder_terms(&TermInput { cycle: Some(&reencoded), ..no_gan_c }, false).unwrap();
        assert_eq!(names(&t), [("fullres_mse".into(), 0.5), ("cycle".into(), 0.5)]);
        assert!((t[1].2.to_scalar::<f32>().unwrap() - 0.25).abs() < 1e-6);
        // Every term has a distinct name and a weight field.
        let mut n: Vec<_> = TERMS.iter().map(|t| t.name).collect();
        n.dedup();
        assert_eq!(n.len(), TERMS.len());
    }

    #[test]
    fn a_fading_full_resolution_mse_leaves_the_sum_when_its_weight_reaches_zero() {
        let fake = Tensor::zeros((1, 3, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        let real = (fake.clone() + 0.1).unwrap();
        let target = (fake.clone() + 1.0).unwrap();
        // Fades from 1.0 after a 10-step pixel warm-up to 0 at half of a 110-step run (step 55).
        let cfg = RecipeConfig {
            fullres_mse_weight: 1.0,
            fullres_mse_fade: 0.5,
            pixel_warmup_steps: 10,
            ..Default::default()
        };
        let at = |step, end| {
            let i = TermInput {
                cfg: &cfg,
                step,
                end,
                fake: &fake,
                real: &real,
                latents: &real,
                target: Some(&target),
                freq: None,
                initial: None,
                cycle: None,
            };
            decoder_terms(&i, cfg.pixel_phase(step))
                .unwrap()
                .iter()
                .map(|(n, w, _)| (n.to_string(), *w))
                .collect::<Vec<_>>()
        };
        let full = |w: f64| vec![("gan".into(), 1.0), ("lowres_mse".into(), 1.0), ("fullres_mse".into(), w)];
        assert_eq!(at(3, Some(110)), [("fullres_mse".to_string(), 1.0)]); // the pixel warm-up
        assert_eq!(at(10, Some(110)), full(1.0));
        let mid = at(40, Some(110));
        assert!((mid[2].1 - 1.0 / 3.0).abs() < 1e-12, "{mid:?}");
        assert_eq!(at(55, Some(110)), full(0.0)[..2]);
        assert_eq!(at(109, Some(110)), full(0.0)[..2]);
        // An unknown end: no fade.
        assert_eq!(at(109, None), full(1.0));
    }
}
