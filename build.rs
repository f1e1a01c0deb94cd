//! Compiles the KMS v2 gRPC service and the stored EncryptedObject message.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/kms_v2.proto", "proto/encrypted_object.proto"], &["proto"])?;
    Ok(())
}
