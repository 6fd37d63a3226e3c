//! The token budget against the mock endpoint: the clamp, reservations settling to the
//! reported usage, bursts, and the budget file across restarts.

use super::*;

fn reservation(req: &CloudRequest, max_tokens_per_call: u32) -> u64 {
    super::http::estimate_prompt_tokens(&req.messages) + u64::from(req.max_tokens.min(max_tokens_per_call))
}

#[tokio::test]
async fn max_tokens_is_clamped_to_the_gateways_limit() {
    let mock = Mock::start(None).await;
    let mut cfg = config(&mock.base_url());
    cfg.max_tokens_per_call = 64;
    let (client, _) = client_with(cfg, None);
    for (asked, sent) in [
        (u32::MAX, 64),
        (100_000, 64),
        (65, 64),
        (64, 64),
        (10, 10),
        (1, 1),
    ] {
        let mut req = question("q");
        req.max_tokens = asked;
        client.chat(req).await.expect("answer");
        let body = mock.requests().last().expect("request").body.clone();
        assert_eq!(body["max_tokens"], sent, "asked {asked}");
    }
    let mut req = question("q");
    req.max_tokens = 1_000_000;
    let stream = client.chat_stream(req).await.expect("stream");
    collect(stream).await;
    let body = mock.requests().last().expect("request").body.clone();
    assert_eq!(
        (body["stream"].clone(), body["max_tokens"].clone()),
        (json!(true), json!(64))
    );
    assert_eq!(
        client.config().clamp_max_tokens(0),
        1,
        "0 becomes the smallest call"
    );
}

