//! Health as kube-proxy reports it, for the kubelet's probes.
//!
//! - `/healthz` is 200 once the first full sync has been programmed and while programming
//!   keeps up; 503 before that and whenever a cluster change has waited longer than the
//!   timeout to reach the maps (a stuck or failing agent gets restarted by its liveness
//!   probe). A stale *source* (API server unreachable) does not fail it: nothing is pending,
//!   the datapath is right for what the agent knows, and a restart would not help.
//! - `/readyz` is 200 once every watched kind has finished its initial list and a sync after
//!   that has been written: before that the maps may lack Services that exist.
use std::{
    collections::BTreeSet,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::source::Kind;

/// What the health endpoints answer from; updated by the agent loop.
#[derive(Debug)]
pub struct Health {
    timeout: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Kinds whose complete set has been received (a `Reset`).
    listed: BTreeSet<Kind>,
    /// Whether a sync has succeeded since the last kind was first listed.
    ready: bool,
    first_sync: Option<Instant>,
    last_sync: Option<Instant>,
    /// The oldest change received and not yet programmed.
    pending_since: Option<Instant>,
}

/// An answer: the HTTP status to give and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    pub detail: String,
}

impl Health {
    pub fn new(timeout: Duration) -> Self {
        Self { timeout, state: Mutex::new(State::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A complete set of `kind` was received.
    pub fn listed(&self, kind: Kind) {
        let mut s = self.lock();
        if s.listed.insert(kind) {
            s.ready = false;
        }
    }

    /// Whether every kind has been listed once.
    pub fn all_listed(&self) -> bool {
        let s = self.lock();
        Kind::ALL.iter().all(|k| s.listed.contains(k))
    }

    /// A change received at `at` is waiting to be programmed.
    pub fn pending(&self, at: Instant) {
        let mut s = self.lock();
        s.pending_since = Some(s.pending_since.map_or(at, |p| p.min(at)));
    }

    /// Everything received so far has been programmed.
    pub fn synced(&self, at: Instant) {
        let mut s = self.lock();
        s.pending_since = None;
        s.first_sync.get_or_insert(at);
        s.last_sync = Some(at);
        s.ready = Kind::ALL.iter().all(|k| s.listed.contains(k));
    }

    pub fn healthz(&self, now: Instant) -> Verdict {
        let s = self.lock();
        let Some(last) = s.last_sync else {
            return Verdict { ok: false, detail: "no sync programmed yet".into() };
        };
        let since_sync = now.saturating_duration_since(last).as_secs_f64();
        match s.pending_since {
            Some(p) if now.saturating_duration_since(p) > self.timeout => Verdict {
                ok: false,
                detail: format!(
                    "changes pending for {:.1}s (timeout {}s); last sync {since_sync:.1}s ago",
                    now.saturating_duration_since(p).as_secs_f64(),
                    self.timeout.as_secs()
                ),
            },
            _ => Verdict { ok: true, detail: format!("ok; last sync {since_sync:.1}s ago") },
        }
    }

    pub fn readyz(&self) -> Verdict {
        let s = self.lock();
        let missing: Vec<&str> =
            Kind::ALL.iter().filter(|k| !s.listed.contains(k)).map(|k| k.as_str()).collect();
        if !missing.is_empty() {
            return Verdict {
                ok: false,
                detail: format!("waiting for the initial list of {}", missing.join(", ")),
            };
        }
        if !s.ready {
            return Verdict { ok: false, detail: "waiting for the first full sync".into() };
        }
        Verdict { ok: true, detail: "ok".into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_needs_a_first_sync_and_fails_when_changes_wait_too_long() {
        let h = Health::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(!h.healthz(t0).ok);
        h.synced(t0);
        assert!(h.healthz(t0).ok);
        h.pending(t0 + Duration::from_secs(1));
        assert!(h.healthz(t0 + Duration::from_secs(5)).ok, "pending, within the timeout");
        let v = h.healthz(t0 + Duration::from_secs(12));
        assert!(!v.ok && v.detail.contains("pending"), "{v:?}");
        h.synced(t0 + Duration::from_secs(13));
        assert!(h.healthz(t0 + Duration::from_secs(100)).ok, "idle is healthy");
    }

    #[test]
    fn readyz_needs_every_kind_listed_then_a_sync() {
        let h = Health::new(Duration::from_secs(10));
        let t0 = Instant::now();
        for kind in &Kind::ALL[..Kind::ALL.len() - 1] {
            h.listed(*kind);
        }
        h.synced(t0);
        let v = h.readyz();
        assert!(!v.ok && v.detail.contains(Kind::ALL.last().unwrap().as_str()), "{v:?}");
        h.listed(*Kind::ALL.last().unwrap());
        assert!(!h.readyz().ok, "listed but not yet synced");
        h.synced(t0);
        assert!(h.readyz().ok);
        h.listed(Kind::Pod);
        assert!(h.readyz().ok, "a relist does not make the agent unready");
    }
}
