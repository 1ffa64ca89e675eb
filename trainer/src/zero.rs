//! ZeRO-1 (`dist.zero = true`): the AdamW moments are sharded across the data-parallel ranks.
//!
//! All trainable parameters are laid end to end, in name order, in one flat buffer padded to a
//! multiple of the world size; rank `r` owns elements `r·n .. (r+1)·n` of it (`n` = padded / world).
//! A step then is:
//!
//! 1. the gradients, flattened into that layout, are reduce-scattered (averaged): each rank
//!    receives the averaged gradient of its shard only;
//! 2. the global gradient norm is the square root of the all-reduced sum of every shard's squared
//!    norm, and clipping scales the shard (the padding is zero and adds nothing);
//! 3. each rank runs AdamW on its shard of the parameters with moments of its shard's size;
//! 4. the updated shards are all-gathered and copied back into every rank's parameters, so the
//!    EMA (updated afterwards, on every rank, from the full parameters) is unchanged.
//!
//! Checkpoints hold the same global moment tensors `optim.exp_avg.<name>` as without ZeRO: each
//! rank writes the boxes of those tensors that its shard covers (a flat range of a tensor is a
//! few boxes, `Slice::boxes_of_flat_range`), and reads back the rows covering its range. So a
//! checkpoint moves freely between ZeRO and plain runs and between world sizes.

use std::ops::Range;

use anyhow::{ensure, Context, Result};
use checkpoint::{LocalTensor, Slice};
use tch::{Device, Kind, Tensor};

use crate::config::OptimConfig;
use crate::dist::{Communicator, GradBuckets, ReduceOp};
use crate::optim::{clip_coefficient, AdamW};
use crate::stateful::{kind_of, to_buffer, Params, Stateful, Stored};

/// Where every parameter lies in the flat buffer, and which part of it this rank owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatLayout {
    pub shapes: Vec<Vec<usize>>,
    /// Start of each parameter in the flat buffer.
    pub offsets: Vec<usize>,
    /// Elements of all parameters, and that rounded up to a multiple of the world size.
    pub total: usize,
    pub padded: usize,
    /// This rank's elements of the flat buffer.
    pub shard: Range<usize>,
    /// The parts of parameters inside the shard, in flat order.
    pub pieces: Vec<ShardPiece>,
}

/// Elements `elems` of parameter `param` (of its row-major flattening) sit at `at..` in the shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPiece {
    pub param: usize,
    pub elems: Range<usize>,
    pub at: usize,
}

impl FlatLayout {
    pub fn new(shapes: Vec<Vec<usize>>, rank: usize, world: usize) -> Self {
        let mut offsets = Vec::with_capacity(shapes.len());
        let mut total = 0;
        for shape in &shapes {
            offsets.push(total);
            total += shape.iter().product::<usize>();
        }
        let padded = total.div_ceil(world) * world;
        let n = padded / world;
        let shard = rank * n..(rank + 1) * n;
        let mut pieces = vec![];
        for (param, shape) in shapes.iter().enumerate() {
            let (start, end) = (offsets[param], offsets[param] + shape.iter().product::<usize>());
            let (lo, hi) = (start.max(shard.start), end.min(shard.end));
            if lo < hi {
                pieces.push(ShardPiece { param, elems: lo - start..hi - start, at: lo - shard.start });
            }
        }
        Self { shapes, offsets, total, padded, shard, pieces }
    }

    pub fn shard_len(&self) -> usize {
        self.shard.len()
    }
}

/// AdamW over this rank's shard of the flat parameters.
pub struct ZeroAdamW {
    /// The hyper-parameters and step count; its moments are one tensor each, of the shard's size.
    pub adam: AdamW,
    pub layout: FlatLayout,
    /// The flat gradient (padded), which the parameters' gradients are views of from the first
    /// step on: reduce-scattered as it is, without packing.
    grads: Option<GradBuckets>,
    /// This rank's shard of the reduced, clipped gradient, and which parameters had a gradient,
    /// between `reduce_gradients` and `apply`.
    reduced: Option<(Tensor, Vec<bool>)>,
}

