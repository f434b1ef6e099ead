//! Every metadata shard's documents behind one routing table: a document id or an upload
//! session id reaches its shard without a lookup, new documents land where the routing
//! sends them, and listings ask every shard and merge the answers in the listing's order.

use std::sync::Arc;

use futures::future::{BoxFuture, try_join_all};

use bytes::Bytes;
use futures::Stream;

use super::{
    Actor, DocError, Document, Documents, ListQuery, NewVersion, Page, Placement, Prepared, Uploaded, Usage,
    page_limit, page_of, random_document_id,
};
use crate::blob::{StoredBlob, Tiers};
use crate::clock::Clock;
use crate::config::{PlatformConfig, SecretBundle};
use crate::routing::RoutingTable;
use crate::store::{Metadata, StoreError};

/// The documents of a platform, on one shard or several.
///
/// While documents move between shards (a live resharding, see [`crate::resharding`]),
/// the library knows the table they move to besides the one in force: new documents get
/// ids that both tables route to the same shard, and a request for a document that was
/// handed over follows the marker it left.
#[derive(Clone, Debug)]
pub struct Library {
    table: Arc<RoutingTable>,
    /// The table documents are moving to, while they are.
    next: Option<Arc<RoutingTable>>,
    /// Shards in neither table that may still hold documents, while a move drains them.
    draining: Vec<String>,
    /// The shards of `table` in its order, then those only `next` has, then `draining`.
    shards: Vec<Documents>,
}

