//! TLS and mutual TLS: a client certificate from the configured CA authenticates as the identity
//! its common name names; no certificate, or one from another CA, is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use khlang_client::{Client, Code, TlsOptions};
use khlang_server::api::ServerTls;
use khlang_tests::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use zeroize::Zeroizing as Z;

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let pem = params.self_signed(&key).unwrap().pem();
    Ca { params, key, pem }
}

/// `(certificate PEM, key PEM)` signed by `ca`.
fn leaf(ca: &Ca, common_name: &str, sans: &[&str]) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, common_name);
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    (params.signed_by(&key, &issuer).unwrap().pem(), key.serialize_pem())
}

fn tls_options(ca: &Ca, client: Option<&(String, String)>) -> TlsOptions {
    TlsOptions {
        ca_pem: ca.pem.clone().into_bytes(),
        client_cert_pem: client.map(|(c, _)| c.clone().into_bytes()),
        client_key_pem: client.map(|(_, k)| Z::new(k.clone().into_bytes())),
        domain: Some("localhost".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_maps_certificates_to_identities() {
    let dir = tempfile::tempdir().unwrap();
    let vault_ca = ca("Khlang test CA");
    let other_ca = ca("Somebody else's CA");
    let (server_cert, server_key) = leaf(&vault_ca, "khlang", &["localhost", "127.0.0.1"]);
    let tls = ServerTls::from_pem(
        server_cert.as_bytes(),
        server_key.as_bytes(),
        Some(vault_ca.pem.as_bytes()),
        true,
    )
    .unwrap();
    let server = TestServer::start_tls(dir.path(), TestServer::options(dir.path()), Some(tls)).await;
    let url = format!("https://{}", server.addr);

    // A token over TLS works (certificates are optional on this listener).
    let mut app = Client::connect_with(
        &url,
        Some(&server.tokens["registration-app"]),
        Some(&tls_options(&vault_ca, None)),
    )
    .await
    .unwrap();
    let id = app.put("citizen-tls", [("card_number", CANARY_CARD), ("name", "สมชาย")]).await.unwrap();

    // A certificate from the vault's CA, CN=billing-clerk: authenticated as the billing clerk, no token.
    let clerk_cert = leaf(&vault_ca, "billing-clerk", &["billing-clerk"]);
    let mut clerk =
        Client::connect_with(&url, None, Some(&tls_options(&vault_ca, Some(&clerk_cert)))).await.unwrap();
    let r = clerk.get(&id, &["card_number".into()], Some("billing")).await.unwrap();
    assert_eq!(r.fields["card_number"].expose_secret(), CANARY_CARD);
    // ... and only as the billing clerk.
    assert_eq!(
        clerk.get(&id, &["name".into()], Some("billing")).await.unwrap_err().code(),
        Some(Code::PermissionDenied)
    );
    // A certificate naming the clerk with another identity's token: refused as ambiguous.
    let mut mixed = Client::connect_with(
        &url,
        Some(&server.tokens["registration-app"]),
        Some(&tls_options(&vault_ca, Some(&clerk_cert))),
    )
    .await
    .unwrap();
    assert_eq!(mixed.list("citizen-tls").await.unwrap_err().code(), Some(Code::Unauthenticated));

    // A certificate from the right CA for a name that is no identity: refused.
    let stranger = leaf(&vault_ca, "nobody-we-know", &["nobody"]);
    let mut c =
        Client::connect_with(&url, None, Some(&tls_options(&vault_ca, Some(&stranger)))).await.unwrap();
    assert_eq!(c.list("citizen-tls").await.unwrap_err().code(), Some(Code::Unauthenticated));

    // A certificate from another CA: the handshake fails; no data.
    let forged = leaf(&other_ca, "billing-clerk", &["billing-clerk"]);
    let result = match Client::connect_with(&url, None, Some(&tls_options(&vault_ca, Some(&forged)))).await {
        Ok(mut c) => c.get(&id, &["card_number".into()], Some("billing")).await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(result.is_err(), "a certificate from another CA must be refused");

    // Plaintext to a TLS listener gets nothing either.
    let plain = Client::connect(&format!("http://{}", server.addr), &server.tokens["billing-clerk"]).await;
    if let Ok(mut c) = plain {
        assert!(c.get(&id, &["card_number".into()], Some("billing")).await.is_err());
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_client_certificates_refuse_clients_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let vault_ca = ca("Khlang test CA");
    let (server_cert, server_key) = leaf(&vault_ca, "khlang", &["localhost", "127.0.0.1"]);
    let tls = ServerTls::from_pem(
        server_cert.as_bytes(),
        server_key.as_bytes(),
        Some(vault_ca.pem.as_bytes()),
        false,
    )
    .unwrap();
    let server = TestServer::start_tls(dir.path(), TestServer::options(dir.path()), Some(tls)).await;
    let url = format!("https://{}", server.addr);

    let without =
        match Client::connect_with(&url, Some(&server.token), Some(&tls_options(&vault_ca, None))).await {
            Ok(mut c) => c.list("anyone").await.map(|_| ()),
            Err(e) => Err(e),
        };
    assert!(without.is_err(), "no client certificate: refused at the handshake");

    let tester = leaf(&vault_ca, "tester", &["tester"]);
    let mut c = Client::connect_with(&url, None, Some(&tls_options(&vault_ca, Some(&tester)))).await.unwrap();
    let id = c.put("citizen-mtls", [("age", "33")]).await.unwrap();
    assert_eq!(c.get(&id, &[], PURPOSE).await.unwrap().fields["age"].expose_secret(), "33");
    server.stop().await;
}

/// Clients that connect to the TLS port and say nothing — or send the first 4 bytes of a
/// ClientHello and stop — cannot keep a real client out: 400 of them against a limit of 16
/// handshakes, and a new client still completes its handshake and is served within a second,
/// again and again while they stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_cannot_keep_a_client_out() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let vault_ca = ca("Khlang test CA");
    let (server_cert, server_key) = leaf(&vault_ca, "khlang", &["localhost", "127.0.0.1"]);
    let tls = ServerTls::from_pem(server_cert.as_bytes(), server_key.as_bytes(), None, false)
        .unwrap()
        .max_handshakes(16);
    let server = TestServer::start_tls(dir.path(), TestServer::options(dir.path()), Some(tls)).await;
    let url = format!("https://{}", server.addr);
    let mut half_open = Vec::new();
    for i in 0..400 {
        let mut c = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        if i % 2 == 0 {
            // A TLS record header announcing a handshake message, then silence.
            c.write_all(&[0x16, 0x03, 0x01, 0x02]).await.unwrap();
        }
        half_open.push(c);
    }
    for round in 0..3 {
        let started = std::time::Instant::now();
        let mut c = Client::connect_with(&url, Some(&server.token), Some(&tls_options(&vault_ca, None)))
            .await
            .unwrap_or_else(|e| panic!("round {round}: refused while they stay: {e}"));
        c.list("anyone").await.unwrap();
        let took = started.elapsed();
        assert!(took < std::time::Duration::from_secs(1), "round {round}: {took:?}");
        // More of them between rounds.
        for _ in 0..50 {
            half_open.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
        }
    }
    drop(half_open);
    server.stop().await;
}
