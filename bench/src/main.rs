//! `make bench`: how fast, how frugal and how small iam-key-operator is, measured against a
//! real kube-apiserver + etcd and moto (the `testenv` crate), and against the floor those two
//! set. See docs/benchmarks.md, which `--report` writes.
//!
//! ```text
//! hack/build-image-binary.sh && cargo run --release -p bench -- --all --report   # what make bench does
//! cargo run --release -p bench -- --convergence --floor --n 200                  # one part, small
//! cargo run -p bench -- --timeline      # redraw the rotation timeline in docs/ (no environment)
//! ```

mod cluster;
mod floor;
mod operator;
mod procfs;
mod prom;
mod report;
mod results;
mod svg;
mod timeline;

use std::{
    collections::{BTreeMap, HashSet},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use clap::Parser;
use kube::Client;
use testenv::{
    TestEnv,
    proxy::{Call, FaultProxy, Faults, Outcome, by_action, by_outcome, max_in_window},
};

use crate::{
    cluster::{Item, ReadyWatch},
    operator::{Flags, Operator},
    procfs::{cpu_between, cpu_snapshot},
    results::{AwsLike, Convergence, Empty, Idle, Latency, Restart, Results, RunInfo, Steady, Unrelated, percentile},
};

/// A rate the operator's default (adaptive) limit stays above, in calls per second, for
/// timeouts: it starts at half of `--iam-rate-max` (50) and rises against moto; under the
/// AWS-like profile it settles near the quota (20/s by default).
const OPERATOR_DEFAULT_RATE: f64 = 10.0;
/// The operator's own default `--iam-burst`.
const OPERATOR_DEFAULT_BURST: u32 = 20;
/// Creates in flight while applying N resources (as a GitOps sync or a large `kubectl apply`).
const APPLY_CONCURRENCY: usize = 16;

#[derive(Parser, Debug, Clone)]
#[command(about = "Benchmarks of iam-key-operator against a local kube-apiserver + etcd and moto")]
struct Args {
    /// Every scenario below, in one environment (what `make bench` runs). With no scenario
    /// chosen, --floor and --convergence run.
    #[arg(long)]
    all: bool,
    /// The floor: a minimal client making only CreateAccessKey, TagUser, create Secret and one
    /// status patch per resource, for each --n.
    #[arg(long)]
    floor: bool,
    /// The operator converging each --n resources applied at once (per --iam-rate, and also at
    /// its default rate for each --default-rate-n), then idle for --idle-secs.
    #[arg(long)]
    convergence: bool,
    /// apply -> Ready of single resources on an idle operator (default flags).
    #[arg(long)]
    latency: bool,
    /// IAM calls and writes per key per hour once converged (--steady-n resources).
    #[arg(long)]
    steady: bool,
    /// Restart the operator with --restart-n Ready resources: first pass, IAM calls, call rate.
    #[arg(long)]
    restart: bool,
    /// The operator with no resource: RSS and idle CPU.
    #[arg(long)]
    empty: bool,
    /// RSS with --unrelated-secrets Secrets of --unrelated-bytes each next to --restart-n resources.
    #[arg(long)]
    unrelated: bool,
    /// The operator at default flags converging each --aws-like-n resources against an AWS-like
    /// IAM: a proxy in front of moto with latency, new keys refused for seconds, an account quota
    /// of --aws-like-throttle calls per second and transient 409s (testenv::proxy).
    #[arg(long)]
    aws_like: bool,
    /// Write docs/benchmarks.md and docs/img/*.svg from the results file.
    #[arg(long)]
    report: bool,
    /// Start from empty results instead of adding to the results file.
    #[arg(long)]
    fresh: bool,

    /// Numbers of resources for --floor and --convergence.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
    n: Vec<usize>,
    /// The operator's --concurrency, and the floor's.
    #[arg(long, default_value_t = 8)]
    concurrency: u16,
    /// The operator's --iam-rate for convergence runs (0: unlimited).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    iam_rate: Vec<f64>,
    /// N for which convergence also runs with the operator's default flags (adaptive IAM rate).
    #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
    default_rate_n: Vec<usize>,
    /// Numbers of resources for --aws-like.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
    aws_like_n: Vec<usize>,
    /// The AWS-like account quota: IAM and STS calls per second above which IAM answers
    /// `Throttling`.
    #[arg(long, default_value_t = 20.0)]
    aws_like_throttle: f64,
    /// Seconds of idle measurement after each unlimited-rate convergence (0: none).
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    #[arg(long, default_value_t = 100)]
    latency_samples: usize,
    /// Pause between two single-resource samples, so the IAM token bucket refills.
    #[arg(long, default_value_t = 1000)]
    latency_gap_ms: u64,
    /// Resources of the steady-state run. Keep N / period well inside what the operator can
    /// reconcile per second: past it, kube-runtime's scheduler starves some resources.
    #[arg(long, default_value_t = 100)]
    steady_n: usize,
    /// --resync and --last-used-refresh of the steady-state run (equal, like the defaults).
    #[arg(long, default_value_t = 30)]
    steady_period_secs: u64,
    /// Length of the steady-state window, in periods.
    #[arg(long, default_value_t = 6)]
    steady_periods: u32,
    #[arg(long, default_value_t = 5000)]
    restart_n: usize,
    /// The restarted operator's --iam-rate.
    #[arg(long, default_value_t = 50.0)]
    restart_iam_rate: f64,
    #[arg(long, default_value_t = 50_000)]
    unrelated_secrets: usize,
    #[arg(long, default_value_t = 10_240)]
    unrelated_bytes: usize,
    /// The operator binary (default: the one the image ships, as hack/build-image-binary.sh
    /// builds it: <arch>-unknown-linux-musl/release/iam-key-operator in $CARGO_TARGET_DIR, else in
    /// this repository's target/).
    #[arg(long)]
    operator_bin: Option<PathBuf>,
    /// Results file (default: target/bench/results.json).
    #[arg(long)]
    results: Option<PathBuf>,
    /// Only redraw the rotation timeline in docs/rotation.md and docs/rotation-timeline.svg from
    /// the planner's simulation (no environment needed).
    #[arg(long)]
    timeline: bool,
}

struct Bench {
    args: Args,
    env: TestEnv,
    client: Client,
    iam: aws_sdk_iam::Client,
    bin: PathBuf,
    log_dir: PathBuf,
    results: Results,
    results_path: PathBuf,
    /// Namespaces whose resources were converged by an operator in this process.
    converged: HashSet<String>,
}

fn main() {
    let args = Args::parse();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    rt.block_on(run(args));
}

async fn run(mut args: Args) {
    if args.timeline {
        timeline::write_docs(&testenv::repo_root());
        return;
    }
    if args.all {
        args.floor = true;
        args.convergence = true;
        args.latency = true;
        args.steady = true;
        args.restart = true;
        args.empty = true;
        args.unrelated = true;
        args.aws_like = true;
    }
    let measures = |a: &Args| {
        a.floor || a.convergence || a.latency || a.steady || a.restart || a.empty || a.unrelated || a.aws_like
    };
    if !measures(&args) && !args.report {
        // `bench --n 1000`: the floor and the operator's convergence.
        args.floor = true;
        args.convergence = true;
    }
    let root = testenv::repo_root();
    let results_path = args.results.clone().unwrap_or_else(|| root.join("target/bench/results.json"));
    let mut results = if args.fresh { Results::default() } else { Results::load(&results_path) };
    let measuring = measures(&args);
    if measuring {
        let started = Instant::now();
        let started_at = now_string();
        let loadavg_start = procfs::loadavg();
        let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
        let musl = format!("{}-unknown-linux-musl/release/iam-key-operator", std::env::consts::ARCH);
        let bin = args.operator_bin.clone().unwrap_or_else(|| target.join(musl));
        assert!(bin.is_file(), "{} is missing: run hack/build-image-binary.sh first (make bench does)", bin.display());
        eprintln!("bench: starting etcd, kube-apiserver, kube-controller-manager and moto ...");
        let env = TestEnv::start_async(testenv::Options::default().crds_dir(root.join("crds")))
            .await
            .unwrap_or_else(|e| panic!("testenv: {e}"));
        eprintln!("bench: environment up in {:.1}s ({})", env.startup_duration().as_secs_f64(), env.dir().display());
        let client = env.kube_client().await.expect("kube client");
        let iam = env.iam_client();
        cluster::allow_bench(&client).await;
        let log_dir = root.join("target/bench/logs");
        std::fs::create_dir_all(&log_dir).expect("log dir");
        let mut bench = Bench {
            args: args.clone(),
            client,
            iam,
            bin,
            log_dir,
            results,
            results_path: results_path.clone(),
            converged: HashSet::new(),
            env,
        };
        // The code measured is the code at the start, whatever is committed meanwhile.
        let versions = versions(&bench.bin, &bench.env);
        let all_cpu0 = cpu_snapshot(&bench.procs(None));
        bench.scenarios().await;
        let cpu = cpu_between(&all_cpu0, &cpu_snapshot(&bench.procs(None)));
        let info = RunInfo {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            started_at,
            finished_at: now_string(),
            wall_secs: started.elapsed().as_secs_f64(),
            machine: machine(),
            versions,
            loadavg_start,
            cpu,
        };
        bench.results.runs.push(info);
        bench.results.save(&bench.results_path);
        eprintln!("bench: results in {}", bench.results_path.display());
        results = bench.results.clone();
        drop(bench);
    }
    if args.report {
        report::write(&results, &root);
        eprintln!("bench: wrote docs/benchmarks.md and docs/img/");
    } else {
        report::print_summary(&results);
    }
}

fn now_string() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M:%S UTC").to_string()
}

