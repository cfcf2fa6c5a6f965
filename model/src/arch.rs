//! The encoder and decoder as taesd.py writes them: an `nn.Sequential` list of layers. A layer's
//! position in the list is its state-dict index, so the one list both builds the model
//! (`vb.pp(i)`) and says which tensors, of which shapes, a checkpoint must hold.

use crate::variant::{Downscale, TaesdConfig};

/// One entry of the reference's `nn.Sequential`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerSpec {
    /// 3x3 conv, padding 1.
    Conv {
        c_in: usize,
        c_out: usize,
        stride: usize,
        bias: bool,
    },
    /// taesd.py `Block(c_in, c_out)`; `pool`: TAEF2's mid-block GroupNorm pool.
    Block {
        c_in: usize,
        c_out: usize,
        pool: bool,
    },
    Relu,
    /// `nn.Upsample(scale_factor=2)` (nearest).
    Upsample,
    /// `Clamp`: `tanh(x / 3) * 3`.
    Clamp,
}

/// Channels of the hidden layer of the mid-block pool: 4x the block's.
pub const POOL_EXPANSION: usize = 4;
/// Groups of the pool's GroupNorm.
pub const POOL_GROUPS: usize = 4;
/// PyTorch's GroupNorm default eps.
pub const POOL_EPS: f64 = 1e-5;

impl LayerSpec {
    fn conv(c_in: usize, c_out: usize) -> Self {
        LayerSpec::Conv { c_in, c_out, stride: 1, bias: true }
    }
    fn conv_nb(c_in: usize, c_out: usize) -> Self {
        LayerSpec::Conv { c_in, c_out, stride: 1, bias: false }
    }
    fn down(c: usize) -> Self {
        LayerSpec::Conv { c_in: c, c_out: c, stride: 2, bias: false }
    }
    fn block(c: usize, pool: bool) -> Self {
        LayerSpec::Block { c_in: c, c_out: c, pool }
    }

    /// The layer's tensors, named relative to the layer (`weight`, `conv.0.weight`, ...).
    pub fn params(&self) -> Vec<(String, Vec<usize>)> {
        let mut p = Vec::new();
        match *self {
            LayerSpec::Conv { c_in, c_out, bias, .. } => {
                p.push(("weight".to_string(), vec![c_out, c_in, 3, 3]));
                if bias {
                    p.push(("bias".to_string(), vec![c_out]));
                }
            }
            LayerSpec::Block { c_in, c_out, pool } => {
                for (i, ci) in [(0, c_in), (2, c_out), (4, c_out)] {
                    p.push((format!("conv.{i}.weight"), vec![c_out, ci, 3, 3]));
                    p.push((format!("conv.{i}.bias"), vec![c_out]));
                }
                if c_in != c_out {
                    p.push(("skip.weight".to_string(), vec![c_out, c_in, 1, 1]));
                }
                if pool {
                    let g = c_in * POOL_EXPANSION;
                    p.push(("pool.0.weight".to_string(), vec![g, c_in, 1, 1]));
                    p.push(("pool.1.weight".to_string(), vec![g]));
                    p.push(("pool.1.bias".to_string(), vec![g]));
                    p.push(("pool.3.weight".to_string(), vec![c_in, g, 1, 1]));
                }
            }
            LayerSpec::Relu | LayerSpec::Upsample | LayerSpec::Clamp => {}
        }
        p
    }
}

/// Three `Block(ch, ch)` in a row.
fn blocks3(ch: usize, pool: bool) -> [LayerSpec; 3] {
    [LayerSpec::block(ch, pool); 3]
}

/// The encoder's layers: [0, 1] image -> scaled latent.
pub fn encoder_spec(cfg: &TaesdConfig) -> Vec<LayerSpec> {
    use LayerSpec::*;
    let c = cfg.latent_channels;
    let pool = cfg.midblock_pool;
    let mut l = match cfg.downscale {
        Downscale::X8 => vec![LayerSpec::conv(3, 64), LayerSpec::block(64, false)],
        Downscale::X32 => vec![
            Conv { c_in: 3, c_out: 32, stride: 2, bias: true },
            Relu,
            Conv { c_in: 32, c_out: 64, stride: 2, bias: true },
            Relu,
            LayerSpec::block(64, false),
        ],
    };
    for stage in 0..3 {
        l.push(LayerSpec::down(64));
        // TAEF2: the pool sits in the last (lowest-resolution) stage.
        l.extend(blocks3(64, pool && stage == 2));
    }
    l.push(LayerSpec::conv(64, c));
    l
}

