use std::collections::BTreeMap;

use super::*;
use crate::config::{ExpirationConfig, RetentionConfig, TierConfig};
use crate::crds::retention_policy::NoncurrentVersions;
use crate::crds::storage_tier::Compression;

const T0: i64 = 1_700_000_000_000;

fn tiers() -> BTreeMap<String, TierConfig> {
    [("hot", TierClass::Hot), ("warm", TierClass::Warm), ("cold", TierClass::Cold), ("frozen", TierClass::Frozen)]
        .into_iter()
        .map(|(name, class)| {
            let config = TierConfig {
                class,
                url: "memory://".into(),
                options: BTreeMap::new(),
                secret_options: BTreeMap::new(),
                cost_per_gb_month: None,
                compression: Compression::default(),
            };
            (name.to_owned(), config)
        })
        .collect()
}

fn policy(transitions: &[(u32, &str)]) -> RetentionConfig {
    RetentionConfig {
        selector: DocumentSelector::default(),
        age_basis: AgeBasis::Upload,
        transitions: transitions.iter().map(|(d, t)| (*d, (*t).to_owned())).collect(),
        expiration: None,
        noncurrent_versions: None,
        schedule: "@daily".into(),
        dry_run: false,
        suspend: false,
    }
}

/// The seed's schedule: HOT → WARM after 30 days, → COLD after 90, → FROZEN after 365.
fn standard() -> RetentionConfig {
    policy(&[(30, "warm"), (90, "cold"), (365, "frozen")])
}

/// The seed's cleanup: temporary files deleted after 30 days.
fn temporary() -> RetentionConfig {
    RetentionConfig {
        selector: DocumentSelector { file_types: vec!["tmp".into(), "temp".into()], ..DocumentSelector::default() },
        expiration: Some(ExpirationConfig { after_days: 30, action: ExpirationAction::Delete, archive_tier: None }),
        ..policy(&[])
    }
}

fn doc(file_type: &str, tier: &str) -> DocumentFacts {
    DocumentFacts {
        id: 7,
        owner: "alice".into(),
        file_type: file_type.into(),
        tags: vec!["report".into()],
        versions: vec![version(1, T0, tier)],
        ..DocumentFacts::default()
    }
}

fn version(version: i64, created_at: i64, tier: &str) -> VersionFacts {
    VersionFacts {
        version,
        created_at,
        sha256: format!("sha-{version}"),
        size: 1000,
        content_type: "application/pdf".into(),
        tier: tier.into(),
    }
}

fn day(n: i64) -> i64 {
    T0 + n * DAY_MS
}

fn decide_with(doc: &DocumentFacts, configs: &[(&str, &RetentionConfig)], now: i64) -> Plan {
    let policies: Vec<Policy<'_>> = configs.iter().map(|(name, config)| Policy { name, config }).collect();
    decide(doc, &policies, &tiers(), now)
}

fn due_kinds(plan: &Plan) -> Vec<String> {
    plan.due
        .iter()
        .map(|s| match &s.action {
            Action::Transition { version, to_tier, .. } => format!("v{version}->{to_tier}"),
            Action::ExpireVersion { version, .. } => format!("expire v{version}"),
            other => other.kind().to_owned(),
        })
        .collect()
}

#[test]
fn the_seed_schedule_moves_a_document_exactly_on_its_days() {
    let standard = standard();
    let at = |tier: &str, now: i64| due_kinds(&decide_with(&doc("pdf", tier), &[("standard", &standard)], now));
    assert!(at("hot", day(30) - 1).is_empty(), "a millisecond before day 30 nothing is due");
    assert_eq!(at("hot", day(30)), ["v1->warm"]);
    assert!(at("warm", day(90) - 1).is_empty());
    assert_eq!(at("warm", day(90)), ["v1->cold"]);
    assert!(at("cold", day(365) - 1).is_empty());
    assert_eq!(at("cold", day(365)), ["v1->frozen"]);
    assert!(at("frozen", day(5000)).is_empty(), "nothing is colder than FROZEN");
    // A run that missed the earlier steps goes straight to the coldest tier due.
    assert_eq!(at("hot", day(100)), ["v1->cold"]);
    assert_eq!(at("hot", day(400)), ["v1->frozen"]);
}

