//! Block-sparse CPU attention (the `sdpa-tiles` backend, and `auto` on CPU) and the `dense`
//! backend against the dense-mask reference: outputs and the gradients of q, k and v, over the
//! shapes of the issue (L ∈ {16, 128, 1024, 48, 200}, every valid L′ ∈ {1, 4, 16, 64, L}, odd batch
//! and head counts) and every layout.
//!
//! In fp64, so that a tolerance follows from the arithmetic and not from one CPU's kernels: the
//! backends compute the same sums over other key sets and in other blockings. Each sum of n terms
//! lies within 2·n·u of the other's, relative to the sum of its terms' magnitudes (u = 2⁻⁵³;
//! n ≤ 2·1024 keys: 4.6e-13). Forward and backward chain at most five such sums (scores, softmax
//! normalizer, weighted values; dP, dS products), and with unit-normal inputs the magnitudes
//! summed stay within a few tens of the result's scale 1 + max|ref|: 1e-10 of that scale bounds
//! the difference. (In fp32 the same bound is 5e-3; the old 1e-5 held only by the luck of the CPU.)

/// Tolerance per unit of 1 + max |reference| (see the module docs).
const TOLERANCE: f64 = 1e-10;

use kernels::{
    attention, block_diffusion_attention, dense_attention, sparse_attention_with_tile, Backend, BlockLayout,
};
use tch::{Device, Kind, Tensor};

struct Grads {
    out: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
}

type Attention<'a> = &'a dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor;

