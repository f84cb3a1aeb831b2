//! Hairpin end to end in the netns lab: the only pod behind a Service calls its own Service
//! and gets its own answer over TCP and UDP (DNAT to itself plus SNAT to `HAIRPIN_ADDR_V4`
//! in `from_pod`, its reply routed back out of its veth and restored to `VIP:port`), while a
//! second pod's requests to the same Service still work. Needs root and the binaries built
//! by `cargo xtask test` (NODEPLANE_AGENT_BIN, NODEPLANE_LAB_BIN).
use std::{
    io::{self, Read},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

use nodeplane_tests::cluster::Cluster;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: hp}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: hp, labels: {app: web}}
spec:
  containers:
  - name: web
    image: nodeplane/echo
    ports:
    - {name: http, containerPort: 8080, protocol: TCP}
    - {name: dns, containerPort: 5353, protocol: UDP}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: hp, labels: {app: client}}
spec:
  containers:
  - {name: client, image: nodeplane/client}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: hp}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
"#;

const ATTEMPT: Duration = Duration::from_secs(3);
const CONVERGE: Duration = Duration::from_secs(20);

/// A TCP connection from `pod` to `to`: the first line the server sends (its pod name) and
/// the peer address the pod's socket saw.
fn tcp(c: &Cluster, pod: &str, to: SocketAddrV4) -> io::Result<(String, SocketAddr)> {
    c.in_pod("hp", pod, || {
        let mut s = TcpStream::connect_timeout(&to.into(), ATTEMPT)?;
        s.set_read_timeout(Some(ATTEMPT))?;
        let peer = s.peer_addr()?;
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf)?;
        let line = String::from_utf8_lossy(&buf[..n]);
        Ok((line.lines().next().unwrap_or_default().trim().to_string(), peer))
    })
    .map_err(io::Error::other)?
}

/// One datagram on a *connected* UDP socket from `pod` (the kernel delivers only datagrams
/// from `to` to it): the answer.
fn udp(c: &Cluster, pod: &str, to: SocketAddrV4) -> io::Result<String> {
    c.in_pod("hp", pod, || {
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        socket.set_read_timeout(Some(ATTEMPT))?;
        socket.connect(to)?;
        socket.send(b"who?\n")?;
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
    })
    .map_err(io::Error::other)?
}

#[test]
fn the_only_backend_reaches_itself_through_its_service_and_others_still_do() {
    let c = Cluster::up(&[("hairpin.yaml", CLUSTER)], &[]);
    let ip = c.service_ip("hp", "web").unwrap_or_else(|e| panic!("service IP: {e:#}"));
    let (http, dns) = (SocketAddrV4::new(ip, 80), SocketAddrV4::new(ip, 53));
    c.wait_until("the Service answers the client pod", CONVERGE, || {
        tcp(&c, "client", http).is_ok()
    });

    for i in 0..10 {
        let (who, peer) = tcp(&c, "web", http).unwrap_or_else(|e| panic!("hairpin TCP {i}: {e}"));
        assert_eq!(who, "web", "hairpin TCP {i}: answered by the pod itself");
        assert_eq!(peer, SocketAddr::V4(http), "hairpin TCP {i}: the socket's peer is the VIP");
        let who = udp(&c, "web", dns).unwrap_or_else(|e| panic!("hairpin UDP {i}: {e}"));
        assert_eq!(who, "web", "hairpin UDP {i}");
    }
    for i in 0..5 {
        let (who, _) = tcp(&c, "client", http).unwrap_or_else(|e| panic!("client TCP {i}: {e}"));
        assert_eq!(who, "web", "client TCP {i}");
        let who = udp(&c, "client", dns).unwrap_or_else(|e| panic!("client UDP {i}: {e}"));
        assert_eq!(who, "web", "client UDP {i}");
    }
}

/// Deny-all ingress and egress for the backend pod (the client pod is not selected).
const DENY_WEB: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-web, namespace: hp}
spec: {podSelector: {matchLabels: {app: web}}, policyTypes: [Ingress, Egress]}
";

/// The documented decision (docs/ARCHITECTURE.md, "A pod talking to itself"): a pod
/// isolated in both directions with no rule still reaches itself through its Service,
/// while the other pod's requests are denied at its ingress.
#[test]
fn a_pod_isolated_by_policy_still_reaches_itself_but_others_are_denied() {
    let c = Cluster::up(&[("hairpin.yaml", CLUSTER), ("deny.yaml", DENY_WEB)], &[]);
    let ip = c.service_ip("hp", "web").unwrap_or_else(|e| panic!("service IP: {e:#}"));
    let (http, dns) = (SocketAddrV4::new(ip, 80), SocketAddrV4::new(ip, 53));
    c.wait_until("the pod reaches itself", CONVERGE, || tcp(&c, "web", http).is_ok());
    c.wait_until("the policy denies the client", CONVERGE, || tcp(&c, "client", http).is_err());

    for i in 0..5 {
        let (who, peer) = tcp(&c, "web", http).unwrap_or_else(|e| panic!("hairpin TCP {i}: {e}"));
        assert_eq!((who.as_str(), peer), ("web", SocketAddr::V4(http)), "hairpin TCP {i}");
        let who = udp(&c, "web", dns).unwrap_or_else(|e| panic!("hairpin UDP {i}: {e}"));
        assert_eq!(who, "web", "hairpin UDP {i}");
    }
    assert!(udp(&c, "client", dns).is_err(), "the client's UDP request is denied");
}