#[test]
fn the_next_action_and_its_date_are_known_in_advance() {
    let standard = standard();
    let temporary = temporary();
    let both = [("standard", &standard), ("temporary", &temporary)];
    let plan = decide_with(&doc("pdf", "hot"), &both, day(10));
    let next = plan.next.unwrap();
    assert_eq!(next.at_ms, day(30));
    assert!(matches!(next.action, Action::Transition { ref to_tier, .. } if to_tier == "warm"));
    let plan = decide_with(&doc("pdf", "warm"), &both, day(40));
    assert_eq!(plan.next.unwrap().at_ms, day(90));
    let plan = decide_with(&doc("pdf", "frozen"), &both, day(400));
    assert_eq!(plan.next, None, "nothing further happens to a frozen pdf");
    // A temporary file's deletion (day 30) comes before and beats the move on the same day.
    let plan = decide_with(&doc("tmp", "hot"), &both, day(1));
    assert_eq!(plan.next.unwrap().action, Action::Delete { policy: "temporary".into() });
}

#[test]
fn temporary_files_are_deleted_after_thirty_days_and_nothing_else_is() {
    let temporary = temporary();
    let standard = standard();
    let both = [("standard", &standard), ("temporary", &temporary)];
    assert_eq!(due_kinds(&decide_with(&doc("tmp", "hot"), &both, day(30) - 1)), Vec::<String>::new());
    assert_eq!(due_kinds(&decide_with(&doc("tmp", "hot"), &both, day(30))), ["DELETE"], "deletion beats the move");
    assert_eq!(due_kinds(&decide_with(&doc("TEMP", "hot"), &both, day(30))), ["DELETE"], "file types ignore case");
    assert_eq!(due_kinds(&decide_with(&doc("pdf", "hot"), &both, day(30))), ["v1->warm"]);
}

#[test]
fn legal_hold_blocks_expiration_but_not_transitions() {
    let archive = RetentionConfig {
        expiration: Some(ExpirationConfig {
            after_days: 200,
            action: ExpirationAction::Archive,
            archive_tier: Some("frozen".into()),
        }),
        ..standard()
    };
    let mut held = doc("pdf", "warm");
    held.legal_hold = true;
    let plan = decide_with(&held, &[("archive", &archive)], day(250));
    assert_eq!(due_kinds(&plan), ["v1->cold"]);
    assert_eq!(plan.blocked.len(), 1);
    assert!(plan.blocked[0].1.contains("legal hold"), "{:?}", plan.blocked);
    held.legal_hold = false;
    assert_eq!(due_kinds(&decide_with(&held, &[("archive", &archive)], day(250))), ["ARCHIVE"]);
}

#[test]
fn a_failed_move_blocks_expiration_until_it_succeeds() {
    let temporary = temporary();
    let mut failed = doc("tmp", "hot");
    failed.failed = Some("storage tier warm: connection refused".into());
    let plan = decide_with(&failed, &[("temporary", &temporary)], day(31));
    assert!(plan.due.is_empty());
    assert!(plan.blocked[0].1.contains("connection refused"), "{:?}", plan.blocked);
}

