//! The answers `from_pod` sends back to a pod that talks to a Service with no usable
//! endpoints, as kube-proxy's `REJECT` does, so the client fails at once instead of timing
//! out: a TCP RST|ACK for TCP ([`tcp_rst`]), an ICMP port unreachable for UDP
//! ([`icmp_port_unreachable`]). Both are whole frames built from a few fields of the
//! packet they answer; the datapath writes them over that packet (`dataplane-ebpf/src/reject.rs`).
//!
//! Pure and bounded (fixed-size arrays, loops over constants), so the same code runs in the
//! kernel and in host unit tests.

/// Ethernet header length.
const ETH: usize = 14;
/// IPv4 header without options: the answers never carry options.
const IP: usize = 20;

/// Length of the RST frame: Ethernet, IPv4 (no options), TCP (no options), no data.
pub const TCP_RST_LEN: usize = ETH + IP + 20;
/// What an ICMP error quotes of the packet it answers: its IPv4 header (no options: the
/// datapath answers only those) and the first 8 bytes of its payload (RFC 792), here the
/// whole UDP header.
pub const ICMP_QUOTE_LEN: usize = IP + 8;
/// Length of the ICMP frame: Ethernet, IPv4, ICMP header, the quote.
pub const ICMP_UNREACH_LEN: usize = ETH + IP + 8 + ICMP_QUOTE_LEN;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
/// TTL of the answers (Linux's default).
const TTL: u8 = 64;
/// IPv4 "don't fragment", as Linux sets on its RSTs.
const IP_DF: [u8; 2] = [0x40, 0x00];
/// TOS of ICMP errors: internetwork control (Linux's `icmp_send`).
const TOS_ICMP: u8 = 0xc0;

/// The fields of a TCP segment its reset depends on (host order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// Bytes of data after the TCP header.
    pub payload_len: u32,
}

/// Sequence and acknowledgment numbers of the RST|ACK answering `seg` (RFC 793, "Reset
/// Generation"): the sequence number is the segment's ACK field if it has one, else 0; the
/// acknowledgment covers everything the segment occupied (data, SYN, FIN), so a client in
/// SYN-SENT accepts it (Linux ignores a RST without an acceptable ACK there).
#[inline(always)]
pub const fn rst_numbers(seg: &Segment) -> (u32, u32) {
    let seq = if seg.flags & TCP_ACK != 0 { seg.ack } else { 0 };
    let ack = seg
        .seq
        .wrapping_add(seg.payload_len)
        .wrapping_add((seg.flags & TCP_SYN != 0) as u32)
        .wrapping_add((seg.flags & TCP_FIN != 0) as u32);
    (seq, ack)
}

/// A RST must never be answered (RFC 793): two stacks would reset each other forever.
#[inline(always)]
pub const fn answers_tcp(flags: u8) -> bool {
    flags & TCP_RST == 0
}

/// Ones'-complement sum of `N` bytes at `data[off..]` added to `sum`, unfolded. `N` is
/// even and constant, so the loop is bounded (and unrolled) in the kernel.
#[inline(always)]
fn sum<const L: usize>(mut sum: u32, data: &[u8; L], off: usize, n: usize) -> u32 {
    let mut i = 0;
    while i + 1 < n && off + i + 1 < L {
        sum += u32::from(u16::from_be_bytes([data[off + i], data[off + i + 1]]));
        i += 2;
    }
    sum
}

