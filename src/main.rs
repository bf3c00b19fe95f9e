//! `iam-key-operator`: parse flags, build clients, run. Everything else lives in the library.
#![deny(warnings)]
#![deny(unsafe_code)] // one exception: configure_allocator

use std::{net::SocketAddr, sync::Arc, time::Duration};

use clap::{Parser, Subcommand};
use std::sync::atomic::{AtomicBool, Ordering};

use iam_key_operator::{
    controller::{self, Context, Settings},
    crd::{self, Duration as SpecDuration},
    iam::{Accounts, AwsIam, RateSettings},
    leader::{self, LeaderConfig},
    metrics::Metrics,
    server, telemetry,
};

#[derive(Parser)]
#[command(version, about = "Reconciles IamAccessKey resources into AWS IAM access keys and Secrets")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller.
    Run(Box<RunArgs>),
    /// Ask for a new key now: sets the `iam.keyop.dev/rotate-requested-at` annotation.
    Rotate {
        /// Namespace of the IamAccessKey.
        #[arg(short, long)]
        namespace: String,
        /// Name of the IamAccessKey.
        name: String,
    },
    /// Print the CustomResourceDefinitions as YAML (or write one file each into a directory).
    Crd {
        #[arg(long)]
        out_dir: Option<std::path::PathBuf>,
        /// Also write the chart's CRD template (the same CRDs behind `crds.enabled`/`crds.keep`).
        #[arg(long)]
        helm_template: Option<std::path::PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Name of this cluster in IAM ownership tags (`<cluster>/<namespace>/<name>`), required:
    /// give each cluster that manages keys of the same AWS account its own, or two clusters with
    /// the same namespace/name delete each other's keys.
    #[arg(long, env = "IKO_CLUSTER_NAME", value_parser = parse_cluster_name)]
    cluster_name: String,
    /// The cluster name this operator ran with before a rename: ownership tags written under it
    /// are rewritten to --cluster-name as each resource is reconciled (one GetUser per resource
    /// and resync while set). Remove it once every resource has reconciled.
    #[arg(long, env = "IKO_PREVIOUS_CLUSTER_NAME", value_parser = parse_cluster_name)]
    previous_cluster_name: Option<String>,
    /// Only reconcile resources in this namespace (repeatable; default: all namespaces).
    #[arg(long = "namespace", env = "IKO_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "IKO_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Who may read /metrics: `kubernetes` (a bearer token the API server authenticates, for a
    /// user allowed `get` on the non-resource URL /metrics; needs `create` on tokenreviews and
    /// subjectaccessreviews) or `none` (anyone who reaches the port). The probes stay open.
    #[arg(long, env = "IKO_METRICS_AUTH", value_enum, default_value = "none")]
    metrics_auth: server::MetricsAuth,
    /// How often each key's last use is read from IAM (e.g. 1h).
    #[arg(long, env = "IKO_LAST_USED_REFRESH", default_value = "1h")]
    last_used_refresh: SpecDuration,
    /// Longest time between two checks of a converged resource against IAM (drift detection).
    #[arg(long, env = "IKO_RESYNC", default_value = "1h")]
    resync: SpecDuration,
    /// How long a new key may take to authenticate before it is discarded.
    #[arg(long, env = "IKO_VERIFY_TIMEOUT", default_value = "60s")]
    verify_timeout: SpecDuration,
    /// A fixed rate of IAM/STS calls per second instead of the adaptive one (0: unlimited).
    /// Unset (the default), the rate adapts to IAM's answers between --iam-rate-min and
    /// --iam-rate-max.
    #[arg(long, env = "IKO_IAM_RATE")]
    iam_rate: Option<f64>,
    /// Ceiling of the adaptive rate (IAM/STS calls per second): raised towards it while IAM
    /// answers, cut when IAM throttles. The most this process ever takes of the account's quota.
    #[arg(long, env = "IKO_IAM_RATE_MAX", default_value_t = 50.0, value_parser = parse_rate)]
    iam_rate_max: f64,
    /// Floor of the adaptive rate (IAM/STS calls per second): however much IAM throttles, the
    /// operator keeps making progress at this rate.
    #[arg(long, env = "IKO_IAM_RATE_MIN", default_value_t = 1.0, value_parser = parse_rate)]
    iam_rate_min: f64,
    /// IAM/STS calls allowed at once before the rate applies (adaptive: at most half a second of
    /// the current rate).
    #[arg(long, env = "IKO_IAM_BURST", default_value_t = 20)]
    iam_burst: u32,
    /// Only IAM users under this IAM path are managed; others get NotAuthorized before any IAM
    /// write. Keep it equal to the path the operator's IAM policy allows (e.g. /k8s/).
    #[arg(long, env = "IKO_IAM_USER_PATH_PREFIX", default_value = "/")]
    iam_user_path_prefix: String,
    /// Resources reconciled at the same time, not counting those waiting for a new key to
    /// authenticate (they hold no slot).
    #[arg(long, env = "IKO_CONCURRENCY", default_value_t = 8)]
    concurrency: u16,
    /// Only reconcile IamAccessKeys with these labels (e.g. `shard=a`): lets several instances
    /// split one cluster.
    #[arg(long, env = "IKO_SELECTOR")]
    selector: Option<String>,
    /// Run only while holding a Lease, so that replicas do not reconcile at the same time.
    #[arg(long, env = "IKO_LEADER_ELECT")]
    leader_elect: bool,
    /// Name of the Lease.
    #[arg(long, env = "IKO_LEASE_NAME", default_value = "iam-key-operator")]
    lease_name: String,
    /// Namespace of the Lease (default: the Pod's, from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// How long a Lease stays valid without renewal: the longest a failover takes.
    #[arg(long, env = "IKO_LEASE_DURATION", default_value = "15s")]
    lease_duration: SpecDuration,
    /// Log format.
    #[arg(long, env = "IKO_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: telemetry::LogFormat,
}

