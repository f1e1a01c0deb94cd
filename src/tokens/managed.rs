//! Managed bound tokens: a Secret that names a ServiceAccount in an annotation gets a token from
//! the TokenRequest API, bound to that Secret, refreshed at a fraction of the granted lifetime.
//!
//! The guards stop a confused deputy: whoever can annotate a Secret gets nothing they could not
//! mint themselves. The ServiceAccount must be in the Secret's namespace, the namespace must be
//! allow-listed, audiences and lifetime are capped, and denied accounts (kmsgate's own first)
//! are refused. The schedule lives in the Secret's own annotations, so a restarted controller
//! refreshes on time.

use std::{collections::HashMap, sync::Arc, time::Duration};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::ObjectMeta, jiff::Timestamp};

use super::{
    AUDIENCES_ANNOTATION, Clock, ERROR_ANNOTATION, EXPIRES_ANNOTATION, ISSUED_ANNOTATION,
    LIFETIME_ANNOTATION, REQUEST_ANNOTATION, SERVICE_ACCOUNT_ANNOTATION, TokenError, parse_time, rfc3339,
};
use crate::{
    backoff::Backoff,
    crd::tokens::{Deny, MIN_LIFETIME, ManagedPlan, is_subdomain},
    k8s::{EventKind, Kube, KubeError},
    metrics::ControllerMetrics,
};

/// Retries after a failure: 10 s after the first, doubling up to [`MAX_BACKOFF`].
const RETRIES: Backoff = Backoff::new(Duration::from_secs(5), MAX_BACKOFF);
/// Longest wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Shortest wait between retries, even close to expiry (never a hot loop).
const MIN_BACKOFF: Duration = Duration::from_secs(5);

/// What a Secret may be issued, after every guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// ServiceAccount in the Secret's namespace.
    pub service_account: String,
    /// Audiences; empty means the API server's default.
    pub audiences: Vec<String>,
    /// Lifetime to ask for.
    pub lifetime: Duration,
}

/// The rules a request is checked against.
#[derive(Debug, Clone)]
pub struct Guard {
    namespaces: Vec<String>,
    audiences: Vec<String>,
    default_lifetime: Duration,
    max_lifetime: Duration,
    deny: Vec<Deny>,
    own: String,
}

impl Guard {
    /// From a policy's managed plan; `own` is kmsgate's own ServiceAccount as `namespace/name`.
    pub fn new(plan: &ManagedPlan, own: &str) -> Self {
        Self {
            namespaces: plan.namespaces.clone(),
            audiences: plan.audiences.clone(),
            default_lifetime: plan.default_lifetime,
            max_lifetime: plan.max_lifetime,
            deny: plan.deny.clone(),
            own: own.to_owned(),
        }
    }

