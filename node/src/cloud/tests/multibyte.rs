//! Huge multi-byte answers from the cloud (hardening, issue #19): 300 000 × 'é'
//! as a plain answer, as a stream whose byte chunks split characters, as an error
//! body and as an error in a stream. Answers come through whole within the size
//! limits; error messages are cut on a character boundary to a bounded length;
//! an answer over the limit is an error, never a panic or an unbounded buffer.

use super::*;

/// 300 000 × 'é': 600 000 bytes of two-byte characters.
fn e_acute() -> String {
    "é".repeat(300_000)
}

/// A cut error message: at most `MAX_ERROR_MESSAGE` bytes of `from`, then '…'.
fn assert_cut(message: &str, from: &str) {
    assert!(
        message.len() <= MAX_ERROR_MESSAGE + '…'.len_utf8(),
        "{} bytes",
        message.len()
    );
    let kept = message.strip_suffix('…').expect("the cut is marked");
    assert!(!kept.is_empty() && from.contains(kept), "{kept:?}");
}

#[tokio::test]
async fn a_300k_e_acute_answer_comes_through_whole() {
    let mock = Mock::start(None).await;
    mock.set(|m| m.answer = Some(vec![e_acute()]));
    let (client, _) = client_with(config(&mock.base_url()), None);
    let a = client.chat(question("say é")).await.expect("answer");
    assert_eq!(a.text, e_acute());
}

#[tokio::test]
async fn a_300k_e_acute_stream_split_mid_character_comes_through_whole() {
    let mock = Mock::start(None).await;
    // Three pieces, and odd-sized body chunks so nearly every chunk boundary
    // falls inside an 'é' (and inside an SSE line).
    let pieces = vec!["é".repeat(100_000), "é".repeat(150_000), "é".repeat(50_000)];
    mock.set(|m| {
        m.answer = Some(pieces.clone());
        m.chunk_bytes = Some(4_099);
    });
    let (client, _) = client_with(config(&mock.base_url()), None);
    let items = collect(client.chat_stream(question("say é")).await.expect("stream")).await;
    let text: String = items.into_iter().map(|i| i.expect("piece")).collect();
    assert_eq!(text.len(), e_acute().len());
    assert_eq!(text, e_acute());
}

#[tokio::test]
async fn a_300k_e_acute_error_is_cut_on_a_character_boundary() {
    let mock = Mock::start(None).await;
    let (client, _) = client_with(config(&mock.base_url()), None);
    // An OpenAI-style JSON error (longer than the error body the client reads,
    // so the JSON is cut too), then the same as plain text.
    let json_body = json!({"error": {"message": format!("x{}", e_acute())}}).to_string();
    for body in [json_body, format!("x{}", e_acute())] {
        mock.set(|m| m.fail = Some((500, body.clone())));
        match client.chat(question("q")).await {
            Err(CloudError::Http { status: 500, message }) => {
                // Whatever part of the body became the message, it is bounded and whole characters.
                assert!(
                    message.len() <= MAX_ERROR_MESSAGE + '…'.len_utf8(),
                    "{}",
                    message.len()
                );
                assert!(message.ends_with('…'), "{message:?}");
            }
            other => panic!("expected an HTTP error, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_300k_e_acute_error_in_a_stream_is_cut_on_a_character_boundary() {
    let mock = Mock::start(None).await;
    let msg = format!("x{}", e_acute());
    mock.set(|m| {
        m.stream_error = Some(msg.clone());
        m.chunk_bytes = Some(4_099);
    });
    let (client, _) = client_with(config(&mock.base_url()), None);
    let items = collect(client.chat_stream(question("q")).await.expect("stream")).await;
    match items.last() {
        Some(Err(CloudError::BadResponse(m))) => {
            let inner = m.strip_prefix("error in stream: ").expect("prefix");
            assert_cut(inner, &msg);
        }
        other => panic!("expected the stream to end in an error, got {other:?}"),
    }
}

#[tokio::test]
async fn an_answer_over_the_size_limit_is_an_error() {
    let mock = Mock::start(None).await;
    // 10 MB of 'é', over the 8 MiB a plain answer may have.
    mock.set(|m| m.answer = Some(vec!["é".repeat(5_000_000)]));
    let (client, _) = client_with(config(&mock.base_url()), None);
    match client.chat(question("q")).await {
        Err(CloudError::BadResponse(m)) => assert!(m.contains("larger than"), "{m}"),
        other => panic!("expected a size error, got {:?}", other.map(|a| a.text.len())),
    }
}
