//! The documented safety rules on arbitrary query text.
//!
//! Properties: no panic; deterministic; the rules-only classifier flags exactly
//! what the rules hit; for ASCII text the verdict ignores case (the rules match
//! lower-cased words).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use swarm_node::safety::{rule_hit, SafetyClassifier};

fn classifier() -> &'static SafetyClassifier {
    static C: OnceLock<SafetyClassifier> = OnceLock::new();
    C.get_or_init(SafetyClassifier::rules_only)
}

fuzz_target!(|bytes: &[u8]| {
    let text = String::from_utf8_lossy(bytes);
    let hit = rule_hit(&text).map(|r| r.name);
    assert_eq!(
        hit,
        rule_hit(&text).map(|r| r.name),
        "rules are not deterministic"
    );
    let verdict = classifier().decide(&text, None);
    assert_eq!(verdict.rule.as_deref(), hit);
    assert_eq!(verdict.flagged, hit.is_some());
    if text.is_ascii() {
        assert_eq!(
            rule_hit(&text.to_ascii_uppercase()).map(|r| r.name),
            hit,
            "case changes the verdict"
        );
    }
});
