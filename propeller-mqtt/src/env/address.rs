//! The broker address: `scheme://host[:port]`, or `ws[s]://host[:port][/path]`
//! for MQTT over WebSocket.
//!
//! We parse it ourselves instead of `MqttOptions::parse_url`, which panics when the
//! OS trust store reports a load error and cannot carry our own TLS settings.

use std::fmt;

/// Plain MQTT over TCP, or MQTT over TLS. WebSocket addresses count as
/// their security: `ws://` is [`Transport::Tcp`], `wss://` is [`Transport::Tls`]
/// (see [`BrokerAddress::websocket`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `tcp://`, `mqtt://` or `ws://`.
    Tcp,
    /// `ssl://`, `tls://`, `mqtts://` or `wss://`.
    Tls,
}

/// The default path of `ws://` and `wss://` addresses: Magistrala's nginx
/// serves MQTT over WebSocket at `location /mqtt`.
pub const DEFAULT_WEBSOCKET_PATH: &str = "/mqtt";

/// A parsed broker address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    /// Whether the scheme asks for TLS.
    pub transport: Transport,
    /// Host name or IP address, IPv6 without brackets (that is what rustls and
    /// the resolver expect).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// For MQTT over WebSocket (`ws://`, `wss://`): the path of the HTTP
    /// upgrade request, with its query if any, such as `/mqtt`.
    pub websocket: Option<String>,
}

impl BrokerAddress {
    /// Parses an address such as `tcp://nginx:1883`, `ssl://[::1]:8883`,
    /// `mqtts://broker` or `wss://edge/mqtt`.
    ///
    /// # Errors
    ///
    /// The problem in words, with the accepted forms; the caller adds the variable name.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let Some((scheme, rest)) = text.split_once("://") else {
            return Err(
                "missing scheme: write tcp://host:1883 for plain MQTT or ssl://host:8883 for TLS"
                    .to_owned(),
            );
        };
        let (transport, default_port, websocket) = match scheme.to_ascii_lowercase().as_str() {
            "tcp" | "mqtt" => (Transport::Tcp, 1883, false),
            "ssl" | "tls" | "mqtts" => (Transport::Tls, 8883, false),
            "ws" => (Transport::Tcp, 80, true),
            "wss" => (Transport::Tls, 443, true),
            _ => {
                return Err(format!(
                    "unknown scheme {scheme:?}: use tcp:// or mqtt:// for plain MQTT, ssl://, tls:// or mqtts:// for TLS, ws:// or wss:// for MQTT over WebSocket"
                ))
            }
        };
        let (authority, path) = match (websocket, rest.find(['/', '?'])) {
            (true, Some(at)) => (&rest[..at], Some(&rest[at..])),
            (true, None) => (rest, None),
            (false, _) => (rest.strip_suffix('/').unwrap_or(rest), None),
        };
        if authority.contains(['/', '?', '#', '@']) {
            return Err(match websocket {
                false => "write only scheme://host:port, without user, path or query".to_owned(),
                true => {
                    "write ws://host:port/path or wss://host:port/path, without user".to_owned()
                }
            });
        }
        let websocket = match path {
            _ if !websocket => None,
            None | Some("/") => Some(DEFAULT_WEBSOCKET_PATH.to_owned()),
            Some(path) => Some(websocket_path(path)?),
        };
        let (host, port) = split_host_port(authority)?;
        if host.is_empty() {
            return Err("the host is empty: write scheme://host:port".to_owned());
        }
        check_host(host)?;
        let port = match port {
            None => default_port,
            Some(port) => match port.parse::<u16>() {
                Ok(port) if port != 0 => port,
                _ => return Err(format!("port {port:?} is not a number from 1 to 65535")),
            },
        };
        Ok(Self {
            transport,
            host: host.to_owned(),
            port,
            websocket,
        })
    }
}

/// The path (and query) of a WebSocket address, as the request line will carry it.
fn websocket_path(path: &str) -> Result<String, String> {
    let path = match path.starts_with('?') {
        true => format!("{DEFAULT_WEBSOCKET_PATH}{path}"),
        false => path.to_owned(),
    };
    if !path.bytes().all(|b| b.is_ascii_graphic() && b != b'#') {
        return Err(
            "the path must be visible ASCII without '#' (percent-encode the rest), such as /mqtt"
                .to_owned(),
        );
    }
    Ok(path)
}

/// A host name or IP address goes into request lines and headers (a proxy's
/// CONNECT, a WebSocket's Host): letters, digits, `-`, `.`, `_`, and for IPv6
/// `:` and a `%` zone.
pub(crate) fn check_host(host: &str) -> Result<(), String> {
    match host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._:%".contains(&b))
    {
        true => Ok(()),
        false => Err(
            "the host has characters no host name has: write a DNS name or an IP address"
                .to_owned(),
        ),
    }
}

/// Splits `host:port`, `[v6]:port`, `host` or `[v6]`.
pub(crate) fn split_host_port(authority: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or_else(|| "unclosed '[' in an IPv6 address: write [::1]:8883".to_owned())?;
        return match after {
            "" => Ok((host, None)),
            _ => match after.strip_prefix(':') {
                Some(port) => Ok((host, Some(port))),
                None => Err("write [IPv6 address]:port".to_owned()),
            },
        };
    }
    match authority.split_once(':') {
        Some((_, port)) if port.contains(':') => {
            Err("an IPv6 address needs brackets: write [::1]:8883".to_owned())
        }
        Some((host, port)) => Ok((host, Some(port))),
        None => Ok((authority, None)),
    }
}

