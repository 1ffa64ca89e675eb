"""FlexAttention and dense-mask SDPA on the block-diffusion two-stream mask, from the GPU machine's
own PyTorch: forward+backward milliseconds at the shape of kernels' cuda_check bench, plus the
output/gradient difference between FlexAttention and dense SDPA (a check that both see the same
mask). Prints one JSON object. Run by kernels/gpu-check.sh; needs a CUDA device.

The mask is docs/algorithm.md §2.2 (block diagonal, offset block-causal, block-causal), as
the authors' FlexAttention path builds it.
"""

import json
import sys
import time

import torch


def bd3_mask(n, b):
    def mask_mod(batch, head, q, k):
        q_clean, k_clean = q >= n, k >= n
        q_blk = torch.where(q_clean, q - n, q) // b
        k_blk = torch.where(k_clean, k - n, k) // b
        diagonal = (q_blk == k_blk) & (q_clean == k_clean)
        offset_causal = (~q_clean) & k_clean & (k_blk < q_blk)
        causal = q_clean & k_clean & (k_blk <= q_blk)
        return diagonal | offset_causal | causal

    return mask_mod


def timed(f, q, k, v, iters):
    times = []
    for i in range(iters + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = f(q, k, v)
        torch.autograd.grad(out.float().sum(), (q, k, v))
        torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


def main():
    quick = "--quick" in sys.argv
    B, H, n, D = (2, 3, 256, 64) if quick else (16, 12, 1024, 64)
    iters = 10
    result = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0), "rows": []}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention)
    except Exception as e:  # an older torch or a broken install: report, do not crash
        result["error"] = f"FlexAttention unavailable: {e!r}"
        print(json.dumps(result))
        return
    gen = torch.Generator(device="cuda").manual_seed(0)
    make = lambda: torch.randn(B, H, 2 * n, D, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    q, k, v = make(), make(), make()
    for b in (16, 4):
        row = {"batch": B, "heads": H, "two_l": 2 * n, "head_dim": D, "block": b}
        try:
            mask_mod = bd3_mask(n, b)
            block_mask = create_block_mask(mask_mod, None, None, 2 * n, 2 * n, device="cuda")
            idx = torch.arange(2 * n, device="cuda")
            dense = mask_mod(None, None, idx[:, None], idx[None, :])
            flex_f = lambda q, k, v: flex(q, k, v, block_mask=block_mask)
            sdpa_f = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
            a, c = flex_f(q, k, v).float(), sdpa_f(q, k, v).float()
            row["flex_vs_sdpa_max_abs_diff"] = (a - c).abs().max().item()
            row["flex_ms"] = timed(flex_f, q, k, v, iters)
            row["dense_sdpa_ms"] = timed(sdpa_f, q, k, v, iters)
        except Exception as e:  # e.g. torch.compile without a C compiler for Triton
            row["error"] = repr(e)[:500]
        result["rows"].append(row)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
