//! A real, local Kubernetes control plane and IAM endpoint for tests, benchmarks and
//! `make dev-up`.
//!
//! [`TestEnv::start`] runs, on free ports of 127.0.0.1: etcd, kube-apiserver (own CA, client
//! certificates, RBAC, service-account token signing), kube-controller-manager (garbage
//! collector, namespace and service-account controllers) and moto's server as the IAM and STS
//! endpoint. The binaries come from `make tools` (`hack/k8s-tools.sh`, `hack/moto.sh`), or from
//! `IKO_K8S_BIN` (a directory) and `IKO_MOTO_SERVER` (a path).
//!
//! Tests of one binary usually share one environment, [`shared()`], and isolate themselves with
//! [`TestEnv::fresh_namespace`] and [`TestEnv::fresh_iam_user`]. Nothing returned here is tied
//! to a tokio runtime: each `#[tokio::test]` makes its clients in its own runtime.
//!
//! Child processes cannot outlive the test process: see [`TestEnv`]'s "Teardown".

mod certs;
mod error;
mod process;
pub mod proxy;
mod util;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::Deserialize as _;

pub use error::{Error, ErrorKind, Result};
pub use process::{KEEP_VAR, pid_alive, sweep_stale_dirs};

use certs::Pki;
use process::Resources;

/// Region of every AWS client and of `env_vars()`.
pub const AWS_REGION: &str = "us-east-1";
/// moto runs enforcing: it authenticates every request (signature, known and Active-or-not key)
/// and authorizes it against the caller's IAM policies, as AWS does. Only the first
/// [`UNAUTHENTICATED_SETUP_CALLS`] requests pass unchecked; testenv spends them making
/// [`ADMIN_USER`], whose key signs everything set up later (users, policies, identities), and
/// an admin role in each of [`OTHER_ACCOUNTS`] (nothing but an unchecked call can create the
/// first identity of an account in moto).
pub const UNAUTHENTICATED_SETUP_CALLS: usize = 3 + 2 * OTHER_ACCOUNTS.len();
/// AWS accounts besides moto's default one (123456789012), for tests of several accounts.
pub const OTHER_ACCOUNTS: [&str; 2] = ["222222222222", "333333333333"];
/// The role in each of [`OTHER_ACCOUNTS`] with an `Allow * on *` policy; [`ADMIN_USER`] may
/// assume it ([`TestEnv::iam_client_in`]). moto evaluates no trust policy across accounts.
pub const ACCOUNT_ADMIN_ROLE: &str = "testenv-admin";
/// The IAM user holding an `Allow * on *` policy, for test setup only (never the operator).
pub const ADMIN_USER: &str = "testenv-admin";
/// Any key id signs the unauthenticated setup calls; it is refused once moto enforces.
const SETUP_ACCESS_KEY_ID: &str = "testing";
/// Field manager used when applying CRDs.
pub const FIELD_MANAGER: &str = "testenv";
/// Label put on every namespace made by [`TestEnv::fresh_namespace`].
pub const FRESH_LABEL: &str = "testenv.keyop.dev/fresh";

/// Controllers run by kube-controller-manager: owner-reference garbage collection, namespace
/// deletion, and the `default` ServiceAccount of each namespace.
pub const CONTROLLERS: &str = "garbage-collector-controller,namespace-controller,serviceaccount-controller";

/// Variables that [`TestEnv::command`] removes from a child's environment, so that nothing from
/// the developer's own AWS setup (profiles, session tokens, web identity, container
/// credentials, a global endpoint) can redirect a child away from moto.
pub const AWS_VARS_REMOVED: &[&str] = &[
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_USE_FIPS_ENDPOINT",
    "AWS_USE_DUALSTACK_ENDPOINT",
    "AWS_DEFAULT_REGION",
];

const ETCD_TIMEOUT: Duration = Duration::from_secs(60);
const APISERVER_TIMEOUT: Duration = Duration::from_secs(180);
const CONTROLLER_MANAGER_TIMEOUT: Duration = Duration::from_secs(120);
const MOTO_TIMEOUT: Duration = Duration::from_secs(60);
const CRD_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);
/// Starts retried when a port picked as free was taken by someone else meanwhile.
const START_ATTEMPTS: usize = 3;

/// What to start, and where.
#[derive(Debug, Clone)]
pub struct Options {
    /// Apply every CRD in every `*.yaml`/`*.yml` file of this directory (server-side apply),
    /// and wait until each is Established.
    pub crds_dir: Option<PathBuf>,
    /// Keep everything (kubeconfig, certificates, logs, etcd data) in this directory instead of
    /// a temporary one, and leave it in place on teardown. Its previous etcd data and logs are
    /// discarded at start: every start is a fresh cluster.
    pub state_dir: Option<PathBuf>,
    /// Run kube-controller-manager (namespace deletion, garbage collection, default service
    /// accounts). Default: true.
    pub controller_manager: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { crds_dir: None, state_dir: None, controller_manager: true }
    }
}

