//! `inspect policy POD`: the identity of a pod and, for a pod of this node, the policy
//! sets in force in each direction with every allow entry of `POLICY_V4` /
//! `POLICY_EXACT_V4` they hold, named through the names snapshot (peers, rules, policies).
use std::net::Ipv4Addr;

use nodeplane_common::policy::{
    EP_F_EGRESS_ANY, EP_F_EGRESS_LPM, EP_F_INGRESS_ANY, EP_F_INGRESS_LPM, EndpointV4, IDENTITY_ANY,
    IDENTITY_UNSELECTED, PolicyKey, SET_NONE,
};
use serde::Serialize;

use super::{names::NameIndex, proto_name, table::Table};

/// What the policy maps say about one address.
#[derive(Clone, Debug, Default)]
pub struct PolicyFacts {
    pub ip: Option<Ipv4Addr>,
    /// `ENDPOINTS_V4`: present for pods of this node the agent describes.
    pub endpoint: Option<EndpointV4>,
    /// `IPCACHE_V4` longest match.
    pub identity: Option<u32>,
    /// Every policy entry `((key, prefix length), value)`.
    pub entries: super::pinned::PolicyEntries,
    pub revision: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PolicyReport {
    pub pod: Option<String>,
    pub ip: Ipv4Addr,
    /// Has an `ENDPOINTS_V4` entry: a pod of this node whose policy this node enforces.
    pub local: bool,
    pub identity: u32,
    pub identity_name: Option<String>,
    /// The labels of the identity's example pod, from the names snapshot.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    pub revision: u32,
    pub ingress: Option<DirectionReport>,
    pub egress: Option<DirectionReport>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DirectionReport {
    /// Selected by a policy with this direction: only what `rules` allow gets through.
    pub isolated: bool,
    /// The policy set (0: not isolated).
    pub set: u32,
    /// The policies isolating the pod in this direction.
    pub policies: Vec<String>,
    /// The set has entries for any peer (`EP_F_*_ANY`) / entries shorter than a full key
    /// (`EP_F_*_LPM`): which lookups the datapath makes.
    pub any_peer_entries: bool,
    pub range_entries: bool,
    pub rules: Vec<RuleRow>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RuleRow {
    /// `None`: any peer.
    pub peer_identity: Option<u32>,
    pub peer: String,
    /// `any`, `TCP`, `UDP`, `SCTP`, `ICMP` or a number.
    pub protocol: String,
    /// `any`, `80`, or `8000-8063` (one aligned block of an `endPort` range).
    pub ports: String,
    pub rule: u32,
    /// `policy direction[index]` of each rule behind the rule id.
    pub allowed_by: Vec<String>,
}

/// The ports an entry of `prefix_len` bits covers.
pub fn ports_of(key: &PolicyKey, prefix_len: u32) -> (String, String) {
    if prefix_len <= PolicyKey::PREFIX_ANY_PROTO {
        return ("any".into(), "any".into());
    }
    let proto = proto_name(key.proto);
    if prefix_len <= PolicyKey::PREFIX_ANY_PORT {
        return (proto, "any".into());
    }
    let bits = (prefix_len - PolicyKey::PREFIX_ANY_PORT).min(16);
    let port = u16::from_be_bytes(key.port);
    let mask = if bits == 0 { 0 } else { u16::MAX << (16 - bits) };
    let (first, last) = (port & mask, port | !mask);
    (proto, if first == last { first.to_string() } else { format!("{first}-{last}") })
}

fn peer_name(identity: u32, names: &NameIndex) -> String {
    match identity {
        IDENTITY_ANY => "any peer".into(),
        IDENTITY_UNSELECTED => "unselected addresses".into(),
        id => {
            names.identity(id).map_or_else(|| format!("identity {id}"), |n| n.description.clone())
        }
    }
}

fn direction(
    set: u32,
    any: bool,
    lpm: bool,
    facts: &PolicyFacts,
    names: &NameIndex,
) -> DirectionReport {
    let mut rules = Vec::new();
    if set != SET_NONE {
        for ((key, len), value) in &facts.entries {
            if u32::from_be_bytes(key.set) != set {
                continue;
            }
            let identity = u32::from_be_bytes(key.identity);
            let (protocol, ports) = ports_of(key, *len);
            rules.push(RuleRow {
                peer_identity: (identity != IDENTITY_ANY).then_some(identity),
                peer: peer_name(identity, names),
                protocol,
                ports,
                rule: value.rule,
                allowed_by: names
                    .rules(value.rule)
                    .iter()
                    .map(|r| format!("{} {}[{}]", r.policy, r.direction, r.index))
                    .collect(),
            });
        }
    }
    DirectionReport {
        isolated: set != SET_NONE,
        set,
        policies: names.set(set).map(|s| s.policies.clone()).unwrap_or_default(),
        any_peer_entries: any,
        range_entries: lpm,
        rules,
    }
}

pub fn report(
    pod: Option<String>,
    ip: Ipv4Addr,
    facts: &PolicyFacts,
    names: &NameIndex,
) -> PolicyReport {
    let identity =
        facts.endpoint.map(|e| e.identity).or(facts.identity).unwrap_or(IDENTITY_UNSELECTED);
    let mut notes = Vec::new();
    let (ingress, egress) = match &facts.endpoint {
        Some(ep) => (
            Some(direction(
                ep.ingress_set,
                ep.flags & EP_F_INGRESS_ANY != 0,
                ep.flags & EP_F_INGRESS_LPM != 0,
                facts,
                names,
            )),
            Some(direction(
                ep.egress_set,
                ep.flags & EP_F_EGRESS_ANY != 0,
                ep.flags & EP_F_EGRESS_LPM != 0,
                facts,
                names,
            )),
        ),
        None => {
            notes.push(
                "no ENDPOINTS_V4 entry: not a pod of this node (its own node enforces its \
                 policy), or one the agent does not know yet (not policed until it does)"
                    .into(),
            );
            (None, None)
        }
    };
    let name = names.identity(identity);
    PolicyReport {
        pod,
        ip,
        local: facts.endpoint.is_some(),
        identity,
        identity_name: Some(peer_name(identity, names))
            .filter(|_| name.is_some() || identity == IDENTITY_UNSELECTED),
        labels: name.map(|n| n.labels.clone()).unwrap_or_default(),
        revision: facts.revision,
        ingress,
        egress,
        notes,
    }
}

pub fn table(r: &PolicyReport) -> String {
    let mut out = format!(
        "pod:       {}\nip:        {}\nidentity:  {}{}\nlocal:     {}\npolicy revision: {}\n",
        r.pod.as_deref().unwrap_or("-"),
        r.ip,
        r.identity,
        r.identity_name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default(),
        if r.local { "yes (its policy is enforced on this node)" } else { "no" },
        r.revision,
    );
    if !r.labels.is_empty() {
        let labels: Vec<String> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!("labels:    {}\n", labels.join(",")));
    }
    for (dir, d) in [("ingress", &r.ingress), ("egress", &r.egress)] {
        let Some(d) = d else { continue };
        out.push('\n');
        if !d.isolated {
            out.push_str(&format!("{dir}: not isolated (everything allowed)\n"));
            continue;
        }
        let policies = if d.policies.is_empty() { "?".to_string() } else { d.policies.join(", ") };
        out.push_str(&format!(
            "{dir}: isolated by {policies} (set {}); {} allow entries{}\n",
            d.set,
            d.rules.len(),
            if d.rules.is_empty() { ": everything is denied" } else { "" },
        ));
        if d.rules.is_empty() {
            continue;
        }
        let mut t = Table::new(&["PEER", "IDENTITY", "PROTO", "PORTS", "RULE", "ALLOWED BY"]);
        for rule in &d.rules {
            t.row(vec![
                rule.peer.clone(),
                rule.peer_identity.map_or("any".into(), |i| i.to_string()),
                rule.protocol.clone(),
                rule.ports.clone(),
                rule.rule.to_string(),
                if rule.allowed_by.is_empty() { "-".into() } else { rule.allowed_by.join(", ") },
            ]);
        }
        out.push_str(&t.render());
    }
    for n in &r.notes {
        out.push_str(&format!("\nnote: {n}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use nodeplane_common::{maps::IPPROTO_TCP, policy::PolicyValue};

    use super::*;
    use crate::inspect::names::{IdentityEntry, NamesSnapshot, RuleEntry, SetEntry};

    #[test]
    fn ports_of_every_prefix_length() {
        let k = PolicyKey::new(5, 300, IPPROTO_TCP, 8000);
        assert_eq!(ports_of(&k, 64), ("any".into(), "any".into()));
        assert_eq!(ports_of(&k, 72), ("TCP".into(), "any".into()));
        assert_eq!(ports_of(&k, 88), ("TCP".into(), "8000".into()));
        // A /82 block (10 port bits) spans 64 ports: 8000 = 0x1f40 starts one.
        assert_eq!(ports_of(&k, 82), ("TCP".into(), "8000-8063".into()));
        let k = PolicyKey::new(5, 300, IPPROTO_TCP, 8064);
        assert_eq!(ports_of(&k, 82).1, "8064-8127");
    }

    #[test]
    fn a_local_pod_with_named_rules() {
        let names = NameIndex::new(Some(NamesSnapshot {
            version: crate::inspect::names::NAMES_VERSION,
            identities: [(
                300,
                IdentityEntry {
                    description: "3 pod(s), e.g. y/a".into(),
                    labels: [("pod".to_string(), "a".to_string())].into(),
                },
            )]
            .into(),
            sets: [(
                7,
                SetEntry {
                    direction: "ingress".into(),
                    policies: vec!["x/deny".into(), "x/allow".into()],
                },
            )]
            .into(),
            rules: [(
                9,
                vec![RuleEntry { policy: "x/allow".into(), direction: "ingress".into(), index: 0 }],
            )]
            .into(),
            ..Default::default()
        }));
        let facts = PolicyFacts {
            ip: Some(Ipv4Addr::new(10, 0, 0, 1)),
            endpoint: Some(EndpointV4 { ingress_set: 7, egress_set: 0, identity: 300, flags: 0 }),
            identity: Some(300),
            entries: vec![
                (
                    (PolicyKey::new(7, 300, IPPROTO_TCP, 80), 88),
                    PolicyValue { rule: 9, _reserved: 0 },
                ),
                (
                    (PolicyKey::new(8, 300, IPPROTO_TCP, 80), 88),
                    PolicyValue { rule: 9, _reserved: 0 },
                ),
                (
                    (PolicyKey::new(7, IDENTITY_ANY, 0, 0), 64),
                    PolicyValue { rule: 10, _reserved: 0 },
                ),
            ],
            revision: 4,
        };
        let r = report(Some("x/a".into()), Ipv4Addr::new(10, 0, 0, 1), &facts, &names);
        assert!(r.local);
        let ingress = r.ingress.as_ref().unwrap();
        assert!(ingress.isolated && !r.egress.as_ref().unwrap().isolated);
        assert_eq!(ingress.rules.len(), 2, "only set 7's entries");
        assert_eq!(ingress.rules[0].allowed_by, vec!["x/allow ingress[0]".to_string()]);
        assert_eq!(ingress.rules[1].peer, "any peer");
        let text = table(&r);
        assert!(
            text.contains("ingress: isolated by x/deny, x/allow (set 7); 2 allow entries"),
            "{text}"
        );
        assert!(text.contains("egress: not isolated"), "{text}");
        assert!(text.contains("3 pod(s), e.g. y/a") && text.contains("labels:    pod=a"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["ingress"]["rules"][0]["ports"], "80");
        assert_eq!(json["ingress"]["rules"][1]["peer_identity"], serde_json::Value::Null);
    }

    #[test]
    fn a_remote_address_has_an_identity_only() {
        let facts = PolicyFacts { identity: Some(1), ..Default::default() };
        let r = report(None, Ipv4Addr::new(10, 9, 9, 9), &facts, &NameIndex::default());
        assert!(!r.local && r.ingress.is_none());
        assert_eq!(r.identity_name.as_deref(), Some("unselected addresses"));
        assert!(table(&r).contains("note: no ENDPOINTS_V4 entry"));
    }
}
