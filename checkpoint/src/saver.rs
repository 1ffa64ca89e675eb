//! Saving without stalling training: the trainer copies its tensors to host memory (the only
//! time it is blocked), hands them to the saver, and goes on; a writer thread uploads them,
//! commits, and applies retention. At most one save is in flight; an error surfaces at the
//! trainer's next [`AsyncSaver::poll`] or save and never touches an earlier checkpoint, because
//! a step without its marker does not exist for readers.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};

use crate::manifest::CheckpointMeta;
use crate::store::{CheckpointStore, LocalTensor, Retention, WriteOptions};

/// Everything one rank saves for one step (already in host memory).
pub struct SaveJob {
    pub step: u64,
    pub rank: usize,
    pub world_size: usize,
    pub tensors: Vec<LocalTensor>,
    /// Rank 0 passes the run-level facts and commits; other ranks pass `None`.
    pub meta: Option<CheckpointMeta>,
    pub options: WriteOptions,
    /// Applied by rank 0 after the commit.
    pub retention: Option<Retention>,
}

/// What one rank's save of one step cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SaveReport {
    pub step: u64,
    /// Tensor bytes this rank wrote.
    pub bytes: u64,
    /// Writing, committing (rank 0) and retention, in seconds.
    pub seconds: f64,
}

impl SaveJob {
    /// Writes, commits (rank 0) and applies retention, in the calling thread.
    pub fn run(self, store: &CheckpointStore) -> Result<SaveReport> {
        let (step, started) = (self.step, Instant::now());
        let bytes = self.tensors.iter().map(|t| t.buffer.data.len() as u64).sum();
        let committed = store
            .save(self.step, self.rank, self.world_size, self.tensors, self.meta, self.options)
            .with_context(|| format!("saving checkpoint step {step}"))?;
        if let (Some(_), Some(policy)) = (committed, self.retention) {
            store.apply_retention(policy)?;
        }
        Ok(SaveReport { step, bytes, seconds: started.elapsed().as_secs_f64() })
    }
}

pub struct AsyncSaver {
    store: Arc<CheckpointStore>,
    in_flight: Option<(u64, JoinHandle<Result<SaveReport>>)>,
}

impl AsyncSaver {
    pub fn new(store: Arc<CheckpointStore>) -> Self {
        Self { store, in_flight: None }
    }

    pub fn store(&self) -> &CheckpointStore {
        &self.store
    }

    /// Starts saving `job` in the background, after waiting for the previous save (whose error,
    /// if any, is returned instead of starting a new one).
    pub fn save(&mut self, job: SaveJob) -> Result<()> {
        self.wait()?;
        let store = Arc::clone(&self.store);
        let step = job.step;
        let handle = std::thread::Builder::new()
            .name(format!("bd3-save-{step}"))
            .spawn(move || job.run(&store))
            .context("starting the checkpoint writer thread")?;
        self.in_flight = Some((step, handle));
        Ok(())
    }

    /// Without blocking: the report of a save that has finished since the last call, or its
    /// error.
    pub fn poll(&mut self) -> Result<Option<SaveReport>> {
        match &self.in_flight {
            Some((_, handle)) if handle.is_finished() => self.wait(),
            _ => Ok(None),
        }
    }

    /// Blocks until the save in flight (if any) is done; returns its report.
    pub fn wait(&mut self) -> Result<Option<SaveReport>> {
        let Some((step, handle)) = self.in_flight.take() else { return Ok(None) };
        let report = handle.join().map_err(|_| anyhow!("the checkpoint writer for step {step} panicked"))??;
        Ok(Some(report))
    }

    pub fn in_flight(&self) -> Option<u64> {
        self.in_flight.as_ref().map(|(s, _)| *s)
    }
}
