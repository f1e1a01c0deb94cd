//! Converge: every plugin reports the new key_id, then the API servers get time (or each one's
//! own metric says it switched, and three more minutes pass). The driver gathers the evidence;
//! [`decide`] judges it.

use std::{net::SocketAddr, time::Duration};

use super::{Context, KeyAdmin, RotationError, Run, Step};
use crate::{
    crd::rotation::{ConvergePlan, Phase, PluginSource},
    k8s::{EventKind, KubeError, MAX_API_SERVERS, api_servers_on_key, live_leases, sha256_label},
    plugin_status::PluginStatus,
};

/// The most a plugin's `/status` may send: a few hundred bytes in practice, so a larger answer
/// is not a plugin and must not fill the controller's memory.
pub const PLUGIN_STATUS_MAX_BYTES: usize = 64 * 1024;

impl<K: KeyAdmin> Context<K> {
    /// The key_id each plugin endpoint reports (or why it could not be read).
    pub async fn plugin_key_ids(
        &self,
        converge: &ConvergePlan,
    ) -> Result<Vec<(String, Result<String, String>)>, KubeError> {
        let endpoints = match &converge.plugins {
            PluginSource::Endpoints(plugins) => plugins.clone(),
            PluginSource::Discovery(d) => self.kube.node_endpoints(&d.node_selector, d.port).await?,
        };
        let mut out = Vec::new();
        for endpoint in endpoints {
            let url = format!("{}/status", endpoint.trim_end_matches('/'));
            let answer = async {
                let response = self.http.get(&url).send().await.map_err(|e| crate::error::chain(&e))?;
                if !response.status().is_success() {
                    return Err(format!("HTTP {}", response.status()));
                }
                let body = crate::http::read_capped(response, PLUGIN_STATUS_MAX_BYTES)
                    .await
                    .map_err(|e| crate::error::chain(&e))?;
                let body: PluginStatus = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
                body.promoted.map(|p| p.key_id).ok_or_else(|| "no promoted key_id".to_owned())
            }
            .await;
            out.push((endpoint, answer));
        }
        Ok(out)
    }
}

