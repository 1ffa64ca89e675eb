//! ZeRO-1 (`dist.zero = true`): the AdamW moments are sharded across the data-parallel ranks.
//!
//! The trainable parameters are grouped, in name order, into gradient buckets of about
//! `dist.bucket_mib` (trainer::dist::GradBuckets), each padded with zeros to a multiple of the
//! world size; the buckets laid end to end are the flat buffer. Rank `r` owns the `r`-th of the
//! world-size equal parts of every bucket, and its shard is those parts in bucket order.
//! A step then is:
//!
//! 1. every bucket of gradients is reduce-scattered (averaged): each rank receives the averaged
//!    gradient of its part only. With `dist.overlap` a bucket goes as soon as backward has
//!    completed it (trainer::dist::overlap; MPI or NCCL), while backward goes on;
//! 2. the global gradient norm is the square root of the all-reduced sum of every shard's squared
//!    norm, and clipping scales the shard (the padding is zero and adds nothing);
//! 3. each rank runs AdamW on its shard of the parameters with moments of its shard's size;
//! 4. every bucket's updated parts are all-gathered and copied back into every rank's
//!    parameters, so the EMA (updated afterwards, on every rank, from the full parameters) is
//!    unchanged.
//!
//! Checkpoints hold the same global moment tensors `optim.exp_avg.<name>` as without ZeRO: each
//! rank writes the boxes of those tensors that its shard covers (a flat range of a tensor is a
//! few boxes, `Slice::boxes_of_flat_range`), and reads back the rows covering its range. So a
//! checkpoint moves freely between ZeRO and plain runs, between world sizes and bucket sizes.

use std::ops::Range;
use std::sync::Mutex;

use anyhow::{ensure, Context, Result};
use checkpoint::{LocalTensor, Slice};
use tch::{Device, Kind, Tensor};

use crate::config::OptimConfig;
use crate::dist::{Communicator, GradBuckets, Overlap, ReduceOp};
use crate::optim::{clip_coefficient, AdamW};
use crate::stateful::{kind_of, to_buffer, Params, Stateful, Stored};

/// Where every parameter lies in the flat buffer, and which parts of it this rank owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatLayout {
    pub shapes: Vec<Vec<usize>>,
    /// Start of each parameter in the flat buffer.
    pub offsets: Vec<usize>,
    /// Elements of all parameters, and of the flat buffer (with every bucket's padding).
    pub total: usize,
    pub padded: usize,
    /// Each bucket's elements of the flat buffer; each length is a multiple of the world size.
    pub buckets: Vec<Range<usize>>,
    /// This rank's part of each bucket, in flat positions; the shard is their concatenation.
    pub owned: Vec<Range<usize>>,
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
    /// The layout of parameters of `shapes` in buckets `bucket_of` (each parameter's bucket, in
    /// order, as trainer::dist::GradBuckets groups them), as rank `rank` of `world` sees it.
    pub fn new(shapes: Vec<Vec<usize>>, bucket_of: &[usize], rank: usize, world: usize) -> Self {
        assert_eq!(shapes.len(), bucket_of.len(), "a bucket for every parameter");
        let (mut offsets, mut buckets, mut owned, mut pieces) = (vec![], vec![], vec![], vec![]);
        let (mut total, mut flat, mut at) = (0, 0, 0);
        let mut first = 0;
        while first < shapes.len() {
            let mut end = first;
            while end < shapes.len() && bucket_of[end] == bucket_of[first] {
                end += 1;
            }
            let start = flat;
            for shape in &shapes[first..end] {
                offsets.push(flat);
                flat += shape.iter().product::<usize>();
            }
            total += flat - start;
            let len = (flat - start).div_ceil(world) * world;
            let part = start + rank * len / world..start + (rank + 1) * len / world;
            for (param, shape) in shapes.iter().enumerate().take(end).skip(first) {
                let (lo, hi) = (offsets[param], offsets[param] + shape.iter().product::<usize>());
                let (lo, hi) = (lo.max(part.start), hi.min(part.end));
                if lo < hi {
                    pieces.push(ShardPiece {
                        param,
                        elems: lo - offsets[param]..hi - offsets[param],
                        at: at + lo - part.start,
                    });
                }
            }
            at += part.len();
            flat = start + len;
            buckets.push(start..flat);
            owned.push(part);
            first = end;
        }
        Self { shapes, offsets, total, padded: flat, buckets, owned, pieces }
    }

    pub fn shard_len(&self) -> usize {
        self.owned.iter().map(|r| r.len()).sum()
    }

    /// Where each bucket's part starts in the shard.
    fn shard_starts(&self) -> impl Iterator<Item = usize> + '_ {
        self.owned.iter().scan(0, |at, r| {
            let start = *at;
            *at += r.len();
            Some(start)
        })
    }
}

