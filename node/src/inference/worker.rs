//! A worker thread owns each loaded model (forward passes need `&mut` state);
//! async callers reach it through a cloneable [`ModelHandle`] and a bounded
//! queue. A full queue answers `Overloaded` at once instead of growing.
//!
//! The worker is supervised: a job that panics fails that request only
//! (`InferenceError::Panicked`), the model's per-request state is reset and
//! the thread goes on with the next job. A model that panics `max_panics`
//! times within `panic_window` reports itself unhealthy
//! ([`ModelHandle::healthy`]) and the node stops advertising it until the
//! window has passed without that many. Each job's share of the load counter
//! is a guard, so it is given back however the job ends (answered, panicked,
//! cancelled, or dropped unrun with the queue).

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::{
    Backend, ChoiceRequest, ChoiceResult, GenerateRequest, Generation, InferenceError, ModelInfo, TextScore,
};

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Requests that may wait behind the running one.
    pub queue: usize,
    /// Panics within `panic_window` after which the model is withdrawn.
    pub max_panics: usize,
    /// How far back panics count; a withdrawn model comes back once fewer
    /// than `max_panics` fall inside it (a request that makes it panic must
    /// not take it down for good, e.g. one sent by a hostile peer).
    pub panic_window: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            queue: 16,
            max_panics: 3,
            panic_window: Duration::from_secs(300),
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, InferenceError>>;

/// Text increments, and the final result once generation ends.
pub type GenerationStream = (
    mpsc::Receiver<String>,
    oneshot::Receiver<Result<Generation, InferenceError>>,
);

enum Job {
    Generate {
        req: GenerateRequest,
        deadline: Option<Instant>,
        stream: Option<mpsc::Sender<String>>,
        reply: Reply<Generation>,
    },
    Choose {
        req: ChoiceRequest,
        deadline: Option<Instant>,
        reply: Reply<ChoiceResult>,
    },
    Score {
        text: String,
        reply: Reply<TextScore>,
    },
}

/// One job's share of the load counter, taken at submission and given back
/// when dropped: after the job has run, or with the job itself if it never
/// runs (a full queue, a worker that is gone).
struct LoadGuard(Arc<AtomicUsize>);

