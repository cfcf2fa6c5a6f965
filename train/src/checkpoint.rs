//! Run checkpoints: `checkpoints/step-00001000/` holding the recipe's complete state
//! (`recipe/`, written by `Recipe::save_state`) and the trainer's own (`trainer.json`: data
//! position, counters). A checkpoint is written into `checkpoints/.tmp-step-…` and renamed into
//! place when complete, so a kill at any moment never leaves a partial checkpoint under a final
//! name; the latest checkpoint is the highest complete step.

use crate::order::Position;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const CHECKPOINTS_DIR: &str = "checkpoints";
pub const RECIPE_DIR: &str = "recipe";
pub const TRAINER_FILE: &str = "trainer.json";
const TMP_PREFIX: &str = ".tmp-";

/// The trainer's part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimisation steps done (the recipe's step count).
    pub step: u64,
    /// Where the training stream continues.
    pub data_position: Position,
    /// Training images consumed so far.
    pub images_seen: u64,
    /// Steps the NaN guard skipped so far.
    pub skipped_steps: u64,
    /// Training rows skipped as bad data so far (`data.skip_bad_rows`).
    #[serde(default)]
    pub skipped_rows: u64,
    /// Wall-clock seconds spent training so far (all sessions).
    pub train_seconds: f64,
    /// The data seed (the run seed) the stream was built with.
    pub seed: u64,
    /// Shard rows when the run started (a changed folder is reported on resume).
    pub shard_rows: u64,
}

/// The folder name of step `s`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Where rank `rank` (> 0) of a data-parallel run leaves its own part of the checkpoint of
/// `step` (its replay buffer) for rank 0 to move in as [`rank_dir`].
pub fn rank_staging(run_dir: &Path, step: u64, rank: usize) -> PathBuf {
    run_dir.join(CHECKPOINTS_DIR).join(format!("{TMP_PREFIX}rank-{rank}-{}", step_dir_name(step)))
}

/// Rank `rank`'s own state inside a checkpoint's recipe folder (`recipe/rank-1/`, ...).
pub fn rank_dir(recipe_dir: &Path, rank: usize) -> PathBuf {
    recipe_dir.join(format!("rank-{rank}"))
}

fn parse_step(name: &str) -> Option<u64> {
    name.strip_prefix("step-").and_then(|s| s.parse().ok())
}

