//! experiments/ (docs/results.md) end to end at `--scale tiny`: every script trains what it needs,
//! evaluates, samples, draws its charts and writes its section, in seconds. The numbers of a
//! 4-step model mean nothing; what is checked is that each table holds what its experiment says
//! it measures, and the invariants those numbers must satisfy at any scale.

use std::path::{Path, PathBuf};
use std::process::Command;

use test_support::{bd3_binary, repo_root, scratch_dir};

/// Runs `experiments/<script>.py --scale tiny` with its runs, plots and document in `dir`, and
/// `extra` options.
fn experiment(script: &str, dir: &Path, extra: &[&str]) -> String {
    let out = Command::new("python3")
        .current_dir(repo_root())
        .arg(format!("experiments/{script}.py"))
        .args(["--scale", "tiny", "--runs"])
        .arg(dir.join("runs"))
        .arg("--out")
        .arg(dir.join("results"))
        .arg("--doc")
        .arg(dir.join("results.md"))
        .arg("--bd3")
        .arg(bd3_binary())
        .args(extra)
        .output()
        .expect("running python3");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "experiments/{script}.py failed:\n{stderr}");
    stderr
}

/// The section an experiment wrote, between its markers.
fn section(doc: &str, key: &str) -> String {
    let (begin, end) = (format!("<!-- experiment {key} -->"), format!("<!-- /experiment {key} -->"));
    let start = doc.find(&begin).unwrap_or_else(|| panic!("no section {key}:\n{doc}"));
    let stop = doc.find(&end).unwrap_or_else(|| panic!("section {key} not closed"));
    doc[start..stop].to_string()
}

/// The body rows of the `n`-th Markdown table of a section, as cells.
fn table(section: &str, n: usize) -> Vec<Vec<String>> {
    let mut tables: Vec<Vec<Vec<String>>> = Vec::new();
    let mut in_table = false;
    for line in section.lines() {
        if line.starts_with('|') {
            if !in_table {
                tables.push(Vec::new());
                in_table = true;
            }
            let cells = line.trim_matches('|').split('|').map(|c| c.trim().to_string()).collect();
            tables.last_mut().unwrap().push(cells);
        } else {
            in_table = false;
        }
    }
    let rows = tables.into_iter().nth(n).unwrap_or_else(|| panic!("no table {n} in:\n{section}"));
    rows.into_iter().skip(2).collect()
}

/// The number a cell starts with ("10.5 ± 0.1" → 10.5).
fn number(cell: &str) -> f64 {
    let head = cell.split([' ', ':']).next().unwrap().replace(',', "");
    head.parse().unwrap_or_else(|_| panic!("not a number: {cell:?}"))
}

/// "[0.45, 0.95]" → (0.45, 0.95).
fn interval(cell: &str) -> (f64, f64) {
    let inner = cell.split(']').next().unwrap().trim_start_matches('[');
    let (a, b) = inner.split_once(',').unwrap_or_else(|| panic!("not an interval: {cell:?}"));
    (a.trim().parse().unwrap(), b.trim().parse().unwrap())
}

fn assert_png(path: PathBuf) {
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 1000, "{} is not a chart", path.display());
}

/// `bd3 eval <what> --json` of a run directory's config and weights, with `extra` arguments.
fn eval_json(what: &str, run: &Path, extra: &[&str]) -> serde_json::Value {
    let (config, weights) = (run.join("config.toml"), run.join("model.safetensors"));
    let out = Command::new(bd3_binary())
        .args(["eval", what, "--json", "--config"])
        .arg(config)
        .arg("--weights")
        .arg(weights)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bd3 eval {what} {extra:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.lines().rev().find(|l| l.starts_with('{')).unwrap()).unwrap()
}

