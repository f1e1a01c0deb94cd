//! Loading whole configurations: precedence, defaults, and errors that name the setting.

use std::{collections::HashMap, time::Duration};

use super::{backend::SERVICE_ACCOUNT_TOKEN, *};
use crate::ciphertext;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn flags(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn load(file: &str, f: &[(&str, &str)], e: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kmsgate.toml");
    std::fs::write(&path, file).unwrap();
    Config::load(Some(&path), &flags(f), &env(e))
}

#[test]
fn the_controller_may_use_kubernetes_auth_and_reads_etcd_settings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, VAULT).unwrap();
    let set = flags(&[
        // NB: the shared file's token_file is for token auth; kubernetes auth refuses it.
        ("vault.token_file", ""),
        ("vault.auth", "kubernetes"),
        ("vault.role", "kmsgate-controller"),
        ("etcd.endpoints", "https://10.0.0.1:2379,https://10.0.0.2:2379"),
        ("etcd.user", "kmsgate-verify"),
        ("etcd.password_file", "/etc/kmsgate/etcd-password"),
        ("controller.policy", "prod"),
    ]);
    let config = Config::load_as(Role::Controller, Some(&path), &set, &env(&[])).unwrap();
    let BackendConfig::Vault(v) = &config.backend else { panic!("vault backend") };
    let VaultAuth::Kubernetes { role, jwt_file, mount } = &v.client.auth else { panic!("kubernetes auth") };
    assert_eq!((role.as_str(), mount.as_str()), ("kmsgate-controller", "kubernetes"));
    assert_eq!(jwt_file, Path::new(SERVICE_ACCOUNT_TOKEN));
    assert_eq!(config.etcd.as_ref().unwrap().endpoints.len(), 2);
    assert_eq!(config.controller.policy, "prod");
    assert_eq!(config.controller.lease_duration, Duration::from_secs(15));
    assert_eq!(config.controller.token_policy, "kmsgate");
    assert_eq!(config.controller.service_account, "kmsgate/kmsgate-controller");
    assert_eq!(config.controller.signing_policy, None, "no signing-key loop unless named");
    let signing = env(&[("KMSGATE_CONTROLLER_SIGNING_POLICY", "sa-signing")]);
    let config = Config::load_as(Role::Controller, Some(&path), &set, &signing).unwrap();
    assert_eq!(config.controller.signing_policy.as_deref(), Some("sa-signing"));
    let bad = env(&[("KMSGATE_CONTROLLER_SIGNING_POLICY", "SA_Signing")]);
    let refused = Config::load_as(Role::Controller, Some(&path), &set, &bad).unwrap_err();
    assert!(refused.to_string().contains("controller.signing_policy"), "{refused}");
    let own = env(&[("KMSGATE_CONTROLLER_SERVICE_ACCOUNT", "platform/kmsgate")]);
    let config = Config::load_as(Role::Controller, Some(&path), &set, &own).unwrap();
    assert_eq!(config.controller.service_account, "platform/kmsgate");
    let bad = env(&[("KMSGATE_CONTROLLER_SERVICE_ACCOUNT", "kmsgate")]);
    let refused = Config::load_as(Role::Controller, Some(&path), &set, &bad).unwrap_err();
    assert!(refused.to_string().contains("controller.service_account"), "{refused}");
    // The same settings are refused for the plugin.
    let refused = Config::load_as(Role::Plugin, Some(&path), &set, &env(&[])).unwrap_err();
    assert!(refused.to_string().contains("static pod"), "{refused}");
    let no_role = flags(&[("vault.auth", "kubernetes")]);
    let refused = Config::load_as(Role::Controller, Some(&path), &no_role, &env(&[])).unwrap_err();
    assert!(refused.to_string().contains("vault.role"), "{refused}");
    let half = flags(&[("etcd.endpoints", "https://e:2379"), ("etcd.user", "u")]);
    let refused = Config::load_as(Role::Controller, Some(&path), &half, &env(&[])).unwrap_err();
    assert!(refused.to_string().contains("etcd.user"), "{refused}");
}

