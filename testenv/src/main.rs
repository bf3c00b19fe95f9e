//! `testenv up --state-dir DIR [--crds DIR] [--no-controller-manager]`: starts the environment,
//! writes `DIR/env` and `DIR/pids`, and stays in the foreground until SIGTERM or SIGINT.
//!
//! `testenv down --state-dir DIR`: stops the `up` process of DIR and waits until every process
//! it started is gone.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use testenv::{AWS_VARS_REMOVED, Options, TestEnv, pid_alive};

const USAGE: &str = "usage:
  testenv up --state-dir DIR [--crds DIR] [--no-controller-manager]
      start etcd, kube-apiserver, kube-controller-manager and moto on 127.0.0.1; write
      DIR/env (shell exports) and DIR/pids; run until SIGTERM/SIGINT, then stop them all
  testenv down --state-dir DIR [--timeout SECONDS]
      stop the environment of DIR and wait until all its processes are gone

Binaries: IKO_K8S_BIN / IKO_MOTO_SERVER, else hack/k8s-tools.sh --path / hack/moto.sh --path
(run `make tools` first).";

/// How long `down` waits for the `up` process to stop everything before killing stragglers.
const DEFAULT_DOWN_TIMEOUT: Duration = Duration::from_secs(60);

struct Args {
    command: String,
    state_dir: PathBuf,
    crds: Option<PathBuf>,
    controller_manager: bool,
    timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let command = args.next().ok_or("missing command")?;
    if command == "-h" || command == "--help" || command == "help" {
        return Err(String::new());
    }
    if command != "up" && command != "down" {
        return Err(format!("unknown command {command:?}"));
    }
    let mut state_dir = None;
    let mut crds = None;
    let mut controller_manager = true;
    let mut timeout = DEFAULT_DOWN_TIMEOUT;
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let mut value = |name: &str| inline.clone().or_else(|| args.next()).ok_or(format!("{name} needs a value"));
        match flag.as_str() {
            "--state-dir" => state_dir = Some(PathBuf::from(value("--state-dir")?)),
            "--crds" if command == "up" => crds = Some(PathBuf::from(value("--crds")?)),
            "--no-controller-manager" if command == "up" => controller_manager = false,
            "--timeout" if command == "down" => {
                let secs: u64 =
                    value("--timeout")?.parse().map_err(|_| "--timeout needs a number of seconds".to_string())?;
                timeout = Duration::from_secs(secs);
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?} for {command}")),
        }
    }
    Ok(Args { command, state_dir: state_dir.ok_or("--state-dir DIR is required")?, crds, controller_manager, timeout })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(msg) if msg.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("testenv: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match args.command.as_str() {
        "up" => up(&args),
        _ => down(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("testenv: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// One line of `DIR/pids`: `PID NAME`; the first line is the `up` process itself.
struct PidEntry {
    pid: u32,
    name: String,
}

fn read_pids(path: &Path) -> Vec<PidEntry> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (pid, name) = line.trim().split_once(' ')?;
            Some(PidEntry { pid: pid.parse().ok()?, name: name.trim().to_string() })
        })
        .collect()
}