/// The names of `table`'s shards, then those only `next` has, then `draining`'s.
fn union(table: &RoutingTable, next: Option<&RoutingTable>, draining: &[String]) -> Vec<String> {
    let mut names: Vec<String> = table.names().to_vec();
    for name in next.map(RoutingTable::names).unwrap_or_default().iter().chain(draining) {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}

/// How many shards a request follows a document through before it gives up.
pub(crate) const MAX_HOPS: usize = 4;

impl Library {
    /// One database holding everything.
    pub fn single(docs: Documents) -> Self {
        Self { table: Arc::new(RoutingTable::single("main")), next: None, draining: Vec::new(), shards: vec![docs] }
    }

    /// The shards of `table`, in its order; they share the first one's tiers.
    ///
    /// # Panics
    /// When `shards` does not hold exactly one database per shard of the table.
    pub fn sharded(table: Arc<RoutingTable>, shards: Vec<Documents>) -> Self {
        Self::moving(table, None, Vec::new(), shards)
    }

    /// The shards of `table` in its order, then those only `next` has, then the
    /// `draining` ones, while documents move from `table` and `draining` to `next`.
    ///
    /// # Panics
    /// When `shards` does not hold exactly one database per shard named.
    pub fn moving(
        table: Arc<RoutingTable>,
        next: Option<Arc<RoutingTable>>,
        draining: Vec<String>,
        shards: Vec<Documents>,
    ) -> Self {
        let names = union(&table, next.as_deref(), &draining);
        assert_eq!(names.len(), shards.len(), "one database per shard of the routing tables");
        let first = shards[0].clone();
        let metas: Vec<Metadata> = shards.iter().map(|d| d.meta().clone()).collect();
        let shards = shards
            .into_iter()
            .enumerate()
            .map(|(index, docs)| {
                let siblings: Arc<[Metadata]> =
                    metas.iter().enumerate().filter(|(i, _)| *i != index).map(|(_, m)| m.clone()).collect();
                let placement = Placement {
                    table: Arc::clone(&table),
                    index,
                    next: next.as_ref().map(|n| (Arc::clone(n), n.names().iter().position(|x| *x == names[index]))),
                };
                docs.sharing_tiers_with(&first).placed(placement, siblings)
            })
            .collect();
        Self { table, next, draining, shards }
    }

    /// The routing table in force.
    pub fn table(&self) -> &RoutingTable {
        &self.table
    }

    /// The table documents are moving to, while they are.
    pub fn next(&self) -> Option<&RoutingTable> {
        self.next.as_deref()
    }

    /// Every shard's name, in the order of [`Self::shards`].
    pub fn names(&self) -> Vec<String> {
        union(&self.table, self.next.as_deref(), &self.draining)
    }

    /// The shard named `name`.
    pub fn named(&self, name: &str) -> Option<&Documents> {
        self.names().iter().position(|n| n == name).map(|i| &self.shards[i])
    }

    /// Runs `op` on the shard holding document `id`: the one the table in force routes it
    /// to or, when the document was handed over from there, the shard its marker names.
    /// For example `library.at(id, |shard| Box::pin(shard.get(&actor, id)))`.
    pub async fn at<'s, T>(
        &'s self,
        id: i64,
        op: impl Fn(&'s Documents) -> BoxFuture<'s, Result<T, DocError>>,
    ) -> Result<T, DocError> {
        self.find(id, op).await.map(|(_, value)| value)
    }

    /// [`Self::at`], and the index of the shard `op` succeeded on.
    async fn find<'s, T>(
        &'s self,
        id: i64,
        op: impl Fn(&'s Documents) -> BoxFuture<'s, Result<T, DocError>>,
    ) -> Result<(usize, T), DocError> {
        let mut index = self.table.shard_of_id(id);
        for _ in 0..MAX_HOPS {
            match op(&self.shards[index]).await {
                Err(DocError::NotFound(missing)) if missing == id => match self.moved(&self.shards[index], id).await? {
                    Some(next) => index = next,
                    None => return Err(DocError::NotFound(id)),
                },
                other => return other.map(|value| (index, value)),
            }
        }
        Err(DocError::Unavailable(format!("document {id} is moving between shards; try again shortly")))
    }

    /// The index of the shard document `id` was handed over to from `shard`, if it was.
    async fn moved(&self, shard: &Documents, id: i64) -> Result<Option<usize>, DocError> {
        match shard.moved_to(id).await? {
            None => Ok(None),
            Some(name) => self.names().iter().position(|n| *n == name).map(Some).ok_or_else(|| {
                DocError::Unavailable(format!(
                    "document {id} moved to shard {name}, which this replica has not loaded yet; try again shortly"
                ))
            }),
        }
    }

    /// The first shard: where records that belong to no document are kept (webhook
    /// deliveries, retention runs).
    pub fn primary(&self) -> &Documents {
        &self.shards[0]
    }

    /// Every shard: the routing table's in its order, then those only the table documents
    /// move to has.
    pub fn shards(&self) -> &[Documents] {
        &self.shards
    }

    /// The shard the table in force routes document `id` to (see [`Self::at`] for the
    /// shard that holds it).
    pub fn of(&self, id: i64) -> &Documents {
        &self.shards[self.table.shard_of_id(id)]
    }

    /// The shard a new document goes to: where the routing sends a random id, so that
    /// shards fill in proportion to their share of the routing; while documents move, an
    /// id both tables send to the same shard (new documents land where they stay).
    pub fn for_new(&self) -> &Documents {
        let Some(next) = &self.next else { return self.of(random_document_id()) };
        let names = self.names();
        for _ in 0..1024 {
            let id = random_document_id();
            let now = self.table.shard_of_id(id);
            if next.names()[next.shard_of_id(id)] == names[now] {
                return &self.shards[now];
            }
        }
        self.of(random_document_id())
    }

    /// Begins a new document's upload on the shard the routing sends it to, chosen here
    /// once: its bytes are claimed, stored and recorded there and nowhere else.
    pub fn begin_document(&self) -> DocumentUpload<'_> {
        Upload { library: self, shard: self.for_new(), blob: None, of: () }
    }

    /// Begins a new version of document `id` on the document's own shard, once the actor
    /// may see it (checked before any byte is taken).
    pub async fn begin_version(&self, actor: &Actor, id: i64) -> Result<VersionUpload<'_>, DocError> {
        let (index, current) = self.find(id, |shard| Box::pin(shard.get(actor, id))).await?;
        Ok(Upload { library: self, shard: &self.shards[index], blob: None, of: current })
    }

    pub fn tiers(&self) -> Tiers {
        self.primary().tiers()
    }

    /// Replaces the tiers of every shard (they share them).
    pub fn set_tiers(&self, tiers: Tiers) {
        self.primary().set_tiers(tiers);
    }

    pub fn clock(&self) -> &Clock {
        self.primary().clock()
    }

    pub fn max_upload(&self) -> u64 {
        self.primary().max_upload
    }

    /// A page of the documents the actor may see, newest first, from every shard: each
    /// shard answers the same query (the cursor is a place in the common order), and the
    /// newest `limit` of their answers make the page.
    pub async fn list(&self, actor: &Actor, query: &ListQuery) -> Result<Page, DocError> {
        if self.shards.len() == 1 {
            return self.primary().list(actor, query).await;
        }
        let limit = page_limit(query)? as usize;
        let mut answers = try_join_all(self.shards.iter().map(|shard| shard.list_keyed(actor, query))).await?;
        if let Some(next) = &self.next {
            // A document handed over while the shards answered may have left its source
            // after the source answered and reached its target before the target did: the
            // shards it may reach answer again, after every first answer.
            let gaining: Vec<&Documents> = next.names().iter().filter_map(|name| self.named(name)).collect();
            answers.extend(try_join_all(gaining.into_iter().map(|shard| shard.list_keyed(actor, query))).await?);
        }
        let mut more = false;
        let mut items = Vec::with_capacity(limit * 2);
        for (page, more_here) in answers {
            more |= more_here;
            items.extend(page);
        }
        items.sort_by(|(a_at, a), (b_at, b)| b_at.cmp(a_at).then(b.id.cmp(&a.id)));
        // A document is on two shards for the moment between the two commits of its
        // hand-over (or twice in the answers above): it is listed once.
        items.dedup_by_key(|(_, d)| d.id);
        Ok(page_of(items, more, limit))
    }

    /// Storage usage of every shard together.
    pub async fn usage(&self, config: &PlatformConfig) -> Result<Usage, DocError> {
        let counts = try_join_all(self.shards.iter().map(Documents::usage_counts)).await?;
        let mut total = counts[0].clone();
        for more in &counts[1..] {
            total.add(more);
        }
        Ok(total.priced(config))
    }

    /// Expires abandoned upload sessions on every shard.
    pub async fn expire_uploads(&self) -> Result<usize, DocError> {
        Ok(try_join_all(self.shards.iter().map(Documents::expire_uploads)).await?.into_iter().sum())
    }

    /// Checks that every shard answers; the error names the first that does not.
    pub async fn ping(&self) -> Result<(), (String, StoreError)> {
        let pings = self
            .shards
            .iter()
            .zip(self.table.names())
            .map(|(shard, name)| async move { shard.meta().ping().await.map_err(|e| (name.clone(), e)) });
        try_join_all(pings).await.map(drop)
    }
}