#[test]
fn overlapping_policies_the_most_restrictive_wins() {
    // Two transitions due on the same document: the colder tier wins, whoever asks.
    let slow = policy(&[(30, "warm")]);
    let fast = policy(&[(10, "cold")]);
    let plan = decide_with(&doc("pdf", "hot"), &[("slow", &slow), ("fast", &fast)], day(40));
    assert_eq!(plan.due[0].action, Action::Transition { version: 1, to_tier: "cold".into(), policy: "fast".into() });
    // DELETE beats ARCHIVE, even when the archive was due earlier.
    let archive = RetentionConfig {
        expiration: Some(ExpirationConfig {
            after_days: 10,
            action: ExpirationAction::Archive,
            archive_tier: Some("frozen".into()),
        }),
        ..policy(&[])
    };
    let delete = RetentionConfig {
        expiration: Some(ExpirationConfig { after_days: 20, action: ExpirationAction::Delete, archive_tier: None }),
        ..policy(&[])
    };
    let both = [("archive", &archive), ("delete", &delete)];
    assert_eq!(due_kinds(&decide_with(&doc("pdf", "hot"), &both, day(15))), ["ARCHIVE"]);
    assert_eq!(due_kinds(&decide_with(&doc("pdf", "hot"), &both, day(25))), ["DELETE"]);
    // An archived document is not archived again, but may still be deleted.
    let mut archived = doc("pdf", "frozen");
    archived.archived = true;
    assert_eq!(due_kinds(&decide_with(&archived, &[("archive", &archive)], day(15))), Vec::<String>::new());
    assert_eq!(due_kinds(&decide_with(&archived, &both, day(25))), ["DELETE"]);
}

#[test]
fn suspended_policies_and_unselected_documents_are_left_alone() {
    let mut suspended = standard();
    suspended.suspend = true;
    assert_eq!(decide_with(&doc("pdf", "hot"), &[("s", &suspended)], day(400)), Plan::default());
    let by_tag = RetentionConfig {
        selector: DocumentSelector { tags: vec!["Invoices".into(), "report".into()], ..DocumentSelector::default() },
        ..standard()
    };
    assert_eq!(due_kinds(&decide_with(&doc("pdf", "hot"), &[("t", &by_tag)], day(30))), ["v1->warm"]);
    let other_tag = RetentionConfig {
        selector: DocumentSelector { tags: vec!["x".into()], ..DocumentSelector::default() },
        ..standard()
    };
    assert_eq!(decide_with(&doc("pdf", "hot"), &[("t", &other_tag)], day(400)), Plan::default());
}

#[test]
fn selectors_need_every_criterion() {
    let d = doc("pdf", "hot");
    let sel = |s: DocumentSelector| selects(&s, &d);
    assert!(sel(DocumentSelector::default()));
    assert!(sel(DocumentSelector { owner: Some("alice".into()), ..DocumentSelector::default() }));
    assert!(!sel(DocumentSelector { owner: Some("bob".into()), ..DocumentSelector::default() }));
    assert!(sel(DocumentSelector {
        min_size_bytes: Some(1000),
        max_size_bytes: Some(1000),
        ..DocumentSelector::default()
    }));
    assert!(!sel(DocumentSelector { min_size_bytes: Some(1001), ..DocumentSelector::default() }));
    assert!(!sel(DocumentSelector { max_size_bytes: Some(999), ..DocumentSelector::default() }));
    assert!(!sel(DocumentSelector {
        file_types: vec!["pdf".into()],
        tags: vec!["temporary".into()],
        ..DocumentSelector::default()
    }));
}

#[test]
fn last_access_resets_the_age() {
    let mut by_access = standard();
    by_access.age_basis = AgeBasis::LastAccess;
    let mut read = doc("pdf", "hot");
    read.last_accessed_at = Some(day(20));
    assert!(decide_with(&read, &[("a", &by_access)], day(40)).due.is_empty());
    assert_eq!(due_kinds(&decide_with(&read, &[("a", &by_access)], day(50))), ["v1->warm"]);
    // Under the upload basis the read changes nothing.
    assert_eq!(due_kinds(&decide_with(&read, &[("u", &standard())], day(40))), ["v1->warm"]);
}

