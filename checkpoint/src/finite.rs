//! Checksumming a tensor's bytes and counting its non-finite values in one pass: the data is
//! walked in blocks small enough to stay in cache between the CRC and the scan.

use crate::DType;

/// Bytes per block: a multiple of every element size.
const BLOCK: usize = 64 << 10;

/// `crc` (CRC-32C) extended over `data`, and how many of `data`'s values of type `dtype` are NaN
/// or ±Inf (0 for integer and boolean types).
pub fn crc_and_count_non_finite(mut crc: u32, dtype: DType, data: &[u8]) -> (u32, u64) {
    let mut bad = 0;
    for block in data.chunks(BLOCK) {
        crc = crc32c::crc32c_append(crc, block);
        bad += count_non_finite(dtype, block);
    }
    (crc, bad)
}

/// A float is NaN or ±Inf exactly when all its exponent bits are set.
fn count_non_finite(dtype: DType, bytes: &[u8]) -> u64 {
    fn count<const N: usize>(bytes: &[u8], exponent: u64) -> u64 {
        let mut word = [0u8; 8];
        bytes
            .chunks_exact(N)
            .filter(|b| {
                word[..N].copy_from_slice(b);
                u64::from_le_bytes(word) & exponent == exponent
            })
            .count() as u64
    }
    match dtype {
        DType::F64 => count::<8>(bytes, 0x7ff0_0000_0000_0000),
        DType::F32 => count::<4>(bytes, 0x7f80_0000),
        DType::F16 => count::<2>(bytes, 0x7c00),
        DType::BF16 => count::<2>(bytes, 0x7f80),
        DType::I64 | DType::I32 | DType::U8 | DType::Bool => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_of_every_float_type_are_counted() {
        let f32s: Vec<u8> = [1.0f32, f32::NAN, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN_POSITIVE]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(count_non_finite(DType::F32, &f32s), 3);
        let f64s: Vec<u8> = [f64::NAN, 2.5, f64::MAX, f64::NEG_INFINITY].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(count_non_finite(DType::F64, &f64s), 2);
        // bf16 is the top half of an f32; f16: 0x7c00 = +Inf, 0x7e00 = NaN, 0x7bff = 65504.
        let bf16s: Vec<u8> = [f32::NAN, 1.0, f32::INFINITY, -3.0e38]
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        assert_eq!(count_non_finite(DType::BF16, &bf16s), 2);
        let f16s: Vec<u8> = [0x7c00u16, 0x7e00, 0x7bff, 0xfc00, 0x3c00].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(count_non_finite(DType::F16, &f16s), 3);
        assert_eq!(count_non_finite(DType::I32, &[0xff; 8]), 0, "integers have no NaN");
    }

    #[test]
    fn the_crc_is_the_plain_one_across_blocks() {
        let data: Vec<u8> = (0..3 * BLOCK + 6).map(|i| (i * 7 % 251) as u8).collect();
        let (crc, _) = crc_and_count_non_finite(crc32c::crc32c(b"head"), DType::U8, &data);
        assert_eq!(crc, crc32c::crc32c_append(crc32c::crc32c(b"head"), &data));
    }
}
