//! Map types of the socket-level load balancer: the cgroup `sock_addr` programs that
//! translate the `connect(2)`/`sendmsg(2)` of host-network processes to a backend, and the
//! `recvmsg(2)`/`getpeername(2)` answers back to the VIP (`dataplane-ebpf/src/sock.rs`).
//!
//! Layout rules as in [`crate::maps`]: `#[repr(C)]`, explicit zeroed padding, a size
//! assertion per type, network byte order as `[u8; N]`.

/// Capacity of `SOCK_REVNAT_V4`: (socket, backend) pairs remembered. An LRU: a closed
/// socket's entries are never deleted, they age out (socket cookies are never reused while
/// the machine runs, so a stale entry can never match another socket).
pub const MAX_SOCK_REVNAT: u32 = 65_536;

/// The only element of `SOCK_CONFIG` (an array of one).
///
/// The programs are attached to a cgroup, and a cgroup spans network namespaces: they
/// translate only sockets of the network namespace whose cookie is `netns_cookie` (the
/// agent's own, the host's on a real node). 0 turns translation off.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockConfig {
    /// `SO_NETNS_COOKIE` of the agent's network namespace; 0: off.
    pub netns_cookie: u64,
    /// Reserved for `SOCK_F_*` bits; written as 0.
    pub flags: u32,
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<SockConfig>() == 16);

/// Key of `SOCK_REVNAT_V4`: a socket (`bpf_get_socket_cookie`) and the backend its
/// `connect`/`sendmsg` was translated to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockRevNatKeyV4 {
    pub cookie: u64,
    /// Backend IP, network order.
    pub addr: [u8; 4],
    /// Backend port, network order.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<SockRevNatKeyV4>() == 16);

/// Value of `SOCK_REVNAT_V4`: the frontend the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockRevNatValueV4 {
    /// ClusterIP, network order.
    pub vip: [u8; 4],
    /// Service port, network order.
    pub vport: [u8; 2],
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<SockRevNatValueV4>() == 8);

/// `bpf_sock_addr.user_ip4` as network-order bytes. The kernel keeps the address in
/// network order in memory, so the native-endian bytes of the `u32` are the address.
#[inline(always)]
pub const fn user_ip4_addr(user_ip4: u32) -> [u8; 4] {
    user_ip4.to_ne_bytes()
}

/// The `user_ip4` value that holds `addr`.
#[inline(always)]
pub const fn user_ip4_of(addr: [u8; 4]) -> u32 {
    u32::from_ne_bytes(addr)
}

/// `bpf_sock_addr.user_port` as network-order bytes: a network-order 16-bit port in the
/// low half of a native `u32` (`bpf_htons(port)` in C), so the first two bytes in memory
/// on a little-endian machine (BPF here is `bpfel`).
#[inline(always)]
pub const fn user_port_bytes(user_port: u32) -> [u8; 2] {
    (user_port as u16).to_ne_bytes()
}

/// The `user_port` value that holds `port` (network-order bytes).
#[inline(always)]
pub const fn user_port_of(port: [u8; 2]) -> u32 {
    u16::from_ne_bytes(port) as u32
}

/// Names of the socket LB's maps and programs in the object file.
pub mod names {
    /// One element: [`super::SockConfig`].
    pub const SOCK_CONFIG: &str = "SOCK_CONFIG";
    /// LRU of `(socket cookie, backend)` -> the VIP the socket asked for.
    pub const SOCK_REVNAT_V4: &str = "SOCK_REVNAT_V4";
    /// `cgroup/connect4`: TCP and connected UDP to a ClusterIP go to a backend.
    pub const PROG_SOCK_CONNECT4: &str = "sock_connect4";
    /// `cgroup/sendmsg4`: unconnected UDP to a ClusterIP goes to a backend.
    pub const PROG_SOCK_SENDMSG4: &str = "sock_sendmsg4";
    /// `cgroup/recvmsg4`: a UDP answer from a backend is reported as from the VIP.
    pub const PROG_SOCK_RECVMSG4: &str = "sock_recvmsg4";
    /// `cgroup/getpeername4`: the peer of a translated socket is the VIP.
    pub const PROG_SOCK_GETPEERNAME4: &str = "sock_getpeername4";
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: `repr(C)`, integers and byte arrays only, explicit padding (size-asserted).
    unsafe impl aya::Pod for SockConfig {}
    unsafe impl aya::Pod for SockRevNatKeyV4 {}
    unsafe impl aya::Pod for SockRevNatValueV4 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_fields_hold_network_order() {
        // What the kernel stores for 10.96.0.10:53 on a little-endian machine.
        let user_ip4 = u32::from_be_bytes([10, 96, 0, 10]).to_be();
        let user_port = u32::from(53u16.to_be());
        assert_eq!(user_ip4_addr(user_ip4), [10, 96, 0, 10]);
        assert_eq!(user_port_bytes(user_port), 53u16.to_be_bytes());
        assert_eq!(user_ip4_of([10, 96, 0, 10]), user_ip4);
        assert_eq!(user_port_of(53u16.to_be_bytes()), user_port);
        assert_eq!(user_port_of(user_port_bytes(0xabcd)), 0xabcd);
    }
}
