//! The Argo CD customizations of argocd/resource_customizations, run the way Argo CD runs them:
//! every case of each kind's `health_test.yaml` and `actions/action_test.yaml`, in two
//! interpreters with the same expectations:
//!
//! - **gopher-lua**, the interpreter Argo CD embeds, at the version Argo CD's go.mod pins, with
//!   only the libraries and globals Argo CD gives an argocd-cm script (`hack/argocd-lua`: base,
//!   table and a safe `os`; `obj` and `actionParams`; results encoded as Argo CD encodes them);
//! - **Lua 5.1** (Debian's lua5.1), the language gopher-lua implements, as a second opinion.
//!
//! As in Argo CD's own tests the clock is fixed at 0001-01-01T00:00:00Z (gopher-lua: the
//! runner's clock; Lua 5.1: `os.date` replaced). Also: the health checks treat every condition
//! reason the operator can set as the operator does (the reasons come from the code), and
//! `argocd/argocd-cm.yaml` embeds exactly these scripts.
//!
//! The interpreters come from `hack/argocd-lua.sh` and `hack/lua.sh` (`make tools`), or
//! `IKO_ARGOCD_LUA` and `IKO_LUA`.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, OnceLock},
};

use iam_key_operator::{
    controller::policy_status::desired_statuses,
    crd::{PAUSED_ANNOTATION, ROTATE_REQUESTED_AT_ANNOTATION},
    error::Error,
    iam::IamError,
    plan::Blocked,
};
use serde::Deserialize;
use serde_json::{Value as Json, json};
use serde_yaml::Value as Yaml;

const GROUP: &str = "iam.keyop.dev";
const ACCESS_KEY: &str = "IamAccessKey";
const POLICY: &str = "IamAccessKeyPolicy";
/// Every kind with customizations, in the order argocd-cm.yaml lists them.
const KINDS: [&str; 2] = [ACCESS_KEY, POLICY];
/// What Argo CD's tests make the clock say, so expected outputs are stable.
const FIXED_DATE: &str = "0001-01-01T00:00:00Z";
const HEALTH_STATUSES: &[&str] = &["Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"];

fn customization_dir(kind: &str) -> PathBuf {
    testenv::repo_root().join("argocd/resource_customizations").join(GROUP).join(kind)
}

