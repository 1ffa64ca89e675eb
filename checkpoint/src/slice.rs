//! Which part of a tensor a rank holds, and copying between overlapping parts.
//!
//! A checkpoint stores every tensor as disjoint boxes ("pieces") of its global shape. Loading on a
//! different number of processes asks for other boxes; each is assembled from the pieces it
//! overlaps. Everything is row-major and measured in elements.

use serde::{Deserialize, Serialize};

/// A box inside a tensor of some global shape: `offsets[d] .. offsets[d] + shape[d]` along each
/// dimension. A scalar is the empty box of rank 0 (one element).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Slice {
    pub offsets: Vec<usize>,
    pub shape: Vec<usize>,
}

impl Slice {
    /// The whole tensor.
    pub fn whole(shape: &[usize]) -> Self {
        Self { offsets: vec![0; shape.len()], shape: shape.to_vec() }
    }

    /// Part `part` of `parts` along the first dimension, the way data-parallel ranks split a
    /// tensor: sizes differ by at most one row, earlier parts are the larger ones. `None` when
    /// the part holds nothing (more parts than rows; a scalar belongs to part 0).
    pub fn rows_part(global: &[usize], part: usize, parts: usize) -> Option<Self> {
        let mut slice = Self::whole(global);
        match global.first() {
            Some(&rows) => {
                let (base, extra) = (rows / parts, rows % parts);
                slice.offsets[0] = part * base + part.min(extra);
                slice.shape[0] = base + usize::from(part < extra);
            }
            None if part > 0 => return None,
            None => {}
        }
        (slice.numel() > 0).then_some(slice)
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The boxes that hold elements `range` of the row-major flattening of a tensor of shape
    /// `global`, in flat order: each box's own elements are consecutive in the flattening, so the
    /// data of a flat range splits into the boxes' data by consecutive lengths. A ZeRO shard of a
    /// flattened tensor holds such a range; it is one box only when it starts and ends on rows.
    pub fn boxes_of_flat_range(global: &[usize], range: std::ops::Range<usize>) -> Vec<Slice> {
        let mut out = vec![];
        if range.start < range.end {
            push_flat_range(global, range.start, range.end, &mut vec![], &mut out);
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.numel() == 0
    }

    /// Whether the box lies inside a tensor of shape `global`.
    pub fn fits(&self, global: &[usize]) -> bool {
        self.offsets.len() == global.len()
            && self.shape.len() == global.len()
            && (0..global.len()).all(|d| self.offsets[d] + self.shape[d] <= global[d])
    }

    /// The overlap of two boxes of the same tensor, if not empty.
    pub fn intersect(&self, other: &Slice) -> Option<Slice> {
        if self.shape.len() != other.shape.len() {
            return None;
        }
        let mut out =
            Slice { offsets: Vec::with_capacity(self.shape.len()), shape: Vec::with_capacity(self.shape.len()) };
        for d in 0..self.shape.len() {
            let start = self.offsets[d].max(other.offsets[d]);
            let end = (self.offsets[d] + self.shape[d]).min(other.offsets[d] + other.shape[d]);
            if end <= start {
                return None;
            }
            out.offsets.push(start);
            out.shape.push(end - start);
        }
        Some(out)
    }
}

/// Appends the boxes of elements `a..b` (non-empty, inside the flattening of `shape`) of the
/// sub-tensor at index `prefix` of the enclosing dimensions.
fn push_flat_range(shape: &[usize], a: usize, b: usize, prefix: &mut Vec<usize>, out: &mut Vec<Slice>) {
    let Some((&rows, inner_shape)) = shape.split_first() else {
        // A scalar (or the last dimension's single element): `a..b` is `0..1`.
        out.push(Slice { offsets: prefix.clone(), shape: vec![1; prefix.len()] });
        return;
    };
    let inner: usize = inner_shape.iter().product();
    let full_box = |first: usize, count: usize, prefix: &[usize]| {
        let mut offsets = prefix.to_vec();
        offsets.push(first);
        offsets.extend(std::iter::repeat_n(0, inner_shape.len()));
        let mut box_shape = vec![1; prefix.len()];
        box_shape.push(count);
        box_shape.extend_from_slice(inner_shape);
        Slice { offsets, shape: box_shape }
    };
    let (first_row, last_row) = (a / inner, (b - 1) / inner);
    debug_assert!(last_row < rows, "flat range {a}..{b} outside shape");
    if first_row == last_row && !(a % inner == 0 && b - a == inner) {
        // Part of one row: a range inside that row's sub-tensor.
        prefix.push(first_row);
        push_flat_range(inner_shape, a - first_row * inner, b - first_row * inner, prefix, out);
        prefix.pop();
        return;
    }
    // A partial first row, whole rows, a partial last row.
    let mut whole_start = first_row;
    if a % inner != 0 {
        prefix.push(first_row);
        push_flat_range(inner_shape, a % inner, inner, prefix, out);
        prefix.pop();
        whole_start += 1;
    }
    let whole_end = b / inner;
    if whole_end > whole_start {
        out.push(full_box(whole_start, whole_end - whole_start, prefix));
    }
    if b % inner != 0 {
        prefix.push(whole_end);
        push_flat_range(inner_shape, 0, b % inner, prefix, out);
        prefix.pop();
    }
}

/// Copies `region` (a box inside both `src` and `dst`) from `src_data`, which holds the elements
/// of box `src`, into `dst_data`, which holds box `dst`. `elem` is the element size in bytes.
pub fn copy_region(src: &Slice, src_data: &[u8], dst: &Slice, dst_data: &mut [u8], region: &Slice, elem: usize) {
    let rank = region.shape.len();
    if rank == 0 {
        dst_data[..elem].copy_from_slice(&src_data[..elem]);
        return;
    }
    let strides = |shape: &[usize]| {
        let mut s = vec![1usize; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            s[d] = s[d + 1] * shape[d + 1];
        }
        s
    };
    let (src_strides, dst_strides) = (strides(&src.shape), strides(&dst.shape));
    // Runs along the last dimension are contiguous in both boxes.
    let run = region.shape[rank - 1] * elem;
    let outer: usize = region.shape[..rank - 1].iter().product();
    let mut index = vec![0usize; rank - 1];
    for _ in 0..outer {
        let (mut s, mut t) = (0, 0);
        for d in 0..rank {
            let at = region.offsets[d] + if d < rank - 1 { index[d] } else { 0 };
            s += (at - src.offsets[d]) * src_strides[d];
            t += (at - dst.offsets[d]) * dst_strides[d];
        }
        dst_data[t * elem..t * elem + run].copy_from_slice(&src_data[s * elem..s * elem + run]);
        for d in (0..rank - 1).rev() {
            index[d] += 1;
            if index[d] < region.shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_parts_cover_the_tensor_once() {
        for rows in [0usize, 1, 5, 7, 12] {
            for parts in 1..5 {
                let mut next = 0;
                for p in 0..parts {
                    if let Some(s) = Slice::rows_part(&[rows, 3], p, parts) {
                        assert_eq!(s.offsets[0], next);
                        next += s.shape[0];
                    }
                }
                assert_eq!(next, rows);
            }
        }
        assert_eq!(Slice::rows_part(&[], 0, 3).map(|s| s.numel()), Some(1));
        assert!(Slice::rows_part(&[], 2, 3).is_none());
    }

    #[test]
    fn flat_ranges_split_into_boxes_of_consecutive_elements() {
        fn flat_indices(global: &[usize], s: &Slice) -> Vec<usize> {
            let whole = Slice::whole(global);
            let n = whole.numel();
            let all: Vec<u8> = (0..n).flat_map(|i| (i as u32).to_le_bytes()).collect();
            let mut out = vec![0u8; s.numel() * 4];
            copy_region(&whole, &all, s, &mut out, s, 4);
            out.chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap()) as usize).collect()
        }
        for global in [vec![], vec![7], vec![4, 5], vec![3, 1, 4], vec![2, 3, 4, 2]] {
            let n: usize = global.iter().product();
            for a in 0..=n {
                for b in a..=n {
                    let boxes = Slice::boxes_of_flat_range(&global, a..b);
                    let got: Vec<usize> = boxes.iter().flat_map(|s| flat_indices(&global, s)).collect();
                    assert_eq!(got, (a..b).collect::<Vec<_>>(), "{global:?} {a}..{b}: {boxes:?}");
                    assert!(boxes.iter().all(|s| s.fits(&global) && !s.is_empty()));
                    // At most a partial and a whole part per dimension on either side.
                    assert!(boxes.len() <= 2 * global.len().max(1), "{global:?} {a}..{b}: {boxes:?}");
                }
            }
        }
        let rows = Slice::boxes_of_flat_range(&[4, 5], 5..15);
        assert_eq!(rows, vec![Slice { offsets: vec![1, 0], shape: vec![2, 5] }]);
    }

    #[test]
    fn copying_a_region_moves_the_right_elements() {
        // A 4×5 tensor with element value = flat index; copy the overlap of rows 1..3 into a
        // box of rows 2..4, columns 1..5.
        let global = [4usize, 5];
        let full: Vec<u8> = (0..20u8).collect();
        let whole = Slice::whole(&global);
        let dst = Slice { offsets: vec![2, 1], shape: vec![2, 4] };
        let src = Slice { offsets: vec![1, 0], shape: vec![2, 5] };
        let src_data: Vec<u8> = full[5..15].to_vec();
        let mut out = vec![255u8; 8];
        let region = src.intersect(&dst).unwrap();
        assert_eq!(region, Slice { offsets: vec![2, 1], shape: vec![1, 4] });
        copy_region(&src, &src_data, &dst, &mut out, &region, 1);
        assert_eq!(out, vec![11, 12, 13, 14, 255, 255, 255, 255]);
        let mut all = vec![0u8; 20];
        copy_region(&whole, &full, &whole, &mut all, &whole, 1);
        assert_eq!(all, full);
    }
}
