//! `cargo xtask bench`: per-packet cost of `from_pod` (BPF_PROG_TEST_RUN), the agent's
//! programming time, NetworkPolicy at scale (per-packet cost through policy, map
//! programming, recompute after a relabel), and the Kubernetes API source at scale (start
//! to first sync, memory, network programming latency). Prints tables; docs/BENCHMARKS.md
//! records the numbers and the method.
//!
//! `nodeplane-bench [SECTION]...` runs only the sections named (`datapath`, `agent`,
//! `policy`, `census`, `ctgc`, `api`, or one part of it: `api-start`, `api-memory`,
//! `api-latency`; `nodeport`: NodePort from the lab's external client through XDP, tc and
//! iptables); no argument runs them all.
//!
//! Method for the packet path: every sample is one `BPF_PROG_TEST_RUN` with `repeat = 1`
//! (with `repeat > 1` the kernel would rerun the program on the frame it already rewrote, so
//! an "established" run would measure pass-through). The kernel reports the run time of the
//! program alone; we report the median and the mean over `SAMPLES` runs. Configurations are
//! measured interleaved, in one process, so machine noise hits them alike.
use std::{net::Ipv4Addr, time::Instant};

use nodeplane_agent::{
    datapath::Datapath,
    sync::{MapWriter, Op},
};
use nodeplane_common::maps::{
    BackendV4, IPPROTO_TCP, SVC_F_VIP_MARKER, ServiceKeyV4, ServiceValue, SlotKey, names,
};
use nodeplane_tests::{
    bench_api::Parts,
    packet::{Frame, TCP_ACK, TCP_SYN},
    run::{Series, timed},
};

const SAMPLES: usize = 20_000;
const ROUNDS: usize = 5;

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i)
}

fn endpoint(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i)
}

/// Writes `services` frontends on port 80 with `endpoints` backends each, through the
/// agent's MapWriter (one id per backend).
fn populate(dp: &mut Datapath, services: u32, endpoints: u32) {
    let maps = dp.maps();
    let mut put = |op: Op| maps.apply(&op).unwrap_or_else(|e| panic!("populate: {e}"));
    for s in 0..services {
        let addr = vip(s).octets();
        put(Op::PutService {
            key: ServiceKeyV4::vip_marker(addr),
            value: ServiceValue { flags: SVC_F_VIP_MARKER, ..Default::default() },
        });
        let service_id = s + 1;
        for e in 0..endpoints {
            let id = s * endpoints + e + 1;
            put(Op::PutBackend {
                id,
                backend: BackendV4::new(endpoint(id).octets(), 8080, IPPROTO_TCP),
            });
            put(Op::PutSlot { key: SlotKey { service_id, slot: e }, backend_id: id });
        }
        put(Op::PutService {
            key: ServiceKeyV4::new(addr, 80, IPPROTO_TCP),
            value: ServiceValue { service_id, backend_count: endpoints, ..Default::default() },
        });
    }
}

fn run_ns(dp: &Datapath, frame: &[u8], out: &mut [u8]) -> u64 {
    timed(dp, names::PROG_FROM_POD, frame, None, out).1
}

struct Config {
    name: &'static str,
    dp: Datapath,
    target: Ipv4Addr,
    new_flow: Series,
    established: Series,
    non_service: Series,
    next_port: u32,
}

fn measure_round(c: &mut Config, out: &mut [u8]) {
    let client = Ipv4Addr::new(10, 244, 0, 2);
    let est = Frame::tcp((client, 33333), (c.target, 80), TCP_ACK).build();
    run_ns(&c.dp, &est, out); // creates the flow
    let other = Frame::tcp((client, 33334), (Ipv4Addr::new(10, 244, 0, 9), 8080), TCP_ACK).build();
    for _ in 0..SAMPLES / ROUNDS {
        // New flows: a fresh source (port, then address) per sample.
        let p = c.next_port;
        c.next_port += 1;
        let src = Ipv4Addr::from(u32::from(client) + (p >> 16));
        let syn = Frame::tcp((src, (p & 0xffff) as u16 | 1024), (c.target, 80), TCP_SYN).build();
        c.new_flow.0.push(run_ns(&c.dp, &syn, out));
        c.established.0.push(run_ns(&c.dp, &est, out));
        c.non_service.0.push(run_ns(&c.dp, &other, out));
    }
}

