//! Gradient buckets: the parameters' gradients as views of a few flat buffers, reduced one
//! collective per buffer.

use std::ops::Range;

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

use super::{Communicator, ReduceOp};

/// How [`all_reduce_bucketed`] and [`GradBuckets`] group tensors: consecutive tensors of one type
/// share a bucket of at most `bucket_bytes` (a larger tensor goes alone), so every rank packs the
/// same buckets.
fn bucket_groups(tensors: &[Tensor], bucket_bytes: usize) -> Vec<Range<usize>> {
    let mut groups = vec![];
    let mut start = 0;
    while start < tensors.len() {
        let kind = tensors[start].kind();
        let mut end = start;
        let mut bytes = 0;
        while end < tensors.len() && tensors[end].kind() == kind {
            let size = tensors[end].numel() * kind.elt_size_in_bytes();
            if end > start && bytes + size > bucket_bytes {
                break;
            }
            bytes += size;
            end += 1;
        }
        groups.push(start..end);
        start = end;
    }
    groups
}

/// Sums or averages `tensors` over all ranks, packed into flat buffers of at most `bucket_bytes`
/// (one collective per bucket instead of one per tensor; a tensor larger than a bucket goes alone).
/// Packing costs a copy in and a copy out; gradients avoid both by living in [`GradBuckets`].
pub fn all_reduce_bucketed(
    comm: &dyn Communicator,
    tensors: &[Tensor],
    op: ReduceOp,
    bucket_bytes: usize,
) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(()); // the identity, without the copies
    }
    for range in bucket_groups(tensors, bucket_bytes) {
        let group = &tensors[range];
        let flat = Tensor::cat(&group.iter().map(|t| t.flatten(0, -1)).collect::<Vec<_>>(), 0);
        comm.all_reduce(&flat, op)?;
        let mut offset = 0;
        for t in group {
            let n = t.numel() as i64;
            t.shallow_clone().copy_(&flat.narrow(0, offset, n).view_as(t));
            offset += n;
        }
    }
    Ok(())
}

/// Flat buffers that the parameters' gradients are views of (PyTorch DDP's "gradient as bucket
/// view"): backward accumulates straight into them, and averaging the gradients over the ranks is
/// one in-place all-reduce per bucket, without the packing copies of [`all_reduce_bucketed`].
pub struct GradBuckets {
    buckets: Vec<Tensor>,
    /// Each parameter's place in its bucket, shaped like the parameter.
    views: Vec<Tensor>,
    /// Each parameter's bucket.
    bucket_of: Vec<usize>,
}

impl GradBuckets {
    /// Zeroed buckets for tensors shaped like `like`, grouped as [`all_reduce_bucketed`] does.
    pub fn new(like: &[Tensor], bucket_bytes: usize) -> Self {
        Self::padded(like, bucket_bytes, 1)
    }

    /// [`GradBuckets::new`] with every bucket's length rounded up to a multiple of `multiple`
    /// (zeros at its end): ZeRO's buckets, reduce-scattered into equal parts for `multiple` ranks.
    pub fn padded(like: &[Tensor], bucket_bytes: usize, multiple: usize) -> Self {
        let (mut buckets, mut views, mut bucket_of) = (vec![], vec![], vec![]);
        for range in bucket_groups(like, bucket_bytes) {
            bucket_of.extend(range.clone().map(|_| buckets.len()));
            let group = &like[range];
            let n: usize = group.iter().map(Tensor::numel).sum();
            buckets.push(Self::bucket_for(group, n.div_ceil(multiple) * multiple, &mut views));
        }
        Self { buckets, views, bucket_of }
    }

    /// A zeroed flat buffer of `len` elements whose first elements `views` receives, shaped like
    /// the tensors of `group` in order.
    fn bucket_for(group: &[Tensor], len: usize, views: &mut Vec<Tensor>) -> Tensor {
        let (kind, device) = group.first().map_or((Kind::Float, Device::Cpu), |t| (t.kind(), t.device()));
        let flat = Tensor::zeros([len as i64], (kind, device));
        let mut offset = 0;
        for t in group {
            let n = t.numel() as i64;
            views.push(flat.narrow(0, offset, n).view_as(t));
            offset += n;
        }
        flat
    }

