//! Server-defined mutators: named, parameterised SQL blocks an app defines on the server and
//! clients call by name (`Call`), so the server decides what each client may change.
//!
//! A definitions file (`pagesync-server --mutators FILE`) holds blocks, each headed by a line
//! `-- mutator: NAME(ARG, ...)` and followed by its statements:
//!
//! ```sql
//! -- mutator: add_todo(title)
//! INSERT INTO todos(title, owner, created_ms) VALUES (:title, :subject, :now);
//!
//! -- mutator: delete_own(id)
//! SELECT reject('only its owner may delete a todo') FROM todos WHERE id = :id AND owner IS NOT :subject;
//! DELETE FROM todos WHERE id = :id;
//! ```
//!
//! Each argument is bound by name (`:title`), and two more are: `:subject`, the `sub` claim of
//! the caller's token, and `:now`, the mutation's time in ms since the Unix epoch (the same
//! clock `datetime('now')` reads). `reject(message)` (a SQL function of every pagesync
//! connection) rejects the mutation with code `denied` and the app's message; a mutator checks
//! a condition with `SELECT reject('...') WHERE ...`. A call runs like any mutation: in its own
//! savepoint, in the sandbox and under the budget, deterministically, optimistically on the
//! client (with the definitions the server sent it) and for real on the server.
//!
//! The definitions are versioned by their content (`version`): the server sends them to every
//! subscriber, and again after a reload; a client re-runs its pending calls under the new ones.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::mutation::Value;

/// The largest definitions file: 256 KiB, sent to every subscriber of a document.
pub const MAX_MUTATORS_BYTES: usize = 256 << 10;

/// Names a mutator or an argument may have: ASCII letters, digits and `_`, not starting with a
/// digit, at most this long.
const MAX_NAME_BYTES: usize = 64;

/// The parameters every call binds besides its arguments.
pub const BOUND_PARAMS: [&str; 2] = ["subject", "now"];

/// One mutator: its name, its arguments, and its statements (split at top-level `;`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mutator {
    pub name: String,
    pub args: Vec<String>,
    pub statements: Vec<String>,
}

/// A set of mutator definitions, parsed from its source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mutators {
    source: String,
    version: String,
    defs: BTreeMap<String, Mutator>,
}

impl Mutators {
    /// Parses a definitions file; the error names the line.
    pub fn parse(source: &str) -> Result<Mutators, String> {
        if source.len() > MAX_MUTATORS_BYTES {
            return Err(format!("{} bytes of definitions, at most {MAX_MUTATORS_BYTES}", source.len()));
        }
        let mut defs = BTreeMap::new();
        let mut current: Option<(usize, Mutator, String)> = None;
        let finish = |defs: &mut BTreeMap<String, Mutator>, cur: Option<(usize, Mutator, String)>| {
            let Some((line, mut m, body)) = cur else { return Ok(()) };
            m.statements = split_statements(&body);
            if m.statements.is_empty() {
                return Err(format!("line {line}: mutator {} has no statements", m.name));
            }
            if let Some(why) = m.statements.iter().find_map(|sql| crate::sandbox::unauthorized_statement(sql))
            {
                return Err(format!("line {line}: mutator {}: {why}", m.name));
            }
            if defs.insert(m.name.clone(), m).is_some() {
                return Err(format!("line {line}: a second mutator with this name"));
            }
            Ok(())
        };
        for (i, line) in source.lines().enumerate() {
            let n = i + 1;
            if let Some(head) = line.trim().strip_prefix("--").map(str::trim)
                && let Some(sig) = head.strip_prefix("mutator:")
            {
                finish(&mut defs, current.take())?;
                current = Some((
                    n,
                    parse_signature(sig.trim()).map_err(|e| format!("line {n}: {e}"))?,
                    String::new(),
                ));
                continue;
            }
            match &mut current {
                Some((_, _, body)) => {
                    body.push_str(line);
                    body.push('\n');
                }
                None if line.trim().is_empty() || line.trim().starts_with("--") => {}
                None => return Err(format!("line {n}: SQL before the first `-- mutator: NAME(ARGS)` line")),
            }
        }
        finish(&mut defs, current)?;
        use sha2::Digest;
        let digest = sha2::Sha256::digest(source.as_bytes());
        let version = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Ok(Mutators { source: source.to_owned(), version, defs })
    }

