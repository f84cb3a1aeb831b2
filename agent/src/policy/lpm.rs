//! Longest-prefix-match helpers for the two LPM tries of the policy datapath
//! (`IPCACHE_V4`, `POLICY_V4`): the decomposition of a port range into prefix blocks,
//! key masking (the kernel matches only the first `prefix_len` bits, so the agent keeps
//! keys canonical: bits past the prefix are zero), and lookups over in-memory maps that
//! behave like `bpf_map_lookup_elem` on an LPM trie.
use std::{collections::BTreeMap, net::Ipv4Addr};

use nodeplane_common::policy::{PolicyKey, PolicyValue};

use crate::model::Ipv4Cidr;

/// The bits of a [`PolicyKey`] the trie matches, in matching order: set, identity,
/// protocol, port (the pad byte is never part of a prefix).
pub const POLICY_KEY_BITS: u32 = PolicyKey::PREFIX_FULL;

/// One aligned block of ports: `first..=first + 2^(16 - bits) - 1`, matched by the LPM
/// entry of prefix length `PolicyKey::PREFIX_ANY_PORT + bits`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortBlock {
    pub first: u16,
    /// Leading port bits the block fixes (0 = every port, 16 = one port).
    pub bits: u8,
}

impl PortBlock {
    pub const fn prefix_len(self) -> u32 {
        PolicyKey::PREFIX_ANY_PORT + self.bits as u32
    }

    pub const fn last(self) -> u16 {
        let size = 1u32 << (16 - self.bits as u32);
        (self.first as u32 + size - 1) as u16
    }
}

/// The minimal list of aligned power-of-two blocks covering exactly `first..=last`
/// (empty if `first > last`), in port order. At most 30 blocks (e.g. `1..=65534`).
pub fn port_blocks(first: u16, last: u16) -> Vec<PortBlock> {
    let mut blocks = Vec::new();
    let (mut lo, hi) = (u32::from(first), u32::from(last));
    while lo <= hi {
        // The largest block aligned at `lo` that does not pass `hi`.
        let mut size_log = if lo == 0 { 16 } else { lo.trailing_zeros().min(16) };
        while lo + (1 << size_log) - 1 > hi {
            size_log -= 1;
        }
        blocks.push(PortBlock { first: lo as u16, bits: (16 - size_log) as u8 });
        lo += 1 << size_log;
    }
    blocks
}

/// The 88 matched bits of a key as an integer, most significant first.
fn policy_bits(key: &PolicyKey) -> u128 {
    let mut v = 0u128;
    for b in key.set.iter().chain(&key.identity).chain([&key.proto]).chain(&key.port) {
        v = (v << 8) | u128::from(*b);
    }
    v
}

fn policy_key_from_bits(v: u128) -> PolicyKey {
    let b = |i: u32| (v >> (8 * (10 - i))) as u8;
    PolicyKey {
        set: [b(0), b(1), b(2), b(3)],
        identity: [b(4), b(5), b(6), b(7)],
        proto: b(8),
        port: [b(9), b(10)],
        _pad: 0,
    }
}

fn prefix_mask(bits: u32, prefix_len: u32) -> u128 {
    let full = (1u128 << bits) - 1;
    let host = bits - prefix_len.min(bits);
    full & !((1u128 << host) - 1)
}

/// `key` with every bit past `prefix_len` cleared (and the pad byte zero): the canonical
/// form the agent writes and the fake stores.
pub fn mask_policy_key(key: &PolicyKey, prefix_len: u32) -> PolicyKey {
    policy_key_from_bits(policy_bits(key) & prefix_mask(POLICY_KEY_BITS, prefix_len))
}

/// Whether the entry `(entry, prefix_len)` matches the full key `key`.
pub fn policy_prefix_matches(entry: &PolicyKey, prefix_len: u32, key: &PolicyKey) -> bool {
    let mask = prefix_mask(POLICY_KEY_BITS, prefix_len);
    policy_bits(entry) & mask == policy_bits(key) & mask
}

/// LPM lookup of a full key in canonical entries: the longest prefix that matches, as the
/// kernel trie answers it (one probe per prefix length, longest first).
pub fn policy_lookup(
    rules: &BTreeMap<(PolicyKey, u32), PolicyValue>,
    key: &PolicyKey,
) -> Option<(u32, PolicyValue)> {
    (0..=POLICY_KEY_BITS)
        .rev()
        .find_map(|len| rules.get(&(mask_policy_key(key, len), len)).map(|v| (len, *v)))
}

/// `addr` with its host bits past `prefix_len` cleared, as a prefix.
pub fn ipv4_prefix(addr: Ipv4Addr, prefix_len: u8) -> Ipv4Cidr {
    let len = prefix_len.min(32);
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    let cidr = Ipv4Cidr::new(Ipv4Addr::from(u32::from(addr) & mask), len);
    // Host bits are cleared, so `new` cannot refuse it.
    cidr.unwrap_or_else(|| unreachable!("masked prefix {addr}/{len}"))
}

/// Whether prefix `outer` contains every address of `inner`.
pub fn covers(outer: &Ipv4Cidr, inner: &Ipv4Cidr) -> bool {
    outer.prefix_len() <= inner.prefix_len() && outer.contains(inner.addr())
}