/// Whether `pid` is alive and still the process named `name` (not a reused pid).
fn is_process(pid: u32, name: &str) -> bool {
    if !pid_alive(pid) {
        return false;
    }
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let program = match name {
        "moto" => "moto_server",
        "up" => "testenv",
        other => other,
    };
    cmdline
        .split(|b| *b == 0)
        .take(2) // the program, or the script after an interpreter
        .any(|arg| String::from_utf8_lossy(arg).contains(program))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn write_atomic(path: &Path, contents: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, contents)
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn up(args: &Args) -> Result<(), String> {
    let dir = &args.state_dir;
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let dir = dir.canonicalize().map_err(|e| format!("cannot resolve {}: {e}", dir.display()))?;
    let (env_file, pids_file) = (dir.join("env"), dir.join("pids"));
    if let Some(first) = read_pids(&pids_file).first()
        && first.name == "up"
        && is_process(first.pid, "up")
    {
        return Err(format!(
            "an environment is already up in {} (pid {}); run `testenv down --state-dir {}`",
            dir.display(),
            first.pid,
            dir.display()
        ));
    }
    // Stale files must not be taken for this run's (the Makefile waits for DIR/env).
    let _ = fs::remove_file(&env_file);
    let _ = fs::remove_file(&pids_file);

    let mut opts = Options::default().state_dir(&dir).controller_manager(args.controller_manager);
    opts.crds_dir = args.crds.clone();
    eprintln!("testenv: starting in {}", dir.display());
    let env = TestEnv::start(opts).map_err(|e| e.to_string())?;

    let mut pids = format!("{} up\n", std::process::id());
    for (name, pid) in env.processes() {
        pids.push_str(&format!("{pid} {name}\n"));
    }
    write_atomic(&pids_file, &pids)?;

    let mut exports = String::from("# written by `testenv up`; source it: . ");
    exports.push_str(&env_file.display().to_string());
    exports.push('\n');
    for var in AWS_VARS_REMOVED {
        exports.push_str(&format!("unset {var}\n"));
    }
    for (k, v) in env.env_vars() {
        exports.push_str(&format!("export {k}={}\n", shell_quote(&v)));
    }
    exports.push_str(&format!("export PATH={}:\"$PATH\"\n", shell_quote(&env.bin_dir().display().to_string())));
    write_atomic(&env_file, &exports)?;

    println!(
        "testenv: up in {:.1}s
  kube-apiserver  {}
  IAM/STS (moto)  {}
  etcd            {}
  logs            {}
use it:
  . {}
  kubectl get namespaces
stop it:
  testenv down --state-dir {}",
        env.startup_duration().as_secs_f64(),
        env.apiserver_url(),
        env.iam_endpoint(),
        env.etcd_url(),
        env.dir().join("logs").display(),
        env_file.display(),
        dir.display(),
    );

    let outcome = wait_for_stop(&env);
    eprintln!("testenv: stopping");
    drop(env);
    let _ = fs::remove_file(&env_file);
    let _ = fs::remove_file(&pids_file);
    eprintln!("testenv: stopped");
    outcome
}

/// Waits for SIGTERM or SIGINT; fails if a child process exits on its own meanwhile.
fn wait_for_stop(env: &TestEnv) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build a tokio runtime: {e}"))?;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("cannot handle SIGINT: {e}"))?;
        let mut check = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
                _ = check.tick() => {
                    if let Some((name, status)) = env.exited_process() {
                        return Err(format!(
                            "{name} exited ({status}); see {}",
                            env.log_path(&name).display()
                        ));
                    }
                }
            }
        }
    })
}

fn down(args: &Args) -> Result<(), String> {
    let dir = &args.state_dir;
    let pids_file = dir.join("pids");
    let entries = read_pids(&pids_file);
    if entries.is_empty() {
        eprintln!("testenv: nothing is up in {}", dir.display());
        let _ = fs::remove_file(dir.join("env"));
        return Ok(());
    }
    let alive = |e: &PidEntry| is_process(e.pid, &e.name);
    if let Some(up) = entries.iter().find(|e| e.name == "up")
        && alive(up)
    {
        eprintln!("testenv: stopping pid {}", up.pid);
        signal(up.pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + args.timeout;
    while entries.iter().any(alive) {
        if Instant::now() > deadline {
            // The `up` process is stuck or gone; kill what is left, checked by name.
            for e in entries.iter().filter(|e| alive(e)) {
                eprintln!("testenv: killing {} (pid {})", e.name, e.pid);
                signal(e.pid, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(500));
            let left: Vec<String> =
                entries.iter().filter(|e| alive(e)).map(|e| format!("{} (pid {})", e.name, e.pid)).collect();
            if !left.is_empty() {
                return Err(format!("still running: {}", left.join(", ")));
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = fs::remove_file(dir.join("env"));
    let _ = fs::remove_file(&pids_file);
    eprintln!("testenv: down");
    Ok(())
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: plain syscall.
        unsafe { libc::kill(pid, sig) };
    }
}
