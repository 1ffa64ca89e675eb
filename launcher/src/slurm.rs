//! `bd3 launch slurm`: an sbatch script for a training run, written into the run directory and
//! submitted with `sbatch`.
//!
//! The script runs one task per GPU (or a given number of CPU tasks per node) through
//! `srun --mpi=pmix`, so that the ranks find each other through Slurm's PMIx server and read
//! their rank, world size and local rank (their GPU) from `SLURM_PROCID`, `SLURM_NTASKS` and
//! `SLURM_LOCALID` (trainer::dist). Preemption and time limits: Slurm sends USR1 to the batch
//! shell `--signal-lead` seconds ahead; the shell forwards it to srun, which forwards it to every
//! rank (they all save a checkpoint after the same step and exit 0, trainer/src/preemption.rs),
//! and then requeues its own job. The rerun (`SLURM_RESTART_COUNT` ≥ 1) trains with
//! `--resume auto`, and appends to the same log file.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use clap::Args;

use crate::{find_program, shell_quote, TrainCommand};

/// `bd3 launch slurm`'s options (the command line is in src/main.rs).
#[derive(Args, Debug)]
pub struct SlurmArgs {
    /// Nodes to run on.
    #[arg(long)]
    pub nodes: u32,
    /// GPUs per node: one task (rank) per GPU, and `--gres=gpu:G`.
    #[arg(long, required_unless_present = "ntasks_per_node", conflicts_with = "ntasks_per_node")]
    pub gpus_per_node: Option<u32>,
    /// CPU tasks (ranks) per node, for a job without GPUs.
    #[arg(long)]
    pub ntasks_per_node: Option<u32>,
    #[arg(long)]
    pub cpus_per_task: Option<u32>,
    #[arg(long)]
    pub partition: Option<String>,
    /// Wall-clock limit (sbatch's forms: 90, 04:00:00, 2-00:00:00).
    #[arg(long)]
    pub time: Option<String>,
    #[arg(long)]
    pub account: Option<String>,
    /// Seconds before the time limit at which the job checkpoints and requeues itself (USR1).
    #[arg(long, default_value_t = 300)]
    pub signal_lead: u32,
    /// srun's MPI plugin: `pmix` is the one Open MPI's direct launch works with.
    #[arg(long, default_value = "pmix")]
    pub mpi: String,
    /// Print the sbatch script instead of writing and submitting it.
    #[arg(long)]
    pub dry_run: bool,
    /// The bd3 command every rank runs: `train --config X [--set …] [--resume …]`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub command: Vec<String>,
}

impl SlurmArgs {
    pub fn options(&self) -> SlurmOptions {
        let tasks = match self.gpus_per_node {
            Some(gpus) => Tasks::GpusPerNode(gpus),
            None => Tasks::CpuTasksPerNode(self.ntasks_per_node.unwrap_or(0)),
        };
        SlurmOptions {
            nodes: self.nodes,
            tasks,
            cpus_per_task: self.cpus_per_task,
            partition: self.partition.clone(),
            time: self.time.clone(),
            account: self.account.clone(),
            signal_lead_s: self.signal_lead,
            mpi: self.mpi.clone(),
        }
    }
}

/// `bd3 launch slurm`: prints the script (`--dry-run`) or writes and submits it. `train` is the
/// command the ranks run, parsed and its config validated by the caller; nothing is written or
/// submitted unless every check passed.
pub fn launch(args: &SlurmArgs, train: TrainCommand) -> Result<()> {
    let job = SlurmJob {
        options: args.options(),
        train,
        bd3: std::env::current_exe().context("locating the bd3 binary")?,
        workdir: std::env::current_dir().context("reading the current directory")?,
    };
    job.options.validate()?;
    if args.dry_run {
        print!("{}", job.script());
        return Ok(());
    }
    let id = job.submit()?;
    println!(
        "submitted Slurm job {id}: script {}, log {}/slurm-{id}.out",
        job.script_path().display(),
        job.run_dir().display()
    );
    Ok(())
}

/// Where each rank runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tasks {
    /// One task per GPU, `gpus` per node; task `SLURM_LOCALID` trains on GPU `SLURM_LOCALID`.
    GpusPerNode(u32),
    /// This many CPU tasks per node.
    CpuTasksPerNode(u32),
}

