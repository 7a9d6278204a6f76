//! The `sql` processor: runs one parameterized statement per message and puts its result in the
//! body (enricher) or makes it the body.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::component::JqProgram;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    Body, BuildContext, BuildError, ErrorKind, Failure, HealthHandle, Message, Outputs,
    ProcessError, Processor,
};

use super::{Database, Mode};

const DESCRIPTION: &str = "\
Runs `query` against the database of `url` once per message, with `params` bound to its \
placeholders in order (`$1, $2, ...` for PostgreSQL, `?` for MariaDB/MySQL). Each parameter is a \
jq expression over the message (the body is `.`, headers are `$headers`): values are **bound**, \
never pasted into the SQL text, so a message cannot change the statement.

`mode: rows` makes the result an array of row objects (column name -> value), `first` the first \
row or `null`, `count` the number of rows returned or affected (for `INSERT`/`UPDATE`/`DELETE`). \
With `into`, the body must be an object and the result is set at that key (an enricher); \
without it, the result becomes the body.

Types: integers and floats are JSON numbers (PostgreSQL `numeric` and MySQL `decimal` too, as \
doubles beyond 15 digits: cast to text to keep every digit); text is a string; `bool` is \
`true`/`false` (MySQL has no bool: `tinyint` is a number); `timestamptz`/`timestamp`/`datetime` \
are RFC 3339 strings (a timestamp without time zone is read as UTC); `date` is `YYYY-MM-DD`; \
`json`/`jsonb` are JSON; `bytea`/blobs are base64 strings; `uuid` a string; NULL is `null`. A \
PostgreSQL column of another type fails with a message asking to cast it (`x::text`). \
Parameters are converted to the placeholder's type: a string for `timestamptz` is parsed as RFC \
3339, a base64 string for `bytea`, any JSON for `json`/`jsonb`.

**Delivery guarantee.** none needed for reads. A writing statement runs once per attempt, in \
autocommit (at-most-once); a failure goes to the flow's error handling, and a retry there makes \
it at-least-once, so it may run twice: make it idempotent (`ON CONFLICT DO NOTHING`, upserts).

**Limits.** One statement per step (no multi-statement strings). Statements are prepared and \
cached per connection. Results are held in memory: bound them with `LIMIT`. Errors: the \
database down is `unavailable`, a statement over `statement_timeout` is `timeout`, a bad \
parameter or a constraint violation is `invalid_input`, other database errors are `remote`. \
MariaDB/MySQL: `statement_timeout` is enforced by the client only (the connection is dropped) \
and TLS is not built in.";

/// The `sql` processor's spec.
pub fn spec() -> ComponentSpec {
    let mut spec = ComponentSpec::new(
        "sql",
        ComponentKind::Processor,
        "Query PostgreSQL or MariaDB/MySQL with bound parameters; rows become JSON",
    )
    .description(DESCRIPTION);
    for field in super::connection_fields() {
        spec = spec.field(field);
    }
    spec.field(
        FieldSpec::new(
            "query",
            FieldType::String,
            "One SQL statement with placeholders (`$1`... for PostgreSQL, `?` for MySQL).",
        )
        .required(),
    )
    .field(
        FieldSpec::new(
            "params",
            FieldType::List(Box::new(FieldType::Jq)),
            "jq expressions whose first outputs are bound to the placeholders, in order (no output binds NULL).",
        )
        .default_value(serde_json::json!([])),
    )
    .field(
        FieldSpec::new(
            "mode",
            FieldType::Enum(vec!["rows", "first", "count"]),
            "`rows`: an array of row objects; `first`: the first row or null; `count`: rows returned or affected.",
        )
        .default_value("rows"),
    )
    .field(FieldSpec::new(
        "into",
        FieldType::String,
        "Body key to set the result at (the body must be an object); without it the result replaces the body.",
    ))
    .example(
        "Enrich an order with its customer (PostgreSQL)",
        "url: postgres://sluice@127.0.0.1:5432/shop\nquery: SELECT name, tier FROM customers WHERE id = $1 AND tenant = $2\nparams: [\".customer_id\", \"$headers.tenant\"]\nmode: first\ninto: customer\n",
    )
    .example(
        "Mark an order shipped (MariaDB)",
        "url: mysql://sluice@127.0.0.1:3306/shop\nquery: UPDATE orders SET status = 'shipped' WHERE id = ?\nparams: [\".id\"]\nmode: count\ninto: updated\n",
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    query: String,
    #[serde(default)]
    params: Vec<String>,
    #[serde(default = "default_mode")]
    mode: Mode,
    #[serde(default)]
    into: Option<String>,
}

fn default_mode() -> Mode {
    Mode::Rows
}

struct SqlProcessor {
    db: Arc<dyn Database>,
    query: String,
    params: Vec<Arc<dyn JqProgram>>,
    mode: Mode,
    into: Option<String>,
    health: HealthHandle,
}

/// Builds the `sql` processor.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let (url, options, rest) = super::take_connection(config)?;
    let c: Config = crate::config::parse(&rest)?;
    if c.query.trim().is_empty() {
        return Err(BuildError::field(
            "query",
            "is empty; write one SQL statement",
        ));
    }
    if c.into.as_deref().is_some_and(str::is_empty) {
        return Err(BuildError::field(
            "into",
            "is empty; name a body key or leave it out",
        ));
    }
    let params = compile_all(ctx, "params", &c.params)?;
    Ok(Arc::new(SqlProcessor {
        db: super::open(ctx.resources, &url, &options)?,
        query: c.query,
        params,
        mode: c.mode,
        into: c.into,
        health: HealthHandle::for_component(ctx),
    }))
}