#[inline(always)]
const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Writes Ethernet (addresses swapped) and an IPv4 header without options from `src` to
/// `dst` with its checksum into `f`.
#[inline(always)]
fn eth_ip<const L: usize>(
    f: &mut [u8; L],
    eth: &[u8; ETH],
    src: [u8; 4],
    dst: [u8; 4],
    tos: u8,
    proto: u8,
    frag: [u8; 2],
) {
    f[0..6].copy_from_slice(&eth[6..12]);
    f[6..12].copy_from_slice(&eth[0..6]);
    f[12] = eth[12];
    f[13] = eth[13];
    f[ETH] = 0x45;
    f[ETH + 1] = tos;
    f[ETH + 2..ETH + 4].copy_from_slice(&((L - ETH) as u16).to_be_bytes());
    // Identification 0: the answer is never fragmented (DF for RSTs, ICMP is small).
    f[ETH + 6..ETH + 8].copy_from_slice(&frag);
    f[ETH + 8] = TTL;
    f[ETH + 9] = proto;
    f[ETH + 12..ETH + 16].copy_from_slice(&src);
    f[ETH + 16..ETH + 20].copy_from_slice(&dst);
    let c = fold(sum(0, f, ETH, IP));
    f[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
}

/// The RST|ACK frame answering a TCP segment `client:cport -> vip:vport` that arrived in
/// the Ethernet header `eth`: from `vip:vport` to `client:cport`, MACs swapped, both
/// checksums complete. Addresses and ports in network order.
#[inline(always)]
pub fn tcp_rst(
    eth: &[u8; ETH],
    client: [u8; 4],
    vip: [u8; 4],
    cport: [u8; 2],
    vport: [u8; 2],
    seg: &Segment,
) -> [u8; TCP_RST_LEN] {
    let mut f = [0u8; TCP_RST_LEN];
    eth_ip(&mut f, eth, vip, client, 0, IPPROTO_TCP, IP_DF);
    const T: usize = ETH + IP;
    let (seq, ack) = rst_numbers(seg);
    f[T..T + 2].copy_from_slice(&vport);
    f[T + 2..T + 4].copy_from_slice(&cport);
    f[T + 4..T + 8].copy_from_slice(&seq.to_be_bytes());
    f[T + 8..T + 12].copy_from_slice(&ack.to_be_bytes());
    f[T + 12] = 5 << 4;
    f[T + 13] = TCP_RST | TCP_ACK;
    // Window 0, urgent pointer 0 (as Linux's resets).
    let mut s = sum(0, &f, ETH + 12, 8); // pseudo-header: both addresses
    s += u32::from(IPPROTO_TCP) + 20; // protocol, TCP length
    let c = fold(sum(s, &f, T, 20));
    f[T + 16..T + 18].copy_from_slice(&c.to_be_bytes());
    f
}

/// The ICMP destination unreachable (port unreachable) frame answering the UDP datagram
/// whose IPv4 header and UDP header are `quote` and that arrived in the Ethernet header
/// `eth`: from the datagram's destination (the VIP) to its source, MACs swapped, quoting
/// the datagram's header as received, both checksums complete.
#[inline(always)]
pub fn icmp_port_unreachable(
    eth: &[u8; ETH],
    quote: &[u8; ICMP_QUOTE_LEN],
) -> [u8; ICMP_UNREACH_LEN] {
    let mut f = [0u8; ICMP_UNREACH_LEN];
    let client = [quote[12], quote[13], quote[14], quote[15]];
    let vip = [quote[16], quote[17], quote[18], quote[19]];
    eth_ip(&mut f, eth, vip, client, TOS_ICMP, IPPROTO_ICMP, [0, 0]);
    const I: usize = ETH + IP;
    f[I] = ICMP_DEST_UNREACH;
    f[I + 1] = ICMP_PORT_UNREACH;
    // Bytes 4..8 are unused for code 3 and must be 0.
    f[I + 8..].copy_from_slice(quote);
    // The ICMP checksum covers the message alone (no pseudo-header).
    let c = fold(sum(0, &f, I, 8 + ICMP_QUOTE_LEN));
    f[I + 2..I + 4].copy_from_slice(&c.to_be_bytes());
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csum;

    const ETH_IN: [u8; ETH] = [2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    const CLIENT: [u8; 4] = [10, 244, 0, 2];
    const VIP: [u8; 4] = [10, 96, 0, 10];

    #[test]
    fn rst_numbers_follow_rfc_793() {
        let syn = Segment { seq: 1000, ack: 0, flags: TCP_SYN, payload_len: 0 };
        assert_eq!(rst_numbers(&syn), (0, 1001));
        let syn_data = Segment { payload_len: 4, ..syn };
        assert_eq!(rst_numbers(&syn_data), (0, 1005));
        let ack = Segment { seq: 5, ack: 77, flags: TCP_ACK, payload_len: 10 };
        assert_eq!(rst_numbers(&ack), (77, 15));
        let fin = Segment { seq: u32::MAX, ack: 9, flags: TCP_FIN | TCP_ACK, payload_len: 0 };
        assert_eq!(rst_numbers(&fin), (9, 0), "wraps around");
        assert!(answers_tcp(TCP_SYN) && answers_tcp(TCP_ACK | TCP_FIN));
        assert!(!answers_tcp(TCP_RST) && !answers_tcp(TCP_RST | TCP_ACK));
    }

    #[test]
    fn rst_frame_is_well_formed() {
        let seg = Segment { seq: 1000, ack: 0, flags: TCP_SYN, payload_len: 0 };
        let f = tcp_rst(&ETH_IN, CLIENT, VIP, 40000u16.to_be_bytes(), 80u16.to_be_bytes(), &seg);
        assert_eq!(&f[0..6], &ETH_IN[6..12]);
        assert_eq!(&f[6..12], &ETH_IN[0..6]);
        let ip = &f[ETH..ETH + IP];
        assert_eq!(csum::ipv4_header(ip), 0, "IP checksum");
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 40);
        assert_eq!((&ip[12..16], &ip[16..20]), (&VIP[..], &CLIENT[..]));
        let tcp = &f[ETH + IP..];
        assert_eq!(csum::l4_ipv4(VIP, CLIENT, IPPROTO_TCP, tcp), 0, "TCP checksum");
        assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), 80);
        assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 40000);
        assert_eq!(tcp[13], TCP_RST | TCP_ACK);
        assert_eq!(u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]), 1001);
    }

    #[test]
    fn icmp_frame_quotes_the_datagram() {
        let mut quote = [0u8; ICMP_QUOTE_LEN];
        quote[0] = 0x45;
        quote[2..4].copy_from_slice(&33u16.to_be_bytes());
        quote[8] = 64;
        quote[9] = 17;
        quote[12..16].copy_from_slice(&CLIENT);
        quote[16..20].copy_from_slice(&VIP);
        let c = csum::ipv4_header(&quote[..IP]);
        quote[10..12].copy_from_slice(&c.to_be_bytes());
        quote[20..28].copy_from_slice(&[0x9c, 0x40, 0, 53, 0, 13, 0xab, 0xcd]);
        let f = icmp_port_unreachable(&ETH_IN, &quote);
        let ip = &f[ETH..ETH + IP];
        assert_eq!(csum::ipv4_header(ip), 0, "IP checksum");
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 56);
        assert_eq!((ip[9], &ip[12..16], &ip[16..20]), (IPPROTO_ICMP, &VIP[..], &CLIENT[..]));
        let icmp = &f[ETH + IP..];
        assert_eq!(csum::ipv4_header(icmp), 0, "ICMP checksum");
        assert_eq!((icmp[0], icmp[1], &icmp[4..8]), (3, 3, &[0u8; 4][..]));
        assert_eq!(&icmp[8..], &quote[..]);
    }
}
