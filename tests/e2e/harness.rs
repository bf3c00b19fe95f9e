//! The test harness itself: the real parts start, answer, and never outlive a test run.
//!
//! Needs `make tools` (the Kubernetes binaries and moto).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, ListParams};
use testenv::{Options, TestEnv, pid_alive};

/// Polls `cond` every 100 ms until it holds or `timeout` passes.
async fn eventually(timeout: Duration, mut cond: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cond().await
}

fn wait_gone(pids: &[u32], timeout: Duration) -> Vec<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|p| pid_alive(*p)).collect();
        if alive.is_empty() || Instant::now() > deadline {
            return alive;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn moto_answers_iam_and_sts() {
    let env = testenv::shared();
    let iam = env.iam_client();

    let user = env.fresh_iam_user("harness").await.unwrap();
    let created = iam.create_access_key().user_name(&user).send().await.unwrap();
    let key = created.access_key().unwrap();
    assert_eq!(key.user_name(), user);
    assert_eq!(key.status().as_str(), "Active");

    let listed = iam.list_access_keys().user_name(&user).send().await.unwrap();
    let ids: Vec<&str> = listed.access_key_metadata().iter().filter_map(|k| k.access_key_id()).collect();
    assert_eq!(ids, vec![key.access_key_id()]);

    // STS with the new key answers with the user's own ARN (not moto's default identity).
    let user_arn = iam.get_user().user_name(&user).send().await.unwrap().user().unwrap().arn().to_string();
    let identity =
        env.sts_client(key.access_key_id(), key.secret_access_key()).get_caller_identity().send().await.unwrap();
    assert_eq!(identity.arn(), Some(user_arn.as_str()));
}

#[tokio::test]
async fn fresh_iam_users_are_unique_and_keep_their_path() {
    let env = testenv::shared();
    let a = env.fresh_iam_user("same").await.unwrap();
    let b = env.fresh_iam_user("same").await.unwrap();
    assert_ne!(a, b);
    let c = env.fresh_iam_user_with_path("pathed", "/k8s/team-a/").await.unwrap();
    let got = env.iam_client().get_user().user_name(&c).send().await.unwrap();
    assert_eq!(got.user().unwrap().path(), "/k8s/team-a/");
}

#[tokio::test]
async fn apiserver_lists_and_creates_namespaces() {
    let env = testenv::shared();
    let api: Api<Namespace> = Api::all(env.kube_client().await.unwrap());
    let names: Vec<String> =
        api.list(&ListParams::default()).await.unwrap().items.into_iter().filter_map(|ns| ns.metadata.name).collect();
    assert!(names.iter().any(|n| n == "default"), "{names:?}");

    let ns = env.fresh_namespace("Harness_NS").await.unwrap();
    assert!(ns.starts_with("harness-ns-"), "{ns}");
    let other = env.fresh_namespace("Harness_NS").await.unwrap();
    assert_ne!(ns, other);
    assert!(api.get_opt(&ns).await.unwrap().is_some());
}

#[tokio::test]
async fn namespace_controller_deletes_namespaces() {
    let env = testenv::shared();
    let api: Api<Namespace> = Api::all(env.kube_client().await.unwrap());
    let ns = env.fresh_namespace("doomed").await.unwrap();
    api.delete(&ns, &DeleteParams::default()).await.unwrap();
    let gone = eventually(Duration::from_secs(60), async || matches!(api.get_opt(&ns).await, Ok(None))).await;
    assert!(gone, "namespace {ns} still exists: is the namespace controller running?");
}

#[tokio::test]
async fn kubectl_and_crds_work() {
    let env = testenv::shared();
    let out = env.kubectl(["get", "namespaces", "-o", "name"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("namespace/default"));
    let out = env.helm(["list", "--all-namespaces"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("widgets.yaml"),
        r#"# two documents, the first empty
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.harness.keyop.dev
spec:
  group: harness.keyop.dev
  names: {kind: Widget, plural: widgets, singular: widget, listKind: WidgetList}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                size: {type: integer, minimum: 1}
"#,
    )
    .unwrap();
    let names = env.install_crds(dir.path()).await.unwrap();
    assert_eq!(names, vec!["widgets.harness.keyop.dev".to_string()]);

    let ns = env.fresh_namespace("widgets").await.unwrap();
    let manifest = dir.path().join("w.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: harness.keyop.dev/v1\nkind: Widget\nmetadata: {{name: w, namespace: {ns}}}\nspec: {{size: 0}}\n"
        ),
    )
    .unwrap();
    // The schema is enforced by the real apiserver.
    let refused = env.kubectl(["apply".as_ref(), "-f".as_ref(), manifest.as_os_str()]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("spec.size"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[test]
fn env_vars_point_children_at_the_environment() {
    let env = testenv::shared();
    let vars: std::collections::BTreeMap<String, String> = env.env_vars().into_iter().collect();
    assert_eq!(vars["KUBECONFIG"], env.kubeconfig_path().display().to_string());
    assert_eq!(vars["AWS_ENDPOINT_URL_IAM"], env.iam_endpoint());
    assert_eq!(vars["AWS_ENDPOINT_URL_STS"], env.iam_endpoint());
    assert_eq!(vars["AWS_REGION"], "us-east-1");
    // command() sets them, and removes what could send an AWS client elsewhere.
    let cmd = env.command("true");
    let envs: std::collections::BTreeMap<_, _> = cmd
        .get_envs()
        .map(|(k, v)| (k.to_string_lossy().into_owned(), v.map(|v| v.to_string_lossy().into_owned())))
        .collect();
    assert_eq!(envs["AWS_PROFILE"], None);
    assert_eq!(envs["AWS_SESSION_TOKEN"], None);
    assert_eq!(envs["AWS_ACCESS_KEY_ID"].as_deref(), Some(env.admin_credentials().0));
}

/// moto checks signatures and policies, as IAM does: a wrong or truncated secret is refused,
/// so "the Secret's key authenticates" proves the secret is right. (moto's default mode accepts
/// any secret for a known key id.)
#[tokio::test]
async fn moto_refuses_a_wrong_or_truncated_secret_and_unauthorized_calls() {
    let env = testenv::shared();
    let user = env.fresh_iam_user("sigcheck").await.unwrap();
    let key = env.iam_client().create_access_key().user_name(&user).send().await.unwrap();
    let key = key.access_key().unwrap();
    let (id, secret) = (key.access_key_id(), key.secret_access_key());
    assert!(env.sts_client(id, secret).get_caller_identity().send().await.is_ok(), "the right secret works");
    let mut wrong = secret.to_string();
    let last = wrong.pop().unwrap();
    wrong.push(if last == 'A' { 'B' } else { 'A' });
    for (what, bad) in [("wrong", wrong.as_str()), ("truncated", &secret[..39])] {
        // moto nests its error in `<Errors>`, which the SDK does not parse: read the raw answer.
        let answer = format!("{:?}", env.sts_client(id, bad).get_caller_identity().send().await);
        assert!(answer.contains("<Code>SignatureDoesNotMatch</Code>"), "a {what} secret is refused: {answer}");
    }
    // A key with no policy may authenticate but not act.
    let denied = format!("{:?}", env.iam_client_for(id, secret).list_users().send().await);
    assert!(denied.contains("AccessDenied"), "{denied}");
}

#[test]
fn dropping_an_env_kills_its_processes_and_removes_its_dir() {
    let env = TestEnv::start(Options::default()).unwrap();
    let pids = env.child_pids();
    let names: Vec<String> = env.processes().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["moto", "etcd", "kube-apiserver", "kube-controller-manager"]);
    let dir = env.dir().to_path_buf();
    assert!(dir.is_dir());
    assert!(pids.iter().all(|p| pid_alive(*p)));
    eprintln!("separate env started in {:?}", env.startup_duration());

    drop(env);
    assert_eq!(wait_gone(&pids, Duration::ZERO), Vec::<u32>::new());
    assert!(!dir.exists(), "{} still exists", dir.display());
}

// --- Teardown of an environment that is never dropped, in a process of its own. -------------

const HELPER_VAR: &str = "IKO_HARNESS_HELPER";

/// Not a test on its own: the body of the two tests below, run in a child process. It starts
/// the shared environment (a static, never dropped), prints its pids and directory, then
/// either returns (the process exits normally) or waits to be killed.
#[test]
fn helper_process_with_shared_env() {
    let Ok(mode) = std::env::var(HELPER_VAR) else {
        return;
    };
    let env = testenv::shared();
    let pids: Vec<String> = env.child_pids().iter().map(u32::to_string).collect();
    println!("PIDS {}", pids.join(" "));
    println!("DIR {}", env.dir().display());
    println!("READY");
    match mode.as_str() {
        // Until killed, or until the parent test process goes away (closing our stdin).
        "hang" => {
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
        }
        "panic" => panic!("a failing test: the process still exits through exit()"),
        _ => {}
    }
}

struct Helper {
    child: std::process::Child,
    pids: Vec<u32>,
    dir: PathBuf,
}

fn start_helper(mode: &str) -> Helper {
    let stderr_log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "harness::helper_process_with_shared_env", "--nocapture", "--test-threads=1"])
        .env(HELPER_VAR, mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        // Not inherited: the panic mode's message would look like a failure of this run.
        .stderr(stderr_log.reopen().unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Read to the end even when nobody listens any more: a closed pipe would make the
        // helper's last prints fail, and with them its exit status.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut pids, mut dir) = (Vec::new(), None);
    loop {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(180)) else {
            let stderr = std::fs::read_to_string(stderr_log.path()).unwrap_or_default();
            panic!("the helper process did not report its environment; its stderr:\n{stderr}");
        };
        // The harness prints "test NAME ... " without a newline before the test's own output.
        if let Some((_, rest)) = line.split_once("PIDS ") {
            pids = rest.split(' ').map(|p| p.parse().unwrap()).collect();
        } else if let Some((_, rest)) = line.split_once("DIR ") {
            dir = Some(PathBuf::from(rest));
        } else if line.ends_with("READY") {
            break;
        }
    }
    assert_eq!(pids.len(), 4, "{pids:?}");
    Helper { child, pids, dir: dir.unwrap() }
}

#[test]
fn process_exit_tears_down_a_never_dropped_env() {
    // Both a passing and a failing test binary exit through exit(), which runs atexit.
    let helpers = [start_helper("exit"), start_helper("panic")];
    for (mut helper, passes) in helpers.into_iter().zip([true, false]) {
        let status = helper.child.wait().unwrap();
        assert_eq!(status.success(), passes);
        // atexit has killed and reaped them before the helper exited.
        assert_eq!(wait_gone(&helper.pids, Duration::ZERO), Vec::<u32>::new());
        assert!(!helper.dir.exists(), "{} still exists", helper.dir.display());
    }
}

#[test]
fn a_killed_test_process_leaves_no_process_behind() {
    let mut helper = start_helper("hang");
    assert!(helper.pids.iter().all(|p| pid_alive(*p)));
    helper.child.kill().unwrap(); // SIGKILL: no atexit, no destructor
    helper.child.wait().unwrap();
    // PR_SET_PDEATHSIG: the kernel kills them; init reaps them.
    assert_eq!(wait_gone(&helper.pids, Duration::from_secs(10)), Vec::<u32>::new());
    // Its directory is left behind, and the next start of any environment removes it: that may be
    // another test of this binary starting one meanwhile, so only the end state is certain.
    testenv::sweep_stale_dirs();
    assert!(!helper.dir.exists(), "{} still exists", helper.dir.display());
}