impl Bench {
    async fn scenarios(&mut self) {
        let a = self.args.clone();
        if a.empty {
            self.empty().await;
            self.save();
        }
        let mut ns = a.n.clone();
        ns.sort();
        for &n in &ns {
            if a.floor {
                let c = self.floor(n).await;
                self.results.put_convergence(c);
                self.save();
            }
            if a.convergence {
                for &rate in &a.iam_rate {
                    let flags = Flags { iam_rate: Some(rate), concurrency: Some(a.concurrency), ..Default::default() };
                    let tag = if rate == 0.0 { "op".to_string() } else { format!("op{}", rate as u64) };
                    let (c, op) = self.converge(n, &tag, flags, a.idle_secs).await;
                    op.stop();
                    self.results.put_convergence(c);
                    self.save();
                }
                if a.default_rate_n.contains(&n) {
                    let flags = Flags::default();
                    let (c, op) = self.converge(n, "opd", flags, 0).await;
                    op.stop();
                    self.results.put_convergence(c);
                    self.save();
                }
            }
        }
        if a.latency {
            self.latency().await;
            self.save();
        }
        if a.steady {
            self.steady().await;
            self.save();
        }
        if a.restart {
            self.restart().await;
            self.save();
        }
        if a.unrelated {
            self.unrelated().await;
            self.save();
        }
        if a.aws_like {
            let mut ns = a.aws_like_n.clone();
            ns.sort();
            for n in ns {
                self.aws_like(n).await;
                self.save();
            }
        }
    }

