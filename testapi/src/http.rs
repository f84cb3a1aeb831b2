//! Routes: the Kubernetes REST paths for the kinds in [`crate::resource`].
//!
//! | path                                               | methods                          |
//! |----------------------------------------------------|----------------------------------|
//! | `/version`, `/healthz`, `/livez`, `/readyz`        | GET                              |
//! | `/api`, `/apis`, `/api/v1`, `/apis/{g}/{v}`         | GET (discovery)                  |
//! | `{prefix}/{plural}`                                | GET list/watch (all namespaces)  |
//! | `{prefix}/namespaces/{ns}/{plural}`                | GET list/watch, POST             |
//! | `{prefix}/namespaces/{ns}/{plural}/{name}[/status]`| GET, PUT, PATCH, DELETE          |
//! | `{prefix}/{plural}/{name}[/status]` (cluster-scoped)| GET, PUT, PATCH, DELETE         |
//! | `{prefix}/{plural}` (cluster-scoped)               | also POST                        |
//!
//! `{prefix}` is `/api/v1` or `/apis/{group}/{version}`. A `status` subresource reads and
//! writes the whole object. Errors are `Status` bodies, as kube-rs expects.
use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, State},
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use crate::{
    resource::{RESOURCES, ResourceDef, ResourceId, by_path, def},
    selector::{FieldSelector, LabelSelector},
    store::{ContinueError, Filter, Object, Page, Store, WriteError, WriteMode},
    watch::{WatchOptions, WatchStream},
};

pub(crate) fn router(store: Arc<Store>) -> Router {
    Router::new().fallback(handle).with_state(store)
}

/// The server's listener: while the store is unreachable it closes every new connection
/// before reading from it, as a dead server's kernel would refuse it.
pub(crate) struct GatedListener {
    pub inner: tokio::net::TcpListener,
    pub store: Arc<Store>,
}

impl axum::serve::Listener for GatedListener {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            if !self.store.is_unreachable() {
                return (io, addr);
            }
            self.store.count_refused();
            drop(io);
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

async fn handle(
    State(store): State<Arc<Store>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let response =
        route(&store, &method, &uri, &headers, &body).unwrap_or_else(|e| e.into_response());
    tracing::debug!(%method, %uri, status = response.status().as_u16(), "testapi request");
    response
}

/// A failed request, answered with a `Status` body, which kube-rs turns into `Error::Api`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

impl ApiError {
    fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into() }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NotFound", message)
    }

    fn no_such_path(uri: &Uri) -> Self {
        Self::not_found(format!("the server could not find the requested resource {}", uri.path()))
    }

    fn method_not_allowed(method: &Method, uri: &Uri) -> Self {
        let message = format!("{method} is not supported on {}", uri.path());
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", message)
    }

    fn unavailable(message: &str) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", message)
    }

    fn write(def: &ResourceDef, name: &str, e: &WriteError) -> Self {
        let message = format!("{} \"{name}\" {e}", def.name);
        match e {
            WriteError::AlreadyExists => Self::new(StatusCode::CONFLICT, "AlreadyExists", message),
            WriteError::NotFound => Self::not_found(message),
            WriteError::Conflict { .. } => Self::new(StatusCode::CONFLICT, "Conflict", message),
            WriteError::MissingName => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code.as_u16(),
        });
        value_response(self.code, &body)
    }
}

type Result<T = Response, E = ApiError> = std::result::Result<T, E>;

fn json_response(code: StatusCode, body: impl Into<Body>) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], body.into()).into_response()
}

fn value_response(code: StatusCode, value: &Value) -> Response {
    json_response(code, serde_json::to_vec(value).expect("a JSON value serializes"))
}

fn object_response(code: StatusCode, object: &Object) -> Response {
    json_response(code, object.json_bytes())
}

/// Query parameters as sent; kube-rs starts its queries with `?&`, which parses fine.
struct Params(Vec<(String, String)>);

impl Params {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }

    fn number(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                ApiError::bad_request(format!("{key}={v:?} is not a non-negative integer"))
            }),
        }
    }
}

