//! Finding a secret in text an issuer or a proxy wrote, whatever encoding
//! it chose, and redacting it.
//!
//! A server that quotes what it received (in an error description, an
//! error page, a content type) may re-encode it with its own encoder:
//! JavaScript's `encodeURIComponent`, Python's `quote_plus` or
//! `json.dumps`, PHP's `json_encode`, an HTML template. Matching only the
//! encodings tokend itself sends misses those, so the rule is that any
//! text that decodes to a secret is the secret.
//!
//! Two sides meet. The text is read as written and through *readings*
//! ([`Decoded`]): one of three decoders ([`Scheme`]: percent escapes and
//! `+`; JSON string escapes; HTML character references) applied once, or
//! two applied one after the other in either order (a JSON string quoted
//! in a URL, a percent-encoded body in an HTML page). Each reading keeps a
//! map from its bytes back to where their encodings start, so that what is
//! redacted is the text as written. The secret is looked for in *forms*
//! ([`Scrubber::add_secret`]): as written, as tokend form-encodes it, and
//! in base64 and base64url. Each form is looked for in every reading, so
//! the two multiply: a form-encoded secret in JSON escapes is found too.
//! Unicode normal forms are not compared (a secret with `é` quoted back as
//! `e` and a combining accent): that needs Unicode's normalisation tables
//! (`icu_normalizer`), most of a megabyte of code and data linked into the
//! daemon and largely resident in an idle one, for secrets that are ASCII
//! whenever an issuer generates them.
//!
//! Two rules keep ordinary words readable:
//! - a needle shorter than [`SHORT`] bytes is redacted only where it stands
//!   alone, with no letter, digit or `_` (in any script) against either
//!   end (a secret `abc` is redacted in `secret=abc` and `“abc”` but not in
//!   `abcdef` or `déjàabc`);
//! - a run cut off by the end of the text, or by an ellipsis (`…`, `...`)
//!   that marks a cut, counts when it holds at least [`SHORT`] bytes of
//!   the secret itself: a server that bounds its text may cut a quoted
//!   secret short, and what is left of it is still redacted. The mirror
//!   too: a run at the start of the text, or just after an ellipsis, that
//!   holds the last [`SHORT`] bytes or more of a secret, as a server that
//!   masks all but a secret's tail writes it.
//!
//! Each needle is matched with Knuth–Morris–Pratt, forwards for whole
//! needles and cut starts, backwards for cut tails, so the work is linear
//! in the text's length times the number of needles times the (at most
//! 13) readings, whatever the text holds.
//!
//! This module knows nothing of keys or of HTTP: [`crate::issuer`] and
//! [`crate::transport`] say which secrets a request carries.

use std::ops::Range;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use zeroize::Zeroizing;

/// Needles shorter than this many bytes match only as words of their own,
/// and a cut run must hold this many bytes of the secret to count: fewer
/// would redact pieces of ordinary words.
pub const SHORT: usize = 8;

const REDACTED: &str = "[redacted]";

/// How many decoders a reading applies one after the other: one for a
/// server that re-encodes what it received, two for one that quotes a
/// request it encoded again (a request body quoted inside a URL, a JSON
/// string inside an HTML page).
const DEPTH: u32 = 2;

/// The most digits an HTML numeric reference is read with: enough for any
/// code point in decimal (1114111) and a leading zero or two in hex. An
/// encoder writes the shortest form; a longer one is left as written, and
/// the bound keeps [`WIDEST`] small.
const MAX_DIGITS: usize = 7;

