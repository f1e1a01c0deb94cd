//! Generated protobuf types: the KMS v2 gRPC service, the EncryptedObject kube-apiserver stores,
//! and the ExternalJWTSigner service in both of its packages.

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

/// The ExternalJWTSigner service (KEP-740) kube-apiserver calls to sign service-account tokens.
pub mod externaljwt {
    /// Package `v1`, which kube-apiserver 1.34 and later call.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("v1");
    }

    /// Package `v1alpha1`, which kube-apiserver 1.32 and 1.33 call; the same messages as `v1`.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod v1alpha1 {
        tonic::include_proto!("v1alpha1");
    }
}
