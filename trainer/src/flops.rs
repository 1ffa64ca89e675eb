//! Model FLOPs of a training step, and model FLOPs utilization (MFU): the step's model FLOPs
//! per second over the peak the hardware offers. "Model" FLOPs count what the algorithm
//! needs (every matrix multiply of the forward pass, ×3 for forward + backward), not what an
//! implementation happens to execute, so the figure compares runs across implementations.

use anyhow::Result;
use kernels::BlockLayout;

use crate::config::{Arch, Config};

/// The sinusoidal embedding of the noise level that feeds the σ-map (docs/algorithm.md §1.3).
const SIGMA_FREQUENCY_DIM: usize = 256;

/// Forward-pass FLOPs of one sequence of the training objective, by part.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForwardFlops {
    /// QKV, attention-output and MLP projections over every input token, all layers.
    pub dense: f64,
    /// Scores (Q·Kᵀ) and the weighted sum of values over the pairs the mask lets attend.
    pub attention: f64,
    /// The output projection to the vocabulary at the positions that carry a loss.
    pub output: f64,
    /// adaLN modulations and the σ-map, once per sequence (the conditioning is per sequence).
    pub conditioning: f64,
}

impl ForwardFlops {
    pub fn total(&self) -> f64 {
        self.dense + self.attention + self.output + self.conditioning
    }
}

/// What one training sequence's forward pass runs over, as the objective runs it: the attention
/// layout (its query length is the number of input tokens) and the positions that carry a loss.
/// BD3-LM: x_t ⊕ x_0 (2L tokens, the two-stream mask); MDLM (L′ = L): x_t alone; AR: L − 1
/// tokens with a causal mask. Logits count at the L positions of x_t (L − 1 for AR): bd3
/// computes them only where a token is masked, so this is the algorithm's cost and MFU slightly
/// overstates bd3's hardware use (it counts what the reference computes).
pub fn training_pass(cfg: &Config) -> Result<(BlockLayout, usize)> {
    let l = cfg.model.seq_len;
    Ok(match cfg.model.arch {
        Arch::Ar => (BlockLayout::Causal { seq_len: l - 1 }, l - 1),
        Arch::Bd3 if cfg.diffusion.block_size == l => (BlockLayout::block_causal(l, l)?, l),
        Arch::Bd3 => (BlockLayout::two_stream(l, cfg.diffusion.block_size)?, l),
    })
}

/// The forward pass of one training sequence ([`training_pass`]).
///
/// Per token and layer: QKV 2·d·3d, output 2·d·d, MLP 2·2·d·(r·d) FLOPs (a multiply-add is 2);
/// per visible (query, key) pair and layer: 2·d for the score and 2·d for the value sum.
pub fn forward_flops_per_sequence(cfg: &Config) -> Result<ForwardFlops> {
    let m = &cfg.model;
    let (d, r, c, v) = (m.hidden as f64, m.mlp_ratio as f64, m.cond_dim as f64, m.vocab_size as f64);
    let (layout, logit_positions) = training_pass(cfg)?;
    let layers = m.layers as f64;
    let tokens = layout.query_len() as f64;
    let per_token_layer = 2.0 * d * 3.0 * d + 2.0 * d * d + 2.0 * 2.0 * d * (r * d);
    let conditioning = match m.arch {
        Arch::Ar => 0.0,
        // Per layer c → 6d (shift, scale, gate of attention and MLP); final layer c → 2d;
        // σ-map 256 → c → c.
        Arch::Bd3 => layers * 2.0 * c * 6.0 * d + 2.0 * c * 2.0 * d + 2.0 * (SIGMA_FREQUENCY_DIM as f64 * c + c * c),
    };
    Ok(ForwardFlops {
        dense: layers * tokens * per_token_layer,
        attention: layers * 4.0 * d * layout.visible_pairs() as f64,
        output: 2.0 * d * v * logit_positions as f64,
        conditioning,
    })
}

/// Model FLOPs of one optimizer step on all ranks: forward + backward (backward costs two
/// forwards: one product for the activations' gradient, one for the weights') over
/// micro-batch × accumulation × ranks sequences.
pub fn training_flops_per_step(cfg: &Config, world_size: usize) -> Result<f64> {
    let sequences = (cfg.train.micro_batch * cfg.train.grad_accum * world_size) as f64;
    Ok(3.0 * forward_flops_per_sequence(cfg)?.total() * sequences)
}

/// Dense bf16 tensor-core peaks (FLOP/s, without structured sparsity) of the GPUs bd3 knows,
/// matched against the device name (`nvidia-smi --query-gpu=name`). From the vendors' data
/// sheets: A100 312 T, H100 SXM 989 T (PCIe 756 T), H200 989 T, B200 2250 T.
pub const GPU_PEAK_BF16: [(&str, f64); 5] =
    [("A100", 312e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("B200", 2250e12)];

/// The bf16 peak of the GPU named `name`, if the table has it (the first entry whose key the
/// name contains, so "H100 PCIe" is found before "H100").
pub fn gpu_peak_bf16(name: &str) -> Option<f64> {
    GPU_PEAK_BF16.iter().find(|(key, _)| name.contains(key)).map(|&(_, peak)| peak)
}

/// The peak FLOP/s MFU is measured against: `metrics.peak_tflops` when set, else the bf16 peak
/// of a CUDA device the table knows (its name from `nvidia-smi`); `None` on the CPU and on
/// unknown GPUs, where only FLOP/s are reported.
pub fn device_peak_flops(peak_tflops: Option<f64>, device: tch::Device) -> Option<f64> {
    if let Some(t) = peak_tflops {
        return Some(t * 1e12);
    }
    let tch::Device::Cuda(index) = device else { return None };
    let name = gpu_name(index)?;
    let peak = gpu_peak_bf16(&name);
    if peak.is_none() {
        tracing::warn!(gpu = %name, "no bf16 peak known for this GPU: MFU is not reported (set metrics.peak_tflops)");
    }
    peak
}

/// The name of CUDA device `index` as `nvidia-smi` reports it.
pub fn gpu_name(index: usize) -> Option<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader", "-i", &index.to_string()])
        .output()
        .ok()?;
    let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !name.is_empty()).then_some(name)
}

/// MFU of one rank: its share of the step's model FLOPs per second over its device's peak.
pub fn mfu(flops_per_step: f64, world_size: usize, step_seconds: f64, peak_per_device: f64) -> f64 {
    flops_per_step / world_size as f64 / step_seconds / peak_per_device
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_are_matched_by_name() {
        assert_eq!(gpu_peak_bf16("NVIDIA H100 80GB HBM3"), Some(989e12));
        assert_eq!(gpu_peak_bf16("NVIDIA H100 PCIe"), Some(756e12));
        assert_eq!(gpu_peak_bf16("NVIDIA A100-SXM4-80GB"), Some(312e12));
        assert_eq!(gpu_peak_bf16("Tesla T4"), None);
        // One fp64 product and division of exactly representable values: at most a few ulps off 1.
        assert!((mfu(989e12, 2, 0.5, 989e12) - 1.0).abs() < 1e-12);
    }
}
