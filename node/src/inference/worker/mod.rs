//! A worker thread owns each loaded model (forward passes need `&mut` state);
//! async callers reach it through a cloneable [`ModelHandle`] and bounded
//! queues. A full queue answers `Overloaded` at once instead of growing.
//!
//! Two lanes feed the worker: this node's own users (local) and peers
//! (remote: votes, forwarded queries). The worker always takes a local job
//! first; remote jobs may hold at most `remote_queue` waiting places and each
//! peer at most `per_peer` jobs queued or running, so peers cannot starve
//! the device's own users nor one peer crowd out the others.
//!
//! The worker is supervised: a job that panics fails that request only
//! (`InferenceError::Panicked`), the model's per-request state is reset and
//! the thread goes on with the next job. A model that panics `max_panics`
//! times within `panic_window` reports itself unhealthy
//! ([`ModelHandle::healthy`]) and the node stops advertising it until the
//! window has passed without that many. Each job's share of the load counter
//! is a guard, so it is given back however the job ends (answered, panicked,
//! cancelled, or dropped unrun with the queue).

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::{
    Backend, ChoiceRequest, ChoiceResult, GenerateRequest, Generation, InferenceError, ModelInfo, TextScore,
};

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Local requests that may wait behind the running one.
    pub queue: usize,
    /// Peers' requests that may wait, all peers together.
    pub remote_queue: usize,
    /// Requests of one peer queued or running at once.
    pub per_peer: usize,
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
            remote_queue: 8,
            per_peer: 2,
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
    /// For a peer's job: its place in that peer's quota.
    _peer: Option<PeerGuard>,
}

/// Whose request a handle submits: this node's users, or a peer's.
#[derive(Clone, Debug)]
enum Lane {
    Local,
    Remote(Arc<str>),
}

#[derive(Default)]
struct LaneState {
    local: VecDeque<Queued>,
    remote: VecDeque<Queued>,
    /// No job is taken any more: every handle is gone, or the worker is.
    closed: bool,
}

/// The worker's two queues and the per-peer quota.
struct Lanes {
    state: Mutex<LaneState>,
    ready: Condvar,
    local_cap: usize,
    remote_cap: usize,
    per_peer: usize,
    /// Jobs queued or running per peer. A separate lock: a `PeerGuard` is
    /// dropped wherever its job ends, possibly while `state` is held.
    peers: Mutex<HashMap<Arc<str>, usize>>,
}

impl Lanes {
    fn new(opts: &WorkerOptions) -> Self {
        Self {
            state: Mutex::new(LaneState::default()),
            ready: Condvar::new(),
            local_cap: opts.queue.max(1),
            remote_cap: opts.remote_queue,
            per_peer: opts.per_peer,
            peers: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LaneState> {
        // Nothing that can panic runs under this lock; recover regardless.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn peer_counts(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, usize>> {
        self.peers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queue a job, or give it back with the reason it was refused.
    fn push(self: &Arc<Self>, lane: &Lane, job: Job, load: LoadGuard) -> Result<(), InferenceError> {
        let mut st = self.lock();
        if st.closed {
            return Err(InferenceError::WorkerGone);
        }
        match lane {
            Lane::Local => {
                if st.local.len() >= self.local_cap {
                    return Err(InferenceError::Overloaded);
                }
                st.local.push_back(Queued {
                    job,
                    load,
                    _peer: None,
                });
            }
            Lane::Remote(peer) => {
                if st.remote.len() >= self.remote_cap {
                    return Err(InferenceError::Overloaded);
                }
                let guard = PeerGuard::take(self, peer).ok_or(InferenceError::Overloaded)?;
                st.remote.push_back(Queued {
                    job,
                    load,
                    _peer: Some(guard),
                });
            }
        }
        drop(st);
        self.ready.notify_one();
        Ok(())
    }

    /// The next job, local ones first; `None` once closed and drained.
    fn pop(&self) -> Option<Queued> {
        let mut st = self.lock();
        loop {
            if let Some(q) = st.local.pop_front() {
                return Some(q);
            }
            if let Some(q) = st.remote.pop_front() {
                return Some(q);
            }
            if st.closed {
                return None;
            }
            st = self.ready.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Take no more jobs; with `drain`, also drop the waiting ones (their
    /// callers then see `WorkerGone`).
    fn close(&self, drain: bool) {
        let dropped: Vec<Queued> = {
            let mut st = self.lock();
            st.closed = true;
            if drain {
                let mut v: Vec<Queued> = st.local.drain(..).collect();
                v.extend(st.remote.drain(..));
                v
            } else {
                Vec::new()
            }
        };
        self.ready.notify_all();
        drop(dropped);
    }

    /// Jobs waiting in both lanes.
    fn waiting(&self) -> usize {
        let st = self.lock();
        st.local.len() + st.remote.len()
    }
}

/// One job's place in its peer's quota, given back when dropped.
struct PeerGuard {
    lanes: Arc<Lanes>,
    peer: Arc<str>,
}

impl PeerGuard {
    fn take(lanes: &Arc<Lanes>, peer: &Arc<str>) -> Option<Self> {
        let mut counts = lanes.peer_counts();
        let n = counts.entry(peer.clone()).or_insert(0);
        if *n >= lanes.per_peer {
            return None;
        }
        *n += 1;
        Some(Self {
            lanes: lanes.clone(),
            peer: peer.clone(),
        })
    }
}

impl Drop for PeerGuard {
    fn drop(&mut self) {
        let mut counts = self.lanes.peer_counts();
        if let Some(n) = counts.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.peer);
            }
        }
    }
}

/// Closes the lanes when the last handle is dropped, so the worker ends.
struct Closer(Arc<Lanes>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.close(false);
    }
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

/// Marks the worker dead when its thread ends, however it ends, and fails
/// the jobs still waiting for it.
struct AliveGuard(Arc<Health>, Arc<Lanes>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
        self.1.close(true);
    }
}

#[derive(Clone)]
pub struct ModelHandle {
    lanes: Arc<Lanes>,
    _closer: Arc<Closer>,
    lane: Lane,
    info: Arc<ModelInfo>,
    /// Jobs queued or running.
    load: Arc<AtomicUsize>,
    health: Arc<Health>,
}

impl ModelHandle {
    /// Move `backend` onto its own thread.
    pub fn spawn(backend: Box<dyn Backend>, opts: WorkerOptions) -> Self {
        let lanes = Arc::new(Lanes::new(&opts));
        let info = Arc::new(backend.info().clone());
        let load = Arc::new(AtomicUsize::new(0));
        let health = Arc::new(Health::new(&opts));
        let alive = AliveGuard(health.clone(), lanes.clone());
        let rx = lanes.clone();
        let name = format!("model-{}", info.id);
        let mut backend = backend;
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            let h = alive.0.clone();
            let _alive = alive;
            while let Some(q) = rx.pop() {
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
            _closer: Arc::new(Closer(lanes.clone())),
            lanes,
            lane: Lane::Local,
            info,
            load,
            health,
        }
    }

    /// The same model, for requests of `peer`: they go to the remote lane
    /// and count against that peer's quota.
    pub fn for_peer(&self, peer: &str) -> Self {
        Self {
            lane: Lane::Remote(Arc::from(peer)),
            ..self.clone()
        }
    }

    /// Jobs waiting (not running), both lanes.
    pub fn waiting(&self) -> usize {
        self.lanes.waiting()
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
        // A job that is not queued is dropped here, and its guards with it.
        self.lanes.push(&self.lane, job, LoadGuard::take(&self.load))
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
    let Queued { job, load, _peer } = q;
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
mod tests;
