//! `networking.k8s.io/v1` NetworkPolicy → [`Policy`], with the API's semantics and the
//! agent's fail-closed rule for what the API server would have rejected (objects from
//! files, or legacy objects stored before a validation existed).
//!
//! | field | meaning (API reference) | invalid → |
//! |-------|-------------------------|-----------|
//! | `policyTypes` | as given; absent or empty: `Ingress`, plus `Egress` iff `egress` has rules | unknown value: both directions isolated |
//! | `podSelector` | pods of the policy's namespace; empty: all of them | every pod of the namespace (isolated; the rules still apply) |
//! | `ingress`/`egress` absent or empty | no rule: selected pods isolated, nothing allowed | – |
//! | `from`/`to` absent or empty | every peer ([`Peers::All`]) | – |
//! | peer `podSelector` only | those pods of the policy's namespace | peer dropped |
//! | peer `namespaceSelector` only | every pod of the matching namespaces | peer dropped |
//! | both | pods matching `podSelector` in matching namespaces (AND) | peer dropped |
//! | `ipBlock` | addresses in `cidr` and in no `except` | see below |
//! | `ports` absent or empty | every protocol and port ([`Ports::All`]) | – |
//! | port | `protocol` (default TCP) with `port` (number, `endPort` range, or container port name); no `port`: every port of the protocol | port dropped |
//!
//! ipBlock details: an IPv6 `cidr` drops the peer (the datapath is IPv4-only; dropping
//! narrows); a `cidr` or `except` with host bits set is masked as Go's `net.ParseCIDR`
//! does for legacy objects; an `except` outside its `cidr` excludes nothing and is ignored;
//! an `except` that is not an IPv4 CIDR drops the peer (keeping it without the `except`
//! would widen it); an `except` covering the whole `cidr` leaves a peer that matches
//! nothing, so the peer is dropped.
//!
//! Every drop or repair is reported as a [`PolicyIssue`]. A list that loses every element
//! stays `Only(vec![])` and matches nothing: an invalid part never widens a policy.
//!
//! Work is linear in the size of the object (no pairwise comparisons), so policies with
//! thousands of peers or excepts convert in microseconds.
use std::net::Ipv6Addr;

use k8s_openapi::{
    api::networking::v1::{IPBlock, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use super::{
    NamespaceScope, Operator, Peer, Peers, Policy, PolicyProtocol, PortMatch, PortSpec, Ports,
    Requirement, Rule, Selector,
};
use crate::model::{Ipv4Cidr, ObjectKey, parse_ipv4_canonical};

/// One part of a policy that was dropped or repaired, and where (`spec.ingress[0].from[2]`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {problem}")]
pub struct PolicyIssue {
    /// The field path, as the API server names fields in its validation errors.
    pub at: String,
    pub problem: Problem,
}

/// What was wrong with a part of a policy, and what the agent did about it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error(
        "invalid selector ({0}); selecting every pod of the namespace instead (isolating them)"
    )]
    PodSelector(SelectorError),
    #[error("unknown policy type {0:?}; isolating both ingress and egress")]
    PolicyType(String),
    #[error("invalid {field} ({error}); dropping the peer")]
    PeerSelector { field: &'static str, error: SelectorError },
    #[error("no podSelector, namespaceSelector or ipBlock; dropping the peer")]
    EmptyPeer,
    #[error("ipBlock together with a selector; dropping the peer")]
    IpBlockWithSelector,
    #[error("cidr {0:?} is not an IPv4 CIDR; dropping the peer")]
    InvalidCidr(String),
    #[error("cidr {0} is IPv6 and the datapath is IPv4-only; dropping the peer")]
    Ipv6Cidr(String),
    #[error("{given} has host bits set; using {masked} as Go's net.ParseCIDR does")]
    HostBits { given: String, masked: Ipv4Cidr },
    #[error(
        "except {0:?} is not an IPv4 CIDR; dropping the peer (without the except it would allow more)"
    )]
    InvalidExcept(String),
    #[error("except {except} is outside cidr {cidr} and excludes nothing; ignoring it")]
    ExceptOutside { except: Ipv4Cidr, cidr: Ipv4Cidr },
    #[error("except {except} covers all of cidr {cidr}, so the peer matches nothing; dropping it")]
    ExceptCoversCidr { except: Ipv4Cidr, cidr: Ipv4Cidr },
    #[error("protocol {0:?} is not TCP, UDP or SCTP; dropping the port")]
    Protocol(String),
    #[error("port {0} is not in 1-65535; dropping the port")]
    PortNumber(i32),
    #[error("port name {0:?} is not a valid IANA service name; dropping the port")]
    PortName(String),
    #[error("endPort {end} {why}; dropping the port")]
    EndPort { end: i32, why: &'static str },
}