/// An upload's bytes, stored, claimed and recorded on the one shard chosen when it began
/// (see [`Library::begin_document`] and [`Library::begin_version`]). `K` is what it will
/// become: a new document (`()`) or a new version of the [`Document`] it holds. Dropped
/// unfinished, its stored bytes stay claimed as garbage until the collector deletes them.
#[derive(Debug)]
pub struct Upload<'a, K> {
    library: &'a Library,
    shard: &'a Documents,
    blob: Option<StoredBlob>,
    of: K,
}

/// A new document being uploaded.
pub type DocumentUpload<'a> = Upload<'a, ()>;
/// A new version of a document being uploaded.
pub type VersionUpload<'a> = Upload<'a, Document>;

impl<K> Upload<'_, K> {
    /// Streams the bytes into the default tier; an upload carries one file.
    pub async fn store(
        &mut self,
        content_type: &str,
        body: impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin + Send,
    ) -> Result<(), DocError> {
        if self.blob.is_some() {
            return Err(DocError::Invalid("the upload carries more than one file".into()));
        }
        self.blob = Some(self.shard.store_bytes(content_type, body).await?);
        Ok(())
    }

    /// Whether the bytes are stored.
    pub fn is_stored(&self) -> bool {
        self.blob.is_some()
    }

    /// Gives the upload up and deletes what it stored.
    pub async fn abandon(mut self) {
        if let Some(blob) = self.blob.take() {
            self.shard.discard(&blob).await;
        }
    }

    fn take(&mut self) -> Result<StoredBlob, DocError> {
        self.blob.take().ok_or_else(|| DocError::Invalid("the upload carries no file".into()))
    }
}

