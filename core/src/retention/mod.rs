//! Retention rules: what the retention policies ask of a document now, and when they
//! will ask for something next. Pure: no store, no clock, no I/O; the workers' retention
//! runs and the gateway's storage endpoints both ask [`decide`].
//!
//! How overlapping policies resolve, as S3 lifecycle rules do (the most restrictive wins):
//! - an expiration that is due beats every transition, and DELETE beats ARCHIVE;
//! - of the transitions due for a version, the one to the coldest tier wins;
//! - a noncurrent version expires when any applicable policy says it does;
//! - a suspended policy takes no part; legal hold blocks every expiration (transitions
//!   still happen), and so does a lifecycle action that failed on the document and has
//!   not succeeded since (an expiration never deletes a document whose move failed);
//! - documents only ever move to colder tiers here: a version in a colder class than a
//!   rule names stays where it is (promotion back is an explicit request).
//!
//! ([`last_finished_run`] alone reads a store: the runs the workers recorded.)
//!
//! Ages count in whole days from the upload of the version (`UPLOAD`) or from the later of
//! that and the document's last download (`LAST_ACCESS`); a rule of `afterDays: 30` is due
//! 30 × 24 hours after that moment. A noncurrent version's age for expiry counts from the
//! moment it stopped being current (the upload of the version after it).
//!
//! A restore from the archive or a move on request restarts the document's clock for
//! transitions and archiving: their ages count from then, so the next run does not undo
//! what a person just asked for. Deletion still counts from the upload: a restore never
//! extends how long a document may be kept.

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use crate::config::{RetentionConfig, TierConfig};
use crate::crds::retention_policy::{AgeBasis, DocumentSelector, ExpirationAction};
use crate::crds::storage_tier::TierClass;

/// One day, in milliseconds.
pub const DAY_MS: i64 = 86_400_000;

/// What the rules look at in one document.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DocumentFacts {
    pub id: i64,
    pub owner: String,
    pub file_type: String,
    pub tags: Vec<String>,
    pub legal_hold: bool,
    pub archived: bool,
    pub last_accessed_at: Option<i64>,
    /// When a restore or a move on request last restarted the document's clock for
    /// transitions and archiving.
    pub restarted_at: Option<i64>,
    /// The message of a lifecycle action that failed and has not succeeded since.
    pub failed: Option<String>,
    /// Newest first: the first is the current version.
    pub versions: Vec<VersionFacts>,
}

/// What the rules look at in one version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VersionFacts {
    pub version: i64,
    pub created_at: i64,
    pub sha256: String,
    pub size: i64,
    pub content_type: String,
    /// The tier the version's blob is in.
    pub tier: String,
}

/// One thing a policy asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Move a version's blob to a colder tier.
    Transition { version: i64, to_tier: String, policy: String },
    /// Delete the document and every version of it.
    Delete { policy: String },
    /// Move every version to `tier` and mark the document archived.
    Archive { tier: String, policy: String },
    /// Delete one noncurrent version.
    ExpireVersion { version: i64, policy: String },
}

impl Action {
    /// The action's name in the API: `TRANSITION`, `DELETE`, `ARCHIVE`, `EXPIRE_VERSION`.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Transition { .. } => "TRANSITION",
            Action::Delete { .. } => "DELETE",
            Action::Archive { .. } => "ARCHIVE",
            Action::ExpireVersion { .. } => "EXPIRE_VERSION",
        }
    }

    /// The policy that asks for it.
    pub fn policy(&self) -> &str {
        match self {
            Action::Transition { policy, .. }
            | Action::Delete { policy }
            | Action::Archive { policy, .. }
            | Action::ExpireVersion { policy, .. } => policy,
        }
    }

    /// Whether it removes or archives something (as opposed to moving it).
    pub fn expires(&self) -> bool {
        !matches!(self, Action::Transition { .. })
    }
}

/// An action and the moment it is (or was) due.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scheduled {
    pub at_ms: i64,
    pub action: Action,
}

/// What the rules ask of one document.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Due now, in the order they should run: expirations of whole documents come alone;
    /// otherwise transitions, then noncurrent version expirations.
    pub due: Vec<Scheduled>,
    /// Expirations that are due but may not happen, with the reason.
    pub blocked: Vec<(Scheduled, String)>,
    /// The earliest action not yet due.
    pub next: Option<Scheduled>,
}

/// A policy under its name.
#[derive(Clone, Copy, Debug)]
pub struct Policy<'a> {
    pub name: &'a str,
    pub config: &'a RetentionConfig,
}