    fn save(&self) {
        self.results.save(&self.results_path);
    }

    /// Our processes, by name, for CPU accounting.
    fn procs(&self, op: Option<&Operator>) -> Vec<(String, u32)> {
        let mut p: Vec<(String, u32)> = self.env.processes();
        p.push(("bench".into(), std::process::id()));
        if let Some(op) = op {
            p.push(("operator".into(), op.pid));
        }
        p
    }

    fn start_operator(&self, ns: &str, flags: &Flags) -> Operator {
        Operator::start(&self.env, &self.bin, ns, flags, &self.log_dir)
    }

    async fn prepare(&self, ns: &str, tag: &str, n: usize) -> Vec<Item> {
        cluster::create_namespace(&self.client, ns).await;
        let items = cluster::items(tag, n);
        let t = Instant::now();
        cluster::create_users(&self.iam, &items).await;
        eprintln!("  {n} IAM users in {:.1}s", t.elapsed().as_secs_f64());
        items
    }

    async fn floor(&mut self, n: usize) -> Convergence {
        let conc = self.args.concurrency;
        eprintln!("bench: floor, N={n}, concurrency {conc}");
        let ns = format!("{}-floor-{n}", cluster::PREFIX);
        let items = self.prepare(&ns, &format!("floor{n}"), n).await;
        let watch = ReadyWatch::start(&self.client, &ns).await;
        let api0 = cluster::apiserver_requests(&self.client).await;
        let moto0 = operator::moto_requests(&self.env);
        let cpu0 = cpu_snapshot(&self.procs(None));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let counts = floor::FloorCounts::default();
        let floor = floor::run(self.iam.clone(), self.client.clone(), ns.clone(), conc as usize, rx, &counts);
        let apply = cluster::apply(&self.client, &ns, &items, APPLY_CONCURRENCY, Some(tx));
        let (applied, ()) = futures::join!(apply, floor);
        assert!(watch.wait_count(n, Duration::from_secs(600)).await, "floor: not all Ready");
        let cpu1 = cpu_snapshot(&self.procs(None));
        let api1 = cluster::apiserver_requests(&self.client).await;
        let moto1 = operator::moto_requests(&self.env);
        let mut c = self.timing("floor", n, &applied, &watch);
        c.iam_calls = counts.iam_calls();
        c.own_kube_writes = counts.kube_writes();
        c.moto_requests = moto1 - moto0;
        c.apiserver_requests = harness_excluded(prom::delta(&api0, &api1), n);
        c.cpu = cpu_between(&cpu0, &cpu1);
        c.secret_mismatches = cluster::check(&self.client, &ns).await.mismatches;
        eprintln!("  floor N={n}: {:.2}s (apply {:.2}s)", c.converge_secs, c.apply_secs);
        c
    }

