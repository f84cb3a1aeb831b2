//! The pod server: answers with the pod's name on every container port (or with the
//! pod's [`ANSWER_ANNOTATION`], so pods of the same name in different namespaces can be
//! told apart).
//!
//! TCP: on accept it writes `<name>\n`, then `<name>\n` again for every line it reads,
//! until EOF, so a test can hold one connection and keep asking (and see which backend
//! a long-lived flow stays on). UDP: `<name>\n` for every datagram.
//!
//! Resources are bounded: at most [`MAX_CONNECTIONS`] TCP connections at once (more are
//! closed on accept), lines are read at most [`MAX_LINE`] bytes at a time (a longer line
//! gets one reply per chunk), and a connection idle for [`IDLE_TIMEOUT`] is closed.
use std::{
    fmt,
    io::{self, BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;

use crate::process;

/// Pod annotation naming what the server answers instead of the pod's name.
pub const ANSWER_ANNOTATION: &str = "lab.nodeplane.io/answer";

pub const MAX_CONNECTIONS: usize = 256;
pub const MAX_LINE: u64 = 4096;
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How often a server with an owner checks that the owner still lives.
const OWNER_POLL: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("binding {protocol} port {port}: {source}")]
    Bind { protocol: Protocol, port: u16, source: io::Error },
    #[error("starting a thread: {0}")]
    Thread(io::Error),
}

/// What one pod serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServeConfig {
    pub name: String,
    pub tcp: Vec<u16>,
    pub udp: Vec<u16>,
}

impl ServeConfig {
    /// The pod's container ports, by protocol, sorted and deduplicated. SCTP and
    /// out-of-range ports are left out. The answer is the pod's [`ANSWER_ANNOTATION`] if
    /// it has one, its name otherwise.
    pub fn for_pod(pod: &Pod) -> Self {
        let annotations = pod.metadata.annotations.as_ref();
        let answer = annotations.and_then(|a| a.get(ANSWER_ANNOTATION));
        let mut cfg = ServeConfig {
            name: answer.or(pod.metadata.name.as_ref()).cloned().unwrap_or_default(),
            ..Default::default()
        };
        let containers = pod.spec.iter().flat_map(|s| &s.containers);
        for port in containers.flat_map(|c| c.ports.iter().flatten()) {
            let Ok(number) = u16::try_from(port.container_port) else { continue };
            match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => cfg.tcp.push(number),
                "UDP" => cfg.udp.push(number),
                _ => {}
            }
        }
        for ports in [&mut cfg.tcp, &mut cfg.udp] {
            ports.sort_unstable();
            ports.dedup();
        }
        cfg
    }

    pub fn has_ports(&self) -> bool {
        !self.tcp.is_empty() || !self.udp.is_empty()
    }

    /// Arguments of `nodeplane-lab serve` for this config.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["serve".to_string(), "--name".into(), self.name.clone()];
        for (flag, ports) in [("--tcp", &self.tcp), ("--udp", &self.udp)] {
            for port in ports {
                args.extend([flag.to_string(), port.to_string()]);
            }
        }
        args
    }

    fn reply(&self) -> Arc<[u8]> {
        format!("{}\n", self.name).into_bytes().into()
    }
}

/// Serves until killed, or until `owner` (a PID) exits when given: then a lab whose test
/// process crashed does not leave servers running until the next reap.
pub fn serve(cfg: &ServeConfig, owner: Option<u32>) -> Result<(), ServeError> {
    let any = |port| SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
    let bind_err = |protocol, port| move |source| ServeError::Bind { protocol, port, source };
    let listeners: Vec<TcpListener> = cfg
        .tcp
        .iter()
        .map(|&p| TcpListener::bind(any(p)).map_err(bind_err(Protocol::Tcp, p)))
        .collect::<Result<_, _>>()?;
    let sockets: Vec<UdpSocket> = cfg
        .udp
        .iter()
        .map(|&p| UdpSocket::bind(any(p)).map_err(bind_err(Protocol::Udp, p)))
        .collect::<Result<_, _>>()?;
    let active = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for listener in listeners {
        let (reply, active) = (cfg.reply(), active.clone());
        workers.push(spawn("tcp-accept", move || accept_loop(&listener, &reply, &active))?);
    }
    for socket in sockets {
        let reply = cfg.reply();
        workers.push(spawn("udp", move || udp_loop(&socket, &reply))?);
    }
    eprintln!("serving {:?}: tcp {:?} udp {:?}", cfg.name, cfg.tcp, cfg.udp);
    match owner {
        Some(pid) => {
            while process::alive(pid) {
                thread::sleep(OWNER_POLL);
            }
            eprintln!("owner {pid} is gone; exiting");
        }
        None => workers.into_iter().for_each(|w| drop(w.join())),
    }
    Ok(())
}

fn spawn(
    name: &str,
    f: impl FnOnce() + Send + 'static,
) -> Result<thread::JoinHandle<()>, ServeError> {
    thread::Builder::new().name(name.into()).spawn(f).map_err(ServeError::Thread)
}

