//! The operator under test: the release binary as a child process, its metrics, its memory.

use std::{
    collections::BTreeMap,
    fs::File,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use testenv::TestEnv;

use crate::{procfs, prom};

/// Ownership tags name this cluster: `bench/<namespace>/<name>`.
pub const CLUSTER: &str = "bench";

/// Flags of one operator process; `None` keeps the operator's default.
#[derive(Clone, Debug, Default)]
pub struct Flags {
    pub iam_rate: Option<f64>,
    pub iam_burst: Option<u32>,
    pub concurrency: Option<u16>,
    pub resync: Option<String>,
    pub last_used_refresh: Option<String>,
    /// Environment of the process, e.g. IAM and STS endpoints through a proxy (not flags: not in
    /// `describe`).
    pub env: Vec<(String, String)>,
}

impl Flags {
    pub fn args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if let Some(r) = self.iam_rate {
            a.extend(["--iam-rate".into(), format!("{r}")]);
        }
        if let Some(b) = self.iam_burst {
            a.extend(["--iam-burst".into(), b.to_string()]);
        }
        if let Some(c) = self.concurrency {
            a.extend(["--concurrency".into(), c.to_string()]);
        }
        if let Some(r) = &self.resync {
            a.extend(["--resync".into(), r.clone()]);
        }
        if let Some(r) = &self.last_used_refresh {
            a.extend(["--last-used-refresh".into(), r.clone()]);
        }
        a
    }

    /// The flags as a person would type them after `iam-key-operator run`.
    pub fn describe(&self) -> String {
        let a = self.args();
        if a.is_empty() { "(defaults)".into() } else { a.join(" ") }
    }
}

pub struct Operator {
    child: Child,
    pub pid: u32,
    pub addr: String,
    pub log_path: PathBuf,
    pub started: Instant,
    peak_rss_kib: Arc<AtomicU64>,
    stop_sampler: Arc<AtomicBool>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(18080)
}

impl Operator {
    /// Start `bin run --namespace ns ...` with the environment's kubeconfig and moto endpoint.
    pub fn start(env: &TestEnv, bin: &Path, namespace: &str, flags: &Flags, log_dir: &Path) -> Operator {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let log_path = log_dir.join(format!("operator-{namespace}-{port}.log"));
        let log = File::create(&log_path).expect("operator log file");
        let mut cmd = env.command(bin);
        cmd.args(["run", "--namespace", namespace, "--cluster-name", CLUSTER, "--metrics-addr", &addr])
            .args(flags.args())
            .envs(flags.env.iter().map(|(k, v)| (k, v)))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let pid = child.id();
        let peak_rss_kib = Arc::new(AtomicU64::new(0));
        let stop_sampler = Arc::new(AtomicBool::new(false));
        {
            // VmHWM gives the peak too; this sampler confirms it and survives a reset of it.
            let (peak, stop) = (peak_rss_kib.clone(), stop_sampler.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match procfs::mem(pid) {
                        Some(m) => {
                            peak.fetch_max(m.rss_kib, Ordering::Relaxed);
                        }
                        None => break,
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
        }
        Operator { child, pid, addr, log_path, started: Instant::now(), peak_rss_kib, stop_sampler }
    }

    /// Wait until `/readyz` answers 200 (its caches are filled). Returns the time since start.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Duration {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, _)) = prom::http_get(&self.addr, "/readyz").await {
                return self.started.elapsed();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the operator exited ({status}); log: {}\n{}", self.log_path.display(), self.log_tail(30));
            }
            assert!(
                Instant::now() < deadline,
                "operator not ready within {timeout:?}; log {}",
                self.log_path.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub async fn metrics(&self) -> Metrics {
        for _ in 0..50 {
            if let Ok((200, body)) = prom::http_get(&self.addr, "/metrics").await {
                return Metrics(prom::parse(&body));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("no /metrics from the operator at {}", self.addr);
    }

    pub fn mem(&self) -> procfs::Mem {
        let mut m = procfs::mem(self.pid).unwrap_or_default();
        m.hwm_kib = m.hwm_kib.max(self.peak_rss_kib.load(Ordering::Relaxed));
        m
    }

    pub fn cpu_seconds(&self) -> f64 {
        procfs::cpu_seconds(self.pid).unwrap_or(0.0)
    }

    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        self.stop_sampler.store(true, Ordering::Relaxed);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One scrape of the operator's `/metrics`.
pub struct Metrics(pub Vec<prom::Sample>);

impl Metrics {
    /// `iam_key_operator_iam_calls_total` by operation (all outcomes).
    pub fn iam_calls(&self) -> BTreeMap<String, f64> {
        prom::by(&self.0, "iam_key_operator_iam_calls_total", |s| Some(s.label("operation").to_string()))
    }

    pub fn iam_errors(&self) -> f64 {
        prom::sum(&self.0, "iam_key_operator_iam_calls_total", |s| s.label("outcome") != "ok")
    }

    /// `iam_key_operator_iam_rate_limit`: the IAM/STS rate the limiter grants now.
    pub fn rate_limit(&self) -> Option<f64> {
        self.0.iter().find(|s| s.name == "iam_key_operator_iam_rate_limit").map(|s| s.value)
    }

    pub fn iam_total(&self) -> f64 {
        prom::sum(&self.0, "iam_key_operator_iam_calls_total", |_| true)
    }

    /// `iam_key_operator_kube_writes_total` by `kind verb`.
    pub fn kube_writes(&self) -> BTreeMap<String, f64> {
        prom::by(&self.0, "iam_key_operator_kube_writes_total", |s| {
            Some(format!("{} {}", s.label("kind"), s.label("verb")))
        })
    }

    pub fn reconciles(&self) -> BTreeMap<String, f64> {
        prom::by(&self.0, "iam_key_operator_reconciles_total", |s| Some(s.label("result").to_string()))
    }

    pub fn reconciles_total(&self) -> f64 {
        prom::sum(&self.0, "iam_key_operator_reconciles_total", |_| true)
    }

    /// Resources reconciled at least once since the process started, whatever the outcome.
    pub fn seen_resources(&self) -> usize {
        self.0.iter().filter(|s| s.name == "iam_key_operator_condition").count()
    }
}

/// Number of requests moto has logged so far (`"POST / HTTP/1.1"` lines: IAM and STS alike).
pub fn moto_requests(env: &TestEnv) -> u64 {
    let text = std::fs::read(env.log_path("moto")).unwrap_or_default();
    let needle = b"\"POST / HTTP";
    text.windows(needle.len()).filter(|w| *w == needle).count() as u64
}
