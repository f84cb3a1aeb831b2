//! How full the datapath's maps are: entries against capacity per map, conntrack entries by
//! protocol and liveness, and a warning when a map crosses 90%.
//!
//! ```text
//!  maps the agent writes            maps the datapath fills (LRU)
//!  SERVICES_V4 BACKEND_SLOTS        CT_V4  POLICY_CT_V4  FRAGS_V4
//!  BACKENDS_V4 IPCACHE_V4 ...           │ BPF_MAP_LOOKUP_BATCH, every --occupancy-interval,
//!      │ sizes from the syncers         │ on a blocking thread (datapath::BatchReader)
//!      ▼ (service_map_sizes)            ▼ (take_census)
//!               MapUsage per map ──► Alarms (warn once per crossing) ──► metrics
//! ```
//!
//! The agent-written maps are never iterated: after a successful sync the syncers know
//! exactly what is in them. The conntrack maps are written by the datapath alone, so they are
//! read, with one `bpf(2)` call per 4096 entries: 0.16-0.18 s for a full 524,288-entry
//! `CT_V4` on kernel 6.18 (release build), against 0.66 s for aya's `keys()` and 1.4 s for
//! its `iter()` (the ignored test below measures it).
//!
//! An LRU map only evicts when it is full, so a busy node's conntrack fills up with expired
//! entries by design: its alarm counts live entries (`expires_ns` after now), since
//! expired ones make room as soon as they are needed.
use std::{collections::BTreeSet, time::Duration};

use nodeplane_common::maps::{IPPROTO_TCP, IPPROTO_UDP, names};

use crate::{datapath::CensusHandles, desired::Desired};

/// The `map` label of every map whose occupancy is exported, with its name in the object.
/// Labels are stable where map names may get a version suffix (a layout change).
pub const MAPS: [(&str, &str); 9] = [
    (SERVICES, names::SERVICES_V4),
    (BACKEND_SLOTS, names::BACKEND_SLOTS),
    (BACKENDS, names::BACKENDS_V4),
    (CONNTRACK, names::CT_V4),
    (IPCACHE, names::IPCACHE_V4),
    (ENDPOINTS, names::ENDPOINTS_V4),
    (POLICY, names::POLICY_V4),
    (POLICY_CONNTRACK, names::POLICY_CT_V4),
    (FRAGS, names::FRAGS_V4),
];
pub const SERVICES: &str = "services";
pub const BACKEND_SLOTS: &str = "backend_slots";
pub const BACKENDS: &str = "backends";
pub const CONNTRACK: &str = "conntrack";
pub const IPCACHE: &str = "ipcache";
pub const ENDPOINTS: &str = "endpoints";
pub const POLICY: &str = "policy";
pub const POLICY_CONNTRACK: &str = "policy_conntrack";
pub const FRAGS: &str = "frags";

/// The `map` label of the map named `name` in the object.
pub fn label_of(name: &str) -> Option<&'static str> {
    MAPS.iter().find(|(_, n)| *n == name).map(|(label, _)| *label)
}

/// A map's usage: `live` is `Some` for conntrack maps, whose alarm counts live entries only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapUsage {
    pub map: &'static str,
    pub entries: u64,
    pub live: Option<u64>,
    pub capacity: u64,
}

/// Conntrack entries by protocol (`tcp`, `udp`, `other`) and state (`live`, `expired`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtCounts {
    /// `[protocol][0 = live, 1 = expired]`, protocols in [`CtCounts::PROTOCOLS`] order.
    counts: [[u64; 2]; 3],
}

impl CtCounts {
    pub const PROTOCOLS: [&str; 3] = ["tcp", "udp", "other"];
    pub const STATES: [&str; 2] = ["live", "expired"];

    /// Counts an entry. Live as the datapath decides it: `expires_ns > now_ns`, both on
    /// `bpf_ktime_get_ns()`'s clock, CLOCK_MONOTONIC ([`monotonic_ns`]).
    pub fn add(&mut self, proto: u8, expires_ns: u64, now_ns: u64) {
        let p = match proto {
            IPPROTO_TCP => 0,
            IPPROTO_UDP => 1,
            _ => 2,
        };
        self.counts[p][usize::from(expires_ns <= now_ns)] += 1;
    }

    /// `(protocol, state, entries)` for every combination, zeros included.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> + '_ {
        Self::PROTOCOLS.iter().enumerate().flat_map(move |(p, proto)| {
            Self::STATES
                .iter()
                .enumerate()
                .map(move |(s, state)| (*proto, *state, self.counts[p][s]))
        })
    }

    pub fn live(&self) -> u64 {
        self.counts.iter().map(|c| c[0]).sum()
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }
}

/// What one pass over the datapath-filled maps found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Census {
    pub service_ct: CtCounts,
    pub policy_ct: CtCounts,
    pub frags: u64,
    /// Their capacities: `(CT_V4, POLICY_CT_V4, FRAGS_V4)`.
    pub capacities: (u64, u64, u64),
    /// How long the pass took.
    pub elapsed: Duration,
}