/// Why a label selector is invalid (what `metav1.LabelSelectorAsSelector` rejects).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("{key}: operator {op:?} is not In, NotIn, Exists or DoesNotExist")]
    UnknownOperator { key: String, op: String },
    #[error("{key}: {op:?} needs values")]
    MissingValues { key: String, op: Operator },
    #[error("{key}: {op:?} takes no values")]
    UnexpectedValues { key: String, op: Operator },
    #[error("{0:?} is not a valid label key")]
    Key(String),
    #[error("{key}: {value:?} is not a valid label value")]
    Value { key: String, value: String },
}

/// Converts a NetworkPolicy's spec (absent: the empty spec, as the API defaults it) into
/// the model; what could not be kept is in the returned issues.
pub fn convert_policy(
    key: &ObjectKey,
    spec: Option<&NetworkPolicySpec>,
) -> (Policy, Vec<PolicyIssue>) {
    let default = NetworkPolicySpec::default();
    let spec = spec.unwrap_or(&default);
    let namespace = key.namespace.clone().unwrap_or_default();
    let mut issues = Vec::new();
    let mut issue = |at: String, problem| issues.push(PolicyIssue { at, problem });

    let pod_selector = match spec.pod_selector.as_ref().map(convert_selector).transpose() {
        Ok(sel) => sel.unwrap_or_default(),
        Err(e) => {
            issue("spec.podSelector".into(), Problem::PodSelector(e));
            Selector::default()
        }
    };

    // "If this field is not specified, it will default based on the existence of ingress
    // or egress rules; policies that contain an egress section are assumed to affect
    // egress, and all policies (whether or not they contain an ingress section) are
    // assumed to affect ingress." The API server's defaulting treats an empty list as
    // unspecified and "an egress section" as a non-empty `egress`.
    let (has_ingress, has_egress) = match spec.policy_types.as_deref() {
        Some(types) if !types.is_empty() => {
            let (mut ingress, mut egress) = (false, false);
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => ingress = true,
                    "Egress" => egress = true,
                    other => {
                        issue(format!("spec.policyTypes[{i}]"), Problem::PolicyType(other.into()));
                        (ingress, egress) = (true, true);
                    }
                }
            }
            (ingress, egress)
        }
        _ => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
    };

    let ingress = has_ingress.then(|| {
        let rules = spec.ingress.iter().flatten().enumerate();
        rules
            .map(|(i, r)| {
                let at = format!("spec.ingress[{i}]");
                convert_rule(
                    &namespace,
                    &at,
                    "from",
                    r.from.as_deref(),
                    r.ports.as_deref(),
                    &mut issue,
                )
            })
            .collect()
    });
    let egress = has_egress.then(|| {
        let rules = spec.egress.iter().flatten().enumerate();
        rules
            .map(|(i, r)| {
                let at = format!("spec.egress[{i}]");
                convert_rule(&namespace, &at, "to", r.to.as_deref(), r.ports.as_deref(), &mut issue)
            })
            .collect()
    });
    (Policy { key: key.clone(), pod_selector, ingress, egress }, issues)
}

