//! Mutations: what clients append to their timelines and the server replays.
//!
//! Every mutation carries the client's clock and a seed: the reducer never reads a clock or a
//! random source of its own, so replaying the same mutations gives byte-identical pages.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The largest encoded mutation accepted. 1 MiB: far above any single-row or batch write an
/// app sends interactively, small enough that one client cannot stall a server step.
pub const MAX_MUTATION_BYTES: usize = 1 << 20;

/// The envelope every reducer's mutations travel in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mutation {
    /// The client's wall clock when the mutation was made; the server clamps it.
    pub client_time_ms: i64,
    /// Seeds `random()` and `randomblob()` for this mutation.
    pub seed: u64,
    /// The reducer's own encoding (for the SQL reducer: `SqlMutation`).
    #[serde(with = "crate::bytes")]
    pub body: Vec<u8>,
}

impl Mutation {
    /// A no-op in an LSN a power cut took from its client's timeline after the mutation there
    /// may have been sent (see `ClientDocument::send_before_durable`): its body is empty, which
    /// no reducer's encoding is, so every replica and the server apply it as nothing, never
    /// as a rejection. The server keeps the mutation it received at that LSN, if it did.
    pub fn fill() -> Mutation {
        Mutation { client_time_ms: 0, seed: 0, body: Vec::new() }
    }

    /// Whether this is a `fill`.
    pub fn is_fill(&self) -> bool {
        self.body.is_empty()
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        let bytes = postcard::to_stdvec(self).expect("BUG: a Mutation always serializes");
        if bytes.len() > MAX_MUTATION_BYTES {
            return Err(Error::MutationTooLarge { len_bytes: bytes.len(), max_bytes: MAX_MUTATION_BYTES });
        }
        Ok(bytes)
    }

    pub fn decode(bytes: &[u8]) -> Result<Mutation> {
        if bytes.len() > MAX_MUTATION_BYTES {
            return Err(Error::MutationTooLarge { len_bytes: bytes.len(), max_bytes: MAX_MUTATION_BYTES });
        }
        postcard::from_bytes(bytes).map_err(|e| Error::Malformed(e.to_string()))
    }
}

/// A SQL parameter or result value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(#[serde(with = "crate::bytes")] Vec<u8>),
}

impl Value {
    /// As JSON: blobs as hex strings.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Integer(i) => (*i).into(),
            Value::Real(f) => (*f).into(),
            Value::Text(t) => t.clone().into(),
            Value::Blob(b) => b.iter().map(|x| format!("{x:02x}")).collect::<String>().into(),
        }
    }
}

impl From<rusqlite::types::ValueRef<'_>> for Value {
    fn from(v: rusqlite::types::ValueRef<'_>) -> Value {
        use rusqlite::types::ValueRef as V;
        match v {
            V::Null => Value::Null,
            V::Integer(i) => Value::Integer(i),
            V::Real(f) => Value::Real(f),
            V::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
            V::Blob(b) => Value::Blob(b.to_vec()),
        }
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput as O, ValueRef as V};
        Ok(match self {
            Value::Null => O::Borrowed(V::Null),
            Value::Integer(i) => O::Borrowed(V::Integer(*i)),
            Value::Real(f) => O::Borrowed(V::Real(*f)),
            Value::Text(t) => O::Borrowed(V::Text(t.as_bytes())),
            Value::Blob(b) => O::Borrowed(V::Blob(b)),
        })
    }
}

macro_rules! value_from {
    ($($t:ty => $v:ident),*) => {$(
        impl From<$t> for Value {
            fn from(x: $t) -> Value { Value::$v(x.into()) }
        }
    )*};
}
value_from!(i64 => Integer, i32 => Integer, f64 => Real, String => Text, &str => Text, Vec<u8> => Blob);

/// One SQL statement (or, without parameters, several separated by `;`) and its parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Statement {
    pub sql: String,
    pub params: Vec<Value>,
}

/// The SQL reducer's mutation body: statements run in order, all or nothing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SqlMutation {
    pub statements: Vec<Statement>,
    /// Run at most once per document: once a mutation with this key has applied, later ones
    /// with the same key (from any client) apply as no-ops. Migrations use `migration:<n>`.
    pub once: Option<String>,
}