impl<K: KeyAdmin> Run<'_, K> {
    pub(super) async fn converging(&mut self) -> Result<Step, RotationError> {
        let waited = self.book.elapsed_since(&self.book.status.phase_started_at);
        let wanted = self.book.status.to_key_id.clone();
        let reports = self.ctx.plugin_key_ids(&self.plan.converge).await?;
        let plugins = judge_plugins(&reports, &wanted);
        let mut api_servers = ApiServers::NotRead;
        if !matches!(plugins, Plugins::Converged(_)) {
            // NB: a plugin that fell behind (a new node, a restart) restarts the clock: the API
            // servers get their full time after the last plugin switched, not the first.
            self.book.status.plugins_converged_at.clear();
        }
        if let Plugins::Converged(count) = plugins {
            if self.book.status.plugins_converged_at.is_empty() {
                self.book.status.plugins_converged_at = self.book.now_text();
                self.book.events.push((
                    EventKind::Normal,
                    "PluginsConverged",
                    format!("{count} plugins report {wanted}"),
                ));
            }
            let settled = self.book.elapsed_since(&self.book.status.plugins_converged_at);
            if self.plan.converge.api_server_metrics && settled < self.plan.converge.settle {
                api_servers = self.api_servers(&wanted).await;
            }
        }
        let evidence = Evidence {
            waited,
            plugins,
            settled: self.book.elapsed_since(&self.book.status.plugins_converged_at),
            api_servers,
        };
        Ok(match decide(&self.plan.converge, evidence) {
            Decision::Fail(message) => self.fail("ConvergeTimeout", &message),
            Decision::Migrate(message) => {
                self.book.status.message = message;
                self.book.enter(Phase::Migrating);
                Step::Again
            }
            Decision::Wait { message, at_most } => {
                self.book.status.message = message;
                Step::Wait(at_most.map_or(self.ctx.poll, |d| self.ctx.poll.min(d)))
            }
        })
    }

    /// Reads every live API server's own metric: the identity Leases say which servers exist,
    /// the `default/kubernetes` EndpointSlice where they are.
    async fn api_servers(&self, key_id: &str) -> ApiServers {
        let kube = &self.ctx.kube;
        let access = match kube.api_server_access() {
            Ok(access) => access,
            Err(why) => return ApiServers::Unreadable(format!("API servers cannot be read directly: {why}")),
        };
        let leases = match kube.identity_leases().await {
            Ok(leases) => live_leases(&leases, self.book.now()),
            Err(e) => return ApiServers::Unreadable(crate::error::chain(&e)),
        };
        let slice = match kube.api_server_addresses().await {
            Ok(slice) => slice,
            Err(e) => return ApiServers::Unreadable(crate::error::chain(&e)),
        };
        if slice.addresses.len() != leases.len() {
            return ApiServers::Disagree { addresses: slice.addresses.len(), leases: leases.len() };
        }
        if slice.addresses.len() > MAX_API_SERVERS {
            return ApiServers::Unreadable(format!(
                "{} API server addresses; at most {MAX_API_SERVERS} are read",
                slice.addresses.len()
            ));
        }
        let Some(port) = slice.port else {
            return ApiServers::Unreadable("EndpointSlice default/kubernetes names no port".into());
        };
        let mut scrapes = Vec::new();
        for ip in slice.addresses {
            let address = SocketAddr::new(ip, port);
            scrapes.push((address.to_string(), access.status_metric_lines(address).await));
        }
        judge_api_servers(&leases, &scrapes, &self.plan.verify.provider, key_id)
    }
}

/// How long an API server keeps writing with its old seed after its Status reported the new
/// key_id, when the first Encrypt under the new one fails: the metric is recorded before the
/// new seed is tried (staging/src/k8s.io/apiserver/pkg/server/options/encryptionconfig/config.go,
/// `kmsv2PluginProbe.isKMSv2ProviderHealthyAndMaybeRotateDEK` calls `RecordKeyIDFromStatus`
/// before `rotateDEKOnKeyIDChange`), and the old seed stays valid for `kmsv2PluginWriteDEKSourceMaxTTL`.
pub const SEED_COAST: Duration = Duration::from_secs(180);

/// Judges each live server (by Lease name, which is the API server ID the metric hashes) against
/// the metric lines read at each address: `(address, lines or why not)`.
pub fn judge_api_servers(
    live: &[String],
    scrapes: &[(String, Result<String, String>)],
    provider: &str,
    key_id: &str,
) -> ApiServers {
    let mut seen = std::collections::BTreeSet::new();
    let mut unreadable = Vec::new();
    for (address, scrape) in scrapes {
        match scrape {
            Ok(lines) => seen.extend(api_servers_on_key(lines, provider, key_id).into_keys()),
            Err(e) => unreadable.push(format!("{address}: {e}")),
        }
    }
    let mut lagging: Vec<String> = live
        .iter()
        .filter(|id| !seen.contains(&sha256_label(id)))
        .map(|id| format!("{id} has not reported it"))
        .collect();
    if live.is_empty() {
        return ApiServers::Unreadable("no identity Lease was renewed in the last minute".into());
    }
    if lagging.is_empty() {
        return ApiServers::Switched(live.len());
    }
    lagging.extend(unreadable);
    ApiServers::Lagging(lagging)
}

/// What the plugins report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plugins {
    /// No endpoint was found.
    NoneFound,
    /// Some report another key_id or could not be read: one line each.
    Lagging(Vec<String>),
    /// This many plugins all report the wanted key_id.
    Converged(usize),
}

