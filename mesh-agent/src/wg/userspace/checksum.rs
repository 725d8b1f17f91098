//! The Internet checksum (RFC 1071), as the offload paths need it: partial
//! sums that can be combined, the pseudo-header sum, and the final fold.

/// Adds `bytes` (as big-endian 16-bit words, odd tail zero-padded) to `sum`.
///
/// Pieces of one summed region may be added one after the other as long as
/// every piece but the last has an even length (headers always do).
#[must_use]
pub(super) fn sum(bytes: &[u8], mut acc: u64) -> u64 {
    // 32-bit words into a 64-bit accumulator: no carry is lost for any
    // packet shorter than 16 GiB, and the fold below is the same.
    let mut chunks = bytes.chunks_exact(4);
    for c in &mut chunks {
        acc += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rest = chunks.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    acc + u64::from(u32::from_be_bytes(tail))
}

/// Folds an accumulator to 16 bits (not complemented).
#[must_use]
pub(super) fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The pseudo-header sum of TCP/UDP over IPv4 or IPv6: addresses (both the
/// same family, given as raw bytes), protocol and L4 length.
#[must_use]
pub(super) fn pseudo_header(src: &[u8], dst: &[u8], proto: u8, l4_len: usize) -> u64 {
    let acc = sum(dst, sum(src, 0));
    acc + u64::from(proto) + l4_len as u64
}

/// The checksum to store: the complement of the folded sum.
#[must_use]
pub(super) fn finish(acc: u64) -> u16 {
    !fold(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071 done the slow, obvious way: 16-bit words, end-around carry.
    fn reference(bytes: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for pair in bytes.chunks(2) {
            let w = u32::from(pair[0]) << 8 | u32::from(*pair.get(1).unwrap_or(&0));
            s += w;
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    #[test]
    fn matches_reference_on_all_lengths() {
        let data: Vec<u8> = (0..1500u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for len in [0, 1, 2, 3, 4, 5, 7, 20, 63, 64, 1499, 1500] {
            assert_eq!(finish(sum(&data[..len], 0)), reference(&data[..len]), "len {len}");
        }
    }

    #[test]
    fn rfc1071_example() {
        // The example of RFC 1071 section 3: the sum is 0xddf2.
        let bytes = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&bytes, 0)), 0xddf2);
    }
}
