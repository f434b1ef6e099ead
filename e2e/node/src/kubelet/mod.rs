//! The kubelet: it runs the pods the scheduler binds to its node, gives each an address of
//! the node's pod range, and runs their containers as local processes: the image names an
//! executable through the rules given at start; the environment, volumes, probes, restart
//! policy, logs and graceful termination are those of a real kubelet. Images ruled `kwok`
//! (or every image, in the global kwok mode) are marked running and ready without starting
//! anything, for scale tests (and, in pods that run to completion, completed). An image no
//! rule names fails to pull, as on a node that cannot reach its registry.

pub mod api;
pub mod env;
pub mod logs;
pub mod probe;
pub mod process;
pub mod volumes;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use self::api::NodeApi;
use self::env::Waiting;
use self::process::{Groups, Launch, Mount, Process};
use crate::meta;

/// What a container image runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// This executable (a path, or a name looked up on the PATH) is the image's entrypoint.
    Process(PathBuf),
    /// Nothing runs: the container is marked running and ready, as kwok does.
    Kwok,
}

/// `PATTERN=EXECUTABLE` or `PATTERN=kwok`; `*` in the pattern matches anything, and a
/// pattern without a tag matches every tag of the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRule {
    pub pattern: String,
    pub runtime: Runtime,
}

impl std::str::FromStr for ImageRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (pattern, target) = s
            .split_once('=')
            .ok_or_else(|| format!("an image rule is PATTERN=EXECUTABLE or PATTERN=kwok, not {s:?}"))?;
        let runtime = if target == "kwok" { Runtime::Kwok } else { Runtime::Process(PathBuf::from(target)) };
        Ok(Self { pattern: pattern.to_owned(), runtime })
    }
}

fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || !text[first.len()..].ends_with(last) || text.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

impl ImageRule {
    fn matches(&self, image: &str) -> bool {
        let tagless = !self.pattern.rsplit('/').next().unwrap_or_default().contains([':', '@']);
        glob(&self.pattern, image) || (tagless && glob(&format!("{}:*", self.pattern), image))
    }
}

/// How the kubelet runs pods.
#[derive(Clone, Debug)]
pub struct Config {
    pub images: Vec<ImageRule>,
    /// Every image no rule names runs as kwok does.
    pub kwok: bool,
    /// The first restart delay of a crashing container (doubling up to five minutes).
    pub restart_backoff: Duration,
}

impl Config {
    fn runtime(&self, image: &str) -> Option<Runtime> {
        match self.images.iter().find(|r| r.matches(image)) {
            Some(rule) => Some(rule.runtime.clone()),
            None if self.kwok => Some(Runtime::Kwok),
            None => None,
        }
    }
}

/// The kubelet; cheap to clone.
#[derive(Clone, Debug)]
pub struct Kubelet {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    api: Arc<dyn NodeApi>,
    config: Config,
    root: PathBuf,
    pods: Mutex<HashMap<String, PodHandle>>,
    ips: Mutex<HashMap<String, Ipv4Addr>>,
    groups: Groups,
    /// Mount points the kubelet had to create on the host, removed when it stops.
    created: Mutex<Vec<PathBuf>>,
}

