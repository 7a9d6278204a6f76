//! Reads flow files, checks everything, and reports every problem at once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sluice_core::Registry;
use sluice_core::spec::{ComponentKind, FieldSpec, FieldType};

use super::diag::{Diagnostic, Diagnostics, Reporter, suggest};
use super::interpolate::{Lookup, ProcessEnv, interpolate};
use super::model::{
    ComponentUse, ERROR_TARGET, FlowDef, FlowFile, FlowHandling, Policies, Project, REPLY_TARGET,
    TestDef,
};
use super::node::{self, Loc, Node, Value};
use super::validate::{self, Checker};
use crate::expr;
use crate::resilience::{BREAKER_KEY, RETRY_KEY, breaker_fields, retry_fields};

/// Keys a step, source or target entry may carry beside its component key.
const ENTRY_KEYS: [&str; 4] = ["id", "description", RETRY_KEY, BREAKER_KEY];
/// Keys a flow may have.
const FLOW_KEYS: [&str; 9] = [
    "name",
    "description",
    "from",
    "steps",
    "to",
    "on_error",
    "dead_letter",
    "concurrency",
    "ordered_by",
];
/// Keys a file may have at the top.
const FILE_KEYS: [&str; 2] = ["flows", "tests"];
/// Largest flow file read, so a stray multi-gigabyte file is an error, not an outage.
const MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;

/// The files named by `paths`: each file as is, each directory's `*.yaml`/`*.yml` (not
/// recursive, sorted by name).
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, Diagnostics> {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for path in paths {
        let fail = |message: String| Diagnostic {
            file: Arc::from(path.display().to_string()),
            loc: Loc { line: 1, column: 1 },
            path: String::new(),
            message,
            help: None,
        };
        if path.is_dir() {
            match std::fs::read_dir(path) {
                Ok(entries) => {
                    let mut found: Vec<PathBuf> = entries
                        .filter_map(Result::ok)
                        .map(|e| e.path())
                        .filter(|p| {
                            p.is_file()
                                && matches!(
                                    p.extension().and_then(|e| e.to_str()),
                                    Some("yaml" | "yml")
                                )
                        })
                        .collect();
                    found.sort();
                    if found.is_empty() {
                        problems.push(fail(
                            "no `*.yaml` or `*.yml` flow files in this folder".into(),
                        ));
                    }
                    files.extend(found);
                }
                Err(e) => problems.push(fail(format!("cannot read folder: {e}"))),
            }
        } else if path.is_file() {
            files.push(path.clone());
        } else {
            problems.push(fail("no such file or folder".into()));
        }
    }
    if problems.is_empty() {
        Ok(files)
    } else {
        Err(Diagnostics(problems))
    }
}

/// Loads and validates every flow file under `paths` with the process environment.
pub fn load(paths: &[PathBuf], registry: &Registry) -> Result<Project, Diagnostics> {
    load_with(paths, registry, &ProcessEnv)
}

/// Loads and validates, taking `${env:..}` values from `lookup`.
pub fn load_with(
    paths: &[PathBuf],
    registry: &Registry,
    lookup: &dyn Lookup,
) -> Result<Project, Diagnostics> {
    let files = collect_files(paths)?;
    let mut project = Project::default();
    let mut all = Vec::new();
    for path in files {
        let name: Arc<str> = Arc::from(path.display().to_string());
        let mut report = Reporter::new(Arc::clone(&name));
        let text = match read_limited(&path) {
            Ok(text) => text,
            Err(message) => {
                report.error(Loc { line: 1, column: 1 }, "", message, None);
                all.extend(report.finish());
                continue;
            }
        };
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if let Some(file) = load_text(&text, &base, &name, registry, lookup, &mut report) {
            project.files.push(file);
        }
        all.extend(report.finish());
    }
    check_project(&project, &mut all);
    let mut diagnostics = Diagnostics(all);
    diagnostics.sort();
    if diagnostics.is_empty() {
        Ok(project)
    } else {
        Err(diagnostics)
    }
}

fn read_limited(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read file: {e}"))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "file is {} bytes; flow files are limited to {MAX_FILE_BYTES} bytes",
            meta.len()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read file: {e}"))?;
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "file is not UTF-8 text (byte {})",
            e.utf8_error().valid_up_to()
        )
    })
}

