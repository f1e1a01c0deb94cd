//! kmsgate: a Kubernetes KMS v2 plugin backed by Vault/OpenBao Transit or a local keyring, and the
//! tools around it.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod audit;
pub mod backend;
pub mod backoff;
pub mod build_info;
pub mod ciphertext;
pub mod clock;
pub mod commands;
pub mod config;
pub mod controller;
pub mod crd;
pub mod encryption_config;
pub mod error;
pub mod etcd;
pub mod files;
pub mod http;
pub mod jwt;
pub mod k8s;
pub mod keyid;
pub mod keyring;
pub mod kms;
pub mod metrics;
pub mod plugin_status;
pub mod policy_loop;
pub mod proto;
pub mod rotation;
pub mod selftest;
pub mod serving;
pub mod signer;
pub mod signer_status;
pub mod signing_rotation;
pub mod storage;
pub mod telemetry;
pub mod tokens;
pub mod transit;