const VAULT: &str = r#"
format = 1
[backend]
kind = "vault"
identity = "prod-vault"
[vault]
addresses = ["https://vault.example:8200"]
token_file = "/etc/kmsgate/token"
"#;

#[test]
fn defaults_are_the_embedded_local_backend() {
    let c = Config::load(None, &[], &env(&[])).unwrap();
    assert!(matches!(c.backend, BackendConfig::Local { create: true, .. }));
    assert_eq!(c.plugin.socket.spec, SocketSpec::Path("/run/kmsgate/kms.sock".into()));
    assert_eq!(c.plugin.socket.mode, 0o600);
    assert_eq!(c.plugin.status_version, StatusVersion::V2);
    assert_eq!(c.plugin.staleness_window, Duration::from_secs(600));
    assert_eq!(c.http_listen, Some("127.0.0.1:8787".parse().unwrap()));
}

#[test]
fn flags_beat_env_beat_file() {
    let file =
        "format = 1\n[plugin]\nsocket = \"/file.sock\"\npoll_interval = \"1s\"\nmax_plaintext_bytes = 100\n";
    let c = load(file, &[], &[]).unwrap();
    assert_eq!(c.plugin.socket.spec, SocketSpec::Path("/file.sock".into()));
    let c = load(
        file,
        &[],
        &[("KMSGATE_PLUGIN_SOCKET", "/env.sock"), ("KMSGATE_PLUGIN_MAX_PLAINTEXT_BYTES", "64")],
    )
    .unwrap();
    assert_eq!(c.plugin.socket.spec, SocketSpec::Path("/env.sock".into()));
    assert_eq!(c.plugin.max_plaintext_bytes, 64);
    assert_eq!(c.plugin.poll_interval, Duration::from_secs(1));
    let c =
        load(file, &[("plugin.socket", "/flag.sock")], &[("KMSGATE_PLUGIN_SOCKET", "/env.sock")]).unwrap();
    assert_eq!(c.plugin.socket.spec, SocketSpec::Path("/flag.sock".into()));
}

#[test]
fn vault_env_is_mapped_explicitly_and_ranks_below_kmsgate_env() {
    let c = load(VAULT, &[], &[("VAULT_ADDR", "https://a:8200"), ("VAULT_NAMESPACE", "team")]).unwrap();
    let BackendConfig::Vault(v) = c.backend else { panic!("vault expected") };
    assert_eq!(v.client.addresses, vec!["https://a:8200"]);
    assert_eq!(v.client.namespace, "team");
    let c = load(
        VAULT,
        &[],
        &[("VAULT_ADDR", "https://a:8200"), ("KMSGATE_VAULT_ADDRESSES", "https://b, https://c")],
    )
    .unwrap();
    let BackendConfig::Vault(v) = c.backend else { panic!("vault expected") };
    assert_eq!(v.client.addresses, vec!["https://b", "https://c"]);
}

#[test]
fn the_environment_beating_the_file_and_unknown_variables_are_warned() {
    let c = load(VAULT, &[], &[]).unwrap();
    assert!(c.notices.warnings.is_empty(), "{:?}", c.notices.warnings);
    assert!(
        c.notices.info[0].contains("https://vault.example:8200") && c.notices.info[0].contains("from file ")
    );
    let file = format!("{VAULT}\n");
    let file = file.replace("[vault]\n", "[vault]\nnamespace = \"file\"\n");
    let c = load(
        &file,
        &[],
        &[("VAULT_ADDR", "https://env:8200"), ("VAULT_NAMESPACE", "env"), ("KMSGATE_PLUGN_SOCKET", "/x")],
    )
    .unwrap();
    let warnings = c.notices.warnings.join("\n");
    assert!(
        warnings.contains("VAULT_NAMESPACE overrides vault.namespace from the config file"),
        "{warnings}"
    );
    assert!(warnings.contains("KMSGATE_PLUGN_SOCKET names no kmsgate setting"), "{warnings}");
    assert!(
        c.notices.info[0].contains("https://env:8200") && c.notices.info[0].contains("from env VAULT_ADDR")
    );
    // A file without addresses takes VAULT_ADDR quietly: nothing was overridden.
    let c = load(
        &VAULT.replace("addresses = [\"https://vault.example:8200\"]\n", ""),
        &[],
        &[("VAULT_ADDR", "https://env:8200")],
    )
    .unwrap();
    assert!(c.notices.warnings.is_empty(), "{:?}", c.notices.warnings);
    // Variables of --config, the build and the scripts are not settings, and not warned about.
    let c = load(VAULT, &[], &[("KMSGATE_CONFIG", "/c"), ("KMSGATE_TOOLS_DIR", "/t")]).unwrap();
    assert!(c.notices.warnings.is_empty(), "{:?}", c.notices.warnings);
}

