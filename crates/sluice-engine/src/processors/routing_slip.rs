//! `routing_slip`: runs each message through a sequence of named routes computed from the message
//! itself (EIP Routing Slip).

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value};
use sluice_core::component::JqProgram;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{BuildContext, BuildError, Failure, Message, Outputs, Processor};

use super::common;
use super::routes::{self, Routes};

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "routing_slip",
        ComponentKind::Processor,
        "Run each message through the named routes its slip lists, in order",
    )
    .description(
        "Evaluates `slip`, a jq expression on the JSON body (with `$headers` and `$meta`), once \
when the message arrives. Its first value is the slip: an array of route names, a string of \
comma-separated names (as a header would carry it), or `null` / `\"\"` / `[]` for an empty slip. \
The message then runs through each named route of `routes` in order; every output of one route \
goes through the next, as in a pipeline, and the outputs of the last are the outputs of the step. \
An empty slip passes the message on unchanged; a route may appear several times.\n\n\
Every name is checked before any route runs: an unknown name fails the step with \
`invalid_input` listing the known routes. A slip of another type fails with `invalid_input`; \
an expression that fails, with `expression`. A failure inside a route is the failure of the \
step. Route names use letters, digits, `_` and `-`.",
    )
    .field(
        FieldSpec::new(
            "slip",
            FieldType::Jq,
            "jq giving the route names: an array, a comma-separated string, or null.",
        )
        .required(),
    )
    .field(routes::field())
    .example(
        "Steps chosen by the caller in a header",
        "slip: '$headers[\"x-slip\"]'\nroutes:\n  validate:\n    - filter: '.id != null'\n  enrich:\n    - transform: '. + {enriched: true}'\n  audit:\n    - log: 'audited {{ body.id }}'\n",
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    slip: String,
    routes: Map<String, Value>,
}

/// Builds the step.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    Ok(Arc::new(RoutingSlip {
        slip: ctx.steps.compile_jq("slip", &config.slip)?,
        routes: Routes::build(ctx, "routes", &config.routes)?,
    }))
}

struct RoutingSlip {
    slip: Arc<dyn JqProgram>,
    routes: Routes,
}

#[async_trait]
impl Processor for RoutingSlip {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        let (msg, body) = common::json_body(msg)?;
        let names = match self.slip.run(body, &msg).await {
            Ok(values) => routes::names_from(values, "slip"),
            Err(e) => Err(e),
        };
        let names = match names {
            Ok(names) => names,
            Err(e) => return Err(Failure::new(msg, e)),
        };
        let mut slip = Vec::with_capacity(names.len());
        for name in &names {
            match self.routes.get(name) {
                Ok(route) => slip.push(route),
                Err(e) => return Err(Failure::new(msg, e)),
            }
        }
        routes::through(&slip, msg).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processors::testkit::{SplitArray, build_one, process, try_build};
    use serde_json::json;
    use sluice_core::{AckToken, ErrorKind, Outcome};

    fn slip() -> Arc<dyn Processor> {
        build_one(
            "routing_slip",
            json!({
                "slip": "$headers.slip // .slip",
                "routes": {
                    "double": [{"transform": ".n *= 2"}],
                    "inc": [{"transform": ".n += 1"}],
                    "drop_big": [{"filter": ".n < 100"}]
                }
            }),
        )
    }

    async fn run(slip_value: Value) -> Vec<Value> {
        let out = process(&slip(), Message::json(json!({"n": 1, "slip": slip_value})))
            .await
            .unwrap();
        out.iter()
            .map(|m| m.body.json().unwrap()["n"].clone())
            .collect()
    }

    #[tokio::test]
    async fn routes_run_in_slip_order() {
        assert_eq!(run(json!(["double", "inc"])).await, [json!(3)]);
        assert_eq!(run(json!(["inc", "double"])).await, [json!(4)]);
        assert_eq!(run(json!(["inc", "inc", "inc"])).await, [json!(4)]);
        assert_eq!(run(json!("inc, double")).await, [json!(4)]);
        assert_eq!(run(json!(null)).await, [json!(1)]);
    }

    #[tokio::test]
    async fn every_part_of_a_split_goes_through_the_rest_of_the_slip() {
        let routes = [
            ("split", Arc::new(SplitArray) as Arc<dyn Processor>),
            ("inc", build_one("transform", json!(". + 1"))),
            ("drop_big", build_one("filter", json!(". < 100"))),
        ];
        let step = RoutingSlip {
            slip: build_jq("$headers.slip"),
            routes: Routes::from_map(routes.into_iter().map(|(n, r)| (n.to_owned(), r)).collect()),
        };
        let (token, rx) = AckToken::channel();
        let msg = Message::json(json!([1, 200, 2]))
            .with_header("slip", "split,drop_big,inc")
            .with_ack(token);
        let out = step.process(msg).await.unwrap();
        let bodies: Vec<_> = out.iter().map(|m| m.body.json().unwrap().clone()).collect();
        assert_eq!(bodies, [json!(2), json!(3)]);
        out.into_iter().for_each(Message::ack);
        assert_eq!(
            rx.await.unwrap(),
            Outcome::Ack,
            "the dropped part was acked"
        );
    }

    fn build_jq(code: &str) -> Arc<dyn JqProgram> {
        crate::expr::jq::compile(code, crate::expr::jq::JqLimits::default()).unwrap()
    }

    #[tokio::test]
    async fn the_slip_may_come_from_a_header() {
        let msg = Message::json(json!({"n": 5})).with_header("slip", "double,double");
        let out = process(&slip(), msg).await.unwrap();
        assert_eq!(out[0].body.json().unwrap()["n"], json!(20));
    }

    #[tokio::test]
    async fn an_unknown_route_fails_before_any_route_runs() {
        let (token, rx) = AckToken::channel();
        let msg = Message::json(json!({"n": 1, "slip": ["inc", "tripple"]})).with_ack(token);
        let failure = process(&slip(), msg).await.unwrap_err();
        assert_eq!(failure.error.kind, ErrorKind::InvalidInput);
        assert_eq!(
            failure.error.detail,
            "unknown route `tripple`; known routes: double, drop_big, inc"
        );
        assert_eq!(failure.message.body.json().unwrap()["n"], json!(1));
        failure.message.nack("failed");
        assert!(matches!(rx.await.unwrap(), Outcome::Nack(_)));
        let failure = process(&slip(), Message::json(json!({"slip": 7})))
            .await
            .unwrap_err();
        assert_eq!(failure.error.kind, ErrorKind::InvalidInput);
    }

    #[test]
    fn routes_are_needed_and_named_plainly() {
        let e = try_build("routing_slip", &json!({"slip": ".s", "routes": {}}))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("routes"));
        let e = try_build(
            "routing_slip",
            &json!({"slip": ".s", "routes": {"a.b": [{"log": "x"}]}}),
        )
        .err()
        .unwrap();
        assert!(e.message.contains("`a.b`"), "{}", e.message);
    }
}