    /// Changes whenever the source does.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn get(&self, name: &str) -> Option<&Mutator> {
        self.defs.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Mutator> {
        self.defs.values()
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_BYTES
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `NAME(ARG, ...)`.
fn parse_signature(sig: &str) -> Result<Mutator, String> {
    let bad = || format!("expected NAME(ARG, ...), not {sig:?}");
    let (name, rest) = sig.split_once('(').ok_or_else(bad)?;
    let args = rest.trim().strip_suffix(')').ok_or_else(bad)?;
    let name = name.trim();
    if !valid_name(name) {
        return Err(format!("{name:?} is not a mutator name (letters, digits, _)"));
    }
    let args: Vec<String> =
        args.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_owned).collect();
    for (i, a) in args.iter().enumerate() {
        if !valid_name(a) {
            return Err(format!("{a:?} is not an argument name (letters, digits, _)"));
        }
        if BOUND_PARAMS.contains(&a.as_str()) {
            return Err(format!("argument {a:?}: :{a} is bound by pagesync"));
        }
        if args[..i].contains(a) {
            return Err(format!("argument {a:?} twice"));
        }
    }
    Ok(Mutator { name: name.to_owned(), args, statements: Vec::new() })
}

/// Splits SQL at the `;` that end statements: not inside quotes ('', "", ``, []) or comments.
/// Empty statements are dropped.
fn split_statements(sql: &str) -> Vec<String> {
    let (mut out, mut cur) = (Vec::new(), String::new());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' | '`' | '[' => {
                let close = if c == '[' { ']' } else { c };
                cur.push(c);
                for d in chars.by_ref() {
                    cur.push(d);
                    if d == close {
                        break;
                    }
                }
            }
            '-' if chars.peek() == Some(&'-') => {
                for d in chars.by_ref() {
                    if d == '\n' {
                        cur.push('\n');
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut prev = ' ';
                for d in chars.by_ref() {
                    if prev == '*' && d == '/' {
                        break;
                    }
                    prev = d;
                }
                cur.push(' ');
            }
            ';' => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect()
}

/// A call of a mutator: what a client's timeline holds for `doc.call(name, args)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Call {
    pub name: String,
    pub args: Vec<Value>,
    /// The caller's subject (its token's `sub` claim), bound as `:subject`; the server refuses
    /// a call whose subject is not its token's (`forbidden`), so a replay binds the same.
    pub subject: String,
}

/// What a call body starts with: a `SqlMutation` of zero statements followed by an `Option`
/// tag no encoder writes, so no `SqlMutation` ever starts this way.
const CALL_TAG: [u8; 2] = [0x00, 0xca];

impl Call {
    /// The body of a mutation (`Mutation::body`) for the SQL reducer.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = CALL_TAG.to_vec();
        out.extend(postcard::to_stdvec(self).expect("BUG: a call always serializes"));
        out
    }

    /// `Some` when `body` is a call (`Err` when it is one that does not decode).
    pub fn decode(body: &[u8]) -> Option<Result<Call, String>> {
        let rest = body.strip_prefix(&CALL_TAG[..])?;
        Some(postcard::from_bytes(rest).map_err(|e| format!("a mutator call that does not decode: {e}")))
    }
}

/// What a token lets its holder send (its `write` and `call` claims), checked by the server
/// for every mutation before it runs.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Permit {
    /// Raw SQL mutations.
    pub raw: bool,
    /// Mutators it may call, by name; `*` is every one. `None` or empty: none.
    pub calls: Option<Vec<String>>,
}

impl Permit {
    /// Everything: servers without auth, and the core's own tests.
    pub fn all() -> Permit {
        Permit { raw: true, calls: Some(vec!["*".into()]) }
    }

    /// Why `body` (a SQL reducer body) from `subject` may not run, if it may not.
    pub fn refuse(&self, body: &[u8], subject: &str) -> Option<String> {
        if body.is_empty() {
            return None; // a fill (`Mutation::fill`): it does nothing
        }
        match Call::decode(body) {
            None if self.raw => None,
            None => Some("this token may call mutators only, not send SQL".into()),
            Some(Err(_)) => None, // rejected as malformed when it runs
            Some(Ok(call)) => match &self.calls {
                _ if call.subject != subject => {
                    Some(format!("the call names subject {:?}, its token {subject:?}", call.subject))
                }
                Some(names) if names.iter().any(|n| n == "*" || *n == call.name) => None,
                _ => Some(format!("this token may not call {}", call.name)),
            },
        }
    }
}

