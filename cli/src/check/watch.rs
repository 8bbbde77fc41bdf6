//! A verifier and a certificate resolver that remember what the broker showed
//! and asked, around the real ones.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

use propeller_mqtt::tls::Parts;
use propeller_mqtt::ConfigError;

pub(super) struct Watched {
    verifier: Arc<RecordChain>,
    resolver: Arc<RecordRequest>,
}

impl Watched {
    pub fn new(parts: &Parts) -> Self {
        Self {
            verifier: Arc::new(RecordChain {
                inner: parts.verifier.clone(),
                chain: Mutex::default(),
            }),
            resolver: Arc::new(RecordRequest {
                inner: parts.resolver.clone(),
                asked: AtomicBool::new(false),
            }),
        }
    }

    pub fn client_config(&self, parts: &Parts) -> Result<ClientConfig, ConfigError> {
        parts.assemble(self.verifier.clone(), Some(self.resolver.clone()))
    }

    /// The certificates the broker presented, leaf first.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.verifier
            .chain
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether the broker sent a CertificateRequest.
    pub fn certificate_requested(&self) -> bool {
        self.resolver.asked.load(Ordering::SeqCst)
    }
}

#[derive(Debug)]
struct RecordChain {
    inner: Arc<dyn ServerCertVerifier>,
    chain: Mutex<Vec<CertificateDer<'static>>>,
}

impl ServerCertVerifier for RecordChain {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.clone().into_owned())
            .collect();
        *self.chain.lock().unwrap_or_else(PoisonError::into_inner) = chain;
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct RecordRequest {
    inner: Option<Arc<dyn ResolvesClientCert>>,
    asked: AtomicBool,
}

impl ResolvesClientCert for RecordRequest {
    fn resolve(&self, hints: &[&[u8]], schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.asked.store(true, Ordering::SeqCst);
        self.inner.as_ref()?.resolve(hints, schemes)
    }

    fn has_certs(&self) -> bool {
        true
    }
}
