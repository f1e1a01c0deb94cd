//! Small helpers for error values shared by every module.

/// An error and all its sources, joined with `: `, for messages that must say why.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `text` cut to at most `max` bytes at a character boundary, for messages from a peer that may be
/// long or multi-byte: `String::truncate` panics when `max` falls inside a character.
pub fn clipped(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_never_splits_a_character() {
        assert_eq!(clipped("abc".into(), 5), "abc");
        assert_eq!(clipped("abcdef".into(), 3), "abc");
        // "é" is two bytes: a cut at byte 2 would land inside it.
        assert_eq!(clipped("aé".repeat(200), 2), "a");
        assert_eq!(clipped("€€".into(), 4), "€");
    }
}
