//! What a benchmark run measured, kept as JSON (target/bench/results.json) so that scenarios
//! run one at a time add up, and `--report` renders docs/benchmarks.md from it.

use std::{collections::BTreeMap, path::Path};

use serde::{Deserialize, Serialize};

use crate::{operator::Flags, procfs::CpuUse};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub runs: Vec<RunInfo>,
    pub convergence: Vec<Convergence>,
    pub latency: Option<Latency>,
    pub steady: Option<Steady>,
    pub restart: Option<Restart>,
    pub empty: Option<Empty>,
    pub unrelated: Option<Unrelated>,
    /// Older results files have none.
    #[serde(default)]
    pub aws_like: Vec<AwsLike>,
}

/// One invocation of the harness: where and with what it ran.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunInfo {
    pub command: String,
    pub started_at: String,
    pub finished_at: String,
    pub wall_secs: f64,
    pub machine: BTreeMap<String, String>,
    pub versions: BTreeMap<String, String>,
    /// 1-minute load average at the start, before anything of ours ran.
    pub loadavg_start: f64,
    /// CPU seconds per process over the whole run, and what the rest of the machine used.
    pub cpu: CpuUse,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Convergence {
    /// `floor` or `operator`.
    pub who: String,
    pub n: usize,
    pub concurrency: u16,
    /// The operator's flags (`--iam-rate` etc.), empty for the floor.
    pub flags: String,
    pub iam_rate: Option<f64>,
    /// Creating the N resources (the harness, 16 creates in flight).
    pub apply_secs: f64,
    /// From the first create to the last resource seen Ready.
    pub converge_secs: f64,
    pub first_ready_secs: f64,
    /// Seconds from the first create at which each resource was seen Ready, sorted.
    pub ready_offsets: Vec<f64>,
    /// Per resource, create returned -> seen Ready, during the bulk: p50 and p99.
    pub apply_to_ready_p50: f64,
    pub apply_to_ready_p99: f64,
    /// Resources whose Secret does not hold the key status names, once all were Ready.
    pub secret_mismatches: usize,
    /// IAM/STS calls by operation until quiet (the operator's metrics, or the floor's count).
    pub iam_calls: BTreeMap<String, f64>,
    pub iam_errors: f64,
    /// Requests moto logged over the same span (cross-check of the total).
    pub moto_requests: u64,
    /// Kubernetes writes the operator counts itself (`kind verb`).
    pub own_kube_writes: BTreeMap<String, f64>,
    /// The API server's request counters over the same span (`VERB resource`), less the
    /// harness's own creates of the N resources and its watch.
    pub apiserver_requests: BTreeMap<String, f64>,
    pub reconciles: BTreeMap<String, f64>,
    /// Seconds after the last Ready until the operator went quiet (no reconcile for 3 s).
    pub settle_secs: f64,
    pub cpu: CpuUse,
    /// CPU seconds of the operator from the first create until quiet.
    pub operator_cpu_secs: Option<f64>,
    pub rss_start_kib: Option<u64>,
    pub rss_peak_kib: Option<u64>,
    pub rss_steady_kib: Option<u64>,
    pub idle: Option<Idle>,
    /// Average size of one IamAccessKey as JSON once converged, and of its managedFields.
    pub object_json_bytes: f64,
    pub managed_fields_json_bytes: f64,
    /// Lowest and highest `iam_key_operator_iam_rate_limit` while converging, read once a second
    /// (runs at the adaptive default rate only).
    pub iam_rate_limit: Option<(f64, f64)>,
}

/// The operator at default flags against IAM through the fault proxy's AWS-like profile
/// (`testenv::proxy::Faults::aws_like`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AwsLike {
    /// The account's quota the proxy enforced (IAM and STS calls per second).
    pub throttle_rps: f64,
    /// The convergence run: timing, the operator's own counts, Kubernetes requests, CPU, RSS.
    pub run: Convergence,
    /// What the proxy received from the operator's start until it was quiet: by action, and by
    /// what the proxy did (`Forwarded(200)`, `Throttled`, `NewKeyRefused`, `Busy`, ...).
    pub calls: BTreeMap<String, usize>,
    pub outcomes: BTreeMap<String, usize>,
    /// `Throttling` answers: in all, and the most within any 1 s window; the most calls within
    /// any 1 s window.
    pub throttled: usize,
    pub throttled_max_1s: usize,
    pub calls_max_1s: usize,
    /// Keys IAM made (`CreateAccessKey` answered 200).
    pub new_keys: usize,
    /// STS verification calls (`GetCallerIdentity`, every outcome).
    pub verifications: usize,
    /// Calls signed with a key IAM had not propagated yet (`InvalidClientTokenId`).
    pub new_key_refused: usize,
}

impl AwsLike {
    pub fn total(&self) -> usize {
        self.calls.values().sum()
    }

    /// The calls the account's quota admitted (all but the `Throttling` answers, which take no
    /// share of it): what converging took at best at the quota.
    pub fn needed(&self) -> usize {
        self.total() - self.throttled
    }

    /// 1.2 × the time the needed calls take at the quota.
    pub fn bound_secs(&self) -> f64 {
        1.2 * self.needed() as f64 / self.throttle_rps
    }

    pub fn throttled_fraction(&self) -> f64 {
        self.throttled as f64 / self.total().max(1) as f64
    }

