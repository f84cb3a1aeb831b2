//! A directory of YAML manifests as a source: for labs, tests, and clusters without an API
//! server.
//!
//! Why it is built the way it is:
//!
//! 1. **The directory is the truth.** Every change produces one [`Event::Reset`] per
//!    [`Kind`] (all of them, even empty ones), so a deleted file or a removed document simply
//!    disappears downstream. There are no per-object events to get out of order.
//! 2. **Change detection is cheap.** A poll only lists the directory and stats the files
//!    (name, mtime, length); files are read and parsed only when that fingerprint changes.
//!    A rewrite that keeps both mtime and length is missed until the next change.
//! 3. **All or nothing.** If any document fails to parse, the poll returns an error naming
//!    the file, the line and the document, and nothing else: the caller keeps its previous
//!    state rather than seeing a partial set (which a `Reset` would turn into deletions).
//!    The failed fingerprint is not remembered, so the next change is read again.
//! 4. **Unknown kinds are not errors.** A Deployment next to a Service is skipped with a
//!    warning, as is any `apiVersion` this agent does not model.
//!
//! Only `*.yaml` and `*.yml` regular files (or symlinks to them) directly in the directory
//! are read; names starting with `.` are ignored, which skips editor swap files and the
//! `..data` links of a mounted ConfigMap. Namespaced objects without a namespace get
//! `default`, as `kubectl apply` would.
use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::{Batch, Event, Kind, Object, ObjectKey};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("reading directory {}: {source}", dir.display())]
    ReadDir { dir: PathBuf, source: io::Error },
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// A document did not parse or is not a valid object. `document` counts the non-empty
    /// documents of the file from 1; `line` is 1-based within the file.
    #[error("{}:{}: document {document}: {message}", path.display(), line.map_or_else(|| "?".to_string(), |l| l.to_string()))]
    Document { path: PathBuf, document: usize, line: Option<usize>, message: String },
}

/// What was seen of one file: enough to notice a change without reading it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

type Fingerprint = BTreeMap<PathBuf, Stamp>;

/// Polls a directory of manifests; see the module docs.
#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    /// The fingerprint of the last set that parsed completely.
    seen: Option<Fingerprint>,
}

impl FileSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), seen: None }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `Ok(None)` if nothing changed since the last successful poll, `Ok(Some(resets))` with
    /// one `Reset` per kind if something did and everything parsed, `Err` otherwise.
    pub fn poll(&mut self) -> Result<Option<Vec<Event>>, FileError> {
        let fingerprint = self.fingerprint()?;
        if self.seen.as_ref() == Some(&fingerprint) {
            return Ok(None);
        }
        // The stamps were taken before reading: a file written while we read it has a newer
        // stamp than the one remembered here, so the next poll reads it again.
        let mut objects: BTreeMap<(Kind, ObjectKey), (Object, PathBuf)> = BTreeMap::new();
        for path in fingerprint.keys() {
            let text = fs::read_to_string(path)
                .map_err(|source| FileError::Read { path: path.clone(), source })?;
            for obj in parse_file(path, &text)? {
                let id = (obj.kind(), obj.key());
                if let Some((_, first)) = objects.get(&id) {
                    tracing::warn!(
                        kind = %id.0, object = %id.1, first = %first.display(), path = %path.display(),
                        "object defined twice; the later definition wins",
                    );
                }
                objects.insert(id, (obj, path.clone()));
            }
        }
        self.seen = Some(fingerprint);

        let mut by_kind: BTreeMap<Kind, Vec<Object>> =
            Kind::ALL.iter().map(|k| (*k, Vec::new())).collect();
        for ((kind, _), (obj, _)) in objects {
            by_kind.entry(kind).or_default().push(obj);
        }
        let events = Kind::ALL
            .iter()
            .map(|kind| Event::Reset(*kind, by_kind.remove(kind).unwrap_or_default()))
            .collect();
        Ok(Some(events))
    }

    fn fingerprint(&self) -> Result<Fingerprint, FileError> {
        let read_dir_err = |source| FileError::ReadDir { dir: self.dir.clone(), source };
        let mut fingerprint = Fingerprint::new();
        for entry in fs::read_dir(&self.dir).map_err(read_dir_err)? {
            let entry = entry.map_err(read_dir_err)?;
            let path = entry.path();
            if !is_manifest_name(&path) {
                continue;
            }
            // `fs::metadata` follows symlinks (ConfigMap mounts are symlinks).
            let meta = match fs::metadata(&path) {
                Ok(meta) => meta,
                // Deleted between listing and stat: it is simply not part of this set.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(FileError::Read { path, source }),
            };
            if !meta.is_file() {
                continue;
            }
            fingerprint.insert(path, Stamp { modified: meta.modified().ok(), len: meta.len() });
        }
        Ok(fingerprint)
    }
}