/// A rate of the adaptive limiter: calls per second, at least 0.1.
fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.1 => Ok(r),
        _ => Err(format!("{s:?}: give calls per second, at least 0.1")),
    }
}

/// Part of every ownership tag: letters, digits, `.`, `_`, `-`; at most 63 characters.
fn parse_cluster_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty() && s.len() <= 63 && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?}: use 1-63 letters, digits, '.', '_' or '-' (it becomes part of IAM tags)"))
    }
}

/// One allocator wherever the binary is built, so that what is measured on a glibc build holds
/// for the static musl binary the image ships (docs/decisions.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    configure_allocator();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(start())
}

/// `mi_option_arena_eager_commit` and `mi_option_purge_delay` in the mimalloc (v3) that
/// libmimalloc-sys 0.1.49 builds; its Rust bindings lack the constants.
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// On Linux mimalloc commits its arenas up front by default, and then keeps what a burst freed
/// resident: 60 MiB instead of 30 after converging 1,000 resources. Freed memory is also given
/// back at once rather than after a delay: the operator frees little, and rarely
/// (docs/decisions.md).
#[allow(unsafe_code)]
fn configure_allocator() {
    // SAFETY: sets allocator options, before the first arena exists (the Rust runtime has
    // allocated nothing yet; C code does not use this allocator).
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
    }
}

async fn start() -> Result<(), Box<dyn std::error::Error>> {
    match Cli::parse().command {
        Command::Crd { out_dir, helm_template } => {
            if let Some(path) = &helm_template {
                std::fs::write(path, crd::helm_template().map_err(|e| e.to_string())?)?;
            }
            match out_dir {
                Some(dir) => {
                    for def in crd::all_crds() {
                        let name = def.metadata.name.clone().unwrap_or_default();
                        std::fs::write(dir.join(format!("{name}.yaml")), serde_yaml::to_string(&def)?)?;
                    }
                }
                None if helm_template.is_none() => print!("{}", crd::crds_yaml()?),
                None => {}
            }
            Ok(())
        }
        Command::Run(args) => run(*args).await,
        Command::Rotate { namespace, name } => {
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
            let client = kube::Client::try_default().await?;
            let at = controller::request_rotation(client, &namespace, &name).await?;
            println!("iamaccesskey {namespace}/{name}: rotation requested at {at}");
            Ok(())
        }
    }
}

