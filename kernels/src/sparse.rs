//! Block-sparse attention from composed libtorch ops (the CPU default).
//!
//! Queries are cut into row tiles of whole blocks inside each stream, keys into key tiles the same
//! way. For every row tile the layout says analytically which key tiles are empty, full or partial
//! ([`BlockLayout::visible_tiles`]); the row attends only to its non-empty key tiles, concatenated,
//! through libtorch's fused scaled-dot-product attention (forward and backward). A mask exists only
//! for rows with a partial tile, covers only that row's keys, and is evaluated with the element rule
//! only inside the partial tiles. The work is about the number of visible (query, key) pairs plus
//! the partial tiles' waste, instead of query_len × key_len, and no O(L²) mask is built.
//!
//! q, k and v are split into tiles once (`split_with_sizes`), so that autograd accumulates each
//! tile's gradient from the rows that use it and reassembles the inputs' gradients with one
//! concatenation; slicing the full tensors per row instead would make every row's backward
//! allocate and add a full-size zero gradient.

use std::ops::Range;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::tiles::{visible_in, TileKind};
use crate::BlockLayout;

/// Queries (and keys) per tile, rounded up to whole blocks. Measured on the 2-core CPU machine
/// at B=16, H=12, 2L=2048, D=64 (docs/benchmarks.md): larger tiles cost more masked waste inside
/// partial diagonal tiles, smaller ones more ops and less efficient matmuls.
pub const DEFAULT_TILE: usize = 128;

/// Tile size for `layout`: a multiple of the block size, so a tile never splits a block.
pub fn tile_size(layout: &BlockLayout, target: usize) -> usize {
    let block = match *layout {
        BlockLayout::TwoStream { block_size, .. } | BlockLayout::BlockCausal { block_size, .. } => block_size,
        BlockLayout::Causal { .. } | BlockLayout::Decode { .. } => 1,
    };
    block * target.div_ceil(block).max(1)
}

/// Block-sparse attention with the default tile; same contract as
/// [`crate::block_diffusion_attention`].
pub fn sparse_attention(q: &Tensor, k: &Tensor, v: &Tensor, layout: &BlockLayout) -> Result<Tensor> {
    sparse_attention_with_tile(q, k, v, layout, DEFAULT_TILE)
}

fn split(t: &Tensor, tiles: &[Range<usize>]) -> Result<Vec<Tensor>> {
    let sizes: Vec<i64> = tiles.iter().map(|r| r.len() as i64).collect();
    Ok(t.f_split_with_sizes(&sizes, 2)?)
}

fn cat(mut parts: Vec<Tensor>) -> Result<Tensor> {
    Ok(if parts.len() == 1 { parts.pop().expect("one part") } else { Tensor::f_cat(&parts, 2)? })
}

/// Block-sparse attention with tiles of about `target` positions.
pub fn sparse_attention_with_tile(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &BlockLayout,
    target: usize,
) -> Result<Tensor> {
    let tile = tile_size(layout, target);
    let scale = 1.0 / (q.size()[3] as f64).sqrt();
    if !layout.needs_mask() {
        // Decode and fully bidirectional layouts: every tile is full, one call does it all.
        return Ok(Tensor::f_scaled_dot_product_attention::<Tensor>(q, k, v, None, 0.0, false, scale, false)?);
    }
    let row_tiles = BlockLayout::tiles_of(&layout.query_streams(), tile);
    let key_tiles = BlockLayout::tiles_of(&layout.key_streams(), tile);
    let (q_tiles, k_tiles, v_tiles) = (split(q, &row_tiles)?, split(k, &key_tiles)?, split(v, &key_tiles)?);
    let mut outputs = Vec::with_capacity(row_tiles.len());
    for (rows, q_rows) in row_tiles.iter().zip(&q_tiles) {
        let visible = layout.visible_tiles(rows, &key_tiles);
        if visible.is_empty() {
            // A query that sees no key has no defined softmax; none of our layouts has one, but a
            // zero output (and zero gradient) is the safe value rather than NaN.
            outputs.push(q_rows.zeros_like());
            continue;
        }
        let k_rows = cat(visible.iter().map(|&(i, _)| k_tiles[i].shallow_clone()).collect())?;
        let v_rows = cat(visible.iter().map(|&(i, _)| v_tiles[i].shallow_clone()).collect())?;
        let mask = visible
            .iter()
            .any(|(_, kind)| *kind == TileKind::Partial)
            .then(|| row_mask(layout, rows, &visible, &key_tiles, q.device()));
        outputs.push(Tensor::f_scaled_dot_product_attention(
            q_rows,
            &k_rows,
            &v_rows,
            mask.as_ref(),
            0.0,
            false,
            scale,
            false,
        )?);
    }
    cat(outputs)
}

/// The boolean mask `[rows, keys of the visible tiles]` of one row tile: true over full tiles,
/// the element rule inside partial ones.
fn row_mask(
    layout: &BlockLayout,
    rows: &Range<usize>,
    visible: &[(usize, TileKind)],
    key_tiles: &[Range<usize>],
    device: Device,
) -> Tensor {
    let quadrants = layout.quadrants();
    let width: usize = visible.iter().map(|&(i, _)| key_tiles[i].len()).sum();
    let mut mask = Vec::with_capacity(rows.len() * width);
    for q in rows.clone() {
        for &(i, kind) in visible {
            let keys = key_tiles[i].clone();
            match kind {
                TileKind::Partial => mask.extend(keys.map(|k| visible_in(&quadrants, q, k))),
                _ => mask.extend(std::iter::repeat_n(true, keys.len())),
            }
        }
    }
    Tensor::from_slice(&mask).reshape([rows.len() as i64, width as i64]).to_kind(Kind::Bool).to_device(device)
}
