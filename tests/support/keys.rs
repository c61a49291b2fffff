//! The `[keys.NAME]` tables tests configure, built in one place, and the
//! list of secrets a test checks the daemon's log against.
//!
//! [`Key`] writes a table field by field: `Key::new("payments")
//! .issuer(&issuer, Dialect::Checkout).client("id", "secret")
//! .allow_uids(&[0]).extra("prefetch = [[]]").toml()`. Values are quoted
//! by the `toml` crate, so any string (quotes, backslashes, non-ASCII)
//! comes out as the same TOML string. It does not check what it writes:
//! tests also build keys tokend must refuse.
#![allow(dead_code, unreachable_pub)]

use std::path::Path;

use super::issuer::{Dialect, Issuer};

/// Where a key's client secret comes from.
#[derive(Clone)]
enum Source {
    None,
    Inline(String),
    File(String),
}

/// One `[keys.NAME]` table.
#[derive(Clone)]
#[must_use]
pub struct Key {
    name: String,
    token_url: Option<String>,
    client_id: Option<String>,
    secret: Source,
    allow_uids: Option<Vec<u32>>,
    allow_users: Option<Vec<String>>,
    allow_groups: Option<Vec<String>>,
    extra: Vec<String>,
}

impl Key {
    pub fn new(name: &str) -> Key {
        Key {
            name: name.to_owned(),
            token_url: None,
            client_id: None,
            secret: Source::None,
            allow_uids: None,
            allow_users: None,
            allow_groups: None,
            extra: Vec::new(),
        }
    }

    /// `token_url`, as written.
    pub fn url(mut self, url: &str) -> Key {
        self.token_url = Some(url.to_owned());
        self
    }

    /// `token_url`: `issuer`'s endpoint for `dialect`.
    pub fn issuer(self, issuer: &Issuer, dialect: Dialect) -> Key {
        self.url(&issuer.token_url(dialect))
    }

    /// `client_id` and an inline `client_secret`.
    pub fn client(self, id: &str, secret: &str) -> Key {
        self.client_id(id).secret(secret)
    }

    /// `client_id` alone.
    pub fn client_id(mut self, id: &str) -> Key {
        self.client_id = Some(id.to_owned());
        self
    }

    /// An inline `client_secret`.
    pub fn secret(mut self, secret: &str) -> Key {
        self.secret = Source::Inline(secret.to_owned());
        self
    }

    /// `client_secret_file`.
    pub fn secret_file(mut self, path: &Path) -> Key {
        self.secret = Source::File(path.display().to_string());
        self
    }

    /// `allow_uids`.
    pub fn allow_uids(mut self, uids: &[u32]) -> Key {
        self.allow_uids = Some(uids.to_vec());
        self
    }

    /// `allow_users`.
    pub fn allow_users(mut self, users: &[&str]) -> Key {
        self.allow_users = Some(users.iter().map(|&u| u.to_owned()).collect());
        self
    }

    /// `allow_groups`.
    pub fn allow_groups(mut self, groups: &[&str]) -> Key {
        self.allow_groups = Some(groups.iter().map(|&g| g.to_owned()).collect());
        self
    }

    /// `allow_uids` naming the uid running the tests.
    pub fn allow_me(self) -> Key {
        self.allow_uids(&[nix::unistd::getuid().as_raw()])
    }

    /// More lines of the table, written as they are, after the others.
    pub fn extra(mut self, lines: &str) -> Key {
        if !lines.is_empty() {
            self.extra.push(lines.to_owned());
        }
        self
    }

    /// The table, ending in a blank line so tables can be concatenated.
    pub fn toml(&self) -> String {
        let mut text = format!("[keys.{}]\n", self.name);
        let mut line = |name: &str, value: &str| {
            text.push_str(&format!("{name} = {}\n", quote(value)));
        };
        if let Some(url) = &self.token_url {
            line("token_url", url);
        }
        if let Some(id) = &self.client_id {
            line("client_id", id);
        }
        match &self.secret {
            Source::None => {}
            Source::Inline(secret) => line("client_secret", secret),
            Source::File(path) => line("client_secret_file", path),
        }
        let mut list = |name: &str, items: Vec<String>| {
            text.push_str(&format!("{name} = [{}]\n", items.join(", ")));
        };
        if let Some(uids) = &self.allow_uids {
            list("allow_uids", uids.iter().map(u32::to_string).collect());
        }
        if let Some(users) = &self.allow_users {
            list("allow_users", users.iter().map(|u| quote(u)).collect());
        }
        if let Some(groups) = &self.allow_groups {
            list("allow_groups", groups.iter().map(|g| quote(g)).collect());
        }
        for lines in &self.extra {
            text.push_str(lines);
            text.push('\n');
        }
        text.push('\n');
        text
    }
}

/// `value` as a TOML string.
fn quote(value: &str) -> String {
    toml::Value::String(value.to_owned()).to_string()
}

/// The tables of `keys`, one after another.
pub fn tables(keys: &[Key]) -> String {
    keys.iter().map(Key::toml).collect()
}

/// What a test checks the daemon's log against: every token `issuers`
/// handed out, and `more` (client secrets, other tokens).
pub fn secrets<S: AsRef<str>>(issuers: &[&Issuer], more: &[S]) -> Vec<String> {
    let mut all: Vec<String> = issuers.iter().flat_map(|i| i.issued_tokens()).collect();
    all.extend(more.iter().map(|s| s.as_ref().to_owned()));
    all
}

/// The commented-out `[keys.NAME]` example of `config/tokend.toml` (each
/// line commented with "# ", its prose with "# # "), up to the first empty
/// line, with the first "# " of each line removed; and the file's path.
pub fn example_block(name: &str) -> (String, std::path::PathBuf) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tokend.toml");
    let text = std::fs::read_to_string(&path).expect("read config/tokend.toml");
    let start = text
        .find(&format!("# [keys.{name}]"))
        .unwrap_or_else(|| panic!("the example has a [keys.{name}] block"));
    let block = text[start..]
        .lines()
        .take_while(|line| !line.is_empty())
        .map(|line| line.strip_prefix("# ").unwrap_or(line))
        .map(|line| format!("{line}\n"))
        .collect();
    (block, path)
}
