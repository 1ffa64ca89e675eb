//! Block-sparse attention from composed libtorch ops (the CPU default).
//!
//! Queries are cut into row tiles of whole blocks inside each stream, keys into key tiles the same
//! way. For every row tile the layout says analytically which key tiles are empty, full or partial
//! ([`BlockLayout::visible_tiles`]); the row attends only to its non-empty key tiles, concatenated,
//! through libtorch's fused scaled-dot-product attention (forward and backward). In the two-stream
//! layout the x_t and x_0 row tiles at the same offset go through one call (they share the clean
//! prefix). A mask exists only for calls with a partial or empty tile, covers only that call's
//! keys, and is evaluated with the element rule only inside the partial tiles. The work is about
//! the number of visible (query, key) pairs plus the partial tiles' waste, instead of
//! query_len × key_len, and no O(L²) mask is built.
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
pub const DEFAULT_TILE: usize = 96;

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
    let mut outputs: Vec<Option<Tensor>> = (0..row_tiles.len()).map(|_| None).collect();
    for group in row_groups(layout, &row_tiles) {
        let visible: Vec<Vec<(usize, TileKind)>> =
            group.iter().map(|&r| layout.visible_tiles(&row_tiles[r], &key_tiles)).collect();
        let mut keys: Vec<usize> = visible.iter().flatten().map(|&(i, _)| i).collect();
        keys.sort_unstable();
        keys.dedup();
        if keys.is_empty() {
            // A query that sees no key has no defined softmax; none of our layouts has one, but a
            // zero output (and zero gradient) is the safe value rather than NaN.
            for &r in &group {
                outputs[r] = Some(q_tiles[r].zeros_like());
            }
            continue;
        }
        // Every row tile's kind against every key tile of the group (Empty where it sees none).
        let kinds: Vec<Vec<TileKind>> = visible
            .iter()
            .map(|vis| {
                keys.iter()
                    .map(|i| vis.iter().find(|(j, _)| j == i).map_or(TileKind::Empty, |&(_, kind)| kind))
                    .collect()
            })
            .collect();
        let k_rows = cat(keys.iter().map(|&i| k_tiles[i].shallow_clone()).collect())?;
        let v_rows = cat(keys.iter().map(|&i| v_tiles[i].shallow_clone()).collect())?;
        let q_rows = cat(group.iter().map(|&r| q_tiles[r].shallow_clone()).collect())?;
        let mask = kinds.iter().flatten().any(|kind| *kind != TileKind::Full).then(|| {
            let rows: Vec<&Range<usize>> = group.iter().map(|&r| &row_tiles[r]).collect();
            group_mask(layout, &rows, &kinds, &keys, &key_tiles, q.device())
        });
        let out =
            Tensor::f_scaled_dot_product_attention(&q_rows, &k_rows, &v_rows, mask.as_ref(), 0.0, false, scale, false)?;
        let sizes: Vec<i64> = group.iter().map(|&r| row_tiles[r].len() as i64).collect();
        for (&r, part) in group.iter().zip(out.f_split_with_sizes(&sizes, 2)?) {
            outputs[r] = Some(part);
        }
    }
    cat(outputs.into_iter().map(|o| o.expect("every row tile belongs to a group")).collect())
}

/// Row tiles attended to in one call. In the two-stream layout, tile j of x_t and tile j of x_0
/// share all but two of their key tiles (the clean prefix): one call for both copies those keys
/// once instead of twice, halves the number of calls and gives each call twice the queries, at
/// the price of one masked-out tile (clean queries never see the noisy keys).
fn row_groups(layout: &BlockLayout, row_tiles: &[Range<usize>]) -> Vec<Vec<usize>> {
    match *layout {
        BlockLayout::TwoStream { .. } => {
            let half = row_tiles.len() / 2;
            (0..half).map(|j| vec![j, j + half]).collect()
        }
        _ => (0..row_tiles.len()).map(|r| vec![r]).collect(),
    }
}

/// The boolean mask `[rows of the group, keys of the group's key tiles]`: true over full tiles,
/// false over empty ones, the element rule inside partial ones.
fn group_mask(
    layout: &BlockLayout,
    rows: &[&Range<usize>],
    kinds: &[Vec<TileKind>],
    keys: &[usize],
    key_tiles: &[Range<usize>],
    device: Device,
) -> Tensor {
    let quadrants = layout.quadrants();
    let width: usize = keys.iter().map(|&i| key_tiles[i].len()).sum();
    let height: usize = rows.iter().map(|r| r.len()).sum();
    let mut mask = Vec::with_capacity(height * width);
    for (row_tile, kinds) in rows.iter().zip(kinds) {
        for q in (*row_tile).clone() {
            for (&i, kind) in keys.iter().zip(kinds) {
                let tile = key_tiles[i].clone();
                match kind {
                    TileKind::Partial => mask.extend(tile.map(|k| visible_in(&quadrants, q, k))),
                    TileKind::Full => mask.extend(std::iter::repeat_n(true, tile.len())),
                    TileKind::Empty => mask.extend(std::iter::repeat_n(false, tile.len())),
                }
            }
        }
    }
    Tensor::from_slice(&mask).reshape([height as i64, width as i64]).to_kind(Kind::Bool).to_device(device)
}
