//! Objects, the global resourceVersion, the event log and list snapshots.
//!
//! ```text
//!  write / patch / delete ──lock──▶ State ─┬─ objects[resource]: BTreeMap<(ns, name), Arc<Object>>
//!                                          ├─ log: VecDeque<Arc<Change>>   (rv > compacted only)
//!                                          └─ snapshots: paged lists in progress
//!                           └─ same lock ─▶ broadcast::Sender<Feed> ──▶ every open watch
//! ```
//!
//! Every write bumps one global resourceVersion (as etcd's revision does) and serializes the
//! object exactly once, into the watch line `{"type":"ADDED","object":{..}}\n` that the log,
//! the live feed and the object map all share; a list copies the object's slice of that
//! line and a watch sends the line itself. Only a watcher whose selector an update moves the
//! object into or out of gets a line built for it (ADDED or DELETED, as the watch cache does).
//!
//! A change is pushed to the log and sent on the feed while the lock is held, so a watch that
//! subscribes under the same lock sees every change exactly once: those before its start in
//! its replay, those after on the feed.
//!
//! **Compaction.** `compacted` is the oldest resourceVersion a watch may resume from: a
//! watch from `R < compacted` gets 410 Gone. [`Store::compact`] bumps the resourceVersion and
//! moves `compacted` to it, so every token handed out before is expired. Trimming the log to
//! its history limit moves `compacted` to the newest trimmed change.
use std::{
    collections::{BTreeMap, VecDeque},
    ops::Range,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::body::Bytes;
use serde_json::{Map, Value};
use tokio::sync::broadcast;

use crate::{
    resource::{RESOURCES, ResourceDef, ResourceId, def, name_matches},
    selector::{FieldSelector, LabelSelector},
};

/// Changes kept for watch resumption before the oldest are compacted away.
pub(crate) const DEFAULT_HISTORY_LIMIT: usize = 100_000;
/// Live changes a watcher may fall behind by before its stream is ended (it then resumes
/// from its last resourceVersion, replaying from the log).
const FEED_CAPACITY: usize = 1 << 16;
/// Paged lists in progress; the oldest is forgotten (its token expires) past this.
const MAX_SNAPSHOTS: usize = 64;
pub(crate) const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// `{"type":"<TYPE>","object":<json>}\n`, and where the object is in it.
fn watch_line(ty: EventType, json: &[u8]) -> (Bytes, Range<usize>) {
    let prefix = format!(r#"{{"type":"{}","object":"#, ty.as_str());
    let mut line = Vec::with_capacity(prefix.len() + json.len() + 2);
    line.extend_from_slice(prefix.as_bytes());
    line.extend_from_slice(json);
    line.extend_from_slice(b"}\n");
    (Bytes::from(line), prefix.len()..prefix.len() + json.len())
}

/// One version of one object, serialized once.
#[derive(Debug)]
pub(crate) struct Object {
    /// `""` for cluster-scoped objects.
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub created: String,
    pub rv: u64,
    pub labels: BTreeMap<String, String>,
    /// Values of the resource's [`ResourceDef::fields`], for field selectors.
    pub fields: Vec<String>,
    event: EventType,
    line: Bytes,
    object: Range<usize>,
}

impl Object {
    /// The serialized object, with `apiVersion`, `kind` and `metadata.resourceVersion`.
    pub fn json(&self) -> &[u8] {
        &self.line[self.object.clone()]
    }

    pub fn json_bytes(&self) -> Bytes {
        self.line.slice(self.object.clone())
    }

    pub fn value(&self) -> Value {
        serde_json::from_slice(self.json()).expect("a stored object is valid JSON")
    }

    /// The watch line for this object as an event of type `ty`.
    pub fn line(&self, ty: EventType) -> Bytes {
        if ty == self.event { self.line.clone() } else { watch_line(ty, self.json()).0 }
    }
}

/// One entry of the event log.
#[derive(Debug)]
pub(crate) struct Change {
    pub rv: u64,
    pub resource: ResourceId,
    /// The new state (the last state, with the deletion's resourceVersion, for DELETED).
    pub object: Arc<Object>,
    /// The state before a MODIFIED change.
    pub previous: Option<Arc<Object>>,
}

/// What open watches receive.
#[derive(Debug, Clone)]
pub(crate) enum Feed {
    Change(Arc<Change>),
    /// End every stream abruptly.
    Disconnect,
}

/// Which objects of one resource a list or watch wants.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, o: &Object) -> bool {
        self.namespace.as_ref().is_none_or(|ns| *ns == o.namespace)
            && self.labels.matches(&o.labels)
            && self.fields.matches(&o.namespace, &o.name, &o.fields)
    }

    /// The watch line this filter's watcher gets for `change`, if any.
    pub fn render(&self, change: &Change) -> Option<Bytes> {
        let now = self.matches(&change.object);
        let ty = change.object.event;
        match (ty, change.previous.as_ref().map(|p| self.matches(p))) {
            (EventType::Modified, Some(false)) if now => Some(change.object.line(EventType::Added)),
            (EventType::Modified, Some(true)) if !now => {
                Some(change.object.line(EventType::Deleted))
            }
            (EventType::Modified, Some(false)) => None,
            _ if now => Some(change.object.line.clone()),
            _ => None,
        }
    }
}

