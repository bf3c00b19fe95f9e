//! The secret access key lives only in the Secret: never in logs (at debug level), events,
//! status, metrics or error messages — through create, rotation, errors and delete.

mod support;

use std::time::Duration;

use k8s_openapi::api::{core::v1::Event as CoreEvent, events::v1::Event};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::json;
use support::*;

#[tokio::test]
async fn the_secret_appears_nowhere_but_in_the_secret() {
    let f = Fixture::new("secrecy").await;
    let op = f.operator(&[]);
    let mut secrets = vec![];
    let mut seen = String::new();

    f.create("app", json!({"rotation": {"gracePeriod": "1s", "retainInactive": "1s"}})).await;
    f.wait_ready("app").await;
    secrets.push(f.secret_creds("app").await.unwrap().1);
    let rotate = json!({"spec": {"rotation": {"serial": 1}}});
    f.keys_api().patch("app", &PatchParams::default(), &Patch::Merge(&rotate)).await.unwrap();
    let obj = f
        .wait_for("app", Duration::from_secs(30), "rotated", |o| {
            o.status.as_ref().is_some_and(|s| s.keys.len() == 1 && s.rotation.as_ref().is_some_and(|r| r.serial == 1))
        })
        .await;
    secrets.push(f.secret_creds("app").await.unwrap().1);
    seen.push_str(&serde_json::to_string(&obj).unwrap());

    // Errors: a Secret conflict and a missing user.
    let taken: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(json!({"metadata": {"name": "taken"}})).unwrap();
    f.secrets().create(&Default::default(), &taken).await.unwrap();
    f.create("conflict", json!({"secret": {"name": "taken"}})).await;
    f.create("nouser", json!({"userName": format!("{}-missing", f.user), "secret": {"name": "nouser"}})).await;
    for name in ["conflict", "nouser"] {
        let obj = f
            .wait_for(name, Duration::from_secs(30), "a failure condition", |o| {
                ready(o).is_some_and(|r| r.0 == "False")
            })
            .await;
        seen.push_str(&serde_json::to_string(&obj).unwrap());
    }
    f.delete("app").await;
    f.wait_gone("app", Duration::from_secs(30)).await;

    let events: Api<Event> = Api::namespaced(f.client.clone(), &f.ns);
    let core_events: Api<CoreEvent> = Api::namespaced(f.client.clone(), &f.ns);
    seen.push_str(&serde_json::to_string(&events.list(&ListParams::default()).await.unwrap().items).unwrap());
    seen.push_str(&serde_json::to_string(&core_events.list(&ListParams::default()).await.unwrap().items).unwrap());
    seen.push_str(&op.metrics().await);
    let log = op.log();
    assert!(log.contains("DEBUG"), "the operator ran at debug level");
    assert!(seen.contains("KeyCreated") && seen.contains("SecretConflict"), "the scan saw events and conditions");

    for secret in &secrets {
        assert_eq!(secret.len(), 40, "a real secret access key");
        assert!(!seen.contains(secret.as_str()), "secret found in status, events or metrics");
        op.assert_log_free_of(secret);
    }
}
