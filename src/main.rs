//! The kmsgate command line: parse, set up logging and the runtime, dispatch.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use kmsgate::{
    build_info::BuildInfo,
    commands,
    config::{self, Config, ProcessEnv, SocketSpec},
    selftest, telemetry,
};

/// Kubernetes KMS v2 plugin backed by Vault/OpenBao Transit (or a local keyring for first runs).
#[derive(Parser)]
#[command(name = "kmsgate", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the KMS v2 gRPC API on a unix socket for kube-apiserver.
    Plugin(ConfigArgs),
    /// Serve the ExternalJWTSigner gRPC API (v1 and v1alpha1) on a unix socket for kube-apiserver.
    Signer(SignerCommand),
    /// Drive a running plugin as kube-apiserver does and check every answer.
    Selftest {
        /// The plugin's config (its plugin.socket), or --socket /path, unix:///path or @name.
        #[command(flatten)]
        config: ConfigArgs,
        /// KMS provider name written into the stored test value's prefix.
        #[arg(long, default_value = "kmsgate")]
        provider: String,
        /// Per-call deadline, as the API server's provider `timeout`.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// How long to wait for Status to say ok before failing.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// Report how every object in etcd is encrypted (read-only).
    Audit(AuditArgs),
    /// Manage the local keyring (NOT FOR PRODUCTION).
    Keyring {
        #[command(subcommand)]
        action: KeyringAction,
    },
    /// Run the rotation controller (leader-elected; follows a RotationPolicy).
    Controller(ConfigArgs),
    /// Rotate the Transit key now: asks the running controller, or runs the loop here.
    Rotate(RotateArgs),
    /// Rewrite objects so the API server re-encrypts them with the current key.
    Reencrypt(ReencryptArgs),
    /// Raise the Transit key's min_decryption_version after a clean audit of every value.
    Retire {
        #[command(flatten)]
        config: ConfigArgs,
        /// The oldest key version that stays readable.
        #[arg(long)]
        to_version: u64,
        /// Skip the audit; needs --reason, which is logged.
        #[arg(long, requires = "reason")]
        force: bool,
        /// Why the audit is skipped.
        #[arg(long)]
        reason: Option<String>,
        /// KMS provider name in the EncryptionConfiguration.
        #[arg(long, default_value = "kmsgate")]
        provider: String,
        /// The API server's --etcd-prefix.
        #[arg(long, default_value = "/registry")]
        etcd_prefix: String,
    },
    /// Verify a rotation from etcd and report into the policy status (the verify Job runs this).
    Verify {
        /// RotationPolicy name.
        #[arg(long)]
        policy: String,
        /// The run being verified.
        #[arg(long)]
        run_id: String,
        /// The verify round.
        #[arg(long, default_value = "1")]
        round: u32,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Rotate service-account tokens: legacy token Secrets and managed bound tokens.
    Tokens {
        #[command(subcommand)]
        action: TokensAction,
    },
    /// Print the CustomResourceDefinitions (RotationPolicy, TokenPolicy, SigningKeyPolicy).
    Crd,
    /// Print the version, git commit, rustc and crypto and TLS crate versions (as --version).
    Version,
    /// Print the EncryptionConfiguration that points kube-apiserver at this plugin.
    EncryptionConfig {
        #[command(flatten)]
        config: ConfigArgs,
        /// KMS provider name; it is part of every stored value and can never change.
        #[arg(long, default_value = "kmsgate")]
        name: String,
        /// Per-call timeout the API server uses.
        #[arg(long, default_value = "3s")]
        timeout: String,
        /// Resources to encrypt.
        #[arg(long, value_delimiter = ',', default_value = "secrets")]
        resources: Vec<String>,
    },
}

#[derive(Subcommand)]
enum TokensAction {
    /// List legacy token Secrets (with what a rotation would do) and managed tokens.
    List(TokensArgs),
    /// Rotate the legacy token Secrets that are due and issue the managed tokens that are due.
    Rotate {
        #[command(flatten)]
        args: TokensArgs,
        /// Say what would be rotated and why; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// How a rotation runs: through a running controller, or the loop here.
#[derive(Args)]
struct RotateArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// With a running controller: follow its progress until the run ends.
    #[arg(long)]
    wait: bool,
    /// Show what would happen; change nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args)]
struct TokensArgs {
    /// The TokenPolicy whose rules apply (and where interrupted rotations are recorded).
    #[arg(long, default_value = kmsgate::crd::tokens::DEFAULT_POLICY)]
    policy: String,
    /// Rotate legacy token Secrets older than this (overrides the policy's maxAge), like 720h.
    #[arg(long)]
    older_than: Option<String>,
    /// Only these namespaces (repeatable; overrides the policy).
    #[arg(long)]
    namespace: Vec<String>,
    /// Only Secrets matching this label selector (overrides the policy).
    #[arg(long)]
    selector: Option<String>,
    /// kmsgate's own ServiceAccount, never issued a managed token.
    #[arg(long, default_value = "kmsgate/kmsgate-controller")]
    service_account: String,
}

#[derive(Args)]
struct EtcdArgs {
    /// etcd client URLs.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    endpoints: Vec<String>,
    /// PEM CA bundle of the etcd server.
    #[arg(long)]
    cacert: Option<PathBuf>,
    /// PEM client certificate.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// PEM client key.
    #[arg(long)]
    key: Option<PathBuf>,
    /// etcd user (use one whose role can only read the prefix).
    #[arg(long)]
    user: Option<String>,
    /// File holding the etcd user's password.
    #[arg(long)]
    password_file: Option<PathBuf>,
}

impl EtcdArgs {
    fn settings(self) -> kmsgate::config::EtcdConfig {
        kmsgate::config::EtcdConfig {
            endpoints: self.endpoints,
            ca: self.cacert,
            cert: self.cert,
            key: self.key,
            user: self.user,
            password_file: self.password_file,
        }
    }
}

#[derive(Args)]
struct AuditArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// The API server's --etcd-prefix.
    #[arg(long, default_value = "/registry")]
    prefix: String,
    /// Resources to scan (ignored with --all or --provider).
    #[arg(long, value_delimiter = ',', default_value = "secrets")]
    resources: Vec<String>,
    /// Scan every resource under the prefix.
    #[arg(long)]
    all: bool,
    /// Only values of this KMS v2 provider, whatever the resource (scans the whole prefix).
    #[arg(long)]
    provider: Option<String>,
    /// The key_id objects should be on (default: the plugin's, with --plugin-socket).
    #[arg(long)]
    key_id: Option<String>,
    /// A plugin's socket: its Status gives the current key_id, its Decrypt serves --deep.
    #[arg(long)]
    plugin_socket: Option<String>,
    /// Decrypt every KMS v2 object end to end (needs --plugin-socket).
    #[arg(long)]
    deep: bool,
    /// text or json (JSON lines: findings, then a summary).
    #[arg(long, default_value = "text")]
    output: String,
    /// Findings that make the exit code 1; `none` for a report-only run.
    #[arg(long, value_delimiter = ',', default_value = "plaintext,stale,undecryptable,unknown")]
    fail_on: Vec<String>,
    /// Values in the first etcd request; later ones are sized to --page-mib from the values read.
    #[arg(long, default_value = "5000")]
    page_size: usize,
    /// MiB per etcd response after the first (memory: about twice this); 0: --page-size values each.
    #[arg(long, default_value = "32", value_parser = clap::value_parser!(u16).range(0..=128))]
    page_mib: u16,
}

#[derive(Args)]
struct ReencryptArgs {
    /// Resources: secrets, deployments.apps, ...
    #[arg(long, value_delimiter = ',', default_value = "secrets")]
    resources: Vec<String>,
    /// Only these namespaces (repeatable or comma-separated; default all).
    #[arg(long, value_delimiter = ',')]
    namespace: Vec<String>,
    /// Label selector.
    #[arg(long)]
    selector: Option<String>,
    /// Most writes per second.
    #[arg(long, default_value = "20")]
    qps: f64,
    /// Writes in flight.
    #[arg(long, default_value = "4")]
    concurrency: usize,
    /// Objects per list page.
    #[arg(long, default_value = "500")]
    page_size: u32,
    /// Attempts per object on 429/5xx/timeouts.
    #[arg(long, default_value = "5")]
    max_attempts: u32,
    /// List and count; write nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Subcommand)]
enum KeyringAction {
    /// Create a keyring with one key version (mode 0600); never overwrites.
    Init {
        /// The keyring's identity in key_ids (default: local-<random>).
        #[arg(long)]
        identity: Option<String>,
        /// The key name in key_ids.
        #[arg(long, default_value = "kmsgate")]
        key: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Add a new key version.
    Rotate(ConfigArgs),
    /// List versions and their key_ids (never key material).
    List(ConfigArgs),
}

/// The flags every command that reads the config file takes: the file, `--set` overrides, and
/// shorthands for the settings of one section `S` (the plugin's or the signer's).
#[derive(Args)]
struct ConfigArgs<S: Section = PluginSection> {
    /// TOML config file.
    #[arg(long, env = "KMSGATE_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = config::parse_set_flag, help = S::set_help())]
    set: Vec<(String, String)>,
    #[arg(long, help = shorthand_help(S::SOCKET, "PATH"))]
    socket: Option<String>,
    #[arg(long, help = shorthand_help(S::BACKEND, "KIND (local or vault)"))]
    backend: Option<String>,
    #[arg(long, help = shorthand_help(S::KEYRING, "PATH"))]
    keyring: Option<PathBuf>,
    #[arg(skip)]
    section: std::marker::PhantomData<S>,
}

/// The settings a [`ConfigArgs`] shorthand stands for, by section.
trait Section: Send + Sync + 'static {
    /// The setting `--socket` sets.
    const SOCKET: &'static str;
    /// The setting `--backend` sets.
    const BACKEND: &'static str;
    /// The setting `--keyring` sets.
    const KEYRING: &'static str;
    /// A setting `--set` commonly overrides, for its help.
    const SET_EXAMPLE: &'static str;

    /// The help of `--set`.
    fn set_help() -> String {
        format!("Override a setting: --set {} (repeatable; beats env and file)", Self::SET_EXAMPLE)
    }
}

/// `kmsgate plugin` and the commands that share its settings.
struct PluginSection;

impl Section for PluginSection {
    const SOCKET: &'static str = "plugin.socket";
    const BACKEND: &'static str = "backend.kind";
    const KEYRING: &'static str = "local.keyring";
    const SET_EXAMPLE: &'static str = "plugin.socket=/run/kms.sock";
}

/// `kmsgate signer` and its keyring commands.
struct SignerSection;

impl Section for SignerSection {
    const SOCKET: &'static str = "signer.socket";
    const BACKEND: &'static str = "signer.backend";
    const KEYRING: &'static str = "signer.keyring";
    const SET_EXAMPLE: &'static str = "signer.poll_interval=10s";
}

/// The help of a shorthand flag for `setting`.
fn shorthand_help(setting: &str, value: &str) -> String {
    format!("Same as --set {setting}={value}")
}

/// The signer's config flags.
type SignerArgs = ConfigArgs<SignerSection>;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct SignerCommand {
    #[command(flatten)]
    args: SignerArgs,
    #[command(subcommand)]
    action: Option<SignerAction>,
}

#[derive(Subcommand)]
enum SignerAction {
    /// Rotate the signing key now (the SigningKeyPolicy named by controller.signing_policy): asks
    /// the running controller, or runs the loop here until the old key is retired.
    Rotate(RotateArgs),
    /// Manage the signer's local ES256 keyring (signer.backend = local; NOT FOR PRODUCTION).
    Keyring {
        #[command(subcommand)]
        action: SignerKeyringAction,
    },
    /// Write the key store's public keys (min_decryption_version to latest) as a
    /// --service-account-key-file for API servers not (or no longer) using the signer.
    ExportPublicKeys {
        /// Write here (atomically, mode 0644) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Append the keys of signer.verify_keys (the old sa.pub) too.
        #[arg(long)]
        include_verify_keys: bool,
        #[command(flatten)]
        config: SignerArgs,
    },
}

#[derive(Subcommand)]
enum SignerKeyringAction {
    /// Create a signing keyring with one version (mode 0600); never overwrites.
    Init {
        /// The keyring's identity (default: local-<random>).
        #[arg(long)]
        identity: Option<String>,
        /// The key name.
        #[arg(long, default_value = kmsgate::keyring::DEFAULT_SIGNING_KEY)]
        key: String,
        #[command(flatten)]
        config: SignerArgs,
    },
    /// Add a new version; a running signer publishes it and signs with it after publish_lead.
    Rotate(SignerArgs),
    /// List versions, their kids and the floors (never key material).
    List(SignerArgs),
    /// Set min_decryption_version (retire kids) or min_encryption_version (pin the signing version).
    Floors {
        /// Versions below this leave FetchKeys (0 means 1).
        #[arg(long)]
        min_decryption_version: Option<u64>,
        /// Sign with exactly this version, at once (0 unpins); read README.md before pinning.
        #[arg(long)]
        min_encryption_version: Option<u64>,
        #[command(flatten)]
        config: SignerArgs,
    },
}

impl<S: Section> ConfigArgs<S> {
    /// Loads the config, starts logging as it says, and logs what loading noticed.
    fn start(self, role: config::Role) -> Result<Config, config::ConfigError> {
        let config = self.load_as(role)?;
        telemetry::init(&config.log.level, config.log.json);
        for line in &config.notices.info {
            tracing::info!("{line}");
        }
        for line in &config.notices.warnings {
            tracing::warn!("{line}");
        }
        Ok(config)
    }

    fn load_as(self, role: config::Role) -> Result<Config, config::ConfigError> {
        let mut flags = Vec::new();
        let shorthands = [
            (S::SOCKET, self.socket),
            (S::BACKEND, self.backend),
            (S::KEYRING, self.keyring.map(|p| p.display().to_string())),
        ];
        for (name, value) in shorthands {
            if let Some(value) = value {
                flags.push((name.to_owned(), value));
            }
        }
        // NB: --set comes last so it wins over the shorthands.
        flags.extend(self.set);
        Config::load_as(role, self.config.as_deref(), &flags, &ProcessEnv)
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit: the API server may hold many connections,
/// and a low soft limit (1024 is common) turns a burst into refused accepts. A failure leaves
/// the limit as it was, which is no worse than not trying.
fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let _ = setrlimit(Resource::Nofile, rustix::process::Rlimit { current: limit.maximum, ..limit });
    }
}

fn main() -> ExitCode {
    // NB: --version prints the same text as `kmsgate version`; -V stays the short one.
    let matches = Cli::command().long_version(BuildInfo::long_version()).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    raise_fd_limit();
    // NB: ring is the only TLS provider in this binary; install it before any client is built.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("kmsgate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli.command));
    // NB: each fatal error is printed once, here, and not logged as well: the log is stderr too.
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Findings) => ExitCode::FAILURE,
        Err(Failure::Usage(message)) => {
            eprintln!("kmsgate: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Run(message)) => {
            eprintln!("kmsgate: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The log filter of the one-shot Kubernetes commands. NB: kube's client logs every failed request
/// at ERROR; the command reports the failure itself, once, so that line would say it twice.
const ONE_SHOT_LOG: &str = "warn,kube_client::client::builder=off";

/// How a command ended, by the one exit-code rule of every command: 0 done and clean; 1 ran and
/// found problems or had failed writes; 2 could not run (bad flags or config, no kubeconfig,
/// etcd, the API server, Vault or the plugin unreachable).
enum Failure {
    /// Exit 1 without a message: the command ran and found what it reports.
    Findings,
    /// Exit 2: the command could not run.
    Usage(String),
    /// Exit 1: the command ran and failed.
    Run(String),
}

impl From<commands::CommandError> for Failure {
    fn from(e: commands::CommandError) -> Self {
        // NB: the whole chain: a cause kept only in a source (an I/O error) is said too.
        let message = kmsgate::error::chain(&e);
        if e.could_not_run() { Self::Usage(message) } else { Self::Run(message) }
    }
}

async fn audit(args: AuditArgs) -> Result<(), Failure> {
    let json = match args.output.as_str() {
        "text" => false,
        "json" => true,
        other => return Err(Failure::Usage(format!("--output {other:?} must be text or json"))),
    };
    // NB: `none` alone is a report-only run: findings are listed, the exit code stays 0.
    let fail_on = match args.fail_on.as_slice() {
        [none] if none == "none" => Vec::new(),
        names => names
            .iter()
            .map(|n| {
                kmsgate::audit::Finding::parse(n).ok_or_else(|| {
                    Failure::Usage(format!(
                        "--fail-on: unknown finding {n:?}; use plaintext, stale, undecryptable, unknown, or none alone"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    if let Some(key_id) = &args.key_id {
        kmsgate::storage::validate_key_id(key_id).map_err(|e| Failure::Usage(format!("--key-id: {e}")))?;
        if key_id.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Failure::Usage(format!(
                "--key-id {key_id:?} contains spaces or control characters; copy the key_id exactly"
            )));
        }
    }
    let base = format!("{}/", args.prefix.trim_end_matches('/'));
    let prefixes = if args.all || args.provider.is_some() {
        vec![base]
    } else {
        args.resources.iter().map(|r| format!("{base}{}/", r.trim_matches('/'))).collect()
    };
    let plugin_socket = match args.plugin_socket.as_deref().map(SocketSpec::parse).transpose() {
        Ok(socket) => socket,
        Err(e) => return Err(Failure::Usage(format!("--plugin-socket: {e}"))),
    };
    let etcd = args.etcd.settings();
    let options = kmsgate::audit::Options {
        prefixes,
        provider: args.provider,
        current_key_id: args.key_id,
        page_size: args.page_size,
        page_bytes: usize::from(args.page_mib) * 1024 * 1024,
        json,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    // NB: an audit that could not run or finish exits 2, never 0 or 1.
    match commands::audit(&etcd, &options, plugin_socket, args.deep, &fail_on).await {
        Ok(commands::AuditVerdict::Clean) => Ok(()),
        Ok(commands::AuditVerdict::Findings) => Err(Failure::Findings),
        Err(e) => Err(e.into()),
    }
}

/// Exit codes: 0 every object written, 1 some writes failed, 2 could not run.
async fn reencrypt(args: ReencryptArgs) -> Result<(), Failure> {
    telemetry::init(ONE_SHOT_LOG, false);
    let resources = args
        .resources
        .iter()
        .map(|r| kmsgate::crd::rotation::ResourceRef::parse(r))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure::Usage(format!("--resources: {e}")))?;
    // NB: the same limits as a RotationPolicy's spec.migrate.
    let mut settings = kmsgate::crd::rotation::MigrateSettings::new(
        args.qps,
        args.concurrency,
        args.page_size,
        args.max_attempts,
    )
    .map_err(|e| Failure::Usage(e.to_string()))?;
    settings.selector = args.selector;
    settings.dry_run = args.dry_run;
    let options = commands::rotation::Reencrypt {
        resources,
        namespaces: args.namespace,
        settings,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let kube = kmsgate::k8s::Kube::infer().await.map_err(|e| Failure::Usage(e.to_string()))?;
    match commands::rotation::reencrypt(&kube, &options, &mut std::io::stdout()).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(Failure::Findings),
        Err(e) => Err(e.into()),
    }
}

async fn tokens(action: TokensAction) -> Result<(), Failure> {
    telemetry::init(ONE_SHOT_LOG, false);
    let (args, dry_run, rotate) = match action {
        TokensAction::List(args) => (args, true, false),
        TokensAction::Rotate { args, dry_run } => (args, dry_run, true),
    };
    let older_than = args
        .older_than
        .as_deref()
        .map(commands::tokens::older_than)
        .transpose()
        .map_err(|e| Failure::Usage(e.to_string()))?;
    if args.service_account.split_once('/').is_none_or(|(ns, sa)| ns.is_empty() || sa.is_empty()) {
        return Err(Failure::Usage("--service-account must be namespace/name".into()));
    }
    let options = commands::tokens::Options {
        policy: args.policy,
        older_than,
        namespaces: args.namespace,
        selector: args.selector,
        service_account: args.service_account,
        dry_run,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let kube = kmsgate::k8s::Kube::infer().await.map_err(|e| Failure::Usage(e.to_string()))?;
    let mut out = std::io::stdout();
    let clock = std::sync::Arc::new(kmsgate::tokens::SystemClock);
    if !rotate {
        return commands::tokens::list(&kube, &options, clock, &mut out).await.map_err(Failure::from);
    }
    match commands::tokens::rotate(&kube, &options, clock, &mut out).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(Failure::Findings),
        Err(e) => Err(e.into()),
    }
}

/// Why a `kmsgate signer keyring` command failed: its settings, or the command itself.
enum SignerKeyringFailure {
    Config(config::ConfigError),
    Command(commands::CommandError),
}

/// `kmsgate signer keyring ...`: the signer's local keyring, found through `signer.keyring`.
fn signer_keyring(action: SignerKeyringAction) -> Result<(), SignerKeyringFailure> {
    let load = |args: SignerArgs| args.start(config::Role::Plugin).map_err(SignerKeyringFailure::Config);
    let path = |config: &Config| commands::signer_keyring_path(config).map(Path::to_path_buf);
    let result = match action {
        SignerKeyringAction::Init { identity, key, config } => {
            let config = load(config)?;
            path(&config).and_then(|p| commands::signer_keyring_init(&p, identity.as_deref(), &key))
        }
        SignerKeyringAction::Rotate(config) => {
            path(&load(config)?).and_then(|p| commands::signer_keyring_rotate(&p))
        }
        SignerKeyringAction::List(config) => {
            path(&load(config)?).and_then(|p| commands::signer_keyring_list(&p))
        }
        SignerKeyringAction::Floors { min_decryption_version, min_encryption_version, config } => {
            let floors = kmsgate::keyring::Floors { min_decryption_version, min_encryption_version };
            path(&load(config)?).and_then(|p| commands::signer_keyring_floors(&p, floors))
        }
    };
    result.map_err(SignerKeyringFailure::Command)
}

async fn dispatch(command: Command) -> Result<(), Failure> {
    let run = Failure::from;
    let usage = |e: config::ConfigError| Failure::Usage(e.to_string());
    match command {
        Command::Signer(SignerCommand { args, action: None }) => {
            let config = args.start(config::Role::Plugin).map_err(usage)?;
            commands::signer(config).await.map_err(run)
        }
        Command::Signer(SignerCommand {
            action: Some(SignerAction::Rotate(RotateArgs { config, wait, dry_run })),
            ..
        }) => {
            let config = config.start(config::Role::Controller).map_err(usage)?;
            commands::signing::rotate(config, wait, dry_run).await.map_err(run)
        }
        Command::Signer(SignerCommand {
            action: Some(SignerAction::ExportPublicKeys { out, include_verify_keys, config }),
            ..
        }) => {
            let config = config.start(config::Role::Plugin).map_err(usage)?;
            let exported =
                commands::signer_keys::export_public_keys(&config, out.as_deref(), include_verify_keys)
                    .await
                    .map_err(run)?;
            // NB: stderr, so stdout holds the key file alone.
            let target = out.as_deref().map_or("stdout".into(), |p| p.display().to_string());
            eprintln!("exported {} public key(s) to {target}:", exported.keys.len());
            for (version, kid) in exported.keys {
                let from = version.map_or("signer.verify_keys".into(), |v| format!("version {v}"));
                eprintln!("  {kid}  {from}");
            }
            Ok(())
        }
        Command::Signer(SignerCommand { action: Some(SignerAction::Keyring { action }), .. }) => {
            signer_keyring(action).map_err(|e| match e {
                SignerKeyringFailure::Config(e) => usage(e),
                SignerKeyringFailure::Command(e) => run(e),
            })
        }
        Command::Plugin(args) => {
            let config = args.start(config::Role::Plugin).map_err(usage)?;
            commands::plugin(config).await.map_err(run)
        }
        Command::Selftest { mut config, provider, timeout, wait } => {
            // NB: --socket names the socket as given (an @name too); otherwise the plugin's own
            // config says where it listens.
            let socket = match config.socket.take() {
                Some(socket) => {
                    SocketSpec::parse(&socket).map_err(|e| Failure::Usage(format!("--socket: {e}")))?
                }
                None => config.start(config::Role::Plugin).map_err(usage)?.plugin.socket.spec,
            };
            commands::selftest(selftest::Options { socket, provider, timeout, wait }).await.map_err(run)
        }
        Command::Audit(args) => audit(args).await,
        Command::Controller(args) => {
            let config = args.start(config::Role::Controller).map_err(usage)?;
            commands::rotation::controller(config).await.map_err(run)
        }
        Command::Rotate(RotateArgs { config, wait, dry_run }) => {
            let config = config.start(config::Role::Controller).map_err(usage)?;
            commands::rotation::rotate(config, wait, dry_run).await.map_err(run)
        }
        Command::Reencrypt(args) => reencrypt(args).await,
        Command::Retire { config, to_version, force, reason, provider, etcd_prefix } => {
            let config = config.start(config::Role::Controller).map_err(usage)?;
            let reason = reason.filter(|r| !r.trim().is_empty());
            if force && reason.is_none() {
                return Err(Failure::Usage("--force needs a non-empty --reason".into()));
            }
            let force = if force { reason.as_deref() } else { None };
            commands::rotation::retire(&config, to_version, &provider, &etcd_prefix, force).await.map_err(run)
        }
        Command::Verify { policy, run_id, round, etcd } => {
            telemetry::init("info,kube_client::client::builder=off", false);
            match commands::rotation::verify(&policy, &run_id, round, &etcd.settings()).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(Failure::Findings),
                Err(e) => Err(e.into()),
            }
        }
        Command::Tokens { action } => tokens(action).await,
        Command::Version => {
            println!("kmsgate {}", BuildInfo::long_version());
            Ok(())
        }
        Command::Crd => {
            let render = |e: serde_saphyr::ser::Error| Failure::Run(format!("render CRD: {e}"));
            use kmsgate::crd::{
                policy::crd_yaml, rotation::RotationPolicySpec, signing::SigningKeyPolicySpec,
                tokens::TokenPolicySpec,
            };
            let rotation = crd_yaml::<RotationPolicySpec>().map_err(render)?;
            let tokens = crd_yaml::<TokenPolicySpec>().map_err(render)?;
            let signing = crd_yaml::<SigningKeyPolicySpec>().map_err(render)?;
            print!("{rotation}---\n{tokens}---\n{signing}");
            Ok(())
        }
        Command::Keyring { action } => {
            let (config, init) = match action {
                KeyringAction::Init { identity, key, config } => (config, Some((identity, key))),
                KeyringAction::Rotate(config) => (config, None),
                KeyringAction::List(config) => {
                    let config = config.start(config::Role::Plugin).map_err(usage)?;
                    let path = commands::keyring_path(&config).map_err(run)?;
                    return commands::keyring_list(path).map_err(run);
                }
            };
            let config = config.start(config::Role::Plugin).map_err(usage)?;
            let path = commands::keyring_path(&config).map_err(run)?;
            match init {
                Some((identity, key)) => commands::keyring_init(path, identity.as_deref(), &key),
                None => commands::keyring_rotate(path),
            }
            .map_err(run)
        }
        Command::EncryptionConfig { config, name, timeout, resources } => {
            let config = config.start(config::Role::Plugin).map_err(usage)?;
            if name.is_empty() || name.contains(':') {
                return Err(Failure::Usage("--name must be non-empty and contain no ':'".into()));
            }
            humantime::parse_duration(&timeout)
                .map_err(|e| Failure::Usage(format!("--timeout {timeout:?}: {e}")))?;
            let yaml = commands::encryption_config(&config, &name, &timeout, &resources).map_err(run)?;
            print!("{yaml}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The long help of `kmsgate <path…>`.
    fn help(path: &[&str]) -> String {
        let mut command = Cli::command();
        for name in path {
            command = command.find_subcommand(name).unwrap().clone();
        }
        command.render_long_help().to_string()
    }

    #[test]
    fn each_command_names_its_own_section_in_the_shorthand_help() {
        for path in [&["plugin"][..], &["rotate"], &["keyring", "list"]] {
            let text = help(path);
            for line in [
                "Override a setting: --set plugin.socket=/run/kms.sock",
                "Same as --set plugin.socket=PATH",
                "Same as --set backend.kind=KIND (local or vault)",
                "Same as --set local.keyring=PATH",
            ] {
                assert!(text.contains(line), "{path:?} lacks {line:?}:\n{text}");
            }
            assert!(!text.contains("signer."), "{path:?}:\n{text}");
        }
        for path in [&["signer"][..], &["signer", "keyring", "floors"]] {
            let text = help(path);
            for line in [
                "Override a setting: --set signer.poll_interval=10s",
                "Same as --set signer.socket=PATH",
                "Same as --set signer.backend=KIND (local or vault)",
                "Same as --set signer.keyring=PATH",
            ] {
                assert!(text.contains(line), "{path:?} lacks {line:?}:\n{text}");
            }
            assert!(!text.contains("plugin.socket") && !text.contains("local.keyring"), "{path:?}:\n{text}");
        }
    }

    #[test]
    fn the_shorthands_set_their_sections_settings_and_set_wins() {
        let plugin =
            Cli::try_parse_from(["kmsgate", "plugin", "--socket", "/a.sock", "--backend", "local"]).unwrap();
        let Command::Plugin(args) = plugin.command else { panic!("not plugin") };
        let config = args.load_as(config::Role::Plugin).unwrap();
        assert_eq!(config.plugin.socket.spec, SocketSpec::Path("/a.sock".into()));
        let signer = Cli::try_parse_from([
            "kmsgate",
            "signer",
            "--socket",
            "/s.sock",
            "--set",
            "signer.socket=/t.sock",
            "--backend",
            "local",
        ])
        .unwrap();
        let Command::Signer(SignerCommand { args, action: None }) = signer.command else {
            panic!("not signer")
        };
        let config = args.load_as(config::Role::Plugin).unwrap();
        assert_eq!(config.signer.socket.spec, SocketSpec::Path("/t.sock".into()));
    }
}