impl Census {
    pub fn usage(&self) -> [MapUsage; 3] {
        let (ct, pct, frags) = self.capacities;
        [
            MapUsage {
                map: CONNTRACK,
                entries: self.service_ct.total(),
                live: Some(self.service_ct.live()),
                capacity: ct,
            },
            MapUsage {
                map: POLICY_CONNTRACK,
                entries: self.policy_ct.total(),
                live: Some(self.policy_ct.live()),
                capacity: pct,
            },
            MapUsage { map: FRAGS, entries: self.frags, live: None, capacity: frags },
        ]
    }
}

#[derive(Debug, thiserror::Error)]
#[error("counting {map}: {source}")]
pub struct CensusError {
    pub map: &'static str,
    pub source: std::io::Error,
}

/// Reads `CT_V4`, `POLICY_CT_V4` and `FRAGS_V4` whole. Blocking (about 30 ms per 100,000
/// entries): run it with `spawn_blocking`.
pub fn take_census(maps: &CensusHandles) -> Result<Census, CensusError> {
    let started = std::time::Instant::now();
    let now = monotonic_ns();
    let err = |map| move |source| CensusError { map, source };
    let mut census = Census::default();
    maps.ct
        .for_each(|k, v| census.service_ct.add(k.proto, v.expires_ns, now))
        .map_err(err(maps.ct.name()))?;
    maps.policy_ct
        .for_each(|k, v| census.policy_ct.add(k.proto, v.expires_ns, now))
        .map_err(err(maps.policy_ct.name()))?;
    census.frags = maps.frags.for_each(|_, _| {}).map_err(err(maps.frags.name()))? as u64;
    census.capacities = (
        maps.ct.max_entries().into(),
        maps.policy_ct.max_entries().into(),
        maps.frags.max_entries().into(),
    );
    census.elapsed = started.elapsed();
    Ok(census)
}

/// `bpf_ktime_get_ns()` as user space reads it: the kernel's `ktime_get_mono_fast_ns`,
/// i.e. CLOCK_MONOTONIC (not BOOTTIME: it stops while the machine is suspended).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec to a valid pointer; CLOCK_MONOTONIC
    // always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Entries of the service maps after a successful sync, derived from what the syncer was
/// asked to write instead of walking the maps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceMapSizes {
    /// `SERVICES_V4`: frontends plus one VIP marker per ClusterIP.
    pub services: u64,
    pub slots: u64,
    pub backends: u64,
}

/// The sizes of the service maps after [`Syncer`](crate::sync::Syncer) wrote `desired`,
/// leaving out `skipped` frontends for lack of capacity and holding `backends` backends
/// (both from its `SyncStats`). The syncer admits frontends in key order until the first
/// that does not fit and leaves out every later one, and gives each admitted frontend one
/// slot per backend, so the admitted ones are the first `len - skipped` (tested against
/// the syncer below).
pub fn service_map_sizes(desired: &Desired, skipped: usize, backends: usize) -> ServiceMapSizes {
    let admitted = desired.frontends.len().saturating_sub(skipped);
    let frontends = desired.frontends.iter().filter(|(k, _)| !k.is_vip_marker()).take(admitted);
    let mut vips = BTreeSet::new();
    let (mut services, mut slots) = (0u64, 0u64);
    for (key, frontend) in frontends {
        services += 1;
        slots += frontend.backends.len() as u64;
        vips.insert(key.addr);
    }
    ServiceMapSizes { services: services + vips.len() as u64, slots, backends: backends as u64 }
}

/// A map crossed the alarm threshold, up or down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crossing {
    /// Above [`Alarms::HIGH_PERCENT`] of its capacity.
    Above(MapUsage),
    /// Back below [`Alarms::LOW_PERCENT`].
    Below(MapUsage),
}

/// Which maps are above the threshold, so each crossing is reported once, not every tick.
#[derive(Clone, Debug, Default)]
pub struct Alarms {
    above: BTreeSet<&'static str>,
}

impl Alarms {
    pub const HIGH_PERCENT: u64 = 90;
    /// Lower than the high mark, so a map hovering at 90% does not warn every tick.
    pub const LOW_PERCENT: u64 = 85;

