//! Writes the Rust code of kmsgate's protos into a directory: `kmsgate-protogen <proto dir> <out
//! dir>`. scripts/gen-proto.sh runs it and copies the result into src/proto/, or, with `--check`,
//! fails when the checked-in code differs.
use std::{
    env,
    path::{Path, PathBuf},
    process::ExitCode,
};

/// The KMS v2 service, the stored EncryptedObject and both ExternalJWTSigner packages: servers and
/// clients, as kmsgate serves them and its tests and `selftest` call them.
const SERVED: &[&str] =
    &["kms_v2.proto", "encrypted_object.proto", "externaljwt/v1/api.proto", "externaljwt/v1alpha1/api.proto"];

/// etcd's API subset: clients only.
const ETCD: &[&str] = &["etcd/rpc.proto"];

/// Messages that carry a password or an auth token: their Debug is written by hand, redacted.
const SECRET: &[&str] = &[".etcdserverpb.AuthenticateRequest", ".etcdserverpb.AuthenticateResponse"];

fn main() -> ExitCode {
    let args: Vec<PathBuf> = env::args_os().skip(1).map(PathBuf::from).collect();
    let [protos, out] = args.as_slice() else {
        eprintln!("usage: kmsgate-protogen <proto dir> <out dir>");
        return ExitCode::from(2);
    };
    match generate(protos, out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kmsgate-protogen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn generate(protos: &Path, out: &Path) -> std::io::Result<()> {
    let files = |names: &[&str]| names.iter().map(|n| protos.join(n)).collect::<Vec<_>>();
    let includes = [protos.to_path_buf()];
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .emit_rerun_if_changed(false)
        .out_dir(out)
        .compile_protos(&files(SERVED), &includes)?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .emit_rerun_if_changed(false)
        .skip_debug(SECRET.iter().copied())
        .out_dir(out)
        .compile_protos(&files(ETCD), &includes)
}