    fn timing(&self, who: &str, n: usize, applied: &cluster::Applied, watch: &ReadyWatch) -> Convergence {
        let ready = watch.times();
        let mut offsets: Vec<f64> =
            ready.values().map(|t| t.saturating_duration_since(applied.started).as_secs_f64()).collect();
        offsets.sort_by(f64::total_cmp);
        let mut lat: Vec<f64> = applied
            .created
            .iter()
            .filter_map(|(name, c)| ready.get(name).map(|r| r.saturating_duration_since(*c).as_secs_f64()))
            .collect();
        lat.sort_by(f64::total_cmp);
        Convergence {
            who: who.into(),
            n,
            concurrency: self.args.concurrency,
            apply_secs: applied.finished.duration_since(applied.started).as_secs_f64(),
            converge_secs: offsets.last().copied().unwrap_or(0.0),
            first_ready_secs: offsets.first().copied().unwrap_or(0.0),
            apply_to_ready_p50: percentile(&lat, 50.0),
            apply_to_ready_p99: percentile(&lat, 99.0),
            ready_offsets: offsets,
            ..Default::default()
        }
    }

    /// Apply N resources to a running, idle operator and wait until all are Ready; then until
    /// it is quiet; then `idle_secs` of idle measurement. Returns the operator still running.
    async fn converge(&mut self, n: usize, tag: &str, flags: Flags, idle_secs: u64) -> (Convergence, Operator) {
        eprintln!("bench: operator convergence, N={n}, {}", flags.describe());
        let ns = format!("{}-{tag}-{n}", cluster::PREFIX);
        let items = self.prepare(&ns, &format!("{tag}{n}"), n).await;
        let mut op = self.start_operator(&ns, &flags);
        op.wait_ready(Duration::from_secs(120)).await;
        let watch = ReadyWatch::start(&self.client, &ns).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let m0 = op.metrics().await;
        let api0 = cluster::apiserver_requests(&self.client).await;
        let moto0 = operator::moto_requests(&self.env);
        let cpu0 = cpu_snapshot(&self.procs(Some(&op)));
        let rss_start = op.mem().rss_kib;
        let op_cpu0 = op.cpu_seconds();
        let applied = cluster::apply(&self.client, &ns, &items, APPLY_CONCURRENCY, None).await;
        let rate = flags.iam_rate.unwrap_or(OPERATOR_DEFAULT_RATE);
        let timeout = if rate > 0.0 { n as f64 * 15.0 / rate + 600.0 } else { 1800.0 };
        let wait = watch.wait_count(n, Duration::from_secs_f64(timeout));
        // A fixed rate is in the flags; the adaptive one is read as it moves.
        let (all, rate_range) =
            if flags.iam_rate.is_none() { sampling_rate_limit(&op, wait).await } else { (wait.await, None) };
        if !all {
            eprintln!("  only {} of {n} Ready after {timeout:.0}s; log: {}", watch.count(), op.log_path.display());
        }
        let t_all = Instant::now();
        let m1 = settle(&op).await;
        let settle_secs = t_all.elapsed().as_secs_f64();
        let cpu1 = cpu_snapshot(&self.procs(Some(&op)));
        let op_cpu1 = op.cpu_seconds();
        let api1 = cluster::apiserver_requests(&self.client).await;
        let moto1 = operator::moto_requests(&self.env);
        let peak = op.mem().hwm_kib;
        let mut c = self.timing("operator", n, &applied, &watch);
        c.flags = flags.describe();
        c.iam_rate = Some(rate);
        c.iam_rate_limit = rate_range;
        c.iam_calls = prom::delta(&m0.iam_calls(), &m1.iam_calls());
        c.iam_errors = m1.iam_errors() - m0.iam_errors();
        c.moto_requests = moto1 - moto0;
        c.own_kube_writes = prom::delta(&m0.kube_writes(), &m1.kube_writes());
        c.apiserver_requests = harness_excluded(prom::delta(&api0, &api1), n);
        c.reconciles = prom::delta(&m0.reconciles(), &m1.reconciles());
        c.settle_secs = settle_secs;
        c.cpu = cpu_between(&cpu0, &cpu1);
        c.operator_cpu_secs = Some(op_cpu1 - op_cpu0);
        c.rss_start_kib = Some(rss_start);
        c.rss_peak_kib = Some(peak);
        tokio::time::sleep(Duration::from_secs(5)).await;
        c.rss_steady_kib = Some(op.mem().rss_kib);
        let check = cluster::check(&self.client, &ns).await;
        c.secret_mismatches = check.mismatches;
        c.object_json_bytes = check.object_bytes;
        c.managed_fields_json_bytes = check.managed_fields_bytes;
        if idle_secs > 0 {
            c.idle = Some(idle(&op, idle_secs).await);
        }
        if all {
            self.converged.insert(ns);
        }
        eprintln!(
            "  operator N={n}: {:.2}s (apply {:.2}s), IAM calls/resource {:.2}, CPU {:.1}s, RSS peak {} MiB",
            c.converge_secs,
            c.apply_secs,
            c.iam_calls.values().sum::<f64>() / n as f64,
            c.operator_cpu_secs.unwrap_or(0.0),
            peak / 1024
        );
        (c, op)
    }