fn convert_rule(
    namespace: &str,
    at: &str,
    peers_field: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    issue: &mut impl FnMut(String, Problem),
) -> Rule {
    let peers = match peers {
        None | Some([]) => Peers::All,
        Some(peers) => Peers::Only(
            peers
                .iter()
                .enumerate()
                .filter_map(|(i, p)| {
                    let at = || format!("{at}.{peers_field}[{i}]");
                    let mut notes = Vec::new();
                    let peer = convert_peer(namespace, p, &mut notes);
                    for note in notes {
                        issue(at(), note);
                    }
                    peer.map_err(|problem| issue(at(), problem)).ok()
                })
                .collect(),
        ),
    };
    let ports = match ports {
        None | Some([]) => Ports::All,
        Some(ports) => Ports::Only(
            ports
                .iter()
                .enumerate()
                .filter_map(|(i, p)| {
                    convert_port(p)
                        .map_err(|problem| issue(format!("{at}.ports[{i}]"), problem))
                        .ok()
                })
                .collect(),
        ),
    };
    Rule { peers, ports }
}

/// One peer; repairs that keep it (masked host bits, ignored excepts) go to `notes`.
fn convert_peer(
    namespace: &str,
    peer: &NetworkPolicyPeer,
    notes: &mut Vec<Problem>,
) -> Result<Peer, Problem> {
    let selector = |field, sel: &LabelSelector| {
        convert_selector(sel).map_err(|error| Problem::PeerSelector { field, error })
    };
    match (&peer.ip_block, &peer.namespace_selector, &peer.pod_selector) {
        (Some(block), None, None) => convert_ip_block(block, notes),
        (Some(_), _, _) => Err(Problem::IpBlockWithSelector),
        (None, None, None) => Err(Problem::EmptyPeer),
        (None, ns, pods) => {
            let namespaces = match ns {
                Some(ns) => NamespaceScope::Matching(selector("namespaceSelector", ns)?),
                None => NamespaceScope::Own(namespace.to_string()),
            };
            let pods = pods.as_ref().map(|p| selector("podSelector", p)).transpose()?;
            Ok(Peer::Pods { namespaces, pods: pods.unwrap_or_default() })
        }
    }
}

fn convert_ip_block(block: &IPBlock, notes: &mut Vec<Problem>) -> Result<Peer, Problem> {
    let cidr = match parse_cidr(&block.cidr) {
        Ok((cidr, masked)) => {
            if masked {
                notes.push(Problem::HostBits { given: block.cidr.clone(), masked: cidr });
            }
            cidr
        }
        Err(CidrError::Ipv6) => return Err(Problem::Ipv6Cidr(block.cidr.clone())),
        Err(CidrError::Invalid) => return Err(Problem::InvalidCidr(block.cidr.clone())),
    };
    let mut except = Vec::new();
    for given in block.except.iter().flatten() {
        let Ok((e, masked)) = parse_cidr(given) else {
            return Err(Problem::InvalidExcept(given.clone()));
        };
        if masked {
            notes.push(Problem::HostBits { given: given.clone(), masked: e });
        }
        if e.prefix_len() <= cidr.prefix_len() && e.contains(cidr.addr()) {
            return Err(Problem::ExceptCoversCidr { except: e, cidr });
        }
        if !cidr.contains(e.addr()) {
            notes.push(Problem::ExceptOutside { except: e, cidr });
            continue;
        }
        except.push(e);
    }
    except.sort_unstable();
    except.dedup();
    Ok(Peer::IpBlock { cidr, except })
}

enum CidrError {
    Ipv6,
    Invalid,
}

/// An IPv4 CIDR as Go's `net.ParseCIDR` reads it: host bits are masked (reported as
/// `true`). Only canonical spellings are accepted (no leading zeros in the address or the
/// length), since Go versions disagree about the others.
fn parse_cidr(s: &str) -> Result<(Ipv4Cidr, bool), CidrError> {
    let (addr, len) = s.split_once('/').ok_or(CidrError::Invalid)?;
    if addr.contains(':') {
        let v6 = addr.parse::<Ipv6Addr>().map_err(|_| CidrError::Invalid)?;
        // `::ffff:a.b.c.d` means an IPv4 prefix to some parsers and not to others.
        return Err(if v6.to_ipv4_mapped().is_some() {
            CidrError::Invalid
        } else {
            CidrError::Ipv6
        });
    }
    let addr = parse_ipv4_canonical(addr).ok_or(CidrError::Invalid)?;
    let canonical = !len.is_empty()
        && len.len() <= 2
        && len.bytes().all(|b| b.is_ascii_digit())
        && !(len.len() > 1 && len.starts_with('0'));
    let len: u8 = len.parse().ok().filter(|l| canonical && *l <= 32).ok_or(CidrError::Invalid)?;
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    let network = u32::from(addr) & mask;
    let cidr = Ipv4Cidr::new(network.into(), len).ok_or(CidrError::Invalid)?;
    Ok((cidr, network != u32::from(addr)))
}