    /// The flat buffers.
    pub fn buckets(&self) -> &[Tensor] {
        &self.buckets
    }

    /// The tensors the buckets hold, in the order of `like`.
    pub fn views(&self) -> &[Tensor] {
        &self.views
    }

    /// The bucket of each tensor, in the order of `like`.
    pub fn bucket_of_each(&self) -> Vec<usize> {
        self.bucket_of.clone()
    }

    /// Whether every parameter has a gradient and it is its view in the buckets: then backward
    /// accumulates straight into the buckets.
    pub fn hold_gradients_of(&self, params: &[Tensor]) -> bool {
        params.len() == self.views.len()
            && params.iter().zip(&self.views).all(|(p, view)| {
                let grad = p.grad();
                grad.defined() && grad.data_ptr() == view.data_ptr()
            })
    }

    /// Makes every parameter's gradient its view in the buckets. A gradient that already is
    /// costs nothing (every step after the first, as backward accumulates in place); another is
    /// copied in and re-pointed. A parameter without gradient gets zeros in its place and stays
    /// without one.
    pub fn adopt_gradients(&self, params: &[Tensor]) -> Result<()> {
        ensure!(
            params.len() == self.views.len(),
            "{} gradient views for {} parameters",
            self.views.len(),
            params.len()
        );
        tch::no_grad(|| {
            for (p, view) in params.iter().zip(&self.views) {
                let mut grad = p.grad();
                if !grad.defined() {
                    let _ = view.shallow_clone().zero_();
                } else if grad.data_ptr() != view.data_ptr() {
                    view.shallow_clone().copy_(&grad);
                    // Re-points the gradient's storage (shared by every handle to it) at the view.
                    let _ = grad.set_source_tensor_(view);
                }
            }
        });
        Ok(())
    }

    /// Reduces every bucket over all ranks, in place.
    pub fn all_reduce(&self, comm: &dyn Communicator, op: ReduceOp) -> Result<()> {
        if comm.world_size() > 1 {
            for b in &self.buckets {
                comm.all_reduce(b, op)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::SingleProcess;

    /// Gradients adopted into the buckets stay there: the next backward accumulates in place.
    #[test]
    fn gradients_live_in_their_buckets_across_steps() {
        let params: Vec<Tensor> = [vec![3i64, 2], vec![5], vec![4]]
            .iter()
            .map(|s| Tensor::ones(s.as_slice(), (Kind::Float, Device::Cpu)).set_requires_grad(true))
            .collect();
        // Small buckets: the first two parameters share one, the last goes alone.
        let buckets = GradBuckets::new(&params, 11 * 4);
        assert_eq!(buckets.buckets.len(), 2);
        for step in 1..=3 {
            for p in &params {
                p.shallow_clone().zero_grad();
            }
            // The last parameter gets no gradient on step 2.
            let used = if step == 2 { &params[..2] } else { &params[..] };
            let loss: Tensor = used.iter().map(|p| (p * step as f64).sum(Kind::Float)).sum();
            loss.backward();
            buckets.adopt_gradients(&params).unwrap();
            for (i, (p, view)) in params.iter().zip(buckets.views()).enumerate() {
                if step == 2 && i == 2 {
                    assert_eq!(view.abs().sum(Kind::Float).double_value(&[]), 0.0);
                    continue;
                }
                assert_eq!(p.grad().data_ptr(), view.data_ptr(), "step {step}, parameter {i}");
                assert!(view.equal(&Tensor::full_like(view, step as f64)), "step {step}, parameter {i}: {view}");
            }
            buckets.all_reduce(&SingleProcess, ReduceOp::Avg).unwrap();
        }
    }
}
