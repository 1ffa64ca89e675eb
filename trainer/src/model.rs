//! The DiT backbone of BD3-LM (docs/algorithm.md §1.3–1.7) and its AR variant (§1.8).
//!
//! Parameter names follow the reference's state dict (`backbone.blocks.0.attn_qkv.weight`, …) so
//! released weights load without renaming. The model knows nothing about masks: it asks
//! `kernels::attention` (with `model.attention`, the backend) for the attention a [`BlockLayout`] describes.

use anyhow::{ensure, Result};
use kernels::{attention, BlockLayout};
use tch::{nn, Kind, Tensor};

use crate::config::{Arch, ModelConfig, MIN_MASK_RATE};

/// Size of the sinusoidal σ features fed to the σ-map (128 frequencies, cos then sin).
const SIGMA_FREQ_DIM: i64 = 256;
const LN_EPS: f64 = 1e-5;
const ROPE_BASE: f64 = 10_000.0;

/// A linear layer initialized like PyTorch's `nn.Linear` (U(±1/√fan_in) for weight and bias).
#[derive(Debug)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn new(p: nn::Path, fan_in: i64, fan_out: i64, bias: bool) -> Self {
        let bound = 1.0 / (fan_in as f64).sqrt();
        let init = nn::Init::Uniform { lo: -bound, up: bound };
        let weight = p.var("weight", &[fan_out, fan_in], init);
        let bias = bias.then(|| p.var("bias", &[fan_out], init));
        Self { weight, bias }
    }

    /// Zero weight and bias: adaLN modulations and the output layer start at zero (docs/algorithm.md §1.6).
    fn zeros(p: nn::Path, fan_in: i64, fan_out: i64) -> Self {
        Self { weight: p.zeros("weight", &[fan_out, fan_in]), bias: Some(p.zeros("bias", &[fan_out])) }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_counted(x, FlopPart::Dense)
    }

    fn forward_counted(&self, x: &Tensor, part: FlopPart) -> Tensor {
        record_flops(part, || {
            let (out, inp) = (self.weight.size()[0] as f64, self.weight.size()[1] as f64);
            2.0 * (x.numel() as f64 / inp) * inp * out
        });
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// FLOPs the forward passes run by [`count_forward_flops`] executed, by part: every matrix
/// product of the model (a multiply-add is 2 FLOPs), counted from the shapes it ran on.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ExecutedFlops {
    /// Linear layers of the trunk, the adaLN modulations and the σ-map.
    pub dense: f64,
    /// Q·Kᵀ and the weighted sum of values over the pairs the layout lets attend.
    pub attention: f64,
    /// The output projection to the vocabulary.
    pub output: f64,
}

#[derive(Clone, Copy)]
enum FlopPart {
    Dense,
    Attention,
    Output,
}

