//! Every name and address of a lab derives from its slot N, so labs running side by side
//! (say, two test processes) never collide on netns names, interface names or IP ranges.
//!
//! | what                 | value                        |
//! |----------------------|------------------------------|
//! | node netns           | `np{N}-node`                 |
//! | pod netns            | `np{N}-{namespace}-{name}`   |
//! | pod CIDR             | `10.244.N.0/24`, pods from `.2` |
//! | node IP (InternalIP) | `10.244.N.1`                 |
//! | service CIDR         | `10.96.N.0/24`, ClusterIPs from `.10` |
//! | pod gateway          | `169.254.1.1` (every pod; answered by the node) |
//! | host-side veth       | `lxc` + 8 hex digits of a hash of `namespace/name` |
//! | agent's pins (bpffs) | `/sys/fs/bpf/nodeplane-lab{N}` |
//!
//! A lab of several nodes on an underlay ([`crate::topology`]) keeps the slot's pod and
//! service ranges and adds, for node `i` (0 to 3) and the slot:
//!
//! | what                 | value                        |
//! |----------------------|------------------------------|
//! | node name            | `lab-node` (i = 0, where pods without `spec.nodeName` go), `lab-node{i}` |
//! | node netns           | `np{N}-node` (i = 0), `np{N}-node{i}` |
//! | node IP (InternalIP) | `192.168.N.(10+i)/24` on the node's `eth0` |
//! | node's pod CIDR      | `10.244.N.(64·i)/26`, pods from `.(64·i+2)` to `.(64·i+62)` |
//! | underlay / router    | netns `np{N}-underlay`: bridge `br0` `192.168.N.1/24`, every node's default gateway |
//! | external client      | netns `np{N}-external`, `192.168.N.200/24`, no other route |
//! | internet             | netns `np{N}-internet`, `198.18.N.2/24`, default via the router's `198.18.N.1` |
//! | agent's pins (bpffs) | `/sys/fs/bpf/nodeplane-lab{N}/{node name}` |
//! | agent's state, log   | `<state dir>/agent-{node name}/`, `agent-{node name}.log` |
use std::net::Ipv4Addr;

/// Prefix of the node-side end of every pod's veth pair; the agent attaches by it.
pub const HOST_VETH_PREFIX: &str = "lxc";

/// Name of the lab's single node.
pub const NODE_NAME: &str = "lab-node";

/// The next hop every pod routes through. It is a link-local address held by the node's
/// `lo`, so the node answers ARP for it on every veth (as Calico does with 169.254.1.1).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// Slots are the third octet of the lab's ranges: 1..=250 keeps clear of .0 and .255.
pub const MIN_SLOT: u8 = 1;
pub const MAX_SLOT: u8 = 250;

/// First host number handed to pods (`.1` is the node).
pub const FIRST_POD_HOST: u8 = 2;
/// First host number handed to ClusterIPs; below it is room for hand-picked addresses.
pub const FIRST_SERVICE_HOST: u8 = 10;
/// Last usable host number of a /24.
pub const LAST_HOST: u8 = 254;

/// The agent's `--bpffs-dir` in slot `slot`: its own, so labs side by side never adopt each
/// other's maps, and a dead lab's pins are found by slot.
pub fn bpffs_dir(slot: u8) -> std::path::PathBuf {
    format!("/sys/fs/bpf/nodeplane-lab{slot}").into()
}

/// Start of every netns name that belongs to slot `slot`.
pub fn netns_prefix(slot: u8) -> String {
    format!("np{slot}-")
}

pub fn node_netns(slot: u8) -> String {
    format!("np{slot}-node")
}

/// A person can `ip netns exec np3-default-web-1 bash` knowing only the pod.
pub fn pod_netns(slot: u8, namespace: &str, name: &str) -> String {
    format!("np{slot}-{namespace}-{name}")
}

/// The slot a lab netns name belongs to, if it is one (`np{N}-...`).
pub fn slot_of_netns(name: &str) -> Option<u8> {
    let rest = name.strip_prefix("np")?;
    let (digits, _) = rest.split_once('-')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Host-side veth name: `lxc` + 8 hex digits, 11 characters (IFNAMSIZ allows 15).
///
/// FNV-1a is used because it is tiny and, unlike `std`'s `DefaultHasher`, its output is
/// specified, so the name stays the same across Rust versions and runs.
pub fn host_veth(namespace: &str, name: &str) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in namespace.bytes().chain(*b"/").chain(name.bytes()) {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("{HOST_VETH_PREFIX}{hash:08x}")
}

pub fn pod_cidr(slot: u8) -> String {
    format!("10.244.{slot}.0/24")
}

pub fn service_cidr(slot: u8) -> String {
    format!("10.96.{slot}.0/24")
}

pub fn node_ip(slot: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, slot, 1)
}

pub fn pod_ip(slot: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, slot, host)
}

pub fn service_ip(slot: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, slot, host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_is_stable_short_and_distinct() {
        let a = host_veth("default", "web-1");
        assert_eq!(a, host_veth("default", "web-1"));
        assert_eq!(a.len(), 11);
        assert!(a.starts_with(HOST_VETH_PREFIX));
        assert_ne!(a, host_veth("default", "web-2"));
        // The separator is hashed too, so moving a dash between namespace and name matters.
        assert_ne!(host_veth("a-b", "c"), host_veth("a", "b-c"));
        // FNV-1a of "default/web-1", pinned: renaming interfaces must be a visible decision.
        assert_eq!(a, "lxc86bbd2e9");
    }

    #[test]
    fn slot_of_netns_parses_only_lab_names() {
        assert_eq!(slot_of_netns(&node_netns(3)), Some(3));
        assert_eq!(slot_of_netns(&pod_netns(12, "demo", "web-0")), Some(12));
        assert_eq!(slot_of_netns("np-node"), None);
        assert_eq!(slot_of_netns("npx1-node"), None);
        assert_eq!(slot_of_netns("other"), None);
        // np1- is not a prefix of np12-: prefixes end at the dash.
        assert!(!pod_netns(12, "a", "b").starts_with(&netns_prefix(1)));
    }
}
