//! The coordinator's gRPC server: the client API ([`crate::api`]), the standard health service
//! (`SERVING` only while a complete, warmed-up placement serves) and server reflection, so
//! generic clients (grpcurl, grpc_health_probe) work without a .proto file.

use std::sync::Arc;

use switchyard_net::grpc;
use switchyard_proto::v1::inference_server::InferenceServer;
use tonic::server::NamedService;
use tonic_health::ServingStatus;

use crate::api::InferenceApi;
use crate::cluster::Cluster;

/// Serves the client API on `listener` until `shutdown`.
pub async fn serve(
    cluster: Arc<Cluster>,
    listener: tokio::net::TcpListener,
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
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(switchyard_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    grpc::server()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(InferenceServer::new(InferenceApi::new(cluster)))
        .serve_with_incoming_shutdown(grpc::incoming(listener), shutdown)
        .await?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("gRPC server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}
