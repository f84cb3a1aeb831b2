//! The deployment manifests (`manifests/*.yaml`) checked without a cluster: every document
//! against the Kubernetes schema, the DaemonSet's security and wiring, its command line and
//! environment against the agent's settings, and the ClusterRole against what the agent
//! watches (least privilege). No root needed. With `NODEPLANE_AGENT_BIN` set (as
//! `cargo xtask test` does), the settings are also compared with the built agent's `--help`.
//! docs/INSTALL.md describes what these tests guarantee; keep the two in step.
//!
//! k8s-openapi types accept unknown fields silently (a misspelt `hostNetwrok: true` would
//! deserialize and be ignored, here and by a lenient client), so each document is also
//! re-serialized from its typed form and every key of the input must survive the round trip.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    Resource,
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
    serde::{Deserialize as _, Serialize, de::DeserializeOwned},
};
use nodeplane_agent::source::WATCHED;
use serde_json::Value;

/// What the agent's watchers do with each resource in [`WATCHED`]: a kube-rs `watcher`
/// lists, then watches; nothing in the agent gets single objects or writes.
const WATCH_VERBS: &[&str] = &["list", "watch"];

/// The capabilities the agent's container adds, each explained in docs/INSTALL.md.
const CAPABILITIES: &[&str] = &["BPF", "PERFMON", "NET_ADMIN"];
const HEALTHZ_PORT: i32 = 10256;
const METRICS_PORT: i32 = 10249;

/// The settings of `nodeplane-agent run`, as `(flag, environment variable)`, each described
/// in docs/INSTALL.md. The DaemonSet may use only these. When `NODEPLANE_AGENT_BIN` is set
/// (`cargo xtask test` builds the agent and sets it), the list itself is checked against
/// the agent's own `run --help`, so it cannot drift from the real command line.
const AGENT_SETTINGS: &[(&str, &str)] = &[
    ("--config", "NODEPLANE_CONFIG"),
    ("--manifests", "NODEPLANE_MANIFESTS"),
    ("--kubeconfig", "KUBECONFIG"),
    ("--node-name", "NODE_NAME"),
    ("--cluster-cidr", "NODEPLANE_CLUSTER_CIDR"),
    ("--healthz-bind-address", "NODEPLANE_HEALTHZ_BIND_ADDRESS"),
    ("--metrics-bind-address", "NODEPLANE_METRICS_BIND_ADDRESS"),
    ("--healthz-timeout", "NODEPLANE_HEALTHZ_TIMEOUT"),
    ("--iface-prefix", "NODEPLANE_IFACE_PREFIX"),
    ("--log-format", "NODEPLANE_LOG_FORMAT"),
    ("--log-level", "NODEPLANE_LOG_LEVEL"),
    ("--occupancy-interval", "NODEPLANE_OCCUPANCY_INTERVAL"),
    ("--bpffs-dir", "NODEPLANE_BPFFS_DIR"),
    ("--conntrack-entries", "NODEPLANE_CONNTRACK_ENTRIES"),
    ("--conntrack-gc-interval", "NODEPLANE_CONNTRACK_GC_INTERVAL"),
    ("--state-dir", "NODEPLANE_STATE_DIR"),
    ("--flow-log", "NODEPLANE_FLOW_LOG"),
    ("--flow-log-allowed", "NODEPLANE_FLOW_LOG_ALLOWED"),
    ("--flow-log-rate", "NODEPLANE_FLOW_LOG_RATE"),
    ("--flow-log-burst", "NODEPLANE_FLOW_LOG_BURST"),
    ("--socket-lb", "NODEPLANE_SOCKET_LB"),
    ("--cgroup-root", "NODEPLANE_CGROUP_ROOT"),
    ("--external-interface", "NODEPLANE_EXTERNAL_INTERFACES"),
    ("--xdp", "NODEPLANE_XDP"),
    ("--masquerade", "NODEPLANE_MASQUERADE"),
    ("--non-masquerade-cidr", "NODEPLANE_NON_MASQUERADE_CIDRS"),
    ("--masquerade-port-range", "NODEPLANE_MASQUERADE_PORT_RANGE"),
    ("--external-ip-cidr", "NODEPLANE_EXTERNAL_IP_CIDRS"),
    ("--health-check-bind-address", "NODEPLANE_HEALTH_CHECK_BIND_ADDRESS"),
];
/// Read by kube-rs's in-cluster configuration rather than by the agent's flags.
const IN_CLUSTER_ENV: &[&str] = &["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"];