/// AdamW over this rank's shard of the flat parameters.
pub struct ZeroAdamW {
    /// The hyper-parameters and step count; its moments are one tensor each, of the shard's size.
    pub adam: AdamW,
    pub layout: FlatLayout,
    /// The gradient buckets (the flat buffer), which the parameters' gradients are views of from
    /// the first step on: reduce-scattered as they are, without packing.
    grads: GradBuckets,
    /// Hooks that reduce-scatter the buckets during backward (`dist.overlap`).
    overlap: Option<Overlap>,
    /// This rank's part of every bucket, reduced during this step's backward.
    reduced_in_backward: Option<Vec<Tensor>>,
    /// This rank's shard of the reduced, clipped gradient, and which parameters had a gradient,
    /// between `reduce_gradients` and `apply`.
    reduced: Option<(Tensor, Vec<bool>)>,
    /// Steps of this process whose reduction overlapped backward.
    pub overlapped_steps: u64,
}

fn shape_of(t: &Tensor) -> Vec<usize> {
    t.size().iter().map(|&d| d as usize).collect()
}

impl ZeroAdamW {
    pub fn new(params: &[Tensor], cfg: &OptimConfig, rank: usize, world: usize, bucket_bytes: usize) -> Result<Self> {
        let kind = params.first().map_or(Kind::Float, Tensor::kind);
        ensure!(
            params.iter().all(|p| p.kind() == kind),
            "dist.zero needs every trainable parameter in one dtype (the flat buffer's)"
        );
        let device = params.first().map_or(Device::Cpu, Tensor::device);
        let grads = GradBuckets::padded(params, bucket_bytes, world);
        let layout = FlatLayout::new(params.iter().map(shape_of).collect(), &grads.bucket_of_each(), rank, world);
        let moment = || Tensor::zeros([layout.shard_len() as i64], (kind, device));
        let mut adam = AdamW::new(&[], cfg);
        (adam.exp_avg, adam.exp_avg_sq) = (vec![moment()], vec![moment()]);
        Ok(Self { adam, layout, grads, overlap: None, reduced_in_backward: None, reduced: None, overlapped_steps: 0 })
    }

    /// Averages the gradients over the ranks, clips them to `max_norm` (0: no clipping) and
    /// updates `params` on every rank (see the module docs); returns the gradient norm before
    /// clipping. Parameters without a gradient on this step are left alone, as by [`AdamW::step`].
    pub fn step(&mut self, comm: &dyn Communicator, params: &[Tensor], lr: f64, max_norm: f64) -> Result<f64> {
        let norm = self.reduce_gradients(comm, params, max_norm)?;
        self.apply(comm, params, lr)?;
        Ok(norm)
    }

    /// Backward of a step's last micro-step, each bucket reduce-scattered as soon as backward has
    /// completed it (step 1 of the module docs, overlapped), when the gradients already live in
    /// their buckets (from the second step of a process on) over several ranks; otherwise
    /// a plain backward, reduced in [`ZeroAdamW::reduce_gradients`]. Returns whether it overlapped.
    pub fn backward_overlapped(&mut self, comm: &dyn Communicator, params: &[Tensor], loss: &Tensor) -> Result<bool> {
        if !(comm.world_size() > 1 && self.grads.hold_gradients_of(params)) {
            loss.backward();
            return Ok(false);
        }
        let hooks = match &mut self.overlap {
            Some(h) => h,
            None => self.overlap.insert(Overlap::install(params, &self.grads)?),
        };
        let parts: Mutex<Vec<Option<Tensor>>> = Mutex::new(self.grads.buckets().iter().map(|_| None).collect());
        let reduce_scatter = |comm: &dyn Communicator, b: usize, bucket: &Tensor| {
            let part = comm.reduce_scatter_beside_compute(bucket, ReduceOp::Avg)?;
            parts.lock().unwrap_or_else(|e| e.into_inner())[b] = Some(part);
            Ok(())
        };
        let grads = &self.grads;
        hooks.backward_with(comm, grads, || loss.backward(), || grads.adopt_gradients(params), reduce_scatter)?;
        let parts = parts.into_inner().unwrap_or_else(|e| e.into_inner());
        self.reduced_in_backward =
            Some(parts.into_iter().collect::<Option<Vec<_>>>().context("a bucket was not reduced")?);
        self.overlapped_steps += 1;
        Ok(true)
    }