/// Loads one file's text (exposed for tests and for `sluice validate -`).
pub fn load_text(
    text: &str,
    base: &Path,
    file: &Arc<str>,
    registry: &Registry,
    lookup: &dyn Lookup,
    report: &mut Reporter,
) -> Option<FlowFile> {
    let mut root = match node::parse(text) {
        Ok(root) => root,
        Err(e) => {
            report.error(
                e.loc.unwrap_or(Loc { line: 1, column: 1 }),
                "",
                e.message,
                Some("fix the YAML syntax first".into()),
            );
            return None;
        }
    };
    interpolate(&mut root, "", base, lookup, report);
    let checker = LoadChecker { registry };
    let Value::Map(entries) = &root.value else {
        report.error(
            root.loc,
            "",
            format!(
                "a flow file is a map with `flows:` (and optionally `tests:`), found {}",
                root.shape()
            ),
            None,
        );
        return None;
    };
    for (key, _) in entries {
        if !FILE_KEYS.contains(&key.name.as_str()) {
            report.error(
                key.loc,
                &key.name,
                format!("unknown top-level key `{}`", key.name),
                Some(hint(&key.name, &FILE_KEYS)),
            );
        }
    }
    let mut out = FlowFile {
        path: Arc::clone(file),
        flows: Vec::new(),
        tests: Vec::new(),
    };
    match root.get("flows") {
        Some(Node {
            value: Value::Seq(flows),
            ..
        }) => {
            for (i, flow) in flows.iter().enumerate() {
                if let Some(def) = flow_def(flow, &format!("flows[{i}]"), file, &checker, report) {
                    out.flows.push(def);
                }
            }
        }
        Some(other) => report.error(
            other.loc,
            "flows",
            format!("`flows` is a list of flows, found {}", other.shape()),
            None,
        ),
        None => report.error(
            root.loc,
            "",
            "missing `flows:`",
            Some("a flow file lists its flows under `flows:`".into()),
        ),
    }
    if let Some(tests) = root.get("tests") {
        out.tests = tests_block(tests, file, &checker, report);
    }
    Some(out)
}

fn hint(word: &str, allowed: &[&str]) -> String {
    let list = format!("allowed: {}", allowed.join(", "));
    match suggest(word, allowed.iter().copied()) {
        Some(s) => format!("{s} ({list})"),
        None => list,
    }
}

fn flow_def(
    node: &Node,
    path: &str,
    file: &Arc<str>,
    checker: &LoadChecker<'_>,
    report: &mut Reporter,
) -> Option<FlowDef> {
    let Value::Map(entries) = &node.value else {
        report.error(
            node.loc,
            path,
            format!(
                "a flow is a map with `name`, `from`, `steps` and `to`, found {}",
                node.shape()
            ),
            None,
        );
        return None;
    };
    for (key, _) in entries {
        if !FLOW_KEYS.contains(&key.name.as_str()) {
            report.error(
                key.loc,
                &format!("{path}.{}", key.name),
                format!("unknown flow key `{}`", key.name),
                Some(hint(&key.name, &FLOW_KEYS)),
            );
        }
    }
    let name = match node.get("name") {
        Some(Node {
            value: Value::Str(s),
            ..
        }) if valid_name(s) => Some(s.clone()),
        Some(n) => {
            report.error(
                n.loc,
                &format!("{path}.name"),
                "a flow name is letters, digits, `-` and `_`",
                None,
            );
            None
        }
        None => {
            report.error(
                node.loc,
                path,
                "missing `name` for this flow",
                Some("every flow needs a unique `name`".into()),
            );
            None
        }
    };
    let from = match node.get("from") {
        Some(n) => entry(
            n,
            ComponentKind::Source,
            &format!("{path}.from"),
            "from".into(),
            checker,
            report,
        ),
        None => {
            report.error(
                node.loc,
                path,
                "missing `from:` for this flow",
                Some("a flow starts from one source, e.g. `from: {http: {path: /orders}}`".into()),
            );
            None
        }
    };
    let steps = match node.get("steps") {
        Some(n) => step_list(n, &format!("{path}.steps"), "steps", checker, report),
        None => Some(Vec::new()),
    };
    let to = match node.get("to") {
        None => Some(Vec::new()),
        Some(
            n @ Node {
                value: Value::Seq(items),
                ..
            },
        ) => {
            let _ = n;
            let mut out = Vec::new();
            let mut ok = true;
            for (i, item) in items.iter().enumerate() {
                match entry(
                    item,
                    ComponentKind::Sink,
                    &format!("{path}.to[{i}]"),
                    format!("to[{i}]"),
                    checker,
                    report,
                ) {
                    Some(c) => out.push(c),
                    None => ok = false,
                }
            }
            ok.then_some(out)
        }
        // A single target may be written without the list.
        Some(n) => entry(
            n,
            ComponentKind::Sink,
            &format!("{path}.to"),
            "to[0]".into(),
            checker,
            report,
        )
        .map(|c| vec![c]),
    };
    let handling = flow_handling(node, path, checker, report);
    let (name, from, steps, to, handling) = (name?, from?, steps?, to?, handling?);
    let mut ids = BTreeSet::new();
    for c in steps
        .iter()
        .chain(to.iter())
        .chain(handling.on_error.iter())
        .chain(handling.dead_letter.iter())
    {
        if !ids.insert(c.id.clone()) {
            report.error(
                c.loc,
                &c.path,
                format!("id `{}` is used twice in flow `{name}`", c.id),
                Some("give each step and target its own `id`".into()),
            );
        }
        if c.kind == ComponentKind::Sink && (c.id == REPLY_TARGET || c.id == ERROR_TARGET) {
            report.error(
                c.loc,
                &c.path,
                format!("`{}` is reserved for test expectations", c.id),
                Some("choose another `id`".into()),
            );
        }
    }
    Some(FlowDef {
        name,
        file: Arc::clone(file),
        loc: node.loc,
        from,
        steps,
        to,
        handling,
    })
}

