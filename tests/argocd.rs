//! The Argo CD customizations of argocd/resource_customizations, run the way Argo CD runs them:
//! every case of `health_test.yaml` and `actions/action_test.yaml` through a Lua 5.1
//! interpreter (Argo CD uses gopher-lua, which implements Lua 5.1), with `obj` set to the test
//! object and, as in Argo CD's own tests, `os.date` fixed at 0001-01-01T00:00:00Z.
//! Also: `argocd/argocd-cm.yaml` embeds exactly these scripts.
//!
//! The interpreter comes from `hack/lua.sh` (Debian's lua5.1), or `IKO_LUA`.

use std::{
    collections::BTreeSet,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde::Deserialize;
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

const GROUP: &str = "iam.keyop.dev";
const KIND: &str = "IamAccessKey";
/// What Argo CD's tests make `os.date` return, so expected outputs are stable.
const FIXED_DATE: &str = "0001-01-01T00:00:00Z";
const HEALTH_STATUSES: &[&str] = &["Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"];

fn customization_dir() -> PathBuf {
    testenv::repo_root().join("argocd/resource_customizations").join(GROUP).join(KIND)
}

fn lua() -> PathBuf {
    if let Some(path) = std::env::var_os("IKO_LUA").filter(|v| !v.is_empty()) {
        return PathBuf::from(path);
    }
    let script = testenv::repo_root().join("hack/lua.sh");
    let out = Command::new("bash").arg(&script).arg("--path").output().expect("run hack/lua.sh --path");
    assert!(
        out.status.success(),
        "no Lua 5.1 interpreter: run hack/lua.sh (make tools) or set IKO_LUA\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
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

/// Runs before the script: a JSON encoder for the result, and Argo CD's fixed test clock.
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
os.date = function() return "FIXED_DATE" end
"#;

/// Runs `script` with the global `obj` set to `input` and returns what it returned, as JSON.
fn run_script(script: &Path, input: &Yaml) -> Json {
    let program = format!(
        "{prelude}\nobj = {obj}\nlocal chunk = assert(loadfile({path}))\nio.write(__encode(chunk()))\n",
        prelude = PRELUDE.replace("FIXED_DATE", FIXED_DATE),
        obj = to_lua(input),
        path = lua_string(script.to_str().expect("utf-8 path")),
    );
    let mut child = Command::new(lua())
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the Lua interpreter");
    child.stdin.take().expect("stdin").write_all(program.as_bytes()).expect("write the program");
    let out = child.wait_with_output().expect("run Lua");
    assert!(out.status.success(), "{} failed:\n{}", script.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{} returned no JSON ({e}): {}", script.display(), String::from_utf8_lossy(&out.stdout))
    })
}

fn read_yaml(path: &Path) -> Yaml {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// JSON of a YAML value, with empty arrays and empty objects made alike (a Lua table cannot
/// tell them apart).
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

#[test]
fn health_check_gives_the_expected_status_and_message_for_every_test_case() {
    let dir = customization_dir();
    let tests: HealthTests =
        serde_yaml::from_value(read_yaml(&dir.join("health_test.yaml"))).expect("health_test.yaml format");
    assert!(tests.tests.len() >= 10, "too few health test cases");
    let mut failures = Vec::new();
    let mut statuses = BTreeSet::new();
    for case in &tests.tests {
        let got = run_script(&dir.join("health.lua"), &read_yaml(&dir.join(&case.input_path)));
        let got = HealthStatus {
            status: got["status"].as_str().unwrap_or_default().to_string(),
            message: got["message"].as_str().unwrap_or_default().to_string(),
        };
        assert!(
            HEALTH_STATUSES.contains(&got.status.as_str()),
            "{}: not an Argo CD health status: {got:?}",
            case.input_path
        );
        statuses.insert(got.status.clone());
        if got != case.health_status {
            failures.push(format!("{}:\n  expected {:?}\n  got      {got:?}", case.input_path, case.health_status));
        }
    }
    assert!(failures.is_empty(), "health.lua disagrees with health_test.yaml:\n{}", failures.join("\n"));
    for status in ["Healthy", "Progressing", "Degraded", "Suspended"] {
        assert!(statuses.contains(status), "no test case ends {status}");
    }
}

#[test]
fn health_check_covers_every_condition_reason_the_operator_sets() {
    // The reasons of the Ready condition (src/error.rs and the Ready reason itself): each must
    // appear in some test case, so a new reason gets a deliberate health status.
    let dir = customization_dir();
    let mut reasons_tested = BTreeSet::new();
    for entry in std::fs::read_dir(dir.join("testdata")).expect("testdata") {
        let obj = read_yaml(&entry.expect("entry").path());
        for c in obj["status"]["conditions"].as_sequence().into_iter().flatten() {
            if let Some(reason) = c["reason"].as_str() {
                reasons_tested.insert(reason.to_string());
            }
        }
    }
    for reason in [
        "Ready",
        "Paused",
        "UserNotFound",
        "UserClaimed",
        "SecretConflict",
        "KeyLimitExceeded",
        "NotAuthorized",
        "InvalidSpec",
        "Throttled",
        "IamUnavailable",
        "KubernetesError",
    ] {
        assert!(reasons_tested.contains(reason), "no health test case has Ready reason {reason}");
    }
}

#[test]
fn every_testdata_file_is_used_by_a_test_case() {
    let dir = customization_dir();
    let health: HealthTests = serde_yaml::from_value(read_yaml(&dir.join("health_test.yaml"))).expect("format");
    let used: BTreeSet<String> = health.tests.iter().map(|t| t.input_path.clone()).collect();
    for entry in std::fs::read_dir(dir.join("testdata")).expect("testdata") {
        let name = format!("testdata/{}", entry.expect("entry").file_name().to_string_lossy());
        assert!(used.contains(&name), "{name} is not used by health_test.yaml");
    }
    let actions: ActionTests =
        serde_yaml::from_value(read_yaml(&dir.join("actions/action_test.yaml"))).expect("action_test.yaml format");
    let used: BTreeSet<String> = actions
        .discovery_tests
        .iter()
        .map(|t| t.input_path.clone())
        .chain(actions.action_tests.iter().flat_map(|t| [t.input_path.clone(), t.expected_output_path.clone()]))
        .collect();
    for entry in std::fs::read_dir(dir.join("actions/testdata")).expect("actions/testdata") {
        let name = format!("testdata/{}", entry.expect("entry").file_name().to_string_lossy());
        assert!(used.contains(&name), "actions/{name} is not used by action_test.yaml");
    }
}

#[test]
fn discovery_offers_rotate_only_when_a_rotation_can_start() {
    let dir = customization_dir().join("actions");
    let tests: ActionTests = serde_yaml::from_value(read_yaml(&dir.join("action_test.yaml"))).expect("format");
    assert!(!tests.discovery_tests.is_empty());
    for case in &tests.discovery_tests {
        let got = run_script(&dir.join("discovery.lua"), &read_yaml(&dir.join(&case.input_path)));
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
        assert_eq!(actions.iter().collect::<Vec<_>>(), expected, "{}", case.input_path);
        // Every discovered action has a script.
        for action in &actions {
            assert!(dir.join(&action.name).join("action.lua").is_file(), "no actions/{}/action.lua", action.name);
        }
    }
}

#[test]
fn rotate_action_sets_the_rotate_requested_at_annotation_and_nothing_else() {
    let dir = customization_dir().join("actions");
    let tests: ActionTests = serde_yaml::from_value(read_yaml(&dir.join("action_test.yaml"))).expect("format");
    assert!(tests.action_tests.iter().any(|t| t.action == "rotate"));
    for case in &tests.action_tests {
        let input = read_yaml(&dir.join(&case.input_path));
        let got = normalized(run_script(&dir.join(&case.action).join("action.lua"), &input));
        let expected = yaml_to_json(&read_yaml(&dir.join(&case.expected_output_path)));
        assert_eq!(
            got,
            expected,
            "{} on {}: got\n{}",
            case.action,
            case.input_path,
            serde_json::to_string_pretty(&got).unwrap_or_default()
        );
        assert_eq!(got["metadata"]["annotations"]["iam.keyop.dev/rotate-requested-at"], FIXED_DATE);
    }
}

#[test]
fn rotate_action_writes_a_utc_timestamp_the_operator_accepts() {
    // Without the test clock: the real os.date format Argo CD's Lua actions use.
    let script = customization_dir().join("actions/rotate/action.lua");
    let obj: Yaml = serde_yaml::from_str("metadata: {name: x, namespace: y}").expect("yaml");
    let program = format!(
        "obj = {}\nlocal out = assert(loadfile({}))()\nio.write(out.metadata.annotations['iam.keyop.dev/rotate-requested-at'])",
        to_lua(&obj),
        lua_string(script.to_str().expect("utf-8"))
    );
    let out = Command::new(lua()).arg("-e").arg(&program).output().expect("run Lua");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let value = String::from_utf8_lossy(&out.stdout).to_string();
    let parsed: jiff::Timestamp = value.parse().unwrap_or_else(|e| panic!("{value:?} is not an RFC 3339 time: {e}"));
    let age = jiff::Timestamp::now().duration_since(parsed);
    assert!(age.as_secs().abs() < 60, "{value} is not now (UTC)");
}

/// argocd-cm.yaml as generated from the scripts.
fn argocd_cm() -> String {
    let dir = customization_dir();
    let read = |p: &str| std::fs::read_to_string(dir.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let indent = |text: String, n: usize| -> String {
        text.lines().map(|l| if l.is_empty() { "\n".to_string() } else { format!("{}{l}\n", " ".repeat(n)) }).collect()
    };
    let mut definitions = String::new();
    let mut actions: Vec<String> = std::fs::read_dir(dir.join("actions"))
        .expect("actions")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("action.lua").is_file())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    actions.sort();
    for action in actions {
        definitions.push_str(&format!(
            "      - name: {action}\n        action.lua: |\n{}",
            indent(read(&format!("actions/{action}/action.lua")), 10)
        ));
    }
    format!(
        "# The Argo CD settings for IamAccessKey: health check and the `rotate` action. Merge into the
# argocd-cm ConfigMap of your Argo CD (e.g. as a kustomize patch, or the Argo CD Helm chart's
# `configs.cm`). Generated from resource_customizations/; tests/argocd.rs fails when they differ.
apiVersion: v1
kind: ConfigMap
metadata:
  name: argocd-cm
  namespace: argocd
  labels:
    app.kubernetes.io/name: argocd-cm
    app.kubernetes.io/part-of: argocd
data:
  resource.customizations.health.{GROUP}_{KIND}: |
{health}  resource.customizations.actions.{GROUP}_{KIND}: |
    discovery.lua: |
{discovery}    definitions:
{definitions}",
        health = indent(read("health.lua"), 4),
        discovery = indent(read("actions/discovery.lua"), 6),
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
         regenerate it with `IKO_BLESS=1 cargo test --test argocd`"
    );
    // And Argo CD can read it: the health script and each action definition parse back.
    let cm = read_yaml(&path);
    let data = &cm["data"];
    let health = data[format!("resource.customizations.health.{GROUP}_{KIND}").as_str()].as_str().expect("health key");
    assert_eq!(health, std::fs::read_to_string(customization_dir().join("health.lua")).expect("health.lua"));
    let actions: Yaml = serde_yaml::from_str(
        data[format!("resource.customizations.actions.{GROUP}_{KIND}").as_str()].as_str().expect("actions key"),
    )
    .expect("actions YAML");
    assert!(actions["discovery.lua"].as_str().is_some_and(|s| s.contains("actions[\"rotate\"]")));
    assert_eq!(actions["definitions"][0]["name"].as_str(), Some("rotate"));
}
