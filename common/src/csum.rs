//! Internet checksum arithmetic (RFC 1071, RFC 1624). The tc datapath rewrites checksums
//! with the kernel's `bpf_l3/l4_csum_replace` helpers (they understand CHECKSUM_PARTIAL);
//! these functions are the reference the tests and the benchmarks check packets against.

/// Ones'-complement sum of `data` (big-endian 16-bit words) added to `sum`, unfolded.
pub fn sum_bytes(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([w[0], w[1]])));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

/// Folds a 32-bit partial sum to 16 bits and complements it.
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Checksum of an IPv4 header whose checksum field is zero (or verification: 0 if valid).
pub fn ipv4_header(header: &[u8]) -> u16 {
    fold(sum_bytes(0, header))
}

/// TCP/UDP checksum over the IPv4 pseudo-header and `segment` (the L4 header with its
/// checksum field included: the result is 0 when the segment's checksum is valid).
pub fn l4_ipv4(saddr: [u8; 4], daddr: [u8; 4], proto: u8, segment: &[u8]) -> u16 {
    let mut sum = sum_bytes(0, &saddr);
    sum = sum_bytes(sum, &daddr);
    sum = sum_bytes(sum, &[0, proto]);
    sum = sum_bytes(sum, &(segment.len() as u16).to_be_bytes());
    fold(sum_bytes(sum, segment))
}

/// RFC 1624 incremental update: the checksum after `old` bytes became `new` bytes
/// (equal lengths, even offsets).
pub fn update(csum: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut sum = u32::from(!csum);
    for w in old.chunks(2) {
        let v = u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]);
        sum = sum_bytes(sum, &(!v).to_be_bytes());
    }
    sum = sum_bytes(sum, new);
    fold(sum)
}

/// RFC 1624 (eqn. 3) for a 16-bit field: the checksum `check` (as on the wire, read as a
/// big-endian `u16`) after the field went from `old` to `new`. No loop, no slice: the XDP
/// datapath, which has no kernel helper for it, runs this per rewritten field.
#[inline(always)]
pub const fn replace2(check: u16, old: [u8; 2], new: [u8; 2]) -> u16 {
    let mut sum = (!check) as u32;
    sum += (!u16::from_be_bytes(old)) as u32;
    sum += u16::from_be_bytes(new) as u32;
    fold(sum)
}

/// [`replace2`] for a 32-bit field (an address), as two 16-bit words.
#[inline(always)]
pub const fn replace4(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let hi = replace2(check, [old[0], old[1]], [new[0], new[1]]);
    replace2(hi, [old[2], old[3]], [new[2], new[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_replacement_matches_a_full_recompute() {
        let mut hdr = HDR;
        let check = ipv4_header(&hdr);
        hdr[10..12].copy_from_slice(&check.to_be_bytes());
        let new_dst = [10, 244, 3, 66];
        let updated = replace4(check, [hdr[16], hdr[17], hdr[18], hdr[19]], new_dst);
        hdr[16..20].copy_from_slice(&new_dst);
        hdr[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(updated, ipv4_header(&hdr));
        assert_eq!(replace2(0x1234, [0, 80], [0, 80]), 0x1234, "no change, no difference");
    }

    // RFC 1071's example header (from Wikipedia's IPv4 checksum worked example).
    const HDR: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];

    #[test]
    fn ipv4_header_known_value_and_verification() {
        assert_eq!(ipv4_header(&HDR), 0xb861);
        let mut h = HDR;
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(ipv4_header(&h), 0);
    }

    #[test]
    fn incremental_update_matches_recompute() {
        let mut h = HDR;
        let c = ipv4_header(&h);
        let new_dst = [10, 96, 0, 10];
        let c2 = update(c, &h[16..20], &new_dst);
        h[16..20].copy_from_slice(&new_dst);
        assert_eq!(c2, ipv4_header(&h));
    }

    #[test]
    fn l4_checksum_verifies_to_zero() {
        let (s, d) = ([10, 0, 0, 1], [10, 0, 0, 2]);
        let mut udp = [0x30, 0x39, 0x00, 0x35, 0x00, 0x0b, 0x00, 0x00, b'a', b'b', b'c'];
        let c = l4_ipv4(s, d, 17, &udp);
        udp[6..8].copy_from_slice(&c.to_be_bytes());
        assert_eq!(l4_ipv4(s, d, 17, &udp), 0);
    }
}
