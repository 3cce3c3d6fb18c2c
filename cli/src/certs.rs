//! `longtake certs init`: a farm's development CA and the certificates its daemons present, so
//! a farm speaks TLS everywhere (mutual TLS between the coordinator and its workers) without
//! another tool. The roles the certificates prove are `longtake_proto::tls`'s.
//!
//! For production, issue the same shapes from the studio's own CA: a coordinator certificate
//! with the DNS name `longtake-coordinator` and the names clients use, a worker certificate with
//! `longtake-worker`, both for server and client authentication.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use longtake_proto::tls::{COORDINATOR_NAME, WORKER_NAME};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

#[derive(Subcommand)]
pub enum CertsCommand {
    /// Make a development CA and a coordinator and a worker certificate signed by it.
    Init(InitArgs),
    /// Issue one more certificate from the CA `init` made (e.g. one per worker host).
    Issue(IssueArgs),
}

#[derive(Args)]
pub struct IssueArgs {
    /// The directory `certs init` wrote (its ca.pem and ca.key sign the new certificate).
    #[arg(long, default_value = "longtake-certs")]
    pub dir: PathBuf,
    /// What the certificate is for.
    #[arg(long, value_parser = ["worker", "coordinator"])]
    pub role: String,
    /// File name of the new certificate and key in --dir (NAME.pem, NAME.key), e.g. the host.
    #[arg(long)]
    pub name: String,
    /// A host name or IP address the holder is reached at; repeatable.
    #[arg(long = "host", value_name = "HOST")]
    pub hosts: Vec<String>,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
}

#[derive(Args)]
pub struct InitArgs {
    /// Directory to write the files to (made if missing; existing files are never overwritten).
    #[arg(long, default_value = "longtake-certs")]
    pub dir: PathBuf,
    /// A host name or IP address clients reach the coordinator at, e.g. `farm.studio.lan`;
    /// repeatable (`localhost` and `127.0.0.1` are always in).
    #[arg(long = "coordinator-host", value_name = "HOST")]
    pub coordinator_hosts: Vec<String>,
    /// Days the certificates are valid (the CA: ten times as long).
    #[arg(long, default_value_t = 365)]
    pub days: u32,
}

/// The files `init` writes, in the order it writes them.
pub const FILES: [&str; 6] = [
    "ca.pem",
    "ca.key",
    "coordinator.pem",
    "coordinator.key",
    "worker.pem",
    "worker.key",
];

pub fn run(command: CertsCommand) -> Result<i32> {
    match command {
        CertsCommand::Init(args) => init(&args),
        CertsCommand::Issue(args) => issue(&args),
    }
}

/// The common name of the farm's CA; an issuer rebuilt from the CA's key carries it, so what it
/// signs chains to the CA certificate `init` wrote.
const CA_NAME: &str = "longtake farm CA";

fn ca_params() -> Result<CertificateParams> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, CA_NAME);
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(ca)
}

