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
    }
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
    let now = time::OffsetDateTime::now_utc();
    let valid = |days: u32, params: &mut CertificateParams| {
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(i64::from(days));
    };

    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "longtake farm CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    valid(args.days.saturating_mul(10), &mut ca);
    let ca_cert = ca.self_signed(&ca_key).context("signing the CA")?;
    write(&args.dir, "ca.pem", &ca_cert.pem(), false)?;
    write(&args.dir, "ca.key", &ca_key.serialize_pem(), true)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut coordinator_names = vec![
        COORDINATOR_NAME.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
    ];
    for host in &args.coordinator_hosts {
        let host = host.trim().to_string();
        if !host.is_empty() && !coordinator_names.contains(&host) {
            coordinator_names.push(host);
        }
    }
    let worker_names = vec![WORKER_NAME.to_string()];
    for (role, names) in [("coordinator", coordinator_names), ("worker", worker_names)] {
        let key = KeyPair::generate().with_context(|| format!("generating the {role} key"))?;
        let mut params = CertificateParams::new(names)
            .with_context(|| format!("a {role} host name is not a DNS name or IP address"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("longtake {role}"));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        valid(args.days, &mut params);
        let cert = params
            .signed_by(&key, &issuer)
            .with_context(|| format!("signing the {role} certificate"))?;
        write(&args.dir, &format!("{role}.pem"), &cert.pem(), false)?;
        write(
            &args.dir,
            &format!("{role}.key"),
            &key.serialize_pem(),
            true,
        )?;
    }

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
}
