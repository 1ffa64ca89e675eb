//! `bd3 plan`: what a config costs on a cluster before it runs there. Memory per GPU, the
//! largest micro-batch that fits, model FLOPs per step (crate::flops, the same count as MFU),
//! step time at a stated MFU, gradient all-reduce time by an α-β model with and without overlap,
//! tokens/s, wall-clock time and GPU-hours for `train.steps`.
//!
//! Every figure is a model, not a measurement: the formulas and their assumptions are in the
//! comments, and `docs/scaling.md` shows where the projection bends.

use anyhow::{bail, ensure, Result};
use serde::Serialize;

use crate::config::{Arch, Config};
use crate::flops::{training_flops_per_step, training_pass};

/// A GPU model: dense bf16 peak, memory and HBM bandwidth, from the vendors' data sheets.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Gpu {
    pub name: &'static str,
    pub peak_bf16_flops: f64,
    pub memory_bytes: f64,
    pub hbm_bytes_per_s: f64,
    /// NVLink bandwidth one GPU drives in one direction (bytes/s).
    pub nvlink_bytes_per_s: f64,
}

const GB: f64 = 1e9;
const GIB: f64 = (1u64 << 30) as f64;

pub const GPUS: [Gpu; 4] = [
    Gpu {
        name: "A100",
        peak_bf16_flops: 312e12,
        memory_bytes: 80.0 * GIB,
        hbm_bytes_per_s: 2039.0 * GB,
        nvlink_bytes_per_s: 300.0 * GB,
    },
    Gpu {
        name: "H100",
        peak_bf16_flops: 989e12,
        memory_bytes: 80.0 * GIB,
        hbm_bytes_per_s: 3350.0 * GB,
        nvlink_bytes_per_s: 450.0 * GB,
    },
    Gpu {
        name: "H200",
        peak_bf16_flops: 989e12,
        memory_bytes: 141.0 * GIB,
        hbm_bytes_per_s: 4800.0 * GB,
        nvlink_bytes_per_s: 450.0 * GB,
    },
    Gpu {
        name: "B200",
        peak_bf16_flops: 2250e12,
        memory_bytes: 180.0 * GIB,
        hbm_bytes_per_s: 8000.0 * GB,
        nvlink_bytes_per_s: 900.0 * GB,
    },
];

pub fn gpu(name: &str) -> Result<Gpu> {
    match GPUS.iter().find(|g| g.name.eq_ignore_ascii_case(name)) {
        Some(g) => Ok(*g),
        None => bail!("unknown GPU {name:?}: expected one of {:?}", GPUS.map(|g| g.name)),
    }
}

/// The network between nodes, per GPU: bandwidth one GPU gets in one direction, and the
/// latency of one message (the α of the α-β model).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interconnect {
    pub name: &'static str,
    pub bytes_per_s_per_gpu: f64,
    pub latency_s: f64,
}

/// Assumptions: InfiniBand NDR with one 400 Gb/s NIC per GPU (the usual 8-GPU node);
/// Ethernet 100 Gb/s per node, shared by its GPUs (set per GPU by [`interconnect`]). Intra-node
/// messages take NVLink with 3 µs latency.
pub fn interconnect(name: &str, gpus_per_node: usize) -> Result<Interconnect> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "infiniband" | "ib" => Interconnect { name: "infiniband", bytes_per_s_per_gpu: 50.0 * GB, latency_s: 5e-6 },
        "ethernet" | "eth" => {
            Interconnect { name: "ethernet", bytes_per_s_per_gpu: 12.5 * GB / gpus_per_node as f64, latency_s: 30e-6 }
        }
        "nvlink" => Interconnect { name: "nvlink", bytes_per_s_per_gpu: f64::INFINITY, latency_s: 3e-6 },
        _ => bail!("unknown interconnect {name:?}: expected \"infiniband\", \"ethernet\" or \"nvlink\" (one node)"),
    })
}

const NVLINK_LATENCY_S: f64 = 3e-6;

/// The cluster a plan is for, and the MFU it assumes.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Cluster {
    pub gpu: Gpu,
    pub gpus_per_node: usize,
    pub nodes: usize,
    pub interconnect: Interconnect,
    /// The model FLOPs utilization the step time is projected at.
    pub mfu: f64,
}

impl Cluster {
    pub fn gpus(&self) -> usize {
        self.gpus_per_node * self.nodes
    }

    /// The slowest hop of a ring over all GPUs (bandwidth, latency): NVLink inside one node,
    /// the inter-node network otherwise.
    fn ring_link(&self) -> (f64, f64) {
        if self.nodes == 1 {
            (self.gpu.nvlink_bytes_per_s, NVLINK_LATENCY_S)
        } else {
            (self.interconnect.bytes_per_s_per_gpu.min(self.gpu.nvlink_bytes_per_s), self.interconnect.latency_s)
        }
    }
}