fn route(
    store: &Arc<Store>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result {
    store.count_request();
    if store.is_unreachable() {
        // A request on a connection opened before: answer and close it, so that the client's
        // next attempt needs a new connection, which the listener refuses.
        store.count_unavailable();
        let mut response =
            ApiError::unavailable("the test API server is set unreachable").into_response();
        response
            .headers_mut()
            .insert(header::CONNECTION, header::HeaderValue::from_static("close"));
        return Ok(response);
    }
    if store.is_unavailable() {
        store.count_unavailable();
        return Err(ApiError::unavailable("the test API server is set unavailable"));
    }
    let Query(params) = Query::<Vec<(String, String)>>::try_from_uri(uri)
        .map_err(|e| ApiError::bad_request(format!("invalid query: {e}")))?;
    let params = Params(params);
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    let get = |value: Value| {
        if *method == Method::GET {
            Ok(value_response(StatusCode::OK, &value))
        } else {
            Err(ApiError::method_not_allowed(method, uri))
        }
    };
    match segments.as_slice() {
        ["version"] => get(version()),
        ["healthz" | "livez" | "readyz"] if *method == Method::GET => {
            Ok((StatusCode::OK, "ok").into_response())
        }
        ["api"] => get(
            json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
        ),
        ["apis"] => get(api_groups()),
        ["api", version] => get(discovery(uri, "", version)?),
        ["apis", group, version] => get(discovery(uri, group, version)?),
        ["api", version, rest @ ..] => {
            let request = Request { store, method, uri, headers, body, params: &params };
            request.resource("", version, rest)
        }
        ["apis", group, version, rest @ ..] => {
            let request = Request { store, method, uri, headers, body, params: &params };
            request.resource(group, version, rest)
        }
        _ => Err(ApiError::no_such_path(uri)),
    }
}

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-testapi",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-04-23T00:00:00Z",
        "goVersion": "go1.24.2",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn api_groups() -> Value {
    let mut groups: Vec<&ResourceDef> = Vec::new();
    for d in RESOURCES.iter().filter(|d| !d.group.is_empty()) {
        if !groups.iter().any(|g| g.api_version == d.api_version) {
            groups.push(d);
        }
    }
    let groups: Vec<Value> = groups
        .iter()
        .map(|d| {
            let version = json!({"groupVersion": d.api_version, "version": d.version});
            json!({"name": d.group, "versions": [version.clone()], "preferredVersion": version})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn discovery(uri: &Uri, group: &str, version: &str) -> Result<Value> {
    let resources: Vec<Value> = RESOURCES
        .iter()
        .filter(|d| d.group == group && d.version == version)
        .map(|d| {
            json!({
                "name": d.plural,
                "singularName": d.kind.to_lowercase(),
                "namespaced": d.namespaced,
                "kind": d.kind,
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            })
        })
        .collect();
    if resources.is_empty() {
        return Err(ApiError::no_such_path(uri));
    }
    let group_version =
        if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") };
    Ok(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

/// What a resource path names.
struct Target<'a> {
    resource: ResourceId,
    /// From the path; `None` for cluster-scoped kinds and all-namespaces collections.
    namespace: Option<&'a str>,
    name: Option<&'a str>,
}

fn target<'a>(group: &str, version: &str, rest: &[&'a str]) -> Option<Target<'a>> {
    let namespaced = |plural: &str| by_path(group, version, plural).filter(|&r| def(r).namespaced);
    if let ["namespaces", ns, plural, tail @ ..] = rest
        && let Some(resource) = namespaced(plural)
    {
        let name = match tail {
            [] => None,
            [name] | [name, "status"] => Some(*name),
            _ => return None,
        };
        return Some(Target { resource, namespace: Some(ns), name });
    }
    let [plural, tail @ ..] = rest else { return None };
    let resource = by_path(group, version, plural)?;
    let name = match tail {
        [] => None,
        [name] | [name, "status"] if !def(resource).namespaced => Some(*name),
        _ => return None,
    };
    Some(Target { resource, namespace: None, name })
}

/// A request to a resource path.
struct Request<'a> {
    store: &'a Arc<Store>,
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    body: &'a [u8],
    params: &'a Params,
}

impl Request<'_> {
    fn resource(&self, group: &str, version: &str, rest: &[&str]) -> Result {
        let t = target(group, version, rest).ok_or_else(|| ApiError::no_such_path(self.uri))?;
        let (store, resource) = (self.store, t.resource);
        let d = def(resource);
        // The namespace an object is stored under: "" for cluster-scoped kinds.
        let namespace = t.namespace.unwrap_or_default();
        let absent = |name: &str| ApiError::not_found(format!("{} \"{name}\" not found", d.name));
        match (t.name, self.method) {
            (None, &Method::GET) if self.params.flag("watch") => self.watch(resource, t.namespace),
            (None, &Method::GET) => self.list(resource, t.namespace),
            (None, &Method::POST) if !d.namespaced || t.namespace.is_some() => {
                store.count_write(resource);
                self.create(resource, namespace)
            }
            (Some(name), &Method::GET) => {
                store.count_get(resource);
                let o = store.get(resource, namespace, name).ok_or_else(|| absent(name))?;
                Ok(object_response(StatusCode::OK, &o))
            }
            (Some(name), &Method::PUT) => {
                store.count_write(resource);
                self.replace(resource, namespace, name)
            }
            (Some(name), &Method::PATCH) => {
                store.count_write(resource);
                self.patch(resource, namespace, name)
            }
            (Some(name), &Method::DELETE) => {
                store.count_write(resource);
                let o =
                    store.delete(resource, namespace, name, true).ok_or_else(|| absent(name))?;
                Ok(object_response(StatusCode::OK, &o))
            }
            _ => Err(ApiError::method_not_allowed(self.method, self.uri)),
        }
    }

    fn filter(&self, resource: ResourceId, namespace: Option<&str>) -> Result<Filter> {
        let labels = LabelSelector::parse(self.params.get("labelSelector").unwrap_or_default())
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let fields = FieldSelector::parse(
            self.params.get("fieldSelector").unwrap_or_default(),
            def(resource),
        )
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok(Filter { namespace: namespace.map(str::to_owned), labels, fields })
    }

    fn list(&self, resource: ResourceId, namespace: Option<&str>) -> Result {
        let limit =
            self.params.number("limit")?.and_then(|l| usize::try_from(l).ok()).filter(|&l| l > 0);
        let limit = match (limit, self.store.max_page()) {
            (Some(l), Some(cap)) => Some(l.min(cap)),
            (l, cap) => l.or(cap),
        };
        let d = def(resource);
        let page = match self.params.get("continue").filter(|c| !c.is_empty()) {
            Some(token) => {
                self.store.list_continue(resource, token, limit).map_err(|e| match e {
                    ContinueError::Expired => ApiError::new(
                        StatusCode::GONE,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter.",
                    ),
                    ContinueError::Malformed => ApiError::bad_request(format!(
                        "invalid continue token {token:?} for {}",
                        d.name
                    )),
                })?
            }
            None => self.store.list(resource, &self.filter(resource, namespace)?, limit),
        };
        Ok(json_response(StatusCode::OK, list_body(d, &page)))
    }

    fn watch(&self, resource: ResourceId, namespace: Option<&str>) -> Result {
        let filter = self.filter(resource, namespace)?;
        let from = self.params.number("resourceVersion")?.filter(|&rv| rv > 0);
        let timeout =
            self.params.number("timeoutSeconds")?.filter(|&t| t > 0).map(Duration::from_secs);
        let initial_events = self.params.flag("sendInitialEvents");
        let bookmarks = self.params.flag("allowWatchBookmarks");
        let options = WatchOptions { bookmarks, timeout, initial_events };
        // sendInitialEvents starts from the current state whatever the resourceVersion: the
        // only resourceVersionMatch allowed with it is NotOlderThan, which the current state is.
        let from = if initial_events { None } else { from };
        let start =
            self.store.watch(resource, &filter, from).map_err(|gone| (gone, from.unwrap_or(0)));
        let stream = WatchStream::new(self.store.clone(), resource, filter, start, &options);
        Ok(json_response(StatusCode::OK, Body::from_stream(stream.into_body())))
    }

    fn create(&self, resource: ResourceId, namespace: &str) -> Result {
        let mut value = parse_body(self.body)?;
        check_body(resource, namespace, &mut value)?;
        let name = value["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let o = self
            .store
            .write(resource, value, WriteMode::Create)
            .map_err(|e| ApiError::write(def(resource), &name, &e))?;
        self.store.note_created(resource, o.clone());
        Ok(object_response(StatusCode::CREATED, &o))
    }

    fn replace(&self, resource: ResourceId, namespace: &str, name: &str) -> Result {
        let mut value = parse_body(self.body)?;
        check_body(resource, namespace, &mut value)?;
        match value["metadata"]["name"].as_str() {
            Some(n) if n != name => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the URL ({name})"
                )));
            }
            _ => value["metadata"]["name"] = name.into(),
        }
        let expected_rv =
            match value["metadata"]["resourceVersion"].as_str().filter(|s| !s.is_empty()) {
                None => None,
                Some(rv) => Some(rv.parse().map_err(|_| {
                    ApiError::bad_request(format!("invalid resourceVersion {rv:?}"))
                })?),
            };
        let o = self
            .store
            .write(resource, value, WriteMode::Update { expected_rv })
            .map_err(|e| ApiError::write(def(resource), name, &e))?;
        Ok(object_response(StatusCode::OK, &o))
    }

    fn patch(&self, resource: ResourceId, namespace: &str, name: &str) -> Result {
        let content_type = self
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .unwrap_or_default()
            .trim();
        // Strategic merge and server-side apply are approximated by a JSON merge patch: lists
        // are replaced whole instead of merged by key, and field ownership is not tracked.
        let create = match content_type {
            "application/merge-patch+json" | "application/strategic-merge-patch+json" => false,
            "application/apply-patch+yaml" | "application/apply-patch+json" => true,
            _ => {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    format!("the patch type {content_type:?} is not supported"),
                ));
            }
        };
        let patch = parse_body(self.body)?;
        let o = self
            .store
            .patch(resource, namespace, name, &patch, create)
            .map_err(|e| ApiError::write(def(resource), name, &e))?;
        Ok(object_response(StatusCode::OK, &o))
    }
}

