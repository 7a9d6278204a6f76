//! SFTP: the `sftp` source (polls a remote directory, claiming each file by renaming it into a
//! processing directory on the server before reading it) and the `sftp` sink (uploads under a
//! hidden temporary name, then renames). SSH by `russh` on `ring`, SFTP by `russh-sftp`.

pub mod sink;
pub mod source;

use std::path::PathBuf;
use std::sync::Arc;

use russh::client;
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh_sftp::client::SftpSession;
use serde::Deserialize;
use sluice_core::BuildError;
use sluice_core::spec::{FieldSpec, FieldType};

/// The connection fields shared by source and sink.
fn connection_fields() -> Vec<FieldSpec> {
    vec![
        FieldSpec::new("host", FieldType::String, "SSH server host name or address.").required(),
        FieldSpec::new("port", FieldType::Integer { min: Some(1), max: Some(65535) }, "SSH port.")
            .default_value(22),
        FieldSpec::new("user", FieldType::String, "User to log in as.").required(),
        FieldSpec::new("private_key_file", FieldType::String, "OpenSSH private key file (ed25519 or ECDSA; unencrypted, or with `passphrase`)."),
        FieldSpec::new("passphrase", FieldType::String, "Passphrase of `private_key_file`.").secret(),
        FieldSpec::new("password", FieldType::String, "Password, when the server accepts password login (instead of a key).").secret(),
        FieldSpec::new("host_key", FieldType::String, "The server's public host key (`ssh-ed25519 AAAA...`, as in its `.pub` file or `known_hosts`) or its fingerprint (`SHA256:...`, as `ssh-keygen -lf` prints). Any other key is refused."),
        FieldSpec::new("insecure_accept_any_host_key", FieldType::Bool, "Accept any host key without checking (exposed to man-in-the-middle attacks; for tests only).")
            .default_value(false),
    ]
}

/// Connection settings as written in the flow.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionConfig {
    /// Host.
    pub host: String,
    /// Port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// User.
    pub user: String,
    /// Private key file.
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
    /// Its passphrase.
    #[serde(default)]
    pub passphrase: Option<String>,
    /// Password.
    #[serde(default)]
    pub password: Option<String>,
    /// Expected host key or fingerprint.
    #[serde(default)]
    pub host_key: Option<String>,
    /// Skip host key checking.
    #[serde(default)]
    pub insecure_accept_any_host_key: bool,
}

fn default_port() -> u16 {
    22
}

/// How the server proves who it is.
#[derive(Debug, Clone)]
enum HostCheck {
    Key(Box<PublicKey>),
    Fingerprint(String),
    Any,
}

/// How the client proves who it is.
#[derive(Clone)]
enum Auth {
    KeyFile {
        path: PathBuf,
        passphrase: Option<String>,
    },
    Password(String),
}

/// A checked connection configuration.
#[derive(Clone)]
pub struct Connection {
    host: String,
    port: u16,
    user: String,
    auth: Auth,
    check: HostCheck,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("address", &self.address())
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Checks `c`: one way to log in, a host key unless checking is explicitly off.
    pub fn from_config(c: &ConnectionConfig) -> Result<Self, BuildError> {
        if c.host.trim().is_empty() {
            return Err(BuildError::field("host", "is empty; name the SSH server"));
        }
        let auth = match (&c.private_key_file, &c.password) {
            (Some(_), Some(_)) => {
                return Err(BuildError::field(
                    "password",
                    "cannot be combined with `private_key_file`; keep one way to log in",
                ));
            }
            // Read at connection time, like any other resource on the server side: a flow file
            // validates on a machine without the key.
            (Some(path), None) => Auth::KeyFile {
                path: path.clone(),
                passphrase: c.passphrase.clone(),
            },
            (None, Some(password)) => Auth::Password(password.clone()),
            (None, None) => {
                return Err(BuildError::field(
                    "private_key_file",
                    "is missing; set `private_key_file` or `password`",
                ));
            }
        };
        let check = match (&c.host_key, c.insecure_accept_any_host_key) {
            (Some(_), true) => {
                return Err(BuildError::field(
                    "insecure_accept_any_host_key",
                    "cannot be combined with `host_key`; remove one",
                ));
            }
            (None, true) => HostCheck::Any,
            (None, false) => {
                return Err(BuildError::field(
                    "host_key",
                    "is missing: unknown servers are refused; set the server's public key or \
                     `SHA256:` fingerprint (or `insecure_accept_any_host_key: true` for tests)",
                ));
            }
            (Some(text), false) => parse_host_key(text.trim())?,
        };
        Ok(Connection {
            host: c.host.clone(),
            port: c.port,
            user: c.user.clone(),
            auth,
            check,
        })
    }

