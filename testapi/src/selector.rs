//! Label and field selectors, parsed as the API server parses them.
//!
//! Label selectors (`k8s.io/apimachinery/pkg/labels`), requirements joined by `,` (AND):
//!
//! | syntax            | matches when                                  |
//! |-------------------|-----------------------------------------------|
//! | `k=v`, `k==v`     | label `k` is `v`                              |
//! | `k!=v`            | label `k` is absent or not `v`                |
//! | `k`               | label `k` is present                          |
//! | `!k`              | label `k` is absent                           |
//! | `k in (a,b)`      | label `k` is `a` or `b`                       |
//! | `k notin (a,b)`   | label `k` is absent or neither `a` nor `b`    |
//! | `k>3`, `k<3`      | label `k` is an integer greater / less than 3 |
//!
//! Field selectors (`k8s.io/apimachinery/pkg/fields`): `field=v`, `field==v`, `field!=v`
//! joined by `,`, with `\,` `\=` `\\` escapes in values. The fields are `metadata.name`,
//! `metadata.namespace` and the per-type ones in [`ResourceDef::fields`]; any other field is
//! an error, as on a real server ("field label not supported").
use std::collections::BTreeMap;

use crate::resource::ResourceDef;

/// A selector that could not be parsed; the server answers 400 BadRequest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unable to parse selector {selector:?}: {reason}")]
pub struct SelectorError {
    pub selector: String,
    pub reason: String,
}

