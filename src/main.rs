//! `iam-key-operator`: parse flags, build clients, run. Everything else lives in the library.
#![deny(warnings)]
#![forbid(unsafe_code)]

use std::{net::SocketAddr, sync::Arc, time::Duration};

use clap::{Parser, Subcommand};
use iam_key_operator::{
    controller::{self, Context, Settings},
    crd::{self, Duration as SpecDuration},
    iam::AwsIam,
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
    Run(RunArgs),
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
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Name of this cluster in IAM ownership tags (`<cluster>/<namespace>/<name>`): give each
    /// cluster that manages keys of the same AWS account its own.
    #[arg(long, env = "IKO_CLUSTER_NAME", default_value = "default")]
    cluster_name: String,
    /// Only reconcile resources in this namespace (repeatable; default: all namespaces).
    #[arg(long = "namespace", env = "IKO_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "IKO_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// How often each key's last use is read from IAM (e.g. 1h).
    #[arg(long, env = "IKO_LAST_USED_REFRESH", default_value = "1h")]
    last_used_refresh: SpecDuration,
    /// Longest time between two checks of a converged resource against IAM (drift detection).
    #[arg(long, env = "IKO_RESYNC", default_value = "1h")]
    resync: SpecDuration,
    /// How long a new key may take to authenticate before it is discarded.
    #[arg(long, env = "IKO_VERIFY_TIMEOUT", default_value = "60s")]
    verify_timeout: SpecDuration,
    /// Resources reconciled at the same time.
    #[arg(long, env = "IKO_CONCURRENCY", default_value_t = 8)]
    concurrency: u16,
    /// Log format.
    #[arg(long, env = "IKO_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: telemetry::LogFormat,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    match Cli::parse().command {
        Command::Crd { out_dir: None } => {
            print!("{}", crd::crds_yaml()?);
            Ok(())
        }
        Command::Crd { out_dir: Some(dir) } => {
            for def in crd::all_crds() {
                let name = def.metadata.name.clone().unwrap_or_default();
                std::fs::write(dir.join(format!("{name}.yaml")), serde_yaml::to_string(&def)?)?;
            }
            Ok(())
        }
        Command::Run(args) => run(args).await,
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
    telemetry::init(args.log_format);
    // kube and the AWS SDK share rustls; settle its crypto provider once, before either starts.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

    let metrics = Arc::new(Metrics::default());
    let client = kube::Client::try_default().await?;
    let iam = Arc::new(AwsIam::from_env(metrics.clone()).await);
    let settings = Settings {
        cluster_name: args.cluster_name,
        last_used_refresh: args.last_used_refresh.as_std().max(Duration::from_secs(1)),
        resync: args.resync.as_std().max(Duration::from_secs(1)),
        verify_timeout: args.verify_timeout.as_std(),
        namespaces: args.namespaces,
        concurrency: args.concurrency.max(1),
    };
    tracing::info!(cluster = %settings.cluster_name, namespaces = ?settings.namespaces, "starting iam-key-operator");
    let ctx = Arc::new(Context::new(client, iam, metrics.clone(), settings));
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = tokio::spawn(server::serve(args.metrics_addr, metrics, ready.clone()));
    controller::run(ctx, ready).await;
    server.abort();
    tracing::info!("stopped");
    Ok(())
}