/// Judges the plugins' reports against the wanted key_id.
pub fn judge_plugins(reports: &[(String, Result<String, String>)], wanted: &str) -> Plugins {
    if reports.is_empty() {
        return Plugins::NoneFound;
    }
    let lagging: Vec<String> = reports
        .iter()
        .filter(|(_, r)| r.as_deref() != Ok(wanted))
        .map(|(endpoint, r)| match r {
            Ok(key_id) => format!("{endpoint} reports {key_id}"),
            Err(e) => format!("{endpoint}: {e}"),
        })
        .collect();
    match lagging.is_empty() {
        true => Plugins::Converged(reports.len()),
        false => Plugins::Lagging(lagging),
    }
}

/// What the converge phase knows at one step.
#[derive(Debug, Clone)]
pub struct Evidence {
    /// Time in the phase.
    pub waited: Duration,
    /// The plugins' reports.
    pub plugins: Plugins,
    /// Time since every plugin first reported the new key_id (zero before).
    pub settled: Duration,
    /// What the API servers' own metrics say.
    pub api_servers: ApiServers,
}

/// What the API servers' metrics show about the new key_id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiServers {
    /// Not read: the policy does not ask, or the plugins are not there yet.
    NotRead,
    /// The evidence could not be gathered, and why.
    Unreadable(String),
    /// The EndpointSlice and the live identity Leases count different servers.
    Disagree {
        /// Addresses in `default/kubernetes`.
        addresses: usize,
        /// Identity Leases renewed in the last minute.
        leases: usize,
    },
    /// Some live servers have not reported the key_id (or could not be read): one line each.
    Lagging(Vec<String>),
    /// This many live servers all reported it.
    Switched(usize),
}

/// The converge phase's next move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Stop the run with this message.
    Fail(String),
    /// Go on to migrate, with this message.
    Migrate(String),
    /// Look again, no later than `at_most` (the poll interval when `None`).
    Wait {
        /// For the status.
        message: String,
        /// Longest useful wait.
        at_most: Option<Duration>,
    },
}