/// LPM lookup of an address among prefixes: the longest one containing it.
pub fn ipv4_lookup<V: Copy>(map: &BTreeMap<Ipv4Cidr, V>, addr: Ipv4Addr) -> Option<(Ipv4Cidr, V)> {
    (0..=32u8).rev().find_map(|len| {
        let prefix = ipv4_prefix(addr, len);
        map.get(&prefix).map(|v| (prefix, *v))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(blocks: &[PortBlock]) -> Vec<u16> {
        blocks.iter().flat_map(|b| b.first..=b.last()).collect()
    }

    #[test]
    fn port_blocks_edges() {
        assert_eq!(port_blocks(0, 65535), vec![PortBlock { first: 0, bits: 0 }]);
        assert_eq!(port_blocks(0, 65535)[0].prefix_len(), PolicyKey::PREFIX_ANY_PORT);
        assert_eq!(port_blocks(80, 80), vec![PortBlock { first: 80, bits: 16 }]);
        assert_eq!(port_blocks(80, 80)[0].prefix_len(), PolicyKey::PREFIX_FULL);
        assert_eq!(port_blocks(65535, 65535), vec![PortBlock { first: 65535, bits: 16 }]);
        assert_eq!(port_blocks(9, 8), vec![]);
        // 32000..=32255 (256 ports), 32256..=32767 (512), and 32768 alone.
        let b = port_blocks(32000, 32768);
        assert_eq!(covered(&b), (32000..=32768).collect::<Vec<_>>());
        assert_eq!(
            b,
            vec![
                PortBlock { first: 32000, bits: 8 },
                PortBlock { first: 32256, bits: 7 },
                PortBlock { first: 32768, bits: 16 },
            ]
        );
        let b = port_blocks(1, 65534);
        assert_eq!(b.len(), 30);
        assert_eq!(covered(&b).len(), 65534);
    }

    #[test]
    fn port_blocks_are_minimal_and_exact() {
        for (first, last) in [(0, 0), (0, 1), (1, 2), (3, 17), (1024, 2047), (1000, 60000)] {
            let b = port_blocks(first, last);
            assert_eq!(covered(&b), (first..=last).collect::<Vec<_>>(), "{first}..={last}");
            for blk in &b {
                let size = 1u32 << (16 - u32::from(blk.bits));
                assert_eq!(u32::from(blk.first) % size, 0, "aligned {blk:?}");
            }
            // Minimal: no two neighbours merge into one aligned block.
            for w in b.windows(2) {
                let merged = w[0].bits == w[1].bits
                    && w[0].bits > 0
                    && u32::from(w[0].first) % (1u32 << (17 - u32::from(w[0].bits))) == 0;
                assert!(!merged, "{w:?} should be one block");
            }
        }
    }

    #[test]
    fn policy_key_masking_and_lookup() {
        let k = PolicyKey::new(7, 300, 6, 8080);
        assert_eq!(mask_policy_key(&k, 88), k);
        assert_eq!(mask_policy_key(&k, 72), PolicyKey::new(7, 300, 6, 0));
        assert_eq!(mask_policy_key(&k, 64), PolicyKey::new(7, 300, 0, 0));
        assert_eq!(mask_policy_key(&k, 0), PolicyKey::new(0, 0, 0, 0));
        let v = |rule| PolicyValue { rule, _reserved: 0 };
        let mut rules = BTreeMap::new();
        rules.insert((PolicyKey::new(7, 300, 0, 0), 64), v(1));
        rules.insert((PolicyKey::new(7, 300, 6, 8064), 72 + 11), v(2));
        assert_eq!(policy_lookup(&rules, &k), Some((83, v(2))));
        assert_eq!(policy_lookup(&rules, &PolicyKey::new(7, 300, 17, 8080)), Some((64, v(1))));
        assert_eq!(policy_lookup(&rules, &PolicyKey::new(7, 301, 6, 8080)), None);
        assert!(policy_prefix_matches(&PolicyKey::new(7, 300, 6, 8064), 83, &k));
        assert!(!policy_prefix_matches(&PolicyKey::new(7, 300, 6, 8064), 88, &k));
    }

    #[test]
    fn ipv4_lpm() {
        let c = |s: &str| s.parse::<Ipv4Cidr>().expect("cidr");
        let map =
            BTreeMap::from([(c("0.0.0.0/0"), 1u32), (c("10.0.0.0/8"), 2), (c("10.1.0.0/16"), 3)]);
        assert_eq!(ipv4_lookup(&map, Ipv4Addr::new(10, 1, 2, 3)), Some((c("10.1.0.0/16"), 3)));
        assert_eq!(ipv4_lookup(&map, Ipv4Addr::new(10, 2, 2, 3)), Some((c("10.0.0.0/8"), 2)));
        assert_eq!(ipv4_lookup(&map, Ipv4Addr::new(11, 2, 2, 3)), Some((c("0.0.0.0/0"), 1)));
        assert!(covers(&c("10.0.0.0/8"), &c("10.1.0.0/16")));
        assert!(!covers(&c("10.1.0.0/16"), &c("10.0.0.0/8")));
    }
}
