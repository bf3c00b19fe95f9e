//! Restart targets: roll out workloads when the Secret gets a new key, the way
//! `kubectl rollout restart` does (a pod-template annotation), once per key ID.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::events::EventType,
};
use serde::de::DeserializeOwned;

use super::Context;
use crate::{
    crd::{FIELD_MANAGER, IamAccessKey, RESTARTED_FOR_ANNOTATION, RestartKind},
    error::{Error, KubeContext},
};

pub async fn restart_targets(ctx: &Context, obj: &IamAccessKey, access_key_id: &str) -> Result<(), Error> {
    let ns = obj.namespace().unwrap_or_default();
    for target in &obj.spec.restart_targets {
        let restarted = match target.kind {
            RestartKind::Deployment => {
                restart::<Deployment>(ctx, &ns, &target.name, access_key_id, template_of_deploy).await?
            }
            RestartKind::StatefulSet => {
                restart::<StatefulSet>(ctx, &ns, &target.name, access_key_id, template_of_sts).await?
            }
            RestartKind::DaemonSet => {
                restart::<DaemonSet>(ctx, &ns, &target.name, access_key_id, template_of_ds).await?
            }
        };
        let kind = format!("{:?}", target.kind);
        match restarted {
            Some(true) => {
                let note = format!("restarted {kind} {} for access key {access_key_id}", target.name);
                ctx.event(obj, EventType::Normal, "RestartedTarget", note).await;
            }
            Some(false) => {}
            // A missing workload must not hold the key back: say so and go on.
            None => {
                let note = format!("restart target {kind} {} not found in namespace {ns}: not restarted", target.name);
                ctx.event(obj, EventType::Warning, "RestartTargetNotFound", note).await;
            }
        }
    }
    Ok(())
}

type TemplateAnnotation<K> = fn(&K) -> Option<String>;

fn template_annotation(t: Option<&k8s_openapi::api::core::v1::PodTemplateSpec>) -> Option<String> {
    t?.metadata.as_ref()?.annotations.as_ref()?.get(RESTARTED_FOR_ANNOTATION).cloned()
}
fn template_of_deploy(d: &Deployment) -> Option<String> {
    template_annotation(Some(&d.spec.template))
}
fn template_of_sts(d: &StatefulSet) -> Option<String> {
    template_annotation(Some(&d.spec.template))
}
fn template_of_ds(d: &DaemonSet) -> Option<String> {
    template_annotation(Some(&d.spec.template))
}

/// `Some(true)`: patched; `Some(false)`: already restarted for this key; `None`: not found.
async fn restart<K>(
    ctx: &Context,
    ns: &str,
    name: &str,
    access_key_id: &str,
    current: TemplateAnnotation<K>,
) -> Result<Option<bool>, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let Some(workload) = api.get_opt(name).await.context("reading a restart target")? else { return Ok(None) };
    if current(&workload).as_deref() == Some(access_key_id) {
        return Ok(Some(false));
    }
    let patch = serde_json::json!({
        "spec": {"template": {"metadata": {"annotations": {RESTARTED_FOR_ANNOTATION: access_key_id}}}}
    });
    let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    api.patch(name, &params, &Patch::Merge(&patch)).await.context("restarting a restart target")?;
    ctx.metrics.kube_write("Workload", "patch");
    Ok(Some(true))
}
