//! TLS to the database as libpq's `sslmode` says: `require` encrypts without verifying the
//! certificate (libpq's meaning), `verify-ca` checks its chain against `sslrootcert` (required,
//! as in libpq), `verify-full` also the host name (`sslrootcert=system`: the web PKI roots);
//! and TLS for `wss://` federation peers:
//! verified against the web PKI roots and a CA file.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;

#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

pub fn require_config() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
        .with_no_client_auth()
}

/// The client configuration for `wss://` federation peers: the peer's certificate must chain
/// to a web PKI root or to a certificate in `ca_file` (PEM) and name the url's host.
pub fn peer_config(ca_file: Option<&std::path::Path>) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        {
            roots
                .add(cert.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            added += 1;
        }
        anyhow::ensure!(added > 0, "{}: no certificate found", path.display());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// How a database connection is secured: libpq's `sslmode` values, and the root certificate
/// file (`sslrootcert`) that `verify-ca` and `verify-full` check the server's chain against
/// (required, as in libpq; `system`, for `verify-full` only: the web PKI roots).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbTls {
    pub mode: SslMode,
    pub root_cert: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// TLS when the server offers it, not verified (tokio-postgres' and libpq's default).
    Prefer,
    /// Encrypted, not verified.
    Require,
    /// The server's certificate must chain to the root certificate; any host name.
    VerifyCa,
    /// As `VerifyCa`, and the certificate must name the host connected to.
    VerifyFull,
}

/// A database URL (`postgres://...?k=v` or `k=v ...`) that tokio-postgres can parse, and how
/// to secure it. tokio-postgres knows neither `verify-ca`/`verify-full` nor `sslrootcert`:
/// those are taken out here (the mode becomes `require` for tokio-postgres, which then only
/// decides that TLS is used; the certificate check is ours). As in libpq, `require` with a
/// root certificate file verifies like `verify-ca`.
pub fn split_database_url(url: &str) -> Result<(String, DbTls), String> {
    let mut mode: Option<SslMode> = None;
    let mut root_cert = None;
    let mut take = |key: &str, value: &str| -> Result<bool, String> {
        match key {
            "sslmode" => {
                mode = Some(match value {
                    "disable" => SslMode::Disable,
                    "allow" | "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => return Err(format!("unknown sslmode {other:?}")),
                });
                Ok(true)
            }
            "sslrootcert" => {
                root_cert = Some(std::path::PathBuf::from(value));
                Ok(true)
            }
            _ => Ok(false),
        }
    };
    let rest = if let Some((base, query)) = url
        .split_once('?')
        .filter(|_| url.starts_with("postgres://") || url.starts_with("postgresql://"))
    {
        let mut kept = vec![];
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(k, &percent_decode(v))? {
                kept.push(pair);
            }
        }
        if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else if url.contains("://") {
        url.to_owned()
    } else {
        let mut kept = vec![];
        for (k, v, raw) in key_values(url)? {
            if !take(&k, &v)? {
                kept.push(raw);
            }
        }
        kept.join(" ")
    };
    let system = root_cert.as_deref() == Some(std::path::Path::new(SYSTEM_ROOTS));
    // libpq (16+): `sslrootcert=system` defaults to `verify-full` and refuses weaker modes:
    // the web PKI vouches for names, so a chain alone (verify-ca) proves nothing.
    let mut mode = match mode {
        None if system => SslMode::VerifyFull,
        Some(m) if system && m != SslMode::VerifyFull => {
            return Err(format!(
                "sslrootcert=system requires sslmode=verify-full (got {m:?})"
            ))
        }
        m => m.unwrap_or(SslMode::Prefer),
    };
    if mode == SslMode::Require && root_cert.is_some() {
        mode = SslMode::VerifyCa;
    }
    // tokio-postgres decides whether to use TLS; it parses the rest.
    let tokio_mode = match mode {
        SslMode::Disable => "disable",
        SslMode::Prefer => "prefer",
        _ => "require",
    };
    let rest = if rest.contains("://") {
        let sep = if rest.contains('?') { '&' } else { '?' };
        format!("{rest}{sep}sslmode={tokio_mode}")
    } else {
        format!("{rest} sslmode={tokio_mode}")
    };
    Ok((rest, DbTls { mode, root_cert }))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).and_then(|&b| hex(b)),
            bytes.get(i + 2).and_then(|&b| hex(b)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `key = value` pairs of a libpq key/value string: (key, unquoted value, the pair as
/// written).
fn key_values(s: &str) -> Result<Vec<(String, String, String)>, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut out = vec![];
    let skip_ws = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= chars.len() {
            return Ok(out);
        }
        let start = i;
        while i < chars.len() && chars[i] != '=' && !chars[i].is_whitespace() {
            i += 1;
        }
        let key: String = chars[start..i].iter().collect();
        skip_ws(&mut i);
        if chars.get(i) != Some(&'=') {
            return Err(format!("missing = after {key:?}"));
        }
        i += 1;
        skip_ws(&mut i);
        let mut value = String::new();
        if chars.get(i) == Some(&'\'') {
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err(format!("unterminated quoted value of {key:?}")),
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some('\\') if i + 1 < chars.len() => {
                        value.push(chars[i + 1]);
                        i += 2;
                    }
                    Some(&c) => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < chars.len() && !chars[i].is_whitespace() {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    i += 1;
                }
                value.push(chars[i]);
                i += 1;
            }
        }
        out.push((key, value, chars[start..i].iter().collect()));
    }
}

