//! Test support shared by the workspace's tests (the library of the `bd3-integration` package,
//! which the trainer's tests use too): where the repository and its `bd3` binary are, the
//! overrides that point a run at the embedded corpus, and scratch directories.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The root of the repository.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the repository").to_path_buf()
}

/// The `bd3` binary, which `make test` builds before running the tests.
pub fn bd3_binary() -> PathBuf {
    let bin = repo_root().join("target/debug/bd3");
    assert!(bin.exists(), "{} is missing: `make test` builds it first", bin.display());
    bin
}

/// `bd3 args…` run in the repository with `PATH` set to `path`, to hide (or fake) the programs
/// it calls (sbatch, kubectl).
pub fn bd3_with_path(args: &[&str], path: &str) -> std::process::Output {
    std::process::Command::new(bd3_binary())
        .current_dir(repo_root())
        .env("PATH", path)
        .args(args)
        .output()
        .expect("running bd3")
}

/// Asserts that a `bd3` run given `args` was refused with a clear error: exit status 1 (not a
/// panic, not a usage error) and every text of `expected` in its stderr.
pub fn assert_refused(out: &std::process::Output, args: &dyn std::fmt::Debug, expected: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: a clear error (exit 1), not a panic or a usage error\n{stderr}");
    for e in expected {
        assert!(stderr.contains(e), "{args:?}: the error does not say {e:?}:\n{stderr}");
    }
}

/// The unit roundoff of fp64, u = 2⁻⁵³ ≈ 1.1e-16: one rounding moves a value by at most u relative.
pub const F64_UNIT_ROUNDOFF: f64 = f64::EPSILON / 2.0;

/// How far apart two fp64 sums of the same `n` terms taken in different orders can be, given the
/// sum of the terms' absolute values: each lies within (n − 1)·u·Σ|x| of the exact sum (recursive
/// summation's error bound; pairwise and blocked sums do better), so 2·n·u·Σ|x| covers both.
/// This is what changes when a batch is split over ranks or micro-batches, and what differs
/// between CPUs whose GEMM kernels block the inner products differently.
pub fn reordered_sum_bound(n: usize, abs_sum: f64) -> f64 {
    2.0 * n as f64 * F64_UNIT_ROUNDOFF * abs_sum
}

/// The override that makes a run compute in fp64 (`model.dtype`), where summing in another order
/// moves results by about 1e-16 relative instead of 1e-7: for tests that compare runs which are
/// equal in exact arithmetic.
pub const FP64: &str = "model.dtype=\"float64\"";

/// AdamW's ε in the runs the tests compare (the recipe's default, `optim.eps`).
pub const ADAMW_EPS: f64 = 1e-8;

/// G, the sum of the absolute per-token contributions to one gradient element of the mean loss of
/// configs/tiny.toml's model (128 wide), as the tests train it. The largest are the output
/// layer's: (softmax − one-hot) is at most 2 in magnitude, a LayerNorm output at most √d = 11.3
/// per element (the adaLN modulation starts at zero and moves by lr per step), and the weights 1/t
/// of the masked tokens add up to about the number of tokens N (t·L′ of a block's L′ tokens are
/// masked at rate t), which the mean divides by: G ≈ 2·11.3 = 23. Deeper layers' contributions
/// pass through weights of order 1/√d and are smaller. Taken as 25.
pub const ABS_GRADIENT_SUM: f64 = 25.0;

/// Tolerance on weights (absolute) and losses (relative) between fp64 runs (`model.dtype =
/// "float64"`) that differ only in how each global batch is split over ranks and micro-batches,
/// which changes only the order in which gradient contributions are summed. Bound: a gradient
/// element summed over `summands` rows in another order moves by at most
/// δ = [`reordered_sum_bound`]`(summands, ABS_GRADIENT_SUM)`; AdamW's update m̂/(√v̂ + ε) is
/// Lipschitz in the gradient with a constant of about 1/ε, so each of `steps` steps at a learning
/// rate of at most `lr` moves a weight by at most lr·δ/ε more. The loss follows the weights at
/// the same scale. In fp32 (u = 6e-8) the same bound is about 1 for the tests' runs, which is
/// why they compare in fp64.
pub fn data_parallel_tolerance(steps: usize, lr: f64, summands: usize) -> f64 {
    steps as f64 * lr * reordered_sum_bound(summands, ABS_GRADIENT_SUM) / ADAMW_EPS
}

/// A fresh directory under the system's temporary directory, removed when dropped (also when
/// the test fails).
pub fn scratch_dir(what: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("bd3-{what}-")).tempdir().expect("creating a scratch directory")
}

/// `--set` overrides for a run named `name` in `run_dir` on the embedded corpus (installed by
/// scripts/setup.sh). The Prometheus endpoint takes a free port, so that runs of tests in
/// parallel never compete for the default one.
pub fn run_overrides(run_dir: &Path, name: &str) -> Vec<String> {
    vec![
        format!("data.corpus={:?}", repo_root().join("data/shakespeare").display().to_string()),
        format!("run.dir={:?}", run_dir.display().to_string()),
        format!("run.name={name:?}"),
        "metrics.listen=\"127.0.0.1:0\"".to_string(),
    ]
}

/// `bd3 <command> --config configs/tiny.toml` shrunk to seconds (2 layers, L = 64, micro-batch
/// 4, one thread, a log line every step), as run `name` in `run_dir`, with `extra` overrides
/// (later ones win).
pub fn tiny_command(command: &str, run_dir: &Path, name: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bd3_binary());
    cmd.current_dir(repo_root()).args([command, "--config", "configs/tiny.toml"]);
    let mut sets = run_overrides(run_dir, name);
    sets.extend(
        [
            "model.layers=2",
            "model.seq_len=64",
            "train.micro_batch=4",
            "train.log_every=1",
            "train.eval_every=0",
            "train.eval_batches=2",
            "train.threads=1",
        ]
        .map(String::from),
    );
    sets.extend(extra.iter().map(|s| s.to_string()));
    for s in &sets {
        cmd.args(["--set", s]);
    }
    cmd
}