impl LoadGuard {
    fn take(load: &Arc<AtomicUsize>) -> Self {
        load.fetch_add(1, Ordering::SeqCst);
        Self(load.clone())
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A job in the queue with the load it holds.
struct Queued {
    job: Job,
    load: LoadGuard,
}

/// Whether a model should still be offered: its worker thread runs and it
/// has not panicked too often lately.
struct Health {
    alive: AtomicBool,
    /// Times of the latest panics (at most `max`).
    panics: Mutex<VecDeque<Instant>>,
    max: usize,
    window: Duration,
}

impl Health {
    fn new(opts: &WorkerOptions) -> Self {
        Self {
            alive: AtomicBool::new(true),
            panics: Mutex::new(VecDeque::new()),
            max: opts.max_panics.max(1),
            window: opts.panic_window,
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, VecDeque<Instant>> {
        // Only this module locks it, and never across code that can panic;
        // recover anyway rather than fail the health check.
        self.panics.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Count a panic; true when it makes the model unhealthy.
    fn record_panic(&self) -> bool {
        let was = self.healthy();
        let mut q = self.recent();
        q.push_back(Instant::now());
        while q.len() > self.max {
            q.pop_front();
        }
        drop(q);
        was && !self.healthy()
    }

    fn healthy(&self) -> bool {
        if !self.alive.load(Ordering::SeqCst) {
            return false;
        }
        let now = Instant::now();
        let q = self.recent();
        q.iter().filter(|&&t| now.duration_since(t) < self.window).count() < self.max
    }
}

/// Marks the worker dead when its thread ends, however it ends.
struct AliveGuard(Arc<Health>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
    }
}

#[derive(Clone)]
pub struct ModelHandle {
    tx: SyncSender<Queued>,
    info: Arc<ModelInfo>,
    /// Jobs queued or running.
    load: Arc<AtomicUsize>,
    health: Arc<Health>,
}

impl ModelHandle {
    /// Move `backend` onto its own thread.
    pub fn spawn(backend: Box<dyn Backend>, opts: WorkerOptions) -> Self {
        let (tx, rx) = sync_channel::<Queued>(opts.queue.max(1));
        let info = Arc::new(backend.info().clone());
        let load = Arc::new(AtomicUsize::new(0));
        let health = Arc::new(Health::new(&opts));
        let alive = AliveGuard(health.clone());
        let name = format!("model-{}", info.id);
        let mut backend = backend;
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            let h = alive.0.clone();
            let _alive = alive;
            while let Ok(q) = rx.recv() {
                // `run_job` catches a panicking backend itself; this keeps the
                // thread alive should anything else in it panic (that job's
                // caller then sees `WorkerGone`, its load guard is dropped).
                if catch_unwind(AssertUnwindSafe(|| run_job(backend.as_mut(), q, &h))).is_err() {
                    h.record_panic();
                    tracing::error!(model = %backend.info().id, "model worker job panicked outside the model");
                }
            }
        });
        if let Err(e) = spawned {
            // The closure (and its AliveGuard) was dropped: the model is unhealthy.
            tracing::error!("cannot start model worker thread: {e}");
        }
        Self {
            tx,
            info,
            load,
            health,
        }
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Requests queued or running on this model.
    pub fn load(&self) -> usize {
        self.load.load(Ordering::SeqCst)
    }

    /// False while the model should not be offered to peers: its worker
    /// thread is gone, or it panicked `max_panics` times within
    /// `panic_window`. Requests are still taken (each panic fails only its
    /// own request).
    pub fn healthy(&self) -> bool {
        self.health.healthy()
    }

    fn submit(&self, job: Job) -> Result<(), InferenceError> {
        let q = Queued {
            job,
            load: LoadGuard::take(&self.load),
        };
        // A job that is not queued is dropped here, and its guard with it.
        self.tx.try_send(q).map_err(|e| match e {
            TrySendError::Full(_) => InferenceError::Overloaded,
            TrySendError::Disconnected(_) => InferenceError::WorkerGone,
        })
    }

    pub async fn generate(
        &self,
        req: GenerateRequest,
        deadline: Option<Instant>,
    ) -> Result<Generation, InferenceError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Generate {
            req,
            deadline,
            stream: None,
            reply,
        })?;
        rx.await.map_err(|_| InferenceError::WorkerGone)?
    }

    /// Generate with text increments sent as they are produced. Dropping the
    /// receiver cancels the generation.
    pub fn generate_stream(
        &self,
        req: GenerateRequest,
        deadline: Option<Instant>,
    ) -> Result<GenerationStream, InferenceError> {
        let (reply, rx) = oneshot::channel();
        let (stx, srx) = mpsc::channel(64);
        self.submit(Job::Generate {
            req,
            deadline,
            stream: Some(stx),
            reply,
        })?;
        Ok((srx, rx))
    }

    pub async fn choose(
        &self,
        req: ChoiceRequest,
        deadline: Option<Instant>,
    ) -> Result<ChoiceResult, InferenceError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Choose { req, deadline, reply })?;
        rx.await.map_err(|_| InferenceError::WorkerGone)?
    }

    pub async fn score(&self, text: String) -> Result<TextScore, InferenceError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Score { text, reply })?;
        rx.await.map_err(|_| InferenceError::WorkerGone)?
    }
}

fn expired(deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|d| Instant::now() >= d)
}

/// A panic's message, for the error and the log.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

/// Runs one call into the backend; a panic becomes this request's error.
fn guarded<T>(
    backend: &mut dyn Backend,
    health: &Health,
    f: impl FnOnce(&mut dyn Backend) -> Result<T, InferenceError>,
) -> Result<T, InferenceError> {
    // AssertUnwindSafe: what the call may leave half-updated is the
    // backend's per-request state, which `reset` discards below; its weights
    // are immutable.
    let payload = match catch_unwind(AssertUnwindSafe(|| f(&mut *backend))) {
        Ok(res) => return res,
        Err(p) => p,
    };
    let msg = panic_message(payload.as_ref());
    let withdrawn = health.record_panic();
    let id = backend.info().id.clone();
    if catch_unwind(AssertUnwindSafe(|| backend.reset())).is_err() {
        health.record_panic();
    }
    if withdrawn {
        tracing::error!(model = %id, "model panicked: {msg}; too many panics, no longer advertised");
    } else {
        tracing::error!(model = %id, "model panicked: {msg}; only this request fails");
    }
    Err(InferenceError::Panicked(msg))
}

