//! Route policy: local answer, swarm vote or cloud escalation, from confidence, privacy and state.
//!
//! Two decisions per query: [`decide_first`] after the local answer, [`decide_after_vote`] after
//! a vote. Privacy is a hard constraint that overrides everything else, including a forced route:
//! `device` never leaves this node (no vote, no cloud), `swarm` never leaves the LAN (no cloud),
//! `cloud` allows both. A forbidden or impossible route yields a degraded answer with a reason,
//! never a hang.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How far a query may travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Privacy {
    /// Stays on this node.
    Device,
    /// May go to swarm peers, never to the cloud.
    Swarm,
    /// May go to the cloud through the gateway.
    #[default]
    Cloud,
}

/// Per-request forced route (`swarm.route`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteOverride {
    #[default]
    Auto,
    Local,
    Vote,
    Cloud,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Local confidence at or above which the local answer is final.
    pub tau_local: f32,
    /// Vote agreement at or above which the swarm answer is final.
    pub tau_vote: f32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            tau_local: 0.8,
            tau_vote: 0.6,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteInputs {
    /// Calibrated confidence of the local answer (NaN counts as 0).
    pub local_confidence: f32,
    pub privacy: Privacy,
    /// Request's floor on the final confidence; raises both thresholds.
    pub min_confidence: Option<f32>,
    /// Peers that could vote now (excluding this node).
    pub live_voters: usize,
    /// The safety classifier flagged the query.
    pub safety_flag: bool,
    pub route_override: RouteOverride,
    /// A gateway is elected and reachable.
    pub gateway_available: bool,
}

/// Why an answer is degraded; `Display` gives the text shown to users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DegradedReason {
    /// The query needed the cloud but its privacy level forbids it.
    PrivacyForbidsCloud,
    /// The query needed peers but its privacy level is `device`.
    PrivacyForbidsPeers,
    /// The cloud was needed but no gateway is available.
    NoGateway,
    /// A vote was needed but no peer is live.
    NoPeers,
    /// Safety-critical, and privacy forbids the cloud.
    SafetyPrivacyForbidsCloud,
    /// Safety-critical, and no gateway is available.
    SafetyNoGateway,
}

impl DegradedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DegradedReason::PrivacyForbidsCloud => "privacy forbids cloud",
            DegradedReason::PrivacyForbidsPeers => "privacy forbids peers",
            DegradedReason::NoGateway => "no gateway",
            DegradedReason::NoPeers => "no peers",
            DegradedReason::SafetyPrivacyForbidsCloud => "safety: privacy forbids cloud",
            DegradedReason::SafetyNoGateway => "safety: no gateway",
        }
    }
}

impl fmt::Display for DegradedReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Decision after the local answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The local answer is final.
    Local,
    /// Ask peers to vote.
    Vote,
    /// Send to the gateway's cloud model.
    Escalate,
    /// Answer locally, marked degraded.
    LocalDegraded { reason: DegradedReason },
}

/// Decision after a vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterVote {
    /// The swarm answer is final.
    Accept,
    /// Send to the gateway's cloud model (with the votes).
    Escalate,
    /// Return the swarm answer, marked degraded.
    Degraded { reason: DegradedReason },
}

fn finite_or_zero(x: f32) -> f32 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

fn threshold(tau: f32, min_confidence: Option<f32>) -> f32 {
    finite_or_zero(tau).max(min_confidence.map_or(0.0, finite_or_zero))
}

/// Why the cloud cannot be used, if it cannot.
fn cloud_blocker(i: &RouteInputs) -> Option<DegradedReason> {
    if i.privacy != Privacy::Cloud {
        Some(DegradedReason::PrivacyForbidsCloud)
    } else if !i.gateway_available {
        Some(DegradedReason::NoGateway)
    } else {
        None
    }
}

