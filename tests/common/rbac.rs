//! The RBAC attributes kube-apiserver checks for a request, so tests can prove every call the
//! code made is in `kmsgate::k8s::RBAC`. [`needs`] models the request-info resolver
//! (staging/src/k8s.io/apiserver/pkg/endpoints/request/requestinfo.go,
//! `RequestInfoFactory.NewRequestInfo`): `/api/v1/...` is the core group, `/apis/{group}/{version}/...`
//! a named group, `namespaces/{ns}` is skipped before the resource, a third segment is the
//! subresource, `?watch=true` makes the verb `watch`, and anything else is a non-resource URL.

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
        // Version discovery (`/apis/{group}/{version}`) names no resource.
        [] => return Needs::Url(path.to_owned(), method.to_lowercase()),
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

/// Non-resource URLs every authenticated user may GET: the bootstrap `system:discovery`
/// ClusterRole (plugin/pkg/auth/authorizer/rbac/bootstrappolicy/policy.go, `ClusterRoles`), bound
/// to `system:authenticated`. A trailing `*` matches any rest, as in RBAC's `NonResourceURLs`.
pub const DISCOVERY: &[&str] = &[
    "/livez",
    "/readyz",
    "/healthz",
    "/version",
    "/version/",
    "/openapi",
    "/openapi/*",
    "/api",
    "/api/*",
    "/apis",
    "/apis/*",
];

/// What the API server's authorizer decides for one logged request (`METHOD path`) made with
/// kmsgate's RBAC (plus the discovery every user has): `Ok` with what it needed, or `Err` with
/// what it lacked.
pub fn authorize(line: &str) -> Result<Needs, Needs> {
    let needs = needs(line);
    let granted = match &needs {
        Needs::Resource(g, r, v) => {
            kmsgate::k8s::RBAC.iter().any(|(rg, rr, verbs)| rg == g && rr == r && verbs.contains(&v.as_str()))
        }
        Needs::Url(p, v) => {
            kmsgate::k8s::RBAC_NON_RESOURCE.iter().any(|(up, verbs)| up == p && verbs.contains(&v.as_str()))
                || (v == "get"
                    && DISCOVERY.iter().any(|url| match url.strip_suffix('*') {
                        Some(prefix) => p.starts_with(prefix),
                        None => p == url,
                    }))
        }
    };
    if granted { Ok(needs) } else { Err(needs) }
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
