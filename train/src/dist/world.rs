//! [`World`]: which rank this process is, of how many, and where rank 0 listens, from the
//! variables a launcher sets. Read once by the binary (the libraries read no environment; see
//! `crate::switches`) through [`World::from_vars`] and handed down.
//!
//! * torchrun (and `train --gpus N`, which sets the same): `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//!   `MASTER_ADDR`, `MASTER_PORT`. Any of them set means all are needed (with `WORLD_SIZE=1`
//!   only `RANK=0`).
//! * Slurm (`srun`, one task per GPU), when `RANK`/`WORLD_SIZE` are not set: `SLURM_PROCID`,
//!   `SLURM_NTASKS`, `SLURM_LOCALID`; rank 0's host is the first of `SLURM_JOB_NODELIST` (or
//!   `SLURM_NODELIST`) unless `MASTER_ADDR` says otherwise, the port `MASTER_PORT` or else
//!   [`slurm_port`] of `SLURM_JOB_ID` (so two jobs on a node do not collide).
//! * Nothing set: one process, world size 1.
//!
//! `CUDA_VISIBLE_DEVICES`, when it lists exactly one device (Slurm's `--gpus-per-task=1`),
//! makes that device `cuda:0` of the process whatever its local rank ([`World::cuda_ordinal`]).

use anyhow::{bail, Context, Result};

/// Where the variables came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// Nothing set: one process.
    Single,
    /// `RANK`, `WORLD_SIZE`, ... (torchrun, `train --gpus N`, Kubernetes, by hand).
    Torchrun,
    /// `SLURM_PROCID`, `SLURM_NTASKS`, ...
    Slurm,
}

/// This process's place in a data-parallel job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub world_size: usize,
    /// Rank among the processes of this node: the GPU it uses (`cuda:LOCAL_RANK`).
    pub local_rank: usize,
    /// Rank 0's host (empty for world size 1).
    pub master_addr: String,
    pub master_port: u16,
    pub launcher: Launcher,
    /// Devices `CUDA_VISIBLE_DEVICES` lists (`None`: not set).
    pub visible_gpus: Option<usize>,
    /// Rank 0 only, under `train --gpus N`: the rendezvous socket the launcher bound and handed
    /// down open (`TAESD_RENDEZVOUS_FD`), listened on instead of binding `MASTER_PORT` again (a
    /// port found free and bound later could be taken in between by another process).
    pub listen_fd: Option<i32>,
}

/// The variables [`World::from_vars`] reads (for a start-up line and the docs).
pub const VARS: &[&str] = &[
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_JOB_NODELIST",
    "SLURM_NODELIST",
    "SLURM_JOB_ID",
    "CUDA_VISIBLE_DEVICES",
    RENDEZVOUS_FD,
];

/// The variable through which `train --gpus N` hands rank 0 its bound rendezvous socket.
pub const RENDEZVOUS_FD: &str = "TAESD_RENDEZVOUS_FD";

/// The port of a Slurm job without `MASTER_PORT`: 29500 + job id mod 2000 (29500..31499).
pub fn slurm_port(job_id: Option<u64>) -> u16 {
    29500 + (job_id.unwrap_or(0) % 2000) as u16
}

impl World {
    /// One process.
    pub fn single() -> World {
        World {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: String::new(),
            master_port: 0,
            launcher: Launcher::Single,
            visible_gpus: None,
            listen_fd: None,
        }
    }

