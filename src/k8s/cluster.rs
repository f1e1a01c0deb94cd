//! The cluster around the controller: plugin endpoints on Nodes and the leader Lease.

use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::Node,
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api,
    api::{ListParams, PostParams},
};

use super::{Kube, KubeError, call};

impl Kube {
    /// `http://<InternalIP>:<port>` of every Node matching the selector.
    pub async fn node_endpoints(&self, selector: &str, port: u16) -> Result<Vec<String>, KubeError> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let list = nodes.list(&ListParams::default().labels(selector)).await.map_err(call("list nodes"))?;
        let mut endpoints = Vec::new();
        for node in list.items {
            let address = node
                .status
                .and_then(|s| s.addresses)
                .unwrap_or_default()
                .into_iter()
                .find(|a| a.type_ == "InternalIP")
                .map(|a| a.address);
            match address {
                Some(ip) if ip.contains(':') => endpoints.push(format!("http://[{ip}]:{port}")),
                Some(ip) => endpoints.push(format!("http://{ip}:{port}")),
                None => {
                    return Err(KubeError::Unexpected(format!(
                        "node {} has no InternalIP address",
                        node.metadata.name.unwrap_or_default()
                    )));
                }
            }
        }
        Ok(endpoints)
    }

    /// Takes or renews a Lease for `holder`; `false` when someone else holds a fresh one.
    pub async fn acquire_lease(
        &self,
        namespace: &str,
        name: &str,
        holder: &str,
        duration: std::time::Duration,
    ) -> Result<bool, KubeError> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), namespace);
        let seconds = duration.as_secs().max(1) as i32;
        let now = MicroTime(Timestamp::now());
        let existing = leases.get_opt(name).await.map_err(call(format!("get lease {namespace}/{name}")))?;
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(name.into()), ..ObjectMeta::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(holder.into()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match leases.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(call(format!("create lease {namespace}/{name}"))(e)),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let mine = spec.holder_identity.as_deref() == Some(holder);
        // NB: a Lease with no holder was released and is free at once, as client-go's
        // tryAcquireOrRenew (tools/leaderelection/leaderelection.go) treats an empty HolderIdentity.
        let held = spec.holder_identity.as_deref().is_some_and(|h| !h.is_empty());
        if !mine && held && lease_fresh(spec) {
            return Ok(false);
        }
        if !mine {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = Some(holder.into());
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(seconds);
        // NB: replace carries the resourceVersion read above, so two candidates cannot both win.
        match leases.replace(name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(call(format!("update lease {namespace}/{name}"))(e)),
        }
    }

    /// Gives up a Lease `holder` holds, so the next candidate takes it without waiting for it to
    /// expire; `false` when `holder` did not hold it (then nothing changes).
    pub async fn release_lease(&self, namespace: &str, name: &str, holder: &str) -> Result<bool, KubeError> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), namespace);
        let lease = leases.get_opt(name).await.map_err(call(format!("get lease {namespace}/{name}")))?;
        let Some(mut lease) = lease else { return Ok(false) };
        let Some(spec) = lease.spec.as_mut().filter(|s| s.holder_identity.as_deref() == Some(holder)) else {
            return Ok(false);
        };
        // NB: as client-go's LeaderElector.release (tools/leaderelection/leaderelection.go): clear
        // the holder and times, keep the duration and the transition count.
        spec.holder_identity = None;
        spec.acquire_time = None;
        spec.renew_time = None;
        match leases.replace(name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(call(format!("release lease {namespace}/{name}"))(e)),
        }
    }

    /// The holder of a Lease, if it is held and fresh.
    pub async fn lease_holder(&self, namespace: &str, name: &str) -> Result<Option<String>, KubeError> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), namespace);
        let lease = leases.get_opt(name).await.map_err(call(format!("get lease {namespace}/{name}")))?;
        Ok(lease.and_then(|l| l.spec).filter(lease_fresh).and_then(|s| s.holder_identity))
    }
}

fn lease_fresh(spec: &LeaseSpec) -> bool {
    let (Some(renewed), Some(seconds)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return false;
    };
    let age = Timestamp::now().as_second() - renewed.0.as_second();
    age < i64::from(seconds)
}
