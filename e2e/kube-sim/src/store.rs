//! The object store: every object in memory under one lock, one resource version counter
//! for the whole cluster (as etcd's revision), and a bounded history of changes that
//! watches resume from.
//!
//! The store applies the API server's object semantics: uid, creationTimestamp,
//! resourceVersion and generation (bumped on a change of the desired state only), status
//! subresource separation, optimistic concurrency, finalizers and `deletionTimestamp`,
//! garbage collection through ownerReferences (background, foreground, orphan) and
//! namespace termination.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::meta;
use crate::network::Network;
use crate::registry::{Registry, ResourceType};
use crate::status::ApiError;

/// How many changes the store remembers for watches to resume from.
const HISTORY: usize = 20_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Added,
    Modified,
    Deleted,
}

impl Change {
    pub fn name(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change, as watches see it.
#[derive(Clone, Debug)]
pub struct Event {
    pub rv: u64,
    /// The type's storage key (`group/plural`).
    pub key: String,
    pub namespace: String,
    pub change: Change,
    pub object: Arc<Value>,
    /// The object before the change (for selector transitions).
    pub old: Option<Arc<Value>>,
}

/// (type key, namespace, name)
type ObjKey = (String, String, String);

#[derive(Debug)]
struct State {
    rv: u64,
    registry: Registry,
    objects: BTreeMap<ObjKey, Value>,
    history: VecDeque<Event>,
    /// The newest resource version dropped from the history.
    compacted: u64,
}

/// How dependents of a deleted object are treated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Propagation {
    #[default]
    Background,
    Foreground,
    Orphan,
}

impl Propagation {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        match s {
            "Background" => Ok(Self::Background),
            "Foreground" => Ok(Self::Foreground),
            "Orphan" => Ok(Self::Orphan),
            other => Err(ApiError::bad_request(format!(
                "propagationPolicy: Unsupported value: \"{other}\": supported values: \"Foreground\", \"Background\", \"Orphan\""
            ))),
        }
    }
}

/// Preconditions and policy of a delete.
#[derive(Clone, Debug, Default)]
pub struct DeleteOptions {
    pub propagation: Propagation,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub dry_run: bool,
    /// `gracePeriodSeconds`: how long a pod's containers get to stop (`None`: the pod's own).
    pub grace_period: Option<i64>,
}

/// The shared store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Event>,
    network: Arc<Network>,
}

/// A watch's starting point: the changes it missed, then the live feed.
#[derive(Debug)]
pub struct Subscription {
    pub backlog: Vec<Event>,
    pub live: broadcast::Receiver<Event>,
    /// The store's resource version when subscribed.
    pub rv: u64,
}

const FOREGROUND: &str = "foregroundDeletion";
const ORPHAN: &str = "orphan";