/// Whether a selector picks a document. Every given criterion must hold; tags and file
/// types match when any listed one does (ignoring case).
pub fn selects(selector: &DocumentSelector, doc: &DocumentFacts) -> bool {
    let size = doc.versions.first().map_or(0, |v| v.size);
    (selector.tags.is_empty() || selector.tags.iter().any(|t| doc.tags.iter().any(|d| d.eq_ignore_ascii_case(t))))
        && (selector.file_types.is_empty()
            || selector.file_types.iter().any(|f| f.eq_ignore_ascii_case(&doc.file_type)))
        && selector.owner.as_ref().is_none_or(|o| *o == doc.owner)
        && selector.min_size_bytes.is_none_or(|min| size >= min)
        && selector.max_size_bytes.is_none_or(|max| size <= max)
}

/// The moment a version's age counts from under `basis`.
fn age_origin(basis: AgeBasis, doc: &DocumentFacts, version: &VersionFacts) -> i64 {
    match basis {
        AgeBasis::Upload => version.created_at,
        AgeBasis::LastAccess => doc.last_accessed_at.map_or(version.created_at, |at| at.max(version.created_at)),
    }
}

/// [`age_origin`] for moves (transitions and archiving), which a restart resets.
fn move_origin(basis: AgeBasis, doc: &DocumentFacts, version: &VersionFacts) -> i64 {
    age_origin(basis, doc, version).max(doc.restarted_at.unwrap_or(i64::MIN))
}

fn after(origin: i64, days: u32) -> i64 {
    origin.saturating_add(i64::from(days).saturating_mul(DAY_MS))
}

/// Decides what `policies` ask of `doc` at `now_ms`. `tiers` gives each tier's class; a
/// version in a tier the config does not know is never moved.
#[allow(clippy::too_many_lines)] // the rules of the module's documentation, in their order
pub fn decide(doc: &DocumentFacts, policies: &[Policy<'_>], tiers: &BTreeMap<String, TierConfig>, now_ms: i64) -> Plan {
    let mut plan = Plan::default();
    let Some(current) = doc.versions.first() else { return plan };
    let applicable: Vec<&Policy<'_>> =
        policies.iter().filter(|p| !p.config.suspend && selects(&p.config.selector, doc)).collect();
    if applicable.is_empty() {
        return plan;
    }
    let class = |tier: &str| tiers.get(tier).map(|t| t.class);
    let mut upcoming: Vec<Scheduled> = Vec::new();

    // Expiration of the whole document: DELETE before ARCHIVE, then the earliest.
    let mut expirations: Vec<Scheduled> = applicable
        .iter()
        .filter_map(|p| {
            let e = p.config.expiration.as_ref()?;
            let (action, origin) = match e.action {
                ExpirationAction::Delete => {
                    (Action::Delete { policy: p.name.to_owned() }, age_origin(p.config.age_basis, doc, current))
                }
                ExpirationAction::Archive => (
                    Action::Archive { tier: e.archive_tier.clone()?, policy: p.name.to_owned() },
                    move_origin(p.config.age_basis, doc, current),
                ),
            };
            let at_ms = after(origin, e.after_days);
            Some(Scheduled { at_ms, action })
        })
        .filter(|s| !(doc.archived && matches!(s.action, Action::Archive { .. })))
        .collect();
    expirations.sort_by_key(|s| (!matches!(s.action, Action::Delete { .. }), s.at_ms, s.action.policy().to_owned()));
    if let Some(due) = expirations.iter().find(|s| s.at_ms <= now_ms) {
        let hold = if doc.legal_hold {
            Some("the document is under legal hold".to_owned())
        } else {
            doc.failed.as_ref().map(|e| format!("an earlier lifecycle action on the document failed: {e}"))
        };
        match hold {
            None => {
                plan.due.push(due.clone());
                return plan;
            }
            Some(reason) => plan.blocked.push((due.clone(), reason)),
        }
    } else {
        upcoming.extend(expirations.first().cloned());
    }

    // Transitions, version by version: the coldest tier due wins.
    let mut expired_versions = Vec::new();
    for (index, version) in doc.versions.iter().enumerate() {
        let Some(here) = class(&version.tier) else { continue };
        let mut due: Option<(TierClass, Scheduled)> = None;
        for p in &applicable {
            let origin = move_origin(p.config.age_basis, doc, version);
            for (days, tier) in &p.config.transitions {
                let Some(target) = class(tier) else { continue };
                if target <= here {
                    continue;
                }
                let s = Scheduled {
                    at_ms: after(origin, *days),
                    action: Action::Transition {
                        version: version.version,
                        to_tier: tier.clone(),
                        policy: p.name.to_owned(),
                    },
                };
                if s.at_ms <= now_ms {
                    if due.as_ref().is_none_or(|(c, d)| target > *c || (target == *c && s.at_ms < d.at_ms)) {
                        due = Some((target, s));
                    }
                } else if index == 0 {
                    upcoming.push(s);
                }
            }
        }
        if let Some((target, s)) = due {
            // Later transitions to tiers no colder than the one now due are moot.
            upcoming.retain(|u| match &u.action {
                Action::Transition { version: v, to_tier, .. } if *v == version.version => {
                    class(to_tier).is_some_and(|c| c > target)
                }
                _ => true,
            });
            plan.due.push(s);
        }

        // Noncurrent versions beyond `keep`, some days after they were replaced.
        if index == 0 {
            continue;
        }
        let replaced_at = doc.versions[index - 1].created_at;
        for p in &applicable {
            let Some(rule) = &p.config.noncurrent_versions else { continue };
            let (Some(days), true) = (rule.expire_after_days, index > rule.keep as usize) else { continue };
            let s = Scheduled {
                at_ms: after(replaced_at, days),
                action: Action::ExpireVersion { version: version.version, policy: p.name.to_owned() },
            };
            if s.at_ms > now_ms {
                upcoming.push(s);
            } else if doc.legal_hold {
                plan.blocked.push((s, "the document is under legal hold".to_owned()));
            } else {
                expired_versions.push(s);
            }
        }
    }
    // A version that expires needs no move first; one policy saying so is enough.
    expired_versions.sort_by_key(|s| s.at_ms);
    let mut seen = std::collections::BTreeSet::new();
    expired_versions.retain(|s| match s.action {
        Action::ExpireVersion { version, .. } => seen.insert(version),
        _ => true,
    });
    plan.due.retain(|s| match s.action {
        Action::Transition { version, .. } => !seen.contains(&version),
        _ => true,
    });
    plan.due.extend(expired_versions);
    plan.blocked.dedup_by(|a, b| a.0.action == b.0.action);

    upcoming.sort_by_key(|s| (s.at_ms, !s.action.expires()));
    plan.next = upcoming.into_iter().next();
    plan
}

/// The first time after `after_ms` that a five-field cron `schedule` (UTC) or a macro such
/// as `@daily` names, or `None` when the schedule does not parse.
pub fn next_run(schedule: &str, after_ms: i64) -> Option<i64> {
    let fields = schedule.split_whitespace().count();
    if !schedule.starts_with('@') && fields != 5 {
        return None;
    }
    let cron: croner::Cron = schedule.parse().ok()?;
    let after = chrono::DateTime::from_timestamp_millis(after_ms)?;
    let next = cron.find_next_occurrence(&after, false).ok()?;
    Some(next.timestamp_millis())
}

/// The record of one retention run, as `retention_runs` keeps it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunRecord {
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub dry_run: bool,
    pub matched: i64,
    pub transitioned: i64,
    pub expired: i64,
    pub bytes_moved: i64,
    pub errors: i64,
}

