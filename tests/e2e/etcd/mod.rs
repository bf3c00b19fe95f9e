//! Writing an object straight into the test environment's etcd, past the API server's
//! validation: how an object stored under an older, looser schema looks to the operator.

use serde_json::Value;

/// Store `object` under `key` (`/registry/<group>/<plural>/[<namespace>/]<name>`); the API
/// server's watch picks the write up like any other.
pub async fn put(env: &testenv::TestEnv, key: &str, object: &Value) {
    let body = serde_json::json!({
        "key": base64(key.as_bytes()),
        "value": base64(&serde_json::to_vec(object).unwrap()),
    });
    let response = reqwest::Client::new()
        .post(format!("{}/v3/kv/put", env.etcd_url()))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body).unwrap())
        .send()
        .await
        .expect("etcd answers");
    let status = response.status();
    assert!(status.is_success(), "etcd put {key}: {status}: {}", response.text().await.unwrap_or_default());
}

/// The etcd key of a custom resource of this operator's API group.
pub fn key(plural: &str, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("/registry/iam.keyop.dev/{plural}/{ns}/{name}"),
        None => format!("/registry/iam.keyop.dev/{plural}/{name}"),
    }
}

/// Metadata the API server would have set on create.
pub fn metadata(name: &str, namespace: Option<&str>) -> Value {
    let uid = format!("00000000-0000-4000-8000-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
    let mut meta = serde_json::json!({
        "name": name, "uid": uid, "generation": 1,
        "creationTimestamp": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
    });
    if let Some(ns) = namespace {
        meta["namespace"] = ns.into();
    }
    meta
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn base64_matches_the_standard_alphabet_and_padding() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"foob"), "Zm9vYg==");
}
