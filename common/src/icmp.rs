//! Reverse translation of ICMP errors about service flows: the checksum arithmetic.
//!
//! An ICMP error (destination unreachable, time exceeded) about a DNATed packet quotes it as
//! it was sent, `client:cport -> backend:bport`. The client's socket is connected to
//! `vip:vport` and ignores an error about any other peer, so `to_pod` rewrites the quote's
//! destination back to `vip:vport` (`dataplane-ebpf/src/icmp.rs`). Every checksum that
//! covers a changed byte is updated incrementally (RFC 1624), as Linux's
//! `nf_nat_icmp_reply_translation` leaves them:
//!
//! | field                          | update |
//! |--------------------------------|--------|
//! | quoted IPv4 header checksum    | for the quoted destination address |
//! | quoted UDP checksum (in the 8 quoted bytes) | for the pseudo-header address and the port, unless 0 ("none"); a result of 0 is sent as `0xffff` |
//! | quoted TCP checksum (bytes 16..18, only if the error quotes them) | for the pseudo-header address and the port; left alone when not quoted, as Linux does |
//! | ICMP checksum                  | for every quoted 16-bit word that changed |
//! | outer IPv4 checksum            | for the outer source, when the backend itself sent the error (source := VIP) |
//!
//! Each update is checksum-neutral over the bytes it covers, so a `CHECKSUM_COMPLETE`
//! skb's sum stays valid without recomputation.
//!
//! All offsets of the changed fields are even relative to the start of the ICMP message
//! (the quote starts 8 bytes in, the IPv4 header length is a multiple of 4), so plain
//! 16-bit word arithmetic applies.
use crate::csum;

/// ICMP type: destination unreachable (every code, 4 = fragmentation needed included).
pub const ICMP_DEST_UNREACH: u8 = 3;
/// ICMP type: time exceeded.
pub const ICMP_TIME_EXCEEDED: u8 = 11;
/// The ICMP header before the quote: type, code, checksum, 4 bytes of rest-of-header
/// (the next-hop MTU for fragmentation needed).
pub const ICMP_HLEN: usize = 8;
/// What an error must quote of the packet's L4 header for it to be translated: the ports,
/// and for UDP its checksum (RFC 792: the first 8 bytes).
pub const QUOTE_L4_LEN: usize = 8;

/// The ICMP errors whose quote is reverse-translated.
#[inline(always)]
pub const fn is_translated_error(icmp_type: u8) -> bool {
    icmp_type == ICMP_DEST_UNREACH || icmp_type == ICMP_TIME_EXCEEDED
}

/// How the quoted L4 checksum is treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Csum {
    /// Not quoted (TCP with only 8 bytes) or UDP's 0 ("no checksum"): left as it is.
    Absent,
    /// A TCP checksum.
    Tcp,
    /// A non-zero UDP checksum: never updated to 0.
    Udp,
}

/// The quoted fields the reverse translation changes, as on the wire (network order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quote {
    /// Quoted destination address: the backend, then the VIP.
    pub daddr: [u8; 4],
    /// Quoted IPv4 header checksum.
    pub ip_csum: [u8; 2],
    /// Quoted destination port: the target port, then the service port.
    pub dport: [u8; 2],
    /// Quoted L4 checksum (meaningless when [`L4Csum::Absent`]).
    pub l4_csum: [u8; 2],
}

#[inline(always)]
const fn word(b: [u8; 2]) -> u32 {
    u16::from_be_bytes(b) as u32
}

/// Adds the RFC 1624 (eqn. 3) difference of one 16-bit word to an unfolded sum.
#[inline(always)]
const fn diff2(sum: u32, old: [u8; 2], new: [u8; 2]) -> u32 {
    sum + (!u16::from_be_bytes(old)) as u32 + word(new)
}

#[inline(always)]
const fn diff4(sum: u32, old: [u8; 4], new: [u8; 4]) -> u32 {
    let sum = diff2(sum, [old[0], old[1]], [new[0], new[1]]);
    diff2(sum, [old[2], old[3]], [new[2], new[3]])
}

/// Starts an incremental update of checksum `csum`.
#[inline(always)]
const fn open(csum: [u8; 2]) -> u32 {
    (!u16::from_be_bytes(csum)) as u32
}

#[inline(always)]
const fn close(sum: u32) -> [u8; 2] {
    csum::fold(sum).to_be_bytes()
}

/// `csum` after the 4 bytes `old` it covers became `new`.
#[inline(always)]
pub const fn replace4(csum: [u8; 2], old: [u8; 4], new: [u8; 4]) -> [u8; 2] {
    close(diff4(open(csum), old, new))
}