// --- reading the manifests ---

struct Doc {
    /// `manifests/nodeplane.yaml#2` (document index in the file, from 0).
    origin: String,
    value: Value,
}

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

fn install_doc() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/INSTALL.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {dir:?}: {e}"));
    for entry in entries {
        let path = entry.unwrap_or_else(|e| panic!("reading {dir:?}: {e}")).path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

/// Every non-empty YAML document under `manifests/`, in file order.
fn documents() -> Vec<Doc> {
    let root = manifests_dir();
    let mut files = Vec::new();
    yaml_files(&root, &mut files);
    files.sort();
    assert!(!files.is_empty(), "no YAML under {root:?}");
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{file:?}: {e}"));
        let name = file.strip_prefix(&root).unwrap_or(&file).display().to_string();
        for (i, de) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value = Value::deserialize(de)
                .unwrap_or_else(|e| panic!("manifests/{name} document {i}: {e}"));
            if !value.is_null() {
                docs.push(Doc { origin: format!("manifests/{name}#{i}"), value });
            }
        }
    }
    docs
}

fn field<'a>(doc: &'a Doc, name: &str) -> &'a str {
    doc.value.get(name).and_then(Value::as_str).unwrap_or("")
}

fn typed<K: DeserializeOwned>(doc: &Doc) -> K {
    serde_json::from_value(doc.value.clone()).unwrap_or_else(|e| panic!("{}: {e}", doc.origin))
}

fn all_of<K: Resource + DeserializeOwned>(docs: &[Doc]) -> Vec<K> {
    docs.iter()
        .filter(|d| field(d, "apiVersion") == K::API_VERSION && field(d, "kind") == K::KIND)
        .map(typed)
        .collect()
}

fn the_one<K: Resource + DeserializeOwned>(docs: &[Doc]) -> K {
    let mut all = all_of::<K>(docs);
    assert_eq!(all.len(), 1, "expected exactly one {}", K::KIND);
    all.remove(0)
}

// --- schema: typed round trip, nothing dropped ---

/// Deserializes into `K` and serializes back, or says why the document is not a valid `K`.
fn round_trip<K: DeserializeOwned + Serialize>(value: &Value) -> Result<Value, String> {
    let typed: K = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(&typed).map_err(|e| e.to_string())
}

type RoundTrip = fn(&Value) -> Result<Value, String>;

/// The kinds a manifest may contain; anything else fails the test.
fn schema_for(api_version: &str, kind: &str) -> Option<RoundTrip> {
    macro_rules! kinds {
        ($($t:ty),* $(,)?) => {
            [$((<$t as Resource>::API_VERSION, <$t as Resource>::KIND, round_trip::<$t> as RoundTrip)),*]
        };
    }
    let known = kinds![
        Namespace,
        ServiceAccount,
        ClusterRole,
        ClusterRoleBinding,
        Role,
        RoleBinding,
        DaemonSet,
        ConfigMap,
        Service,
    ];
    known.into_iter().find(|(v, k, _)| *v == api_version && *k == kind).map(|(_, _, f)| f)
}

/// Keys of `input` missing from `output` (and scalars that changed), as JSON paths.
fn dropped(path: &str, input: &Value, output: Option<&Value>, out: &mut Vec<String>) {
    let Some(output) = output else {
        out.push(format!("{path} (unknown field)"));
        return;
    };
    match (input, output) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                dropped(&format!("{path}.{key}"), value, b.get(key), out);
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, value) in a.iter().enumerate() {
                dropped(&format!("{path}[{i}]"), value, b.get(i), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} became {b}")),
    }
}