/// A tool's path: `env` if set, else what `hack/<script> --path` prints (asked once).
fn locate(cell: &'static OnceLock<PathBuf>, env: &str, script: &str) -> &'static Path {
    cell.get_or_init(|| {
        if let Some(path) = std::env::var_os(env).filter(|v| !v.is_empty()) {
            return PathBuf::from(path);
        }
        let path = testenv::repo_root().join("hack").join(script);
        let out = Command::new("bash").arg(&path).arg("--path").output().expect("run the locator");
        assert!(
            out.status.success(),
            "hack/{script} --path failed: run hack/{script} (make tools) or set {env}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Interpreter {
    /// `hack/argocd-lua`: gopher-lua as Argo CD runs it.
    GopherLua,
    /// Debian's lua5.1.
    Lua51,
}

const INTERPRETERS: [Interpreter; 2] = [Interpreter::GopherLua, Interpreter::Lua51];

#[derive(Clone, Copy, PartialEq)]
enum Clock {
    /// The time is FIXED_DATE (gopher-lua: the runner's clock; Lua 5.1: `os.date` answers it).
    Fixed,
    Real,
}

impl Interpreter {
    fn name(self) -> &'static str {
        match self {
            Interpreter::GopherLua => "gopher-lua",
            Interpreter::Lua51 => "lua5.1",
        }
    }

    /// Runs `script` with the global `obj` set to `input` and returns what it returned, as JSON.
    fn run(self, script: &Path, input: &Yaml, clock: Clock) -> Json {
        let (mut command, stdin) = match self {
            Interpreter::GopherLua => {
                static PATH: OnceLock<PathBuf> = OnceLock::new();
                let mut command = Command::new(locate(&PATH, "IKO_ARGOCD_LUA", "argocd-lua.sh"));
                if clock == Clock::Fixed {
                    command.arg("-now").arg(FIXED_DATE);
                }
                command.arg(script);
                (command, serde_json::to_vec(input).expect("the object as JSON"))
            }
            Interpreter::Lua51 => {
                static PATH: OnceLock<PathBuf> = OnceLock::new();
                let mut command = Command::new(locate(&PATH, "IKO_LUA", "lua.sh"));
                command.arg("-");
                let fixed_clock = match clock {
                    Clock::Fixed => format!("os.date = function() return {} end", lua_string(FIXED_DATE)),
                    Clock::Real => String::new(),
                };
                let program = format!(
                    "{PRELUDE}\n{fixed_clock}\nactionParams = {{}}\nobj = {obj}\n\
                     local chunk = assert(loadfile({path}))\nio.write(__encode(chunk()))\n",
                    obj = to_lua(input),
                    path = lua_string(script.to_str().expect("utf-8 path")),
                );
                (command, program.into_bytes())
            }
        };
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.name()));
        child.stdin.take().expect("stdin").write_all(&stdin).expect("write the input");
        let out = child.wait_with_output().expect("run the interpreter");
        assert!(
            out.status.success(),
            "{} in {} failed:\n{}",
            script.display(),
            self.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{} in {} returned no JSON ({e}): {}",
                script.display(),
                self.name(),
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

/// A Lua expression that builds the same value Argo CD hands a script: objects become tables
/// with string keys, arrays become sequences, null becomes nil.
fn to_lua(value: &Yaml) -> String {
    match value {
        Yaml::Null => "nil".into(),
        Yaml::Bool(b) => b.to_string(),
        Yaml::Number(n) => n.to_string(),
        Yaml::String(s) => lua_string(s),
        Yaml::Sequence(items) => format!("{{{}}}", items.iter().map(to_lua).collect::<Vec<_>>().join(", ")),
        Yaml::Mapping(map) => {
            let fields: Vec<String> = map
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        other => serde_yaml::to_string(other).expect("key").trim().to_string(),
                    };
                    format!("[{}] = {}", lua_string(&key), to_lua(v))
                })
                .collect();
            format!("{{{}}}", fields.join(", "))
        }
        Yaml::Tagged(tagged) => to_lua(&tagged.value),
    }
}

fn lua_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 32 || c as u32 == 127 => out.push_str(&format!("\\{:03}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Lua 5.1 only, before the script: a JSON encoder for the result.
const PRELUDE: &str = r#"
local function quote(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' elseif c == '\\' then return '\\\\' end
    return string.format('\\u%04x', c:byte())
  end) .. '"'
end
local function encode(v)
  local t = type(v)
  if t == "nil" then return "null"
  elseif t == "boolean" then return tostring(v)
  elseif t == "number" then
    if v == math.floor(v) and math.abs(v) < 2^53 then return string.format("%d", v) end
    return string.format("%.17g", v)
  elseif t == "string" then return quote(v)
  elseif t == "table" then
    local n = 0
    for _ in pairs(v) do n = n + 1 end
    local parts = {}
    if n > 0 and #v == n then
      for i = 1, n do parts[i] = encode(v[i]) end
      return "[" .. table.concat(parts, ",") .. "]"
    end
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = tostring(k) end
    table.sort(keys)
    for i, k in ipairs(keys) do
      local value = v[k]
      if value == nil then value = v[tonumber(k)] end
      parts[i] = quote(k) .. ":" .. encode(value)
    end
    return "{" .. table.concat(parts, ",") .. "}"
  end
  error("cannot encode a " .. t)
end
__encode = encode
"#;

fn read_yaml(path: &Path) -> Yaml {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// JSON with empty arrays and empty objects made alike (a Lua table cannot tell them apart;
/// Argo CD restores the live object's choice before patching).
fn normalized(value: Json) -> Json {
    match value {
        Json::Array(items) if items.is_empty() => Json::Object(Default::default()),
        Json::Array(items) => Json::Array(items.into_iter().map(normalized).collect()),
        Json::Object(map) => Json::Object(map.into_iter().map(|(k, v)| (k, normalized(v))).collect()),
        other => other,
    }
}

fn yaml_to_json(value: &Yaml) -> Json {
    normalized(serde_json::to_value(value).expect("YAML as JSON"))
}

/// The JSON merge patch (RFC 7386) from `live` to `new`: what Argo CD sends the API server after
/// an action returns `new`.
fn merge_patch(live: &Json, new: &Json) -> Json {
    match (live, new) {
        (Json::Object(live), Json::Object(new)) => {
            let mut patch = serde_json::Map::new();
            for (key, before) in live {
                match new.get(key) {
                    None => {
                        patch.insert(key.clone(), Json::Null);
                    }
                    Some(after) if after != before => {
                        patch.insert(key.clone(), merge_patch(before, after));
                    }
                    Some(_) => {}
                }
            }
            for (key, after) in new {
                if !live.contains_key(key) {
                    patch.insert(key.clone(), after.clone());
                }
            }
            Json::Object(patch)
        }
        _ => new.clone(),
    }
}

#[derive(Deserialize)]
struct HealthTests {
    tests: Vec<HealthTest>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HealthTest {
    health_status: HealthStatus,
    input_path: String,
}

#[derive(Deserialize, Debug, PartialEq)]
struct HealthStatus {
    status: String,
    #[serde(default)]
    message: String,
}

impl HealthStatus {
    fn from_json(got: &Json) -> Self {
        HealthStatus {
            status: got["status"].as_str().unwrap_or_default().to_string(),
            message: got["message"].as_str().unwrap_or_default().to_string(),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ActionTests {
    #[serde(default)]
    discovery_tests: Vec<DiscoveryTest>,
    #[serde(default)]
    action_tests: Vec<ActionTest>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DiscoveryTest {
    input_path: String,
    result: Vec<DiscoveredAction>,
}

#[derive(Deserialize, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct DiscoveredAction {
    name: String,
    #[serde(default)]
    disabled: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ActionTest {
    action: String,
    input_path: String,
    expected_output_path: String,
}

fn health_tests(kind: &str) -> HealthTests {
    let path = customization_dir(kind).join("health_test.yaml");
    serde_yaml::from_value(read_yaml(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn action_tests() -> ActionTests {
    let path = customization_dir(ACCESS_KEY).join("actions/action_test.yaml");
    serde_yaml::from_value(read_yaml(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What `kind`'s health.lua says of `obj` in `interpreter`.
fn health(interpreter: Interpreter, kind: &str, obj: &Yaml) -> HealthStatus {
    let got = HealthStatus::from_json(&interpreter.run(&customization_dir(kind).join("health.lua"), obj, Clock::Fixed));
    assert!(HEALTH_STATUSES.contains(&got.status.as_str()), "not an Argo CD health status: {got:?}");
    got
}

#[test]
fn health_check_gives_the_expected_status_and_message_for_every_test_case() {
    for (kind, min_cases, statuses_needed) in [
        (ACCESS_KEY, 20, &["Healthy", "Progressing", "Degraded", "Suspended"][..]),
        (POLICY, 5, &["Healthy", "Progressing", "Degraded"][..]),
    ] {
        let dir = customization_dir(kind);
        let tests = health_tests(kind);
        assert!(tests.tests.len() >= min_cases, "{kind}: too few health test cases");
        for interpreter in INTERPRETERS {
            let mut failures = Vec::new();
            let mut statuses = BTreeSet::new();
            for case in &tests.tests {
                let got = health(interpreter, kind, &read_yaml(&dir.join(&case.input_path)));
                statuses.insert(got.status.clone());
                if got != case.health_status {
                    failures
                        .push(format!("{}:\n  expected {:?}\n  got      {got:?}", case.input_path, case.health_status));
                }
            }
            assert!(
                failures.is_empty(),
                "{kind}/health.lua in {} disagrees with health_test.yaml:\n{}",
                interpreter.name(),
                failures.join("\n")
            );
            for status in statuses_needed {
                assert!(statuses.contains(*status), "{kind}: no test case ends {status}");
            }
        }
    }
}

/// One error of each kind the controller reports in an IamAccessKey's `Ready` condition.
fn every_ready_error() -> Vec<Error> {
    let iam = |e: fn(&'static str, String) -> IamError| Error::Iam(e("ListAccessKeys", "IAM says no".into()));
    let blocked = |blocked: Blocked| Error::Blocked { message: format!("blocked: {blocked:?}"), blocked };
    let errors = vec![
        iam(|operation, message| IamError::NotFound { operation, message }),
        iam(|operation, message| IamError::LimitExceeded { operation, message }),
        iam(|operation, message| IamError::AccessDenied { operation, message }),
        iam(|operation, message| IamError::Throttled { operation, message }),
        iam(|operation, message| IamError::Unavailable { operation, message }),
        iam(|operation, message| IamError::Busy { operation, message }),
        iam(|operation, message| IamError::Invalid { operation, message }),
        Error::Kube {
            call: "creating the Secret",
            source: kube::Error::Api(
                kube::core::Status::failure("secrets is forbidden", "Forbidden").with_code(403).boxed(),
            ),
        },
        Error::Internal("the policy decision asked for the user's details twice".into()),
        blocked(Blocked::Paused),
        blocked(Blocked::UserNotFound),
        blocked(Blocked::UserClaimed { by: "prod-us/team-billing/uploader".into() }),
        blocked(Blocked::SecretConflict),
        blocked(Blocked::KeyLimitExceeded { blocking: vec!["AKIARZPUZDIKAAAAAAAA".into()] }),
        blocked(Blocked::KeyUnused {
            access_key_id: "AKIARZPUZDIKINXY7HTD".into(),
            since: jiff::Timestamp::UNIX_EPOCH,
        }),
        blocked(Blocked::AdoptionRefused(iam_key_operator::plan::AdoptionRefusal::NotTheUsersKey {
            access_key_id: "AKIARZPUZDIKAAAAAAAA".into(),
            user: "billing-uploader".into(),
        })),
        blocked(Blocked::MergeNotAllowed { policies: vec!["tenants".into()] }),
        blocked(Blocked::SecretNotFound),
        Error::VerifyFailed {
            access_key_id: "AKIARZPUZDIKQ3M5WJ2P".into(),
            user_arn: "arn:aws:iam::123456789012:user/billing-uploader".into(),
            answer: "InvalidClientTokenId".into(),
        },
        Error::NotAuthorized("no IamAccessKeyPolicy allows it".into()),
        Error::PolicyViolation("spec.rotation.interval is too short".into()),
        Error::AccountConflict("rules that name different AWS accounts allow it".into()),
        Error::AccountChanged("the keys are in another account".into()),
        Error::Iam(IamError::AssumeRoleFailed {
            role_arn: "arn:aws:iam::222222222222:role/iam-key-operator".into(),
            cause: Box::new(IamError::AccessDenied { operation: "AssumeRole", message: "not allowed".into() }),
        }),
        Error::Invalid("spec.secret.name is taken".into()),
        Error::InvalidTemplate(iam_key_operator::template::TemplateError {
            key: Some("password".into()),
            line: Some(1),
            column: Some(4),
            problem: "missing argument; fix the template".into(),
        }),
        Error::Finalizer { what: "could not add the finalizer", source: None },
    ];
    for e in &errors {
        listed_in_every_ready_error(e);
    }
    errors
}

/// Fails to compile when the controller gets a new kind of error: add one to
/// `every_ready_error` above, then give its reason a deliberate health status.
fn listed_in_every_ready_error(e: &Error) {
    match e {
        Error::Iam(
            IamError::NotFound { .. }
            | IamError::LimitExceeded { .. }
            | IamError::AccessDenied { .. }
            | IamError::Throttled { .. }
            | IamError::Unavailable { .. }
            | IamError::Busy { .. }
            | IamError::Invalid { .. }
            | IamError::AssumeRoleFailed { .. },
        )
        | Error::Kube { .. }
        | Error::Internal(_)
        | Error::Blocked {
            blocked:
                Blocked::Paused
                | Blocked::UserNotFound
                | Blocked::UserClaimed { .. }
                | Blocked::SecretConflict
                | Blocked::KeyLimitExceeded { .. }
                | Blocked::KeyUnused { .. }
                | Blocked::AdoptionRefused(_)
                | Blocked::MergeNotAllowed { .. }
                | Blocked::SecretNotFound,
            ..
        }
        | Error::VerifyFailed { .. }
        | Error::NotAuthorized(_)
        | Error::PolicyViolation(_)
        | Error::AccountConflict(_)
        | Error::AccountChanged(_)
        | Error::Invalid(_)
        | Error::InvalidTemplate(_)
        | Error::Finalizer { .. } => {}
    }
}

#[test]
fn health_check_covers_every_condition_reason_the_operator_sets() {
    // Each reason the code can set (and the Ready reason itself) appears in some test case, so a
    // new reason gets a deliberate health status and an example in health_test.yaml.
    let dir = customization_dir(ACCESS_KEY);
    let mut reasons_tested = BTreeSet::new();
    for entry in std::fs::read_dir(dir.join("testdata")).expect("testdata") {
        let obj = read_yaml(&entry.expect("entry").path());
        for c in obj["status"]["conditions"].as_sequence().into_iter().flatten() {
            if let Some(reason) = c["reason"].as_str() {
                reasons_tested.insert(reason.to_string());
            }
        }
    }
    let reasons: BTreeSet<&str> = every_ready_error().iter().map(Error::reason).chain(["Ready"]).collect();
    let missing: Vec<&&str> = reasons.iter().filter(|r| !reasons_tested.contains(**r)).collect();
    assert!(missing.is_empty(), "no IamAccessKey health test case has Ready reason {missing:?}");
}

#[test]
fn health_check_treats_each_reason_as_the_operator_does() {
    // The status each reason gets follows from the code: Paused is Suspended, a failure the
    // operator retries by itself (Error::is_retryable) is Progressing, any other needs a person
    // and is Degraded; the condition's message is kept.
    let template = read_yaml(&customization_dir(ACCESS_KEY).join("testdata/healthy.yaml"));
    for error in every_ready_error() {
        let (reason, message) = (error.reason(), error.to_string());
        let mut obj = template.clone();
        let ready = &mut obj["status"]["conditions"][0];
        assert_eq!(ready["type"].as_str(), Some("Ready"), "testdata/healthy.yaml: Ready comes first");
        ready["status"] = "False".into();
        ready["reason"] = reason.into();
        ready["message"] = message.clone().into();
        let expected = match &error {
            Error::Blocked { blocked: Blocked::Paused, .. } => HealthStatus {
                status: "Suspended".into(),
                message: "Paused by the annotation iam.keyop.dev/paused: no IAM or Secret changes until it is removed"
                    .into(),
            },
            e if e.is_retryable() => {
                HealthStatus { status: "Progressing".into(), message: format!("{reason} (retrying): {message}") }
            }
            _ => HealthStatus { status: "Degraded".into(), message: format!("{reason}: {message}") },
        };
        for interpreter in INTERPRETERS {
            assert_eq!(health(interpreter, ACCESS_KEY, &obj), expected, "reason {reason} in {}", interpreter.name());
        }
    }
}

#[test]
fn policy_health_follows_the_status_the_operator_writes() {
    // Statuses computed by the operator's own code, not written by hand.
    let now: jiff::Timestamp = "2026-01-05T09:00:00Z".parse().expect("time");
    let namespaces: Vec<(String, BTreeMap<String, String>)> =
        ["data", "data-ingest", "team-a"].iter().map(|n| (n.to_string(), BTreeMap::new())).collect();
    let policy = |rules: Json| {
        json!({
            "apiVersion": "iam.keyop.dev/v1alpha1", "kind": POLICY,
            "metadata": {"name": "tenants", "generation": 4, "uid": "0d9e2c1a-4f3b-4c5d-8e6f-7a8b9c0d1e2f"},
            "spec": {"rules": rules},
        })
    };
    let cases = [
        ("valid", json!([{"namespaces": ["team-*"], "userPathPrefix": "/k8s/{namespace}/"}]), "Healthy", "Valid"),
        (
            "overlapping",
            json!([{"namespaces": ["data*"], "userNames": ["{namespace}-*"]}]),
            "Healthy",
            "OverlappingGrants",
        ),
        ("invalid rule", json!([{"namespaces": ["team-*"], "userNames": ["{ns}-*"]}]), "Degraded", "InvalidRule"),
        (
            "unreadable",
            json!([{"namespaces": ["a"], "userNames": ["u"], "maxKeyAge": "99999999999999999999d"}]),
            "Degraded",
            "Unreadable",
        ),
    ];
    for (case, rules, status, reason) in cases {
        let mut obj = policy(rules);
        let stored = Arc::new(serde_json::from_value(obj.clone()).expect("a policy, maybe unreadable"));
        let written = desired_statuses(&[stored], &namespaces, now).remove(0);
        obj["status"] = serde_json::to_value(&written).expect("status as JSON");
        let reasons: Vec<&str> = written.conditions.iter().map(|c| c.reason.as_str()).collect();
        assert!(reasons.contains(&reason), "{case}: the operator wrote {reasons:?}");
        let obj: Yaml = serde_json::from_value(obj).expect("as YAML");
        for interpreter in INTERPRETERS {
            let got = health(interpreter, POLICY, &obj);
            assert_eq!(got.status, status, "{case} in {}: {got:?}", interpreter.name());
            assert!(got.message.starts_with(reason) || reason == "Valid", "{case}: {got:?}");
            assert!(!got.message.is_empty(), "{case}: {got:?}");
        }

        // The next generation, not yet checked by the operator.
        let mut changed = obj.clone();
        changed["metadata"]["generation"] = 5.into();
        for interpreter in INTERPRETERS {
            let got = health(interpreter, POLICY, &changed);
            assert_eq!(got.status, "Progressing", "{case}, generation 5 in {}: {got:?}", interpreter.name());
        }
    }
}

#[test]
fn every_testdata_file_is_used_by_a_test_case() {
    for kind in KINDS {
        let dir = customization_dir(kind);
        let used: BTreeSet<String> = health_tests(kind).tests.iter().map(|t| t.input_path.clone()).collect();
        for entry in std::fs::read_dir(dir.join("testdata")).expect("testdata") {
            let name = format!("testdata/{}", entry.expect("entry").file_name().to_string_lossy());
            assert!(used.contains(&name), "{kind}/{name} is not used by health_test.yaml");
        }
    }
    let actions = action_tests();
    let used: BTreeSet<String> = actions
        .discovery_tests
        .iter()
        .map(|t| t.input_path.clone())
        .chain(actions.action_tests.iter().flat_map(|t| [t.input_path.clone(), t.expected_output_path.clone()]))
        .collect();
    for entry in std::fs::read_dir(customization_dir(ACCESS_KEY).join("actions/testdata")).expect("actions/testdata") {
        let name = format!("testdata/{}", entry.expect("entry").file_name().to_string_lossy());
        assert!(used.contains(&name), "actions/{name} is not used by action_test.yaml");
    }
}

/// The actions of `kind` with a script, by name.
fn action_names(kind: &str) -> Vec<String> {
    let mut actions: Vec<String> = std::fs::read_dir(customization_dir(kind).join("actions"))
        .expect("actions")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("action.lua").is_file())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    actions.sort();
    actions
}

#[test]
fn discovery_offers_each_action_only_when_it_can_act() {
    let dir = customization_dir(ACCESS_KEY).join("actions");
    let tests = action_tests();
    assert!(!tests.discovery_tests.is_empty());
    for interpreter in INTERPRETERS {
        for case in &tests.discovery_tests {
            let got =
                interpreter.run(&dir.join("discovery.lua"), &read_yaml(&dir.join(&case.input_path)), Clock::Fixed);
            let mut actions: Vec<DiscoveredAction> = got
                .as_object()
                .unwrap_or_else(|| panic!("{}: discovery.lua returned {got}", case.input_path))
                .iter()
                .map(|(name, props)| DiscoveredAction {
                    name: name.clone(),
                    disabled: props["disabled"].as_bool().unwrap_or(false),
                })
                .collect();
            actions.sort();
            let mut expected: Vec<&DiscoveredAction> = case.result.iter().collect();
            expected.sort();
            assert_eq!(actions.iter().collect::<Vec<_>>(), expected, "{} in {}", case.input_path, interpreter.name());
            // Every discovered action has a script, and every script is offered.
            let names: Vec<String> = actions.iter().map(|a| a.name.clone()).collect();
            assert_eq!(
                names,
                action_names(ACCESS_KEY),
                "{}: discovered actions and action scripts differ",
                case.input_path
            );
        }
    }
}

/// What each action may change: one annotation, as Argo CD patches it (null removes it).
fn expected_patch(action: &str) -> Json {
    let (annotation, value) = match action {
        "rotate" => (ROTATE_REQUESTED_AT_ANNOTATION, json!(FIXED_DATE)),
        "pause" => (PAUSED_ANNOTATION, json!("true")),
        "resume" => (PAUSED_ANNOTATION, Json::Null),
        other => panic!("actions/{other}: say in expected_patch what it changes"),
    };
    json!({"metadata": {"annotations": {annotation: value}}})
}

#[test]
fn actions_change_their_annotation_and_nothing_else() {
    let dir = customization_dir(ACCESS_KEY).join("actions");
    let tests = action_tests();
    for action in action_names(ACCESS_KEY) {
        assert!(tests.action_tests.iter().any(|t| t.action == action), "no action test for {action}");
    }
    for interpreter in INTERPRETERS {
        for case in &tests.action_tests {
            let input = read_yaml(&dir.join(&case.input_path));
            let got = normalized(interpreter.run(&dir.join(&case.action).join("action.lua"), &input, Clock::Fixed));
            let expected = yaml_to_json(&read_yaml(&dir.join(&case.expected_output_path)));
            assert_eq!(
                got,
                expected,
                "{} on {} in {}: got\n{}",
                case.action,
                case.input_path,
                interpreter.name(),
                serde_json::to_string_pretty(&got).unwrap_or_default()
            );
            assert_eq!(
                merge_patch(&yaml_to_json(&input), &got),
                expected_patch(&case.action),
                "{} on {} in {}: the patch Argo CD would send",
                case.action,
                case.input_path,
                interpreter.name()
            );
        }
    }
}

#[test]
fn rotate_action_writes_a_utc_timestamp_the_operator_accepts() {
    // With the real clock: the os.date format Argo CD's Lua actions use.
    let script = customization_dir(ACCESS_KEY).join("actions/rotate/action.lua");
    let obj: Yaml = serde_yaml::from_str("metadata: {name: x, namespace: y}").expect("yaml");
    for interpreter in INTERPRETERS {
        let out = interpreter.run(&script, &obj, Clock::Real);
        let value = out["metadata"]["annotations"][ROTATE_REQUESTED_AT_ANNOTATION].as_str().unwrap_or_default();
        let parsed: jiff::Timestamp =
            value.parse().unwrap_or_else(|e| panic!("{value:?} ({}) is not an RFC 3339 time: {e}", interpreter.name()));
        let age = jiff::Timestamp::now().duration_since(parsed);
        assert!(age.as_secs().abs() < 60, "{value} ({}) is not now (UTC)", interpreter.name());
    }
}

#[test]
fn the_argo_cd_interpreter_offers_only_what_argo_cd_gives_scripts() {
    // A script that works in Lua 5.1 but relies on a library Argo CD does not open fails here,
    // as it would in Argo CD.
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("probe.lua");
    std::fs::write(
        &script,
        r#"return {
  string = type(string), math = type(math), io = type(io), debug = type(debug),
  exit = type(os.exit), execute = type(os.execute), getenv = type(os.getenv),
  date = type(os.date), time = type(os.time), required = type(require("os").date),
  table = type(table.insert), params = type(actionParams), obj = obj.metadata.name,
}"#,
    )
    .expect("write probe.lua");
    let obj: Yaml = serde_yaml::from_str("metadata: {name: probe}").expect("yaml");
    let got = Interpreter::GopherLua.run(&script, &obj, Clock::Fixed);
    assert_eq!(
        got,
        json!({
            "string": "nil", "math": "nil", "io": "nil", "debug": "nil",
            "exit": "nil", "execute": "nil", "getenv": "nil",
            "date": "function", "time": "function", "required": "function",
            "table": "function", "params": "table", "obj": "probe",
        })
    );
    std::fs::write(&script, r#"return {date = os.date("!%Y-%m-%dT%XZ"), plain = os.date("!%Y %T")}"#).expect("write");
    let got = Interpreter::GopherLua.run(&script, &obj, Clock::Fixed);
    assert_eq!(got, json!({"date": FIXED_DATE, "plain": "0001 %T"}), "Argo CD's os.date knows no %T");
}

/// argocd-cm.yaml as generated from the scripts.
fn argocd_cm() -> String {
    let read = |kind: &str, p: &str| {
        std::fs::read_to_string(customization_dir(kind).join(p)).unwrap_or_else(|e| panic!("{kind}/{p}: {e}"))
    };
    let indent = |text: String, n: usize| -> String {
        text.lines().map(|l| if l.is_empty() { "\n".to_string() } else { format!("{}{l}\n", " ".repeat(n)) }).collect()
    };
    let mut data = String::new();
    for kind in KINDS {
        data.push_str(&format!(
            "  resource.customizations.health.{GROUP}_{kind}: |\n{}",
            indent(read(kind, "health.lua"), 4)
        ));
        if customization_dir(kind).join("actions").is_dir() {
            data.push_str(&format!(
                "  resource.customizations.actions.{GROUP}_{kind}: |\n    discovery.lua: |\n{}    definitions:\n",
                indent(read(kind, "actions/discovery.lua"), 6)
            ));
            for action in action_names(kind) {
                data.push_str(&format!(
                    "      - name: {action}\n        action.lua: |\n{}",
                    indent(read(kind, &format!("actions/{action}/action.lua")), 10)
                ));
            }
        }
    }
    format!(
        "# The Argo CD settings for iam-key-operator: health checks for IamAccessKey and
# IamAccessKeyPolicy, and the IamAccessKey actions (rotate, pause, resume). Merge into the
# argocd-cm ConfigMap of your Argo CD (e.g. as a kustomize patch, or the Argo CD Helm chart's
# `configs.cm`). Generated from resource_customizations/; tests/e2e/argocd.rs fails when they differ.
apiVersion: v1
kind: ConfigMap
metadata:
  name: argocd-cm
  namespace: argocd
  labels:
    app.kubernetes.io/name: argocd-cm
    app.kubernetes.io/part-of: argocd
data:
{data}"
    )
}

#[test]
fn argocd_cm_snippet_embeds_exactly_the_tested_scripts() {
    let path = testenv::repo_root().join("argocd/argocd-cm.yaml");
    let expected = argocd_cm();
    if std::env::var_os("IKO_BLESS").is_some() {
        std::fs::write(&path, &expected).expect("write argocd-cm.yaml");
    }
    let actual = std::fs::read_to_string(&path).expect("argocd/argocd-cm.yaml");
    assert!(
        actual == expected,
        "argocd/argocd-cm.yaml differs from the scripts in argocd/resource_customizations: \
         regenerate it with `make argocd-cm`"
    );
    // And Argo CD can read it: each health script and action definition parses back.
    let cm = read_yaml(&path);
    let data = &cm["data"];
    for kind in KINDS {
        let health = data[format!("resource.customizations.health.{GROUP}_{kind}").as_str()].as_str();
        let script = std::fs::read_to_string(customization_dir(kind).join("health.lua")).expect("health.lua");
        assert_eq!(health, Some(script.as_str()), "{kind}");
    }
    let actions: Yaml = serde_yaml::from_str(
        data[format!("resource.customizations.actions.{GROUP}_{ACCESS_KEY}").as_str()].as_str().expect("actions key"),
    )
    .expect("actions YAML");
    let discovery = std::fs::read_to_string(customization_dir(ACCESS_KEY).join("actions/discovery.lua")).expect("read");
    assert_eq!(actions["discovery.lua"].as_str(), Some(discovery.as_str()));
    let defined: Vec<&str> = actions["definitions"]
        .as_sequence()
        .expect("definitions")
        .iter()
        .map(|d| d["name"].as_str().expect("name"))
        .collect();
    assert_eq!(defined, action_names(ACCESS_KEY));
}