fn spec_of(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(map) = o.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
        map.remove("kind");
        map.remove("apiVersion");
    }
    o
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        Self::with_network(Arc::new(Network::unreserved(1)))
    }

    /// A store whose Services take their cluster IPs from `network`.
    pub fn with_network(network: Arc<Network>) -> Self {
        let state = State {
            rv: 1,
            registry: Registry::default(),
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            compacted: 0,
        };
        let store = Self { state: Arc::new(Mutex::new(state)), events: broadcast::channel(65_536).0, network };
        let ns = store.registry().by_kind("v1", "Namespace").cloned().expect("namespaces are built in");
        for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let object = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
            store.create(&ns, "", object, false).expect("the initial namespaces are valid");
        }
        store
    }

    /// The addresses of this simulator's pods and Services.
    pub fn network(&self) -> &Arc<Network> {
        &self.network
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of the registry (types change only when CRDs do).
    pub fn registry(&self) -> Registry {
        self.lock().registry.clone()
    }

    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Subscribes to changes after `after` (`None`: from now on). `Err` when `after` is
    /// older than the history reaches.
    pub fn subscribe(&self, after: Option<u64>) -> Result<Subscription, ApiError> {
        let state = self.lock();
        let live = self.events.subscribe();
        let backlog = match after {
            None => Vec::new(),
            Some(rv) if rv < state.compacted => {
                return Err(ApiError::gone(format!("too old resource version: {rv} ({})", state.compacted + 1)));
            }
            Some(rv) => state.history.iter().filter(|e| e.rv > rv).cloned().collect(),
        };
        Ok(Subscription { backlog, live, rv: state.rv })
    }

    /// The objects of a type now and the changes after them, taken together so that none
    /// is missed or seen twice.
    pub fn list_and_subscribe(&self, t: &ResourceType, namespace: Option<&str>) -> (Vec<Value>, Subscription) {
        let state = self.lock();
        let live = self.events.subscribe();
        (items(&state, t, namespace), Subscription { backlog: Vec::new(), live, rv: state.rv })
    }

    pub fn get(&self, t: &ResourceType, namespace: &str, name: &str) -> Result<Value, ApiError> {
        let state = self.lock();
        let key = (t.key(), namespace.to_owned(), name.to_owned());
        state.objects.get(&key).map(|o| served(t, o)).ok_or_else(|| ApiError::not_found(t, name))
    }

    /// Every object of a type (in a namespace, or all), in key order, and the version the
    /// list is consistent at.
    pub fn list(&self, t: &ResourceType, namespace: Option<&str>) -> (Vec<Value>, u64) {
        let state = self.lock();
        (items(&state, t, namespace), state.rv)
    }

    pub fn create(
        &self,
        t: &ResourceType,
        namespace: &str,
        mut object: Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let mut state = self.lock();
        if !object.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        check_kind(t, &object)?;
        let generate = meta::str_at(&object, "/metadata/generateName").map(str::to_owned);
        let mut name = meta::name(&object).to_owned();
        if name.is_empty()
            && let Some(prefix) = &generate
        {
            name = format!("{prefix}{}", random_suffix());
        }
        if let Some(why) = meta::invalid_name(&name, t.kind == "Namespace") {
            return Err(ApiError::invalid(t, &name, &[("metadata.name".into(), why)]));
        }
        if t.namespaced {
            let given = meta::namespace(&object);
            if !given.is_empty() && given != namespace {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            let ns_key = ("/namespaces".to_owned(), String::new(), namespace.to_owned());
            match state.objects.get(&ns_key) {
                None => return Err(ApiError::namespace_not_found(namespace)),
                Some(ns) if meta::deleting(ns) => {
                    return Err(ApiError::new(
                        403,
                        "Forbidden",
                        format!(
                            "{} \"{name}\" is forbidden: unable to create new content in namespace {namespace} because it is being terminated",
                            t.qualified()
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        let key = (t.key(), if t.namespaced { namespace.to_owned() } else { String::new() }, name.clone());
        if state.objects.contains_key(&key) {
            return Err(ApiError::already_exists(t, &name));
        }
        if t.status_subresource
            && t.crd.is_some()
            && let Some(map) = object.as_object_mut()
        {
            map.remove("status");
        }
        let rv = state.rv + 1;
        {
            let m =
                meta::metadata_mut(&mut object).ok_or_else(|| ApiError::bad_request("metadata must be an object"))?;
            m.insert("name".into(), json!(name));
            if t.namespaced {
                m.insert("namespace".into(), json!(namespace));
            } else {
                m.remove("namespace");
            }
            m.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
            m.insert("creationTimestamp".into(), json!(meta::now()));
            m.insert("resourceVersion".into(), json!(rv.to_string()));
            m.remove("deletionTimestamp");
            m.remove("deletionGracePeriodSeconds");
            if t.has_spec {
                m.insert("generation".into(), json!(1));
            }
        }
        // After the server's metadata, which a kind's defaults may name (a Job's uid).
        let kind_hooks = hooks(&self.network, t, &mut object, None)?;
        if dry_run {
            return Ok(served(t, &object));
        }
        state.rv = rv;
        state.objects.insert(key.clone(), object.clone());
        self.emit(&mut state, &key, Change::Added, &object, None);
        kind_hooks.after(&mut state, &object);
        Ok(served(t, &object))
    }

    /// Replaces an object (the whole object, or only its status when `status` is set).
    /// `expected_rv` of `None` is an unconditional update.
    pub fn update(
        &self,
        t: &ResourceType,
        namespace: &str,
        name: &str,
        object: Value,
        status: bool,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let mut state = self.lock();
        self.update_locked(&mut state, t, namespace, name, object, status, dry_run)
    }

    /// Reads an object, lets `change` compute its new state, and writes it, under one lock
    /// (patches: never a conflict with a concurrent writer).
    pub fn modify(
        &self,
        t: &ResourceType,
        namespace: &str,
        name: &str,
        status: bool,
        dry_run: bool,
        change: impl FnOnce(Value) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        let mut state = self.lock();
        let key = (t.key(), scope(t, namespace), name.to_owned());
        let current = state.objects.get(&key).map(|o| served(t, o)).ok_or_else(|| ApiError::not_found(t, name))?;
        let rv = meta::resource_version(&current).to_owned();
        let mut next = change(current)?;
        // A patch that sets a resourceVersion asks for it as a precondition; one that does
        // not applies to the version it was computed from.
        if meta::resource_version(&next).is_empty()
            && let Some(m) = meta::metadata_mut(&mut next)
        {
            m.insert("resourceVersion".into(), json!(rv));
        }
        self.update_locked(&mut state, t, namespace, name, next, status, dry_run)
    }

    #[allow(clippy::too_many_arguments)]
    fn update_locked(
        &self,
        state: &mut State,
        t: &ResourceType,
        namespace: &str,
        name: &str,
        mut object: Value,
        status: bool,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        if !object.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        check_kind(t, &object)?;
        let body_name = meta::name(&object);
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let key = (t.key(), scope(t, namespace), name.to_owned());
        let current = state.objects.get(&key).cloned().ok_or_else(|| ApiError::not_found(t, name))?;
        let given_rv = meta::resource_version(&object);
        if !given_rv.is_empty() && given_rv != meta::resource_version(&current) {
            return Err(ApiError::conflict(
                t,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        if status {
            // Only the status changes.
            let new_status = object.get("status").cloned();
            object = current.clone();
            match new_status {
                Some(s) => object["status"] = s,
                None => {
                    if let Some(map) = object.as_object_mut() {
                        map.remove("status");
                    }
                }
            }
        } else if t.status_subresource {
            match current.get("status") {
                Some(s) => object["status"] = s.clone(),
                None => {
                    if let Some(map) = object.as_object_mut() {
                        map.remove("status");
                    }
                }
            }
        }
        let kind_hooks = hooks(&self.network, t, &mut object, Some(&current))?;
        let spec_changed = spec_of(&object) != spec_of(&current);
        // Metadata the server owns.
        {
            let m =
                meta::metadata_mut(&mut object).ok_or_else(|| ApiError::bad_request("metadata must be an object"))?;
            for field in
                ["name", "namespace", "uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds"]
            {
                match current.pointer(&format!("/metadata/{field}")) {
                    Some(v) => m.insert(field.into(), v.clone()),
                    None => m.remove(field),
                };
            }
            let generation = current.pointer("/metadata/generation").and_then(Value::as_i64);
            match generation {
                Some(g) if spec_changed => m.insert("generation".into(), json!(g + 1)),
                Some(g) => m.insert("generation".into(), json!(g)),
                None => m.remove("generation"),
            };
            m.insert("resourceVersion".into(), current["metadata"]["resourceVersion"].clone());
        }
        if meta::deleting(&current) {
            let before: HashSet<String> = meta::finalizers(&current).into_iter().collect();
            if let Some(added) = meta::finalizers(&object).into_iter().find(|f| !before.contains(f)) {
                return Err(ApiError::invalid(
                    t,
                    name,
                    &[(
                        "metadata.finalizers".into(),
                        format!(
                            "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers [\"{added}\"]"
                        ),
                    )],
                ));
            }
        }
        object["kind"] = json!(t.kind);
        object["apiVersion"] = json!(t.api_version());
        let mut stored_current = current.clone();
        stored_current["apiVersion"] = json!(t.api_version());
        if object == stored_current {
            return Ok(served(t, &current));
        }
        if dry_run {
            return Ok(served(t, &object));
        }
        state.rv += 1;
        object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        state.objects.insert(key.clone(), object.clone());
        self.emit(state, &key, Change::Modified, &object, Some(&current));
        kind_hooks.after(state, &object);
        self.collect(state);
        Ok(served(t, &object))
    }

    /// Deletes an object: at once without finalizers, else marks it with a
    /// `deletionTimestamp` and leaves it to the finalizers' owners. Returns the object as it
    /// was last (the deleted one, or the one now being deleted) and whether it is gone.
    pub fn delete(
        &self,
        t: &ResourceType,
        namespace: &str,
        name: &str,
        options: &DeleteOptions,
    ) -> Result<(Value, bool), ApiError> {
        let mut state = self.lock();
        let key = (t.key(), scope(t, namespace), name.to_owned());
        let current = state.objects.get(&key).cloned().ok_or_else(|| ApiError::not_found(t, name))?;
        if let Some(uid) = &options.uid
            && uid != meta::uid(&current)
        {
            return Err(ApiError::conflict(
                t,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta::uid(&current)
                ),
            ));
        }
        if let Some(rv) = &options.resource_version
            && rv != meta::resource_version(&current)
        {
            return Err(ApiError::conflict(
                t,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    meta::resource_version(&current)
                ),
            ));
        }
        if options.dry_run {
            return Ok((served(t, &current), false));
        }
        if let Some(grace) = pod_grace(t, &current, options) {
            // A pod on a node is deleted gracefully: marked, and removed by its kubelet once
            // its containers stopped (or at once with a grace period of 0).
            let mut object = current.clone();
            let marked = current.pointer("/metadata/deletionGracePeriodSeconds").and_then(Value::as_i64);
            if marked.is_none_or(|m| grace < m) {
                let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(grace);
                object["metadata"]["deletionTimestamp"] = json!(meta::format_time(at));
                object["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
                state.rv += 1;
                object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
                state.objects.insert(key.clone(), object.clone());
                self.emit(&mut state, &key, Change::Modified, &object, Some(&current));
            }
            return Ok((served(t, &object), false));
        }
        let mut finalizers = meta::finalizers(&current);
        match options.propagation {
            Propagation::Foreground
                if has_dependents(&state, meta::uid(&current)) && !finalizers.iter().any(|f| f == FOREGROUND) =>
            {
                finalizers.push(FOREGROUND.into());
            }
            Propagation::Orphan
                if has_dependents(&state, meta::uid(&current)) && !finalizers.iter().any(|f| f == ORPHAN) =>
            {
                finalizers.push(ORPHAN.into());
            }
            _ => {}
        }
        let namespace_finalizers = t.kind == "Namespace"
            && current.pointer("/spec/finalizers").and_then(Value::as_array).is_some_and(|f| !f.is_empty());
        if finalizers.is_empty() && !namespace_finalizers {
            self.remove(&mut state, &key);
            self.collect(&mut state);
            return Ok((served(t, &current), true));
        }
        let mut object = current.clone();
        meta::set_finalizers(&mut object, &finalizers);
        if !meta::deleting(&object) {
            object["metadata"]["deletionTimestamp"] = json!(meta::now());
            object["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            if t.kind == "Namespace" {
                object["status"] = json!({"phase": "Terminating"});
            }
        }
        if object != current {
            state.rv += 1;
            object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
            state.objects.insert(key.clone(), object.clone());
            self.emit(&mut state, &key, Change::Modified, &object, Some(&current));
        }
        self.collect(&mut state);
        let gone = !state.objects.contains_key(&key);
        Ok((served(t, &object), gone))
    }

    fn remove(&self, state: &mut State, key: &ObjKey) {
        if let Some(object) = state.objects.remove(key) {
            if key.0 == "/services"
                && let Some(Ok(ip)) = meta::str_at(&object, "/spec/clusterIP").map(str::parse)
            {
                self.network.release(ip);
            }
            state.rv += 1;
            let mut gone = object.clone();
            gone["metadata"]["resourceVersion"] = json!(state.rv.to_string());
            self.emit(state, key, Change::Deleted, &gone, Some(&object));
            if key.0 == "apiextensions.k8s.io/customresourcedefinitions" {
                state.registry.remove_crd(&key.2);
                let (plural, group) = key.2.split_once('.').unwrap_or((&key.2, ""));
                let prefix = format!("{group}/{plural}");
                let owned: Vec<ObjKey> = state.objects.keys().filter(|k| k.0 == prefix).cloned().collect();
                for k in owned {
                    self.remove(state, &k);
                }
            }
        }
    }

    fn emit(&self, state: &mut State, key: &ObjKey, change: Change, object: &Value, old: Option<&Value>) {
        let event = Event {
            rv: state.rv,
            key: key.0.clone(),
            namespace: key.1.clone(),
            change,
            object: Arc::new(object.clone()),
            old: old.map(|o| Arc::new(o.clone())),
        };
        state.history.push_back(event.clone());
        while state.history.len() > HISTORY {
            if let Some(dropped) = state.history.pop_front() {
                state.compacted = dropped.rv;
            }
        }
        // No receiver is not an error: nobody watches.
        let _ = self.events.send(event);
    }

    /// The namespace controller's pass: terminating namespaces are emptied (their objects
    /// deleted, finalizers honoured) and go once empty. The simulator runs it a moment after
    /// changes, as a real cluster's controller does, not within the delete request.
    pub fn terminate_namespaces(&self) {
        let mut state = self.lock();
        let terminating = state.objects.iter().any(|(k, o)| k.0 == "/namespaces" && meta::deleting(o));
        if terminating {
            self.collect_with(&mut state, true);
        }
    }

    fn collect(&self, state: &mut State) {
        self.collect_with(state, false);
    }

    /// The garbage collector, run to a fixed point after every change: dependents whose
    /// owners are all gone are deleted, foreground deletions wait for their dependents,
    /// orphaning strips owner references, and objects being deleted whose finalizers are
    /// all removed go; with `namespaces`, terminating namespaces are emptied too.
    fn collect_with(&self, state: &mut State, namespaces: bool) {
        for _ in 0..64 {
            let mut changed = false;
            // Indexed once a pass (a change in it makes another pass): looking owners up
            // object by object made every write quadratic in the number of objects.
            let uids: HashSet<String> = state.objects.values().map(|o| meta::uid(o).to_owned()).collect();
            let foreground: HashSet<String> = state
                .objects
                .values()
                .filter(|o| meta::deleting(o) && meta::finalizers(o).iter().any(|f| f == FOREGROUND))
                .map(|o| meta::uid(o).to_owned())
                .collect();
            let keys: Vec<ObjKey> = state.objects.keys().cloned().collect();
            for key in keys {
                let Some(current) = state.objects.get(&key) else { continue };
                let owners = meta::owner_uids(current);
                let owner_deleting_foreground = owners.iter().any(|u| foreground.contains(u));
                let terminating_namespace = namespaces
                    && !key.1.is_empty()
                    && state
                        .objects
                        .get(&("/namespaces".to_owned(), String::new(), key.1.clone()))
                        .is_none_or(meta::deleting);
                let orphaned = !owners.is_empty() && owners.iter().all(|u| !uids.contains(u));
                let collect = orphaned || owner_deleting_foreground || terminating_namespace;
                if !collect && !meta::deleting(current) {
                    // Nothing to collect and nothing being deleted: no copy.
                    continue;
                }
                let object = current.clone();
                if collect && !meta::deleting(&object) {
                    let mut next = object.clone();
                    if meta::finalizers(&next).is_empty() {
                        self.remove(state, &key);
                    } else {
                        next["metadata"]["deletionTimestamp"] = json!(meta::now());
                        self.store_change(state, &key, next, &object);
                    }
                    changed = true;
                    continue;
                }
                if !meta::deleting(&object) {
                    continue;
                }
                let uid = meta::uid(&object).to_owned();
                let mut finalizers = meta::finalizers(&object);
                if finalizers.iter().any(|f| f == FOREGROUND) && !has_dependents(state, &uid) {
                    finalizers.retain(|f| f != FOREGROUND);
                }
                if finalizers.iter().any(|f| f == ORPHAN) {
                    let dependents: Vec<ObjKey> = state
                        .objects
                        .iter()
                        .filter(|(_, o)| meta::owner_uids(o).contains(&uid))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for d in dependents {
                        if let Some(dep) = state.objects.get(&d).cloned() {
                            let mut next = dep.clone();
                            if let Some(refs) =
                                next.pointer_mut("/metadata/ownerReferences").and_then(Value::as_array_mut)
                            {
                                refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid.as_str()));
                                if refs.is_empty()
                                    && let Some(m) = meta::metadata_mut(&mut next)
                                {
                                    m.remove("ownerReferences");
                                }
                            }
                            self.store_change(state, &d, next, &dep);
                        }
                    }
                    finalizers.retain(|f| f != ORPHAN);
                }
                let mut next = object.clone();
                if key.0 == "/namespaces" && namespaces {
                    let empty = !state.objects.keys().any(|k| k.1 == key.2);
                    if empty && next.pointer("/spec/finalizers").is_some() {
                        next["spec"]["finalizers"] = json!([]);
                    }
                }
                meta::set_finalizers(&mut next, &finalizers);
                let namespace_done =
                    next.pointer("/spec/finalizers").and_then(Value::as_array).is_none_or(Vec::is_empty);
                if finalizers.is_empty() && namespace_done {
                    self.remove(state, &key);
                    changed = true;
                } else if next != object {
                    self.store_change(state, &key, next, &object);
                    changed = true;
                }
            }
            if !changed {
                return;
            }
        }
    }

    fn store_change(&self, state: &mut State, key: &ObjKey, mut next: Value, old: &Value) {
        state.rv += 1;
        next["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        state.objects.insert(key.clone(), next.clone());
        self.emit(state, key, Change::Modified, &next, Some(old));
    }
}

/// Every object of a type (in a namespace, or all), in key order, as served.
fn items(state: &State, t: &ResourceType, namespace: Option<&str>) -> Vec<Value> {
    state
        .objects
        .iter()
        .filter(|((k, ns, _), _)| *k == t.key() && namespace.is_none_or(|n| n == ns))
        .map(|(_, o)| served(t, o))
        .collect()
}

fn has_dependents(state: &State, uid: &str) -> bool {
    state.objects.values().any(|o| meta::owner_uids(o).iter().any(|u| u == uid))
}

fn scope(t: &ResourceType, namespace: &str) -> String {
    if t.namespaced { namespace.to_owned() } else { String::new() }
}

/// The object as served at this type's version.
pub fn served(t: &ResourceType, object: &Value) -> Value {
    let mut o = object.clone();
    o["apiVersion"] = json!(t.api_version());
    o["kind"] = json!(t.kind);
    o
}

fn check_kind(t: &ResourceType, object: &Value) -> Result<(), ApiError> {
    let kind = meta::str_at(object, "/kind").unwrap_or(&t.kind);
    if kind != t.kind {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({kind}) does not match the expected kind ({})",
            t.kind
        )));
    }
    let api_version = meta::str_at(object, "/apiVersion").map_or_else(|| t.api_version(), str::to_owned);
    if api_version != t.api_version() {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) does not match the expected API version ({})",
            t.api_version()
        )));
    }
    Ok(())
}

/// The grace period of a pod deletion that must wait for its kubelet, if this one must: the
/// pod is bound to a node, has not finished, and the period is not zero.
fn pod_grace(t: &ResourceType, pod: &Value, options: &DeleteOptions) -> Option<i64> {
    if t.kind != "Pod" || !t.group.is_empty() {
        return None;
    }
    let bound = meta::str_at(pod, "/spec/nodeName").is_some_and(|n| !n.is_empty());
    let finished = matches!(meta::str_at(pod, "/status/phase"), Some("Succeeded" | "Failed"));
    let grace = options
        .grace_period
        .or_else(|| pod.pointer("/spec/terminationGracePeriodSeconds").and_then(Value::as_i64))
        .unwrap_or(30)
        .max(0);
    (bound && !finished && grace > 0).then_some(grace)
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let bytes = uuid::Uuid::new_v4();
    bytes.as_bytes().iter().take(5).map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char).collect()
}