/// Problems of one document against the schema, empty if none.
fn schema_problems(doc: &Doc) -> Vec<String> {
    let (api_version, kind) = (field(doc, "apiVersion"), field(doc, "kind"));
    let Some(round_trip) = schema_for(api_version, kind) else {
        return vec![format!("unknown kind {api_version:?} {kind:?}")];
    };
    match round_trip(&doc.value) {
        Ok(back) => {
            let mut out = Vec::new();
            dropped("$", &doc.value, Some(&back), &mut out);
            out
        }
        Err(e) => vec![format!("not a valid {kind}: {e}")],
    }
}

#[test]
fn every_document_matches_the_kubernetes_schema() {
    let docs = documents();
    let problems: Vec<String> = docs
        .iter()
        .flat_map(|d| schema_problems(d).into_iter().map(|p| format!("{}: {p}", d.origin)))
        .collect();
    assert!(problems.is_empty(), "schema problems:\n  {}", problems.join("\n  "));
}

#[test]
fn the_schema_check_catches_unknown_fields_and_kinds() {
    let doc = |yaml: &str| Doc {
        origin: "inline".into(),
        value: serde_yaml::from_str(yaml).expect("test YAML"),
    };
    let misspelt = doc("apiVersion: apps/v1
kind: DaemonSet
metadata: {name: x}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      hostNetwrok: true
      containers:
        - name: c
          securityContext: {capabilities: {add: [BPF], dorp: [ALL]}}
");
    assert_eq!(
        schema_problems(&misspelt),
        vec![
            "$.spec.template.spec.containers[0].securityContext.capabilities.dorp (unknown field)",
            "$.spec.template.spec.hostNetwrok (unknown field)",
        ]
    );
    let wrong_type = doc("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: [x]}\n");
    assert!(schema_problems(&wrong_type)[0].starts_with("not a valid ServiceAccount"));
    let unknown = doc("apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: x}\n");
    assert_eq!(schema_problems(&unknown), vec![r#"unknown kind "example.com/v1" "Widget""#]);
    let wrong_group = doc("apiVersion: extensions/v1beta1\nkind: DaemonSet\n");
    assert_eq!(schema_problems(&wrong_group).len(), 1, "old API groups are unknown kinds");
}

// --- the DaemonSet ---

fn daemonset() -> DaemonSet {
    let ds: DaemonSet = the_one(&documents());
    assert_eq!(ds.metadata.name.as_deref(), Some("nodeplane"));
    assert_eq!(ds.metadata.namespace.as_deref(), Some("kube-system"), "where kube-proxy runs");
    ds
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("DaemonSet pod spec")
}

fn agent(ds: &DaemonSet) -> &Container {
    let spec = pod_spec(ds);
    assert_eq!(spec.containers.len(), 1, "one container");
    &spec.containers[0]
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn daemonset_runs_on_every_node_in_the_host_network() {
    let ds = daemonset();
    let spec = pod_spec(&ds);
    assert_eq!(spec.host_network, Some(true));
    // Cluster DNS is a ClusterIP, which host-network processes cannot reach in this version
    // (and nobody can before the agent runs): the agent resolves names with the node's DNS.
    assert_eq!(spec.dns_policy.as_deref(), Some("Default"));
    assert_eq!(spec.priority_class_name.as_deref(), Some("system-node-critical"));
    let tolerates_everything =
        spec.tolerations.iter().flatten().any(|t| {
            t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
        });
    assert!(tolerates_everything, "a toleration {{operator: Exists}}: {:?}", spec.tolerations);

    let strategy = ds.spec.as_ref().and_then(|s| s.update_strategy.as_ref()).expect("strategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let max_unavailable = strategy.rolling_update.as_ref().and_then(|r| r.max_unavailable.clone());
    assert_eq!(max_unavailable, Some(IntOrString::Int(1)));
}

#[test]
fn daemonset_is_not_privileged_and_adds_only_the_documented_capabilities() {
    let ds = daemonset();
    let spec = pod_spec(&ds);
    let all = spec.containers.iter().chain(spec.init_containers.iter().flatten());
    for c in all {
        let sc = c.security_context.as_ref().expect("a securityContext on every container");
        assert_ne!(sc.privileged, Some(true), "{} is privileged", c.name);
        let caps = sc.capabilities.as_ref().expect("capabilities");
        let add: BTreeSet<String> = caps.add.iter().flatten().cloned().collect();
        assert_eq!(add, set(CAPABILITIES), "{}: added capabilities", c.name);
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]), "{}: drop ALL", c.name);
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
        assert_eq!(sc.run_as_user, Some(0), "{}: capabilities are only effective as root", c.name);
    }

    // Each capability is explained where users read about installing.
    let install = install_doc();
    for cap in CAPABILITIES {
        assert!(install.contains(&format!("`CAP_{cap}`")), "docs/INSTALL.md explains CAP_{cap}");
    }

    // Bidirectional propagation is refused for unprivileged containers: bpffs comes from
    // the host.
    let bpffs = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.host_path.as_ref().is_some_and(|h| h.path == "/sys/fs/bpf"))
        .expect("a hostPath volume for /sys/fs/bpf");
    let mount = agent(&ds)
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == bpffs.name)
        .expect("bpffs mounted");
    assert_eq!(mount.mount_path, "/sys/fs/bpf");
    assert_eq!(mount.mount_propagation.as_deref(), Some("HostToContainer"));
    assert_ne!(mount.read_only, Some(true), "pinning writes to bpffs");
}

