//! Small helpers for error values shared by every module.

/// An error and all its sources, joined with `: `, for messages that must say why. A source whose
/// text the message already carries (many errors print their source) is not said twice.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
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

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as &(dyn std::error::Error + 'static))
        }
    }

    #[test]
    fn a_chain_says_each_cause_once() {
        let io = Layer("No such file or directory (os error 2)", None);
        let transport =
            Layer("transport error", Some(Box::new(Layer("transport error", Some(Box::new(io))))));
        let top = Layer("cannot connect to unix:///x", Some(Box::new(transport)));
        assert_eq!(
            chain(&top),
            "cannot connect to unix:///x: transport error: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn clipping_never_splits_a_character() {
        assert_eq!(clipped("abc".into(), 5), "abc");
        assert_eq!(clipped("abcdef".into(), 3), "abc");
        // "é" is two bytes: a cut at byte 2 would land inside it.
        assert_eq!(clipped("aé".repeat(200), 2), "a");
        assert_eq!(clipped("€€".into(), 4), "€");
    }
}