#[derive(Debug)]
struct PodHandle {
    stop: watch::Sender<Option<i64>>,
    task: JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Kubelet {
    /// A kubelet keeping its pods' files under `root`, seeing the cluster through `api`.
    pub fn new(api: Arc<dyn NodeApi>, config: Config, root: PathBuf) -> Self {
        let inner = Inner {
            api,
            config,
            root,
            pods: Mutex::new(HashMap::new()),
            ips: Mutex::new(HashMap::new()),
            groups: Groups::default(),
            created: Mutex::new(Vec::new()),
        };
        Self { inner: Arc::new(inner) }
    }

    /// Where a container's log of one run is.
    pub fn log_path(&self, uid: &str, container: &str, restart: i64) -> PathBuf {
        self.inner.root.join(uid).join("logs").join(container).join(format!("{restart}.log"))
    }

    /// Stops every container at once (SIGKILL) and removes what the kubelet made.
    pub fn shutdown(&self) {
        for (_, handle) in lock(&self.inner.pods).drain() {
            handle.task.abort();
        }
        process::kill_all(&self.inner.groups);
        let mut created = lock(&self.inner.created);
        while let Some(path) = created.pop() {
            if path.is_dir() {
                let _ = std::fs::remove_dir(&path);
            } else if std::fs::metadata(&path).is_ok_and(|m| m.len() == 0) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// The cluster as this node sees it.
    pub fn api(&self) -> &Arc<dyn NodeApi> {
        &self.inner.api
    }

    /// One pass over the pods: bind new ones, start, stop and forget.
    pub fn sync(&self) {
        let api = &self.inner.api;
        let pods = api.pods();
        let live: std::collections::HashSet<&str> = pods.iter().map(meta::uid).collect();
        for pod in &pods {
            self.sync_pod(pod);
        }
        // Pods removed without the kubelet (force deletion): their processes go.
        let mut handles = lock(&self.inner.pods);
        let gone: Vec<String> = handles.keys().filter(|uid| !live.contains(uid.as_str())).cloned().collect();
        for uid in gone {
            if let Some(handle) = handles.remove(&uid) {
                handle.task.abort();
            }
            let _ = std::fs::remove_dir_all(self.inner.root.join(&uid));
        }
        drop(handles);
        let mut ips = lock(&self.inner.ips);
        ips.retain(|uid, ip| {
            let keep = live.contains(uid.as_str());
            if !keep {
                api.release_ip(*ip);
            }
            keep
        });
    }

    fn sync_pod(&self, pod: &Value) {
        let api = &self.inner.api;
        let node = api.node_name();
        let (ns, name, uid) = (meta::namespace(pod), meta::name(pod), meta::uid(pod));
        if meta::deleting(pod) {
            let grace = pod.pointer("/metadata/deletionGracePeriodSeconds").and_then(Value::as_i64).unwrap_or(0);
            let handles = lock(&self.inner.pods);
            match handles.get(uid) {
                Some(handle) if !handle.task.is_finished() => {
                    handle.stop.send_if_modified(|v| {
                        let first = v.is_none();
                        *v = Some(grace);
                        first
                    });
                }
                _ => {
                    drop(handles);
                    api.delete_pod(ns, name, None);
                }
            }
            return;
        }
        if meta::str_at(pod, "/spec/nodeName") != Some(node) {
            return;
        }
        let pod = pod.clone();
        if pod.pointer("/status/phase").is_some_and(|p| p != "Pending") || lock(&self.inner.pods).contains_key(uid) {
            return;
        }
        if pod.pointer("/status/podIP").is_some() {
            // Started by an earlier run of this node: what ran is gone with it.
            return;
        }
        let ip = *lock(&self.inner.ips).entry(uid.to_owned()).or_insert_with(|| api.pod_ip());
        let containers: Vec<Value> = all_containers(&pod).into_iter().map(|(_, c)| c).collect();
        let kwok = containers
            .iter()
            .all(|c| self.inner.config.runtime(meta::str_at(c, "/image").unwrap_or_default()) == Some(Runtime::Kwok));
        if kwok {
            let status = kwok_status(&pod, ip, api.host_ip());
            api.set_status(ns, name, uid, status);
            return;
        }
        let ctx = Arc::new(PodCtx::new(self.clone(), &pod, ip));
        ctx.publish();
        let (stop, stopped) = watch::channel(None);
        let task = tokio::spawn(run_pod(ctx, pod, stopped));
        lock(&self.inner.pods).insert(uid.to_owned(), PodHandle { stop, task });
    }

    /// Records a Kubernetes Event about a pod, as the kubelet reports what it does.
    fn event(&self, pod: &Value, kind: &str, reason: &str, message: &str, field_path: Option<&str>) {
        let node = self.inner.api.node_name();
        let now = meta::now();
        let mut involved = json!({"apiVersion": "v1", "kind": "Pod", "name": meta::name(pod),
                                  "namespace": meta::namespace(pod), "uid": meta::uid(pod)});
        if let Some(path) = field_path {
            involved["fieldPath"] = json!(path);
        }
        let stamp = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
        let event = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": format!("{}.{stamp:x}", meta::name(pod))},
            "involvedObject": involved, "reason": reason, "message": message, "type": kind,
            "source": {"component": "kubelet", "host": node},
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            "reportingComponent": "kubelet", "reportingInstance": node,
        });
        self.inner.api.event(meta::namespace(pod), event);
    }
}

/// The pod's quality-of-service class: the API server's when it set one (it is immutable
/// once set), else computed as the API server does from requests and limits.
fn qos_class(pod: &Value) -> String {
    if let Some(class) = meta::str_at(pod, "/status/qosClass") {
        return class.to_owned();
    }
    let containers = all_containers(pod);
    let resources = |c: &Value, kind: &str, name: &str| c.pointer(&format!("/resources/{kind}/{name}")).cloned();
    let mut any = false;
    let mut guaranteed = true;
    for (_, c) in &containers {
        for name in ["cpu", "memory"] {
            let (request, limit) = (resources(c, "requests", name), resources(c, "limits", name));
            any |= request.is_some() || limit.is_some();
            guaranteed &= limit.is_some() && (request.is_none() || request == limit);
        }
    }
    if !any {
        "BestEffort".into()
    } else if guaranteed {
        "Guaranteed".into()
    } else {
        "Burstable".into()
    }
}

/// Init containers, then containers, with whether each is an init container.
fn all_containers(pod: &Value) -> Vec<(bool, Value)> {
    let list = |p: &str| pod.pointer(p).and_then(Value::as_array).cloned().unwrap_or_default();
    list("/spec/initContainers")
        .into_iter()
        .map(|c| (true, c))
        .chain(list("/spec/containers").into_iter().map(|c| (false, c)))
        .collect()
}

fn condition(kind: &str, ok: bool, reason: Option<&str>, message: Option<String>, now: &str) -> Value {
    let mut c = json!({"type": kind, "status": if ok { "True" } else { "False" }, "lastProbeTime": null, "lastTransitionTime": now});
    if let Some(r) = reason {
        c["reason"] = json!(r);
    }
    if let Some(m) = message {
        c["message"] = json!(m);
    }
    c
}

/// A kwok pod: running and ready at once.
fn kwok_status(pod: &Value, ip: Ipv4Addr, host: Ipv4Addr) -> Value {
    let now = meta::now();
    // A pod that runs to completion (a Job's) has completed; any other runs on.
    let completes = !restarts(meta::str_at(pod, "/spec/restartPolicy").unwrap_or("Always"), 0);
    let state = if completes {
        json!({"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}})
    } else {
        json!({"running": {"startedAt": now}})
    };
    let statuses: Vec<Value> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| {
            json!({"name": c["name"], "image": c["image"], "imageID": "", "ready": !completes, "started": !completes,
                   "restartCount": 0, "state": state})
        })
        .collect();
    let conditions = if completes {
        let done = Some("PodCompleted");
        [
            condition("PodScheduled", true, None, None, &now),
            condition("Initialized", true, done, None, &now),
            condition("ContainersReady", false, done, None, &now),
            condition("Ready", false, done, None, &now),
        ]
    } else {
        ["PodScheduled", "Initialized", "ContainersReady", "Ready"].map(|k| condition(k, true, None, None, &now))
    };
    json!({
        "phase": if completes { "Succeeded" } else { "Running" },
        "hostIP": host.to_string(),
        "hostIPs": [{"ip": host.to_string()}],
        "podIP": ip.to_string(),
        "podIPs": [{"ip": ip.to_string()}],
        "startTime": now,
        "qosClass": qos_class(pod),
        "conditions": conditions,
        "containerStatuses": statuses,
    })
}

/// What the kubelet knows of one container.
#[derive(Clone, Debug)]
#[allow(clippy::struct_excessive_bools)]
struct Container {
    name: String,
    image: String,
    init: bool,
    state: Value,
    last: Option<Value>,
    ready: bool,
    started: bool,
    restarts: i64,
    /// Created at least once.
    created: bool,
    /// Ended and will not be restarted.
    done: Option<i32>,
    pid: Option<i32>,
}

impl Container {
    fn waiting(&mut self, reason: &str, message: Option<&str>) {
        let mut w = json!({"reason": reason});
        if let Some(m) = message {
            w["message"] = json!(m);
        }
        self.state = json!({"waiting": w});
    }

    fn status(&self) -> Value {
        let mut s = json!({
            "name": self.name, "image": self.image, "imageID": format!("vellum-node://{}", self.image),
            "ready": self.ready, "started": self.started, "restartCount": self.restarts, "state": self.state,
            "lastState": self.last.clone().unwrap_or_else(|| json!({})),
        });
        if let Some(pid) = self.pid {
            s["containerID"] = json!(format!("vellum-node://{pid}"));
        }
        s
    }
}

/// One pod the kubelet runs.
#[derive(Debug)]
struct PodCtx {
    kubelet: Kubelet,
    namespace: String,
    name: String,
    uid: String,
    ip: Ipv4Addr,
    dir: PathBuf,
    start: String,
    qos: String,
    containers: Mutex<Vec<Container>>,
}

impl PodCtx {
    fn new(kubelet: Kubelet, pod: &Value, ip: Ipv4Addr) -> Self {
        let dir = kubelet.inner.root.join(meta::uid(pod));
        let containers = all_containers(pod)
            .into_iter()
            .map(|(init, c)| {
                let mut container = Container {
                    name: meta::str_at(&c, "/name").unwrap_or_default().to_owned(),
                    image: meta::str_at(&c, "/image").unwrap_or_default().to_owned(),
                    init,
                    state: json!({}),
                    last: None,
                    ready: false,
                    started: false,
                    restarts: 0,
                    created: false,
                    done: None,
                    pid: None,
                };
                container.waiting(if init { "PodInitializing" } else { "ContainerCreating" }, None);
                container
            })
            .collect();
        Self {
            kubelet,
            namespace: meta::namespace(pod).to_owned(),
            name: meta::name(pod).to_owned(),
            uid: meta::uid(pod).to_owned(),
            ip,
            dir,
            start: meta::now(),
            qos: qos_class(pod),
            containers: Mutex::new(containers),
        }
    }

    fn api(&self) -> &dyn NodeApi {
        self.kubelet.inner.api.as_ref()
    }

    fn update(&self, index: usize, change: impl FnOnce(&mut Container)) {
        if let Some(c) = lock(&self.containers).get_mut(index) {
            change(c);
        }
        self.publish();
    }

    fn container(&self, index: usize) -> Container {
        lock(&self.containers)[index].clone()
    }

    /// The pod's status from its containers.
    fn status(&self, previous: &Value) -> Value {
        let containers = lock(&self.containers).clone();
        let now = meta::now();
        let (init, main): (Vec<&Container>, Vec<&Container>) = containers.iter().partition(|c| c.init);
        let init_failed = init.iter().any(|c| c.done.is_some_and(|code| code != 0));
        let initialized = init.iter().all(|c| c.done == Some(0));
        let all_done = main.iter().all(|c| c.done.is_some());
        let phase = if init_failed {
            "Failed"
        } else if initialized && all_done && !main.is_empty() {
            if main.iter().all(|c| c.done == Some(0)) { "Succeeded" } else { "Failed" }
        } else if initialized && main.iter().all(|c| c.created) {
            "Running"
        } else {
            "Pending"
        };
        let unready: Vec<&str> = main.iter().filter(|c| !c.ready).map(|c| c.name.as_str()).collect();
        let uninitialized: Vec<&str> = init.iter().filter(|c| c.done != Some(0)).map(|c| c.name.as_str()).collect();
        let list = |names: &[&str]| format!("[{}]", names.join(" "));
        let finished = matches!(phase, "Succeeded" | "Failed");
        let ready_condition = |kind: &str| {
            if unready.is_empty() {
                condition(kind, true, None, None, &now)
            } else if finished {
                condition(kind, false, Some("PodCompleted"), None, &now)
            } else {
                condition(
                    kind,
                    false,
                    Some("ContainersNotReady"),
                    Some(format!("containers with unready status: {}", list(&unready))),
                    &now,
                )
            }
        };
        let mut conditions = vec![
            condition("PodReadyToStartContainers", true, None, None, &now),
            if uninitialized.is_empty() {
                condition("Initialized", true, None, None, &now)
            } else {
                condition(
                    "Initialized",
                    false,
                    Some("ContainersNotInitialized"),
                    Some(format!("containers with incomplete status: {}", list(&uninitialized))),
                    &now,
                )
            },
            ready_condition("Ready"),
            ready_condition("ContainersReady"),
            condition("PodScheduled", true, None, None, &now),
        ];
        // A condition that did not change keeps the time it last did.
        for c in &mut conditions {
            let before = previous
                .get("conditions")
                .and_then(Value::as_array)
                .and_then(|cs| cs.iter().find(|p| p["type"] == c["type"] && p["status"] == c["status"]));
            if let Some(time) = before.and_then(|p| p.get("lastTransitionTime")) {
                c["lastTransitionTime"] = time.clone();
            }
        }
        let mut status = json!({
            "phase": phase,
            "conditions": conditions,
            "hostIP": self.api().host_ip().to_string(),
            "hostIPs": [{"ip": self.api().host_ip().to_string()}],
            "podIP": self.ip.to_string(),
            "podIPs": [{"ip": self.ip.to_string()}],
            "startTime": self.start,
            "qosClass": self.qos,
            "containerStatuses": main.iter().map(|c| c.status()).collect::<Vec<_>>(),
        });
        if !init.is_empty() {
            status["initContainerStatuses"] = json!(init.iter().map(|c| c.status()).collect::<Vec<_>>());
        }
        status
    }

    /// Writes the pod's status (if the pod is still this one).
    fn publish(&self) {
        let previous = self.pod().and_then(|p| p.get("status").cloned()).unwrap_or(Value::Null);
        let status = self.status(&previous);
        self.api().set_status(&self.namespace, &self.name, &self.uid, status);
    }

    fn pod(&self) -> Option<Value> {
        self.api().pod(&self.namespace, &self.name).filter(|p| meta::uid(p) == self.uid)
    }

    fn event(&self, kind: &str, reason: &str, message: &str, container: Option<&str>) {
        if let Some(pod) = self.pod() {
            let path = container.map(|c| format!("spec.containers{{{c}}}"));
            self.kubelet.event(&pod, kind, reason, message, path.as_deref());
        }
    }

    /// The base environment of a container: the host's PATH, the pod's hostname, the API
    /// server and the Service variables of the pod's namespace.
    fn base_env(&self, pod: &Value) -> Vec<(String, String)> {
        let api = self.api().api_server();
        let mut vars = vec![
            ("PATH".to_owned(), std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into())),
            ("HOSTNAME".to_owned(), self.name.clone()),
            ("HOME".to_owned(), std::env::var("HOME").unwrap_or_else(|_| "/root".into())),
            ("KUBERNETES_SERVICE_HOST".to_owned(), api.ip().to_string()),
            ("KUBERNETES_SERVICE_PORT".to_owned(), api.port().to_string()),
        ];
        if pod.pointer("/spec/enableServiceLinks").and_then(Value::as_bool) != Some(false) {
            vars.extend(env::service_vars(&self.api().services(&self.namespace)));
        }
        vars
    }

    /// Everything needed to start container `spec` now, or why it cannot start.
    fn prepare(
        &self,
        pod: &Value,
        spec: &Value,
        volumes: &volumes::Volumes,
        restart: i64,
    ) -> Result<Option<Launch>, Waiting> {
        let name = meta::str_at(spec, "/name").unwrap_or_default();
        let image = meta::str_at(spec, "/image").unwrap_or_default();
        let entry = match self.kubelet.inner.config.runtime(image) {
            Some(Runtime::Process(path)) => path,
            Some(Runtime::Kwok) => return Ok(None),
            None => {
                return Err(Waiting::new(
                    "ErrImagePull",
                    format!(
                        "failed to pull image \"{image}\": no executable is mapped to this image on this node (vellum-node --image PATTERN=EXECUTABLE)"
                    ),
                ));
            }
        };
        let env = env::environment(self.api(), pod, spec, self.base_env(pod))?;
        let strings = |field: &str| -> Vec<String> {
            spec.get(field)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(|s| env::expand(s, &env))
                .collect()
        };
        let (mut command, args) = (strings("command"), strings("args"));
        let base = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
        if command.is_empty() {
            command.push(entry.to_string_lossy().into_owned());
        } else if base(Path::new(&command[0])) == base(&entry) {
            command[0] = entry.to_string_lossy().into_owned();
        }
        command.extend(args);
        let mut mounts = Vec::new();
        for m in spec.get("volumeMounts").and_then(Value::as_array).into_iter().flatten() {
            let volume = meta::str_at(m, "/name").unwrap_or_default();
            let Some(source) = volumes.paths.get(volume) else {
                return Err(Waiting::new(
                    "CreateContainerConfigError",
                    format!("volume \"{volume}\" not found in the pod's volumes"),
                ));
            };
            let source = match meta::str_at(m, "/subPath").filter(|s| !s.is_empty()) {
                Some(sub) => source.join(sub),
                None => source.clone(),
            };
            let target = PathBuf::from(meta::str_at(m, "/mountPath").unwrap_or_default());
            self.mount_point(&source, &target).map_err(|e| {
                Waiting::new("CreateContainerError", format!("cannot make the mount point {}: {e}", target.display()))
            })?;
            let read_only = m.get("readOnly").and_then(Value::as_bool).unwrap_or(false)
                || pod.pointer("/spec/volumes").and_then(Value::as_array).into_iter().flatten().any(|v| {
                    v["name"] == volume
                        && (v.get("configMap").is_some() || v.get("secret").is_some() || v.get("projected").is_some())
                });
            mounts.push(Mount { source, target, read_only });
        }
        let cwd = if let Some(dir) = meta::str_at(spec, "/workingDir") {
            PathBuf::from(dir)
        } else {
            let dir = self.dir.join("work").join(name);
            std::fs::create_dir_all(&dir).map_err(|e| Waiting::new("CreateContainerError", e.to_string()))?;
            dir
        };
        Ok(Some(Launch { argv: command, env, cwd, mounts, log: self.kubelet.log_path(&self.uid, name, restart) }))
    }

    /// Makes `target` exist (a directory, or a file when `source` is one), remembering what
    /// was created so that the kubelet removes it when it stops.
    fn mount_point(&self, source: &Path, target: &Path) -> std::io::Result<()> {
        if target.exists() {
            return Ok(());
        }
        let mut missing = Vec::new();
        let mut at = target.parent();
        while let Some(p) = at {
            if p.exists() {
                break;
            }
            missing.push(p.to_owned());
            at = p.parent();
        }
        let mut created = lock(&self.kubelet.inner.created);
        for dir in missing.into_iter().rev() {
            std::fs::create_dir(&dir)?;
            created.push(dir);
        }
        if source.is_dir() {
            std::fs::create_dir(target)?;
        } else {
            std::fs::write(target, b"")?;
        }
        created.push(target.to_owned());
        Ok(())
    }
}

/// Waits until the pod is told to stop.
async fn stopped(stop: &mut watch::Receiver<Option<i64>>) {
    let _ = stop.wait_for(Option::is_some).await;
}

/// Waits `delay`, or until the pod is told to stop (`true`).
async fn sleep_or_stop(stop: &mut watch::Receiver<Option<i64>>, delay: Duration) -> bool {
    let woken = tokio::select! {
        () = tokio::time::sleep(delay) => false,
        () = stopped(stop) => true,
    };
    woken || stop.borrow().is_some()
}

/// How a container's run ended.
enum Ended {
    Exited(i32),
    Unhealthy(String),
    Stopped,
}

fn grace_of(stop: &watch::Receiver<Option<i64>>) -> Duration {
    Duration::from_secs(u64::try_from(stop.borrow().unwrap_or(0)).unwrap_or(0))
}

/// A pod's life: volumes, init containers in order, the containers side by side (their
/// volumes refreshed as their sources change), then, once deleted, termination.
async fn run_pod(ctx: Arc<PodCtx>, pod: Value, mut stop: watch::Receiver<Option<i64>>) {
    let mut volumes = volumes::Volumes::new(ctx.dir.join("volumes"));
    let mut reported = None;
    loop {
        match volumes.sync(ctx.api(), &pod) {
            Ok(_) => break,
            Err(w) => {
                if reported.as_ref() != Some(&w) {
                    ctx.event("Warning", "FailedMount", &w.message, None);
                    let count = lock(&ctx.containers).len();
                    for i in 0..count {
                        ctx.update(i, |c| c.waiting(&w.reason, None));
                    }
                    reported = Some(w);
                }
                if sleep_or_stop(&mut stop, Duration::from_secs(1)).await {
                    return finish(&ctx, &pod);
                }
            }
        }
    }
    let volumes = Arc::new(Mutex::new(volumes));
    let specs = all_containers(&pod);
    let policy = meta::str_at(&pod, "/spec/restartPolicy").unwrap_or("Always").to_owned();
    for (index, (_, spec)) in specs.iter().enumerate().filter(|(_, (init, _))| *init) {
        let init_policy = if policy == "Never" { "Never" } else { "OnFailure" };
        // Stopped, or failed for good: the pod goes no further.
        if run_container(&ctx, &pod, index, spec, init_policy, &volumes, stop.clone()).await != Some(0) {
            stopped(&mut stop).await;
            return finish(&ctx, &pod);
        }
    }
    let runs = specs
        .iter()
        .enumerate()
        .filter(|(_, (init, _))| !*init)
        .map(|(index, (_, spec))| run_container(&ctx, &pod, index, spec, &policy, &volumes, stop.clone()));
    let refresh = async {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let changed = lock(&volumes).sync(ctx.api(), &pod);
            if let Err(w) = changed {
                tracing::debug!(pod = %ctx.name, message = %w.message, "volume refresh");
            }
        }
    };
    tokio::select! {
        _ = futures::future::join_all(runs) => {}
        () = refresh => {}
    }
    stopped(&mut stop).await;
    finish(&ctx, &pod);
}