#[test]
fn daemonset_knows_its_node_and_is_probed_on_healthz() {
    let ds = daemonset();
    let c = agent(&ds);
    let node_name = c.env.iter().flatten().find(|e| e.name == "NODE_NAME").expect("NODE_NAME");
    let field_path = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(field_path, Some("spec.nodeName"), "NODE_NAME from the downward API");

    let args: Vec<&str> =
        c.command.iter().flatten().chain(c.args.iter().flatten()).map(String::as_str).collect();
    assert_eq!(args.get(..2), Some(&["nodeplane-agent", "run"][..]), "{args:?}");
    assert!(args.contains(&"--node-name=$(NODE_NAME)"), "{args:?}");
    let healthz = format!("--healthz-bind-address=0.0.0.0:{HEALTHZ_PORT}");
    assert!(args.contains(&healthz.as_str()), "{args:?}");
    let metrics = format!("--metrics-bind-address=127.0.0.1:{METRICS_PORT}");
    assert!(args.contains(&metrics.as_str()), "metrics stay node-local by default: {args:?}");
    let ports: Vec<i32> = c.ports.iter().flatten().map(|p| p.container_port).collect();
    assert_eq!(ports, vec![HEALTHZ_PORT], "no containerPort for a port bound to 127.0.0.1");

    let probes = [
        ("startup", &c.startup_probe, "/healthz"),
        ("liveness", &c.liveness_probe, "/healthz"),
        ("readiness", &c.readiness_probe, "/readyz"),
    ];
    for (what, probe, path) in probes {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref());
        let get = get.unwrap_or_else(|| panic!("an httpGet {what} probe"));
        assert_eq!(get.path.as_deref(), Some(path), "{what} probe");
        assert_eq!(get.port, IntOrString::Int(HEALTHZ_PORT), "{what} probe");
    }

    let resources = c.resources.as_ref().expect("resources");
    let requests = resources.requests.as_ref().expect("requests");
    assert_eq!(requests.get("cpu").map(|q| q.0.as_str()), Some("100m"));
    assert_eq!(requests.get("memory").map(|q| q.0.as_str()), Some("128Mi"));
    let limits = resources.limits.as_ref().expect("limits");
    assert!(limits.contains_key("memory"), "a memory limit");
}

// --- RBAC: least privilege ---