#[test]
fn the_four_experiments_run_end_to_end_at_tiny_scale() {
    assert!(
        repo_root().join("data/english/valid").is_dir(),
        "data/english is missing: scripts/corpus.sh installs it (make test runs it)"
    );
    let dir = scratch_dir("experiments");
    let dir = dir.path();
    for script in ["a_perplexity", "b_clipping", "c_block1_vs_ar", "d_sampling"] {
        // (c) with its optional third model.
        experiment(script, dir, if script.starts_with('c') { &["--with-linear"] } else { &[] });
    }
    let doc = std::fs::read_to_string(dir.join("results.md")).unwrap();

    // (a): four models, the same number of training tokens, finite bounds, an ordering stated.
    let a = section(&doc, "a");
    let rows = table(&a, 0);
    assert_eq!(rows.iter().map(|r| r[0].as_str()).collect::<Vec<_>>(), ["AR", "BD3-LM", "BD3-LM", "MDLM"]);
    assert_eq!(rows.iter().map(|r| r[1].as_str()).collect::<Vec<_>>(), ["1", "4", "16", "32"]);
    let tokens: Vec<f64> = rows.iter().map(|r| number(&r[4])).collect();
    assert!(tokens.iter().all(|&t| t == 4.0 * 4.0 * 32.0), "training tokens differ: {tokens:?}");
    for r in &rows {
        // The table prints the NLL to 4 decimals (within 5e-5: its exp within 5.1e-5 relative)
        // and the PPL to 2 (within 0.005).
        let nll = number(&r[2]);
        let ppl_error = 5.1e-5 * nll.exp() + 0.005 + 1e-9;
        assert!(nll.is_finite() && nll > 0.0 && (nll.exp() - number(&r[3])).abs() <= ppl_error, "{r:?}");
    }
    assert!(a.contains("Ordering by NLL:"), "{a}");
    assert_png(dir.join("results/a-valid-nelbo.png"));

    // (b): clip-searched runs train on a searched interval, unclipped ones on [1e-3, 1]; the
    // interval `bd3 eval clip` picks has the least variance, so no more than the full interval's.
    let b = section(&doc, "b");
    let rows = table(&b, 0);
    assert_eq!(rows.len(), 4, "{b}");
    for r in &rows {
        let last = interval(&r[2]);
        match r[1].as_str() {
            "clip search" => assert!(last.0 >= 1e-3 && last.1 <= 1.0 && last.0 < last.1, "{r:?}"),
            _ => assert_eq!(last, (0.001, 1.0), "{r:?}"),
        }
        let best = r[8].split(": ").nth(1).map(number).unwrap();
        // Both printed to 3 decimals: rounding keeps their order (ties included).
        for column in 5..8 {
            assert!(best <= number(&r[column]), "the lowest variance is not the least: {r:?}");
        }
    }
    assert_png(dir.join("results/b-variance-by-interval.png"));

    // (c): the exact NLL of t = 1 at L' = 1 is deterministic; AR's NELBO is its exact NLL.
    let c = section(&doc, "c");
    let rows = table(&c, 0);
    assert_eq!(rows.len(), 3, "{c}");
    assert_eq!(number(&rows[0][1]), number(&rows[0][2]), "AR: {:?}", rows[0]);
    let run = dir.join("runs/bd3-1-full");
    let exact = |seed: &str| {
        let seed = format!("train.seed={seed}");
        eval_json("ppl", &run, &["--batches", "2", "--interval", "1,1", "--set", &seed])["nll"].as_f64().unwrap()
    };
    assert_eq!(exact("0"), exact("7"), "t = 1 at L' = 1 leaves no noise to draw");
    // An AR model has no noise to draw from an interval: refused.
    let ar = dir.join("runs/ar");
    let (config, weights) = (ar.join("config.toml"), ar.join("model.safetensors"));
    let args = ["eval", "ppl", "--config", config.to_str().unwrap(), "--weights", weights.to_str().unwrap()];
    let args = [&args[..], &["--interval", "1,1"]].concat();
    let out = Command::new(bd3_binary()).args(&args).output().unwrap();
    test_support::assert_refused(&out, &args, &["--interval", "an AR model"]);

    // (d): first-hitting makes one call per generated token, ancestral at most T per block;
    // variable-length samples stop at the cap or earlier.
    let d = section(&doc, "d");
    for r in table(&d, 0) {
        let nfe = number(&r[2]);
        match r[1].strip_prefix("ancestral T=") {
            Some(t) => {
                let block: f64 = if r[0].contains("L'=4") {
                    4.0
                } else if r[0].contains("L'=16") {
                    16.0
                } else {
                    32.0
                };
                assert!(nfe >= 1.0 && nfe <= number(t) * (32.0 / block).ceil(), "{r:?}");
            }
            None => assert_eq!(nfe, 31.0, "one call per token after BOS: {r:?}"),
        }
        assert!(number(&r[3]).is_finite() && number(&r[4]) >= 0.0, "{r:?}");
    }
    for r in table(&d, 1) {
        assert!(number(&r[3]) <= 64.0 && number(&r[4]) <= 64.0 && number(&r[5]) >= 1.0, "{r:?}");
    }
    assert_png(dir.join("results/d-gen-ppl-by-nfe.png"));
    assert_png(dir.join("results/d-entropy-by-nfe.png"));

    // A second run reuses every trained model and rewrites its section in place.
    let log = experiment("a_perplexity", dir, &[]);
    assert!(!log.contains("bd3 train"), "models were trained again:\n{log}");
    let again = std::fs::read_to_string(dir.join("results.md")).unwrap();
    assert_eq!(again.matches("<!-- experiment a -->").count(), 1);
    assert!(again.contains("(reused runs") || again.contains("(reused /"), "{}", section(&again, "a"));
}