#[test]
fn sub_second_intervals() {
    let c =
        load("format = 1\n[plugin]\npoll_interval = \"50ms\"\nround_trip_interval = \"200ms\"\n", &[], &[])
            .unwrap();
    assert_eq!(c.plugin.poll_interval, Duration::from_millis(50));
    assert_eq!(c.plugin.staleness_window, Duration::from_millis(400));
}

#[test]
fn errors_name_the_field() {
    type Pairs<'a> = &'a [(&'a str, &'a str)];
    let cases: &[(&str, Pairs<'_>, Pairs<'_>, &str)] = &[
        ("format = 2\n", &[], &[], "format = 2 is not supported"),
        ("[plugin]\n", &[], &[], "missing `format = 1`"),
        ("format = 1\n[plugin]\nsokcet = \"/x\"\n", &[], &[], "sokcet"),
        ("format = 1\n", &[("plugin.sokcet", "/x")], &[], "unknown setting \"plugin.sokcet\""),
        ("format = 1\n", &[("plugin.socket", "relative.sock")], &[], "plugin.socket"),
        ("format = 1\n", &[("plugin.socket", "@kms")], &[], "allow_abstract_socket"),
        ("format = 1\n", &[("plugin.socket_mode", "0666")], &[], "plugin.socket_mode"),
        ("format = 1\n", &[("plugin.socket_mode", "rw")], &[], "plugin.socket_mode"),
        ("format = 1\n", &[("plugin.socket_mode", "0660")], &[], "plugin.socket_group is not set"),
        ("format = 1\n", &[("plugin.socket_dir_check", "off")], &[], "plugin.socket_dir_check"),
        ("format = 1\n", &[("plugin.status_version", "v1")], &[], "plugin.status_version"),
        ("format = 1\n", &[("plugin.outage_mode", "lenient")], &[], "plugin.outage_mode"),
        ("format = 1\n", &[("plugin.poll_interval", "soon")], &[], "plugin.poll_interval"),
        ("format = 1\n", &[("plugin.poll_interval", "0s")], &[], "greater than zero"),
        (
            "format = 1\n",
            &[],
            &[("KMSGATE_PLUGIN_PROMOTE_AFTER_POLLS", "x")],
            "KMSGATE_PLUGIN_PROMOTE_AFTER_POLLS",
        ),
        ("format = 1\n", &[("plugin.promote_after_polls", "0")], &[], "plugin.promote_after_polls"),
        ("format = 1\n", &[("plugin.max_plaintext_bytes", "800")], &[], "at most 1024"),
        ("format = 1\n", &[("backend.kind", "aws")], &[], "backend.kind"),
        ("format = 1\n", &[("backend.kind", "vault")], &[], "backend.identity"),
        ("format = 1\n", &[("http.listen", "everywhere")], &[], "http.listen"),
        (VAULT, &[("vault.addresses", "http://10.0.0.1:8200")], &[], "insecure_allow_http"),
        (VAULT, &[("vault.addresses", "ftp://x")], &[], "vault.addresses"),
        (VAULT, &[("vault.addresses", "")], &[], "at least one address"),
        (VAULT, &[("vault.token_file", "")], &[], "vault.token_file"),
        (VAULT, &[("vault.auth", "kubernetes")], &[], "static pod has no service-account token"),
        (VAULT, &[("vault.auth", "approle")], &[], "vault.role_id_file"),
        (VAULT, &[("vault.auth", "cert")], &[], "vault.client_cert"),
        (VAULT, &[("vault.auth", "jwt")], &[], "vault.role"),
        (VAULT, &[("vault.auth", "ldap")], &[], "vault.auth"),
        (VAULT, &[("vault.client_key", "/k.pem")], &[], "set together"),
        (VAULT, &[("vault.renew_fraction", "1.5")], &[], "vault.renew_fraction"),
        (VAULT, &[("vault.max_concurrent_calls", "0")], &[], "vault.max_concurrent_calls"),
        (VAULT, &[("backend.identity", "Prod Vault")], &[], "backend.identity"),
        (VAULT, &[("vault.mount", "/transit")], &[], "vault.mount"),
        (VAULT, &[("vault.key", "a/b")], &[], "vault.key"),
        (
            VAULT,
            &[("vault.role_id_file", "/r")],
            &[],
            "vault.role_id_file: set, but vault.auth = \"token\" ignores it",
        ),
        (VAULT, &[("vault.secret_id_file", "/s")], &[], "vault.secret_id_file"),
        (VAULT, &[("vault.role", "r")], &[], "vault.role: set"),
        (VAULT, &[("vault.auth_mount", "a")], &[], "vault.auth_mount: set"),
        (
            VAULT,
            &[("vault.auth", "jwt"), ("vault.role", "r"), ("vault.jwt_file", "/j")],
            &[],
            "vault.token_file: set, but vault.auth = \"jwt\" ignores it",
        ),
    ];
    for (file, f, e, want) in cases {
        let err =
            load(file, f, e).err().unwrap_or_else(|| panic!("{file:?} {f:?} {e:?} should fail")).to_string();
        assert!(err.contains(want), "{err:?} should mention {want:?}");
    }
}

