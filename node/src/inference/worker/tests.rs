//! The worker's tests: lanes, quotas, deadlines, panics and load accounting.

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
            ..WorkerOptions::default()
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
    let lanes = Arc::new(Lanes::new(&WorkerOptions::default()));
    let (reply, _rx) = oneshot::channel();
    let job = Job::Score {
        text: String::new(),
        reply,
    };
    let peer: Arc<str> = Arc::from("p");
    assert!(lanes
        .push(&Lane::Remote(peer.clone()), job, LoadGuard::take(&load))
        .is_ok());
    assert_eq!(load.load(Ordering::SeqCst), 1);
    assert_eq!(lanes.peer_counts().get(&peer), Some(&1));
    // The worker is gone: the queued job is dropped unrun.
    lanes.close(true);
    assert_eq!(load.load(Ordering::SeqCst), 0);
    assert!(
        lanes.peer_counts().is_empty(),
        "the peer's quota is given back too"
    );
}

fn slow(ms: u64, opts: WorkerOptions) -> ModelHandle {
    let be = FakeBackend::new("fake", 1, Duration::from_millis(ms), 0.9);
    ModelHandle::spawn(Box::new(be), opts)
}

#[tokio::test]
async fn a_peer_over_its_quota_is_refused_at_once_and_others_still_get_in() {
    let h = slow(
        150,
        WorkerOptions {
            queue: 4,
            remote_queue: 3,
            per_peer: 2,
            ..WorkerOptions::default()
        },
    );
    let rogue = h.for_peer("rogue");
    let a = tokio::spawn({
        let r = rogue.clone();
        async move { r.generate(raw("one"), None).await }
    });
    let b = tokio::spawn({
        let r = rogue.clone();
        async move { r.generate(raw("two"), None).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let t = Instant::now();
    assert!(matches!(
        rogue.generate(raw("three"), None).await,
        Err(InferenceError::Overloaded)
    ));
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "refused without waiting"
    );
    // Another peer and a local user are still served.
    assert!(h.for_peer("other").generate(raw("x"), None).await.is_ok());
    assert!(h.generate(raw("y"), None).await.is_ok());
    assert!(a.await.expect("join").is_ok());
    assert!(b.await.expect("join").is_ok());
    // Quota given back: the rogue peer may send again.
    assert!(rogue.generate(raw("four"), None).await.is_ok());
    assert_eq!(h.load(), 0);
}

#[tokio::test]
async fn local_jobs_run_before_waiting_remote_ones() {
    let h = slow(
        100,
        WorkerOptions {
            queue: 4,
            remote_queue: 4,
            per_peer: 4,
            ..WorkerOptions::default()
        },
    );
    let order = Arc::new(Mutex::new(Vec::new()));
    let run = |h: ModelHandle, tag: &'static str, order: Arc<Mutex<Vec<&'static str>>>| {
        tokio::spawn(async move {
            let r = h.generate(raw(tag), None).await;
            order.lock().expect("order").push(tag);
            r
        })
    };
    // The first job occupies the worker; two remote ones queue, then a local one.
    let first = run(h.clone(), "first", order.clone());
    tokio::time::sleep(Duration::from_millis(20)).await;
    let r1 = run(h.for_peer("p"), "remote1", order.clone());
    let r2 = run(h.for_peer("p"), "remote2", order.clone());
    tokio::time::sleep(Duration::from_millis(20)).await;
    let l = run(h.clone(), "local", order.clone());
    for j in [first, r1, r2, l] {
        assert!(j.await.expect("join").is_ok());
    }
    let order = order.lock().expect("order").clone();
    assert_eq!(order, vec!["first", "local", "remote1", "remote2"]);
}

#[tokio::test]
async fn full_remote_lane_leaves_the_local_lane_open() {
    let h = slow(
        100,
        WorkerOptions {
            queue: 2,
            remote_queue: 2,
            per_peer: 8,
            ..WorkerOptions::default()
        },
    );
    let mut held = Vec::new();
    for i in 0..3 {
        let r = h.for_peer("p");
        held.push(tokio::spawn(async move {
            r.generate(raw(&format!("r{i}")), None).await
        }));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // One running, two waiting: the remote lane is full.
    assert!(matches!(
        h.for_peer("q").generate(raw("over"), None).await,
        Err(InferenceError::Overloaded)
    ));
    assert!(h.generate(raw("local"), None).await.is_ok());
    for j in held {
        assert!(j.await.expect("join").is_ok());
    }
}
