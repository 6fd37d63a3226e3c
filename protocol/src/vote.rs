//! Votes: answer normalisation per task kind, the weighted tally with early stop, free-text
//! clustering, and voter selection.

use std::collections::BTreeMap;

use crate::message::{Choice, Task};

// ---- normalisation ----------------------------------------------------------------------------

/// Canonical form of a raw model answer, so equal answers compare equal; `None` = unusable.
///
/// - `mcq`: the option label, from (in order) the bare label (`B`, `B.`, `(B)`), a leading label
///   with punctuation (`B) dolphin`, `b. dolphin`), a cue (`The answer is B`, `Answer: (B)`,
///   `option B`), the answer being exactly one option's text, the answer containing exactly one
///   option's text (as whole words), or exactly one stand-alone capital label letter
///   (`I think B`; a capital `A` followed by a lower-case word is read as the article).
/// - `label`: the label as spelled in the task, matched case-insensitively on whole words: the
///   whole answer, its first word(s), or the only label mentioned anywhere.
/// - `short`: SQuAD normalisation ([`squad_normalize`]).
/// - `free`: the trimmed text.
pub fn normalize(task: &Task, raw: &str) -> Option<String> {
    match task {
        Task::Mcq { choices } => normalize_mcq(choices, raw),
        Task::Label { labels } => normalize_label(labels, raw),
        Task::Short => Some(squad_normalize(raw)).filter(|s| !s.is_empty()),
        Task::Free => Some(raw.trim().to_owned()).filter(|s| !s.is_empty()),
    }
}

fn is_punct(c: char) -> bool {
    c.is_ascii_punctuation() || matches!(c, '‘' | '’' | '“' | '”' | '–' | '—' | '…' | '«' | '»' | '¿' | '¡')
}

/// SQuAD answer normalisation: lower case, punctuation removed, articles (a, an, the) removed,
/// whitespace collapsed.
pub fn squad_normalize(s: &str) -> String {
    let lower: String = s.to_lowercase().chars().filter(|c| !is_punct(*c)).collect();
    lower
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Lower-case alphanumeric words.
fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

fn contains_seq(hay: &[String], needle: &[String]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Index of the single needle found in `hay`, ignoring needles that are part of a longer hit
/// (so "wild cat" beats "cat"); `None` when zero or several remain.
fn unique_hit(hay: &[String], needles: &[Vec<String>]) -> Option<usize> {
    let hits: Vec<usize> = (0..needles.len())
        .filter(|&i| contains_seq(hay, &needles[i]))
        .collect();
    let maximal: Vec<usize> = hits
        .iter()
        .copied()
        .filter(|&i| {
            !hits
                .iter()
                .any(|&j| j != i && needles[j] != needles[i] && contains_seq(&needles[j], &needles[i]))
        })
        .collect();
    match maximal.as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

fn label_of<'a>(labels: &[&'a str], token: &str, case_sensitive: bool) -> Option<&'a str> {
    labels.iter().copied().find(|l| {
        if case_sensitive {
            *l == token
        } else {
            l.eq_ignore_ascii_case(token)
        }
    })
}

const LABEL_DELIMS: &[char] = &[')', ']', '.', ':', ',', '-'];

/// `B) …`, `(b) …`, `B. …`, `B: …` at the very start.
fn leading_label<'a>(text: &str, labels: &[&'a str]) -> Option<&'a str> {
    let bracketed = text.starts_with(['(', '[']);
    let rest = text.trim_start_matches(['(', '[']);
    let end = rest.find(|c: char| !c.is_alphanumeric()).unwrap_or(rest.len());
    let (token, after) = rest.split_at(end);
    let delimited = after.starts_with(LABEL_DELIMS) || (bracketed && after.is_empty());
    if token.is_empty() || !delimited {
        return None;
    }
    label_of(labels, token, false)
}