/// Ring all-reduce of `bytes` over `p` ranks, α-β model: 2(p − 1) messages in sequence, each
/// carrying 1/p of the data: 2(p − 1)·α + 2(p − 1)/p · bytes/B.
pub fn ring_allreduce_seconds(bytes: f64, p: usize, bandwidth: f64, latency: f64) -> f64 {
    if p <= 1 {
        return 0.0;
    }
    let p = p as f64;
    2.0 * (p - 1.0) * latency + 2.0 * (p - 1.0) / p * bytes / bandwidth
}

/// Tree all-reduce (reduce up a binary tree, broadcast down, pipelined): 2·⌈log₂ p⌉·α + 2·bytes/B.
/// Fewer latency terms than the ring, twice its bandwidth term at large p: better for small
/// messages on many ranks.
pub fn tree_allreduce_seconds(bytes: f64, p: usize, bandwidth: f64, latency: f64) -> f64 {
    if p <= 1 {
        return 0.0;
    }
    2.0 * (p as f64).log2().ceil() * latency + 2.0 * bytes / bandwidth
}

/// Memory of one GPU, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Memory {
    /// fp32 master weights, and the fp32 EMA copy (replicated on every rank).
    pub weights: f64,
    pub ema: f64,
    /// fp32 gradients (in the all-reduce buckets).
    pub gradients: f64,
    /// AdamW's two fp32 moments: all of them, and this rank's share with ZeRO-1.
    pub optimizer: f64,
    pub optimizer_zero1: f64,
    /// Saved activations of one micro-batch.
    pub activations: f64,
}

impl Memory {
    pub fn total(&self, zero1: bool) -> f64 {
        let optimizer = if zero1 { self.optimizer_zero1 } else { self.optimizer };
        self.weights + self.ema + self.gradients + optimizer + self.activations
    }
}

/// Parameters of the model a config builds (docs/algorithm.md §1.7; the trainer's tests check
/// it against the built model): embedding, per layer QKV, output projection, MLP with biases,
/// two LayerNorm weights and adaLN; the final layer; the σ-map.
pub fn parameter_count(cfg: &Config) -> u64 {
    let m = &cfg.model;
    let (d, r, c, v) = (m.hidden as u64, m.mlp_ratio as u64, m.cond_dim as u64, m.vocab_size as u64);
    let adaln = m.arch == Arch::Bd3;
    let per_layer =
        3 * d * d + d * d + (d * r * d + r * d) + (r * d * d + d) + 2 * d + if adaln { c * 6 * d + 6 * d } else { 0 };
    let output = d + d * v + v + if adaln { c * 2 * d + 2 * d } else { 0 };
    let sigma_map = if adaln { 256 * c + c + c * c + c } else { 0 };
    v * d + m.layers as u64 * per_layer + output + sigma_map
}

/// Activations one sequence keeps for backward, in bytes: per layer and input token ≈ 34·d
/// bytes in bf16 (the usual count for a transformer layer whose attention never materializes the
/// score matrix, as the fused and block-sparse kernels do), plus the fp32 logits and their
/// log-softmax at the positions that carry a loss (2 × 4 bytes × V each).
pub fn activation_bytes_per_sequence(cfg: &Config) -> Result<f64> {
    let m = &cfg.model;
    let (layout, logit_positions) = training_pass(cfg)?;
    let input_tokens = layout.query_len() as f64;
    Ok(m.layers as f64 * input_tokens * 34.0 * m.hidden as f64 + logit_positions as f64 * 8.0 * m.vocab_size as f64)
}

/// The projection for one config on one cluster.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub cluster: Cluster,
    pub parameters: u64,
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub global_batch: usize,
    pub zero1: bool,
    pub memory: Memory,
    /// Memory a GPU may fill (10 % is left to the CUDA context, allocator and NCCL).
    pub usable_memory: f64,
    pub fits: bool,
    /// The largest micro-batch that fits (0: not even one sequence).
    pub max_micro_batch: usize,
    pub flops_per_step: f64,
    pub compute_seconds: f64,
    pub allreduce_bytes: f64,
    pub allreduce_ring_seconds: f64,
    pub allreduce_tree_seconds: f64,
    /// The all-reduce that remains after backward: all of it without overlap; with overlap,
    /// what backward (2/3 of the compute) cannot hide, plus the last bucket, which is only
    /// ready when backward ends.
    pub exposed_comm_seconds: f64,
    pub exposed_comm_overlapped_seconds: f64,
    pub step_seconds: f64,
    pub step_seconds_overlapped: f64,
    pub tokens_per_s: f64,
    pub steps: u64,
    pub wall_clock_hours: f64,
    pub gpu_hours: f64,
}

