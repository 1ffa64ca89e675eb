// The block-diffusion mask, analytically: the C++/CUDA twin of kernels/src/tiles.rs.
//
// A layout is a grid of quadrants (four for x_t ⊕ x_0, one otherwise); inside a quadrant the
// visibility of (query, key) depends only on their block indices through one rule. A tile
// (a rectangle of queries × keys) is classified from the block ranges it spans, so kernels skip
// empty tiles and evaluate the element rule only inside partial ones. `bd3_layout_classify` and
// `bd3_layout_visible` (flash.cu) expose these functions to the Rust test that checks they agree
// with tiles.rs.
#pragma once

#ifdef __CUDACC__
#define BD3_HD __host__ __device__ __forceinline__
#else
#define BD3_HD inline
#endif

// Layout kinds, as kernels/src/cuda.rs encodes a BlockLayout.
enum { BD3_TWO_STREAM = 0, BD3_BLOCK_CAUSAL = 1, BD3_ALL_VISIBLE = 2 };
// Tile kinds (same order as the Rust TileKind).
enum { BD3_TILE_EMPTY = 0, BD3_TILE_FULL = 1, BD3_TILE_PARTIAL = 2 };
enum { BD3_NEVER = 0, BD3_ALWAYS, BD3_SAME_BLOCK, BD3_EARLIER_BLOCK, BD3_SAME_OR_EARLIER_BLOCK };

struct Bd3Layout {
    int kind;
    int n;      // stream length (each half of the two-stream input)
    int block;  // block size (1 for causal)
    int sq;     // number of queries
    int sk;     // number of keys
};

// The rule of quadrant (hq, hk); hq/hk are the stream indices (always 0 for one stream).
BD3_HD int bd3_rule(const Bd3Layout& l, int hq, int hk) {
    if (l.kind == BD3_ALL_VISIBLE) return BD3_ALWAYS;
    if (l.kind == BD3_BLOCK_CAUSAL) return BD3_SAME_OR_EARLIER_BLOCK;
    if (hq == 0) return hk == 0 ? BD3_SAME_BLOCK : BD3_EARLIER_BLOCK;
    return hk == 0 ? BD3_NEVER : BD3_SAME_OR_EARLIER_BLOCK;
}

BD3_HD bool bd3_rule_allows(int rule, int bq, int bk) {
    switch (rule) {
        case BD3_ALWAYS: return true;
        case BD3_SAME_BLOCK: return bq == bk;
        case BD3_EARLIER_BLOCK: return bk < bq;
        case BD3_SAME_OR_EARLIER_BLOCK: return bk <= bq;
        default: return false;
    }
}

// Query blocks qa..=qb against key blocks ka..=kb.
BD3_HD int bd3_rule_classify(int rule, int qa, int qb, int ka, int kb) {
    bool full = false, empty = false;
    switch (rule) {
        case BD3_NEVER: empty = true; break;
        case BD3_ALWAYS: full = true; break;
        case BD3_SAME_BLOCK: full = qa == qb && ka == kb && qa == ka; empty = kb < qa || ka > qb; break;
        case BD3_EARLIER_BLOCK: full = kb < qa; empty = ka >= qb; break;
        default: full = kb <= qa; empty = ka > qb; break;
    }
    return full ? BD3_TILE_FULL : (empty ? BD3_TILE_EMPTY : BD3_TILE_PARTIAL);
}

BD3_HD int bd3_streams(const Bd3Layout& l) { return l.kind == BD3_TWO_STREAM ? 2 : 1; }
// Start and end of stream h of a sequence of `len` positions.
BD3_HD int bd3_stream_begin(const Bd3Layout& l, int h) { return h * l.n; }
BD3_HD int bd3_stream_end(const Bd3Layout& l, int h, int len) { return l.kind == BD3_TWO_STREAM ? (h + 1) * l.n : len; }
BD3_HD int bd3_block(const Bd3Layout& l) { return l.kind == BD3_ALL_VISIBLE ? 1 : l.block; }

BD3_HD bool bd3_visible(const Bd3Layout& l, int q, int k) {
    int hq = (l.kind == BD3_TWO_STREAM && q >= l.n) ? 1 : 0;
    int hk = (l.kind == BD3_TWO_STREAM && k >= l.n) ? 1 : 0;
    int b = bd3_block(l);
    return bd3_rule_allows(bd3_rule(l, hq, hk), (q - bd3_stream_begin(l, hq)) / b, (k - bd3_stream_begin(l, hk)) / b);
}

// Classifies the tile [q0, q1) × [k0, k1) (non-empty, inside the layout).
BD3_HD int bd3_classify(const Bd3Layout& l, int q0, int q1, int k0, int k1) {
    bool any_full = false, any_empty = false, any_partial = false;
    int b = bd3_block(l);
    for (int hq = 0; hq < bd3_streams(l); ++hq) {
        int qs = bd3_stream_begin(l, hq), qe = bd3_stream_end(l, hq, l.sq);
        int a = q0 > qs ? q0 : qs, e = q1 < qe ? q1 : qe;
        if (a >= e) continue;
        for (int hk = 0; hk < bd3_streams(l); ++hk) {
            int ks = bd3_stream_begin(l, hk), ke = bd3_stream_end(l, hk, l.sk);
            int c = k0 > ks ? k0 : ks, f = k1 < ke ? k1 : ke;
            if (c >= f) continue;
            int kind = bd3_rule_classify(bd3_rule(l, hq, hk), (a - qs) / b, (e - 1 - qs) / b, (c - ks) / b, (f - 1 - ks) / b);
            any_full |= kind == BD3_TILE_FULL;
            any_empty |= kind == BD3_TILE_EMPTY;
            any_partial |= kind == BD3_TILE_PARTIAL;
        }
    }
    if (!any_partial && any_full && !any_empty) return BD3_TILE_FULL;
    if (!any_partial && !any_full) return BD3_TILE_EMPTY;
    return BD3_TILE_PARTIAL;
}
