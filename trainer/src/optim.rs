//! AdamW, the learning-rate schedule, gradient-norm clipping and the EMA of the weights (docs/algorithm.md §8).
//!
//! Written out over plain tensors rather than libtorch's C++ optimizer so that the state
//! (moments, step) is explicit: it can be checkpointed, and later sharded across ranks.

use anyhow::Result;
use checkpoint::LocalTensor;
use tch::Tensor;

use crate::config::OptimConfig;
use crate::stateful::{replicated_parts, Params, Stateful, Stored};

/// Linear warm-up to the base rate over `warmup` steps, then constant
/// (`get_constant_schedule_with_warmup`). Step `s` (0-based) uses base·min(1, (s+1)/warmup):
/// the first update already moves the weights, where the reference's schedule wastes it at 0.
#[derive(Debug, Clone, Copy)]
pub struct LrSchedule {
    pub base: f64,
    pub warmup: u64,
}

impl LrSchedule {
    pub fn lr(&self, step: u64) -> f64 {
        if self.warmup == 0 {
            return self.base;
        }
        self.base * ((step + 1) as f64 / self.warmup as f64).min(1.0)
    }
}

/// AdamW with decoupled weight decay (Loshchilov & Hutter), PyTorch's update rule.
#[derive(Debug)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Optimizer steps taken.
    pub step: u64,
    /// First and second moments, one pair per parameter, in parameter order.
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
}

impl AdamW {
    pub fn new(params: &[Tensor], cfg: &OptimConfig) -> Self {
        Self {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            step: 0,
            exp_avg: params.iter().map(Tensor::zeros_like).collect(),
            exp_avg_sq: params.iter().map(Tensor::zeros_like).collect(),
        }
    }

    /// One update of every parameter from its `.grad()`; parameters without a gradient are
    /// left alone.
    pub fn step(&mut self, params: &[Tensor], lr: f64) {
        self.step += 1;
        let step = self.step;
        for (i, p) in params.iter().enumerate() {
            let g = p.grad();
            if g.defined() {
                self.update(p, &g, &self.exp_avg[i], &self.exp_avg_sq[i], lr, step);
            }
        }
    }

    /// The update of optimizer step `step` (counted from 1) of `p` from its gradient `g` and its
    /// moments `m`, `v`, all in place (views into larger tensors work: ZeRO updates a shard).
    pub fn update(&self, p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, lr: f64, step: u64) {
        let bias1 = 1.0 - self.beta1.powi(step as i32);
        let bias2 = 1.0 - self.beta2.powi(step as i32);
        let (mut p, mut m, mut v) = (p.shallow_clone(), m.shallow_clone(), v.shallow_clone());
        tch::no_grad(|| {
            if self.weight_decay != 0.0 {
                let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
            }
            let _ = m.g_mul_scalar_(self.beta1).g_add_(&(g * (1.0 - self.beta1)));
            let _ = v.g_mul_scalar_(self.beta2).g_add_(&(g * g * (1.0 - self.beta2)));
            let denom = (&v / bias2).sqrt() + self.eps;
            let _ = p.g_sub_(&(&m / &denom * (lr / bias1)));
        });
    }

    /// Elements of optimizer state this process holds (both moments).
    pub fn state_elements(&self) -> usize {
        self.exp_avg.iter().chain(&self.exp_avg_sq).map(|t| t.numel()).sum()
    }
}

/// Scales all gradients so that their global L2 norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> f64 {
    let grads: Vec<Tensor> = params.iter().map(Tensor::grad).filter(Tensor::defined).collect();
    if grads.is_empty() {
        return 0.0;
    }
    // Summed in fp32 (fp64 for a float64 model), as the gradients' own precision allows.
    let kind = crate::model::wide_kind(grads[0].kind());
    let squares: Vec<Tensor> = grads.iter().map(|g| g.to_kind(kind).square().sum(kind)).collect();
    let norm = Tensor::stack(&squares, 0).sum(kind).sqrt().double_value(&[]);
    if let Some(coef) = clip_coefficient(norm, max_norm) {
        tch::no_grad(|| {
            for g in &grads {
                let _ = g.shallow_clone().g_mul_scalar_(coef);
            }
        });
    }
    norm
}

/// The factor that scales gradients of global norm `norm` down to `max_norm` (0: no clipping),
/// or `None` when they are within it (`torch.nn.utils.clip_grad_norm_`'s rule).
pub fn clip_coefficient(norm: f64, max_norm: f64) -> Option<f64> {
    let coef = max_norm / (norm + 1e-6);
    (max_norm > 0.0 && coef < 1.0).then_some(coef)
}

/// Exponential moving average of the weights with warm-up: after the n-th update
/// (n counted from 1) the decay is min(decay, (1+n)/(10+n)).
#[derive(Debug)]
pub struct Ema {
    pub decay: f64,
    pub updates: u64,
    pub shadow: Vec<Tensor>,
}

impl Ema {
    pub fn new(params: &[Tensor], decay: f64) -> Self {
        Self { decay, updates: 0, shadow: params.iter().map(|p| p.detach().copy()).collect() }
    }

    pub fn update(&mut self, params: &[Tensor]) {
        self.updates += 1;
        let n = self.updates as f64;
        let d = self.decay.min((1.0 + n) / (10.0 + n));
        tch::no_grad(|| {
            for (s, p) in self.shadow.iter_mut().zip(params) {
                // shadow ← shadow − (1 − d)(shadow − θ)
                let _ = s.g_sub_(&((&*s - p) * (1.0 - d)));
            }
        });
    }

