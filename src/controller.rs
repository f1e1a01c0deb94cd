//! `kmsgate controller`: Lease-based leader election around the rotation state machine, the
//! signing-key loop and the token loops. Only the replica holding the Lease acts; losing it cuts
//! the current step short, which is safe because every step resumes from the status.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::json;
use tokio::sync::watch;

use crate::{
    config::ControllerConfig,
    k8s::Kube,
    metrics::ControllerMetrics,
    policy_loop::{self, Progress},
    rotation::{Context, KeyAdmin},
    signing_rotation::{self, Fleet, SigningKeyAdmin},
};

/// Steps a policy until the run that handles a request has finished (Idle or Failed), calling
/// `report` with the status after every step. For `kmsgate rotate` when no controller is running.
pub use crate::policy_loop::drive;

/// Keeps trying to take and renew a Lease; publishes whether this process holds it.
pub struct Leadership {
    leader: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
    kube: Kube,
    lease: (String, String),
    holder: String,
}

impl Leadership {
    /// Starts campaigning for `namespace/name` as `holder`.
    pub fn start(
        kube: Kube,
        config: &ControllerConfig,
        holder: String,
        metrics: Arc<ControllerMetrics>,
    ) -> Self {
        let (tx, leader) = watch::channel(false);
        let (namespace, name, duration) =
            (config.lease_namespace.clone(), config.lease_name.clone(), config.lease_duration);
        let lease = (namespace.clone(), name.clone());
        let (campaign_kube, campaign_holder) = (kube.clone(), holder.clone());
        let task = tokio::spawn(async move {
            let (kube, holder) = (campaign_kube, campaign_holder);
            let renew_every = duration / 3;
            loop {
                // NB: a renewal that hangs past renew_every counts as lost, so a partitioned leader
                // stops acting before its lease can expire and pass to another replica.
                let held = tokio::time::timeout(
                    renew_every,
                    kube.acquire_lease(&namespace, &name, &holder, duration),
                )
                .await;
                let held = match held {
                    Ok(Ok(held)) => held,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "leader lease call failed");
                        false
                    }
                    Err(_) => {
                        tracing::warn!("leader lease call timed out");
                        false
                    }
                };
                tx.send_if_modified(|current| {
                    if *current != held {
                        tracing::info!(leader = held, holder = %holder, "leadership changed");
                        *current = held;
                        true
                    } else {
                        false
                    }
                });
                metrics.leader.set(i64::from(held));
                tokio::time::sleep(renew_every).await;
            }
        });
        Self { leader, task, kube, lease, holder }
    }

    /// Stops campaigning and, if this process holds the Lease, gives it up so another replica
    /// leads within its next retry instead of after the Lease expires. Call it only once the
    /// work the Lease guards has stopped.
    pub async fn release(self) {
        self.task.abort();
        if !self.is_leader() {
            return;
        }
        let (namespace, name) = &self.lease;
        // NB: bounded, so a partitioned API server cannot hold up the exit; the Lease then expires.
        let released =
            tokio::time::timeout(RELEASE_TIMEOUT, self.kube.release_lease(namespace, name, &self.holder))
                .await;
        match released {
            Ok(Ok(true)) => tracing::info!(holder = %self.holder, "released the leader lease"),
            Ok(Ok(false)) => tracing::info!("the leader lease had already passed to another holder"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not release the leader lease; it will expire"),
            Err(_) => tracing::warn!("releasing the leader lease timed out; it will expire"),
        }
    }

    /// Follows whether this process holds the Lease.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.leader.clone()
    }

    /// Whether this process holds the Lease now.
    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    /// Waits until this process holds the Lease.
    pub async fn acquired(&mut self) {
        let _ = self.leader.wait_for(|held| *held).await;
    }

    /// Completes when the Lease is lost (or the campaign stopped).
    pub async fn lost(&self) {
        let mut leader = self.leader.clone();
        let _ = leader.wait_for(|held| !*held).await;
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the controller's /status shows.
#[derive(Default)]
pub struct View {
    state: Mutex<serde_json::Value>,
    metrics: Arc<ControllerMetrics>,
}

impl View {
    fn set(&self, value: serde_json::Value) {
        *self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = value;
    }
}

impl crate::http::HttpView for View {
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }

    fn status(&self) -> serde_json::Value {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn metrics(&self) -> String {
        self.metrics.encode()
    }
}

impl View {
    /// A view over `metrics`.
    pub fn new(metrics: Arc<ControllerMetrics>) -> Self {
        Self { state: Mutex::new(json!({"leader": false})), metrics }
    }
}

/// Runs the controller until `shutdown` completes, with no signing-key loop.
pub async fn run<K: KeyAdmin + 'static>(
    ctx: Arc<Context<K>>,
    config: &ControllerConfig,
    holder: String,
    view: Arc<View>,
    shutdown: impl Future<Output = ()>,
) {
    run_with_signing(ctx, config, holder, view, |_| std::future::pending(), shutdown).await;
}

/// Runs the controller until `shutdown` completes. `signing` builds the third loop (see
/// [`follow_signing`]) from the Lease's watch, so all three loops act under one Lease.
pub async fn run_with_signing<K: KeyAdmin + 'static, S: Future<Output = ()>>(
    ctx: Arc<Context<K>>,
    config: &ControllerConfig,
    holder: String,
    view: Arc<View>,
    signing: impl FnOnce(watch::Receiver<bool>) -> S,
    shutdown: impl Future<Output = ()>,
) {
    let leadership = Leadership::start(ctx.kube.clone(), config, holder.clone(), ctx.metrics.clone());
    let signing_work = signing(leadership.subscribe());
    let tokens = crate::tokens::reconcile::TokenLoop {
        kube: ctx.kube.clone(),
        clock: Arc::new(crate::tokens::SystemClock),
        metrics: ctx.metrics.clone(),
        policy: config.token_policy.clone(),
        own: config.service_account.clone(),
    };
    let token_work = tokens.run(leadership.subscribe());
    let policy = config.policy.clone();
    let work = policy_loop::follow(&*ctx, &policy, leadership.subscribe(), |progress| {
        view.set(match progress {
            Progress::Waiting => json!({"leader": false, "holder": holder, "policy": policy}),
            Progress::Stepped => {
                json!({"leader": true, "holder": holder, "policy": policy, "last_step": "ok"})
            }
            Progress::Failed(message) => {
                json!({"leader": true, "holder": holder, "policy": policy, "last_error": message})
            }
        })
    });
    tokio::select! {
        () = work => {}
        () = token_work => {}
        () = signing_work => {}
        () = shutdown => tracing::info!("shutting down"),
    }
    // NB: the select dropped the work above, so nothing acts under the Lease once it is released.
    leadership.release().await;
    ctx.metrics.leader.set(0);
}

/// Steps SigningKeyPolicy `policy` while `leader` says this process holds the Lease; returns
/// once the Lease campaign has ended. Losing the Lease cuts the current step short, which is safe
/// because every step resumes from the status.
pub async fn follow_signing<K: SigningKeyAdmin, F: Fleet>(
    ctx: &signing_rotation::Context<K, F>,
    policy: &str,
    leader: watch::Receiver<bool>,
) {
    policy_loop::follow(ctx, policy, leader, |_| {}).await;
}

/// Steps SigningKeyPolicy `policy` until the run that handles `request` has finished (Idle or
/// Failed), calling `report` with the status after every step. For `kmsgate signer rotate` when
/// no controller is running.
pub use crate::policy_loop::drive as drive_signing;

/// The longest a stopping controller waits to give up its Lease.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long `kmsgate rotate` waits for a running controller between status reads.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);
