//! The copy step of live resharding, on two real Postgres databases sharing one tier: the
//! documents a new routing table moves, copied in batches that read back equal (versions,
//! tags, metadata, bytes), copied again without doubling, and brought up to date with the
//! source after it changed.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::memory::InMemory;
use vellum_core::blob::{Tier, Tiers, once};
use vellum_core::clock::Clock;
use vellum_core::crds::storage_tier::{Compression, TierClass};
use vellum_core::documents::{Actor, Documents, ListQuery, MetadataPatch, NewDocument, NewVersion};
use vellum_core::resharding::{Copied, copy_batch, moving};
use vellum_core::store::Metadata;
use vellum_testkit::TestDatabase;

mod support;
use support::ring;

struct Shards {
    a: Documents,
    b: Documents,
    _dbs: [TestDatabase; 2],
}

async fn shards() -> Shards {
    let tier = Tier::from_store("hot", TierClass::Hot, None, Compression::default(), Arc::new(InMemory::new()));
    let tiers = Tiers::new(vec![Arc::new(tier)], "hot").unwrap();
    let clock = Clock::manual(1_767_225_600_000);
    let (da, db) = (TestDatabase::new().await.unwrap(), TestDatabase::new().await.unwrap());
    let a = Documents::new(Metadata::open(&da.url).await.unwrap(), tiers.clone(), clock.clone(), None, 1 << 20);
    let b = Documents::new(Metadata::open(&db.url).await.unwrap(), tiers, clock, None, 1 << 20);
    Shards { a, b, _dbs: [da, db] }
}

fn admin() -> Actor {
    Actor { user: "root".into(), admin: true }
}

/// Everything a reader sees of document `id` on `docs`: the document, its versions and
/// each version's bytes.
async fn seen(docs: &Documents, id: i64) -> Option<String> {
    let doc = docs.get(&admin(), id).await.ok()?;
    let versions = docs.versions(&admin(), id).await.unwrap();
    let mut bytes = BTreeMap::new();
    for v in &versions.versions {
        let content = docs.content(&admin(), id, Some(v.version_number)).await.unwrap();
        let stream = docs.read(&content, None).await.unwrap();
        let all: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
        bytes.insert(v.version_number, all.concat());
    }
    Some(format!("{}\n{}\n{bytes:?}", serde_json::to_string(&doc).unwrap(), serde_json::to_string(&versions).unwrap()))
}

