//! The agent's programming time: 10,000 Services x 10 endpoints from Kubernetes objects
//! into empty kernel maps, through the real pipeline (index -> desired -> sync -> aya maps);
//! then what a restarted agent pays to adopt those pinned maps.
use std::time::{Duration, Instant};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use nodeplane_agent::{
    datapath::Datapath,
    desired,
    index::Index,
    pin::PinDir,
    source::{Event, Kind, Object},
    sync::Syncer,
};
use serde_json::json;

pub const SERVICES: u32 = 10_000;
pub const ENDPOINTS: u32 = 10;

/// The `i`-th address after `base.0.0` (i < 2^20).
pub(crate) fn ip(base: [u8; 2], i: u32) -> String {
    let second = u32::from(base[1]) + (i >> 16);
    format!("{}.{second}.{}.{}", base[0], (i >> 8) & 0xff, i & 0xff)
}

/// `SERVICES` Services with a ClusterIP and one TCP port, each with one EndpointSlice of
/// `ENDPOINTS` ready endpoints.
pub fn cluster(services: u32, endpoints: u32) -> (Vec<Object>, Vec<Object>) {
    let mut svcs = Vec::new();
    let mut slices = Vec::new();
    for s in 0..services {
        let name = format!("svc-{s}");
        let svc: Service = serde_json::from_value(json!({
            "metadata": { "namespace": "bench", "name": name },
            "spec": { "clusterIP": ip([10, 96], s + 1), "ports": [{ "name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080 }] }
        }))
        .expect("bench Service");
        let eps: Vec<_> = (0..endpoints)
            .map(|e| json!({ "addresses": [ip([10, 128], s * endpoints + e + 1)], "conditions": { "ready": true } }))
            .collect();
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": { "namespace": "bench", "name": format!("{name}-abc"), "labels": { "kubernetes.io/service-name": name } },
            "addressType": "IPv4",
            "endpoints": eps,
            "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }]
        }))
        .expect("bench EndpointSlice");
        svcs.push(Object::from(svc));
        slices.push(Object::from(slice));
    }
    (svcs, slices)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

pub fn run() {
    let (svcs, slices) = cluster(SERVICES, ENDPOINTS);
    let pins = PinDir::new(format!("/sys/fs/bpf/nodeplane-bench-{}", std::process::id()));
    pins.remove_all().expect("a clean pin directory");
    let mut dp = Datapath::open_pinned(pins.clone(), &[])
        .unwrap_or_else(|e| panic!("loading the datapath: {e}"));
    let mut index = Index::new();
    let mut syncer = Syncer::new();

    let total = Instant::now();
    let t = Instant::now();
    index.handle(Event::Reset(Kind::Service, svcs));
    index.handle(Event::Reset(Kind::EndpointSlice, slices));
    let t_index = t.elapsed();
    let t = Instant::now();
    let want = desired::compute(&index);
    let t_desired = t.elapsed();
    let t = Instant::now();
    let plan_len = syncer.plan(&want).len();
    let t_plan = t.elapsed();
    let t = Instant::now();
    let stats = syncer.apply(&want, dp.maps()).unwrap_or_else(|e| panic!("sync: {e}"));
    let t_apply = t.elapsed();
    let t_total = total.elapsed();

    let t = Instant::now();
    let again = syncer.apply(&desired::compute(&index), dp.maps()).expect("second sync");
    let t_noop = t.elapsed();

    println!("\nagent programming {SERVICES} services x {ENDPOINTS} endpoints into empty maps");
    println!("  index (k8s -> model)        {}", ms(t_index));
    println!("  desired::compute            {}", ms(t_desired));
    println!("  sync plan ({plan_len} ops)     {}", ms(t_plan));
    println!("  sync apply (plan + {} map writes) {}", stats.ops, ms(t_apply));
    println!("  total                       {}", ms(t_total));
    println!("  re-sync with no change      {} ({} ops)", ms(t_noop), again.ops);

    // A restart: a new process would load the object onto the pins, read the maps back,
    // adopt them and diff against the (unchanged) cluster.
    drop(dp);
    let t = Instant::now();
    let mut dp = Datapath::open_pinned(pins.clone(), &[]).expect("adopting the pins");
    let t_load = t.elapsed();
    let t = Instant::now();
    let written = dp.maps().read_written().expect("reading the maps back");
    let t_read = t.elapsed();
    let t = Instant::now();
    let mut adopted = Syncer::new();
    adopted.adopt(&written.services, &written.slots, &written.backends);
    let ops = adopted.plan(&want).len();
    let t_adopt = t.elapsed();
    assert_eq!(ops, 0, "an adopted datapath needs no writes for the same cluster");
    println!(
        "restart: adopting the pinned maps ({} entries)",
        written.services.len() + written.slots.len() + written.backends.len()
    );
    println!("  load onto the pins (verifier included) {}", ms(t_load));
    println!("  read the maps back          {}", ms(t_read));
    println!("  adopt + plan ({ops} ops)        {}", ms(t_adopt));
    drop(dp);
    pins.remove_all().expect("removing the bench's pins");
}
