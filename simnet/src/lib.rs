//! Deterministic simulation of an slm-swarm: N nodes running the real `swarm-protocol` state
//! machines (peer table, gossip adverts, gateway election, votes, route policy) over a simulated
//! network with a virtual clock, one seeded RNG, and faults (latency, loss, partitions, crashes,
//! churn, clock skew). Same scenario + seed → byte-identical report. The real tier ([`real`])
//! runs real `swarm-node` nodes in one process instead, on the wall clock.

pub mod models;
pub mod queue;
pub mod real;
pub mod report;
pub mod scenario;
pub mod sim;

pub use report::Report;
pub use scenario::{Scenario, ScenarioError};
pub use sim::{ComponentView, Sim};

/// Runs a scenario to its end with `seed`.
pub fn run(scenario: Scenario, seed: u64) -> Result<Report, models::CacheError> {
    Ok(Sim::new(scenario, seed)?.run())
}
