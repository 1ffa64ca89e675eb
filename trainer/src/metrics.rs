//! The run's metrics log, `metrics.jsonl` in the run directory.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};

/// One JSON object per line, flushed as written so a crashed run keeps its metrics.
pub struct MetricsLog {
    /// None on ranks other than 0, which write nothing.
    out: Option<BufWriter<File>>,
}

impl MetricsLog {
    /// A log that writes nothing (ranks other than 0).
    pub fn disabled() -> Self {
        Self { out: None }
    }

    /// A resumed run appends to the log of the run it continues.
    pub fn open(path: PathBuf, append: bool, enabled: bool) -> Result<Self> {
        if !enabled {
            return Ok(Self { out: None });
        }
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { out: Some(BufWriter::new(file)) })
    }

    pub fn write(&mut self, value: serde_json::Value) -> Result<()> {
        let Some(out) = &mut self.out else { return Ok(()) };
        serde_json::to_writer(&mut *out, &value)?;
        out.write_all(b"\n")?;
        out.flush()?;
        Ok(())
    }
}