/// The pod's containers have stopped: its object goes, and its files.
fn finish(ctx: &PodCtx, pod: &Value) {
    ctx.publish();
    ctx.api().delete_pod(meta::namespace(pod), meta::name(pod), Some(&ctx.uid));
}

/// The delay before restarting a container that has restarted `restarts` times: the base,
/// doubling, at most five minutes; a container that ran ten minutes starts over.
fn backoff(base: Duration, restarts: i64, ran: Duration) -> Duration {
    if ran > Duration::from_secs(600) {
        return base;
    }
    let doubled = base.saturating_mul(1 << restarts.clamp(0, 16));
    doubled.min(Duration::from_secs(300))
}

/// One container's life: prepare, start, probe, restart as its policy says. Returns its exit
/// code once it ended for good, `None` when the pod was told to stop.
#[allow(clippy::too_many_lines)]
async fn run_container(
    ctx: &Arc<PodCtx>,
    pod: &Value,
    index: usize,
    spec: &Value,
    policy: &str,
    volumes: &Arc<Mutex<volumes::Volumes>>,
    mut stop: watch::Receiver<Option<i64>>,
) -> Option<i32> {
    let name = meta::str_at(spec, "/name").unwrap_or_default().to_owned();
    let base = ctx.kubelet.inner.config.restart_backoff;
    let mut failed_prepare = 0;
    loop {
        if stop.borrow().is_some() {
            return None;
        }
        let restart = ctx.container(index).restarts;
        let fresh = ctx.pod().unwrap_or_else(|| pod.clone());
        let prepared = {
            let volumes = lock(volumes);
            ctx.prepare(&fresh, spec, &volumes, restart)
        };
        let launch = match prepared {
            Ok(Some(launch)) => launch,
            Ok(None) => {
                // kwok: running and ready, nothing started. A container of a pod that runs
                // to completion (a Job's) completes at once, as kwok's pod-complete stage has it.
                ctx.update(index, |c| {
                    c.state = json!({"running": {"startedAt": meta::now()}});
                    (c.ready, c.started, c.created) = (true, true, true);
                });
                if !restarts(policy, 0) {
                    ctx.update(index, |c| {
                        c.state =
                            json!({"terminated": {"exitCode": 0, "reason": "Completed", "finishedAt": meta::now()}});
                        (c.ready, c.done) = (false, Some(0));
                    });
                    return Some(0);
                }
                stopped(&mut stop).await;
                ctx.update(index, |c| {
                    c.state = json!({"terminated": {"exitCode": 0, "reason": "Completed", "finishedAt": meta::now()}});
                    c.ready = false;
                });
                return None;
            }
            Err(w) => {
                let reason = if w.reason == "ErrImagePull" && failed_prepare > 0 {
                    "ImagePullBackOff"
                } else {
                    w.reason.as_str()
                };
                if failed_prepare == 0 {
                    ctx.event("Warning", "Failed", &w.message, Some(&name));
                }
                ctx.update(index, |c| c.waiting(reason, Some(&w.message)));
                failed_prepare += 1;
                let delay = backoff(Duration::from_secs(1), (failed_prepare - 1).min(3), Duration::ZERO);
                if sleep_or_stop(&mut stop, delay).await {
                    return None;
                }
                continue;
            }
        };
        failed_prepare = 0;
        let started = Instant::now();
        let started_at = meta::now();
        let mut process = match Process::spawn(&launch, &ctx.kubelet.inner.groups).await {
            Ok(p) => p,
            Err(e) => {
                let message = format!("failed to start container \"{name}\": exec: \"{}\": {e}", launch.argv[0]);
                ctx.event("Warning", "Failed", &message, Some(&name));
                ctx.update(index, |c| {
                    c.state = json!({"terminated": {"exitCode": 128, "reason": "StartError", "message": message,
                                                    "startedAt": started_at, "finishedAt": meta::now()}});
                    c.created = true;
                });
                if !restarts(policy, 128) {
                    ctx.update(index, |c| c.done = Some(128));
                    return Some(128);
                }
                if crash_wait(ctx, index, &name, base, Duration::ZERO, &mut stop).await {
                    return None;
                }
                continue;
            }
        };
        ctx.event("Normal", "Started", &format!("Started container {name}"), Some(&name));
        ctx.update(index, |c| {
            c.state = json!({"running": {"startedAt": started_at}});
            c.created = true;
            c.pid = Some(process.pid());
            c.started = spec.get("startupProbe").is_none();
        });
        let target = probe::Target { ip: ctx.ip, container: spec.clone(), pid: process.pid(), env: launch.env.clone() };
        let ended = tokio::select! {
            code = process.wait() => Ended::Exited(code),
            why = probes(ctx, index, spec, &target) => Ended::Unhealthy(why),
            () = stopped(&mut stop) => Ended::Stopped,
        };
        let (code, stopped) = match ended {
            Ended::Exited(code) => (code, false),
            Ended::Unhealthy(why) => {
                ctx.event("Normal", "Killing", &format!("Container {name} {why}, will be restarted"), Some(&name));
                let grace = Duration::from_secs(
                    pod.pointer("/spec/terminationGracePeriodSeconds").and_then(Value::as_u64).unwrap_or(30),
                );
                (process.terminate(grace).await, false)
            }
            Ended::Stopped => {
                ctx.event("Normal", "Killing", &format!("Stopping container {name}"), Some(&name));
                (process.terminate(grace_of(&stop)).await, true)
            }
        };
        let reason = if code == 0 { "Completed" } else { "Error" };
        ctx.update(index, |c| {
            c.state = json!({"terminated": {"exitCode": code, "reason": reason, "startedAt": started_at,
                                            "finishedAt": meta::now(), "containerID": format!("vellum-node://{}", process.pid())}});
            c.ready = false;
        });
        if stopped {
            return None;
        }
        if !restarts(policy, code) {
            ctx.update(index, |c| c.done = Some(code));
            return Some(code);
        }
        if crash_wait(ctx, index, &name, base, started.elapsed(), &mut stop).await {
            return None;
        }
    }
}