impl Options {
    /// See [`Options::crds_dir`].
    pub fn crds_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.crds_dir = Some(dir.into());
        self
    }

    /// See [`Options::state_dir`].
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// See [`Options::controller_manager`].
    pub fn controller_manager(mut self, run: bool) -> Self {
        self.controller_manager = run;
        self
    }
}

/// A running environment: etcd, kube-apiserver, kube-controller-manager and moto.
///
/// # Teardown
///
/// Every child process is killed and reaped, and the temporary directory removed, when the
/// `TestEnv` is dropped, or, for one never dropped (such as [`shared()`]), by an `atexit`
/// handler when the process exits (normally or after failed tests). If the process dies without
/// running `atexit` (SIGKILL, abort), the kernel kills the children (`PR_SET_PDEATHSIG`), and the
/// next start in any process removes the directory left behind.
#[derive(Debug)]
pub struct TestEnv {
    id: u64,
    dir: PathBuf,
    persistent: bool,
    bin_dir: PathBuf,
    kubeconfig_path: PathBuf,
    kubeconfig_yaml: String,
    apiserver_url: String,
    etcd_url: String,
    iam_endpoint: String,
    ca_pem: String,
    /// The key of [`ADMIN_USER`].
    admin_key: (String, String),
    started_in: Duration,
}

struct Tools {
    k8s_bin: PathBuf,
    moto_server: PathBuf,
}

/// The repository root: the parent of this crate's directory.
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

fn run_locator(script: &str) -> std::result::Result<PathBuf, String> {
    let path = repo_root().join("hack").join(script);
    let out = Command::new("bash")
        .arg(&path)
        .arg("--path")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if printed.is_empty() {
        return Err(format!("{} --path printed nothing", path.display()));
    }
    Ok(PathBuf::from(printed))
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

impl Tools {
    fn locate(need_controller_manager: bool) -> Result<Tools> {
        let missing = |what: String| Error::new(ErrorKind::ToolsMissing, format!("{what}; run `make tools` first"));
        let k8s_bin = match env_path("IKO_K8S_BIN") {
            Some(dir) => dir,
            None => run_locator("k8s-tools.sh").map_err(|e| {
                missing(format!(
                    "Kubernetes binaries not found (IKO_K8S_BIN is unset and hack/k8s-tools.sh \
                     --path says: {e})"
                ))
            })?,
        };
        let mut needed = vec!["etcd", "kube-apiserver", "kubectl"];
        if need_controller_manager {
            needed.push("kube-controller-manager");
        }
        for name in needed {
            if !is_executable(&k8s_bin.join(name)) {
                return Err(missing(format!("{name} is not in {}", k8s_bin.display())));
            }
        }
        let moto_server = match env_path("IKO_MOTO_SERVER") {
            Some(path) => path,
            None => run_locator("moto.sh").map_err(|e| {
                missing(format!(
                    "moto_server not found (IKO_MOTO_SERVER is unset and hack/moto.sh --path \
                     says: {e})"
                ))
            })?,
        };
        if !is_executable(&moto_server) {
            return Err(missing(format!("{} is not an executable", moto_server.display())));
        }
        Ok(Tools { k8s_bin, moto_server })
    }
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if private {
        opts.mode(0o600);
    }
    use std::io::Write as _;
    opts.open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
}

fn mkdir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(|e| Error::io(format!("cannot create {}", path.display()), e))
}

fn render_kubeconfig(server: &str, ca_pem: &str, cert_pem: &str, key_pem: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: testenv
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: testenv-admin
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: testenv
  context:
    cluster: testenv
    user: testenv-admin
current-context: testenv
",
        ca = b64(ca_pem),
        cert = b64(cert_pem),
        key = b64(key_pem),
    )
}

async fn client_from_yaml(yaml: &str) -> Result<kube::Client> {
    let kubeconfig = Kubeconfig::from_yaml(yaml)
        .map_err(|e| Error::with_source(ErrorKind::Kube, "cannot parse the testenv kubeconfig", e))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::with_source(ErrorKind::Kube, "cannot load the testenv kubeconfig", e))?;
    kube::Client::try_from(config).map_err(|e| Error::kube("cannot build a kube client", e))
}

/// A failed start attempt, and whether it looks like a lost race for a port.
struct StartFailure {
    error: Error,
    port_conflict: bool,
}

impl From<Error> for StartFailure {
    fn from(error: Error) -> Self {
        StartFailure { error, port_conflict: false }
    }
}

/// Context of one start attempt: the environment id (for its processes) and its directory.
struct Starting {
    id: u64,
    dir: PathBuf,
}

impl Starting {
    fn failure(&self, process: &str, what: &str, log: &Path) -> StartFailure {
        let tail = process::log_tail(log, 40);
        let port_conflict = tail.to_lowercase().contains("address already in use");
        StartFailure {
            error: Error::new(
                ErrorKind::Startup,
                format!(
                    "{process} {what}; logs are in {}\n--- last lines of {} ---\n{tail}",
                    self.dir.join("logs").display(),
                    log.display()
                ),
            ),
            port_conflict,
        }
    }

