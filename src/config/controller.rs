//! `controller.*`: which policies the rotation controller follows and how it holds its lease.

use std::time::Duration;

use super::{
    ConfigError, field,
    source::{Values, name_chars},
};

/// The rotation controller's settings.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// RotationPolicy name.
    pub policy: String,
    /// TokenPolicy name.
    pub token_policy: String,
    /// SigningKeyPolicy name; `None`: no signing-key rotation.
    pub signing_policy: Option<String>,
    /// The controller's own ServiceAccount, `namespace/name`.
    pub service_account: String,
    /// Lease namespace.
    pub lease_namespace: String,
    /// Lease name.
    pub lease_name: String,
    /// Lease duration.
    pub lease_duration: Duration,
    /// Longest wait between checks.
    pub poll_interval: Duration,
}

impl ControllerConfig {
    /// Reads `controller.*`.
    pub(super) fn read(v: &Values) -> Result<Self, ConfigError> {
        let name = |setting: &str| -> Result<String, ConfigError> {
            let value = v.text(setting)?.unwrap_or_default();
            object_name(setting, &value)?;
            Ok(value)
        };
        let policy = name("controller.policy")?;
        let token_policy = name("controller.token_policy")?;
        let signing_policy = match v.text("controller.signing_policy")?.unwrap_or_default() {
            text if text.is_empty() => None,
            text => {
                object_name("controller.signing_policy", &text)?;
                Some(text)
            }
        };
        let service_account = v.text("controller.service_account")?.unwrap_or_default();
        match service_account.split_once('/') {
            Some((ns, sa)) => {
                object_name("controller.service_account", ns)?;
                object_name("controller.service_account", sa)?;
            }
            None => return Err(field("controller.service_account", "must be namespace/name")),
        }
        let controller = Self {
            policy,
            token_policy,
            signing_policy,
            service_account,
            lease_namespace: name("controller.lease_namespace")?,
            lease_name: name("controller.lease_name")?,
            lease_duration: v.required_duration("controller.lease_duration")?,
            poll_interval: v.required_duration("controller.poll_interval")?,
        };
        if controller.lease_duration < Duration::from_secs(3) {
            return Err(field("controller.lease_duration", "must be at least 3s"));
        }
        Ok(controller)
    }
}

/// A Kubernetes object name: a DNS subdomain.
fn object_name(setting: &str, value: &str) -> Result<(), ConfigError> {
    name_chars(setting, value, 253, |b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
    })
}