/// Compiles a list of jq expressions at `field`.
pub(crate) fn compile_all(
    ctx: &BuildContext<'_>,
    field: &str,
    codes: &[String],
) -> Result<Vec<Arc<dyn JqProgram>>, BuildError> {
    codes
        .iter()
        .enumerate()
        .map(|(i, code)| ctx.steps.compile_jq(&format!("{field}.{i}"), code))
        .collect()
}

/// The first output of `program` over the body, or `null` when it has none.
pub(crate) async fn first_output(
    program: &dyn JqProgram,
    body: &Arc<Value>,
    msg: &Message,
) -> Result<Value, ProcessError> {
    Ok(program
        .run(Arc::clone(body), msg)
        .await?
        .into_iter()
        .next()
        .unwrap_or(Value::Null))
}

/// Tells the component's health about a result: down while the database is unreachable.
pub(crate) fn report<T>(health: &HealthHandle, what: &str, result: &Result<T, ProcessError>) {
    match result {
        Err(e) if e.kind == ErrorKind::Unavailable => {
            health.unhealthy(format!("{}; retrying on the next message", e.detail));
        }
        Err(_) => {}
        Ok(_) => {
            let _ = what;
            health.healthy();
        }
    }
}

impl SqlProcessor {
    async fn run(&self, msg: &Message) -> Result<Value, ProcessError> {
        let needs_body = !self.params.is_empty() || self.into.is_some();
        let body = if needs_body {
            msg.body
                .json_shared()
                .map_err(|e| ProcessError::invalid_input(e.to_string()))?
        } else {
            Arc::new(Value::Null)
        };
        let mut params = Vec::with_capacity(self.params.len());
        for program in &self.params {
            params.push(first_output(program.as_ref(), &body, msg).await?);
        }
        let result = self.db.query(&self.query, &params, self.mode).await;
        report(&self.health, self.db.describe(), &result);
        let result = result?;
        match &self.into {
            None => Ok(result),
            Some(key) => {
                let mut object = match body.as_ref() {
                    Value::Object(map) => map.clone(),
                    other => {
                        return Err(ProcessError::invalid_input(format!(
                            "`into: {key}` needs an object body, not {}",
                            kind_of(other)
                        )));
                    }
                };
                object.insert(key.clone(), result);
                Ok(Value::Object(object))
            }
        }
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[async_trait]
impl Processor for SqlProcessor {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        match self.run(&msg).await {
            Ok(value) => {
                let mut msg = msg;
                msg.body = Body::from_json(value);
                Ok(smallvec_one(msg))
            }
            Err(error) => Err(Failure::new(msg, error)),
        }
    }
}

fn smallvec_one(msg: Message) -> Outputs {
    let mut out = Outputs::new();
    out.push(msg);
    out
}