impl DbTls {
    /// The rustls configuration for tokio-postgres (`None`: no TLS).
    pub fn client_config(&self) -> Result<Option<rustls::ClientConfig>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifying = |roots: rustls::RootCertStore| {
            rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())
                .map(|b| b.with_root_certificates(roots))
        };
        Ok(match self.mode {
            SslMode::Disable => None,
            SslMode::Prefer | SslMode::Require => Some(require_config()),
            SslMode::VerifyFull => Some(verifying(self.roots()?)?.with_no_client_auth()),
            SslMode::VerifyCa => {
                let roots = Arc::new(self.roots()?);
                let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    roots.clone(),
                    provider.clone(),
                )
                .build()
                .map_err(|e| e.to_string())?;
                let mut config = verifying((*roots).clone())?.with_no_client_auth();
                config
                    .dangerous()
                    .set_certificate_verifier(Arc::new(AnyName(inner)));
                Some(config)
            }
        })
    }

    /// The same choice for the replication connection to `host`, made after a control
    /// connection to it (`encrypted`: whether that one negotiated TLS).
    pub fn replication_config(
        &self,
        host: &str,
        encrypted: bool,
    ) -> Option<pgwire_replication::TlsConfig> {
        use pgwire_replication::TlsConfig;
        match self.mode {
            SslMode::Disable => None,
            // `prefer`: encrypt when the server offered it to the control connection.
            SslMode::Prefer => encrypted.then(TlsConfig::require),
            SslMode::Require => Some(TlsConfig::require()),
            SslMode::VerifyCa => {
                let tls = TlsConfig::verify_ca(self.root_cert.clone());
                let seen = CERT_NAMES
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(host)
                    .cloned();
                Some(match seen {
                    Some(name) => tls.with_sni_hostname(name),
                    None => tls,
                })
            }
            // `system`: pgwire-replication's `None` is the web PKI roots too.
            SslMode::VerifyFull => Some(TlsConfig::verify_full(
                self.root_cert
                    .clone()
                    .filter(|p| p != std::path::Path::new(SYSTEM_ROOTS)),
            )),
        }
    }

    fn mode_name(&self) -> &'static str {
        match self.mode {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn roots(&self) -> Result<rustls::RootCertStore, String> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        // libpq refuses verify-ca/verify-full without a root certificate file: falling back
        // to the web PKI roots would let verify-ca accept any certificate a public CA issued,
        // for any domain.
        let Some(path) = &self.root_cert else {
            return Err(format!(
                "sslmode={} needs sslrootcert=/path/to/ca.pem (the CA that signed the server's \
                 certificate){}",
                self.mode_name(),
                if self.mode == SslMode::VerifyFull {
                    ", or sslrootcert=system for the web PKI roots"
                } else {
                    ""
                }
            ));
        };
        if path == std::path::Path::new(SYSTEM_ROOTS) {
            if self.mode != SslMode::VerifyFull {
                return Err("sslrootcert=system requires sslmode=verify-full".into());
            }
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            return Ok(roots);
        }
        let fail = |e: &dyn std::fmt::Display| format!("sslrootcert {}: {e}", path.display());
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| fail(&e))? {
            roots
                .add(cert.map_err(|e| fail(&e))?)
                .map_err(|e| fail(&e))?;
        }
        if roots.is_empty() {
            return Err(fail(&"no certificate found"));
        }
        Ok(roots)
    }
}

/// `sslrootcert=system`: libpq's spelling for the system's trusted roots (here the web PKI's).
const SYSTEM_ROOTS: &str = "system";