/// Route after the local answer.
pub fn decide_first(i: &RouteInputs, t: &Thresholds) -> Route {
    match i.route_override {
        RouteOverride::Local => return Route::Local,
        RouteOverride::Vote => {
            return if i.privacy == Privacy::Device {
                Route::LocalDegraded {
                    reason: DegradedReason::PrivacyForbidsPeers,
                }
            } else {
                // Forced even without peers: the vote then holds only our own answer.
                Route::Vote
            };
        }
        RouteOverride::Cloud => {
            return match cloud_blocker(i) {
                None => Route::Escalate,
                Some(reason) => Route::LocalDegraded { reason },
            };
        }
        RouteOverride::Auto => {}
    }
    if i.safety_flag {
        return match cloud_blocker(i) {
            None => Route::Escalate,
            Some(DegradedReason::NoGateway) => Route::LocalDegraded {
                reason: DegradedReason::SafetyNoGateway,
            },
            Some(_) => Route::LocalDegraded {
                reason: DegradedReason::SafetyPrivacyForbidsCloud,
            },
        };
    }
    if finite_or_zero(i.local_confidence) >= threshold(t.tau_local, i.min_confidence) {
        return Route::Local;
    }
    if i.privacy == Privacy::Device {
        return Route::LocalDegraded {
            reason: DegradedReason::PrivacyForbidsPeers,
        };
    }
    if i.live_voters > 0 {
        return Route::Vote;
    }
    // Nobody to ask locally: the cloud if allowed, else the lack of peers is the reason.
    match cloud_blocker(i) {
        None => Route::Escalate,
        Some(_) => Route::LocalDegraded {
            reason: DegradedReason::NoPeers,
        },
    }
}

/// True when the local answer is final whatever its confidence turns out to be
/// (forced local, privacy `device`, nobody to ask, …): the router may then
/// stream the local tokens as they are generated, before the confidence is known.
/// The decision is monotone in the confidence, so checking both ends suffices.
pub fn local_is_final(i: &RouteInputs, t: &Thresholds) -> bool {
    [0.0, 1.0].into_iter().all(|c| {
        let at = RouteInputs {
            local_confidence: c,
            ..*i
        };
        matches!(decide_first(&at, t), Route::Local | Route::LocalDegraded { .. })
    })
}

