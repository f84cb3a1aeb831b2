//! Multi-document YAML → typed objects, dispatched on `apiVersion`/`kind`.
//!
//! Unlike the agent (which skips kinds it does not model), the lab rejects them: a lab's
//! input is written by hand for the lab, so an unknown kind is a typo worth stopping for.
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{Deserialize, de::DeserializeOwned};

use super::{Kind, ObjectKey};

/// One input object the lab understands.
#[derive(Clone, Debug, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "a few dozen objects per apply, each moved once or twice: boxing buys nothing"
)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Service(Service),
    EndpointSlice(EndpointSlice),
    NetworkPolicy(NetworkPolicy),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
        }
    }

    fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::NetworkPolicy(o) => &o.metadata,
        }
    }

    /// Namespace and name; for a Namespace object the namespace part is empty.
    pub fn key(&self) -> ObjectKey {
        let meta = self.metadata();
        ObjectKey::new(
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// `document` counts the YAML documents of the source from 1.
    #[error("{source_name}: document {document}: {message}")]
    Invalid { source_name: String, document: usize, message: String },
    #[error(
        "{source_name}: document {document}: unsupported object (apiVersion {api_version:?}, \
         kind {kind:?}); the lab reads v1 Namespace, Pod, Service, \
         discovery.k8s.io/v1 EndpointSlice and networking.k8s.io/v1 NetworkPolicy"
    )]
    UnsupportedKind { source_name: String, document: usize, api_version: String, kind: String },
}

/// Parses every document of one source. `source_name` (usually a file name) only labels
/// errors. Empty documents are skipped but still counted, so numbers match the file.
pub fn parse(source_name: &str, text: &str) -> Result<Vec<Object>, ParseError> {
    let mut objects = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let invalid = |message: String| ParseError::Invalid {
            source_name: source_name.to_string(),
            document,
            message,
        };
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| invalid(e.to_string()))?;
        if value.is_null() {
            continue;
        }
        match typed(value) {
            Ok(object) => objects.push(object),
            Err(DocError::Invalid(message)) => return Err(invalid(message)),
            Err(DocError::Unsupported { api_version, kind }) => {
                return Err(ParseError::UnsupportedKind {
                    source_name: source_name.to_string(),
                    document,
                    api_version,
                    kind,
                });
            }
        }
    }
    Ok(objects)
}

enum DocError {
    Invalid(String),
    Unsupported { api_version: String, kind: String },
}

fn typed(value: serde_yaml::Value) -> Result<Object, DocError> {
    let field = |name: &str| value.get(name).and_then(|v| v.as_str()).unwrap_or("").to_string();
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    let object = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => Object::Namespace(de(value, &kind)?),
        ("v1", "Pod") => Object::Pod(de(value, &kind)?),
        ("v1", "Service") => Object::Service(de(value, &kind)?),
        ("discovery.k8s.io/v1", "EndpointSlice") => Object::EndpointSlice(de(value, &kind)?),
        ("networking.k8s.io/v1", "NetworkPolicy") => Object::NetworkPolicy(de(value, &kind)?),
        _ => return Err(DocError::Unsupported { api_version, kind }),
    };
    normalize(object)
}

fn de<T: DeserializeOwned>(value: serde_yaml::Value, kind: &str) -> Result<T, DocError> {
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .map_or_else(String::new, |n| format!(" {n}"));
    serde_yaml::from_value(value).map_err(|e| DocError::Invalid(format!("{kind}{name}: {e}")))
}

/// Requires a name and defaults the namespace of namespaced objects to `default`, as
/// `kubectl apply` would.
fn normalize(mut object: Object) -> Result<Object, DocError> {
    let kind = object.kind();
    let meta = match &mut object {
        Object::Namespace(o) => &mut o.metadata,
        Object::Pod(o) => &mut o.metadata,
        Object::Service(o) => &mut o.metadata,
        Object::EndpointSlice(o) => &mut o.metadata,
        Object::NetworkPolicy(o) => &mut o.metadata,
    };
    if meta.name.as_deref().is_none_or(str::is_empty) {
        return Err(DocError::Invalid(format!("{kind} without metadata.name")));
    }
    if kind == Kind::Namespace {
        meta.namespace = None;
    } else if meta.namespace.as_deref().is_none_or(str::is_empty) {
        meta.namespace = Some("default".to_string());
    }
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: web-0, labels: {app: web}}
spec:
  containers:
  - name: c
    ports: [{name: http, containerPort: 8080}]
---
# only a comment
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: http}]}
";

    #[test]
    fn parses_typed_objects_and_defaults_namespace() {
        let objects = parse("good.yaml", GOOD).expect("parses");
        let keys: Vec<_> = objects.iter().map(|o| (o.kind(), o.key().to_string())).collect();
        assert_eq!(
            keys,
            [(Kind::Pod, "default/web-0".to_string()), (Kind::Service, "demo/web".to_string())]
        );
    }

    #[test]
    fn unknown_kind_names_source_and_document() {
        let text =
            format!("{GOOD}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\n");
        let err = parse("apps.yaml", &text).expect_err("Deployment is rejected");
        assert!(
            matches!(&err, ParseError::UnsupportedKind { source_name, document: 4, kind, .. }
                if source_name == "apps.yaml" && kind == "Deployment"),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.starts_with("apps.yaml: document 4:"), "{message}");
    }

    #[test]
    fn type_errors_name_source_document_and_object() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
                    apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
                    spec: {ports: [{port: eighty}]}\n";
        let message = parse("svc.yaml", text).expect_err("bad port").to_string();
        assert!(message.starts_with("svc.yaml: document 2: Service web:"), "{message}");
    }

    #[test]
    fn syntax_errors_name_source_and_document() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: [\n";
        let err = parse("broken.yaml", text).expect_err("syntax error");
        assert!(
            matches!(&err, ParseError::Invalid { source_name, document: 2, .. } if source_name == "broken.yaml"),
            "{err:?}"
        );
    }

    #[test]
    fn missing_name_is_an_error() {
        let err =
            parse("x.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {}\n").expect_err("no name");
        assert!(err.to_string().contains("Pod without metadata.name"), "{err}");
    }
}