/// How a write treats an existing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteMode {
    /// POST: fails if it exists.
    Create,
    /// `apply`: create or replace.
    Upsert,
    /// PUT: fails if absent, or if `expected_rv` is given and is not the current one.
    Update { expected_rv: Option<u64> },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WriteError {
    #[error("already exists")]
    AlreadyExists,
    #[error("not found")]
    NotFound,
    #[error("the object has been modified: resourceVersion is {current}")]
    Conflict { current: u64 },
    #[error("metadata.name or metadata.generateName is required")]
    MissingName,
}

/// A continue token that is no longer (or never was) valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ContinueError {
    /// 410: compacted, finished, or forgotten.
    Expired,
    /// 400: not a token this server made.
    Malformed,
}

/// One page of a list.
pub(crate) struct Page {
    pub rv: u64,
    pub items: Vec<Arc<Object>>,
    pub continue_token: Option<String>,
    pub remaining: usize,
}

/// The start of a watch: what to send before live changes, and the feed.
pub(crate) struct WatchStart {
    pub backlog: Backlog,
    pub rx: broadcast::Receiver<Feed>,
    /// Every change up to here is in the backlog or filtered out.
    pub rv: u64,
}

pub(crate) enum Backlog {
    /// Changes after the requested resourceVersion, of this resource, not yet filtered.
    Replay(Vec<Arc<Change>>),
    /// The current objects, already filtered, to send as ADDED.
    Initial(Vec<Arc<Object>>),
}

/// The watch's resourceVersion is older than the last compaction.
#[derive(Debug)]
pub(crate) struct Gone {
    pub compacted: u64,
}

struct Snapshot {
    resource: ResourceId,
    rv: u64,
    items: Arc<[Arc<Object>]>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    lists: u64,
    list_pages: u64,
    watches: u64,
    gets: u64,
    writes: u64,
}

/// Counters of requests served, for assertions. Maps are keyed by resource name
/// (`"services"`, `"endpointslices"`, `"events.events.k8s.io"`) and hold only non-zero counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Every HTTP request, including refused ones.
    pub requests: u64,
    /// List operations started (requests without a `continue` token).
    pub lists: BTreeMap<String, u64>,
    /// Every list request, first pages and continuations.
    pub list_pages: BTreeMap<String, u64>,
    /// Watch requests, including those answered with 410.
    pub watches: BTreeMap<String, u64>,
    /// GETs of single objects.
    pub gets: BTreeMap<String, u64>,
    /// POST, PUT, PATCH and DELETE requests.
    pub writes: BTreeMap<String, u64>,
    /// 410 Gone sent: expired continue tokens and watch ERROR events.
    pub gone: u64,
    /// 503 sent while unavailable or unreachable.
    pub unavailable: u64,
    /// Connections closed unanswered while unreachable.
    pub refused: u64,
}

impl Stats {
    pub fn list_count(&self, resource: &str) -> u64 {
        self.lists.get(resource).copied().unwrap_or(0)
    }

