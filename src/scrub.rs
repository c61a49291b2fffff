//! Finding a secret in text an issuer or a proxy wrote, whatever encoding
//! it chose, and redacting it.
//!
//! A server that quotes what it received (in an error description, a
//! content type) may re-encode it with its own encoder: JavaScript's
//! `encodeURIComponent`, Python's `quote_plus`, lowercase hex. Matching
//! only the encodings tokend itself sends misses those, so the rule is
//! that any text that decodes to a secret is the secret. Text is read
//! as written, and decoded (`Decoded`: `%XX` in either case is the byte,
//! `+` a space), once and twice, each decoding with a map from its bytes
//! back to where their encodings start, so that what is redacted is the
//! text as written. Each secret is looked for as written and decoded, in
//! every reading.
//!
//! Two rules keep ordinary words readable:
//! - a needle shorter than [`SHORT`] bytes is redacted only where it stands
//!   alone, with no letter, digit or `_` against either end (a secret
//!   `abc` is redacted in `secret=abc` but not in `abcdef`);
//! - a run cut off by the end of the text, or by an ellipsis (`…`, `...`)
//!   that marks a cut, counts when it holds at least [`SHORT`] bytes of
//!   the secret itself: a server that bounds its text may cut a quoted
//!   secret short, and what is left of it is still redacted.
//!
//! Each needle is matched with Knuth–Morris–Pratt, so the work is linear in
//! the text's length times the number of needles, whatever the text holds,
//! and the matcher's state at a cut says how much of the needle ends there.
//!
//! This module knows nothing of keys or of HTTP: [`crate::issuer`] and
//! [`crate::transport`] say which secrets a request carries.

use std::ops::Range;

use base64::Engine as _;
use zeroize::Zeroizing;

/// Needles shorter than this many bytes match only as words of their own,
/// and a cut run must hold this many bytes of the secret to count: fewer
/// would redact pieces of ordinary words.
pub const SHORT: usize = 8;

const REDACTED: &str = "[redacted]";

/// How many times text is decoded: once for a server that re-encodes what
/// it received, twice for one that quotes a request it encoded again.
const DEPTH: u32 = 2;

/// What marks a cut in the middle of a text: ours (`…`) and the one many
/// servers write.
const ELLIPSES: [&[u8]; 2] = ["…".as_bytes(), b"..."];

/// The secrets of one request, ready to be found in any text a server
/// answered with.
#[derive(Default)]
pub struct Scrubber {
    needles: Vec<Needle>,
}

impl Scrubber {
    /// One that scrubs nothing, for answers no secret went into.
    pub fn none() -> Scrubber {
        Scrubber::default()
    }

    /// `secret` and everything that decodes to it. The two encodings
    /// tokend sends (form-urlencoded, with `+` and with `%20` for a space)
    /// are also matched as written, for a text whose decoding starts
    /// mid-escape just before them.
    pub fn add_secret(&mut self, secret: &str) {
        if secret.is_empty() {
            return;
        }
        // Sized up front: a growing buffer would leave copies unwiped.
        let mut encoded = Zeroizing::new(String::with_capacity(3 * secret.len()));
        encoded.extend(form_urlencoded::byte_serialize(secret.as_bytes()));
        let mut spaced = Zeroizing::new(String::with_capacity(3 * secret.len()));
        for c in encoded.chars() {
            match c {
                '+' => spaced.push_str("%20"),
                c => spaced.push(c),
            }
        }
        for form in [secret, encoded.as_str(), spaced.as_str()] {
            self.add_form(form, 0);
        }
    }

    /// A text that holds a secret after `public` leading bytes that are
    /// not (a client id and its `:`, a JWS header and its `.`): found
    /// whole, or cut short once past them. Also as it decodes.
    pub fn add_form(&mut self, form: &str, public: usize) {
        let public = public.min(form.len());
        self.push(Needle::new(
            Zeroizing::new(form.as_bytes().to_vec()),
            public,
        ));
        let decoded = decode(form.as_bytes());
        if *decoded != form.as_bytes() {
            let public = decode(&form.as_bytes()[..public]).len();
            self.push(Needle::new(decoded, public));
        }
    }

