//! The coordinator's gRPC server: the client API ([`crate::api`]), the standard health service
//! (`SERVING` only while a complete, warmed-up placement serves) and server reflection (v1 and v1alpha), so
//! generic clients (grpcurl, grpc_health_probe) work without a .proto file. With TLS,
//! connections are encrypted (and client certificates required where asked); with API keys,
//! `Inference` calls need one (health calls too where asked; reflection stays open: it tells
//! only the API's shape).

use std::sync::Arc;

use switchyard_net::grpc;
use switchyard_proto::v1::inference_server::InferenceServer;
use tokio_rustls::rustls::ServerConfig;
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic_health::ServingStatus;

use crate::api::InferenceApi;
use crate::auth::{ApiKeys, Scope};
use crate::cluster::Cluster;

/// Serves the client API on `listener` (over TLS with `tls`, letting in the calls `keys`
/// accept) until `shutdown`.
pub async fn serve(
    cluster: Arc<Cluster>,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<ServerConfig>>,
    keys: Arc<ApiKeys>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    // SERVING only while a complete, warmed-up placement serves.
    let mut ready = cluster.ready();
    tokio::spawn(async move {
        loop {
            let status = match *ready.borrow_and_update() {
                true => ServingStatus::Serving,
                false => ServingStatus::NotServing,
            };
            // "" is the server as a whole.
            for name in ["", <InferenceServer<InferenceApi> as NamedService>::NAME] {
                health.set_service_status(name, status).await;
            }
            if ready.changed().await.is_err() {
                return;
            }
        }
    });
    // v1, and v1alpha beside it: what grpcio's Python client, older grpcurl and Postman speak.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(switchyard_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let reflection = reflection().build_v1()?;
    let api = InferenceServer::new(InferenceApi::new(cluster));
    grpc::server()
        .add_service(InterceptedService::new(
            health_service,
            keys.interceptor(Scope::Health),
        ))
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(InterceptedService::new(api, keys.interceptor(Scope::Api)))
        .serve_with_incoming_shutdown(grpc::incoming(listener, tls)?, shutdown)
        .await?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("gRPC server: {0}")]
    Listen(#[from] std::io::Error),
    #[error("gRPC server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}