    /// Runs `f` with the EMA weights in `params` (evaluation and sampling use them, as the
    /// reference does), then puts the live weights back; without an EMA (decay 0), with the live
    /// weights.
    pub fn swapped_in<T>(&mut self, params: &[Tensor], f: impl FnOnce() -> Result<T>) -> Result<T> {
        let use_ema = self.decay > 0.0;
        if use_ema {
            self.swap(params);
        }
        let result = f();
        if use_ema {
            self.swap(params);
        }
        result
    }

    /// Swaps the EMA weights into `params` (and the live weights into the shadow); calling it
    /// twice restores the original state. Evaluation and sampling run between two swaps.
    pub fn swap(&mut self, params: &[Tensor]) {
        tch::no_grad(|| {
            for (s, p) in self.shadow.iter_mut().zip(params) {
                let live = p.detach().copy();
                p.shallow_clone().copy_(s);
                s.copy_(&live);
            }
        });
    }
}

/// The EMA weights are saved as `ema.<name>`, split across the ranks like the weights.
impl Stateful for Ema {
    fn save_tensors(&self, params: &Params, rank: usize, world: usize) -> Result<Vec<LocalTensor>> {
        let named = params.names.iter().zip(&self.shadow).map(|(n, s)| (format!("ema.{n}"), s.shallow_clone()));
        replicated_parts(named.collect(), rank, world)
    }

    /// A checkpoint without EMA weights (none written by bd3 lacks them) starts the EMA from the
    /// loaded weights: load the model first.
    fn load(&mut self, params: &Params, from: &Stored<'_>) -> Result<()> {
        if let Some(progress) = from.progress()? {
            self.updates = progress.ema_updates;
        }
        let mut present = vec![];
        for (i, name) in params.names.iter().enumerate() {
            let key = format!("ema.{name}");
            if from.has(&key) {
                present.push((key, self.shadow[i].shallow_clone()));
            } else {
                tch::no_grad(|| self.shadow[i].copy_(&params.tensors[i].detach()));
            }
        }
        from.load_whole(&present)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, nn::OptimizerConfig, Device, Kind};

    #[test]
    fn schedule_warms_up_linearly_then_stays() {
        let s = LrSchedule { base: 1.0, warmup: 4 };
        let lrs: Vec<f64> = (0..6).map(|i| s.lr(i)).collect();
        assert_eq!(lrs, vec![0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
        assert_eq!(LrSchedule { base: 2.0, warmup: 0 }.lr(0), 2.0);
    }

    /// Our AdamW against libtorch's own `torch::optim::AdamW` on the same gradients.
    #[test]
    fn adamw_matches_libtorch() {
        tch::manual_seed(0);
        let cfg = OptimConfig { weight_decay: 0.1, ..OptimConfig::default() };
        let target = Tensor::randn([5, 3], (Kind::Double, Device::Cpu));
        let mut vs = nn::VarStore::new(Device::Cpu);
        let _ = vs.root().var_copy("w", &Tensor::randn([5, 3], (Kind::Float, Device::Cpu)));
        vs.double();
        let theirs = vs.variables()["w"].shallow_clone();
        let mut ours = theirs.detach().copy().set_requires_grad(true);
        let objective = |p: &Tensor| (p - &target).square().sum(Kind::Double) + p.sin().sum(Kind::Double);
        let mut reference =
            nn::AdamW { beta1: cfg.beta1, beta2: cfg.beta2, wd: cfg.weight_decay, eps: cfg.eps, amsgrad: false }
                .build(&vs, 1e-2)
                .unwrap();
        let params = [ours.shallow_clone()];
        let mut adam = AdamW::new(&params, &cfg);
        for _ in 0..5 {
            reference.zero_grad();
            objective(&theirs).backward();
            reference.step();
            ours.zero_grad();
            objective(&ours).backward();
            adam.step(&params, 1e-2);
        }
        // The same formula in another order of fp64 operations: a few roundings (u ≈ 1.1e-16)
        // per step on values of order 1, five steps: far below 1e-12.
        assert!(ours.allclose(&theirs, 1e-12, 1e-12, false), "{ours} vs {theirs}");
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let p = Tensor::zeros([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        (&p * Tensor::from_slice(&[3.0f32, 4.0])).sum(Kind::Float).backward();
        let norm = clip_grad_norm(std::slice::from_ref(&p), 1.0);
        // √(9 + 16) in fp32 is exact; the scaled gradients are 3 and 4 times 1/(5 + 1e-6) (the
        // clip's epsilon: 1.2e-7 and 1.6e-7 below 0.6 and 0.8) rounded to fp32 (at most 6e-8 more).
        assert_eq!(norm, 5.0);
        let g = Vec::<f32>::try_from(p.grad()).unwrap();
        assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6, "{g:?}");
    }

    #[test]
    fn ema_warms_up_and_swaps_back() {
        let p = Tensor::zeros([1], (Kind::Double, Device::Cpu));
        let params = [p.shallow_clone()];
        let mut ema = Ema::new(&params, 0.9999);
        let _ = p.shallow_clone().fill_(1.0);
        ema.update(&params);
        // n = 1: d = 2/11, shadow = 0 − (1 − 2/11)(0 − 1) = 9/11 (a few fp64 roundings of
        // values below 1: within 1e-15, checked to 1e-12).
        assert!((ema.shadow[0].double_value(&[0]) - 9.0 / 11.0).abs() < 1e-12);
        ema.swap(&params);
        assert!((p.double_value(&[0]) - 9.0 / 11.0).abs() < 1e-12);
        ema.swap(&params);
        assert_eq!(p.double_value(&[0]), 1.0);
    }
}