#[test]
fn noncurrent_versions_beyond_keep_expire_after_they_were_replaced() {
    let keep_two = RetentionConfig {
        noncurrent_versions: Some(NoncurrentVersions { keep: 2, expire_after_days: Some(10) }),
        ..policy(&[])
    };
    // v5 current (day 40); v4 replaced at 40, v3 at 30, v2 at 20, v1 at 10.
    let mut d = doc("pdf", "hot");
    d.versions = (1..=5).rev().map(|v| version(v, day(v * 10 - 10), "hot")).collect();
    assert_eq!(due_kinds(&decide_with(&d, &[("k", &keep_two)], day(25))), ["expire v1"]);
    assert_eq!(due_kinds(&decide_with(&d, &[("k", &keep_two)], day(30))), ["expire v1", "expire v2"]);
    assert_eq!(
        due_kinds(&decide_with(&d, &[("k", &keep_two)], day(1000))),
        ["expire v1", "expire v2"],
        "the two newest noncurrent versions stay however old"
    );
    let plan = decide_with(&d, &[("k", &keep_two)], day(21));
    assert_eq!(plan.next.unwrap().at_ms, day(30));
    // Two policies: the one keeping fewer wins; a version is expired once.
    let keep_one = RetentionConfig {
        noncurrent_versions: Some(NoncurrentVersions { keep: 1, expire_after_days: Some(10) }),
        ..policy(&[])
    };
    assert_eq!(
        due_kinds(&decide_with(&d, &[("k", &keep_two), ("one", &keep_one)], day(1000))),
        ["expire v1", "expire v2", "expire v3"]
    );
    // Legal hold keeps them all.
    d.legal_hold = true;
    let plan = decide_with(&d, &[("k", &keep_two)], day(1000));
    assert!(plan.due.is_empty());
    assert_eq!(plan.blocked.len(), 2);
}

#[test]
fn noncurrent_versions_transition_by_their_own_age_unless_they_expire() {
    let mut both = standard();
    both.noncurrent_versions = Some(NoncurrentVersions { keep: 0, expire_after_days: Some(50) });
    let mut d = doc("pdf", "hot");
    d.versions = vec![version(2, day(20), "hot"), version(1, day(0), "hot")];
    // Day 35: v1 is 35 days old (→ warm), v2 15 days; v1 replaced 15 days ago.
    assert_eq!(due_kinds(&decide_with(&d, &[("b", &both)], day(35))), ["v1->warm"]);
    // Day 70: v1 has been noncurrent for 50 days: it expires rather than moves.
    assert_eq!(due_kinds(&decide_with(&d, &[("b", &both)], day(70))), ["v2->warm", "expire v1"]);
}

#[test]
fn unknown_tiers_are_never_moved_and_moves_only_go_colder() {
    let standard = standard();
    assert!(decide_with(&doc("pdf", "gone"), &[("s", &standard)], day(400)).due.is_empty());
    let to_warm = policy(&[(30, "warm")]);
    assert!(decide_with(&doc("pdf", "cold"), &[("w", &to_warm)], day(400)).due.is_empty());
    assert!(decide_with(&DocumentFacts::default(), &[("w", &to_warm)], day(400)).due.is_empty());
}

#[test]
fn schedules_name_their_next_run() {
    // 2023-11-14T22:13:20Z
    assert_eq!(crate::clock::rfc3339(next_run("0 3 * * *", T0).unwrap()), "2023-11-15T03:00:00Z");
    assert_eq!(crate::clock::rfc3339(next_run("@daily", T0).unwrap()), "2023-11-15T00:00:00Z");
    assert_eq!(crate::clock::rfc3339(next_run("*/15 * * * *", T0).unwrap()), "2023-11-14T22:15:00Z");
    assert_eq!(next_run("every day", T0), None);
    assert_eq!(next_run("0 3 * * * *", T0), None, "six fields are not a Kubernetes schedule");
}

