use super::*;
use serde_json::json;
use sluice_core::ExchangePattern;

fn limits_ms(ms: u64) -> JqLimits {
    JqLimits {
        timeout: Duration::from_millis(ms),
        ..JqLimits::default()
    }
}

async fn run(code: &str, input: Value) -> Result<Vec<Value>, ProcessError> {
    run_msg(code, input, &Message::json(json!(null))).await
}

async fn run_msg(code: &str, input: Value, msg: &Message) -> Result<Vec<Value>, ProcessError> {
    compile(code, JqLimits::default())
        .unwrap()
        .run(Arc::new(input), msg)
        .await
}

#[tokio::test]
async fn produces_every_output_in_order() {
    assert_eq!(run(".a", json!({"a": 1})).await.unwrap(), vec![json!(1)]);
    assert_eq!(
        run(".[] | . * 2", json!([1, 2, 3])).await.unwrap(),
        vec![json!(2), json!(4), json!(6)]
    );
    assert_eq!(run("empty", json!(1)).await.unwrap(), Vec::<Value>::new());
    assert_eq!(
        run(
            "{n: (.items | map(.p) | add), s: (.name | ascii_upcase)}",
            json!({"items": [{"p": 1}, {"p": 2.5}], "name": "x"})
        )
        .await
        .unwrap(),
        vec![json!({"n": 3.5, "s": "X"})]
    );
    assert_eq!(
        run("[range(3)]", json!(null)).await.unwrap(),
        vec![json!([0, 1, 2])]
    );
    assert_eq!(
        run(
            "def fac: if . <= 1 then 1 else . * (. - 1 | fac) end; fac",
            json!(5)
        )
        .await
        .unwrap(),
        vec![json!(120)]
    );
    assert_eq!(
        run("[paths]", json!({"a": [1]})).await.unwrap(),
        vec![json!([["a"], ["a", 0]])]
    );
    assert_eq!(
        run("[.[] | tostring] | join(\",\")", json!([1, "a"]))
            .await
            .unwrap(),
        vec![json!("1,a")]
    );
}

#[tokio::test]
async fn predicates_take_the_first_output() {
    let msg = Message::json(json!(null));
    let test = |code: &'static str, input: Value| {
        let msg = &msg;
        async move {
            compile(code, JqLimits::default())
                .unwrap()
                .test(Arc::new(input), msg)
                .await
                .unwrap()
        }
    };
    assert!(test(".ok", json!({"ok": true})).await);
    assert!(!test(".ok", json!({"ok": false})).await);
    assert!(!test(".missing", json!({})).await);
    assert!(!test("empty", json!(1)).await);
    assert!(test(".n > 2", json!({"n": 3})).await);
    assert!(test("0", json!(null)).await, "0 is truthy in jq");
    // Only the first output counts, so an infinite generator is fine.
    assert!(test("repeat(true)", json!(null)).await);
}

#[tokio::test]
async fn headers_and_meta_are_variables() {
    let msg = Message::json(json!(null))
        .with_header("x-tenant", "acme")
        .with_pattern(ExchangePattern::InOut);
    let out = run_msg(
        "[$headers[\"x-tenant\"], $meta.pattern, $meta.id, ($meta.created_at | test(\"Z$\")), $meta.correlation_id]",
        json!(null),
        &msg,
    )
    .await
    .unwrap();
    assert_eq!(
        out,
        vec![json!(["acme", "in_out", msg.id().to_string(), true, null])]
    );
    // The same through the blocking path.
    let out = run_msg("def h: $headers; h | keys", json!(null), &msg)
        .await
        .unwrap();
    assert_eq!(out, vec![json!(["x-tenant"])]);
}

#[test]
fn removed_builtins_are_compile_errors() {
    for (code, name) in [
        ("env.HOME", "env"),
        ("$ENV.HOME", "$ENV"),
        ("input", "input"),
        ("[inputs]", "inputs"),
        ("halt", "halt"),
        ("halt_error", "halt_error"),
        ("debug", "debug"),
        ("stderr", "stderr"),
        ("now | localtime", "localtime"),
    ] {
        let e = compile(code, JqLimits::default()).unwrap_err();
        assert!(
            e.message.starts_with(&format!(
                "`{name}` is not available in Sluice expressions: "
            )),
            "{code}: {}",
            e.message
        );
        assert!(e.offset.is_some(), "{code}");
    }
    let e = compile("env", JqLimits::default()).unwrap_err();
    assert_eq!(
        e.message,
        "`env` is not available in Sluice expressions: pass values in headers"
    );
}

