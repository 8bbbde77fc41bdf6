//! `propeller-mqtt certs`: the PKI of upstream's `docker/ssl` Makefile, made
//! without openssl.
//!
//! Same subjects and lifetimes as the Makefile, with two deliberate changes:
//! client certificates are X.509 v3 with the clientAuth usage (the Makefile's
//! are v1, which rustls refuses to parse), and the server certificate carries
//! the SANs you ask for, IP addresses included.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use pkcs8::der::pem::LineEnding;
use pkcs8::pkcs5::pbes2;
use rand_core::{OsRng, RngCore};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, RsaKeySize, SanType, PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256,
};
use time::{Duration, OffsetDateTime};

use propeller_mqtt::{ConfigError, Secret};

use crate::CliError;

/// The longest CN X.509 allows (RFC 5280 ub-common-name).
pub const MAX_CN: usize = 64;
/// PBKDF2 rounds for `--encrypt-key`.
const PBKDF2_ROUNDS: u32 = 100_000;

/// Upstream's subject defaults (`O`, `OU_CA`, `OU_CRT`, `EA`, `CN_CA`).
#[derive(Debug, Clone)]
pub struct Subject {
    /// `O`.
    pub organization: String,
    /// `OU` of the CA and client certificates.
    pub ca_unit: String,
    /// `OU` of the server certificate.
    pub server_unit: String,
    /// `emailAddress`.
    pub email: String,
}

impl Default for Subject {
    fn default() -> Self {
        Self {
            organization: "Propeller".into(),
            ca_unit: "propeller_ca".into(),
            server_unit: "propeller_crt".into(),
            email: "propeller@absmach.eu".into(),
        }
    }
}

/// The key type of a new certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// ECDSA on P-256: small and fast; the default.
    EcdsaP256,
    /// RSA, for peers that want it.
    Rsa(RsaBits),
}

/// RSA key sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RsaBits {
    /// 2048 bits.
    B2048,
    /// 3072 bits.
    B3072,
    /// 4096 bits (upstream's size).
    B4096,
}

/// Where and how to write: `<dir>/<name>.crt` and `<dir>/<name>.key`.
#[derive(Debug, Clone)]
pub struct Output {
    /// The directory, created if missing (upstream: `certs`).
    pub dir: PathBuf,
    /// Replace existing files.
    pub force: bool,
    /// Write the key as encrypted PKCS#8 with this password.
    pub key_password: Option<Secret>,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Written {
    /// The certificate.
    pub cert: PathBuf,
    /// The key (mode 0600).
    pub key: PathBuf,
}

/// Makes the CA: `ca.crt` and `ca.key`.
///
/// # Errors
///
/// A file exists and `force` is off, or the directory cannot be written.
pub fn ca(
    out: &Output,
    subject: &Subject,
    key_type: KeyType,
    days: i64,
) -> Result<Written, CliError> {
    let key = new_key(key_type)?;
    let mut params = base_params(days)?;
    params.distinguished_name = name(subject, &subject.ca_unit, "Propeller_Self_Signed_CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).map_err(rcgen_error)?;
    write_pair(out, "ca", &cert.pem(), &key)
}

/// Makes a server certificate signed by `<dir>/ca.crt`, for nginx or the broker.
///
/// `sans` are `DNS:name`, `IP:address`, or a bare name or address.
///
/// # Errors
///
/// No CA in the directory, an invalid SAN, or a file that exists without `force`.
pub fn server(
    out: &Output,
    subject: &Subject,
    name_stem: &str,
    cn: &str,
    sans: &[String],
    key_type: KeyType,
    days: i64,
) -> Result<Written, CliError> {
    let issuer = load_ca(&out.dir)?;
    let key = new_key(key_type)?;
    let mut params = base_params(days)?;
    params.distinguished_name = name(subject, &subject.server_unit, cn);
    params.subject_alt_names = sans
        .iter()
        .map(|san| parse_san(san))
        .collect::<Result<_, _>>()?;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer).map_err(rcgen_error)?;
    write_pair(out, name_stem, &cert.pem(), &key)
}

/// Makes a client certificate whose CN is the client secret, signed by `<dir>/ca.crt`.
///
/// # Errors
///
/// A secret that is empty or longer than [`MAX_CN`], no CA, or a file that
/// exists without `force`.
pub fn client(
    out: &Output,
    subject: &Subject,
    name_stem: &str,
    secret: &Secret,
    key_type: KeyType,
    days: i64,
) -> Result<Written, CliError> {
    let length = secret.expose().chars().count();
    if length == 0 {
        return Err(CliError::Certificate(
            "the client secret is empty: pass the Magistrala client secret with --secret".into(),
        ));
    }
    if length > MAX_CN {
        return Err(CliError::Certificate(format!(
            "the client secret is {length} characters, but a certificate CN holds at most {MAX_CN}: \
             use a shorter Magistrala client secret (a UUID is 36)"
        )));
    }
    let issuer = load_ca(&out.dir)?;
    let key = new_key(key_type)?;
    let mut params = base_params(days)?;
    params.distinguished_name = name(subject, &subject.ca_unit, secret.expose());
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).map_err(rcgen_error)?;
    write_pair(out, name_stem, &cert.pem(), &key)
}

fn new_key(key_type: KeyType) -> Result<KeyPair, CliError> {
    match key_type {
        KeyType::EcdsaP256 => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256),
        KeyType::Rsa(bits) => KeyPair::generate_rsa_for(
            &PKCS_RSA_SHA256,
            match bits {
                RsaBits::B2048 => RsaKeySize::_2048,
                RsaBits::B3072 => RsaKeySize::_3072,
                RsaBits::B4096 => RsaKeySize::_4096,
            },
        ),
    }
    .map_err(rcgen_error)
}