fn accept_loop(listener: &TcpListener, reply: &Arc<[u8]>, active: &Arc<AtomicUsize>) {
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(stream) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("accept: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let (reply, active) = (reply.clone(), active.clone());
        let spawned = thread::Builder::new().name("tcp-conn".into()).spawn(move || {
            if let Err(e) = answer_tcp(stream, &reply) {
                eprintln!("connection: {e}");
            }
            active.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            eprintln!("connection thread: {e}");
        }
    }
}

fn answer_tcp(mut stream: TcpStream, reply: &[u8]) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_nodelay(true)?;
    stream.write_all(reply)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = Vec::new();
    // Ends at EOF, on error, or after IDLE_TIMEOUT without a line.
    loop {
        line.clear();
        if (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        stream.write_all(reply)?;
    }
}

fn udp_loop(socket: &UdpSocket, reply: &[u8]) {
    let mut buf = [0u8; 2048];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                if let Err(e) = socket.send_to(reply, peer) {
                    eprintln!("udp reply to {peer}: {e}");
                }
            }
            Err(e) => {
                eprintln!("udp recv: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// The first port of `cfg` that does not answer with the name over loopback, if any.
/// Runs in the caller's netns; the lab calls it from inside the pod.
pub fn first_silent_port(cfg: &ServeConfig, timeout: Duration) -> Option<(Protocol, u16)> {
    let local = |port| SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    let tcp = cfg.tcp.iter().map(|&p| (Protocol::Tcp, p, tcp_ask(local(p), timeout)));
    let udp = cfg.udp.iter().map(|&p| (Protocol::Udp, p, udp_ask(local(p), timeout)));
    tcp.chain(udp)
        .find(|(_, _, answer)| answer.as_deref().ok() != Some(cfg.name.as_str()))
        .map(|(protocol, port, _)| (protocol, port))
}

/// Connects, reads the first line and returns it trimmed.
pub fn tcp_ask(addr: SocketAddrV4, timeout: Duration) -> io::Result<String> {
    let stream = TcpStream::connect_timeout(&addr.into(), timeout)?;
    read_name(&stream, timeout)
}

/// Reads one line (the server's greeting or reply) from `stream`, trimmed.
pub fn read_name(stream: &TcpStream, timeout: Duration) -> io::Result<String> {
    stream.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    BufReader::new(stream.take(MAX_LINE)).read_line(&mut line)?;
    Ok(line.trim().to_string())
}

/// Sends one datagram and returns the reply, trimmed.
pub fn udp_ask(addr: SocketAddrV4, timeout: Duration) -> io::Result<String> {
    let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    socket.set_read_timeout(Some(timeout))?;
    socket.connect(addr)?;
    socket.send(b"who?\n")?;
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        // Bind port 0 on both protocols so the number is free for both; collisions with
        // other tests between this and the server's bind are possible but unlikely.
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let port = tcp.local_addr().expect("addr").port();
        drop(tcp);
        port
    }

    #[test]
    fn answers_name_on_tcp_lines_and_udp_datagrams() {
        let (tcp, udp) = (free_port(), free_port());
        let cfg = ServeConfig { name: "web-1".into(), tcp: vec![tcp], udp: vec![udp] };
        let server_cfg = cfg.clone();
        // Owned by this test process, so it ends with it; the thread is leaked on purpose.
        thread::spawn(move || serve(&server_cfg, Some(std::process::id())));
        let timeout = Duration::from_secs(2);
        let mut silent = first_silent_port(&cfg, timeout);
        for _ in 0..50 {
            if silent.is_none() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
            silent = first_silent_port(&cfg, timeout);
        }
        assert_eq!(silent, None);

        let mut stream = TcpStream::connect(("127.0.0.1", tcp)).expect("connect");
        assert_eq!(read_name(&stream, timeout).expect("greeting"), "web-1");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        for _ in 0..3 {
            stream.write_all(b"again\n").expect("write");
            let mut line = String::new();
            reader.read_line(&mut line).expect("reply");
            assert_eq!(line, "web-1\n");
        }
        assert_eq!(
            udp_ask(SocketAddrV4::new(Ipv4Addr::LOCALHOST, udp), timeout).expect("udp"),
            "web-1"
        );
    }

    #[test]
    fn config_from_pod_ports_and_args() {
        let pod: Pod = serde_yaml::from_str(
            "metadata: {name: web-0}\nspec:\n  containers:\n  - name: a\n    ports:\n    \
             - {containerPort: 8080}\n    - {containerPort: 53, protocol: UDP}\n  - name: b\n    \
             ports:\n    - {containerPort: 8080, protocol: TCP}\n    - {containerPort: 9, protocol: SCTP}\n",
        )
        .expect("pod");
        let cfg = ServeConfig::for_pod(&pod);
        assert_eq!(cfg, ServeConfig { name: "web-0".into(), tcp: vec![8080], udp: vec![53] });
        assert_eq!(cfg.args(), ["serve", "--name", "web-0", "--tcp", "8080", "--udp", "53"]);
    }

    #[test]
    fn the_answer_annotation_replaces_the_name() {
        let pod: Pod = serde_yaml::from_str(
            "metadata: {name: a, namespace: x, annotations: {lab.nodeplane.io/answer: x/a}}\n\
             spec: {containers: [{name: c, ports: [{containerPort: 80}]}]}\n",
        )
        .expect("pod");
        assert_eq!(ServeConfig::for_pod(&pod).name, "x/a");
    }
}
