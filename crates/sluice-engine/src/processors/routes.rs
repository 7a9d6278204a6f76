//! Named lists of steps (`routes: {name: steps}`) for the routers that pick routes by name at run
//! time (`routing_slip`, `dynamic_router`), and reading route or channel names out of a jq result.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value};
use sluice_core::spec::{FieldSpec, FieldType};
use sluice_core::{BuildContext, BuildError, Failure, Message, Outputs, ProcessError, Processor};

/// Routes by name, each built as one pipeline.
pub(crate) struct Routes(BTreeMap<String, Arc<dyn Processor>>);

/// Whether `name` may name a route, a branch or a channel picked at run time: names are joined
/// with commas in headers and used as dotted paths in error locations.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The `routes:` field of the steps that run named routes; one definition so the field reads
/// the same wherever [`Routes::build`] reads it.
pub(crate) fn field() -> FieldSpec {
    FieldSpec::new(
        "routes",
        FieldType::Map(Box::new(FieldType::Steps)),
        "The routes by name, each a list of steps.",
    )
    .required()
}

impl Routes {
    /// Builds every route of the map at `field`.
    pub(crate) fn build(
        ctx: &BuildContext<'_>,
        field: &str,
        routes: &Map<String, Value>,
    ) -> Result<Self, BuildError> {
        if routes.is_empty() {
            return Err(BuildError::field(field, "give at least one route"));
        }
        let mut built = BTreeMap::new();
        for (name, steps) in routes {
            if !valid_name(name) {
                return Err(BuildError::field(
                    field,
                    format!("route name `{name}` may only use letters, digits, `_` and `-`"),
                ));
            }
            let route = ctx.steps.build_steps(&format!("{field}.{name}"), steps)?;
            built.insert(name.clone(), route);
        }
        Ok(Routes(built))
    }

    /// Routes made directly, for tests with processors that have no YAML form.
    #[cfg(test)]
    pub(crate) fn from_map(routes: BTreeMap<String, Arc<dyn Processor>>) -> Self {
        Routes(routes)
    }

    /// The route called `name`, or an `invalid_input` error listing the known routes.
    pub(crate) fn get(&self, name: &str) -> Result<&Arc<dyn Processor>, ProcessError> {
        self.0.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.0.keys().map(String::as_str).collect();
            ProcessError::invalid_input(format!(
                "unknown route `{name}`; known routes: {}",
                known.join(", ")
            ))
        })
    }
}

/// Names from the first output of a jq program: a string (several names separated by commas,
/// as in a header), an array of strings, or `null` / `""` / `[]` for none. `what` names the
/// expression in the error for anything else.
pub(crate) fn names_from(outputs: Vec<Value>, what: &str) -> Result<Vec<String>, ProcessError> {
    let split = |s: &str| -> Vec<String> {
        s.split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect()
    };
    match outputs.into_iter().next() {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(split(&s)),
        Some(Value::Array(items)) => {
            let mut names = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(s) => names.extend(split(&s)),
                    other => {
                        return Err(ProcessError::invalid_input(format!(
                            "`{what}` must give names as strings, got {other}"
                        )));
                    }
                }
            }
            Ok(names)
        }
        Some(other) => Err(ProcessError::invalid_input(format!(
            "`{what}` must give a name, a list of names or null, got {other}"
        ))),
    }
}

/// Runs `msg` through `routes` in order; each output of one route goes through the next, as in a
/// pipeline. A failure stops everything; parts not yet processed are dropped with it (their
/// acknowledgement shares nack the source).
pub(crate) async fn through(
    routes: &[&Arc<dyn Processor>],
    msg: Message,
) -> Result<Outputs, Failure> {
    let mut current: Outputs = std::iter::once(msg).collect();
    for route in routes {
        let mut next = Outputs::new();
        for m in current {
            next.extend(route.process(m).await?);
        }
        if next.is_empty() {
            return Ok(next);
        }
        current = next;
    }
    Ok(current)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_come_from_strings_lists_and_null() {
        assert_eq!(
            names_from(vec![json!("a, b,,c")], "x").unwrap(),
            ["a", "b", "c"]
        );
        assert_eq!(
            names_from(vec![json!(["a", "b,c"])], "x").unwrap(),
            ["a", "b", "c"]
        );
        assert!(names_from(vec![json!(null)], "x").unwrap().is_empty());
        assert!(names_from(vec![json!("")], "x").unwrap().is_empty());
        assert!(names_from(vec![], "x").unwrap().is_empty());
        let e = names_from(vec![json!([1])], "slip").unwrap_err();
        assert!(e.detail.contains("`slip`"), "{}", e.detail);
        assert!(names_from(vec![json!({"a": 1})], "x").is_err());
    }

    #[test]
    fn names_are_plain_words() {
        assert!(valid_name("orders-eu_2"));
        for bad in ["", "a.b", "a,b", "a b"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
