//! The secret access key lives only in the Secret: never in logs (at trace level), events,
//! status, metrics or error messages — through every path on which the operator holds one:
//! create in both formats, rotation, a layout rewrite (formats and templates), a new key for a
//! template that cannot be rewritten, adoption after a crash, a key whose verification fails, a
//! Secret write the API server refuses, and deletion. The secrets scanned for are every one IAM
//! handed out (recorded by the proxy in front of it), published or not, in plain, base64 and
//! URL-encoded form. Likewise for keys made outside the operator and adopted (`spec.adopt`), or
//! refused: the secret read from a Secret, a wrong one, and another user's.

use crate::support;
use std::time::Duration;

use k8s_openapi::{
    ByteString,
    api::{core::v1::Event as CoreEvent, core::v1::Secret, events::v1::Event},
};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::json;
use support::*;
use testenv::proxy::Faults;

#[tokio::test]
async fn the_secret_appears_nowhere_but_in_the_secret() {
    let f = Fixture::new("secrecy").await;
    let proxy = fault_proxy(f.env).await;
    let mut envs = proxy.operator_env();
    envs.push(("RUST_LOG".into(), "trace".into()));
    envs.push(("IKO_FAILPOINT".into(), "before-status".into()));
    let envs_ref: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut op = Operator::start(f.env, &f.ns, &envs_ref, &["--verify-timeout", "2s"]);
    let mut seen = String::new();
    let iam = f.env.iam_client();
    let user = |suffix: &str| format!("{}-{suffix}", f.user);
    for suffix in ["file", "verify", "refused"] {
        iam.create_user().user_name(user(suffix)).send().await.expect("CreateUser");
    }

    // Adoption after a crash: the first key is published, then the operator dies before status.
    f.create("app", json!({"rotation": {"gracePeriod": "1s", "retainInactive": "1s"}})).await;
    op.wait_exit(Duration::from_secs(60)).await;
    op.restart(&[]);
    f.wait_ready("app").await;
    // Rotation, then a layout rewrite (the one read of Secret data).
    let rotate = json!({"spec": {"rotation": {"serial": 1}}});
    f.keys_api().patch("app", &PatchParams::default(), &Patch::Merge(&rotate)).await.unwrap();
    f.wait_for("app", Duration::from_secs(30), "rotated", |o| {
        o.status.as_ref().is_some_and(|s| s.keys.len() == 1 && s.rotation.as_ref().is_some_and(|r| r.serial == 1))
    })
    .await;
    let relayout = json!({"spec": {"secret": {"format": "CredentialsFile", "profile": "ci"}}});
    f.keys_api().patch("app", &PatchParams::default(), &Patch::Merge(&relayout)).await.unwrap();
    wait_secret_has(&f, "app", "credentials").await;
    // Templates: a JSON rewrite of the same key (read back where the last render put it), a
    // layout of derived values only, then a change of it, which takes a new key.
    for (data, key) in [
        (json!({"aws.json": "{{ {'id': access_key_id, 'secret': secret_access_key} | tojson }}"}), "aws.json"),
        (json!({"aws.json": null, "password": "{{ ses_smtp_password(secret_access_key, 'eu-west-1') }}"}), "password"),
        (json!({"password": null, "smtp": "{{ ses_smtp_password(secret_access_key, 'us-east-1') }}"}), "smtp"),
    ] {
        let relayout = json!({"spec": {"secret": {"format": null, "template": {"data": data}}}});
        f.keys_api().patch("app", &PatchParams::default(), &Patch::Merge(&relayout)).await.unwrap();
        wait_secret_has(&f, "app", key).await;
    }

    // The credentials-file format from the start.
    f.create("file", json!({"userName": user("file"), "secret": {"format": "CredentialsFile"}})).await;
    f.wait_ready("file").await;

    // A key whose verification fails: IAM hands out a secret that does not authenticate.
    proxy.set(Faults { corrupt_new_secrets: true, ..Faults::none() });
    f.create("verify", json!({"userName": user("verify")})).await;
    f.wait_reason("verify", "KeyVerificationFailed").await;
    proxy.set(Faults::none());
    f.delete("verify").await;
    f.wait_gone("verify", Duration::from_secs(30)).await;

    // A Secret write the API server refuses: the name is taken while CreateAccessKey is slow.
    proxy.set(Faults { delay: Duration::from_secs(3), only: vec!["CreateAccessKey".into()], ..Faults::none() });
    f.create("refused", json!({"userName": user("refused"), "secret": {"name": "taken"}})).await;
    f.wait_for("refused", Duration::from_secs(30), "a create in progress", |o| {
        o.status.as_ref().is_some_and(|s| s.pending_create.is_some())
    })
    .await;
    let taken: Secret = serde_json::from_value(json!({"metadata": {"name": "taken"}})).unwrap();
    f.secrets().create(&Default::default(), &taken).await.unwrap();
    f.wait_reason("refused", "SecretConflict").await;
    proxy.set(Faults::none());
    assert!(iam_keys(f.env, &user("refused")).await.is_empty(), "the unpublished key was deleted");

    seen.push_str(&everything_shown_until_deleted(&f, &op, "app").await);
    let core_events: Api<CoreEvent> = Api::namespaced(f.client.clone(), &f.ns);
    seen.push_str(&serde_json::to_string(&core_events.list(&ListParams::default()).await.unwrap().items).unwrap());
    seen.push_str(&op.metrics().await);
    let log = op.log();
    assert!(log.contains("TRACE"), "the operator ran at trace level");
    for reason in
        ["KeyCreated", "KeyAdopted", "SecretWritten", "LayoutChanged", "KeyVerificationFailed", "SecretConflict"]
    {
        assert!(seen.contains(reason), "the scan saw {reason}: the path ran");
    }

    let secrets = proxy.secrets_seen();
    // app: first + rotation + layout change; file; verify: at least one, as sent and as
    // corrupted; refused.
    assert!(secrets.len() >= 7, "IAM handed out the secrets of every path: {}", secrets.len());
    println!(
        "scanned {} secrets IAM handed out, 6 forms each, in {} bytes of log and {} bytes of status, events and metrics",
        secrets.len(),
        log.len(),
        seen.len()
    );
    for secret in &secrets {
        assert_eq!(secret.len(), 40, "a real secret access key");
        for form in encodings(secret) {
            assert!(!seen.contains(&form), "a secret (or its encoding) found in status, events or metrics");
            assert!(
                !log.contains(&form),
                "a secret (or its encoding) found in the operator's log {}",
                op.log_path.display()
            );
        }
    }
}

