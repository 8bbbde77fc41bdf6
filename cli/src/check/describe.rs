//! Certificates in words, for the report. The client certificate's CN is the
//! client secret under Magistrala mTLS, so it is always masked.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate, X509Name};
use x509_parser::public_key::PublicKey;

use super::Checker;
use propeller_mqtt::tls::days_until;
use propeller_mqtt::IdentityFiles;
use propeller_protocol::ServiceConfig;

/// A CA certificate: subject and expiry; `true` when it has expired.
pub(super) fn ca(cert: &X509Certificate<'_>) -> (String, bool) {
    let not_after = cert.validity().not_after.timestamp();
    (
        format!("{}, {}", name(cert.subject(), false), expiry(not_after)),
        days_until(not_after) < 0,
    )
}

/// A broker certificate: subject, SANs, issuer, expiry.
pub(super) fn broker(cert: &X509Certificate<'_>) -> String {
    format!(
        "{}; SANs {}; issuer {}; {}",
        name(cert.subject(), false),
        sans(cert),
        name(cert.issuer(), false),
        expiry(cert.validity().not_after.timestamp())
    )
}

/// Step 3: the client certificate, its key, its chain, the CN rule and the
/// key file. The files were already loaded and checked by the TLS setup.
pub(super) fn client(
    c: &mut Checker,
    config: &ServiceConfig,
    files: &IdentityFiles,
    ca_certs: &[CertificateDer<'_>],
) {
    let service = config.service;
    let Ok(chain) = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
    else {
        return;
    };
    let Some(Ok((_, leaf))) = chain
        .first()
        .map(|der| X509Certificate::from_der(der.as_ref()))
    else {
        return;
    };
    let version = leaf.version().0 + 1;
    let not_after = leaf.validity().not_after.timestamp();
    let detail = format!(
        "{}; issuer {}; SANs {}; {}; X.509 v{version}",
        name(leaf.subject(), true),
        name(leaf.issuer(), false),
        sans(&leaf),
        expiry(not_after)
    );
    match days_until(not_after) {
        days if days < 0 => c.warn(
            "client cert",
            detail,
            "the broker will refuse it: issue a new client certificate",
        ),
        days if days < 30 => c.warn(
            "client cert",
            detail,
            "issue a new client certificate before it expires",
        ),
        _ => c.ok("client cert", detail),
    }
    if version == 1 {
        c.ok("client cert", "X.509 v1 (upstream's Makefile): rustls cannot parse it, so we present it ourselves; nginx and mosquitto accept it");
    }
    c.ok(
        "client key",
        format!("{}; matches the certificate", key_type(&leaf)),
    );

    // The chain, by signature: webpki refuses v1 certificates that nginx accepts.
    let ca_var = service.var("MQTT_TLS_CA_CERT");
    let ca_parsed: Vec<X509Certificate<'_>> = ca_certs
        .iter()
        .filter_map(|der| X509Certificate::from_der(der.as_ref()).ok().map(|(_, c)| c))
        .collect();
    let intermediates: Vec<X509Certificate<'_>> = chain[1..]
        .iter()
        .filter_map(|der| X509Certificate::from_der(der.as_ref()).ok().map(|(_, c)| c))
        .collect();
    if ca_parsed.is_empty() {
        c.warn(
            "chain",
            format!("{ca_var} is not set: cannot check which CA signed the client certificate"),
            format!("set {ca_var} to the Propeller CA"),
        );
    } else if chains_to(&leaf, &intermediates, &ca_parsed) {
        c.ok(
            "chain",
            format!("the client certificate is signed by a CA in {ca_var}"),
        );
    } else {
        c.warn(
            "chain",
            format!("the client certificate is not signed by a CA in {ca_var} (issuer {})", name(leaf.issuer(), false)),
            "an mTLS edge trusting that CA will refuse it: issue it from the same CA, or add its intermediates to the certificate file",
        );
    }

    let cn = leaf
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok());
    let key_var = service.var("CLIENT_KEY");
    match cn {
        Some(cn) if config.mqtt.client_key.expose().ends_with(cn) => c.ok("cn rule", format!("{key_var} ends with the certificate's CN")),
        _ => c.warn(
            "cn rule",
            format!("{key_var} does not end with the certificate's CN: a Magistrala mTLS edge will close the connection"),
            "make the certificate for this client's secret (propeller-mqtt certs client --secret ...)",
        ),
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(metadata) = std::fs::metadata(&files.key) {
            let mode = metadata.permissions().mode() & 0o777;
            match mode & 0o044 {
                0 => c.ok("key file", format!("mode {mode:o}")),
                _ => c.warn(
                    "key file",
                    format!("mode {mode:o}: group or others can read the private key"),
                    format!("chmod 600 {}", files.key.display()),
                ),
            }
        }
    }
}

