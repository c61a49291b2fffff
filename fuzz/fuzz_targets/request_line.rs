//! Fuzzes `protocol::decode`, the parser of what any local caller can send
//! down the socket.
//!
//! The input is one request line, exactly as the connection handler passes
//! it (without its `\n`). Whatever the bytes, `decode` must return, and the
//! answer the daemon would send back must be one line of valid JSON that
//! echoes the caller's `id`: a pong or an error answer when the request
//! decoded, the decode error's own answer when it did not. Error messages
//! must stay bounded however long the request is. Tokens, caches and
//! sockets are out of scope here.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tokend::protocol::{decode, encode, ErrorBody, ErrorCode, Response};

/// `decode` quotes at most 64 characters of the caller's text (`clip`), and
/// a `{:?}`-escaped char is at most 10 bytes (`\u{10ffff}`): anything near
/// this bound means an error message grew with the request.
const MAX_MESSAGE_BYTES: usize = 1024;

fuzz_target!(|line: &[u8]| {
    match decode(line) {
        Ok(request) => {
            let id = request.id.as_ref();
            check_answer(id, &encode(id, &Response::Pong), true);
            let refusal = Response::Error(ErrorBody::new(ErrorCode::Forbidden, "no"));
            check_answer(id, &encode(id, &refusal), false);
        }
        Err(err) => {
            assert!(
                matches!(err.error.code, ErrorCode::BadRequest | ErrorCode::UnknownOp),
                "decode returned {:?}",
                err.error.code
            );
            assert!(
                err.error.message.len() <= MAX_MESSAGE_BYTES,
                "error message of {} bytes",
                err.error.message.len()
            );
            let id = err.id.as_ref();
            check_answer(id, &encode(id, &Response::Error(err.error.clone())), false);
        }
    }
});

/// One line, one JSON object, `ok` as expected and the caller's `id` back.
fn check_answer(id: Option<&Value>, answer: &[u8], ok: bool) {
    let shown = String::from_utf8_lossy(answer);
    let Some(body) = answer.strip_suffix(b"\n") else {
        panic!("answer does not end in a newline: {shown}");
    };
    assert!(!body.contains(&b'\n'), "answer spans lines: {shown}");
    let value: Value = match serde_json::from_slice(body) {
        Ok(value) => value,
        Err(e) => panic!("answer is not valid JSON ({e}): {shown}"),
    };
    let Value::Object(fields) = value else {
        panic!("answer is not a JSON object: {shown}");
    };
    assert_eq!(fields.get("ok"), Some(&Value::Bool(ok)), "{shown}");
    match (id, fields.get("id")) {
        (None, None) => {}
        (Some(sent), Some(echoed)) => {
            assert!(same(sent, echoed), "id {sent} came back as {echoed}")
        }
        (sent, echoed) => panic!("id {sent:?} came back as {echoed:?}"),
    }
}

/// JSON equality, except that floats need only agree to a relative 1e-12
/// or a few units in the last place (for subnormals): serde_json parses
/// floats with best-effort precision (no `float_roundtrip` feature), so an
/// id like `1.2e-300` may come back slightly off. That is serde_json's
/// documented trade-off, not a decode bug.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => {
                    x == y
                        || (x - y).abs() <= 1e-12 * x.abs().max(y.abs())
                        || (x.signum() == y.signum() && x.to_bits().abs_diff(y.to_bits()) <= 16)
                }
                _ => false,
            }
        }
        (Value::Array(xs), Value::Array(ys)) => {
            xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| same(x, y))
        }
        (Value::Object(xs), Value::Object(ys)) => {
            xs.len() == ys.len()
                && xs
                    .iter()
                    .all(|(k, x)| ys.get(k).is_some_and(|y| same(x, y)))
        }
        _ => a == b,
    }
}
