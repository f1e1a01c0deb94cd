//! Converge: every plugin reports the new key_id, then the API servers get time (or their own
//! metric says they switched). The driver gathers the evidence; [`decide`] judges it.

use std::time::Duration;

use super::{Context, KeyAdmin, RotationError, Run, Step};
use crate::{
    crd::rotation::{ConvergePlan, Phase, PluginSource},
    k8s::{EventKind, KubeError},
    plugin_status::PluginStatus,
};

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
                let body: PluginStatus = response.json().await.map_err(|e| e.to_string())?;
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
        let mut api_servers_switched = false;
        if let Plugins::Converged(count) = plugins {
            if self.book.status.plugins_converged_at.is_empty() {
                self.book.status.plugins_converged_at = self.book.now_text();
                self.book.events.push((
                    EventKind::Normal,
                    "PluginsConverged",
                    format!("{count} plugins report {wanted}"),
                ));
            }
            api_servers_switched =
                self.plan.converge.api_server_metrics && self.api_servers_switched(&wanted).await;
        }
        let evidence = Evidence {
            waited,
            plugins,
            settled: self.book.elapsed_since(&self.book.status.plugins_converged_at),
            api_servers_switched,
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

    /// Whether every API server (by identity lease) reported the new key_id from Status.
    async fn api_servers_switched(&self, key_id: &str) -> bool {
        let ids = match self.ctx.kube.api_server_ids().await {
            Ok(ids) if !ids.is_empty() => ids,
            Ok(_) => return false,
            Err(e) => {
                tracing::debug!(error = %e, "API server identities unreadable; waiting the settle time");
                return false;
            }
        };
        let text = match self.ctx.kube.api_server_metrics().await {
            Ok(text) => text,
            Err(e) => {
                tracing::debug!(error = %e, "API server metrics unreadable; waiting the settle time");
                return false;
            }
        };
        let seen = crate::k8s::api_servers_on_key(&text, &self.plan.verify.provider, key_id);
        ids.iter().all(|id| seen.contains_key(&crate::k8s::sha256_label(id)))
    }
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
    /// Every API server's metric shows the new key_id.
    pub api_servers_switched: bool,
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
    if evidence.api_servers_switched {
        return Decision::Migrate("every API server reported the new key_id".into());
    }
    let settle = plan.settle;
    if evidence.settled >= settle {
        return Decision::Migrate(format!("plugins converged and API servers had {settle:?} to switch"));
    }
    if evidence.waited >= timeout {
        return Decision::Fail(format!("API servers did not switch within {timeout:?}"));
    }
    let left = settle - evidence.settled;
    Decision::Wait {
        message: format!("plugins converged; waiting {left:?} more for API servers"),
        at_most: Some(left),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            api_servers_switched: switched,
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
        assert!(matches!(decide(&plan(), evidence(100, converged(), 80, true)), Decision::Migrate(_)));
        assert!(matches!(decide(&plan(), evidence(600, converged(), 480, false)), Decision::Migrate(_)));
        assert!(
            matches!(decide(&plan(), evidence(3600, converged(), 60, false)), Decision::Fail(m) if m.starts_with("API servers did not switch"))
        );
    }
}