#[tokio::test]
async fn an_adopted_or_refused_keys_secret_appears_nowhere_but_in_the_secret() {
    let f = Fixture::new("secrecy-adopt").await;
    f.allow_own_user(json!({"allowAdoption": true})).await;
    let iam = f.env.iam_client();
    let user = |suffix: &str| format!("{}-{suffix}", f.user);
    for suffix in ["wrong", "stranger"] {
        iam.create_user().user_name(user(suffix)).send().await.expect("CreateUser");
    }
    let made = |u: String| {
        let iam = iam.clone();
        async move {
            let out = iam.create_access_key().user_name(u).send().await.expect("CreateAccessKey");
            let key = out.access_key().expect("key").clone();
            (key.access_key_id().to_string(), key.secret_access_key().to_string())
        }
    };
    let secret_of = |name: &str, pairs: &[(&str, &str)]| -> Secret {
        let data: serde_json::Map<String, serde_json::Value> =
            pairs.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
        serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data})).unwrap()
    };
    // Adopted in place from a Crossplane-shaped Secret, rotated, deleted.
    let (id, adopted) = made(f.user.clone()).await;
    let conn = secret_of("app", &[("username", &id), ("password", &adopted)]);
    f.secrets().create(&Default::default(), &conn).await.unwrap();
    // Refused: a wrong secret for a real key; a key of another user.
    let (wrong_id, _) = made(user("wrong")).await;
    let wrong = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRECYTEST";
    let bad = secret_of("wrong", &[("AWS_ACCESS_KEY_ID", &wrong_id), ("AWS_SECRET_ACCESS_KEY", wrong)]);
    f.secrets().create(&Default::default(), &bad).await.unwrap();
    let (stranger_id, stranger) = made(user("wrong")).await;
    let theirs = secret_of("stranger", &[("AWS_ACCESS_KEY_ID", &stranger_id), ("AWS_SECRET_ACCESS_KEY", &stranger)]);
    f.secrets().create(&Default::default(), &theirs).await.unwrap();

    let op = Operator::start(f.env, &f.ns, &[("RUST_LOG", "trace")], &[]);
    let spec = |u: String, name: &str| {
        json!({"userName": u, "secret": {"name": name, "creationPolicy": "Adopt"}, "adopt": {},
               "rotation": {"gracePeriod": "1s", "retainInactive": "1s"}})
    };
    f.create("app", spec(f.user.clone(), "app")).await;
    f.create("wrong", spec(user("wrong"), "wrong")).await;
    f.create("stranger", spec(user("stranger"), "stranger")).await;
    f.wait_ready("app").await;
    f.wait_reason("wrong", "AdoptionRefused").await;
    f.wait_reason("stranger", "AdoptionRefused").await;
    let rotate = json!({"spec": {"rotation": {"serial": 1}}});
    f.keys_api().patch("app", &PatchParams::default(), &Patch::Merge(&rotate)).await.unwrap();
    f.wait_for("app", Duration::from_secs(60), "rotated", |o| {
        o.status.as_ref().is_some_and(|s| s.keys.len() == 1 && s.access_key_id.as_ref() != Some(&id))
    })
    .await;
    let (_, rotated) = f.secret_creds("app").await.expect("the rotated key");

    let seen = everything_shown_until_deleted(&f, &op, "app").await;
    let log = op.log();
    assert!(log.contains("TRACE"), "the operator ran at trace level");
    for reason in ["KeyAdopted", "AdoptionRefused", "KeyCreated"] {
        assert!(seen.contains(reason), "the scan saw {reason}: the path ran");
    }
    for secret in [adopted.as_str(), wrong, stranger.as_str(), rotated.as_str()] {
        for form in encodings(secret) {
            assert!(!seen.contains(&form), "a secret (or its encoding) found in status, events or metrics");
            assert!(!log.contains(&form), "a secret (or its encoding) found in the log {}", op.log_path.display());
        }
    }
}

