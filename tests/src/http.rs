//! A minimal HTTP/1.1 GET for the agent's endpoints (`/metrics`, `/healthz`, the
//! healthCheckNodePorts): enough for tests, no client library.
use std::{
    io::{self, Read, Write},
    net::{SocketAddrV4, TcpStream},
    time::Duration,
};

/// `GET path` on `addr` with `Connection: close`: the status code and the body. Call it
/// inside the netns the server is reachable from.
pub fn get(addr: SocketAddrV4, path: &str, timeout: Duration) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr.into(), timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.take(16 << 20).read_to_string(&mut text)?;
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    let status =
        status.ok_or_else(|| io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body).to_string();
    Ok((status, body))
}
