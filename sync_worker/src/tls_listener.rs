//! TLS on the worker's own listener (`SYNC_TLS_CERT_FILE` + `SYNC_TLS_KEY_FILE`): loading the
//! PEM certificate chain and key (errors name the file, never its contents), the handshake of
//! each accepted connection (HTTP/1.1 over TLS for every endpoint, WebSocket upgrades
//! included), a plain-HTTP request on the TLS port answered with a 400, and reloading the
//! certificate on SIGHUP or when either file changes.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;

/// How often the certificate and key files are checked for changes (a renewal by certbot or
/// cert-manager replaces them in place; SIGHUP reloads at once).
const WATCH_EVERY: Duration = Duration::from_secs(5);

/// The listener's TLS: the current server configuration, swapped on reload (connections
/// already open keep the certificate they were accepted with).
#[derive(Clone)]
pub struct ServerTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

/// Checks that both or neither of the listener's certificate and key are set.
pub fn check_pair(cert: Option<&Path>, key: Option<&Path>) -> anyhow::Result<()> {
    match (cert, key) {
        (Some(_), None) => anyhow::bail!(
            "tls_cert_file (SYNC_TLS_CERT_FILE) is set but tls_key_file (SYNC_TLS_KEY_FILE) is not: set both for TLS, or neither for plain HTTP"
        ),
        (None, Some(_)) => anyhow::bail!(
            "tls_key_file (SYNC_TLS_KEY_FILE) is set but tls_cert_file (SYNC_TLS_CERT_FILE) is not: set both for TLS, or neither for plain HTTP"
        ),
        _ => Ok(()),
    }
}

impl ServerTls {
    /// `None` without a certificate and key; an error names the file that cannot be used.
    pub fn from_config(cfg: &crate::config::Config) -> anyhow::Result<Option<ServerTls>> {
        check_pair(cfg.tls_cert_file.as_deref(), cfg.tls_key_file.as_deref())?;
        let (Some(cert), Some(key)) = (&cfg.tls_cert_file, &cfg.tls_key_file) else {
            return Ok(None);
        };
        let config = load(cert, key)?;
        tracing::info!(cert = %cert.display(), "listener speaks TLS (https://, wss://)");
        Ok(Some(ServerTls {
            cert_file: cert.clone(),
            key_file: key.clone(),
            current: Arc::new(RwLock::new(config)),
        }))
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        tokio_rustls::TlsAcceptor::from(config)
    }

    /// Loads the files again; on failure the current certificate stays in use.
    pub fn reload(&self, why: &str) {
        match load(&self.cert_file, &self.key_file) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
                tracing::info!(why, cert = %self.cert_file.display(), "TLS certificate reloaded");
            }
            Err(e) => tracing::error!(
                why,
                error = %e,
                "TLS certificate reload failed; still serving the previous certificate"
            ),
        }
    }

    /// Reloads on SIGHUP and when either file's modification time or size changes, until
    /// `shutdown` flips.
    pub fn spawn_reloader(&self, mut shutdown: watch::Receiver<bool>) {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut hup = match tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::hangup(),
            ) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "no SIGHUP handler; TLS reloads on file change only");
                    None
                }
            };
            let mut seen = tls.stamp();
            let mut tick = tokio::time::interval(WATCH_EVERY);
            loop {
                tokio::select! {
                    _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => {
                        seen = tls.stamp();
                        tls.reload("SIGHUP");
                    }
                    _ = tick.tick() => {
                        let now = tls.stamp();
                        if now != seen {
                            seen = now;
                            tls.reload("file changed");
                        }
                    }
                    _ = shutdown.wait_for(|s| *s) => return,
                }
            }
        });
    }

    fn stamp(&self) -> [Option<(SystemTime, u64)>; 2] {
        let one = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        };
        [one(&self.cert_file), one(&self.key_file)]
    }

    /// The TLS stream of an accepted connection, or `None` (already logged, the connection
    /// closed) when the handshake fails or takes longer than `within`. A connection whose first
    /// byte is not a TLS handshake record is plain HTTP: it gets a 400 saying so.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        within: Duration,
    ) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
        let acceptor = self.acceptor();
        let handshake = async {
            let mut first = [0u8; 1];
            let n = tcp.peek(&mut first).await.ok()?;
            // 0x16: a TLS handshake record (the ClientHello).
            if n == 1 && first[0] != 0x16 {
                let mut tcp = tcp;
                let body = "this port speaks HTTPS (TLS); use https:// or wss://\n";
                let reply = format!(
                    "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(reply.as_bytes()).await;
                let _ = tcp.shutdown().await;
                tracing::debug!("plain HTTP on the TLS listener refused");
                return None;
            }
            match acceptor.accept(tcp).await {
                Ok(tls) => Some(tls),
                Err(e) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    None
                }
            }
        };
        tokio::time::timeout(within, handshake).await.ok().flatten()
    }
}

/// The server configuration from a PEM certificate chain (leaf first) and a PEM private key
/// (PKCS#8, PKCS#1 or SEC1). Errors name the file and what is wrong with it; PEM parse errors
/// are not passed on as they are (a base64 error may quote bytes of the key).
pub fn load(cert_file: &Path, key_file: &Path) -> anyhow::Result<Arc<ServerConfig>> {
    let read = |path: &Path, what: &str| {
        std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("cannot read TLS {what} file {}: {e}", path.display()))
    };
    let cert_pem = read(cert_file, "certificate")?;
    let key_pem = read(key_file, "key")?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| {
            anyhow::anyhow!(
                "TLS certificate file {}: not valid PEM",
                cert_file.display()
            )
        })?;
    anyhow::ensure!(
        !certs.is_empty(),
        "TLS certificate file {}: no CERTIFICATE found (PEM expected)",
        cert_file.display()
    );
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => anyhow::anyhow!(
            "TLS key file {}: no private key found (PEM PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY expected)",
            key_file.display()
        ),
        _ => anyhow::anyhow!("TLS key file {}: not a valid PEM private key", key_file.display()),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            anyhow::anyhow!(
                "TLS certificate {} and key {} cannot be used together: {e}",
                cert_file.display(),
                key_file.display()
            )
        })?;
    // WebSocket upgrades are HTTP/1.1; the server speaks nothing else.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