    /// The convergence run at default flags, against IAM through the proxy's AWS-like profile;
    /// what the proxy saw of it.
    async fn aws_like(&mut self, n: usize) {
        let throttle = self.args.aws_like_throttle;
        eprintln!("bench: AWS-like IAM, account quota {throttle}/s, N={n}");
        // The operator signs with the admin key, which the proxy trusts already.
        let proxy = FaultProxy::start(&self.env, &[]).await;
        proxy.set(Faults::aws_like(throttle));
        let flags = Flags { env: proxy.operator_env(), ..Default::default() };
        let t0 = Instant::now();
        let (run, op) = self.converge(n, "aws", flags, 0).await;
        op.stop();
        let calls = proxy.calls_since(t0);
        let throttled: Vec<Call> = calls.iter().filter(|c| c.outcome == Outcome::Throttled).cloned().collect();
        let count = |action: &str, outcome: Option<Outcome>| {
            calls.iter().filter(|c| c.action == action && outcome.is_none_or(|o| c.outcome == o)).count()
        };
        let a = AwsLike {
            throttle_rps: throttle,
            calls: by_action(&calls),
            outcomes: by_outcome(&calls).into_iter().map(|(o, k)| (format!("{o:?}"), k)).collect(),
            throttled: throttled.len(),
            throttled_max_1s: max_in_window(&throttled, Duration::from_secs(1)).0,
            calls_max_1s: max_in_window(&calls, Duration::from_secs(1)).0,
            new_keys: count("CreateAccessKey", Some(Outcome::Forwarded(200))),
            verifications: count("GetCallerIdentity", None),
            new_key_refused: calls.iter().filter(|c| c.outcome == Outcome::NewKeyRefused).count(),
            run,
        };
        eprintln!(
            "  AWS-like N={n}: {:.1}s (bound {:.1}s), {} calls, {} throttled ({:.2}%), {:.2} GetCallerIdentity per new key",
            a.run.converge_secs,
            a.bound_secs(),
            a.total(),
            a.throttled,
            a.throttled_fraction() * 100.0,
            a.verifications_per_key()
        );
        self.results.put_aws_like(a);
    }

    /// A namespace with N Ready resources (converged at unlimited IAM rate if not done yet).
    async fn ensure_converged(&mut self, n: usize) -> String {
        let ns = format!("{}-op-{n}", cluster::PREFIX);
        if !self.converged.contains(&ns) {
            let flags = Flags { iam_rate: Some(0.0), concurrency: Some(self.args.concurrency), ..Default::default() };
            let (c, op) = self.converge(n, "op", flags, 0).await;
            op.stop();
            if !self.results.convergence.iter().any(|x| x.who == "operator" && x.n == n && x.flags == c.flags) {
                self.results.put_convergence(c);
            }
        }
        ns
    }

    async fn empty(&mut self) {
        eprintln!("bench: operator with no resource");
        let ns = format!("{}-empty", cluster::PREFIX);
        cluster::create_namespace(&self.client, &ns).await;
        let mut op = self.start_operator(&ns, &Flags::default());
        let ready = op.wait_ready(Duration::from_secs(60)).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let mem = op.mem();
        let idle = idle(&op, self.args.idle_secs.max(10)).await;
        self.results.empty = Some(Empty {
            rss_steady_kib: mem.rss_kib,
            rss_peak_kib: op.mem().hwm_kib,
            ready_secs: ready.as_secs_f64(),
            idle,
        });
        op.stop();
    }

