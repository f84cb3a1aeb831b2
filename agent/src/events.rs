//! Kubernetes Events about this node's agent, as kube-proxy records them on its Node
//! (`kubectl describe node` shows them): start, first sync, failed syncs, broken watches.
//!
//! Events are about the node only, never about the Services or slices the agent skips: with
//! one agent per node, a bad Service would otherwise get one Event from every node. Those
//! problems are logged and counted (`nodeplane_skipped_objects`) instead.
//!
//! Publishing never blocks the control loop: events go through a small queue to a task, and
//! are dropped (with a debug log) when it is full or the API server is unreachable.
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use tokio::sync::mpsc;
use tracing::debug;

/// The API group, resource and verbs the recorder uses (kube's `Recorder` creates
/// `events.k8s.io/v1` Events and patches them into a series when they repeat): exactly what
/// the ClusterRole grants besides [`WATCHED`](crate::source::WATCHED).
pub const RECORDED: (&str, &str, [&str; 2]) = ("events.k8s.io", "events", ["create", "patch"]);

/// A handle to record Events on this agent's Node.
#[derive(Clone, Debug)]
pub struct NodeEvents {
    tx: Option<mpsc::Sender<Event>>,
}

impl NodeEvents {
    /// Records nothing (the file source has no API server to record to).
    pub fn disabled() -> Self {
        Self { tx: None }
    }

    /// Starts the publishing task.
    pub fn start(client: Client, node_name: &str) -> Self {
        let (tx, mut rx) = mpsc::channel::<Event>(32);
        let reporter =
            Reporter { controller: "nodeplane".into(), instance: Some(node_name.into()) };
        let recorder = Recorder::new(client, reporter);
        let node = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node_name.into()),
            // kube-proxy's convention: a Node's events reference it by name as its UID.
            uid: Some(node_name.into()),
            ..Default::default()
        };
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                if let Err(e) = recorder.publish(&event, &node).await {
                    debug!(error = %e, reason = %event.reason, "could not record an event");
                }
            }
        });
        Self { tx: Some(tx) }
    }

    pub fn normal(&self, reason: &str, note: String) {
        self.emit(EventType::Normal, reason, note);
    }

    pub fn warning(&self, reason: &str, note: String) {
        self.emit(EventType::Warning, reason, note);
    }

    fn emit(&self, type_: EventType, reason: &str, note: String) {
        let Some(tx) = &self.tx else { return };
        let event = Event {
            type_,
            reason: reason.into(),
            // The API limits notes to 1 kB.
            note: Some(note.chars().take(1000).collect()),
            action: reason.into(),
            secondary: None,
        };
        if tx.try_send(event).is_err() {
            debug!(%reason, "event queue full; dropping the event");
        }
    }
}
