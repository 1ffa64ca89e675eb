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

    /// A fresh log, or with `resumed_at` (the step a resumed run continues from) the log of the
    /// run it continues, without the lines of steps after that one: the resumed run writes them
    /// again, so every logged step keeps one line.
    pub fn open(path: PathBuf, resumed_at: Option<u64>, enabled: bool) -> Result<Self> {
        if !enabled {
            return Ok(Self { out: None });
        }
        let kept = match (resumed_at, std::fs::read_to_string(&path)) {
            (Some(step), Ok(old)) => lines_up_to(&old, step),
            _ => String::new(),
        };
        // Staged and renamed: a crash here leaves the old log, never a truncated one.
        let staged = path.with_extension("jsonl.tmp");
        std::fs::write(&staged, &kept).with_context(|| format!("writing {}", staged.display()))?;
        std::fs::rename(&staged, &path).with_context(|| format!("replacing {}", path.display()))?;
        let file =
            OpenOptions::new().append(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
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

/// The lines of a metrics log whose `step` is at most `step` (lines that do not parse, as a line
/// cut short by a crash, are dropped).
fn lines_up_to(log: &str, step: u64) -> String {
    let mut kept = String::new();
    for line in log.lines() {
        let value: Option<serde_json::Value> = serde_json::from_str(line).ok();
        if value.and_then(|v| v["step"].as_u64()).is_some_and(|s| s <= step) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_log_drops_the_steps_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(path.clone(), None, true).unwrap();
        for step in 1..=5 {
            log.write(serde_json::json!({ "step": step, "loss": 1.0 })).unwrap();
        }
        drop(log);
        std::fs::write(&path, std::fs::read_to_string(&path).unwrap() + "{\"step\": 6, \"lo").unwrap();
        let mut log = MetricsLog::open(path.clone(), Some(3), true).unwrap();
        log.write(serde_json::json!({ "step": 4, "loss": 2.0 })).unwrap();
        let steps: Vec<u64> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [1, 2, 3, 4]);
        let _ = MetricsLog::open(path.clone(), None, true).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "", "a fresh run starts a fresh log");
    }
}
