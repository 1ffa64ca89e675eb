#!/usr/bin/env python3
"""(a) AR against BD3-LM L' = 4 and 16 against MDLM (L' = L): the same model, data and number of
training tokens; the NELBO perplexity bound on held-out text. The paper's ordering is
AR < BD3 L'=4 < BD3 L'=16 < MDLM (docs/algorithm.md §9)."""

import math
import statistics

from common import Experiment, table

MODELS = [("ar", "AR", "1"), ("bd3-4", "BD3-LM", "4"), ("bd3-16", "BD3-LM", "16"), ("mdlm", "MDLM", "L")]

exp = Experiment("a", "(a) Perplexity: AR, BD3-LM L′ = 4 and 16, MDLM", __doc__)
L = exp.scale["model"]["seq_len"]
rows, results, runs = [], {}, []
for name, label, block in MODELS:
    per_seed = []
    for seed in range(exp.args.seeds):
        run = exp.model(name, seed)
        runs.append(run)
        per_seed.append(exp.ppl_over_seeds(run))
    nll = statistics.mean(m for m, _ in per_seed)
    # Spread between training seeds when there are several, else that of the evaluation noise.
    spread = statistics.stdev(m for m, _ in per_seed) if len(per_seed) > 1 else per_seed[0][1]
    results[name] = (nll, spread)
    tokens = exp.last_metric(run, "tokens_seen")
    rows.append([label, block.replace("L", str(L)), f"{nll:.4f} ± {spread:.4f}", f"{math.exp(nll):.2f}",
                 f"{tokens:,}", f"{exp.train_seconds(run) / 60:.1f}"])

order = sorted(results, key=lambda n: results[n][0])
expected = ["ar", "bd3-4", "bd3-16", "mdlm"]
# Adjacent pairs whose gap is within twice the spread cannot be told apart at this scale.
ties = [(a, b) for a, b in zip(order, order[1:]) if results[b][0] - results[a][0] < 2 * max(results[a][1], results[b][1])]
verdict = "holds" if order == expected else "does not hold"
chart = exp.chart("valid-nelbo", [
    (f"{label} L'={block.replace('L', str(L))}", step, v)
    for (name, label, block) in MODELS
    for step, v in exp.series(exp.runs / name, "valid_nelbo")
], "validation NELBO during training", "step", "NELBO (nats/token)")

spread_note = ("the spread of the final models over training seeds" if exp.args.seeds > 1
               else f"the standard deviation over {exp.scale['eval_seeds']} Monte Carlo draws of the evaluation noise (AR's NLL is exact)")
body = f"""
Every model has the same backbone (hidden {exp.scale['model']['hidden']}, {exp.scale['model']['layers']} layers,
L = {L}), data (data/english, GPT-2 tokens), optimizer and number of training tokens; only the
block size (and for AR the causal objective) differs. NLL is the NELBO bound on the held-out
split in nats per token (docs/algorithm.md §6.1), ± {spread_note}.

{table(["model", "L′", "valid NLL", "PPL (≤)", "training tokens", "training min"], rows)}

Ordering by NLL: {' < '.join(order)}. The paper's ordering AR < L′ = 4 < L′ = 16 < MDLM {verdict}
at this scale{'; within twice the spread: ' + ', '.join(f'{a} ~ {b}' for a, b in ties) if ties else ''}.

![validation NELBO]({chart})
"""
exp.write_section(body)
