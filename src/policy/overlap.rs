//! Grants that collide: two namespaces that could both manage the same IAM user (pure).
//!
//! A grant is one rule applied to one existing namespace, with `{namespace}` expanded. Two grants
//! of different namespaces overlap when one IAM user could satisfy both, decided statically
//! from the patterns (no IAM call):
//!
//! - names: the two globs intersect in a valid IAM user name (1-64 of `[A-Za-z0-9+=,.@_-]`);
//! - paths: one prefix starts with the other;
//! - tags: the same key asks for different values, or different keys (a user can carry both).
//!
//! Every criterion that both grants set must be compatible. Grants that select users by
//! different kinds of criteria only (one by name, the other by path or tag) are not compared:
//! any user has a name and a path and may carry any tag, so such grants could always overlap
//! and saying so tells nothing about the patterns. A grant that selects nothing in effect
//! (`userNames: ["*"]`, `userPathPrefix: /`) is compared with every other: it reaches any user.

use std::{collections::BTreeMap, fmt, sync::Arc};

use kube::ResourceExt;

use super::{NamespaceFacts, namespace_matches};
use crate::crd::IamAccessKeyPolicy;

/// Longest IAM user name.
const MAX_USER_NAME: usize = 64;

/// Characters of IAM user names.
fn iam_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "+=,.@_-".contains(c)
}

/// One rule applied to one namespace, `{namespace}` expanded.
#[derive(Clone, Debug)]
pub struct Grant {
    pub policy: String,
    /// Index in the policy's `spec.rules`.
    pub rule: usize,
    pub namespace: String,
    /// Name globs that can match some IAM user; `None`: any name.
    names: Option<Vec<String>>,
    /// `None`: any path (also for `/`).
    path: Option<String>,
    tag: Option<(String, String)>,
}

impl Grant {
    fn bounded(&self) -> bool {
        self.names.is_some() || self.path.is_some() || self.tag.is_some()
    }
}

/// Which rule of which policy, for which namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantRef {
    pub policy: String,
    pub rule: usize,
    pub namespace: String,
}

impl From<&Grant> for GrantRef {
    fn from(g: &Grant) -> Self {
        GrantRef { policy: g.policy.clone(), rule: g.rule, namespace: g.namespace.clone() }
    }
}

/// An IAM user both grants could manage (what is not set is unconstrained).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExampleUser {
    pub name: Option<String>,
    pub path: Option<String>,
    pub tags: Vec<(String, String)>,
}

impl fmt::Display for ExampleUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "IAM user {name:?}")?,
            None if self.path.is_none() && self.tags.is_empty() => return write!(f, "any IAM user"),
            None => write!(f, "an IAM user")?,
        }
        if let Some(path) = &self.path {
            write!(f, " under path {path:?}")?;
        }
        if !self.tags.is_empty() {
            let tags: Vec<String> = self.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
            write!(f, " tagged {}", tags.join(", "))?;
        }
        Ok(())
    }
}

/// Two grants of different namespaces that could manage the same user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overlap {
    pub a: GrantRef,
    pub b: GrantRef,
    pub example: ExampleUser,
}

/// What one policy is involved in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyReport {
    /// Existing namespaces its rules allow.
    pub namespaces: usize,
    /// Pairs of namespaces that could manage the same user through at least one of its rules.
    pub overlapping_pairs: usize,
    /// Examples, up to the limit asked for: pairs within this policy first, then pairs with
    /// another policy's grant; in namespace order.
    pub examples: Vec<Overlap>,
}

