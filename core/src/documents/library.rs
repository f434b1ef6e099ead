//! Every metadata shard's documents behind one routing table: a document id or an upload
//! session id reaches its shard without a lookup, new documents land where the routing
//! sends them, and listings ask every shard and merge the answers in the listing's order.

use std::sync::Arc;

use futures::future::try_join_all;

use super::{Actor, DocError, Documents, ListQuery, Page, Usage, page_limit, page_of, random_document_id};
use crate::blob::Tiers;
use crate::clock::Clock;
use crate::config::{PlatformConfig, SecretBundle};
use crate::routing::RoutingTable;
use crate::store::{Metadata, StoreError};

/// The documents of a platform, on one shard or several.
#[derive(Clone, Debug)]
pub struct Library {
    table: Arc<RoutingTable>,
    shards: Vec<Documents>,
}

impl Library {
    /// One database holding everything.
    pub fn single(docs: Documents) -> Self {
        Self { table: Arc::new(RoutingTable::single("main")), shards: vec![docs] }
    }

    /// The shards of `table`, in its order; they share the first one's tiers.
    ///
    /// # Panics
    /// When `shards` does not hold exactly one database per shard of the table.
    pub fn sharded(table: Arc<RoutingTable>, shards: Vec<Documents>) -> Self {
        assert_eq!(table.len(), shards.len(), "one database per shard of the routing table");
        let first = shards[0].clone();
        let shards = shards
            .into_iter()
            .enumerate()
            .map(|(index, docs)| docs.sharing_tiers_with(&first).placed(Arc::clone(&table), index))
            .collect();
        Self { table, shards }
    }

    pub fn table(&self) -> &RoutingTable {
        &self.table
    }

    /// The first shard: where records that belong to no document are kept (webhook
    /// deliveries, retention runs).
    pub fn primary(&self) -> &Documents {
        &self.shards[0]
    }

    /// Every shard, in the routing table's order.
    pub fn shards(&self) -> &[Documents] {
        &self.shards
    }

    /// The shard holding document `id`.
    pub fn of(&self, id: i64) -> &Documents {
        &self.shards[self.table.shard_of_id(id)]
    }

    /// The shard holding the upload session `id`.
    pub fn of_session(&self, id: &str) -> &Documents {
        &self.shards[self.table.shard_of_key(id)]
    }

    /// The shard a new document goes to: where the routing sends a random id, so that
    /// shards fill in proportion to their share of the routing.
    pub fn for_new(&self) -> &Documents {
        self.of(random_document_id())
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
        let answers = try_join_all(self.shards.iter().map(|shard| shard.list_keyed(actor, query))).await?;
        let mut more = false;
        let mut items = Vec::with_capacity(limit * 2);
        for (page, more_here) in answers {
            more |= more_here;
            items.extend(page);
        }
        items.sort_by(|(a_at, a), (b_at, b)| b_at.cmp(a_at).then(b.id.cmp(&a.id)));
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

/// The metadata databases of a platform, opened (and migrated): every shard of the
/// config's ShardSet in its order (the first holds what belongs to no document), or
/// `database_url` alone when there is no ShardSet.
pub async fn open_shards(
    config: &PlatformConfig,
    secrets: &SecretBundle,
    database_url: &str,
) -> Result<Vec<Metadata>, String> {
    let Some(set) = &config.shards else {
        return Ok(vec![
            Metadata::open(database_url).await.map_err(|e| format!("opening the metadata database: {e}"))?,
        ]);
    };
    let opens = set.shards.iter().map(|shard| async move {
        let url = secrets.get(&shard.url).and_then(|v| v.expose_str()).ok_or_else(|| {
            format!("the URL of shard {} is missing or not UTF-8 (Secret key {})", shard.name, shard.url)
        })?;
        Metadata::open(url).await.map_err(|e| format!("opening metadata shard {}: {e}", shard.name))
    });
    try_join_all(opens).await
}

/// Hands each shard's pool its URL from a reloaded Secret, so that rotated database
/// credentials are used from the next connection on, without a restart. Returns what could
/// not be applied, one message per shard (never quoting a URL). Without a ShardSet the one
/// database's URL comes from the command line and is left alone.
pub fn rotate_credentials(shards: &[Metadata], config: &PlatformConfig, secrets: &SecretBundle) -> Vec<String> {
    let Some(set) = &config.shards else { return Vec::new() };
    let mut problems = Vec::new();
    for (shard, meta) in set.shards.iter().zip(shards) {
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

/// The library of `shards` (as [`open_shards`] returned them) under the config's routing.
pub fn library_of(config: &PlatformConfig, shards: Vec<Documents>) -> Result<Library, String> {
    match &config.shards {
        Some(set) => {
            let table = RoutingTable::build(set).map_err(|e| format!("ShardSet {}: {e}", set.shard_set))?;
            if table.len() != shards.len() {
                return Err(format!("ShardSet {} has {} shards, not {}", set.shard_set, table.len(), shards.len()));
            }
            Ok(Library::sharded(Arc::new(table), shards))
        }
        None => match <[Documents; 1]>::try_from(shards) {
            Ok([single]) => Ok(Library::single(single)),
            Err(shards) => Err(format!("{} metadata databases without a ShardSet", shards.len())),
        },
    }
}