fn convert_port(port: &NetworkPolicyPort) -> Result<PortMatch, Problem> {
    let protocol =
        PolicyProtocol::from_k8s(port.protocol.as_deref()).map_err(|e| Problem::Protocol(e.0))?;
    let end_error = |why| Err(Problem::EndPort { end: port.end_port.unwrap_or_default(), why });
    let spec = match (&port.port, port.end_port) {
        (None, None) => PortSpec::Any,
        (None, Some(_)) => return end_error("needs a numeric port"),
        (Some(IntOrString::String(_)), Some(_)) => return end_error("needs a numeric port"),
        (Some(IntOrString::String(name)), None) => {
            if !is_iana_svc_name(name) {
                return Err(Problem::PortName(name.clone()));
            }
            PortSpec::Named(name.clone())
        }
        (Some(IntOrString::Int(n)), end) => {
            let first =
                u16::try_from(*n).ok().filter(|p| *p != 0).ok_or(Problem::PortNumber(*n))?;
            let last = match end {
                None => first,
                Some(e) => match u16::try_from(e) {
                    Ok(e) if e >= first => e,
                    Ok(_) if e > 0 => return end_error("is less than port"),
                    _ => return end_error("is not in 1-65535"),
                },
            };
            PortSpec::Range { first, last }
        }
    };
    Ok(PortMatch { protocol, port: spec })
}

/// IANA_SVC_NAME, as the API checks container port names: 1-15 of `[a-z0-9-]`, at least
/// one letter, no leading, trailing or doubled `-`.
fn is_iana_svc_name(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=15).contains(&b.len())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(u8::is_ascii_lowercase)
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !s.contains("--")
}

/// A label selector as `metav1.LabelSelectorAsSelector` accepts it: valid keys and values,
/// known operators, values exactly for In/NotIn.
pub fn convert_selector(sel: &LabelSelector) -> Result<Selector, SelectorError> {
    let match_labels = sel.match_labels.clone().unwrap_or_default();
    for (k, v) in &match_labels {
        check_key(k)?;
        check_value(k, v)?;
    }
    let mut match_expressions = Vec::new();
    for r in sel.match_expressions.iter().flatten() {
        check_key(&r.key)?;
        let op = match r.operator.as_str() {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => {
                return Err(SelectorError::UnknownOperator {
                    key: r.key.clone(),
                    op: other.into(),
                });
            }
        };
        let mut values = r.values.clone().unwrap_or_default();
        match (op, values.is_empty()) {
            (Operator::In | Operator::NotIn, true) => {
                return Err(SelectorError::MissingValues { key: r.key.clone(), op });
            }
            (Operator::Exists | Operator::DoesNotExist, false) => {
                return Err(SelectorError::UnexpectedValues { key: r.key.clone(), op });
            }
            _ => {}
        }
        for v in &values {
            check_value(&r.key, v)?;
        }
        values.sort_unstable();
        values.dedup();
        match_expressions.push(Requirement { key: r.key.clone(), op, values });
    }
    match_expressions.sort_unstable();
    match_expressions.dedup();
    Ok(Selector { match_labels, match_expressions })
}

/// A qualified name: `[prefix/]name`, the prefix a DNS-1123 subdomain.
fn check_key(key: &str) -> Result<(), SelectorError> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        p.len() <= 253
            && p.split('.').all(|label| {
                let b = label.as_bytes();
                !b.is_empty()
                    && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                    && b[0] != b'-'
                    && b[b.len() - 1] != b'-'
            })
    });
    if prefix_ok && !name.is_empty() && is_label_value(name) {
        Ok(())
    } else {
        Err(SelectorError::Key(key.to_string()))
    }
}

