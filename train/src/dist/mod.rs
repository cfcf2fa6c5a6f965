//! Data-parallel training: one process per GPU (a *rank*), each running the same training loop
//! on its slice of every global batch, its gradients averaged with the others' before the
//! optimisers step, so that the weights stay identical on every rank.
//!
//! * [`world`]: which rank this is, from torchrun's or Slurm's variables ([`nodelist`]: Slurm's
//!   compressed host lists).
//! * [`rendezvous`]: the TCP meeting point at `MASTER_ADDR:MASTER_PORT` (blob exchange, links).
//! * [`comm`]: the [`Comm`] trait (all-reduce, broadcast, flags, barrier, abort).
//! * [`tcp`]: the plain TCP star backend (CPU, tests); [`nccl`]: NCCL on CUDA, loaded at run
//!   time. [`wire`]: the framing; [`watchdog`]: failure detection and propagation.
//! * [`launch`]: `train --gpus N`, the N local ranks as child processes.
//!
//! What each rank does (the training side: `crate::recipe` with a comm, `crate::loader` with a
//! rank, `crate::runner` with rank 0 writing):
//!
//! * **Start**: the parameters (encoder, decoder, discriminator), their EMAs and the
//!   discriminator's BatchNorm running statistics are broadcast from rank 0.
//! * **Data**: the global batch is `data.batch_size x N` rows in the order one process with that
//!   batch size would use; rank r takes rows `[r*B, (r+1)*B)` of it (every rank walks the
//!   global order and reads its row groups, and decodes only its own rows).
//! * **Step**: each rank's gradients (encoder, decoder, discriminator: one flat bucket each)
//!   are all-reduced and averaged before clipping and the optimiser's proposal; the NaN guard's
//!   verdict is agreed (any rank non-finite: every rank skips the step); the reported losses
//!   are the ranks' means. The optimisers then step identically everywhere.
//! * **Per rank**: BatchNorm batch statistics in the discriminator's training forward (as
//!   PyTorch DDP without SyncBatchNorm); the running statistics are averaged over the ranks
//!   after each step, so every rank holds the same. The replay buffer of past fakes, and the
//!   random draws (replay slots, coin flips): rank 0 keeps the run's generator (saved in
//!   checkpoints), rank r > 0 draws from a stream of (seed, r) positioned by the step number,
//!   so it needs no saved state.
//! * **Files**: rank 0 alone writes into the run folder (checkpoints, metrics, TensorBoard,
//!   previews, eval, exports, report); every rank reads the same checkpoint on `--resume`.
//!
//! With world size 1 and no backend asked for there is no comm at all (`None`): the
//! single-process path, unchanged.

pub mod comm;
pub mod launch;
pub mod nccl;
pub mod nodelist;
pub mod rendezvous;
pub mod tcp;
pub mod watchdog;
pub mod wire;
pub mod world;

pub use comm::Comm;
pub use rendezvous::Timeouts;
pub use world::World;

use anyhow::{bail, Result};
use candle_core::Device;
use std::path::PathBuf;
use std::sync::Arc;

/// Which backend carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// NCCL on CUDA, TCP on the CPU; no comm at all for world size 1.
    #[default]
    Auto,
    Tcp,
    Nccl,
}

impl Backend {
    pub fn parse(s: &str) -> Result<Backend> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Backend::Auto,
            "tcp" => Backend::Tcp,
            "nccl" => Backend::Nccl,
            _ => bail!("`{s}` is not a backend: use auto, tcp or nccl"),
        })
    }
}

/// How this process joins a job.
#[derive(Debug, Clone, Default)]
pub struct DistOptions {
    pub backend: Backend,
    pub timeouts: Timeouts,
    /// NCCL's library (default: `libnccl.so.2` on the library path).
    pub nccl_lib: Option<PathBuf>,
}

/// A joined job: this rank, its device and its comm.
#[derive(Clone)]
pub struct Dist {
    pub world: World,
    pub device: Device,
    pub comm: Arc<dyn Comm>,
}

impl Dist {
    pub fn rank(&self) -> usize {
        self.world.rank
    }

    pub fn is_root(&self) -> bool {
        self.world.rank == 0
    }
}

/// Join the job `world` describes on `device` (this rank's). `None` with world size 1 and
/// [`Backend::Auto`]: the single-process path. An explicit backend joins even alone (the
/// benchmark of the NCCL path at world size 1).
pub fn join(world: &World, device: &Device, o: &DistOptions) -> Result<Option<Dist>> {
    if world.world_size == 1 && o.backend == Backend::Auto {
        return Ok(None);
    }
    let nccl = match o.backend {
        Backend::Auto => device.is_cuda(),
        Backend::Tcp => false,
        Backend::Nccl => true,
    };
    let comm: Arc<dyn Comm> = if nccl {
        Arc::new(nccl::NcclComm::connect(world, o.timeouts, device, o.nccl_lib.as_deref())?)
    } else {
        Arc::new(tcp::TcpComm::connect(world, o.timeouts, || Ok(Vec::new()))?.0)
    };
    Ok(Some(Dist { world: world.clone(), device: device.clone(), comm }))
}
