//! `dynamic_router`: routes a message hop by hop, asking a jq expression for the next route after
//! each one (EIP Dynamic Router, Camel's dynamicRouter).

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value};
use sluice_core::component::JqProgram;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    BuildContext, BuildError, ErrorKind, Failure, Message, Outputs, ProcessError, Processor,
};

use super::common;
use super::routes::{self, Routes};

/// The routes a message has taken so far in this router, comma-separated, oldest first.
pub const HOPS_HEADER: &str = "sluice.router.hops";
const DEFAULT_MAX_HOPS: usize = 16;

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "dynamic_router",
        ComponentKind::Processor,
        "Route a message hop by hop, choosing each next route from the message",
    )
    .description(
        "Before each hop, evaluates `next`, a jq expression on the JSON body with `$headers` and \
`$meta`. Its first value names the route (of `routes`) the message goes through next; `null`, \
`\"\"`, `[]` or no value ends the routing, and the message continues after the step. The header \
`sluice.router.hops` records the routes taken so far, comma-separated (it is cleared when the \
message enters the router), so `next` can decide from where the message has been: \
`$headers[\"sluice.router.hops\"]`. If a route produces several messages each is routed on by \
itself; if it produces none the routing of that message ends.\n\n\
A message may take at most `max_hops` hops (default 16, up to 1000): one more fails the step \
with `rejected`, naming the hops taken, which stops a `next` that never returns null. An unknown \
route name fails with `invalid_input` listing the known routes; a value other than a name \
(a string) or null fails with `invalid_input`; an expression that fails, with `expression`. A \
failure inside a route is the failure of the step.",
    )
    .field(
        FieldSpec::new(
            "next",
            FieldType::Jq,
            "jq naming the next route, or null to stop; sees `$headers[\"sluice.router.hops\"]`.",
        )
        .required(),
    )
    .field(routes::field())
    .field(
        FieldSpec::new(
            "max_hops",
            FieldType::Integer {
                min: Some(1),
                max: Some(1000),
            },
            "Most hops one message may take.",
        )
        .default_value(DEFAULT_MAX_HOPS as i64),
    )
    .example(
        "Approve in stages until the order is complete",
        "next: |\n  if .approved | not then \"approve\"\n  elif .shipped | not then \"ship\"\n  else null end\nroutes:\n  approve:\n    - transform: '. + {approved: true}'\n  ship:\n    - transform: '. + {shipped: true}'\nmax_hops: 4\n",
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    next: String,
    routes: Map<String, Value>,
    #[serde(default = "default_max_hops")]
    max_hops: usize,
}

fn default_max_hops() -> usize {
    DEFAULT_MAX_HOPS
}

/// Builds the step.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    Ok(Arc::new(DynamicRouter {
        next: ctx.steps.compile_jq("next", &config.next)?,
        routes: Routes::build(ctx, "routes", &config.routes)?,
        max_hops: config.max_hops,
    }))
}

struct DynamicRouter {
    next: Arc<dyn JqProgram>,
    routes: Routes,
    max_hops: usize,
}

impl DynamicRouter {
    /// The route `msg` takes next, with its name; `None` when the routing is over.
    async fn next_route(
        &self,
        msg: &Message,
    ) -> Result<Option<(String, &Arc<dyn Processor>)>, ProcessError> {
        let body = msg
            .body
            .json_shared()
            .map_err(|e| ProcessError::invalid_input(e.to_string()))?;
        let mut names = routes::names_from(self.next.run(body, msg).await?, "next")?;
        if names.len() > 1 {
            return Err(ProcessError::invalid_input(format!(
                "`next` must name one route or give null, got {}",
                names.join(",")
            )));
        }
        let Some(name) = names.pop() else {
            return Ok(None);
        };
        let route = self.routes.get(&name)?;
        Ok(Some((name, route)))
    }
}

fn hops(msg: &Message) -> Vec<&str> {
    msg.headers
        .get(HOPS_HEADER)
        .map(|h| h.split(',').filter(|s| !s.is_empty()).collect())
        .unwrap_or_default()
}

