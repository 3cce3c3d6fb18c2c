//! TLS for the farm's gRPC endpoints: the certificate, key and farm CA a daemon is started with,
//! the server and client configurations tonic (rustls) takes, and the role a peer's certificate
//! proves.
//!
//! A farm's certificates come from one CA (`longtake certs init` makes a development one). A
//! certificate's role is a DNS name among its subject alternative names: [`COORDINATOR_NAME`]
//! on the coordinator's, [`WORKER_NAME`] on a worker's. The coordinator verifies a worker's
//! server certificate against that name (not the address in etcd), so a record written to etcd
//! by someone without a farm-issued worker certificate leads nowhere; a worker requires a
//! client certificate of the farm and serves only a peer whose certificate is the
//! coordinator's.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The role name a coordinator certificate carries (a DNS subject alternative name).
pub const COORDINATOR_NAME: &str = "longtake-coordinator";
/// The role name a worker certificate carries.
pub const WORKER_NAME: &str = "longtake-worker";

/// Where a daemon's TLS material is: its certificate chain and key, and the farm's CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Why TLS material cannot be used. Each names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {why}")]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("{what} {path} holds no PEM {kind} (make one with `longtake certs init`)")]
    NotPem {
        what: &'static str,
        path: PathBuf,
        kind: &'static str,
    },
    #[error(
        "the certificate {path} is not valid for {role:?}: a {role} needs a certificate the \
         farm's CA issued for it (`longtake certs init` makes them)"
    )]
    WrongRole { path: PathBuf, role: &'static str },
}

/// A daemon's loaded TLS material.
#[derive(Clone)]
pub struct Tls {
    identity: Identity,
    ca: Certificate,
}

impl std::fmt::Debug for Tls {
    /// Nothing of the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls { .. }")
    }
}

impl Tls {
    /// Reads the files and checks that the certificate is one of `role` (so a worker started
    /// with the coordinator's certificate, or the reverse, fails at start, not at the first
    /// handshake).
    pub fn load(files: &TlsFiles, role: &'static str) -> Result<Self, TlsError> {
        let (cert, first) = read_certificate(&files.cert, "the certificate")?;
        if !has_role(&first, role) {
            return Err(TlsError::WrongRole {
                path: files.cert.clone(),
                role,
            });
        }
        let key = read_key(&files.key, "the private key")?;
        let (ca, _) = read_certificate(&files.ca, "the CA certificate")?;
        Ok(Self {
            identity: Identity::from_pem(cert, key),
            ca: Certificate::from_pem(ca),
        })
    }

    /// A server that presents this certificate; with `require_client`, only clients holding a
    /// certificate of the farm's CA complete the handshake.
    pub fn server(&self, require_client: bool) -> ServerTlsConfig {
        let config = ServerTlsConfig::new().identity(self.identity.clone());
        if require_client {
            config.client_ca_root(self.ca.clone())
        } else {
            config
        }
    }

    /// A client that presents this certificate and accepts only a server whose certificate
    /// the farm's CA issued for `server_name`.
    pub fn client(&self, server_name: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(server_name)
    }
}

/// A client of a farm's TLS endpoint without a certificate of its own (the CLI: its identity
/// is its API token): it trusts the CA in `ca` for the server's certificate.
pub fn client_trusting(ca: &Path) -> Result<ClientTlsConfig, TlsError> {
    let (pem, _) = read_certificate(ca, "the CA certificate")?;
    Ok(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
}

/// A client of an etcd cluster over TLS: it trusts `ca` for etcd's certificate and, for an
/// etcd that requires client certificates, presents `identity` (certificate, key).
pub fn etcd_client(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientTlsConfig, TlsError> {
    let mut config = client_trusting(ca)?;
    if let Some((cert, key)) = identity {
        let (cert_pem, _) = read_certificate(cert, "the etcd client certificate")?;
        let key_pem = read_key(key, "the etcd client key")?;
        config = config.identity(Identity::from_pem(cert_pem, key_pem));
    }
    Ok(config)
}

/// Whether the peer of a request presented a certificate (already verified against the farm's
/// CA by the handshake) that is one of `role`.
pub fn peer_has_role<T>(request: &tonic::Request<T>, role: &str) -> bool {
    request
        .peer_certs()
        .and_then(|certs| certs.first().map(|c| has_role(c, role)))
        .unwrap_or(false)
}

/// Whether `cert` names `role` among its DNS subject alternative names.
pub fn has_role(cert: &CertificateDer<'_>, role: &str) -> bool {
    let Ok(name) = ServerName::try_from(role) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert)
        .map(|end| end.verify_is_valid_for_subject_name(&name).is_ok())
        .unwrap_or(false)
}

/// A PEM file's bytes and its first certificate; an error naming the file if it holds none.
fn read_certificate(
    path: &Path,
    what: &'static str,
) -> Result<(Vec<u8>, CertificateDer<'static>), TlsError> {
    let pem = read(path, what)?;
    let first = CertificateDer::pem_slice_iter(&pem)
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| TlsError::NotPem {
            what,
            path: path.to_path_buf(),
            kind: "certificate",
        })?;
    Ok((pem, first))
}

/// A PEM file's bytes; an error naming the file if it holds no private key.
fn read_key(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    let pem = read(path, what)?;
    if rustls_pki_types::PrivateKeyDer::from_pem_slice(&pem).is_err() {
        return Err(TlsError::NotPem {
            what,
            path: path.to_path_buf(),
            kind: "private key",
        });
    }
    Ok(pem)
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Unreadable {
        what,
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}
