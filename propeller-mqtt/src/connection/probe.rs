//! A second look at a TLS connection that closed before CONNACK.
//!
//! Two things hide why a TLS server refused us:
//! - under TLS 1.3 a server checks our certificate only after our side of the
//!   handshake is done, so rumqttc has already written CONNECT; the server
//!   closes with it unread, the kernel sends a reset, and the alert is lost;
//! - nginx's stream module sends no alert at all: it completes the handshake,
//!   checks `ssl_verify_client` itself, and closes.
//!
//! The probe handshakes again, sends nothing, and listens. An alert now arrives
//! intact; a close without one, before we said anything, is a refusal of our
//! certificate; silence means TLS is fine and the server waits for CONNECT.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::failure::Failure;
use super::transport::{handshake, Route};
use crate::tls::{unix_now, CertificateFacts, TlsSetup};
use crate::{Mode, Options};

/// How long we wait for a verdict once the handshake is done. A server that
/// accepts our certificate says nothing until CONNECT, so this is also the
/// probe's cost when TLS is fine.
pub const VERDICT_WAIT: Duration = Duration::from_secs(2);

/// A closer look at a TLS connection closed before CONNACK (`failure`, already
/// in the terms of the mode) to broker `broker` of `config`: the probe below.
/// Other failures are returned as they are.
pub(crate) async fn diagnose(
    failure: Failure,
    config: &Options,
    broker: usize,
    tls: Option<&TlsSetup>,
) -> Failure {
    let closed_after_tls = matches!(
        failure,
        Failure::ClosedBeforeConnAck | Failure::ClosedBeforeConnAckWithoutCertificate
    );
    match tls {
        Some(tls) if closed_after_tls => tls_refusal(config, broker, tls).await.unwrap_or(failure),
        _ => failure,
    }
}

/// The TLS-level reason the server refuses us, or `None` when TLS is fine (or
/// the probe cannot tell). Goes the way the connection goes: through the
/// proxy, with the same SNI and ALPN.
pub(crate) async fn tls_refusal(
    config: &Options,
    broker: usize,
    tls: &TlsSetup,
) -> Option<Failure> {
    let route = Route::new(config, &config.brokers[broker], Some(tls));
    let mode = config.mode();
    let tcp = match tokio::time::timeout(VERDICT_WAIT, route.open()).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(error)) => return Failure::from_io(&error, mode),
        Err(_) => return None,
    };
    let tls_route = route.tls.as_ref()?;
    let mut stream = match tokio::time::timeout(VERDICT_WAIT, handshake(tls_route, tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Failure::from_io(&error, mode),
        Err(_) => return None,
    };
    verdict(&mut stream, mode, tls.identity.as_ref(), VERDICT_WAIT).await
}

/// Right after a handshake, before we send anything: what the server says.
/// An alert is classified; a close before we said a word means our
/// certificate was refused; silence (`None`) means TLS is fine.
pub async fn verdict<S: AsyncRead + Unpin>(
    stream: &mut S,
    mode: Mode,
    ours: Option<&CertificateFacts>,
    wait: Duration,
) -> Option<Failure> {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(wait, stream.read(&mut byte)).await {
        Ok(Err(error)) => Failure::from_io(&error, mode),
        Ok(Ok(0)) => Some(match (mode, ours) {
            (Mode::MutualTls, Some(ours)) if ours.not_after < unix_now() => {
                Failure::ClientCertificateExpired
            }
            // No alert: nginx closes right after the handshake instead.
            (Mode::MutualTls, _) => Failure::ClientCertificateRejected(None),
            _ => Failure::ClientCertificateRequired,
        }),
        // Silence (the server waits for CONNECT) or data: no TLS verdict.
        _ => None,
    }
}
