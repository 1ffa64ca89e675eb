//! The optimizer of a run: AdamW replicated on every rank after an all-reduce of the gradients, or
//! sharded across the ranks with ZeRO-1 (`dist.zero`, trainer::zero). Both save the same global
//! moment tensors, so a checkpoint moves between them.

use anyhow::{Context, Result};
use checkpoint::LocalTensor;
use tch::Tensor;

use crate::config::OptimConfig;
use crate::dist::{Communicator, GradBuckets, Overlap, ReduceOp};
use crate::optim::{clip_grad_norm, AdamW};
use crate::stateful::{replicated_parts, Params, Stateful, Stored};
use crate::zero::ZeroAdamW;

/// The optimizer of a run: AdamW replicated on every rank after an all-reduce of the gradients,
/// or sharded across the ranks (`dist.zero`).
pub enum Optimizer {
    Replicated(Replicated),
    Zero(ZeroAdamW),
}

/// AdamW on every rank, after averaging the gradients in place in their buckets.
pub struct Replicated {
    pub adam: AdamW,
    /// Created at the first step of a multi-rank run, when the gradients exist.
    buckets: Option<GradBuckets>,
    /// Hooks that reduce the buckets during backward (`dist.overlap`), installed at the first
    /// step that overlaps.
    overlap: Option<Overlap>,
    /// The buckets were reduced during this step's backward.
    reduced: bool,
    /// Steps of this process whose reduction overlapped backward.
    overlapped_steps: u64,
}

impl Optimizer {
    /// `bucket_bytes`: the size of ZeRO's gradient buckets (the replicated optimizer takes its
    /// own at the first reduction).
    pub fn new(
        params: &[Tensor],
        cfg: &OptimConfig,
        zero: bool,
        rank: usize,
        world: usize,
        bucket_bytes: usize,
    ) -> Result<Self> {
        Ok(if zero {
            Self::Zero(ZeroAdamW::new(params, cfg, rank, world, bucket_bytes).context("dist.zero")?)
        } else {
            Self::Replicated(Replicated {
                adam: AdamW::new(params, cfg),
                buckets: None,
                overlap: None,
                reduced: false,
                overlapped_steps: 0,
            })
        })
    }

    /// The hyper-parameters, the step count and the moments this rank holds.
    pub fn adam(&self) -> &AdamW {
        match self {
            Self::Replicated(r) => &r.adam,
            Self::Zero(z) => &z.adam,
        }
    }

    /// Steps of this process whose gradient reduction overlapped backward.
    pub fn overlapped_steps(&self) -> u64 {
        match self {
            Self::Replicated(r) => r.overlapped_steps,
            Self::Zero(z) => z.overlapped_steps,
        }
    }

    fn as_stateful(&self) -> &dyn Stateful {
        match self {
            Self::Replicated(r) => r,
            Self::Zero(z) => z,
        }
    }

    fn as_stateful_mut(&mut self) -> &mut dyn Stateful {
        match self {
            Self::Replicated(r) => r,
            Self::Zero(z) => z,
        }
    }

    /// Averages the gradients over the ranks (gradient buckets of `bucket_bytes` when
    /// replicated), clips them to the global norm `max_norm` and takes one AdamW step at rate
    /// `lr`; returns the gradient norm before clipping.
    pub fn step(
        &mut self,
        comm: &dyn Communicator,
        params: &[Tensor],
        lr: f64,
        max_norm: f64,
        bucket_bytes: usize,
    ) -> Result<f64> {
        let norm = self.reduce_gradients(comm, params, max_norm, bucket_bytes)?;
        self.apply(comm, params, lr)?;
        Ok(norm)
    }

    /// Backward of `loss` on a step's last micro-step. With `overlap`, on several ranks, once the
    /// gradients live in their buckets (from the second step of a process on), each bucket is
    /// averaged over the ranks (replicated) or reduce-scattered (ZeRO-1) as soon as backward has
    /// completed it (trainer::dist::overlap: MPI for CPU tensors, NCCL for CUDA ones), and
    /// [`Self::reduce_gradients`] only clips. Otherwise (the first step) a plain backward,
    /// reduced after.
    pub fn backward_last(
        &mut self,
        comm: &dyn Communicator,
        params: &[Tensor],
        loss: &Tensor,
        overlap: bool,
    ) -> Result<()> {
        if let Self::Zero(zero) = self {
            if overlap {
                zero.backward_overlapped(comm, params, loss)?;
            } else {
                loss.backward();
            }
            return Ok(());
        }
        if let Self::Replicated(Replicated {
            buckets: Some(buckets), overlap: hooks, reduced, overlapped_steps, ..
        }) = self
        {
            if overlap && comm.world_size() > 1 && buckets.hold_gradients_of(params) {
                let hooks = match hooks {
                    Some(h) => h,
                    None => hooks.insert(Overlap::install(params, buckets)?),
                };
                hooks.backward_reducing(comm, buckets, || loss.backward(), || buckets.adopt_gradients(params))?;
                *reduced = true;
                *overlapped_steps += 1;
                return Ok(());
            }
        }
        loss.backward();
        Ok(())
    }

