#!/usr/bin/env python3
"""(d) Sampling: generative perplexity under bd3's own AR judge (the AR model of experiment (a))
and unigram entropy against the number of network calls (NFE), for the first-hitting sampler and
the ancestral sampler with several T, from BD3-LM L' = 4 and 16 and MDLM; and the statistics of
variable-length generation beyond the training length (docs/algorithm.md §5, §6.3–6.5)."""

import json
import os
import statistics

from common import Experiment, table

exp = Experiment("d", "(d) Sampling: quality against network calls, and variable length", __doc__)
s = exp.scale
L = s["model"]["seq_len"]
judge = exp.model("ar")
samples_dir = exp.args.out / "d-samples"
samples_dir.mkdir(exist_ok=True)


def sample(run, tag, tokens, sets):
    """`bd3 sample --format jsonl` into a file; returns (file, the parsed lines)."""
    args = ["sample", "--config", run / "config.toml", "--weights", run / "model.safetensors",
            "--tokens", tokens, "--format", "jsonl", "--set", f"sample.batch={s['samples']}"]
    for o in sets:
        args += ["--set", o]
    out = samples_dir / f"{tag}.jsonl"
    out.write_text(exp.bd3(*args))
    lines = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
    return out, lines


def judged(path):
    return exp.bd3_json("eval", "gen", "--input", path, "--judge-config", judge / "config.toml",
                        "--judge-weights", judge / "model.safetensors")


rows, ppl_points, entropy_points = [], [], []
for name, label in (("bd3-4", "BD3-LM L'=4"), ("bd3-16", "BD3-LM L'=16"), ("mdlm", f"MDLM (L'={L})")):
    run = exp.model(name)
    settings = [("first-hitting", None)] + [("ancestral", t) for t in s["ancestral_steps"]]
    for algorithm, steps in settings:
        sets = ['sample.algorithm="first_hitting"'] if steps is None else [
            'sample.algorithm="ancestral"', f"sample.steps={steps}"]
        tag = f"{name}-{algorithm}" + ("" if steps is None else f"-T{steps}")
        path, lines = sample(run, tag, L, sets)
        report = judged(path)
        nfe = lines[0]["nfe"]
        series = f"{label} {'first-hitting' if steps is None else 'ancestral'}"
        ppl_points.append((series, nfe, report["mean_ppl"]))
        entropy_points.append((series, nfe, report["mean_entropy"]))
        rows.append([label, algorithm if steps is None else f"ancestral T={steps}", nfe,
                     f"{report['mean_ppl']:.1f}", f"{report['mean_entropy']:.3f}",
                     f"{statistics.mean(line['tokens_per_s'] for line in lines):.0f}"])
# The AR model's own samples, for reference (scored by itself, so flattered).
path, lines = sample(judge, "ar", L, [])
report = judged(path)
rows.append(["AR (judge's own samples)", "ancestral", lines[0]["nfe"], f"{report['mean_ppl']:.1f}",
             f"{report['mean_entropy']:.3f}", f"{lines[0]['tokens_per_s']:.0f}"])

# Variable length: stop at EOS or when the last 256 tokens' entropy falls below 4 nats
# (docs/algorithm.md §5.7), with a cap far beyond the training length.
cap = s["var_length_tokens"]
var_rows = []
for name, label in (("bd3-16", "BD3-LM L'=16"), ("bd3-4", "BD3-LM L'=4")):
    path, lines = sample(exp.model(name), f"{name}-var-length", cap, ["sample.var_length=true"])
    lengths = [len(line["tokens"]) for line in lines]
    stops = {}
    for line in lines:
        stops[line["stop"]] = stops.get(line["stop"], 0) + 1
    var_rows.append([label, len(lines), cap, f"{statistics.median(lengths):g}", max(lengths), min(lengths),
                     ", ".join(f"{k}: {v}" for k, v in sorted(stops.items()))])

ppl_chart = exp.chart("gen-ppl-by-nfe", ppl_points, "generative perplexity (AR judge) by NFE", "NFE", "gen PPL")
entropy_chart = exp.chart("entropy-by-nfe", entropy_points, "unigram entropy by NFE", "NFE", "entropy (nats)")
body = f"""
The models of experiments (a) and the AR model of (a) as the judge. {s['samples']} sequences of
L = {L} tokens per setting, nucleus p = 0.9 (the sampler's default), KV cache on. Generative
perplexity is the mean of per-sample perplexities under the judge; entropy is the mean unigram
entropy of a sample's tokens (docs/algorithm.md §6.3–6.4). NFE counts network calls per batch of
sequences (docs/algorithm.md §5.3); first-hitting makes one per token.

{table(["model", "sampler", "NFE", "gen PPL", "entropy", "tokens/s"], rows)}

![gen PPL by NFE]({ppl_chart})

![entropy by NFE]({entropy_chart})

Variable-length generation (`sample.var_length = true`, first-hitting), tokens including BOS:

{table(["model", "samples", "cap", "median length", "max", "min", "stopped by"], var_rows)}

The samples themselves are in `{os.path.relpath(samples_dir, exp.args.doc.parent)}/`.
"""
exp.write_section(body)
