//! The generated reference docs and JSON Schema are committed; these tests fail when they are
//! stale. Regenerate with `cargo run -p sluice -- docs` and `cargo run -p sluice -- schema --out
//! docs/flow.schema.json`.

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

#[test]
fn every_spec_example_validates() {
    use sluice_core::spec::ComponentKind;
    let registry = sluice::registry();
    for spec in registry.specs() {
        for example in &spec.examples {
            let entry = format!(
                "{}:\n{}",
                spec.name,
                example
                    .yaml
                    .lines()
                    .map(|l| format!("  {l}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            let entry = if example.yaml.lines().count() == 1 && !example.yaml.contains(':') {
                format!("{}: {}", spec.name, example.yaml.trim())
            } else {
                entry
            };
            let indented = entry
                .lines()
                .map(|l| format!("      {l}"))
                .collect::<Vec<_>>()
                .join("\n");
            let yaml = match spec.kind {
                ComponentKind::Source => format!(
                    "flows:\n  - name: f\n    from:\n{indented}\n",
                    indented = indented.replacen("      ", "      ", 1)
                ),
                ComponentKind::Processor => format!(
                    "flows:\n  - name: f\n    from: {{ timer: {{ interval: 1s }} }}\n    steps:\n      -\n{}\n",
                    indented
                        .lines()
                        .map(|l| format!("  {l}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
                ComponentKind::Sink => format!(
                    "flows:\n  - name: f\n    from: {{ timer: {{ interval: 1s }} }}\n    to:\n      -\n{}\n",
                    indented
                        .lines()
                        .map(|l| format!("  {l}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
            };
            // Channels need both ends.
            let yaml = if spec.name == "channel" {
                "flows:\n  - name: w\n    from: { timer: { interval: 1s } }\n    to: [ { channel: orders } ]\n  - name: r\n    from: { channel: orders }\n".to_owned()
            } else {
                yaml
            };
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
