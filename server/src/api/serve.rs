//! Serving: TLS, health, reflection, the undecodable-request guard, graceful drain.

use super::*;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// The health service that answers whether every value deciding access read so far was
/// genuine (NOT_SERVING once one was not, until the next unseal; and while sealed).
pub const AUTHORITY_HEALTH: &str = "khlang.v1.Authority";
/// How long open requests may take to finish after shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests whose message does not decode (invalid UTF-8 in a string, a wrong wire type) never
/// reach a handler: tonic answers `Internal` for them, unaudited. This layer turns that answer
/// into `InvalidArgument` and records the request like any other refused one.
#[derive(Clone)]
struct UndecodableRequests {
    vault: Arc<Vault>,
}

impl<S> tower::Layer<S> for UndecodableRequests {
    type Service = UndecodableService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        UndecodableService { inner, vault: self.vault.clone() }
    }
}

#[derive(Clone)]
struct UndecodableService<S> {
    inner: S,
    vault: Arc<Vault>,
}

impl<S, B> tower::Service<http::Request<B>> for UndecodableService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let rpc = Rpc::api_method(req.uri().path().rsplit('/').next().unwrap_or_default());
        let peer = req
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|i| i.remote_addr())
            .or_else(|| {
                req.extensions()
                    .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
                    .and_then(|i| i.get_ref().remote_addr())
            });
        let client_id = req
            .headers()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(sanitize_client_id)
            .unwrap_or_default();
        let vault = self.vault.clone();
        // The clone that was made ready is the one to call (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let resp = inner.call(req).await?;
            let refuse = move || {
                let request_id = uuid::Uuid::new_v4().to_string();
                tokio::spawn(async move {
                    let err = undecodable();
                    // A path the API lacks is answered `Unimplemented` before any decoding.
                    let Some(rpc) = rpc else { return };
                    if let Err(e) = vault.audit_refused(rpc, peer, &request_id, &client_id, &err).await {
                        tracing::error!(request_id, error = %e, "could not audit an undecodable request");
                    }
                });
            };
            // The status comes in the headers (trailers-only answer) or in the trailers.
            if failed_to_decode(resp.headers()) {
                refuse();
                return Ok(status(undecodable(), "").into_http::<tonic::body::Body>());
            }
            let (parts, body) = resp.into_parts();
            let body = WatchTrailers { inner: body, on_failure: Some(Box::new(refuse)) };
            Ok(http::Response::from_parts(parts, tonic::body::Body::new(body)))
        })
    }
}

fn undecodable() -> VaultError {
    VaultError::InvalidArgument(
        "the request does not decode as this RPC's message (invalid UTF-8 in a string, or a wrong wire type)"
            .into(),
    )
}

fn failed_to_decode(headers: &http::HeaderMap) -> bool {
    headers.get("grpc-status").is_some_and(|s| s == "13")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.replace("%20", " ").contains("decode Protobuf message"))
}

/// A response body whose trailers are checked for tonic's decode failure, rewritten to
/// `InvalidArgument`, and reported once.
struct WatchTrailers {
    inner: tonic::body::Body,
    on_failure: Option<Box<dyn FnOnce() + Send>>,
}

impl http_body::Body for WatchTrailers {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            std::task::Poll::Ready(Some(Ok(frame))) => match frame.into_trailers() {
                Ok(mut trailers) => {
                    if failed_to_decode(&trailers) {
                        trailers.insert("grpc-status", http::HeaderValue::from_static("3"));
                        if let Ok(m) =
                            http::HeaderValue::from_str(&undecodable().to_string().replace(' ', "%20"))
                        {
                            trailers.insert("grpc-message", m);
                        }
                        if let Some(report) = this.on_failure.take() {
                            report();
                        }
                    }
                    std::task::Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
                }
                Err(frame) => std::task::Poll::Ready(Some(Ok(frame))),
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::Body::size_hint(&self.inner)
    }
}