#[test]
fn compile_errors_have_offsets_and_say_what_is_wrong() {
    let e = compile(".a | foo(1)", JqLimits::default()).unwrap_err();
    assert_eq!(e.offset, Some(5));
    assert!(e.message.contains("`foo/1`"), "{}", e.message);
    let e = compile(".a | $nope", JqLimits::default()).unwrap_err();
    assert_eq!(e.offset, Some(5));
    assert!(e.message.contains("`$nope`"), "{}", e.message);
    let e = compile(".a | ]", JqLimits::default()).unwrap_err();
    assert_eq!(e.offset, Some(5), "{}", e.message);
    assert!(e.message.starts_with("expected"), "{}", e.message);
    let e = compile("[1, 2", JqLimits::default()).unwrap_err();
    assert!(e.offset.is_some(), "{}", e.message);
    let e = compile("import \"m\" as m; .", JqLimits::default()).unwrap_err();
    assert!(e.message.contains("cannot be imported"), "{}", e.message);
    for e in [
        compile(".a | foo(1)", JqLimits::default()).unwrap_err(),
        compile(".a | ]", JqLimits::default()).unwrap_err(),
    ] {
        assert!(!e.message.ends_with('.'));
        assert!(!e.message.starts_with(char::is_uppercase), "{}", e.message);
    }
}

#[tokio::test]
async fn runtime_errors_are_expression_errors() {
    let e = run(".a.b", json!({"a": "text"})).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Expression);
    assert!(e.detail.contains("cannot index"), "{}", e.detail);
    let e = run("error(\"bad order\")", json!(null)).await.unwrap_err();
    assert_eq!(e.detail, "bad order");
    let e = run("def f: error({code: 1}); f", json!(null))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Expression);
    assert!(e.detail.contains("code"), "{}", e.detail);
}

#[tokio::test]
async fn infinite_recursion_is_stopped() {
    for code in [
        "def f: f; f",
        "def f: . as $x | f; f",
        "[range(1e12)]",
        "last(range(1e12))",
    ] {
        let program = compile(code, limits_ms(200)).unwrap();
        let started = std::time::Instant::now();
        let e = program
            .run(Arc::new(json!(0)), &Message::json(json!(null)))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Expression, "{code}");
        assert_eq!(
            e.detail, "expression exceeded its time limit of 200ms",
            "{code}"
        );
        assert!(started.elapsed() < Duration::from_secs(2), "{code}");
    }
    // The ticks stopped the threads: none is left abandoned... eventually.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn deep_recursion_fails_instead_of_overflowing_the_stack() {
    let program = compile("def f: 1 + f; f", limits_ms(5000)).unwrap();
    let e = program
        .run(Arc::new(json!(0)), &Message::json(json!(null)))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Expression);
    assert!(e.detail.contains("recursed too deeply"), "{}", e.detail);
}

#[tokio::test]
async fn catching_the_limit_error_does_not_escape_it() {
    let program = compile("def f: try f catch f; f", limits_ms(200)).unwrap();
    let e = program
        .run(Arc::new(json!(0)), &Message::json(json!(null)))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Expression);
}

#[tokio::test]
async fn outputs_are_capped() {
    let e = compile("repeat(1)", limits_ms(5000))
        .unwrap()
        .run(Arc::new(json!(null)), &Message::json(json!(null)))
        .await
        .unwrap_err();
    assert!(e.detail.contains("more than 10000 outputs"), "{}", e.detail);
    let small = JqLimits {
        max_output_bytes: 100,
        ..JqLimits::default()
    };
    let e = compile(".[]", small)
        .unwrap()
        .run(
            Arc::new(json!(["x".repeat(60), "y".repeat(60)])),
            &Message::json(json!(null)),
        )
        .await
        .unwrap_err();
    assert!(e.detail.contains("exceeds 100 bytes"), "{}", e.detail);
    let few = JqLimits {
        max_outputs: 2,
        ..JqLimits::default()
    };
    let e = compile(".[]", few)
        .unwrap()
        .run(Arc::new(json!([1, 2, 3])), &Message::json(json!(null)))
        .await
        .unwrap_err();
    assert!(e.detail.contains("more than 2 outputs"), "{}", e.detail);
}

#[test]
fn source_is_kept() {
    assert_eq!(compile(".a", JqLimits::default()).unwrap().source(), ".a");
}

#[tokio::test]
async fn a_panic_inside_jaq_fails_the_step_not_the_task() {
    // Two bytes repeated ~2^63 times: more than a Vec may hold, so jaq panics ("capacity
    // overflow"). (One byte would be a failed allocation, which aborts: see the module docs.)
    let e = run("\"xy\" * 9223372036854775807", json!(null))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Expression);
    assert!(e.to_string().contains("inside jq"), "{e}");
    // The same program still runs on sane input.
    assert_eq!(run("\"x\" * .", json!(2)).await.unwrap(), vec![json!("xx")]);
}
