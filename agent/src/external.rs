//! What the node's external interfaces need besides the frontends: the NAT configuration
//! (node IP, port range, which pods masquerade), the destinations that are never
//! masqueraded, and every frontend's `loadBalancerSourceRanges`. Computed from the index,
//! the written frontends and the configuration; written by diffing against what the maps
//! hold, so a restarted agent that adopted pinned maps rewrites nothing.
use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CStr,
    net::Ipv4Addr,
};

use aya::maps::lpm_trie::Key;
use nodeplane_common::{
    maps::{ServiceKeyV4, ServiceValue},
    nat::{NAT_CFG_MASQUERADE, NatConfig, SourceRangeV4},
};

use crate::{
    config::ExternalConfig,
    datapath::Maps,
    desired::{Desired, NodeContext},
    index::Index,
    model::Ipv4Cidr,
};

/// Everything this module writes, as it should be.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    pub nat: NatConfig,
    pub no_masq: BTreeSet<Ipv4Cidr>,
    /// `(frontend id, client prefix)`.
    pub source_ranges: BTreeSet<(u32, Ipv4Cidr)>,
}

/// Computes [`Wanted`]. `written` is what `SERVICES_V4` holds (the syncer's view): source
/// ranges are keyed by the frontend ids it assigned.
pub fn wanted(
    config: &ExternalConfig,
    cluster_cidr: Option<Ipv4Cidr>,
    node: &NodeContext,
    index: &Index,
    desired: &Desired,
    written: &BTreeMap<ServiceKeyV4, ServiceValue>,
) -> Wanted {
    let node_ips = node.node_ips(index);
    let own_pod_cidr = node
        .node_name
        .as_deref()
        .and_then(|n| index.node(n))
        .and_then(|n| n.pod_cidrs.first().copied());
    let pods = cluster_cidr.or(own_pod_cidr);
    let mut nat = NatConfig {
        node_ip: node_ips.first().map_or([0; 4], |ip| ip.octets()),
        port_min: config.port_range.0,
        port_max: config.port_range.1,
        ..NatConfig::default()
    };
    if let Some(pods) = pods {
        nat.pods_addr = pods.addr().octets();
        nat.pods_len = pods.prefix_len();
        if config.masquerade {
            nat.flags |= NAT_CFG_MASQUERADE;
        }
    }
    let mut no_masq: BTreeSet<Ipv4Cidr> = config.non_masquerade_cidrs.iter().copied().collect();
    no_masq.extend(cluster_cidr);
    no_masq.extend(index.nodes().flat_map(|n| n.pod_cidrs.iter().copied()));
    // Pod to node traffic stays inside the cluster too (as with Cilium): every node address.
    no_masq.extend(index.nodes().flat_map(|n| &n.addresses).filter_map(|a| match a.addr {
        std::net::IpAddr::V4(v4) => Ipv4Cidr::new(v4, 32),
        std::net::IpAddr::V6(_) => None,
    }));
    let mut source_ranges = BTreeSet::new();
    for (key, frontend) in &desired.frontends {
        let Some(external) = &frontend.external else { continue };
        let Some(value) = written.get(key) else { continue };
        for cidr in &external.source_ranges {
            source_ranges.insert((value.service_id, *cidr));
        }
    }
    Wanted { nat, no_masq, source_ranges }
}

/// The LPM key of a source range.
fn range_key(id: u32, cidr: &Ipv4Cidr) -> Key<SourceRangeV4> {
    Key::new(
        SourceRangeV4::prefix_len(cidr.prefix_len()),
        SourceRangeV4::new(id, cidr.addr().octets()),
    )
}

/// Brings the maps to `want`. Returns the number of writes, or the first error (the rest is
/// retried on the next call: what is compared is always the maps' own contents).
pub fn write(maps: &mut Maps, want: &Wanted) -> Result<usize, aya::maps::MapError> {
    let mut writes = 0;
    if maps.nat_config.get(&0, 0)? != want.nat {
        maps.nat_config.set(0, want.nat, 0)?;
        writes += 1;
    }
    let have: BTreeSet<Ipv4Cidr> = maps
        .no_masq
        .keys()
        .filter_map(Result::ok)
        .filter_map(|k| Ipv4Cidr::new(Ipv4Addr::from(k.data()), k.prefix_len() as u8))
        .collect();
    for cidr in want.no_masq.difference(&have) {
        maps.no_masq.insert(&Key::new(u32::from(cidr.prefix_len()), cidr.addr().octets()), 1, 0)?;
        writes += 1;
    }
    for cidr in have.difference(&want.no_masq) {
        maps.no_masq.remove(&Key::new(u32::from(cidr.prefix_len()), cidr.addr().octets()))?;
        writes += 1;
    }
    let have: BTreeSet<(u32, Ipv4Cidr)> = maps
        .source_ranges
        .keys()
        .filter_map(Result::ok)
        .filter_map(|k| {
            let len = k.prefix_len().checked_sub(32)? as u8;
            let data = k.data();
            Some((data.id(), Ipv4Cidr::new(Ipv4Addr::from(data.addr), len)?))
        })
        .collect();
    // New ranges first: a frontend whose list grows never drops an admitted client.
    for (id, cidr) in want.source_ranges.difference(&have) {
        maps.source_ranges.insert(&range_key(*id, cidr), 1, 0)?;
        writes += 1;
    }
    for (id, cidr) in have.difference(&want.source_ranges) {
        maps.source_ranges.remove(&range_key(*id, cidr))?;
        writes += 1;
    }
    Ok(writes)
}