impl RunRecord {
    /// One run from the same run's records on several shards: counters added up, from
    /// the earliest start to the latest finish.
    pub fn combine(records: impl IntoIterator<Item = RunRecord>) -> Option<RunRecord> {
        records.into_iter().reduce(|a, b| RunRecord {
            started_at: a.started_at.min(b.started_at),
            finished_at: a.finished_at.max(b.finished_at),
            dry_run: a.dry_run && b.dry_run,
            matched: a.matched + b.matched,
            transitioned: a.transitioned + b.transitioned,
            expired: a.expired + b.expired,
            bytes_moved: a.bytes_moved + b.bytes_moved,
            errors: a.errors + b.errors,
        })
    }
}

/// The most recent finished run of `policy` in a metadata database (what the operator
/// shows in the policy's status).
pub async fn last_finished_run(
    meta: &crate::store::Metadata,
    policy: &str,
) -> Result<Option<RunRecord>, crate::store::StoreError> {
    use sqlx::Row;
    let row = sqlx::query(
        "SELECT started_at, finished_at, dry_run, matched, transitioned, expired, bytes_moved, errors \
         FROM retention_runs WHERE policy = $1 AND finished_at IS NOT NULL ORDER BY id DESC LIMIT 1",
    )
    .bind(policy)
    .fetch_optional(meta.pool())
    .await?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(RunRecord {
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        dry_run: row.try_get::<i64, _>("dry_run")? != 0,
        matched: row.try_get("matched")?,
        transitioned: row.try_get("transitioned")?,
        expired: row.try_get("expired")?,
        bytes_moved: row.try_get("bytes_moved")?,
        errors: row.try_get("errors")?,
    }))
}