/// The list body, built by copying each object's stored JSON once.
fn list_body(d: &ResourceDef, page: &Page) -> Vec<u8> {
    let size: usize = page.items.iter().map(|o| o.json().len() + 1).sum();
    let mut buf = Vec::with_capacity(size + 256);
    buf.extend_from_slice(
        format!(
            r#"{{"apiVersion":"{}","kind":"{}","metadata":{{"resourceVersion":"{}""#,
            d.api_version, d.list_kind, page.rv
        )
        .as_bytes(),
    );
    if let Some(token) = &page.continue_token {
        buf.extend_from_slice(br#","continue":"#);
        serde_json::to_writer(&mut buf, token).expect("a string serializes");
        buf.extend_from_slice(format!(r#","remainingItemCount":{}"#, page.remaining).as_bytes());
    }
    buf.extend_from_slice(br#"},"items":["#);
    for (i, o) in page.items.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        buf.extend_from_slice(o.json());
    }
    buf.extend_from_slice(b"]}");
    buf
}

fn parse_body(body: &[u8]) -> Result<Value> {
    let value: Value =
        serde_json::from_slice(body).or_else(|_| serde_yaml::from_slice(body)).map_err(|e| {
            ApiError::bad_request(format!("the request body is not a JSON or YAML object: {e}"))
        })?;
    if !value.is_object() {
        return Err(ApiError::bad_request("the request body is not an object"));
    }
    Ok(value)
}

/// Checks the body's type and namespace against the URL and fills in the namespace.
fn check_body(resource: ResourceId, namespace: &str, value: &mut Value) -> Result<()> {
    let d = def(resource);
    for (field, expected) in [("apiVersion", d.api_version), ("kind", d.kind)] {
        if let Some(got) = value.get(field).and_then(Value::as_str)
            && got != expected
        {
            return Err(ApiError::bad_request(format!(
                "{field} {got:?} does not match {expected:?} of the URL"
            )));
        }
    }
    if !d.namespaced {
        return Ok(());
    }
    let meta = value
        .as_object_mut()
        .expect("checked to be an object")
        .entry("metadata")
        .or_insert_with(|| json!({}));
    let meta =
        meta.as_object_mut().ok_or_else(|| ApiError::bad_request("metadata is not an object"))?;
    match meta.get("namespace").and_then(Value::as_str) {
        Some(ns) if !ns.is_empty() && ns != namespace => Err(ApiError::bad_request(format!(
            "the namespace of the object ({ns}) does not match the namespace on the request ({namespace})"
        ))),
        _ => {
            meta.insert("namespace".into(), namespace.into());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::by_name;

    #[test]
    fn paths_name_targets() {
        let t = |path: &str| {
            let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
            let (group, version, rest) = match segments.as_slice() {
                ["api", v, rest @ ..] => ("", *v, rest),
                ["apis", g, v, rest @ ..] => (*g, *v, rest),
                _ => unreachable!(),
            };
            target(group, version, rest).map(|t| {
                (def(t.resource).name, t.namespace.map(str::to_owned), t.name.map(str::to_owned))
            })
        };
        let own = |s: &str| Some(s.to_owned());
        assert_eq!(t("/api/v1/services"), Some(("services", None, None)));
        assert_eq!(t("/api/v1/namespaces/a/services"), Some(("services", own("a"), None)));
        assert_eq!(t("/api/v1/namespaces/a/services/s"), Some(("services", own("a"), own("s"))));
        assert_eq!(
            t("/api/v1/namespaces/a/services/s/status"),
            Some(("services", own("a"), own("s")))
        );
        assert_eq!(t("/api/v1/services/s"), None, "a namespaced object needs its namespace");
        assert_eq!(t("/api/v1/namespaces"), Some(("namespaces", None, None)));
        assert_eq!(
            t("/api/v1/namespaces/kube-system"),
            Some(("namespaces", None, own("kube-system")))
        );
        assert_eq!(t("/api/v1/namespaces/a/status"), Some(("namespaces", None, own("a"))));
        assert_eq!(t("/api/v1/nodes/n1"), Some(("nodes", None, own("n1"))));
        assert_eq!(t("/api/v1/namespaces/a/nodes"), None);
        assert_eq!(
            t("/apis/discovery.k8s.io/v1/namespaces/a/endpointslices"),
            Some(("endpointslices", own("a"), None))
        );
        assert_eq!(t("/apis/events.k8s.io/v1/events"), Some(("events.events.k8s.io", None, None)));
        assert_eq!(t("/apis/discovery.k8s.io/v1beta1/endpointslices"), None);
        assert_eq!(t("/api/v1/configmaps"), None);
    }

    #[test]
    fn list_body_is_a_kube_object_list() {
        let store = Store::new();
        let services = by_name("services").unwrap();
        for name in ["a", "b", "c"] {
            let svc = json!({"metadata": {"name": name, "namespace": "ns"}});
            store.write(services, svc, WriteMode::Upsert).unwrap();
        }
        let page = store.list(services, &Filter::default(), Some(2));
        let body = list_body(def(services), &page);
        let list: kube::core::ObjectList<k8s_openapi::api::core::v1::Service> =
            serde_json::from_slice(&body).unwrap();
        assert_eq!(list.types.kind, "ServiceList");
        assert_eq!(list.metadata.resource_version.as_deref(), Some("3"));
        assert_eq!(list.metadata.continue_.as_deref(), page.continue_token.as_deref());
        assert_eq!(list.metadata.remaining_item_count, Some(1));
        assert_eq!(list.items.len(), 2);
        let empty = store.list(by_name("pods").unwrap(), &Filter::default(), None);
        let v: Value =
            serde_json::from_slice(&list_body(def(by_name("pods").unwrap()), &empty)).unwrap();
        assert_eq!(v["items"], json!([]));
        assert!(v["metadata"].get("continue").is_none());
    }
}
