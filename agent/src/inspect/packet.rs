//! Crafted Ethernet/IPv4 frames for `BPF_PROG_TEST_RUN`: TCP, UDP, SCTP, ICMP echo
//! requests and other protocols, with correct checksums ([`Frame`]), and the 4-tuple of a
//! TCP/UDP frame read back after a program rewrote it ([`Tuple::parse`]).
//!
//! Shared by `inspect trace` and the privileged tests (`nodeplane-tests` re-exports it and
//! adds a checksum-verifying view), so the trace sends exactly the frames the tests do.
use std::net::{Ipv4Addr, SocketAddrV4};

use nodeplane_common::{
    csum,
    maps::{IPPROTO_TCP, IPPROTO_UDP},
    policy::{IPPROTO_ICMP, IPPROTO_SCTP},
};

pub const ETH_HLEN: usize = 14;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_FIN: u8 = 0x01;
/// ICMP type of an echo request.
pub const ICMP_ECHO_REQUEST: u8 = 8;

/// A frame to build. Defaults: TCP SYN, no IP options, not fragmented, 4 payload bytes.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    pub proto: u8,
    pub tcp_flags: u8,
    /// IPv4 option bytes (padded to a multiple of 4 with NOPs).
    pub ip_options: Vec<u8>,
    /// The IPv4 `frag_off` field (flags + offset), host order.
    pub frag_off: u16,
    pub payload: Vec<u8>,
    /// For UDP: send checksum 0 ("no checksum").
    pub udp_zero_csum: bool,
}

impl Frame {
    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Self {
        Self {
            src,
            dst,
            proto: IPPROTO_TCP,
            tcp_flags: flags,
            ip_options: Vec::new(),
            frag_off: 0,
            payload: b"ping".to_vec(),
            udp_zero_csum: false,
        }
    }

    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Self {
        Self { proto: IPPROTO_UDP, tcp_flags: 0, ..Self::tcp(src, dst, 0) }
    }

    /// An IPv4 packet of another protocol (e.g. ICMP = 1) with `payload` as its body.
    pub fn other(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Self {
        Self { proto, ..Self::tcp((src, 0), (dst, 0), 0) }
    }

    /// An SCTP packet: the 12-byte common header (ports, verification tag `0xdeadbeef`,
    /// checksum 0) and no chunks. The datapath reads only the ports; BPF_PROG_TEST_RUN
    /// needs no valid CRC32c.
    pub fn sctp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Self {
        let mut header = Vec::with_capacity(12);
        header.extend_from_slice(&src.1.to_be_bytes());
        header.extend_from_slice(&dst.1.to_be_bytes());
        header.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]);
        Self { payload: header, ..Self::other(src.0, dst.0, IPPROTO_SCTP) }
    }

    /// An ICMP echo request (type 8, code 0) with identifier `id`, sequence number `seq`
    /// and a correct ICMP checksum.
    pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16) -> Self {
        let mut msg = vec![ICMP_ECHO_REQUEST, 0, 0, 0];
        msg.extend_from_slice(&id.to_be_bytes());
        msg.extend_from_slice(&seq.to_be_bytes());
        msg.extend_from_slice(b"ping");
        // The Internet checksum of the message alone (no pseudo-header), as for IPv4 headers.
        let c = csum::ipv4_header(&msg);
        msg[2..4].copy_from_slice(&c.to_be_bytes());
        Self { payload: msg, ..Self::other(src, dst, IPPROTO_ICMP) }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut l4 = match self.proto {
            IPPROTO_TCP => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&self.src.1.to_be_bytes());
                h[2..4].copy_from_slice(&self.dst.1.to_be_bytes());
                h[4..8].copy_from_slice(&1000u32.to_be_bytes());
                h[12] = 5 << 4;
                h[13] = self.tcp_flags;
                h[14..16].copy_from_slice(&65535u16.to_be_bytes());
                h
            }
            IPPROTO_UDP => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&self.src.1.to_be_bytes());
                h[2..4].copy_from_slice(&self.dst.1.to_be_bytes());
                let len = (8 + self.payload.len()) as u16;
                h[4..6].copy_from_slice(&len.to_be_bytes());
                h
            }
            _ => Vec::new(),
        };
        l4.extend_from_slice(&self.payload);
        let (s, d) = (self.src.0.octets(), self.dst.0.octets());
        match self.proto {
            IPPROTO_TCP => {
                let c = csum::l4_ipv4(s, d, IPPROTO_TCP, &l4);
                l4[16..18].copy_from_slice(&c.to_be_bytes());
            }
            IPPROTO_UDP if !self.udp_zero_csum => {
                let c = csum::l4_ipv4(s, d, IPPROTO_UDP, &l4);
                l4[6..8].copy_from_slice(&c.to_be_bytes());
            }
            _ => {}
        }
        let mut opts = self.ip_options.clone();
        while !opts.len().is_multiple_of(4) {
            opts.push(1); // NOP
        }
        let ihl = 5 + opts.len() / 4;
        let mut ip = vec![0u8; 20];
        ip[0] = 0x40 | ihl as u8;
        ip[2..4].copy_from_slice(&((ihl * 4 + l4.len()) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        ip[6..8].copy_from_slice(&self.frag_off.to_be_bytes());
        ip[8] = 64;
        ip[9] = self.proto;
        ip[12..16].copy_from_slice(&s);
        ip[16..20].copy_from_slice(&d);
        ip.extend_from_slice(&opts);
        let c = csum::ipv4_header(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());

        let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00];
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&l4);
        frame
    }
}

/// Addresses, ports and protocol of a TCP or UDP over IPv4 frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: u8,
}

impl Tuple {
    /// Reads an Ethernet/IPv4/TCP-or-UDP frame (at its real IHL); `None` if it is anything
    /// else or cut short.
    pub fn parse(frame: &[u8]) -> Option<Self> {
        let ip = frame.get(ETH_HLEN..)?;
        if frame.get(12..14)? != [0x08, 0x00] || ip.first()? >> 4 != 4 {
            return None;
        }
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let proto = *ip.get(9)?;
        if ihl < 20 || !(proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
            return None;
        }
        let l4 = ip.get(ihl..ihl + 4)?;
        let addr = |o: usize| Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]);
        let port = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
        Some(Self {
            src: SocketAddrV4::new(addr(12), port(0)),
            dst: SocketAddrV4::new(addr(16), port(2)),
            proto,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_parse_back() {
        let src = (Ipv4Addr::new(10, 0, 0, 1), 40000);
        let dst = (Ipv4Addr::new(10, 96, 0, 10), 80);
        let sa = |(ip, port): (Ipv4Addr, u16)| SocketAddrV4::new(ip, port);
        let t = Tuple::parse(&Frame::tcp(src, dst, TCP_SYN).build()).expect("a TCP frame");
        assert_eq!((t.src, t.dst, t.proto), (sa(src), sa(dst), IPPROTO_TCP));
        let udp = Frame { ip_options: vec![7, 7, 7], ..Frame::udp(src, dst) };
        let t = Tuple::parse(&udp.build()).expect("a UDP frame with options");
        assert_eq!((t.src, t.dst, t.proto), (sa(src), sa(dst), IPPROTO_UDP));
        let icmp = Frame::icmp_echo(src.0, dst.0, 1, 1).build();
        assert_eq!(Tuple::parse(&icmp), None);
        let frame = Frame::tcp(src, dst, TCP_SYN).build();
        assert_eq!(Tuple::parse(&frame[..30]), None, "cut short");
    }
}
