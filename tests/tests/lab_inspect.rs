//! `nodeplane-agent inspect` against the live datapath of the lab: the agent binary in the
//! 3x3 NetworkPolicy lab of `nodeplane_tests::netpol`, `inspect` run as its own process in
//! the node netns (as `kubectl exec` into the agent's pod would), and real sockets.
//!
//! ```text
//!  inspect trace --from POD --to IP:PORT -o json ──BPF_PROG_TEST_RUN on progs/*──▶ verdict ─┐
//!  real TCP/UDP from the pod's netns ──veth──▶ datapath ──▶ answered or not ────────────────┴─▶ agree?
//! ```
//!
//! The cases: allowed through a Service, denied by policy (through the Service and pod to
//! pod, TCP and UDP), no Service at that address, a Service without backends. Then
//! `inspect services` lists the lab's Services with their backends, `policy` and `nat`
//! name what they show, and an empty pin directory gives a clear error.
//!
//! Needs root and the binaries built by `cargo xtask test`.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::Output,
    thread,
    time::{Duration, Instant},
};

use nodeplane_lab::{naming, netns, server::Protocol};
use nodeplane_tests::{
    bin,
    netpol::{ATTEMPTS, Harness, PROBE_TIMEOUT, PodId, XA, XB, YB, pod},
};
use serde_json::Value;

const ZA: PodId = pod("z", "a");
const WAIT: Duration = Duration::from_secs(15);