fn error(selector: &str, reason: impl Into<String>) -> SelectorError {
    SelectorError { selector: selector.to_owned(), reason: reason.into() }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelOp {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
    Gt(i64),
    Lt(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: LabelOp,
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match &self.op {
            LabelOp::Eq(v) => value == Some(v),
            LabelOp::NotEq(v) => value != Some(v),
            LabelOp::In(vs) => value.is_some_and(|x| vs.contains(x)),
            LabelOp::NotIn(vs) => value.is_none_or(|x| !vs.contains(x)),
            LabelOp::Exists => value.is_some(),
            LabelOp::NotExists => value.is_none(),
            LabelOp::Gt(n) => value.and_then(|x| x.parse::<i64>().ok()).is_some_and(|x| x > *n),
            LabelOp::Lt(n) => value.and_then(|x| x.parse::<i64>().ok()).is_some_and(|x| x < *n),
        }
    }
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    Not,
    Eq,
    DoubleEq,
    NotEq,
    Gt,
    Lt,
    Open,
    Close,
    Comma,
    In,
    NotIn,
}

fn is_special(c: char) -> bool {
    matches!(c, '!' | '=' | '<' | '>' | '(' | ')' | ',')
}

fn lex(s: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        if is_special(c) {
            chars.next();
            let double = chars.peek() == Some(&'=');
            tokens.push(match (c, double) {
                ('!', true) => {
                    chars.next();
                    Token::NotEq
                }
                ('=', true) => {
                    chars.next();
                    Token::DoubleEq
                }
                ('!', false) => Token::Not,
                ('=', false) => Token::Eq,
                ('<', _) => Token::Lt,
                ('>', _) => Token::Gt,
                ('(', _) => Token::Open,
                (')', _) => Token::Close,
                _ => Token::Comma,
            });
            continue;
        }
        let mut ident = String::new();
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() || is_special(c) {
                break;
            }
            ident.push(c);
            chars.next();
        }
        tokens.push(match ident.as_str() {
            "in" => Token::In,
            "notin" => Token::NotIn,
            _ => Token::Ident(ident),
        });
    }
    tokens
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 317
        && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(value: &str) -> bool {
    value.len() <= 63
        && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl LabelSelector {
    pub fn parse(selector: &str) -> Result<Self, SelectorError> {
        let tokens = lex(selector);
        let mut it = tokens.into_iter().peekable();
        let mut requirements = Vec::new();
        if it.peek().is_none() {
            return Ok(Self { requirements });
        }
        loop {
            let (key, negated) = match it.next() {
                Some(Token::Not) => match it.next() {
                    Some(Token::Ident(key)) => (key, true),
                    _ => return Err(error(selector, "expected a label key after '!'")),
                },
                Some(Token::Ident(key)) => (key, false),
                _ => return Err(error(selector, "expected a label key")),
            };
            if !valid_key(&key) {
                return Err(error(selector, format!("invalid label key {key:?}")));
            }
            let op = if negated {
                LabelOp::NotExists
            } else {
                match it.peek() {
                    None | Some(Token::Comma) => LabelOp::Exists,
                    Some(_) => parse_op(selector, &mut it)?,
                }
            };
            requirements.push(Requirement { key, op });
            match it.next() {
                None => break,
                Some(Token::Comma) => continue,
                Some(t) => {
                    return Err(error(selector, format!("unexpected {t:?} after a requirement")));
                }
            }
        }
        Ok(Self { requirements })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

fn parse_op(
    selector: &str,
    it: &mut std::iter::Peekable<std::vec::IntoIter<Token>>,
) -> Result<LabelOp, SelectorError> {
    let op = it.next().expect("caller peeked a token");
    match op {
        Token::Eq | Token::DoubleEq | Token::NotEq => {
            // `k=` (empty value) is valid: it matches an empty label value.
            let value = match it.peek() {
                Some(Token::Ident(_)) => match it.next() {
                    Some(Token::Ident(v)) => v,
                    _ => unreachable!("peeked an identifier"),
                },
                None | Some(Token::Comma) => String::new(),
                Some(t) => return Err(error(selector, format!("unexpected {t:?} as a value"))),
            };
            if !valid_value(&value) {
                return Err(error(selector, format!("invalid label value {value:?}")));
            }
            Ok(if op == Token::NotEq { LabelOp::NotEq(value) } else { LabelOp::Eq(value) })
        }
        Token::In | Token::NotIn => {
            if it.next() != Some(Token::Open) {
                return Err(error(selector, "expected '(' after in/notin"));
            }
            let mut values = Vec::new();
            loop {
                match it.next() {
                    Some(Token::Ident(v)) if valid_value(&v) => values.push(v),
                    Some(Token::Ident(v)) => {
                        return Err(error(selector, format!("invalid label value {v:?}")));
                    }
                    _ => return Err(error(selector, "expected a value in the set")),
                }
                match it.next() {
                    Some(Token::Comma) => continue,
                    Some(Token::Close) => break,
                    _ => return Err(error(selector, "expected ',' or ')' in the set")),
                }
            }
            Ok(if op == Token::In { LabelOp::In(values) } else { LabelOp::NotIn(values) })
        }
        Token::Gt | Token::Lt => {
            let n = match it.next() {
                Some(Token::Ident(v)) => v.parse::<i64>().map_err(|_| {
                    error(selector, format!("{v:?} is not an integer for '>' or '<'"))
                })?,
                _ => return Err(error(selector, "expected an integer after '>' or '<'")),
            };
            Ok(if op == Token::Gt { LabelOp::Gt(n) } else { LabelOp::Lt(n) })
        }
        t => Err(error(selector, format!("unexpected {t:?} as an operator"))),
    }
}

/// Which value of an object a field requirement reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    Name,
    Namespace,
    /// Index into the resource's [`ResourceDef::fields`].
    Extra(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldRequirement {
    field: Field,
    value: String,
    negated: bool,
}

/// A parsed field selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    requirements: Vec<FieldRequirement>,
}

/// Splits at unescaped `sep`, keeping escapes in the pieces.
fn split_unescaped(s: &str, sep: char) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            pieces.push(&s[start..i]);
            start = i + c.len_utf8();
        }
    }
    pieces.push(&s[start..]);
    pieces
}

fn unescape(selector: &str, s: &str) -> Result<String, SelectorError> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(e @ ('\\' | ',' | '=')) => out.push(e),
            _ => return Err(error(selector, "invalid escape sequence")),
        }
    }
    Ok(out)
}