/// Every readable policy's grants to the given namespaces, and their overlaps, by policy name.
/// Deterministic: the same input gives the same report whatever the order of its parts.
pub fn find_overlaps(
    policies: &[Arc<IamAccessKeyPolicy>],
    namespaces: &[NamespaceFacts],
    max_examples: usize,
) -> BTreeMap<String, PolicyReport> {
    let mut policies: Vec<&Arc<IamAccessKeyPolicy>> = policies.iter().collect();
    policies.sort_by_key(|p| p.name_any());
    let mut namespaces: Vec<&NamespaceFacts> = namespaces.iter().collect();
    namespaces.sort_by_key(|n| n.name);

    let mut reports: BTreeMap<String, PolicyReport> =
        policies.iter().map(|p| (p.name_any(), PolicyReport::default())).collect();
    // Grants per namespace, namespaces without any left out.
    let mut by_namespace: Vec<Vec<Grant>> = vec![];
    for ns in &namespaces {
        let grants: Vec<Grant> = policies.iter().flat_map(|p| grants_of(p, ns)).collect();
        let mut counted: Vec<&str> = vec![];
        for g in &grants {
            if !counted.contains(&g.policy.as_str()) {
                counted.push(&g.policy);
                if let Some(r) = reports.get_mut(&g.policy) {
                    r.namespaces += 1;
                }
            }
        }
        if !grants.is_empty() {
            by_namespace.push(grants);
        }
    }

    let mut across: BTreeMap<String, Vec<Overlap>> = BTreeMap::new();
    for (i, first) in by_namespace.iter().enumerate() {
        for second in &by_namespace[i + 1..] {
            // Per policy, the first overlap of this pair of namespaces that involves it.
            let mut found: BTreeMap<&str, Overlap> = BTreeMap::new();
            for a in first {
                for b in second {
                    if found.contains_key(a.policy.as_str()) && found.contains_key(b.policy.as_str()) {
                        continue;
                    }
                    let Some(example) = overlap(a, b) else { continue };
                    let o = Overlap { a: a.into(), b: b.into(), example };
                    found.entry(&a.policy).or_insert_with(|| o.clone());
                    found.entry(&b.policy).or_insert(o);
                }
            }
            for (policy, o) in found {
                let Some(report) = reports.get_mut(policy) else { continue };
                report.overlapping_pairs += 1;
                if o.a.policy == o.b.policy {
                    if report.examples.len() < max_examples {
                        report.examples.push(o);
                    }
                } else {
                    let others = across.entry(policy.to_owned()).or_default();
                    if others.len() < max_examples {
                        others.push(o);
                    }
                }
            }
        }
    }
    for (policy, others) in across {
        if let Some(report) = reports.get_mut(&policy) {
            let room = max_examples.saturating_sub(report.examples.len());
            report.examples.extend(others.into_iter().take(room));
        }
    }
    reports
}

/// The grants a policy gives a namespace (rules that can match no IAM user left out).
fn grants_of(policy: &IamAccessKeyPolicy, ns: &NamespaceFacts) -> Vec<Grant> {
    let expand = |pattern: &str| pattern.replace("{namespace}", ns.name);
    let mut grants = vec![];
    for (index, rule) in policy.spec.rules.iter().enumerate() {
        if !namespace_matches(rule, ns) {
            continue;
        }
        let names = match &rule.user_names {
            None => None,
            Some(patterns) => {
                let expanded: Vec<String> = patterns.iter().map(|p| expand(p)).collect();
                if expanded.iter().any(|p| matches_every_name(p)) {
                    None
                } else {
                    let possible: Vec<String> =
                        expanded.into_iter().filter(|p| glob_intersection(p, "*").is_some()).collect();
                    if possible.is_empty() {
                        continue;
                    }
                    Some(possible)
                }
            }
        };
        let path = rule.user_path_prefix.as_deref().map(expand).filter(|p| p != "/");
        let tag = rule.user_tag.as_ref().map(|t| (t.key.clone(), expand(&t.value)));
        grants.push(Grant { policy: policy.name_any(), rule: index, namespace: ns.name.to_owned(), names, path, tag });
    }
    grants
}

/// Whether a glob matches every IAM user name (1-64 characters): wildcards only, a `*`
/// among them, and at most one `?`.
fn matches_every_name(pattern: &str) -> bool {
    pattern.contains('*') && pattern.chars().all(|c| c == '*' || c == '?') && pattern.matches('?').count() <= 1
}

