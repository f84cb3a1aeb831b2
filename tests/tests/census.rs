//! The map census on real kernel maps: `BPF_MAP_LOOKUP_BATCH` over `CT_V4` and
//! `POLICY_CT_V4` counts every entry once, by protocol and live/expired, as the datapath
//! decides liveness. Needs root (run with `cargo xtask test`).
use nodeplane_agent::{
    datapath::Datapath,
    occupancy::{monotonic_ns, take_census},
};
use nodeplane_common::{
    maps::{CtKeyV4, CtValueV4, IPPROTO_TCP, IPPROTO_UDP},
    policy::{PolicyCtKey, PolicyCtValue},
};

/// More than several batches (4096 entries per call), fewer than the map holds.
const ENTRIES: u32 = 20_000;

#[test]
fn the_census_counts_every_entry_by_protocol_and_liveness() {
    let mut dp = Datapath::load().unwrap_or_else(|e| panic!("loading the datapath (root): {e}"));
    let now = monotonic_ns();
    let hour = 3_600_000_000_000;
    for i in 0..ENTRIES {
        let key = CtKeyV4 {
            saddr: [10, 244, (i >> 8) as u8, i as u8],
            daddr: [10, 96, 0, 1],
            sport: (i as u16).to_be_bytes(),
            dport: 80u16.to_be_bytes(),
            proto: if i % 4 == 0 { IPPROTO_UDP } else { IPPROTO_TCP },
            dir: 0,
            _pad: [0; 2],
        };
        // Every third entry expired (a deadline in the past, as the datapath leaves them).
        let expires_ns = if i % 3 == 0 { 1 } else { now + hour };
        let value = CtValueV4 { expires_ns, ..Default::default() };
        dp.maps().ct.insert(key, value, 0).unwrap_or_else(|e| panic!("CT_V4 insert: {e}"));
    }
    for i in 0..100u16 {
        let key = PolicyCtKey {
            saddr: [10, 244, 1, 2],
            daddr: [10, 244, 1, 3],
            sport: i.to_be_bytes(),
            dport: 53u16.to_be_bytes(),
            proto: IPPROTO_UDP,
            _pad: [0; 3],
        };
        let value = PolicyCtValue { expires_ns: now + hour, ..Default::default() };
        dp.maps().policy_ct.insert(key, value, 0).unwrap_or_else(|e| panic!("insert: {e}"));
    }

    let handles = dp.maps().census_handles().expect("census handles");
    let census = take_census(&handles).expect("census");
    let counted: Vec<_> = census.service_ct.iter().collect();
    let expect = |proto: u8, expired: bool| {
        (0..ENTRIES)
            .filter(|i| (i % 4 == 0) == (proto == IPPROTO_UDP) && (i % 3 == 0) == expired)
            .count() as u64
    };
    assert_eq!(
        counted,
        vec![
            ("tcp", "live", expect(IPPROTO_TCP, false)),
            ("tcp", "expired", expect(IPPROTO_TCP, true)),
            ("udp", "live", expect(IPPROTO_UDP, false)),
            ("udp", "expired", expect(IPPROTO_UDP, true)),
            ("other", "live", 0),
            ("other", "expired", 0),
        ]
    );
    assert_eq!(census.service_ct.total(), u64::from(ENTRIES));
    assert_eq!((census.policy_ct.total(), census.policy_ct.live()), (100, 100));
    assert_eq!(census.frags, 0);
}
