//! Conntrack lifetimes: a deliberately small TCP state machine, run per packet by the
//! datapath and unit-tested here.
//!
//! | state       | entered on                         | lifetime |
//! |-------------|------------------------------------|----------|
//! | `SynSent`   | first packet of a flow (SYN)       | 60 s     |
//! | `Established` | any later packet without FIN/RST | 6 h      |
//! | `Closing`   | FIN in either direction            | 10 s     |
//! | `Closed`    | RST in either direction            | 10 s     |
//! | UDP / other | any packet                         | 60 s     |
//!
//! A SYN (without ACK) on a closing or closed flow's tuple is a new connection reusing the
//! client port: the entry starts over at `SynSent`, as netfilter reopens TIME_WAIT entries.
//!
//! Established TCP is long like Cilium's (kube-proxy sets nf_conntrack's 24 h); closing and
//! reset flows are short so a port can be reused. Each packet pushes the deadline forward.

pub const NSEC_PER_SEC: u64 = 1_000_000_000;
pub const TCP_SYN_TIMEOUT_NS: u64 = 60 * NSEC_PER_SEC;
pub const TCP_ESTABLISHED_TIMEOUT_NS: u64 = 6 * 3600 * NSEC_PER_SEC;
pub const TCP_CLOSE_TIMEOUT_NS: u64 = 10 * NSEC_PER_SEC;
pub const UDP_TIMEOUT_NS: u64 = 60 * NSEC_PER_SEC;

pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;

/// TCP state stored in `CtValueV4::state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum TcpState {
    /// Not TCP.
    None = 0,
    SynSent = 1,
    Established = 2,
    Closing = 3,
    Closed = 4,
}

impl TcpState {
    pub const fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::SynSent,
            2 => Self::Established,
            3 => Self::Closing,
            4 => Self::Closed,
            _ => Self::None,
        }
    }
}

/// State of a TCP flow after a packet with `flags`, given the state before it.
/// `prev == None` means the packet opens the flow.
#[inline(always)]
pub const fn tcp_next(prev: TcpState, flags: u8) -> TcpState {
    if flags & TCP_FLAG_RST != 0 {
        return TcpState::Closed;
    }
    if flags & TCP_FLAG_FIN != 0 {
        return TcpState::Closing;
    }
    match prev {
        TcpState::None => {
            if flags & TCP_FLAG_SYN != 0 && flags & TCP_FLAG_ACK == 0 {
                TcpState::SynSent
            } else {
                // A mid-stream first packet (e.g. the flow predates us): treat it as live.
                TcpState::Established
            }
        }
        TcpState::SynSent => {
            if flags & TCP_FLAG_ACK != 0 {
                TcpState::Established
            } else {
                TcpState::SynSent
            }
        }
        // A SYN on a finished flow's tuple is a new connection reusing the client port
        // (as netfilter reopens a TIME_WAIT entry): it starts over.
        TcpState::Closing | TcpState::Closed
            if flags & TCP_FLAG_SYN != 0 && flags & TCP_FLAG_ACK == 0 =>
        {
            TcpState::SynSent
        }
        // Otherwise, once closing, stay closing until the entry expires: a late ACK must not
        // resurrect a 6-hour lifetime.
        TcpState::Closing | TcpState::Closed => prev,
        TcpState::Established => TcpState::Established,
    }
}

/// How long an entry in `state` lives after its last packet.
#[inline(always)]
pub const fn lifetime_ns(proto: u8, state: TcpState) -> u64 {
    if proto != crate::maps::IPPROTO_TCP {
        return UDP_TIMEOUT_NS;
    }
    match state {
        TcpState::SynSent | TcpState::None => TCP_SYN_TIMEOUT_NS,
        TcpState::Established => TCP_ESTABLISHED_TIMEOUT_NS,
        TcpState::Closing | TcpState::Closed => TCP_CLOSE_TIMEOUT_NS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{IPPROTO_TCP, IPPROTO_UDP};

    #[test]
    fn handshake_data_and_close() {
        let s = tcp_next(TcpState::None, TCP_FLAG_SYN);
        assert_eq!(s, TcpState::SynSent);
        assert_eq!(lifetime_ns(IPPROTO_TCP, s), TCP_SYN_TIMEOUT_NS);
        let s = tcp_next(s, TCP_FLAG_SYN | TCP_FLAG_ACK);
        assert_eq!(s, TcpState::Established);
        let s = tcp_next(s, TCP_FLAG_ACK);
        assert_eq!(s, TcpState::Established);
        assert_eq!(lifetime_ns(IPPROTO_TCP, s), TCP_ESTABLISHED_TIMEOUT_NS);
        let s = tcp_next(s, TCP_FLAG_FIN | TCP_FLAG_ACK);
        assert_eq!(s, TcpState::Closing);
        // The last ACK of the close must not bring back the long lifetime.
        let s = tcp_next(s, TCP_FLAG_ACK);
        assert_eq!(s, TcpState::Closing);
        assert_eq!(lifetime_ns(IPPROTO_TCP, s), TCP_CLOSE_TIMEOUT_NS);
    }

    #[test]
    fn a_syn_on_a_finished_flow_starts_a_new_connection() {
        for prev in [TcpState::Closing, TcpState::Closed] {
            assert_eq!(tcp_next(prev, TCP_FLAG_SYN), TcpState::SynSent, "{prev:?}");
            assert_eq!(tcp_next(prev, TCP_FLAG_SYN | TCP_FLAG_ACK), prev, "{prev:?}");
            assert_eq!(tcp_next(prev, TCP_FLAG_ACK), prev, "{prev:?}");
        }
        assert_eq!(tcp_next(TcpState::Established, TCP_FLAG_SYN), TcpState::Established);
    }

    #[test]
    fn rst_closes_from_any_state() {
        for prev in [TcpState::None, TcpState::SynSent, TcpState::Established, TcpState::Closing] {
            assert_eq!(tcp_next(prev, TCP_FLAG_RST | TCP_FLAG_ACK), TcpState::Closed);
        }
    }

    #[test]
    fn mid_stream_pickup_is_established_and_udp_is_flat() {
        assert_eq!(tcp_next(TcpState::None, TCP_FLAG_ACK), TcpState::Established);
        assert_eq!(lifetime_ns(IPPROTO_UDP, TcpState::None), UDP_TIMEOUT_NS);
        assert_eq!(TcpState::from_u8(2), TcpState::Established);
        assert_eq!(TcpState::from_u8(99), TcpState::None);
    }
}
