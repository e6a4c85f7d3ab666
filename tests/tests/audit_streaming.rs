//! The access log streamed by the real daemon to a syslog receiver: over TLS, and as RFC 5424.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use std::io::{BufRead, Read};
use std::path::Path;
use std::time::Duration;

use khlang_tests::*;

/// A valid card number (Luhn) unique to `n`.
/// A syslog receiver over TLS (RFC 5425) on 127.0.0.1 with `certs`' server certificate: every
/// octet-counted message of every connection, as (connection number, message).
/// With `client_certs`, it requires a client certificate that folder's CA signed.
fn tls_syslog_receiver(
    certs: &Path,
    client_certs: bool,
) -> (u16, std::sync::mpsc::Receiver<(usize, String)>) {
    use rustls_pki_types::pem::PemObject;
    let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(certs.join("server.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(certs.join("server.key")).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = if client_certs {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(certs.join("ca.pem")).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(std::sync::Arc::new(roots), provider)
                .build()
                .unwrap(),
        )
    } else {
        builder.with_no_client_auth()
    };
    let config = std::sync::Arc::new(builder.with_single_cert(chain, key).unwrap());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for (n, tcp) in listener.incoming().enumerate() {
            let (config, tx) = (config.clone(), tx.clone());
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = std::io::BufReader::new(rustls::StreamOwned::new(conn, tcp.unwrap()));
                loop {
                    let mut len = Vec::new();
                    if tls.read_until(b' ', &mut len).unwrap_or(0) == 0 {
                        return;
                    }
                    let Ok(len) = std::str::from_utf8(&len[..len.len() - 1]).unwrap_or("x").parse::<usize>()
                    else {
                        return;
                    };
                    let mut msg = vec![0u8; len];
                    if tls.read_exact(&mut msg).is_err()
                        || tx.send((n, String::from_utf8(msg).unwrap())).is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (port, rx)
}

/// Audit entries reach a syslog receiver over TLS, octet-counted RFC 5424 with the entry's JSON;
/// only a receiver whose certificate the named CA signed gets them (a vault pointed at one signed
/// by another CA logs why and keeps serving); a TLS sink without a CA, a CA for a sink that is
/// not TLS, and a CA file that is not there are refused at start in one line.
#[tokio::test]
async fn audit_entries_stream_to_a_syslog_receiver_over_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let (certs, foreign) = (tmp.path().join("certs"), tmp.path().join("foreign"));
    for dir in [&certs, &foreign] {
        assert!(
            khlangd_cmd(&["tls", "dev-certs", dir.to_str().unwrap(), "--client", "khlangd"]).status.success()
        );
    }
    let (port, received) = tls_syslog_receiver(&certs, false);
    let sink = format!("syslog+tls://localhost:{port}");
    let data = tmp.path().join("vault");
    let ca = certs.join("ca.pem");
    let dev = ["dev", "--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()];
    for (extra, says) in [
        (vec!["--audit-sink", &sink], "--audit-sink-ca"),
        (
            vec!["--audit-sink", "syslog://localhost:514", "--audit-sink-ca", ca.to_str().unwrap()],
            "only for a syslog+tls",
        ),
        (vec!["--audit-sink", &sink, "--audit-sink-ca", "/nonexistent/ca.pem"], "/nonexistent/ca.pem"),
        (vec!["--audit-sink-ca", ca.to_str().unwrap()], "without --audit-sink"),
    ] {
        let out = khlangd_cmd(&[&dev[..], &extra[..]].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says) && err.trim().lines().count() == 1,
            "{extra:?}: {err}"
        );
    }

    let (mut daemon, url) = spawn_khlangd(
        &[&dev[..], &["--audit-sink", &sink, "--audit-sink-ca", ca.to_str().unwrap()]].concat(),
    );
    let mut c = khlang_client::Client::connect(&url.expect("starts"), &dev_token(&data, "registration-app"))
        .await
        .unwrap();
    let id = c.put("tls-syslog-subject", [("card_number", CANARY_CARD)]).await.unwrap();
    c.get(&id, &[], Some("contact")).await.unwrap();
    let mut seqs = Vec::new();
    while seqs.len() < 2 {
        let (_, msg) = received.recv_timeout(Duration::from_secs(10)).expect("an entry within 10 s");
        let (header, json) = msg.split_once(" - \u{feff}").expect("RFC 5424 with a UTF-8 BOM");
        let fields: Vec<&str> = header.split(' ').collect();
        assert_eq!((fields[0], fields[3], fields[5]), ("<110>1", "khlangd", "audit"), "{header}");
        assert!(!msg.contains(CANARY_CARD) && !msg.contains("tls-syslog-subject"), "{msg}");
        let entry: serde_json::Value = serde_json::from_str(json).unwrap();
        if entry["record_id"] == id.as_str() {
            seqs.push((entry["seq"].as_u64().unwrap(), entry["rpc"].as_str().unwrap().to_owned()));
        }
    }
    assert_eq!(seqs.iter().map(|(_, r)| r.as_str()).collect::<Vec<_>>(), ["PutRecord", "GetRecord"]);
    assert_eq!(seqs[1].0, seqs[0].0 + 1, "{seqs:?}");
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    while received.recv_timeout(Duration::from_millis(300)).is_ok() {}

    // A receiver whose certificate the named CA did not sign gets nothing; the vault serves on.
    let other = tmp.path().join("other");
    let (mut daemon, url, log) = spawn_khlangd_logged(
        &[
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            other.to_str().unwrap(),
            "--audit-sink",
            &sink,
            "--audit-sink-ca",
            foreign.join("ca.pem").to_str().unwrap(),
        ],
        "info",
    );
    let mut c = khlang_client::Client::connect(&url.expect("starts"), &dev_token(&other, "registration-app"))
        .await
        .unwrap();
    let id = c.put("tls-syslog-subject", [("card_number", CANARY_CARD)]).await.unwrap();
    c.get(&id, &[], Some("contact")).await.unwrap();
    assert!(received.recv_timeout(Duration::from_secs(2)).is_err(), "an unverified receiver got an entry");
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    let log = log.recv_timeout(Duration::from_secs(10)).unwrap().unwrap_err();
    let failed: Vec<&str> =
        log.lines().filter(|l| l.contains("the audit sink failed to take an entry")).collect();
    assert!(!failed.is_empty() && failed[0].contains("certificate"), "{log}");

    // A receiver that requires a client certificate: the vault's (--audit-sink-cert/-key, signed
    // by the receiver's CA) is accepted; without one the receiver refuses and the log says so.
    let (port, received) = tls_syslog_receiver(&certs, true);
    let sink = format!("syslog+tls://localhost:{port}");
    let (cert, key) = (certs.join("client-khlangd.pem"), certs.join("client-khlangd.key"));
    let with_cert = [
        "--audit-sink",
        &sink,
        "--audit-sink-ca",
        ca.to_str().unwrap(),
        "--audit-sink-cert",
        cert.to_str().unwrap(),
        "--audit-sink-key",
        key.to_str().unwrap(),
    ];
    let out = khlangd_cmd(&[&dev[..], &with_cert[..6]].concat());
    assert!(!out.status.success(), "a certificate without its key is refused");
    for (n, flags) in [with_cert.to_vec(), with_cert[..4].to_vec()].into_iter().enumerate() {
        let data = tmp.path().join(format!("mutual-{n}"));
        let args =
            [&["dev", "--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()][..], &flags[..]]
                .concat();
        let (mut daemon, url, log) = spawn_khlangd_logged(&args, "info");
        let mut c =
            khlang_client::Client::connect(&url.expect("starts"), &dev_token(&data, "registration-app"))
                .await
                .unwrap();
        let id = c.put("tls-syslog-subject", [("card_number", CANARY_CARD)]).await.unwrap();
        c.get(&id, &[], Some("contact")).await.unwrap();
        let mut delivered = false;
        while let Ok((_, msg)) = received.recv_timeout(Duration::from_secs(if n == 0 { 10 } else { 2 })) {
            if msg.contains(&id) && msg.contains("GetRecord") {
                delivered = true;
                break;
            }
        }
        daemon.kill().unwrap();
        daemon.wait().unwrap();
        let log = log.recv_timeout(Duration::from_secs(10)).unwrap().unwrap_err();
        if n == 0 {
            assert!(delivered, "the vault's client certificate was accepted: {log}");
        } else {
            assert!(!delivered, "a receiver requiring a client certificate got an entry without one");
            assert!(log.contains("CertificateRequired"), "the log says why: {log}");
        }
    }
}

/// `khlangd --audit-sink syslog://…`: every entry arrives as one RFC 5424 message over UDP
/// (facility log audit, APP-NAME khlangd, MSGID audit, the entry's canonical JSON), with no
/// value; a sink that is not a file:// or syslog:// URL is refused with one tidy line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_entries_stream_to_syslog_as_rfc5424() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("vault");
    let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    receiver.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let sink = format!("syslog://{}", receiver.local_addr().unwrap());
    let bad = khlangd_cmd(&[
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--audit-sink",
        "http://siem",
    ]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("--audit-sink") && err.lines().count() == 1, "{err}");

    let (mut daemon, url) = spawn_khlangd(&[
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--audit-sink",
        &sink,
    ]);
    let url = url.expect("khlangd dev starts");
    let mut c = khlang_client::Client::connect(&url, &dev_token(&data, "registration-app")).await.unwrap();
    let id = c.put("syslog-subject", [("card_number", CANARY_CARD)]).await.unwrap();
    c.get(&id, &[], Some("contact")).await.unwrap();
    let mut seqs = Vec::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let n = receiver.recv(&mut buf).expect("a syslog message within 5 s");
        let msg = String::from_utf8(buf[..n].to_vec()).unwrap();
        let (header, json) = msg.split_once(" - \u{feff}").expect("RFC 5424 with a UTF-8 BOM");
        let fields: Vec<&str> = header.split(' ').collect();
        assert_eq!((fields[0], fields[3], fields[5]), ("<110>1", "khlangd", "audit"), "{header}");
        assert!(fields[1].len() >= 20 && fields[1].ends_with('Z') && fields[1].contains('T'), "{header}");
        assert!(!msg.contains(CANARY_CARD) && !msg.contains("syslog-subject"), "{msg}");
        let entry: serde_json::Value = serde_json::from_str(json).unwrap();
        if entry["record_id"] == id.as_str() {
            seqs.push((entry["seq"].as_u64().unwrap(), entry["rpc"].as_str().unwrap().to_owned()));
        }
        if seqs.len() == 2 {
            break;
        }
    }
    let rpcs: Vec<&str> = seqs.iter().map(|(_, r)| r.as_str()).collect();
    assert_eq!(rpcs, ["PutRecord", "GetRecord"], "{seqs:?}");
    assert_eq!(seqs[1].0, seqs[0].0 + 1, "{seqs:?}");
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}
