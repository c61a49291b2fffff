//! Fuzzes `config::parse`, the pure half of loading the configuration file.
//!
//! The input is the file's text: arbitrary bytes cut at their first invalid
//! UTF-8 sequence (`load` refuses non-UTF-8 files before parsing). `parse`
//! must return, every error must be the located kind that renders as
//! `FILE:LINE:COL: message` with a line and column that exist in the text,
//! and an accepted configuration's `Debug` must not depend on its client
//! secrets. Reading files (modes, `client_secret_file`) is `load`'s part and
//! not fuzzed here.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tokend::config::{parse, Config, ConfigError, KeyConfig};
use tokend::secret::ClientSecret;

const FILE: &str = "fuzz.toml";

fuzz_target!(|data: &[u8]| {
    let text = match std::str::from_utf8(data) {
        Ok(text) => text,
        Err(e) => std::str::from_utf8(&data[..e.valid_up_to()])
            .expect("bytes up to valid_up_to() are UTF-8"),
    };
    match parse(text, Path::new(FILE)) {
        Ok(config) => check_config(&config),
        Err(err) => check_error(text, &err),
    }
});

fn check_error(text: &str, err: &ConfigError) {
    let shown = err.to_string();
    let ConfigError::At {
        path,
        line,
        column,
        message,
    } = err
    else {
        panic!("parse returned an error without a position: {shown}");
    };
    assert_eq!(path, Path::new(FILE), "{shown}");
    assert_eq!(shown, format!("{FILE}:{line}:{column}: {message}"));
    // Lines and columns are 1-based; a column may point just past the
    // line's last character (an error at the end of a line or the text).
    let lines: Vec<&str> = text.split('\n').collect();
    assert!(
        (1..=lines.len()).contains(line),
        "line {line} of a {}-line text: {shown}",
        lines.len()
    );
    let width = lines[line - 1].chars().count();
    assert!(
        (1..=width + 1).contains(column),
        "column {column} of a {width}-character line: {shown}"
    );
}

/// What `parse` promises of a configuration it accepts, and that swapping
/// every client secret leaves its `Debug` unchanged.
fn check_config(config: &Config) {
    let daemon = &config.daemon;
    assert!(daemon.socket_mode <= 0o777);
    assert!(daemon.max_connections >= 1);
    assert!(daemon.max_connections_per_uid >= 1);
    assert!(!daemon.idle_timeout.is_zero());
    assert!(!daemon.request_timeout_client.is_zero());
    assert!(daemon.max_request_bytes >= 256);
    if let Some(address) = daemon.metrics_listen {
        assert!(
            address.ip().is_loopback() || daemon.metrics_listen_non_loopback,
            "metrics_listen {address} accepted without metrics_listen_non_loopback"
        );
    }
    for (name, key) in &config.keys {
        assert!(
            !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
            "key name {name:?} accepted"
        );
        assert!(!key.client_id.is_empty(), "key {name:?}: empty client_id");
        assert!(!key.request_timeout.is_zero(), "key {name:?}: zero timeout");
    }
    let swapped = Config {
        daemon: config.daemon.clone(),
        keys: config
            .keys
            .iter()
            .map(|(name, key)| {
                let other = format!("{}-other", key.client_secret.expose());
                let key = KeyConfig {
                    client_secret: ClientSecret::new(other),
                    ..key.clone()
                };
                (name.clone(), key)
            })
            .collect(),
    };
    assert_eq!(
        format!("{config:?}"),
        format!("{swapped:?}"),
        "Debug of a Config shows a client secret"
    );
}
