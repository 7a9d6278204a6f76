//! Snapshot tests of what `validate` tells a user about broken flow files.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::path::PathBuf;

fn diagnostics(yaml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flows.yaml");
    std::fs::write(&path, yaml).unwrap();
    let err = sluice_engine::config::load(&[path], &sluice::registry())
        .expect_err("the file should not validate");
    // Paths differ per run; show the file name only.
    err.to_string()
        .replace(&dir.path().display().to_string(), "<dir>")
}

#[test]
fn every_problem_is_reported_at_once_with_locations_and_suggestions() {
    let text = diagnostics(
        r#"
flows:
  - name: orders
    from:
      htpp: { path: /orders }
    steps:
      - transfrom: '.'
      - filter: { conditon: '.ok' }
      - transform: { expression: '.a | bogus_fn' }
      - choice:
          when:
            - condition: '.x =='
              steps:
                - recipientlist: {}
    to:
      - log: { level: loud }
      - channel: nowhere
"#,
    );
    insta::assert_snapshot!(text);
}

#[test]
fn type_errors_and_missing_fields() {
    let text = diagnostics(
        r#"
flows:
  - name: timers
    from:
      timer: { interval: 5 seconds }
    to:
      - file: { fsync: "yes" }
  - from: { http: { path: /x, max_body: huge } }
"#,
    );
    insta::assert_snapshot!(text);
}

#[test]
fn tests_blocks_are_checked_against_their_flows() {
    let text = diagnostics(
        r#"
flows:
  - name: a
    from: { http: { path: /a } }
    to: [ { id: out, log: {} } ]
tests:
  - name: wrong flow
    flow: b
    expect: [ { target: reply } ]
  - name: wrong target
    flow: a
    expect: [ { target: outt } ]
  - name: bad field
    flow: a
    expct: []
"#,
    );
    insta::assert_snapshot!(text);
}

#[test]
fn secrets_are_never_echoed() {
    // SAFETY of the test: the variable name is unique to this test.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret.txt"), "hunter2-value").unwrap();
    let path = dir.path().join("flows.yaml");
    std::fs::write(
        &path,
        "flows:\n  - name: a\n    from: { timer: { interval: '${file:secret.txt}' } }\n",
    )
    .unwrap();
    let err = sluice_engine::config::load(&[path], &sluice::registry()).expect_err("invalid");
    let text = err.to_string();
    assert!(text.contains("interval"), "{text}");
    assert!(!text.contains("hunter2"), "secret leaked: {text}");
}

#[test]
fn yaml_syntax_errors_name_the_line() {
    let text = diagnostics("flows:\n  - name: a\n    from: [unclosed\n");
    assert!(text.contains("flows.yaml:"), "{text}");
    assert!(text.contains("1 error"), "{text}");
}

#[test]
fn a_folder_without_flow_files_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = sluice_engine::config::load(&[PathBuf::from(dir.path())], &sluice::registry())
        .err()
        .unwrap();
    assert!(err.to_string().contains("no `*.yaml`"), "{err}");
}

#[test]
fn channels_sent_to_by_steps_need_a_reader_and_count_as_writers() {
    let text = diagnostics(
        r#"
flows:
  - name: orders
    from: { http: { path: /orders } }
    steps:
      - wire_tap: audit
      - choice:
          when:
            - condition: '.big'
              steps:
                - recipient_list: { recipients: [review, nowhere] }
  - name: audit
    from: { channel: audit }
  - name: review
    from: { channel: review }
  - name: orphan
    from: { channel: orphan }
"#,
    );
    insta::assert_snapshot!(text);
}
