//! The checksums that guard the files of a model: version 1's serial chain (also the write-ahead
//! log's records and evicted-stream files) and version 2's, which hashes each MiB of a part on its
//! own, four lanes at a time and the chunks in parallel, so that saving, moving and loading a large
//! model is not bound by one serial chain of multiplies.

/// Bytes hashed as one chunk by [`checksum_v2`].
const CHUNK: usize = 1 << 20;

/// The hash of one chunk: four independent lanes of 8 bytes (a multiply-rotate round each),
/// so that the rounds overlap instead of waiting for each other, folded with the length.
fn chunk_hash(bytes: &[u8]) -> u64 {
    const P1: u64 = 0x9E37_79B1_85EB_CA87;
    const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    let round =
        |acc: u64, word: u64| acc.wrapping_add(word.wrapping_mul(P2)).rotate_left(31).wrapping_mul(P1);
    let mut lanes = [P1.wrapping_add(P2), P2, 0, P1.wrapping_neg()];
    let mut blocks = bytes.chunks_exact(32);
    for block in &mut blocks {
        for (lane, word) in lanes.iter_mut().zip(block.chunks_exact(8)) {
            *lane = round(*lane, u64::from_le_bytes(word.try_into().expect("8 bytes")));
        }
    }
    let mut h = lanes
        .iter()
        .enumerate()
        .fold(bytes.len() as u64, |h, (i, &l)| crate::core::rng::bits(h, l ^ i as u64));
    let mut words = blocks.remainder().chunks(8);
    for word in &mut words {
        let mut b = [0u8; 8];
        b[..word.len()].copy_from_slice(word);
        h = crate::core::rng::bits(h ^ word.len() as u64, u64::from_le_bytes(b));
    }
    h
}

/// The version-2 checksum: each part length-prefixed, cut into chunks of [`CHUNK`] bytes hashed
/// in parallel, the chunk hashes chained in order.
pub(crate) fn checksum_v2<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    use crate::core::rng::bits;
    use rayon::prelude::*;
    let mut h = 0x6b66_7274_726c_2132u64; // "kfrtrl!2"
    for p in parts {
        h = bits(h, p.len() as u64);
        let chunks: Vec<u64> =
            if p.len() > CHUNK { p.par_chunks(CHUNK).map(chunk_hash).collect() } else { vec![chunk_hash(p)] };
        h = chunks.into_iter().fold(h, bits);
    }
    h
}

/// The checksum of a model file of `version`.
pub(crate) fn checksum_of<'a>(version: u32, parts: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    if version >= 2 { checksum_v2(parts) } else { checksum(parts) }
}

/// A 64-bit hash of byte strings (each length-prefixed), 8 bytes at a time (the checksum of
/// version-1 model files; the write-ahead log's records and evicted-stream files use it too).
pub(crate) fn checksum<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    use crate::core::rng::bits;
    let mut h = 0x6b66_7274_726c_2131u64; // "kfrtrl!1"
    for p in parts {
        h = bits(h, p.len() as u64);
        let mut chunks = p.chunks_exact(8);
        for c in &mut chunks {
            h = bits(h, u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            h = bits(h ^ 0xff, u64::from_le_bytes(b));
        }
    }
    h
}