/// A label right after a cue such as "answer is", "answer:", "option", "choice".
fn after_cue<'a>(text: &str, labels: &[&'a str]) -> Option<&'a str> {
    const CUES: &[&str] = &["answer is", "answer:", "answer would be", "option", "choice"];
    let lower = text.to_lowercase();
    // Lower-casing can change byte offsets for some scripts; only use it when it does not.
    if lower.len() != text.len() {
        return None;
    }
    let mut best: Option<(usize, &'a str)> = None;
    for cue in CUES {
        for (pos, _) in lower.match_indices(cue) {
            let rest = &text[pos + cue.len()..];
            let rest = rest.trim_start_matches(|c: char| {
                c.is_whitespace() || matches!(c, ':' | '(' | '[' | '*' | '"' | '\'')
            });
            let end = rest.find(|c: char| !c.is_alphanumeric()).unwrap_or(rest.len());
            let (token, after) = rest.split_at(end);
            if token.is_empty() {
                continue;
            }
            // "answer is B" is clear; "answer is a dolphin" must not read as option A.
            let hit = label_of(labels, token, true).or_else(|| {
                let delimited = after.is_empty() || after.starts_with(LABEL_DELIMS);
                delimited.then(|| label_of(labels, token, false)).flatten()
            });
            if let Some(l) = hit {
                if best.is_none_or(|(p, _)| pos < p) {
                    best = Some((pos, l));
                }
            }
        }
    }
    best.map(|(_, l)| l)
}

/// Exactly one distinct stand-alone label token, matched case-sensitively.
fn lone_label_token<'a>(text: &str, labels: &[&'a str]) -> Option<&'a str> {
    let tokens: Vec<&str> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .collect();
    let mut found: Option<&'a str> = None;
    for (i, t) in tokens.iter().enumerate() {
        let Some(l) = label_of(labels, t, true) else {
            continue;
        };
        let article = *t == "A"
            && tokens
                .get(i + 1)
                .and_then(|n| n.chars().next())
                .is_some_and(char::is_lowercase);
        if article {
            continue;
        }
        match found {
            None => found = Some(l),
            Some(f) if f == l => {}
            Some(_) => return None,
        }
    }
    found
}

fn normalize_mcq(choices: &[Choice], raw: &str) -> Option<String> {
    let text = raw.trim();
    if text.is_empty() || choices.is_empty() {
        return None;
    }
    let labels: Vec<&str> = choices.iter().map(|c| c.label.as_str()).collect();
    let core = text.trim_matches(|c: char| !c.is_alphanumeric());
    if let Some(l) = label_of(&labels, core, false) {
        return Some(l.to_owned());
    }
    if let Some(l) = leading_label(text, &labels).or_else(|| after_cue(text, &labels)) {
        return Some(l.to_owned());
    }
    let answer = words(text);
    let options: Vec<Vec<String>> = choices.iter().map(|c| words(&c.text)).collect();
    let equal: Vec<usize> = (0..options.len())
        .filter(|&i| !options[i].is_empty() && options[i] == answer)
        .collect();
    if let [one] = equal.as_slice() {
        return Some(choices[*one].label.clone());
    }
    if let Some(i) = unique_hit(&answer, &options) {
        return Some(choices[i].label.clone());
    }
    lone_label_token(text, &labels).map(str::to_owned)
}

fn normalize_label(labels: &[String], raw: &str) -> Option<String> {
    let answer = words(raw);
    if answer.is_empty() {
        return None;
    }
    let ls: Vec<Vec<String>> = labels.iter().map(|l| words(l)).collect();
    if let Some(i) = (0..ls.len()).find(|&i| !ls[i].is_empty() && ls[i] == answer) {
        return Some(labels[i].clone());
    }
    // Longest label that starts the answer ("positive." / "Positive, because ...").
    let leading = (0..ls.len())
        .filter(|&i| !ls[i].is_empty() && answer.starts_with(&ls[i]))
        .max_by_key(|&i| ls[i].len());
    if let Some(i) = leading {
        return Some(labels[i].clone());
    }
    unique_hit(&answer, &ls).map(|i| labels[i].clone())
}

// ---- tally ------------------------------------------------------------------------------------

/// Smallest weight a valid vote carries. A 0-confidence answer still counts a little, so that a
/// swarm of unconfident but unanimous voters produces a winner and a meaningful agreement.
pub const MIN_VOTE_WEIGHT: f32 = 0.05;

