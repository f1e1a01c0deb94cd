//! The verify Job and StorageVersionMigrations: create them, read where they stand.

use k8s_openapi::api::batch::v1::Job;
use kube::{
    Api,
    api::{ApiResource, DeleteParams, DynamicObject, PostParams},
};
use serde_json::json;

use super::{Kube, KubeError, call};

/// What became of a Job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Not there.
    Missing,
    /// Still running.
    Running,
    /// Completed.
    Succeeded,
    /// Failed, with the reason.
    Failed(String),
}

/// What became of a StorageVersionMigration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationState {
    /// Not there.
    Missing,
    /// No terminal condition yet.
    Running,
    /// `Succeeded` is True.
    Succeeded,
    /// `Failed` is True, with the message.
    Failed(String),
}

impl Kube {
    /// Creates a Job (an existing one with the same name is kept).
    pub async fn create_job(&self, namespace: &str, job: &Job) -> Result<(), KubeError> {
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), namespace);
        match jobs.create(&PostParams::default(), job).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => {
                Err(call(format!("create job {namespace}/{}", job.metadata.name.as_deref().unwrap_or("")))(e))
            }
        }
    }

    /// Where a Job stands.
    pub async fn job_state(&self, namespace: &str, name: &str) -> Result<JobState, KubeError> {
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), namespace);
        let Some(job) = jobs.get_opt(name).await.map_err(call(format!("get job {namespace}/{name}")))? else {
            return Ok(JobState::Missing);
        };
        let conditions = job.status.and_then(|s| s.conditions).unwrap_or_default();
        for c in conditions {
            if c.status == "True" && c.type_ == "Complete" {
                return Ok(JobState::Succeeded);
            }
            if c.status == "True" && c.type_ == "Failed" {
                return Ok(JobState::Failed(c.message.or(c.reason).unwrap_or_default()));
            }
        }
        Ok(JobState::Running)
    }

    /// The served `storagemigration.k8s.io` version (v1 preferred), if any.
    pub async fn migration_version(&self) -> Result<Option<&'static str>, KubeError> {
        let request = http::Request::get("/apis/storagemigration.k8s.io")
            .body(Vec::new())
            .map_err(|e| KubeError::Unexpected(format!("build discovery request: {e}")))?;
        let group: serde_json::Value = match self.client.request(request).await {
            Ok(group) => group,
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(None),
            Err(e) => return Err(call("discover storagemigration.k8s.io")(e)),
        };
        let served: Vec<&str> = group["versions"]
            .as_array()
            .map(|v| v.iter().filter_map(|v| v["version"].as_str()).collect())
            .unwrap_or_default();
        Ok(["v1", "v1beta1"].into_iter().find(|v| served.contains(v)))
    }

    fn migrations(&self, version: &str) -> Api<DynamicObject> {
        let api = ApiResource {
            group: "storagemigration.k8s.io".into(),
            version: version.into(),
            api_version: format!("storagemigration.k8s.io/{version}"),
            kind: "StorageVersionMigration".into(),
            plural: "storageversionmigrations".into(),
        };
        Api::all_with(self.client.clone(), &api)
    }

    /// Creates a StorageVersionMigration for one resource (an existing one is kept).
    pub async fn create_migration(
        &self,
        version: &str,
        name: &str,
        group: &str,
        resource: &str,
    ) -> Result<(), KubeError> {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": format!("storagemigration.k8s.io/{version}"),
            "kind": "StorageVersionMigration",
            "metadata": { "name": name },
            "spec": { "resource": { "group": group, "resource": resource } }
        }))
        .map_err(|e| KubeError::Unexpected(format!("build StorageVersionMigration: {e}")))?;
        match self.migrations(version).create(&PostParams::default(), &object).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(call(format!("create StorageVersionMigration {name}"))(e)),
        }
    }

    /// Where a StorageVersionMigration stands.
    pub async fn migration_state(&self, version: &str, name: &str) -> Result<MigrationState, KubeError> {
        let Some(object) = self
            .migrations(version)
            .get_opt(name)
            .await
            .map_err(call(format!("get StorageVersionMigration {name}")))?
        else {
            return Ok(MigrationState::Missing);
        };
        let conditions = object.data["status"]["conditions"].as_array().cloned().unwrap_or_default();
        let truthy = |kind: &str| {
            conditions
                .iter()
                .find(|c| c["type"] == kind && c["status"] == "True")
                .map(|c| c["message"].as_str().unwrap_or_default().to_owned())
        };
        if truthy("Succeeded").is_some() {
            return Ok(MigrationState::Succeeded);
        }
        if let Some(message) = truthy("Failed") {
            return Ok(MigrationState::Failed(message));
        }
        Ok(MigrationState::Running)
    }

    /// Deletes a StorageVersionMigration (gone already is fine).
    pub async fn delete_migration(&self, version: &str, name: &str) -> Result<(), KubeError> {
        match self.migrations(version).delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(call(format!("delete StorageVersionMigration {name}"))(e)),
        }
    }
}