/// The external interfaces: `configured` if any, otherwise every interface holding one of
/// `node_ips` (never the loopback: what crosses it never entered or leaves the node).
pub fn interfaces(configured: &[String], node_ips: &[Ipv4Addr]) -> std::io::Result<Vec<String>> {
    if !configured.is_empty() {
        return Ok(configured.to_vec());
    }
    let mut found = BTreeSet::new();
    for (name, addr) in ipv4_addresses()? {
        if node_ips.contains(&addr) && name != "lo" {
            found.insert(name);
        }
    }
    Ok(found.into_iter().collect())
}

/// Every IPv4 address of the current network namespace with its interface (`getifaddrs(3)`).
fn ipv4_addresses() -> std::io::Result<Vec<(String, Ipv4Addr)>> {
    let mut out = Vec::new();
    // SAFETY: getifaddrs fills a linked list freed with freeifaddrs below; every pointer is
    // checked for null before use and `ifa_addr` is read as `sockaddr_in` only for AF_INET.
    unsafe {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut head) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut cur = head;
        while !cur.is_null() {
            let ifa = &*cur;
            if !ifa.ifa_addr.is_null()
                && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET
                && !ifa.ifa_name.is_null()
            {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                let addr = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                let name = CStr::from_ptr(ifa.ifa_name).to_string_lossy().into_owned();
                out.push((name, addr));
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(head);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{ExternalFrontend, ExternalKind, Frontend};

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().unwrap()
    }

    fn config() -> ExternalConfig {
        ExternalConfig {
            interfaces: Vec::new(),
            xdp: crate::config::XdpMode::Off,
            masquerade: true,
            non_masquerade_cidrs: vec![cidr("192.168.0.0/16")],
            port_range: (61_000, 65_535),
            external_ip_allow: None,
            health_check_bind: Ipv4Addr::UNSPECIFIED.into(),
        }
    }

    #[test]
    fn nat_config_needs_a_pod_range_to_masquerade() {
        let index = Index::new();
        let node = NodeContext::named("n1");
        let w = wanted(&config(), None, &node, &index, &Desired::default(), &BTreeMap::new());
        assert_eq!(w.nat.flags & NAT_CFG_MASQUERADE, 0, "no pods known: nothing masqueraded");
        assert_eq!(w.nat.node_ip, [0; 4]);
        assert_eq!((w.nat.port_min, w.nat.port_max), (61_000, 65_535));
        let w = wanted(
            &config(),
            Some(cidr("10.244.0.0/16")),
            &node,
            &index,
            &Desired::default(),
            &BTreeMap::new(),
        );
        assert_ne!(w.nat.flags & NAT_CFG_MASQUERADE, 0);
        assert_eq!((w.nat.pods_addr, w.nat.pods_len), ([10, 244, 0, 0], 16));
        assert_eq!(w.no_masq, BTreeSet::from([cidr("10.244.0.0/16"), cidr("192.168.0.0/16")]));
    }

    #[test]
    fn source_ranges_follow_the_written_ids() {
        let key = ServiceKeyV4::new([203, 0, 113, 10], 80, 6);
        let frontend = Frontend {
            service: crate::source::ObjectKey::namespaced("d", "lb"),
            port_name: String::new(),
            backends: Vec::new(),
            draining: Vec::new(),
            session_affinity: Default::default(),
            no_local_endpoints: false,
            external: Some(ExternalFrontend {
                kind: ExternalKind::LoadBalancer,
                traffic_policy_local: false,
                source_ranges: vec![cidr("198.51.100.0/24"), cidr("10.0.0.7/32")],
            }),
        };
        let desired = Desired { frontends: BTreeMap::from([(key, frontend)]), skipped: Vec::new() };
        let index = Index::new();
        let node = NodeContext::default();
        let none = wanted(&config(), None, &node, &index, &desired, &BTreeMap::new());
        assert!(none.source_ranges.is_empty(), "not written yet: no id, no ranges");
        let written = BTreeMap::from([(key, ServiceValue { service_id: 7, ..Default::default() })]);
        let w = wanted(&config(), None, &node, &index, &desired, &written);
        assert_eq!(
            w.source_ranges,
            BTreeSet::from([(7, cidr("10.0.0.7/32")), (7, cidr("198.51.100.0/24"))])
        );
    }
}