    pub fn list_page_count(&self, resource: &str) -> u64 {
        self.list_pages.get(resource).copied().unwrap_or(0)
    }

    pub fn watch_count(&self, resource: &str) -> u64 {
        self.watches.get(resource).copied().unwrap_or(0)
    }
}

type Key = (String, String);

struct State {
    rv: u64,
    compacted: u64,
    objects: Vec<BTreeMap<Key, Arc<Object>>>,
    log: VecDeque<Arc<Change>>,
    history_limit: usize,
    snapshots: BTreeMap<u64, Snapshot>,
    next_snapshot: u64,
    /// Objects created over HTTP POST, as created.
    created: Vec<(ResourceId, Arc<Object>)>,
    counters: Vec<Counters>,
    requests: u64,
    gone: u64,
    unavailable: u64,
    refused: u64,
    next_id: u64,
}

pub(crate) struct Store {
    state: Mutex<State>,
    feed: broadcast::Sender<Feed>,
    /// `state.rv`, stored after the change is on the feed: a watcher that reads this and
    /// then finds its feed empty has seen every change up to it.
    published_rv: AtomicU64,
    unavailable: AtomicBool,
    unreachable: AtomicBool,
    max_page: AtomicUsize,
    bookmark_interval_ms: AtomicU64,
}

fn now_rfc3339() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(now.as_second())
        .expect("the current time is in range")
        .to_string()
}

fn metadata_str<'a>(value: &'a Value, field: &str) -> Option<&'a str> {
    value.get("metadata")?.get(field)?.as_str().filter(|s| !s.is_empty())
}

