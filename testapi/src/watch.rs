//! One watch response: newline-delimited JSON events on a chunked HTTP body.
//!
//! ```text
//!  backlog (replay after R, or current objects as ADDED [+ initial-events-end BOOKMARK])
//!     then loop { live change from the feed | BOOKMARK every interval | timeoutSeconds }
//! ```
//!
//! How a stream ends, and what the client sees:
//!
//! | cause                                  | end                                               |
//! |----------------------------------------|---------------------------------------------------|
//! | `timeoutSeconds` elapsed               | clean end of the chunked body                     |
//! | resourceVersion older than compaction  | one ERROR event (Status 410 Expired), clean end   |
//! | fell behind the feed by its capacity   | clean end; the client resumes from its last RV    |
//! | `drop_connections`, `set_unavailable`  | the connection is aborted mid-body                |
use std::{collections::VecDeque, io, sync::Arc, time::Duration};

use axum::body::Bytes;
use futures::Stream;
use tokio::{
    sync::broadcast::{self, error::RecvError},
    time::Instant,
};

use crate::{
    resource::{ResourceDef, ResourceId, def},
    store::{Backlog, Change, EventType, Feed, Filter, Gone, Object, Store, WatchStart},
};

/// Lines are gathered into chunks of about this size when replaying.
const CHUNK: usize = 64 * 1024;

enum Pending {
    Initial(Arc<Object>),
    Change(Arc<Change>),
    Line(Bytes),
}

/// What the client asked for, beyond the filter.
pub(crate) struct WatchOptions {
    pub bookmarks: bool,
    pub timeout: Option<Duration>,
    /// `sendInitialEvents=true`: end the initial ADDEDs with the marker bookmark.
    pub initial_events: bool,
}

pub(crate) struct WatchStream {
    store: Arc<Store>,
    def: &'static ResourceDef,
    resource: ResourceId,
    filter: Filter,
    backlog: VecDeque<Pending>,
    /// `None` for a stream that only sends its backlog (the 410 ERROR).
    rx: Option<broadcast::Receiver<Feed>>,
    /// Every change up to here has been sent or filtered out (or is in the backlog).
    seen_rv: u64,
    bookmarks: bool,
    next_bookmark: Instant,
    deadline: Option<Instant>,
    done: bool,
}

fn bookmark_line(def: &ResourceDef, rv: u64, initial_events_end: bool) -> Bytes {
    let annotations = if initial_events_end {
        r#","annotations":{"k8s.io/initial-events-end":"true"}"#
    } else {
        ""
    };
    Bytes::from(
        format!(
            r#"{{"type":"BOOKMARK","object":{{"kind":"{}","apiVersion":"{}","metadata":{{"resourceVersion":"{rv}"{annotations}}}}}}}"#,
            def.kind, def.api_version,
        ) + "\n",
    )
}

/// The ERROR event a real server sends when the watch's resourceVersion is compacted away.
fn gone_line(gone: &Gone, requested: u64) -> Bytes {
    let status = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": format!(
            "too old resource version: {requested} ({})", gone.compacted
        ),
        "reason": "Expired",
        "code": 410,
    });
    let mut line = serde_json::to_vec(&serde_json::json!({"type": "ERROR", "object": status}))
        .expect("a JSON value serializes");
    line.push(b'\n');
    Bytes::from(line)
}

impl WatchStream {
    pub fn new(
        store: Arc<Store>,
        resource: ResourceId,
        filter: Filter,
        start: Result<WatchStart, (Gone, u64)>,
        options: &WatchOptions,
    ) -> Self {
        let def = def(resource);
        let now = Instant::now();
        let mut stream = Self {
            next_bookmark: now + store.bookmark_interval(),
            store,
            def,
            resource,
            filter,
            backlog: VecDeque::new(),
            rx: None,
            seen_rv: 0,
            bookmarks: options.bookmarks,
            deadline: options.timeout.map(|t| now + t),
            done: false,
        };
        match start {
            Err((gone, requested)) => {
                stream.backlog.push_back(Pending::Line(gone_line(&gone, requested)))
            }
            Ok(start) => {
                stream.seen_rv = start.rv;
                stream.rx = Some(start.rx);
                match start.backlog {
                    Backlog::Replay(changes) => {
                        stream.backlog.extend(changes.into_iter().map(Pending::Change));
                    }
                    Backlog::Initial(objects) => {
                        stream.backlog.extend(objects.into_iter().map(Pending::Initial));
                        if options.initial_events {
                            let marker = bookmark_line(def, start.rv, true);
                            stream.backlog.push_back(Pending::Line(marker));
                        }
                    }
                }
            }
        }
        stream
    }