    /// The request a Secret's annotations make, or why it is refused.
    pub fn check(&self, secret: &ObjectMeta) -> Result<Request, String> {
        let ns = secret.namespace.as_deref().unwrap_or_default();
        let annotations = secret.annotations.clone().unwrap_or_default();
        let raw = annotations.get(SERVICE_ACCOUNT_ANNOTATION).map(|s| s.trim()).unwrap_or_default();
        if !self.namespaces.iter().any(|n| n == ns) {
            return Err(format!(
                "namespace {ns} may not ask for managed tokens (TokenPolicy spec.managed.namespaces)"
            ));
        }
        let foreign = raw
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .or_else(|| raw.split_once('/'));
        if let Some((other, _)) = foreign {
            return Err(format!(
                "the serviceaccount must be in the secret's own namespace {ns}: {raw:?} names namespace {other:?}"
            ));
        }
        if !is_subdomain(raw) {
            return Err(format!("{SERVICE_ACCOUNT_ANNOTATION} {raw:?} is not a serviceaccount name"));
        }
        let id = format!("{ns}/{raw}");
        if id == self.own {
            return Err(format!("serviceaccount {id} is kmsgate's own and is never issued"));
        }
        if self.deny.iter().any(|d| d.denies(ns, raw)) {
            return Err(format!(
                "serviceaccount {id} is denied by TokenPolicy spec.managed.denyServiceAccounts"
            ));
        }
        let audiences: Vec<String> = annotations
            .get(AUDIENCES_ANNOTATION)
            .map(|a| a.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default();
        if let Some(bad) = audiences.iter().find(|a| !self.audiences.contains(a)) {
            return Err(format!("audience {bad:?} is not allowed (TokenPolicy spec.managed.audiences)"));
        }
        let lifetime = match annotations.get(LIFETIME_ANNOTATION) {
            Some(text) => humantime::parse_duration(text.trim())
                .map_err(|e| format!("{LIFETIME_ANNOTATION} {text:?} is not a duration like 2h: {e}"))?,
            None => self.default_lifetime,
        };
        if lifetime < MIN_LIFETIME {
            return Err(format!(
                "lifetime {} is under the TokenRequest API's 10m minimum",
                humantime::format_duration(lifetime)
            ));
        }
        if lifetime > self.max_lifetime {
            return Err(format!(
                "lifetime {} exceeds TokenPolicy spec.managed.maxLifetime {}",
                humantime::format_duration(lifetime),
                humantime::format_duration(self.max_lifetime)
            ));
        }
        Ok(Request { service_account: raw.to_owned(), audiences, lifetime })
    }
}

/// What the token in a Secret answers: the request annotations as written and the Secret's uid.
/// A different digest means the token must be issued again.
pub fn digest(secret: &ObjectMeta) -> String {
    let annotations = secret.annotations.clone().unwrap_or_default();
    let get = |k: &str| annotations.get(k).map(String::as_str).unwrap_or("").to_owned();
    let text = [
        get(SERVICE_ACCOUNT_ANNOTATION),
        get(AUDIENCES_ANNOTATION),
        get(LIFETIME_ANNOTATION),
        secret.uid.clone().unwrap_or_default(),
    ]
    .join("\n");
    crate::k8s::sha256_label(&text)
}

/// One managed Secret, as `kmsgate tokens list` shows it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// `namespace/name`.
    pub id: String,
    /// The ServiceAccount asked for.
    pub service_account: String,
    /// The expiry of the token in the Secret, if it holds one.
    pub expires: Option<Timestamp>,
    /// When it is refreshed next.
    pub refresh: Option<Timestamp>,
    /// `ok`, `due`, `refreshed`, `issued`, `failing` or `refused`, with the reason.
    pub state: String,
}

/// The result of one pass.
#[derive(Debug, Clone, Default)]
pub struct Pass {
    /// Secrets holding a current managed token after the pass.
    pub tokens: u64,
    /// Tokens issued or refreshed in this pass.
    pub refreshed: u64,
    /// Secrets failing or refused.
    pub failing: u64,
    /// When the next refresh or retry is due.
    pub next: Option<Timestamp>,
    /// The soonest expiry among managed tokens.
    pub earliest_expiry: Option<Timestamp>,
    /// Every managed Secret.
    pub entries: Vec<Entry>,
}

struct Retry {
    failures: u32,
    at: Timestamp,
    digest: String,
}

/// Issues and refreshes managed tokens; keeps retry state between passes.
pub struct Managed {
    kube: Kube,
    clock: Arc<dyn Clock>,
    metrics: Arc<ControllerMetrics>,
    retries: HashMap<String, Retry>,
    seen: HashMap<String, String>,
}

fn later(at: Timestamp, by: Duration) -> Timestamp {
    Timestamp::from_second(at.as_second().saturating_add(by.as_secs() as i64)).unwrap_or(at)
}

fn earliest(a: Option<Timestamp>, b: Timestamp) -> Option<Timestamp> {
    Some(a.map_or(b, |a| a.min(b)))
}

impl Managed {
    /// A reconciler with no history.
    pub fn new(kube: Kube, clock: Arc<dyn Clock>, metrics: Arc<ControllerMetrics>) -> Self {
        Self { kube, clock, metrics, retries: HashMap::new(), seen: HashMap::new() }
    }

    /// Whether a changed Secret needs a pass now: it asks for a token and its request differs
    /// from the one last handled (a Secret's own token write does not count).
    pub fn wants(&self, secret: &ObjectMeta) -> bool {
        let asks = secret.annotations.as_ref().is_some_and(|a| a.contains_key(SERVICE_ACCOUNT_ANNOTATION));
        asks && self.seen.get(&id(secret)).is_none_or(|d| *d != digest(secret))
    }

