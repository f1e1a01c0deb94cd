//! What the policies' statuses share: the standard condition, and the one rule that sets it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A standard condition.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready` (the last run succeeded) or `Stalled` (the current run cannot go on).
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase reason.
    pub reason: String,
    /// For people.
    pub message: String,
    /// RFC 3339.
    pub last_transition_time: String,
}

/// Sets condition `kind` in `conditions`, adding it when absent. `lastTransitionTime` moves to
/// `now` only when the status flips (the Kubernetes convention), and a condition that says the
/// same again is left as it is, so a step that changes nothing writes nothing.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    kind: &str,
    status: bool,
    reason: &str,
    message: &str,
    now: String,
) {
    let value = if status { "True" } else { "False" };
    match conditions.iter_mut().find(|c| c.type_ == kind) {
        Some(c) if c.status == value && c.reason == reason && c.message == message => {}
        Some(c) => {
            if c.status != value {
                c.last_transition_time = now;
            }
            c.status = value.into();
            c.reason = reason.into();
            c.message = message.into();
        }
        None => conditions.push(Condition {
            type_: kind.into(),
            status: value.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: now,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_moves_its_transition_time_only_when_its_status_flips() {
        let mut conditions = Vec::new();
        set_condition(&mut conditions, "Stalled", true, "KubeError", "403", "t1".into());
        set_condition(&mut conditions, "Stalled", true, "TransitError", "503", "t2".into());
        assert_eq!(
            (conditions[0].reason.as_str(), conditions[0].last_transition_time.as_str()),
            ("TransitError", "t1")
        );
        set_condition(&mut conditions, "Stalled", false, "Recovered", "", "t3".into());
        set_condition(&mut conditions, "Ready", true, "Succeeded", "done", "t4".into());
        let stalled = &conditions[0];
        assert_eq!((stalled.status.as_str(), stalled.last_transition_time.as_str()), ("False", "t3"));
        assert_eq!(conditions.len(), 2);
    }
}