    /// Polls `ready` until it answers true, failing early if `process` exits.
    async fn wait_ready(
        &self,
        process: &str,
        what: &str,
        timeout: Duration,
        mut ready: impl AsyncFnMut() -> bool,
    ) -> std::result::Result<(), StartFailure> {
        let deadline = Instant::now() + timeout;
        loop {
            if ready().await {
                return Ok(());
            }
            if let Some((status, log)) = process::exited(self.id, process) {
                return Err(self.failure(process, &format!("exited ({status}) before it was ready ({what})"), &log));
            }
            if Instant::now() > deadline {
                let log = self.dir.join("logs").join(format!("{process}.log"));
                return Err(self.failure(
                    process,
                    &format!("was not ready within {}s ({what})", timeout.as_secs()),
                    &log,
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn spawn(&self, name: &str, program: &Path, args: &[String]) -> Result<u32> {
        let mut cmd = Command::new(program);
        cmd.args(args).current_dir(&self.dir);
        if name == "moto" {
            cmd.env("PYTHONUNBUFFERED", "1")
                .env("INITIAL_NO_AUTH_ACTION_COUNT", UNAUTHENTICATED_SETUP_CALLS.to_string());
        }
        let log = self.dir.join("logs").join(format!("{name}.log"));
        process::spawn(self.id, name, cmd, &log)
    }
}

impl TestEnv {
    /// Starts an environment; blocks until every part is ready (a few seconds to a minute).
    ///
    /// Callable from anywhere, including inside a tokio runtime: the work runs on a thread of
    /// its own. See [`TestEnv::start_async`] for async callers that must not block.
    pub fn start(opts: Options) -> Result<TestEnv> {
        let handle = std::thread::Builder::new()
            .name("testenv-start".into())
            .spawn(move || -> Result<TestEnv> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| Error::io("cannot build a tokio runtime", e))?;
                rt.block_on(Self::start_attempts(opts))
            })
            .map_err(|e| Error::io("cannot start the testenv start thread", e))?;
        handle.join().unwrap_or_else(|_| Err(Error::new(ErrorKind::Other, "testenv: the start thread panicked")))
    }

    /// [`TestEnv::start`] without blocking the caller's runtime.
    pub async fn start_async(opts: Options) -> Result<TestEnv> {
        tokio::task::spawn_blocking(move || Self::start(opts))
            .await
            .unwrap_or_else(|e| Err(Error::new(ErrorKind::Other, format!("testenv: the start task failed: {e}"))))
    }

    async fn start_attempts(opts: Options) -> Result<TestEnv> {
        let tools = Tools::locate(opts.controller_manager)?;
        process::sweep_stale_dirs();
        let mut attempt = 1;
        loop {
            match Self::start_once(&opts, &tools).await {
                Ok(env) => return Ok(env),
                Err((failure, dir)) => {
                    if failure.port_conflict && attempt < START_ATTEMPTS {
                        if opts.state_dir.is_none() {
                            let _ = fs::remove_dir_all(&dir);
                        }
                        attempt += 1;
                        continue;
                    }
                    return Err(failure.error);
                }
            }
        }
    }

    async fn start_once(opts: &Options, tools: &Tools) -> std::result::Result<TestEnv, (StartFailure, PathBuf)> {
        let began = Instant::now();
        let (dir, persistent) = match &opts.state_dir {
            Some(state) => {
                let prepare = || -> Result<PathBuf> {
                    mkdir(state)?;
                    let state = state
                        .canonicalize()
                        .map_err(|e| Error::io(format!("cannot resolve {}", state.display()), e))?;
                    for old in ["etcd", "logs", "pki"] {
                        let old = state.join(old);
                        if old.exists() {
                            fs::remove_dir_all(&old)
                                .map_err(|e| Error::io(format!("cannot clear {}", old.display()), e))?;
                        }
                    }
                    Ok(state)
                };
                let state = prepare().map_err(|e| (e.into(), state.clone()))?;
                (state, true)
            }
            None => {
                let dir = std::env::temp_dir().join(format!(
                    "{}{}-{}",
                    process::TEMP_PREFIX,
                    std::process::id(),
                    util::random_suffix()
                ));
                fs::create_dir(&dir)
                    .map_err(|e| (Error::io(format!("cannot create {}", dir.display()), e).into(), dir.clone()))?;
                (dir, false)
            }
        };
        let id = process::register(Resources {
            dir: dir.clone(),
            remove_dir: !persistent,
            graceful: persistent,
            procs: Vec::new(),
        });
        let starting = Starting { id, dir: dir.clone() };
        match Self::start_processes(&starting, opts, tools, persistent, began).await {
            Ok(env) => Ok(env),
            Err(failure) => {
                // Keep the logs: the error message points at them.
                process::teardown(id, true);
                Err((failure, dir))
            }
        }
    }

    async fn start_processes(
        s: &Starting,
        opts: &Options,
        tools: &Tools,
        persistent: bool,
        began: Instant,
    ) -> std::result::Result<TestEnv, StartFailure> {
        let dir = &s.dir;
        let (logs, pki_dir, aws_dir) = (dir.join("logs"), dir.join("pki"), dir.join("aws"));
        for d in [&logs, &pki_dir, &aws_dir] {
            mkdir(d)?;
        }
        write_file(&dir.join(process::OWNER_FILE), &format!("{}\n", std::process::id()), false)?;
        // Empty AWS config files: children must not read the developer's ~/.aws.
        write_file(&aws_dir.join("config"), "", false)?;
        write_file(&aws_dir.join("credentials"), "", false)?;

        let etcd_port = util::free_port()?;
        let etcd_peer_port = util::free_port()?;
        let apiserver_port = util::free_port()?;
        let moto_port = util::free_port()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let apiserver_url = format!("https://127.0.0.1:{apiserver_port}");
        let iam_endpoint = format!("http://127.0.0.1:{moto_port}");

        let pki = Pki::generate()?;
        let p = |name: &str| pki_dir.join(name);
        write_file(&p("ca.crt"), &pki.ca.cert, false)?;
        write_file(&p("ca.key"), &pki.ca.key, true)?;
        write_file(&p("apiserver.crt"), &pki.serving.cert, false)?;
        write_file(&p("apiserver.key"), &pki.serving.key, true)?;
        write_file(&p("admin.crt"), &pki.admin.cert, false)?;
        write_file(&p("admin.key"), &pki.admin.key, true)?;
        write_file(&p("sa.key"), &pki.sa_key, true)?;
        write_file(&p("sa.pub"), &pki.sa_pub, false)?;
        let kubeconfig_yaml = render_kubeconfig(&apiserver_url, &pki.ca.cert, &pki.admin.cert, &pki.admin.key);
        let kubeconfig_path = dir.join("kubeconfig");
        write_file(&kubeconfig_path, &kubeconfig_yaml, true)?;
        let kcm_kubeconfig = dir.join("controller-manager.kubeconfig");
        write_file(
            &kcm_kubeconfig,
            &render_kubeconfig(&apiserver_url, &pki.ca.cert, &pki.controller_manager.cert, &pki.controller_manager.key),
            true,
        )?;
        let path = |p: &Path| p.display().to_string();

        // moto first: it is independent and its Python start-up overlaps the others.
        s.spawn("moto", &tools.moto_server, &["-H".into(), "127.0.0.1".into(), "-p".into(), moto_port.to_string()])?;

        let etcd_peer = format!("http://127.0.0.1:{etcd_peer_port}");
        s.spawn(
            "etcd",
            &tools.k8s_bin.join("etcd"),
            &[
                "--name=testenv".into(),
                format!("--data-dir={}", path(&dir.join("etcd"))),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={etcd_peer}"),
                format!("--initial-advertise-peer-urls={etcd_peer}"),
                format!("--initial-cluster=testenv={etcd_peer}"),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
        )?;
        s.wait_ready("etcd", "GET /health", ETCD_TIMEOUT, async || {
            matches!(util::http_get(etcd_port, "/health"),
                Ok((200, body)) if body.contains("true"))
        })
        .await?;

        let issuer = "https://kubernetes.default.svc.cluster.local";
        s.spawn(
            "kube-apiserver",
            &tools.k8s_bin.join("kube-apiserver"),
            &[
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={apiserver_port}"),
                format!("--cert-dir={}", path(&pki_dir)),
                format!("--tls-cert-file={}", path(&p("apiserver.crt"))),
                format!("--tls-private-key-file={}", path(&p("apiserver.key"))),
                format!("--client-ca-file={}", path(&p("ca.crt"))),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--authorization-mode=RBAC".into(),
                format!("--service-account-issuer={issuer}"),
                format!("--service-account-key-file={}", path(&p("sa.pub"))),
                format!("--service-account-signing-key-file={}", path(&p("sa.key"))),
                // Would reject pods created before the serviceaccount controller has made the
                // namespace's `default` ServiceAccount; nothing here runs pods.
                "--disable-admission-plugins=ServiceAccount".into(),
                "--allow-privileged=true".into(),
                // The default reconciler refuses a loopback advertise address; nothing here
                // reaches the apiserver through the `kubernetes` Service.
                "--endpoint-reconciler-type=none".into(),
            ],
        )?;
        let probe_client = client_from_yaml(&kubeconfig_yaml).await?;
        s.wait_ready("kube-apiserver", "GET /readyz", APISERVER_TIMEOUT, async || {
            let req = http::Request::get("/readyz").body(Vec::new());
            match req {
                Ok(req) => {
                    matches!(probe_client.request_text(req).await, Ok(t) if t.trim() == "ok")
                }
                Err(_) => false,
            }
        })
        .await?;

        if opts.controller_manager {
            s.spawn(
                "kube-controller-manager",
                &tools.k8s_bin.join("kube-controller-manager"),
                &[
                    format!("--kubeconfig={}", path(&kcm_kubeconfig)),
                    format!("--controllers={CONTROLLERS}"),
                    "--leader-elect=false".into(),
                    "--secure-port=0".into(),
                    format!("--root-ca-file={}", path(&p("ca.crt"))),
                    format!("--service-account-private-key-file={}", path(&p("sa.key"))),
                ],
            )?;
        }

        s.wait_ready("moto", "GET /moto-api/", MOTO_TIMEOUT, async || util::http_get(moto_port, "/moto-api/").is_ok())
            .await?;
        let admin_key = bootstrap_admin(&iam_endpoint).await?;

        if opts.controller_manager {
            // Its serviceaccount controller making `default/default` shows it runs and talks to
            // the apiserver.
            let sas: Api<ServiceAccount> = Api::namespaced(probe_client.clone(), "default");
            s.wait_ready(
                "kube-controller-manager",
                "its serviceaccount controller makes ServiceAccount default/default",
                CONTROLLER_MANAGER_TIMEOUT,
                async || matches!(sas.get_opt("default").await, Ok(Some(_))),
            )
            .await?;
        }

        if let Some(crds) = &opts.crds_dir {
            apply_crds(&probe_client, crds).await?;
        }
        Ok(TestEnv {
            id: s.id,
            dir: dir.clone(),
            persistent,
            bin_dir: tools.k8s_bin.clone(),
            kubeconfig_path,
            kubeconfig_yaml,
            apiserver_url,
            etcd_url,
            iam_endpoint,
            ca_pem: pki.ca.cert,
            admin_key,
            started_in: began.elapsed(),
        })
    }

    /// Path of the admin kubeconfig (client certificate in group `system:masters`).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// The admin kubeconfig's text.
    pub fn kubeconfig_yaml(&self) -> &str {
        &self.kubeconfig_yaml
    }

    /// A kube client config for the admin user (for code that builds its own client).
    pub async fn kube_config(&self) -> Result<kube::Config> {
        let kubeconfig = Kubeconfig::from_yaml(&self.kubeconfig_yaml)
            .map_err(|e| Error::with_source(ErrorKind::Kube, "cannot parse the testenv kubeconfig", e))?;
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| Error::with_source(ErrorKind::Kube, "cannot load the testenv kubeconfig", e))
    }

    /// A new admin client, bound to the calling tokio runtime (make one per test).
    pub async fn kube_client(&self) -> Result<kube::Client> {
        client_from_yaml(&self.kubeconfig_yaml).await
    }

    /// `https://127.0.0.1:PORT`
    pub fn apiserver_url(&self) -> &str {
        &self.apiserver_url
    }

    /// `http://127.0.0.1:PORT`
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// The CA certificate (PEM) that signed the apiserver's serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The IAM (and STS) endpoint: `http://127.0.0.1:PORT`.
    pub fn iam_endpoint(&self) -> String {
        self.iam_endpoint.clone()
    }

    /// An IAM client for moto signed by [`ADMIN_USER`] (test setup: users, keys, policies).
    pub fn iam_client(&self) -> aws_sdk_iam::Client {
        self.iam_client_for(&self.admin_key.0, &self.admin_key.1)
    }

    /// An IAM client for moto that signs with the given key.
    pub fn iam_client_for(&self, access_key_id: &str, secret: &str) -> aws_sdk_iam::Client {
        iam_client_at(&self.iam_endpoint, access_key_id, secret)
    }

    /// An IAM client signed by [`ACCOUNT_ADMIN_ROLE`] in `account`, one of [`OTHER_ACCOUNTS`]
    /// (test setup there: users, roles, policies).
    pub async fn iam_client_in(&self, account: &str) -> Result<aws_sdk_iam::Client> {
        let role = format!("arn:aws:iam::{account}:role/{ACCOUNT_ADMIN_ROLE}");
        let sts = self.sts_client(&self.admin_key.0, &self.admin_key.1);
        let out = sts
            .assume_role()
            .role_arn(&role)
            .role_session_name("testenv")
            .send()
            .await
            .map_err(|e| Error::aws(format!("cannot assume {role}"), e))?;
        let c = out.credentials().ok_or_else(|| Error::new(ErrorKind::Aws, "AssumeRole returned no credentials"))?;
        use aws_sdk_iam::config::{BehaviorVersion, Credentials, Region};
        let creds = Credentials::new(
            c.access_key_id(),
            c.secret_access_key(),
            Some(c.session_token().to_string()),
            None,
            "testenv",
        );
        let conf = aws_sdk_iam::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(AWS_REGION))
            .endpoint_url(&self.iam_endpoint)
            .credentials_provider(creds)
            .build();
        Ok(aws_sdk_iam::Client::from_conf(conf))
    }

    /// `(access key id, secret)` of [`ADMIN_USER`].
    pub fn admin_credentials(&self) -> (&str, &str) {
        (&self.admin_key.0, &self.admin_key.1)
    }

    /// Creates (or reuses) the IAM user `name` with `policy_document` as its only inline policy
    /// and returns a new access key of it: an identity that may do exactly what the policy allows.
    pub async fn create_iam_identity(&self, name: &str, policy_document: &str) -> Result<(String, String)> {
        let iam = self.iam_client();
        match iam.create_user().user_name(name).send().await {
            Ok(_) => {}
            Err(e) if e.as_service_error().is_some_and(|s| s.is_entity_already_exists_exception()) => {}
            Err(e) => return Err(Error::aws(format!("cannot create IAM user {name}"), e)),
        }
        iam.put_user_policy()
            .user_name(name)
            .policy_name(name)
            .policy_document(policy_document)
            .send()
            .await
            .map_err(|e| Error::aws(format!("cannot put the policy of IAM user {name}"), e))?;
        let key = iam
            .create_access_key()
            .user_name(name)
            .send()
            .await
            .map_err(|e| Error::aws(format!("cannot create an access key for IAM user {name}"), e))?;
        let key = key.access_key().ok_or_else(|| Error::new(ErrorKind::Aws, "CreateAccessKey returned no key"))?;
        Ok((key.access_key_id().to_string(), key.secret_access_key().to_string()))
    }

    /// An STS client for moto that signs with the given key.
    pub fn sts_client(&self, access_key_id: &str, secret: &str) -> aws_sdk_sts::Client {
        use aws_sdk_sts::config::{BehaviorVersion, Credentials, Region};
        let conf = aws_sdk_sts::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(AWS_REGION))
            .endpoint_url(&self.iam_endpoint)
            .credentials_provider(Credentials::new(access_key_id, secret, None, None, "testenv"))
            .build();
        aws_sdk_sts::Client::from_conf(conf)
    }

    /// A shared AWS config (region, endpoint, [`ADMIN_USER`]'s key) pointing at moto, for code
    /// that builds its clients from an `SdkConfig`.
    pub fn aws_sdk_config(&self) -> aws_config::SdkConfig {
        use aws_credential_types::provider::SharedCredentialsProvider;
        aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(AWS_REGION))
            .endpoint_url(&self.iam_endpoint)
            .credentials_provider(SharedCredentialsProvider::new(aws_credential_types::Credentials::new(
                self.admin_key.0.clone(),
                self.admin_key.1.clone(),
                None,
                None,
                "testenv",
            )))
            .build()
    }

