"""What the experiments share: the scales, the corpus, training a model once (every experiment
that needs it reuses it), the bd3 commands run, and the section each writes into
docs/results.md. Standard library only; everything runs through the `bd3` binary."""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Each scale: the model and data shape, and how much training, evaluation (`ppl_batches` of the
# held-out split for the reported numbers, 0 = all of it) and sampling. `cpu`
# is the default: on 2 CPU cores every experiment finishes in under an hour (docs/results.md
# gives the times measured). `tiny` runs every step in seconds (the CI check in make test).
# `gpu` is a starting point for one GPU, at the paper's `small` width on L = 1024.
SCALES = {
    "tiny": dict(
        model=dict(hidden=32, layers=1, heads=2, cond_dim=16, seq_len=32),
        steps=4, micro_batch=4, lr=3e-3, warmup=2, ema=0.9, eval_every=2, eval_batches=2, ppl_batches=2,
        clip_batches=1, eval_seeds=2, samples=2, sample_tokens=32, var_length_tokens=64,
        ancestral_steps=[2, 4], device="cpu",
    ),
    "cpu": dict(
        model=dict(hidden=128, layers=4, heads=4, cond_dim=64, seq_len=128),
        steps=500, micro_batch=16, lr=3e-3, warmup=50, ema=0.99, eval_every=100, eval_batches=8, ppl_batches=0,
        clip_batches=8, eval_seeds=2, samples=8, sample_tokens=128, var_length_tokens=1024,
        ancestral_steps=[1, 4, 16], device="cpu",
    ),
    "gpu": dict(
        model=dict(hidden=768, layers=12, heads=12, cond_dim=128, seq_len=1024),
        steps=20000, micro_batch=16, lr=3e-4, warmup=2500, ema=0.9999, eval_every=1000, eval_batches=50, ppl_batches=0,
        clip_batches=50, eval_seeds=3, samples=64, sample_tokens=1024, var_length_tokens=8192,
        ancestral_steps=[1, 2, 4, 8, 16, 32], device="cuda",
    ),
}

# The models, as config overrides on top of the scale. The diffusion models start from the
# reference recipe's defaults (docs/algorithm.md §3–§4): t per block from [1e-3, 1] with the
# clip search at every validation, unless an entry turns it off.
MODELS = {
    "ar": ['model.arch="ar"'],
    "bd3-4": ["diffusion.block_size=4"],
    "bd3-16": ["diffusion.block_size=16"],
    "mdlm": ["diffusion.block_size={seq_len}", "diffusion.clip_search=false"],
    "bd3-4-unclipped": ["diffusion.block_size=4", "diffusion.clip_search=false"],
    "bd3-16-unclipped": ["diffusion.block_size=16", "diffusion.clip_search=false"],
    # docs/algorithm.md §3.8: L' = 1 with t = 1 ("full masking") against the linear schedule.
    "bd3-1-full": ["diffusion.block_size=1", "diffusion.sampling_eps_min=1.0",
                   "diffusion.sampling_eps_max=1.0", "diffusion.clip_search=false"],
    "bd3-1-linear": ["diffusion.block_size=1", "diffusion.clip_search=false"],
}


class Experiment:
    """One experiment's run: its options, the bd3 commands it ran (for the record in
    docs/results.md) and where its outputs go."""

    def __init__(self, key, title, description):
        parser = argparse.ArgumentParser(description=description)
        parser.add_argument("--scale", choices=sorted(SCALES), default="cpu",
                            help="model size and budget (default: cpu, under an hour on 2 cores)")
        parser.add_argument("--seeds", type=int, default=1,
                            help="training seeds per model, where an experiment compares seeds (each trains the model again)")
        parser.add_argument("--runs", type=Path, default=None,
                            help="where trained models are kept and reused (default: runs/experiments/<scale>)")
        parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results",
                            help="where the plots go (default: docs/results)")
        parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md",
                            help="the Markdown file whose section for this experiment is rewritten")
        parser.add_argument("--with-linear", action="store_true",
                            help="(c) also trains L' = 1 under the linear schedule")
        parser.add_argument("--bd3", type=Path, default=ROOT / "target" / "debug" / "bd3",
                            help="the bd3 binary (default: target/debug/bd3 of this checkout)")
        self.args = parser.parse_args()
        self.key, self.title = key, title
        self.scale_name = self.args.scale
        self.scale = SCALES[self.scale_name]
        self.runs = self.args.runs or ROOT / "runs" / "experiments" / self.scale_name
        self.args.out.mkdir(parents=True, exist_ok=True)
        self.commands = []
        self.started = time.time()
        if not self.args.bd3.exists():
            sys.exit(f"{self.args.bd3}: no bd3 binary (cargo build -p bd3-launcher)")

    # --- running bd3 -----------------------------------------------------------------------
    def bd3(self, *args, record=True):
        """Runs bd3 and returns its standard output; a failure stops the experiment with bd3's
        own error."""
        cmd = [str(self.args.bd3), *map(str, args)]
        shown = "bd3 " + " ".join(shlex.quote(str(a)) for a in args)
        if record:
            self.commands.append(shown.replace(str(ROOT) + "/", ""))
        print(f"[{self.key}] {shown}", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            sys.exit(f"[{self.key}] failed (exit {done.returncode}): {shown}")
        return done.stdout

    def bd3_json(self, *args):
        """The last line of bd3's output that is a JSON object."""
        for line in reversed(self.bd3(*args).splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        sys.exit(f"[{self.key}] no JSON in the output of bd3 {' '.join(map(str, args))}")

    # --- data and models --------------------------------------------------------------------
    def dataset(self):
        """data/english tokenized at the scale's L (scripts/corpus.sh installs the text)."""
        seq_len = self.scale["model"]["seq_len"]
        out = ROOT / "data" / f"english-gpt2-{seq_len}"
        if not (out / "index.json").exists():
            subprocess.run([str(ROOT / "scripts" / "corpus.sh")], check=True)
            valid = len(os.listdir(ROOT / "data" / "english" / "valid"))
            self.bd3("prepare", "--input", ROOT / "data" / "english", "--output", out,
                     "--seq-len", seq_len, "--valid-documents", valid)
        return out

    def overrides(self, model, seed=0):
        s, m = self.scale, self.scale["model"]
        sets = [f"model.{k}={v}" for k, v in m.items()] + [
            "model.dropout=0.0",
            f"data.dataset={self.dataset()}",
            f"train.steps={s['steps']}", f"train.micro_batch={s['micro_batch']}",
            f"train.eval_every={s['eval_every']}", f"train.eval_batches={s['eval_batches']}",
            f"train.seed={seed}", f'train.device="{s["device"]}"', "train.sample_tokens=0",
            "train.log_every=10",
            f"optim.lr={s['lr']}", f"optim.warmup_steps={s['warmup']}", f"optim.ema_decay={s['ema']}",
            f"diffusion.clip_search_batches={s['clip_batches']}",
            # One final checkpoint (the run can be resumed or inspected); none on the way.
            "checkpoint.every=0",
        ]
        sets += [o.format(seq_len=m["seq_len"]) for o in MODELS[model]]
        return sets

    def model(self, name, seed=0):
        """Trains `name` (a key of MODELS) unless a finished run with the same config is
        already there; returns its run directory."""
        run_name = name if seed == 0 else f"{name}-seed{seed}"
        sets = self.overrides(name, seed) + [f'run.name="{run_name}"', f"run.dir={self.runs}"]
        run = self.runs / run_name
        stamp = run / "experiment.json"
        wanted = {"overrides": sets}
        if (run / "model.safetensors").exists() and stamp.exists() and json.loads(stamp.read_text()) == wanted:
            self.commands.append(f"(reused {run.relative_to(ROOT) if run.is_relative_to(ROOT) else run})")
            return run
        if run.exists():
            # Only a directory this script made: it holds experiment.json or nothing of ours.
            if not stamp.exists() and any(run.iterdir()):
                sys.exit(f"{run} exists and was not written by experiments/: move it away")
            subprocess.run(["rm", "-rf", str(run)], check=True)
        args = ["train", "--config", ROOT / "configs" / "tiny.toml"]
        # A free port for the Prometheus endpoint: runs beside other bd3 jobs never compete.
        for s in sets + ['metrics.listen="127.0.0.1:0"']:
            args += ["--set", s]
        began = time.time()
        self.bd3(*args)
        stamp.write_text(json.dumps(wanted))
        (run / "experiment-time.json").write_text(json.dumps({"train_seconds": time.time() - began}))
        return run

    def ppl(self, run, seed=0, interval=None):
        """Validation NELBO of a run's EMA weights (`bd3 eval ppl`); `seed` picks the Monte Carlo
        draw of the noise."""
        args = ["eval", "ppl", "--config", run / "config.toml", "--weights", run / "model.safetensors",
                "--json", "--set", f"train.seed={seed}", "--batches", self.scale["ppl_batches"]]
        if interval:
            args += ["--interval", interval]
        # Evaluations are kept beside the weights they scored: experiments sharing a model do not
        # evaluate it again (experiment.json changes, and the directory is rebuilt, with them).
        cache_file = run / "experiment-evals.json"
        cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
        key = " ".join(map(str, args[5:]))
        if key not in cache:
            cache[key] = self.bd3_json(*args)
            cache_file.write_text(json.dumps(cache))
        else:
            self.commands.append("(reused) bd3 " + " ".join(shlex.quote(str(a)) for a in args).replace(str(ROOT) + "/", ""))
        return cache[key]

    def ppl_over_seeds(self, run):
        """NLL mean and standard deviation over the scale's evaluation seeds (one for AR, whose
        NLL is exact)."""
        seeds = 1 if 'arch = "ar"' in (run / "config.toml").read_text() else self.scale["eval_seeds"]
        nll = [self.ppl(run, seed)["nll"] for seed in range(seeds)]
        return statistics.mean(nll), (statistics.stdev(nll) if len(nll) > 1 else 0.0)

    @staticmethod
    def train_seconds(run):
        path = run / "experiment-time.json"
        return json.loads(path.read_text())["train_seconds"] if path.exists() else float("nan")

    @staticmethod
    def series(run, key):
        """(step, value) of every `metrics.jsonl` line of a run that has `key`."""
        lines = (run / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        return [(r["step"], r[key]) for r in records if r.get(key) is not None]

    @staticmethod
    def last_metric(run, key):
        value = None
        for line in (run / "metrics.jsonl").read_text().splitlines():
            if line.startswith("{"):
                value = json.loads(line).get(key, value)
        return value

    # --- outputs ----------------------------------------------------------------------------
    def chart(self, name, points, title, x_label, y_label):
        """A PNG of `points` [(series, x, y)] through `bd3 report --points`; returns its path
        relative to the results document."""
        data = self.args.out / f"{self.key}-{name}.jsonl"
        data.write_text("".join(json.dumps({"series": s, "x": x, "y": y}) + "\n" for s, x, y in points))
        png = self.args.out / f"{self.key}-{name}.png"
        self.bd3("report", "--points", data, "--out", png, "--title", title,
                 "--x-label", x_label, "--y-label", y_label, record=False)
        return os.path.relpath(png, self.args.doc.parent)

    def write_section(self, body):
        """Replaces this experiment's section of the results document (or adds it), between
        markers, with `body`, the scale, the time taken and the commands run."""
        minutes = (time.time() - self.started) / 60
        invocation = f"python3 experiments/{Path(sys.argv[0]).name} --scale {self.scale_name}"
        if self.args.seeds > 1:
            invocation += f" --seeds {self.args.seeds}"
        section = (
            f"## {self.title}\n\n{body.strip()}\n\n"
            f"Made by `{invocation}` on {time.strftime('%Y-%m-%d')} in {minutes:.0f} min "
            f"(models reused from other experiments not counted).\n\n"
            "<details><summary>bd3 commands</summary>\n\n```\n" + "\n".join(self.commands) + "\n```\n</details>\n"
        )
        begin, end = f"<!-- experiment {self.key} -->", f"<!-- /experiment {self.key} -->"
        doc = self.args.doc.read_text() if self.args.doc.exists() else "# Results\n"
        block = f"{begin}\n{section}{end}"
        if begin in doc and end in doc:
            doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end):]
        else:
            doc = doc.rstrip("\n") + "\n\n" + block + "\n"
        self.args.doc.parent.mkdir(parents=True, exist_ok=True)
        self.args.doc.write_text(doc)
        print(f"[{self.key}] wrote its section of {self.args.doc}", file=sys.stderr)


def table(header, rows):
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