fn run(f: Attention, q: &Tensor, k: &Tensor, v: &Tensor, upstream: &Tensor) -> Grads {
    let (q, k, v) =
        (q.copy().set_requires_grad(true), k.copy().set_requires_grad(true), v.copy().set_requires_grad(true));
    let out = f(&q, &k, &v);
    (&out * upstream).sum(Kind::Double).backward();
    Grads { out: out.detach(), dq: q.grad(), dk: k.grad(), dv: v.grad() }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Checks one (layout, shape) case for the entry point and, when given, extra row tiles.
fn check(layout: BlockLayout, batch: i64, heads: i64, dim: i64, tiles: &[usize]) {
    let (sq, sk) = (layout.query_len() as i64, layout.key_len() as i64);
    let opts = (Kind::Double, Device::Cpu);
    let q = Tensor::randn([batch, heads, sq, dim], opts);
    let k = Tensor::randn([batch, heads, sk, dim], opts);
    let v = Tensor::randn([batch, heads, sk, dim], opts);
    let upstream = Tensor::randn([batch, heads, sq, dim], opts);
    let reference = run(&|q, k, v| dense_attention(q, k, v, &layout).unwrap(), &q, &k, &v, &upstream);
    let mut candidates: Vec<(String, Grads)> = vec![(
        "entry point".into(),
        run(&|q, k, v| block_diffusion_attention(q, k, v, &layout).unwrap(), &q, &k, &v, &upstream),
    )];
    // Every backend that runs on CPU tensors, through `model.attention`'s entry point.
    for backend in [Backend::Auto, Backend::SdpaTiles, Backend::Dense] {
        let f = move |q: &Tensor, k: &Tensor, v: &Tensor| attention(backend, q, k, v, &layout).unwrap();
        candidates.push((format!("backend {backend:?}"), run(&f, &q, &k, &v, &upstream)));
    }
    for &t in tiles {
        let f = move |q: &Tensor, k: &Tensor, v: &Tensor| sparse_attention_with_tile(q, k, v, &layout, t).unwrap();
        candidates.push((format!("row tile {t}"), run(&f, &q, &k, &v, &upstream)));
    }
    for (name, got) in candidates {
        for (what, a, b) in [
            ("out", &got.out, &reference.out),
            ("dq", &got.dq, &reference.dq),
            ("dk", &got.dk, &reference.dk),
            ("dv", &got.dv, &reference.dv),
        ] {
            assert_eq!(a.size(), b.size());
            let d = max_diff(a, b);
            let tol = TOLERANCE * (1.0 + b.abs().max().double_value(&[]));
            assert!(d <= tol, "{layout:?} B={batch} H={heads} D={dim} {name}: {what} differs by {d} (tol {tol})");
        }
    }
}

fn block_sizes(n: usize) -> Vec<usize> {
    [1, 4, 16, 64, n]
        .into_iter()
        .filter(|&b| b <= n && n % b == 0)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

#[test]
fn two_stream_small_lengths() {
    tch::manual_seed(1);
    for n in [16usize, 48, 128] {
        for b in block_sizes(n) {
            check(BlockLayout::two_stream(n, b).unwrap(), 3, 3, 16, &[8, 32]);
        }
    }
}

#[test]
fn two_stream_length_not_a_tile_multiple() {
    tch::manual_seed(2);
    // 200 = 128 + 72 with the default row tile; 8 | 200.
    for b in [1usize, 8, 40, 200] {
        check(BlockLayout::two_stream(200, b).unwrap(), 1, 3, 8, &[24]);
    }
}

#[test]
fn two_stream_l1024() {
    tch::manual_seed(3);
    for b in block_sizes(1024) {
        check(BlockLayout::two_stream(1024, b).unwrap(), 1, 1, 8, &[]);
    }
}

#[test]
fn block_causal_and_causal() {
    tch::manual_seed(4);
    for n in [16usize, 48, 128] {
        for b in block_sizes(n) {
            check(BlockLayout::block_causal(n, b).unwrap(), 3, 1, 16, &[8]);
        }
        check(BlockLayout::Causal { seq_len: n }, 1, 5, 16, &[8]);
    }
    for b in block_sizes(1024) {
        check(BlockLayout::block_causal(1024, b).unwrap(), 1, 1, 8, &[]);
    }
    check(BlockLayout::Causal { seq_len: 1024 }, 1, 1, 8, &[]);
    check(BlockLayout::Causal { seq_len: 200 }, 3, 1, 8, &[]);
}

#[test]
fn decode_against_a_cache() {
    tch::manual_seed(5);
    for (prefix_len, block_len) in [(0usize, 4usize), (12, 4), (64, 16), (1008, 16), (300, 1)] {
        check(BlockLayout::Decode { prefix_len, block_len, position: prefix_len + 7 }, 3, 3, 16, &[2]);
    }
}

/// The model feeds non-contiguous q/k/v (transposed heads); the result must not depend on it.
#[test]
fn non_contiguous_inputs() {
    tch::manual_seed(6);
    let layout = BlockLayout::two_stream(32, 4).unwrap();
    let x = Tensor::randn([2, 64, 3, 8], (Kind::Double, Device::Cpu));
    let q = x.transpose(1, 2);
    assert!(!q.is_contiguous());
    let got = block_diffusion_attention(&q, &q, &q, &layout).unwrap();
    let want = dense_attention(&q.contiguous(), &q.contiguous(), &q.contiguous(), &layout).unwrap();
    assert!(max_diff(&got, &want) <= TOLERANCE * (1.0 + want.abs().max().double_value(&[])));
}

#[test]
fn mismatched_inputs_are_errors() {
    let layout = BlockLayout::two_stream(8, 2).unwrap();
    let t = |s: &[i64], kind| Tensor::zeros(s, (kind, Device::Cpu));
    let q = t(&[1, 2, 16, 4], Kind::Float);
    assert!(block_diffusion_attention(&q, &t(&[1, 2, 16, 8], Kind::Float), &t(&[1, 2, 16, 8], Kind::Float), &layout)
        .is_err());
    assert!(block_diffusion_attention(&q, &t(&[1, 3, 16, 4], Kind::Float), &t(&[1, 3, 16, 4], Kind::Float), &layout)
        .is_err());
    assert!(block_diffusion_attention(&q, &q, &t(&[1, 2, 16, 4], Kind::Double), &layout).is_err());
    assert!(block_diffusion_attention(&q, &q, &q, &layout).is_ok());
}

#[test]
fn backends_resolve_per_device_and_fused_refuses_cpu_tensors() {
    let layout = BlockLayout::two_stream(8, 2).unwrap();
    let q = Tensor::zeros([1, 2, 16, 64], (Kind::BFloat16, Device::Cpu));
    assert_eq!(Backend::Auto.resolve(&q, &q, &q), Backend::SdpaTiles);
    assert_eq!(Backend::Dense.resolve(&q, &q, &q), Backend::Dense);
    let err = attention(Backend::Fused, &q, &q, &q, &layout).unwrap_err().to_string();
    assert!(err.contains("\"fused\" needs") && err.contains("Cpu"), "{err}");
    // The names `model.attention` takes.
    for (name, backend) in [
        ("auto", Backend::Auto),
        ("fused", Backend::Fused),
        ("sdpa-tiles", Backend::SdpaTiles),
        ("dense", Backend::Dense),
    ] {
        let parsed: Backend =
            serde::Deserialize::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(name))
                .unwrap();
        assert_eq!(parsed, backend);
        assert_eq!(backend.name(), name);
    }
}