    pub fn verifications_per_key(&self) -> f64 {
        self.verifications as f64 / self.new_keys.max(1) as f64
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Idle {
    pub window_secs: f64,
    pub cpu_secs: f64,
    pub iam_calls: f64,
    pub kube_writes: f64,
}

impl Idle {
    pub fn ms_per_sec(&self) -> f64 {
        if self.window_secs > 0.0 { self.cpu_secs * 1000.0 / self.window_secs } else { 0.0 }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Latency {
    pub flags: String,
    pub samples: Vec<f64>,
    pub gap_secs: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub iam_calls_per_resource: BTreeMap<String, f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Steady {
    pub n: usize,
    pub flags: String,
    /// The short `--resync` and `--last-used-refresh` used (seconds; equal, as the defaults).
    pub period_secs: f64,
    pub window_secs: f64,
    pub iam_calls: BTreeMap<String, f64>,
    pub moto_requests: u64,
    pub own_kube_writes: BTreeMap<String, f64>,
    pub apiserver_requests: BTreeMap<String, f64>,
    pub reconciles: BTreeMap<String, f64>,
    pub cpu: CpuUse,
    pub operator_cpu_secs: f64,
    /// Resources reconciled at least once since the operator started (N when it kept up).
    pub seen: usize,
}

impl Steady {
    /// Calls of `op` per key per hour at the default `--resync 1h --last-used-refresh 1h`:
    /// every timer scales with the period, so calls per key per period carry over.
    pub fn per_key_hour(&self, count: f64) -> f64 {
        count / self.n as f64 * self.period_secs / self.window_secs
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Restart {
    pub n: usize,
    pub flags: String,
    pub iam_rate: f64,
    pub iam_burst: u32,
    pub ready_secs: f64,
    /// From process start until every resource was reconciled once.
    pub first_pass_secs: f64,
    pub iam_calls: BTreeMap<String, f64>,
    pub moto_requests: u64,
    pub own_kube_writes: BTreeMap<String, f64>,
    pub apiserver_requests: BTreeMap<String, f64>,
    pub reconciles: BTreeMap<String, f64>,
    /// (seconds since start, cumulative IAM calls, resources reconciled).
    pub timeline: Vec<(f64, f64, usize)>,
    pub peak_rate_1s: f64,
    pub peak_rate_5s: f64,
    pub mean_rate: f64,
    pub cpu: CpuUse,
    pub operator_cpu_secs: f64,
    pub rss_peak_kib: u64,
    pub rss_steady_kib: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Empty {
    pub rss_steady_kib: u64,
    pub rss_peak_kib: u64,
    pub ready_secs: f64,
    pub idle: Idle,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Unrelated {
    pub n: usize,
    pub secrets: usize,
    pub secret_bytes: usize,
    pub create_secs: f64,
    pub etcd_db_before: f64,
    pub etcd_db_after: f64,
    pub etcd_quota: f64,
    pub apiserver_rss_before_kib: u64,
    pub apiserver_rss_after_kib: u64,
    /// The running operator (it had N resources): RSS before and after the Secrets appeared.
    pub running_rss_before_kib: u64,
    pub running_rss_after_kib: u64,
    pub running_hwm_after_kib: u64,
    /// A fresh operator started with the Secrets present, after its first pass.
    pub fresh_rss_kib: u64,
    pub fresh_hwm_kib: u64,
    pub fresh_first_pass_secs: f64,
    /// The same, without the Secrets (the restart scenario's operator), for comparison.
    pub baseline_rss_kib: u64,
    pub baseline_hwm_kib: u64,
}

impl Results {
    pub fn load(path: &Path) -> Results {
        std::fs::read_to_string(path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
    }

    pub fn save(&self, path: &Path) {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::write(path, serde_json::to_string_pretty(self).expect("json")).expect("write results");
    }

    /// Replace the run of the same kind, N and flags, or add it.
    pub fn put_convergence(&mut self, c: Convergence) {
        self.convergence.retain(|x| !(x.who == c.who && x.n == c.n && x.flags == c.flags));
        self.convergence.push(c);
        self.convergence.sort_by(|a, b| (a.n, &a.who, &a.flags).cmp(&(b.n, &b.who, &b.flags)));
    }

    /// Replace the AWS-like run of the same N and quota, or add it.
    pub fn put_aws_like(&mut self, a: AwsLike) {
        self.aws_like.retain(|x| !(x.run.n == a.run.n && x.throttle_rps == a.throttle_rps));
        self.aws_like.push(a);
        self.aws_like.sort_by(|a, b| a.run.n.cmp(&b.run.n).then(a.throttle_rps.total_cmp(&b.throttle_rps)));
    }

    /// The operator's run at N on moto with every flag at its default.
    pub fn operator_defaults(&self, n: usize) -> Option<&Convergence> {
        self.convergence.iter().find(|c| c.who == "operator" && c.n == n && c.flags == Flags::default().describe())
    }

    pub fn floor(&self, n: usize) -> Option<&Convergence> {
        self.convergence.iter().find(|c| c.who == "floor" && c.n == n)
    }

    /// The operator's run at N with unlimited IAM rate, else the fastest one.
    pub fn operator_fast(&self, n: usize) -> Option<&Convergence> {
        let runs: Vec<&Convergence> = self.convergence.iter().filter(|c| c.who == "operator" && c.n == n).collect();
        runs.iter()
            .find(|c| c.iam_rate == Some(0.0))
            .copied()
            .or_else(|| runs.into_iter().min_by(|a, b| a.converge_secs.total_cmp(&b.converge_secs)))
    }
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