impl DocumentUpload<'_> {
    /// Records the document on its shard (its stored copy is deleted if the record fails).
    pub async fn finish(mut self, actor: &Actor, prepared: &Prepared) -> Result<Uploaded, DocError> {
        let blob = self.take()?;
        self.shard.record_upload(actor, prepared, blob).await
    }
}

impl VersionUpload<'_> {
    /// The document as it was when the upload began.
    pub fn current(&self) -> &Document {
        &self.of
    }

    /// Records the version on the document's shard (its stored copy is deleted if the
    /// record fails).
    ///
    /// When the document was handed over to another shard meanwhile, the claim on the
    /// stored copy follows it there and the version is recorded there.
    pub async fn finish(mut self, actor: &Actor, new: NewVersion) -> Result<Uploaded, DocError> {
        let blob = self.take()?;
        let id = self.of.id;
        let mut shard = self.shard;
        for _ in 0..MAX_HOPS {
            let result = shard.try_record_version(actor, id, &new, &blob).await;
            if let Err(DocError::NotFound(missing)) = &result
                && *missing == id
                && let Some(next) = self.library.moved(shard, id).await?
            {
                let next = &self.library.shards[next];
                shard.transfer_claim(&blob, next).await?;
                shard = next;
                continue;
            }
            shard.settle(&blob, &result).await;
            return result;
        }
        shard.settle(&blob, &Err(DocError::NotFound(id))).await;
        Err(DocError::Unavailable(format!("document {id} is moving between shards; try again shortly")))
    }
}

/// The most connections each shard's pool opens when a replica has `shards` of them:
/// twice the one-database budget ([`crate::store::MAX_CONNECTIONS`]) shared out, at most
/// that budget and never fewer than four (a replica opens at most 32 connections over two
/// to eight shards, 16 to one database).
///
/// Shards often share a Postgres server, and a pool opens only as many connections as it
/// has been asked for at once: the bound bites on bursts. Below it, reads keep their
/// connection for the next read ([`crate::store::Metadata::reader`]) and skip the pool's
/// extra round trip; at it, a read ending gives its connection back to whoever waits. With
/// the budget halved (four each of four shards), eight readers found a shard's pool spent
/// on a quarter of their reads and read at 0.82-0.83 of one database's rate; with eight
/// each, on one in a thousand, at 0.91-0.92 (`cargo bench -p vellum-core --bench
/// resharding`, the median of nine rounds side by side).
pub fn shard_connections(shards: usize) -> u32 {
    let shards = u32::try_from(shards.max(1)).unwrap_or(u32::MAX);
    (2 * crate::store::MAX_CONNECTIONS / shards).clamp(4, crate::store::MAX_CONNECTIONS)
}

/// The metadata databases of a platform, opened (and migrated): every shard of the
/// config's ShardSet in its order (the first holds what belongs to no document), or
/// `database_url` alone when there is no ShardSet.
pub async fn open_shards(
    config: &PlatformConfig,
    secrets: &SecretBundle,
    database_url: &str,
) -> Result<Vec<Metadata>, String> {
    open_shards_with(config, secrets, database_url, 0).await
}