thread_local! {
    static EXECUTED_FLOPS: std::cell::Cell<Option<ExecutedFlops>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` and counts the model FLOPs the forward passes inside it execute on this thread: a
/// profiler for checking the FLOP formulas of crate::flops (and so MFU and `bd3 plan`) against
/// what the model really runs.
pub fn count_forward_flops<T>(f: impl FnOnce() -> T) -> (T, ExecutedFlops) {
    let outer = EXECUTED_FLOPS.with(|c| c.replace(Some(ExecutedFlops::default())));
    let out = f();
    let counted = EXECUTED_FLOPS.with(|c| c.replace(outer)).unwrap_or_default();
    (out, counted)
}

/// Adds `flops()` to `part` while counting (and computes nothing otherwise).
fn record_flops(part: FlopPart, flops: impl FnOnce() -> f64) {
    EXECUTED_FLOPS.with(|c| {
        if let Some(mut tally) = c.get() {
            let slot = match part {
                FlopPart::Dense => &mut tally.dense,
                FlopPart::Attention => &mut tally.attention,
                FlopPart::Output => &mut tally.output,
            };
            *slot += flops();
            c.set(Some(tally));
        }
    });
}

/// The kind LayerNorm, softmax and the loss compute in for activations of `kind`: fp32 for fp32
/// and for bf16/fp16 under autocast, fp64 for a `model.dtype = "float64"` model.
pub fn wide_kind(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// Bias-free LayerNorm computed in fp32 at least (docs/algorithm.md §1.3).
fn layer_norm(x: &Tensor, weight: &Tensor) -> Tensor {
    let d = *x.size().last().expect("non-scalar input");
    x.to_kind(wide_kind(x.kind())).layer_norm([d], None::<Tensor>, None::<Tensor>, LN_EPS, false) * weight
}

fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
    x * (scale + 1.0) + shift
}

/// σ → conditioning vector: sinusoidal features, Linear → SiLU → Linear.
#[derive(Debug)]
struct SigmaMap {
    mlp0: Linear,
    mlp2: Linear,
}

impl SigmaMap {
    fn new(p: nn::Path, cond: i64) -> Self {
        let mlp = &p / "mlp";
        Self {
            mlp0: Linear::new(&mlp / "0", SIGMA_FREQ_DIM, cond, true),
            mlp2: Linear::new(&mlp / "2", cond, cond, true),
        }
    }

    fn forward(&self, sigma: &Tensor) -> Tensor {
        let half = SIGMA_FREQ_DIM / 2;
        let kind = self.mlp0.weight.kind();
        let j = Tensor::arange(half, (kind, sigma.device()));
        let freqs = (j * (-(10_000f64.ln()) / half as f64)).exp();
        let args = sigma.to_kind(kind).unsqueeze(1) * freqs.unsqueeze(0);
        let feats = Tensor::cat(&[args.cos(), args.sin()], 1);
        self.mlp2.forward(&self.mlp0.forward(&feats).silu())
    }
}

/// Post-RoPE keys and values of one layer, `[batch, heads, len, head_dim]`: the clean context
/// that later blocks attend to (the naive Algorithm 1 and the sampler's KV cache).
#[derive(Debug)]
pub struct LayerKv {
    pub k: Tensor,
    pub v: Tensor,
}

impl LayerKv {
    pub fn narrow(&self, start: i64, len: i64) -> LayerKv {
        LayerKv { k: self.k.narrow(2, start, len), v: self.v.narrow(2, start, len) }
    }
}

#[derive(Debug)]
struct DitBlock {
    norm1: Tensor,
    norm2: Tensor,
    attn_qkv: Linear,
    attn_out: Linear,
    mlp0: Linear,
    mlp2: Linear,
    /// None for the AR model: gates 1, no shift/scale.
    ada_ln: Option<Linear>,
}

impl DitBlock {
    fn new(p: nn::Path, cfg: &ModelConfig) -> Self {
        let (d, c) = (cfg.hidden as i64, cfg.cond_dim as i64);
        let mlp = &p / "mlp";
        Self {
            norm1: (&p / "norm1").ones("weight", &[d]),
            norm2: (&p / "norm2").ones("weight", &[d]),
            attn_qkv: Linear::new(&p / "attn_qkv", d, 3 * d, false),
            attn_out: Linear::new(&p / "attn_out", d, d, false),
            mlp0: Linear::new(&mlp / "0", d, cfg.mlp_ratio as i64 * d, true),
            mlp2: Linear::new(&mlp / "2", cfg.mlp_ratio as i64 * d, d, true),
            ada_ln: (cfg.arch == Arch::Bd3).then(|| Linear::zeros(&p / "adaLN_modulation", c, 6 * d)),
        }
    }
}

#[derive(Debug)]
struct FinalLayer {
    norm_final: Tensor,
    linear: Linear,
    ada_ln: Option<Linear>,
}

/// Which logits a decoding call computes.
pub enum Heads<'a> {
    None,
    All,
    /// Flat indices into the `[batch, len]` positions of the input.
    Rows(&'a Tensor),
}

struct Trunk {
    hidden: Tensor,
    cond: Option<Tensor>,
}

/// How one forward pass treats keys and values.
#[derive(Default)]
struct KvIo<'a> {
    /// Per-layer keys/values (clean context) prepended to the input's own.
    prefix: Option<&'a [LayerKv]>,
    /// Where to hand back every layer's keys/values of the input.
    record: Option<&'a mut Vec<LayerKv>>,
}

/// The DiT backbone.
#[derive(Debug)]
pub struct Dit {
    cfg: ModelConfig,
    vocab_embed: Tensor,
    sigma_map: Option<SigmaMap>,
    blocks: Vec<DitBlock>,
    output: FinalLayer,
    inv_freq: Tensor,
}

impl Dit {
    /// The model of `cfg` in `vs`, its variables in `model.dtype`: the one way the trainer, the
    /// launcher and the tools build it.
    pub fn build(vs: &mut nn::VarStore, cfg: &ModelConfig) -> Result<Self> {
        let model = Self::new(&vs.root(), cfg)?;
        // The variables are created in fp32 (the initializers draw in fp32) and converted in
        // place: the model's tensors share them, so it follows.
        if cfg.dtype.kind() != Kind::Float {
            vs.set_kind(cfg.dtype.kind());
        }
        Ok(model)
    }

    /// Creates the parameters under `root` (`backbone.*`), plus the clip-interval buffers
    /// `sampling_eps_min/max` of the reference's state dict for the diffusion model, in fp32.
    pub fn new(root: &nn::Path, cfg: &ModelConfig) -> Result<Self> {
        ensure!(cfg.hidden % cfg.heads == 0 && cfg.head_dim() % 2 == 0, "invalid head layout {cfg:?}");
        let p = root / "backbone";
        let (d, c, v) = (cfg.hidden as i64, cfg.cond_dim as i64, cfg.vocab_size as i64);
        let adaln = cfg.arch == Arch::Bd3;
        // Kaiming-uniform with a = √5 on [V, d]: U(±1/√d).
        let bound = 1.0 / (d as f64).sqrt();
        let vocab_embed = (&p / "vocab_embed").var("embedding", &[v, d], nn::Init::Uniform { lo: -bound, up: bound });
        let sigma_map = adaln.then(|| SigmaMap::new(&p / "sigma_map", c));
        let blocks = (0..cfg.layers).map(|i| DitBlock::new(&p / "blocks" / i, cfg)).collect();
        let out = &p / "output_layer";
        let output = FinalLayer {
            norm_final: (&out / "norm_final").ones("weight", &[d]),
            linear: Linear::zeros(&out / "linear", d, v),
            ada_ln: adaln.then(|| Linear::zeros(&out / "adaLN_modulation", c, 2 * d)),
        };
        let dh = cfg.head_dim() as i64;
        let mut inv_freq = (&p / "rotary_emb").zeros_no_train("inv_freq", &[dh / 2]);
        let exponents = Tensor::arange_start_step(0, dh, 2, (Kind::Float, root.device())) / dh as f64;
        tch::no_grad(|| inv_freq.copy_(&exponents.multiply_scalar(ROPE_BASE.ln()).exp().reciprocal()));
        if adaln {
            let mut eps_min = root.zeros_no_train("sampling_eps_min", &[]);
            let mut eps_max = root.zeros_no_train("sampling_eps_max", &[]);
            tch::no_grad(|| {
                let _ = eps_min.fill_(MIN_MASK_RATE);
                let _ = eps_max.fill_(1.0);
            });
        }
        Ok(Self { cfg: cfg.clone(), vocab_embed, sigma_map, blocks, output, inv_freq })
    }

    pub fn device(&self) -> tch::Device {
        self.vocab_embed.device()
    }

    /// Logits `[batch, keep, vocab]` of the first `keep` positions of `tokens` `[batch, len]`
    /// (in the two-stream layout only the x_t half's predictions are used, docs/algorithm.md §2.4).
    pub fn logits(&self, tokens: &Tensor, layout: &BlockLayout, keep: usize, train: bool) -> Result<Tensor> {
        let trunk = self.trunk(tokens, layout, train, KvIo::default())?;
        let modulation = self.head_modulation(trunk.cond.as_ref());
        Ok(self.head(&trunk.hidden.narrow(1, 0, keep as i64), modulation.as_ref(), None))
    }

    /// Logits `[rows, vocab]` at selected positions only: `rows` holds flat indices into the
    /// `[batch, len]` positions of `tokens`. The output layer over a 50k vocabulary is the
    /// largest single cost of a small model, and the loss needs it only where x_t is masked.
    pub fn logits_at(&self, tokens: &Tensor, layout: &BlockLayout, rows: &Tensor, train: bool) -> Result<Tensor> {
        let trunk = self.trunk(tokens, layout, train, KvIo::default())?;
        self.head_at(&trunk, rows, None)
    }

    /// [`Dit::logits_at`] with the output layer applied through `projection` (an inference call
    /// on weights that do not change while `projection` lives).
    pub fn logits_at_projected(
        &self,
        tokens: &Tensor,
        layout: &BlockLayout,
        rows: &Tensor,
        projection: &VocabProjection,
    ) -> Result<Tensor> {
        let trunk = self.trunk(tokens, layout, false, KvIo::default())?;
        self.head_at(&trunk, rows, Some(projection))
    }

    /// The head on selected rows (flat indices into `[batch, len]`) of a trunk's output.
    fn head_at(&self, trunk: &Trunk, rows: &Tensor, projection: Option<&VocabProjection>) -> Result<Tensor> {
        let (_, s, d) = trunk.hidden.size3()?;
        let hidden = trunk.hidden.reshape([-1, d]).index_select(0, rows);
        // The final adaLN modulation once per sequence, then picked for each row.
        let modulation = self.head_modulation(trunk.cond.as_ref());
        let modulation = modulation.map(|m| m.index_select(0, &rows.divide_scalar_mode(s, "floor")));
        Ok(self.head(&hidden.unsqueeze(1), modulation.as_ref(), projection).squeeze_dim(1))
    }

    /// A copy of the output layer for inference calls that project a few rows at a time.
    pub fn vocab_projection(&self) -> VocabProjection {
        let linear = &self.output.linear;
        VocabProjection {
            weight_t: linear.weight.detach().transpose(0, 1).contiguous(),
            bias: linear.bias.as_ref().map(Tensor::detach),
        }
    }

    /// Logits of a block of tokens that attends to `prefix` (per-layer clean keys/values of the
    /// tokens before it) and to itself, all keys visible. The block sits at positions
    /// `prefix_len..prefix_len+len`.
    pub fn logits_with_prefix(&self, tokens: &Tensor, prefix: &[LayerKv], train: bool) -> Result<Tensor> {
        let position = prefix.first().map_or(0, |l| l.k.size()[2] as usize);
        let (logits, _) = self.attend_to_prefix(tokens, prefix, position, (Heads::All, None), false, train)?;
        Ok(logits.expect("logits were asked for"))
    }

    /// One decoding call against cached keys/values: `tokens` `[batch, len]` at RoPE positions
    /// `position..position+len` attend to every cached key and to each other. Returns the logits
    /// `heads` asks for and, if `record`, the block's own per-layer keys/values, which the caller
    /// appends to its cache. Always in evaluation mode (no dropout); the output layer is applied
    /// through `projection` when one is given.
    pub fn decode(
        &self,
        tokens: &Tensor,
        prefix: &[LayerKv],
        position: usize,
        heads: Heads,
        record: bool,
        projection: Option<&VocabProjection>,
    ) -> Result<(Option<Tensor>, Vec<LayerKv>)> {
        self.attend_to_prefix(tokens, prefix, position, (heads, projection), record, false)
    }

    fn attend_to_prefix(
        &self,
        tokens: &Tensor,
        prefix: &[LayerKv],
        position: usize,
        (heads, projection): (Heads, Option<&VocabProjection>),
        record: bool,
        train: bool,
    ) -> Result<(Option<Tensor>, Vec<LayerKv>)> {
        ensure!(
            prefix.is_empty() || prefix.len() == self.blocks.len(),
            "prefix has {} layers, model {}",
            prefix.len(),
            self.blocks.len()
        );
        let prefix_len = prefix.first().map_or(0, |l| l.k.size()[2] as usize);
        let layout = BlockLayout::Decode { prefix_len, block_len: tokens.size()[1] as usize, position };
        let mut recorded = Vec::new();
        let io = KvIo { prefix: (!prefix.is_empty()).then_some(prefix), record: record.then_some(&mut recorded) };
        let trunk = self.trunk(tokens, &layout, train, io)?;
        let logits = match heads {
            Heads::None => None,
            Heads::All => {
                Some(self.head(&trunk.hidden, self.head_modulation(trunk.cond.as_ref()).as_ref(), projection))
            }
            Heads::Rows(rows) => Some(self.head_at(&trunk, rows, projection)?),
        };
        Ok((logits, recorded))
    }

    /// Per-layer post-RoPE keys/values of `tokens` read block-causally (the clean stream M_BC).
    pub fn clean_kv(&self, tokens: &Tensor, block_size: usize, train: bool) -> Result<Vec<LayerKv>> {
        let layout = BlockLayout::block_causal(tokens.size()[1] as usize, block_size)?;
        let mut kv = Vec::with_capacity(self.blocks.len());
        self.trunk(tokens, &layout, train, KvIo { prefix: None, record: Some(&mut kv) })?;
        Ok(kv)
    }

    /// Embedding and transformer layers: hidden states `[batch, len, hidden]` and the
    /// conditioning vector `[batch, cond]` (None for the AR model).
    fn trunk(&self, tokens: &Tensor, layout: &BlockLayout, train: bool, mut kv: KvIo) -> Result<Trunk> {
        let (b, s) = tokens.size2()?;
        ensure!(s as usize == layout.query_len(), "input length {s} does not match layout {layout:?}");
        let cfg = &self.cfg;
        let (d, h, dh) = (cfg.hidden as i64, cfg.heads as i64, cfg.head_dim() as i64);
        let device = tokens.device();

        let mut x = self.vocab_embed.index_select(0, &tokens.reshape([-1])).reshape([b, s, d]);
        // Time conditioning is off for BD3-LM: σ ≡ 0 makes c a learned constant (docs/algorithm.md §1.3).
        let c = self.sigma_map.as_ref().map(|m| m.forward(&Tensor::zeros([b], (Kind::Float, device))).silu());

        let positions = Tensor::from_slice(&layout.query_positions()).to_device(device);
        let (cos, sin) = self.rope_tables(&positions);

        for (i, blk) in self.blocks.iter().enumerate() {
            let m = match (&blk.ada_ln, &c) {
                (Some(ada), Some(c)) => Some(ada.forward(c).unsqueeze(1).chunk(6, 2)),
                _ => None,
            };
            let a = layer_norm(&x, &blk.norm1);
            let a = match &m {
                Some(m) => modulate(&a, &m[0], &m[1]),
                None => a,
            };
            let qkv = blk.attn_qkv.forward(&a).reshape([b, s, 3, h, dh]);
            let rope = |t: Tensor| apply_rope(&t, &cos, &sin).transpose(1, 2);
            let q = rope(qkv.select(2, 0));
            let mut k = rope(qkv.select(2, 1));
            let mut v = qkv.select(2, 2).transpose(1, 2);
            if let Some(out) = kv.record.as_mut() {
                out.push(LayerKv { k: k.shallow_clone(), v: v.shallow_clone() });
            }
            if let Some(prefix) = kv.prefix {
                k = Tensor::cat(&[&prefix[i].k, &k], 2);
                v = Tensor::cat(&[&prefix[i].v, &v], 2);
            }
            // Per visible (query, key) pair and head: 2·dh for the score, 2·dh for the value sum.
            record_flops(FlopPart::Attention, || 4.0 * (b * h * dh) as f64 * layout.visible_pairs() as f64);
            let o = attention(cfg.attention, &q, &k, &v, layout)?.transpose(1, 2).reshape([b, s, d]);
            let o = blk.attn_out.forward(&o).dropout(cfg.dropout, train);
            x = match &m {
                Some(m) => &x + &m[2] * o,
                None => &x + o,
            };
            let y = layer_norm(&x, &blk.norm2);
            let y = match &m {
                Some(m) => modulate(&y, &m[3], &m[4]),
                None => y,
            };
            let y = blk.mlp2.forward(&blk.mlp0.forward(&y).gelu("tanh")).dropout(cfg.dropout, train);
            x = match &m {
                Some(m) => &x + &m[5] * y,
                None => &x + y,
            };
        }
        Ok(Trunk { hidden: x, cond: c })
    }

    /// The final adaLN layer's shift and scale `[batch, 2·hidden]` for conditioning `cond`
    /// `[batch, cond]` (none for the AR model).
    fn head_modulation(&self, cond: Option<&Tensor>) -> Option<Tensor> {
        match (&self.output.ada_ln, cond) {
            (Some(ada), Some(c)) => Some(ada.forward(c)),
            _ => None,
        }
    }

    /// Final adaLN layer and output projection on hidden states `[batch, len, hidden]`;
    /// `modulation` is [`Self::head_modulation`]'s, one row per batch row.
    fn head(&self, x: &Tensor, modulation: Option<&Tensor>, projection: Option<&VocabProjection>) -> Tensor {
        let y = layer_norm(x, &self.output.norm_final);
        let y = match modulation {
            Some(m) => {
                let m = m.unsqueeze(1).chunk(2, 2);
                modulate(&y, &m[0], &m[1])
            }
            None => y,
        };
        match projection {
            Some(p) => p.forward(&y),
            None => self.output.linear.forward_counted(&y, FlopPart::Output),
        }
    }

    /// cos/sin tables `[1, len, 1, head_dim]` on [θ, θ] (rotate-half convention, docs/algorithm.md §1.4). The
    /// angles are formed in fp64: the KV-cache sampler keeps absolute positions, which grow past
    /// the point where an fp32 angle loses the precision of a rebased one.
    fn rope_tables(&self, positions: &Tensor) -> (Tensor, Tensor) {
        let theta = positions.to_kind(Kind::Double).unsqueeze(1) * self.inv_freq.to_kind(Kind::Double).unsqueeze(0);
        let emb = Tensor::cat(&[&theta, &theta], 1).unsqueeze(0).unsqueeze(2);
        let kind = wide_kind(self.vocab_embed.kind());
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }
}

/// x·cos + rotate_half(x)·sin on `[batch, len, heads, head_dim]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let rotated = Tensor::cat(&[-x.narrow(3, half, half), x.narrow(3, 0, half)], 3);
    let kind = x.kind();
    x * cos.to_kind(kind) + rotated * sin.to_kind(kind)
}

