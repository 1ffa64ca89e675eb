#!/usr/bin/env python3
"""(c) BD3-LM with L' = 1 against AR. At L' = 1 a block is masked or not, and with t = 1 (full
masking) every token is predicted from its clean prefix: the objective is AR's, with a [MASK]
query in place of a shift (docs/algorithm.md §3.8). The paper reports the same LM1B perplexity
for both (22.88) and a worse one under the linear schedule (<= 25.56), which `--with-linear`
adds."""

import math

from common import Experiment, table

exp = Experiment("c", "(c) BD3-LM L′ = 1 against AR", __doc__)
MODELS = [("ar", "AR", "AR"), ("bd3-1-full", "BD3-LM L′ = 1, full masking (t = 1)", "L'=1 full masking")]
if exp.args.with_linear:
    MODELS.append(("bd3-1-linear", "BD3-LM L′ = 1, linear schedule t ~ U[1e-3, 1]", "L'=1 linear"))
rows, exact_nll = [], {}
for name, label, _ in MODELS:
    run = exp.model(name)
    nll, sd = exp.ppl_over_seeds(run)
    # At L' = 1, t = 1 masks every token with weight 1: the NELBO is then the exact NLL.
    exact = exp.ppl(run, interval="1,1")["nll"] if name != "ar" else nll
    exact_nll[name] = exact
    rows.append([label, f"{nll:.4f} ± {sd:.4f}", f"{exact:.4f}", f"{math.exp(exact):.2f}",
                 f"{exp.last_metric(run, 'loss'):.3f}", f"{exp.train_seconds(run) / 60:.1f}"])

chart = exp.chart("valid-nelbo", [
    (series, step, v)
    for name, _, series in MODELS
    for step, v in exp.series(exp.runs / name, "valid_nelbo")
], "validation NELBO during training", "step", "NELBO (nats/token)")
body = f"""
The backbone and budget of experiment (a). "NELBO" is the bound of docs/algorithm.md §6.1 (t per
block from [1e-3, 1], ± the standard deviation over {exp.scale['eval_seeds']} draws of the
noise); "exact NLL" evaluates with t = 1 (`bd3 eval ppl --interval 1,1`), which at L′ = 1 masks
every token with weight 1 and so is the model's exact NLL, as AR's is.

{table(["model", "valid NELBO", "exact NLL", "PPL", "last training loss", "training min"], rows)}

Exact NLL against AR's: {'; '.join(
    f"{series} {exact_nll[name] - exact_nll['ar']:+.4f} nats/token ({100 * (math.exp(exact_nll[name] - exact_nll['ar']) - 1):+.1f} % perplexity)"
    for name, _, series in MODELS[1:])}.

![validation NELBO]({chart})
"""
exp.write_section(body)