/// Whether `leaf` chains, through `intermediates`, to one of `roots`.
fn chains_to(
    leaf: &X509Certificate<'_>,
    intermediates: &[X509Certificate<'_>],
    roots: &[X509Certificate<'_>],
) -> bool {
    let mut current = leaf;
    for _ in 0..=intermediates.len() {
        let signed_by = |issuer: &&X509Certificate<'_>| {
            issuer.subject().as_raw() == current.issuer().as_raw()
                && current.verify_signature(Some(issuer.public_key())).is_ok()
        };
        if roots.iter().any(|root| signed_by(&root)) {
            return true;
        }
        match intermediates.iter().find(signed_by) {
            Some(next) => current = next,
            None => return false,
        }
    }
    false
}

fn key_type(cert: &X509Certificate<'_>) -> String {
    match cert.public_key().parsed() {
        Ok(PublicKey::RSA(rsa)) => format!("RSA {} bits", rsa.key_size()),
        Ok(PublicKey::EC(point)) => match point.key_size() {
            256 => "ECDSA P-256".into(),
            384 => "ECDSA P-384".into(),
            521 => "ECDSA P-521".into(),
            bits => format!("EC {bits} bits"),
        },
        _ => format!("key algorithm {}", cert.public_key().algorithm.algorithm),
    }
}

/// `CN=…, O=…`, with the CN masked when it is a secret.
fn name(name: &X509Name<'_>, mask_cn: bool) -> String {
    let parts: Vec<String> = name
        .iter_attributes()
        .map(|attribute| {
            let value = attribute.as_str().unwrap_or("?");
            match attribute.attr_type().to_id_string().as_str() {
                "2.5.4.3" if mask_cn => {
                    format!("CN=<secret, {} characters>", value.chars().count())
                }
                "2.5.4.3" => format!("CN={value}"),
                "2.5.4.10" => format!("O={value}"),
                "2.5.4.11" => format!("OU={value}"),
                "2.5.4.6" => format!("C={value}"),
                "1.2.840.113549.1.9.1" => format!("emailAddress={value}"),
                oid => format!("{oid}={value}"),
            }
        })
        .collect();
    parts.join(", ")
}

fn sans(cert: &X509Certificate<'_>) -> String {
    let names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(extension)) => extension
            .value
            .general_names
            .iter()
            .map(|name| match name {
                GeneralName::DNSName(dns) => format!("DNS:{dns}"),
                GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => format!(
                        "IP:{}",
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*bytes).unwrap_or_default())
                    ),
                    16 => format!(
                        "IP:{}",
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*bytes).unwrap_or_default())
                    ),
                    _ => "IP:?".into(),
                },
                other => format!("{other:?}"),
            })
            .collect(),
        _ => Vec::new(),
    };
    match names.is_empty() {
        true => "none".into(),
        false => names.join(", "),
    }
}

fn expiry(not_after: i64) -> String {
    let date = time::OffsetDateTime::from_unix_timestamp(not_after)
        .map_or("?".into(), |t| t.date().to_string());
    match days_until(not_after) {
        days if days < 0 => format!("EXPIRED on {date}"),
        days => format!("expires {date} ({days} days)"),
    }
}
