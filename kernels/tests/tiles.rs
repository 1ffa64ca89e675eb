//! The analytic tile classification against the element-wise mask.

use kernels::{BlockLayout, TileKind};
use tch::Device;

mod common;

fn layouts() -> Vec<BlockLayout> {
    common::small_layouts(&[(8, &[1, 2, 4, 8]), (12, &[1, 3, 4, 12]), (16, &[1, 4, 16])])
}

fn dense(layout: &BlockLayout) -> Vec<Vec<bool>> {
    let mask = layout.dense_mask(Device::Cpu);
    (0..layout.query_len() as i64).map(|r| Vec::<bool>::try_from(mask.get(r)).unwrap()).collect()
}

#[test]
fn visible_matches_the_dense_mask() {
    for layout in layouts() {
        let mask = dense(&layout);
        for (q, row) in mask.iter().enumerate() {
            for (k, &allowed) in row.iter().enumerate() {
                assert_eq!(layout.visible(q, k), allowed, "{layout:?} q={q} k={k}");
            }
        }
    }
}

/// The pair count that FLOP and MFU figures use is the number of visible mask elements, and
/// for L = 1024, L′ = 16 it is L·L′ + L² (block diagonal, plus the two block-triangular halves).
#[test]
fn visible_pairs_count_the_dense_mask() {
    for layout in layouts() {
        let visible: usize = dense(&layout).iter().map(|row| row.iter().filter(|&&v| v).count()).sum();
        assert_eq!(layout.visible_pairs(), visible as u64, "{layout:?}");
    }
    let paper = BlockLayout::two_stream(1024, 16).unwrap();
    assert_eq!(paper.visible_pairs(), 1024 * 16 + 1024 * 1024);
}

/// Every rectangle of every small layout: the classification is exactly what counting its
/// visible elements says.
#[test]
fn classification_matches_element_counts() {
    for layout in layouts() {
        let mask = dense(&layout);
        let (nq, nk) = (layout.query_len(), layout.key_len());
        for q0 in 0..nq {
            for q1 in q0 + 1..=nq {
                for k0 in 0..nk {
                    for k1 in k0 + 1..=nk {
                        let seen =
                            (q0..q1).flat_map(|q| (k0..k1).map(move |k| (q, k))).filter(|&(q, k)| mask[q][k]).count();
                        let expected = match seen {
                            0 => TileKind::Empty,
                            s if s == (q1 - q0) * (k1 - k0) => TileKind::Full,
                            _ => TileKind::Partial,
                        };
                        assert_eq!(layout.classify(q0..q1, k0..k1), expected, "{layout:?} q {q0}..{q1} k {k0}..{k1}");
                    }
                }
            }
        }
    }
}

#[test]
fn visible_tiles_cover_exactly_the_visible_keys() {
    for layout in layouts() {
        let mask = dense(&layout);
        for tile in [1usize, 2, 3, 4, 5, 8, 64] {
            let key_tiles = BlockLayout::tiles_of(&layout.key_streams(), tile);
            for rows in BlockLayout::tiles_of(&layout.query_streams(), tile) {
                let visible = layout.visible_tiles(&rows, &key_tiles);
                for (i, keys) in key_tiles.iter().enumerate() {
                    let kind = visible.iter().find(|(j, _)| *j == i).map(|&(_, kind)| kind);
                    for k in keys.clone() {
                        let any = rows.clone().any(|q| mask[q][k]);
                        let all = rows.clone().all(|q| mask[q][k]);
                        match kind {
                            None => assert!(!any, "{layout:?} rows {rows:?}: key {k} visible but skipped"),
                            Some(TileKind::Full) => assert!(all, "{layout:?} rows {rows:?}: key {k} in a full tile"),
                            Some(_) => {}
                        }
                    }
                }
            }
        }
    }
}

/// The two-stream layout of the paper's shape: about a quarter of the tiles are non-empty, and
/// only diagonal tiles are partial.
#[test]
fn two_stream_tiles_are_mostly_empty_or_full() {
    let layout = BlockLayout::two_stream(1024, 16).unwrap();
    let tiles = BlockLayout::tiles_of(&layout.query_streams(), 128);
    let mut count = [0usize; 3];
    for q in &tiles {
        for k in &tiles {
            count[layout.classify(q.clone(), k.clone()) as usize] += 1;
        }
    }
    let [empty, full, partial] = count;
    assert_eq!(empty + full + partial, 256);
    assert_eq!(partial, 8 + 8 + 8, "x_t diagonal, x_t→x_0 diagonal, x_0 diagonal");
    assert_eq!(full, 28 + 28);
}