#[test]
fn a_run_over_several_shards_adds_up_from_first_start_to_last_finish() {
    let a = RunRecord {
        started_at: 10,
        finished_at: Some(50),
        matched: 3,
        transitioned: 2,
        bytes_moved: 100,
        ..RunRecord::default()
    };
    let b =
        RunRecord { started_at: 5, finished_at: Some(40), matched: 4, expired: 1, errors: 1, ..RunRecord::default() };
    let run = RunRecord::combine([a, b]).unwrap();
    assert_eq!((run.started_at, run.finished_at), (5, Some(50)));
    assert_eq!((run.matched, run.transitioned, run.expired, run.bytes_moved, run.errors), (7, 2, 1, 100, 1));
    assert!(RunRecord::combine([]).is_none());
}

#[test]
fn shards_usage_adds_up_and_tiering_savings_price_the_target_tiers_against_the_default() {
    use crate::documents::UsageCounts;
    const GIB: i64 = 1 << 30;
    let mut tiers = tiers();
    for (name, cost) in [("hot", 0.10), ("warm", 0.05), ("cold", 0.01)] {
        tiers.get_mut(name).unwrap().cost_per_gb_month = Some(cost);
    }
    let config = crate::config::PlatformConfig {
        tiers,
        default_tier: "hot".into(),
        webhooks: BTreeMap::new(),
        retention_policies: BTreeMap::new(),
        shards: None,
        shard_move: None,
        webhook_destinations: crate::webhooks::DestinationPolicy::default(),
    };
    let mut total = UsageCounts { logical_bytes: 4 * GIB, tiers: [("hot".into(), (1, GIB, GIB))].into() };
    let other = UsageCounts {
        logical_bytes: 6 * GIB,
        tiers: [("warm".into(), (2, 2 * GIB, 2 * GIB)), ("cold".into(), (3, 3 * GIB, 3 * GIB))].into(),
    };
    total.add(&other);
    total.add(&UsageCounts { logical_bytes: 0, tiers: [("cold".into(), (1, GIB, GIB))].into() });
    assert_eq!(total.tiers["cold"], (4, 4 * GIB, 4 * GIB));
    assert_eq!(total.logical_bytes, 10 * GIB);
    // 2 GiB in warm save 0.05 each, 4 GiB in cold 0.09 each; hot saves nothing; a tier
    // named twice counts once.
    let savings = total.tiering_savings(&config, ["warm", "cold", "cold", "hot"]);
    assert!((savings - (2.0 * 0.05 + 4.0 * 0.09)).abs() < 1e-9, "{savings}");
    let usage = total.priced(&config);
    assert!((usage.monthly_savings.tiering - savings).abs() < 1e-9);
    assert_eq!(usage.objects, 7);
}

#[test]
fn a_restore_or_move_on_request_restarts_moves_but_never_deletion() {
    let archive = RetentionConfig {
        expiration: Some(ExpirationConfig {
            after_days: 60,
            action: ExpirationAction::Archive,
            archive_tier: Some("frozen".into()),
        }),
        ..standard()
    };
    // Archived at day 60, restored to hot at day 100: the next run leaves it there.
    let mut restored = doc("pdf", "hot");
    restored.restarted_at = Some(day(100));
    assert_eq!(due_kinds(&decide_with(&restored, &[("archive", &archive)], day(101))), Vec::<String>::new());
    // Its clock counts from the restore: warm 30 days later, archived again 60 days later.
    assert_eq!(due_kinds(&decide_with(&restored, &[("archive", &archive)], day(130))), ["v1->warm"]);
    assert_eq!(due_kinds(&decide_with(&restored, &[("archive", &archive)], day(160))), ["ARCHIVE"]);
    let plan = decide_with(&restored, &[("archive", &archive)], day(101));
    assert_eq!(plan.next.map(|n| n.at_ms), Some(day(130)), "the next action is dated from the restore");
    // Deletion is never pushed back by a restore.
    let delete = RetentionConfig {
        expiration: Some(ExpirationConfig { after_days: 90, action: ExpirationAction::Delete, archive_tier: None }),
        ..policy(&[])
    };
    assert_eq!(due_kinds(&decide_with(&restored, &[("delete", &delete)], day(101))), ["DELETE"]);
}
