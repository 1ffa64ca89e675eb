//! Block-sparse attention from composed libtorch ops (the CPU default).
//!
//! Queries are cut into row tiles of whole blocks inside each stream. For every row tile the
//! layout says analytically which key tiles are empty, full or partial ([`BlockLayout::key_segments`]);
//! the row attends only to the keys of its non-empty tiles, gathered into one contiguous key/value
//! range, through libtorch's fused scaled-dot-product attention (forward and backward). A mask
//! exists only for rows with a partial tile, covers only that row's gathered keys, and is filled
//! from [`BlockLayout::visible`] only inside the partial tiles. The work is therefore about the
//! number of visible (query, key) pairs plus the partial tiles' waste, instead of the full
//! query_len × key_len, and no O(L²) mask is built. Autograd differentiates through the ops.

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::tiles::{visible_in, TileKind};
use crate::BlockLayout;

/// Queries per row tile (rounded up to whole blocks). Measured on the 2-core CPU machine at
/// B=16, H=12, 2L=2048, D=64 (docs/benchmarks.md): 128 balances the waste inside partial
/// diagonal tiles against per-op overhead and matmul efficiency.
pub const DEFAULT_ROW_TILE: usize = 128;

/// Row tile for `layout`: a multiple of the block size, so a tile never splits a block.
pub fn row_tile(layout: &BlockLayout, target: usize) -> usize {
    let block = match *layout {
        BlockLayout::TwoStream { block_size, .. } | BlockLayout::BlockCausal { block_size, .. } => block_size,
        BlockLayout::Causal { .. } | BlockLayout::Decode { .. } => 1,
    };
    block * target.div_ceil(block).max(1)
}

/// Block-sparse attention with the default row tile; same contract as
/// [`crate::block_diffusion_attention`].
pub fn sparse_attention(q: &Tensor, k: &Tensor, v: &Tensor, layout: &BlockLayout) -> Result<Tensor> {
    sparse_attention_with_tile(q, k, v, layout, DEFAULT_ROW_TILE)
}

/// Block-sparse attention with row (and key) tiles of about `target` positions.
pub fn sparse_attention_with_tile(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &BlockLayout,
    target: usize,
) -> Result<Tensor> {
    let tile = row_tile(layout, target);
    let scale = 1.0 / (q.size()[3] as f64).sqrt();
    let mut outputs = Vec::new();
    for rows in BlockLayout::tiles_of(&layout.query_streams(), tile) {
        let segments = layout.key_segments(&rows, tile);
        let q_rows = q.narrow(2, rows.start as i64, rows.len() as i64);
        if segments.is_empty() {
            // A query that sees no key has no defined softmax; none of our layouts has one, but a
            // zero output (and zero gradient) is the safe value rather than NaN.
            outputs.push(q_rows.zeros_like());
            continue;
        }
        let gather = |t: &Tensor| -> Result<Tensor> {
            let parts: Vec<Tensor> =
                segments.iter().map(|(r, _)| t.narrow(2, r.start as i64, r.len() as i64)).collect();
            Ok(if parts.len() == 1 { parts.into_iter().next().expect("one part") } else { Tensor::f_cat(&parts, 2)? })
        };
        let (k_rows, v_rows) = (gather(k)?, gather(v)?);
        let mask = segments
            .iter()
            .any(|(_, kind)| *kind == TileKind::Partial)
            .then(|| row_mask(layout, &rows, &segments, q.device()));
        outputs.push(Tensor::f_scaled_dot_product_attention(
            &q_rows,
            &k_rows,
            &v_rows,
            mask.as_ref(),
            0.0,
            false,
            scale,
            false,
        )?);
    }
    Ok(if outputs.len() == 1 { outputs.pop().expect("one output") } else { Tensor::f_cat(&outputs, 2)? })
}

/// The boolean mask `[rows, gathered keys]` of one row tile: true over full segments, the
/// element rule inside partial ones.
fn row_mask(
    layout: &BlockLayout,
    rows: &std::ops::Range<usize>,
    segments: &[(std::ops::Range<usize>, TileKind)],
    device: Device,
) -> Tensor {
    let width: usize = segments.iter().map(|(r, _)| r.len()).sum();
    let quadrants = layout.quadrants();
    let mut mask = Vec::with_capacity(rows.len() * width);
    for q in rows.clone() {
        for (keys, kind) in segments {
            match kind {
                TileKind::Partial => mask.extend(keys.clone().map(|k| visible_in(&quadrants, q, k))),
                _ => mask.extend(std::iter::repeat_n(true, keys.len())),
            }
        }
    }
    Tensor::from_slice(&mask).reshape([rows.len() as i64, width as i64]).to_kind(Kind::Bool).to_device(device)
}
