//! `kubectl vellum`: what a BlueGreenRelease's rollout is doing, and the requests a person
//! makes of it (promote, abort, retry), as annotations the operator acts on and takes back.
//! It talks to the Kubernetes API the way kubectl does: the kubeconfig (`KUBECONFIG`, or
//! `~/.kube/config`) and its current context, or the pod's ServiceAccount.

use std::fmt::Write as _;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use vellum_crds::BlueGreenRelease;
use vellum_crds::annotations;
use vellum_crds::blue_green_release::BlueGreenReleaseStatus;

/// Why a command could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("BlueGreenRelease {name} not found in namespace {namespace}")]
    NotFound { name: String, namespace: String },
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// The release a command names: `bgr/NAME`, `bluegreenrelease/NAME`,
/// `bluegreenreleases.vellum.dev/NAME` or `NAME`.
pub fn release_name(arg: &str) -> Result<String, CliError> {
    let name = match arg.split_once('/') {
        None => arg,
        Some((kind, name)) => {
            let known = ["bgr", "bluegreenrelease", "bluegreenreleases", "bluegreenrelease.vellum.dev"];
            let kind = kind.to_ascii_lowercase();
            if !known.contains(&kind.as_str()) && kind != "bluegreenreleases.vellum.dev" {
                return Err(CliError::Usage(format!("{arg}: expected bgr/NAME (a BlueGreenRelease)")));
            }
            name
        }
    };
    if name.is_empty() {
        return Err(CliError::Usage(format!("{arg}: no name")));
    }
    Ok(name.to_owned())
}

/// What a person asks of a rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Switch to the preview color now (a `Manual` release waiting in `AwaitingPromotion`).
    Promote,
    /// End the rollout at any phase with the old color serving.
    Abort,
    /// Roll out again what failed or was aborted.
    Retry,
}

impl Request {
    pub fn annotation(self) -> &'static str {
        match self {
            Request::Promote => annotations::PROMOTE,
            Request::Abort => annotations::ABORT,
            Request::Retry => annotations::RETRY,
        }
    }
}

/// Sets the request's annotation on the release (the operator acts on it, records what it
/// did, and removes it).
pub async fn ask(api: &Api<BlueGreenRelease>, name: &str, request: Request) -> Result<BlueGreenRelease, CliError> {
    let value = Timestamp::now().to_string();
    let patch = json!({"metadata": {"annotations": {request.annotation(): value}}});
    let params = PatchParams { field_manager: Some("kubectl-vellum".to_owned()), ..PatchParams::default() };
    match api.patch(name, &params, &Patch::Merge(&patch)).await {
        Ok(release) => Ok(release),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            Err(CliError::NotFound { name: name.to_owned(), namespace: api_namespace(api) })
        }
        Err(e) => Err(e.into()),
    }
}

/// The release, or a clear error when it does not exist.
pub async fn get(api: &Api<BlueGreenRelease>, name: &str) -> Result<BlueGreenRelease, CliError> {
    api.get_opt(name).await?.ok_or_else(|| CliError::NotFound { name: name.to_owned(), namespace: api_namespace(api) })
}

fn api_namespace(api: &Api<BlueGreenRelease>) -> String {
    api.resource_url().split('/').skip_while(|p| *p != "namespaces").nth(1).unwrap_or_default().to_owned()
}