    /// The first half of [`Optimizer::step`]: gradients averaged over the ranks and clipped;
    /// returns the global gradient norm before clipping, the same on every rank, so that all
    /// ranks agree on whether to take the step.
    pub fn reduce_gradients(
        &mut self,
        comm: &dyn Communicator,
        params: &[Tensor],
        max_norm: f64,
        bucket_bytes: usize,
    ) -> Result<f64> {
        match self {
            Self::Replicated(Replicated { buckets, reduced, .. }) => {
                if std::mem::take(reduced) {
                    // Already averaged while backward ran (Self::backward_last).
                } else if comm.world_size() > 1 {
                    let buckets = buckets.get_or_insert_with(|| GradBuckets::new(params, bucket_bytes));
                    buckets.adopt_gradients(params)?;
                    buckets.all_reduce(comm, ReduceOp::Avg)?;
                }
                Ok(clip_grad_norm(params, max_norm))
            }
            Self::Zero(zero) => zero.reduce_gradients(comm, params, max_norm),
        }
    }

    /// The second half of [`Optimizer::step`]: one AdamW step at rate `lr` from the reduced
    /// gradients; every rank ends with the same weights.
    pub fn apply(&mut self, comm: &dyn Communicator, params: &[Tensor], lr: f64) -> Result<()> {
        match self {
            Self::Replicated(r) => {
                r.adam.step(params, lr);
                Ok(())
            }
            Self::Zero(zero) => zero.apply(comm, params, lr),
        }
    }
}

/// Every rank holds all the moments: each writes its row slice of them, like the weights.
impl Stateful for Replicated {
    fn save_tensors(&self, params: &Params, rank: usize, world: usize) -> Result<Vec<LocalTensor>> {
        replicated_parts(self.named_moments(params), rank, world)
    }

    /// Moments the checkpoint lacks (imported weights) stay zero, as on a fresh start.
    fn load(&mut self, params: &Params, from: &Stored<'_>) -> Result<()> {
        if let Some(progress) = from.progress()? {
            self.adam.step = progress.optimizer_steps;
        }
        let mut present = self.named_moments(params);
        present.retain(|(name, _)| from.has(name));
        from.load_whole(&present)
    }
}

impl Replicated {
    fn named_moments(&self, params: &Params) -> Vec<(String, Tensor)> {
        let mut named = Vec::with_capacity(2 * params.names.len());
        for (i, name) in params.names.iter().enumerate() {
            named.push((format!("optim.exp_avg.{name}"), self.adam.exp_avg[i].shallow_clone()));
            named.push((format!("optim.exp_avg_sq.{name}"), self.adam.exp_avg_sq[i].shallow_clone()));
        }
        named
    }
}

impl Stateful for Optimizer {
    fn save_tensors(&self, params: &Params, rank: usize, world: usize) -> Result<Vec<LocalTensor>> {
        self.as_stateful().save_tensors(params, rank, world)
    }