#[tokio::test]
async fn token_budget_exhausts_budget_left_and_refuses_without_network() {
    let mock = Mock::start(None).await;
    let mut cfg = config(&mock.base_url());
    cfg.max_tokens_per_call = 100;
    cfg.max_tokens_per_day = 350;
    let (client, clock) = client_with(cfg, None);
    let st = client.status();
    assert_eq!(
        (st.budget_left, st.tokens_left),
        (3, 350),
        "350 tokens pay for 3 full calls"
    );

    // Each answer costs 150 tokens: after two, 50 are left — less than one
    // full-size call, so peers are told 0 calls and fail over.
    mock.set(|m| m.usage = Some(json!({"total_tokens": 150})));
    client.chat(question("1")).await.expect("1");
    assert_eq!(client.status().budget_left, 2);
    client.chat(question("2")).await.expect("2");
    let st = client.status();
    assert_eq!((st.budget_left, st.tokens_left), (0, 50));
    let err = client
        .chat(question("3"))
        .await
        .expect_err("over the token budget");
    assert!(
        matches!(
            err,
            CloudError::BudgetExhausted {
                window: BudgetWindow::Day,
                unit: BudgetUnit::Tokens,
                limit: 350,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.reason(),
        "cloud_budget_exhausted",
        "same handling as the call budget"
    );
    assert!(matches!(
        client.chat_stream(question("3")).await,
        Err(CloudError::BudgetExhausted { .. })
    ));
    assert_eq!(mock.chat_requests(), 2, "refused calls never reach the network");
    assert_eq!(client.calls_made(), 2);

    clock.advance(Duration::from_secs(86_400));
    assert_eq!(client.status().tokens_left, 350, "a new UTC day");
}

#[tokio::test]
async fn reservations_settle_to_the_reported_usage() {
    let mock = Mock::start(None).await;
    let mut cfg = config(&mock.base_url());
    cfg.max_tokens_per_day = 100_000;
    let (client, _) = client_with(cfg, None);
    let left = || client.status().tokens_left;
    let mut req = question("How far is the moon?");
    req.max_tokens = 500;
    let reserved = reservation(&req, 1024);

    client.chat(req.clone()).await.expect("total_tokens");
    assert_eq!(left(), 100_000 - 14, "settled to usage.total_tokens");

    mock.set(|m| m.usage = Some(json!({"prompt_tokens": 5, "completion_tokens": 7})));
    client.chat(req.clone()).await.expect("prompt + completion");
    assert_eq!(left(), 100_000 - 14 - 12);

    mock.set(|m| m.usage = Some(Value::Null));
    client.chat(req.clone()).await.expect("no usage");
    assert_eq!(
        left(),
        100_000 - 26 - reserved,
        "unknown cost: the reservation stands"
    );

    mock.set(|m| m.usage = Some(json!({"total_tokens": 5_000})));
    client.chat(req.clone()).await.expect("more than reserved");
    assert_eq!(
        left(),
        100_000 - 26 - reserved - 5_000,
        "real cost, even above the reservation"
    );

    let before = left();
    mock.set(|m| m.fail = Some((400, r#"{"error":{"message":"context too long"}}"#.into())));
    client.chat(req.clone()).await.expect_err("400");
    assert_eq!(left(), before, "a refused request costs nothing");

    mock.set(|m| m.fail = None);
    let stream = client.chat_stream(req.clone()).await.expect("stream");
    collect(stream).await;
    assert_eq!(
        left(),
        before - 5_000,
        "a stream settles to the usage chunk it asked for"
    );
}

#[tokio::test]
async fn a_burst_cannot_overshoot_the_token_budget() {
    let mock = Mock::start(None).await;
    mock.set(|m| m.delay_ms = 300);
    let mut cfg = config(&mock.base_url());
    cfg.max_tokens_per_call = 100;
    let req = question("q");
    let one = reservation(
        &CloudRequest {
            max_tokens: 100,
            ..req.clone()
        },
        100,
    );
    // Room for exactly three reservations; each answer will cost only 14.
    cfg.max_tokens_per_day = 3 * one + one / 2;
    let (client, _) = client_with(cfg, None);
    let calls = (0..6).map(|_| {
        let c = client.clone();
        let mut r = req.clone();
        r.max_tokens = 100;
        tokio::spawn(async move { c.chat(r).await })
    });
    let results = futures::future::join_all(calls).await;
    let ok = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
    let refused = results
        .iter()
        .filter(|r| {
            matches!(
                r,
                Ok(Err(CloudError::BudgetExhausted {
                    unit: BudgetUnit::Tokens,
                    ..
                }))
            )
        })
        .count();
    assert_eq!((ok, refused), (3, 3), "{results:?}");
    assert_eq!(mock.chat_requests(), 3);
    // Settled afterwards: the unused reservations came back.
    assert_eq!(client.status().tokens_left, 3 * one + one / 2 - 3 * 14);
}

fn persisted(dir: &std::path::Path) -> CloudConfig {
    let mut cfg = config(&dead_port_url());
    cfg.budget_file = Some(dir.join("g.cloud-budget.json").display().to_string());
    cfg.max_tokens_per_day = 10_000;
    cfg
}

fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn budget_survives_a_restart_on_the_same_day_only() {
    let mock = Mock::start(None).await;
    mock.set(|m| m.usage = Some(json!({"total_tokens": 1_500})));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = persisted(dir.path());
    cfg.base_url = mock.base_url();
    let (first, clock) = client_with(cfg.clone(), None);
    assert_eq!(
        first.budget_file(),
        Some(dir.path().join("g.cloud-budget.json").as_path())
    );
    for i in 0..3 {
        first.chat(question(&format!("{i}"))).await.expect("answer");
        first.flush_budget();
    }
    let left = first.status();
    assert_eq!(left.tokens_left, 10_000 - 4_500);
    drop(first);
    assert_eq!(
        files_in(dir.path()),
        vec!["g.cloud-budget.json"],
        "no temporary files left"
    );

    // Same UTC day, a new client (a restarted gateway): it goes on from there.
    let restarted = CloudClient::with_key(cfg.clone(), None, clock.clone()).expect("client");
    let st = restarted.status();
    assert_eq!(
        (st.budget_left, st.tokens_left),
        (left.budget_left, left.tokens_left)
    );
    restarted.chat(question("again")).await.expect("answer");
    assert_eq!(restarted.status().tokens_left, 10_000 - 6_000);
    drop(restarted); // the last clone writes on drop

    // The calls count too: with 4 of 5 calls spent, one is left after a restart.
    let mut calls_cfg = cfg.clone();
    calls_cfg.max_calls_per_day = 5;
    let again = CloudClient::with_key(calls_cfg.clone(), None, clock.clone()).expect("client");
    assert_eq!(again.status().budget_left, 1);
    drop(again);

    // The next UTC day: the file is for another day and is ignored.
    let tomorrow = Arc::new(ManualClock::new(T0 + 86_400_000));
    let next_day = CloudClient::with_key(calls_cfg, None, tomorrow).expect("client");
    assert_eq!(next_day.status().tokens_left, 10_000);
    assert_eq!(next_day.status().budget_left, 5);
}

#[tokio::test]
async fn a_corrupt_or_unwritable_budget_file_is_not_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = persisted(dir.path());
    let path = dir.path().join("g.cloud-budget.json");
    for junk in ["", "{", "null", "{\"version\":1}", "[1,2,3]", "\u{0}\u{1}"] {
        std::fs::write(&path, junk).expect("write");
        let (client, _) = client_with(cfg.clone(), None);
        assert_eq!(client.status().tokens_left, 10_000, "{junk:?} is ignored");
    }
    // A budget file whose directory is a file: calls still work, nothing panics.
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, "x").expect("write");
    let mock = Mock::start(None).await;
    let mut cfg = config(&mock.base_url());
    cfg.budget_file = Some(blocker.join("b.json").display().to_string());
    let (client, _) = client_with(cfg, None);
    client.chat(question("q")).await.expect("answer");
    client.flush_budget();
    assert_eq!(client.calls_made(), 1);
}

#[tokio::test]
async fn the_budget_writer_saves_changes_in_the_background() {
    let mock = Mock::start(None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = persisted(dir.path());
    cfg.base_url = mock.base_url();
    let (client, clock) = client_with(cfg.clone(), None);
    let (memory, _) = client_with(config(&mock.base_url()), None);
    assert!(memory.spawn_budget_writer().is_none(), "no file, no writer");
    let writer = client.spawn_budget_writer().expect("a writer");
    client.chat(question("q")).await.expect("answer");
    let path = dir.path().join("g.cloud-budget.json");
    let t = Instant::now();
    while !path.exists() && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Read through a second client while the first is still alive.
    let reader = CloudClient::with_key(cfg, None, clock).expect("client");
    assert_eq!(reader.status().tokens_left, 10_000 - 14);
    drop(client);
    drop(reader);
    tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .expect("the writer ends with the client")
        .expect("writer task");
    assert_eq!(files_in(dir.path()), vec!["g.cloud-budget.json"]);
}

#[tokio::test]
async fn a_streamed_answer_settles_to_the_usage_chunk_it_asked_for() {
    let mock = Mock::start(None).await;
    let mut cfg = config(&mock.base_url());
    cfg.max_tokens_per_call = 100;
    cfg.max_tokens_per_day = 1_000;
    let (client, _) = client_with(cfg, None);
    // Without a usage chunk the reservation stands (the cost is unknown).
    collect(client.chat_stream(question("1")).await.expect("stream")).await;
    let reserved = 1_000 - client.status().tokens_left;
    assert_eq!(reserved, reservation(&question("1"), 100));
    let body = mock.requests().last().expect("request").body.clone();
    assert_eq!(body["stream_options"]["include_usage"], json!(true), "{body}");
    // With one, the call costs what the endpoint says.
    mock.set(|m| m.usage = Some(json!({"total_tokens": 30})));
    let items = collect(client.chat_stream(question("2")).await.expect("stream")).await;
    assert!(items.iter().all(Result::is_ok), "{items:?}");
    assert_eq!(client.status().tokens_left, 1_000 - reserved - 30);
}
