//! slm-swarm node library: the model cache, the inference engine, the libp2p
//! network, the membership task (adverts, peer table, gateway election), the
//! router (local → vote → cloud) and the OpenAI-compatible HTTP API.
//! `node` wires them together; see `router` for the query path.

pub mod admission;
pub mod api;
pub mod clock;
pub mod cloud;
pub mod confidence;
pub mod config;
pub mod dataset;
pub mod eval;
pub mod events;
pub mod gate;
pub mod gateway;
pub mod inference;
pub mod metrics;
pub mod models;
pub mod network;
pub mod node;
pub mod router;
pub mod safety;
pub mod served;
pub mod swarm;
pub mod workflow;
