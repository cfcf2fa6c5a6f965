//! `train decode`: latents to PNGs with a TAESD decoder. Latents come from a shard folder (the
//! teacher latents of each row), a `.safetensors` or `.npy` file (`[C, h, w]` or
//! `[B, C, h, w]`), or a folder of such files (e.g. what `train encode` wrote).

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use std::path::{Path, PathBuf};

pub struct DecodeArgs {
    pub model: PathBuf,
    pub variant: Option<taesd::Variant>,
    pub latents: PathBuf,
    pub out: PathBuf,
    pub batch_size: usize,
    /// At most this many latents (0 = all).
    pub limit: usize,
    pub device: Device,
}

#[derive(Debug, Default)]
pub struct DecodeSummary {
    pub files: Vec<PathBuf>,
}

/// A latent and the name of its PNG (relative to the output folder, without extension).
struct Item {
    name: String,
    z: Tensor,
}

fn latents_of_tensor(name: &str, t: Tensor, what: &Path) -> Result<Vec<Item>> {
    let t = t.to_dtype(DType::F32)?;
    Ok(match t.rank() {
        3 => vec![Item { name: name.to_string(), z: t }],
        4 => {
            let n = t.dim(0)?;
            (0..n)
                .map(|i| Ok(Item { name: if n == 1 { name.to_string() } else { format!("{name}_{i}") }, z: t.get(i)? }))
                .collect::<Result<_>>()?
        }
        r => bail!("{}: a latent must be [C, h, w] or [B, C, h, w], got rank {r}", what.display()),
    })
}

fn read_file(path: &Path, rel_stem: &str) -> Result<Vec<Item>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "npy" => {
            let t = Tensor::read_npy(path).with_context(|| format!("cannot read {}", path.display()))?;
            latents_of_tensor(rel_stem, t, path)
        }
        "safetensors" => {
            let mut tensors: Vec<(String, Tensor)> = candle_core::safetensors::load(path, &Device::Cpu)
                .with_context(|| format!("cannot read {}", path.display()))?
                .into_iter()
                .collect();
            tensors.sort_by(|a, b| a.0.cmp(&b.0));
            ensure!(!tensors.is_empty(), "{} holds no tensors", path.display());
            let single = tensors.len() == 1;
            let mut out = Vec::new();
            for (n, t) in tensors {
                let name = if single { rel_stem.to_string() } else { format!("{rel_stem}_{n}") };
                out.extend(latents_of_tensor(&name, t, path)?);
            }
            Ok(out)
        }
        _ => bail!("{}: not a .safetensors or .npy file", path.display()),
    }
}

fn collect_files(dir: &Path, root: &Path, out: &mut Vec<(PathBuf, String)>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect_files(&p, root, out)?;
        } else if p.extension().is_some_and(|e| e == "npy" || e == "safetensors") {
            let rel = p.strip_prefix(root).unwrap_or(&p).with_extension("");
            out.push((p.clone(), rel.to_string_lossy().replace('\\', "/")));
        }
    }
    Ok(())
}

/// Every latent `src` stands for, in a fixed order.
fn gather(src: &Path, limit: usize) -> Result<Vec<Item>> {
    let limit = if limit == 0 { usize::MAX } else { limit };
    let mut items = Vec::new();
    if src.is_dir() && !taesd_data::OutputLayout::locate(src).shard_files()?.is_empty() {
        let set = crate::dataset::ShardSet::open(src)?;
        let [c, h, w] = set.latent_shape.map(|v| v as usize);
        set.scan(|r| {
            let name = if r.variant == 0 { r.key.clone() } else { format!("{}_v{}", r.key, r.variant) };
            items.push(Item { name, z: Tensor::from_vec(r.latent, (c, h, w), &Device::Cpu)? });
            Ok(items.len() < limit)
        })?;
    } else if src.is_dir() {
        let mut files = Vec::new();
        collect_files(src, src, &mut files)?;
        ensure!(!files.is_empty(), "{} holds no shards, .safetensors or .npy files", src.display());
        for (f, rel) in files {
            items.extend(read_file(&f, &rel)?);
            if items.len() >= limit {
                break;
            }
        }
    } else {
        ensure!(src.is_file(), "{} does not exist", src.display());
        let stem = src.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "latent".into());
        items = read_file(src, &stem)?;
    }
    items.truncate(limit);
    // `a.npy` and `a.safetensors` side by side: keep both, as `a.png` and `a_2.png`.
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for it in &mut items {
        let n = seen.entry(it.name.clone()).or_insert(0);
        *n += 1;
        if *n > 1 {
            it.name = format!("{}_{}", it.name, n);
        }
    }
    Ok(items)
}

pub fn run(a: &DecodeArgs) -> Result<DecodeSummary> {
    let model = crate::models::load(&a.model, a.variant, &a.device)?;
    let decoder = model.decoder().map_err(|e| anyhow::anyhow!("{}: {e}", a.model.display()))?;
    let items = gather(&a.latents, a.limit)?;
    ensure!(!items.is_empty(), "no latents in {}", a.latents.display());
    let c = model.config.latent_channels;
    for it in &items {
        ensure!(
            it.z.dim(0)? == c,
            "latent `{}` has {} channels but the model ({}) takes {c}",
            it.name,
            it.z.dim(0)?,
            model.config.describe()
        );
    }
    let mut summary = DecodeSummary::default();
    let mut i = 0;
    while i < items.len() {
        let shape = items[i].z.dims().to_vec();
        let mut j = i + 1;
        while j < items.len() && j - i < a.batch_size.max(1) && items[j].z.dims() == shape.as_slice() {
            j += 1;
        }
        let batch = Tensor::stack(&items[i..j].iter().map(|it| &it.z).collect::<Vec<_>>(), 0)?.to_device(&a.device)?;
        let y = decoder.forward(&batch).context("decoder forward")?;
        for (k, it) in items[i..j].iter().enumerate() {
            let img = crate::preview::to_rgb(&y.get(k)?)?;
            let rel: PathBuf = it.name.split(['/', ':']).filter(|p| !p.is_empty() && *p != "..").collect();
            let mut p = a.out.join(rel);
            let fname = format!("{}.png", p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
            p.set_file_name(fname);
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            }
            img.save(&p).with_context(|| format!("cannot write {}", p.display()))?;
            summary.files.push(p);
        }
        i = j;
    }
    Ok(summary)
}