pub fn plan(cfg: &Config, cluster: Cluster) -> Result<Plan> {
    ensure!(cluster.gpus_per_node > 0 && cluster.nodes > 0, "GPUs per node and nodes must be at least 1");
    ensure!(cluster.mfu > 0.0 && cluster.mfu <= 1.0, "the MFU to project at must lie in (0, 1], got {}", cluster.mfu);
    let world = cluster.gpus();
    let parameters = parameter_count(cfg);
    let p = parameters as f64;
    let (mb, accum) = (cfg.train.micro_batch, cfg.train.grad_accum);
    let per_sequence = activation_bytes_per_sequence(cfg)?;
    let memory = Memory {
        weights: 4.0 * p,
        ema: if cfg.optim.ema_decay > 0.0 { 4.0 * p } else { 0.0 },
        gradients: 4.0 * p,
        optimizer: 8.0 * p,
        optimizer_zero1: 8.0 * p / world as f64,
        activations: per_sequence * mb as f64,
    };
    let zero1 = cfg.dist.zero;
    let usable_memory = 0.9 * cluster.gpu.memory_bytes;
    let fixed = memory.total(zero1) - memory.activations;
    let max_micro_batch = ((usable_memory - fixed) / per_sequence).floor().max(0.0) as usize;

    let flops_per_step = training_flops_per_step(cfg, world)?;
    let compute_seconds = flops_per_step / world as f64 / (cluster.gpu.peak_bf16_flops * cluster.mfu);
    // fp32 gradients are reduced once per optimizer step (accumulation reduces only at the end).
    let allreduce_bytes = 4.0 * p;
    let (bandwidth, latency) = cluster.ring_link();
    let ring = ring_allreduce_seconds(allreduce_bytes, world, bandwidth, latency);
    let tree = tree_allreduce_seconds(allreduce_bytes, world, bandwidth, latency);
    let comm = ring.min(tree);
    let backward = compute_seconds * 2.0 / 3.0 / accum as f64;
    let last_bucket = comm * (cfg.dist.bucket_bytes() as f64 / allreduce_bytes).min(1.0);
    let overlapped = if world > 1 { (comm - backward).max(0.0) + last_bucket } else { 0.0 };
    let step_seconds = compute_seconds + comm;
    let step_seconds_overlapped = compute_seconds + overlapped.min(comm);
    let tokens_per_step = (mb * accum * world * cfg.model.seq_len) as f64;
    let steps = cfg.train.steps;
    let wall_clock_hours = step_seconds_overlapped * steps as f64 / 3600.0;
    Ok(Plan {
        cluster,
        parameters,
        micro_batch: mb,
        grad_accum: accum,
        global_batch: mb * accum * world,
        zero1,
        memory,
        usable_memory,
        fits: mb <= max_micro_batch,
        max_micro_batch,
        flops_per_step,
        compute_seconds,
        allreduce_bytes,
        allreduce_ring_seconds: ring,
        allreduce_tree_seconds: tree,
        exposed_comm_seconds: comm,
        exposed_comm_overlapped_seconds: overlapped.min(comm),
        step_seconds,
        step_seconds_overlapped,
        tokens_per_s: tokens_per_step / step_seconds_overlapped,
        steps,
        wall_clock_hours,
        gpu_hours: wall_clock_hours * world as f64,
    })
}