/// Serves the vault's gRPC API, health and reflection on `listener` until `shutdown` resolves;
/// over TLS when `tls` is given (with client certificates if it names a client CA). The
/// background key jobs and the final flush are the caller's (the daemon's): see
/// [`crate::vault::keyops::spawn_key_jobs`] and [`Vault::shut_down`].
pub async fn serve(
    vault: Arc<Vault>,
    listener: TcpListener,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let max = vault.limits().max_message_bytes;
    let api = Api::new(vault.clone());
    let records =
        RecordsServer::new(api.clone()).max_decoding_message_size(max).max_encoding_message_size(max);
    let subjects =
        SubjectsServer::new(api.clone()).max_decoding_message_size(max).max_encoding_message_size(max);
    let admin = AdminServer::new(api.clone()).max_decoding_message_size(max).max_encoding_message_size(max);
    let audit = AuditServer::new(api.clone()).max_decoding_message_size(max).max_encoding_message_size(max);
    let operator =
        OperatorServer::new(api.clone()).max_decoding_message_size(max).max_encoding_message_size(max);
    let keys = KeysServer::new(api).max_decoding_message_size(max).max_encoding_message_size(max);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status(AUTHORITY_HEALTH, tonic_health::ServingStatus::NotServing).await;
    health.set_serving::<RecordsServer<Api>>().await;
    health.set_serving::<SubjectsServer<Api>>().await;
    health.set_serving::<AdminServer<Api>>().await;
    health.set_serving::<AuditServer<Api>>().await;
    health.set_serving::<OperatorServer<Api>>().await;
    health.set_serving::<KeysServer<Api>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(khlang_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // Health tells the truth about the audit log: while it holds a break the operator has not
    // accepted, the data services (and the server as a whole) answer NOT_SERVING. Once unsealed,
    // the whole log's history is verified here too, beside serving.
    let (stop_watch, mut stopped) = tokio::sync::watch::channel(false);
    let watcher = {
        let (health, vault) = (health.clone(), vault.clone());
        tokio::spawn(async move {
            let mut shown = None;
            let mut history_checked = false;
            let mut ticks: u64 = 0;
            loop {
                // Gauges every second; the store's size (a count: sled scans for it) every ten
                // minutes, so a large store pays little for it.
                if ticks.is_multiple_of(4) {
                    observe::observe(&vault, ticks.is_multiple_of(2400)).await;
                }
                ticks += 1;
                let broken = matches!(vault.audit_state(), crate::audit::LogState::Broken(_));
                let sealed = vault.is_sealed();
                // Every request writes its entry first: a log that cannot be written serves
                // nothing (the operator service still answers custodians, and says why).
                let unwritable = !vault.audit_writable().await;
                // Values that decide access found not genuine: the node serves what is genuine
                // and says so under a service of its own.
                let forged = vault.authority_refused() > 0;
                if shown != Some((broken, sealed, unwritable, forged)) {
                    use tonic_health::ServingStatus::{NotServing, Serving};
                    let status = |down: bool| if down { NotServing } else { Serving };
                    // Sealed, only the operator service (custodians unseal through it) serves;
                    // with a broken log, the data services stop too.
                    health.set_service_status("", status(broken || sealed || unwritable)).await;
                    for name in [
                        <RecordsServer<Api> as tonic::server::NamedService>::NAME,
                        <SubjectsServer<Api> as tonic::server::NamedService>::NAME,
                    ] {
                        health.set_service_status(name, status(broken || sealed || unwritable)).await;
                    }
                    for name in [
                        <AdminServer<Api> as tonic::server::NamedService>::NAME,
                        <AuditServer<Api> as tonic::server::NamedService>::NAME,
                        <KeysServer<Api> as tonic::server::NamedService>::NAME,
                    ] {
                        health.set_service_status(name, status(sealed || unwritable)).await;
                    }
                    health.set_service_status(AUTHORITY_HEALTH, status(sealed || forged)).await;
                    if unwritable {
                        tracing::error!("the audit log cannot be written: health NOT_SERVING");
                    }
                    if forged {
                        tracing::error!(
                            "stored values that decide access were found changed outside the vault: health \
                             {AUTHORITY_HEALTH} NOT_SERVING until the next unseal"
                        );
                    }
                    shown = Some((broken, sealed, unwritable, forged));
                }
                if vault.repeats_counting() {
                    // Summaries of repeated unauthenticated events, once their interval ends.
                    let vault = vault.clone();
                    if let Err(e) = vault.write_repeats(false).await {
                        tracing::error!(error = %e, "could not write the summaries of repeated events");
                    }
                }
                if !history_checked && !vault.is_sealed() {
                    // About a second per million entries, on the blocking pool.
                    history_checked = true;
                    let vault = vault.clone();
                    if let Err(e) = vault.check_audit_history().await {
                        tracing::error!(error = %e, "the audit log's history could not be verified");
                    }
                    // The store's records against the log: a record the store lost (a damaged
                    // page, a row deleted outside the vault) is then read as DataLoss, not NotFound.
                    if let Err(e) = vault.check_records().await {
                        tracing::error!(error = %e, "the store's records could not be checked against the log");
                    }
                    continue;
                }
                tokio::select! {
                    _ = stopped.changed() => break,
                    () = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
        })
    };
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = stop_watch.send(true);
        health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        health.set_not_serving::<RecordsServer<Api>>().await;
        health.set_not_serving::<SubjectsServer<Api>>().await;
        health.set_not_serving::<AdminServer<Api>>().await;
        health.set_not_serving::<AuditServer<Api>>().await;
        health.set_not_serving::<OperatorServer<Api>>().await;
        health.set_not_serving::<KeysServer<Api>>().await;
        health.set_service_status(AUTHORITY_HEALTH, tonic_health::ServingStatus::NotServing).await;
        let _ = stopping_tx.send(());
    };
    let router = tonic::transport::Server::builder()
        .layer(UndecodableRequests { vault: vault.clone() })
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(records)
        .add_service(subjects)
        .add_service(admin)
        .add_service(audit)
        .add_service(operator)
        .add_service(keys);
    let server: std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
        match tls {
            Some(tls) => {
                Box::pin(router.serve_with_incoming_shutdown(super::tls::incoming(listener, tls), signal))
            }
            None => {
                Box::pin(router.serve_with_incoming_shutdown(
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    signal,
                ))
            }
        };
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result?,
        _ = async { let _ = stopping_rx.await; tokio::time::sleep(DRAIN_TIMEOUT).await } => {
            tracing::warn!("drain timeout: closing with requests still open");
        }
    }
    // The watcher holds the vault: it lets go before serve returns, so the caller's final flush
    // (`Vault::shut_down`) runs with nothing else writing.
    let _ = watcher.await;
    Ok(())
}
