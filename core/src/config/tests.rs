use std::path::PathBuf;

use super::*;

fn examples() -> Sources {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples");
    load_dir(&dir).unwrap()
}

fn parse(yaml: &str) -> Sources {
    let mut sources = Sources::default();
    parse_documents(yaml, "test.yaml", &mut sources).unwrap();
    sources
}

const TIERS: &str = r"
apiVersion: vellum.dev/v1alpha1
kind: StorageTier
metadata: {name: hot}
spec: {class: HOT, default: true, backend: {url: 'memory://'}}
---
apiVersion: vellum.dev/v1alpha1
kind: StorageTier
metadata: {name: cold}
spec: {class: COLD, backend: {url: 'memory://'}}
";

#[test]
fn the_shipped_examples_compile() {
    let (config, bundle) = compile(&examples()).unwrap();
    assert_eq!(config.default_tier, "hot");
    assert_eq!(config.tiers.keys().collect::<Vec<_>>(), ["cold", "frozen", "hot", "warm"]);
    let hot = &config.tiers["hot"];
    assert_eq!(hot.options["endpoint"], "http://minio.storage.svc:9000");
    assert_eq!(
        hot.secret_options["aws_secret_access_key"],
        SecretHandle::new("docs-s3-credentials", "aws_secret_access_key")
    );
    let policy = &config.retention_policies["standard-lifecycle"];
    assert_eq!(policy.transitions, [(30, "warm".to_owned()), (90, "cold".to_owned()), (365, "frozen".to_owned())]);
    let hook = &config.webhooks["contracts-notifier"];
    assert_eq!(hook.signing_key, SecretHandle::new("docs-webhook-keys", "contracts-notifier"));
    assert!(bundle.get(&hook.signing_key).is_some());
    let shards = config.shards.as_ref().unwrap();
    assert_eq!(shards.shards.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["shard-a", "shard-b"]);
}

#[test]
fn the_compiled_config_holds_no_secret_value() {
    let sources = examples();
    let (config, bundle) = compile(&sources).unwrap();
    let json = serde_json::to_string(&config).unwrap();
    for value in bundle.0.values() {
        let text = value.expose_str().unwrap();
        assert!(!json.contains(text), "a secret value leaked into the config");
    }
    assert!(!format!("{bundle:?}").contains("change-me"), "Debug of the bundle redacts values");
    // And it survives a trip through a ConfigMap.
    let back: PlatformConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, config);
    assert_eq!(back.content_hash(), config.content_hash());
}

#[test]
fn the_hash_changes_with_the_config() {
    let (a, _) = compile(&parse(TIERS)).unwrap();
    let mut sources = parse(TIERS);
    sources.tiers[1].spec.cost_per_gb_month = Some(0.004);
    let (b, _) = compile(&sources).unwrap();
    assert_ne!(a.content_hash(), b.content_hash());
    assert_eq!(a.content_hash().len(), 10);
}

#[test]
fn every_problem_is_reported_with_its_resource_and_reason() {
    let yaml = format!(
        r"{TIERS}
---
apiVersion: vellum.dev/v1alpha1
kind: StorageTier
metadata: {{name: also-default}}
spec: {{class: WARM, default: true, backend: {{url: 'memory://'}}}}
---
apiVersion: vellum.dev/v1alpha1
kind: RetentionPolicy
metadata: {{name: to-nowhere}}
spec:
  transitions: [{{afterDays: 30, toTier: lukewarm}}]
---
apiVersion: vellum.dev/v1alpha1
kind: RetentionPolicy
metadata: {{name: archive-without-frozen}}
spec:
  expiration: {{afterDays: 30, action: ARCHIVE}}
---
apiVersion: vellum.dev/v1alpha1
kind: Webhook
metadata: {{name: no-secret}}
spec: {{url: 'https://example.com', secretRef: {{name: missing, key: k}}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: keys}}
stringData: {{other: x, bad: 'whsec_!!'}}
---
apiVersion: vellum.dev/v1alpha1
kind: Webhook
metadata: {{name: no-key}}
spec: {{url: 'https://example.com', secretRef: {{name: keys, key: k}}}}
---
apiVersion: vellum.dev/v1alpha1
kind: Webhook
metadata: {{name: bad-key}}
spec: {{url: 'https://example.com', secretRef: {{name: keys, key: bad}}}}
---
apiVersion: vellum.dev/v1alpha1
kind: Webhook
metadata: {{name: forged-header}}
spec:
  url: 'https://example.com'
  secretRef: {{name: keys, key: other}}
  headers: [{{name: X-Webhook-Signature, value: forged}}]
"
    );
    let errors = compile(&parse(&yaml)).unwrap_err();
    let got: Vec<(&str, &str)> = errors.iter().map(|e| (e.resource.as_str(), e.reason)).collect();
    for expected in [
        ("StorageTier/hot", "InvalidSpec"),
        ("StorageTier/also-default", "InvalidSpec"),
        ("RetentionPolicy/to-nowhere", "TierNotFound"),
        ("RetentionPolicy/archive-without-frozen", "TierNotFound"),
        ("Webhook/no-secret", "SecretNotFound"),
        ("Webhook/no-key", "SecretKeyMissing"),
        ("Webhook/bad-key", "InvalidSpec"),
        ("Webhook/forged-header", "InvalidSpec"),
    ] {
        assert!(got.contains(&expected), "missing {expected:?} in {errors:#?}");
    }
    assert!(errors.iter().all(|e| !e.message.contains("whsec_!!")), "messages never quote a secret");
}

#[test]
fn a_platform_needs_one_default_tier() {
    let yaml = "apiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {name: hot}\nspec: {class: HOT, backend: {url: 'memory://'}}\n";
    let errors = compile(&parse(yaml)).unwrap_err();
    assert!(errors[0].message.contains("default: true"), "{errors:?}");
}