    pub fn into_body(self) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        futures::stream::unfold(self, |mut stream| async move {
            let chunk = stream.next_chunk().await?;
            Some((chunk, stream))
        })
    }

    fn render(&self, pending: Pending) -> Option<Bytes> {
        match pending {
            Pending::Initial(o) => Some(o.line(EventType::Added)),
            Pending::Change(c) => self.filter.render(&c),
            Pending::Line(l) => Some(l),
        }
    }

    fn bookmark(&mut self) -> Bytes {
        self.next_bookmark = Instant::now() + self.store.bookmark_interval();
        // Read the published resourceVersion before looking at the feed: if the feed is
        // empty after that, every change up to it has reached this stream.
        let published = self.store.published_rv();
        if self.rx.as_ref().is_some_and(broadcast::Receiver::is_empty) {
            self.seen_rv = self.seen_rv.max(published);
        }
        bookmark_line(self.def, self.seen_rv, false)
    }

    async fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
        loop {
            if self.done {
                return None;
            }
            if !self.backlog.is_empty() {
                let mut buf = Vec::new();
                while buf.len() < CHUNK {
                    let Some(pending) = self.backlog.pop_front() else { break };
                    if let Some(line) = self.render(pending) {
                        buf.extend_from_slice(&line);
                    }
                }
                if !buf.is_empty() {
                    return Some(Ok(Bytes::from(buf)));
                }
                continue;
            }
            let Some(rx) = self.rx.as_mut() else {
                self.done = true;
                return None;
            };
            let deadline = self.deadline;
            tokio::select! {
                biased;
                feed = rx.recv() => match feed {
                    Ok(Feed::Change(change)) => {
                        self.seen_rv = self.seen_rv.max(change.rv);
                        if change.resource == self.resource {
                            self.backlog.push_back(Pending::Change(change));
                        }
                    }
                    Ok(Feed::Disconnect) => {
                        self.done = true;
                        return Some(Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "testapi dropped the connection",
                        )));
                    }
                    Err(RecvError::Lagged(missed)) => {
                        tracing::debug!(resource = self.def.name, missed, "watcher fell behind, ending its stream");
                        self.done = true;
                        return None;
                    }
                    Err(RecvError::Closed) => {
                        self.done = true;
                        return None;
                    }
                },
                () = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.done = true;
                    return None;
                }
                () = tokio::time::sleep_until(self.next_bookmark), if self.bookmarks => {
                    return Some(Ok(self.bookmark()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    #[test]
    fn bookmark_and_error_lines_are_what_kube_parses() {
        let services = crate::resource::by_name("services").unwrap();
        let line = bookmark_line(def(services), 7, true);
        assert!(line.ends_with(b"\n"));
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["type"], "BOOKMARK");
        assert_eq!(v["object"]["kind"], "Service");
        assert_eq!(v["object"]["metadata"]["resourceVersion"], "7");
        assert_eq!(v["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"], "true");
        let event: kube::core::WatchEvent<k8s_openapi::api::core::v1::Service> =
            serde_json::from_slice(&line).unwrap();
        assert!(
            matches!(event, kube::core::WatchEvent::Bookmark(b) if b.metadata.resource_version == "7")
        );
        let gone = gone_line(&Gone { compacted: 9 }, 3);
        let event: kube::core::WatchEvent<k8s_openapi::api::core::v1::Service> =
            serde_json::from_slice(&gone).unwrap();
        assert!(matches!(event, kube::core::WatchEvent::Error(s) if s.code == 410));
    }
}