fn shape_of(t: &Tensor) -> Vec<usize> {
    t.size().iter().map(|&d| d as usize).collect()
}

impl ZeroAdamW {
    pub fn new(params: &[Tensor], cfg: &OptimConfig, rank: usize, world: usize) -> Result<Self> {
        let kind = params.first().map_or(Kind::Float, Tensor::kind);
        ensure!(
            params.iter().all(|p| p.kind() == kind),
            "dist.zero needs every trainable parameter in one dtype (the flat buffer's)"
        );
        let device = params.first().map_or(Device::Cpu, Tensor::device);
        let layout = FlatLayout::new(params.iter().map(shape_of).collect(), rank, world);
        let moment = || Tensor::zeros([layout.shard_len() as i64], (kind, device));
        let mut adam = AdamW::new(&[], cfg);
        (adam.exp_avg, adam.exp_avg_sq) = (vec![moment()], vec![moment()]);
        Ok(Self { adam, layout, grads: None, reduced: None })
    }

    /// Averages the gradients over the ranks, clips them to `max_norm` (0: no clipping) and
    /// updates `params` on every rank (see the module docs); returns the gradient norm before
    /// clipping. Parameters without a gradient on this step are left alone, as by [`AdamW::step`].
    pub fn step(&mut self, comm: &dyn Communicator, params: &[Tensor], lr: f64, max_norm: f64) -> Result<f64> {
        let norm = self.reduce_gradients(comm, params, max_norm)?;
        self.apply(comm, params, lr)?;
        Ok(norm)
    }

    /// Steps 1 and 2: reduce-scatters the gradients and clips this rank's shard of them to the
    /// global norm, which it returns (the same on every rank); [`ZeroAdamW::apply`] uses them.
    pub fn reduce_gradients(&mut self, comm: &dyn Communicator, params: &[Tensor], max_norm: f64) -> Result<f64> {
        let layout = &self.layout;
        ensure!(
            params.len() == layout.shapes.len(),
            "ZeRO layout of {} parameters, got {}",
            layout.shapes.len(),
            params.len()
        );
        let has_grad: Vec<bool> = params.iter().map(|p| p.grad().defined()).collect();

        // 1. Reduce-scatter the flat gradient.
        let flat = self.grads.get_or_insert_with(|| GradBuckets::single(params, layout.padded));
        flat.adopt_gradients(params)?;
        let grad = comm.reduce_scatter(&flat.buckets()[0], ReduceOp::Avg)?;

        // 2. The global norm from the shards' squared norms.
        let square = Tensor::from_slice(&[grad.square().sum(Kind::Double).double_value(&[])]);
        comm.all_reduce(&square, ReduceOp::Sum)?;
        let norm = square.double_value(&[0]).sqrt();
        if let Some(coef) = clip_coefficient(norm, max_norm) {
            let _ = grad.shallow_clone().g_mul_scalar_(coef);
        }
        self.reduced = Some((grad, has_grad));
        Ok(norm)
    }