/// Host dialed -> a DNS name its certificate (verified under `verify-ca`) is valid for.
/// pgwire-replication 0.5.0's `verify-ca` forgives only rustls' `NotValidForName`, not the
/// `NotValidForNameContext` that rustls 0.23 reports, so it refuses every name mismatch: the
/// replication connection is given the name the control connection saw as its TLS server
/// name (the chain is still verified against the same root certificate). Refreshed by every
/// control connection: a rotated certificate that names the host removes the entry, one with
/// other names replaces it.
static CERT_NAMES: std::sync::Mutex<std::collections::BTreeMap<String, String>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// A DNS name the certificate with these names is valid for: a plain name if it has one, else
/// a name its wildcard matches (`*.db.example` -> `pg-sync.db.example`), so a wildcard-only
/// certificate also serves the replication connection.
fn replication_name<'a>(names: impl Iterator<Item = &'a str>) -> Option<String> {
    let mut wildcard = None;
    for name in names {
        match name.strip_prefix("*.") {
            Some(parent) => {
                wildcard.get_or_insert_with(|| format!("pg-sync.{parent}"));
            }
            None if !name.contains('*') => return Some(name.to_owned()),
            None => {}
        }
    }
    wildcard
}

/// `verify-ca`: the chain must verify; the name in the certificate is not checked.
#[derive(Debug)]
struct AnyName(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        let host = server_name.to_str().into_owned();
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Ok(ok) => {
                // The certificate names the host: the replication connection needs no other
                // name (a stale one from before a rotation would be refused).
                CERT_NAMES
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&host);
                Ok(ok)
            }
            Err(rustls::Error::InvalidCertificate(
                NotValidForName | NotValidForNameContext { .. },
            )) => {
                // The chain verified (webpki checks it before the name).
                let name = webpki::EndEntityCert::try_from(end_entity)
                    .ok()
                    .and_then(|c| replication_name(c.valid_dns_names()));
                let mut names = CERT_NAMES.lock().unwrap_or_else(|p| p.into_inner());
                match name {
                    Some(name) => names.insert(host, name),
                    None => names.remove(&host),
                };
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_modes_and_root_certs_are_taken_out_of_both_url_forms() {
        let (rest, tls) = split_database_url(
            "host=db port=5 sslmode=verify-full sslrootcert='/etc/a b.pem' dbname=x",
        )
        .unwrap();
        assert_eq!(rest, "host=db port=5 dbname=x sslmode=require");
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root_cert, Some("/etc/a b.pem".into()));
        rest.parse::<tokio_postgres::Config>().unwrap();

        let (rest, tls) = split_database_url(
            "postgres://u@h/d?sslmode=verify-ca&sslrootcert=%2Fca.pem&application_name=a",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u@h/d?application_name=a&sslmode=require");
        assert_eq!(tls.mode, SslMode::VerifyCa);
        assert_eq!(tls.root_cert, Some("/ca.pem".into()));
        rest.parse::<tokio_postgres::Config>().unwrap();

        let (rest, tls) = split_database_url("postgres://u@h/d").unwrap();
        assert_eq!(rest, "postgres://u@h/d?sslmode=prefer");
        assert_eq!(tls.mode, SslMode::Prefer);
        // libpq: `require` with a root certificate verifies the chain.
        let (_, tls) = split_database_url("host=h sslmode=require sslrootcert=/c").unwrap();
        assert_eq!(tls.mode, SslMode::VerifyCa);
        assert!(split_database_url("host=h sslmode=verify").is_err());
    }

    #[test]
    fn sslrootcert_system_means_verify_full_only() {
        let (_, tls) = split_database_url("host=h sslrootcert=system").unwrap();
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert!(tls.client_config().unwrap().is_some());
        let (_, tls) = split_database_url("host=h sslmode=verify-full sslrootcert=system").unwrap();
        assert!(tls.client_config().unwrap().is_some());
        for weak in ["verify-ca", "require", "prefer", "disable"] {
            assert!(
                split_database_url(&format!("host=h sslmode={weak} sslrootcert=system")).is_err(),
                "{weak}"
            );
        }
        let (_, tls) = split_database_url("host=h sslmode=verify-full").unwrap();
        let err = tls.client_config().unwrap_err();
        assert!(err.contains("sslrootcert"), "{err}");
    }

    #[test]
    fn the_replication_name_prefers_a_plain_name_then_a_wildcard_match() {
        let name = |n: &[&str]| replication_name(n.iter().copied());
        assert_eq!(
            name(&["*.db.invalid", "db.invalid"]).as_deref(),
            Some("db.invalid")
        );
        assert_eq!(
            name(&["*.db.invalid"]).as_deref(),
            Some("pg-sync.db.invalid")
        );
        assert_eq!(name(&[]), None);
    }
}
