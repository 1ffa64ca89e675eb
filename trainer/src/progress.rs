//! The small, non-tensor part of the training state: step, tokens seen, optimizer and EMA
//! counters, the clip interval in use and the data loader's position. The manifest stores it as
//! the JSON value `state.progress`.

use anyhow::{Context, Result};
use checkpoint::Manifest;
use dataloader::LoaderState;
use serde::{Deserialize, Serialize};

use crate::diffusion::ClipInterval;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer steps completed.
    pub step: u64,
    pub tokens_seen: u64,
    pub optimizer_steps: u64,
    pub ema_updates: u64,
    pub clip_beta: f64,
    pub clip_omega: f64,
    pub data: LoaderState,
}

impl Progress {
    pub fn clip(&self) -> ClipInterval {
        ClipInterval { beta: self.clip_beta, omega: self.clip_omega }
    }
}

/// The progress recorded in a manifest.
pub fn progress_of(manifest: &Manifest) -> Result<Option<Progress>> {
    match manifest.meta.state.get("progress") {
        None => Ok(None),
        Some(v) => Ok(Some(
            serde_json::from_value(v.clone())
                .with_context(|| format!("step {}: manifest field `progress`", manifest.step))?,
        )),
    }
}