fn is_manifest_name(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

/// Polls `dir` every `interval` and sends each changed set to `tx`, until `tx` is closed.
///
/// A parse error is logged once (until it changes or is fixed) and the previous state stays
/// in force downstream, since nothing is sent.
pub async fn run(dir: impl Into<PathBuf>, interval: Duration, tx: mpsc::Sender<Batch>) {
    let mut source = FileSource::new(dir);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    loop {
        ticker.tick().await;
        // Reading and parsing is blocking file I/O; keep it off the async workers.
        let polled = tokio::task::spawn_blocking(move || {
            let result = source.poll();
            (source, result)
        })
        .await;
        let result = match polled {
            Ok((returned, result)) => {
                source = returned;
                result
            }
            Err(e) => {
                // The poll panicked; the source went with it. Nothing sensible is left to do.
                tracing::error!(error = %e, "file source poll task failed");
                return;
            }
        };
        match result {
            Ok(None) => {}
            Ok(Some(events)) => {
                if last_error.take().is_some() {
                    tracing::info!(dir = %source.dir().display(), "manifests parse again");
                }
                if tx.send(Batch::now(events)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let text = e.to_string();
                if last_error.as_deref() != Some(text.as_str()) {
                    log_error(&e);
                    last_error = Some(text);
                }
            }
        }
        if tx.is_closed() {
            return;
        }
    }
}

fn log_error(e: &FileError) {
    match e {
        FileError::Document { path, document, line, message } => tracing::error!(
            path = %path.display(), line = ?line, document, %message,
            "manifest rejected; keeping the previous state",
        ),
        FileError::Read { path, source } => tracing::error!(
            path = %path.display(), error = %source, "reading manifest failed; keeping the previous state",
        ),
        FileError::ReadDir { dir, source } => tracing::error!(
            dir = %dir.display(), error = %source, "reading manifest directory failed; keeping the previous state",
        ),
    }
}

/// One YAML document of a file and where it starts.
struct Document {
    /// 1-based line of the document's first line.
    line: usize,
    text: String,
}

/// Splits a multi-document stream at `---` (and `...`) marker lines.
///
/// Each document is parsed on its own so that typed errors ("invalid type" at a field) get
/// a location, which serde_yaml only provides when deserializing straight from text.
fn split_documents(text: &str) -> Vec<Document> {
    let mut docs = vec![Document { line: 1, text: String::new() }];
    for (i, raw) in text.split_inclusive('\n').enumerate() {
        let line_no = i + 1;
        let is_marker = |m: &str| {
            raw.strip_prefix(m)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
        };
        if is_marker("---") {
            // Content may follow the marker on the same line; keep it in place (columns too).
            docs.push(Document { line: line_no, text: format!("   {}", &raw[3..]) });
        } else if is_marker("...") {
            docs.push(Document { line: line_no + 1, text: String::new() });
        } else if let Some(doc) = docs.last_mut() {
            doc.text.push_str(raw);
        }
    }
    docs
}

fn has_content(text: &str) -> bool {
    text.lines().any(|l| {
        let l = l.trim();
        !l.is_empty() && !l.starts_with('#')
    })
}

/// Parses every document of one file. Documents of unknown kinds are skipped with a warning.
fn parse_file(path: &Path, text: &str) -> Result<Vec<Object>, FileError> {
    let mut objects = Vec::new();
    let mut document = 0;
    for doc in split_documents(text) {
        if !has_content(&doc.text) {
            continue;
        }
        document += 1;
        let located = Located { path, document, first_line: doc.line };
        // Parsed alone (padding each document with the lines before it made a file of n
        // documents cost O(n²)); `Located` turns serde_yaml's lines into the file's.
        parse_document(&located, &doc.text, &mut objects)?;
    }
    Ok(objects)
}

/// Where a document is, for error messages.
struct Located<'a> {
    path: &'a Path,
    document: usize,
    first_line: usize,
}

impl Located<'_> {
    fn yaml_error(&self, e: &serde_yaml::Error) -> FileError {
        FileError::Document {
            path: self.path.to_path_buf(),
            document: self.document,
            line: Some(e.location().map_or(self.first_line, |l| self.first_line + l.line() - 1)),
            // serde_yaml's own position counts from the document's start: the file's line
            // is in `line`, the column is kept.
            message: match e.location() {
                Some(l) => e.to_string().replace(
                    &format!("at line {} column {}", l.line(), l.column()),
                    &format!("at column {}", l.column()),
                ),
                None => e.to_string(),
            },
        }
    }

    fn error(&self, message: String) -> FileError {
        FileError::Document {
            path: self.path.to_path_buf(),
            document: self.document,
            line: Some(self.first_line),
            message,
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
}

#[derive(serde::Deserialize)]
struct List {
    #[serde(default)]
    items: Vec<serde_yaml::Value>,
}

fn parse_document(at: &Located<'_>, text: &str, out: &mut Vec<Object>) -> Result<(), FileError> {
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| at.yaml_error(&e))?;
    if value.is_null() {
        return Ok(());
    }
    let meta: TypeMeta = serde_yaml::from_value(value).map_err(|e| at.yaml_error(&e))?;
    let api_version = meta.api_version.unwrap_or_default();
    let kind = meta.kind.unwrap_or_default();
    if kind == "List" || (kind.ends_with("List") && api_version == "v1") {
        let list: List = serde_yaml::from_str(text).map_err(|e| at.yaml_error(&e))?;
        for (i, item) in list.items.into_iter().enumerate() {
            let item_meta: TypeMeta = serde_yaml::from_value(item.clone())
                .map_err(|e| at.error(format!("items[{i}]: {e}")))?;
            let (api_version, kind) =
                (item_meta.api_version.unwrap_or_default(), item_meta.kind.unwrap_or_default());
            let obj = typed(&api_version, &kind, |de| de_value(item, de))
                .map_err(|e| at.error(format!("items[{i}]: {e}")))?;
            push(at, &format!(" items[{i}]"), &api_version, &kind, obj, out)?;
        }
        return Ok(());
    }
    let obj = typed(&api_version, &kind, |de| de_str(text, de)).map_err(|e| at.yaml_error(&e))?;
    push(at, "", &api_version, &kind, obj, out)
}

/// Deserializes a known `(apiVersion, kind)` with `de`; `None` for anything else.
fn typed(
    api_version: &str,
    kind: &str,
    de: impl FnOnce(Kind) -> Result<Object, serde_yaml::Error>,
) -> Result<Option<Object>, serde_yaml::Error> {
    let kind = match (api_version, kind) {
        ("v1", "Service") => Kind::Service,
        ("discovery.k8s.io/v1", "EndpointSlice") => Kind::EndpointSlice,
        ("v1", "Pod") => Kind::Pod,
        ("v1", "Namespace") => Kind::Namespace,
        ("v1", "Node") => Kind::Node,
        ("networking.k8s.io/v1", "NetworkPolicy") => Kind::NetworkPolicy,
        _ => return Ok(None),
    };
    de(kind).map(Some)
}

fn de_str(text: &str, kind: Kind) -> Result<Object, serde_yaml::Error> {
    fn go<T: DeserializeOwned + Into<Object>>(text: &str) -> Result<Object, serde_yaml::Error> {
        serde_yaml::from_str::<T>(text).map(Into::into)
    }
    match kind {
        Kind::Service => go::<Service>(text),
        Kind::EndpointSlice => go::<EndpointSlice>(text),
        Kind::Pod => go::<Pod>(text),
        Kind::Namespace => go::<Namespace>(text),
        Kind::Node => go::<Node>(text),
        Kind::NetworkPolicy => go::<NetworkPolicy>(text),
    }
}

fn de_value(value: serde_yaml::Value, kind: Kind) -> Result<Object, serde_yaml::Error> {
    fn go<T: DeserializeOwned + Into<Object>>(
        value: serde_yaml::Value,
    ) -> Result<Object, serde_yaml::Error> {
        serde_yaml::from_value::<T>(value).map(Into::into)
    }
    match kind {
        Kind::Service => go::<Service>(value),
        Kind::EndpointSlice => go::<EndpointSlice>(value),
        Kind::Pod => go::<Pod>(value),
        Kind::Namespace => go::<Namespace>(value),
        Kind::Node => go::<Node>(value),
        Kind::NetworkPolicy => go::<NetworkPolicy>(value),
    }
}

/// Checks and normalizes a parsed object (name required, namespace defaulted) and keeps it;
/// warns about documents of kinds this agent does not read.
fn push(
    at: &Located<'_>,
    item: &str,
    api_version: &str,
    kind: &str,
    obj: Option<Object>,
    out: &mut Vec<Object>,
) -> Result<(), FileError> {
    let Some(mut obj) = obj else {
        tracing::warn!(
            path = %at.path.display(), document = at.document, line = at.first_line,
            "skipping{item} apiVersion {api_version:?} kind {kind:?}: not a kind this agent reads",
        );
        return Ok(());
    };
    let kind = obj.kind();
    let meta = obj.meta_mut();
    if meta.name.as_deref().is_none_or(str::is_empty) {
        return Err(at.error(format!("{}{kind} has no metadata.name", item.trim_start())));
    }
    if kind.is_namespaced() && meta.namespace.as_deref().is_none_or(str::is_empty) {
        meta.namespace = Some("default".to_string());
    }
    out.push(obj);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;

    const SVC: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  clusterIP: 10.96.0.10
  ports:
  - name: http
    port: 80
";

    const SLICE: &str = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
endpoints:
- addresses: [10.0.1.5]
ports:
- name: http
  port: 8080
";

    fn write(dir: &Path, name: &str, text: &str) {
        fs::write(dir.join(name), text).expect("write manifest");
    }

    /// Gives a file a distinct mtime so a same-length rewrite is noticed in tests.
    fn touch(dir: &Path, name: &str, secs: u64) {
        let f = File::options().write(true).open(dir.join(name)).expect("open manifest");
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)).expect("set mtime");
    }

    fn resets(events: Vec<Event>) -> BTreeMap<Kind, Vec<ObjectKey>> {
        events
            .into_iter()
            .map(|e| match e {
                Event::Reset(kind, objs) => (kind, objs.iter().map(Object::key).collect()),
                other => panic!("expected only resets, got {other:?}"),
            })
            .collect()
    }

    fn poll_resets(src: &mut FileSource) -> BTreeMap<Kind, Vec<ObjectKey>> {
        resets(src.poll().expect("poll").expect("a change"))
    }

    #[test]
    fn reads_multi_document_files_and_resets_every_kind() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "web.yaml", &format!("{SVC}---\n{SLICE}"));
        write(dir.path(), "ns.yml", "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n");
        write(dir.path(), "notes.txt", "not: yaml: at: all: [");
        let mut src = FileSource::new(dir.path());
        let got = poll_resets(&mut src);
        assert_eq!(got.len(), Kind::ALL.len(), "one reset per kind: {got:?}");
        assert_eq!(got[&Kind::Service], vec![ObjectKey::namespaced("shop", "web")]);
        assert_eq!(got[&Kind::EndpointSlice], vec![ObjectKey::namespaced("shop", "web-abc")]);
        assert_eq!(got[&Kind::Namespace], vec![ObjectKey::cluster("shop")]);
        assert!(got[&Kind::Pod].is_empty());
        assert!(got[&Kind::Node].is_empty());
    }

    #[test]
    fn unchanged_directory_polls_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "web.yaml", SVC);
        let mut src = FileSource::new(dir.path());
        assert!(src.poll().expect("poll").is_some());
        assert!(src.poll().expect("poll").is_none());
        assert!(src.poll().expect("poll").is_none());
    }

    #[test]
    fn notices_content_mtime_and_new_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "web.yaml", SVC);
        touch(dir.path(), "web.yaml", 1_000);
        let mut src = FileSource::new(dir.path());
        assert!(src.poll().expect("poll").is_some());

        // Same length, new name: only the mtime tells.
        write(dir.path(), "web.yaml", &SVC.replace("name: web", "name: bob"));
        touch(dir.path(), "web.yaml", 2_000);
        let got = poll_resets(&mut src);
        assert_eq!(got[&Kind::Service], vec![ObjectKey::namespaced("shop", "bob")]);

        write(dir.path(), "slice.yaml", SLICE);
        let got = poll_resets(&mut src);
        assert_eq!(got[&Kind::EndpointSlice].len(), 1);
        assert!(src.poll().expect("poll").is_none());
    }

    #[test]
    fn deleted_file_objects_disappear_on_next_reset() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "web.yaml", SVC);
        write(dir.path(), "slice.yaml", SLICE);
        let mut src = FileSource::new(dir.path());
        assert_eq!(poll_resets(&mut src)[&Kind::EndpointSlice].len(), 1);
        fs::remove_file(dir.path().join("slice.yaml")).expect("rm");
        let got = poll_resets(&mut src);
        assert!(got[&Kind::EndpointSlice].is_empty(), "{got:?}");
        assert_eq!(got[&Kind::Service].len(), 1);
    }

    #[test]
    fn parse_error_names_path_line_and_document_and_keeps_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "a.yaml", SVC);
        let mut src = FileSource::new(dir.path());
        assert!(src.poll().expect("poll").is_some());

        // Document 2 of b.yaml (after the 13-line slice and a marker) has a bad port on line 24.
        let bad = format!("{SLICE}---\n{}", SVC.replace("port: 80", "port: eighty"));
        write(dir.path(), "b.yaml", &bad);
        let err = src.poll().expect_err("bad port must fail");
        match &err {
            FileError::Document { path, document, line, message } => {
                assert_eq!(path, &dir.path().join("b.yaml"));
                assert_eq!(*document, 2);
                assert_eq!(*line, Some(24), "{message}");
            }
            other => panic!("unexpected error {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains("b.yaml:24: document 2:"), "{text}");

        // Not remembered as seen: polling again fails again rather than reporting no change.
        assert!(src.poll().is_err());

        // Fixing the file yields the full set, including the untouched a.yaml.
        write(dir.path(), "b.yaml", SLICE);
        let got = poll_resets(&mut src);
        assert_eq!(got[&Kind::Service].len(), 1);
        assert_eq!(got[&Kind::EndpointSlice].len(), 1);
    }

    #[test]
    fn syntax_error_reports_its_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "x.yaml", "---\n# c\n---\napiVersion: v1\nkind: Service\n  bad: [\n");
        let err = FileSource::new(dir.path()).poll().expect_err("syntax error");
        let FileError::Document { document, line, .. } = err else {
            panic!("unexpected error {err:?}");
        };
        assert_eq!(document, 1, "comment-only documents are not counted");
        assert!(matches!(line, Some(5..=7)), "line {line:?}");
    }

    #[test]
    fn unknown_kinds_are_skipped_not_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let deploy = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\n";
        let beta = SLICE.replace("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1");
        write(dir.path(), "x.yaml", &format!("{deploy}---\n{beta}---\n{SVC}"));
        let got = poll_resets(&mut FileSource::new(dir.path()));
        assert_eq!(got[&Kind::Service].len(), 1);
        assert!(got[&Kind::EndpointSlice].is_empty());
    }

    #[test]
    fn lists_are_flattened_and_namespace_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let list = "\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: p1, labels: {app: web}}