    /// The standard base64 of `bytes`, as an HTTP Basic credential carries
    /// it, the first `public` of them not secret (the user and its `:`).
    pub fn add_base64(&mut self, bytes: &[u8], public: usize) {
        let mut encoded = Zeroizing::new(String::with_capacity(4 * bytes.len().div_ceil(3)));
        base64::engine::general_purpose::STANDARD.encode_string(bytes, &mut encoded);
        // Each 4 characters encode 3 bytes: only whole groups of public
        // bytes give characters that are not secret.
        self.add_form(&encoded, public / 3 * 4);
    }

    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// The longest stretch of raw text one match can cover: a needle
    /// whose every byte took the longest encoding [`DEPTH`] decodings undo
    /// (`%25%34%31` for `A`).
    fn reach(&self) -> usize {
        let longest = self.needles.iter().map(|n| n.bytes.len()).max();
        longest.unwrap_or(0) * 3usize.pow(DEPTH)
    }

    fn push(&mut self, needle: Needle) {
        match self.needles.iter_mut().find(|n| n.bytes == needle.bytes) {
            Some(known) => known.public = known.public.min(needle.public),
            None => self.needles.push(needle),
        }
    }

    /// `text` with every run that is, or decodes to, a secret replaced by
    /// `[redacted]`.
    pub fn scrub(&self, text: &str) -> String {
        if self.needles.is_empty() {
            return text.to_owned();
        }
        let raw = text.as_bytes();
        let mut spans = Vec::new();
        for needle in &self.needles {
            needle.find(raw, &mut |span| spans.push(span));
        }
        // Each reading decodes the one before, so that text encoded twice
        // (a request body quoted inside a URL) is found too. Without an
        // escape or a `+`, a reading is the same as the one before.
        let mut reading: Option<Decoded> = None;
        for _ in 0..DEPTH {
            let bytes = reading.as_ref().map_or(raw, |r| &r.bytes[..]);
            if !bytes.iter().any(|&b| b == b'%' || b == b'+') {
                break;
            }
            let next = match &reading {
                None => Decoded::new(raw),
                Some(previous) => previous.again(),
            };
            for needle in &self.needles {
                needle.find(&next.bytes, &mut |span| spans.push(next.raw_span(span)));
            }
            reading = Some(next);
        }
        redact(text, spans)
    }

    /// The start of `text` scrubbed, reading no more than it must to show
    /// its first `chars` characters: far enough past them that a secret
    /// starting before the cut is found whole. Also whether anything of
    /// `text` was left unread.
    pub fn scrub_head(&self, text: &str, chars: usize) -> (String, bool) {
        let shown = text
            .char_indices()
            .nth(chars)
            .map_or(text.len(), |(i, _)| i);
        let mut end = shown.saturating_add(self.reach()).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        (self.scrub(&text[..end]), end < text.len())
    }
}

/// One byte string to look for.
struct Needle {
    bytes: Zeroizing<Vec<u8>>,
    /// Leading bytes that are not secret: a cut run must reach past them.
    public: usize,
    /// Knuth–Morris–Pratt's failure function: for each prefix length
    /// `i + 1`, the length of its longest proper prefix that is also its
    /// suffix. Says nothing of the secret but how it overlaps itself.
    borders: Vec<usize>,
}

impl Needle {
    fn new(bytes: Zeroizing<Vec<u8>>, public: usize) -> Needle {
        let mut borders = vec![0; bytes.len()];
        let mut k = 0;
        for i in 1..bytes.len() {
            while k > 0 && bytes[i] != bytes[k] {
                k = borders[k - 1];
            }
            if bytes[i] == bytes[k] {
                k += 1;
            }
            borders[i] = k;
        }
        Needle {
            bytes,
            public,
            borders,
        }
    }

