//! `GET /api/v1/namespaces/{ns}/pods/{name}/log`: a container's output, from the log files
//! the kubelet keeps, with `container`, `previous`, `tailLines`, `timestamps`, `limitBytes`,
//! `sinceSeconds` and `follow` (which streams until the container's run ends).

use std::collections::HashMap;
use std::fmt::Write;
use std::hash::BuildHasher;
use std::time::Duration;

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::Kubelet;
use super::process::parse_log;
use crate::meta;
use crate::status::ApiError;

fn names(pod: &Value, pointer: &str) -> Vec<String> {
    pod.pointer(pointer)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| meta::str_at(c, "/name").map(str::to_owned))
        .collect()
}

fn container_status<'a>(pod: &'a Value, container: &str) -> Option<&'a Value> {
    ["/status/containerStatuses", "/status/initContainerStatuses"]
        .iter()
        .filter_map(|p| pod.pointer(p).and_then(Value::as_array))
        .flatten()
        .find(|s| s["name"] == container)
}

/// Which container of `pod` the request names (the only one when it names none).
fn pick(pod: &Value, asked: Option<&String>) -> Result<String, ApiError> {
    let name = meta::name(pod);
    let containers = names(pod, "/spec/containers");
    let init = names(pod, "/spec/initContainers");
    match asked {
        Some(c) if containers.contains(c) || init.contains(c) => Ok(c.clone()),
        Some(c) => Err(ApiError::bad_request(format!("container {c} is not valid for pod {name}"))),
        None if containers.len() == 1 => Ok(containers[0].clone()),
        None => {
            let mut message =
                format!("a container name must be specified for pod {name}, choose one of: [{}]", containers.join(" "));
            if !init.is_empty() {
                let _ = write!(message, " or one of the init containers: [{}]", init.join(" "));
            }
            Err(ApiError::bad_request(message))
        }
    }
}

struct Format {
    timestamps: bool,
    since: Option<time::OffsetDateTime>,
}

impl Format {
    fn render(&self, entries: &[(String, String)]) -> String {
        let mut out = String::new();
        for (ts, line) in entries {
            if let Some(since) = self.since
                && meta::parse_time(ts).is_some_and(|t| t < since)
            {
                continue;
            }
            if self.timestamps {
                out.push_str(ts);
                out.push(' ');
            }
            out.push_str(line);
            out.push('\n');
        }
        out
    }
}

/// A followed log: one container run's file, read from where the last read stopped.
struct Follow {
    first: Option<String>,
    offset: u64,
    kubelet: Kubelet,
    namespace: String,
    name: String,
    uid: String,
    container: String,
    run: i64,
    path: std::path::PathBuf,
    format: Format,
}