- apiVersion: v1
  kind: Node
  metadata: {name: n1}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: d}
";
        write(dir.path(), "list.yaml", list);
        let got = poll_resets(&mut FileSource::new(dir.path()));
        assert_eq!(got[&Kind::Pod], vec![ObjectKey::namespaced("default", "p1")]);
        assert_eq!(got[&Kind::Node], vec![ObjectKey::cluster("n1")]);
    }

    #[test]
    fn list_item_errors_name_the_item() {
        let dir = tempfile::tempdir().expect("tempdir");
        let list = "kind: List\napiVersion: v1\nitems:\n- {apiVersion: v1, kind: Service, metadata: {name: a}, spec: {ports: [{port: x}]}}\n";
        write(dir.path(), "list.yaml", list);
        let err = FileSource::new(dir.path()).poll().expect_err("bad item");
        assert!(err.to_string().contains("items[0]"), "{err}");
    }

    #[test]
    fn missing_name_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "x.yaml", "apiVersion: v1\nkind: Service\nspec: {}\n");
        let err = FileSource::new(dir.path()).poll().expect_err("no name");
        assert!(err.to_string().contains("metadata.name"), "{err}");
    }

    #[test]
    fn missing_directory_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut src = FileSource::new(dir.path().join("nope"));
        assert!(matches!(src.poll(), Err(FileError::ReadDir { .. })));
    }

    #[test]
    fn document_markers_split_with_line_numbers() {
        let docs = split_documents("a: 1\n---\nb: 2\n--- # c\nc: 3\n...\n---x: not a marker\n");
        let lines: Vec<_> = docs.iter().map(|d| (d.line, has_content(&d.text))).collect();
        assert_eq!(lines, vec![(1, true), (2, true), (4, true), (7, true)]);
        assert!(docs[3].text.starts_with("---x"));
    }

    #[tokio::test]
    async fn run_sends_changes_and_stops_when_receiver_drops() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "web.yaml", SVC);
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(run(dir.path().to_path_buf(), Duration::from_millis(10), tx));
        let first = rx.recv().await.expect("first batch").events;
        assert_eq!(resets(first)[&Kind::Service].len(), 1);
        write(dir.path(), "slice.yaml", SLICE);
        let second = rx.recv().await.expect("second batch").events;
        assert_eq!(resets(second)[&Kind::EndpointSlice].len(), 1);
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("run returns once the receiver is gone")
            .expect("run task");
    }
}
