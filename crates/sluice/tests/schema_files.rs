//! `validate` reads its schema through the loader: `${file:..}` is relative to the flow file, and a
//! broken schema is a load error pointing at the step.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::sync::Arc;

use sluice_core::Resources;
use sluice_engine::build;

/// Loads and builds `flow` written next to `order.schema.json` holding `schema`.
fn build_with_schema(schema: &str, flow: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("order.schema.json"), schema).unwrap();
    let path = dir.path().join("flows.yaml");
    std::fs::write(&path, flow).unwrap();
    let project =
        sluice_engine::config::load(&[path], &sluice::registry()).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        build::build(
            &project,
            &sluice::registry(),
            Arc::new(Resources::default()),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    })
}

const FLOW: &str = r#"
flows:
  - name: orders
    from: { timer: { interval: 1h } }
    steps:
      - validate:
          schema: ${file:order.schema.json}
"#;

#[test]
fn a_schema_file_is_found_next_to_the_flow_file() {
    build_with_schema(r#"{"type": "object", "required": ["id"]}"#, FLOW).unwrap();
}

#[test]
fn a_broken_schema_is_a_load_error_at_the_step() {
    let e = build_with_schema(r#"{"type": "objekt"}"#, FLOW).unwrap_err();
    assert!(e.contains("invalid JSON Schema"), "{e}");
    assert!(e.contains("flows.yaml:7:"), "{e}");
}