/// What `bd3 launch slurm` was asked for.
#[derive(Debug, Clone)]
pub struct SlurmOptions {
    pub nodes: u32,
    pub tasks: Tasks,
    pub cpus_per_task: Option<u32>,
    pub partition: Option<String>,
    /// Wall-clock limit in one of sbatch's forms (`MM`, `HH:MM:SS`, `D-HH:MM`, …).
    pub time: Option<String>,
    pub account: Option<String>,
    /// Seconds before the time limit at which Slurm sends USR1.
    pub signal_lead_s: u32,
    /// srun's `--mpi` plugin (`pmix`: the one Open MPI's direct launch works with).
    pub mpi: String,
}

/// Slurm accepts `--signal=…@S` up to this many seconds.
const MAX_SIGNAL_LEAD_S: u32 = 65535;

impl SlurmOptions {
    /// Checks every value before anything is written or submitted, naming the option.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.nodes > 0, "--nodes must be at least 1");
        match self.tasks {
            Tasks::GpusPerNode(0) => bail!("--gpus-per-node must be at least 1 (use --ntasks-per-node on CPUs)"),
            Tasks::CpuTasksPerNode(0) => bail!("--ntasks-per-node must be at least 1"),
            _ => {}
        }
        ensure!(self.cpus_per_task != Some(0), "--cpus-per-task must be at least 1");
        ensure!(
            (1..=MAX_SIGNAL_LEAD_S).contains(&self.signal_lead_s),
            "--signal-lead must be between 1 and {MAX_SIGNAL_LEAD_S} seconds, not {}",
            self.signal_lead_s
        );
        if let Some(time) = &self.time {
            let well_formed = !time.is_empty()
                && time.chars().all(|c| c.is_ascii_digit() || c == ':' || c == '-')
                && time.chars().next().is_some_and(|c| c.is_ascii_digit());
            ensure!(
                well_formed,
                "--time {time:?}: expected a Slurm time limit such as 90, 04:00:00 or 2-00:00:00 (D-HH:MM:SS)"
            );
        }
        let names = [("--partition", self.partition.as_deref()), ("--account", self.account.as_deref())];
        for (option, value) in names.into_iter().chain([("--mpi", Some(self.mpi.as_str()))]) {
            if let Some(value) = value {
                let plain = !value.is_empty()
                    && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ','));
                ensure!(plain, "{option} {value:?}: expected a name of letters, digits, `_`, `-`, `.` or `,`");
            }
        }
        Ok(())
    }

    fn tasks_per_node(&self) -> u32 {
        match self.tasks {
            Tasks::GpusPerNode(n) | Tasks::CpuTasksPerNode(n) => n,
        }
    }
}

/// A training job for Slurm: the options, the `bd3 train` command its ranks run, and where.
#[derive(Debug, Clone)]
pub struct SlurmJob {
    pub options: SlurmOptions,
    pub train: TrainCommand,
    /// The `bd3` binary the ranks run (the same path on every node: a shared file system).
    pub bd3: PathBuf,
    /// The job's working directory: relative paths of the command are relative to it.
    pub workdir: PathBuf,
}

impl SlurmJob {
    /// The run directory, absolute: the job's script and log go there.
    pub fn run_dir(&self) -> PathBuf {
        self.workdir.join(self.train.config.run_dir())
    }

    /// Where [`SlurmJob::submit`] writes the script.
    pub fn script_path(&self) -> PathBuf {
        self.run_dir().join("slurm-job.sh")
    }