impl Plan {
    /// The plan as a text report.
    pub fn render(&self) -> String {
        let c = &self.cluster;
        let gib = |b: f64| b / GIB;
        let m = &self.memory;
        let mut out = format!(
            "{} × {} GPUs per node × {} nodes ({} GPUs, {}), projected at {:.0} % MFU\n",
            c.gpu.name,
            c.gpus_per_node,
            c.nodes,
            c.gpus(),
            c.interconnect.name,
            100.0 * c.mfu
        );
        out += &format!(
            "model: {:.1} M parameters; micro-batch {} × accumulation {} × {} GPUs = global batch {}\n",
            self.parameters as f64 / 1e6,
            self.micro_batch,
            self.grad_accum,
            c.gpus(),
            self.global_batch
        );
        out += &format!(
            "memory per GPU (GiB): weights {:.2}, EMA {:.2}, gradients {:.2}, AdamW {:.2} ({:.2} with ZeRO-1), \
             activations {:.2}; total {:.2} ({}), usable {:.1}\n",
            gib(m.weights),
            gib(m.ema),
            gib(m.gradients),
            gib(m.optimizer),
            gib(m.optimizer_zero1),
            gib(m.activations),
            gib(m.total(self.zero1)),
            if self.zero1 { "ZeRO-1" } else { "replicated optimizer" },
            gib(self.usable_memory)
        );
        out += &if self.fits {
            format!("fits: yes; the largest micro-batch that fits is {}\n", self.max_micro_batch)
        } else {
            format!(
                "fits: NO: micro-batch {} needs {:.1} GiB of {:.1} usable; the largest that fits is {} (raise \
                 train.grad_accum to keep the global batch)\n",
                self.micro_batch,
                gib(m.total(self.zero1)),
                gib(self.usable_memory),
                self.max_micro_batch
            )
        };
        out += &format!(
            "model FLOPs per step: {:.3e}; compute {:.3} s per step per GPU\n",
            self.flops_per_step, self.compute_seconds
        );
        out += &format!(
            "all-reduce of {:.0} MB: ring {:.1} ms, tree {:.1} ms; exposed {:.1} ms without overlap, {:.1} ms with\n",
            self.allreduce_bytes / 1e6,
            1e3 * self.allreduce_ring_seconds,
            1e3 * self.allreduce_tree_seconds,
            1e3 * self.exposed_comm_seconds,
            1e3 * self.exposed_comm_overlapped_seconds
        );
        out += &format!(
            "step {:.3} s ({:.3} s without overlap); {:.0} tokens/s; {} steps: {:.1} h wall clock ({:.1} days), {:.0} GPU-hours\n",
            self.step_seconds_overlapped,
            self.step_seconds,
            self.tokens_per_s,
            self.steps,
            self.wall_clock_hours,
            self.wall_clock_hours / 24.0,
            self.gpu_hours
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(sets: &[&str]) -> Config {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::from_toml_str("", &sets).unwrap()
    }

    fn cluster(gpus_per_node: usize, nodes: usize) -> Cluster {
        Cluster {
            gpu: gpu("H100").unwrap(),
            gpus_per_node,
            nodes,
            interconnect: interconnect("infiniband", gpus_per_node).unwrap(),
            mfu: 0.4,
        }
    }

    #[test]
    fn the_small_model_by_hand() {
        let cfg = small(&["train.micro_batch=16"]);
        // The paper's small model (README: 169,627,218 parameters).
        assert_eq!(parameter_count(&cfg), 169_627_218);
        let plan = plan(&cfg, cluster(8, 1)).unwrap();
        let p = 169_627_218.0;
        assert_eq!(plan.memory.weights, 4.0 * p);
        assert_eq!(plan.memory.optimizer_zero1, 8.0 * p / 8.0);
        // 12 layers × 2048 tokens × 34 × 768 bytes + 1024 logits × 8 × 50258 bytes, × 16.
        let per_sequence = 12.0 * 2048.0 * 34.0 * 768.0 + 1024.0 * 8.0 * 50258.0;
        assert_eq!(plan.memory.activations, 16.0 * per_sequence);
        // crate::flops's hand-checked count for one rank, × 8 ranks.
        assert_eq!(plan.flops_per_step, 8.0 * 22_378_304_765_952.0);
        // The same fp64 expression in another order: a few ulps of a value below 1.
        assert!((plan.compute_seconds - 22_378_304_765_952.0 / (989e12 * 0.4)).abs() < 1e-12);
        assert!(plan.fits);
        let free = 0.9 * 80.0 * GIB - 16.0 * p;
        assert_eq!(plan.max_micro_batch, (free / per_sequence).floor() as usize);
    }

    #[test]
    fn all_reduce_follows_the_alpha_beta_model() {
        let plan = plan(&small(&[]), cluster(8, 4)).unwrap();
        // 32 ranks over InfiniBand: 2·31·5 µs + 2·31/32 · 4p bytes / 50 GB/s.
        let bytes = 4.0 * 169_627_218.0;
        let ring = 2.0 * 31.0 * 5e-6 + 2.0 * 31.0 / 32.0 * bytes / 50e9;
        // Seconds below 1 from a handful of fp64 operations: a few ulps (≈1e-16) each.
        assert!((plan.allreduce_ring_seconds - ring).abs() < 1e-12);
        let tree = 2.0 * 5.0 * 5e-6 + 2.0 * bytes / 50e9;
        assert!((plan.allreduce_tree_seconds - tree).abs() < 1e-12);
        assert!(plan.exposed_comm_overlapped_seconds <= plan.exposed_comm_seconds);
        assert!(plan.step_seconds_overlapped <= plan.step_seconds);
        let one = super::plan(&small(&[]), cluster(1, 1)).unwrap();
        assert_eq!((one.allreduce_ring_seconds, one.exposed_comm_overlapped_seconds), (0.0, 0.0));
    }

    #[test]
    fn a_config_that_does_not_fit_says_so() {
        let plan = plan(&small(&["train.micro_batch=512"]), cluster(8, 1)).unwrap();
        assert!(!plan.fits);
        let text = plan.render();
        assert!(
            text.contains("fits: NO: micro-batch 512 needs") && text.contains("the largest that fits is"),
            "{text}"
        );
        assert!(gpu("V100").unwrap_err().to_string().contains("expected one of"));
        assert!(interconnect("carrier pigeon", 8).is_err());
    }
}
