//! Child processes that cannot outlive the test process.
//!
//! Three layers, each covering what the one before cannot:
//!
//! 1. `Drop` of a [`crate::TestEnv`] kills and reaps its children and removes its directory.
//! 2. An `atexit` handler does the same for every environment still registered when the process
//!    exits normally: statics (such as [`crate::shared`]) are never dropped, but `exit()` runs
//!    it, also after panicking tests, since the test harness exits through `exit()`.
//! 3. Every child gets `PR_SET_PDEATHSIG = SIGKILL`, so the kernel kills it if the test process
//!    dies without running `atexit` (SIGKILL, abort, Ctrl-C). The death signal follows the
//!    *thread* that forked the child, so all children are forked by one spawner thread that lives
//!    as long as the process. Directories left behind that way are removed by the next start
//!    (see [`sweep_stale_dirs`]).
//!
//! Each child leads its own process group, so a kill reaches anything it forked too, and a
//! terminal's Ctrl-C reaches only the test process (the children then die by layer 3).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, Once, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};

/// Name of the file, in an environment's directory, that holds the owning process id.
pub(crate) const OWNER_FILE: &str = "owner.pid";
/// Set (to anything) to keep the directories (logs, certificates) of environments after their
/// processes are stopped.
pub const KEEP_VAR: &str = "IKO_TESTENV_KEEP";
/// Prefix of the temporary directories of environments.
pub(crate) const TEMP_PREFIX: &str = "iko-testenv-";

/// How long a graceful stop waits for SIGTERM to work before SIGKILL.
const GRACE: Duration = Duration::from_secs(15);

pub(crate) struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

pub(crate) struct Resources {
    pub dir: PathBuf,
    /// Remove `dir` on teardown (a temporary directory), or leave it (a state directory).
    pub remove_dir: bool,
    /// SIGTERM first (a state directory whose etcd data should close cleanly), or SIGKILL.
    pub graceful: bool,
    pub procs: Vec<Proc>,
}

static REGISTRY: Mutex<BTreeMap<u64, Resources>> = Mutex::new(BTreeMap::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static ATEXIT: Once = Once::new();

fn registry() -> MutexGuard<'static, BTreeMap<u64, Resources>> {
    // A panic while holding the lock leaves the map itself consistent.
    REGISTRY.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Registers an environment's resources; from here on, teardown is guaranteed.
pub(crate) fn register(res: Resources) -> u64 {
    ATEXIT.call_once(|| {
        // SAFETY: registering a plain `extern "C" fn` without arguments.
        unsafe {
            libc::atexit(teardown_all_at_exit);
        }
    });
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    registry().insert(id, res);
    id
}

extern "C" fn teardown_all_at_exit() {
    // Unwinding out of an `extern "C"` function aborts; nothing here should panic, but be sure.
    let _ = std::panic::catch_unwind(|| {
        let all = std::mem::take(&mut *registry());
        for (_, res) in all.into_iter().rev() {
            teardown_resources(res, false);
        }
    });
}

/// Kills and reaps every child of environment `id` and removes its directory (unless it is a
/// state directory, or `keep_dir`: a failed start keeps its logs for the error message).
pub(crate) fn teardown(id: u64, keep_dir: bool) {
    let res = registry().remove(&id);
    if let Some(res) = res {
        teardown_resources(res, keep_dir);
    }
}

fn teardown_resources(mut res: Resources, keep_dir: bool) {
    // Reverse start order: controller-manager and apiserver before etcd.
    while let Some(mut proc) = res.procs.pop() {
        stop(&mut proc, res.graceful);
    }
    let asked_to_keep = res.remove_dir && std::env::var_os(KEEP_VAR).is_some();
    if keep_dir || asked_to_keep {
        // The logs (and certificates) are the diagnosis; the etcd data is only bulk. A directory
        // kept after a failed start is swept by a later start once this process is gone; one
        // kept on request is not.
        let _ = fs::remove_dir_all(res.dir.join("etcd"));
        if asked_to_keep {
            let _ = fs::remove_file(res.dir.join(OWNER_FILE));
            eprintln!("testenv: {KEEP_VAR} is set: kept {}", res.dir.display());
        }
    } else if res.remove_dir {
        let _ = fs::remove_dir_all(&res.dir);
    }
}

fn stop(proc: &mut Proc, graceful: bool) {
    // Signal only an unreaped child: its pid (and process group id) cannot have been reused.
    if !matches!(proc.child.try_wait(), Ok(None)) {
        return;
    }
    let pgid = proc.child.id() as libc::pid_t;
    if graceful {
        // SAFETY: plain syscall on a process group this process created.
        unsafe { libc::killpg(pgid, libc::SIGTERM) };
        let deadline = Instant::now() + GRACE;
        while Instant::now() < deadline {
            if !matches!(proc.child.try_wait(), Ok(None)) {
                // The leader is gone. Anything it forked would keep the group id alive (the
                // kernel does not reuse an id still in use as a group id): kill that too.
                // SAFETY: as above.
                unsafe { libc::killpg(pgid, libc::SIGKILL) };
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
    // SAFETY: as above.
    unsafe { libc::killpg(pgid, libc::SIGKILL) };
    let _ = proc.child.wait();
}

struct SpawnRequest {
    command: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// The thread that forks every child (see the module doc: PDEATHSIG follows the forking thread).
fn spawner() -> Result<&'static mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<std::result::Result<mpsc::Sender<SpawnRequest>, String>> = OnceLock::new();
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<SpawnRequest>();
            thread::Builder::new()
                .name("testenv-spawner".into())
                .spawn(move || {
                    // The sender lives in a static, so this loop never ends, and this thread
                    // lives as long as the process.
                    for mut req in rx {
                        let _ = req.reply.send(req.command.spawn());
                    }
                    loop {
                        thread::park();
                    }
                })
                .map_err(|e| format!("cannot start the process spawner thread: {e}"))?;
            Ok(tx)
        })
        .as_ref()
        .map_err(|e| Error::new(ErrorKind::Io, e.clone()))
}

/// Starts `command` as process `name` of environment `id`, with stdout and stderr appended to
/// `log`, and records it for teardown. Returns its pid.
pub(crate) fn spawn(id: u64, name: &str, mut command: Command, log: &Path) -> Result<u32> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Error::io(format!("cannot open {}", log.display()), e))?;
    let err = out.try_clone().map_err(|e| Error::io(format!("cannot open {}", log.display()), e))?;
    command.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure only makes async-signal-safe syscalls (prctl, getppid, _exit).
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody would kill us.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let program = command.get_program().to_string_lossy().into_owned();
    let (reply, answer) = mpsc::channel();
    spawner()?
        .send(SpawnRequest { command, reply })
        .map_err(|_| Error::new(ErrorKind::Io, "the process spawner thread is gone"))?;
    let child = answer
        .recv()
        .map_err(|_| Error::new(ErrorKind::Io, "the process spawner thread is gone"))?
        .map_err(|e| Error::io(format!("cannot start {name} ({program})"), e))?;
    let pid = child.id();
    let mut reg = registry();
    match reg.get_mut(&id) {
        Some(res) => {
            res.procs.push(Proc { name: name.to_string(), child, log: log.to_path_buf() });
            Ok(pid)
        }
        None => {
            // The environment was torn down meanwhile (process exit): do not leak this one.
            drop(reg);
            let mut proc = Proc { name: name.to_string(), child, log: log.to_path_buf() };
            stop(&mut proc, false);
            Err(Error::new(ErrorKind::Startup, format!("environment torn down while starting {name}")))
        }
    }
}