    fn load(&mut self, params: &Params, from: &Stored<'_>) -> Result<()> {
        self.as_stateful_mut().load(params, from)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tch::{Device, Kind};

    use super::*;

    type Landing = Box<dyn FnOnce() + Send>;

    /// Rank 0 of 2, whose peer contributes `0.5·x + 1` for this rank's `x`, and whose collectives
    /// beside compute land only at `finish_beside_compute`, as NCCL's do on their stream: until
    /// then an all-reduced bucket is unchanged and a reduce-scatter's output is NaN. A step that
    /// read the gradients before finishing would see them.
    #[derive(Default)]
    struct LateCollectives {
        pending: Mutex<Vec<Landing>>,
    }

    fn reduced(x: &Tensor, op: ReduceOp) -> Tensor {
        let sum = x + (x * 0.5 + 1.0);
        match op {
            ReduceOp::Sum => sum,
            ReduceOp::Avg => sum / 2.0,
        }
    }

    /// Rank 0's part of the reduction of `input`: the first half.
    fn first_half(input: &Tensor, op: ReduceOp) -> Tensor {
        let flat = reduced(&input.flatten(0, -1), op);
        flat.narrow(0, 0, flat.numel() as i64 / 2)
    }

    impl Communicator for LateCollectives {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce(&self, tensor: &Tensor, op: ReduceOp) -> Result<()> {
            tch::no_grad(|| tensor.shallow_clone().copy_(&reduced(tensor, op)));
            Ok(())
        }
        fn reduce_scatter(&self, input: &Tensor, op: ReduceOp) -> Result<Tensor> {
            Ok(first_half(input, op))
        }
        fn all_gather(&self, input: &Tensor) -> Result<Tensor> {
            let flat = input.flatten(0, -1);
            Ok(Tensor::cat(&[&flat, &(&flat * 0.5 + 1.0)], 0))
        }
        fn broadcast(&self, _: &Tensor, _: usize) -> Result<()> {
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            Ok(())
        }
        fn all_reduce_beside_compute(&self, tensor: &Tensor, op: ReduceOp) -> Result<()> {
            let tensor = tensor.shallow_clone();
            self.pending.lock().unwrap().push(Box::new(move || {
                tch::no_grad(|| tensor.shallow_clone().copy_(&reduced(&tensor, op)));
            }));
            Ok(())
        }
        fn reduce_scatter_beside_compute(&self, input: &Tensor, op: ReduceOp) -> Result<Tensor> {
            let out = Tensor::full([input.numel() as i64 / 2], f64::NAN, (input.kind(), input.device()));
            let (input, landing) = (input.shallow_clone(), out.shallow_clone());
            self.pending.lock().unwrap().push(Box::new(move || {
                tch::no_grad(|| landing.shallow_clone().copy_(&first_half(&input, op)));
            }));
            Ok(out)
        }
        fn finish_beside_compute(&self) -> Result<()> {
            for land in self.pending.lock().unwrap().drain(..) {
                land();
            }
            Ok(())
        }
    }

    /// The weights after 3 steps of 3 parameters in 4 buckets, reduced after backward or beside it.
    fn train(zero: bool, overlap: bool) -> (Vec<Tensor>, u64) {
        tch::manual_seed(3);
        let params: Vec<Tensor> = [vec![5i64, 3], vec![7], vec![4, 4]]
            .iter()
            .map(|s| Tensor::randn(s.as_slice(), (Kind::Double, Device::Cpu)).set_requires_grad(true))
            .collect();
        let comm = LateCollectives::default();
        // 48-byte buckets: several per run, so the hooks send some during backward.
        let bucket_bytes = 48;
        let mut opt = Optimizer::new(&params, &OptimConfig::default(), zero, 0, 2, bucket_bytes).unwrap();
        for _ in 0..3 {
            for p in &params {
                p.shallow_clone().zero_grad();
            }
            let loss: Tensor = params.iter().map(|p| (p * 2.0).cos().sum(Kind::Double)).sum();
            opt.backward_last(&comm, &params, &loss, overlap).unwrap();
            opt.reduce_gradients(&comm, &params, 1.0, bucket_bytes).unwrap();
            opt.apply(&comm, &params, 1e-2).unwrap();
            assert!(comm.pending.lock().unwrap().is_empty(), "a collective never landed");
        }
        (params, opt.overlapped_steps())
    }

    /// The host-side contract of the NCCL overlap, tested without a GPU: every step reads the
    /// overlapped reductions only after `finish_beside_compute`, replicated and with ZeRO-1.
    #[test]
    fn overlapped_steps_read_collectives_that_land_late_only_after_they_land() {
        for zero in [false, true] {
            let (after, none) = train(zero, false);
            let (beside, overlapped) = train(zero, true);
            assert_eq!(none, 0);
            // The first step makes the gradients views of the buckets; the two after overlap.
            assert_eq!(overlapped, 2, "zero = {zero}");
            for (a, b) in after.iter().zip(&beside) {
                assert!(a.isfinite().all().int64_value(&[]) == 1, "zero = {zero}: {a}");
                assert!(a.equal(b), "zero = {zero}: {a} vs {b}");
            }
        }
    }
}
