//! Task detection from a bare prompt, for requests that do not say what kind of answer they want.
//!
//! Rule, first match wins:
//! 1. **mcq, line form**: at least 2 option lines in letter order from `A` (`A. …`, `A) …` or
//!    `(A) …`, upper-case letter, then whitespace and text); blank lines between options are
//!    allowed. When a prompt has several such runs (few-shot examples), the last one is used.
//! 2. **mcq, inline form**: one line holding at least 2 such markers in letter order from `A`,
//!    each at the start of a word, e.g. `Which is a mammal? A. shark B. dolphin C. trout D. eel`.
//!    The last `A` marker that starts a chain is used, so `Vitamin A. …` before the options does
//!    not count.
//! 3. **short**: a single line of at most 25 words with at most one `?`, that ends with `?` or
//!    starts with who / what / when / where / which / how many / how much.
//! 4. **free**: everything else.

use crate::message::{Choice, Task, MAX_CHOICES, MAX_CHOICE_TEXT_LEN};
use crate::text::clip;

/// Longest prompt (in words) still treated as a short factual question.
pub const SHORT_MAX_WORDS: usize = 25;

/// Classifies a prompt; see the module documentation for the rule.
pub fn detect_task(prompt: &str) -> Task {
    if let Some(choices) = line_options(prompt).or_else(|| inline_options(prompt)) {
        return Task::Mcq { choices };
    }
    if is_short_question(prompt) {
        Task::Short
    } else {
        Task::Free
    }
}

fn letter(i: usize) -> char {
    (b'A' + i as u8) as char
}

/// An option as the wire carries it: its text cut to [`MAX_CHOICE_TEXT_LEN`] on a
/// character boundary. Peers refuse a task with a longer option, so an uncut one
/// made every vote and escalation of such a prompt fail (found by fuzzing).
fn choice(label: char, text: &str) -> Choice {
    Choice {
        label: label.to_string(),
        text: clip(text, MAX_CHOICE_TEXT_LEN).trim_end().to_owned(),
    }
}

/// `(X) rest`, `X. rest`, `X) rest` with X an upper-case ASCII letter and `rest` non-empty.
fn option_line(line: &str) -> Option<(char, &str)> {
    let line = line.trim();
    let mut chars = line.chars();
    let first = chars.next()?;
    let (l, marker_len) = if first == '(' {
        let l = chars.next()?;
        (chars.next() == Some(')')).then_some((l, 3))?
    } else {
        let d = chars.next()?;
        matches!(d, '.' | ')').then_some((first, 2))?
    };
    if !l.is_ascii_uppercase() {
        return None;
    }
    let rest = &line[marker_len..];
    if !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let rest = rest.trim();
    (!rest.is_empty()).then_some((l, rest))
}

fn line_options(prompt: &str) -> Option<Vec<Choice>> {
    let mut best: Option<Vec<Choice>> = None;
    let mut run: Vec<Choice> = Vec::new();
    let flush = |run: &mut Vec<Choice>, best: &mut Option<Vec<Choice>>| {
        if run.len() >= 2 {
            *best = Some(std::mem::take(run));
        }
        run.clear();
    };
    for line in prompt.lines() {
        if line.trim().is_empty() {
            continue;
        }
        match option_line(line) {
            Some((l, text)) if l == letter(run.len()) && run.len() < MAX_CHOICES => {
                run.push(choice(l, text));
            }
            Some(('A', text)) => {
                flush(&mut run, &mut best);
                run.push(choice('A', text));
            }
            _ => flush(&mut run, &mut best),
        }
    }
    flush(&mut run, &mut best);
    best
}

/// Byte ranges of option markers for letter `l` that start a word and are followed by whitespace.
fn markers(line: &str, l: char) -> Vec<(usize, usize)> {
    let b = line.as_bytes();
    let mut out = Vec::new();
    for (i, c) in line.char_indices() {
        if c != l && c != '(' {
            continue;
        }
        if i > 0 && !b[i - 1].is_ascii_whitespace() {
            continue;
        }
        let rest = &line[i..];
        let lb = l as u8;
        let len = match rest.as_bytes() {
            [b'(', x, b')', ..] if *x == lb => 3,
            [x, b'.' | b')', ..] if *x == lb => 2,
            _ => continue,
        };
        if rest[len..].starts_with(char::is_whitespace) {
            out.push((i, i + len));
        }
    }
    out
}

/// Options that start at marker `start` of `A`, following markers of B, C, … in order.
fn inline_chain(line: &str, per_letter: &[Vec<(usize, usize)>], start: (usize, usize)) -> Vec<Choice> {
    let mut bounds = vec![start];
    for ms in per_letter.iter().skip(1) {
        let after = bounds[bounds.len() - 1].1;
        match ms.iter().find(|m| m.0 >= after) {
            Some(m) => bounds.push(*m),
            None => break,
        }
    }
    let mut choices = Vec::new();
    for (i, (_, text_start)) in bounds.iter().enumerate() {
        let end = bounds.get(i + 1).map_or(line.len(), |n| n.0);
        let text = line[*text_start..end].trim();
        if text.is_empty() {
            break;
        }
        choices.push(choice(letter(i), text));
    }
    choices
}