/// The longest encoding of one decoded byte in any [`Scheme`]: an HTML
/// reference with [`MAX_DIGITS`] digits, `&#x0000041;` for `A`.
const WIDEST: usize = "&#x;".len() + MAX_DIGITS;

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

    /// `secret` and everything that decodes to it: as written, in the two
    /// encodings tokend sends
    /// (form-urlencoded, with `+` and with `%20` for a space; matched as
    /// written for a text whose decoding starts mid-escape just before
    /// them), and in base64 and base64url.
    pub fn add_secret(&mut self, secret: &str) {
        if secret.is_empty() {
            return;
        }
        self.add_sent_forms(secret);
        // Padding only follows the characters: without it, the needle is
        // found in the padded text as well.
        for engine in [STANDARD_NO_PAD, URL_SAFE_NO_PAD] {
            let mut encoded = Zeroizing::new(String::with_capacity(base64_len(secret.len())));
            engine.encode_string(secret, &mut encoded);
            self.add_form(&encoded, 0);
        }
    }

    /// `secret` as written and as tokend form-encodes it.
    fn add_sent_forms(&mut self, secret: &str) {
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
    /// whole, or cut short once past them. Also as it percent-decodes.
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
        let mut encoded = Zeroizing::new(String::with_capacity(base64_len(bytes.len())));
        STANDARD.encode_string(bytes, &mut encoded);
        // Each 4 characters encode 3 bytes: only whole groups of public
        // bytes give characters that are not secret.
        self.add_form(&encoded, public / 3 * 4);
    }

    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// The longest stretch of raw text one match can cover: a needle
    /// whose every byte took the longest encoding [`DEPTH`] decodings undo
    /// ([`WIDEST`] bytes for a byte, each of them escaped so again).
    fn reach(&self) -> usize {
        let longest = self.needles.iter().map(|n| n.bytes.len()).max();
        longest.unwrap_or(0) * WIDEST.pow(DEPTH)
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
        self.find(raw, &mut |span| spans.push(span));
        // Each reading decodes the one before with each scheme, so that
        // text encoded twice, the same way or two ways, is found too. A
        // scheme that finds nothing to decode makes no reading.
        let mut readings: Vec<Decoded> = SCHEMES
            .iter()
            .filter_map(|&scheme| Decoded::new(raw, scheme))
            .collect();
        for depth in 1..=DEPTH {
            let mut next = Vec::new();
            for reading in &readings {
                self.find(&reading.bytes, &mut |span| {
                    spans.push(reading.raw_span(span))
                });
                if depth < DEPTH {
                    next.extend(SCHEMES.iter().filter_map(|&scheme| reading.again(scheme)));
                }
            }
            readings = next;
        }
        redact(text, spans)
    }

    fn find(&self, stream: &[u8], found: &mut impl FnMut(Range<usize>)) {
        for needle in &self.needles {
            needle.find(stream, found);
            needle.find_tails(stream, found);
        }
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

fn base64_len(bytes: usize) -> usize {
    4 * bytes.div_ceil(3)
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
    /// The same for the needle read backwards, to find its tails.
    tail_borders: Vec<usize>,
}

impl Needle {
    fn new(bytes: Zeroizing<Vec<u8>>, public: usize) -> Needle {
        let len = bytes.len();
        let borders = borders_of(len, |i| bytes[i]);
        let tail_borders = borders_of(len, |i| bytes[len - 1 - i]);
        Needle {
            bytes,
            public,
            borders,
            tail_borders,
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

    /// Reports each run just after a cut (the start of the stream, an
    /// ellipsis) that is the last [`SHORT`] bytes or more of this needle:
    /// [`Needle::find`] mirrored, matching the needle backwards from the
    /// stream's end, so the matcher's state at each position is the
    /// longest tail of the needle that starts there.
    fn find_tails(&self, stream: &[u8], found: &mut impl FnMut(Range<usize>)) {
        let len = self.bytes.len();
        if len.saturating_sub(self.public) < SHORT {
            return;
        }
        let from_end = |i: usize| self.bytes[len - 1 - i];
        let mut matched = 0;
        for (i, &byte) in stream.iter().enumerate().rev() {
            while matched > 0 && from_end(matched) != byte {
                matched = self.tail_borders[matched - 1];
            }
            if from_end(matched) == byte {
                matched += 1;
            }
            // A whole needle is `find`'s.
            if (SHORT..len).contains(&matched) && cut_before(&stream[..i]) {
                found(i..i + matched);
            }
            if matched == len {
                matched = self.tail_borders[len - 1];
            }
        }
    }
}

/// Knuth–Morris–Pratt's failure function of the `len` bytes `at` gives.
fn borders_of(len: usize, at: impl Fn(usize) -> u8) -> Vec<usize> {
    let mut borders = vec![0; len];
    let mut k = 0;
    for i in 1..len {
        while k > 0 && at(i) != at(k) {
            k = borders[k - 1];
        }
        if at(i) == at(k) {
            k += 1;
        }
        borders[i] = k;
    }
    borders
}

/// Whether a cut lies at the start of `rest`: the end of the text or an
/// ellipsis, maybe after the start of an escape the cut split (`%2`,
/// `\u00`, `&am`, `&#x4`). Returns the length of that start, which
/// belongs to the cut run.
fn cut_at(rest: &[u8]) -> Option<usize> {
    // An escape's start then more text is not one the cut split: `%2`
    // then `x` is a `%` that was never an escape.
    (0..WIDEST.min(rest.len() + 1))
        .filter(|&partial| partial == 0 || opens_escape(&rest[..partial]))
        .find(|&partial| {
            let after = &rest[partial..];
            after.is_empty() || ELLIPSES.iter().any(|e| after.starts_with(e))
        })
}

/// Whether `start` is the start of an escape of some [`Scheme`], short of
/// its end.
fn opens_escape(start: &[u8]) -> bool {
    let hex = |digits: &[u8], most: usize| {
        digits.len() <= most && digits.iter().all(u8::is_ascii_hexdigit)
    };
    match start {
        [b'%', digits @ ..] => hex(digits, 1),
        [b'\\'] => true,
        [b'\\', b'u', digits @ ..] => hex(digits, 3),
        [b'&', b'#', b'x' | b'X', digits @ ..] => hex(digits, MAX_DIGITS),
        [b'&', b'#', digits @ ..] => {
            digits.len() <= MAX_DIGITS && digits.iter().all(u8::is_ascii_digit)
        }
        [b'&', name @ ..] => ["amp", "lt", "gt", "quot", "apos"]
            .iter()
            .any(|known| known.as_bytes().starts_with(name)),
        _ => false,
    }
}

/// Whether a cut lies at the end of `head`: the start of the text or an
/// ellipsis.
fn cut_before(head: &[u8]) -> bool {
    head.is_empty() || ELLIPSES.iter().any(|e| head.ends_with(e))
}

/// Whether `span` of `stream` has no word character (a letter or digit of
/// any script, or `_`) against either end. A byte that is no character
/// (a reading may hold any byte) is not a word's.
fn stands_alone(stream: &[u8], span: &Range<usize>) -> bool {
    let word = |c: char| c.is_alphanumeric() || c == '_';
    !char_before(&stream[..span.start]).is_some_and(word)
        && !char_after(&stream[span.end..]).is_some_and(word)
}

/// The UTF-8 character `head` ends with, if it ends with one.
fn char_before(head: &[u8]) -> Option<char> {
    // The shortest valid end is one character: a longer one would have a
    // shorter valid end.
    (1..=head.len().min(4)).find_map(|width| {
        std::str::from_utf8(&head[head.len() - width..])
            .ok()
            .and_then(|s| s.chars().next())
    })
}

/// The UTF-8 character `rest` starts with, if it starts with one.
fn char_after(rest: &[u8]) -> Option<char> {
    let head = &rest[..rest.len().min(4)];
    let valid = match std::str::from_utf8(head) {
        Ok(all) => all,
        Err(e) => std::str::from_utf8(&head[..e.valid_up_to()]).ok()?,
    };
    valid.chars().next()
}

/// `%XX` (either case) as its byte and `+` as a space; a `%` without two
/// hex digits after it stays as it is.
fn decode(raw: &[u8]) -> Zeroizing<Vec<u8>> {
    match Decoded::new(raw, Scheme::Percent) {
        Some(decoded) => decoded.bytes,
        None => Zeroizing::new(raw.to_vec()),
    }
}

/// An encoding servers re-encode quoted text with.
#[derive(Clone, Copy, Debug)]
enum Scheme {
    /// `%XX` in either case of hex, and `+` for a space: URLs and form
    /// bodies.
    Percent,
    /// JSON string escapes (RFC 8259 7): `\"`, `\\`, `\/`, `\b`, `\f`,
    /// `\n`, `\r`, `\t`, and `\uXXXX`, a surrogate pair as one character.
    Json,
    /// HTML character references: `&amp;`, `&lt;`, `&gt;`, `&quot;`,
    /// `&apos;`, and `&#NNN;` or `&#xHH;` of up to [`MAX_DIGITS`] digits.
    Html,
}

const SCHEMES: [Scheme; 3] = [Scheme::Percent, Scheme::Json, Scheme::Html];

impl Scheme {
    /// Whether `text` has the byte every escape of this scheme starts with.
    fn may_escape(self, text: &[u8]) -> bool {
        let starts: &[u8] = match self {
            Scheme::Percent => b"%+",
            Scheme::Json => b"\\",
            Scheme::Html => b"&",
        };
        text.iter().any(|b| starts.contains(b))
    }

    /// If `rest` starts with an escape, pushes what it stands for onto
    /// `out` and returns its length. Each escape is shorter than what it
    /// stands for, so a decoding is never longer than its text.
    fn decode_at(self, rest: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        match self {
            Scheme::Percent => percent_at(rest, out),
            Scheme::Json => json_at(rest, out),
            Scheme::Html => html_at(rest, out),
        }
    }
}

fn percent_at(rest: &[u8], out: &mut Vec<u8>) -> Option<usize> {
    match rest {
        [b'%', digits @ ..] => {
            let byte = u8::try_from(number(digits.get(..2)?, 16)?).ok()?;
            out.push(byte);
            Some(3)
        }
        [b'+', ..] => {
            out.push(b' ');
            Some(1)
        }
        _ => None,
    }
}

fn json_at(rest: &[u8], out: &mut Vec<u8>) -> Option<usize> {
    let [b'\\', kind, ..] = rest else {
        return None;
    };
    let byte = match kind {
        b'"' | b'\\' | b'/' => *kind,
        b'b' => 0x08,
        b'f' => 0x0c,
        b'n' => b'\n',
        b'r' => b'\r',
        b't' => b'\t',
        b'u' => return json_unicode_at(rest, out),
        _ => return None,
    };
    out.push(byte);
    Some(2)
}

/// `\uXXXX`, or a UTF-16 surrogate pair of two as one character. A lone
/// surrogate is no character and stays as written.
fn json_unicode_at(rest: &[u8], out: &mut Vec<u8>) -> Option<usize> {
    let unit = |at: usize| {
        let escape = rest.get(at..at + 6)?;
        escape
            .starts_with(b"\\u")
            .then(|| number(&escape[2..], 16))
            .flatten()
    };
    let first = unit(0)?;
    let (code, width) = match first {
        0xd800..=0xdbff => {
            let second = unit(6).filter(|low| (0xdc00..=0xdfff).contains(low))?;
            (0x10000 + ((first - 0xd800) << 10) + (second - 0xdc00), 12)
        }
        _ => (first, 6),
    };
    push_char(char::from_u32(code)?, out);
    Some(width)
}

fn html_at(rest: &[u8], out: &mut Vec<u8>) -> Option<usize> {
    if rest.first() != Some(&b'&') {
        return None;
    }
    let end = rest.iter().take(WIDEST).position(|&b| b == b';')?;
    let c = match &rest[1..end] {
        b"amp" => '&',
        b"lt" => '<',
        b"gt" => '>',
        b"quot" => '"',
        b"apos" => '\'',
        [b'#', b'x' | b'X', hex @ ..] => char::from_u32(number(hex, 16)?)?,
        [b'#', decimal @ ..] => char::from_u32(number(decimal, 10)?)?,
        _ => return None,
    };
    push_char(c, out);
    Some(end + 1)
}

/// `digits` as a number in `radix`: one to [`MAX_DIGITS`] digits and
/// nothing else (no sign, which `from_str_radix` would take).
fn number(digits: &[u8], radix: u32) -> Option<u32> {
    if digits.is_empty() || digits.len() > MAX_DIGITS {
        return None;
    }
    digits.iter().try_fold(0u32, |value, &d| {
        Some(value * radix + char::from(d).to_digit(radix)?)
    })
}

fn push_char(c: char, out: &mut Vec<u8>) {
    out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
}

/// A text decoded, and where in the text each decoded byte came from.
struct Decoded {
    /// Never grown past its first allocation, so no copy is left unwiped.
    bytes: Zeroizing<Vec<u8>>,
    /// The text offset each decoded byte's encoding starts at (every byte
    /// of a character one escape stands for maps to that escape), and the
    /// text's length last.
    starts: Vec<usize>,
}

impl Decoded {
    /// `raw` decoded by `scheme`, or `None` when it holds no escape of it.
    fn new(raw: &[u8], scheme: Scheme) -> Option<Decoded> {
        if !scheme.may_escape(raw) {
            return None;
        }
        let mut bytes = Zeroizing::new(Vec::with_capacity(raw.len()));
        let mut starts = Vec::with_capacity(raw.len() + 1);
        let mut escaped = false;
        let mut i = 0;
        while i < raw.len() {
            let before = bytes.len();
            let width = match scheme.decode_at(&raw[i..], &mut bytes) {
                Some(width) => {
                    escaped = true;
                    width
                }
                None => {
                    bytes.push(raw[i]);
                    1
                }
            };
            starts.resize(starts.len() + bytes.len() - before, i);
            i += width;
        }
        starts.push(raw.len());
        escaped.then_some(Decoded { bytes, starts })
    }

    /// This reading decoded once more by `scheme`, its map still into the
    /// text.
    fn again(&self, scheme: Scheme) -> Option<Decoded> {
        let mut next = Decoded::new(&self.bytes, scheme)?;
        for start in &mut next.starts {
            *start = self.starts[*start];
        }
        Some(next)
    }

    /// The text that `decoded` (a range of decoded bytes) came from.
    fn raw_span(&self, decoded: Range<usize>) -> Range<usize> {
        self.starts[decoded.start]..self.starts[decoded.end]
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
        let decoded = Decoded::new(b"x%41+y", Scheme::Percent).unwrap();
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
        let decoded = Decoded::new(b"%2541+", Scheme::Percent)
            .and_then(|d| d.again(Scheme::Percent))
            .unwrap();
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
        // Inside a JSON escape or an HTML reference.
        for (text, shown) in [
            ("x 0123456789\\", "x [redacted]"),
            ("x 0123456789\\u00", "x [redacted]"),
            ("x 0123456789&am", "x [redacted]"),
            ("x 0123456789&#x4…", "x [redacted]…"),
            ("x 0123456789&#6...", "x [redacted]..."),
            // Not a cut: the escape's start, then more text.
            ("x 0123456789&am y", "x 0123456789&am y"),
            ("x 0123456789\\q", "x 0123456789\\q"),
        ] {
            assert_eq!(scrubber.scrub(text), shown, "{text}");
        }
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
        // Read only as far as a needle's widest encoding reaches.
        assert!(head.len() <= 20 + scrubber.reach(), "{}", head.len());
        assert!(head.len() < text.len() / 2, "{}", head.len());
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

    fn read(raw: &[u8], scheme: Scheme) -> Vec<u8> {
        Decoded::new(raw, scheme).map_or(raw.to_vec(), |d| d.bytes.to_vec())
    }

    #[test]
    fn the_json_reading_undoes_every_string_escape() {
        assert_eq!(
            read(br#"a\/b\"c\\d\b\f\n\r\te"#, Scheme::Json),
            b"a/b\"c\\d\x08\x0c\n\r\te"
        );
        assert_eq!(
            read(br"gr\u00fcne \u00FC", Scheme::Json),
            "grüne ü".as_bytes()
        );
        // A surrogate pair is one character.
        assert_eq!(read(br"\ud83d\ude00!", Scheme::Json), "😀!".as_bytes());
        // Not escapes: a lone surrogate, short or non-hex digits, an
        // unknown letter.
        for kept in [
            &br"\ud83d!"[..],
            br"\ude00",
            br"\u00f",
            br"\u00fg",
            br"\u+0fc",
            br"\x41",
            br"end\",
        ] {
            assert_eq!(read(kept, Scheme::Json), kept);
        }
        // `\\` is one escape: what follows it is text.
        assert_eq!(read(br"\\u0041", Scheme::Json), br"\u0041");
    }

    #[test]
    fn the_json_reading_maps_each_byte_back_to_its_escape() {
        let decoded = Decoded::new(br"x\/\u00fcy", Scheme::Json).unwrap();
        assert_eq!(*decoded.bytes, "x/üy".as_bytes());
        // Both bytes of `ü` come from the one escape at 3.
        assert_eq!(decoded.starts, [0, 1, 3, 3, 9, 10]);
        assert_eq!(decoded.raw_span(1..4), 1..9);
    }

    #[test]
    fn the_html_reading_undoes_named_and_numeric_references() {
        assert_eq!(
            read(
                b"a&amp;b&lt;c&gt;d&quot;e&apos;f&#39;g&#039;h",
                Scheme::Html
            ),
            b"a&b<c>d\"e'f'g'h"
        );
        assert_eq!(
            read(b"&#x41;&#X42;&#x00fc;&#252;", Scheme::Html),
            "ABüü".as_bytes()
        );
        assert_eq!(read(b"&#128512;", Scheme::Html), "😀".as_bytes());
        // Not references: no `;`, an unknown name, too many digits, no
        // character (a surrogate, past U+10FFFF), empty, a sign.
        for kept in [
            &b"&amp"[..],
            b"&nbsp;",
            b"&#00000065;",
            b"&#xd800;",
            b"&#x110000;",
            b"&#;",
            b"&#x;",
            b"&#+65;",
            b"AT&T; &",
        ] {
            assert_eq!(read(kept, Scheme::Html), kept);
        }
        let decoded = Decoded::new(b"a&amp;&#x41;", Scheme::Html).unwrap();
        assert_eq!(*decoded.bytes, b"a&A");
        assert_eq!(decoded.starts, [0, 1, 6, 12]);
    }

    #[test]
    fn a_scheme_with_nothing_to_decode_makes_no_reading() {
        for scheme in SCHEMES {
            assert!(Decoded::new(b"plain text", scheme).is_none(), "{scheme:?}");
        }
        assert!(Decoded::new(b"100%", Scheme::Percent).is_none());
        assert!(Decoded::new(br"a\b", Scheme::Json).is_some());
        assert!(Decoded::new(br"a\q", Scheme::Json).is_none());
        assert!(Decoded::new(b"AT&T", Scheme::Html).is_none());
    }

    #[test]
    fn a_secret_in_json_or_html_escapes_is_redacted_as_written() {
        let scrubber = for_secret("s3cr\"t/v\\al&ue<ü>42");
        for echoed in [
            // PHP json_encode, Python json.dumps, serde_json.
            r#"s3cr\"t\/v\\al&ue<\u00fc>42"#,
            r#"s3cr\"t/v\\al&ue<\u00FC>42"#,
            r#"s3cr\"t/v\\al&ue<ü>42"#,
            // html.escape, htmlspecialchars, numeric references.
            "s3cr&quot;t/v\\al&amp;ue&lt;ü&gt;42",
            "s3cr&#34;t/v\\al&#x26;ue&#60;&#252;&#62;42",
            // JSON inside HTML, and percent-encoded JSON.
            r#"s3cr\&quot;t\/v\\al&amp;ue&lt;\u00fc&gt;42"#,
            "s3cr%5C%22t%5C%2Fv%5C%5Cal%26ue%3C%5Cu00fc%3E42",
        ] {
            let shown = scrubber.scrub(&format!("got {echoed}, refused"));
            assert_eq!(shown, "got [redacted], refused", "{echoed}");
        }
    }

    #[test]
    fn a_secret_in_base64_is_redacted_padded_or_not() {
        use base64::engine::general_purpose::URL_SAFE;
        // Bytes whose base64 holds `+` and `/`, and `-`, `_` in base64url.
        let secret = "s3cret>>>???~~~";
        let scrubber = for_secret(secret);
        for echoed in [
            STANDARD.encode(secret),
            STANDARD_NO_PAD.encode(secret),
            URL_SAFE.encode(secret),
            URL_SAFE_NO_PAD.encode(secret),
        ] {
            let shown = scrubber.scrub(&format!("got {echoed} here"));
            assert!(
                shown == "got [redacted] here" || shown == "got [redacted]= here",
                "{echoed}: {shown}"
            );
        }
    }

    #[test]
    fn a_tail_of_a_secret_after_a_cut_is_redacted_from_a_long_part() {
        let scrubber = for_secret("0123456789abcdef-xyz");
        assert_eq!(scrubber.scrub("was ...89abcdef-xyz"), "was ...[redacted]");
        assert_eq!(scrubber.scrub("was …cdef-xyz!"), "was …[redacted]!");
        assert_eq!(
            scrubber.scrub("cdef-xyz at the start"),
            "[redacted] at the start"
        );
        // Exactly SHORT bytes of it is enough; one fewer is not.
        assert_eq!(scrubber.scrub("...def-xyz"), "...def-xyz");
        // Only after a cut: the same run mid-text is ordinary text.
        assert_eq!(scrubber.scrub("was 89abcdef-xyz"), "was 89abcdef-xyz");
        // Not past a form's public start.
        let mut form = Scrubber::none();
        form.add_form("a-public-client-id:secret7", "a-public-client-id:".len());
        assert_eq!(form.scrub("...-client-id:secret7"), "...-client-id:secret7");
    }

    #[test]
    fn a_short_secret_stands_alone_beside_any_non_letter() {
        let scrubber = for_secret("hunt3r");
        for (text, shown) in [
            ("“hunt3r”", "“[redacted]”"),
            ("«hunt3r»", "«[redacted]»"),
            ("‘hunt3r’ — no", "‘[redacted]’ — no"),
            ("\\u201chunt3r\\u201d", "\\u201c[redacted]\\u201d"),
            // Letters and digits of any script make a word.
            ("éhunt3r", "éhunt3r"),
            ("hunt3rж", "hunt3rж"),
            ("hunt3r٣", "hunt3r٣"),
        ] {
            assert_eq!(scrubber.scrub(text), shown, "{text}");
        }
    }
}
