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

/// A Deployment whose pods run Python's HTTP server, each on its own address, serving a
/// page from a ConfigMap volume mounted (privately) at the same path in every pod.
fn web_server(www: &str, image: &str, replicas: u32) -> String {
    format!(
        r#"
apiVersion: v1
kind: ConfigMap
metadata: {{name: site}}
data: {{index.html: "hello from the simulator"}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, labels: {{app: web}}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: web
        image: '{image}'
        command: [python3, -u, -m, http.server, --bind, $(POD_IP), --directory, {www}, '8080']
        env:
        - name: POD_IP
          valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}
        ports: [{{name: http, containerPort: 8080}}]
        readinessProbe:
          httpGet: {{path: /index.html, port: http}}
          periodSeconds: 1
        livenessProbe:
          tcpSocket: {{port: 8080}}
          periodSeconds: 2
        volumeMounts: [{{name: site, mountPath: {www}}}]
      volumes: [{{name: site, configMap: {{name: site}}}}]
"#
    )
}

fn python_images() -> Vec<kube_sim::ImageRule> {
    vec!["python=python3".parse().unwrap()]
}

async fn fetch(url: &str) -> Option<String> {
    let response = reqwest::get(url).await.ok()?;
    response.status().is_success().then_some(())?;
    response.text().await.ok()
}