    /// Reports each span of `stream` that is this needle (standing alone,
    /// if it is short), and each run at a cut that holds a long enough
    /// part of its start.
    fn find(&self, stream: &[u8], found: &mut impl FnMut(Range<usize>)) {
        let needle = &self.bytes[..];
        let Some(last) = needle.len().checked_sub(1) else {
            return;
        };
        let long_enough = |matched: usize| matched >= self.public + SHORT;
        let mut matched = 0;
        for (i, &byte) in stream.iter().enumerate() {
            if long_enough(matched) {
                if let Some(partial) = cut_at(&stream[i..]) {
                    found(i - matched..i + partial);
                }
            }
            while matched > 0 && needle[matched] != byte {
                matched = self.borders[matched - 1];
            }
            if needle[matched] == byte {
                matched += 1;
            }
            if matched == needle.len() {
                let span = i - last..i + 1;
                if needle.len() >= SHORT || stands_alone(stream, &span) {
                    found(span);
                }
                matched = self.borders[last];
            }
        }
        if long_enough(matched) {
            found(stream.len() - matched..stream.len());
        }
    }
}

/// Whether a cut lies at the start of `rest`: the end of the text or an
/// ellipsis, maybe after the start of an escape the cut split (`%`, `%2`).
/// Returns the length of that start, which belongs to the cut run.
fn cut_at(rest: &[u8]) -> Option<usize> {
    let partial = match rest {
        [b'%', digit, ..] if digit.is_ascii_hexdigit() => 2,
        [b'%', ..] => 1,
        _ => 0,
    };
    let after = &rest[partial..];
    // `%2` then more text is a `%` that was never an escape, not a cut.
    let cut = after.is_empty() || ELLIPSES.iter().any(|e| after.starts_with(e));
    cut.then_some(partial)
}

/// Whether `span` of `stream` has no word byte against either end.
fn stands_alone(stream: &[u8], span: &Range<usize>) -> bool {
    let word = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_' || !b.is_ascii();
    let before = span.start.checked_sub(1).and_then(|i| stream.get(i));
    !before.is_some_and(word) && !stream.get(span.end).is_some_and(word)
}

/// `%XX` (either case) as its byte and `+` as a space; a `%` without two
/// hex digits after it stays as it is.
fn decode(raw: &[u8]) -> Zeroizing<Vec<u8>> {
    Decoded::new(raw).bytes
}

/// A text decoded, and where in the text each decoded byte came from.
struct Decoded {
    /// Never grown past its first allocation, so no copy is left unwiped.
    bytes: Zeroizing<Vec<u8>>,
    /// The text offset each decoded byte's encoding starts at, and the
    /// text's length last.
    starts: Vec<usize>,
}

impl Decoded {
    fn new(raw: &[u8]) -> Decoded {
        let mut bytes = Zeroizing::new(Vec::with_capacity(raw.len()));
        let mut starts = Vec::with_capacity(raw.len() + 1);
        let mut i = 0;
        while i < raw.len() {
            starts.push(i);
            let (byte, width) = match raw[i] {
                b'%' => match raw.get(i + 1..i + 3).and_then(hex_byte) {
                    Some(byte) => (byte, 3),
                    None => (b'%', 1),
                },
                b'+' => (b' ', 1),
                byte => (byte, 1),
            };
            bytes.push(byte);
            i += width;
        }
        starts.push(raw.len());
        Decoded { bytes, starts }
    }

    /// This reading decoded once more, its map still into the text.
    fn again(&self) -> Decoded {
        let mut next = Decoded::new(&self.bytes);
        for start in &mut next.starts {
            *start = self.starts[*start];
        }
        next
    }

    /// The text that `decoded` (a range of decoded bytes) came from.
    fn raw_span(&self, decoded: Range<usize>) -> Range<usize> {
        self.starts[decoded.start]..self.starts[decoded.end]
    }
}