    /// Environment for a child process (kubectl, helm, setup scripts): the admin kubeconfig,
    /// moto as the IAM and STS endpoint, [`ADMIN_USER`]'s key, us-east-1, and empty AWS config
    /// files. Both identities are for setup: run the operator as the identity it is installed with.
    /// Also remove [`AWS_VARS_REMOVED`]; [`TestEnv::command`] does both.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        let aws = self.dir.join("aws");
        [
            ("KUBECONFIG", self.kubeconfig_path.display().to_string()),
            ("AWS_ENDPOINT_URL_IAM", self.iam_endpoint.clone()),
            ("AWS_ENDPOINT_URL_STS", self.iam_endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", self.admin_key.0.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.admin_key.1.clone()),
            ("AWS_REGION", AWS_REGION.to_string()),
            ("AWS_CONFIG_FILE", aws.join("config").display().to_string()),
            ("AWS_SHARED_CREDENTIALS_FILE", aws.join("credentials").display().to_string()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// A command for `program` with [`TestEnv::env_vars`] set and [`AWS_VARS_REMOVED`] removed.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        for var in AWS_VARS_REMOVED {
            cmd.env_remove(var);
        }
        cmd.envs(self.env_vars());
        cmd
    }

    /// Directory of kubectl, helm, kube-apiserver, etcd, ...
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Runs the built kubectl against this environment. A kubectl that cannot be started
    /// yields exit status 127 and the reason on stderr.
    pub fn kubectl<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(self.bin_dir.join("kubectl"));
        cmd.arg("--kubeconfig").arg(&self.kubeconfig_path).args(args);
        output_of(cmd)
    }