/// How long ago `then` was, as a person reads it (`42s`, `5m12s`, `3h4m`, `2d3h`).
pub fn ago(then: Timestamp, now: Timestamp) -> String {
    let seconds = (now - then).get_seconds().max(0);
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

/// `kubectl vellum status`: the phase, both colors, the conditions, the smoke checks, the
/// observed error rate and the last rollouts.
pub fn render_status(release: &BlueGreenRelease, now: Timestamp) -> String {
    let status = release.status.clone().unwrap_or_default();
    let mut out = String::new();
    let namespace = release.metadata.namespace.clone().unwrap_or_default();
    let name = release.metadata.name.clone().unwrap_or_default();
    let _ = writeln!(out, "BlueGreenRelease {namespace}/{name}: version {} requested", release.spec.version);
    let phase = status.phase.map_or_else(|| "Pending".to_owned(), |p| format!("{p:?}"));
    let since = status.phase_since.as_ref().map(|t| format!(" for {}", ago(t.0, now))).unwrap_or_default();
    let _ = writeln!(out, "Phase:      {phase}{since}");
    let color = |c: Option<vellum_crds::blue_green_release::Color>, v: &Option<String>| match c {
        Some(c) => format!("{} (version {})", c.as_str(), v.clone().unwrap_or_default()),
        None => "-".to_owned(),
    };
    let _ = writeln!(out, "Active:     {}", color(status.active_color, &status.active_version));
    let _ = writeln!(out, "Preview:    {}", color(status.preview_color, &status.preview_version));
    if let Some(rate) = status.observed_error_rate_percent {
        let _ = writeln!(
            out,
            "Error rate: {rate:.2} % of requests since the switch (rolls back above {} %)",
            release.spec.analysis.max_error_rate_percent
        );
    }
    if let (Some(at), Some(c)) = (&status.scale_down_at, status.scale_down_color) {
        let when = if at.0 > now { format!("in {}", ago(now, at.0)) } else { "now".to_owned() };
        let _ = writeln!(out, "Scale-down: {} {when}", c.as_str());
    }
    render_conditions(&mut out, &status);
    if !status.smoke_results.is_empty() {
        let _ = writeln!(out, "Smoke checks:");
        for r in &status.smoke_results {
            let verdict = if r.passed { "passed" } else { "FAILED" };
            let code = r.status_code.map_or_else(|| "-".to_owned(), |c| c.to_string());
            let took = r.duration_ms.map_or_else(|| "-".to_owned(), |d| format!("{d} ms"));
            let message = r.message.clone().unwrap_or_default();
            let _ = writeln!(out, "  {:<20} {verdict:<7} {code:<4} {took:<8} {message}", r.name);
        }
    }
    if !status.history.is_empty() {
        let _ = writeln!(out, "History:");
        out.push_str(&render_history(&status, now, 3));
    }
    out
}

fn render_conditions(out: &mut String, status: &BlueGreenReleaseStatus) {
    if status.conditions.0.is_empty() {
        return;
    }
    let _ = writeln!(out, "Conditions:");
    for c in &status.conditions.0 {
        let _ = writeln!(out, "  {:<12} {:<6} {:<22} {}", c.type_, c.status, c.reason, c.message);
    }
}

/// `kubectl vellum history`: the last `limit` rollouts, newest first.
pub fn render_history(status: &BlueGreenReleaseStatus, now: Timestamp, limit: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "  {:<16} {:<6} {:<11} {:<9} {:<9} {:<9} MESSAGE",
        "VERSION", "COLOR", "OUTCOME", "ENDED", "TOOK", "ANALYZED"
    );
    for r in status.history.iter().take(limit) {
        let ended = r.time.as_ref().map_or_else(|| "-".to_owned(), |t| format!("{} ago", ago(t.0, now)));
        let seconds = |s: Option<u64>| s.map_or_else(|| "-".to_owned(), |s| format!("{s}s"));
        let _ = writeln!(
            out,
            "  {:<16} {:<6} {:<11} {:<9} {:<9} {:<9} {}",
            r.version,
            r.color.as_str(),
            format!("{:?}", r.outcome),
            ended,
            seconds(r.duration_seconds),
            seconds(r.analysis_seconds),
            r.message.clone().unwrap_or_default()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release() -> BlueGreenRelease {
        serde_json::from_value(json!({
            "apiVersion": "vellum.dev/v1alpha1", "kind": "BlueGreenRelease",
            "metadata": {"name": "docs", "namespace": "prod"},
            "spec": {"version": "1.1.0", "gateway": {"image": "g"}, "workers": {"image": "w"}, "shardSetRef": "meta",
                "nats": {"url": "nats://nats:4222"}, "jwt": {"secretRef": {"name": "jwt", "key": "k"}}},
            "status": {
                "phase": "Analyzing", "phaseSince": "2026-12-05T10:00:00Z",
                "activeColor": "blue", "activeVersion": "1.0.0", "previewColor": "green", "previewVersion": "1.1.0",
                "observedErrorRatePercent": 0.25,
                "conditions": [{"type": "Ready", "status": "True", "reason": "Reconciled", "message": "version 1.0.0 serves",
                    "lastTransitionTime": "2026-12-05T09:00:00Z"}],
                "smokeResults": [{"name": "readyz", "passed": true, "statusCode": 200, "durationMs": 12}],
                "history": [{"version": "1.0.0", "color": "blue", "outcome": "Promoted", "time": "2026-12-05T08:00:00Z",
                    "durationSeconds": 40, "analysisSeconds": 300, "message": "promoted"}]
            }
        }))
        .unwrap()
    }

    #[test]
    fn names_are_taken_as_kubectl_takes_them() {
        assert_eq!(release_name("bgr/docs").unwrap(), "docs");
        assert_eq!(release_name("bluegreenrelease/docs").unwrap(), "docs");
        assert_eq!(release_name("docs").unwrap(), "docs");
        assert!(matches!(release_name("deployment/docs"), Err(CliError::Usage(_))));
        assert!(matches!(release_name("bgr/"), Err(CliError::Usage(_))));
    }

    #[test]
    fn the_status_shows_both_colors_the_phase_its_age_the_checks_and_the_history() {
        let now: Timestamp = "2026-12-05T10:00:42Z".parse().unwrap();
        let text = render_status(&release(), now);
        for line in [
            "BlueGreenRelease prod/docs: version 1.1.0 requested",
            "Phase:      Analyzing for 42s",
            "Active:     blue (version 1.0.0)",
            "Preview:    green (version 1.1.0)",
            "Error rate: 0.25 % of requests since the switch (rolls back above 1 %)",
            "  readyz               passed  200  12 ms    ",
            "  1.0.0            blue   Promoted    2h0m ago  40s       300s      promoted",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from:\n{text}");
        }
    }

    #[test]
    fn durations_read_as_a_person_says_them() {
        let t = |s: &str| s.parse::<Timestamp>().unwrap();
        assert_eq!(ago(t("2026-01-01T00:00:00Z"), t("2026-01-01T00:00:05Z")), "5s");
        assert_eq!(ago(t("2026-01-01T00:00:00Z"), t("2026-01-01T00:05:12Z")), "5m12s");
        assert_eq!(ago(t("2026-01-01T00:00:00Z"), t("2026-01-02T03:00:00Z")), "1d3h");
    }
}