fn field_value(value: &Value, path: &[&str]) -> Option<String> {
    let mut v = value;
    for p in path {
        v = v.get(p)?;
    }
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// RFC 7386 JSON merge patch.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target = target.as_object_mut().expect("made an object above");
    for (k, v) in patch {
        if v.is_null() {
            target.remove(k);
        } else {
            merge_patch(target.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

struct Identity<'a> {
    namespace: &'a str,
    name: &'a str,
    uid: String,
    created: String,
    rv: u64,
}

/// Stamps type and metadata onto `value` and serializes it.
fn build_object(def: &ResourceDef, mut value: Value, id: Identity<'_>, event: EventType) -> Object {
    if !value.is_object() {
        value = Value::Object(Map::new());
    }
    let map = value.as_object_mut().expect("made an object above");
    map.insert("apiVersion".into(), def.api_version.into());
    map.insert("kind".into(), def.kind.into());
    let meta = map.entry("metadata").or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    let meta = meta.as_object_mut().expect("made an object above");
    meta.insert("name".into(), id.name.into());
    if def.namespaced {
        meta.insert("namespace".into(), id.namespace.into());
    } else {
        meta.remove("namespace");
    }
    meta.insert("resourceVersion".into(), id.rv.to_string().into());
    meta.insert("uid".into(), id.uid.as_str().into());
    meta.insert("creationTimestamp".into(), id.created.as_str().into());
    let labels = meta
        .get("labels")
        .and_then(Value::as_object)
        .map(|l| l.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect())
        .unwrap_or_default();
    let fields = def
        .fields
        .iter()
        .map(|f| field_value(&value, f.path).unwrap_or_else(|| f.default.to_owned()))
        .collect();
    let json = serde_json::to_vec(&value).expect("a JSON value serializes");
    let (line, object) = watch_line(event, &json);
    Object {
        namespace: id.namespace.to_owned(),
        name: id.name.to_owned(),
        uid: id.uid,
        created: id.created,
        rv: id.rv,
        labels,
        fields,
        event,
        line,
        object,
    }
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        let state = State {
            rv: 0,
            compacted: 0,
            objects: RESOURCES.iter().map(|_| BTreeMap::new()).collect(),
            log: VecDeque::new(),
            history_limit: DEFAULT_HISTORY_LIMIT,
            snapshots: BTreeMap::new(),
            next_snapshot: 1,
            created: Vec::new(),
            counters: vec![Counters::default(); RESOURCES.len()],
            requests: 0,
            gone: 0,
            unavailable: 0,
            refused: 0,
            next_id: 1,
        };
        Self {
            state: Mutex::new(state),
            feed,
            published_rv: AtomicU64::new(0),
            unavailable: AtomicBool::new(false),
            unreachable: AtomicBool::new(false),
            max_page: AtomicUsize::new(0),
            bookmark_interval_ms: AtomicU64::new(DEFAULT_BOOKMARK_INTERVAL.as_millis() as u64),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not take every later request down with it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn published_rv(&self) -> u64 {
        self.published_rv.load(Ordering::Acquire)
    }

    fn publish(&self, state: &State) {
        self.published_rv.store(state.rv, Ordering::Release);
    }

    fn push(&self, state: &mut State, change: Change) {
        let change = Arc::new(change);
        state.log.push_back(change.clone());
        while state.log.len() > state.history_limit {
            let old = state.log.pop_front().expect("the log is not empty");
            state.compacted = state.compacted.max(old.rv);
        }
        // No receiver is not an error: nobody is watching.
        let _ = self.feed.send(Feed::Change(change));
    }

    /// Creates or replaces the object named by `value`'s metadata. A namespaced object
    /// without a namespace goes to `default`.
    pub fn write(
        &self,
        resource: ResourceId,
        value: Value,
        mode: WriteMode,
    ) -> Result<Arc<Object>, WriteError> {
        let mut state = self.lock();
        self.write_locked(&mut state, resource, value, mode)
    }

    fn write_locked(
        &self,
        state: &mut State,
        resource: ResourceId,
        value: Value,
        mode: WriteMode,
    ) -> Result<Arc<Object>, WriteError> {
        let d = def(resource);
        let namespace = if d.namespaced {
            metadata_str(&value, "namespace").unwrap_or("default").to_owned()
        } else {
            String::new()
        };
        let name = match metadata_str(&value, "name") {
            Some(name) => name.to_owned(),
            None => {
                let prefix = metadata_str(&value, "generateName").ok_or(WriteError::MissingName)?;
                let suffix = state.next_id;
                state.next_id += 1;
                format!("{prefix}{suffix:05x}")
            }
        };
        let key = (namespace.clone(), name.clone());
        let previous = state.objects[resource].get(&key).cloned();
        match (mode, &previous) {
            (WriteMode::Create, Some(_)) => return Err(WriteError::AlreadyExists),
            (WriteMode::Update { .. }, None) => return Err(WriteError::NotFound),
            (WriteMode::Update { expected_rv: Some(rv) }, Some(p)) if rv != p.rv => {
                return Err(WriteError::Conflict { current: p.rv });
            }
            _ => {}
        }
        let uid = match (metadata_str(&value, "uid"), &previous) {
            (Some(uid), _) => uid.to_owned(),
            (None, Some(p)) => p.uid.clone(),
            (None, None) => {
                let n = state.next_id;
                state.next_id += 1;
                format!("7e57a41d-0000-4000-8000-{n:012x}")
            }
        };
        let created = match (metadata_str(&value, "creationTimestamp"), &previous) {
            (Some(t), _) => t.to_owned(),
            (None, Some(p)) => p.created.clone(),
            (None, None) => now_rfc3339(),
        };
        state.rv += 1;
        let event = if previous.is_some() { EventType::Modified } else { EventType::Added };
        let id = Identity { namespace: &namespace, name: &name, uid, created, rv: state.rv };
        let object = Arc::new(build_object(d, value, id, event));
        state.objects[resource].insert(key, object.clone());
        let change = Change { rv: state.rv, resource, object: object.clone(), previous };
        self.push(state, change);
        self.publish(state);
        Ok(object)
    }

    /// Applies a JSON merge patch to an existing object (or, with `create`, to an empty one).
    pub fn patch(
        &self,
        resource: ResourceId,
        namespace: &str,
        name: &str,
        patch: &Value,
        create: bool,
    ) -> Result<Arc<Object>, WriteError> {
        let d = def(resource);
        let mut state = self.lock();
        let key = (namespace.to_owned(), name.to_owned());
        let mut value = match state.objects[resource].get(&key) {
            Some(o) => o.value(),
            None if create => Value::Object(Map::new()),
            None => return Err(WriteError::NotFound),
        };
        merge_patch(&mut value, patch);
        // The URL names the object; a patch cannot move or rename it.
        let meta = value
            .as_object_mut()
            .map(|m| m.entry("metadata").or_insert_with(|| Value::Object(Map::new())));
        if let Some(Value::Object(meta)) = meta {
            meta.insert("name".into(), name.into());
            if d.namespaced {
                meta.insert("namespace".into(), namespace.into());
            }
        }
        self.write_locked(&mut state, resource, value, WriteMode::Upsert)
    }

    /// Removes an object. With `emit`, watchers get DELETED with its last state at a new
    /// resourceVersion; without, the deletion is only visible to a relist.
    pub fn delete(
        &self,
        resource: ResourceId,
        namespace: &str,
        name: &str,
        emit: bool,
    ) -> Option<Arc<Object>> {
        let mut state = self.lock();
        let key = (namespace.to_owned(), name.to_owned());
        let last = state.objects[resource].remove(&key)?;
        state.rv += 1;
        let id = Identity {
            namespace: &last.namespace,
            name: &last.name,
            uid: last.uid.clone(),
            created: last.created.clone(),
            rv: state.rv,
        };
        let gone = Arc::new(build_object(def(resource), last.value(), id, EventType::Deleted));
        if emit {
            let change = Change { rv: state.rv, resource, object: gone.clone(), previous: None };
            self.push(&mut state, change);
        }
        self.publish(&state);
        Some(gone)
    }

    pub fn get(&self, resource: ResourceId, namespace: &str, name: &str) -> Option<Arc<Object>> {
        self.lock().objects[resource].get(&(namespace.to_owned(), name.to_owned())).cloned()
    }

    /// All objects of `resource`, sorted by namespace and name.
    pub fn all(&self, resource: ResourceId) -> Vec<Arc<Object>> {
        self.lock().objects[resource].values().cloned().collect()
    }

    pub fn note_created(&self, resource: ResourceId, object: Arc<Object>) {
        self.lock().created.push((resource, object));
    }

    /// Objects created over HTTP whose resource matches `name` (see
    /// [`name_matches`]), in creation order, each in its current state if it still exists.
    pub fn created(&self, name: &str) -> Vec<Value> {
        let state = self.lock();
        state
            .created
            .iter()
            .filter(|(id, _)| name_matches(*id, name))
            .map(|(id, o)| {
                let key = (o.namespace.clone(), o.name.clone());
                match state.objects[*id].get(&key) {
                    Some(current) if current.uid == o.uid => current.value(),
                    _ => o.value(),
                }
            })
            .collect()
    }

    fn matching(state: &State, resource: ResourceId, filter: &Filter) -> Vec<Arc<Object>> {
        let objects = &state.objects[resource];
        let candidates: Box<dyn Iterator<Item = &Arc<Object>>> = match &filter.namespace {
            Some(ns) => Box::new(
                objects
                    .range((ns.clone(), String::new())..)
                    .take_while(move |((n, _), _)| n == ns)
                    .map(|(_, o)| o),
            ),
            None => Box::new(objects.values()),
        };
        candidates.filter(|o| filter.matches(o)).cloned().collect()
    }

    /// The first page of a list at the current resourceVersion. If there are more pages,
    /// the matching objects are kept as a snapshot that later pages read.
    pub fn list(&self, resource: ResourceId, filter: &Filter, limit: Option<usize>) -> Page {
        let mut state = self.lock();
        let counters = &mut state.counters[resource];
        counters.lists += 1;
        counters.list_pages += 1;
        let mut items = Self::matching(&state, resource, filter);
        let rv = state.rv;
        match limit {
            Some(limit) if items.len() > limit => {
                let id = state.next_snapshot;
                state.next_snapshot += 1;
                let all: Arc<[Arc<Object>]> = items.into();
                items = all[..limit].to_vec();
                let remaining = all.len() - limit;
                state.snapshots.insert(id, Snapshot { resource, rv, items: all });
                while state.snapshots.len() > MAX_SNAPSHOTS {
                    state.snapshots.pop_first();
                }
                Page { rv, items, continue_token: Some(format!("{id}-{limit}")), remaining }
            }
            _ => Page { rv, items, continue_token: None, remaining: 0 },
        }
    }

    /// A later page of a list, from the snapshot its token names.
    pub fn list_continue(
        &self,
        resource: ResourceId,
        token: &str,
        limit: Option<usize>,
    ) -> Result<Page, ContinueError> {
        let mut state = self.lock();
        state.counters[resource].list_pages += 1;
        let (id, offset) = token
            .split_once('-')
            .and_then(|(id, offset)| Some((id.parse::<u64>().ok()?, offset.parse::<usize>().ok()?)))
            .ok_or(ContinueError::Malformed)?;
        let Some(snapshot) = state.snapshots.get(&id) else {
            state.gone += 1;
            return Err(ContinueError::Expired);
        };
        if snapshot.resource != resource || offset > snapshot.items.len() {
            return Err(ContinueError::Malformed);
        }
        let end = limit.map_or(snapshot.items.len(), |l| (offset + l).min(snapshot.items.len()));
        let page = Page {
            rv: snapshot.rv,
            items: snapshot.items[offset..end].to_vec(),
            continue_token: (end < snapshot.items.len()).then(|| format!("{id}-{end}")),
            remaining: snapshot.items.len() - end,
        };
        if page.continue_token.is_none() {
            state.snapshots.remove(&id);
        }
        Ok(page)
    }

    /// Subscribes a watch. `from: None` starts at the current state (sent as ADDED);
    /// `Some(rv)` replays every change after `rv`.
    pub fn watch(
        &self,
        resource: ResourceId,
        filter: &Filter,
        from: Option<u64>,
    ) -> Result<WatchStart, Gone> {
        let mut state = self.lock();
        state.counters[resource].watches += 1;
        let backlog = match from {
            Some(rv) if rv < state.compacted => {
                state.gone += 1;
                return Err(Gone { compacted: state.compacted });
            }
            Some(rv) => {
                let start = state.log.partition_point(|c| c.rv <= rv);
                Backlog::Replay(
                    state.log.range(start..).filter(|c| c.resource == resource).cloned().collect(),
                )
            }
            None => Backlog::Initial(Self::matching(&state, resource, filter)),
        };
        Ok(WatchStart { backlog, rx: self.feed.subscribe(), rv: state.rv })
    }

    /// Expires every watch resourceVersion and continue token handed out so far.
    pub fn compact(&self) {
        let mut state = self.lock();
        state.rv += 1;
        state.compacted = state.rv;
        state.log.clear();
        state.snapshots.clear();
        self.publish(&state);
    }

    pub fn set_history_limit(&self, limit: usize) {
        let mut state = self.lock();
        state.history_limit = limit.max(1);
        while state.log.len() > state.history_limit {
            let old = state.log.pop_front().expect("the log is not empty");
            state.compacted = state.compacted.max(old.rv);
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Ends every open watch stream abruptly.
    pub fn disconnect_all(&self) {
        let _ = self.feed.send(Feed::Disconnect);
    }

    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::SeqCst);
        if unavailable {
            self.disconnect_all();
        }
    }

    pub fn is_unavailable(&self) -> bool {
        self.unavailable.load(Ordering::SeqCst)
    }

    pub fn set_unreachable(&self, unreachable: bool) {
        self.unreachable.store(unreachable, Ordering::SeqCst);
        if unreachable {
            self.disconnect_all();
        }
    }

    pub fn is_unreachable(&self) -> bool {
        self.unreachable.load(Ordering::SeqCst)
    }

    pub fn count_refused(&self) {
        self.lock().refused += 1;
    }

    pub fn set_max_page(&self, n: usize) {
        self.max_page.store(n, Ordering::Relaxed);
    }

    pub fn max_page(&self) -> Option<usize> {
        Some(self.max_page.load(Ordering::Relaxed)).filter(|&n| n > 0)
    }

    pub fn set_bookmark_interval(&self, every: Duration) {
        let ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX).max(1);
        self.bookmark_interval_ms.store(ms, Ordering::Relaxed);
    }

    pub fn bookmark_interval(&self) -> Duration {
        Duration::from_millis(self.bookmark_interval_ms.load(Ordering::Relaxed))
    }

    pub fn count_request(&self) {
        self.lock().requests += 1;
    }

    pub fn count_unavailable(&self) {
        self.lock().unavailable += 1;
    }

    pub fn count_get(&self, resource: ResourceId) {
        self.lock().counters[resource].gets += 1;
    }

    pub fn count_write(&self, resource: ResourceId) {
        self.lock().counters[resource].writes += 1;
    }

    pub fn stats(&self) -> Stats {
        let state = self.lock();
        let mut stats = Stats {
            requests: state.requests,
            gone: state.gone,
            unavailable: state.unavailable,
            refused: state.refused,
            ..Stats::default()
        };
        for (d, c) in RESOURCES.iter().zip(&state.counters) {
            for (map, n) in [
                (&mut stats.lists, c.lists),
                (&mut stats.list_pages, c.list_pages),
                (&mut stats.watches, c.watches),
                (&mut stats.gets, c.gets),
                (&mut stats.writes, c.writes),
            ] {
                if n > 0 {
                    map.insert(d.name.to_owned(), n);
                }
            }
        }
        stats
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::resource::by_name;

    fn svc(ns: &str, name: &str, app: &str) -> Value {
        json!({"metadata": {"namespace": ns, "name": name, "labels": {"app": app}}, "spec": {}})
    }

    fn services() -> ResourceId {
        by_name("services").unwrap()
    }

    fn lines(store: &Store, filter: &Filter, from: u64) -> Vec<String> {
        let start = store.watch(services(), filter, Some(from)).unwrap();
        let Backlog::Replay(changes) = start.backlog else { panic!("expected a replay") };
        changes
            .iter()
            .filter_map(|c| filter.render(c))
            .map(|l| String::from_utf8(l.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn writes_bump_one_resource_version_and_stamp_metadata() {
        let store = Store::new();
        let a = store.write(services(), svc("ns", "a", "x"), WriteMode::Upsert).unwrap();
        let b = store.write(services(), svc("ns", "a", "y"), WriteMode::Upsert).unwrap();
        assert_eq!((a.rv, b.rv), (1, 2));
        assert_eq!(a.uid, b.uid, "a replacement keeps the uid");
        let v = b.value();
        assert_eq!(v["apiVersion"], "v1");
        assert_eq!(v["kind"], "Service");
        assert_eq!(v["metadata"]["resourceVersion"], "2");
        assert_eq!(v["metadata"]["labels"]["app"], "y");
        assert!(v["metadata"]["creationTimestamp"].as_str().unwrap().ends_with('Z'));
        let line = String::from_utf8(b.line(EventType::Modified).to_vec()).unwrap();
        assert!(line.starts_with(r#"{"type":"MODIFIED","object":{"#) && line.ends_with("}\n"));
        let parsed: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["object"], v);
        assert_eq!(
            store.write(services(), svc("ns", "a", "z"), WriteMode::Create).err(),
            Some(WriteError::AlreadyExists)
        );
        assert_eq!(
            store
                .write(services(), svc("ns", "a", "z"), WriteMode::Update { expected_rv: Some(1) })
                .err(),
            Some(WriteError::Conflict { current: 2 })
        );
        assert_eq!(
            store
                .write(services(), svc("ns", "b", "z"), WriteMode::Update { expected_rv: None })
                .err(),
            Some(WriteError::NotFound)
        );
        assert_eq!(
            store.write(services(), json!({}), WriteMode::Upsert).err(),
            Some(WriteError::MissingName)
        );
        let generated = store
            .write(services(), json!({"metadata": {"generateName": "g-"}}), WriteMode::Create)
            .unwrap();
        assert!(generated.name.starts_with("g-") && generated.name.len() > 2);
        assert_eq!(generated.namespace, "default");
    }

    #[test]
    fn replay_moves_objects_in_and_out_of_a_selector() {
        let store = Store::new();
        store.write(services(), svc("ns", "a", "x"), WriteMode::Upsert).unwrap();
        store.write(services(), svc("ns", "a", "y"), WriteMode::Upsert).unwrap();
        store.write(services(), svc("ns", "a", "x"), WriteMode::Upsert).unwrap();
        store.write(services(), svc("ns", "a", "x"), WriteMode::Upsert).unwrap();
        store.delete(services(), "ns", "a", true).unwrap();
        let filter = Filter { labels: LabelSelector::parse("app=x").unwrap(), ..Filter::default() };
        let types: Vec<String> = lines(&store, &filter, 0)
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["type"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(types, ["ADDED", "DELETED", "ADDED", "MODIFIED", "DELETED"]);
        assert_eq!(lines(&store, &Filter::default(), 3).len(), 2);
    }

    #[test]
    fn silent_deletes_and_compaction() {
        let store = Store::new();
        store.write(services(), svc("ns", "a", "x"), WriteMode::Upsert).unwrap();
        store.delete(services(), "ns", "a", false).unwrap();
        assert!(store.delete(services(), "ns", "a", true).is_none());
        assert_eq!(store.resource_version(), 2);
        assert_eq!(lines(&store, &Filter::default(), 1), Vec::<String>::new());
        store.compact();
        assert!(store.watch(services(), &Filter::default(), Some(2)).is_err());
        assert!(store.watch(services(), &Filter::default(), Some(3)).is_ok());
        assert_eq!(store.stats().gone, 1);
    }

    #[test]
    fn history_limit_compacts_the_oldest_changes() {
        let store = Store::new();
        store.set_history_limit(2);
        for i in 0..5 {
            store.write(services(), svc("ns", &format!("s{i}"), "x"), WriteMode::Upsert).unwrap();
        }
        // Changes 4 and 5 are kept: resuming from 3 works, from 2 does not.
        assert!(store.watch(services(), &Filter::default(), Some(2)).is_err());
        assert_eq!(lines(&store, &Filter::default(), 3).len(), 2);
    }

    #[test]
    fn pages_read_a_snapshot() {
        let store = Store::new();
        for i in 0..5 {
            store.write(services(), svc("ns", &format!("s{i}"), "x"), WriteMode::Upsert).unwrap();
        }
        let first = store.list(services(), &Filter::default(), Some(2));
        assert_eq!(first.rv, 5);
        assert_eq!(first.remaining, 3);
        store.delete(services(), "ns", "s3", true).unwrap();
        let token = first.continue_token.unwrap();
        let second = store.list_continue(services(), &token, Some(2)).unwrap();
        let third = store.list_continue(services(), &second.continue_token.unwrap(), None).unwrap();
        let names: Vec<_> = [first.items, second.items, third.items]
            .concat()
            .iter()
            .map(|o| o.name.clone())
            .collect();
        assert_eq!(names, ["s0", "s1", "s2", "s3", "s4"], "the snapshot predates the delete");
        assert_eq!((second.rv, third.continue_token), (5, None));
        assert_eq!(
            store.list_continue(services(), &token, None).err(),
            Some(ContinueError::Expired),
            "a finished list's snapshot is gone"
        );
        assert_eq!(
            store.list_continue(services(), "x", None).err(),
            Some(ContinueError::Malformed)
        );
        let page = store.list(services(), &Filter::default(), Some(1));
        store.compact();
        let token = page.continue_token.unwrap();
        assert_eq!(
            store.list_continue(services(), &token, None).err(),
            Some(ContinueError::Expired)
        );
    }

    #[test]
    fn namespace_filter_uses_the_range() {
        let store = Store::new();
        for ns in ["a", "b", "bb", "c"] {
            store.write(services(), svc(ns, "s", "x"), WriteMode::Upsert).unwrap();
        }
        let filter = Filter { namespace: Some("b".into()), ..Filter::default() };
        let page = store.list(services(), &filter, None);
        assert_eq!(page.items.len(), 1);
        assert_eq!(page.items[0].namespace, "b");
    }

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut target = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(&mut target, &json!({"a": "z", "c": {"f": null}, "l": [3], "n": {"x": 1}}));
        assert_eq!(target, json!({"a": "z", "c": {"d": "e"}, "l": [3], "n": {"x": 1}}));
    }
}