    /// Steps 3 and 4: AdamW on this rank's shard with the gradients [`ZeroAdamW::reduce_gradients`]
    /// left, then every rank's updated shard into every rank's parameters.
    pub fn apply(&mut self, comm: &dyn Communicator, params: &[Tensor], lr: f64) -> Result<()> {
        let (grad, has_grad) = self.reduced.take().context("ZeRO: an update without reduced gradients")?;
        let layout = &self.layout;
        let (kind, device) = (self.adam.exp_avg[0].kind(), self.adam.exp_avg[0].device());

        // 3. AdamW on the shard, over runs of consecutive pieces whose parameter has a gradient.
        let mut own: Vec<Tensor> = layout
            .pieces
            .iter()
            .map(|piece| {
                let p = params[piece.param].detach().reshape([-1]);
                p.narrow(0, piece.elems.start as i64, piece.elems.len() as i64)
            })
            .collect();
        let covered: usize = layout.pieces.iter().map(|p| p.elems.len()).sum();
        own.push(Tensor::zeros([(layout.shard_len() - covered) as i64], (kind, device)));
        let shard = Tensor::cat(&own, 0);
        drop(own);
        self.adam.step += 1;
        let mut i = 0;
        while i < layout.pieces.len() {
            let start = i;
            while i < layout.pieces.len() && has_grad[layout.pieces[i].param] {
                i += 1;
            }
            if i > start {
                let from = layout.pieces[start].at as i64;
                let to = (layout.pieces[i - 1].at + layout.pieces[i - 1].elems.len()) as i64;
                let part = |t: &Tensor| t.narrow(0, from, to - from);
                let (m, v) = (part(&self.adam.exp_avg[0]), part(&self.adam.exp_avg_sq[0]));
                self.adam.update(&part(&shard), &part(&grad), &m, &v, lr, self.adam.step);
            }
            i += 1; // past a piece without gradient (or the end)
        }

        // 4. All-gather the updated shards into every rank's parameters.
        let full = comm.all_gather(&shard)?;
        tch::no_grad(|| {
            for (i, p) in params.iter().enumerate() {
                let n = layout.shapes[i].iter().product::<usize>() as i64;
                p.shallow_clone().copy_(&full.narrow(0, layout.offsets[i] as i64, n).view_as(p));
            }
        });
        Ok(())
    }

