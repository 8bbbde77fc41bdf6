//! A throwaway PKI, generated once per test process with the `openssl` CLI, so
//! that the files are exactly what operators make with upstream's Makefile.
//!
//! Layout (all PEM, in one directory):
//! - `ca.crt` / `ca.key`: the Propeller CA (ECDSA P-256, upstream's subject);
//!   `other-ca.crt`: an unrelated CA, for "wrong CA" cases.
//! - `server.crt`: DNS:localhost, IP:127.0.0.1. `server-dns.crt`: DNS names only,
//!   like upstream's. `server-expired.crt`: expired last year.
//! - one client per service, `manager`, `proplet`, `proxy` (ECDSA, PKCS#8, v3,
//!   clientAuth), with CN = that client's secret;
//! - key forms: `pkcs1` (RSA), `sec1` (EC), `encrypted` (PBES2 PKCS#8,
//!   password [`KEY_PASSWORD`]), `legacy` (Proc-Type encrypted RSA), and `v1`,
//!   a v1 certificate as `openssl x509 -req` without extensions writes;
//! - `expired`: an expired client; `soon`: expires in 10 days; `stranger`:
//!   signed by the other CA; `rotated`: the proplet's CN, signed by the
//!   other CA (its secret is the proplet's).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The password of the `encrypted` and `legacy` client keys.
pub const KEY_PASSWORD: &str = "correct horse battery staple";

/// The generated PKI.
#[derive(Debug)]
pub struct Pki {
    pub dir: PathBuf,
}

/// A client identity: certificate, key and the secret that is its CN.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: &'static str,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub secret: String,
}

impl Pki {
    /// The PKI of this test process, generated on first use.
    pub fn shared() -> &'static Pki {
        static PKI: OnceLock<Pki> = OnceLock::new();
        PKI.get_or_init(|| Pki::generate(&pki_root().join(std::process::id().to_string())))
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// A client identity by name (see the module docs).
    pub fn identity(&self, name: &'static str) -> Identity {
        Identity {
            name,
            cert: self.path(&format!("{name}.crt")),
            key: self.path(&format!("{name}.key")),
            secret: secret_of(name),
        }
    }

    fn generate(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).expect("create the PKI directory");
        let ssl = Openssl { dir };
        let subject = |cn: &str| {
            format!("/O=Propeller/OU=propeller_ca/emailAddress=propeller@absmach.eu/CN={cn}")
        };
        for ca in ["ca", "other-ca"] {
            ssl.ec_key(&format!("{ca}.key"));
            ssl.run(&[
                "req",
                "-x509",
                "-new",
                "-key",
                &format!("{ca}.key"),
                "-sha256",
                "-subj",
                &subject(&format!("Propeller_{ca}")),
                "-out",
                &format!("{ca}.crt"),
                "-days",
                "400",
            ]);
        }
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("server-dns.ext"),
            "subjectAltName=DNS:localhost,DNS:nginx\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();

        for (name, ext) in [("server", "server.ext"), ("server-dns", "server-dns.ext")] {
            ssl.ec_key(&format!("{name}.key"));
            ssl.sign(name, "/CN=localhost", "ca", Some(ext));
        }
        for name in ["manager", "proplet", "proxy"] {
            ssl.ec_key(&format!("{name}.key"));
            ssl.sign(name, &subject(&secret_of(name)), "ca", Some("client.ext"));
        }
        // Key forms OpenSSL writes.
        ssl.run(&["genrsa", "-traditional", "-out", "pkcs1.key", "2048"]);
        ssl.sign(
            "pkcs1",
            &subject(&secret_of("pkcs1")),
            "ca",
            Some("client.ext"),
        );
        ssl.run(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "sec1.key",
        ]);
        ssl.sign(
            "sec1",
            &subject(&secret_of("sec1")),
            "ca",
            Some("client.ext"),
        );
        ssl.run(&[
            "genrsa",
            "-aes256",
            "-passout",
            &format!("pass:{KEY_PASSWORD}"),
            "-out",
            "encrypted.key",
            "2048",
        ]);
        ssl.sign_with_password("encrypted", &subject(&secret_of("encrypted")));
        ssl.run(&[
            "genrsa",
            "-aes256",
            "-traditional",
            "-passout",
            &format!("pass:{KEY_PASSWORD}"),
            "-out",
            "legacy.key",
            "2048",
        ]);
        ssl.sign_with_password("legacy", &subject(&secret_of("legacy")));
        // Upstream's client recipe: RSA, `openssl x509 -req` without extensions, so X.509 v1.
        ssl.run(&["genrsa", "-out", "v1.key", "2048"]);
        ssl.sign("v1", &subject(&secret_of("v1")), "ca", None);
        assert!(
            ssl.text("v1.crt").contains("Version: 1 (0x0)"),
            "openssl did not write a v1 certificate"
        );

        ssl.ec_key("stranger.key");
        ssl.sign(
            "stranger",
            &subject(&secret_of("stranger")),
            "other-ca",
            Some("client.ext"),
        );
        // The proplet's identity re-issued by the other CA: a rotation.
        ssl.ec_key("rotated.key");
        ssl.sign(
            "rotated",
            &subject(&secret_of("proplet")),
            "other-ca",
            Some("client.ext"),
        );
        ssl.ec_key("soon.key");
        ssl.sign_for_days(
            "soon",
            &subject(&secret_of("soon")),
            "ca",
            Some("client.ext"),
            "10",
        );
        ssl.ec_key("expired.key");
        ssl.sign_expired("expired", &subject(&secret_of("expired")), "client.ext");
        ssl.ec_key("server-expired.key");
        ssl.sign_expired("server-expired", "/CN=localhost", "server.ext");
        Pki {
            dir: dir.to_owned(),
        }
    }
}