fn restarts(policy: &str, code: i32) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => code != 0,
        _ => true,
    }
}

/// The back-off between two runs of a container (`true` when told to stop meanwhile).
async fn crash_wait(
    ctx: &PodCtx,
    index: usize,
    name: &str,
    base: Duration,
    ran: Duration,
    stop: &mut watch::Receiver<Option<i64>>,
) -> bool {
    let restarts = ctx.container(index).restarts;
    let delay = backoff(base, restarts, ran);
    let message = format!(
        "back-off {}s restarting failed container={name} pod={}_{}({})",
        delay.as_secs(),
        ctx.name,
        ctx.namespace,
        ctx.uid
    );
    ctx.event("Warning", "BackOff", "Back-off restarting failed container", Some(name));
    ctx.update(index, |c| {
        c.last = Some(c.state.clone());
        c.waiting("CrashLoopBackOff", Some(&message));
    });
    if sleep_or_stop(stop, delay).await {
        return true;
    }
    ctx.update(index, |c| c.restarts += 1);
    false
}

/// Runs a container's probes: the startup probe first, then readiness (which sets `ready`)
/// beside liveness. Returns (why) once the startup or liveness probe failed for good.
async fn probes(ctx: &PodCtx, index: usize, spec: &Value, target: &probe::Target) -> String {
    let name = meta::str_at(spec, "/name").unwrap_or_default();
    if let Some(startup) = probe::Probe::of(spec, "startupProbe") {
        tokio::time::sleep(startup.initial_delay).await;
        let mut failures = 0;
        loop {
            match probe::run(&startup, target).await {
                Ok(()) => break,
                Err(why) => {
                    failures += 1;
                    ctx.event("Warning", "Unhealthy", &format!("Startup probe failed: {why}"), Some(name));
                    if failures >= startup.failure_threshold {
                        return "failed startup probe".into();
                    }
                }
            }
            tokio::time::sleep(startup.period).await;
        }
        ctx.update(index, |c| c.started = true);
    }
    let readiness = async {
        let Some(probe) = probe::Probe::of(spec, "readinessProbe") else {
            ctx.update(index, |c| c.ready = true);
            return std::future::pending::<()>().await;
        };
        tokio::time::sleep(probe.initial_delay).await;
        let (mut successes, mut failures) = (0, 0);
        loop {
            let ready = ctx.container(index).ready;
            match probe::run(&probe, target).await {
                Ok(()) => {
                    (successes, failures) = (successes + 1, 0);
                    if !ready && successes >= probe.success_threshold {
                        ctx.update(index, |c| c.ready = true);
                    }
                }
                Err(why) => {
                    (successes, failures) = (0, failures + 1);
                    ctx.event("Warning", "Unhealthy", &format!("Readiness probe failed: {why}"), Some(name));
                    if ready && failures >= probe.failure_threshold {
                        ctx.update(index, |c| c.ready = false);
                    }
                }
            }
            tokio::time::sleep(probe.period).await;
        }
    };
    let liveness = async {
        let Some(probe) = probe::Probe::of(spec, "livenessProbe") else {
            return std::future::pending::<String>().await;
        };
        tokio::time::sleep(probe.initial_delay).await;
        let mut failures = 0;
        loop {
            match probe::run(&probe, target).await {
                Ok(()) => failures = 0,
                Err(why) => {
                    failures += 1;
                    ctx.event("Warning", "Unhealthy", &format!("Liveness probe failed: {why}"), Some(name));
                    if failures >= probe.failure_threshold {
                        return "failed liveness probe".to_owned();
                    }
                }
            }
            tokio::time::sleep(probe.period).await;
        }
    };
    tokio::select! {
        () = readiness => unreachable!("the readiness loop never ends"),
        why = liveness => why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_rules_match_by_pattern_and_any_tag() {
        let rule: ImageRule = "vellum/gateway=/bin/true".parse().unwrap();
        assert!(rule.matches("vellum/gateway:1.2"));
        assert!(rule.matches("vellum/gateway"));
        assert!(!rule.matches("vellum/gateway-x:1"));
        let rule: ImageRule = "registry.local/*:v1=kwok".parse().unwrap();
        assert_eq!(rule.runtime, Runtime::Kwok);
        assert!(rule.matches("registry.local/a/b:v1"));
        assert!(!rule.matches("registry.local/a:v2"));
        assert!("nothing".parse::<ImageRule>().is_err());
    }

    #[test]
    fn restarts_back_off_doubling_to_five_minutes() {
        let base = Duration::from_secs(10);
        assert_eq!(backoff(base, 0, Duration::ZERO), base);
        assert_eq!(backoff(base, 2, Duration::ZERO), Duration::from_secs(40));
        assert_eq!(backoff(base, 9, Duration::ZERO), Duration::from_secs(300));
        assert_eq!(backoff(base, 9, Duration::from_secs(700)), base);
    }
}