async fn count(docs: &Documents, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
        .fetch_one(docs.meta().pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn the_documents_a_new_shard_takes_are_copied_verified_and_copied_again_without_doubling() {
    let s = shards().await;
    let alice = Actor { user: "alice".into(), admin: false };
    let mut ids = Vec::new();
    for i in 0..40 {
        let new = NewDocument {
            filename: format!("d{i}.txt"),
            tags: vec![format!("t{}", i % 3), "all".into()],
            ..NewDocument::default()
        };
        let id = s.a.upload(&alice, new, once(format!("document {i}"))).await.unwrap().document.id;
        s.a.upload_version(&alice, id, NewVersion::default(), once(format!("version 2 of {i}"))).await.unwrap();
        ids.push(id);
    }
    s.a.delete(&alice, ids[0]).await.unwrap();
    s.a.set_legal_hold(&admin(), ids[1], true).await.unwrap();
    // The same bytes already stored on the target under its own object key.
    s.b.upload(&alice, NewDocument { filename: "twin.txt".into(), ..NewDocument::default() }, once("document 2"))
        .await
        .unwrap();

    // One shard becomes two: the ring moves about half of the documents, all to b.
    let two = ring(&["a", "b"]);
    let (mut movers, mut after) = (Vec::new(), Some(0));
    while let Some(from) = after {
        let (batch, next) = moving(s.a.meta(), Some(0), &two, from, 7).await.unwrap();
        movers.extend(batch);
        after = next;
    }
    let mut expected: Vec<i64> = ids.iter().copied().filter(|id| two.shard_of_id(*id) == 1).collect();
    expected.sort_unstable();
    assert_eq!(movers.iter().map(|(id, _)| *id).collect::<Vec<_>>(), expected, "in id order, each once");
    assert!(movers.iter().all(|(_, to)| *to == 1));
    assert!(expected.len() > 5 && expected.len() < 35, "{} of 40 move", expected.len());

    let mut total = Copied::default();
    for batch in expected.chunks(6) {
        let copied = copy_batch(s.a.meta(), s.b.meta(), batch).await.unwrap();
        total.documents += copied.documents;
        total.versions += copied.versions;
        total.bytes += copied.bytes;
    }
    assert_eq!((total.documents, total.versions), (expected.len() as u64, 2 * expected.len() as u64));
    for id in &expected {
        assert_eq!(seen(&s.b, *id).await, seen(&s.a, *id).await, "document {id} reads the same on both shards");
    }
    // Tag listings on the target find the moved documents (soft-deleted ones excepted).
    let tagged = ListQuery { tag: Some("all".into()), limit: Some(100), ..ListQuery::default() };
    let mut listed: Vec<i64> = s.b.list(&admin(), &tagged).await.unwrap().items.iter().map(|d| d.id).collect();
    listed.sort_unstable();
    let live: Vec<i64> = expected.iter().copied().filter(|id| *id != ids[0]).collect();
    assert_eq!(listed, live);
    let rows = (count(&s.b, "documents").await, count(&s.b, "versions").await, count(&s.b, "document_tags").await);

    // Copied again (a worker resumed after a crash): equal, not doubled.
    for batch in expected.chunks(6) {
        copy_batch(s.a.meta(), s.b.meta(), batch).await.unwrap();
    }
    assert_eq!(
        (count(&s.b, "documents").await, count(&s.b, "versions").await, count(&s.b, "document_tags").await),
        rows
    );

    // The source changed since (a new version, new tags, a purge): the copy follows it.
    // (Not the document deleted above: a new version of it is refused.)
    let live_movers: Vec<i64> = expected.iter().copied().filter(|id| *id != ids[0]).collect();
    let (changed, purged) = (live_movers[0], live_movers[1]);
    s.a.upload_version(&alice, changed, NewVersion::default(), once("version 3")).await.unwrap();
    let patch = MetadataPatch { tags: Some(vec!["moved".into()]), ..MetadataPatch::default() };
    s.a.update(&admin(), changed, patch).await.unwrap();
    if s.a.get(&admin(), purged).await.is_ok_and(|d| !d.legal_hold) {
        s.a.purge(&admin(), purged).await.unwrap();
    }
    copy_batch(s.a.meta(), s.b.meta(), &[changed, purged]).await.unwrap();
    assert_eq!(seen(&s.b, changed).await, seen(&s.a, changed).await);
    assert_eq!(seen(&s.b, purged).await, seen(&s.a, purged).await, "a purged document is gone from the copy too");

    // Writes to a batch's documents while it is copied wait for the copy, which reads back
    // equal every time; the last copy has the last write.
    let writes = async {
        for n in 0..20 {
            let patch = MetadataPatch { title: Some(Some(format!("edit {n}"))), ..MetadataPatch::default() };
            s.a.update(&admin(), changed, patch).await.unwrap();
        }
    };
    let copies = async {
        for _ in 0..20 {
            copy_batch(s.a.meta(), s.b.meta(), &expected[..6]).await.unwrap();
        }
    };
    tokio::join!(writes, copies);
    copy_batch(s.a.meta(), s.b.meta(), &expected[..6]).await.unwrap();
    assert_eq!(s.b.get(&admin(), changed).await.unwrap().title.as_deref(), Some("edit 19"));
}

/// Text the copy carries as array elements (quotes, backslashes, braces, commas, a text
/// reading `NULL`, an empty text, non-ASCII, new lines) arrives as it left, and an absent
/// value stays absent rather than becoming a text.
#[tokio::test]
async fn every_text_a_document_can_hold_is_copied_unchanged() {
    let s = shards().await;
    let alice = Actor { user: "al\"ice\\".into(), admin: false };
    let awkward = ["NULL", "", "a \"quoted\" \\ back\\slash", "{braces},commas", "zwölf — ✓\nline two\t", "  spaced  "];
    let mut ids = Vec::new();
    for (i, text) in awkward.iter().enumerate() {
        let mut metadata = serde_json::Map::new();
        metadata.insert((*text).to_owned(), serde_json::Value::String(format!("{text}\"}}")));
        let new = NewDocument {
            filename: format!("f{}{i}.txt", text.replace(['\\', '\n', '\t'], "_")),
            title: (i % 2 == 0).then(|| (*text).to_owned()),
            description: Some((*text).to_owned()),
            tags: vec![["NULL", "\"q\"", "back\\slash", "{b},c", "zwölf", "x y"][i].to_owned(), format!("tag {i}")],
            metadata,
            ..NewDocument::default()
        };
        let id = s.a.upload(&alice, new, once(format!("{text} bytes {i}"))).await.unwrap().document.id;
        let version = NewVersion { change_description: Some((*text).to_owned()), ..NewVersion::default() };
        s.a.upload_version(&alice, id, version, once(format!("{text} version 2"))).await.unwrap();
        ids.push(id);
    }
    let copied = copy_batch(s.a.meta(), s.b.meta(), &ids).await.unwrap();
    assert_eq!((copied.documents, copied.versions), (6, 12));
    for id in &ids {
        let on_b = seen(&s.b, *id).await;
        assert!(on_b.is_some(), "document {id} is on the target");
        assert_eq!(on_b, seen(&s.a, *id).await, "document {id} reads the same on both shards");
    }
    let untitled: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM documents WHERE title IS NULL")
        .fetch_one(s.b.meta().pool())
        .await
        .unwrap();
    assert_eq!(untitled, 3, "an absent title stays absent");
}

/// A copy that does not read back as the source holds it (here a trigger on the target
/// changes what is written) is refused whole: nothing of the batch stays on the target,
/// and the source keeps its documents and lets writes through again.
#[tokio::test]
async fn a_copy_that_reads_back_otherwise_is_refused_and_leaves_nothing_behind() {
    let s = shards().await;
    let alice = Actor { user: "alice".into(), admin: false };
    let mut ids = Vec::new();
    for i in 0..5 {
        let new = NewDocument { filename: format!("d{i}.txt"), tags: vec!["t".into()], ..NewDocument::default() };
        ids.push(s.a.upload(&alice, new, once(format!("document {i}"))).await.unwrap().document.id);
    }
    sqlx::raw_sql(
        "CREATE FUNCTION garble() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN NEW.title := 'garbled'; RETURN NEW; END $$; \
         CREATE TRIGGER garble BEFORE INSERT ON documents FOR EACH ROW EXECUTE FUNCTION garble()",
    )
    .execute(s.b.meta().pool())
    .await
    .unwrap();
    let refused = copy_batch(s.a.meta(), s.b.meta(), &ids).await;
    assert!(
        matches!(&refused, Err(vellum_core::resharding::MoveError::Mismatch { ids: named }) if *named == ids),
        "{refused:?}"
    );
    for table in ["documents", "versions", "document_tags", "blobs"] {
        assert_eq!(count(&s.b, table).await, 0, "no {table} row of the batch stays on the target");
    }
    // The source's hold ended with the refusal: a write goes through, and the copy, the
    // trigger gone, reads back equal.
    let patch = MetadataPatch { title: Some(Some("after".into())), ..MetadataPatch::default() };
    s.a.update(&admin(), ids[0], patch).await.unwrap();
    sqlx::raw_sql("DROP TRIGGER garble ON documents").execute(s.b.meta().pool()).await.unwrap();
    copy_batch(s.a.meta(), s.b.meta(), &ids).await.unwrap();
    for id in &ids {
        assert_eq!(seen(&s.b, *id).await, seen(&s.a, *id).await, "document {id} reads the same on both shards");
    }
}