/// A flow's `on_error`, `dead_letter`, `concurrency` and `ordered_by`.
fn flow_handling(
    node: &Node,
    path: &str,
    checker: &LoadChecker<'_>,
    report: &mut Reporter,
) -> Option<FlowHandling> {
    let before = report.count();
    let on_error = match node.get("on_error") {
        Some(n) => step_list(n, &format!("{path}.on_error"), "on_error", checker, report)
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let dead_letter = node.get("dead_letter").and_then(|n| {
        entry(
            n,
            ComponentKind::Sink,
            &format!("{path}.dead_letter"),
            "dead_letter".into(),
            checker,
            report,
        )
    });
    let concurrency = node.get("concurrency").and_then(|n| {
        let spec = FieldType::Integer {
            min: Some(1),
            max: Some(1_000_000),
        };
        validate::typed(
            &spec,
            n,
            &format!("{path}.concurrency"),
            false,
            checker,
            report,
        )
        .and_then(|v| v.as_u64())
        .and_then(|v| usize::try_from(v).ok())
    });
    let ordered_by = node.get("ordered_by").and_then(|n| {
        validate::typed(
            &FieldType::Jq,
            n,
            &format!("{path}.ordered_by"),
            false,
            checker,
            report,
        )
        .and_then(|v| v.as_str().map(str::to_owned))
    });
    (report.count() == before).then_some(FlowHandling {
        on_error,
        dead_letter,
        concurrency,
        ordered_by,
    })
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Validates a list of steps (a flow's `steps:` or a nested one).
fn step_list(
    node: &Node,
    path: &str,
    id_prefix: &str,
    checker: &LoadChecker<'_>,
    report: &mut Reporter,
) -> Option<Vec<ComponentUse>> {
    let Value::Seq(items) = &node.value else {
        report.error(
            node.loc,
            path,
            format!("`steps` is a list of steps, found {}", node.shape()),
            Some("write each step as `- name: config`".into()),
        );
        return None;
    };
    let mut out = Vec::new();
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        match entry(
            item,
            ComponentKind::Processor,
            &format!("{path}[{i}]"),
            format!("{id_prefix}[{i}]"),
            checker,
            report,
        ) {
            Some(c) => out.push(c),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// One `{component: config, id?: .., description?: ..}` entry.
fn entry(
    node: &Node,
    kind: ComponentKind,
    path: &str,
    default_id: String,
    checker: &LoadChecker<'_>,
    report: &mut Reporter,
) -> Option<ComponentUse> {
    let registry = checker.registry;
    let names = registry.names(kind);
    let entries: Vec<(&node::Key, Option<&Node>)> = match &node.value {
        Value::Map(entries) => entries.iter().map(|(k, v)| (k, Some(v))).collect(),
        // `- stdout` names a component that needs no configuration.
        Value::Str(_) => Vec::new(),
        _ => {
            report.error(
                node.loc,
                path,
                format!(
                    "expected a {} such as `{}: {{...}}`, found {}",
                    noun(kind),
                    names.first().copied().unwrap_or("name"),
                    node.shape()
                ),
                None,
            );
            return None;
        }
    };
    let bare_key;
    let entries = if let Value::Str(s) = &node.value {
        bare_key = node::Key {
            name: s.clone(),
            loc: node.loc,
        };
        vec![(&bare_key, None)]
    } else {
        entries
    };
    let mut id = default_id;
    let mut component: Option<(&node::Key, Option<&Node>)> = None;
    let mut policies = Policies::default();
    for (key, value) in entries {
        if key.name == RETRY_KEY || key.name == BREAKER_KEY {
            policies.read(key, value, kind, path, checker, report);
            continue;
        }
        if ENTRY_KEYS.contains(&key.name.as_str()) {
            if key.name == "id" {
                match value.and_then(Node::as_str) {
                    Some(s) if valid_name(s) => id = s.to_owned(),
                    _ => report.error(
                        key.loc,
                        &format!("{path}.id"),
                        "an `id` is letters, digits, `-` and `_`",
                        None,
                    ),
                }
            }
            continue;
        }
        if component.is_some() {
            report.error(
                key.loc,
                path,
                format!(
                    "one {} per entry: found a second component key `{}`",
                    noun(kind),
                    key.name
                ),
                Some("start a new list entry (`- `) for the next one".into()),
            );
            return None;
        }
        component = Some((key, value));
    }
    let Some((key, value)) = component else {
        report.error(
            node.loc,
            path,
            format!("this entry names no {}", noun(kind)),
            Some(format!("{}: {}", kind.plural(), names.join(", "))),
        );
        return None;
    };
    let Some((spec, _)) = registry.get(kind, &key.name) else {
        let help = match suggest(&key.name, names.iter().copied()) {
            Some(s) => s,
            None => format!("{}: {}", kind.plural(), names.join(", ")),
        };
        let elsewhere = [
            ComponentKind::Source,
            ComponentKind::Processor,
            ComponentKind::Sink,
        ]
        .into_iter()
        .find(|k| *k != kind && registry.get(*k, &key.name).is_some());
        let message = match elsewhere {
            Some(other) => format!(
                "`{}` is not a {} (it is used under `{}:`)",
                key.name,
                noun(kind),
                other.flow_key()
            ),
            None => format!("unknown {} `{}`", noun(kind), key.name),
        };
        report.error(
            key.loc,
            &format!("{path}.{}", key.name),
            message,
            Some(help),
        );
        return None;
    };
    let null = Node {
        value: Value::Null,
        loc: key.loc,
        secret: false,
    };
    let config_node = value.unwrap_or(&null);
    let config_path = format!("{path}.{}", key.name);
    let config = validate::component(spec, config_node, &config_path, checker, report)?;
    Some(ComponentUse {
        kind,
        component: key.name.clone(),
        id,
        config,
        node: config_node.clone(),
        path: config_path,
        loc: key.loc,
        policies,
    })
}

impl Policies {
    /// Reads a `retry:` or `circuit_breaker:` key of an entry.
    fn read(
        &mut self,
        key: &node::Key,
        value: Option<&Node>,
        kind: ComponentKind,
        path: &str,
        checker: &LoadChecker<'_>,
        report: &mut Reporter,
    ) {
        let key_path = format!("{path}.{}", key.name);
        if kind == ComponentKind::Source {
            report.error(
                key.loc,
                &key_path,
                format!("`{}` is not available on a source", key.name),
                Some("a source redelivers by its own means; put the policy on the step or target that fails".into()),
            );
            return;
        }
        let Some(node) = value else { return };
        // `retry: {}` takes every default; so does a bare `retry:`.
        let empty = Node {
            value: Value::Map(Vec::new()),
            loc: node.loc,
            secret: false,
        };
        let node = if matches!(node.value, Value::Null) {
            &empty
        } else {
            node
        };
        if key.name == RETRY_KEY {
            let json =
                validate::object(&retry_fields(), node, &key_path, RETRY_KEY, checker, report);
            self.retry = Some(json);
        } else {
            if kind == ComponentKind::Sink && node.get("fallback").is_some() {
                report.error(
                    key.loc,
                    &format!("{key_path}.fallback"),
                    "a target's circuit breaker has no `fallback`",
                    Some("a target has no output to replace; put the call in a step to use a fallback".into()),
                );
                return;
            }
            let json = validate::object(
                &breaker_fields(),
                node,
                &key_path,
                BREAKER_KEY,
                checker,
                report,
            );
            self.circuit_breaker = Some(json);
            self.node = Some(node.clone());
            self.path = key_path;
        }
    }
}

fn noun(kind: ComponentKind) -> &'static str {
    match kind {
        ComponentKind::Source => "source",
        ComponentKind::Processor => "processor",
        ComponentKind::Sink => "sink",
    }
}

/// Validates a nested step list found by a composite processor at build time.
pub(crate) fn nested_steps(
    registry: &Registry,
    node: &Node,
    path: &str,
    id_prefix: &str,
    file: &Arc<str>,
) -> Result<Vec<ComponentUse>, Vec<Diagnostic>> {
    let mut report = Reporter::new(Arc::clone(file));
    let checker = LoadChecker { registry };
    let uses = step_list(node, path, id_prefix, &checker, &mut report);
    let problems = report.finish();
    match uses {
        Some(uses) if problems.is_empty() => Ok(uses),
        _ => Err(problems),
    }
}

/// Validates expressions and nested steps while the spec walk goes on.
struct LoadChecker<'a> {
    registry: &'a Registry,
}

impl Checker for LoadChecker<'_> {
    fn check_jq(&self, code: &str, node: &Node, path: &str, report: &mut Reporter) {
        if let Err(e) = expr::jq::compile(code, expr::jq::JqLimits::default()) {
            let loc = offset_loc(node, code, e.offset);
            report.error(
                loc,
                path,
                format!("invalid jq expression: {}", e.message),
                None,
            );
        }
    }

    fn check_template(&self, source: &str, node: &Node, path: &str, report: &mut Reporter) {
        if let Err(e) = expr::template::compile(source) {
            report.error(node.loc, path, format!("invalid template: {e}"), None);
        }
    }

    fn check_steps(&self, node: &Node, path: &str, report: &mut Reporter) {
        let id_prefix = path.rsplit('.').next().unwrap_or("steps").to_owned();
        let _ = step_list(node, path, &id_prefix, self, report);
    }
}

/// The location of byte `offset` inside a scalar written on one line; for block scalars (which
/// start on the next line) the scalar's own location.
fn offset_loc(node: &Node, code: &str, offset: Option<usize>) -> Loc {
    match offset {
        Some(off) if !code[..off.min(code.len())].contains('\n') => {
            // Plain and quoted scalars on one line: the column moves with the offset (quoted
            // ones are off by the quote; close enough to point at the right token).
            Loc {
                line: node.loc.line,
                column: node.loc.column + u32::try_from(off).unwrap_or(0),
            }
        }
        _ => node.loc,
    }
}

/// Field specs of a test entry, so test blocks get the same located checks as components.
fn test_fields() -> Vec<FieldSpec> {
    let message = || {
        FieldType::Object(vec![
            FieldSpec::new(
                "body",
                FieldType::Any,
                "the body: JSON, or a string for a text body",
            ),
            FieldSpec::new(
                "headers",
                FieldType::Map(Box::new(FieldType::String)),
                "headers",
            ),
            FieldSpec::new(
                "pattern",
                FieldType::Enum(vec!["in_only", "in_out"]),
                "exchange pattern",
            ),
        ])
    };
    vec![
        FieldSpec::new("name", FieldType::String, "what the test checks").required(),
        FieldSpec::new("flow", FieldType::String, "the flow under test").required(),
        FieldSpec::new("input", message(), "the injected message"),
        FieldSpec::new(
            "inputs",
            FieldType::List(Box::new(message())),
            "several injected messages, dispatched one after the other (instead of `input`)",
        ),
        FieldSpec::new(
            "mocks",
            FieldType::Map(Box::new(message())),
            "canned results by step id",
        ),
        FieldSpec::new(
            "expect",
            FieldType::List(Box::new(FieldType::Object(vec![
                FieldSpec::new(
                    "target",
                    FieldType::String,
                    "a target id, `reply` or `error`",
                )
                .required(),
                FieldSpec::new(
                    "count",
                    FieldType::Integer {
                        min: Some(0),
                        max: None,
                    },
                    "number of messages",
                ),
                FieldSpec::new(
                    "index",
                    FieldType::Integer {
                        min: Some(0),
                        max: None,
                    },
                    "which message",
                ),
                FieldSpec::new("body", FieldType::Any, "exact body"),
                FieldSpec::new(
                    "headers",
                    FieldType::Map(Box::new(FieldType::String)),
                    "headers that must match",
                ),
                FieldSpec::new("condition", FieldType::Jq, "a jq predicate on the body"),
                FieldSpec::new(
                    "error",
                    FieldType::Object(vec![
                        FieldSpec::new(
                            "kind",
                            FieldType::Enum(sluice_core::ErrorKind::names()),
                            "error kind",
                        ),
                        FieldSpec::new("contains", FieldType::String, "text in the error"),
                    ]),
                    "expected failure",
                ),
            ]))),
            "expectations",
        )
        .required(),
    ]
}

fn tests_block(
    node: &Node,
    file: &Arc<str>,
    checker: &LoadChecker<'_>,
    report: &mut Reporter,
) -> Vec<TestDef> {
    let Value::Seq(items) = &node.value else {
        report.error(
            node.loc,
            "tests",
            format!("`tests` is a list of tests, found {}", node.shape()),
            None,
        );
        return Vec::new();
    };
    let fields = test_fields();
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("tests[{i}]");
        let before = report.count();
        let json = validate::object(&fields, item, &path, "test", checker, report);
        if report.count() > before {
            continue;
        }
        match serde_json::from_value::<TestDef>(json) {
            Ok(_) if item.at_path("input").is_some() && item.at_path("inputs").is_some() => {
                report.error(
                    item.loc,
                    &path,
                    "a test has `input` or `inputs`, not both",
                    Some("put the single message first in `inputs`".into()),
                );
            }
            Ok(mut test) => {
                test.file = Some(Arc::clone(file));
                test.loc = item.loc;
                out.push(test);
            }
            Err(e) => report.error(item.loc, &path, format!("invalid test: {e}"), None),
        }
    }
    out
}

/// Checks across files: unique flow names, tests naming existing flows and targets, channels with
/// both ends.
fn check_project(project: &Project, out: &mut Vec<Diagnostic>) {
    let mut flows: BTreeMap<&str, &FlowDef> = BTreeMap::new();
    let diag = |file: &Arc<str>, loc: Loc, path: String, message: String, help: Option<String>| {
        Diagnostic {
            file: Arc::clone(file),
            loc,
            path,
            message,
            help,
        }
    };
    for flow in project.flows() {
        if let Some(first) = flows.insert(&flow.name, flow) {
            out.push(diag(
                &flow.file,
                flow.loc,
                String::new(),
                format!("flow name `{}` is used twice", flow.name),
                Some(format!("the first is in {}:{}", first.file, first.loc.line)),
            ));
        }
    }
    // Channels: every channel written to must be read by exactly one flow, and the other way round.
    let mut readers: BTreeMap<String, Vec<&FlowDef>> = BTreeMap::new();
    let mut writers: BTreeMap<String, Vec<(&FlowDef, &ComponentUse)>> = BTreeMap::new();
    // A step that computes its channels at run time may feed any reader.
    let mut dynamic_writers = false;
    for flow in project.flows() {
        if flow.from.component == crate::channel::NAME {
            readers
                .entry(crate::channel::channel_name(&flow.from.config))
                .or_default()
                .push(flow);
        }
        for target in &flow.to {
            if target.component == crate::channel::NAME {
                writers
                    .entry(crate::channel::channel_name(&target.config))
                    .or_default()
                    .push((flow, target));
            }
        }
        // Steps that send to channels (a wire tap, a recipient list), nested ones included.
        for step in flow.steps.iter().chain(&flow.handling.on_error) {
            let sends = crate::channel::sent_to_by_step(&step.component, &step.config);
            dynamic_writers |= sends.dynamic;
            for name in sends.names {
                writers.entry(name).or_default().push((flow, step));
            }
        }
    }
    for (name, list) in &readers {
        if list.len() > 1 {
            for flow in &list[1..] {
                out.push(diag(&flow.file, flow.from.loc, format!("{}.from", flow.name), format!("channel `{name}` is read by more than one flow"), Some("a channel has one consumer flow; use a multicast or a second channel to fan out".into())));
            }
        }
        if !writers.contains_key(name) && !dynamic_writers {
            let flow = list[0];
            let help = suggest(name, writers.keys().map(String::as_str)).unwrap_or_else(|| {
                "add `to: [{channel: {name: ...}}]` in the flow that feeds it".into()
            });
            out.push(diag(
                &flow.file,
                flow.from.loc,
                format!("{}.from", flow.name),
                format!("no flow writes to channel `{name}`"),
                Some(help),
            ));
        }
    }
    // A durable channel is durable at both ends: a target that disagrees with the reading flow's
    // source would keep messages in memory that the reader expects on disk, or the other way round.
    for (name, list) in &writers {
        let Some(reader) = readers.get(name).and_then(|r| r.first()) else {
            continue;
        };
        let read_durable = crate::channel::is_durable(&reader.from.config);
        for (flow, target) in list {
            if target.component != crate::channel::NAME
                || crate::channel::is_durable(&target.config) == read_durable
            {
                continue;
            }
            let (this_end, other_end) = if read_durable {
                ("in memory", "durable")
            } else {
                ("durable", "in memory")
            };
            out.push(diag(
                &flow.file,
                target.loc,
                target.path.clone(),
                format!(
                    "channel `{name}` is {this_end} here but {other_end} where flow `{}` reads it ({}:{})",
                    reader.name, reader.file, reader.from.loc.line
                ),
                Some(format!(
                    "set `durable: {read_durable}` on both ends of the channel"
                )),
            ));
        }
    }
    for (name, list) in &writers {
        if !readers.contains_key(name) {
            for (flow, target) in list {
                let help = suggest(name, readers.keys().map(String::as_str))
                    .unwrap_or_else(|| "add a flow with `from: {channel: {name: ...}}`".into());
                out.push(diag(
                    &flow.file,
                    target.loc,
                    target.path.clone(),
                    format!("no flow reads from channel `{name}`"),
                    Some(help),
                ));
            }
        }
    }
    for file in &project.files {
        for (i, test) in file.tests.iter().enumerate() {
            let path = format!("tests[{i}]");
            let Some(flow) = flows.get(test.flow.as_str()) else {
                let help = suggest(&test.flow, flows.keys().copied());
                out.push(diag(
                    &file.path,
                    test.loc,
                    format!("{path}.flow"),
                    format!("test `{}` names unknown flow `{}`", test.name, test.flow),
                    help,
                ));
                continue;
            };
            for (j, e) in test.expect.iter().enumerate() {
                let known = e.target == REPLY_TARGET
                    || e.target == ERROR_TARGET
                    || e.target.starts_with(crate::channel::CAPTURE_PREFIX)
                    || flow.to.iter().any(|t| t.id == e.target)
                    || flow
                        .handling
                        .dead_letter
                        .as_ref()
                        .is_some_and(|t| t.id == e.target);
                if !known {
                    let ids: Vec<&str> = flow
                        .to
                        .iter()
                        .map(|t| t.id.as_str())
                        .chain([REPLY_TARGET, ERROR_TARGET])
                        .collect();
                    out.push(diag(
                        &file.path,
                        test.loc,
                        format!("{path}.expect[{j}].target"),
                        format!("flow `{}` has no target `{}`", flow.name, e.target),
                        Some(hint(&e.target, &ids)),
                    ));
                }
            }
            for step in test.mocks.keys() {
                if !contains_step(&flow.steps, step) {
                    out.push(diag(
                        &file.path,
                        test.loc,
                        format!("{path}.mocks.{step}"),
                        format!("flow `{}` has no step with id `{step}`", flow.name),
                        Some("mocks are keyed by a step's `id:`".into()),
                    ));
                }
            }
        }
    }
}

fn contains_step(steps: &[ComponentUse], id: &str) -> bool {
    steps
        .iter()
        .any(|s| s.id == id || s.node.to_string_ids().iter().any(|n| n == id))
}

impl Node {
    /// Every `id:` value below this node (for nested steps referenced by tests).
    fn to_string_ids(&self) -> Vec<String> {
        let mut out = Vec::new();
        collect_ids(self, &mut out);
        out
    }
}

fn collect_ids(node: &Node, out: &mut Vec<String>) {
    match &node.value {
        Value::Map(entries) => {
            for (k, v) in entries {
                if k.name == "id"
                    && let Some(s) = v.as_str()
                {
                    out.push(s.to_owned());
                }
                collect_ids(v, out);
            }
        }
        Value::Seq(items) => items.iter().for_each(|i| collect_ids(i, out)),
        _ => {}
    }
}