    /// Looks at every Secret that asks for a token; with `act`, issues those due and reports
    /// refusals and failures on the Secret.
    pub async fn pass(&mut self, plan: &ManagedPlan, guard: &Guard, act: bool) -> Result<Pass, TokenError> {
        let secrets = self.kube.list_secrets(None, None, None).await?;
        let now = self.clock.now();
        let mut pass = Pass::default();
        let mut present = std::collections::HashSet::new();
        for secret in secrets {
            let annotations = secret.annotations.clone().unwrap_or_default();
            let Some(sa) = annotations.get(SERVICE_ACCOUNT_ANNOTATION).cloned() else { continue };
            let key = id(&secret);
            present.insert(key.clone());
            let digest = digest(&secret);
            let mut entry = Entry {
                id: key.clone(),
                service_account: sa,
                expires: annotations.get(EXPIRES_ANNOTATION).and_then(|t| parse_time(t)),
                refresh: None,
                state: String::new(),
            };
            if act {
                // NB: remembered for every Secret looked at, so the watch's initial replay of
                // unchanged Secrets after a restart wakes nothing.
                self.seen.insert(key.clone(), digest.clone());
            }
            let current = annotations.get(REQUEST_ANNOTATION) == Some(&digest);
            let request = match guard.check(&secret) {
                Ok(request) => request,
                Err(refusal) => {
                    pass.failing += 1;
                    entry.state = format!("refused: {refusal}");
                    if act {
                        self.report(&secret, "TokenRequestRefused", &refusal).await;
                    }
                    pass.entries.push(entry);
                    continue;
                }
            };
            let issued = annotations.get(ISSUED_ANNOTATION).and_then(|t| parse_time(t));
            let refresh_at = match (current, issued, entry.expires) {
                (true, Some(issued), Some(expires)) => {
                    Some(refresh_point(issued, expires, plan.refresh_fraction))
                }
                _ => None,
            };
            entry.refresh = refresh_at;
            let mut due_at = refresh_at.unwrap_or(now);
            if let Some(retry) = self.retries.get(&key).filter(|r| r.digest == digest) {
                due_at = due_at.max(retry.at);
            }
            if due_at > now || !act {
                if let Some(expires) = entry.expires.filter(|_| current) {
                    pass.tokens += 1;
                    pass.earliest_expiry = earliest(pass.earliest_expiry, expires);
                }
                pass.next = earliest(pass.next, due_at);
                entry.state = match self.retries.get(&key) {
                    Some(_) => {
                        format!("failing: {}", annotations.get(ERROR_ANNOTATION).cloned().unwrap_or_default())
                    }
                    None if due_at <= now => "due".into(),
                    None => "ok".into(),
                };
                if self.retries.contains_key(&key) {
                    pass.failing += 1;
                }
                pass.entries.push(entry);
                continue;
            }
            match self.issue(&secret, &request, &digest, now).await {
                Ok(Some(expires)) => {
                    self.retries.remove(&key);
                    self.metrics.tokens_refreshed.inc();
                    pass.refreshed += 1;
                    pass.tokens += 1;
                    pass.earliest_expiry = earliest(pass.earliest_expiry, expires);
                    let next = refresh_point(now, expires, plan.refresh_fraction);
                    pass.next = earliest(pass.next, next);
                    entry.state = if current { "refreshed".into() } else { "issued".into() };
                    entry.expires = Some(expires);
                    entry.refresh = Some(next);
                }
                Ok(None) => {
                    // The Secret changed under the write: look again soon, not a failure.
                    pass.next = earliest(pass.next, later(now, Duration::from_secs(1)));
                    entry.state = "due".into();
                }
                Err(message) => {
                    self.metrics.token_failures("managed");
                    pass.failing += 1;
                    let failures =
                        self.retries.get(&key).filter(|r| r.digest == digest).map_or(0, |r| r.failures) + 1;
                    let valid_for = entry
                        .expires
                        .filter(|_| current)
                        .map(|e| Duration::from_secs((e.as_second() - now.as_second()).max(0) as u64));
                    let at = later(now, retry_after(failures, valid_for));
                    self.retries.insert(key.clone(), Retry { failures, at, digest });
                    pass.next = earliest(pass.next, at);
                    if let Some(expires) = entry.expires.filter(|e| current && *e > now) {
                        pass.tokens += 1;
                        pass.earliest_expiry = earliest(pass.earliest_expiry, expires);
                    }
                    self.report(&secret, "TokenRequestFailed", &message).await;
                    entry.state = format!("failing: {message}");
                }
            }
            pass.entries.push(entry);
        }
        self.retries.retain(|k, _| present.contains(k));
        self.seen.retain(|k, _| present.contains(k));
        if act {
            let expiry = pass.earliest_expiry.map_or(0.0, |t| t.as_second() as f64);
            self.metrics.tokens_earliest_expiry.set(expiry);
        }
        Ok(pass)
    }