/// Default deny ingress in x, x/a open to namespace y on TCP 80 only, and a Service in x
/// whose selector matches no pod (a frontend without backends).
const OBJECTS: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-ingress, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-from-y, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
    ports: [{protocol: TCP, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: x}
spec:
  selector: {pod: nobody}
  ports: [{name: http, port: 80, protocol: TCP}]
";

struct InspectLab {
    h: Harness,
}

impl InspectLab {
    fn start() -> Self {
        let lab = InspectLab { h: Harness::start() };
        lab.h.apply(OBJECTS);
        // Programmed: x/b is denied, and the names snapshot knows the new Service.
        lab.wait("x/b -> x/a:80 is denied", || {
            lab.real(XB, SocketAddrV4::new(lab.h.ip(XA), 80), Protocol::Tcp).is_err()
        });
        lab.wait("inspect names x/empty", || {
            let out = lab.inspect(&["services", "-o", "json"]);
            out.status.success()
                && json(&out)["frontends"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|f| f["service"] == "x/empty"))
        });
        lab
    }

    fn wait(&self, what: &str, mut done: impl FnMut() -> bool) {
        let begin = Instant::now();
        while !done() {
            assert!(
                begin.elapsed() < WAIT,
                "{what}: not after {WAIT:?}\nagent log:\n{}",
                self.h.agent_log_tail(40)
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// `nodeplane-agent inspect ARGS` in the node netns, with the lab agent's directories.
    fn inspect(&self, args: &[&str]) -> Output {
        inspect_with(self.h.lab(), &self.h.lab().bpffs_dir(), args)
    }

    /// `inspect trace` as JSON.
    fn trace(&self, from: PodId, to: SocketAddrV4, proto: Protocol) -> Value {
        let (from, to) = (from.to_string(), to.to_string());
        let proto = match proto {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        let out =
            self.inspect(&["-o", "json", "trace", "--from", &from, "--to", &to, "--proto", proto]);
        assert!(
            out.status.success(),
            "inspect trace failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        json(&out)
    }

    /// A real connection (or datagram) from `from`: who answered, tried [`ATTEMPTS`] times.
    fn real(&self, from: PodId, to: SocketAddrV4, proto: Protocol) -> Result<String, String> {
        let mut last = String::new();
        for _ in 0..ATTEMPTS {
            let answer = match proto {
                Protocol::Tcp => self.h.lab().tcp_ask(from.ns, from.name, to, PROBE_TIMEOUT),
                Protocol::Udp => self.h.lab().udp_ask(from.ns, from.name, to, PROBE_TIMEOUT),
            };
            match answer {
                Ok(who) => return Ok(who),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }

    /// Traces `from -> to`, sends the real thing, and checks they agree: a trace that
    /// ends `delivered` to pod P is a real answer from P; anything else is no answer.
    fn agree(&self, case: &str, from: PodId, to: SocketAddrV4, proto: Protocol) -> Value {
        let t = self.trace(from, to, proto);
        let real = self.real(from, to, proto);
        let delivered = t["verdict"] == "delivered";
        match &real {
            Ok(who) => {
                assert!(
                    delivered,
                    "{case}: {who} answered, but trace says {}:\n{t:#}",
                    t["summary"]
                );
                assert_eq!(
                    t["destination"]["pod"],
                    who.as_str(),
                    "{case}: delivered to another pod:\n{t:#}"
                );
            }
            Err(e) => {
                assert!(!delivered, "{case}: no answer ({e}), but trace says delivered:\n{t:#}")
            }
        }
        assert_eq!(
            t["agrees"], true,
            "{case}: the maps do not explain the kernel's action:\n{t:#}"
        );
        eprintln!("{case}: {}", t["summary"]);
        t
    }
}

fn inspect_with(lab: &nodeplane_lab::Lab, bpffs: &Path, args: &[&str]) -> Output {
    let mut argv: Vec<String> = vec![
        "inspect".into(),
        "--bpffs-dir".into(),
        bpffs.display().to_string(),
        "--state-dir".into(),
        lab.agent_state_dir().display().to_string(),
    ];
    argv.extend(args.iter().map(|a| a.to_string()));
    netns::enter_command(&lab.node_netns(), bin("NODEPLANE_AGENT_BIN"), &argv)
        .unwrap_or_else(|e| panic!("entering the node netns: {e}"))
        .output()
        .unwrap_or_else(|e| panic!("running inspect: {e}"))
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "inspect printed no JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn trace_agrees_with_real_packets_and_the_other_views_name_what_they_show() {
    let lab = InspectLab::start();
    let h = &lab.h;
    let web = |port: u16| SocketAddrV4::new(h.web(), port);
    let empty_ip = h.lab().service_ip("x", "empty").unwrap_or_else(|e| panic!("{e:#}"));

    // Allowed through a Service: y/b -> x/web:8080 (x/a:80), allowed by x/a-from-y.
    let t = lab.agree("allowed through a Service", YB, web(8080), Protocol::Tcp);
    assert_eq!(t["verdict"], "delivered");
    assert_eq!(t["service"]["service"], "x/web");
    assert_eq!(t["backend"], SocketAddrV4::new(h.ip(XA), 80).to_string());
    assert_eq!(t["backend_pod"], "x/a");
    let hops: Vec<&str> =
        t["hops"].as_array().unwrap().iter().map(|h| h["program"].as_str().unwrap()).collect();
    assert_eq!(hops, ["from_pod", "to_pod"]);
    assert_eq!(t["hops"][0]["reason"], "nat-new");
    let ingress = &t["policy"][1];
    assert_eq!((&ingress["direction"], &ingress["verdict"]), (&"ingress".into(), &"allow".into()));
    assert_eq!(ingress["allowed_by"][0], "x/a-from-y ingress[0]");
    assert_eq!(t["conntrack_removed"].as_u64().map(|n| n >= 2), Some(true), "{t:#}");

    // Denied by policy, through the Service (z is not allowed) and pod to pod (x/b).
    for (case, from, to, proto) in [
        ("denied through a Service", ZA, web(8080), Protocol::Tcp),
        ("denied pod to pod", XB, SocketAddrV4::new(h.ip(XA), 80), Protocol::Tcp),
        ("denied: UDP is not in the rule", YB, web(8080), Protocol::Udp),
    ] {
        let t = lab.agree(case, from, to, proto);
        assert_eq!(
            (&t["verdict"], &t["reason"]),
            (&"dropped".into(), &"policy-denied".into()),
            "{case}: {t:#}"
        );
        assert_eq!(t["hops"][1]["program"], "to_pod", "{case}: x/a's ingress drops it");
        let deny = &t["policy"][1];
        assert_eq!(deny["verdict"], "deny", "{case}");
        let policies: Vec<&str> =
            deny["policies"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
        assert!(policies.contains(&"x/deny-ingress"), "{case}: {policies:?}");
    }

    // Allowed UDP pod to pod into a namespace without policy.
    let t = lab.agree("allowed UDP pod to pod", YB, SocketAddrV4::new(h.ip(ZA), 80), Protocol::Udp);
    assert_eq!((&t["verdict"], &t["service"]), (&"delivered".into(), &Value::Null));

    // No Service at that address: passed untranslated, and nothing answers.
    let nowhere = SocketAddrV4::new(naming::service_ip(h.lab().slot(), 200), 80);
    let t = lab.agree("no Service at that address", YB, nowhere, Protocol::Tcp);
    assert_eq!(
        (&t["verdict"], &t["service"], &t["backend"]),
        (&"forwarded".into(), &Value::Null, &Value::Null)
    );
    assert_eq!(t["hops"][0]["reason"], "pass-not-service");

    // A Service without backends: rejected by from_pod (the client gets a RST), said plainly.
    let t =
        lab.agree("a Service with no backends", YB, SocketAddrV4::new(empty_ip, 80), Protocol::Tcp);
    assert_eq!((&t["verdict"], &t["reason"]), (&"rejected".into(), &"reject-tcp".into()), "{t:#}");
    assert_eq!(t["hops"][0]["action"], "reject", "{t:#}");
    assert_eq!(t["backend"], Value::Null, "{t:#}");
    assert_eq!(t["service"]["service"], "x/empty");
    assert!(t["summary"].as_str().unwrap().contains("no backends"), "{t:#}");

    // The table form says the same.
    let out = lab.inspect(&["trace", "--from", "y/b", "--to", &format!("{empty_ip}:80")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("verdict:  REJECTED") && text.contains("no backends"),
        "{text}"
    );

    // `services`: every frontend of x/web with x/a behind it, and x/empty without backends.
    let out = lab.inspect(&["services", "-o", "json"]);
    let services = json(&out);
    let frontends = services["frontends"].as_array().unwrap();
    let web_frontends: Vec<&Value> = frontends.iter().filter(|f| f["service"] == "x/web").collect();
    let mut ports: Vec<(u64, String)> = web_frontends
        .iter()
        .map(|f| (f["port"].as_u64().unwrap(), f["protocol"].as_str().unwrap().to_string()))
        .collect();
    ports.sort();
    assert_eq!(
        ports,
        [(8080, "TCP".into()), (8080, "UDP".into()), (8081, "TCP".into()), (8081, "UDP".into())]
    );
    for f in &web_frontends {
        let backends = f["backends"].as_array().unwrap();
        assert_eq!(backends.len(), 1, "{f:#}");
        let b = &backends[0];
        assert_eq!(
            (&b["ip"], &b["pod"], &b["slots"]),
            (&h.ip(XA).to_string().into(), &"x/a".into(), &1.into()),
            "{f:#}"
        );
        assert_eq!(b["port"], f["port"].as_u64().unwrap() - 8000, "target ports 80 and 81: {f:#}");
        assert_eq!(f["vip"], h.web().to_string());
    }
    let empty: Vec<&Value> = frontends.iter().filter(|f| f["service"] == "x/empty").collect();
    assert_eq!(empty.len(), 1);
    assert_eq!(
        (&empty[0]["slots"], empty[0]["backends"].as_array().map(Vec::len)),
        (&0.into(), Some(0))
    );
    let out = lab.inspect(&["services"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("SERVICE")
            && text.contains("x/web")
            && text.contains("(no backends: rejected)"),
        "{text}"
    );

    // `policy`: x/a is isolated for ingress by both policies, and allows y on TCP 80.
    let p = json(&lab.inspect(&["policy", "x/a", "-o", "json"]));
    assert_eq!((&p["local"], &p["ip"]), (&true.into(), &h.ip(XA).to_string().into()));
    let ingress = &p["ingress"];
    assert_eq!(ingress["isolated"], true);
    let policies: Vec<&str> =
        ingress["policies"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert_eq!(policies, ["x/a-from-y", "x/deny-ingress"]);
    assert!(
        ingress["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["protocol"] == "TCP" && r["ports"] == "80"),
        "{p:#}"
    );
    assert_eq!(p["egress"]["isolated"], false);

    // `nat` shows a real connection's translation (its entries live 10 s after the close).
    let client = h.ip(YB);
    lab.real(YB, web(8080), Protocol::Tcp).expect("y/b reaches x/web");
    let n = json(&lab.inspect(&["nat", "--ip", &client.to_string(), "-o", "json"]));
    let translated = n["translations"].as_array().unwrap().iter().any(|e| {
        e["frontend"] == web(8080).to_string()
            && e["backend"] == SocketAddrV4::new(h.ip(XA), 80).to_string()
            && e["service"] == "x/web"
    });
    assert!(translated, "no translation of y/b -> x/web:8080 in {n:#}");
    let c = json(&lab.inspect(&[
        "conntrack",
        "--ip",
        &client.to_string(),
        "--port",
        "8080",
        "-o",
        "json",
    ]));
    assert!(c["service"].as_array().unwrap().iter().any(|e| e["direction"] == "original"), "{c:#}");
    // No trace left a conntrack entry behind (their source ports are 61000-65535).
    let all = json(&lab.inspect(&["conntrack", "--all", "-o", "json"]));
    for e in all["service"].as_array().unwrap().iter().chain(all["policy"].as_array().unwrap()) {
        let sport = e["src"].as_str().unwrap().parse::<SocketAddrV4>().unwrap().port();
        let dport = e["dst"].as_str().unwrap().parse::<SocketAddrV4>().unwrap().port();
        assert!(sport < 61000 && dport < 61000, "a trace's conntrack entry was left: {e:#}");
    }
}

#[test]
fn an_empty_or_missing_pin_directory_is_a_clear_error() {
    let h = Harness::start();
    let lab = h.lab();
    let empty =
        Path::new("/sys/fs/bpf").join(format!("nodeplane-inspect-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).expect("an empty directory on bpffs");
    for (dir, args, want) in [
        (empty.as_path(), &["services"][..], "nothing is pinned under"),
        (
            empty.as_path(),
            &["trace", "--from", "10.0.0.1", "--to", "10.0.0.2:80"][..],
            "nothing is pinned under",
        ),
        (
            Path::new("/sys/fs/bpf/nodeplane-no-such-dir"),
            &["conntrack"][..],
            "nothing is pinned under",
        ),
        (Path::new("/tmp"), &["nat"][..], "not on a bpf filesystem"),
    ] {
        let out = inspect_with(lab, dir, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{dir:?} {args:?} succeeded");
        assert!(err.contains(want) && err.contains("--bpffs-dir"), "{dir:?} {args:?}: {err}");
    }
    let _ = std::fs::remove_dir(&empty);
    // The lab's own directory works, and a pod given by a name it does not know is a
    // usage error, not a crash.
    let out = inspect_with(lab, &lab.bpffs_dir(), &["policy", "x/nobody"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no pod x/nobody"));
    let _: Ipv4Addr = h.ip(XA);
}