/// `params` valid from an hour ago (clock skew) for `days`.
fn valid_for(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

/// Signs a certificate of `role` (its role name first among `names`) and writes NAME.pem and
/// NAME.key to `dir`.
fn issue_leaf(
    dir: &Path,
    name: &str,
    role: &str,
    names: Vec<String>,
    days: u32,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<()> {
    let key = KeyPair::generate().with_context(|| format!("generating the {name} key"))?;
    let mut params = CertificateParams::new(names)
        .with_context(|| format!("a {name} host name is not a DNS name or IP address"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("longtake {role} {name}"));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    valid_for(&mut params, days);
    let cert = params
        .signed_by(&key, issuer)
        .with_context(|| format!("signing the {name} certificate"))?;
    write(dir, &format!("{name}.pem"), &cert.pem(), false)?;
    write(dir, &format!("{name}.key"), &key.serialize_pem(), true)
}

/// The role name first, then `hosts` (trimmed, without repeats).
fn names_of(role_name: &str, hosts: &[String]) -> Vec<String> {
    let mut names = vec![role_name.to_string()];
    for host in hosts {
        let host = host.trim().to_string();
        if !host.is_empty() && !names.contains(&host) {
            names.push(host);
        }
    }
    names
}

fn issue(args: &IssueArgs) -> Result<i32> {
    if args.days == 0 {
        bail!("--days must be at least 1");
    }
    let name = args.name.trim();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
    {
        bail!("--name {name:?}: letters, digits and - . _ only (it names the files)");
    }
    for file in [format!("{name}.pem"), format!("{name}.key")] {
        let path = args.dir.join(&file);
        if path.exists() {
            bail!("{} already exists: choose another --name", path.display());
        }
    }
    let key_path = args.dir.join("ca.key");
    let ca_key = std::fs::read_to_string(&key_path).with_context(|| {
        format!(
            "cannot read the CA key {} (made by `certs init`)",
            key_path.display()
        )
    })?;
    let ca_key = KeyPair::from_pem(&ca_key)
        .with_context(|| format!("{} is not a PEM private key", key_path.display()))?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let role_name = if args.role == "coordinator" {
        COORDINATOR_NAME
    } else {
        WORKER_NAME
    };
    issue_leaf(
        &args.dir,
        name,
        &args.role,
        names_of(role_name, &args.hosts),
        args.days,
        &issuer,
    )?;
    let d = args.dir.display();
    println!(
        "wrote {d}/{name}.pem and {d}/{name}.key: a {} certificate",
        args.role
    );
    println!(
        "  longtake serve {} --tls-cert {d}/{name}.pem --tls-key {d}/{name}.key --tls-ca {d}/ca.pem ...",
        args.role
    );
    Ok(0)
}

fn init(args: &InitArgs) -> Result<i32> {
    if args.days == 0 {
        bail!("--days must be at least 1");
    }
    for name in FILES {
        let path = args.dir.join(name);
        if path.exists() {
            bail!(
                "{} already exists: remove the old certificates or choose another --dir",
                path.display()
            );
        }
    }
    make_private_dir(&args.dir)?;
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca = ca_params()?;
    valid_for(&mut ca, args.days.saturating_mul(10));
    let ca_cert = ca.self_signed(&ca_key).context("signing the CA")?;
    write(&args.dir, "ca.pem", &ca_cert.pem(), false)?;
    write(&args.dir, "ca.key", &ca_key.serialize_pem(), true)?;
    let issuer = Issuer::new(ca, ca_key);
    let mut coordinator_hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    coordinator_hosts.extend(args.coordinator_hosts.iter().cloned());
    issue_leaf(
        &args.dir,
        "coordinator",
        "coordinator",
        names_of(COORDINATOR_NAME, &coordinator_hosts),
        args.days,
        &issuer,
    )?;
    issue_leaf(
        &args.dir,
        "worker",
        "worker",
        names_of(WORKER_NAME, &[]),
        args.days,
        &issuer,
    )?;

    let d = args.dir.display();
    println!("wrote {d}/: {}", FILES.join(" "));
    println!(
        "  coordinator: longtake serve coordinator --tls-cert {d}/coordinator.pem --tls-key {d}/coordinator.key --tls-ca {d}/ca.pem ..."
    );
    println!(
        "  each worker: longtake serve worker --tls-cert {d}/worker.pem --tls-key {d}/worker.key --tls-ca {d}/ca.pem ..."
    );
    println!(
        "  the CLI:     LONGTAKE_CA_CERT={d}/ca.pem LONGTAKE_COORDINATOR=https://localhost:7070"
    );
    println!("keep ca.key off the farm: whoever holds it can make workers and coordinators");
    Ok(0)
}

fn make_private_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot make {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private", dir.display()))?;
    }
    Ok(())
}

/// Writes a new file (never over an existing one); a key readable by its owner alone.
fn write(dir: &Path, name: &str, text: &str, private: bool) -> Result<()> {
    let path = dir.join(name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let mut file = options
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use longtake_proto::tls::{Tls, TlsFiles};

    fn files(dir: &Path, role: &str) -> TlsFiles {
        TlsFiles {
            cert: dir.join(format!("{role}.pem")),
            key: dir.join(format!("{role}.key")),
            ca: dir.join("ca.pem"),
        }
    }

    #[test]
    fn init_makes_certificates_of_each_role_and_keeps_keys_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs");
        let args = InitArgs {
            dir: dir.clone(),
            coordinator_hosts: vec!["farm.studio.lan".into()],
            days: 30,
        };
        assert_eq!(init(&args).unwrap(), 0);
        Tls::load(&files(&dir, "coordinator"), COORDINATOR_NAME).unwrap();
        Tls::load(&files(&dir, "worker"), WORKER_NAME).unwrap();
        // a certificate proves its own role only
        let e = Tls::load(&files(&dir, "worker"), COORDINATOR_NAME).unwrap_err();
        assert!(e.to_string().contains("not valid for"), "{e}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for name in ["ca.key", "coordinator.key", "worker.key"] {
                let mode = std::fs::metadata(dir.join(name))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o077, 0, "{name} is readable by others: {mode:o}");
            }
        }
        // never over what is there
        let e = init(&args).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
    }

    /// A certificate `issue` signs later with the CA's key chains to the CA `init` wrote: a
    /// worker serving it completes a mutual-TLS handshake with the coordinator's certificate.
    #[tokio::test]
    async fn an_issued_worker_certificate_is_trusted_by_the_farm() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs");
        init(&InitArgs {
            dir: dir.clone(),
            coordinator_hosts: vec![],
            days: 30,
        })
        .unwrap();
        let args = IssueArgs {
            dir: dir.clone(),
            role: "worker".into(),
            name: "gpu-07".into(),
            hosts: vec!["gpu-07.studio.lan".into()],
            days: 30,
        };
        assert_eq!(issue(&args).unwrap(), 0);
        let e = issue(&args).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");

        let coordinator = Tls::load(&files(&dir, "coordinator"), COORDINATOR_NAME).unwrap();
        let worker = Tls::load(&files(&dir, "gpu-07"), WORKER_NAME).unwrap();
        handshake(&worker, &coordinator)
            .await
            .expect("the farm's coordinator did not accept the issued certificate");

        // the same from another farm's CA is refused
        let other = tmp.path().join("other");
        init(&InitArgs {
            dir: other.clone(),
            coordinator_hosts: vec![],
            days: 30,
        })
        .unwrap();
        let stranger = Tls::load(&files(&other, "worker"), WORKER_NAME).unwrap();
        assert!(handshake(&stranger, &coordinator).await.is_err());
    }

    /// A mutual-TLS connection from `client` to a server presenting `server`'s certificate.
    async fn handshake(server: &Tls, client: &Tls) -> Result<(), tonic::transport::Error> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let served = longtake_proto::serving::incoming(listener);
        let running = tokio::spawn(
            tonic::transport::Server::builder()
                .tls_config(server.server(true))
                .unwrap()
                .add_routes(tonic::service::Routes::default())
                .serve_with_incoming(served.connections),
        );
        let connected = tonic::transport::Endpoint::from_shared(format!("https://{address}"))
            .unwrap()
            .tls_config(client.client(WORKER_NAME))
            .unwrap()
            .connect()
            .await;
        running.abort();
        connected.map(|_| ())
    }
}