/// The client secret (and CN) of an identity: unique per run, never a constant
/// that could leak into output unnoticed.
pub fn secret_of(name: &str) -> String {
    format!("{name}-secret-{}", std::process::id())
}

/// `target/tmp/propeller-pki`, with directories of finished test processes removed.
fn pki_root() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/tmp
    let root = exe
        .ancestors()
        .nth(3)
        .expect("target directory")
        .join("tmp/propeller-pki");
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries.flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if !Path::new("/proc").join(&pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    root
}

struct Openssl<'a> {
    dir: &'a Path,
}

impl Openssl<'_> {
    fn run(&self, args: &[&str]) {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(self.dir)
            .output()
            .expect("run openssl (apt-get install openssl)");
        assert!(
            output.status.success(),
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn text(&self, cert: &str) -> String {
        let output = Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in", cert])
            .current_dir(self.dir)
            .output()
            .expect("run openssl");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// An EC P-256 key in PKCS#8, what `openssl genpkey` writes.
    fn ec_key(&self, out: &str) {
        self.run(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            out,
        ]);
    }

    fn sign(&self, name: &str, subject: &str, ca: &str, ext: Option<&str>) {
        self.sign_for_days(name, subject, ca, ext, "365");
    }

    fn sign_for_days(&self, name: &str, subject: &str, ca: &str, ext: Option<&str>, days: &str) {
        let (key, csr, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        self.run(&["req", "-new", "-key", &key, "-subj", subject, "-out", &csr]);
        let (ca_crt, ca_key) = (format!("{ca}.crt"), format!("{ca}.key"));
        let mut args = vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            days,
            "-sha256",
            "-out",
            &crt,
        ];
        if let Some(ext) = ext {
            args.extend(["-extfile", ext]);
        }
        self.run(&args);
    }

    fn sign_with_password(&self, name: &str, subject: &str) {
        let pass = format!("pass:{KEY_PASSWORD}");
        let (key, csr, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        self.run(&[
            "req", "-new", "-key", &key, "-passin", &pass, "-subj", subject, "-out", &csr,
        ]);
        self.run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "365",
            "-sha256",
            "-extfile",
            "client.ext",
            "-out",
            &crt,
        ]);
    }

    /// OpenSSL 3.0's `x509` cannot backdate; `ca` can.
    fn sign_expired(&self, name: &str, subject: &str, ext: &str) {
        let db = self.dir.join("ca-db");
        std::fs::create_dir_all(&db).unwrap();
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(db.join("index.txt"));
        std::fs::write(
            self.dir.join("ca.cnf"),
            format!(
                "[ca]\ndefault_ca=test\n[test]\ndatabase={db}/index.txt\nnew_certs_dir={db}\nserial={db}/serial\n\
                 default_md=sha256\npolicy=any\ncopy_extensions=none\nunique_subject=no\n[any]\ncommonName=supplied\n",
                db = db.display()
            ),
        )
        .unwrap();
        if !db.join("serial").exists() {
            std::fs::write(db.join("serial"), "1000\n").unwrap();
        }
        let (key, csr, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        self.run(&["req", "-new", "-key", &key, "-subj", subject, "-out", &csr]);
        self.run(&[
            "ca",
            "-batch",
            "-config",
            "ca.cnf",
            "-cert",
            "ca.crt",
            "-keyfile",
            "ca.key",
            "-in",
            &csr,
            "-startdate",
            "20240101000000Z",
            "-enddate",
            "20250101000000Z",
            "-extfile",
            ext,
            "-notext",
            "-out",
            &crt,
        ]);
    }
}
