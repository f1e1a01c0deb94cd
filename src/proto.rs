//! Generated protobuf types: the KMS v2 gRPC service and the EncryptedObject kube-apiserver stores.

/// The KMS v2 service (`v2.KeyManagementService`), client and server.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v2 {
    tonic::include_proto!("v2");
}

/// The `EncryptedObject` message that follows the `k8s:enc:kms:v2:<name>:` prefix in etcd.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod storage {
    tonic::include_proto!("kmsv2.storage");
}