/// Decides from the evidence and the plan alone.
pub fn decide(plan: &ConvergePlan, evidence: Evidence) -> Decision {
    let timeout = plan.timeout;
    let lagging = match evidence.plugins {
        Plugins::NoneFound => Some("no plugin endpoints found".to_owned()),
        Plugins::Lagging(lines) => Some(format!("waiting for plugins: {}", lines.join("; "))),
        Plugins::Converged(_) => None,
    };
    if let Some(message) = lagging {
        if evidence.waited >= timeout {
            return Decision::Fail(format!("plugins did not converge in {timeout:?}: {message}"));
        }
        return Decision::Wait { message, at_most: None };
    }
    let settle = plan.settle;
    if evidence.settled >= settle {
        return Decision::Migrate(format!("plugins converged and API servers had {settle:?} to switch"));
    }
    if let ApiServers::Switched(count) = evidence.api_servers {
        if evidence.settled >= SEED_COAST {
            return Decision::Migrate("every API server reported the new key_id".into());
        }
        // NB: a server whose first Encrypt under the new key_id failed keeps its old seed for
        // up to three minutes, whatever its metric says.
        let left = SEED_COAST - evidence.settled;
        return Decision::Wait {
            message: format!(
                "all {count} API servers reported the new key_id; waiting {left:?} more in case one still writes with its old seed"
            ),
            at_most: Some(left),
        };
    }
    if evidence.waited >= timeout {
        return Decision::Fail(format!("API servers did not switch within {timeout:?}"));
    }
    let left = settle - evidence.settled;
    let why = match evidence.api_servers {
        ApiServers::NotRead | ApiServers::Switched(_) => String::new(),
        ApiServers::Unreadable(why) => format!(" (their metrics are unreadable: {why})"),
        ApiServers::Disagree { addresses, leases } => format!(
            " (EndpointSlice default/kubernetes lists {addresses} API servers but {leases} identity Leases are live, so the metrics cannot prove all switched)"
        ),
        ApiServers::Lagging(lines) => format!(" ({})", lines.join("; ")),
    };
    Decision::Wait {
        message: format!("plugins converged; waiting {left:?} more for API servers{why}"),
        at_most: Some(left),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    use crate::k8s::IdentityLease;

    fn plan() -> ConvergePlan {
        ConvergePlan {
            plugins: PluginSource::Endpoints(vec!["http://a".into()]),
            settle: Duration::from_secs(480),
            api_server_metrics: true,
            timeout: Duration::from_secs(3600),
        }
    }

    fn evidence(waited: u64, plugins: Plugins, settled: u64, switched: bool) -> Evidence {
        Evidence {
            waited: Duration::from_secs(waited),
            plugins,
            settled: Duration::from_secs(settled),
            api_servers: if switched { ApiServers::Switched(3) } else { ApiServers::NotRead },
        }
    }

    #[test]
    fn plugins_are_judged_against_the_wanted_key_id() {
        let ok = |e: &str, k: &str| (e.to_owned(), Ok(k.to_owned()));
        assert_eq!(judge_plugins(&[], "k2"), Plugins::NoneFound);
        assert_eq!(judge_plugins(&[ok("a", "k2"), ok("b", "k2")], "k2"), Plugins::Converged(2));
        let lagging = judge_plugins(&[ok("a", "k1"), ("b".into(), Err("HTTP 503".into()))], "k2");
        assert_eq!(lagging, Plugins::Lagging(vec!["a reports k1".into(), "b: HTTP 503".into()]));
    }

    #[test]
    fn lagging_plugins_wait_until_the_timeout() {
        let lagging = || Plugins::Lagging(vec!["a reports k1".into()]);
        assert_eq!(
            decide(&plan(), evidence(10, lagging(), 0, false)),
            Decision::Wait { message: "waiting for plugins: a reports k1".into(), at_most: None }
        );
        assert!(
            matches!(decide(&plan(), evidence(3600, lagging(), 0, false)), Decision::Fail(m) if m.starts_with("plugins did not converge"))
        );
        assert!(
            matches!(decide(&plan(), evidence(3600, Plugins::NoneFound, 0, false)), Decision::Fail(m) if m.ends_with("no plugin endpoints found"))
        );
    }

    #[test]
    fn converged_plugins_migrate_after_the_settle_time_or_the_api_servers_metric() {
        let converged = || Plugins::Converged(3);
        assert_eq!(
            decide(&plan(), evidence(100, converged(), 80, false)),
            Decision::Wait {
                message: "plugins converged; waiting 400s more for API servers".into(),
                at_most: Some(Duration::from_secs(400))
            }
        );
        assert!(matches!(decide(&plan(), evidence(200, converged(), 180, true)), Decision::Migrate(_)));
        assert!(matches!(decide(&plan(), evidence(600, converged(), 480, false)), Decision::Migrate(_)));
        assert!(
            matches!(decide(&plan(), evidence(3600, converged(), 60, false)), Decision::Fail(m) if m.starts_with("API servers did not switch"))
        );
    }

    #[test]
    fn the_metrics_end_the_wait_no_sooner_than_three_minutes_after_the_plugins_converged() {
        let converged = || Plugins::Converged(3);
        assert_eq!(
            decide(&plan(), evidence(100, converged(), 80, true)),
            Decision::Wait {
                message: "all 3 API servers reported the new key_id; waiting 100s more in case one still writes with its old seed".into(),
                at_most: Some(Duration::from_secs(100))
            }
        );
        assert!(matches!(decide(&plan(), evidence(180, converged(), 179, true)), Decision::Wait { .. }));
        assert!(matches!(decide(&plan(), evidence(180, converged(), 180, true)), Decision::Migrate(_)));
    }

    #[test]
    fn disagreeing_counts_and_lagging_servers_wait_the_whole_settle_and_say_why() {
        let with = |api_servers| Evidence {
            waited: Duration::from_secs(300),
            plugins: Plugins::Converged(3),
            settled: Duration::from_secs(280),
            api_servers,
        };
        assert_eq!(
            decide(&plan(), with(ApiServers::Disagree { addresses: 2, leases: 3 })),
            Decision::Wait {
                message: "plugins converged; waiting 200s more for API servers (EndpointSlice default/kubernetes lists 2 API servers but 3 identity Leases are live, so the metrics cannot prove all switched)".into(),
                at_most: Some(Duration::from_secs(200))
            }
        );
        let lagging = ApiServers::Lagging(vec!["apiserver-c has not reported it".into()]);
        assert!(
            matches!(decide(&plan(), with(lagging)), Decision::Wait { message, .. } if message.ends_with("(apiserver-c has not reported it)"))
        );
        let settled = Evidence {
            settled: Duration::from_secs(480),
            ..with(ApiServers::Disagree { addresses: 2, leases: 3 })
        };
        assert!(matches!(decide(&plan(), settled), Decision::Migrate(_)));
    }

    fn lease(name: &str, renewed: Option<i64>) -> IdentityLease {
        IdentityLease { name: name.into(), renewed: renewed.map(|s| Timestamp::from_second(s).unwrap()) }
    }

    #[test]
    fn leases_unrenewed_for_a_minute_are_not_running_servers() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let t = now.as_second();
        let leases = [
            lease("apiserver-a", Some(t - 10)),
            lease("apiserver-b", Some(t - 60)),
            lease("apiserver-gone", Some(t - 61)),
            lease("apiserver-unset", None),
            lease("apiserver-skewed", Some(t + 5)),
        ];
        assert_eq!(live_leases(&leases, now), vec!["apiserver-a", "apiserver-b", "apiserver-skewed"]);
    }

    #[test]
    fn each_server_is_matched_by_the_hash_of_its_lease_name_not_its_holder() {
        let key = "kmsgate:1:vault:prod:::transit:k:2:100";
        let line = |id: &str| {
            format!(
                "{}{{apiserver_id_hash=\"{}\",key_id_hash=\"{}\",provider_name=\"kmsgate\"}} 1.8e9\n",
                crate::k8s::STATUS_METRIC,
                sha256_label(id),
                sha256_label(key)
            )
        };
        let live = vec!["apiserver-a".to_owned(), "apiserver-b".to_owned()];
        let scrapes = vec![
            ("10.0.0.1:6443".to_owned(), Ok(line("apiserver-a"))),
            ("10.0.0.2:6443".to_owned(), Ok(line("apiserver-b_0b9f6c1e-uuid"))),
        ];
        assert_eq!(
            judge_api_servers(&live, &scrapes, "kmsgate", key),
            ApiServers::Lagging(vec!["apiserver-b has not reported it".into()]),
            "a holder identity hash is not the server ID"
        );
        let scrapes = vec![
            ("10.0.0.1:6443".to_owned(), Ok(line("apiserver-a"))),
            ("10.0.0.2:6443".to_owned(), Ok(line("apiserver-b"))),
        ];
        assert_eq!(judge_api_servers(&live, &scrapes, "kmsgate", key), ApiServers::Switched(2));
        let scrapes = vec![
            ("10.0.0.1:6443".to_owned(), Ok(line("apiserver-a"))),
            ("10.0.0.2:6443".to_owned(), Err("HTTP 403".to_owned())),
        ];
        assert_eq!(
            judge_api_servers(&live, &scrapes, "kmsgate", key),
            ApiServers::Lagging(vec![
                "apiserver-b has not reported it".into(),
                "10.0.0.2:6443: HTTP 403".into()
            ])
        );
        assert!(matches!(judge_api_servers(&[], &[], "kmsgate", key), ApiServers::Unreadable(_)));
    }
}
