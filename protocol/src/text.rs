//! Cutting untrusted text to a byte limit without splitting a character: the one
//! helper every truncation of peer, cloud or user text goes through
//! (`String::truncate` panics when the limit falls inside a multi-byte character).

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// [`clip`] for an owned string, in place (no copy when it already fits).
pub fn clip_owned(mut s: String, max: usize) -> String {
    let end = clip(&s, max).len();
    s.truncate(end);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_on_character_boundaries() {
        assert_eq!(clip("abc", 10), "abc");
        assert_eq!(clip("abc", 2), "ab");
        // "é" is two bytes: a limit inside it backs off to the boundary before.
        let s = format!("x{}", "é".repeat(300_000));
        let c = clip(&s, 4);
        assert_eq!(c, "xé");
        assert_eq!(clip_owned(s.clone(), 1 << 19).len() % 2, 1);
        assert!(clip_owned(s, 1 << 19).len() <= 1 << 19);
        assert_eq!(clip("日本", 5), "日");
        assert_eq!(clip("日本", 0), "");
    }
}