/// The longest subject kept (a token's `sub` claim); longer ones are cut at a character
/// boundary, by the server and by clients alike.
pub const MAX_SUBJECT_BYTES: usize = 256;

/// `subject`, cut to `MAX_SUBJECT_BYTES`.
pub fn cut_subject(mut subject: String) -> String {
    while subject.len() > MAX_SUBJECT_BYTES {
        subject.pop();
    }
    subject
}

/// The `sub` claim of a token (`header.payload.signature`, the payload base64url JSON), read
/// without checking the signature (the server checks it): the subject a client's calls name.
/// Empty when there is none or the token is not one.
pub fn token_subject(token: &str) -> String {
    let Some(payload) = token.split('.').nth(1) else { return String::new() };
    let Some(bytes) = base64url(payload) else { return String::new() };
    let claims: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    cut_subject(claims.get("sub").and_then(|s| s.as_str()).unwrap_or_default().to_owned())
}

/// Whether `token` may replace a token of subject `subject` on an open replica: it must name
/// the same one, since the replica's pending mutator calls ran as that subject. The refusal
/// says so.
pub fn same_subject(subject: &str, token: &str) -> Result<(), String> {
    let new = token_subject(token);
    if new == subject {
        return Ok(());
    }
    Err(format!(
        "the new token names subject {new:?}, this replica's {subject:?}: open the document again for another subject"
    ))
}

fn base64url(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_blocks_and_refuses_what_is_not_one() {
        let m = Mutators::parse(
            "-- todos\n-- mutator: add(title)\nINSERT INTO t VALUES (:title, ';'); -- a ; comment\n\n\
             -- mutator: del(id)\nSELECT reject('no; never') WHERE :id < 0;\nDELETE FROM t WHERE id = :id;\n",
        )
        .expect("parse");
        let add = m.get("add").expect("add");
        assert_eq!(add.args, ["title"]);
        assert_eq!(add.statements, ["INSERT INTO t VALUES (:title, ';')"]);
        assert_eq!(m.get("del").expect("del").statements.len(), 2);
        assert_eq!(m.version().len(), 16);
        assert_ne!(m.version(), Mutators::parse("-- mutator: x()\nSELECT 1").expect("x").version());
        for bad in [
            "INSERT INTO t VALUES (1)",
            "-- mutator: add title\nSELECT 1",
            "-- mutator: add(subject)\nSELECT 1",
            "-- mutator: add(a, a)\nSELECT 1",
            "-- mutator: add()\n",
            "-- mutator: a()\nSELECT 1\n-- mutator: a()\nSELECT 2",
            "-- mutator: shrink()\nDELETE FROM t;\nVACUUM",
        ] {
            assert!(Mutators::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn calls_are_told_apart_from_sql_and_permits_checked() {
        let call = Call { name: "add".into(), args: vec![Value::Integer(1)], subject: "ann".into() };
        assert_eq!(Call::decode(&call.encode()), Some(Ok(call.clone())));
        let sql = crate::SqlMutation::one("SELECT 1", vec![]).encode();
        assert_eq!(Call::decode(&sql), None);
        let only = Permit { raw: false, calls: Some(vec!["add".into()]) };
        assert!(only.refuse(&sql, "ann").is_some(), "raw SQL with a mutator-only token");
        assert!(only.refuse(&call.encode(), "ann").is_none());
        assert!(only.refuse(&call.encode(), "bob").is_some(), "another subject's call");
        let other = Call { name: "drop_all".into(), ..call.clone() };
        assert!(only.refuse(&other.encode(), "ann").is_some(), "a mutator outside the grant");
        assert!(Permit::all().refuse(&sql, "").is_none());
        let none = Permit { raw: false, calls: Some(Vec::new()) };
        assert!(none.refuse(&call.encode(), "ann").is_some(), "an empty list allows no mutator");
    }

    #[test]
    fn a_token_says_its_subject() {
        // {"alg":"HS256"}.{"sub":"ann","doc":"x"}.sig
        let token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbm4iLCJkb2MiOiJ4In0.c2ln";
        assert_eq!(token_subject(token), "ann");
        assert_eq!(token_subject(""), "");
        assert_eq!(token_subject("a.b!.c"), "");
    }
}
