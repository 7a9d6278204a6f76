//! The `sluice` command: run, validate and test flow files; generate the schema and docs;
//! browse and replay dead letters (`dlq.rs`).

mod dlq;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use sluice_core::Resources;
use sluice_engine::{build, config, docs, runtime::Runtime, testing};

/// mimalloc instead of the system allocator: a message's life is many small allocations (JSON
/// values, headers, jq values) freed soon after on another worker thread, where glibc's malloc
/// spent about a quarter of the CPU time of the W1 benchmark (docs/benchmarks.md). Built with
/// `no_thp`: transparent huge pages made an idle process 9 MB larger for no measurable gain.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Run integration flows declared in YAML"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the flows in these files or folders until interrupted (Ctrl-C or SIGTERM).
    Run {
        /// Flow files, or folders of `*.yaml` files.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// How long in-flight work may take to finish at shutdown.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        grace: Duration,
        /// Serve the admin API (`/metrics` for Prometheus, `/health`) on this address, e.g.
        /// `127.0.0.1:9464`. Off by default.
        #[arg(long, value_name = "ADDR")]
        admin: Option<std::net::SocketAddr>,
        /// Where durable state lives (durable channels, dead letters, idempotency keys); opened
        /// and locked only if a flow needs it.
        #[arg(long, value_name = "DIR", default_value = sluice_engine::durable::DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
    /// Check flow files without running them; report every problem with file:line:column.
    Validate {
        /// Flow files, or folders of `*.yaml` files.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Run the `tests:` blocks of flow files.
    Test {
        /// Flow files, or folders of `*.yaml` files.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Browse, delete and replay dead letters (the `dead_letter_store` of `--data`, or of a
    /// running Sluice through `--admin URL`).
    Dlq(dlq::DlqArgs),
    /// Print the JSON Schema of flow files (for editor autocomplete).
    Schema {
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write the component reference docs (Markdown) generated from component specs.
    Docs {
        /// The folder to write into.
        #[arg(long, default_value = "docs/reference")]
        out: PathBuf,
        /// Only check that the folder is up to date; exit 1 if not.
        #[arg(long)]
        check: bool,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    sluice_core::duration::parse(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Flow tests provoke failures on purpose; their warnings would drown the PASS/FAIL lines.
    let default_level = match cli.command {
        Command::Test { .. } => "error",
        // The store's open and close would otherwise log over the command's output.
        Command::Dlq(_) => "warn",
        _ => "info",
    };
    init_logging(cli.log_format, default_level);
    let result = match cli.command {
        Command::Run {
            paths,
            grace,
            admin,
            data,
        } => run(&paths, grace, admin, &data),
        Command::Validate { paths } => validate(&paths),
        Command::Test { paths } => test(&paths),
        Command::Dlq(args) => dlq::run(args),
        Command::Schema { out } => schema(out),
        Command::Docs { out, check } => write_docs(&out, check),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn load(paths: &[PathBuf]) -> Result<config::Project, ExitCode> {
    let registry = sluice::registry();
    config::load(paths, &registry).map_err(|diagnostics| {
        eprintln!("{diagnostics}");
        ExitCode::FAILURE
    })
}

fn run(
    paths: &[PathBuf],
    grace: Duration,
    admin: Option<std::net::SocketAddr>,
    data: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let registry = sluice::registry();
    let project = match load(paths) {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    let rt = tokio_runtime()?;
    rt.block_on(async {
        let resources = Arc::new(Resources::default());
        resources
            .get_or_default::<sluice_engine::durable::DurableStore>()
            .set_dir(data);
        let topology = match build::build(&project, &registry, resources) {
            Ok(t) => t,
            Err(diagnostics) => {
                eprintln!("{diagnostics}");
                return Ok(ExitCode::FAILURE);
            }
        };
        let runtime = Runtime::start(topology);
        if let Some(addr) = admin {
            let state = sluice::admin::AdminState::new(&runtime);
            sluice::admin::serve(addr, state, runtime.shutdown_token()).await?;
        }
        wait_for_signal().await?;
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "shutting down; finishing in-flight work"
        );
        let forced = runtime.shutdown(grace).await;
        Ok(if forced == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot listen for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

fn validate(paths: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let registry = sluice::registry();
    let project = match load(paths) {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    // Building runs every factory, so semantic errors (a bad cron, a bad URL) surface too; nothing
    // is started. Factories may touch the async runtime, so give them one.
    let rt = tokio_runtime()?;
    let built = rt.block_on(async {
        // Checking never touches the data directory: durable components get a store in memory.
        let resources = Arc::new(Resources::default());
        resources
            .get_or_default::<sluice_engine::durable::DurableStore>()
            .use_memory();
        build::build(&project, &registry, resources).map(|_| ())
    });
    match built {
        Ok(()) => {
            let flows = project.flows().count();
            let tests = project.tests().count();
            println!(
                "ok: {flows} flow(s) and {tests} test(s) in {} file(s)",
                project.files.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(diagnostics) => {
            eprintln!("{diagnostics}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn test(paths: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let registry = sluice::registry();
    let project = match load(paths) {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    let rt = tokio_runtime()?;
    let results = rt.block_on(testing::run_all(&project, &registry));
    for result in &results {
        println!("{result}");
    }
    println!("{}", testing::summary(&results));
    Ok(if results.iter().all(testing::TestResult::passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn schema(out: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let text = serde_json::to_string_pretty(&docs::schema(&sluice::registry()))? + "\n";
    match out {
        Some(path) => std::fs::write(&path, text)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn write_docs(out: &std::path::Path, check: bool) -> anyhow::Result<ExitCode> {
    let pages = docs::reference(&sluice::registry());
    let mut stale = Vec::new();
    for (relative, text) in &pages {
        let path = out.join(relative);
        if check {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                stale.push(path);
            }
            continue;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if check && !stale.is_empty() {
        for path in &stale {
            eprintln!("stale: {}", path.display());
        }
        eprintln!(
            "run `sluice docs --out {}` and commit the result",
            out.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    if !check {
        println!("wrote {} page(s) to {}", pages.len(), out.display());
    }
    Ok(ExitCode::SUCCESS)
}