fn hex_byte(digits: &[u8]) -> Option<u8> {
    let value = |d: u8| {
        char::from(d)
            .to_digit(16)
            .and_then(|v| u8::try_from(v).ok())
    };
    match digits {
        [high, low] => Some(value(*high)? << 4 | value(*low)?),
        _ => None,
    }
}

/// `text` with each span (widened to whole characters, merged where they
/// touch) replaced by `[redacted]`.
fn redact(text: &str, spans: Vec<Range<usize>>) -> String {
    if spans.is_empty() {
        return text.to_owned();
    }
    let mut spans: Vec<Range<usize>> = spans
        .into_iter()
        .filter(|span| span.start < span.end)
        .map(|span| whole_characters(text, span))
        .collect();
    spans.sort_by_key(|span| span.start);
    let mut out = String::with_capacity(text.len());
    let mut done = 0;
    let mut spans = spans.into_iter().peekable();
    while let Some(span) = spans.next() {
        let mut end = span.end;
        while let Some(next) = spans.next_if(|next| next.start <= end) {
            end = end.max(next.end);
        }
        out.push_str(&text[done..span.start]);
        out.push_str(REDACTED);
        done = end;
    }
    out.push_str(&text[done..]);
    out
}

/// `span` grown to the characters its ends fall in: a needle's decoded
/// bytes may start or end inside one.
fn whole_characters(text: &str, span: Range<usize>) -> Range<usize> {
    let (mut start, mut end) = (span.start, span.end.min(text.len()));
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    while !text.is_char_boundary(end) {
        end += 1;
    }
    start..end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn for_secret(secret: &str) -> Scrubber {
        let mut scrubber = Scrubber::none();
        scrubber.add_secret(secret);
        scrubber
    }

    #[test]
    fn the_decoder_reads_escapes_in_either_case_and_plus_as_a_space() {
        assert_eq!(*decode(b"a%2Bb%2bc+d%20e"), b"a+b+c d e");
        assert_eq!(*decode(b"%C3%bc"), "ü".as_bytes());
        // Not escapes: they stay as written.
        assert_eq!(*decode(b"100% %zz %4 %"), b"100% %zz %4 %");
        assert_eq!(*decode(b"%%41"), b"%A");
        assert_eq!(*decode(b"%00%ff"), b"\x00\xff");
        assert_eq!(*decode(b""), b"");
    }

    #[test]
    fn the_decoder_maps_each_byte_back_to_its_encoding() {
        let decoded = Decoded::new(b"x%41+y");
        assert_eq!(*decoded.bytes, b"xA y");
        assert_eq!(decoded.starts, [0, 1, 4, 5, 6]);
        assert_eq!(decoded.raw_span(1..3), 1..5);
        assert_eq!(decoded.raw_span(0..4), 0..6);
    }

    #[test]
    fn every_encoding_that_decodes_to_the_secret_is_redacted() {
        let secret = "s3cr+t v/al=ue~!'()*:ünï 42";
        let scrubber = for_secret(secret);
        for echoed in [
            secret,
            // tokend's own form encoding, and with %20.
            "s3cr%2Bt+v%2Fal%3Due%7E%21%27%28%29*%3A%C3%BCn%C3%AF+42",
            "s3cr%2Bt%20v%2Fal%3Due%7E%21%27%28%29*%3A%C3%BCn%C3%AF%2042",
            // encodeURIComponent.
            "s3cr%2Bt%20v%2Fal%3Due~!'()*%3A%C3%BCn%C3%AF%2042",
            // quote_plus.
            "s3cr%2Bt+v%2Fal%3Due~%21%27%28%29%2A%3A%C3%BCn%C3%AF+42",
            // Lowercase hex, and every byte escaped.
            "s3cr%2bt+v%2fal%3due%7e%21%27%28%29*%3a%c3%bcn%c3%af+42",
            "%73%33%63%72%2B%74%20%76%2F%61%6C%3D%75%65%7E%21%27%28%29%2A%3A%C3%BC%6E%C3%AF%20%34%32",
        ] {
            let shown = scrubber.scrub(&format!("got {echoed}, refused"));
            assert_eq!(shown, "got [redacted], refused", "{echoed}");
        }
    }

    #[test]
    fn a_secret_encoded_twice_is_found() {
        let scrubber = for_secret("s3cr+t v/al=ue");
        for echoed in [
            "s3cr%252Bt%2Bv%252Fal%253Due",
            "s3cr%252bt%2520v%252fal%253due",
        ] {
            assert_eq!(
                scrubber.scrub(&format!("body={echoed}&x")),
                "body=[redacted]&x"
            );
        }
        let decoded = Decoded::new(b"%2541+").again();
        assert_eq!(*decoded.bytes, b"A ");
        assert_eq!(decoded.starts, [0, 5, 6]);
    }

    #[test]
    fn a_secret_with_escapes_in_it_is_found_as_written_and_as_sent() {
        // A secret whose own text decodes to something else.
        let scrubber = for_secret("ab%41cd+ef-1234");
        for echoed in ["ab%41cd+ef-1234", "ab%2541cd%2Bef-1234", "abAcd ef-1234"] {
            assert_eq!(scrubber.scrub(&format!("[{echoed}]")), "[[redacted]]");
        }
    }

    #[test]
    fn an_escape_that_starts_before_the_secret_does_not_hide_it() {
        let scrubber = for_secret("ab12cd34ef");
        // "%ab" decodes to one byte; the secret is still there as written.
        assert_eq!(scrubber.scrub("x%ab12cd34ef"), "x%[redacted]");
        let scrubber = for_secret("ab+cd/ef gh");
        assert_eq!(scrubber.scrub("%ab%2Bcd%2Fef+gh"), "%[redacted]");
    }

    #[test]
    fn short_secrets_are_redacted_only_as_words() {
        let scrubber = for_secret("abc");
        assert_eq!(scrubber.scrub("abc"), "[redacted]");
        assert_eq!(scrubber.scrub("secret=abc&x"), "secret=[redacted]&x");
        assert_eq!(scrubber.scrub("'%61bc'"), "'[redacted]'");
        for word in ["abcdef", "xabc", "the_abc", "abc1", "déjàabc"] {
            assert_eq!(scrubber.scrub(word), word);
        }
        // Nor is a part of a short secret taken for a cut one.
        assert_eq!(scrubber.scrub("ends with ab"), "ends with ab");
    }

    #[test]
    fn a_secret_cut_at_the_end_of_the_text_is_redacted_from_a_long_part() {
        let secret = "0123456789abcdef-xyz";
        let scrubber = for_secret(secret);
        assert_eq!(scrubber.scrub("secret 0123456789ab"), "secret [redacted]");
        // Exactly SHORT bytes of it is enough; one fewer is not.
        assert_eq!(scrubber.scrub("secret 01234567"), "secret [redacted]");
        assert_eq!(scrubber.scrub("secret 0123456"), "secret 0123456");
        // Only at a cut: the same run mid-text is ordinary text.
        assert_eq!(scrubber.scrub("0123456789 then"), "0123456789 then");
        // A cut marked by an ellipsis, or inside an escape.
        assert_eq!(scrubber.scrub("x 0123456789…"), "x [redacted]…");
        assert_eq!(scrubber.scrub("x 0123456789... y"), "x [redacted]... y");
        let encoded = for_secret("s3cret pass/word");
        assert_eq!(encoded.scrub("was s3cret%20pass%2"), "was [redacted]");
        assert_eq!(encoded.scrub("was s3cret%20pass%"), "was [redacted]");
        assert_eq!(encoded.scrub("was s3cret+pass%2…"), "was [redacted]…");
    }

    #[test]
    fn a_cut_form_counts_only_past_its_public_start() {
        let mut scrubber = Scrubber::none();
        scrubber.add_form("client-id:0123456789", "client-id:".len());
        // The client id alone at the end is not the secret.
        assert_eq!(scrubber.scrub("unknown client-id:"), "unknown client-id:");
        assert_eq!(
            scrubber.scrub("unknown client-id:0123"),
            "unknown client-id:0123"
        );
        assert_eq!(scrubber.scrub("as client-id:01234567"), "as [redacted]");
    }

    #[test]
    fn basic_credentials_are_found_whole_and_cut() {
        let mut scrubber = Scrubber::none();
        let pair = "an-id:a secret+with/plus";
        scrubber.add_base64(pair.as_bytes(), "an-id:".len());
        let b64 = base64::engine::general_purpose::STANDARD.encode(pair);
        assert_eq!(scrubber.scrub(&format!("Basic {b64}")), "Basic [redacted]");
        // As it reads form-encoded, its `+` and `/` escaped.
        let escaped = b64.replace('+', "%2B").replace('/', "%2f");
        assert_eq!(
            scrubber.scrub(&format!("Basic {escaped}")),
            "Basic [redacted]"
        );
        let cut = &b64[..b64.len() - 6];
        assert_eq!(scrubber.scrub(&format!("Basic {cut}")), "Basic [redacted]");
        // The characters that encode only the id are not a secret's.
        let id_only = &b64[..8];
        assert_eq!(scrubber.scrub(id_only), id_only);
    }

    #[test]
    fn overlapping_and_repeated_matches_become_one_redaction_each() {
        let mut scrubber = for_secret("abcdefgh12");
        scrubber.add_secret("gh12345678");
        assert_eq!(scrubber.scrub("abcdefgh12345678"), "[redacted]");
        assert_eq!(
            scrubber.scrub("abcdefgh12 and abcdefgh12"),
            "[redacted] and [redacted]"
        );
        // A self-overlapping secret in a run of itself.
        let scrubber = for_secret("aaaaaaaab");
        assert_eq!(scrubber.scrub("aaaaaaaaaaab!"), "aaa[redacted]!");
    }

    #[test]
    fn redaction_keeps_whole_characters() {
        // A needle that decodes to a byte in the middle of a character.
        let mut scrubber = Scrubber::none();
        scrubber.add_form("%BC%C3%AFxyzxyzxyz", 0);
        let text = "ü\u{ef}xyzxyzxyz.";
        assert_eq!(scrubber.scrub(text), "[redacted].");
    }

    #[test]
    fn nothing_to_find_changes_nothing() {
        assert_eq!(Scrubber::none().scrub("a%41+b"), "a%41+b");
        let scrubber = for_secret("0123456789");
        assert_eq!(scrubber.scrub("a%41+b …"), "a%41+b …");
        assert_eq!(scrubber.scrub(""), "");
    }

    #[test]
    fn the_head_is_scrubbed_far_enough_past_the_cut() {
        let secret = "0123456789abcdef";
        let scrubber = for_secret(secret);
        // Every byte escaped twice, starting 5 characters before the cut
        // at 20.
        let digit = |d: u8| b"0123456789abcdef"[usize::from(d)];
        let escaped: String = secret
            .bytes()
            .map(|b| format!("%25%{:02x}%{:02x}", digit(b >> 4), digit(b & 15)))
            .collect();
        let text = format!("{}{escaped}{}", "x".repeat(15), "y".repeat(10_000));
        let (head, more) = scrubber.scrub_head(&text, 20);
        assert!(more);
        assert!(
            head.starts_with(&format!("{}[redacted]", "x".repeat(15))),
            "{head}"
        );
        assert!(head.len() < 200, "{}", head.len());
        let (all, more) = scrubber.scrub_head("short", 20);
        assert_eq!((all.as_str(), more), ("short", false));
    }

    #[test]
    fn the_work_is_linear_in_the_text() {
        // A text built to make a naive matcher backtrack at every byte.
        let scrubber = for_secret(&format!("{}b", "a".repeat(999)));
        let text = "a".repeat(1 << 20);
        let started = std::time::Instant::now();
        let shown = scrubber.scrub(&text);
        // A cut at the end: the last 999 bytes are a long part of it.
        assert!(shown.ends_with("[redacted]"));
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }
}
