//! `bd3 launch slurm`: the script it writes (against a checked-in one), its refusals, and jobs on a
//! real single-node Slurm cluster (scripts/slurm.sh, which installs Slurm when missing): a
//! 2-rank job stopped by USR1 checkpoints on both ranks, requeues itself and ends bit for bit
//! like an uninterrupted one; a job whose step is SIGKILLed, resubmitted, goes on from its last
//! committed checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use test_support::{assert_refused, bd3_binary, bd3_with_path, repo_root, run_overrides, scratch_dir};

/// A cluster of one node, stopped (jobs first) when dropped.
struct Cluster {
    dir: tempfile::TempDir,
    conf: PathBuf,
}

impl Cluster {
    fn start() -> Self {
        let dir = scratch_dir("slurm");
        let out = Command::new(repo_root().join("scripts/slurm.sh"))
            .arg("start")
            .arg(dir.path())
            .output()
            .expect("running scripts/slurm.sh");
        assert!(out.status.success(), "scripts/slurm.sh start failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let conf = dir.path().join("slurm.conf");
        Self { dir, conf }
    }

    /// A Slurm command (or bd3) talking to this cluster.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(repo_root()).env("SLURM_CONF", &self.conf);
        cmd
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self.command(program).args(args).output().unwrap_or_else(|e| panic!("running {program}: {e}"));
        assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `bd3 launch slurm` of a 2-rank CPU job training run `name` in `run_dir`; the job id.
    fn submit(&self, run_dir: &Path, name: &str, checkpoint_every: u64, extra: &[&str]) -> String {
        let mut cmd = self.command(bd3_binary());
        cmd.args(["launch", "slurm", "--nodes", "1", "--ntasks-per-node", "2", "--"]);
        cmd.args(train_args(run_dir, name, checkpoint_every)).args(extra);
        let out = ok(cmd.output().unwrap());
        let id = out.strip_prefix("submitted Slurm job ").and_then(|r| r.split(':').next());
        id.unwrap_or_else(|| panic!("no job id in {out:?}")).to_string()
    }

    /// `scontrol show job`'s fields of job `id`.
    fn job(&self, id: &str) -> BTreeMap<String, String> {
        let line = self.run("scontrol", &["show", "job", "-o", id]);
        line.split_whitespace().filter_map(|f| f.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect()
    }

    /// Waits for job `id` to end; its fields then.
    fn wait_for_end(&self, id: &str, run: &Path) -> BTreeMap<String, String> {
        let start = Instant::now();
        loop {
            let job = self.job(id);
            if ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"]
                .contains(&job["JobState"].as_str())
            {
                return job;
            }
            if start.elapsed() > Duration::from_secs(300) {
                panic!("job {id} still {} after 5 minutes\n{}", job["JobState"], self.logs(run, id));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The job's own log and the daemons' last lines, for failure messages.
    fn logs(&self, run: &Path, id: &str) -> String {
        let read = |p: PathBuf| std::fs::read_to_string(&p).unwrap_or_else(|e| format!("({}: {e})", p.display()));
        let tail = |p: PathBuf| {
            let text = read(p);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        format!(
            "--- slurm-{id}.out\n{}\n--- slurmctld.log\n{}\n--- slurmd.log\n{}",
            read(run.join(format!("slurm-{id}.out"))),
            tail(self.dir.path().join("log/slurmctld.log")),
            tail(self.dir.path().join("log/slurmd.log"))
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/slurm.sh")).arg("stop").arg(self.dir.path()).status();
    }
}

/// `train …` of the tiny model shrunk to about a second a step on one thread per rank; dropout
/// on, so libtorch's generator matters; a checkpoint every `checkpoint_every` steps (0: at the end
/// and at a stop only).
fn train_args(run_dir: &Path, name: &str, checkpoint_every: u64) -> Vec<String> {
    let mut args: Vec<String> = ["train", "--config", "configs/tiny.toml"].map(String::from).into();
    let mut sets = run_overrides(run_dir, name);
    sets.extend(
        [
            "model.layers=2",
            "model.seq_len=64",
            "model.dropout=0.1",
            "train.micro_batch=2",
            "train.steps=30",
            "train.log_every=1",
            "train.eval_every=0",
            "train.eval_batches=1",
            "train.threads=1",
            "train.device=\"cpu\"",
            "diffusion.clip_search=false",
        ]
        .map(String::from),
    );
    sets.push(format!("checkpoint.every={checkpoint_every}"));
    for s in sets {
        args.extend(["--set".into(), s]);
    }
    args
}

const STEPS: u64 = 30;

fn ok(out: Output) -> String {
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "bd3 failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    stdout.into_owned()
}

/// step → training loss from a run's metrics log, and its number of lines.
fn losses(run: &Path) -> (BTreeMap<u64, f64>, usize) {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    let lines: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let losses =
        lines.iter().filter(|v| v["loss"].is_f64()).map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()));
    (losses.collect(), lines.len())
}

/// The committed checkpoint steps of a run.
fn committed(run: &Path) -> Vec<u64> {
    checkpoint::CheckpointStore::open(run.join("checkpoints").to_str().unwrap()).unwrap().committed_steps().unwrap()
}

/// Waits until `ready` holds for the run (the training job is progressing), failing with the
/// job's log after 5 minutes.
fn wait_until(cluster: &Cluster, run: &Path, id: &str, what: &str, ready: impl Fn() -> bool) {
    let start = Instant::now();
    while !ready() {
        let state = cluster.job(id)["JobState"].clone();
        assert!(
            ["PENDING", "RUNNING", "CONFIGURING"].contains(&state.as_str())
                && start.elapsed() < Duration::from_secs(300),
            "job {id} is {state} and never reached {what}\n{}",
            cluster.logs(run, id)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn usr1_checkpoints_both_ranks_requeues_and_the_job_ends_bit_for_bit() {
    let cluster = Cluster::start();
    let scratch = scratch_dir("slurm-usr1");
    let dir = scratch.path();
    let (straight, stopped) = (dir.join("straight"), dir.join("stopped"));
    // Both jobs fit on the node's 4 CPUs at once. Checkpoints only at the end and at the stop:
    // the stop's is the one the rerun resumes from.
    let straight_id = cluster.submit(dir, "straight", 0, &[]);
    let id = cluster.submit(dir, "stopped", 0, &[]);
    assert!(stopped.join("slurm-job.sh").is_file(), "the script is kept in the run directory");

    // USR1 to the batch shell once step 3 is logged: deterministic, unlike a time limit's signal.
    wait_until(&cluster, &stopped, &id, "step 3", || losses(&stopped).0.contains_key(&3));
    cluster.run("scancel", &["--batch", "--signal=USR1", &id]);

    let job = cluster.wait_for_end(&id, &stopped);
    let log = cluster.logs(&stopped, &id);
    assert_eq!(job["JobState"], "COMPLETED", "{log}");
    assert_eq!(job["Restarts"], "1", "the job requeued itself once\n{log}");
    let straight_job = cluster.wait_for_end(&straight_id, &straight);
    assert_eq!(straight_job["JobState"], "COMPLETED", "{}", cluster.logs(&straight, &straight_id));

    // The first run: both ranks stopped after the same step, saved it and exited 0, and the
    // script requeued the job; the rerun saw SLURM_RESTART_COUNT=1 and resumed at that step.
    let job_log = std::fs::read_to_string(stopped.join(format!("slurm-{id}.out"))).unwrap();
    let stop_step = |rank: usize| -> u64 {
        let line = job_log
            .lines()
            .find(|l| l.starts_with(&format!("{rank}: ")) && l.contains("stopping on request"))
            .unwrap_or_else(|| panic!("rank {rank} never logged its stop\n{job_log}"));
        let step = line.split("step=").nth(1).and_then(|s| s.split_whitespace().next());
        step.and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no step in {line:?}"))
    };
    let stopped_at = stop_step(0);
    assert_eq!(stop_step(1), stopped_at, "both ranks stop after the same step");
    assert!((3..STEPS).contains(&stopped_at), "stopped at step {stopped_at}, not mid-run\n{job_log}");
    let in_order = [
        "SLURM_RESTART_COUNT=0".to_string(),
        "USR1: the ranks checkpoint and stop".into(),
        "the ranks exited with status 0".into(),
        format!("requeueing job {id}"),
        "SLURM_RESTART_COUNT=1".into(),
        format!("resumed step={stopped_at} "),
    ];
    let mut rest = job_log.as_str();
    for expected in &in_order {
        let at = rest.find(expected.as_str()).unwrap_or_else(|| panic!("no {expected:?} (in order) in\n{job_log}"));
        rest = &rest[at..];
    }
    // The step the stop saved holds both ranks' parts and is committed.
    let step_dir = stopped.join(format!("checkpoints/step-{stopped_at:010}"));
    for file in ["rank-00000.json", "rank-00001.json", "COMMITTED"] {
        assert!(step_dir.join(file).is_file(), "{} is missing\n{job_log}", step_dir.join(file).display());
    }

    // Bit for bit: the same loss at every step, one metrics line per step, the same weights.
    let (a, a_lines) = losses(&straight);
    let (b, b_lines) = losses(&stopped);
    assert_eq!(a.len() as u64, STEPS);
    assert_eq!(a, b, "the same loss at every step");
    assert_eq!(a_lines, b_lines, "one metrics line per logged step after the requeue");
    let read = |run: &Path, file: &str| std::fs::read(run.join(file)).unwrap();
    assert!(read(&straight, "model.safetensors") == read(&stopped, "model.safetensors"), "final EMA weights differ");
    let last = format!("checkpoints/step-{STEPS:010}/rank-00000-000.safetensors");
    assert!(read(&straight, &last) == read(&stopped, &last), "final weights, EMA and optimizer state differ");
}

#[test]
fn a_killed_job_resubmitted_with_resume_auto_goes_on_from_the_last_committed_checkpoint() {
    let cluster = Cluster::start();
    let scratch = scratch_dir("slurm-kill");
    let dir = scratch.path();
    let run = dir.join("killed");
    let id = cluster.submit(dir, "killed", 3, &[]);
    // SIGKILL to the job step (the ranks) once step 6 is committed and training went past it: no
    // signal the ranks could catch, no checkpoint of their own.
    wait_until(&cluster, &run, &id, "a committed step 6 and step 8", || {
        committed(&run).contains(&6) && losses(&run).0.contains_key(&8)
    });
    cluster.run("scancel", &["--signal=KILL", &format!("{id}.0")]);
    let job = cluster.wait_for_end(&id, &run);
    assert_eq!(job["JobState"], "FAILED", "{}", cluster.logs(&run, &id));
    assert_eq!(job["Restarts"], "0", "a failed job is not requeued");
    let killed_log = std::fs::read_to_string(run.join(format!("slurm-{id}.out"))).unwrap();
    assert!(
        killed_log.contains("the ranks exited with status ") && !killed_log.contains("the ranks exited with status 0"),
        "{killed_log}"
    );
    let last_committed = *committed(&run).last().unwrap();
    let (before, _) = losses(&run);
    let killed_at = *before.keys().last().unwrap();
    assert!(killed_at < STEPS, "the kill came after the end: {killed_at}");

    let resubmitted = cluster.submit(dir, "killed", 3, &["--resume", "auto"]);
    let job = cluster.wait_for_end(&resubmitted, &run);
    let log = cluster.logs(&run, &resubmitted);
    assert_eq!(job["JobState"], "COMPLETED", "{log}");
    assert!(log.contains(&format!("resumed step={last_committed} ")), "not resumed from step {last_committed}:\n{log}");
    // The steps trained twice (after the checkpoint, up to the kill) have the same losses, and
    // every step is logged once.
    let (after, lines) = losses(&run);
    assert_eq!(after.len() as u64, STEPS);
    assert_eq!(lines as u64, STEPS + 1, "one line per step and the final validation");
    for (step, loss) in before.range(last_committed + 1..) {
        assert_eq!(after[step], *loss, "step {step} trained again with a different loss");
    }
}

/// `bd3 launch slurm` with `args`, in the repository, with this PATH.
fn launch(args: &[&str], path: &str) -> Output {
    bd3_with_path(&[&["launch", "slurm"], args].concat(), path)
}

#[test]
fn dry_run_prints_the_checked_in_script_for_two_nodes_of_eight_gpus() {
    let options = "--nodes 2 --gpus-per-node 8 --cpus-per-task 12 --partition gpu --time 2-00:00:00 --account bd3";
    let mut args: Vec<&str> = options.split_whitespace().collect();
    args.extend(["--dry-run", "--", "train", "--config", "configs/small.toml", "--set", "train.grad_accum=2"]);
    for set in [
        "run.dir=\"/shared/runs\"",
        "data.dataset=\"s3://corpora/owt-1024\"",
        "checkpoint.url=\"s3://checkpoints/small\"",
    ] {
        args.extend(["--set", set]);
    }
    // No sbatch needed to print the script.
    let out = ok(launch(&args, ""));
    let root = repo_root().display().to_string();
    let script = out.replace(&root, "/path/to/bd3");
    let expected_path = repo_root().join("tests/data/slurm-2x8-gpus.sh");
    let expected = std::fs::read_to_string(&expected_path).unwrap();
    assert!(script == expected, "the dry run differs from {}:\n{script}", expected_path.display());
    assert!(!Path::new("/shared/runs/small/slurm-job.sh").exists(), "a dry run writes nothing");
}

#[test]
fn bad_input_is_refused_before_anything_is_submitted() {
    let scratch = scratch_dir("slurm-refusals");
    let dir = scratch.path();
    // An sbatch that records being called: nothing may reach it.
    let called = dir.join("sbatch-called");
    let fake = dir.join("bin");
    std::fs::create_dir(&fake).unwrap();
    let sbatch = fake.join("sbatch");
    std::fs::write(&sbatch, format!("#!/bin/sh\n: > {}\necho 1\n", called.display())).unwrap();
    std::fs::set_permissions(&sbatch, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = fake.display().to_string();
    let run_dir = dir.join("runs");
    let train = train_args(&run_dir, "refused", 0);
    let train: Vec<&str> = train.iter().map(String::as_str).collect();
    let cpu =
        |extra: &[&'static str]| [&["--nodes", "1", "--ntasks-per-node", "2"], extra, &["--"], &train[..]].concat();

    let refusals: [(Vec<&str>, &[&str]); 6] = [
        ([&["--nodes", "0", "--ntasks-per-node", "2", "--"], &train[..]].concat(), &["--nodes must be at least 1"]),
        (
            [&["--nodes", "2", "--gpus-per-node", "0", "--"], &train[..]].concat(),
            &["--gpus-per-node must be at least 1"],
        ),
        (cpu(&["--time", "two days"]), &["--time \"two days\"", "2-00:00:00"]),
        (cpu(&["--partition", "a b"]), &["--partition \"a b\""]),
        ([&cpu(&[])[..], &["--set", "model.hiden=64"]].concat(), &["configs/tiny.toml", "field `model.hiden`"]),
        ([&cpu(&[])[..], &["--set", "train.micro_batch=0"]].concat(), &["configs/tiny.toml", "train.micro_batch"]),
    ];
    for (args, expected) in &refusals {
        let out = launch(args, &path);
        assert_refused(&out, args, expected);
    }
    // Without sbatch on PATH.
    let out = launch(&cpu(&[]), "/nonexistent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("`sbatch` is not on PATH"), "{stderr}");
    assert!(!called.exists(), "sbatch was called");
    assert!(!run_dir.join("refused/slurm-job.sh").exists(), "a refused launch wrote its script");
    // The same command with the fake sbatch goes through (so the refusals above were the checks').
    ok(launch(&cpu(&[]), &path));
    assert!(called.exists() && run_dir.join("refused/slurm-job.sh").is_file());
}