impl FieldSelector {
    pub(crate) fn parse(selector: &str, def: &ResourceDef) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        if selector.trim().is_empty() {
            return Ok(Self { requirements });
        }
        for term in split_unescaped(selector, ',') {
            // The first operator wins; `!=` and `==` are looked for before `=`.
            let (key, value, negated) = if let Some((k, v)) = term.split_once("!=") {
                (k, v, true)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, v, false)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, v, false)
            } else {
                return Err(error(selector, format!("invalid field selector term {term:?}")));
            };
            let key = key.trim();
            let field = match key {
                "metadata.name" => Field::Name,
                "metadata.namespace" => Field::Namespace,
                _ => match def.fields.iter().position(|f| f.label == key) {
                    Some(i) => Field::Extra(i),
                    None => {
                        return Err(error(
                            selector,
                            format!("field label not supported for {}: {key}", def.kind),
                        ));
                    }
                },
            };
            requirements.push(FieldRequirement {
                field,
                value: unescape(selector, value.trim())?,
                negated,
            });
        }
        Ok(Self { requirements })
    }

    /// `extra` holds the object's values of [`ResourceDef::fields`], in order.
    pub(crate) fn matches(&self, namespace: &str, name: &str, extra: &[String]) -> bool {
        self.requirements.iter().all(|r| {
            let actual = match r.field {
                Field::Name => name,
                Field::Namespace => namespace,
                Field::Extra(i) => extra.get(i).map_or("", String::as_str),
            };
            (actual == r.value) != r.negated
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{RESOURCES, by_name};

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn sel(s: &str) -> LabelSelector {
        LabelSelector::parse(s).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    #[test]
    fn label_selector_table() {
        let web = labels(&[("app", "web"), ("tier", "front"), ("replicas", "3")]);
        let db = labels(&[("app", "db")]);
        let none = labels(&[]);
        #[rustfmt::skip]
        let cases: &[(&str, [bool; 3])] = &[
            // selector                       web    db     none
            ("",                              [true, true, true]),
            ("app=web",                       [true, false, false]),
            ("app==web",                      [true, false, false]),
            ("app!=web",                      [false, true, true]),
            ("tier",                          [true, false, false]),
            ("!tier",                         [false, true, true]),
            ("app in (web, db)",              [true, true, false]),
            ("app notin (web)",               [false, true, true]),
            ("app=web,tier=front",            [true, false, false]),
            ("app=web , !tier",               [false, false, false]),
            ("app in (db),!tier",             [false, true, false]),
            ("replicas>2",                    [true, false, false]),
            ("replicas<3",                    [false, false, false]),
            ("app=",                          [false, false, false]),
            ("example.com/role!=x",           [true, true, true]),
        ];
        for (s, expected) in cases {
            let got = [sel(s).matches(&web), sel(s).matches(&db), sel(s).matches(&none)];
            assert_eq!(&got, expected, "selector {s:?}");
        }
    }

    #[test]
    fn bad_label_selectors_are_errors() {
        for s in [
            "app=web,",
            ",app",
            "app in web",
            "app in ()",
            "app in (a b)",
            "app=web=x",
            "!",
            "app>x",
            "a$b=c",
            "app=(x)",
            "app notin (a,",
        ] {
            assert!(LabelSelector::parse(s).is_err(), "{s:?} should not parse");
        }
    }

    #[test]
    fn field_selectors() {
        let pods = &RESOURCES[by_name("pods").unwrap()];
        let node = pods.fields.iter().position(|f| f.label == "spec.nodeName").unwrap();
        let mut extra = vec![String::new(); pods.fields.len()];
        extra[node] = "n1".to_owned();
        let m = |s: &str| FieldSelector::parse(s, pods).unwrap().matches("ns", "p,1", &extra);
        assert!(m(""));
        assert!(m("metadata.name=p\\,1"));
        assert!(m("metadata.name==p\\,1,metadata.namespace=ns"));
        assert!(!m("metadata.name!=p\\,1"));
        assert!(m("spec.nodeName=n1"));
        assert!(!m("spec.nodeName=n2"));
        assert!(m("spec.nodeName!=n2,metadata.namespace!=other"));
        assert!(FieldSelector::parse("spec.bogus=x", pods).is_err());
        assert!(FieldSelector::parse("metadata.name", pods).is_err());
        assert!(FieldSelector::parse("metadata.name=a\\b", pods).is_err());
        let nodes = &RESOURCES[by_name("nodes").unwrap()];
        assert!(FieldSelector::parse("spec.nodeName=x", nodes).is_err());
    }
}