/// An IAM user both grants could manage, if any (see the module's rules).
pub fn overlap(a: &Grant, b: &Grant) -> Option<ExampleUser> {
    if a.namespace == b.namespace {
        return None;
    }
    let shares_a_criterion = (a.names.is_some() && b.names.is_some())
        || (a.path.is_some() && b.path.is_some())
        || (a.tag.is_some() && b.tag.is_some());
    if a.bounded() && b.bounded() && !shares_a_criterion {
        return None;
    }
    let name = match (&a.names, &b.names) {
        (Some(x), Some(y)) => Some(x.iter().find_map(|p| y.iter().find_map(|q| glob_intersection(p, q)))?),
        (Some(only), None) | (None, Some(only)) => only.iter().find_map(|p| glob_intersection(p, "*")),
        (None, None) => None,
    };
    let path = match (&a.path, &b.path) {
        (Some(x), Some(y)) if x.starts_with(y.as_str()) => Some(x.clone()),
        (Some(x), Some(y)) if y.starts_with(x.as_str()) => Some(y.clone()),
        (Some(_), Some(_)) => return None,
        (x, y) => x.clone().or_else(|| y.clone()),
    };
    let mut tags: Vec<(String, String)> = a.tag.iter().chain(&b.tag).cloned().collect();
    if let [(k1, v1), (k2, v2)] = tags.as_slice()
        && k1 == k2
    {
        if v1 != v2 {
            return None;
        }
        tags.pop();
    }
    Some(ExampleUser { name, path, tags })
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Token {
    Literal(char),
    One,
    Any,
}

fn tokens(pattern: &str) -> Vec<Token> {
    pattern
        .chars()
        .map(|c| match c {
            '*' => Token::Any,
            '?' => Token::One,
            c => Token::Literal(c),
        })
        .collect()
}

/// A shortest IAM user name (1-64 characters of IAM's alphabet) that both globs match, if any.
/// `*` and `?` as in [`super::glob_matches`]; other characters literally.
pub fn glob_intersection(a: &str, b: &str) -> Option<String> {
    if !literal_ends_agree(a, b) {
        return None;
    }
    let (a, b) = (tokens(a), tokens(b));
    let (n, m) = (a.len(), b.len());
    // States: position in each pattern, and whether a character was consumed yet (names are
    // never empty). 0-1 BFS: skipping a `*` costs nothing, consuming a character costs one.
    let index = |i: usize, j: usize, nonempty: bool| (i * (m + 1) + j) * 2 + usize::from(nonempty);
    let states = (n + 1) * (m + 1) * 2;
    let mut dist = vec![usize::MAX; states];
    // How each state was first reached: the previous state and the character consumed.
    let mut came_from: Vec<Option<(usize, Option<char>)>> = vec![None; states];
    let mut queue = std::collections::VecDeque::new();
    dist[index(0, 0, false)] = 0;
    queue.push_back((0usize, 0usize, false));
    let goal = index(n, m, true);
    while let Some((i, j, nonempty)) = queue.pop_front() {
        let here = index(i, j, nonempty);
        let d = dist[here];
        if here == goal {
            break;
        }
        let mut relax =
            |to: (usize, usize, bool), cost: usize, c: Option<char>, queue: &mut std::collections::VecDeque<_>| {
                let k = index(to.0, to.1, to.2);
                if d + cost < dist[k] {
                    dist[k] = d + cost;
                    came_from[k] = Some((here, c));
                    if cost == 0 {
                        queue.push_front(to);
                    } else {
                        queue.push_back(to);
                    }
                }
            };
        if i < n && a[i] == Token::Any {
            relax((i + 1, j, nonempty), 0, None, &mut queue);
        }
        if j < m && b[j] == Token::Any {
            relax((i, j + 1, nonempty), 0, None, &mut queue);
        }
        // What each side may consume next: (next position, the one character it needs, if any).
        let step = |p: &[Token], k: usize| -> Option<(usize, Option<char>)> {
            match p.get(k)? {
                Token::Any => Some((k, None)),
                Token::One => Some((k + 1, None)),
                Token::Literal(c) if iam_name_char(*c) => Some((k + 1, Some(*c))),
                Token::Literal(_) => None,
            }
        };
        if d < MAX_USER_NAME
            && let (Some((i2, x)), Some((j2, y))) = (step(&a, i), step(&b, j))
        {
            let c = match (x, y) {
                (Some(x), Some(y)) if x != y => None,
                (Some(c), _) | (_, Some(c)) => Some(c),
                (None, None) => Some('x'),
            };
            if let Some(c) = c {
                relax((i2, j2, true), 1, Some(c), &mut queue);
            }
        }
    }
    if dist[goal] > MAX_USER_NAME {
        return None;
    }
    let mut name = vec![];
    let mut at = goal;
    while let Some((previous, c)) = came_from[at] {
        name.extend(c);
        at = previous;
    }
    name.reverse();
    Some(name.into_iter().collect())
}

/// Quick refusal: the characters before the first wildcard of each pattern must agree (one a
/// prefix of the other), and likewise after the last.
fn literal_ends_agree(a: &str, b: &str) -> bool {
    let wild = |c: char| c == '*' || c == '?';
    let prefix = |p: &str| p.find(wild).map_or(p.len(), |i| i);
    let suffix = |p: &str| p.rfind(wild).map_or(0, |i| i + 1);
    let (pa, pb) = (&a[..prefix(a)], &b[..prefix(b)]);
    let (sa, sb) = (&a[suffix(a)..], &b[suffix(b)..]);
    (pa.starts_with(pb) || pb.starts_with(pa)) && (sa.ends_with(sb) || sb.ends_with(sa))
}

#[cfg(test)]
mod tests;