#[test]
fn loopback_http_is_fine_and_the_max_plaintext_bound_is_tight() {
    assert!(load(VAULT, &[("vault.addresses", "http://127.0.0.1:8200,http://localhost:8200")], &[]).is_ok());
    assert!(
        load(
            VAULT,
            &[("vault.addresses", "http://10.0.0.1:8200"), ("vault.insecure_allow_http", "true")],
            &[]
        )
        .is_ok()
    );
    let largest =
        (1..1024).rev().find(|n| ciphertext::versioned_len(ciphertext::VAULT_TAG, *n) <= 1024).unwrap();
    assert!(load(VAULT, &[("plugin.max_plaintext_bytes", &largest.to_string())], &[]).is_ok());
    assert!(load(VAULT, &[("plugin.max_plaintext_bytes", &(largest + 1).to_string())], &[]).is_err());
}

#[test]
fn every_setting_has_an_env_name_and_reaches_the_schema() {
    for Setting { name, kind, .. } in SETTINGS {
        let value = match kind {
            Kind::Bool => "false",
            Kind::Int => "2",
            Kind::List => "https://a",
            Kind::Str => "x",
        };
        let var = env_name(name);
        let err = Config::load(None, &[], &env(&[(var.as_str(), value)])).err().map(|e| e.to_string());
        // Values may be invalid for the field, but the key itself must be known to the schema.
        if let Some(err) = err {
            assert!(
                !err.contains("unknown field")
                    && !err.contains("unknown setting")
                    && !err.contains("kmsgate bug"),
                "{name}: {err}"
            );
        }
    }
}

#[test]
fn the_readme_reference_is_the_settings_table() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let begin = "<!-- settings:begin (generated from src/config/settings.rs SETTINGS) -->\n";
    let start = readme.find(begin).expect("README has the settings:begin marker") + begin.len();
    let end =
        start + readme[start..].find("<!-- settings:end -->").expect("README has the settings:end marker");
    if std::env::var_os("KMSGATE_UPDATE_README").is_some() {
        std::fs::write("README.md", format!("{}{}{}", &readme[..start], reference(), &readme[end..]))
            .unwrap();
    }
    assert_eq!(
        readme[start..end],
        reference(),
        "regenerate with: KMSGATE_UPDATE_README=1 cargo test --lib config"
    );
}

