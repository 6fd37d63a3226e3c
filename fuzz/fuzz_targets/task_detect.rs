//! Task detection from a prompt, and the normalisation of answers under the
//! detected task (and under a label task made from the prompt's words).
//!
//! Input: a prompt and a model answer, split at the first NUL.
//! Properties: no panic; deterministic; a detected task is valid on the wire
//! (peers refuse a vote request whose task is not); normalised mcq and label
//! answers are one of the task's own labels; a short answer is normalised to
//! single-spaced words.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swarm_protocol::message::Validate;
use swarm_protocol::{detect_task, normalize, squad_normalize, Task, MAX_CHOICES};

fn check_normalized(task: &Task, answer: &str) {
    let n = normalize(task, answer);
    assert_eq!(n, normalize(task, answer), "normalize is not deterministic");
    let Some(n) = n else { return };
    assert!(!n.is_empty());
    match task {
        Task::Mcq { choices } => assert!(choices.iter().any(|c| c.label == n), "{n:?} is no label"),
        Task::Label { labels } => assert!(labels.contains(&n), "{n:?} is no label"),
        Task::Short => {
            assert_eq!(n, squad_normalize(answer));
            assert!(!n.contains("  ") && n.trim() == n);
        }
        Task::Free => assert_eq!(n, answer.trim()),
    }
}

fuzz_target!(|bytes: &[u8]| {
    let text = String::from_utf8_lossy(bytes);
    let (prompt, answer) = text.split_once('\0').unwrap_or((&text, ""));
    let task = detect_task(prompt);
    assert_eq!(task, detect_task(prompt), "detect_task is not deterministic");
    if let Err(e) = task.validate() {
        panic!("detected task is invalid on the wire: {e}: {task:?}");
    }
    if let Task::Mcq { choices } = &task {
        assert!((2..=MAX_CHOICES).contains(&choices.len()));
        for (i, c) in choices.iter().enumerate() {
            assert_eq!(c.label, ((b'A' + i as u8) as char).to_string());
            assert!(!c.text.is_empty() && c.text.trim() == c.text);
        }
    }
    check_normalized(&task, answer);
    check_normalized(&Task::Short, answer);
    check_normalized(&Task::Free, answer);
    // A label task from the prompt's first distinct words, as a user could declare one.
    let mut labels: Vec<String> = Vec::new();
    for w in prompt.split_whitespace().take(64) {
        if w.len() <= swarm_protocol::MAX_LABEL_LEN && !labels.iter().any(|l| l.eq_ignore_ascii_case(w)) {
            labels.push(w.to_string());
        }
    }
    let label_task = Task::Label { labels };
    if label_task.validate().is_ok() {
        check_normalized(&label_task, answer);
    }
});