    /// The sbatch script.
    pub fn script(&self) -> String {
        let o = &self.options;
        let run_dir = self.run_dir();
        let name = &self.train.config.run.name;
        let mut directives = vec![
            format!("--job-name=bd3-{name}"),
            format!("--nodes={}", o.nodes),
            format!("--ntasks-per-node={}", o.tasks_per_node()),
        ];
        if let Tasks::GpusPerNode(gpus) = o.tasks {
            directives.push(format!("--gres=gpu:{gpus}"));
        }
        let optional = [
            ("cpus-per-task", o.cpus_per_task.map(|c| c.to_string())),
            ("partition", o.partition.clone()),
            ("account", o.account.clone()),
            ("time", o.time.clone()),
        ];
        directives.extend(optional.into_iter().filter_map(|(key, value)| Some(format!("--{key}={}", value?))));
        directives.extend([
            format!("--chdir={}", self.workdir.display()),
            // %j stays the same when the job is requeued: one log per job, appended by each run.
            format!("--output={}/slurm-%j.out", run_dir.display()),
            "--open-mode=append".into(),
            "--requeue".into(),
            format!("--signal=B:USR1@{}", o.signal_lead_s),
        ]);

        let mut s = String::new();
        s.push_str("#!/bin/bash\n");
        s.push_str(&format!("# bd3 training run `{name}`, written by `bd3 launch slurm`.\n"));
        // A plain resubmission would start afresh over the run's checkpoints, which bd3 refuses.
        s.push_str("# After a failure, launch again with `--resume auto` added to the train command.\n");
        for d in &directives {
            s.push_str(&format!("#SBATCH {d}\n"));
        }
        let train: Vec<String> = std::iter::once(self.bd3.display().to_string())
            .chain(self.train.args_without_resume())
            .map(|a| shell_quote(&a))
            .collect();
        let first_resume = match &self.train.resume {
            Some(r) => format!("\nelse\n    train+=(--resume {})", shell_quote(r)),
            None => String::new(),
        };
        // srun (since Slurm 22.05) no longer takes --cpus-per-task from the job: it is repeated.
        let cpus = o.cpus_per_task.map(|c| format!(" --cpus-per-task={c}")).unwrap_or_default();
        let gpu_note = match o.tasks {
            Tasks::GpusPerNode(_) => {
                "\n# Every task sees the node's GPUs; rank SLURM_LOCALID of a node trains on cuda:SLURM_LOCALID."
            }
            Tasks::CpuTasksPerNode(_) => "",
        };
        let srun = format!("{gpu_note}\nsrun --mpi={} --label --kill-on-bad-exit=1{cpus} \"${{train[@]}}\" &", o.mpi);
        s.push_str(
            &SCRIPT_BODY
                .replace("{train}", &train.join(" "))
                .replace("{first_resume}", &first_resume)
                .replace("{srun}", &srun),
        );
        s
    }

    /// Writes the script into the run directory and submits it; the job id.
    pub fn submit(&self) -> Result<String> {
        let sbatch = find_program("sbatch").context(
            "`sbatch` is not on PATH: bd3 launch slurm submits through Slurm's client commands \
             (install them, or print the script with --dry-run)",
        )?;
        let run_dir = self.run_dir();
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating the run directory {}", run_dir.display()))?;
        let path = self.script_path();
        std::fs::write(&path, self.script()).with_context(|| format!("writing {}", path.display()))?;
        submit_script(&sbatch, &path)
    }
}

/// `sbatch --parsable SCRIPT`: the job id.
fn submit_script(sbatch: &Path, script: &Path) -> Result<String> {
    let out = Command::new(sbatch)
        .arg("--parsable")
        .arg(script)
        .output()
        .with_context(|| format!("running {}", sbatch.display()))?;
    ensure!(
        out.status.success(),
        "sbatch {} failed ({}): {}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    // `--parsable` prints `id` or `id;cluster`.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let id = stdout.trim().split(';').next().unwrap_or_default();
    ensure!(
        !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()),
        "sbatch printed {:?}, not a job id",
        stdout.trim()
    );
    Ok(id.to_string())
}

/// The script after the `#SBATCH` lines. `{train}` is the rank's command line, `{first_resume}`
/// the `else` branch with the user's own `--resume` (if any), `{srun}` the srun line.
const SCRIPT_BODY: &str = r#"
set -u
restarts=${SLURM_RESTART_COUNT:-0}
echo "bd3-slurm: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, SLURM_RESTART_COUNT=$restarts, $(date -u +%FT%TZ)"

train=({train})
if [ "$restarts" -gt 0 ]; then
    # A requeued job goes on from the last committed checkpoint.
    train+=(--resume auto){first_resume}
fi

# Shared memory between a node's ranks without the single-copy mechanism that containers'
# ptrace restrictions refuse (as `bd3 launch local` does).
export OMPI_MCA_btl_vader_single_copy_mechanism=none

# USR1 (--signal, or scancel --batch --signal=USR1): every rank saves a checkpoint after the
# step it is in and exits 0; then the job requeues itself (a time limit never requeues it).
usr1_received=0
forward_stop() {
    usr1_received=$((usr1_received + 1))
    echo "bd3-slurm: USR1: the ranks checkpoint and stop, then the job requeues"
    kill -USR1 "$srun_pid" 2>/dev/null # srun passes it on to every task
}
trap forward_stop USR1

# srun in the background: bash runs a trap only between commands, and `wait` is one that a
# trapped signal interrupts.{srun}
srun_pid=$!
while :; do
    seen=$usr1_received
    wait "$srun_pid"
    status=$?
    # The trap ended `wait` early (128 + USR1) while srun goes on stopping the ranks: wait again
    # (which returns srun's status at once if it has ended meanwhile).
    [ "$usr1_received" -ne "$seen" ] && [ "$status" -eq 138 ] || break
done
echo "bd3-slurm: the ranks exited with status $status"
if [ "$usr1_received" -gt 0 ]; then
    echo "bd3-slurm: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
"#;