    async fn latency(&mut self) {
        let samples = self.args.latency_samples;
        let flags = Flags::default();
        eprintln!("bench: single-resource latency, {samples} samples, operator {}", flags.describe());
        let ns = format!("{}-latency", cluster::PREFIX);
        let items = self.prepare(&ns, "lat", samples).await;
        let mut op = self.start_operator(&ns, &flags);
        op.wait_ready(Duration::from_secs(60)).await;
        let watch = ReadyWatch::start(&self.client, &ns).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let m0 = op.metrics().await;
        let gap = Duration::from_millis(self.args.latency_gap_ms);
        let mut lat = Vec::new();
        for item in &items {
            let t0 = Instant::now();
            cluster::apply(&self.client, &ns, std::slice::from_ref(item), 1, None).await;
            match watch.wait_name(&item.name, Duration::from_secs(120)).await {
                Some(t) => lat.push(t.duration_since(t0).as_secs_f64()),
                None => eprintln!("  {} not Ready within 120s", item.name),
            }
            tokio::time::sleep(gap).await;
        }
        let m1 = settle(&op).await;
        let calls = prom::delta(&m0.iam_calls(), &m1.iam_calls());
        let mut sorted = lat.clone();
        sorted.sort_by(f64::total_cmp);
        let per = calls.into_iter().map(|(k, v)| (k, v / samples as f64)).collect();
        let l = Latency {
            flags: flags.describe(),
            gap_secs: gap.as_secs_f64(),
            p50: percentile(&sorted, 50.0),
            p90: percentile(&sorted, 90.0),
            p99: percentile(&sorted, 99.0),
            max: sorted.last().copied().unwrap_or(0.0),
            samples: lat,
            iam_calls_per_resource: per,
        };
        eprintln!("  apply->Ready p50 {:.3}s p99 {:.3}s", l.p50, l.p99);
        self.results.latency = Some(l);
        op.stop();
    }