    /// More than one process.
    pub fn is_distributed(&self) -> bool {
        self.world_size > 1
    }

    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Read the launcher's variables through `get` (the binary passes `std::env::var`).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<World> {
        let get = |k: &str| get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let visible_gpus = get("CUDA_VISIBLE_DEVICES").map(|v| v.split(',').filter(|s| !s.trim().is_empty()).count());
        let torch: Vec<&str> = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]
            .into_iter()
            .filter(|k| get(k).is_some())
            .collect();
        let num = |k: &str| -> Result<Option<usize>> {
            get(k).map(|v| v.parse::<usize>().with_context(|| format!("{k}={v} is not a number"))).transpose()
        };
        let port = |v: String| -> Result<u16> {
            match v.parse::<u16>() {
                Ok(p) if p > 0 => Ok(p),
                _ => bail!("MASTER_PORT={v} is not a port (1-65535)"),
            }
        };
        let mut w = if torch.contains(&"RANK") || torch.contains(&"WORLD_SIZE") {
            let (rank, size) = match (num("RANK")?, num("WORLD_SIZE")?) {
                (Some(r), Some(s)) => (r, s),
                _ => bail!(
                    "{} set without {}: a data-parallel launch needs RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT",
                    torch.join(", "),
                    if num("RANK")?.is_none() { "RANK" } else { "WORLD_SIZE" }
                ),
            };
            let missing: Vec<&str> =
                ["LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"].into_iter().filter(|k| get(k).is_none()).collect();
            if size > 1 && !missing.is_empty() {
                bail!(
                    "RANK={rank} WORLD_SIZE={size} set without {}: a data-parallel launch needs RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT",
                    missing.join(", ")
                );
            }
            World {
                rank,
                world_size: size,
                local_rank: num("LOCAL_RANK")?.unwrap_or(0),
                master_addr: get("MASTER_ADDR").unwrap_or_default(),
                master_port: get("MASTER_PORT").map(port).transpose()?.unwrap_or(0),
                launcher: Launcher::Torchrun,
                visible_gpus,
                listen_fd: match get(RENDEZVOUS_FD) {
                    Some(v) if rank == 0 => Some(
                        v.parse::<i32>()
                            .ok()
                            .filter(|fd| *fd > 2)
                            .with_context(|| format!("{RENDEZVOUS_FD}={v} is not a file descriptor"))?,
                    ),
                    _ => None,
                },
            }
        } else if get("SLURM_PROCID").is_some() {
            let (rank, size) = match (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
                (Some(r), Some(s)) => (r, s),
                _ => bail!("SLURM_PROCID set without SLURM_NTASKS: start the ranks with srun (one task per GPU)"),
            };
            let local_rank = match num("SLURM_LOCALID")? {
                Some(l) => l,
                None if size == 1 => 0,
                None => bail!("SLURM_PROCID={rank} SLURM_NTASKS={size} set without SLURM_LOCALID"),
            };
            let master_addr = if size == 1 {
                String::new()
            } else if let Some(a) = get("MASTER_ADDR") {
                a
            } else {
                let list = get("SLURM_JOB_NODELIST").or_else(|| get("SLURM_NODELIST")).context(
                    "SLURM_PROCID and SLURM_NTASKS set without SLURM_JOB_NODELIST (nor MASTER_ADDR): where does rank 0 run?",
                )?;
                super::nodelist::first_host(&list).context("SLURM_JOB_NODELIST")?
            };
            let job = get("SLURM_JOB_ID").and_then(|j| j.parse::<u64>().ok());
            World {
                rank,
                world_size: size,
                local_rank,
                master_addr,
                master_port: match get("MASTER_PORT") {
                    Some(p) => port(p)?,
                    None => slurm_port(job),
                },
                launcher: Launcher::Slurm,
                visible_gpus,
                listen_fd: None,
            }
        } else if !torch.is_empty() {
            bail!("{} set without RANK and WORLD_SIZE (a data-parallel launch needs both)", torch.join(", "));
        } else {
            World { visible_gpus, ..World::single() }
        };
        if w.world_size == 0 {
            bail!("world size 0: at least one process");
        }
        if w.rank >= w.world_size {
            bail!("rank {} of a world of {}: a rank is 0..{}", w.rank, w.world_size, w.world_size - 1);
        }
        if w.local_rank > w.rank {
            bail!("local rank {} above the global rank {}: inconsistent launcher variables", w.local_rank, w.rank);
        }
        if w.world_size == 1 {
            w.master_addr.clear();
        }
        Ok(w)
    }

    /// The CUDA device ordinal this rank uses: its local rank, or 0 where
    /// `CUDA_VISIBLE_DEVICES` shows the process a single GPU.
    pub fn cuda_ordinal(&self) -> usize {
        match self.visible_gpus {
            Some(1) => 0,
            _ => self.local_rank,
        }
    }

    /// `rank r/N` for messages.
    pub fn describe(&self) -> String {
        match self.launcher {
            Launcher::Single => "one process".into(),
            l => format!(
                "rank {}/{} (local rank {}, {:?} variables), rank 0 at {}:{}",
                self.rank, self.world_size, self.local_rank, l, self.master_addr, self.master_port
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn world(vars: &[(&str, &str)]) -> Result<World> {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        World::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn nothing_set_is_one_process() {
        let w = world(&[]).unwrap();
        assert_eq!(w, World::single());
        assert!(!w.is_distributed() && w.is_root());
        assert_eq!(world(&[("CUDA_VISIBLE_DEVICES", "3")]).unwrap().cuda_ordinal(), 0);
    }

    #[test]
    fn torchrun_variables() {
        let w = world(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node-a"),
            ("MASTER_PORT", "29400"),
        ])
        .unwrap();
        assert_eq!((w.rank, w.world_size, w.local_rank, w.master_port), (5, 8, 1, 29400));
        assert_eq!((w.master_addr.as_str(), w.launcher), ("node-a", Launcher::Torchrun));
        assert_eq!(w.cuda_ordinal(), 1);
        // Torchrun's variables win over Slurm's (torchrun inside an srun allocation).
        let w = world(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1234"),
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
        ])
        .unwrap();
        assert_eq!((w.rank, w.world_size, w.launcher), (0, 2, Launcher::Torchrun));
        // World size 1 needs no rendezvous.
        let w = world(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap();
        assert!(!w.is_distributed());
        // `train --gpus N` hands rank 0 its bound socket; other ranks ignore the variable.
        let launched = |rank: &str, fd: &str| {
            world(&[
                ("RANK", rank),
                ("WORLD_SIZE", "2"),
                ("LOCAL_RANK", rank),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", "1234"),
                (RENDEZVOUS_FD, fd),
            ])
        };
        assert_eq!(launched("0", "7").unwrap().listen_fd, Some(7));
        assert_eq!(launched("1", "7").unwrap().listen_fd, None);
        let m = format!("{:#}", launched("0", "x").unwrap_err());
        assert!(m.contains("TAESD_RENDEZVOUS_FD=x is not a file descriptor"), "{m}");
    }

    #[test]
    fn partial_or_inconsistent_torchrun_variables_are_errors() {
        let e = |v: &[(&str, &str)]| format!("{:#}", world(v).unwrap_err());
        let m = e(&[("RANK", "1"), ("WORLD_SIZE", "2")]);
        assert!(m.contains("LOCAL_RANK, MASTER_ADDR, MASTER_PORT"), "{m}");
        let m = e(&[("RANK", "1"), ("LOCAL_RANK", "1")]);
        assert!(m.contains("without WORLD_SIZE"), "{m}");
        let m = e(&[("MASTER_ADDR", "x"), ("MASTER_PORT", "1")]);
        assert!(m.contains("without RANK and WORLD_SIZE"), "{m}");
        let full = |rank: &'static str, size: &'static str, port: &'static str| {
            e(&[("RANK", rank), ("WORLD_SIZE", size), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "h"), ("MASTER_PORT", port)])
        };
        assert!(full("2", "2", "5").contains("rank 2 of a world of 2"));
        assert!(full("0", "0", "5").contains("world size 0"));
        assert!(full("x", "2", "5").contains("RANK=x is not a number"));
        assert!(full("0", "2", "70000").contains("MASTER_PORT=70000"));
        assert!(full("0", "2", "0").contains("MASTER_PORT=0"));
    }

    #[test]
    fn slurm_variables() {
        let w = world(&[
            ("SLURM_PROCID", "9"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[01-03,07],cpu5"),
            ("SLURM_JOB_ID", "123456"),
            ("CUDA_VISIBLE_DEVICES", "1"),
        ])
        .unwrap();
        assert_eq!((w.rank, w.world_size, w.local_rank), (9, 16, 1));
        assert_eq!((w.master_addr.as_str(), w.master_port, w.launcher), ("gpu01", 29500 + 1456, Launcher::Slurm));
        assert_eq!(w.cuda_ordinal(), 0, "one visible GPU is cuda:0");
        let e = format!(
            "{:#}",
            world(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "0")]).unwrap_err()
        );
        assert!(e.contains("SLURM_JOB_NODELIST"), "{e}");
        let e = format!("{:#}", world(&[("SLURM_PROCID", "0")]).unwrap_err());
        assert!(e.contains("SLURM_NTASKS"), "{e}");
        let e = format!(
            "{:#}",
            world(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "0"), ("SLURM_NODELIST", "n[1-")])
                .unwrap_err()
        );
        assert!(e.contains("unbalanced"), "{e}");
        // One task: no rendezvous, no node list needed.
        assert!(!world(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]).unwrap().is_distributed());
        // MASTER_ADDR / MASTER_PORT override the node list and the derived port.
        let w = world(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_JOB_NODELIST", "a[1-2]"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "4000"),
        ])
        .unwrap();
        assert_eq!((w.master_addr.as_str(), w.master_port), ("10.0.0.1", 4000));
    }
}
