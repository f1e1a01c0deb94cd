//! Generated protobuf types: the KMS v2 gRPC service, the EncryptedObject kube-apiserver stores,
//! the ExternalJWTSigner service in both of its packages, and the part of etcd's API we use.
//!
//! NB: the code in src/proto/ is generated from proto/ and checked in, so a build needs neither
//! protoc nor the code generator; `scripts/gen-proto.sh` rewrites it and `--check` (run by CI)
//! fails when it is out of date. It is included rather than declared as modules so rustfmt leaves
//! it exactly as generated.

/// The KMS v2 service (`v2.KeyManagementService`), client and server.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v2 {
    include!("proto/v2.rs");
}

/// The `EncryptedObject` message that follows the `k8s:enc:kms:v2:<name>:` prefix in etcd.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod storage {
    include!("proto/kmsv2.storage.rs");
}

/// The ExternalJWTSigner service (KEP-740) kube-apiserver calls to sign service-account tokens.
pub mod externaljwt {
    /// Package `v1`, which kube-apiserver 1.34 and later call.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod v1 {
        include!("proto/v1.rs");
    }

    /// Package `v1alpha1`, which kube-apiserver 1.32 and 1.33 call; the same messages as `v1`.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod v1alpha1 {
        include!("proto/v1alpha1.rs");
    }
}

/// etcd's v3 API, only the messages and fields kmsgate and its test fixtures use (proto/etcd/).
pub mod etcd {
    /// Package `etcdserverpb`: the KV and Auth services, clients only.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod etcdserverpb {
        include!("proto/etcdserverpb.rs");

        // NB: these two carry a password and a token, so their Debug (generated code skips it)
        // names the user and nothing secret.
        impl std::fmt::Debug for AuthenticateRequest {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct("AuthenticateRequest").field("name", &self.name).finish_non_exhaustive()
            }
        }

        impl std::fmt::Debug for AuthenticateResponse {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct("AuthenticateResponse").field("header", &self.header).finish_non_exhaustive()
            }
        }
    }

    /// Package `mvccpb`: the stored key-value.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod mvccpb {
        include!("proto/mvccpb.rs");
    }
}

#[cfg(test)]
mod tests {
    use super::etcd::etcdserverpb::{AuthenticateRequest, AuthenticateResponse};

    #[test]
    fn etcd_credentials_stay_out_of_debug() {
        let request = AuthenticateRequest { name: "auditor".into(), password: "audit-pw".into() };
        let response = AuthenticateResponse { header: None, token: "tok.en.42".into() };
        let shown = format!("{request:?} {response:?}");
        assert!(shown.contains("auditor"), "{shown}");
        assert!(!shown.contains("audit-pw") && !shown.contains("tok.en.42"), "{shown}");
    }
}