/// Route after a vote whose winner has weighted share `agreement`.
pub fn decide_after_vote(agreement: f32, i: &RouteInputs, t: &Thresholds) -> AfterVote {
    if i.route_override == RouteOverride::Vote {
        return AfterVote::Accept;
    }
    if finite_or_zero(agreement) >= threshold(t.tau_vote, i.min_confidence) {
        return AfterVote::Accept;
    }
    match cloud_blocker(i) {
        None => AfterVote::Escalate,
        Some(reason) => AfterVote::Degraded { reason },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DegradedReason::*;

    #[test]
    fn local_is_final_only_when_confidence_cannot_change_the_route() {
        let base = inputs();
        assert!(!local_is_final(&base, &T), "low confidence would vote");
        let forced = RouteInputs {
            route_override: RouteOverride::Local,
            ..base
        };
        assert!(local_is_final(&forced, &T));
        let device = RouteInputs {
            privacy: Privacy::Device,
            ..base
        };
        assert!(local_is_final(&device, &T));
        let alone = RouteInputs {
            live_voters: 0,
            gateway_available: false,
            ..base
        };
        assert!(local_is_final(&alone, &T));
        let flagged = RouteInputs {
            safety_flag: true,
            ..base
        };
        assert!(!local_is_final(&flagged, &T), "a flagged query escalates");
    }

    const T: Thresholds = Thresholds {
        tau_local: 0.8,
        tau_vote: 0.6,
    };

    fn inputs() -> RouteInputs {
        RouteInputs {
            local_confidence: 0.5,
            privacy: Privacy::Cloud,
            min_confidence: None,
            live_voters: 3,
            safety_flag: false,
            route_override: RouteOverride::Auto,
            gateway_available: true,
        }
    }

    /// (confidence, privacy, min_conf, voters, safety, override, gateway, expected route)
    type FirstCase = (f32, Privacy, Option<f32>, usize, bool, RouteOverride, bool, Route);

    #[test]
    fn first_decision_matrix() {
        use Privacy::*;
        use RouteOverride as O;
        #[rustfmt::skip]
        let cases: Vec<FirstCase> = vec![
            (0.9, Cloud, None, 3, false, O::Auto, true, Route::Local),
            (0.8, Cloud, None, 3, false, O::Auto, true, Route::Local),
            (0.79, Cloud, None, 3, false, O::Auto, true, Route::Vote),
            (0.9, Cloud, Some(0.95), 3, false, O::Auto, true, Route::Vote),
            (0.9, Cloud, Some(0.5), 3, false, O::Auto, true, Route::Local),
            (f32::NAN, Cloud, None, 3, false, O::Auto, true, Route::Vote),
            (0.5, Cloud, None, 0, false, O::Auto, true, Route::Escalate),
            (0.5, Cloud, None, 0, false, O::Auto, false, Route::LocalDegraded { reason: NoPeers }),
            (0.5, Swarm, None, 0, false, O::Auto, true, Route::LocalDegraded { reason: NoPeers }),
            (0.5, Swarm, None, 2, false, O::Auto, true, Route::Vote),
            (0.5, Device, None, 2, false, O::Auto, true, Route::LocalDegraded { reason: PrivacyForbidsPeers }),
            (0.9, Device, None, 2, false, O::Auto, true, Route::Local),
            // safety beats confidence
            (0.99, Cloud, None, 3, true, O::Auto, true, Route::Escalate),
            (0.99, Swarm, None, 3, true, O::Auto, true, Route::LocalDegraded { reason: SafetyPrivacyForbidsCloud }),
            (0.99, Device, None, 3, true, O::Auto, true, Route::LocalDegraded { reason: SafetyPrivacyForbidsCloud }),
            (0.99, Cloud, None, 3, true, O::Auto, false, Route::LocalDegraded { reason: SafetyNoGateway }),
            // overrides
            (0.1, Cloud, None, 3, true, O::Local, true, Route::Local),
            (0.99, Cloud, None, 3, false, O::Vote, true, Route::Vote),
            (0.99, Cloud, None, 0, false, O::Vote, true, Route::Vote),
            (0.99, Device, None, 3, false, O::Vote, true, Route::LocalDegraded { reason: PrivacyForbidsPeers }),
            (0.99, Cloud, None, 3, false, O::Cloud, true, Route::Escalate),
            (0.99, Cloud, None, 3, false, O::Cloud, false, Route::LocalDegraded { reason: NoGateway }),
            (0.99, Swarm, None, 3, false, O::Cloud, true, Route::LocalDegraded { reason: PrivacyForbidsCloud }),
        ];
        for (n, (conf, privacy, min, voters, safety, ov, gw, want)) in cases.into_iter().enumerate() {
            let i = RouteInputs {
                local_confidence: conf,
                privacy,
                min_confidence: min,
                live_voters: voters,
                safety_flag: safety,
                route_override: ov,
                gateway_available: gw,
            };
            assert_eq!(decide_first(&i, &T), want, "case {n}: {i:?}");
        }
    }

    #[test]
    fn after_vote_matrix() {
        use Privacy::*;
        #[rustfmt::skip]
        let cases: Vec<(f32, Privacy, Option<f32>, RouteOverride, bool, AfterVote)> = vec![
            (0.6, Cloud, None, RouteOverride::Auto, true, AfterVote::Accept),
            (0.59, Cloud, None, RouteOverride::Auto, true, AfterVote::Escalate),
            (0.7, Cloud, Some(0.75), RouteOverride::Auto, true, AfterVote::Escalate),
            (0.5, Cloud, None, RouteOverride::Auto, false, AfterVote::Degraded { reason: NoGateway }),
            (0.5, Swarm, None, RouteOverride::Auto, true, AfterVote::Degraded { reason: PrivacyForbidsCloud }),
            (0.9, Swarm, None, RouteOverride::Auto, true, AfterVote::Accept),
            (0.1, Cloud, None, RouteOverride::Vote, true, AfterVote::Accept),
            (f32::NAN, Cloud, None, RouteOverride::Auto, true, AfterVote::Escalate),
        ];
        for (n, (agreement, privacy, min, ov, gw, want)) in cases.into_iter().enumerate() {
            let i = RouteInputs {
                privacy,
                min_confidence: min,
                route_override: ov,
                gateway_available: gw,
                ..inputs()
            };
            assert_eq!(decide_after_vote(agreement, &i, &T), want, "case {n}");
        }
    }

    #[test]
    fn reasons_read_clearly_and_serde_names_match_the_api() {
        assert_eq!(PrivacyForbidsCloud.to_string(), "privacy forbids cloud");
        assert_eq!(NoGateway.to_string(), "no gateway");
        assert_eq!(
            SafetyPrivacyForbidsCloud.to_string(),
            "safety: privacy forbids cloud"
        );
        let p: Privacy = serde_json::from_str("\"device\"").expect("privacy");
        assert_eq!(p, Privacy::Device);
        assert_eq!(Privacy::default(), Privacy::Cloud);
        let r: RouteOverride = serde_json::from_str("\"cloud\"").expect("route");
        assert_eq!(r, RouteOverride::Cloud);
        assert_eq!(RouteOverride::default(), RouteOverride::Auto);
    }
}