#[test]
fn a_config_file_that_never_ends_is_refused_by_name() {
    // NB: /dev/zero never ends; an unbounded read would exhaust memory instead of failing.
    let err = Config::load(Some(Path::new("/dev/zero")), &[], &env(&[])).unwrap_err().to_string();
    assert!(err.contains("/dev/zero") && err.contains("larger than"), "{err}");
}

#[test]
fn the_signer_section_has_its_own_socket_port_and_a_derived_publish_lead() {
    let c = Config::load(None, &[], &env(&[])).unwrap();
    let s = &c.signer;
    assert_eq!(s.socket.spec, SocketSpec::Path("/run/kmsgate/signer.sock".into()));
    assert_eq!(s.socket.section, "signer");
    assert_eq!(s.http_listen, Some("127.0.0.1:8789".parse().unwrap()));
    assert_ne!(s.http_listen, c.http_listen, "the plugin holds 8787");
    assert_eq!(s.max_token_expiration, Duration::from_secs(24 * 3600));
    assert_eq!(s.refresh_hint, Duration::from_secs(60));
    // 2 x 30s poll + 60s refresh hint + 1m margin.
    assert_eq!(s.publish_lead, Duration::from_secs(180));
    assert!(matches!(s.backend, SignerBackend::Local { .. }));
    let c = load(
        VAULT,
        &[("signer.verify_keys", "/etc/sa.pub,excluded:/etc/legacy.pub"), ("signer.key_type", "rsa-3072")],
        &[],
    )
    .unwrap();
    assert_eq!(
        c.signer.backend,
        SignerBackend::Vault { key: "kmsgate-signer".into(), key_type: crate::jwt::KeyType::Rsa3072 }
    );
    assert_eq!(
        c.signer.verify_keys,
        vec![
            VerifyKeyFile { path: "/etc/sa.pub".into(), exclude_from_oidc_discovery: false },
            VerifyKeyFile { path: "/etc/legacy.pub".into(), exclude_from_oidc_discovery: true },
        ]
    );
}

#[test]
fn bad_signer_settings_are_refused_by_name() {
    type Pairs<'a> = &'a [(&'a str, &'a str)];
    let cases: &[(&str, Pairs<'_>, &str)] = &[
        ("format = 1\n", &[("signer.max_token_expiration", "599s")], "signer.max_token_expiration"),
        ("format = 1\n", &[("signer.backend", "vault")], "backend.kind = vault"),
        (VAULT, &[("signer.key_type", "ed25519")], "ed25519"),
        ("format = 1\n", &[("signer.backend", "hsm")], "signer.backend"),
        ("format = 1\n", &[("signer.verify_keys", "sa.pub")], "signer.verify_keys"),
        ("format = 1\n", &[("signer.socket", "@s")], "signer.allow_abstract_socket"),
        ("format = 1\n", &[("signer.socket_mode", "0666")], "access to Sign"),
        ("format = 1\n", &[("signer.refresh_hint_seconds", "0")], "signer.refresh_hint_seconds"),
        // 30s poll + 60s refresh hint = 90s.
        (
            "format = 1\n",
            &[("signer.publish_lead", "89s")],
            "signer.poll_interval + signer.refresh_hint_seconds",
        ),
        (
            "format = 1\n",
            &[("signer.socket", "@s"), ("signer.allow_abstract_socket", "true")],
            "refuses them",
        ),
    ];
    for (file, f, needle) in cases {
        let err = load(file, f, &[]).unwrap_err().to_string();
        assert!(err.contains(needle), "{f:?}: {err}");
    }
    assert!(load("format = 1\n", &[("signer.max_token_expiration", "600s")], &[]).is_ok());
    assert!(load("format = 1\n", &[("signer.publish_lead", "90s")], &[]).is_ok());
}