/// The quote rewritten to `vip:vport`, and the ICMP checksum `icmp_csum` updated for it.
#[inline(always)]
pub const fn reverse_quote(
    q: Quote,
    l4: L4Csum,
    vip: [u8; 4],
    vport: [u8; 2],
    icmp_csum: [u8; 2],
) -> (Quote, [u8; 2]) {
    let ip_csum = replace4(q.ip_csum, q.daddr, vip);
    let l4_csum = match l4 {
        L4Csum::Absent => q.l4_csum,
        L4Csum::Tcp | L4Csum::Udp => {
            let c = close(diff2(diff4(open(q.l4_csum), q.daddr, vip), q.dport, vport));
            if matches!(l4, L4Csum::Udp) && c[0] == 0 && c[1] == 0 { [0xff, 0xff] } else { c }
        }
    };
    let new = Quote { daddr: vip, ip_csum, dport: vport, l4_csum };
    let mut sum = diff4(open(icmp_csum), q.daddr, new.daddr);
    sum = diff2(sum, q.ip_csum, new.ip_csum);
    sum = diff2(sum, q.dport, new.dport);
    sum = diff2(sum, q.l4_csum, new.l4_csum);
    (new, close(sum))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    const CLIENT: [u8; 4] = [10, 244, 0, 2];
    const BACKEND: [u8; 4] = [10, 244, 1, 11];
    const VIP: [u8; 4] = [10, 96, 0, 10];

    /// An ICMP frag-needed quoting `client:40000 -> dst:dport` (UDP or TCP with `l4_len`
    /// quoted bytes), all checksums computed from scratch.
    fn error(proto: u8, dst: [u8; 4], dport: u16, l4_len: usize) -> Vec<u8> {
        let mut l4 = std::vec![0u8; 20];
        l4[0..2].copy_from_slice(&40000u16.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        if proto == 17 {
            l4.truncate(8);
            l4[4..6].copy_from_slice(&8u16.to_be_bytes());
            let c = csum::l4_ipv4(CLIENT, dst, 17, &l4);
            l4[6..8].copy_from_slice(&c.to_be_bytes());
        } else {
            l4[12] = 5 << 4;
            l4[13] = 0x02;
            let c = csum::l4_ipv4(CLIENT, dst, 6, &l4);
            l4[16..18].copy_from_slice(&c.to_be_bytes());
            l4.truncate(l4_len);
        }
        let mut ip = std::vec![0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, 63, proto, 0, 0];
        ip.extend_from_slice(&CLIENT);
        ip.extend_from_slice(&dst);
        let c = csum::ipv4_header(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut msg = std::vec![3, 4, 0, 0, 0, 0, 0x05, 0xdc];
        msg.extend_from_slice(&ip);
        msg.extend_from_slice(&l4);
        let c = csum::ipv4_header(&msg);
        msg[2..4].copy_from_slice(&c.to_be_bytes());
        msg
    }

    fn translate(msg: &mut [u8], l4: L4Csum) {
        let (q, l) = (8, 28);
        let csum_off = if msg[q + 9] == 17 { l + 6 } else { l + 16 };
        let at2 = |o: usize| [msg[o], msg[o + 1]];
        let quote = Quote {
            daddr: [msg[q + 16], msg[q + 17], msg[q + 18], msg[q + 19]],
            ip_csum: at2(q + 10),
            dport: at2(l + 2),
            l4_csum: if l4 == L4Csum::Absent { [0; 2] } else { at2(csum_off) },
        };
        let (new, icmp) = reverse_quote(quote, l4, VIP, 80u16.to_be_bytes(), at2(2));
        msg[2..4].copy_from_slice(&icmp);
        msg[q + 16..q + 20].copy_from_slice(&new.daddr);
        msg[q + 10..q + 12].copy_from_slice(&new.ip_csum);
        msg[l + 2..l + 4].copy_from_slice(&new.dport);
        if l4 != L4Csum::Absent {
            msg[csum_off..csum_off + 2].copy_from_slice(&new.l4_csum);
        }
    }

    #[test]
    fn udp_quote_becomes_the_original_packet_with_valid_checksums() {
        let mut msg = error(17, BACKEND, 5353, 8);
        translate(&mut msg, L4Csum::Udp);
        let mut want = error(17, VIP, 80, 8);
        // The ICMP checksum is the only field that may differ in representation (±0).
        assert_eq!(csum::ipv4_header(&msg), 0, "ICMP checksum verifies");
        assert_eq!(csum::ipv4_header(&msg[8..28]), 0, "quoted IPv4 checksum verifies");
        want[2..4].copy_from_slice(&msg[2..4]);
        assert_eq!(msg, want, "the quote of the packet the client sent");
    }

    #[test]
    fn tcp_quote_with_and_without_its_checksum() {
        let mut full = error(6, BACKEND, 8080, 20);
        translate(&mut full, L4Csum::Tcp);
        assert_eq!(csum::ipv4_header(&full), 0);
        assert_eq!(csum::l4_ipv4(CLIENT, VIP, 6, &full[28..]), 0, "quoted TCP checksum");
        let mut want = error(6, VIP, 80, 20);
        want[2..4].copy_from_slice(&full[2..4]);
        assert_eq!(full, want);

        let mut short = error(6, BACKEND, 8080, 8);
        translate(&mut short, L4Csum::Absent);
        assert_eq!(csum::ipv4_header(&short), 0);
        assert_eq!(csum::ipv4_header(&short[8..28]), 0);
        assert_eq!(&short[28 + 2..28 + 4], &80u16.to_be_bytes());
    }

    #[test]
    fn a_udp_checksum_never_becomes_zero_and_replace4_matches_recompute() {
        // Old checksum chosen so that the updated sum folds to 0.
        let q = Quote { daddr: BACKEND, ip_csum: [0; 2], dport: [0, 1], l4_csum: [0; 2] };
        for c in 0..=u16::MAX {
            let (new, _) = reverse_quote(
                Quote { l4_csum: c.to_be_bytes(), ..q },
                L4Csum::Udp,
                VIP,
                [0, 1],
                [0; 2],
            );
            assert_ne!(new.l4_csum, [0, 0], "from {c:#x}");
        }
        let mut h = [0x45, 0, 0, 20, 0, 0, 0, 0, 64, 1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        let c = csum::ipv4_header(&h).to_be_bytes();
        let c2 = replace4(c, [5, 6, 7, 8], VIP);
        h[16..20].copy_from_slice(&VIP);
        h[10..12].copy_from_slice(&c2);
        assert_eq!(csum::ipv4_header(&h), 0);
        assert!(is_translated_error(3) && is_translated_error(11) && !is_translated_error(0));
    }
}