impl fmt::Display for BrokerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match (self.transport, &self.websocket) {
            (Transport::Tcp, None) => "tcp",
            (Transport::Tls, None) => "ssl",
            (Transport::Tcp, Some(_)) => "ws",
            (Transport::Tls, Some(_)) => "wss",
        };
        let path = self.websocket.as_deref().unwrap_or("");
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}{path}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}{path}", self.host, self.port)
        }
    }
}

/// `text` (an address, a URL, or a comma-separated list of them) with any
/// `user:password@` replaced, so that a credential pasted into an address
/// never reaches a log or an error message.
pub fn redacted(text: &str) -> String {
    if !text.contains("://") {
        return text.to_owned();
    }
    text.split(',')
        .map(|url| {
            let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => {
                    let prefix = if scheme.is_empty() {
                        String::new()
                    } else {
                        format!("{scheme}://")
                    };
                    format!("{prefix}<redacted>@{}", &rest[at + 1..])
                }
                None => url.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> BrokerAddress {
        BrokerAddress::parse(text).unwrap()
    }

    #[test]
    fn schemes_and_default_ports() {
        assert_eq!(parse("tcp://nginx").port, 1883);
        assert_eq!(parse("mqtt://nginx").transport, Transport::Tcp);
        assert_eq!(parse("ssl://nginx").port, 8883);
        assert_eq!(parse("TLS://nginx:1").transport, Transport::Tls);
        assert_eq!(parse("mqtts://nginx:9000/").port, 9000);
    }

    #[test]
    fn ipv6_host_is_stored_without_brackets() {
        let address = parse("ssl://[::1]:8883");
        assert_eq!(address.host, "::1");
        assert_eq!(address.to_string(), "ssl://[::1]:8883");
        assert_eq!(parse("tcp://[fe80::1]").port, 1883);
    }

    #[test]
    fn bad_addresses_say_what_to_write() {
        for (bad, hint) in [
            ("nginx:1883", "missing scheme"),
            ("http://nginx", "unknown scheme"),
            ("tcp://", "host is empty"),
            ("tcp://:1883", "host is empty"),
            ("tcp://nginx:0", "1 to 65535"),
            ("tcp://nginx:70000", "1 to 65535"),
            ("tcp://nginx:abc", "1 to 65535"),
            ("tcp://::1:1883", "brackets"),
            ("tcp://[::1", "unclosed"),
            ("tcp://user@nginx", "without user"),
            ("tcp://user:hunter2@nginx", "without user"),
            ("tcp://nginx/path", "without user, path"),
            ("tcp://ngi nx:1883", "no host name has"),
            ("ws://a\r\nX:1/mqtt", "no host name has"),
        ] {
            let problem = BrokerAddress::parse(bad).unwrap_err();
            assert!(problem.contains(hint), "{bad:?}: {problem}");
        }
    }

    #[test]
    fn websocket_addresses_have_a_path() {
        let wss = parse("wss://edge.example.com/mqtt");
        assert_eq!(
            (wss.transport, wss.port, wss.websocket.as_deref()),
            (Transport::Tls, 443, Some("/mqtt"))
        );
        assert_eq!(wss.to_string(), "wss://edge.example.com:443/mqtt");
        let ws = parse("WS://[::1]:8080");
        assert_eq!(
            (ws.transport, ws.host.as_str(), ws.websocket.as_deref()),
            (Transport::Tcp, "::1", Some("/mqtt"))
        );
        assert_eq!(ws.to_string(), "ws://[::1]:8080/mqtt");
        assert_eq!(parse("ws://h/").websocket.as_deref(), Some("/mqtt"));
        assert_eq!(
            parse("wss://h:8443/ws/mqtt?x=1").websocket.as_deref(),
            Some("/ws/mqtt?x=1")
        );
        assert_eq!(parse("ws://h?x=1").websocket.as_deref(), Some("/mqtt?x=1"));
        assert_eq!(parse("ssl://h").websocket, None);
        for (bad, hint) in [
            ("wss://u:p@h/mqtt", "without user"),
            ("wss://h/a b", "visible ASCII"),
            ("ws:///mqtt", "host is empty"),
        ] {
            let problem = BrokerAddress::parse(bad).unwrap_err();
            assert!(problem.contains(hint), "{bad:?}: {problem}");
        }
    }

    #[test]
    fn credentials_are_redacted() {
        assert_eq!(
            redacted("tcp://u:hunter2@nginx:1883"),
            "tcp://<redacted>@nginx:1883"
        );
        assert_eq!(
            redacted("ssl://a:1, ssl://u:p@b:8883/x"),
            "ssl://a:1, ssl://<redacted>@b:8883/x"
        );
        assert_eq!(redacted("http://h/p@q"), "http://h/p@q");
        assert_eq!(redacted("ops@example.com"), "ops@example.com");
    }
}