    fn moments(&self) -> [(&'static str, &Tensor); 2] {
        [("optim.exp_avg", &self.adam.exp_avg[0]), ("optim.exp_avg_sq", &self.adam.exp_avg_sq[0])]
    }
}

/// Checkpoints hold the global moment tensors: this rank writes and reads the boxes its shard
/// covers (see the module docs); the step count is in the manifest's progress.
impl Stateful for ZeroAdamW {
    /// The boxes of the global moment tensors `optim.exp_avg.<name>` and `optim.exp_avg_sq.<name>`
    /// that this rank's shard holds, as checkpoint parts.
    fn save_tensors(&self, params: &Params, _rank: usize, _world: usize) -> Result<Vec<LocalTensor>> {
        let names = &params.names;
        let mut out = vec![];
        for piece in &self.layout.pieces {
            let shape = &self.layout.shapes[piece.param];
            for (prefix, moment) in self.moments() {
                let name = format!("{prefix}.{}", names[piece.param]);
                let mut at = piece.at;
                for part in Slice::boxes_of_flat_range(shape, piece.elems.clone()) {
                    let dims: Vec<i64> = part.shape.iter().map(|&d| d as i64).collect();
                    let data = moment.narrow(0, at as i64, part.numel() as i64).view(dims.as_slice());
                    at += part.numel();
                    out.push(LocalTensor {
                        buffer: to_buffer(&name, &data)?,
                        global_shape: shape.clone(),
                        offsets: part.offsets,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Loads this rank's shard of the moments from a checkpoint's global moment tensors (written
    /// by any number of ranks, with or without ZeRO). Moments the checkpoint lacks stay zero.
    fn load(&mut self, params: &Params, from: &Stored<'_>) -> Result<()> {
        let names = &params.names;
        if let Some(progress) = from.progress()? {
            self.adam.step = progress.optimizer_steps;
        }
        let mut requests = vec![];
        let mut targets = vec![];
        for piece in &self.layout.pieces {
            let shape = &self.layout.shapes[piece.param];
            for (prefix, moment) in self.moments() {
                let name = format!("{prefix}.{}", names[piece.param]);
                if !from.has(&name) {
                    continue;
                }
                // The whole rows that cover the range: one box, whatever the writers held.
                let (rows, skip) = covering_rows(shape, &piece.elems);
                requests.push((name, rows));
                targets.push((moment.narrow(0, piece.at as i64, piece.elems.len() as i64), skip));
            }
        }
        let buffers = from.store.read_many(from.manifest, &requests)?;
        for ((target, skip), buffer) in targets.iter().zip(&buffers) {
            let numel = buffer.numel() as i64;
            let src = Tensor::from_data_size(&buffer.data, &[numel], kind_of(buffer.dtype))
                .narrow(0, *skip as i64, target.numel() as i64)
                .to_kind(target.kind())
                .to_device(target.device());
            tch::no_grad(|| target.shallow_clone().copy_(&src));
        }
        Ok(())
    }
}

/// The box of whole rows of a tensor of `shape` that covers flat elements `elems`, and where
/// `elems` starts inside that box's elements.
fn covering_rows(shape: &[usize], elems: &Range<usize>) -> (Slice, usize) {
    let mut rows = Slice::whole(shape);
    let Some(&first_dim) = shape.first() else { return (rows, 0) };
    let inner = shape[1..].iter().product::<usize>().max(1);
    let (first, end) = (elems.start / inner, elems.end.div_ceil(inner).min(first_dim));
    rows.offsets[0] = first;
    rows.shape[0] = end - first;
    (rows, elems.start - first * inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::SingleProcess;
    use crate::optimizer::Optimizer;

    #[test]
    fn shards_tile_the_flat_buffer() {
        let shapes = vec![vec![3, 2], vec![5], vec![], vec![2, 2, 2]];
        for world in 1..5 {
            let mut next = vec![0usize; shapes.len()];
            for rank in 0..world {
                let l = FlatLayout::new(shapes.clone(), rank, world);
                assert_eq!(l.total, 20);
                assert_eq!(l.padded % world, 0);
                assert_eq!(l.shard_len(), l.padded / world);
                for p in &l.pieces {
                    assert_eq!(p.elems.start, next[p.param], "world {world}: {:?}", l.pieces);
                    assert_eq!(l.offsets[p.param] + p.elems.start, l.shard.start + p.at);
                    next[p.param] = p.elems.end;
                }
            }
            assert_eq!(next, vec![6, 5, 1, 8]);
        }
    }

    /// On one process, ZeRO is plain AdamW with clipping: the same weights step by step.
    #[test]
    fn one_shard_steps_like_replicated_adamw() {
        tch::manual_seed(1);
        let cfg = OptimConfig { weight_decay: 0.1, ..OptimConfig::default() };
        let make = || {
            [vec![4i64, 3], vec![7], vec![2, 1, 3]]
                .iter()
                .map(|s| Tensor::randn(s.as_slice(), (Kind::Double, Device::Cpu)).set_requires_grad(true))
                .collect::<Vec<_>>()
        };
        let a = make();
        let b: Vec<Tensor> = a.iter().map(|t| t.detach().copy().set_requires_grad(true)).collect();
        let mut plain = Optimizer::new(&a, &cfg, false, 0, 1).unwrap();
        let mut zero = Optimizer::new(&b, &cfg, true, 0, 1).unwrap();
        for step in 0..4 {
            for (params, opt) in [(&a, &mut plain), (&b, &mut zero)] {
                for p in params.iter() {
                    p.shallow_clone().zero_grad();
                }
                // The last parameter gets no gradient on odd steps: left alone by both.
                let used = if step % 2 == 1 { &params[..2] } else { &params[..] };
                let loss: Tensor = used.iter().map(|p| (p * 3.0).sin().sum(Kind::Double)).sum();
                loss.backward();
                opt.step(&SingleProcess, params, 1e-2, 0.5, 1 << 20).unwrap();
            }
            // Only the clipping norm differs, in its last bits (summed per tensor in f32 there,
            // over the shard in f64 here).
            for (x, y) in a.iter().zip(&b) {
                assert!(x.allclose(y, 1e-9, 1e-9, false), "step {step}: {x} vs {y}");
            }
        }
        assert_eq!(zero.adam().state_elements(), 2 * (12 + 7 + 6));
    }
}