async fn run(args: RunArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.previous_cluster_name.as_ref() == Some(&args.cluster_name) {
        return Err("--previous-cluster-name must differ from --cluster-name".into());
    }
    telemetry::init(args.log_format);
    // kube and the AWS SDK share rustls; settle its crypto provider once, before either starts.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

    let metrics = Arc::new(Metrics::default());
    let client = kube::Client::try_default().await?;
    if args.iam_rate_min > args.iam_rate_max {
        return Err("--iam-rate-min must not exceed --iam-rate-max".into());
    }
    // Each AWS account gets a limiter of its own with these settings (IAM throttles per account).
    let rate = match args.iam_rate {
        Some(rate) => RateSettings::Fixed { rate, burst: args.iam_burst },
        None => RateSettings::Adaptive { min: args.iam_rate_min, max: args.iam_rate_max, burst: args.iam_burst },
    };
    let limiter = rate.limiter(None);
    tracing::info!(rate = limiter.rate(), fixed = args.iam_rate.is_some(), "IAM rate limit");
    let sdk_config = iam_key_operator::iam::sdk_config_from_env().await;
    let own = AwsIam::new(&sdk_config, metrics.clone(), limiter);
    let iam = Arc::new(Accounts::new(own, sdk_config, rate, &args.cluster_name));
    let settings = Settings {
        cluster_name: args.cluster_name,
        previous_cluster_name: args.previous_cluster_name,
        last_used_refresh: args.last_used_refresh.as_std().max(Duration::from_secs(1)),
        resync: args.resync.as_std().max(Duration::from_secs(1)),
        verify_timeout: args.verify_timeout.as_std(),
        namespaces: args.namespaces,
        selector: args.selector,
        iam_user_path_prefix: args.iam_user_path_prefix,
        concurrency: args.concurrency.max(1),
    };
    tracing::info!(cluster = %settings.cluster_name, namespaces = ?settings.namespaces, "starting iam-key-operator");
    let ctx = Arc::new(Context::new(client.clone(), iam, metrics.clone(), settings));
    let ready = Arc::new(AtomicBool::new(false));
    let gate = match args.metrics_auth {
        server::MetricsAuth::Kubernetes => Some(server::MetricsGate::new(server::KubeReviewer(client.clone()))),
        server::MetricsAuth::None => None,
    };
    let server = tokio::spawn(server::serve(args.metrics_addr, metrics, ready.clone(), gate));
    let leadership = if args.leader_elect {
        // A standby replica is ready: it serves its purpose by waiting.
        ready.store(true, Ordering::Relaxed);
        let identity = std::env::var("POD_NAME").unwrap_or_else(|_| format!("iam-key-operator-{}", std::process::id()));
        tracing::info!(lease = %args.lease_name, namespace = %args.lease_namespace, %identity, "waiting for the lease");
        let config = LeaderConfig {
            lease_name: args.lease_name,
            namespace: args.lease_namespace,
            identity,
            lease_duration: args.lease_duration.as_std(),
        };
        let held = leader::acquire(client, config).await?;
        tracing::info!("acquired the lease: reconciling");
        ready.store(false, Ordering::Relaxed);
        Some(held)
    } else {
        None
    };
    tokio::select! {
        () = controller::run(ctx, ready) => {}
        () = async { if let Some(l) = leadership { l.lost().await } else { std::future::pending().await } } => {
            // Another replica may be reconciling already: stop at once, let Kubernetes restart us.
            tracing::error!("lost the lease: exiting");
            std::process::exit(1);
        }
    }
    server.abort();
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The option's number is this mimalloc's: its documented default (2, "only where the OS
    /// overcommits") is what the number reads before it is set.
    #[test]
    #[allow(unsafe_code)]
    fn the_arena_eager_commit_option_is_the_one_set() {
        // SAFETY: reads an allocator option.
        let default = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_ARENA_EAGER_COMMIT) };
        assert_eq!(default, 2);
    }

    /// Likewise: the purge delay's default is 1,000 ms in this mimalloc (`src/options.c`; the
    /// header's comment still says 10).
    #[test]
    #[allow(unsafe_code)]
    fn the_purge_delay_option_is_the_one_set() {
        // SAFETY: reads an allocator option.
        let default = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(default, 1_000);
    }
}