/// The decoder's layers: scaled latent -> [0, 1] image (unclamped).
pub fn decoder_spec(cfg: &TaesdConfig) -> Vec<LayerSpec> {
    use LayerSpec::*;
    let c = cfg.latent_channels;
    let pool = cfg.midblock_pool;
    match cfg.downscale {
        Downscale::X8 => {
            let mut l = vec![Clamp, LayerSpec::conv(c, 64), Relu];
            for stage in 0..3 {
                // TAEF2: the pool sits in the first (lowest-resolution) stage.
                l.extend(blocks3(64, pool && stage == 0));
                l.extend([Upsample, LayerSpec::conv_nb(64, 64)]);
            }
            l.extend([LayerSpec::block(64, false), LayerSpec::conv(64, 3)]);
            l
        }
        Downscale::X32 => {
            let mut l = vec![Clamp, LayerSpec::conv(c, 256), Relu];
            l.extend(blocks3(256, pool));
            l.extend([Upsample, LayerSpec::conv_nb(256, 128)]);
            l.extend(blocks3(128, false));
            l.extend([Upsample, LayerSpec::conv_nb(128, 64)]);
            l.extend(blocks3(64, false));
            for _ in 0..2 {
                l.extend([Upsample, LayerSpec::conv_nb(64, 64)]);
                l.extend(blocks3(64, false));
            }
            l.extend([Upsample, LayerSpec::conv_nb(64, 64), LayerSpec::block(64, false), LayerSpec::conv(64, 3)]);
            l
        }
    }
}

/// Encoder or decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    Encoder,
    Decoder,
}

impl Part {
    pub const BOTH: [Part; 2] = [Part::Encoder, Part::Decoder];

    /// `encoder` / `decoder`: the prefix of this part's tensors in a `VarMap` (see [`crate::checkpoint`]).
    pub fn prefix(self) -> &'static str {
        match self {
            Part::Encoder => "encoder",
            Part::Decoder => "decoder",
        }
    }

    pub fn spec(self, cfg: &TaesdConfig) -> Vec<LayerSpec> {
        match self {
            Part::Encoder => encoder_spec(cfg),
            Part::Decoder => decoder_spec(cfg),
        }
    }
}

/// Every tensor of one part, with its taesd.py name (`1.conv.0.weight`) and shape, in order.
pub fn param_shapes(cfg: &TaesdConfig, part: Part) -> Vec<(String, Vec<usize>)> {
    part.spec(cfg)
        .iter()
        .enumerate()
        .flat_map(|(i, l)| l.params().into_iter().map(move |(n, s)| (format!("{i}.{n}"), s)))
        .collect()
}

/// Number of parameters of one part.
pub fn param_count(cfg: &TaesdConfig, part: Part) -> usize {
    param_shapes(cfg, part).iter().map(|(_, s)| s.iter().product::<usize>()).sum()
}

/// taesd.py index of the decoder's last conv (the one that outputs RGB).
pub fn decoder_last_conv_index(cfg: &TaesdConfig) -> usize {
    decoder_spec(cfg).len() - 1
}

/// The `VarMap` name of the decoder's output bias (`decoder.19.bias`, `decoder.29.bias` for
/// taesana), for a trainer that starts it at 0.5 (mid-grey).
pub fn decoder_last_conv_bias_name(cfg: impl Into<TaesdConfig>) -> String {
    let cfg = cfg.into();
    format!("{}.{}.bias", Part::Decoder.prefix(), decoder_last_conv_index(&cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::variant::Variant;

    #[test]
    fn indices_match_the_reference_files() {
        let cfg = Variant::Taef2.config();
        let enc: Vec<_> = param_shapes(&cfg, Part::Encoder).into_iter().map(|(n, _)| n).collect();
        assert_eq!(enc.len(), 79);
        assert_eq!(enc[0], "0.weight");
        assert!(enc.contains(&"11.pool.3.weight".to_string()));
        assert!(!enc.iter().any(|n| n.starts_with("10.pool")));
        assert_eq!(enc.last().unwrap(), "14.bias");
        let dec: Vec<_> = param_shapes(&cfg, Part::Decoder).into_iter().map(|(n, _)| n).collect();
        assert_eq!(dec.len(), 79);
        assert!(dec.contains(&"5.pool.1.bias".to_string()));
        assert!(!dec.iter().any(|n| n.starts_with("8.pool")));
        assert_eq!(dec.last().unwrap(), "19.bias");
        let sana = param_shapes(&Variant::Taesana.config(), Part::Encoder);
        assert_eq!(sana.len(), 69);
        assert_eq!(sana.last().unwrap(), &("17.bias".to_string(), vec![32]));
        assert_eq!(decoder_last_conv_bias_name(Variant::Taesd), "decoder.19.bias");
        assert_eq!(decoder_last_conv_bias_name(Variant::Taesana), "decoder.29.bias");
    }
}