/// The sections, in the order they run: name and what it measures.
const SECTIONS: [(&str, &str); 10] = [
    ("datapath", "per-packet cost of from_pod (BPF_PROG_TEST_RUN)"),
    ("agent", "programming 10,000 services into empty maps"),
    ("policy", "NetworkPolicy: 10,000 pods with 1 and 1,000 policies, per packet and relabel"),
    ("census", "counting a full conntrack map: batch lookup against aya's keys() and iter()"),
    ("ctgc", "conntrack GC passes (flush, expiry) on a full conntrack map"),
    ("api", "the Kubernetes API source: api-start, api-memory and api-latency"),
    ("api-start", "source start to first full sync, with and without 50,000 Pods"),
    ("api-memory", "the agent binary's resident memory, with and without 50,000 Pods"),
    ("api-latency", "network programming latency at 20 endpoint changes per second"),
    (
        "nodeport",
        "NodePort from an external client: XDP, tc, iptables, pod IP; 1 to 10,000 Services",
    ),
];

fn usage() -> String {
    let mut s = String::from("usage: nodeplane-bench [SECTION]...  (no SECTION: all)\n");
    for (name, what) in SECTIONS {
        s.push_str(&format!("  {name:<12} {what}\n"));
    }
    s
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{}", usage());
        return;
    }
    if let Some(bad) = args.iter().find(|a| !SECTIONS.iter().any(|(name, _)| name == a)) {
        eprint!("unknown section {bad:?}\n{}", usage());
        std::process::exit(2);
    }
    let wanted = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    if wanted("datapath") {
        datapath();
    }
    if wanted("agent") {
        nodeplane_tests::bench_agent::run();
    }
    if wanted("policy") {
        nodeplane_tests::bench_policy::run();
    }
    if wanted("census") {
        census();
    }
    if wanted("ctgc") {
        ctgc();
    }
    let parts = Parts {
        start: wanted("api") || wanted("api-start"),
        memory: wanted("api") || wanted("api-memory"),
        latency: wanted("api") || wanted("api-latency"),
    };
    if parts.start || parts.memory || parts.latency {
        nodeplane_tests::bench_api::run(parts);
    }
    if wanted("nodeport") {
        nodeplane_tests::bench_nodeport::run();
    }
}

fn datapath() {
    let mut out = vec![0u8; 256];
    let mut configs = Vec::new();
    for (name, services, endpoints) in
        [("1 service x 10 endpoints", 1, 10), ("10,000 services x 10 endpoints", 10_000, 10)]
    {
        let mut dp =
            Datapath::load().unwrap_or_else(|e| panic!("loading the datapath (root needed): {e}"));
        let t = Instant::now();
        populate(&mut dp, services, endpoints);
        eprintln!("populated {name} in {:?}", t.elapsed());
        configs.push(Config {
            name,
            dp,
            target: vip(services / 2),
            new_flow: Series::default(),
            established: Series::default(),
            non_service: Series::default(),
            next_port: 0,
        });
    }
    for _ in 0..ROUNDS {
        for c in &mut configs {
            measure_round(c, &mut out);
        }
    }
    println!(
        "\nfrom_pod per-packet cost, BPF_PROG_TEST_RUN, {SAMPLES} samples each (median / mean ns)"
    );
    println!("{:<32} {:>18} {:>18} {:>18}", "maps hold", "new flow", "established", "non-service");
    for c in &configs {
        println!(
            "{:<32} {:>8} / {:>7.1} {:>8} / {:>7.1} {:>8} / {:>7.1}",
            c.name,
            c.new_flow.median(),
            c.new_flow.mean(),
            c.established.median(),
            c.established.mean(),
            c.non_service.median(),
            c.non_service.mean()
        );
    }
    let (a, b) = (&configs[0], &configs[1]);
    println!(
        "established-flow cost at 10,000 services / at 1 service: {:.3} (mean), {:.3} (median)",
        b.established.mean() / a.established.mean(),
        b.established.median() as f64 / a.established.median().max(1) as f64
    );
}

