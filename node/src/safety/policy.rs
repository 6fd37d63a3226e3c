//! What a safety flag does: the node's map from harm category to action
//! (escalate to the cloud, refuse here, or answer as usual), with a default for
//! categories the map does not name. `[routing.safety_policy]` in the config.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What the node does with a flagged query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Send it to the gateway's cloud model (never answered by a small model);
    /// when the cloud is out of reach the answer is local and marked degraded.
    Escalate,
    /// Answer with the refusal message, at once and without any model.
    Refuse,
    /// Treat it as an ordinary query (the category is still recorded).
    Answer,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Escalate => "escalate",
            Action::Refuse => "refuse",
            Action::Answer => "answer",
        }
    }
}

/// The refusal text when the config gives none.
pub const DEFAULT_REFUSAL: &str = "I can't help with that request. If you or someone else is in danger, \
please contact local emergency services.";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SafetyPolicy {
    /// Override the trained head's decision threshold on P(unsafe) (0..=1);
    /// lower catches more harm and flags more ordinary questions.
    pub threshold: Option<f32>,
    /// Action for a flagged category that `actions` does not name.
    pub default: Action,
    /// Per-category actions (categories: data/safety/README.md).
    pub actions: BTreeMap<String, Action>,
    /// What a refused query is told.
    pub refusal: String,
}

impl Default for SafetyPolicy {
    fn default() -> Self {
        // Sexual content involving minors is never answered, by any model; every
        // other category goes to the cloud, whose larger model can answer with care
        // (a self-harm question gets support, not silence).
        let actions = BTreeMap::from([("sexual_minors".to_string(), Action::Refuse)]);
        Self {
            threshold: None,
            default: Action::Escalate,
            actions,
            refusal: DEFAULT_REFUSAL.into(),
        }
    }
}

impl SafetyPolicy {
    /// The action for a flagged query of `category` (`None` = not flagged).
    pub fn action(&self, flagged: bool, category: Option<&str>) -> Option<Action> {
        if !flagged {
            return None;
        }
        Some(
            category
                .and_then(|c| self.actions.get(c).copied())
                .unwrap_or(self.default),
        )
    }

    pub fn validate(&self) -> Result<(), String> {
        if let Some(t) = self.threshold {
            if !(0.0..=1.0).contains(&t) {
                return Err(format!(
                    "routing.safety_policy.threshold {t} must be within 0..=1"
                ));
            }
        }
        if self.refusal.trim().is_empty() || self.refusal.len() > 2_000 {
            return Err("routing.safety_policy.refusal must be 1..=2000 bytes".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_map_to_actions_with_a_default() {
        let p = SafetyPolicy::default();
        assert_eq!(p.action(false, Some("sexual_minors")), None);
        assert_eq!(p.action(true, Some("sexual_minors")), Some(Action::Refuse));
        assert_eq!(p.action(true, Some("violence")), Some(Action::Escalate));
        assert_eq!(p.action(true, None), Some(Action::Escalate));
        let p: SafetyPolicy =
            toml::from_str("default = \"answer\"\n[actions]\nweapons_explosives = \"refuse\"\n")
                .expect("toml");
        assert_eq!(p.action(true, Some("weapons_explosives")), Some(Action::Refuse));
        assert_eq!(p.action(true, Some("sexual_minors")), Some(Action::Answer));
        assert!(toml::from_str::<SafetyPolicy>("default = \"shrug\"").is_err());
        let bad = SafetyPolicy {
            threshold: Some(1.5),
            ..SafetyPolicy::default()
        };
        assert!(bad.validate().is_err());
    }
}