impl Follow {
    /// The whole lines appended since the last read.
    async fn appended(&mut self) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let mut file = tokio::fs::File::open(&self.path).await.ok()?;
        file.seek(std::io::SeekFrom::Start(self.offset)).await.ok()?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).await.ok()?;
        let end = bytes.iter().rposition(|b| *b == b'\n')?;
        self.offset += u64::try_from(end + 1).ok()?;
        Some(self.format.render(&parse_log(&String::from_utf8_lossy(&bytes[..=end]))))
    }

    /// Whether this run of the container is over: the pod gone, or the container ended or
    /// restarted.
    fn over(&self) -> bool {
        match self.kubelet.api().pod(&self.namespace, &self.name) {
            Some(pod) if meta::uid(&pod) == self.uid => {
                let status = container_status(&pod, &self.container).cloned().unwrap_or_default();
                status.get("restartCount").and_then(Value::as_i64).unwrap_or(0) != self.run
                    || status.pointer("/state/running").is_none()
            }
            _ => true,
        }
    }

    /// The next piece of the log, `None` once the run is over and everything was read.
    async fn next(&mut self) -> Option<String> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        loop {
            // Checked before reading, so that lines written just before the end are read.
            let over = self.over();
            if let Some(text) = self.appended().await {
                return Some(text);
            }
            if over {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Serves a pod's log.
pub fn serve<S: BuildHasher>(
    kubelet: &Kubelet,
    namespace: &str,
    name: &str,
    params: &HashMap<String, String, S>,
) -> Result<Response, ApiError> {
    let pod =
        kubelet.api().pod(namespace, name).ok_or_else(|| ApiError::not_found(format!("pods \"{name}\" not found")))?;
    let container = pick(&pod, params.get("container"))?;
    let flag = |k: &str| params.get(k).is_some_and(|v| v == "true" || v == "1");
    let status = container_status(&pod, &container).cloned().unwrap_or_default();
    let uid = meta::uid(&pod).to_owned();
    let restarts = status.get("restartCount").and_then(Value::as_i64).unwrap_or(0);
    let image = meta::str_at(&status, "/image").unwrap_or_default();
    if status.get("containerID").is_none() && status.pointer("/state/running").is_some() {
        return Err(ApiError::bad_request(format!(
            "container logs are not available: pod \"{name}\" runs image \"{image}\" without a process (kwok mode)"
        )));
    }
    let run = if flag("previous") {
        let last = status.pointer("/lastState/terminated").is_some();
        if !last {
            return Err(ApiError::bad_request(format!(
                "previous terminated container \"{container}\" in pod \"{name}\" not found"
            )));
        }
        restarts - 1
    } else {
        restarts
    };
    let path = kubelet.log_path(&uid, &container, run);
    if !path.exists() {
        let reason = meta::str_at(&status, "/state/waiting/reason").unwrap_or("ContainerCreating");
        return Err(ApiError::bad_request(format!(
            "container \"{container}\" in pod \"{name}\" is waiting to start: {reason}"
        )));
    }
    let since = params
        .get("sinceSeconds")
        .and_then(|s| s.parse::<i64>().ok())
        .map(|s| time::OffsetDateTime::now_utc() - time::Duration::seconds(s))
        .or_else(|| params.get("sinceTime").and_then(|t| meta::parse_time(t)));
    let format = Format { timestamps: flag("timestamps"), since };
    let mut entries = super::process::read_log(&path);
    if let Some(tail) = params.get("tailLines").and_then(|n| n.parse::<usize>().ok()) {
        entries = entries.split_off(entries.len().saturating_sub(tail));
    }
    let mut text = format.render(&entries);
    if let Some(limit) = params.get("limitBytes").and_then(|n| n.parse::<usize>().ok()) {
        let mut cut = limit.min(text.len());
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    let plain = [(header::CONTENT_TYPE, "text/plain")];
    if !flag("follow") || flag("previous") {
        return Ok((StatusCode::OK, plain, text).into_response());
    }
    // Follow: what is there, then what is appended while this run of the container lasts.
    let follow = Follow {
        first: Some(text),
        offset: std::fs::metadata(&path).map_or(0, |m| m.len()),
        kubelet: kubelet.clone(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        uid,
        container,
        run,
        path,
        format,
    };
    let stream = futures::stream::unfold(follow, |mut f| async move {
        let text = f.next().await?;
        Some((Ok::<_, std::io::Error>(text), f))
    });
    Ok((StatusCode::OK, plain, Body::from_stream(stream)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_pod_with_several_containers_needs_a_name() {
        let pod = json!({"metadata": {"name": "web"}, "spec": {"containers": [{"name": "a"}, {"name": "b"}], "initContainers": [{"name": "i"}]}});
        assert_eq!(pick(&pod, Some(&"b".to_owned())).unwrap(), "b");
        let err = pick(&pod, None).unwrap_err();
        assert_eq!(
            err.status()["message"],
            "a container name must be specified for pod web, choose one of: [a b] or one of the init containers: [i]"
        );
        assert_eq!(
            pick(&pod, Some(&"c".to_owned())).unwrap_err().status()["message"],
            "container c is not valid for pod web"
        );
    }
}