    /// Runs the built helm against this environment, with its cache, config and data
    /// directories inside the environment's directory.
    pub fn helm<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(self.bin_dir.join("helm"));
        let home = self.dir.join("helm");
        cmd.env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig_path)
            .args(args);
        output_of(cmd)
    }

    /// The environment's directory (temporary, or the state directory).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether this environment lives in a state directory (kept after teardown).
    pub fn is_persistent(&self) -> bool {
        self.persistent
    }

    /// Log file of one process: `etcd`, `kube-apiserver`, `kube-controller-manager`, `moto`.
    pub fn log_path(&self, process: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{process}.log"))
    }

    /// Pids of the child processes, in start order.
    pub fn child_pids(&self) -> Vec<u32> {
        self.processes().into_iter().map(|(_, pid)| pid).collect()
    }

    /// `(name, pid)` of every child process, in start order.
    pub fn processes(&self) -> Vec<(String, u32)> {
        process::pids(self.id)
    }

    /// A child process that has exited (they should not): its name and status.
    pub fn exited_process(&self) -> Option<(String, ExitStatus)> {
        process::first_exited(self.id).map(|(name, status, _)| (name, status))
    }

    /// How long [`TestEnv::start`] took.
    pub fn startup_duration(&self) -> Duration {
        self.started_in
    }

    /// Creates a namespace named `prefix-xxxxxx` (unique; the prefix made DNS-1123-valid) and
    /// returns its name.
    pub async fn fresh_namespace(&self, prefix: &str) -> Result<String> {
        let api: Api<Namespace> = Api::all(self.kube_client().await?);
        let mut last = None;
        for _ in 0..5 {
            let name = util::unique_dns_label(prefix);
            let ns = Namespace {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some([(FRESH_LABEL.to_string(), "true".to_string())].into()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            };
            match api.create(&PostParams::default(), &ns).await {
                Ok(_) => return Ok(name),
                Err(kube::Error::Api(status)) if status.is_already_exists() => {
                    last = Some(kube::Error::Api(status));
                }
                Err(e) => return Err(Error::kube(format!("cannot create namespace {name}"), e)),
            }
        }
        Err(match last {
            Some(e) => Error::kube("cannot find a free namespace name", e),
            None => Error::new(ErrorKind::Kube, "cannot find a free namespace name"),
        })
    }

    /// Creates an IAM user named `prefix-xxxxxx` (unique; the prefix made IAM-valid) in moto
    /// and returns its name.
    pub async fn fresh_iam_user(&self, prefix: &str) -> Result<String> {
        self.create_fresh_user(prefix, None).await
    }

    /// Like [`TestEnv::fresh_iam_user`], with an IAM path such as `/k8s/team-a/`.
    pub async fn fresh_iam_user_with_path(&self, prefix: &str, path: &str) -> Result<String> {
        self.create_fresh_user(prefix, Some(path)).await
    }

    async fn create_fresh_user(&self, prefix: &str, path: Option<&str>) -> Result<String> {
        let iam = self.iam_client();
        for _ in 0..5 {
            let name = util::unique_iam_name(prefix);
            match iam.create_user().user_name(&name).set_path(path.map(str::to_string)).send().await {
                Ok(_) => return Ok(name),
                Err(e) if e.as_service_error().is_some_and(|s| s.is_entity_already_exists_exception()) => {}
                Err(e) => return Err(Error::aws(format!("cannot create IAM user {name}"), e)),
            }
        }
        Err(Error::new(ErrorKind::Aws, "cannot find a free IAM user name"))
    }

    /// Applies (server-side) every CRD in `dir`'s `*.yaml`/`*.yml` files and waits until each
    /// is Established. Returns their names.
    pub async fn install_crds(&self, dir: &Path) -> Result<Vec<String>> {
        apply_crds(&self.kube_client().await?, dir).await
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        process::teardown(self.id, false);
    }
}