/// [`open_shards`], with pools of at least `least` connections each: the resharding Job's,
/// a process that only moves documents, gives each shard room for the mover's two lanes
/// ([`crate::resharding::MOVER_CONNECTIONS`]) where a replica's share of its budget would
/// leave one (four connections each with eight shards). It moves from one source at a
/// time, and a pool opens its connections as they are needed.
pub async fn open_shards_with(
    config: &PlatformConfig,
    secrets: &SecretBundle,
    database_url: &str,
    least: u32,
) -> Result<Vec<Metadata>, String> {
    if config.shards.is_none() {
        return Ok(vec![
            Metadata::open(database_url).await.map_err(|e| format!("opening the metadata database: {e}"))?,
        ]);
    }
    let shards = config.all_shards();
    let connections = shard_connections(shards.len()).max(least);
    let opens = shards.into_iter().map(|shard| async move {
        let url = secrets.get(&shard.url).and_then(|v| v.expose_str()).ok_or_else(|| {
            format!("the URL of shard {} is missing or not UTF-8 (Secret key {})", shard.name, shard.url)
        })?;
        Metadata::open_with(url, connections).await.map_err(|e| format!("opening metadata shard {}: {e}", shard.name))
    });
    try_join_all(opens).await
}

/// Hands each shard's pool its URL from a reloaded Secret, so that rotated database
/// credentials are used from the next connection on, without a restart. `shards` are the
/// open pools by shard name; a shard the config no longer names is left alone. Returns what
/// could not be applied, one message per shard (never quoting a URL). Without a ShardSet the
/// one database's URL comes from the command line and is left alone.
pub fn rotate_credentials(
    shards: &[(String, Metadata)],
    config: &PlatformConfig,
    secrets: &SecretBundle,
) -> Vec<String> {
    if config.shards.is_none() {
        return Vec::new();
    }
    let mut problems = Vec::new();
    for shard in config.all_shards() {
        let Some((_, meta)) = shards.iter().find(|(name, _)| *name == shard.name) else { continue };
        match secrets.get(&shard.url).and_then(|v| v.expose_str()) {
            Some(url) => match meta.rotate(url) {
                Ok(true) => tracing::info!(shard = %shard.name, "shard credentials rotated: new connections use them"),
                Ok(false) => {}
                Err(e) => problems.push(format!("shard {}: {e}", shard.name)),
            },
            None => {
                problems.push(format!("shard {}: its URL is missing from the Secret (key {})", shard.name, shard.url));
            }
        }
    }
    problems
}

/// The shards of a reloaded config whose routing changed, in [`PlatformConfig::all_shards`]
/// order, by name: those already open (`open`) are kept, the others opened (and migrated).
/// The caller closes the pools of those it no longer needs.
pub async fn reopen_shards(
    open: &[(String, Metadata)],
    config: &PlatformConfig,
    secrets: &SecretBundle,
) -> Result<Vec<(String, Metadata)>, String> {
    let shards = config.all_shards();
    let connections = shard_connections(shards.len());
    let reopen = shards.into_iter().map(|shard| async move {
        if let Some((_, meta)) = open.iter().find(|(name, _)| *name == shard.name) {
            return Ok((shard.name.clone(), meta.clone()));
        }
        let url = secrets.get(&shard.url).and_then(|v| v.expose_str()).ok_or_else(|| {
            format!("the URL of shard {} is missing or not UTF-8 (Secret key {})", shard.name, shard.url)
        })?;
        let meta = Metadata::open_with(url, connections)
            .await
            .map_err(|e| format!("opening metadata shard {}: {e}", shard.name))?;
        Ok((shard.name.clone(), meta))
    });
    try_join_all(reopen).await
}