/// `(apiGroup, resource) -> verbs` over every rule; panics on wildcards and on anything
/// that is not a plain resource rule.
fn grants(rules: &[PolicyRule]) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in rules {
        assert!(rule.non_resource_urls.is_none(), "non-resource URLs: {rule:?}");
        assert!(rule.resource_names.is_none(), "resourceNames are not needed: {rule:?}");
        let groups = rule.api_groups.as_deref().unwrap_or_default();
        let resources = rule.resources.as_deref().unwrap_or_default();
        for s in groups.iter().chain(resources).chain(&rule.verbs) {
            assert!(!s.contains('*'), "wildcard {s:?} in {rule:?}");
        }
        assert!(!groups.is_empty() && !resources.is_empty(), "empty rule {rule:?}");
        for group in groups {
            for resource in resources {
                assert!(!resource.contains('/'), "subresource {resource:?} in {rule:?}");
                out.entry((group.clone(), resource.clone()))
                    .or_default()
                    .extend(rule.verbs.iter().cloned());
            }
        }
    }
    out
}

#[test]
fn cluster_role_grants_exactly_what_the_agent_uses() {
    let docs = documents();
    assert!(all_of::<Role>(&docs).is_empty(), "no namespaced Roles");
    assert!(all_of::<RoleBinding>(&docs).is_empty(), "no RoleBindings");
    let role: ClusterRole = the_one(&docs);
    assert!(role.aggregation_rule.is_none(), "no aggregation");
    let got = grants(role.rules.as_deref().unwrap_or_default());

    // The agent's own list, so a new watcher without RBAC, or RBAC for a watcher that is
    // gone, fails here.
    let mut want: BTreeMap<(String, String), BTreeSet<String>> = WATCHED
        .iter()
        .map(|(group, resource)| ((group.to_string(), resource.to_string()), set(WATCH_VERBS)))
        .collect();
    let (group, resource, verbs) = nodeplane_agent::events::RECORDED;
    want.insert((group.to_string(), resource.to_string()), set(&verbs));
    assert_eq!(got, want);
}

#[test]
fn the_binding_gives_the_role_to_the_daemonsets_service_account() {
    let docs = documents();
    let sa: ServiceAccount = the_one(&docs);
    let role: ClusterRole = the_one(&docs);
    let binding: ClusterRoleBinding = the_one(&docs);
    let ds = daemonset();
    assert_eq!(pod_spec(&ds).service_account_name, sa.metadata.name);
    assert_eq!(sa.metadata.namespace, ds.metadata.namespace);
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, sa.metadata.namespace);
}

// --- the agent's command line and environment ---

/// `--flag` of a command-line argument (`--flag=value` or `--flag`).
fn flag_name(arg: &str) -> &str {
    arg.split_once('=').map_or(arg, |(flag, _)| flag)
}

#[test]
fn daemonset_uses_only_settings_the_agent_has() {
    let ds = daemonset();
    let c = agent(&ds);
    let flags: BTreeSet<&str> = AGENT_SETTINGS.iter().map(|(flag, _)| *flag).collect();
    let vars: BTreeSet<&str> =
        AGENT_SETTINGS.iter().map(|(_, var)| *var).chain(IN_CLUSTER_ENV.iter().copied()).collect();

    let args: Vec<&str> =
        c.command.iter().flatten().chain(c.args.iter().flatten()).map(String::as_str).collect();
    let mut value_expected = false;
    for arg in args.iter().skip(2) {
        if !arg.starts_with('-') {
            assert!(value_expected, "stray argument {arg:?} in {args:?}");
            value_expected = false;
            continue;
        }
        let flag = flag_name(arg);
        assert!(flag.starts_with("--"), "{arg:?}: use the long flags, as documented");
        assert!(flags.contains(flag), "{arg:?} is not a flag of `nodeplane-agent run`");
        value_expected = !arg.contains('=');
    }

    let env: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    for name in &env {
        // A misspelt variable would be ignored silently and the default used instead.
        assert!(vars.contains(name), "{name} is read by neither the agent nor kube-rs");
    }
    let from_files =
        args.iter().any(|a| flag_name(a) == "--manifests") || env.contains(&"NODEPLANE_MANIFESTS");
    assert!(!from_files, "the DaemonSet watches the API server, not a directory");
}

