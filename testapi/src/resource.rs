//! The kinds this server knows: one static table, looked up by URL path, by
//! `apiVersion`/`kind`, or by the short names the test helpers accept.
//!
//! A resource's *name* is what [`Stats`](crate::Stats), [`TestApi::created`](crate::TestApi::created)
//! and [`TestApi::get_value`](crate::TestApi::get_value) take: the plural (`"services"`,
//! `"endpointslices"`), except for the second `events`, which is `"events.events.k8s.io"`.

/// Index of a resource in [`RESOURCES`].
pub(crate) type ResourceId = usize;

/// One field a field selector may name besides `metadata.name` and `metadata.namespace`.
pub(crate) struct FieldSpec {
    /// As written in a selector: `spec.nodeName`.
    pub label: &'static str,
    /// JSON path of the field in the object.
    pub path: &'static [&'static str],
    /// Value when the field is absent (`false` for booleans, as the real server reports).
    pub default: &'static str,
}

/// A kind served by the test API.
pub(crate) struct ResourceDef {
    /// Name used by stats and test helpers (see the module docs).
    pub name: &'static str,
    /// API group, `""` for core.
    pub group: &'static str,
    pub version: &'static str,
    pub api_version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub list_kind: &'static str,
    pub namespaced: bool,
    /// Extra field selectors, as the real API server registers them per type.
    pub fields: &'static [FieldSpec],
}

const fn field(
    label: &'static str,
    path: &'static [&'static str],
    default: &'static str,
) -> FieldSpec {
    FieldSpec { label, path, default }
}

const POD_FIELDS: &[FieldSpec] = &[
    field("spec.nodeName", &["spec", "nodeName"], ""),
    field("spec.restartPolicy", &["spec", "restartPolicy"], ""),
    field("spec.schedulerName", &["spec", "schedulerName"], ""),
    field("spec.serviceAccountName", &["spec", "serviceAccountName"], ""),
    field("spec.hostNetwork", &["spec", "hostNetwork"], "false"),
    field("status.phase", &["status", "phase"], ""),
    field("status.podIP", &["status", "podIP"], ""),
    field("status.nominatedNodeName", &["status", "nominatedNodeName"], ""),
];

const SERVICE_FIELDS: &[FieldSpec] = &[
    field("spec.clusterIP", &["spec", "clusterIP"], ""),
    field("spec.type", &["spec", "type"], ""),
];

const NODE_FIELDS: &[FieldSpec] =
    &[field("spec.unschedulable", &["spec", "unschedulable"], "false")];

const NAMESPACE_FIELDS: &[FieldSpec] = &[field("status.phase", &["status", "phase"], "")];

const CORE_EVENT_FIELDS: &[FieldSpec] = &[
    field("involvedObject.kind", &["involvedObject", "kind"], ""),
    field("involvedObject.namespace", &["involvedObject", "namespace"], ""),
    field("involvedObject.name", &["involvedObject", "name"], ""),
    field("involvedObject.uid", &["involvedObject", "uid"], ""),
    field("reason", &["reason"], ""),
    field("reportingComponent", &["reportingComponent"], ""),
    field("type", &["type"], ""),
];

const EVENT_FIELDS: &[FieldSpec] = &[
    field("regarding.kind", &["regarding", "kind"], ""),
    field("regarding.namespace", &["regarding", "namespace"], ""),
    field("regarding.name", &["regarding", "name"], ""),
    field("regarding.uid", &["regarding", "uid"], ""),
    field("reason", &["reason"], ""),
    field("reportingController", &["reportingController"], ""),
    field("type", &["type"], ""),
];

