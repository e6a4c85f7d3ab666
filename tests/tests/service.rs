//! The standard services beside the API: gRPC health and server reflection.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a panic is the failure report

use khlang_tests::*;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;

    let channel = tonic::transport::Endpoint::from_shared(server.url()).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    let status = health
        .check(HealthCheckRequest { service: "khlang.v1.Records".into() })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream =
        reflection.server_reflection_info(tokio_stream::iter(vec![request])).await.unwrap().into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("expected a service list, got {response:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"khlang.v1.Records"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    server.stop().await;
}

async fn status_of(url: &str, service: &str) -> ServingStatus {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned()).unwrap().connect().await.unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest { service: service.into() })
        .await
        .unwrap()
        .into_inner()
        .status()
}

/// Waits (up to 5 s) until `service` reports `want`.
async fn becomes(url: &str, service: &str, want: ServingStatus) -> bool {
    for _ in 0..100 {
        if status_of(url, service).await == want {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

/// A load balancer must not send requests to a sealed vault: health says NOT_SERVING for the
/// server and every service but the operator's (through which custodians unseal it), and
/// SERVING once it is unsealed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_seal() {
    let dir = tempfile::tempdir().unwrap();
    let server = sealed_server(dir.path(), khlang_server::AuthLimits::default()).await;
    let url = server.url();
    for service in [
        "",
        "khlang.v1.Records",
        "khlang.v1.Subjects",
        "khlang.v1.Admin",
        "khlang.v1.Audit",
        "khlang.v1.Keys",
    ] {
        assert!(becomes(&url, service, ServingStatus::NotServing).await, "'{service}' while sealed");
    }
    assert_eq!(status_of(&url, "khlang.v1.Operator").await, ServingStatus::Serving);
    let mut anon = khlang_client::Client::connect_with(&url, None, None).await.unwrap();
    anon.unseal(1, TWO_CUSTODIANS[0]).await.unwrap();
    assert_eq!(status_of(&url, "").await, ServingStatus::NotServing, "one of two custodians: still sealed");
    anon.unseal(2, TWO_CUSTODIANS[1]).await.unwrap();
    for service in ["", "khlang.v1.Records", "khlang.v1.Admin", "khlang.v1.Keys"] {
        assert!(becomes(&url, service, ServingStatus::Serving).await, "'{service}' once unsealed");
    }
    server.stop().await;
}