#[test]
fn every_setting_is_documented() {
    let install = install_doc();
    for (flag, var) in AGENT_SETTINGS {
        assert!(install.contains(&format!("`{flag}`")), "docs/INSTALL.md describes `{flag}`");
        assert!(install.contains(&format!("`{var}`")), "docs/INSTALL.md names `{var}`");
    }
}

/// `--flag -> environment variable (if any)` for every option in clap's help output, short
/// (`--flag <V>  text [env: X=]`) or long (description and `[env: X=]` on the lines below).
fn help_options(help: &str) -> BTreeMap<String, Option<String>> {
    let mut entries: Vec<String> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        // Options are indented by 2 (`-h, --help`) or 6 (long only); descriptions deeper.
        let indent = line.len() - trimmed.len();
        if trimmed.starts_with('-') && indent <= 6 {
            entries.push(String::new());
        } else if trimmed.is_empty() {
            // Not the end of an entry: in the long form a blank line separates the
            // description from `[env: ...]`.
            continue;
        } else if indent == 0 {
            // A heading (`Options:`) ends the entry.
            entries.push(String::new());
            continue;
        }
        if let Some(entry) = entries.last_mut() {
            entry.push(' ');
            entry.push_str(trimmed);
        }
    }
    let mut out = BTreeMap::new();
    for entry in entries {
        let Some(flag) = entry.split([' ', ',', '=', '<', '[']).find(|t| t.starts_with("--"))
        else {
            continue;
        };
        let env = entry
            .split_once("[env: ")
            .and_then(|(_, rest)| rest.split_once('='))
            .map(|(var, _)| var.to_string());
        out.insert(flag.to_string(), env);
    }
    out
}

#[test]
fn help_options_reads_clap_short_and_long_help() {
    let short = "\
Usage: nodeplane-agent run [OPTIONS]

Options:
      --node-name <NAME>          This node's name [env: NODE_NAME=]
      --poll-interval <DURATION>  How often to look [default: 200ms]
  -h, --help                      Print help
";
    let want: BTreeMap<String, Option<String>> =
        [("--node-name", Some("NODE_NAME")), ("--poll-interval", None), ("--help", None)]
            .into_iter()
            .map(|(f, e)| (f.to_string(), e.map(String::from)))
            .collect();
    assert_eq!(help_options(short), want);

    let long = "\
Options:
      --iface-prefix <PREFIX,...>
          Attach to these.
          - `veth` for kindnet

          [env: NODEPLANE_IFACE_PREFIX=veth]
          [default: lxc]

  -h, --help
          Print help (see a summary with '-h')
";
    let got = help_options(long);
    assert_eq!(got.get("--iface-prefix"), Some(&Some("NODEPLANE_IFACE_PREFIX".to_string())));
    assert_eq!(got.get("--help"), Some(&None));
    assert_eq!(got.len(), 2, "{got:?}");
}

#[test]
fn agent_settings_match_the_agents_command_line() {
    let Some(bin) = std::env::var_os("NODEPLANE_AGENT_BIN") else {
        eprintln!(
            "NODEPLANE_AGENT_BIN is not set: AGENT_SETTINGS not compared with the agent's \
             --help (cargo xtask test builds the agent and does this)"
        );
        return;
    };
    // No inherited environment: clap prints the values of set variables in its help.
    let out = Command::new(&bin)
        .args(["run", "--help"])
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("running {bin:?} run --help: {e}"));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{bin:?} run --help: {}", String::from_utf8_lossy(&out.stderr));
    let options = help_options(&help);

    for (flag, var) in AGENT_SETTINGS {
        let env = options.get(*flag).unwrap_or_else(|| panic!("the agent has no {flag}:\n{help}"));
        assert_eq!(env.as_deref(), Some(*var), "{flag}'s environment variable");
    }
    // Every setting with an environment variable is one users can set from the DaemonSet,
    // so it belongs in AGENT_SETTINGS and in docs/INSTALL.md.
    for (flag, env) in &options {
        if let Some(var) = env {
            assert!(
                AGENT_SETTINGS.contains(&(flag.as_str(), var.as_str())),
                "{flag} ({var}) is missing from AGENT_SETTINGS and docs/INSTALL.md"
            );
        }
    }
}