fn inline_options(prompt: &str) -> Option<Vec<Choice>> {
    for line in prompt.lines().rev() {
        // Markers are found once per letter, so long adversarial lines stay linear-ish.
        let per_letter: Vec<Vec<(usize, usize)>> =
            (0..MAX_CHOICES).map(|i| markers(line, letter(i))).collect();
        for start in per_letter[0].iter().rev() {
            let chain = inline_chain(line, &per_letter, *start);
            if chain.len() >= 2 {
                return Some(chain);
            }
        }
    }
    None
}

fn is_short_question(prompt: &str) -> bool {
    let p = prompt.trim();
    if p.is_empty() || p.contains('\n') || p.matches('?').count() > 1 {
        return false;
    }
    let words: Vec<String> = p
        .split_whitespace()
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase())
        .collect();
    if words.len() > SHORT_MAX_WORDS {
        return false;
    }
    let first = words.first().map(String::as_str).unwrap_or("");
    let second = words.get(1).map(String::as_str).unwrap_or("");
    p.ends_with('?')
        || matches!(first, "who" | "what" | "when" | "where" | "which")
        || (first == "how" && matches!(second, "many" | "much"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(t: &Task) -> Vec<(&str, &str)> {
        match t {
            Task::Mcq { choices } => choices
                .iter()
                .map(|c| (c.label.as_str(), c.text.as_str()))
                .collect(),
            other => panic!("expected mcq, got {other:?}"),
        }
    }

    #[test]
    fn line_form_mcq() {
        let t = detect_task("Which is a mammal?\nA. shark\nB. dolphin\nC. trout\nD. eel\nAnswer:");
        assert_eq!(
            texts(&t),
            [("A", "shark"), ("B", "dolphin"), ("C", "trout"), ("D", "eel")]
        );
        let t = detect_task("Pick one:\n(A) red\n\n(B) blue");
        assert_eq!(texts(&t), [("A", "red"), ("B", "blue")]);
        let t = detect_task("  A) yes\n  B) no");
        assert_eq!(texts(&t), [("A", "yes"), ("B", "no")]);
    }

    #[test]
    fn last_run_wins_for_few_shot_prompts() {
        let t = detect_task("Q: 1+1?\nA. 2\nB. 3\nAnswer: A\n\nQ: 2+2?\nA. 5\nB. 4\nC. 3\nAnswer:");
        assert_eq!(texts(&t), [("A", "5"), ("B", "4"), ("C", "3")]);
    }

    #[test]
    fn inline_form_mcq() {
        let t = detect_task("Which is a mammal? A. shark B. dolphin C. trout D. eel");
        assert_eq!(
            texts(&t),
            [("A", "shark"), ("B", "dolphin"), ("C", "trout"), ("D", "eel")]
        );
        let t = detect_task("Best source of vitamin A. Which? (A) carrots (B) sugar");
        assert_eq!(texts(&t), [("A", "carrots"), ("B", "sugar")]);
        let t = detect_task("Is it A) true or B) false?");
        assert_eq!(texts(&t), [("A", "true or"), ("B", "false?")]);
    }

    #[test]
    fn not_mcq() {
        // Out of order, single option, lower case, article "A".
        assert_eq!(detect_task("B. one\nA. two"), Task::Free);
        assert_eq!(detect_task("A. only one option here\nand more text"), Task::Free);
        assert_eq!(detect_task("a. x\nb. y"), Task::Free);
        assert_eq!(detect_task("A cat sat on a mat. B is a letter."), Task::Free);
        assert_eq!(detect_task("Rate it A. Then B."), Task::Free);
    }

    #[test]
    fn long_options_are_cut_to_the_wire_limit() {
        use crate::message::Validate;
        // Found by fuzzing: an option over MAX_CHOICE_TEXT_LEN made a task peers refuse.
        let long = format!("x{}", "é".repeat(MAX_CHOICE_TEXT_LEN));
        for prompt in [
            format!("Pick:\nA) short\nB) {long}"),
            format!("Pick: A) short B) {long}"),
            format!("A. {long}\nB. {long}  tail"),
        ] {
            let t = detect_task(&prompt);
            assert_eq!(t.validate(), Ok(()), "{prompt:.40}");
            for (_, text) in texts(&t) {
                assert!(text.len() <= MAX_CHOICE_TEXT_LEN && long.starts_with(text) || text == "short");
            }
        }
    }

    #[test]
    fn short_vs_free() {
        assert_eq!(detect_task("Who wrote Hamlet?"), Task::Short);
        assert_eq!(detect_task("what is the capital of france"), Task::Short);
        assert_eq!(detect_task("How many legs does a spider have"), Task::Short);
        assert_eq!(detect_task("Is water wet?"), Task::Short);
        assert_eq!(detect_task("How are you doing today my friend"), Task::Free);
        assert_eq!(detect_task("Write a poem about the sea."), Task::Free);
        assert_eq!(detect_task("Who? What?"), Task::Free);
        assert_eq!(detect_task("Who wrote it?\nAnd when?"), Task::Free);
        let long = format!("What {}?", "word ".repeat(25));
        assert_eq!(detect_task(&long), Task::Free);
        assert_eq!(detect_task(""), Task::Free);
    }
}