    /// `host:port`, for messages.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Connects, checks the host key, logs in and starts the SFTP subsystem.
    pub async fn open(&self) -> Result<Session, String> {
        let config = Arc::new(client::Config::default());
        let checker = Checker {
            check: self.check.clone(),
        };
        let mut handle = client::connect(config, (self.host.as_str(), self.port), checker)
            .await
            .map_err(|e| match e {
                russh::Error::UnknownKey => {
                    "the server's host key does not match `host_key`; refusing to connect"
                        .to_owned()
                }
                other => other.to_string(),
            })?;
        let result = match &self.auth {
            Auth::KeyFile { path, passphrase } => {
                let key = russh::keys::load_secret_key(path, passphrase.as_deref())
                    .map_err(|e| format!("cannot load the key `{}`: {e}", path.display()))?;
                let hash = handle
                    .best_supported_rsa_hash()
                    .await
                    .map_err(|e| e.to_string())?
                    .flatten();
                handle
                    .authenticate_publickey(
                        self.user.clone(),
                        PrivateKeyWithHashAlg::new(Arc::new(key), hash),
                    )
                    .await
            }
            Auth::Password(password) => {
                handle
                    .authenticate_password(self.user.clone(), password.clone())
                    .await
            }
        }
        .map_err(|e| e.to_string())?;
        if !result.success() {
            return Err(format!("the server refused the login of `{}`", self.user));
        }
        let channel = handle
            .channel_open_session()
            .await
            .map_err(|e| e.to_string())?;
        channel
            .request_subsystem(true, "sftp")
            .await
            .map_err(|e| e.to_string())?;
        let sftp = SftpSession::new(channel.into_stream())
            .await
            .map_err(|e| e.to_string())?;
        Ok(Session {
            sftp,
            _handle: handle,
        })
    }
}

fn parse_host_key(text: &str) -> Result<HostCheck, BuildError> {
    if let Some(fp) = text.strip_prefix("SHA256:") {
        if fp.is_empty() {
            return Err(BuildError::field("host_key", "the fingerprint is empty"));
        }
        return Ok(HostCheck::Fingerprint(text.to_owned()));
    }
    PublicKey::from_openssh(text)
        .map(|k| HostCheck::Key(Box::new(k)))
        .map_err(|e| {
            BuildError::field(
                "host_key",
                format!(
                    "is neither a public key (`ssh-ed25519 AAAA...`) nor a `SHA256:` fingerprint: {e}"
                ),
            )
        })
}

/// An open SFTP session; the SSH connection lives as long as it.
pub struct Session {
    /// The SFTP client.
    pub sftp: SftpSession,
    _handle: client::Handle<Checker>,
}

/// Checks the server's host key.
pub struct Checker {
    check: HostCheck,
}

impl client::Handler for Checker {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = server_public_key else {
            // Host certificates would need a CA configuration this connector does not have.
            return Ok(matches!(self.check, HostCheck::Any));
        };
        Ok(match &self.check {
            HostCheck::Any => true,
            HostCheck::Key(expected) => expected.key_data() == key.key_data(),
            HostCheck::Fingerprint(expected) => {
                key.fingerprint(HashAlg::Sha256).to_string() == *expected
            }
        })
    }
}

/// The names of the connection fields.
const CONNECTION_KEYS: &[&str] = &[
    "host",
    "port",
    "user",
    "private_key_file",
    "passphrase",
    "password",
    "host_key",
    "insecure_accept_any_host_key",
];

/// Parses a component's configuration into its connection and its own fields `T`, each
/// refusing unknown fields.
pub fn parse_split<T: serde::de::DeserializeOwned>(
    value: &serde_json::Value,
) -> Result<(Connection, T), BuildError> {
    let mut conn = serde_json::Map::new();
    let mut rest = serde_json::Map::new();
    if let Some(map) = value.as_object() {
        for (k, v) in map {
            if CONNECTION_KEYS.contains(&k.as_str()) {
                conn.insert(k.clone(), v.clone());
            } else {
                rest.insert(k.clone(), v.clone());
            }
        }
    }
    let c: ConnectionConfig = crate::config::parse(&serde_json::Value::Object(conn))?;
    let own: T = crate::config::parse(&serde_json::Value::Object(rest))?;
    Ok((Connection::from_config(&c)?, own))
}

/// Joins a remote directory and a name with `/`.
pub fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_key_is_a_key_or_a_fingerprint() {
        assert!(matches!(
            parse_host_key("SHA256:abc").unwrap(),
            HostCheck::Fingerprint(_)
        ));
        assert!(matches!(
            parse_host_key(
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFkqSAXyYCZLMdRC4lpJytWGXG31RpOInfWpBC0T8tat x"
            )
            .unwrap(),
            HostCheck::Key(_)
        ));
        assert_eq!(
            parse_host_key("nonsense").unwrap_err().field.as_deref(),
            Some("host_key")
        );
    }

    #[test]
    fn unknown_hosts_are_refused_unless_insecure() {
        let mut c = ConnectionConfig {
            host: "h".into(),
            port: 22,
            user: "u".into(),
            private_key_file: None,
            passphrase: None,
            password: Some("pw".into()),
            host_key: None,
            insecure_accept_any_host_key: false,
        };
        let err = Connection::from_config(&c).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("host_key"));
        c.insecure_accept_any_host_key = true;
        assert!(Connection::from_config(&c).is_ok());
        c.password = None;
        let err = Connection::from_config(&c).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("private_key_file"));
    }

    #[test]
    fn join_adds_one_slash() {
        assert_eq!(join("/a", "b"), "/a/b");
        assert_eq!(join("/a/", "b"), "/a/b");
    }
}
