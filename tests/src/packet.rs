//! Crafted Ethernet/IPv4/TCP/UDP frames (and SCTP, ICMP echo requests) with correct
//! checksums, and a view that reads a TCP/UDP frame back and verifies its checksums from
//! scratch. The builder lives in the agent (`inspect trace` sends the same frames).
use nodeplane_common::{
    csum,
    maps::{IPPROTO_TCP, IPPROTO_UDP},
};

pub use nodeplane_agent::inspect::packet::{
    ETH_HLEN, Frame, ICMP_ECHO_REQUEST, TCP_ACK, TCP_FIN, TCP_SYN,
};
use std::net::Ipv4Addr;

/// What a TCP/UDP over IPv4 frame says, read back after the program ran.
#[derive(Debug, PartialEq, Eq)]
pub struct View {
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    pub proto: u8,
    /// Raw L4 checksum field.
    pub l4_csum: u16,
    pub ip_options: Vec<u8>,
    pub payload: Vec<u8>,
}

impl View {
    /// Parses `frame` and checks both checksums by recomputing them; panics with context
    /// if either is wrong (a wrong checksum is a test failure, never a skipped check).
    pub fn parse_checked(frame: &[u8]) -> Self {
        let ip = &frame[ETH_HLEN..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        assert_eq!(csum::ipv4_header(&ip[..ihl]), 0, "IPv4 header checksum is wrong: {frame:02x?}");
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        let (s, d) = ([ip[12], ip[13], ip[14], ip[15]], [ip[16], ip[17], ip[18], ip[19]]);
        let proto = ip[9];
        let l4 = &ip[ihl..total];
        let csum_field = match proto {
            IPPROTO_TCP => u16::from_be_bytes([l4[16], l4[17]]),
            IPPROTO_UDP => u16::from_be_bytes([l4[6], l4[7]]),
            other => panic!("View only reads TCP/UDP, got protocol {other}"),
        };
        if !(proto == IPPROTO_UDP && csum_field == 0) {
            assert_eq!(csum::l4_ipv4(s, d, proto, l4), 0, "L4 checksum is wrong: {frame:02x?}");
        }
        let hlen = if proto == IPPROTO_TCP { 20 } else { 8 };
        Self {
            src: (s.into(), u16::from_be_bytes([l4[0], l4[1]])),
            dst: (d.into(), u16::from_be_bytes([l4[2], l4[3]])),
            proto,
            l4_csum: csum_field,
            ip_options: ip[20..ihl].to_vec(),
            payload: l4[hlen..].to_vec(),
        }
    }
}