    /// Issues and stores a token: the granted expiry, `None` when the Secret changed first, or
    /// the failure message (never containing the token).
    async fn issue(
        &self,
        secret: &ObjectMeta,
        request: &Request,
        digest: &str,
        now: Timestamp,
    ) -> Result<Option<Timestamp>, String> {
        let (ns, name) = (secret.namespace.as_deref().unwrap_or(""), secret.name.as_deref().unwrap_or(""));
        let uid = secret.uid.as_deref().unwrap_or("");
        let issued = self
            .kube
            .request_token(
                ns,
                &request.service_account,
                &request.audiences,
                request.lifetime.as_secs(),
                name,
                uid,
            )
            .await
            .map_err(|e| explain(&e, ns, &request.service_account))?;
        if issued.expires <= now {
            return Err(format!(
                "the API server granted a token for {ns}/{} that expires at {}, not after now",
                request.service_account,
                rfc3339(issued.expires)
            ));
        }
        let annotations = [
            (ISSUED_ANNOTATION, Some(rfc3339(now))),
            (EXPIRES_ANNOTATION, Some(rfc3339(issued.expires))),
            (REQUEST_ANNOTATION, Some(digest.to_owned())),
            (ERROR_ANNOTATION, None),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let rv = secret.resource_version.as_deref().unwrap_or("");
        match self.kube.store_token(ns, name, rv, &issued.token, &annotations).await {
            Ok(()) => {
                tracing::info!(
                    secret = %format!("{ns}/{name}"),
                    service_account = %request.service_account,
                    expires = %rfc3339(issued.expires),
                    "issued a managed token"
                );
                Ok(Some(issued.expires))
            }
            Err(e) if matches!(e.code(), Some(409 | 404)) => Ok(None),
            Err(e) => Err(crate::error::chain(&e)),
        }
    }

    /// An Event and the error annotation, once per distinct message.
    async fn report(&self, secret: &ObjectMeta, reason: &str, message: &str) {
        let annotations = secret.annotations.clone().unwrap_or_default();
        if annotations.get(ERROR_ANNOTATION).map(String::as_str) == Some(message) {
            return;
        }
        tracing::warn!(secret = %id(secret), reason, message, "managed token not issued");
        self.kube.secret_event(secret, EventKind::Warning, reason, message).await;
        let (ns, name) = (secret.namespace.as_deref().unwrap_or(""), secret.name.as_deref().unwrap_or(""));
        let patch = [(ERROR_ANNOTATION.to_owned(), Some(message.to_owned()))].into_iter().collect();
        if let Err(e) = self.kube.annotate_secret(ns, name, &patch).await {
            tracing::warn!(secret = %id(secret), error = %e, "could not annotate the error");
        }
    }
}

fn id(secret: &ObjectMeta) -> String {
    format!("{}/{}", secret.namespace.as_deref().unwrap_or(""), secret.name.as_deref().unwrap_or(""))
}

/// `issued + fraction × (expires − issued)`.
pub fn refresh_point(issued: Timestamp, expires: Timestamp, fraction: f64) -> Timestamp {
    let lifetime = (expires.as_second() - issued.as_second()).max(0) as f64;
    Timestamp::from_second(issued.as_second() + (lifetime * fraction) as i64).unwrap_or(issued)
}

/// Exponential backoff, but while the current token is valid at least two more tries before it
/// expires, and never faster than every few seconds.
pub fn retry_after(failures: u32, valid_for: Option<Duration>) -> Duration {
    let exp = RETRIES.delay(failures.max(1));
    match valid_for {
        Some(left) if !left.is_zero() => exp.min(left / 2).max(MIN_BACKOFF),
        _ => exp,
    }
}

/// A failure message that names the cause; the API server's message is kept (it never holds a
/// token).
fn explain(error: &KubeError, ns: &str, sa: &str) -> String {
    match error.code() {
        Some(404) => format!("serviceaccount {ns}/{sa} not found"),
        Some(403) => format!("forbidden: {}", crate::error::chain(error)),
        Some(400 | 422) => format!("the API server refused the request: {}", crate::error::chain(error)),
        _ => crate::error::chain(error),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn guard() -> Guard {
        let plan = crate::crd::tokens::parse(
            &serde_json::from_value(serde_json::json!({"managed": {
                "enabled": true,
                "namespaces": ["apps"],
                "audiences": ["vault"],
                "denyServiceAccounts": ["apps/root", "ops/*"],
            }}))
            .unwrap(),
        )
        .unwrap();
        Guard::new(&plan.managed, "apps/kmsgate")
    }

    fn secret(ns: &str, annotations: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some("s".into()),
            namespace: Some(ns.into()),
            uid: Some("u".into()),
            annotations: Some(
                annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
            ),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn guards_refuse_what_the_annotator_could_not_mint() {
        let g = guard();
        let sa = SERVICE_ACCOUNT_ANNOTATION;
        let ok = g.check(&secret("apps", &[(sa, "builder")])).unwrap();
        assert_eq!(ok.lifetime, Duration::from_secs(3600));
        assert!(ok.audiences.is_empty());
        let refuse = |ns, a: &[(&str, &str)]| g.check(&secret(ns, a)).unwrap_err();
        assert!(refuse("other", &[(sa, "builder")]).contains("namespace other may not"));
        assert!(refuse("apps", &[(sa, "kube-system/admin")]).contains("own namespace apps"));
        assert!(
            refuse("apps", &[(sa, "system:serviceaccount:kube-system:admin")]).contains("\"kube-system\"")
        );
        assert!(refuse("apps", &[(sa, "Bad_Name")]).contains("not a serviceaccount name"));
        assert!(refuse("apps", &[(sa, "kmsgate")]).contains("kmsgate's own"));
        assert!(refuse("apps", &[(sa, "root")]).contains("denied"));
        assert!(refuse("apps", &[(sa, "x"), (AUDIENCES_ANNOTATION, "vault,aws")]).contains("\"aws\""));
        assert!(refuse("apps", &[(sa, "x"), (LIFETIME_ANNOTATION, "5m")]).contains("10m minimum"));
        assert!(refuse("apps", &[(sa, "x"), (LIFETIME_ANNOTATION, "48h")]).contains("maxLifetime"));
        assert!(refuse("apps", &[(sa, "x"), (LIFETIME_ANNOTATION, "soon")]).contains("not a duration"));
        let wide = g.check(&secret("apps", &[(sa, "x"), (AUDIENCES_ANNOTATION, " vault ")])).unwrap();
        assert_eq!(wide.audiences, vec!["vault"]);
    }

    #[test]
    fn refresh_and_retry_timing() {
        let t = |s| Timestamp::from_second(s).unwrap();
        assert_eq!(refresh_point(t(1000), t(4600), 0.8), t(1000 + 2880));
        assert_eq!(retry_after(1, None), Duration::from_secs(10));
        assert_eq!(retry_after(3, None), Duration::from_secs(40));
        assert_eq!(retry_after(30, None), MAX_BACKOFF);
        assert_eq!(retry_after(30, Some(Duration::from_secs(120))), Duration::from_secs(60));
        assert_eq!(retry_after(30, Some(Duration::from_secs(4))), MIN_BACKOFF);
    }

    #[test]
    fn the_digest_changes_with_the_request_and_the_secret() {
        let a = secret("apps", &[(SERVICE_ACCOUNT_ANNOTATION, "x")]);
        let mut b = a.clone();
        assert_eq!(digest(&a), digest(&b));
        b.annotations.as_mut().unwrap().insert(LIFETIME_ANNOTATION.into(), "2h".into());
        assert_ne!(digest(&a), digest(&b));
        let mut c = a.clone();
        c.uid = Some("other".into());
        assert_ne!(digest(&a), digest(&c));
        let mut d = a.clone();
        d.annotations.as_mut().unwrap().insert(EXPIRES_ANNOTATION.into(), "2030-01-01T00:00:00Z".into());
        assert_eq!(digest(&a), digest(&d), "kmsgate's own annotations do not count");
    }
}