fn iam_client_at(endpoint: &str, access_key_id: &str, secret: &str) -> aws_sdk_iam::Client {
    use aws_sdk_iam::config::{BehaviorVersion, Credentials, Region};
    let conf = aws_sdk_iam::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(AWS_REGION))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new(access_key_id, secret, None, None, "testenv"))
        .build();
    aws_sdk_iam::Client::from_conf(conf)
}

/// Spends moto's unauthenticated setup calls on [`ADMIN_USER`] and its key, then checks that
/// moto enforces: an unsigned-for identity is refused from here on.
async fn bootstrap_admin(endpoint: &str) -> Result<(String, String)> {
    let setup = iam_client_at(endpoint, SETUP_ACCESS_KEY_ID, "unchecked");
    let context = |what: &str| format!("moto setup: cannot {what}");
    setup
        .create_user()
        .user_name(ADMIN_USER)
        .send()
        .await
        .map_err(|e| Error::aws(context("create the admin user"), e))?;
    let allow_all = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#;
    setup
        .put_user_policy()
        .user_name(ADMIN_USER)
        .policy_name("allow-all")
        .policy_document(allow_all)
        .send()
        .await
        .map_err(|e| Error::aws(context("give the admin user its policy"), e))?;
    let key = setup
        .create_access_key()
        .user_name(ADMIN_USER)
        .send()
        .await
        .map_err(|e| Error::aws(context("create the admin key"), e))?;
    let key = key.access_key().ok_or_else(|| Error::new(ErrorKind::Aws, "moto setup: no admin key returned"))?;
    let admin = (key.access_key_id().to_string(), key.secret_access_key().to_string());
    for account in OTHER_ACCOUNTS {
        let trust = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":"*"},"Action":"sts:AssumeRole"}]}"#;
        setup
            .create_role()
            .role_name(ACCOUNT_ADMIN_ROLE)
            .assume_role_policy_document(trust)
            .customize()
            // moto's server takes the account of an unchecked call from this header.
            .mutate_request(move |r| {
                r.headers_mut().insert("x-moto-account-id", account);
            })
            .send()
            .await
            .map_err(|e| Error::aws(context(&format!("create the admin role of account {account}")), e))?;
        setup
            .put_role_policy()
            .role_name(ACCOUNT_ADMIN_ROLE)
            .policy_name("allow-all")
            .policy_document(allow_all)
            .customize()
            // moto's server takes the account of an unchecked call from this header.
            .mutate_request(move |r| {
                r.headers_mut().insert("x-moto-account-id", account);
            })
            .send()
            .await
            .map_err(|e| Error::aws(context(&format!("give the admin role of account {account} its policy")), e))?;
    }
    if setup.list_users().send().await.is_ok() {
        return Err(Error::new(
            ErrorKind::Startup,
            "moto accepts unauthenticated calls after the setup window: INITIAL_NO_AUTH_ACTION_COUNT had no effect",
        ));
    }
    Ok(admin)
}

