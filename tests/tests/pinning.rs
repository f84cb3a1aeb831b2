//! The datapath on bpffs: a second load adopts what the first pinned, a resized state map
//! gets its entries copied, pins of older layouts go once the new programs run, and
//! uninstall removes everything. Real kernel maps; needs root.
use std::path::PathBuf;

use aya::maps::{IterableMap as _, MapData};
use nodeplane_agent::{
    datapath::{Datapath, Retired},
    pin::PinDir,
    sync::{MapWriter as _, Op},
};
use nodeplane_common::maps::{CtKeyV4, CtValueV4, ServiceKeyV4, ServiceValue, names};

fn dir() -> PinDir {
    let root = PathBuf::from(format!("/sys/fs/bpf/nodeplane-test-pinning-{}", std::process::id()));
    let pins = PinDir::new(root);
    pins.remove_all().expect("a clean start");
    pins
}

fn ct_key(n: u8) -> CtKeyV4 {
    CtKeyV4 {
        saddr: [10, 0, 0, n],
        daddr: [10, 96, 0, 10],
        sport: [0x9c, n],
        dport: [0, 80],
        proto: 6,
        dir: 0,
        _pad: [0; 2],
    }
}

fn ct_value(n: u8) -> CtValueV4 {
    CtValueV4 { nat_addr: [10, 244, 0, n], nat_port: [0x1f, 0x90], state: 2, ..Default::default() }
}

fn service() -> (ServiceKeyV4, ServiceValue) {
    let key = ServiceKeyV4 { addr: [10, 96, 0, 10], port: [0, 80], proto: 6, _pad: 0 };
    (key, ServiceValue { service_id: 7, backend_count: 0, flags: 0, affinity_timeout_s: 0 })
}

fn open(pins: &PinDir, ct_size: u32) -> Datapath {
    Datapath::open_pinned(pins.clone(), &[(names::CT_V4, ct_size)])
        .unwrap_or_else(|e| panic!("open_pinned (root needed): {e}"))
}

#[test]
fn a_second_load_adopts_resizes_and_retires() {
    let pins = dir();

    // First agent: creates and pins every map, writes a frontend and a flow.
    let mut first = open(&pins, 1024);
    assert!(!first.adopted(names::SERVICES_V4) && !first.adopted(names::CT_V4));
    let (key, value) = service();
    first.maps().apply(&Op::PutService { key, value }).expect("write a frontend");
    first.maps().ct.insert(ct_key(1), ct_value(1), 0).expect("write a flow");
    assert_eq!(first.finish_upgrade().expect("finish"), Retired::default());
    assert!(pins.prog(names::PROG_FROM_POD).exists() && pins.prog(names::PROG_TO_POD).exists());
    for entry in std::fs::read_dir(pins.maps_dir()).expect("maps/") {
        let meta = entry.expect("a pin").metadata().expect("metadata");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "pins are 0600");
    }
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(pins.root()).expect("the directory").permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "the directory is 0700");
    drop(first);

    // Second agent, same build: adopts every map with its contents.
    let mut second = open(&pins, 1024);
    assert!(second.adopted(names::SERVICES_V4) && second.adopted(names::CT_V4));
    let written = second.maps().read_written().expect("read back");
    assert_eq!(written.services.get(&key), Some(&value));
    assert_eq!(second.maps().ct.get(&ct_key(1), 0).expect("the flow survived"), ct_value(1));
    // A pin this build has no map for (a map an older build had).
    let orphan = pins.maps_dir().join("OLD_MAP-00000000-8192");
    second.maps().frags.map().pin(&orphan).expect("pin an orphan");
    drop(second);

    // Third agent with a larger conntrack: a new map (new pin name) with the flows copied.
    let mut third = open(&pins, 2048);
    assert!(third.adopted(names::SERVICES_V4), "unchanged maps are adopted");
    assert!(!third.adopted(names::CT_V4), "a resized map is new");
    assert_eq!(third.maps().ct.get(&ct_key(1), 0).expect("copied at load"), ct_value(1));
    assert_eq!(third.maps().ct.map().info().expect("info").max_entries(), 2048);
    // The old programs still run on the old map until the switch: what they add meanwhile
    // is copied too.
    let old_ct = pins
        .map_pins()
        .expect("list")
        .into_iter()
        .find(|p| p.map == names::CT_V4 && p.max_entries == 1024)
        .expect("the old conntrack pin stays until the switch");
    let mut old: aya::maps::HashMap<MapData, CtKeyV4, CtValueV4> = aya::maps::HashMap::try_from(
        aya::maps::Map::LruHashMap(MapData::from_pin(&old_ct.path).expect("open the old map")),
    )
    .expect("typed");
    old.insert(ct_key(2), ct_value(2), 0).expect("a flow the old programs add");
    let retired = third.finish_upgrade().expect("finish");
    assert_eq!(retired, Retired { maps: 2, links: 0, copied: 1 });
    assert_eq!(third.maps().ct.get(&ct_key(2), 0).expect("caught up"), ct_value(2));
    assert!(!old_ct.path.exists() && !orphan.exists(), "old pins removed");
    let left: Vec<String> = pins.map_pins().expect("list").into_iter().map(|p| p.map).collect();
    let mut unique = left.clone();
    unique.dedup();
    assert_eq!(left, unique, "one pin per map");
    assert!(pins.in_use().expect("lock probe"), "a loaded datapath holds the directory");
    drop(third);
    assert!(!pins.in_use().expect("lock probe"), "and lets it go");

    let removed = pins.remove_all().expect("uninstall");
    assert!(removed >= left.len() + 2, "maps and programs: {removed}");
    assert!(!pins.root().exists());
}
