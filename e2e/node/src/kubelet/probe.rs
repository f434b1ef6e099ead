//! Probes as a kubelet runs them: `httpGet` (success on 200–399), `tcpSocket` (a connection)
//! and `exec` (exit code 0, run in the container's mount namespace), each with its delay,
//! period, timeout and thresholds.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::Value;

use crate::meta;

/// One probe of a container.
#[derive(Clone, Debug)]
pub struct Probe {
    pub spec: Value,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

fn seconds(spec: &Value, field: &str, default: u64) -> Duration {
    Duration::from_secs(spec.get(field).and_then(Value::as_u64).unwrap_or(default))
}

fn count(spec: &Value, field: &str, default: u32) -> u32 {
    spec.get(field).and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok()).unwrap_or(default).max(1)
}

impl Probe {
    pub fn of(container: &Value, kind: &str) -> Option<Self> {
        let spec = container.get(kind)?.clone();
        Some(Self {
            initial_delay: seconds(&spec, "initialDelaySeconds", 0),
            period: seconds(&spec, "periodSeconds", 10).max(Duration::from_secs(1)),
            timeout: seconds(&spec, "timeoutSeconds", 1).max(Duration::from_secs(1)),
            success_threshold: count(&spec, "successThreshold", 1),
            failure_threshold: count(&spec, "failureThreshold", 3),
            spec,
        })
    }
}

/// Where a probe runs.
#[derive(Clone, Debug)]
pub struct Target {
    pub ip: Ipv4Addr,
    pub container: Value,
    pub pid: i32,
    pub env: Vec<(String, String)>,
}

/// A named port of the container, or a number.
fn port(target: &Target, port: Option<&Value>) -> Result<u16, String> {
    match port {
        Some(Value::Number(n)) => {
            n.as_u64().and_then(|p| u16::try_from(p).ok()).ok_or_else(|| format!("invalid port {n}"))
        }
        Some(Value::String(name)) => {
            if let Ok(n) = name.parse() {
                return Ok(n);
            }
            meta::container_port(&target.container, name)
                .ok_or_else(|| format!("couldn't find port: {name} in container"))
        }
        _ => Err("no port".into()),
    }
}

/// Runs a probe once: `Ok` on success, else why it failed (as the kubelet words it).
pub async fn run(probe: &Probe, target: &Target) -> Result<(), String> {
    let spec = &probe.spec;
    if let Some(http) = spec.get("httpGet") {
        let host = meta::str_at(http, "/host").map_or_else(|| target.ip.to_string(), str::to_owned);
        let port = port(target, http.get("port"))?;
        let path = meta::str_at(http, "/path").unwrap_or("/");
        if meta::str_at(http, "/scheme").is_some_and(|s| s.eq_ignore_ascii_case("https")) {
            return Err("HTTPS probes are not supported by this node".into());
        }
        let url = format!("http://{host}:{port}{}{path}", if path.starts_with('/') { "" } else { "/" });
        let client = reqwest::Client::builder().timeout(probe.timeout).build().map_err(|e| e.to_string())?;
        let mut request = client.get(&url).header("User-Agent", "kube-probe/1.33");
        for h in http.get("httpHeaders").and_then(Value::as_array).into_iter().flatten() {
            request = request
                .header(meta::str_at(h, "/name").unwrap_or_default(), meta::str_at(h, "/value").unwrap_or_default());
        }
        return match request.send().await {
            Ok(r) if (200..400).contains(&r.status().as_u16()) => Ok(()),
            Ok(r) => Err(format!("HTTP probe failed with statuscode: {}", r.status().as_u16())),
            Err(e) => Err(format!(
                "Get \"{url}\": {}",
                if e.is_timeout() { "context deadline exceeded".into() } else { e.to_string() }
            )),
        };
    }
    if let Some(tcp) = spec.get("tcpSocket") {
        let host = meta::str_at(tcp, "/host").map_or_else(|| target.ip.to_string(), str::to_owned);
        let port = port(target, tcp.get("port"))?;
        return match tokio::time::timeout(probe.timeout, tokio::net::TcpStream::connect((host.as_str(), port))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("dial tcp {host}:{port}: connect: {e}")),
            Err(_) => Err(format!("dial tcp {host}:{port}: i/o timeout")),
        };
    }
    if let Some(exec) = spec.get("exec") {
        let argv: Vec<String> = exec
            .get("command")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect();
        if argv.is_empty() {
            return Err("exec probe without a command".into());
        }
        let mut cmd = tokio::process::Command::new("nsenter");
        cmd.arg(format!("--target={}", target.pid)).arg("--mount");
        if !super::process::is_root() {
            cmd.args(["--user", "--preserve-credentials"]);
        }
        cmd.arg("--").args(&argv);
        cmd.env_clear().envs(target.env.iter().map(|(k, v)| (k, v))).kill_on_drop(true);
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        return match tokio::time::timeout(probe.timeout, cmd.output()).await {
            Ok(Ok(out)) if out.status.success() => Ok(()),
            Ok(Ok(out)) => Err(format!(
                "command {argv:?} exited with {}: {}",
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).trim()
            )),
            Ok(Err(e)) => Err(format!("command {argv:?} could not run: {e}")),
            Err(_) => Err(format!("command {argv:?} timed out")),
        };
    }
    Err("the probe has no handler this node supports (httpGet, tcpSocket, exec)".into())
}