/// The occupancy census (`agent/src/occupancy.rs`) on a full `CT_V4`, half of it expired,
/// against aya's per-key iteration. Three census passes, one of each of the others.
fn census() {
    use nodeplane_agent::occupancy::{monotonic_ns, take_census};
    use nodeplane_common::maps::{CtKeyV4, CtValueV4, IPPROTO_UDP};

    let mut dp =
        Datapath::load().unwrap_or_else(|e| panic!("loading the datapath (root needed): {e}"));
    let capacity = dp.maps().census_handles().expect("census handles").ct.max_entries();
    let now = monotonic_ns();
    let t = Instant::now();
    for i in 0..capacity {
        let key = CtKeyV4 {
            saddr: [10, 244, (i >> 16) as u8, (i >> 8) as u8],
            daddr: [10, 96, 0, 1],
            sport: (i as u16).to_be_bytes(),
            dport: 80u16.to_be_bytes(),
            proto: if i % 4 == 0 { IPPROTO_UDP } else { IPPROTO_TCP },
            dir: 0,
            _pad: [0; 2],
        };
        let expires_ns = if i % 2 == 0 { now + 3_600_000_000_000 } else { 1 };
        let value = CtValueV4 { expires_ns, ..Default::default() };
        dp.maps().ct.insert(key, value, 0).unwrap_or_else(|e| panic!("CT_V4 insert: {e}"));
    }
    eprintln!("filled CT_V4 with {capacity} entries in {:?}", t.elapsed());
    println!("\ncounting a full CT_V4 ({capacity} entries)");
    let handles = dp.maps().census_handles().expect("census handles");
    for _ in 0..3 {
        let census = take_census(&handles).expect("census");
        assert_eq!(census.service_ct.total(), u64::from(capacity), "the census missed entries");
        println!("  census (BPF_MAP_LOOKUP_BATCH)  {:?}", census.elapsed);
    }
    let t = Instant::now();
    let n = dp.maps().ct.keys().count();
    println!("  aya keys()                     {:?} ({n} keys)", t.elapsed());
    let t = Instant::now();
    let n = dp.maps().ct.iter().count();
    println!("  aya iter()                     {:?} ({n} entries)", t.elapsed());
}

/// The conntrack GC (`agent/src/ctgc.rs`) on a full `CT_V4`: a quarter UDP (half of it on
/// backends no longer in their frontend's slots), half expired (TCP). Each pass runs twice:
/// deleting, then with nothing left to delete (the walk alone).
fn ctgc() {
    use nodeplane_agent::{
        ctgc::{GcMaps, Pass, run_pass},
        occupancy::monotonic_ns,
    };
    use nodeplane_common::maps::{CtKeyV4, CtValueV4, IPPROTO_UDP};

    let mut dp =
        Datapath::load().unwrap_or_else(|e| panic!("loading the datapath (root needed): {e}"));
    let vip = Ipv4Addr::new(10, 96, 0, 1);
    let write = |dp: &mut Datapath, op: Op| dp.maps().apply(&op).expect("fixture write");
    let marker = ServiceValue { flags: SVC_F_VIP_MARKER, ..Default::default() };
    write(&mut dp, Op::PutService { key: ServiceKeyV4::vip_marker(vip.octets()), value: marker });
    // Backends 1..=8; the UDP frontend's slots hold 1..=4 only.
    for id in 1..=8u32 {
        let backend = BackendV4::new([10, 244, 0, id as u8], 5353, IPPROTO_UDP);
        write(&mut dp, Op::PutBackend { id, backend });
    }
    for slot in 0..4u32 {
        write(&mut dp, Op::PutSlot { key: SlotKey { service_id: 1, slot }, backend_id: slot + 1 });
    }
    let value = ServiceValue { service_id: 1, backend_count: 4, ..Default::default() };
    write(&mut dp, Op::PutService { key: ServiceKeyV4::new(vip.octets(), 53, IPPROTO_UDP), value });

    let capacity = dp.maps().census_handles().expect("census handles").ct.max_entries();
    let now = monotonic_ns();
    let t = Instant::now();
    for i in 0..capacity {
        let udp = i % 4 == 0;
        let key = CtKeyV4 {
            saddr: [10, 244, (i >> 16) as u8, (i >> 8) as u8],
            daddr: vip.octets(),
            sport: (i as u16).to_be_bytes(),
            dport: if udp { 53u16 } else { 80 }.to_be_bytes(),
            proto: if udp { IPPROTO_UDP } else { IPPROTO_TCP },
            dir: 0,
            _pad: [0; 2],
        };
        let backend_id = 1 + (i / 4) % 8;
        let value = CtValueV4 {
            nat_addr: [10, 244, 0, backend_id as u8],
            nat_port: 5353u16.to_be_bytes(),
            service_id: 1,
            backend_id,
            expires_ns: if i % 2 == 0 { now + 3_600_000_000_000 } else { 1 },
            ..Default::default()
        };
        dp.maps().ct.insert(key, value, 0).unwrap_or_else(|e| panic!("CT_V4 insert: {e}"));
    }
    eprintln!("filled CT_V4 with {capacity} entries in {:?}", t.elapsed());
    println!("\nconntrack GC passes on a full CT_V4 ({capacity} entries)");
    let mut maps = GcMaps::new(dp.maps()).expect("GC maps");
    for pass in [Pass::Flush, Pass::Flush, Pass::Expiry, Pass::Expiry] {
        let r = run_pass(&mut maps, pass).expect("GC pass");
        println!(
            "  {:<6} scanned {:>7}  deleted {:>7}  {:?}",
            pass.as_str(),
            r.scanned.0 + r.scanned.1,
            r.service.total() + r.policy.total(),
            r.elapsed
        );
    }
}