/// Weight of a vote from a calibrated confidence: clamped to `[MIN_VOTE_WEIGHT, 1]`, NaN → floor.
pub fn vote_weight(confidence: f32) -> f32 {
    if confidence.is_nan() {
        return MIN_VOTE_WEIGHT;
    }
    confidence.clamp(0.0, 1.0).max(MIN_VOTE_WEIGHT)
}

/// What one voter contributed.
#[derive(Debug, Clone, PartialEq)]
pub enum Ballot {
    Vote { answer: String, weight: f32 },
    Failed { reason: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct VoteOutcome {
    pub winner: Option<String>,
    /// Weighted share of the winner among valid votes, 0..=1 (0 without votes).
    pub agreement: f32,
    pub votes: usize,
    pub failures: usize,
    pub quorum_met: bool,
}

/// Weights are compared at this resolution so that 0.5 + 0.3 ties with 0.8.
fn weight_key(w: f64) -> i64 {
    (w * 1e6).round() as i64
}

/// Tally of one vote. The coordinator's own answer is added like any other voter's.
#[derive(Debug, Clone)]
pub struct VoteTally {
    task: Task,
    quorum: usize,
    expected: usize,
    ballots: BTreeMap<String, Ballot>,
    /// answer → (total weight, number of votes)
    totals: BTreeMap<String, (f64, usize)>,
    votes: usize,
    failures: usize,
}

impl VoteTally {
    /// `quorum`: valid votes needed for the outcome to count; `expected_voters`: how many
    /// ballots (including the coordinator's own) may still arrive.
    pub fn new(task: Task, quorum: usize, expected_voters: usize) -> Self {
        VoteTally {
            task,
            quorum,
            expected: expected_voters,
            ballots: BTreeMap::new(),
            totals: BTreeMap::new(),
            votes: 0,
            failures: 0,
        }
    }

    pub fn task(&self) -> &Task {
        &self.task
    }

    /// Counts a normalised answer; `false` if this voter already has a ballot.
    pub fn add(&mut self, voter_id: &str, normalized: &str, confidence: f32) -> bool {
        if self.ballots.contains_key(voter_id) {
            return false;
        }
        let weight = vote_weight(confidence);
        let t = self.totals.entry(normalized.to_owned()).or_insert((0.0, 0));
        t.0 += f64::from(weight);
        t.1 += 1;
        self.votes += 1;
        self.ballots.insert(
            voter_id.to_owned(),
            Ballot::Vote {
                answer: normalized.to_owned(),
                weight,
            },
        );
        true
    }

    /// Records a voter that failed, timed out or answered garbage; `false` if it already has a ballot.
    pub fn fail(&mut self, voter_id: &str, reason: &str) -> bool {
        if self.ballots.contains_key(voter_id) {
            return false;
        }
        self.failures += 1;
        self.ballots.insert(
            voter_id.to_owned(),
            Ballot::Failed {
                reason: reason.to_owned(),
            },
        );
        true
    }

    /// Ballots by voter id.
    pub fn ballots(&self) -> impl Iterator<Item = (&str, &Ballot)> {
        self.ballots.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Ballots that may still arrive.
    pub fn outstanding(&self) -> usize {
        self.expected.saturating_sub(self.ballots.len())
    }

    pub fn is_complete(&self) -> bool {
        self.outstanding() == 0
    }

    /// Answers ranked: weight desc, then votes desc, then answer asc.
    fn ranked(&self) -> Vec<(&str, f64, usize)> {
        let mut v: Vec<(&str, f64, usize)> = self
            .totals
            .iter()
            .map(|(a, (w, n))| (a.as_str(), *w, *n))
            .collect();
        v.sort_by(|a, b| {
            weight_key(b.1)
                .cmp(&weight_key(a.1))
                .then(b.2.cmp(&a.2))
                .then(a.0.cmp(b.0))
        });
        v
    }

    /// True once the outstanding ballots (at most weight 1 each) cannot change the winner and
    /// the quorum is met.
    pub fn can_stop_early(&self) -> bool {
        if self.votes < self.quorum {
            return false;
        }
        let ranked = self.ranked();
        let Some(leader) = ranked.first() else {
            return false;
        };
        let runner_up = ranked.get(1).map_or(0.0, |r| r.1);
        weight_key(leader.1) > weight_key(runner_up + self.outstanding() as f64)
    }

    pub fn outcome(&self) -> VoteOutcome {
        let ranked = self.ranked();
        let total: f64 = ranked.iter().map(|r| r.1).sum();
        let (winner, agreement) = match ranked.first() {
            Some(&(a, w, _)) if total > 0.0 => (Some(a.to_owned()), (w / total) as f32),
            _ => (None, 0.0),
        };
        VoteOutcome {
            winner,
            agreement,
            votes: self.votes,
            failures: self.failures,
            quorum_met: self.votes >= self.quorum,
        }
    }
}

// ---- free text --------------------------------------------------------------------------------

/// A group of free-text answers that say the same thing.
#[derive(Debug, Clone, PartialEq)]
pub struct FreeCluster {
    /// Index (into the input) of the heaviest member; its text stands for the cluster.
    pub representative: usize,
    pub members: Vec<usize>,
    /// Sum of the members' vote weights.
    pub weight: f32,
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() || a.is_empty() {
        return 0.0;
    }
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        dot += f64::from(*x) * f64::from(*y);
        na += f64::from(*x) * f64::from(*x);
        nb += f64::from(*y) * f64::from(*y);
    }
    if na <= 0.0 || nb <= 0.0 || !dot.is_finite() {
        return 0.0;
    }
    (dot / (na.sqrt() * nb.sqrt())) as f32
}

/// Groups answers `(text, embedding, confidence)` whose embeddings have cosine ≥ `threshold`.
///
/// Greedy and deterministic: answers are visited heaviest first (ties by input order); each
/// joins the existing cluster whose representative it is most similar to (if ≥ threshold),
/// else starts one. Confidences become weights as in [`vote_weight`]. Clusters come out heaviest
/// first, ties by representative index.
pub fn cluster_free(answers: &[(String, Vec<f32>, f32)], threshold: f32) -> Vec<FreeCluster> {
    let mut order: Vec<usize> = (0..answers.len()).collect();
    let weight = |i: usize| vote_weight(answers[i].2);
    order.sort_by(|&a, &b| weight(b).total_cmp(&weight(a)).then(a.cmp(&b)));
    let mut clusters: Vec<FreeCluster> = Vec::new();
    for i in order {
        let best = clusters
            .iter()
            .enumerate()
            .map(|(ci, c)| (ci, cosine(&answers[i].1, &answers[c.representative].1)))
            .filter(|(_, s)| *s >= threshold)
            .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
        match best {
            Some((ci, _)) => {
                clusters[ci].members.push(i);
                clusters[ci].weight += weight(i);
            }
            None => clusters.push(FreeCluster {
                representative: i,
                members: vec![i],
                weight: weight(i),
            }),
        }
    }
    clusters.sort_by(|a, b| {
        weight_key(f64::from(b.weight))
            .cmp(&weight_key(f64::from(a.weight)))
            .then(a.representative.cmp(&b.representative))
    });
    clusters
}

/// A free-text vote decided by meaning.
#[derive(Debug, Clone, PartialEq)]
pub struct FreeVote {
    /// Index (into the input) of the winning cluster's representative.
    pub winner: usize,
    /// The winning cluster's weighted share of all answers.
    pub agreement: f32,
    pub clusters: Vec<FreeCluster>,
}

/// Cluster answers with [`cluster_free`]; the heaviest cluster wins and its share
/// of the weight is the agreement. `None` without answers (or without weight).
pub fn free_vote(answers: &[(String, Vec<f32>, f32)], threshold: f32) -> Option<FreeVote> {
    let clusters = cluster_free(answers, threshold);
    let total: f32 = clusters.iter().map(|c| c.weight).sum();
    let first = clusters.first()?;
    if total <= 0.0 {
        return None;
    }
    Some(FreeVote {
        winner: first.representative,
        agreement: (first.weight / total).min(1.0),
        clusters,
    })
}

/// The outcome of a free-text vote: the heaviest cluster's representative text wins.
pub fn free_outcome(answers: &[(String, Vec<f32>, f32)], threshold: f32, quorum: usize) -> VoteOutcome {
    let (winner, agreement) = match free_vote(answers, threshold) {
        Some(v) => (Some(answers[v.winner].0.clone()), v.agreement),
        None => (None, 0.0),
    };
    VoteOutcome {
        winner,
        agreement,
        votes: answers.len(),
        failures: 0,
        quorum_met: answers.len() >= quorum,
    }
}

// ---- voter selection --------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
pub struct VoterCandidate {
    pub peer: String,
    pub model: String,
    /// Lower is better (e.g. queue / max_concurrency); NaN counts as the worst.
    pub load: f32,
}

/// Picks up to `k` voters, one per peer: models unlike the coordinator's and unlike those already
/// picked first, then the lowest load, ties by peer id (then model id).
///
/// Every coordinator with the same view picks the same peers; in a large swarm that herds all
/// votes onto the few lowest-id idle peers (the simulator showed most votes failing `Overloaded`
/// at 1,000 nodes). Nodes should use [`select_voters_spread`].
pub fn select_voters(candidates: &[VoterCandidate], own_model: &str, k: usize) -> Vec<VoterCandidate> {
    select_by(candidates, own_model, k, |c| {
        (if c.load.is_nan() { f32::INFINITY } else { c.load }, 0)
    })
}

/// Load step within which voters count as equally loaded in [`select_voters_spread`].
pub const LOAD_BUCKET: f32 = 0.25;

/// Like [`select_voters`], but loads are compared in steps of [`LOAD_BUCKET`] (advertised load
/// is seconds old anyway) and ties are broken by a hash of `salt` and the peer id, so
/// coordinators using different salts (e.g. the query id) spread votes over equally idle peers.
/// Deterministic for a given salt.
pub fn select_voters_spread(
    candidates: &[VoterCandidate],
    own_model: &str,
    k: usize,
    salt: u64,
) -> Vec<VoterCandidate> {
    select_by(candidates, own_model, k, |c| {
        let bucket = if c.load.is_nan() {
            f32::INFINITY
        } else {
            (c.load / LOAD_BUCKET).floor()
        };
        (bucket, spread_hash(salt, &c.peer))
    })
}

/// FNV-1a of the peer id, mixed with the salt through the SplitMix64 finaliser (FNV alone
/// spreads consecutive salts poorly). Stable across platforms and releases.
fn spread_hash(salt: u64, peer: &str) -> u64 {
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    let fnv = peer.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    mix(fnv ^ mix(salt.wrapping_add(0x9E37_79B9_7F4A_7C15)))
}

/// Greedy pick by (uses of the model so far, key(candidate), peer id, model id).
fn select_by(
    candidates: &[VoterCandidate],
    own_model: &str,
    k: usize,
    key: impl Fn(&VoterCandidate) -> (f32, u64),
) -> Vec<VoterCandidate> {
    let mut uses: BTreeMap<&str, usize> = BTreeMap::new();
    uses.insert(own_model, 1);
    let mut picked: Vec<VoterCandidate> = Vec::new();
    let mut left: Vec<&VoterCandidate> = candidates.iter().collect();
    while picked.len() < k {
        let best = left.iter().enumerate().min_by(|(_, a), (_, b)| {
            let ua = uses.get(a.model.as_str()).copied().unwrap_or(0);
            let ub = uses.get(b.model.as_str()).copied().unwrap_or(0);
            let (ka, kb) = (key(a), key(b));
            ua.cmp(&ub)
                .then(ka.0.total_cmp(&kb.0))
                .then(ka.1.cmp(&kb.1))
                .then(a.peer.cmp(&b.peer))
                .then(a.model.cmp(&b.model))
        });
        let Some((i, _)) = best else { break };
        let c = left.swap_remove(i);
        *uses.entry(c.model.as_str()).or_insert(0) += 1;
        left.retain(|o| o.peer != c.peer);
        picked.push(c.clone());
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mcq() -> Task {
        Task::Mcq {
            choices: ["shark", "dolphin", "trout", "moray eel"]
                .iter()
                .zip(["A", "B", "C", "D"])
                .map(|(t, l)| Choice {
                    label: l.into(),
                    text: (*t).into(),
                })
                .collect(),
        }
    }

    #[test]
    fn mcq_normalisation_cases() {
        let t = mcq();
        let n = |s: &str| normalize(&t, s);
        for s in [
            "B",
            "B.",
            "(B)",
            "b",
            " [B] ",
            "B) dolphin",
            "B. dolphin",
            "b) dolphin",
            "B: dolphin",
            "The answer is B",
            "The answer is B.",
            "The correct answer is (B) dolphin",
            "Answer: B",
            "answer: (b)",
            "I choose option B because dolphins breathe air.",
            "dolphin",
            "Dolphin.",
            "A dolphin is a mammal.",
            "The dolphin, obviously",
            "I think B is right",
        ] {
            assert_eq!(n(s).as_deref(), Some("B"), "{s:?}");
        }
        assert_eq!(n("A. shark").as_deref(), Some("A"));
        assert_eq!(n("It is a moray eel.").as_deref(), Some("D"));
        assert_eq!(n("eel"), None, "part of an option's text is not the option");
        assert_eq!(n("The answer is a dolphin").as_deref(), Some("B"));
        for s in ["", "   ", "shark or dolphin", "E", "I do not know", "B or C"] {
            assert_eq!(n(s), None, "{s:?}");
        }
    }

    #[test]
    fn longer_option_text_beats_its_substring() {
        let t = Task::Mcq {
            choices: vec![
                Choice {
                    label: "A".into(),
                    text: "cat".into(),
                },
                Choice {
                    label: "B".into(),
                    text: "wild cat".into(),
                },
            ],
        };
        assert_eq!(normalize(&t, "a wild cat").as_deref(), Some("B"));
        assert_eq!(normalize(&t, "the cat").as_deref(), Some("A"));
    }

    #[test]
    fn label_normalisation_cases() {
        let t = Task::Label {
            labels: vec!["positive".into(), "negative".into(), "very negative".into()],
        };
        let n = |s: &str| normalize(&t, s);
        assert_eq!(n("Positive").as_deref(), Some("positive"));
        assert_eq!(n("positive.").as_deref(), Some("positive"));
        assert_eq!(n("NEGATIVE, because the plot drags").as_deref(), Some("negative"));
        assert_eq!(n("Very negative!").as_deref(), Some("very negative"));
        assert_eq!(n("The sentiment is positive.").as_deref(), Some("positive"));
        assert_eq!(n("Sentiment: very negative").as_deref(), Some("very negative"));
        assert_eq!(n("Either positive or negative"), None);
        assert_eq!(n("neutral"), None);
        assert_eq!(n(""), None);
    }

    #[test]
    fn short_and_free_normalisation() {
        assert_eq!(
            normalize(&Task::Short, "  The Eiffel   Tower! ").as_deref(),
            Some("eiffel tower")
        );
        assert_eq!(
            normalize(&Task::Short, "An apple, a day").as_deref(),
            Some("apple day")
        );
        assert_eq!(normalize(&Task::Short, "The."), None);
        assert_eq!(
            normalize(&Task::Free, "  Keep it.\n").as_deref(),
            Some("Keep it.")
        );
        assert_eq!(normalize(&Task::Free, " \n "), None);
        assert_eq!(squad_normalize("“Quoted” — dash"), "quoted dash");
    }

    #[test]
    fn weights_are_clamped_with_a_floor() {
        assert_eq!(vote_weight(0.0), MIN_VOTE_WEIGHT);
        assert_eq!(vote_weight(-3.0), MIN_VOTE_WEIGHT);
        assert_eq!(vote_weight(f32::NAN), MIN_VOTE_WEIGHT);
        assert_eq!(vote_weight(7.0), 1.0);
        assert_eq!(vote_weight(0.6), 0.6);
    }

    #[test]
    fn weighted_majority_beats_head_count() {
        let mut t = VoteTally::new(Task::Short, 1, 3);
        assert!(t.add("a", "paris", 0.9));
        assert!(t.add("b", "lyon", 0.3));
        assert!(t.add("c", "lyon", 0.3));
        let o = t.outcome();
        assert_eq!(o.winner.as_deref(), Some("paris"));
        assert!((o.agreement - 0.6).abs() < 1e-6);
        assert_eq!((o.votes, o.failures, o.quorum_met), (3, 0, true));
    }

    #[test]
    fn ties_break_by_weight_then_count_then_lexicographic() {
        // Equal weight (0.5 + 0.3 vs 0.8): more votes wins.
        let mut t = VoteTally::new(Task::Short, 1, 3);
        t.add("a", "zeta", 0.8);
        t.add("b", "alpha", 0.5);
        t.add("c", "alpha", 0.3);
        assert_eq!(t.outcome().winner.as_deref(), Some("alpha"));
        // Equal weight and count: lexicographic.
        let mut t = VoteTally::new(Task::Short, 1, 2);
        t.add("a", "zeta", 0.7);
        t.add("b", "beta", 0.7);
        let o = t.outcome();
        assert_eq!(o.winner.as_deref(), Some("beta"));
        assert!((o.agreement - 0.5).abs() < 1e-6);
    }

    #[test]
    fn a_voter_counts_once() {
        let mut t = VoteTally::new(Task::Short, 1, 3);
        assert!(t.add("a", "x", 1.0));
        assert!(!t.add("a", "y", 1.0));
        assert!(!t.fail("a", "late error"));
        assert!(t.fail("b", "timeout"));
        assert!(!t.add("b", "x", 1.0));
        let o = t.outcome();
        assert_eq!((o.votes, o.failures), (1, 1));
        assert_eq!(t.outstanding(), 1);
        assert_eq!(t.ballots().count(), 2);
    }

    #[test]
    fn early_stop_only_when_the_leader_cannot_be_overtaken() {
        let mut t = VoteTally::new(Task::Short, 2, 5);
        t.add("self", "x", 0.9);
        assert!(!t.can_stop_early(), "quorum not met");
        t.add("a", "x", 0.9);
        // leader 1.8, runner-up 0, 3 outstanding → 1.8 < 3
        assert!(!t.can_stop_early());
        t.add("b", "x", 0.8);
        // 2.6 > 0 + 2
        assert!(t.can_stop_early());

        let mut t = VoteTally::new(Task::Short, 1, 4);
        t.add("self", "x", 1.0);
        t.add("a", "x", 1.0);
        t.add("b", "y", 0.0);
        // 2.0 vs 0.05 + 1 outstanding → stop
        assert!(t.can_stop_early());
        let mut t = VoteTally::new(Task::Short, 1, 4);
        t.add("self", "x", 1.0);
        t.add("a", "x", 0.5);
        t.add("b", "y", 0.5);
        // 1.5 vs 0.5 + 1 → equal: could still tie, keep waiting
        assert!(!t.can_stop_early());
        t.fail("c", "timeout");
        assert!(t.can_stop_early());
        assert!(t.is_complete());
    }

    #[test]
    fn quorum_loss_is_reported() {
        let mut t = VoteTally::new(Task::Short, 3, 4);
        t.add("self", "x", 0.9);
        t.fail("a", "timeout");
        t.fail("b", "overloaded");
        t.fail("c", "garbage");
        let o = t.outcome();
        assert!(!o.quorum_met);
        assert_eq!(o.winner.as_deref(), Some("x"));
        assert_eq!((o.votes, o.failures), (1, 3));
        assert!(!t.can_stop_early());
        let empty = VoteTally::new(Task::Short, 1, 2).outcome();
        assert_eq!(empty.winner, None);
        assert_eq!(empty.agreement, 0.0);
    }

    #[test]
    fn free_answers_cluster_by_cosine() {
        let answers = vec![
            ("Paris is the capital.".to_string(), vec![1.0, 0.1, 0.0], 0.6),
            ("It's Lyon.".to_string(), vec![0.0, 1.0, 0.0], 0.9),
            ("The capital is Paris.".to_string(), vec![0.9, 0.2, 0.0], 0.8),
            ("Paris".to_string(), vec![1.0, 0.0, 0.05], 0.5),
            ("?".to_string(), vec![0.0, 0.0, 0.0], 1.0),
        ];
        let c = cluster_free(&answers, 0.9);
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].representative, 2, "heaviest member of the Paris cluster");
        let mut m = c[0].members.clone();
        m.sort();
        assert_eq!(m, vec![0, 2, 3]);
        assert!((c[0].weight - 1.9).abs() < 1e-5);
        // Zero embedding and Lyon each stand alone; tie at 1.0 vs 0.9 ordered by weight.
        assert_eq!(c[1].representative, 4);
        assert_eq!(c[2].representative, 1);
        let o = free_outcome(&answers, 0.9, 3);
        assert_eq!(o.winner.as_deref(), Some("The capital is Paris."));
        assert!((o.agreement - 1.9 / 3.8).abs() < 1e-5);
        // Same input → same clusters (determinism).
        assert_eq!(cluster_free(&answers, 0.9), c);
    }

    fn vc(peer: &str, model: &str, load: f32) -> VoterCandidate {
        VoterCandidate {
            peer: peer.into(),
            model: model.into(),
            load,
        }
    }

    #[test]
    fn voter_selection_prefers_diverse_models_then_low_load() {
        let c = vec![
            vc("p1", "smol", 0.0),
            vc("p2", "gemma", 0.5),
            vc("p3", "gemma", 0.1),
            vc("p4", "qwen", 0.9),
            vc("p5", "smol", 0.2),
            vc("p6", "qwen", f32::NAN),
        ];
        let s = select_voters(&c, "smol", 3);
        let picked: Vec<&str> = s.iter().map(|v| v.peer.as_str()).collect();
        let models: Vec<&str> = s.iter().map(|v| v.model.as_str()).collect();
        assert_eq!(picked, ["p3", "p4", "p1"]);
        assert_eq!(models, ["gemma", "qwen", "smol"]);
        // k larger than candidates: everyone once.
        assert_eq!(select_voters(&c, "smol", 10).len(), 6);
        assert!(select_voters(&[], "smol", 3).is_empty());
    }

    #[test]
    fn spread_selection_keeps_preferences_but_varies_ties_with_the_salt() {
        // 20 idle peers with one model, 20 busy peers with another.
        let mut c: Vec<VoterCandidate> = (0..20).map(|i| vc(&format!("idle{i:02}"), "m1", 0.1)).collect();
        c.extend((0..20).map(|i| vc(&format!("busy{i:02}"), "m2", 3.0)));
        let mut firsts = BTreeMap::new();
        for salt in 0..200u64 {
            let s = select_voters_spread(&c, "own", 2, salt);
            assert_eq!(s.len(), 2);
            // Model diversity still wins over load: one of each model.
            assert_eq!(s[0].model, "m1", "lowest load bucket first");
            assert_eq!(s[1].model, "m2");
            *firsts.entry(s[0].peer.clone()).or_insert(0) += 1;
            assert_eq!(s, select_voters_spread(&c, "own", 2, salt), "deterministic");
        }
        // Ties spread over the idle peers instead of always the lowest id.
        assert!(firsts.len() >= 15, "{firsts:?}");
        assert!(firsts.values().all(|n| *n < 40), "{firsts:?}");
        // Plain selection herds onto the lowest id.
        assert_eq!(select_voters(&c, "own", 1)[0].peer, "idle00");
        // Loads in different buckets are still ordered.
        let c = vec![vc("a", "m", 0.6), vc("b", "m", 0.1)];
        for salt in 0..20 {
            assert_eq!(select_voters_spread(&c, "own", 1, salt)[0].peer, "b");
        }
    }

    #[test]
    fn voter_selection_is_one_per_peer_and_ties_by_peer_id() {
        let c = vec![vc("b", "m1", 0.0), vc("a", "m1", 0.0), vc("a", "m2", 0.0)];
        let s = select_voters(&c, "own", 2);
        let peers: Vec<&str> = s.iter().map(|v| v.peer.as_str()).collect();
        assert_eq!(peers, ["a", "b"]);
        assert_eq!(s[0].model, "m1");
    }
}