fn output_of(mut cmd: Command) -> Output {
    match cmd.output() {
        Ok(out) => out,
        Err(e) => Output {
            status: ExitStatus::from_raw(127 << 8),
            stdout: Vec::new(),
            stderr: format!("testenv: cannot run {:?}: {e}", cmd.get_program()).into_bytes(),
        },
    }
}

async fn apply_crds(client: &kube::Client, dir: &Path) -> Result<Vec<String>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| Error::io(format!("cannot read {}", dir.display()), e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "yaml" || ext == "yml"))
        .collect();
    files.sort();
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    let mut openapi_paths = Vec::new();
    for file in &files {
        let text = fs::read_to_string(file).map_err(|e| Error::io(format!("cannot read {}", file.display()), e))?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let bad = |e: serde_yaml::Error| {
                Error::with_source(ErrorKind::Other, format!("{} is not a list of CRDs", file.display()), e)
            };
            let value = serde_yaml::Value::deserialize(doc).map_err(bad)?;
            if value.is_null() {
                continue;
            }
            let crd: CustomResourceDefinition = serde_yaml::from_value(value).map_err(bad)?;
            let name = crd
                .metadata
                .name
                .clone()
                .ok_or_else(|| Error::new(ErrorKind::Other, format!("a CRD in {} has no name", file.display())))?;
            api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&crd))
                .await
                .map_err(|e| Error::kube(format!("cannot apply CRD {name}"), e))?;
            for version in crd.spec.versions.iter().filter(|v| v.served) {
                openapi_paths.push(format!("\"apis/{}/{}\"", crd.spec.group, version.name));
            }
            names.push(name);
        }
    }
    for name in &names {
        let deadline = Instant::now() + CRD_TIMEOUT;
        loop {
            let crd = api.get(name).await.map_err(|e| Error::kube(format!("cannot read CRD {name}"), e))?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::new(
                    ErrorKind::Kube,
                    format!("CRD {name} not Established after {}s", CRD_TIMEOUT.as_secs()),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }
    // Established means served; `kubectl explain` and server-side apply's field management
    // also need the schema published in the OpenAPI document, which lags a little.
    let deadline = Instant::now() + CRD_TIMEOUT;
    for path in &openapi_paths {
        loop {
            let published = match http::Request::get("/openapi/v3").body(Vec::new()) {
                Ok(req) => client.request_text(req).await.is_ok_and(|doc| doc.contains(path.as_str())),
                Err(_) => true,
            };
            if published {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::new(
                    ErrorKind::Kube,
                    format!("{path} not in /openapi/v3 after {}s", CRD_TIMEOUT.as_secs()),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }
    Ok(names)
}

/// The environment shared by all tests of this test binary, started on first use with the
/// repository's `crds/` applied (if that directory exists). Blocks while it starts; torn down
/// when the process exits.
///
/// # Panics
///
/// If the environment cannot start (every caller panics with the same message; the start is
/// tried once).
pub fn shared() -> &'static TestEnv {
    match try_shared() {
        Ok(env) => env,
        Err(e) => panic!("{e}"),
    }
}

/// [`shared()`] without the panic.
pub fn try_shared() -> std::result::Result<&'static TestEnv, &'static str> {
    static SHARED: OnceLock<std::result::Result<TestEnv, String>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let mut opts = Options::default();
            let crds = repo_root().join("crds");
            if crds.is_dir() {
                opts.crds_dir = Some(crds);
            }
            TestEnv::start(opts).map_err(|e| format!("testenv: the shared environment did not start: {e}"))
        })
        .as_ref()
        .map_err(String::as_str)
}
