//! The real `kubectl` against the simulator (`KUBE_SIM_KUBECTL`, else `kubectl` on the
//! PATH): apply of a CRD and its objects, schema defaults and validation, printer columns,
//! patches of every type,
//! server-side apply, describe, wait, deletion held by a finalizer, and the errors a real
//! API server gives.

use std::process::Output;

use kube_sim::{Options, Simulator};

async fn kubectl(sim: &Simulator, args: &[&str], stdin: Option<&str>) -> Output {
    sim.kubectl(args, stdin).await.expect("kubectl runs (set KUBE_SIM_KUBECTL or put kubectl on the PATH)")
}

/// Runs kubectl and returns its stdout, failing the test with its stderr if it fails.
async fn ok(sim: &Simulator, args: &[&str], stdin: Option<&str>) -> String {
    let out = kubectl(sim, args, stdin).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "kubectl {args:?} failed: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// Runs kubectl expecting failure and returns its stderr.
async fn fails(sim: &Simulator, args: &[&str], stdin: Option<&str>) -> String {
    let out = kubectl(sim, args, stdin).await;
    assert!(!out.status.success(), "kubectl {args:?} should fail: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const CRD: &str = r"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    additionalPrinterColumns:
    - {name: Size, type: integer, jsonPath: .spec.size}
    - {name: Color, type: string, jsonPath: .spec.color}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 1, maximum: 10}
              color: {type: string, enum: [red, blue], default: red}
          status:
            type: object
            x-kubernetes-preserve-unknown-fields: true
";

const DEPLOYMENT: &str = r"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, labels: {app: web}}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - {name: web, image: 'web:1', ports: [{containerPort: 80}]}
      - {name: sidecar, image: 'side:1'}
";

#[tokio::test]
async fn kubectl_applies_gets_patches_waits_and_deletes() {
    let sim = Simulator::start(Options::default()).await.unwrap();

    // A CRD, then its objects, as platform teams apply them.
    assert!(ok(&sim, &["apply", "-f", "-"], Some(CRD)).await.contains("created"));
    ok(&sim, &["wait", "--for=condition=Established", "crd/widgets.example.com", "--timeout=10s"], None).await;
    let widget = "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w1}\nspec: {size: 3, color: blue}\n";
    ok(&sim, &["apply", "-f", "-"], Some(widget)).await;
    let table = ok(&sim, &["get", "wd"], None).await;
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "SIZE", "COLOR"]);
    assert!(table.lines().nth(1).unwrap().split_whitespace().eq(["w1", "3", "blue"]), "{table}");

    // Client-side apply twice: the second is a strategic merge patch of the difference.
    assert!(ok(&sim, &["apply", "-f", "-"], Some(DEPLOYMENT)).await.contains("created"));
    let changed = DEPLOYMENT.replace("web:1", "web:2");
    assert!(ok(&sim, &["apply", "-f", "-"], Some(&changed)).await.contains("configured"));
    let got = ok(
        &sim,
        &["get", "deploy", "web", "-o", "jsonpath={.spec.template.spec.containers[*].image} {.metadata.generation}"],
        None,
    )
    .await;
    assert_eq!(got, "web:2 side:1 2");

    // Patches of every type.
    ok(
        &sim,
        &[
            "patch",
            "deploy",
            "web",
            "-p",
            r#"{"spec":{"template":{"spec":{"containers":[{"name":"sidecar","image":"side:2"}]}}}}"#,
        ],
        None,
    )
    .await;
    ok(&sim, &["patch", "deploy", "web", "--type=merge", "-p", r#"{"metadata":{"labels":{"tier":"front"}}}"#], None)
        .await;
    ok(
        &sim,
        &["patch", "deploy", "web", "--type=json", "-p", r#"[{"op":"replace","path":"/spec/replicas","value":4}]"#],
        None,
    )
    .await;
    let got = ok(
        &sim,
        &[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.spec.template.spec.containers[*].image} {.metadata.labels.tier} {.spec.replicas}",
        ],
        None,
    )
    .await;
    assert_eq!(got, "web:2 side:2 front 4", "the strategic patch merged the sidecar by name");
    ok(
        &sim,
        &["patch", "wd", "w1", "--type=merge", "--subresource=status", "-p", r#"{"status":{"ready":true}}"#],
        None,
    )
    .await;
    let got = ok(&sim, &["get", "wd", "w1", "-o", "jsonpath={.status.ready} {.metadata.generation}"], None).await;
    assert_eq!(got, "true 1", "a status patch leaves the generation");

    // Server-side apply, with a field manager and managed fields.
    let applied = ok(&sim, &["apply", "--server-side", "--field-manager=platform", "-f", "-"], Some(widget)).await;
    assert!(applied.contains("serverside-applied"), "{applied}");
    let managers = ok(&sim, &["get", "wd", "w1", "-o", "jsonpath={.metadata.managedFields[*].manager}"], None).await;
    assert!(managers.split_whitespace().any(|m| m == "platform"), "{managers}");

    // describe reads the object.
    let described = ok(&sim, &["describe", "deploy", "web"], None).await;
    assert!(described.contains("Name:") && described.contains("web"), "{described}");

    // Deletion held by a finalizer until it is removed.
    ok(
        &sim,
        &["patch", "wd", "w1", "--type=merge", "-p", r#"{"metadata":{"finalizers":["example.com/cleanup"]}}"#],
        None,
    )
    .await;
    ok(&sim, &["delete", "wd", "w1", "--wait=false"], None).await;
    let deleting = ok(&sim, &["get", "wd", "w1", "-o", "jsonpath={.metadata.deletionTimestamp}"], None).await;
    assert!(!deleting.is_empty(), "held by its finalizer");
    ok(&sim, &["patch", "wd", "w1", "--type=json", "-p", r#"[{"op":"remove","path":"/metadata/finalizers"}]"#], None)
        .await;
    ok(&sim, &["wait", "--for=delete", "wd/w1", "--timeout=10s"], None).await;

    // Errors as a real API server gives them.
    let missing = fails(&sim, &["get", "deploy", "nothing"], None).await;
    assert!(missing.contains(r#"deployments.apps "nothing" not found"#), "{missing}");
    let elsewhere = fails(&sim, &["apply", "-n", "nowhere", "-f", "-"], Some(widget)).await;
    assert!(elsewhere.contains(r#"namespaces "nowhere" not found"#), "{elsewhere}");
    let bad = fails(
        &sim,
        &["patch", "deploy", "web", "--type=json", "-p", r#"[{"op":"test","path":"/spec/replicas","value":9}]"#],
        None,
    )
    .await;
    assert!(bad.contains("could not be applied"), "{bad}");
    let invalid =
        fails(&sim, &["apply", "-f", "-"], Some("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: Not_Valid}\n"))
            .await;
    assert!(invalid.contains("is invalid") && invalid.contains("metadata.name"), "{invalid}");

    // Deleting a namespace takes its objects with it.
    ok(&sim, &["apply", "-f", "-"], Some("apiVersion: v1\nkind: Namespace\nmetadata: {name: team}\n")).await;
    ok(&sim, &["apply", "-n", "team", "-f", "-"], Some(widget)).await;
    ok(&sim, &["delete", "namespace", "team"], None).await;
    assert!(fails(&sim, &["get", "-n", "team", "wd", "w1"], None).await.contains("not found"));
}

#[tokio::test]
async fn a_crd_schema_defaults_refuses_unknown_fields_and_names_violations() {
    let sim = Simulator::start(Options::default()).await.unwrap();
    ok(&sim, &["apply", "-f", "-"], Some(CRD)).await;
    ok(&sim, &["wait", "--for=condition=Established", "crd/widgets.example.com", "--timeout=10s"], None).await;
    // The CRD's schema: defaults, unknown fields refused (kubectl asks for strict field
    // validation), and violations named by field.
    ok(
        &sim,
        &["apply", "-f", "-"],
        Some("apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: plain}\nspec: {size: 1}\n"),
    )
    .await;
    let color = ok(&sim, &["get", "wd", "plain", "-o", "jsonpath={.spec.color}"], None).await;
    assert_eq!(color, "red", "defaulted");
    let too_big = fails(
        &sim,
        &["apply", "-f", "-"],
        Some("apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: big}\nspec: {size: 11, color: green}\n"),
    )
    .await;
    assert!(too_big.contains("is invalid") && too_big.contains("spec.size: Invalid value: 11"), "{too_big}");
    assert!(too_big.contains(r#"spec.color: Unsupported value: "green""#), "{too_big}");
    let unknown = fails(
        &sim,
        &["apply", "-f", "-"],
        Some("apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: odd}\nspec: {size: 2, junk: 1}\n"),
    )
    .await;
    assert!(unknown.contains(r#"unknown field "spec.junk""#), "{unknown}");
    let missing = fails(
        &sim,
        &["apply", "-f", "-"],
        Some("apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: empty}\nspec: {}\n"),
    )
    .await;
    assert!(missing.contains("spec.size: Required value"), "{missing}");
}

#[tokio::test]
async fn server_side_apply_conflicts_with_another_manager_until_forced() {
    let sim = Simulator::start(Options::default()).await.unwrap();
    ok(&sim, &["apply", "-f", "-"], Some(CRD)).await;
    ok(&sim, &["wait", "--for=condition=Established", "crd/widgets.example.com", "--timeout=10s"], None).await;
    let widget = "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w1}\nspec: {size: 3, color: blue}\n";
    ok(&sim, &["apply", "--server-side", "--field-manager=platform", "-f", "-"], Some(widget)).await;
    // A field someone else changed conflicts with the next apply until it is forced.
    ok(&sim, &["patch", "wd", "w1", "--type=merge", "-p", r#"{"spec":{"size":4}}"#], None).await;
    let conflict = fails(&sim, &["apply", "--server-side", "--field-manager=platform", "-f", "-"], Some(widget)).await;
    assert!(conflict.contains(r#"conflict with "kubectl-patch""#) && conflict.contains(".spec.size"), "{conflict}");
    ok(&sim, &["apply", "--server-side", "--field-manager=platform", "--force-conflicts", "-f", "-"], Some(widget))
        .await;
    assert_eq!(ok(&sim, &["get", "wd", "w1", "-o", "jsonpath={.spec.size}"], None).await, "3");
}

#[tokio::test]
async fn deployments_roll_out_and_services_get_endpoints() {
    let sim = Simulator::start(Options::default()).await.unwrap();
    let service = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports: [{name: http, port: 8080, targetPort: 80}]\n";
    ok(&sim, &["apply", "-f", "-"], Some(DEPLOYMENT)).await;
    ok(&sim, &["apply", "-f", "-"], Some(service)).await;
    let rolled = ok(&sim, &["rollout", "status", "deploy/web", "--timeout=30s"], None).await;
    assert!(rolled.contains("successfully rolled out"), "{rolled}");
    let pods = ok(&sim, &["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[*].status.phase}"], None).await;
    assert_eq!(pods, "Running Running");
    let no_logs = fails(&sim, &["logs", "deploy/web"], None).await;
    assert!(no_logs.contains("container logs are not available"), "{no_logs}");
    let table = ok(&sim, &["get", "deploy", "web"], None).await;
    assert!(table.lines().nth(1).is_some_and(|l| l.split_whitespace().nth(1) == Some("2/2")), "{table}");

    // A new template replaces every pod.
    ok(&sim, &["apply", "-f", "-"], Some(&DEPLOYMENT.replace("web:1", "web:2"))).await;
    ok(&sim, &["rollout", "status", "deploy/web", "--timeout=30s"], None).await;
    let images =
        ok(&sim, &["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[*].spec.containers[0].image}"], None).await;
    assert_eq!(images, "web:2 web:2");

    // The Service's endpoints are its ready pods, on the target port.
    let mut addresses = String::new();
    for _ in 0..50 {
        addresses = ok(
            &sim,
            &["get", "endpoints", "web", "-o", "jsonpath={.subsets[0].addresses[*].ip} {.subsets[0].ports[0].port}"],
            None,
        )
        .await;
        if addresses.split_whitespace().count() == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let parts: Vec<&str> = addresses.split_whitespace().collect();
    assert_eq!(parts.len(), 3, "{addresses}");
    assert_ne!(parts[0], parts[1], "an address per pod");
    assert_eq!(parts[2], "80");
    let cluster_ip = ok(&sim, &["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"], None).await;
    assert!(cluster_ip.starts_with("10.96."), "{cluster_ip}");

    // Scaling down, then deleting, takes the pods away.
    ok(&sim, &["patch", "deploy", "web", "-p", r#"{"spec":{"replicas":1}}"#], None).await;
    ok(&sim, &["rollout", "status", "deploy/web", "--timeout=30s"], None).await;
    let count = ok(&sim, &["get", "pods", "-l", "app=web", "-o", "name"], None).await;
    assert_eq!(count.lines().count(), 1, "{count}");
    ok(&sim, &["delete", "deploy", "web"], None).await;
    ok(&sim, &["wait", "--for=delete", "pod", "-l", "app=web", "--timeout=10s"], None).await;
}