/// If process `name` of environment `id` has exited: its status and log path.
pub(crate) fn exited(id: u64, name: &str) -> Option<(ExitStatus, PathBuf)> {
    let mut reg = registry();
    let proc = reg.get_mut(&id)?.procs.iter_mut().find(|p| p.name == name)?;
    match proc.child.try_wait() {
        Ok(Some(status)) => Some((status, proc.log.clone())),
        _ => None,
    }
}

/// The first child of environment `id` that has exited, if any.
pub(crate) fn first_exited(id: u64) -> Option<(String, ExitStatus, PathBuf)> {
    let mut reg = registry();
    for proc in reg.get_mut(&id)?.procs.iter_mut() {
        if let Ok(Some(status)) = proc.child.try_wait() {
            return Some((proc.name.clone(), status, proc.log.clone()));
        }
    }
    None
}

/// `(name, pid)` of every child of environment `id`, in start order.
pub(crate) fn pids(id: u64) -> Vec<(String, u32)> {
    registry()
        .get(&id)
        .map(|res| res.procs.iter().map(|p| (p.name.clone(), p.child.id())).collect())
        .unwrap_or_default()
}

/// Whether a process with this pid is running (a zombie, dead but not yet reaped, is not).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    if rc != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    // `/proc/PID/stat`: "pid (comm) S ...", where comm may itself contain ") ".
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next()), Some('Z' | 'X')),
        Err(_) => false,
    }
}

/// Removes temporary directories of environments whose owning process is gone (it was killed
/// before its `atexit` could run); their children are already dead (PDEATHSIG). Every start
/// does this; it is public for tests of that guarantee.
pub fn sweep_stale_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(TEMP_PREFIX) {
            continue;
        }
        let dir = entry.path();
        let owner = fs::read_to_string(dir.join(OWNER_FILE)).ok().and_then(|s| s.trim().parse::<u32>().ok());
        if let Some(owner) = owner
            && owner != std::process::id()
            && !pid_alive(owner)
        {
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

/// The last `lines` lines of a log file (for error messages).
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            all[start..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}