/// The output layer's weight stored transposed, `[hidden, vocab]`: for one row, libtorch's CPU
/// matrix-vector product over this layout streams the 50k × hidden weight about 4× faster than
/// over the parameter's `[vocab, hidden]`, and a first-hitting call projects exactly one row.
/// It is a copy: build it after the weights last changed (the sampler does, per generation).
pub struct VocabProjection {
    weight_t: Tensor,
    bias: Option<Tensor>,
}

impl VocabProjection {
    fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.matmul(&self.weight_t.to_kind(x.kind()));
        match &self.bias {
            Some(b) => y + b.to_kind(x.kind()),
            None => y,
        }
    }
}

/// Number of trainable parameters.
pub fn num_parameters(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn rope_rotates_pairs_of_halves() {
        // Position p rotates (x_j, x_{j+half}) by p·inv_freq_j.
        let x = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0]).reshape([1, 1, 1, 4]);
        let inv = Tensor::from_slice(&[1.0f32, 0.5]);
        let theta = Tensor::from_slice(&[2.0f32]).unsqueeze(1) * inv.unsqueeze(0);
        let emb = Tensor::cat(&[&theta, &theta], 1).unsqueeze(0).unsqueeze(2);
        let y = Vec::<f32>::try_from(apply_rope(&x, &emb.cos(), &emb.sin()).reshape([-1])).unwrap();
        let (a, b) = (2.0f32, 1.0f32);
        let expected = [a.cos(), -b.sin(), a.sin(), b.cos()];
        // fp32 cos/sin of angles ≤ 2, one product and one sum: a few roundings of 6e-8 each.
        for (got, want) in y.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{y:?} vs {expected:?}");
        }
    }

    #[test]
    fn zero_init_makes_every_block_the_identity_and_logits_zero() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = ModelConfig {
            hidden: 16,
            layers: 2,
            heads: 2,
            cond_dim: 8,
            seq_len: 8,
            vocab_size: 20,
            dropout: 0.0,
            ..ModelConfig::small()
        };
        let model = Dit::new(&vs.root(), &cfg).unwrap();
        let tokens = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6, 7, 8]).reshape([1, 8]);
        let logits = model.logits(&tokens, &BlockLayout::block_causal(8, 2).unwrap(), 8, false).unwrap();
        assert_eq!(logits.size(), [1, 8, 20]);
        assert_eq!(logits.abs().max().double_value(&[]), 0.0);
    }
}