/// What a kind needs beyond generic storage, decided before a write and done after it.
#[derive(Debug, Default)]
struct KindHooks {
    /// A CRD whose types must be (re)registered.
    crd: Option<Vec<ResourceType>>,
}

impl KindHooks {
    fn after(self, state: &mut State, object: &Value) {
        if let Some(types) = self.crd {
            state.registry.set_crd(meta::name(object), types);
        }
    }
}

/// Kind-specific checks and defaults before a write.
fn hooks(
    network: &Network,
    t: &ResourceType,
    object: &mut Value,
    current: Option<&Value>,
) -> Result<KindHooks, ApiError> {
    let mut hooks = KindHooks::default();
    match (t.group.as_str(), t.kind.as_str()) {
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            let types = crate::registry::from_crd(object)
                .map_err(|why| ApiError::invalid(t, meta::name(object), &[("spec".into(), why)]))?;
            let names = object.pointer("/spec/names").cloned().unwrap_or_default();
            object["status"] = json!({
                "acceptedNames": names,
                "storedVersions": types.iter().filter(|v| v.crd.as_ref().is_some_and(|c| c.storage)).map(|v| v.version.clone()).collect::<Vec<_>>(),
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": meta::now()},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": meta::now()},
                ],
            });
            hooks.crd = Some(types);
        }
        ("", "Service") => {
            let name = meta::name(object).to_owned();
            if let Some(spec) = object.get_mut("spec").filter(|s| s.is_object()) {
                let old = current.and_then(|c| meta::str_at(c, "/spec/clusterIP")).map(str::to_owned);
                let given = spec.get("clusterIP").and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned);
                let ip = match (old, given) {
                    (Some(old), Some(new)) if old != new => {
                        return Err(ApiError::invalid(
                            t,
                            &name,
                            &[(
                                "spec.clusterIPs[0]".into(),
                                format!("Invalid value: []string{{\"{new}\"}}: may not change once set"),
                            )],
                        ));
                    }
                    // An update that leaves the address out keeps it, as on a real server.
                    (Some(old), _) => old,
                    (None, Some(given)) => {
                        if let Ok(ip) = given.parse() {
                            network.claim(ip);
                        }
                        given
                    }
                    (None, None) => network.service_ip().to_string(),
                };
                spec["clusterIPs"] = json!([ip]);
                spec["clusterIP"] = json!(ip);
                if spec.get("type").is_none() {
                    spec["type"] = json!("ClusterIP");
                }
            }
        }
        ("batch", "CronJob") => crate::jobs::admit_cronjob(t, object)?,
        // A Job's selector and template labels are set once, when it is created.
        ("batch", "Job") if current.is_none() => crate::jobs::admit_job(t, object)?,
        ("", "Namespace") => {
            if object.pointer("/spec/finalizers").is_none() {
                object["spec"] = json!({"finalizers": ["kubernetes"]});
            }
            if object.pointer("/status/phase").is_none() {
                object["status"] = json!({"phase": "Active"});
            }
        }
        _ => {}
    }
    Ok(hooks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_and(kind: &str) -> (Store, ResourceType) {
        let store = Store::new();
        let api_version = if kind == "Deployment" { "apps/v1" } else { "v1" };
        let t = store.registry().by_kind(api_version, kind).cloned().unwrap();
        (store, t)
    }

    fn cm(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"a": "1"}})
    }

    #[test]
    fn create_sets_server_metadata_and_refuses_duplicates_and_missing_namespaces() {
        let (store, t) = store_and("ConfigMap");
        let created = store.create(&t, "default", cm("one"), false).unwrap();
        assert_eq!(created["metadata"]["namespace"], "default");
        assert!(!meta::uid(&created).is_empty());
        assert!(created["metadata"].get("generation").is_none(), "config maps have no generation");
        assert_eq!(store.create(&t, "default", cm("one"), false).unwrap_err().code, 409);
        assert_eq!(store.create(&t, "nowhere", cm("two"), false).unwrap_err().code, 404);
        let generated =
            store.create(&t, "default", json!({"metadata": {"generateName": "gen-"}, "data": {}}), false).unwrap();
        assert!(meta::name(&generated).starts_with("gen-") && meta::name(&generated).len() == 9);
        assert_eq!(store.create(&t, "default", cm("Bad_Name"), false).unwrap_err().code, 422);
    }

    #[test]
    fn updates_conflict_on_stale_versions_and_bump_generation_on_spec_only() {
        let (store, t) = store_and("Deployment");
        let d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
                       "spec": {"replicas": 1}, "status": {"replicas": 5}});
        let created = store.create(&t, "default", d, false).unwrap();
        assert_eq!(created["metadata"]["generation"], 1);
        assert_eq!(created.get("status"), Some(&json!({"replicas": 5})), "built-in create keeps status");
        let mut changed = created.clone();
        changed["spec"]["replicas"] = json!(3);
        changed["status"] = json!({"replicas": 9});
        let updated = store.update(&t, "default", "web", changed.clone(), false, false).unwrap();
        assert_eq!(updated["metadata"]["generation"], 2);
        assert_eq!(updated["status"]["replicas"], 5, "status is a subresource");
        assert_eq!(store.update(&t, "default", "web", changed, false, false).unwrap_err().code, 409, "stale");
        let mut labelled = updated.clone();
        labelled["metadata"]["labels"] = json!({"a": "b"});
        let relabelled = store.update(&t, "default", "web", labelled, false, false).unwrap();
        assert_eq!(relabelled["metadata"]["generation"], 2, "metadata is not spec");
        let mut status = relabelled.clone();
        status["status"] = json!({"readyReplicas": 3});
        status["spec"]["replicas"] = json!(100);
        let after = store.update(&t, "default", "web", status, true, false).unwrap();
        assert_eq!(after["status"]["readyReplicas"], 3);
        assert_eq!(after["spec"]["replicas"], 3, "a status write changes only status");
        // A write that changes nothing keeps the version.
        let same = store.update(&t, "default", "web", after.clone(), false, false).unwrap();
        assert_eq!(meta::resource_version(&same), meta::resource_version(&after));
    }

    #[test]
    fn finalizers_hold_deletion_until_removed() {
        let (store, t) = store_and("ConfigMap");
        let mut held = cm("held");
        held["metadata"]["finalizers"] = json!(["example.com/cleanup"]);
        store.create(&t, "default", held, false).unwrap();
        let (marked, gone) = store.delete(&t, "default", "held", &DeleteOptions::default()).unwrap();
        assert!(!gone && meta::deleting(&marked));
        let mut adding = marked.clone();
        adding["metadata"]["finalizers"] = json!(["example.com/cleanup", "another"]);
        assert_eq!(store.update(&t, "default", "held", adding, false, false).unwrap_err().code, 422);
        let mut released = marked;
        released["metadata"]["finalizers"] = json!([]);
        store.update(&t, "default", "held", released, false, false).unwrap();
        assert_eq!(store.get(&t, "default", "held").unwrap_err().code, 404);
    }

    #[test]
    fn garbage_collection_background_foreground_orphan_and_namespaces() {
        let (store, t) = store_and("ConfigMap");
        let owner = store.create(&t, "default", cm("owner"), false).unwrap();
        let dependent = |name: &str| {
            let mut o = cm(name);
            o["metadata"]["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
                "uid": meta::uid(&owner), "blockOwnerDeletion": true}]);
            o
        };
        store.create(&t, "default", dependent("child"), false).unwrap();
        store.delete(&t, "default", "owner", &DeleteOptions::default()).unwrap();
        assert_eq!(store.get(&t, "default", "child").unwrap_err().code, 404, "background");

        let owner = store.create(&t, "default", cm("owner"), false).unwrap();
        let mut child = dependent("child");
        child["metadata"]["ownerReferences"][0]["uid"] = json!(meta::uid(&owner));
        child["metadata"]["finalizers"] = json!(["example.com/slow"]);
        store.create(&t, "default", child, false).unwrap();
        let foreground = DeleteOptions { propagation: Propagation::Foreground, ..DeleteOptions::default() };
        let (_, gone) = store.delete(&t, "default", "owner", &foreground).unwrap();
        assert!(!gone, "the owner waits for its dependents");
        let child = store.get(&t, "default", "child").unwrap();
        assert!(meta::deleting(&child));
        let mut release = child;
        release["metadata"]["finalizers"] = json!([]);
        store.update(&t, "default", "child", release, false, false).unwrap();
        assert_eq!(store.get(&t, "default", "owner").unwrap_err().code, 404, "then goes itself");

        let owner = store.create(&t, "default", cm("owner"), false).unwrap();
        let mut child = dependent("child");
        child["metadata"]["ownerReferences"][0]["uid"] = json!(meta::uid(&owner));
        store.create(&t, "default", child, false).unwrap();
        let orphan = DeleteOptions { propagation: Propagation::Orphan, ..DeleteOptions::default() };
        store.delete(&t, "default", "owner", &orphan).unwrap();
        let child = store.get(&t, "default", "child").unwrap();
        assert!(child["metadata"].get("ownerReferences").is_none(), "orphaned: {child}");

        let ns_type = store.registry().by_kind("v1", "Namespace").cloned().unwrap();
        store.create(&ns_type, "", json!({"metadata": {"name": "team"}}), false).unwrap();
        store.create(&t, "team", cm("inside"), false).unwrap();
        let (_, gone) = store.delete(&ns_type, "", "team", &DeleteOptions::default()).unwrap();
        assert!(!gone, "a namespace terminates in the background");
        assert!(store.get(&t, "team", "inside").is_ok());
        assert_eq!(store.create(&t, "team", cm("new"), false).unwrap_err().code, 403, "no new content");
        store.terminate_namespaces();
        assert_eq!(store.get(&t, "team", "inside").unwrap_err().code, 404);
        assert_eq!(store.get(&ns_type, "", "team").unwrap_err().code, 404, "then the namespace goes");
    }

    #[test]
    fn watches_resume_from_history_and_crds_serve_types() {
        let (store, t) = store_and("ConfigMap");
        let before = store.resource_version();
        store.create(&t, "default", cm("a"), false).unwrap();
        let sub = store.subscribe(Some(before)).unwrap();
        assert_eq!(sub.backlog.len(), 1);
        assert_eq!(sub.backlog[0].change, Change::Added);

        let crd_type =
            store.registry().by_kind("apiextensions.k8s.io/v1", "CustomResourceDefinition").cloned().unwrap();
        let crd = json!({"metadata": {"name": "widgets.example.com"}, "spec": {"group": "example.com",
            "scope": "Namespaced", "names": {"plural": "widgets", "kind": "Widget"},
            "versions": [{"name": "v1", "served": true, "storage": true}]}});
        let created = store.create(&crd_type, "", crd, false).unwrap();
        assert_eq!(created["status"]["conditions"][1]["type"], "Established");
        let widget = store.registry().find("example.com", "v1", "widgets").cloned().unwrap();
        store.create(&widget, "default", json!({"metadata": {"name": "w"}, "spec": {}}), false).unwrap();
        store.delete(&crd_type, "", "widgets.example.com", &DeleteOptions::default()).unwrap();
        assert!(store.registry().find("example.com", "v1", "widgets").is_none());
        assert_eq!(store.list(&widget, None).0.len(), 0, "its objects went with it");
    }
}