fn check_value(key: &str, value: &str) -> Result<(), SelectorError> {
    if is_label_value(value) {
        Ok(())
    } else {
        Err(SelectorError::Value { key: key.to_string(), value: value.to_string() })
    }
}

/// Empty, or up to 63 of `[A-Za-z0-9-_.]` starting and ending alphanumeric.
fn is_label_value(s: &str) -> bool {
    let b = s.as_bytes();
    b.is_empty()
        || (b.len() <= 63
            && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::model::Labels;

    fn key() -> ObjectKey {
        ObjectKey::namespaced("shop", "np")
    }

    /// Converts a spec written as YAML.
    fn convert(yaml: &str) -> (Policy, Vec<PolicyIssue>) {
        let spec: NetworkPolicySpec = serde_yaml::from_str(yaml).expect("spec YAML");
        convert_policy(&key(), Some(&spec))
    }

    fn convert_clean(yaml: &str) -> Policy {
        let (policy, issues) = convert(yaml);
        assert!(issues.is_empty(), "{issues:?}");
        policy
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().expect("cidr")
    }

    fn ingress_rule(p: &Policy, i: usize) -> &Rule {
        &p.ingress.as_ref().expect("ingress")[i]
    }

    fn peers(rule: &Rule) -> &[Peer] {
        match &rule.peers {
            Peers::Only(p) => p,
            Peers::All => panic!("expected Only peers, got All"),
        }
    }

    fn ports(rule: &Rule) -> &[PortMatch] {
        match &rule.ports {
            Ports::Only(p) => p,
            Ports::All => panic!("expected Only ports, got All"),
        }
    }

    fn ats(issues: &[PolicyIssue]) -> Vec<&str> {
        issues.iter().map(|i| i.at.as_str()).collect()
    }

    #[test]
    fn policy_types_default_from_the_rules() {
        // No policyTypes, no rules: ingress only.
        let p = convert_clean("podSelector: {}");
        assert_eq!((p.ingress, p.egress), (Some(vec![]), None));
        // Egress rules: both, ingress with no rules (isolated, nothing allowed).
        let p = convert_clean("podSelector: {}\negress: [{}]");
        assert_eq!(p.ingress, Some(vec![]));
        assert_eq!(p.egress, Some(vec![Rule { peers: Peers::All, ports: Ports::All }]));
        // An empty egress list is no egress section.
        let p = convert_clean("podSelector: {}\negress: []\npolicyTypes: []");
        assert_eq!((p.ingress, p.egress), (Some(vec![]), None));
        // Given types win over the rules present.
        let p = convert_clean("podSelector: {}\ningress: [{}]\npolicyTypes: [Egress]");
        assert_eq!((p.ingress, p.egress), (None, Some(vec![])));
    }

    #[test]
    fn an_unknown_policy_type_isolates_both_directions() {
        let (p, issues) = convert("podSelector: {}\ningress: [{}]\npolicyTypes: [Ingres]");
        assert_eq!(p.ingress, Some(vec![Rule { peers: Peers::All, ports: Ports::All }]));
        assert_eq!(p.egress, Some(vec![]));
        assert_eq!(issues[0].problem, Problem::PolicyType("Ingres".into()));
        assert_eq!(ats(&issues), ["spec.policyTypes[0]"]);
    }

    #[test]
    fn absent_and_empty_from_both_mean_every_peer() {
        let absent = convert_clean("podSelector: {}\ningress: [{ports: [{port: 80}]}]");
        let empty = convert_clean("podSelector: {}\ningress: [{from: [], ports: [{port: 80}]}]");
        assert_eq!(absent, empty);
        assert_eq!(ingress_rule(&absent, 0).peers, Peers::All);
        assert_eq!(
            ports(ingress_rule(&absent, 0)),
            [PortMatch {
                protocol: PolicyProtocol::Tcp,
                port: PortSpec::Range { first: 80, last: 80 }
            }]
        );
        let no_ports =
            convert_clean("podSelector: {}\ningress: [{from: [{podSelector: {}}], ports: []}]");
        assert_eq!(ingress_rule(&no_ports, 0).ports, Ports::All);
    }

    #[test]
    fn peers_scope_their_pods() {
        let p = convert_clean(
            "podSelector: {matchLabels: {app: db}}
ingress:
- from:
  - podSelector: {matchLabels: {role: client}}
  - namespaceSelector: {matchLabels: {user: alice}}
  - namespaceSelector: {matchLabels: {user: alice}}
    podSelector: {matchExpressions: [{key: role, operator: In, values: [b, a, a]}]}
  - ipBlock: {cidr: 172.17.0.0/16, except: [172.17.1.0/24]}",
        );
        assert_eq!(p.pod_selector.match_labels, labels(&[("app", "db")]));
        let alice = Selector { match_labels: labels(&[("user", "alice")]), ..Default::default() };
        let role_in = Requirement {
            key: "role".into(),
            op: Operator::In,
            values: vec!["a".into(), "b".into()],
        };
        assert_eq!(
            peers(ingress_rule(&p, 0)),
            [
                Peer::Pods {
                    namespaces: NamespaceScope::Own("shop".into()),
                    pods: Selector {
                        match_labels: labels(&[("role", "client")]),
                        ..Default::default()
                    },
                },
                Peer::Pods {
                    namespaces: NamespaceScope::Matching(alice.clone()),
                    pods: Selector::default()
                },
                Peer::Pods {
                    namespaces: NamespaceScope::Matching(alice),
                    pods: Selector { match_expressions: vec![role_in], ..Default::default() },
                },
                Peer::IpBlock { cidr: cidr("172.17.0.0/16"), except: vec![cidr("172.17.1.0/24")] },
            ]
        );
    }

    #[test]
    fn ports_as_the_api_defines_them() {
        let p = convert_clean(
            "podSelector: {}
ingress:
- ports:
  - port: 80
  - {protocol: UDP, port: 53}
  - {protocol: SCTP}
  - {protocol: TCP, port: 32000, endPort: 32768}
  - {port: http}
  - {protocol: SCTP, port: diameter}",
        );
        use PolicyProtocol::*;
        let m = |protocol, port| PortMatch { protocol, port };
        assert_eq!(
            ports(ingress_rule(&p, 0)),
            [
                m(Tcp, PortSpec::Range { first: 80, last: 80 }),
                m(Udp, PortSpec::Range { first: 53, last: 53 }),
                m(Sctp, PortSpec::Any),
                m(Tcp, PortSpec::Range { first: 32000, last: 32768 }),
                m(Tcp, PortSpec::Named("http".into())),
                m(Sctp, PortSpec::Named("diameter".into())),
            ]
        );
    }

    #[test]
    fn invalid_ports_are_dropped_and_the_list_never_widens() {
        let (p, issues) = convert(
            "podSelector: {}
ingress:
- ports:
  - {protocol: ICMP, port: 1}
  - {protocol: tcp, port: 80}
  - {port: 0}
  - {port: 70000}
  - {endPort: 90}
  - {port: 100, endPort: 99}
  - {port: 100, endPort: 70000}
  - {port: http, endPort: 90}
  - {port: '80'}
  - {port: Http}
  - {port: a--b}
  - {port: waytoolonganame1}",
        );
        assert_eq!(
            ingress_rule(&p, 0).ports,
            Ports::Only(vec![]),
            "matches nothing, not everything"
        );
        let problems: Vec<_> = issues.iter().map(|i| &i.problem).collect();
        assert_eq!(
            problems,
            [
                &Problem::Protocol("ICMP".into()),
                &Problem::Protocol("tcp".into()),
                &Problem::PortNumber(0),
                &Problem::PortNumber(70000),
                &Problem::EndPort { end: 90, why: "needs a numeric port" },
                &Problem::EndPort { end: 99, why: "is less than port" },
                &Problem::EndPort { end: 70000, why: "is not in 1-65535" },
                &Problem::EndPort { end: 90, why: "needs a numeric port" },
                &Problem::PortName("80".into()),
                &Problem::PortName("Http".into()),
                &Problem::PortName("a--b".into()),
                &Problem::PortName("waytoolonganame1".into()),
            ]
        );
        assert_eq!(issues[3].at, "spec.ingress[0].ports[3]");
    }

    #[test]
    fn invalid_peer_selectors_drop_the_peer() {
        let (p, issues) = convert(
            "podSelector: {}
policyTypes: [Egress]
egress:
- to:
  - podSelector: {matchExpressions: [{key: app, operator: Equals, values: [a]}]}
  - namespaceSelector: {matchExpressions: [{key: team, operator: In}]}
  - podSelector: {matchExpressions: [{key: team, operator: NotIn, values: []}]}
  - podSelector: {matchExpressions: [{key: team, operator: Exists, values: [x]}]}
  - namespaceSelector: {matchExpressions: [{key: 'bad key', operator: DoesNotExist}]}
  - podSelector: {matchLabels: {app: '-x'}}
  - {}
  - ipBlock: {cidr: 10.0.0.0/8}
    podSelector: {}",
        );
        assert_eq!(p.egress.as_ref().expect("egress")[0].peers, Peers::Only(vec![]));
        assert_eq!(issues.len(), 8, "{issues:?}");
        assert!(issues.iter().all(|i| i.to_string().ends_with("dropping the peer")), "{issues:?}");
        assert_eq!(
            issues[0].to_string(),
            "spec.egress[0].to[0]: invalid podSelector (app: operator \"Equals\" is not In, \
             NotIn, Exists or DoesNotExist); dropping the peer"
        );
        assert_eq!(
            issues[1].problem,
            Problem::PeerSelector {
                field: "namespaceSelector",
                error: SelectorError::MissingValues { key: "team".into(), op: Operator::In },
            }
        );
        assert_eq!(issues[6].problem, Problem::EmptyPeer);
        assert_eq!(issues[7].problem, Problem::IpBlockWithSelector);
    }

    #[test]
    fn a_valid_peer_survives_its_invalid_neighbours() {
        let (p, issues) = convert(
            "podSelector: {}
ingress:
- from:
  - podSelector: {matchExpressions: [{key: a, operator: Exists, values: [x]}]}
  - podSelector: {matchLabels: {role: ok}}",
        );
        assert_eq!(peers(ingress_rule(&p, 0)).len(), 1);
        assert_eq!(ats(&issues), ["spec.ingress[0].from[0]"]);
    }

    #[test]
    fn an_invalid_policy_pod_selector_selects_the_whole_namespace() {
        let (p, issues) = convert(
            "podSelector: {matchExpressions: [{key: app, operator: NotIn}]}
ingress: [{from: [{podSelector: {}}]}]",
        );
        assert_eq!(p.pod_selector, Selector::default(), "isolates every pod, never none");
        assert_eq!(peers(ingress_rule(&p, 0)).len(), 1, "the rules still apply");
        assert_eq!(ats(&issues), ["spec.podSelector"]);
        assert!(issues[0].to_string().contains("selecting every pod of the namespace"));
    }

    #[test]
    fn ipv6_ip_blocks_are_dropped_the_datapath_is_ipv4_only() {
        let (p, issues) = convert(
            "podSelector: {}
ingress: [{from: [{ipBlock: {cidr: 'fd00::/64'}}, {ipBlock: {cidr: '::ffff:10.0.0.0/104'}}]}]",
        );
        assert_eq!(ingress_rule(&p, 0).peers, Peers::Only(vec![]));
        assert_eq!(issues[0].problem, Problem::Ipv6Cidr("fd00::/64".into()));
        assert!(issues[0].to_string().contains("IPv4-only"), "{}", issues[0]);
        assert_eq!(issues[1].problem, Problem::InvalidCidr("::ffff:10.0.0.0/104".into()));
    }

    #[test]
    fn invalid_cidrs_drop_the_peer() {
        for bad in ["10.0.0.0", "10.0.0.0/33", "10.0.0.0/08", "010.0.0.0/8", "10.0.0/8", "x/8", ""]
        {
            let (p, issues) = convert(&format!(
                "podSelector: {{}}\ningress: [{{from: [{{ipBlock: {{cidr: '{bad}'}}}}]}}]"
            ));
            assert_eq!(ingress_rule(&p, 0).peers, Peers::Only(vec![]), "{bad:?}");
            assert_eq!(issues[0].problem, Problem::InvalidCidr(bad.into()), "{bad:?}");
        }
    }

    #[test]
    fn host_bits_are_masked_as_go_parses_cidrs() {
        let (p, issues) = convert(
            "podSelector: {}
ingress: [{from: [{ipBlock: {cidr: 10.1.2.3/16, except: [10.1.2.3/24]}}]}]",
        );
        assert_eq!(
            peers(ingress_rule(&p, 0)),
            [Peer::IpBlock { cidr: cidr("10.1.0.0/16"), except: vec![cidr("10.1.2.0/24")] }]
        );
        assert_eq!(
            issues[0].to_string(),
            "spec.ingress[0].from[0]: 10.1.2.3/16 has host bits set; using 10.1.0.0/16 as Go's \
             net.ParseCIDR does"
        );
        assert_eq!(issues.len(), 2);
    }

    #[test]
    fn excepts_outside_are_ignored_unparseable_ones_drop_the_peer() {
        let (p, issues) = convert(
            "podSelector: {}
ingress:
- from:
  - ipBlock: {cidr: 10.0.0.0/16, except: [192.168.0.0/24, 10.0.5.0/24, 10.0.5.0/24]}
  - ipBlock: {cidr: 10.0.0.0/16, except: [10.0.5.0/24, 10.0.6.0]}
  - ipBlock: {cidr: 10.0.0.0/16, except: ['fd00::/64']}
  - ipBlock: {cidr: 10.0.0.0/16, except: [10.0.0.0/8]}
  - ipBlock: {cidr: 10.0.0.0/16, except: [10.0.0.0/16]}",
        );
        assert_eq!(
            peers(ingress_rule(&p, 0)),
            [Peer::IpBlock { cidr: cidr("10.0.0.0/16"), except: vec![cidr("10.0.5.0/24")] }]
        );
        let problems: Vec<_> = issues.iter().map(|i| &i.problem).collect();
        assert_eq!(
            problems,
            [
                &Problem::ExceptOutside {
                    except: cidr("192.168.0.0/24"),
                    cidr: cidr("10.0.0.0/16")
                },
                &Problem::InvalidExcept("10.0.6.0".into()),
                &Problem::InvalidExcept("fd00::/64".into()),
                &Problem::ExceptCoversCidr {
                    except: cidr("10.0.0.0/8"),
                    cidr: cidr("10.0.0.0/16")
                },
                &Problem::ExceptCoversCidr {
                    except: cidr("10.0.0.0/16"),
                    cidr: cidr("10.0.0.0/16")
                },
            ]
        );
        assert_eq!(ats(&issues)[1], "spec.ingress[0].from[1]");
    }

    #[test]
    fn an_absent_spec_isolates_every_pod_for_ingress() {
        let (p, issues) = convert_policy(&key(), None);
        assert!(issues.is_empty());
        assert_eq!(p.pod_selector, Selector::default());
        assert_eq!((p.ingress, p.egress), (Some(vec![]), None));
    }

    #[test]
    fn thousands_of_peers_and_excepts_convert() {
        let mut yaml = String::from("podSelector: {}\ningress:\n- from:\n");
        for i in 0..5000u32 {
            let [_, _, a, b] = (i * 256).to_be_bytes();
            yaml.push_str(&format!(
                "  - ipBlock: {{cidr: 10.{a}.{b}.0/24, except: [10.{a}.{b}.128/25]}}\n"
            ));
            yaml.push_str(&format!("  - podSelector: {{matchLabels: {{app: a{i}}}}}\n"));
        }
        yaml.push_str("- from:\n  - ipBlock:\n      cidr: 10.0.0.0/8\n      except:\n");
        for i in 0..5000u32 {
            let [_, a, b, _] = (i * 256).to_be_bytes();
            yaml.push_str(&format!("      - 10.{a}.{b}.0/24\n"));
        }
        let started = Instant::now();
        let p = convert_clean(&yaml);
        assert_eq!(peers(ingress_rule(&p, 0)).len(), 10_000);
        let Peer::IpBlock { except, .. } = &peers(ingress_rule(&p, 1))[0] else {
            panic!("ipBlock")
        };
        assert_eq!(except.len(), 5000);
        eprintln!("converted 10,000 peers and 5,000 excepts in {:?}", started.elapsed());
    }
}
