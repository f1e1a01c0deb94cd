//! A SigningKeyPolicy spec parsed once into typed values. The phases read only the [`Plan`], so
//! a field that does not parse stops the policy here, with its name.

use std::time::Duration;

use super::{SignerDiscovery, SigningKeyPolicySpec};
use crate::crd::{
    field::{self, SpecError},
    rotation::TransitKey,
    schedule::Schedule,
};

/// The kind its errors name.
const KIND: &str = "SigningKeyPolicy";

/// Everything the controller does for one policy, parsed and checked.
#[derive(Debug, Clone)]
pub struct Plan {
    /// When a run is due.
    pub schedule: Schedule,
    /// No run starts and a run in progress holds.
    pub suspend: bool,
    /// The Transit key the signers sign with.
    pub transit: TransitKey,
    /// Where the signers' `/status` endpoints are.
    pub signers: SignerSource,
    /// Rotate phase.
    pub rotate: RotatePlan,
    /// Publish phase.
    pub publish: PublishPlan,
    /// Switch phase.
    pub switch: SwitchPlan,
    /// Drain phase.
    pub drain: DrainPlan,
    /// Retire phase.
    pub retire: RetirePlan,
}

/// Where the signer status endpoints come from.
#[derive(Debug, Clone)]
pub enum SignerSource {
    /// Listed `http(s)://host:port` URLs.
    Endpoints(Vec<String>),
    /// `http://<InternalIP>:<port>` of every matching Node.
    Discovery(SignerDiscovery),
}

/// The rotate phase's settings.
#[derive(Debug, Clone, Copy)]
pub struct RotatePlan {
    /// When the run fails.
    pub timeout: Duration,
}

/// The publish phase's settings.
#[derive(Debug, Clone, Copy)]
pub struct PublishPlan {
    /// Beyond the signers' refresh hint.
    pub margin: Duration,
    /// When the run fails.
    pub timeout: Duration,
}

/// The switch phase's settings.
#[derive(Debug, Clone)]
pub struct SwitchPlan {
    /// The TokenRequest's audience.
    pub audience: String,
    /// When the run fails.
    pub timeout: Duration,
}

/// The drain phase's settings.
#[derive(Debug, Clone, Copy)]
pub struct DrainPlan {
    /// Added to the token-lifetime bound.
    pub skew: Duration,
}

/// The retire phase's settings.
#[derive(Debug, Clone, Copy)]
pub struct RetirePlan {
    /// When the run fails.
    pub timeout: Duration,
}

/// Parses and checks every field, so a bad policy fails once with a message naming the field.
pub fn parse(spec: &SigningKeyPolicySpec) -> Result<Plan, SpecError> {
    let bad = |field, problem: &str| Err(SpecError { kind: KIND, field, problem: problem.to_owned() });
    let schedule = field::schedule(KIND, spec.schedule.as_deref())?;
    if spec.transit.key.is_empty() {
        return bad("transit.key", "required");
    }
    if spec.transit.mount.trim_matches('/').is_empty() {
        return bad("transit.mount", "must name a Transit mount");
    }
    if !field::http_urls(&spec.signers.endpoints) {
        return bad("signers.endpoints", "entries must be http(s)://host:port URLs");
    }
    let signers = match (&spec.signers.endpoints, &spec.signers.discovery) {
        (endpoints, _) if !endpoints.is_empty() => SignerSource::Endpoints(endpoints.clone()),
        (_, Some(discovery)) => SignerSource::Discovery(discovery.clone()),
        (_, None) => return bad("signers", "list endpoints or set discovery, so every step can be proven"),
    };
    let audience = spec.switch.audience.trim();
    if audience.is_empty() || audience.len() > 253 {
        return bad("switch.audience", "must be a non-empty audience of at most 253 characters");
    }
    Ok(Plan {
        schedule,
        suspend: spec.suspend,
        transit: spec.transit.clone(),
        signers,
        rotate: RotatePlan { timeout: duration("rotate.timeout", &spec.rotate.timeout)? },
        publish: PublishPlan {
            margin: duration("publish.margin", &spec.publish.margin)?,
            timeout: duration("publish.timeout", &spec.publish.timeout)?,
        },
        switch: SwitchPlan {
            audience: audience.to_owned(),
            timeout: duration("switch.timeout", &spec.switch.timeout)?,
        },
        drain: DrainPlan { skew: duration("drain.skew", &spec.drain.skew)? },
        retire: RetirePlan { timeout: duration("retire.timeout", &spec.retire.timeout)? },
    })
}

/// Parses a duration field like `5m`.
fn duration(field: &'static str, text: &str) -> Result<Duration, SpecError> {
    field::duration(KIND, field, text, "5m")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SigningKeyPolicySpec {
        serde_json::from_value(serde_json::json!({
            "transit": {"key": "sa-signing"},
            "signers": {"endpoints": ["http://10.0.0.1:8789"]}
        }))
        .unwrap()
    }

    #[test]
    fn defaults_fill_a_minimal_policy() {
        let plan = parse(&spec()).unwrap();
        assert_eq!(plan.transit.mount, "transit");
        assert!(!plan.suspend);
        assert!(matches!(plan.schedule, Schedule::Never));
        assert_eq!(plan.publish.margin, Duration::from_secs(300));
        assert_eq!(plan.drain.skew, Duration::from_secs(300));
        assert_eq!(plan.switch.audience, "kmsgate.io/signing-key-check");
        assert!(matches!(plan.signers, SignerSource::Endpoints(ref e) if e.len() == 1));
        let discovered: SigningKeyPolicySpec = serde_json::from_value(serde_json::json!({
            "transit": {"key": "k"}, "signers": {"discovery": {}}
        }))
        .unwrap();
        assert!(matches!(parse(&discovered).unwrap().signers, SignerSource::Discovery(d) if d.port == 8789));
    }

    #[test]
    fn validation_names_the_field() {
        let field = |s: SigningKeyPolicySpec| parse(&s).unwrap_err().field;
        let mut s = spec();
        s.publish.margin = "soon".into();
        assert_eq!(field(s), "publish.margin");
        let mut s = spec();
        s.drain.skew = "a while".into();
        assert!(parse(&s).unwrap_err().to_string().starts_with("SigningKeyPolicy spec.drain.skew:"));
        let mut s = spec();
        s.schedule = Some("5m".into());
        assert_eq!(field(s), "schedule");
        let mut s = spec();
        s.signers.endpoints.clear();
        assert_eq!(field(s), "signers");
        let mut s = spec();
        s.signers.endpoints = vec!["10.0.0.1:8789".into()];
        assert_eq!(field(s), "signers.endpoints");
        let mut s = spec();
        s.transit.key.clear();
        assert_eq!(field(s), "transit.key");
        let mut s = spec();
        s.switch.audience = " ".into();
        assert_eq!(field(s), "switch.audience");
    }
}
