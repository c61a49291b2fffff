//! Text that someone else chose, as tokend shows it: in the daemon's log
//! (a caller's process name, an executable path) and on the terminal of
//! whoever runs the CLI (an issuer's discovery document, whatever the
//! daemon at `--socket` answers, which may be any program).
//!
//! One rule for both: a character that a terminal acts on or that starts
//! a line of its own is shown as `?`. That is every control character (C0,
//! DEL and C1, whose CSI U+009B some terminals take as ESC `[`), and the
//! Unicode format characters that reorder or break a line on display
//! (bidirectional overrides and isolates, the line and paragraph
//! separators): with them, text can hide, move or forge what follows it.
//! Everything else, other scripts included, is shown as it is.
//!
//! It does not decide what is secret: issuer text is scrubbed of secrets
//! (src/issuer.rs) before it gets here.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether a terminal or a log reader could take `c` for a command or a
/// line break (module doc).
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' // Arabic letter mark
                | '\u{200e}'..='\u{200f}' // left-to-right and right-to-left marks
                | '\u{2028}'..='\u{202e}' // line and paragraph separators, embeddings, overrides
                | '\u{2066}'..='\u{2069}' // isolates
        )
}

/// `text` as one line, each unsafe character as `?`. Borrowed when there
/// is none, as there almost never is.
pub fn one_line(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(
        text.chars()
            .map(|c| if is_unsafe(c) { '?' } else { c })
            .collect(),
    )
}

/// [`one_line`], at most `max` characters of it, and `…` when cut.
pub fn shown(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| if is_unsafe(c) { '?' } else { c })
        .collect();
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

/// Text of several lines (the metrics), its line breaks kept and every
/// other unsafe character as `?`.
pub fn lines(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| c != '\n' && is_unsafe(c)) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(
        text.chars()
            .map(|c| if c != '\n' && is_unsafe(c) { '?' } else { c })
            .collect(),
    )
}

/// serde_json's output with the unsafe characters it leaves as they are
/// (DEL, C1, the format characters) written as `\uXXXX` escapes: still the
/// same JSON, since serde_json writes them only inside strings, and it
/// escapes the C0 controls itself. The `\n` of pretty output stays.
pub fn json(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| c != '\n' && is_unsafe(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if c != '\n' && is_unsafe(c) {
            // Every unsafe character is in the Basic Multilingual Plane:
            // one escape each, no surrogate pair.
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_line_breaking_format_characters_become_question_marks() {
        assert_eq!(one_line("socat"), "socat");
        assert!(matches!(one_line("é ok"), Cow::Borrowed("é ok")));
        assert_eq!(one_line("x\nhanded out a"), "x?handed out a");
        assert_eq!(one_line("a\u{1b}[31m\r\t\u{7f}"), "a?[31m???");
        assert_eq!(one_line("\u{9b}2J\u{85}"), "?2J?");
        assert_eq!(one_line("ok\u{202e}kO\u{2066}\u{2028}"), "ok?kO??");
        // Joiners and other format characters that do not reorder stay.
        assert_eq!(one_line("a\u{200d}b"), "a\u{200d}b");
    }

    #[test]
    fn shown_cuts_by_characters_and_marks_the_cut() {
        assert_eq!(shown("socat", 16), "socat");
        assert_eq!(shown("a\u{1b}[31m\r", 16), "a?[31m?");
        assert_eq!(shown(&"é".repeat(20), 16), format!("{}…", "é".repeat(16)));
        assert_eq!(shown(&"x".repeat(16), 16), "x".repeat(16));
    }

    #[test]
    fn lines_keep_their_breaks() {
        assert_eq!(lines("a 1\nb 2\n"), "a 1\nb 2\n");
        assert_eq!(lines("a\r\n\u{1b}]0;x\u{7}\n"), "a?\n?]0;x?\n");
    }

    #[test]
    fn json_escapes_what_serde_json_leaves_and_stays_the_same_json() {
        let value = serde_json::json!({"k": "a\u{1b}\u{7f}\u{9b}\u{202e}é", "n": [1]});
        for text in [
            value.to_string(),
            serde_json::to_string_pretty(&value).unwrap(),
        ] {
            let escaped = json(&text);
            assert!(
                !escaped.chars().any(|c| c != '\n' && is_unsafe(c)),
                "{escaped}"
            );
            let back: serde_json::Value = serde_json::from_str(&escaped).unwrap();
            assert_eq!(back, value);
        }
        assert!(matches!(json("{\"a\":1}"), Cow::Borrowed(_)));
    }
}