/// Whether `library` routes as `config` says: the same table in force, the same move (or
/// none) and the same shards drained.
pub fn routes_as(library: &Library, config: &PlatformConfig) -> bool {
    let Some(set) = &config.shards else { return library.shards().len() == 1 };
    let version = |s| RoutingTable::build(s).map(|t| t.version().to_owned()).ok();
    let next = config.shard_move.as_ref().and_then(|m| version(&m.to));
    let draining: Vec<String> = config.shard_move.iter().flat_map(|m| &m.draining).map(|s| s.name.clone()).collect();
    version(set).as_deref() == Some(library.table().version())
        && next.as_deref() == library.next().map(RoutingTable::version)
        && draining == library.draining
}

/// The library of `shards` (as [`open_shards`] returned them) under the config's routing.
pub fn library_of(config: &PlatformConfig, shards: Vec<Documents>) -> Result<Library, String> {
    match &config.shards {
        Some(set) => {
            let table = RoutingTable::build(set).map_err(|e| format!("ShardSet {}: {e}", set.shard_set))?;
            let next = match &config.shard_move {
                Some(moving) => Some(Arc::new(
                    RoutingTable::build(&moving.to).map_err(|e| format!("ShardSet {}: {e}", set.shard_set))?,
                )),
                None => None,
            };
            let draining: Vec<String> =
                config.shard_move.iter().flat_map(|m| &m.draining).map(|s| s.name.clone()).collect();
            let all = config.all_shards().len();
            if all != shards.len() {
                return Err(format!("ShardSet {} has {all} shards, not {}", set.shard_set, shards.len()));
            }
            Ok(Library::moving(Arc::new(table), next, draining, shards))
        }
        None => match <[Documents; 1]>::try_from(shards) {
            Ok([single]) => Ok(Library::single(single)),
            Err(shards) => Err(format!("{} metadata databases without a ShardSet", shards.len())),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use object_store::memory::InMemory;

    use super::*;
    use crate::blob::{Tier, once};
    use crate::crds::storage_tier::{Compression, TierClass};
    use crate::documents::NewDocument;

    /// A replica's connections to its shards stay within twice the one-database budget (16)
    /// as shards are added, at most 16 a shard and down to four.
    #[test]
    fn shards_share_the_connection_budget() {
        let budget: Vec<(usize, u32)> = [1, 2, 3, 4, 5, 8, 16].iter().map(|&n| (n, shard_connections(n))).collect();
        assert_eq!(budget, [(1, 16), (2, 16), (3, 10), (4, 8), (5, 6), (8, 4), (16, 4)]);
        assert_eq!(shard_connections(0), 16, "no ShardSet: the one database");
    }

    /// The defence behind the library's one choice of shard: a copy claimed in one database
    /// is never recorded in another, where nothing would keep the first's collector from
    /// deleting it.
    #[tokio::test]
    async fn a_copy_claimed_on_another_shard_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(InMemory::new());
        let tier = Tier::from_store("hot", TierClass::Hot, None, Compression::default(), store);
        let tiers = Tiers::new(vec![Arc::new(tier)], "hot").unwrap();
        let mut shards = Vec::new();
        for n in 0..2 {
            let url = format!("sqlite://{}", dir.path().join(format!("s{n}.db")).display());
            let meta = crate::store::Metadata::open(&url).await.unwrap();
            shards.push(Documents::new(meta, tiers.clone(), Clock::manual(1_000), None, 1 << 20));
        }
        let actor = Actor { user: "alice".into(), admin: false };
        let prepared = Documents::prepare(NewDocument { filename: "a.txt".into(), ..NewDocument::default() }).unwrap();
        let blob = shards[0].store_bytes("text/plain", once("claimed on shard 0")).await.unwrap();
        let refused = shards[1].record_upload(&actor, &prepared, blob.clone()).await;
        assert!(
            matches!(&refused, Err(DocError::Store(StoreError::Corrupt(m))) if m.contains("not claimed")),
            "{refused:?}"
        );
        // Recorded where it was claimed, it is kept.
        let blob = shards[0].store_bytes("text/plain", once("claimed on shard 0")).await.unwrap();
        shards[0].record_upload(&actor, &prepared, blob).await.unwrap();
    }
}
