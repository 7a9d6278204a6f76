//! MQTT 3.1.1 and 5 (Mosquitto and others) on rumqttc: the `mqtt` source (persistent sessions,
//! acks after the flow commits) and the `mqtt` sink (QoS, retain, `Ok` only after
//! PUBACK/PUBCOMP). `client.rs` puts both protocol versions behind one API.

pub mod client;
pub mod sink;
pub mod source;

use std::time::Duration;

use rumqttc::QoS;
use sluice_core::BuildError;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{FieldSpec, FieldType};

/// Where and as whom to connect, from an `mqtt://user:password@host:port` url.
#[derive(Clone, PartialEq, Eq)]
pub struct Broker {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// User name and password, when the url has them.
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.write_str(&self.what())
    }
}

impl Broker {
    /// Parses `mqtt://[user[:password]@]host[:port]` (`tcp://` is accepted too).
    pub fn parse(url: &str) -> Result<Self, BuildError> {
        let bad = |why: &str| {
            BuildError::field(
                "url",
                format!("{why}; write it as mqtt://user:password@host:1883"),
            )
        };
        let rest = match url.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => rest,
            Some(("mqtts" | "ssl", _)) => {
                return Err(BuildError::field(
                    "url",
                    "TLS (mqtts://) is not supported yet; use a TLS-terminating proxy or a plain mqtt:// listener on a trusted network",
                ));
            }
            Some((scheme, _)) => return Err(bad(&format!("the scheme `{scheme}` is not mqtt"))),
            None => return Err(bad("is not a url")),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') {
            return Err(bad("has a path, which MQTT urls do not use"));
        }
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| bad(&format!("the port `{p}` is not a number")))?,
            ),
            _ => (hostport, 1883),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        let credentials = userinfo.map(|u| match u.split_once(':') {
            Some((user, password)) => (percent_decode(user), percent_decode(password)),
            None => (percent_decode(u), String::new()),
        });
        Ok(Broker {
            host: host.to_owned(),
            port,
            credentials,
        })
    }

    /// `MQTT broker at mqtt://host:port`: names the service in errors and health reports.
    pub fn what(&self) -> String {
        format!("MQTT broker at mqtt://{}:{}", self.host, self.port)
    }
}

/// The message header that carries an MQTT 5 content type (the name HTTP components use).
pub const CONTENT_TYPE: &str = "content-type";

/// Largest packet sent or received (the body plus the topic and a few bytes).
pub const MAX_PACKET: usize = 16 << 20;

/// `%XX` escapes in the user name and password of a url.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(v) = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The QoS of a `qos` field value (0, 1 or 2).
pub fn qos(level: u8) -> Result<QoS, BuildError> {
    match level {
        0 => Ok(QoS::AtMostOnce),
        1 => Ok(QoS::AtLeastOnce),
        2 => Ok(QoS::ExactlyOnce),
        _ => Err(BuildError::field("qos", "must be 0, 1 or 2")),
    }
}

/// The number of a QoS, for headers.
pub fn qos_number(qos: QoS) -> u8 {
    match qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

/// Checks a client id: MQTT 3.1.1 brokers must accept 1..=23 characters of `[0-9a-zA-Z]`; most
/// accept longer ones and other characters, so only emptiness and length are refused.
pub fn check_client_id(id: &str) -> Result<(), BuildError> {
    if id.is_empty() {
        return Err(BuildError::field(
            "client_id",
            "is empty; a persistent session needs a stable client id",
        ));
    }
    if id.len() > 65535 {
        return Err(BuildError::field("client_id", "is longer than 65535 bytes"));
    }
    Ok(())
}

fn url_field() -> FieldSpec {
    FieldSpec::new(
        "url",
        FieldType::String,
        "Broker address `mqtt://user:password@host:1883` (user and password optional).",
    )
    .required()
    .secret()
}

fn keep_alive_field() -> FieldSpec {
    FieldSpec::new(
        "keep_alive",
        FieldType::Duration,
        "Ping interval; a broker that stays silent for 1.5 times this is considered gone.",
    )
    .default_value("30s")
}

fn qos_field(doc: &'static str) -> FieldSpec {
    FieldSpec::new(
        "qos",
        FieldType::Integer {
            min: Some(0),
            max: Some(2),
        },
        doc,
    )
    .default_value(1)
}

pub(crate) fn default_keep_alive() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

pub(crate) fn default_qos() -> u8 {
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_and_without_credentials() {
        let b = Broker::parse("mqtt://bob:p%40ss@mq.local:1884").unwrap();
        assert_eq!(b.host, "mq.local");
        assert_eq!(b.port, 1884);
        assert_eq!(b.credentials, Some(("bob".into(), "p@ss".into())));
        assert!(!format!("{b:?}").contains("p@ss"));
        let b = Broker::parse("tcp://127.0.0.1/").unwrap();
        assert_eq!(
            (b.host.as_str(), b.port, b.credentials.clone()),
            ("127.0.0.1", 1883, None)
        );
        assert_eq!(b.what(), "MQTT broker at mqtt://127.0.0.1:1883");
    }

    #[test]
    fn bad_urls_name_the_field() {
        for url in [
            "mqtts://h",
            "http://h",
            "h:1883",
            "mqtt://h:x",
            "mqtt://:1883",
            "mqtt://h/a",
        ] {
            let err = Broker::parse(url).unwrap_err();
            assert_eq!(err.field.as_deref(), Some("url"), "{url}");
        }
        assert!(qos(3).is_err());
        assert_eq!(qos(2).unwrap(), QoS::ExactlyOnce);
        assert!(check_client_id("").is_err());
    }
}
