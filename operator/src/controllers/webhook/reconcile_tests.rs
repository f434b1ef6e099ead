//! The exact requests a Webhook reconcile makes, against a mocked API server.

use std::sync::{Arc, Mutex};

use super::*;
use crate::controllers::testkit::{Server, World, body_of, context, lines, path_of};

#[tokio::test]
async fn a_webhook_whose_secret_is_missing_is_refused_in_status_before_any_delivery_log_read() {
    let mut hook: Webhook = serde_yaml::from_str(
        "apiVersion: vellum.dev/v1alpha1\nkind: Webhook\nmetadata: {name: hook, namespace: ns, generation: 1}\nspec: {url: 'https://198.51.100.7/h', secretRef: {name: keys, key: a}}\n",
    )
    .unwrap();
    hook.metadata.uid = Some("w1".into());
    let server = Arc::new(Mutex::new(Server::default()));
    server.lock().unwrap().objects.insert(path_of::<Webhook>("ns", "hook"), serde_json::to_value(&hook).unwrap());
    let world = World { webhooks: vec![hook.clone()], ..World::default() };
    let action = reconcile(Arc::new(hook), context(&world, Arc::clone(&server))).await.unwrap();
    let status_line = "PATCH /apis/vellum.dev/v1alpha1/namespaces/ns/webhooks/hook/status?&force=true&fieldManager=vellum.dev%2Fwebhook";
    let event_line = "POST /apis/events.k8s.io/v1/namespaces/ns/events?";
    assert_eq!(lines(&server), [status_line, event_line]);
    let status: WebhookStatus = serde_json::from_value(body_of(&server, status_line)["status"].clone()).unwrap();
    let types: Vec<(&str, &str, &str)> =
        status.conditions.0.iter().map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str())).collect();
    assert_eq!(
        types,
        [
            ("Ready", "False", reasons::SECRET_NOT_FOUND),
            ("Deactivated", "False", reasons::RECONCILED),
            ("Degraded", "False", reasons::RECONCILED),
        ]
    );
    assert_eq!(body_of(&server, event_line)["type"], "Warning");
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(60)));
}
