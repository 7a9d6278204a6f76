//! The generated reference docs and JSON Schema are committed; these tests fail when they are
//! stale. Regenerate with `cargo run -p sluice -- docs` and `cargo run -p sluice -- schema --out
//! docs/flow.schema.json`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::path::Path;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

#[test]
fn reference_docs_are_up_to_date() {
    let pages = sluice_engine::docs::reference(&sluice::registry());
    let dir = root().join("docs/reference");
    let mut stale = Vec::new();
    for (relative, text) in &pages {
        if std::fs::read_to_string(dir.join(relative)).ok().as_deref() != Some(text.as_str()) {
            stale.push(relative.clone());
        }
    }
    assert!(
        stale.is_empty(),
        "stale reference pages {stale:?}: run `cargo run -p sluice -- docs`"
    );
}

#[test]
fn json_schema_is_up_to_date() {
    let schema = serde_json::to_string_pretty(&sluice_engine::docs::schema(&sluice::registry()))
        .unwrap()
        + "\n";
    let committed =
        std::fs::read_to_string(root().join("docs/flow.schema.json")).unwrap_or_default();
    assert!(
        committed == schema,
        "docs/flow.schema.json is stale: run `cargo run -p sluice -- schema --out docs/flow.schema.json`"
    );
}

#[test]
fn every_component_has_docs_and_an_example() {
    for spec in sluice::registry().specs() {
        assert!(!spec.summary.is_empty(), "{} has no summary", spec.name);
        assert!(!spec.examples.is_empty(), "{} has no example", spec.name);
        for field in &spec.fields {
            assert!(
                !field.doc.is_empty(),
                "{}.{} has no doc",
                spec.name,
                field.name
            );
        }
    }
}

fn indent(text: &str, by: usize) -> String {
    let pad = " ".repeat(by);
    text.lines()
        .map(|l| format!("{pad}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A flow file that uses `entry` (a component key and its example) in the right place.
fn flow_using(kind: sluice_core::spec::ComponentKind, entry: &str) -> String {
    use sluice_core::spec::ComponentKind;
    let timer = "    from: { timer: { interval: 1s } }\n";
    match kind {
        ComponentKind::Source => format!("flows:\n  - name: f\n    from:\n{}\n", indent(entry, 6)),
        ComponentKind::Processor => format!(
            "flows:\n  - name: f\n{timer}    steps:\n      -\n{}\n",
            indent(entry, 8)
        ),
        ComponentKind::Sink => format!(
            "flows:\n  - name: f\n{timer}    to:\n      -\n{}\n",
            indent(entry, 8)
        ),
    }
}

#[test]
fn every_spec_example_validates() {
    let registry = sluice::registry();
    for spec in registry.specs() {
        for example in &spec.examples {
            let entry = format!("{}:\n{}", spec.name, indent(example.yaml.trim_end(), 2));
            let mut yaml = flow_using(spec.kind, &entry);
            // A channel needs both ends: add the missing one, named as in the examples.
            // Both ends agree on durability.
            if spec.name == "channel" {
                let other = if example.yaml.contains("durable: true") {
                    "{ channel: { name: orders, durable: true } }"
                } else {
                    "{ channel: orders }"
                };
                if spec.kind == sluice_core::spec::ComponentKind::Source {
                    yaml.push_str(&format!("  - name: other\n    from: {{ timer: {{ interval: 1s }} }}\n    to: [ {other} ]\n"));
                } else {
                    yaml.push_str(&format!("  - name: other\n    from: {other}\n"));
                }
            }
            // A step that sends to channels (a wire tap, a recipient list) needs their readers.
            if spec.kind == sluice_core::spec::ComponentKind::Processor {
                let config: serde_json::Value = serde_saphyr::from_str(example.yaml).unwrap();
                for name in sluice_engine::channel::sent_to_by_step(spec.name, &config).names {
                    yaml.push_str(&format!(
                        "  - name: reader-{name}\n    from: {{ channel: {name} }}\n"
                    ));
                }
            }
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f.yaml");
            std::fs::write(&path, &yaml).unwrap();
            if let Err(d) = sluice_engine::config::load(&[path], &registry) {
                panic!(
                    "example `{}` of `{}` does not validate:\n{yaml}\n{d}",
                    example.title, spec.name
                );
            }
        }
    }
}
