//! Kubernetes events about IamAccessKeys.
//!
//! kube-runtime's `Recorder` keeps every event it published for six minutes to count repeats
//! into a series: after a bulk create of thousands of resources that cache held most of the
//! operator's memory, and every publish scanned it. The operator never repeats an event (a
//! failure is reported once per change of reason), so each event is simply created.

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{Api, Client, api::PostParams, runtime::events::EventType};
use rand::Rng;

pub struct Events {
    client: Client,
    controller: String,
    instance: String,
}

impl Events {
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        Events { client, controller: controller.into(), instance: instance.unwrap_or_else(|| controller.into()) }
    }

    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) -> Result<(), kube::Error> {
        let namespace = regarding.namespace.clone().unwrap_or_else(|| "default".into());
        let now = jiff::Timestamp::now();
        let name = regarding.name.as_deref().unwrap_or(&self.controller);
        let event = Event {
            metadata: ObjectMeta {
                // Unique even for two events in the same nanosecond from two replicas.
                name: Some(format!("{name}.{:x}{:04x}", now.as_nanosecond(), rand::rng().random::<u16>())),
                namespace: Some(namespace.clone()),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(match type_ {
                EventType::Normal => "Normal".into(),
                EventType::Warning => "Warning".into(),
            }),
            reason: Some(reason.into()),
            action: Some(action.into()),
            // The API server refuses notes over 1 KiB.
            note: Some(truncate(note, 1024)),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        };
        Api::<Event>::namespaced(self.client.clone(), &namespace).create(&PostParams::default(), &event).await?;
        Ok(())
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max - 3;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn truncates_long_notes_on_a_char_boundary() {
        assert_eq!(super::truncate("short".into(), 1024), "short");
        let long = "é".repeat(600); // 1,200 bytes
        let cut = super::truncate(long, 1024);
        assert!(cut.len() <= 1024 && cut.ends_with("..."), "{}", cut.len());
    }
}