#[async_trait]
impl Processor for DynamicRouter {
    async fn process(&self, mut msg: Message) -> Result<Outputs, Failure> {
        msg.headers.insert(HOPS_HEADER.to_owned(), String::new());
        // Messages still to route, the next one last; a route's outputs keep their order.
        let mut pending = vec![msg];
        let mut done = Outputs::new();
        while let Some(mut msg) = pending.pop() {
            let (name, route) = match self.next_route(&msg).await {
                Ok(Some(next)) => next,
                Ok(None) => {
                    done.push(msg);
                    continue;
                }
                Err(e) => return Err(Failure::new(msg, e)),
            };
            let taken = hops(&msg);
            if taken.len() >= self.max_hops {
                let error = ProcessError::new(
                    ErrorKind::Rejected,
                    format!(
                        "more than {} hops (taken: {}; next: {name}); make `next` give null to stop",
                        self.max_hops,
                        taken.join(",")
                    ),
                );
                return Err(Failure::new(msg, error));
            }
            let record = if taken.is_empty() {
                name
            } else {
                format!("{},{name}", taken.join(","))
            };
            msg.headers.insert(HOPS_HEADER.to_owned(), record);
            let outputs = route.process(msg).await?;
            pending.extend(outputs.into_iter().rev());
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processors::testkit::{SplitArray, build_one, process};
    use serde_json::json;
    use sluice_core::{AckToken, Outcome};

    fn router(next: &str, max_hops: usize) -> Arc<dyn Processor> {
        build_one(
            "dynamic_router",
            json!({
                "next": next,
                "max_hops": max_hops,
                "routes": {
                    "inc": [{"transform": ".n += 1"}],
                    "drop": [{"filter": "false"}]
                }
            }),
        )
    }

    #[tokio::test]
    async fn routes_until_next_gives_null_and_records_the_hops() {
        let step = router("if .n < 3 then \"inc\" else null end", 16);
        let msg = Message::json(json!({"n": 0})).with_header(HOPS_HEADER, "stale");
        let out = process(&step, msg).await.unwrap();
        assert_eq!(out[0].body.json().unwrap(), &json!({"n": 3}));
        assert_eq!(out[0].headers[HOPS_HEADER], "inc,inc,inc");
    }

    #[tokio::test]
    async fn next_sees_the_hops_taken_and_each_part_is_routed_on() {
        // Split once, then increment each part once.
        let routes = [
            ("split", Arc::new(SplitArray) as Arc<dyn Processor>),
            ("inc", build_one("transform", json!(". + 1"))),
        ];
        let next = "$headers[\"sluice.router.hops\"] as $h \
             | if $h == \"\" then \"split\" elif $h == \"split\" then \"inc\" else null end";
        let step = DynamicRouter {
            next: crate::expr::jq::compile(next, crate::expr::jq::JqLimits::default()).unwrap(),
            routes: Routes::from_map(routes.into_iter().map(|(n, r)| (n.to_owned(), r)).collect()),
            max_hops: 16,
        };
        let out = step.process(Message::json(json!([10, 20]))).await.unwrap();
        let bodies: Vec<_> = out.iter().map(|m| m.body.json().unwrap().clone()).collect();
        assert_eq!(bodies, [json!(11), json!(21)]);
        assert_eq!(out[1].headers[HOPS_HEADER], "split,inc");
    }

    #[tokio::test]
    async fn a_route_that_drops_ends_the_routing_and_acks() {
        let step = router("\"drop\"", 16);
        let (token, rx) = AckToken::channel();
        let out = process(&step, Message::json(json!({"n": 0})).with_ack(token))
            .await
            .unwrap();
        assert!(out.is_empty());
        assert_eq!(rx.await.unwrap(), Outcome::Ack);
    }

    #[tokio::test]
    async fn too_many_hops_is_rejected() {
        let step = router("\"inc\"", 3);
        let failure = process(&step, Message::json(json!({"n": 0})))
            .await
            .unwrap_err();
        assert_eq!(failure.error.kind, ErrorKind::Rejected);
        assert!(
            failure
                .error
                .detail
                .contains("more than 3 hops (taken: inc,inc,inc; next: inc)"),
            "{}",
            failure.error.detail
        );
        assert_eq!(failure.message.body.json().unwrap(), &json!({"n": 3}));
    }

    #[tokio::test]
    async fn unknown_routes_and_bad_values_are_invalid_input() {
        let failure = process(&router("\"nope\"", 16), Message::json(json!({"n": 0})))
            .await
            .unwrap_err();
        assert_eq!(failure.error.kind, ErrorKind::InvalidInput);
        assert!(failure.error.detail.contains("known routes: drop, inc"));
        for next in ["42", "[\"inc\", \"inc\"]"] {
            let failure = process(&router(next, 16), Message::json(json!({"n": 0})))
                .await
                .unwrap_err();
            assert_eq!(failure.error.kind, ErrorKind::InvalidInput, "{next}");
        }
    }
}