impl SqlMutation {
    pub fn one(sql: impl Into<String>, params: Vec<Value>) -> SqlMutation {
        SqlMutation { statements: vec![Statement { sql: sql.into(), params }], once: None }
    }

    /// Migration `version` of an app's schema: `sql` (one or more statements) runs exactly
    /// once per document, whichever client brings it first.
    pub fn migration(version: u32, sql: impl Into<String>) -> SqlMutation {
        let statements = vec![Statement { sql: sql.into(), params: Vec::new() }];
        SqlMutation { statements, once: Some(migration_key(version)) }
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("BUG: a SqlMutation always serializes")
    }
}

/// A `SqlMutation` read in place: its SQL, text and blobs borrow the encoded body, so a
/// replay (every pending mutation, on every rebase) decodes without copying or allocating
/// them. The same encoding, field for field and variant for variant.
#[derive(Debug, Deserialize)]
pub(crate) struct SqlMutationView<'a> {
    #[serde(borrow)]
    pub statements: Vec<StatementView<'a>>,
    pub once: Option<&'a str>,
}

impl<'a> SqlMutationView<'a> {
    pub fn decode(body: &'a [u8]) -> postcard::Result<SqlMutationView<'a>> {
        postcard::from_bytes(body)
    }
}

/// A `Statement` read in place.
#[derive(Debug, Deserialize)]
pub(crate) struct StatementView<'a> {
    pub sql: &'a str,
    #[serde(borrow)]
    pub params: Vec<ValueView<'a>>,
}

/// A `Value` read in place: the variants in `Value`'s order.
#[derive(Debug, Deserialize)]
pub(crate) enum ValueView<'a> {
    Null,
    Integer(i64),
    Real(f64),
    Text(&'a str),
    Blob(&'a [u8]),
}

impl rusqlite::ToSql for ValueView<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput as O, ValueRef as V};
        Ok(O::Borrowed(match *self {
            ValueView::Null => V::Null,
            ValueView::Integer(i) => V::Integer(i),
            ValueView::Real(f) => V::Real(f),
            ValueView::Text(t) => V::Text(t.as_bytes()),
            ValueView::Blob(b) => V::Blob(b),
        }))
    }
}

/// The `once` key of migration `version`.
pub fn migration_key(version: u32) -> String {
    format!("migration:{version}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_reads_what_the_owned_form_wrote() {
        let params = vec![
            Value::Null,
            Value::Integer(-7),
            Value::Real(2.5),
            Value::Text("héllo".into()),
            Value::Blob(vec![0, 1, 255]),
        ];
        let mut m = SqlMutation::one("INSERT INTO t VALUES (?1, ?2, ?3, ?4, ?5)", params.clone());
        m.statements.push(Statement { sql: "SELECT 1".into(), params: Vec::new() });
        m.once = Some("migration:3".into());
        let body = m.encode();
        let view = SqlMutationView::decode(&body).expect("decode");
        assert_eq!(view.once, Some("migration:3"));
        assert_eq!(view.statements.len(), 2);
        assert_eq!(view.statements[0].sql, m.statements[0].sql);
        assert_eq!(view.statements[1].sql, "SELECT 1");
        assert!(view.statements[1].params.is_empty());
        use rusqlite::ToSql;
        for (v, owned) in view.statements[0].params.iter().zip(&params) {
            let (a, b) = (v.to_sql().expect("view"), owned.to_sql().expect("owned"));
            assert_eq!(format!("{a:?}"), format!("{b:?}"));
        }
        // Without `once`, and cut short: the same answers as the owned form.
        let plain = SqlMutation::one("SELECT 2", vec![]).encode();
        assert_eq!(SqlMutationView::decode(&plain).expect("decode").once, None);
        for cut in 0..body.len() {
            let owned = postcard::from_bytes::<SqlMutation>(&body[..cut]).is_ok();
            assert_eq!(SqlMutationView::decode(&body[..cut]).is_ok(), owned, "cut at {cut}");
        }
    }
}