    /// Steps 1 and 2: reduce-scatters the gradients (unless backward did) and clips this rank's
    /// shard of them to the global norm, which it returns (the same on every rank);
    /// [`ZeroAdamW::apply`] uses them.
    pub fn reduce_gradients(&mut self, comm: &dyn Communicator, params: &[Tensor], max_norm: f64) -> Result<f64> {
        let layout = &self.layout;
        ensure!(
            params.len() == layout.shapes.len(),
            "ZeRO layout of {} parameters, got {}",
            layout.shapes.len(),
            params.len()
        );
        let has_grad: Vec<bool> = params.iter().map(|p| p.grad().defined()).collect();

        // 1. Reduce-scatter every bucket of the flat gradient.
        let parts = match self.reduced_in_backward.take() {
            Some(parts) => parts,
            None => {
                self.grads.adopt_gradients(params)?;
                self.grads
                    .buckets()
                    .iter()
                    .map(|b| comm.reduce_scatter(b, ReduceOp::Avg))
                    .collect::<Result<Vec<_>>>()?
            }
        };
        let grad = Tensor::cat(&parts, 0);

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
    /// left, then every rank's updated parts into every rank's parameters.
    pub fn apply(&mut self, comm: &dyn Communicator, params: &[Tensor], lr: f64) -> Result<()> {
        let (grad, has_grad) = self.reduced.take().context("ZeRO: an update without reduced gradients")?;
        let layout = &self.layout;
        let (kind, device) = (self.adam.exp_avg[0].kind(), self.adam.exp_avg[0].device());

        // 3. AdamW on the shard (zero at the buckets' padding), over runs of consecutive pieces
        // whose parameter has a gradient. A run may span padding: zero weights, gradients and
        // moments, which AdamW leaves zero.
        let shard = Tensor::zeros([layout.shard_len() as i64], (kind, device));
        tch::no_grad(|| {
            for piece in &layout.pieces {
                let p = params[piece.param].detach().reshape([-1]);
                let (at, n) = (piece.at as i64, piece.elems.len() as i64);
                shard.narrow(0, at, n).copy_(&p.narrow(0, piece.elems.start as i64, n));
            }
        });
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

        // 4. All-gather every bucket's updated parts into every rank's parameters.
        for ((bucket, owned), at) in layout.buckets.iter().zip(&layout.owned).zip(layout.shard_starts()) {
            let full = comm.all_gather(&shard.narrow(0, at as i64, owned.len() as i64))?;
            tch::no_grad(|| {
                for (i, p) in params.iter().enumerate() {
                    let offset = layout.offsets[i];
                    if bucket.contains(&offset) {
                        let n = layout.shapes[i].iter().product::<usize>() as i64;
                        p.shallow_clone().copy_(&full.narrow(0, (offset - bucket.start) as i64, n).view_as(p));
                    }
                }
            });
        }
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

    /// Every rank's parts tile every bucket, and the pieces tile every parameter, in order,
    /// whether the parameters share one bucket or are spread over several.
    #[test]
    fn shards_tile_the_flat_buffer() {
        let shapes = vec![vec![3, 2], vec![5], vec![], vec![2, 2, 2]];
        for bucket_of in [vec![0, 0, 0, 0], vec![0, 0, 1, 2], vec![0, 1, 1, 2]] {
            for world in 1..5 {
                let mut next = vec![0usize; shapes.len()];
                let mut covered = [false; 64];
                for rank in 0..world {
                    let l = FlatLayout::new(shapes.clone(), &bucket_of, rank, world);
                    assert_eq!(l.total, 20);
                    assert!(l.buckets.iter().all(|b| b.len() % world == 0), "{:?}", l.buckets);
                    assert_eq!(l.padded, l.buckets.iter().map(|b| b.len()).sum::<usize>());
                    assert_eq!(l.shard_len(), l.padded / world);
                    for (b, part) in l.buckets.iter().zip(&l.owned) {
                        assert_eq!(part.len(), b.len() / world);
                        part.clone().for_each(|i| covered[i] = !std::mem::replace(&mut covered[i], true));
                    }
                    let starts: Vec<usize> = l.shard_starts().collect();
                    for p in &l.pieces {
                        assert_eq!(p.elems.start, next[p.param], "world {world}: {:?}", l.pieces);
                        // The flat position of the piece is where the shard says.
                        let flat = l.offsets[p.param] + p.elems.start;
                        let k = l.owned.iter().position(|r| r.contains(&flat)).unwrap();
                        assert_eq!(flat - l.owned[k].start + starts[k], p.at);
                        assert!(l.owned[k].end >= flat + p.elems.len());
                        next[p.param] = p.elems.end;
                    }
                }
                assert_eq!(next, vec![6, 5, 1, 8], "{bucket_of:?}, world {world}");
                let padded = FlatLayout::new(shapes.clone(), &bucket_of, 0, world).padded;
                assert!(covered[..padded].iter().all(|&c| c), "the parts tile the flat buffer once");
            }
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
        let mut plain = Optimizer::new(&a, &cfg, false, 0, 1, 1 << 20).unwrap();
        // Buckets of 40 bytes: the parameters in three of them.
        let mut zero = Optimizer::new(&b, &cfg, true, 0, 1, 40).unwrap();
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
            // Only the clipping norm differs, in its last bits (summed per tensor there, over the
            // shard here, both in fp64: within 2·n·u ≈ 6e-15 relative for n = 25 squares). A
            // common factor on every gradient leaves AdamW's m̂/√v̂ unchanged but for ε, so it
            // moves the update by at most lr times that relative change, below 1e-16 a step.
            for (x, y) in a.iter().zip(&b) {
                assert!(x.allclose(y, 1e-9, 1e-9, false), "step {step}: {x} vs {y}");
            }
        }
        assert_eq!(zero.adam().state_elements(), 2 * (12 + 7 + 6));
    }
}