#[test]
fn eval_clip_reports_every_candidate_and_picks_the_least_variance() {
    let dir = scratch_dir("eval-clip");
    let run = dir.path().join("run");
    let mut train =
        test_support::tiny_command("train", dir.path(), "run", &["train.steps=2", "diffusion.block_size=4"]);
    assert!(train.status().unwrap().success());
    let search = eval_json("clip", &run, &["--batches", "2"]);
    let candidates = search["candidates"].as_array().unwrap();
    // 36 intervals (docs/algorithm.md §4.2), less those no block of 4 can satisfy.
    assert!(candidates.len() > 1 && candidates.len() <= 36, "{search}");
    assert_eq!(candidates[0]["interval"], serde_json::json!([0.001, 1.0]));
    let least = candidates.iter().map(|c| c["variance"].as_f64().unwrap()).fold(f64::INFINITY, f64::min);
    assert_eq!(search["best"]["variance"].as_f64().unwrap(), least, "{search}");
    assert!(candidates.iter().all(|c| c["batches"] == 2), "{search}");
}

#[test]
fn report_points_refuses_a_bad_line_naming_the_file_line_and_field() {
    let dir = scratch_dir("report-points");
    let points = dir.path().join("points.jsonl");
    std::fs::write(
        &points,
        "{\"series\": \"a\", \"x\": 1, \"y\": 2}\n{\"series\": \"a\", \"x\": 2, \"y\": \"high\"}\n",
    )
    .unwrap();
    let png = dir.path().join("chart.png");
    let (points_arg, png_arg) = (points.to_str().unwrap(), png.to_str().unwrap());
    let args = ["report", "--points", points_arg, "--out", png_arg];
    let out = Command::new(bd3_binary()).args(args).output().unwrap();
    test_support::assert_refused(&out, &args, &[&format!("{points_arg} line 2"), "field `y` must be a number"]);
    assert!(!png.exists(), "a chart was drawn from bad input");

    // The good line alone draws.
    std::fs::write(&points, "{\"series\": \"a\", \"x\": 1, \"y\": 2}\n{\"series\": \"b\", \"x\": 2, \"y\": 3}\n")
        .unwrap();
    let out = Command::new(bd3_binary()).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_png(png);
}
