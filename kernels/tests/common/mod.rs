//! Layouts shared by the tests: every variant, block sizes from 1 to L, lengths that are and are
//! not multiples of the tiles used.

use kernels::BlockLayout;

/// Two-stream and block-causal layouts for each (L, block sizes), causal for each L, and two
/// decode layouts (empty and non-empty cache).
pub fn small_layouts(shapes: &[(usize, &[usize])]) -> Vec<BlockLayout> {
    let mut out = Vec::new();
    for &(n, blocks) in shapes {
        for &b in blocks {
            out.push(BlockLayout::two_stream(n, b).unwrap());
            out.push(BlockLayout::block_causal(n, b).unwrap());
        }
        out.push(BlockLayout::Causal { seq_len: n });
    }
    out.push(BlockLayout::Decode { prefix_len: 0, block_len: 4, position: 0 });
    out.push(BlockLayout::Decode { prefix_len: 37, block_len: 5, position: 50 });
    out
}
