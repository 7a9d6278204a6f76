//! One connection pool per url and settings, shared by every PostgreSQL component of the process
//! through [`Resources`]; connection settings (statement timeout, TLS) for pooled and dedicated
//! connections alike.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use sluice_core::{BuildError, Resources};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::db::PgDatabase;
use crate::sql::{ConnectionOptions, Database, redact};

/// The pools of the process, by url and settings.
#[derive(Default)]
pub struct PgPools {
    pools: Mutex<HashMap<String, Arc<PgDatabase>>>,
}

/// The shared database for `url` and `options`.
pub fn database(
    resources: &Resources,
    url: &str,
    options: &ConnectionOptions,
) -> Result<Arc<dyn Database>, BuildError> {
    Ok(shared(resources, url, options)? as Arc<dyn Database>)
}

/// The shared pool for `url` and `options`, as its concrete type (sources need transactions).
pub fn shared(
    resources: &Resources,
    url: &str,
    options: &ConnectionOptions,
) -> Result<Arc<PgDatabase>, BuildError> {
    let key = format!(
        "{url}\u{0}{}\u{0}{:?}\u{0}{:?}\u{0}{:?}",
        options.pool_size, options.statement_timeout.0, options.connect_timeout.0, options.ca_file
    );
    let pools = resources.get_or_default::<PgPools>();
    let mut pools = match pools.pools.lock() {
        Ok(p) => p,
        // Inserting is the only change and cannot be left half done.
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Some(db) = pools.get(&key) {
        return Ok(Arc::clone(db));
    }
    let (config, tls) = connection(url, options)?;
    let manager = Manager::from_config(
        config,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(options.pool_size)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(options.connect_timeout.0))
        .wait_timeout(Some(
            options.connect_timeout.0 + options.statement_timeout.0,
        ))
        .build()
        .map_err(|e| BuildError::field("url", format!("cannot create the pool: {e}")))?;
    let db = Arc::new(PgDatabase::new(
        pool,
        format!("PostgreSQL at {}", redact(url)),
        options.statement_timeout.0,
    ));
    pools.insert(key, Arc::clone(&db));
    Ok(db)
}

/// The client settings and TLS connector for `url`: `statement_timeout` enforced by the server,
/// TLS off unless the url asks for it with `sslmode=prefer|require`.
pub fn connection(
    url: &str,
    options: &ConnectionOptions,
) -> Result<(tokio_postgres::Config, MakeRustlsConnect), BuildError> {
    let mut config = tokio_postgres::Config::from_str(url).map_err(|e| {
        BuildError::field(
            "url",
            format!("`{}` is not a PostgreSQL url: {e}", redact(url)),
        )
    })?;
    if !url.contains("sslmode=") {
        config.ssl_mode(SslMode::Disable);
    }
    let timeout_ms = options.statement_timeout.0.as_millis();
    let server_options = match config.get_options() {
        Some(existing) => format!("{existing} -c statement_timeout={timeout_ms}"),
        None => format!("-c statement_timeout={timeout_ms}"),
    };
    config.options(&server_options);
    config.connect_timeout(options.connect_timeout.0);
    if config.get_application_name().is_none() {
        config.application_name("sluice");
    }
    Ok((config, tls(options.ca_file.as_deref())?))
}

/// rustls with the public web roots, or the CAs of `ca_file`.
fn tls(ca_file: Option<&str>) -> Result<MakeRustlsConnect, BuildError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| BuildError::field("ca_file", format!("cannot read `{path}`: {e}")))?;
            for cert in certs {
                let cert = cert.map_err(|e| {
                    BuildError::field("ca_file", format!("`{path}` holds a bad certificate: {e}"))
                })?;
                roots.add(cert).map_err(|e| {
                    BuildError::field("ca_file", format!("`{path}` holds a bad certificate: {e}"))
                })?;
            }
            if roots.is_empty() {
                return Err(BuildError::field(
                    "ca_file",
                    format!("`{path}` holds no PEM certificate"),
                ));
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| BuildError::new(format!("cannot set up TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_is_off_unless_asked_and_the_statement_timeout_is_sent() {
        let options = ConnectionOptions::default();
        let (config, _) = connection("postgres://u@127.0.0.1:5432/test", &options).unwrap();
        assert_eq!(config.get_ssl_mode(), SslMode::Disable);
        assert_eq!(config.get_options(), Some("-c statement_timeout=30000"));
        let (config, _) =
            connection("postgres://u@127.0.0.1/test?sslmode=require", &options).unwrap();
        assert_eq!(config.get_ssl_mode(), SslMode::Require);
        let err = connection("postgres://u@127.0.0.1/test?sslmode=bogus", &options)
            .err()
            .unwrap();
        assert_eq!(err.field.as_deref(), Some("url"));
        let bad_ca = ConnectionOptions {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..ConnectionOptions::default()
        };
        let err = connection("postgres://u@127.0.0.1/test", &bad_ca)
            .err()
            .unwrap();
        assert_eq!(err.field.as_deref(), Some("ca_file"));
    }
}
