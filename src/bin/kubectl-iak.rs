//! `kubectl iak`: a kubectl plugin for IamAccessKeys. Copy it onto PATH and kubectl finds it.
//! Everything it does lives in the library (`iam_key_operator::plugin`).
#![deny(warnings)]
#![forbid(unsafe_code)]

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use iam_key_operator::{controller, plugin};
use kube::config::{KubeConfigOptions, Kubeconfig};

#[derive(Parser)]
#[command(name = "kubectl iak", version, about = "Inspect and operate IamAccessKeys (iam-key-operator)")]
struct Cli {
    /// Path of the kubeconfig (default: KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: the current context).
    #[arg(long, global = true)]
    context: Option<String>,
    /// Namespace (default: the context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The resource, its keys, its Secret, its Ready condition and the policy rule that allows it.
    Status { name: String },
    /// Ask for a new key now (the annotation iam.keyop.dev/rotate-requested-at, as
    /// `iam-key-operator rotate` sets it), or with --serial by increasing spec.rotation.serial.
    Rotate {
        name: String,
        /// Increase spec.rotation.serial instead (a GitOps tool would revert it: change it in Git).
        #[arg(long)]
        serial: bool,
    },
    /// Stop every IAM and Secret write for the resource (annotation iam.keyop.dev/paused=true);
    /// honoured where every policy rule that allows it sets allowPause.
    Pause { name: String },
    /// Remove the pause annotation.
    Resume { name: String },
    /// Which IamAccessKeyPolicy rule allows or refuses the namespace (-n) to manage an IAM user,
    /// evaluated with the operator's own policy code.
    Why {
        /// The IAM user: NAME, or /PATH/NAME for rules on userPathPrefix.
        #[arg(long)]
        user: String,
        /// A tag of the user, for rules on userTag (repeatable; with /PATH/NAME).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
    },
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?}: use KEY=VALUE"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let options = KubeConfigOptions { context: cli.context.clone(), ..Default::default() };
    let config = match &cli.kubeconfig {
        Some(path) => kube::Config::from_custom_kubeconfig(Kubeconfig::read_from(path)?, &options).await?,
        None if cli.context.is_some() => kube::Config::from_kubeconfig(&options).await?,
        None => kube::Config::infer().await?,
    };
    let ns = cli.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config)?;
    match cli.command {
        Command::Status { name } => {
            let facts = plugin::read_status(&client, &ns, &name).await?;
            print!("{}", plugin::status_report(&facts, jiff::Timestamp::now()));
        }
        Command::Rotate { name, serial: false } => {
            let at = controller::request_rotation(client, &ns, &name).await?;
            println!("iamaccesskey {ns}/{name}: rotation requested at {at}");
        }
        Command::Rotate { name, serial: true } => {
            let serial = plugin::bump_serial(&client, &ns, &name).await?;
            println!("iamaccesskey {ns}/{name}: spec.rotation.serial is now {serial}");
        }
        Command::Pause { name } => {
            plugin::set_paused(&client, &ns, &name, true).await?;
            println!(
                "iamaccesskey {ns}/{name} paused (Ready reason Paused once the operator sees it; \
                 a policy without allowPause overrides it: condition PolicyOverride)"
            );
        }
        Command::Resume { name } => {
            plugin::set_paused(&client, &ns, &name, false).await?;
            println!("iamaccesskey {ns}/{name} resumed");
        }
        Command::Why { user, tags } => {
            let (name, path) = plugin::parse_user(&user);
            if path.is_none() && !tags.is_empty() {
                return Err("--tag needs the user's path too: give the user as /PATH/NAME".into());
            }
            let tags: BTreeMap<String, String> = tags.into_iter().collect();
            let (report, allowed) = plugin::why(&client, &ns, &name, path.as_deref(), &tags).await?;
            print!("{report}");
            // As `kubectl auth can-i`: 0 yes, 1 no.
            return Ok(if allowed { ExitCode::SUCCESS } else { ExitCode::FAILURE });
        }
    }
    Ok(ExitCode::SUCCESS)
}