/// Runs one job; its load is given back just before the reply, so a caller
/// that has its answer never sees its own job counted.
fn run_job(backend: &mut dyn Backend, q: Queued, health: &Health) {
    let Queued { job, load } = q;
    match job {
        Job::Generate {
            req,
            deadline,
            stream,
            reply,
        } => {
            if reply.is_closed() {
                return;
            }
            if expired(deadline) {
                drop(load);
                let _ = reply.send(Err(InferenceError::Timeout));
                return;
            }
            let mut on_text = |piece: &str| -> bool {
                if expired(deadline) {
                    return false;
                }
                match &stream {
                    Some(tx) => tx.blocking_send(piece.to_string()).is_ok(),
                    None => !reply.is_closed(),
                }
            };
            let res = guarded(backend, health, |b| b.generate(&req, &mut on_text));
            let res = match res {
                Err(InferenceError::Cancelled) if expired(deadline) => Err(InferenceError::Timeout),
                other => other,
            };
            drop(stream);
            drop(load);
            let _ = reply.send(res);
        }
        Job::Choose { req, deadline, reply } => {
            if reply.is_closed() {
                return;
            }
            let res = if expired(deadline) {
                Err(InferenceError::Timeout)
            } else {
                guarded(backend, health, |b| b.choose(&req))
            };
            drop(load);
            let _ = reply.send(res);
        }
        Job::Score { text, reply } => {
            let res = guarded(backend, health, |b| b.score_text(&text));
            drop(load);
            let _ = reply.send(res);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::testing::FakeBackend;
    use crate::inference::{ChatMessage, Prompt};

    /// Test-only marker: a prompt holding it makes [`PanicsOnMarker`] panic.
    const MARKER: &str = "PANIC-TEST-MARKER";

    /// Test double: the fake model, except that it panics on the marker.
    struct PanicsOnMarker(FakeBackend);

    impl Backend for PanicsOnMarker {
        fn info(&self) -> &ModelInfo {
            self.0.info()
        }
        fn generate(
            &mut self,
            req: &GenerateRequest,
            on_text: &mut dyn FnMut(&str) -> bool,
        ) -> Result<Generation, InferenceError> {
            if matches!(&req.prompt, Prompt::Raw(s) if s.contains(MARKER)) {
                panic!("test-only panic on the marker prompt");
            }
            self.0.generate(req, on_text)
        }
        fn choose(&mut self, req: &ChoiceRequest) -> Result<ChoiceResult, InferenceError> {
            self.0.choose(req)
        }
        fn score_text(&mut self, text: &str) -> Result<TextScore, InferenceError> {
            self.0.score_text(text)
        }
    }

    fn raw(s: &str) -> GenerateRequest {
        let mut r = GenerateRequest::chat(vec![ChatMessage::new("user", s)], 4);
        r.prompt = Prompt::Raw(s.into());
        r
    }

    #[tokio::test]
    async fn repeated_panics_withdraw_the_model_until_the_window_passes() {
        let be = FakeBackend::new("fake", 1, Duration::ZERO, 0.9);
        let h = ModelHandle::spawn(
            Box::new(PanicsOnMarker(be)),
            WorkerOptions {
                queue: 4,
                max_panics: 2,
                panic_window: Duration::from_millis(300),
            },
        );
        let bad = raw(MARKER);
        assert!(matches!(
            h.generate(bad.clone(), None).await,
            Err(InferenceError::Panicked(_))
        ));
        assert!(h.healthy(), "one panic is not enough to withdraw");
        assert!(matches!(
            h.generate(bad, None).await,
            Err(InferenceError::Panicked(_))
        ));
        assert!(!h.healthy(), "two panics within the window withdraw the model");
        // Still answers what it can, and holds no load.
        assert!(h.generate(raw("fine"), None).await.is_ok());
        assert_eq!(h.load(), 0);
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(h.healthy(), "back once the panics are older than the window");
    }

    #[test]
    fn load_is_given_back_for_jobs_that_never_run() {
        let load = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = sync_channel::<Queued>(1);
        let (reply, _rx) = oneshot::channel();
        let q = Queued {
            job: Job::Score {
                text: String::new(),
                reply,
            },
            load: LoadGuard::take(&load),
        };
        assert!(tx.try_send(q).is_ok());
        assert_eq!(load.load(Ordering::SeqCst), 1);
        // The worker is gone: the queued job is dropped unrun.
        drop(rx);
        assert_eq!(load.load(Ordering::SeqCst), 0);
    }
}