/// Validity from an hour ago (clock skew) for `days`, and a random serial.
fn base_params(days: i64) -> Result<CertificateParams, CliError> {
    if !(1..=36_500).contains(&days) {
        return Err(CliError::Certificate(format!(
            "--days {days}: use 1 to 36500"
        )));
    }
    let mut params = CertificateParams::default();
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
    let mut serial = [0u8; 16];
    OsRng.fill_bytes(&mut serial);
    serial[0] &= 0x7f; // positive
    params.serial_number = Some(serial.to_vec().into());
    Ok(params)
}

/// Upstream's subject order: CN, O, OU, emailAddress.
fn name(subject: &Subject, unit: &str, common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name.push(DnType::OrganizationName, subject.organization.as_str());
    name.push(DnType::OrganizationalUnitName, unit);
    // emailAddress, 1.2.840.113549.1.9.1
    name.push(
        DnType::CustomDnType(vec![1, 2, 840, 113_549, 1, 9, 1]),
        subject.email.as_str(),
    );
    name
}

fn parse_san(text: &str) -> Result<SanType, CliError> {
    let invalid = || CliError::Certificate(format!("--san {text:?}: write DNS:name or IP:address"));
    let (kind, value) = match text.split_once(':') {
        Some((kind @ ("DNS" | "dns" | "IP" | "ip"), value)) => (kind.to_ascii_uppercase(), value),
        _ => match text.parse::<IpAddr>() {
            Ok(_) => ("IP".to_owned(), text),
            Err(_) => ("DNS".to_owned(), text),
        },
    };
    match kind.as_str() {
        "IP" => value.parse().map(SanType::IpAddress).map_err(|_| invalid()),
        _ => value
            .try_into()
            .map(SanType::DnsName)
            .map_err(|_| invalid()),
    }
}

fn load_ca(dir: &Path) -> Result<Issuer<'static, KeyPair>, CliError> {
    let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            var: "the CA".into(),
            path: path.to_owned(),
            source,
        })
    };
    let missing = |path: &Path, what: &str| ConfigError::Material {
        var: "the CA".into(),
        path: path.to_owned(),
        problem: format!("{what}: make the CA first with `propeller-mqtt certs ca`, or pass --dir"),
    };
    let (cert_pem, key_pem) = (read(&cert_path)?, read(&key_path)?);
    let key = KeyPair::from_pem(&key_pem)
        .map_err(|_| missing(&key_path, "is not an unencrypted PKCS#8 key"))?;
    Ok(Issuer::from_ca_cert_pem(&cert_pem, key)
        .map_err(|_| missing(&cert_path, "is not a PEM certificate"))?)
}

fn write_pair(
    out: &Output,
    stem: &str,
    cert_pem: &str,
    key: &KeyPair,
) -> Result<Written, CliError> {
    let written = Written {
        cert: out.dir.join(format!("{stem}.crt")),
        key: out.dir.join(format!("{stem}.key")),
    };
    if !out.force {
        for path in [&written.cert, &written.key] {
            if path.exists() {
                return Err(CliError::WouldOverwrite { path: path.clone() });
            }
        }
    }
    let key_pem = match &out.key_password {
        None => key.serialize_pem(),
        Some(password) => encrypt(key, password)?,
    };
    std::fs::create_dir_all(&out.dir).map_err(|source| CliError::Write {
        path: out.dir.clone(),
        source,
    })?;
    write_file(&written.key, key_pem.as_bytes(), 0o600)?;
    write_file(&written.cert, cert_pem.as_bytes(), 0o644)?;
    Ok(written)
}

/// Encrypted PKCS#8 (PBES2: PBKDF2-SHA256, AES-256-CBC), what `openssl pkcs8
/// -topk8` writes and what the services read with `..._KEY_PASSWORD`.
fn encrypt(key: &KeyPair, password: &Secret) -> Result<String, CliError> {
    let der = key.serialize_der();
    let info = pkcs8::PrivateKeyInfo::try_from(der.as_slice())
        .map_err(|e| CliError::Certificate(format!("cannot re-read the new key: {e}")))?;
    let (mut salt, mut iv) = ([0u8; 16], [0u8; 16]);
    OsRng.fill_bytes(&mut salt);
    OsRng.fill_bytes(&mut iv);
    let params = pbes2::Parameters::pbkdf2_sha256_aes256cbc(PBKDF2_ROUNDS, &salt, &iv)
        .map_err(|e| CliError::Certificate(format!("cannot encrypt the key: {e}")))?;
    let document = info
        .encrypt_with_params(params, password.expose())
        .map_err(|e| CliError::Certificate(format!("cannot encrypt the key: {e}")))?;
    document
        .to_pem("ENCRYPTED PRIVATE KEY", LineEnding::LF)
        .map(|pem| pem.to_string())
        .map_err(|e| CliError::Certificate(format!("cannot encode the key: {e}")))
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CliError> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    let write = || -> std::io::Result<()> {
        let mut file = options.open(path)?;
        // `mode` applies only to new files; a replaced file gets it here.
        #[cfg(unix)]
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        file.write_all(bytes)
    };
    write().map_err(|source| CliError::Write {
        path: path.to_owned(),
        source,
    })
}

fn rcgen_error(error: rcgen::Error) -> CliError {
    CliError::Certificate(format!("cannot make the certificate: {error}"))
}
