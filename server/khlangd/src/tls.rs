//! `khlangd tls dev-certs`: a development CA, server and client certificates (rcgen on ring).

use super::*;

/// Writes the development certificates (see [`TlsCommand::DevCerts`]).
pub(crate) fn dev_certs(dir: &Path, hosts: &[String], clients: &[String], days: u32) -> anyhow::Result<()> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    let mut write = |name: &str, text: &str, secret: bool| -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if secret { 0o600 } else { 0o644 })
            .open(&path)
            .with_context(|| format!("cannot create {} (it is not overwritten)", path.display()))?;
        f.write_all(text.as_bytes())?;
        written.push(path);
        Ok(())
    };
    let now = std::time::SystemTime::now();
    let until = now + Duration::from_secs(u64::from(days) * 86_400);
    let validity = |p: &mut CertificateParams| {
        p.not_before = now.into();
        p.not_after = until.into();
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name.push(DnType::CommonName, "Khlang development CA");
    validity(&mut ca);
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    let issuer = Issuer::from_params(&ca, &ca_key);
    write("ca.pem", &ca_pem, false)?;
    write("ca.key", &ca_key.serialize_pem(), true)?;
    let key = KeyPair::generate()?;
    let mut server = CertificateParams::new(hosts.to_vec())?;
    server.distinguished_name.push(DnType::CommonName, "khlangd");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut server);
    write("server.pem", &server.signed_by(&key, &issuer)?.pem(), false)?;
    write("server.key", &key.serialize_pem(), true)?;
    for name in clients {
        if name.is_empty()
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            bail!("--client '{name}': an identity name is letters, digits, '-', '_' and '.'");
        }
        let key = KeyPair::generate()?;
        let mut client = CertificateParams::new(Vec::<String>::new())?;
        client.distinguished_name.push(DnType::CommonName, name.as_str());
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut client);
        write(&format!("client-{name}.pem"), &client.signed_by(&key, &issuer)?.pem(), false)?;
        write(&format!("client-{name}.key"), &key.serialize_pem(), true)?;
    }
    for path in &written {
        outln!("wrote {}", path.display());
    }
    let d = dir.display();
    outln!(
        "Serve:   khlangd dev --tls-cert {d}/server.pem --tls-key {d}/server.key --client-ca {d}/ca.pem --client-cert-optional"
    );
    if let Some(name) = clients.first() {
        outln!(
            "Connect: khlang --addr https://localhost:7420 --ca-cert {d}/ca.pem --client-cert {d}/client-{name}.pem --client-key {d}/client-{name}.key list --subject someone"
        );
    }
    Ok(())
}
