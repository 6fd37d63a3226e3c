//! Evaluation: benchmark questions, scoring answers against references.

pub mod calibrate;
pub mod dataset;
pub mod run;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum EvalError {
    #[error("I/O: {0}")]
    Io(String),
    #[error("{file}:{line}: {msg}")]
    BadQuestion { file: String, line: usize, msg: String },
    #[error("model: {0}")]
    Model(String),
}