    /// The crossings since the last call.
    pub fn check(&mut self, usage: &[MapUsage]) -> Vec<Crossing> {
        let mut out = Vec::new();
        for u in usage.iter().filter(|u| u.capacity > 0) {
            let used = u.live.unwrap_or(u.entries).saturating_mul(100);
            if used > Self::HIGH_PERCENT * u.capacity {
                if self.above.insert(u.map) {
                    out.push(Crossing::Above(*u));
                }
            } else if used < Self::LOW_PERCENT * u.capacity && self.above.remove(u.map) {
                out.push(Crossing::Below(*u));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use nodeplane_common::maps::{BackendV4, ServiceKeyV4};
    use proptest::prelude::*;

    use super::*;
    use crate::{
        desired::Frontend,
        source::ObjectKey,
        sync::{Capacity, FakeMaps, Syncer},
    };

    #[test]
    fn conntrack_entries_are_live_until_their_deadline() {
        let mut c = CtCounts::default();
        c.add(IPPROTO_TCP, 100, 99);
        c.add(IPPROTO_TCP, 100, 100); // the datapath's test is `expires_ns > now`
        c.add(IPPROTO_UDP, 5, 99);
        c.add(132, 1000, 99);
        let got: Vec<_> = c.iter().filter(|(_, _, n)| *n > 0).collect();
        assert_eq!(
            got,
            [
                ("tcp", "live", 1),
                ("tcp", "expired", 1),
                ("udp", "expired", 1),
                ("other", "live", 1)
            ]
        );
        assert_eq!((c.live(), c.total()), (2, 4));
        assert_eq!(c.iter().count(), 6, "every label combination, zeros too");
    }

    #[test]
    fn every_map_has_a_label() {
        for (label, name) in MAPS {
            assert_eq!(label_of(name), Some(label));
        }
        assert_eq!(label_of("COUNTERS"), None);
    }

    fn usage(map: &'static str, entries: u64, live: Option<u64>) -> MapUsage {
        MapUsage { map, entries, live, capacity: 100 }
    }

    #[test]
    fn alarms_fire_once_per_crossing_with_hysteresis() {
        let mut a = Alarms::default();
        assert_eq!(a.check(&[usage(SERVICES, 90, None)]), [], "90% is not above 90%");
        assert_eq!(
            a.check(&[usage(SERVICES, 91, None)]),
            [Crossing::Above(usage(SERVICES, 91, None))]
        );
        assert_eq!(a.check(&[usage(SERVICES, 95, None)]), [], "once");
        assert_eq!(a.check(&[usage(SERVICES, 88, None)]), [], "not below the low mark yet");
        assert_eq!(a.check(&[usage(SERVICES, 91, None)]), [], "still the same crossing");
        assert_eq!(
            a.check(&[usage(SERVICES, 84, None)]),
            [Crossing::Below(usage(SERVICES, 84, None))]
        );
        assert_eq!(a.check(&[usage(SERVICES, 92, None)]).len(), 1, "a new crossing");
        // Conntrack: a full LRU of expired entries is normal; live entries count.
        assert_eq!(a.check(&[usage(CONNTRACK, 100, Some(10))]), []);
        assert_eq!(a.check(&[usage(CONNTRACK, 100, Some(95))]).len(), 1);
        // A map of capacity 0 (not created) never alarms.
        let none = MapUsage { map: FRAGS, entries: 0, live: None, capacity: 0 };
        assert_eq!(a.check(&[none]), []);
    }

    fn desired(frontends: &[(u8, u16, &[u8])]) -> Desired {
        let frontends = frontends
            .iter()
            .map(|(vip, port, backends)| {
                let key = ServiceKeyV4::new([10, 96, 0, *vip], *port, IPPROTO_TCP);
                let backends =
                    backends.iter().map(|b| BackendV4::new([10, 0, 0, *b], 80, IPPROTO_TCP));
                let frontend = Frontend {
                    service: ObjectKey::namespaced("d", format!("s{vip}")),
                    port_name: String::new(),
                    backends: backends.collect(),
                    draining: Vec::new(),
                    session_affinity: crate::model::SessionAffinity::None,
                    no_local_endpoints: false,
                    external: None,
                };
                (key, frontend)
            })
            .collect();
        Desired { frontends, skipped: Vec::new() }
    }

    fn fake_sizes(maps: &FakeMaps) -> ServiceMapSizes {
        ServiceMapSizes {
            services: maps.services.len() as u64,
            slots: maps.slots.len() as u64,
            backends: maps.backends.len() as u64,
        }
    }

    proptest! {
        /// The derived sizes are what the syncer really wrote, also when capacity leaves
        /// frontends out.
        #[test]
        fn service_map_sizes_match_what_the_syncer_wrote(
            steps in prop::collection::vec(
                prop::collection::vec((0..4u8, 1..3u16, prop::collection::vec(0..6u8, 0..4)), 0..6),
                1..6,
            ),
            services in 2..12u32,
            slots in 1..12u32,
            backends in 1..8u32,
        ) {
            let capacity = Capacity { services, slots, backends };
            let mut syncer = Syncer::with_capacity(capacity);
            let mut maps = FakeMaps { capacity, ..FakeMaps::default() };
            for step in steps {
                let step: Vec<(u8, u16, &[u8])> =
                    step.iter().map(|(v, p, b)| (*v, *p, b.as_slice())).collect();
                let d = desired(&step);
                let stats = syncer.apply(&d, &mut maps).expect("no write fails within capacity");
                prop_assert_eq!(
                    service_map_sizes(&d, stats.skipped, stats.backends),
                    fake_sizes(&maps)
                );
            }
        }
    }
}
