//! Opening a connection: the url, TLS material read at build time, and a bounded handshake.

use std::path::PathBuf;
use std::time::Duration;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};
use serde::Deserialize;
use sluice_core::BuildError;
use sluice_core::duration::HumanDuration;

/// The `tls` object.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA bundle (PEM).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM, PKCS#8).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// A checked url plus TLS material: everything needed to connect.
#[derive(Clone)]
pub struct ConnectionConfig {
    url: String,
    /// `amqp://host:port/vhost` without credentials, for logs, errors and health.
    display: String,
    tls: OwnedTLSConfig,
    timeout: Duration,
    name: String,
}

impl std::fmt::Debug for ConnectionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the url itself: it holds the password.
        f.debug_struct("ConnectionConfig")
            .field("broker", &self.display)
            .finish_non_exhaustive()
    }
}

impl ConnectionConfig {
    /// Checks `url` and reads the TLS files; `name` is shown in the broker's connection list.
    pub fn new(
        url: &str,
        tls: Option<&TlsConfig>,
        timeout: HumanDuration,
        name: String,
    ) -> Result<Self, BuildError> {
        let parsed: AMQPUri = url.parse().map_err(|e: String| {
            BuildError::field(
                "url",
                format!("is not an AMQP url ({e}); write it as amqp://user:password@host:5672/%2f"),
            )
        })?;
        let display = format!(
            "{}://{}:{}/{}",
            parsed.scheme,
            parsed.authority.host,
            parsed.authority.port,
            if parsed.vhost == "/" {
                "%2f"
            } else {
                &parsed.vhost
            }
        );
        if parsed.scheme == AMQPScheme::AMQPS && !cfg!(feature = "amqp-tls") {
            return Err(BuildError::field(
                "url",
                "is amqps:// but this build of Sluice has no AMQP TLS (Cargo feature `amqp-tls`); rebuild with it or use amqp://",
            ));
        }
        if timeout.0.is_zero() {
            return Err(BuildError::field(
                "connect_timeout",
                "must be longer than 0s",
            ));
        }
        let mut owned = OwnedTLSConfig::default();
        if let Some(tls) = tls {
            if parsed.scheme != AMQPScheme::AMQPS {
                return Err(BuildError::field(
                    "tls",
                    "is set but the url is not amqps://; use an amqps:// url or remove `tls`",
                ));
            }
            if let Some(ca) = &tls.ca_file {
                let pem = std::fs::read_to_string(ca).map_err(|e| {
                    BuildError::field(
                        "tls.ca_file",
                        format!("cannot read `{}`: {e}", ca.display()),
                    )
                })?;
                owned.cert_chain = Some(pem);
            }
            match (&tls.cert_file, &tls.key_file) {
                (Some(cert), Some(key)) => {
                    let read = |field: &str, path: &PathBuf| {
                        std::fs::read(path).map_err(|e| {
                            BuildError::field(
                                field,
                                format!("cannot read `{}`: {e}", path.display()),
                            )
                        })
                    };
                    owned.identity = Some(OwnedIdentity::PKCS8 {
                        pem: read("tls.cert_file", cert)?,
                        key: read("tls.key_file", key)?,
                    });
                }
                (None, None) => {}
                (Some(_), None) => {
                    return Err(BuildError::field(
                        "tls.key_file",
                        "is missing; a client certificate needs its private key",
                    ));
                }
                (None, Some(_)) => {
                    return Err(BuildError::field(
                        "tls.cert_file",
                        "is missing; a private key needs its client certificate",
                    ));
                }
            }
        }
        Ok(ConnectionConfig {
            url: url.to_owned(),
            display,
            tls: owned,
            timeout: timeout.0,
            name,
        })
    }

    /// `RabbitMQ at amqp://host:port/vhost`: names the service in errors and health reports.
    pub fn what(&self) -> String {
        format!("RabbitMQ at {}", self.display)
    }

    /// The time allowed for connecting, opening a channel and declaring.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Opens a connection, within the timeout.
    pub async fn connect(&self) -> Result<Connection, String> {
        let properties =
            ConnectionProperties::default().with_connection_name(self.name.clone().into());
        let runtime = lapin::runtime::default_runtime().map_err(|e| e.to_string())?;
        let attempt =
            Connection::connect_with_config(&self.url, properties, self.tls.clone(), runtime);
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(describe(&e)),
            Err(_) => Err(format!(
                "no answer within connect_timeout ({})",
                HumanDuration(self.timeout)
            )),
        }
    }
}

/// A lapin error in words, with the broker's reply code and text for protocol errors.
pub fn describe(error: &lapin::Error) -> String {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => format!("the broker refused: {e}"),
        lapin::ErrorKind::IOError(e) => format!("connection failed: {e}"),
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(1))
    }

    #[test]
    #[cfg(not(feature = "amqp-tls"))]
    fn amqps_needs_the_tls_feature() {
        let err = ConnectionConfig::new("amqps://h", None, timeout(), "t".into()).unwrap_err();
        assert!(err.message.contains("amqp-tls"), "{}", err.message);
    }

    #[test]
    fn display_hides_credentials() {
        let c = ConnectionConfig::new(
            "amqp://bob:s3cret@mq.local:5673/%2f",
            None,
            timeout(),
            "t".into(),
        )
        .unwrap();
        assert_eq!(c.what(), "RabbitMQ at amqp://mq.local:5673/%2f");
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    #[cfg(feature = "amqp-tls")]
    fn bad_urls_and_tls_combinations_are_refused() {
        let err = ConnectionConfig::new("http://x", None, timeout(), "t".into()).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("url"));
        let tls = TlsConfig::default();
        let err = ConnectionConfig::new("amqp://h", Some(&tls), timeout(), "t".into()).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("tls"));
        let tls = TlsConfig {
            cert_file: Some("/nonexistent.pem".into()),
            ..TlsConfig::default()
        };
        let err =
            ConnectionConfig::new("amqps://h", Some(&tls), timeout(), "t".into()).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("tls.key_file"));
        let tls = TlsConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..TlsConfig::default()
        };
        let err =
            ConnectionConfig::new("amqps://h", Some(&tls), timeout(), "t".into()).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("tls.ca_file"));
        assert!(err.message.contains("cannot read"), "{}", err.message);
    }

    #[test]
    #[cfg(feature = "amqp-tls")]
    fn tls_files_are_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let tls = TlsConfig {
            ca_file: Some(ca),
            ..TlsConfig::default()
        };
        let c =
            ConnectionConfig::new("amqps://h:5671/%2f", Some(&tls), timeout(), "t".into()).unwrap();
        assert!(c.tls.cert_chain.is_some());
        assert_eq!(c.what(), "RabbitMQ at amqps://h:5671/%2f");
    }
}