/// All complete checkpoints of a run, by step.
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let dir = run_dir.join(CHECKPOINTS_DIR);
    if !dir.is_dir() {
        return Ok(vec![]);
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        if let Some(s) = e.file_name().to_str().and_then(parse_step) {
            if e.path().join(TRAINER_FILE).is_file() {
                out.push((s, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The latest complete checkpoint.
pub fn latest(run_dir: &Path) -> Result<Option<(u64, PathBuf)>> {
    Ok(list(run_dir)?.pop())
}

/// Write a checkpoint atomically: `save_recipe` fills the recipe folder; the trainer state goes
/// beside it; then the folder is renamed into place. Older checkpoints beyond `keep` are removed
/// afterwards. Returns the checkpoint folder.
pub fn save(
    run_dir: &Path,
    state: &TrainerState,
    keep: usize,
    save_recipe: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let dir = run_dir.join(CHECKPOINTS_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = step_dir_name(state.step);
    let tmp = dir.join(format!("{TMP_PREFIX}{name}"));
    let fin = dir.join(&name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove the stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(tmp.join(RECIPE_DIR)).with_context(|| format!("cannot create {}", tmp.display()))?;
    save_recipe(&tmp.join(RECIPE_DIR)).with_context(|| format!("saving the training state into {}", tmp.display()))?;
    let json = serde_json::to_string_pretty(state)?;
    std::fs::write(tmp.join(TRAINER_FILE), json + "\n").with_context(|| format!("cannot write {}", tmp.display()))?;
    sync_tree(&tmp)?;
    if fin.exists() {
        // The same step saved again (e.g. a resumed run that stops where it started).
        let old = dir.join(format!("{TMP_PREFIX}old-{name}"));
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(&fin, &old).with_context(|| format!("cannot move {} aside", fin.display()))?;
        std::fs::rename(&tmp, &fin).with_context(|| format!("cannot rename {} to {}", tmp.display(), fin.display()))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, &fin).with_context(|| format!("cannot rename {} to {}", tmp.display(), fin.display()))?;
    }
    sync_dir(&dir);
    let all = list(run_dir)?;
    if all.len() > keep {
        for (_, p) in &all[..all.len() - keep] {
            std::fs::remove_dir_all(p).with_context(|| format!("cannot remove the old checkpoint {}", p.display()))?;
        }
    }
    Ok(fin)
}

/// Read a checkpoint's trainer state.
pub fn read_state(ck: &Path) -> Result<TrainerState> {
    let p = ck.join(TRAINER_FILE);
    let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a trainer state", p.display()))
}

/// Remove temp folders a killed run left behind.
pub fn clean_temp(run_dir: &Path) -> Result<()> {
    let dir = run_dir.join(CHECKPOINTS_DIR);
    if !dir.is_dir() {
        return Ok(());
    }
    for e in std::fs::read_dir(&dir)?.flatten() {
        if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            std::fs::remove_dir_all(e.path()).with_context(|| format!("cannot remove {}", e.path().display()))?;
        }
    }
    Ok(())
}

fn sync_tree(dir: &Path) -> Result<()> {
    for e in walk(dir)? {
        if e.is_file() {
            std::fs::File::open(&e).and_then(|f| f.sync_all()).with_context(|| format!("fsync {}", e.display()))?;
        }
    }
    Ok(())
}

fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else {
            out.push(p);
        }
    }
    Ok(out)
}

fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Refuse to start a fresh run over an existing one.
pub fn ensure_fresh(run_dir: &Path) -> Result<()> {
    if let Some((s, _)) = latest(run_dir)? {
        bail!(
            "run folder {} already has a checkpoint at step {s}: pass --resume to continue it, or choose another --run-dir",
            run_dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(step: u64) -> TrainerState {
        TrainerState {
            step,
            skipped_rows: 0,
            data_position: Position { epoch: 1, index: step },
            images_seen: step * 4,
            skipped_steps: 0,
            train_seconds: 1.5,
            seed: 3,
            shard_rows: 10,
        }
    }

    #[test]
    fn checkpoints_are_atomic_listed_and_pruned() {
        let run = tempfile::tempdir().unwrap();
        assert!(latest(run.path()).unwrap().is_none());
        ensure_fresh(run.path()).unwrap();
        for s in [10, 20, 30] {
            save(run.path(), &st(s), 2, |d| {
                std::fs::write(d.join("state.json"), format!("{s}"))?;
                Ok(())
            })
            .unwrap();
        }
        let l = list(run.path()).unwrap();
        assert_eq!(l.iter().map(|x| x.0).collect::<Vec<_>>(), [20, 30]);
        let (s, p) = latest(run.path()).unwrap().unwrap();
        assert_eq!(s, 30);
        assert_eq!(read_state(&p).unwrap(), st(30));
        assert_eq!(std::fs::read_to_string(p.join("recipe/state.json")).unwrap(), "30");
        assert!(ensure_fresh(run.path()).unwrap_err().to_string().contains("--resume"));

        // A save that fails half-way leaves the latest checkpoint as it was.
        let e = save(run.path(), &st(40), 2, |d| {
            std::fs::write(d.join("state.json"), "partial")?;
            bail!("disk full")
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("disk full"));
        assert_eq!(latest(run.path()).unwrap().unwrap().0, 30);
        clean_temp(run.path()).unwrap();
        assert_eq!(std::fs::read_dir(run.path().join(CHECKPOINTS_DIR)).unwrap().count(), 2);

        // Saving the same step again replaces it.
        save(run.path(), &st(30), 2, |d| Ok(std::fs::write(d.join("state.json"), "again")?)).unwrap();
        let (_, p) = latest(run.path()).unwrap().unwrap();
        assert_eq!(std::fs::read_to_string(p.join("recipe/state.json")).unwrap(), "again");
    }
}