/// Whether a process is gone (or only a zombie waiting to be reaped).
fn gone(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_or(true, |stat| stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)] // one scenario, as a user walks through it
async fn deployments_run_real_processes_roll_out_and_services_get_endpoints() {
    let started = std::time::Instant::now();
    let sim = Simulator::start(Options { images: python_images(), ..Options::default() }).await.unwrap();
    let www = format!("/srv/kube-sim-test-{}", std::process::id());
    let service = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: http}]\n";
    ok(&sim, &["apply", "-f", "-"], Some(&web_server(&www, "python:3", 3))).await;
    ok(&sim, &["apply", "-f", "-"], Some(service)).await;
    let rolled = ok(&sim, &["rollout", "status", "deploy/web", "--timeout=60s"], None).await;
    assert!(rolled.contains("successfully rolled out"), "{rolled}");
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(30), "three replicas ready in {took:?}");
    let pods = ok(&sim, &["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[*].status.podIP}"], None).await;
    let ips: Vec<&str> = pods.split_whitespace().collect();
    assert_eq!(ips.len(), 3, "{pods}");
    assert_eq!(ips.iter().collect::<std::collections::HashSet<_>>().len(), 3, "an address per pod");
    for ip in &ips {
        // Every replica listens on the same port of its own address and serves the volume.
        let page = fetch(&format!("http://{ip}:8080/index.html")).await;
        assert_eq!(page.as_deref(), Some("hello from the simulator"), "{ip}");
    }
    assert!(!std::path::Path::new(&www).join("index.html").exists(), "the volume is mounted privately");
    let table = ok(&sim, &["get", "deploy", "web"], None).await;
    assert!(table.lines().nth(1).is_some_and(|l| l.split_whitespace().nth(1) == Some("3/3")), "{table}");

    // The server's own output, through kubectl logs.
    let logs = ok(&sim, &["logs", "deploy/web", "--tail=5"], None).await;
    assert!(logs.contains("GET /index.html HTTP/1.1\" 200"), "{logs}");

    // A changed ConfigMap reaches the running pods' files, as a kubelet refreshes volumes.
    ok(&sim, &["patch", "configmap", "site", "-p", r#"{"data":{"index.html":"changed"}}"#], None).await;
    let mut page = None;
    for _ in 0..100 {
        page = fetch(&format!("http://{}:8080/index.html", ips[0])).await;
        if page.as_deref() == Some("changed") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(page.as_deref(), Some("changed"));

    // The Service's endpoints are its ready pods, on the target port.
    let mut addresses = String::new();
    for _ in 0..50 {
        addresses = ok(
            &sim,
            &["get", "endpoints", "web", "-o", "jsonpath={.subsets[0].addresses[*].ip} {.subsets[0].ports[0].port}"],
            None,
        )
        .await;
        if addresses.split_whitespace().count() == 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let parts: Vec<&str> = addresses.split_whitespace().collect();
    assert_eq!(parts.len(), 4, "{addresses}");
    assert_eq!(parts[3], "8080");
    let cluster_ip = ok(&sim, &["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"], None).await;
    assert!(cluster_ip.starts_with("127."), "{cluster_ip}");

    // The Service answers on its own address, balancing across the pods, and through the API
    // server's proxy paths, as do the pods.
    for _ in 0..12 {
        assert_eq!(fetch(&format!("http://{cluster_ip}/index.html?via=service")).await.as_deref(), Some("changed"));
    }
    let names = ok(&sim, &["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[*].metadata.name}"], None).await;
    let mut reached = 0;
    for pod in names.split_whitespace() {
        if ok(&sim, &["logs", pod], None).await.contains("GET /index.html?via=service") {
            reached += 1;
        }
    }
    assert!(reached >= 2, "connections to the Service are spread over its pods ({reached} of 3 reached)");
    let proxied =
        ok(&sim, &["get", "--raw", "/api/v1/namespaces/default/services/web:http/proxy/index.html"], None).await;
    assert_eq!(proxied, "changed");
    let pod = ok(&sim, &["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[0].metadata.name}"], None).await;
    let proxied =
        ok(&sim, &["get", "--raw", &format!("/api/v1/namespaces/default/pods/{pod}:8080/proxy/index.html")], None)
            .await;
    assert_eq!(proxied, "changed");
    let missing = fails(&sim, &["get", "--raw", "/api/v1/namespaces/default/services/nope/proxy/"], None).await;
    assert!(missing.contains("NotFound") || missing.contains("not found"), "{missing}");

    // A new template replaces every pod; the old ones are stopped.
    let old = ok(
        &sim,
        &["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[*].status.containerStatuses[0].containerID}"],
        None,
    )
    .await;
    ok(&sim, &["apply", "-f", "-"], Some(&web_server(&www, "python:3.11", 3))).await;
    ok(&sim, &["rollout", "status", "deploy/web", "--timeout=60s"], None).await;
    let images =
        ok(&sim, &["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[*].spec.containers[0].image}"], None).await;
    assert_eq!(images, "python:3.11 python:3.11 python:3.11");
    let replaced: Vec<String> =
        old.split_whitespace().map(|id| id.trim_start_matches("kube-sim://").to_owned()).collect();
    for _ in 0..50 {
        if replaced.iter().all(|p| gone(p)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(replaced.iter().all(|p| gone(p)), "replaced pods' processes stopped: {replaced:?}");

    // Nothing the simulator started outlives it.
    let live = ok(
        &sim,
        &["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[*].status.containerStatuses[0].containerID}"],
        None,
    )
    .await;
    let survivors: Vec<String> =
        live.split_whitespace().map(|id| id.trim_start_matches("kube-sim://").to_owned()).collect();
    assert_eq!(survivors.len(), 3);
    assert!(survivors.iter().all(|p| !gone(p)));
    sim.stop().await;
    for _ in 0..50 {
        if survivors.iter().all(|p| gone(p)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(survivors.iter().all(|p| gone(p)), "pods stopped with the simulator: {survivors:?}");
    assert!(!std::path::Path::new(&www).exists(), "the mount point the kubelet made is removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_restart_by_policy_and_unknown_images_fail_to_pull() {
    let sim = Simulator::start(Options {
        images: vec!["sh=sh".parse().unwrap(), "fake/*=kwok".parse().unwrap()],
        restart_backoff: Some(std::time::Duration::from_millis(200)),
        ..Options::default()
    })
    .await
    .unwrap();
    let pods = r#"
apiVersion: v1
kind: Pod
metadata: {name: crash}
spec:
  containers:
  - {name: main, image: sh, command: [sh, -c, 'echo "run $(GREETING)"; exit 3'], env: [{name: GREETING, value: hi}]}
---
apiVersion: v1
kind: Pod
metadata: {name: once}
spec:
  restartPolicy: Never
  initContainers:
  - {name: setup, image: sh, command: [sh, -c, 'echo set up']}
  containers:
  - {name: main, image: sh, command: [sh, -c, 'echo done; exit 0']}
---
apiVersion: v1
kind: Pod
metadata: {name: ticker}
spec:
  restartPolicy: Never
  containers:
  - {name: main, image: sh, command: [sh, -c, 'sleep 0.5; for i in 1 2 3; do echo tick $i; sleep 0.3; done']}
---
apiVersion: v1
kind: Pod
metadata: {name: scale}
spec:
  containers:
  - {name: main, image: 'fake/thing:1'}
---
apiVersion: v1
kind: Pod
metadata: {name: scale-once}
spec:
  restartPolicy: OnFailure
  containers:
  - {name: main, image: 'fake/job:1'}
---
apiVersion: v1
kind: Pod
metadata: {name: nowhere}
spec:
  containers:
  - {name: main, image: 'unknown/image:1'}
"#;
    ok(&sim, &["apply", "-f", "-"], Some(pods)).await;
    ok(&sim, &["wait", "--for=condition=Ready", "pod/ticker", "--timeout=30s"], None).await;
    // Following a running container streams its lines and ends with it.
    assert_eq!(ok(&sim, &["logs", "-f", "ticker"], None).await, "tick 1\ntick 2\ntick 3\n");
    ok(&sim, &["wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/once", "--timeout=30s"], None).await;
    assert_eq!(ok(&sim, &["logs", "once"], None).await, "done\n");
    assert_eq!(ok(&sim, &["logs", "once", "-c", "setup"], None).await, "set up\n");
    ok(&sim, &["wait", "--for=condition=Ready", "pod/scale", "--timeout=10s"], None).await;
    // A kwok container of a pod that runs to completion completes, as kwok's stages have it.
    ok(&sim, &["wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/scale-once", "--timeout=10s"], None).await;
    let kwok_logs = fails(&sim, &["logs", "scale"], None).await;
    assert!(kwok_logs.contains("without a process (kwok mode)"), "{kwok_logs}");

    let mut restarts = 0;
    for _ in 0..100 {
        let out =
            ok(&sim, &["get", "pod", "crash", "-o", "jsonpath={.status.containerStatuses[0].restartCount}"], None)
                .await;
        restarts = out.parse().unwrap_or(0);
        if restarts >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(restarts >= 2, "a failing container restarts ({restarts})");
    let last = ok(
        &sim,
        &["get", "pod", "crash", "-o", "jsonpath={.status.containerStatuses[0].lastState.terminated.exitCode}"],
        None,
    )
    .await;
    assert_eq!(last, "3");
    assert_eq!(ok(&sim, &["logs", "crash", "--previous"], None).await, "run hi\n");
    let table = ok(&sim, &["get", "pod", "nowhere"], None).await;
    assert!(table.contains("ErrImagePull") || table.contains("ImagePullBackOff"), "{table}");
    let described = ok(&sim, &["describe", "pod", "crash"], None).await;
    assert!(described.contains("Back-off restarting failed container"), "{described}");
    let all =
        ["delete", "pod", "crash", "once", "ticker", "scale", "scale-once", "nowhere", "--wait=true", "--timeout=20s"];
    ok(&sim, &all, None).await;
    assert_eq!(ok(&sim, &["get", "pods", "-o", "name"], None).await, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_to_completion_or_fail_past_their_backoff_limit() {
    let sim = Simulator::start(Options {
        images: vec!["sh=sh".parse().unwrap()],
        restart_backoff: Some(std::time::Duration::from_millis(100)),
        ..Options::default()
    })
    .await
    .unwrap();
    let jobs = r#"
apiVersion: batch/v1
kind: Job
metadata: {name: ok}
spec:
  completions: 3
  parallelism: 2
  template:
    spec:
      restartPolicy: Never
      containers:
      - {name: main, image: sh, command: [sh, -c, 'echo "pod $(NAME) done"'],
         env: [{name: NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]}
---
apiVersion: batch/v1
kind: Job
metadata: {name: bad}
spec:
  backoffLimit: 1
  template:
    spec:
      restartPolicy: Never
      containers:
      - {name: main, image: sh, command: [sh, -c, 'echo failing; exit 2']}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers: [{name: main, image: sh, command: [sh, -c, 'true']}]
"#;
    ok(&sim, &["apply", "-f", "-"], Some(jobs)).await;
    ok(&sim, &["wait", "--for=condition=complete", "job/ok", "--timeout=30s"], None).await;
    ok(&sim, &["wait", "--for=condition=failed", "job/bad", "--timeout=30s"], None).await;
    let table = ok(&sim, &["get", "jobs"], None).await;
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(row("ok")[1..3], ["Complete", "3/3"], "{table}");
    assert_eq!(row("bad")[1..3], ["Failed", "0/1"], "{table}");
    let reason = ok(
        &sim,
        &["get", "job", "bad", "-o", "jsonpath={.status.conditions[?(@.type==\"Failed\")].reason} {.status.failed}"],
        None,
    )
    .await;
    assert_eq!(reason, "BackoffLimitExceeded 2");
    let logs = ok(&sim, &["logs", "job/ok"], None).await;
    assert!(logs.starts_with("pod ok-") && logs.ends_with(" done\n"), "{logs}");
    let pods = ok(&sim, &["get", "pods", "-l", "job-name=ok", "-o", "jsonpath={.items[*].status.phase}"], None).await;
    assert_eq!(pods, "Succeeded Succeeded Succeeded");
    let cron = ok(&sim, &["get", "cronjobs"], None).await;
    assert!(cron.contains("0 3 * * *") && cron.contains("<none>"), "{cron}");
    let bad_schedule = "apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: broken}\nspec:\n  schedule: 'every minute'\n  jobTemplate: {spec: {template: {spec: {restartPolicy: Never, containers: [{name: c, image: sh}]}}}}\n";
    let refused = fails(&sim, &["apply", "-f", "-"], Some(bad_schedule)).await;
    assert!(refused.contains("spec.schedule: Invalid value: \"every minute\""), "{refused}");
    // Deleting a Job takes its pods with it.
    ok(&sim, &["delete", "job", "ok", "bad"], None).await;
    ok(&sim, &["wait", "--for=delete", "pod", "-l", "job-name", "--timeout=20s"], None).await;
    let nodes = ok(&sim, &["get", "nodes"], None).await;
    assert!(nodes.contains("kube-sim") && nodes.contains("Ready"), "{nodes}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_probes_see_the_pods_mounts_and_a_pod_ignoring_sigterm_is_killed_after_its_grace() {
    let sim = Simulator::start(Options { images: vec!["sh=sh".parse().unwrap()], ..Options::default() }).await.unwrap();
    let dir = format!("/run/kube-sim-test-{}/probe", std::process::id());
    let pod = format!(
        r#"
apiVersion: v1
kind: ConfigMap
metadata: {{name: probe}}
data: {{ok: "yes"}}
---
apiVersion: v1
kind: Pod
metadata: {{name: stubborn}}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: main
    image: sh
    command: [sh, -c, 'trap "echo ignoring TERM" TERM; echo started; while true; do sleep 0.1; done']
    readinessProbe:
      exec: {{command: [sh, -c, 'test "$(cat {dir}/ok)" = yes']}}
      periodSeconds: 1
    volumeMounts: [{{name: probe, mountPath: {dir}}}]
  volumes: [{{name: probe, configMap: {{name: probe}}}}]
"#
    );
    ok(&sim, &["apply", "-f", "-"], Some(&pod)).await;
    ok(&sim, &["wait", "--for=condition=Ready", "pod/stubborn", "--timeout=20s"], None).await;
    let id =
        ok(&sim, &["get", "pod", "stubborn", "-o", "jsonpath={.status.containerStatuses[0].containerID}"], None).await;
    let pid = id.trim_start_matches("kube-sim://").to_owned();
    let started = std::time::Instant::now();
    ok(&sim, &["delete", "pod", "stubborn", "--wait=true", "--timeout=20s"], None).await;
    let took = started.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(1500),
        "SIGTERM was ignored, so the grace period ran out: {took:?}"
    );
    assert!(took < std::time::Duration::from_secs(10), "then SIGKILL: {took:?}");
    for _ in 0..50 {
        if gone(&pid) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(gone(&pid));
    let events = ok(&sim, &["get", "events", "-o", "jsonpath={.items[*].reason}"], None).await;
    for reason in ["Scheduled", "Started", "Killing"] {
        assert!(events.contains(reason), "{events}");
    }
}