#[test]
fn unknown_kinds_and_bad_fields_are_load_errors_naming_the_document() {
    let mut sources = Sources::default();
    let e = parse_documents("apiVersion: apps/v1\nkind: Deployment\n", "x.yaml", &mut sources).unwrap_err().to_string();
    assert!(e.starts_with("x.yaml: document 0:") && e.contains("unsupported resource"), "{e}");
    let bad = "---\napiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {name: t}\nspec: {class: TEPID, backend: {url: 'memory://'}}\n";
    let e = parse_documents(bad, "y.yaml", &mut sources).unwrap_err().to_string();
    assert!(e.contains("y.yaml: document 0") && e.contains("TEPID"), "{e}");
}

#[test]
fn secret_data_is_base64_and_string_data_wins() {
    let sources = parse(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {a: aGVsbG8=, b: Zm9v}\nstringData: {b: bar}\n",
    );
    assert_eq!(sources.secrets["s"]["a"], b"hello");
    assert_eq!(sources.secrets["s"]["b"], b"bar");
}

#[test]
fn tier_credentials_come_from_a_secret_that_exists() {
    let tier = "apiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {name: hot}\nspec: {class: HOT, default: true, backend: {url: 's3://b', secretRef: {name: creds}}}\n";
    let errors = compile(&parse(tier)).unwrap_err();
    assert_eq!((errors[0].resource.as_str(), errors[0].reason), ("StorageTier/hot", "SecretNotFound"));

    let with_secret = format!(
        "{tier}---\napiVersion: v1\nkind: Secret\nmetadata: {{name: creds}}\nstringData: {{aws_access_key_id: id, aws_secret_access_key: key}}\n"
    );
    let (config, bundle) = compile(&parse(&with_secret)).unwrap();
    let handles = &config.tiers["hot"].secret_options;
    assert_eq!(handles.keys().collect::<Vec<_>>(), ["aws_access_key_id", "aws_secret_access_key"]);
    assert_eq!(bundle.get(&handles["aws_secret_access_key"]).unwrap().expose(), b"key");
}

#[test]
fn the_webhook_allow_list_comes_from_the_release_and_bad_cidrs_are_named() {
    let release = |cidrs: &str| {
        format!(
            "{TIERS}---
apiVersion: vellum.dev/v1alpha1
kind: BlueGreenRelease
metadata: {{name: docs}}
spec:
  version: '1'
  gateway: {{image: 'vellum/gateway:1'}}
  workers: {{image: 'vellum/workers:1'}}
  shardSetRef: shards
  nats: {{url: 'nats://nats:4222'}}
  jwt: {{algorithm: HS256, secretRef: {{name: jwt, key: secret}}}}
  webhookAllowedCidrs: {cidrs}
"
        )
    };
    let (config, _) = compile(&parse(&release("['127.0.0.0/8', '10.1.2.3']"))).unwrap();
    let allowed: Vec<String> = config.webhook_destinations.allowed_cidrs.iter().map(ToString::to_string).collect();
    assert_eq!(allowed, ["10.1.2.3/32", "127.0.0.0/8"]);
    assert!(config.webhook_destinations.check("127.0.0.1".parse().unwrap()).is_ok());
    assert!(config.webhook_destinations.check("192.168.0.1".parse().unwrap()).is_err());

    let errors = compile(&parse(&release("['10.0.0.0/40']"))).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].resource, "BlueGreenRelease/docs");
    assert!(errors[0].message.contains("10.0.0.0/40"), "{}", errors[0].message);

    let (config, _) = compile(&parse(TIERS)).unwrap();
    assert!(config.webhook_destinations.allowed_cidrs.is_empty(), "nothing non-public by default");
}

const LENIENT_GOOD: &str = "
apiVersion: vellum.dev/v1alpha1
kind: StorageTier
metadata: {name: hot}
spec: {class: HOT, default: true, backend: {url: 'memory://'}}
---
apiVersion: v1
kind: Secret
metadata: {name: keys}
stringData: {a: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw}
---
apiVersion: vellum.dev/v1alpha1
kind: Webhook
metadata: {name: good}
spec: {url: 'https://example.com/a', secretRef: {name: keys, key: a}}
";

#[test]
fn lenient_compilation_leaves_bad_resources_out_and_names_them() {
    let bad = "
---
apiVersion: vellum.dev/v1alpha1
kind: Webhook
metadata: {name: orphan}
spec: {url: 'https://example.com/b', secretRef: {name: missing, key: a}}
---
apiVersion: vellum.dev/v1alpha1
kind: RetentionPolicy
metadata: {name: lost}
spec: {schedule: '@daily', transitions: [{afterDays: 1, toTier: nowhere}]}
";
    let (compiled, left_out) = compile_lenient(parse(&format!("{LENIENT_GOOD}{bad}")));
    let (config, _) = compiled.unwrap();
    assert_eq!(config.webhooks.keys().collect::<Vec<_>>(), ["good"]);
    assert!(config.retention_policies.is_empty());
    let named: Vec<&str> = left_out.iter().map(|e| e.resource.as_str()).collect();
    assert_eq!(named, ["Webhook/orphan", "RetentionPolicy/lost"]);
    assert_eq!(left_out[0].reason, reasons::SECRET_NOT_FOUND);
}

#[test]
fn lenient_compilation_fails_whole_without_a_default_tier() {
    let yaml = LENIENT_GOOD.replace("default: true", "default: false");
    let (compiled, _) = compile_lenient(parse(&yaml));
    let errors = compiled.unwrap_err();
    assert!(errors.iter().any(|e| e.message.contains("default")), "{errors:?}");
}