/// Status and metrics while everything still exists, then the events after `name` is deleted.
async fn everything_shown_until_deleted(f: &Fixture, op: &Operator, name: &str) -> String {
    let mut seen = String::new();
    for obj in f.keys_api().list(&ListParams::default()).await.unwrap().items {
        seen.push_str(&serde_json::to_string(&obj).unwrap());
    }
    seen.push_str(&op.metrics().await);
    f.delete(name).await;
    f.wait_gone(name, Duration::from_secs(30)).await;
    let events: Api<Event> = Api::namespaced(f.client.clone(), &f.ns);
    seen.push_str(&serde_json::to_string(&events.list(&ListParams::default()).await.unwrap().items).unwrap());
    seen
}

async fn wait_secret_has(f: &Fixture, name: &str, key: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !f.secrets().get(name).await.unwrap().data.unwrap_or_default().contains_key(key) {
        assert!(std::time::Instant::now() < deadline, "Secret {name} never got {key}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The secret as it could leak: plain, base64 (as a Secret's `data` holds it, at each of the
/// three alignments it can take inside a longer value), and URL-encoded (as in a form body).
fn encodings(secret: &str) -> Vec<String> {
    let b64 = |bytes: &[u8]| serde_json::to_value(ByteString(bytes.to_vec())).unwrap().as_str().unwrap().to_string();
    let mut forms = vec![secret.to_string(), secret.replace('/', "%2F").replace('+', "%2B")];
    for pad in 0..3 {
        let mut bytes = vec![b'x'; pad];
        bytes.extend_from_slice(secret.as_bytes());
        // Drop the characters that depend on the padding or on what follows.
        let encoded = b64(&bytes);
        let start = if pad == 0 { 0 } else { 4 };
        forms.push(encoded[start..encoded.len() - 4].to_string());
    }
    forms
}
