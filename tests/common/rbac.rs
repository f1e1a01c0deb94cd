//! The RBAC attributes kube-apiserver checks for a request (as its request-info resolver derives
//! them), so tests can prove every call the code made is in `kmsgate::k8s::RBAC`.

/// What a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Needs {
    /// A resource verb: API group, resource (with `/subresource`), verb.
    Resource(String, String, String),
    /// A non-resource URL and verb.
    Url(String, String),
}

/// Reads `METHOD path` (or `WATCH path` for a watch) as recorded by the fakes.
pub fn needs(line: &str) -> Needs {
    let (method, path) = line.split_once(' ').expect("METHOD path");
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return Needs::Url(path.to_owned(), method.to_lowercase()),
    };
    let rest = match rest {
        ["namespaces", _ns, rest @ ..] if !rest.is_empty() => rest,
        rest => rest,
    };
    let (resource, named) = match rest {
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        other => panic!("cannot read {line}: {other:?}"),
    };
    let verb = match (method, named) {
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("WATCH", _) => "watch",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        (other, _) => panic!("unexpected method {other} in {line}"),
    };
    Needs::Resource(group.to_owned(), resource, verb.to_owned())
}

/// Panics unless every recorded request is granted by `rules` or `urls`; returns how many
/// distinct permissions the log used.
pub fn assert_allowed(log: &[String], rules: &[(&str, &str, &[&str])], urls: &[(&str, &[&str])]) -> usize {
    let mut used = std::collections::BTreeSet::new();
    for line in log {
        let needs = needs(line);
        let granted = match &needs {
            Needs::Resource(g, r, v) => {
                rules.iter().any(|(rg, rr, verbs)| rg == g && rr == r && verbs.contains(&v.as_str()))
            }
            Needs::Url(p, v) => urls.iter().any(|(up, verbs)| up == p && verbs.contains(&v.as_str())),
        };
        assert!(granted, "{line} needs {needs:?}, which kmsgate::k8s::RBAC does not list");
        used.insert(format!("{needs:?}"));
    }
    used.len()
}
