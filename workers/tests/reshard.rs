//! `vellum-workers reshard`, what the operator's resharding Job runs: given a compiled
//! platform config whose `shardMove` adds two shards to one, it hands every document the
//! new routing sends elsewhere over to its shard on real Postgres databases, prints each
//! shard's progress as JSON, and exits; run again, it finds nothing left to move.

use std::process::Command;

use futures::StreamExt;

use vellum_core::blob::{Tiers, once};
use vellum_core::clock::Clock;
use vellum_core::config::{CONFIG_FILE, SECRETS_FILE, ShardMove, compile_dir};
use vellum_core::documents::{Actor, Documents, Library, NewDocument, library_of, open_shards};
use vellum_core::routing::RoutingTable;
use vellum_testkit::TestDatabase;

const TIERS: &str = "apiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {name: hot}\n\
    spec: {class: HOT, default: true, backend: {url: 'file://blobs'}}\n";

fn reshard(dir: &std::path::Path, url: &str, nats: Option<&str>) -> (bool, serde_json::Value, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vellum-workers"));
    command.args(["reshard", "--batch", "7", "--database-url", url]);
    if let Some(nats) = nats {
        command.args(["--nats-url", nats]);
    }
    let out = command
        .arg("--config-dir")
        .arg(dir.join("compiled"))
        .arg("--secrets-dir")
        .arg(dir.join("compiled"))
        .arg("--data-dir")
        .arg(dir)
        .env("VELLUM_LOG", "info")
        .output()
        .unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.success(), json, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn the_reshard_command_moves_what_the_new_routing_sends_elsewhere_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let dbs =
        [TestDatabase::new().await.unwrap(), TestDatabase::new().await.unwrap(), TestDatabase::new().await.unwrap()];
    let shard = |n: usize| format!("  - {{name: s{n}, urlSecretRef: {{name: shard-urls, key: s{n}}}}}\n");
    let yaml = format!(
        "{TIERS}---\napiVersion: vellum.dev/v1alpha1\nkind: ShardSet\nmetadata: {{name: docs}}\nspec:\n  shards:\n{}{}{}\
         ---\napiVersion: v1\nkind: Secret\nmetadata: {{name: shard-urls}}\nstringData:\n  s0: '{}'\n  s1: '{}'\n  s2: '{}'\n",
        shard(0),
        shard(1),
        shard(2),
        dbs[0].url,
        dbs[1].url,
        dbs[2].url
    );
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::write(dir.path().join("config/platform.yaml"), yaml).unwrap();
    let (_, three, secrets) = compile_dir(&dir.path().join("config")).unwrap();
    // In force: s0 alone; moving to all three, as the operator publishes a grown ShardSet.
    let mut config = three.clone();
    let mut one = three.shards.clone().unwrap();
    one.shards.truncate(1);
    config.shards = Some(one);
    config.shard_move = Some(ShardMove { to: three.shards.clone().unwrap(), draining: Vec::new() });
    let compiled = dir.path().join("compiled");
    std::fs::create_dir_all(&compiled).unwrap();
    std::fs::write(compiled.join(CONFIG_FILE), serde_json::to_vec(&config).unwrap()).unwrap();
    std::fs::write(compiled.join(SECRETS_FILE), secrets.to_json()).unwrap();

    let tiers = Tiers::open(&config, &secrets, dir.path()).unwrap();
    let shards = open_shards(&config, &secrets, &dbs[0].url).await.unwrap();
    assert_eq!(shards.len(), 3, "every shard either routing names is opened");
    let docs: Vec<Documents> =
        shards.into_iter().map(|m| Documents::new(m, tiers.clone(), Clock::system(), None, 1 << 20)).collect();
    let library: Library = library_of(&config, docs).unwrap();
    let alice = Actor { user: "alice".into(), admin: false };
    let mut ids = Vec::new();
    for n in 0..40 {
        let new = NewDocument { filename: format!("d{n}.txt"), ..NewDocument::default() };
        ids.push(library.shards()[0].upload(&alice, new, once(format!("document {n}"))).await.unwrap().document.id);
    }
    let to = RoutingTable::build(&three.shards.clone().unwrap()).unwrap();
    let leaving = ids.iter().filter(|id| to.shard_of_id(**id) != 0).count();

    // The move's progress reaches the gateways' /topic/migrations through NATS.
    let nats = vellum_testkit::NatsProcess::start().unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut notices = client.subscribe(vellum_jetstream::notices::SUBJECT).await.unwrap();
    client.flush().await.unwrap();
    let (ok, report, stderr) = reshard(dir.path(), &dbs[0].url, Some(&nats.url()));
    assert!(ok, "{stderr}");
    // Three shards leave a replica five connections to each, room for one lane; this
    // process only moves documents and gives the source room for two.
    let lanes: Vec<&str> = stderr.lines().filter(|l| l.contains("handing documents over")).collect();
    assert!(!lanes.is_empty() && lanes.iter().all(|l| l.contains("lanes=2")), "{lanes:?}");
    let mut updates = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout(std::time::Duration::from_secs(2), notices.next()).await {
        let notice: vellum_jetstream::notices::WireNotice = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(notice.audience, vellum_jetstream::notices::WireAudience::Admins, "for admins only");
        assert_eq!((notice.channel.as_str(), notice.kind.as_str()), ("migrations", "status_update"));
        updates.push(notice.message);
    }
    let kinds: Vec<&str> = updates.iter().filter_map(|u| u["eventType"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"phase_changed"), "{updates:?}");
    assert_eq!(kinds.last(), Some(&"completed"), "{updates:?}");
    let done = updates.last().unwrap();
    assert_eq!(done["entityId"], format!("shard-move/{}", to.version()));
    assert_eq!((done["recordsProcessed"].as_u64(), done["progress"].as_f64()), (Some(leaving as u64), Some(100.0)));
    for key in ["entityType", "status", "totalRecords", "phase", "message", "timestamp"] {
        assert!(done.get(key).is_some(), "the StatusUpdateEvent has {key}: {done}");
    }
    assert_eq!(report["routingVersion"], to.version(), "{report}");
    assert_eq!(report["shards"]["s0"]["movedDocuments"], leaving, "{report}");
    assert_eq!(report["shards"]["s0"]["totalDocuments"], leaving, "{report}");
    for id in &ids {
        let home = &library.shards()[to.shard_of_id(*id)];
        assert!(home.get(&alice, *id).await.is_ok(), "document {id} is where the new routing sends it");
        assert!(library.at(*id, |shard| Box::pin(shard.get(&alice, *id))).await.is_ok(), "and reached from the old");
    }
    let (ok, again, stderr) = reshard(dir.path(), &dbs[0].url, None);
    assert!(ok, "{stderr}");
    assert_eq!(again["shards"]["s0"]["movedDocuments"], leaving, "nothing more moved: {again}");

    // Without a move in the config, the command says so and fails.
    config.shard_move = None;
    std::fs::write(compiled.join(CONFIG_FILE), serde_json::to_vec(&config).unwrap()).unwrap();
    let (ok, _, stderr) = reshard(dir.path(), &dbs[0].url, None);
    assert!(!ok && stderr.contains("no move is under way"), "{stderr}");
}