    async fn steady(&mut self) {
        let n = self.args.steady_n;
        let ns = self.ensure_converged(n).await;
        let period = self.args.steady_period_secs;
        let flags = Flags {
            iam_rate: Some(0.0),
            concurrency: Some(self.args.concurrency),
            resync: Some(format!("{period}s")),
            last_used_refresh: Some(format!("{period}s")),
            ..Default::default()
        };
        eprintln!("bench: steady state, N={n}, {}", flags.describe());
        let mut op = self.start_operator(&ns, &flags);
        op.wait_ready(Duration::from_secs(120)).await;
        wait_first_pass(&op, n, Duration::from_secs(300)).await;
        // One period for every resource's timers to be in their regular rhythm.
        tokio::time::sleep(Duration::from_secs(period)).await;
        let m0 = op.metrics().await;
        let api0 = cluster::apiserver_requests(&self.client).await;
        let moto0 = operator::moto_requests(&self.env);
        let cpu0 = cpu_snapshot(&self.procs(Some(&op)));
        let op_cpu0 = op.cpu_seconds();
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(period * u64::from(self.args.steady_periods))).await;
        let m1 = op.metrics().await;
        let window = t0.elapsed().as_secs_f64();
        let cpu1 = cpu_snapshot(&self.procs(Some(&op)));
        let api1 = cluster::apiserver_requests(&self.client).await;
        let moto1 = operator::moto_requests(&self.env);
        let s = Steady {
            n,
            flags: flags.describe(),
            period_secs: period as f64,
            window_secs: window,
            iam_calls: prom::delta(&m0.iam_calls(), &m1.iam_calls()),
            moto_requests: moto1 - moto0,
            own_kube_writes: prom::delta(&m0.kube_writes(), &m1.kube_writes()),
            apiserver_requests: prom::delta(&api0, &api1),
            reconciles: prom::delta(&m0.reconciles(), &m1.reconciles()),
            cpu: cpu_between(&cpu0, &cpu1),
            operator_cpu_secs: op.cpu_seconds() - op_cpu0,
            seen: m1.seen_resources(),
        };
        eprintln!(
            "  IAM calls per key per hour at default settings: {:.2}",
            s.per_key_hour(s.iam_calls.values().sum::<f64>())
        );
        self.results.steady = Some(s);
        op.stop();
    }

    async fn restart(&mut self) {
        let n = self.args.restart_n;
        let ns = self.ensure_converged(n).await;
        let rate = self.args.restart_iam_rate;
        let flags = Flags { iam_rate: Some(rate), concurrency: Some(self.args.concurrency), ..Default::default() };
        eprintln!("bench: restart with N={n} Ready resources, {}", flags.describe());
        let api0 = cluster::apiserver_requests(&self.client).await;
        let moto0 = operator::moto_requests(&self.env);
        let cpu0 = cpu_snapshot(&self.procs(None));
        let mut op = self.start_operator(&ns, &flags);
        let ready = op.wait_ready(Duration::from_secs(120)).await;
        let timeout = Duration::from_secs_f64(if rate > 0.0 { n as f64 * 3.0 / rate + 300.0 } else { 900.0 });
        let mut timeline = Vec::new();
        let mut first_pass = None;
        let mut last;
        loop {
            let t = op.started.elapsed().as_secs_f64();
            let m = op.metrics().await;
            let seen = m.seen_resources();
            timeline.push((t, m.iam_total(), seen));
            if first_pass.is_none() && seen >= n {
                first_pass = Some(t);
            }
            last = m;
            if let Some(fp) = first_pass
                && t > fp + 5.0
            {
                break;
            }
            if op.started.elapsed() > timeout {
                eprintln!("  first pass incomplete after {timeout:?}: {seen} of {n}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        let cpu1 = cpu_snapshot(&self.procs(Some(&op)));
        let api1 = cluster::apiserver_requests(&self.client).await;
        let moto1 = operator::moto_requests(&self.env);
        let op_cpu = op.cpu_seconds();
        let first_pass_secs = first_pass.unwrap_or(f64::NAN);
        let rate_over = |span: f64| {
            let mut best: f64 = 0.0;
            for i in 0..timeline.len() {
                if let Some(j) = (i + 1..timeline.len()).find(|&j| timeline[j].0 - timeline[i].0 >= span * 0.999) {
                    best = best.max((timeline[j].1 - timeline[i].1) / (timeline[j].0 - timeline[i].0));
                }
            }
            best
        };
        let calls = last.iam_calls();
        let total: f64 = calls.values().sum();
        let r = Restart {
            n,
            flags: flags.describe(),
            iam_rate: rate,
            iam_burst: OPERATOR_DEFAULT_BURST,
            ready_secs: ready.as_secs_f64(),
            first_pass_secs,
            iam_calls: calls,
            moto_requests: moto1 - moto0,
            own_kube_writes: last.kube_writes(),
            apiserver_requests: prom::delta(&api0, &api1),
            reconciles: last.reconciles(),
            peak_rate_1s: rate_over(1.0),
            peak_rate_5s: rate_over(5.0),
            mean_rate: total / timeline.last().map_or(1.0, |t| t.0),
            timeline,
            cpu: cpu_between(&cpu0, &cpu1),
            operator_cpu_secs: op_cpu,
            rss_peak_kib: op.mem().hwm_kib,
            rss_steady_kib: {
                tokio::time::sleep(Duration::from_secs(5)).await;
                op.mem().rss_kib
            },
        };
        eprintln!(
            "  first pass {:.1}s, {:.0} IAM calls, peak {:.1}/s (1 s), {:.1}/s (5 s)",
            r.first_pass_secs, total, r.peak_rate_1s, r.peak_rate_5s
        );
        self.results.restart = Some(r);
        op.stop();
    }

    async fn unrelated(&mut self) {
        let n = self.args.restart_n;
        let ns = self.ensure_converged(n).await;
        let (count, bytes) = (self.args.unrelated_secrets, self.args.unrelated_bytes);
        let flags = Flags { iam_rate: Some(0.0), concurrency: Some(self.args.concurrency), ..Default::default() };
        eprintln!("bench: {count} unrelated Secrets of {bytes} bytes next to N={n} resources");
        // Baseline: a fresh operator after its first pass, without the Secrets; it keeps
        // running while they are created.
        let mut op = self.start_operator(&ns, &flags);
        op.wait_ready(Duration::from_secs(120)).await;
        wait_first_pass(&op, n, Duration::from_secs(900)).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let baseline = op.mem();
        let apiserver_pid = self.env.processes().into_iter().find(|(p, _)| p == "kube-apiserver").map(|(_, pid)| pid);
        let apiserver_mem = || apiserver_pid.and_then(procfs::mem).unwrap_or_default();
        let (etcd_before, quota) = cluster::etcd_size(self.env.etcd_url()).await;
        let api_before = apiserver_mem();
        let create = cluster::unrelated_secrets(&self.client, &ns, count, bytes).await;
        tokio::time::sleep(Duration::from_secs(20)).await;
        let running_after = op.mem();
        let (etcd_after, _) = cluster::etcd_size(self.env.etcd_url()).await;
        let api_after = apiserver_mem();
        op.stop();
        let mut fresh = self.start_operator(&ns, &flags);
        fresh.wait_ready(Duration::from_secs(300)).await;
        let fp = wait_first_pass(&fresh, n, Duration::from_secs(900)).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let fresh_mem = fresh.mem();
        fresh.stop();
        let u = Unrelated {
            n,
            secrets: count,
            secret_bytes: bytes,
            create_secs: create.as_secs_f64(),
            etcd_db_before: etcd_before,
            etcd_db_after: etcd_after,
            etcd_quota: quota,
            apiserver_rss_before_kib: api_before.rss_kib,
            apiserver_rss_after_kib: api_after.rss_kib,
            running_rss_before_kib: baseline.rss_kib,
            running_rss_after_kib: running_after.rss_kib,
            running_hwm_after_kib: running_after.hwm_kib,
            fresh_rss_kib: fresh_mem.rss_kib,
            fresh_hwm_kib: fresh_mem.hwm_kib,
            fresh_first_pass_secs: fp,
            baseline_rss_kib: baseline.rss_kib,
            baseline_hwm_kib: baseline.hwm_kib,
        };
        eprintln!(
            "  operator RSS {} -> {} KiB while they were created; fresh start with them: {} KiB (without: {} KiB)",
            u.running_rss_before_kib, u.running_rss_after_kib, u.fresh_rss_kib, u.baseline_rss_kib
        );
        self.results.unrelated = Some(u);
    }
}

/// Drop the harness's own requests from API-server counts: its N creates and its watches.
fn harness_excluded(mut m: BTreeMap<String, f64>, n: usize) -> BTreeMap<String, f64> {
    if let Some(v) = m.get_mut("POST iamaccesskeys") {
        *v -= n as f64;
    }
    m.retain(|_, v| v.abs() > 1e-9);
    m
}

/// Wait until the operator has made no reconcile for 3 s (at most 60 s); its last metrics.
async fn settle(op: &Operator) -> operator::Metrics {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = op.metrics().await;
    let mut quiet_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let m = op.metrics().await;
        if m.reconciles_total() != last.reconciles_total() || m.iam_total() != last.iam_total() {
            quiet_since = Instant::now();
        }
        last = m;
        if quiet_since.elapsed() >= Duration::from_secs(3) || Instant::now() > deadline {
            return last;
        }
    }
}

/// `until`, while the operator's rate gauge is read once a second: its lowest and highest value.
async fn sampling_rate_limit<T>(op: &Operator, until: impl Future<Output = T>) -> (T, Option<(f64, f64)>) {
    let range = std::cell::Cell::new(None::<(f64, f64)>);
    let sample = async {
        loop {
            if let Some(r) = op.metrics().await.rate_limit() {
                let (lo, hi) = range.get().unwrap_or((r, r));
                range.set(Some((lo.min(r), hi.max(r))));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let out = tokio::select! {
        out = until => out,
        () = sample => unreachable!("the sampler never ends"),
    };
    (out, range.get())
}

/// Wait until every one of `n` resources was reconciled since the operator started; seconds
/// since its start.
async fn wait_first_pass(op: &Operator, n: usize, timeout: Duration) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = op.metrics().await.seen_resources();
        if seen >= n {
            return op.started.elapsed().as_secs_f64();
        }
        if Instant::now() > deadline {
            eprintln!("  first pass incomplete after {timeout:?}: {seen} of {n}");
            return f64::NAN;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// CPU, IAM calls and writes of a converged operator left alone for `secs`.
async fn idle(op: &Operator, secs: u64) -> Idle {
    // No scrape inside the window: rendering /metrics is work the operator would not do.
    let m0 = op.metrics().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let c0 = op.cpu_seconds();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let c1 = op.cpu_seconds();
    let window = t0.elapsed().as_secs_f64();
    let m1 = op.metrics().await;
    Idle {
        window_secs: window,
        cpu_secs: c1 - c0,
        iam_calls: m1.iam_total() - m0.iam_total(),
        kube_writes: m1.kube_writes().values().sum::<f64>() - m0.kube_writes().values().sum::<f64>(),
    }
}

fn machine() -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    m.insert("cpu".into(), model);
    m.insert("nproc".into(), std::thread::available_parallelism().map(|n| n.get().to_string()).unwrap_or_default());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    if let Some(kib) = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
    {
        m.insert("memory".into(), format!("{:.1} GiB", kib / 1024.0 / 1024.0));
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    m.insert("kernel".into(), kernel.trim().to_string());
    m
}

fn first_line(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&text).lines().next().unwrap_or_default().trim().to_string()
        })
        .unwrap_or_default()
}

fn versions(bin: &std::path::Path, env: &TestEnv) -> BTreeMap<String, String> {
    let root = testenv::repo_root();
    let mut v = BTreeMap::new();
    v.insert("iam-key-operator".into(), first_line(Command::new(bin).arg("--version")));
    let commit = Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let dirty = Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["status", "--porcelain", "--untracked-files=no", "--", "src", "Cargo.toml", "Cargo.lock"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    if !commit.is_empty() {
        v.insert(
            "commit".into(),
            format!("{commit}{}", if dirty { " (with uncommitted changes in src/)" } else { "" }),
        );
    }
    v.insert("rustc".into(), first_line(Command::new("rustc").arg("--version")));
    v.insert("kube-apiserver".into(), first_line(Command::new(env.bin_dir().join("kube-apiserver")).arg("--version")));
    v.insert("etcd".into(), first_line(Command::new(env.bin_dir().join("etcd")).arg("--version")));
    let versions_env = std::fs::read_to_string(root.join("hack/versions.env")).unwrap_or_default();
    if let Some(moto) = versions_env.lines().find_map(|l| l.strip_prefix("MOTO_VERSION=")) {
        v.insert("moto".into(), moto.trim().to_string());
    }
    v
}
