//! `switchyard certs`: a CA and certificates for a trial cluster, written as PEM files.
//!
//! | files | for |
//! | --- | --- |
//! | `ca.pem`, `ca.key` | the CA: `--cluster-ca`, `--tls-client-ca`, clients' trust |
//! | `server.pem`, `server.key` | the client ports: `--tls-cert`, `--tls-key` |
//! | `node.pem`, `node.key` | every process of the cluster plane: `--cluster-cert`, `--cluster-key` |
//! | `client.pem`, `client.key` | a client, where `--tls-client-ca` asks for certificates |
//!
//! A CA already in the directory signs the new certificates, so running the command again
//! renews them (the rotation Kubernetes does with Secrets). Production clusters bring their
//! own CA (cert-manager, a company PKI).

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::flags::CertsArgs;

/// The CA's parameters. The same each time: a CA read back from its key signs with them.
fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, "Switchyard trial CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

/// From a day ago (clocks differ) for `days`.
fn validity(p: &mut CertificateParams, days: u32) {
    let since_epoch = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    p.not_before = now - Duration::from_secs(86_400);
    p.not_after = now + Duration::from_secs(86_400 * u64::from(days));
}

fn write(dir: &Path, name: &str, text: &str, secret: bool) -> Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Writes the CA (unless one is there) and the three certificates into `args.out`.
pub fn write_all(args: &CertsArgs) -> Result<()> {
    let dir = &args.out;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot make {}", dir.display()))?;
    let (ca_pem, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let ca_key = if ca_pem.exists() && ca_key.exists() {
        let pem = std::fs::read_to_string(&ca_key)
            .with_context(|| format!("cannot read {}", ca_key.display()))?;
        eprintln!("switchyard: signing with the CA in {}", dir.display());
        KeyPair::from_pem(&pem).with_context(|| format!("{}: not a PEM key", ca_key.display()))?
    } else {
        let key = KeyPair::generate()?;
        let mut params = ca_params();
        // The CA outlives the certificates it signs: they can be renewed under it.
        validity(&mut params, args.days.saturating_mul(10));
        let cert = params.self_signed(&key)?;
        write(dir, "ca.pem", &cert.pem(), false)?;
        write(dir, "ca.key", &key.serialize_pem(), true)?;
        key
    };
    let issuer = Issuer::new(ca_params(), ca_key);
    use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let leaves: [(&str, &str, &[ExtendedKeyUsagePurpose]); 3] = [
        ("server", "switchyard server", &[ServerAuth]),
        (
            "node",
            "switchyard cluster member",
            &[ServerAuth, ClientAuth],
        ),
        ("client", "switchyard client", &[ClientAuth]),
    ];
    for (name, common_name, usages) in leaves {
        let hosts = match usages.contains(&ServerAuth) {
            true => args.hosts.clone(),
            false => Vec::new(),
        };
        let mut params =
            CertificateParams::new(hosts).with_context(|| format!("--hosts {:?}", args.hosts))?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = usages.to_vec();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, args.days);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        write(dir, &format!("{name}.pem"), &cert.pem(), false)?;
        write(dir, &format!("{name}.key"), &key.serialize_pem(), true)?;
    }
    eprintln!(
        "switchyard: wrote ca.pem, server.pem, node.pem, client.pem and their keys to {} \
         (valid {} days, for {})",
        dir.display(),
        args.days,
        args.hosts.join(", ")
    );
    Ok(())
}
