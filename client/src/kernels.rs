//! Decoding the kernel bytes of a [`FilterBatch`]: little-endian float32, 9 per filter.

use filterdb_proto::FilterBatch;

use crate::ClientError;

/// Bytes of one 3x3 float32 kernel.
pub const KERNEL_BYTES: usize = 9 * 4;

/// Decodes little-endian float32 bytes into 3x3 kernels (element `k = 3*row + col`).
pub fn decode_kernels(bytes: &[u8]) -> Result<Vec<[f32; 9]>, ClientError> {
    if !bytes.len().is_multiple_of(KERNEL_BYTES) {
        return Err(ClientError::Protocol(format!(
            "kernel bytes must be a multiple of {KERNEL_BYTES}, got {}",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(KERNEL_BYTES)
        .map(|k| {
            let mut out = [0f32; 9];
            for (v, b) in out.iter_mut().zip(k.chunks_exact(4)) {
                *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            out
        })
        .collect())
}

/// Encodes kernels as the little-endian float32 bytes the server sends (inverse of
/// [`decode_kernels`]).
pub fn encode_kernels(kernels: &[[f32; 9]]) -> Vec<u8> {
    kernels
        .iter()
        .flat_map(|k| k.iter().flat_map(|v| v.to_le_bytes()))
        .collect()
}

/// Decodes one batch, checking that it holds exactly `count` kernels.
pub fn batch_kernels(batch: &FilterBatch) -> Result<Vec<[f32; 9]>, ClientError> {
    let expected = batch.count as usize * KERNEL_BYTES;
    if batch.kernels.len() != expected {
        return Err(ClientError::Protocol(format!(
            "filter batch at id {} announces {} filters ({expected} bytes) but carries {} bytes",
            batch.first_filter_id,
            batch.count,
            batch.kernels.len()
        )));
    }
    decode_kernels(&batch.kernels)
}

/// Decodes a sequence of batches into `(filter_id, kernel)` pairs in the order received.
pub fn batches_kernels(batches: &[FilterBatch]) -> Result<Vec<(u64, [f32; 9])>, ClientError> {
    let mut out = Vec::with_capacity(batches.iter().map(|b| b.count as usize).sum());
    for b in batches {
        for (i, k) in batch_kernels(b)?.into_iter().enumerate() {
            out.push((b.first_filter_id + i as u64, k));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_little_endian_row_major() {
        let mut bytes = Vec::new();
        for i in 0..18 {
            bytes.extend_from_slice(&(i as f32 * 0.5 - 1.0).to_le_bytes());
        }
        let k = decode_kernels(&bytes).unwrap();
        assert_eq!(k.len(), 2);
        assert_eq!(k[0][0], -1.0);
        assert_eq!(k[0][8], 3.0);
        assert_eq!(k[1][0], 3.5);
        // Explicit byte pattern: 1.0f32 is 0x3f800000, little-endian 00 00 80 3f.
        let mut one = vec![0u8; 36];
        one[4..8].copy_from_slice(&[0x00, 0x00, 0x80, 0x3f]);
        assert_eq!(decode_kernels(&one).unwrap()[0][1], 1.0);
    }

    #[test]
    fn round_trips_bit_exact() {
        let k = [[
            f32::MIN_POSITIVE,
            -0.0,
            1e-38,
            f32::MAX,
            -3.25,
            0.1,
            7.0,
            -1e-7,
            2.5e5,
        ]];
        let bytes = encode_kernels(&k);
        let back = decode_kernels(&bytes).unwrap();
        for (a, b) in k[0].iter().zip(back[0].iter()) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
    }

    #[test]
    fn rejects_bad_lengths() {
        assert!(decode_kernels(&[0u8; 35]).is_err());
        assert!(decode_kernels(&[]).unwrap().is_empty());
        let b = FilterBatch {
            first_filter_id: 10,
            count: 2,
            kernels: vec![0u8; 36],
            ..Default::default()
        };
        assert!(batch_kernels(&b).is_err());
        let b = FilterBatch {
            first_filter_id: 10,
            count: 1,
            kernels: vec![0u8; 36],
            ..Default::default()
        };
        assert_eq!(
            batches_kernels(&[
                b.clone(),
                FilterBatch {
                    first_filter_id: 20,
                    ..b
                }
            ])
            .unwrap()[1]
                .0,
            20
        );
    }
}