pub(crate) const RESOURCES: &[ResourceDef] = &[
    ResourceDef {
        name: "services",
        group: "",
        version: "v1",
        api_version: "v1",
        plural: "services",
        kind: "Service",
        list_kind: "ServiceList",
        namespaced: true,
        fields: SERVICE_FIELDS,
    },
    ResourceDef {
        name: "pods",
        group: "",
        version: "v1",
        api_version: "v1",
        plural: "pods",
        kind: "Pod",
        list_kind: "PodList",
        namespaced: true,
        fields: POD_FIELDS,
    },
    ResourceDef {
        name: "namespaces",
        group: "",
        version: "v1",
        api_version: "v1",
        plural: "namespaces",
        kind: "Namespace",
        list_kind: "NamespaceList",
        namespaced: false,
        fields: NAMESPACE_FIELDS,
    },
    ResourceDef {
        name: "nodes",
        group: "",
        version: "v1",
        api_version: "v1",
        plural: "nodes",
        kind: "Node",
        list_kind: "NodeList",
        namespaced: false,
        fields: NODE_FIELDS,
    },
    ResourceDef {
        name: "endpoints",
        group: "",
        version: "v1",
        api_version: "v1",
        plural: "endpoints",
        kind: "Endpoints",
        list_kind: "EndpointsList",
        namespaced: true,
        fields: &[],
    },
    ResourceDef {
        name: "events",
        group: "",
        version: "v1",
        api_version: "v1",
        plural: "events",
        kind: "Event",
        list_kind: "EventList",
        namespaced: true,
        fields: CORE_EVENT_FIELDS,
    },
    ResourceDef {
        name: "endpointslices",
        group: "discovery.k8s.io",
        version: "v1",
        api_version: "discovery.k8s.io/v1",
        plural: "endpointslices",
        kind: "EndpointSlice",
        list_kind: "EndpointSliceList",
        namespaced: true,
        fields: &[],
    },
    ResourceDef {
        name: "networkpolicies",
        group: "networking.k8s.io",
        version: "v1",
        api_version: "networking.k8s.io/v1",
        plural: "networkpolicies",
        kind: "NetworkPolicy",
        list_kind: "NetworkPolicyList",
        namespaced: true,
        fields: &[],
    },
    ResourceDef {
        name: "events.events.k8s.io",
        group: "events.k8s.io",
        version: "v1",
        api_version: "events.k8s.io/v1",
        plural: "events",
        kind: "Event",
        list_kind: "EventList",
        namespaced: true,
        fields: EVENT_FIELDS,
    },
];

pub(crate) fn def(id: ResourceId) -> &'static ResourceDef {
    &RESOURCES[id]
}

/// The resource served at `/api/{version}/{plural}` (group `""`) or
/// `/apis/{group}/{version}/{plural}`.
pub(crate) fn by_path(group: &str, version: &str, plural: &str) -> Option<ResourceId> {
    RESOURCES.iter().position(|d| d.group == group && d.version == version && d.plural == plural)
}

pub(crate) fn by_type(api_version: &str, kind: &str) -> Option<ResourceId> {
    RESOURCES.iter().position(|d| d.api_version == api_version && d.kind == kind)
}

/// By [`ResourceDef::name`], or `plural.group` (`endpointslices.discovery.k8s.io`).
pub(crate) fn by_name(name: &str) -> Option<ResourceId> {
    RESOURCES.iter().position(|d| {
        d.name == name
            || name
                .strip_prefix(d.plural)
                .and_then(|rest| rest.strip_prefix('.'))
                .is_some_and(|group| group == d.group)
    })
}

/// Whether `name` names `id`, or all resources with that plural when `name` is a bare plural
/// (`"events"` matches both Event kinds).
pub(crate) fn name_matches(id: ResourceId, name: &str) -> bool {
    let d = def(id);
    d.plural == name || by_name(name) == Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_agree() {
        for (id, d) in RESOURCES.iter().enumerate() {
            assert_eq!(by_path(d.group, d.version, d.plural), Some(id), "{}", d.name);
            assert_eq!(by_type(d.api_version, d.kind), Some(id), "{}", d.name);
            assert_eq!(by_name(d.name), Some(id), "{}", d.name);
            assert_eq!(d.list_kind, format!("{}List", d.kind));
            let expected = if d.group.is_empty() {
                d.version.to_owned()
            } else {
                format!("{}/{}", d.group, d.version)
            };
            assert_eq!(d.api_version, expected);
        }
        assert_eq!(by_name("endpointslices.discovery.k8s.io"), by_name("endpointslices"));
        assert_eq!(by_name("events"), by_path("", "v1", "events"));
        assert_eq!(by_name("configmaps"), None);
        let events: Vec<_> =
            (0..RESOURCES.len()).filter(|&id| name_matches(id, "events")).collect();
        assert_eq!(events.len(), 2);
    }
}
