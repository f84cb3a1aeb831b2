//! kube-rs itself against the test API: lists, watchers, faults, events.
//!
//! Every test runs under [`bounded`], so a protocol bug shows up as a failure naming the
//! step that hung rather than as a hung test run.
use std::{collections::BTreeMap, future::Future, time::Duration};

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, PodSpec, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
    runtime::{WatchStreamExt, watcher},
};
use nodeplane_testapi::TestApi;
use serde_json::json;

const STEP: Duration = Duration::from_secs(10);

async fn bounded<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(Duration::from_secs(60), test)
        .await
        .expect("the test finished within 60s");
}

fn meta(ns: Option<&str>, name: &str, labels: &[(&str, &str)]) -> kube::api::ObjectMeta {
    kube::api::ObjectMeta {
        name: Some(name.into()),
        namespace: ns.map(Into::into),
        labels: Some(
            labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect::<BTreeMap<_, _>>(),
        )
        .filter(|l| !l.is_empty()),
        ..Default::default()
    }
}

fn svc(ns: &str, name: &str, labels: &[(&str, &str)]) -> Service {
    Service { metadata: meta(Some(ns), name, labels), ..Default::default() }
}

fn node(name: &str) -> Node {
    Node { metadata: meta(None, name, &[]), ..Default::default() }
}

/// A watcher event as `"Kind(ns/name)"`, for comparing sequences.
fn describe<K: Resource>(event: &watcher::Event<K>) -> String {
    let key = |o: &K| match o.meta().namespace.as_deref() {
        Some(ns) => format!("{ns}/{}", o.meta().name.as_deref().unwrap_or_default()),
        None => o.meta().name.clone().unwrap_or_default(),
    };
    match event {
        watcher::Event::Init => "Init".into(),
        watcher::Event::InitApply(o) => format!("InitApply({})", key(o)),
        watcher::Event::InitDone => "InitDone".into(),
        watcher::Event::Apply(o) => format!("Apply({})", key(o)),
        watcher::Event::Delete(o) => format!("Delete({})", key(o)),
    }
}

async fn next<S, T>(stream: &mut S, what: &str) -> T
where
    S: Stream<Item = T> + Unpin,
{
    tokio::time::timeout(STEP, stream.next())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap_or_else(|| panic!("the stream ended while waiting for {what}"))
}

/// The next `n` successful watcher events, described; errors are skipped.
async fn events<K, S>(stream: &mut S, n: usize) -> Vec<String>
where
    K: Resource,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Unpin,
{
    let mut out = Vec::new();
    while out.len() < n {
        if let Ok(event) = next(stream, &format!("event {} after {out:?}", out.len() + 1)).await {
            out.push(describe(&event));
        }
    }
    out
}

/// Drives `stream` on its own task, so the watcher keeps running while the test waits on
/// something else.
fn spawned<S>(stream: S) -> futures::channel::mpsc::UnboundedReceiver<S::Item>
where
    S: Stream + Send + 'static,
    S::Item: Send,
{
    let (tx, rx) = futures::channel::mpsc::unbounded();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            if tx.unbounded_send(item).is_err() {
                break;
            }
        }
    });
    rx
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    tokio::time::timeout(STEP, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

fn api_code(e: &kube::Error) -> u16 {
    match e {
        kube::Error::Api(status) => status.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn list_pages_across_continue_tokens() {
    bounded(async {
        let api = TestApi::start().await.unwrap();
        for (ns, name) in [("b", "s1"), ("a", "s2"), ("a", "s1"), ("c", "s0"), ("b", "s0")] {
            api.apply(&svc(ns, name, &[]));
        }
        let services: Api<Service> = Api::all(api.client().await);
        let mut params = ListParams::default().limit(2);
        let mut names = Vec::new();
        let mut pages = 0;
        let mut rvs = Vec::new();
        loop {
            let page = services.list(&params).await.unwrap();
            pages += 1;
            rvs.push(page.metadata.resource_version.clone().unwrap());
            names.extend(
                page.items.iter().map(|s| format!("{}/{}", s.namespace().unwrap(), s.name_any())),
            );
            // Objects changed mid-list do not show: every page reads the first page's snapshot.
            api.apply(&svc("a", "s9", &[]));
            match page.metadata.continue_ {
                Some(token) if !token.is_empty() => params = params.continue_token(&token),
                _ => break,
            }
        }
        assert_eq!(names, ["a/s1", "a/s2", "b/s0", "b/s1", "c/s0"]);
        assert_eq!(pages, 3);
        assert!(rvs.iter().all(|rv| *rv == rvs[0]), "one snapshot resourceVersion: {rvs:?}");
        let stats = api.stats();
        assert_eq!((stats.list_count("services"), stats.list_page_count("services")), (1, 3));

        // The server's cap wins over the client's limit; namespaced lists stay in their namespace.
        api.set_max_page(1);
        let in_a: Api<Service> = Api::namespaced(api.client().await, "a");
        let page = in_a.list(&ListParams::default().limit(500)).await.unwrap();
        assert_eq!(page.items.len(), 1);
        assert!(page.metadata.continue_.is_some());
        api.set_max_page(0);
        let all_a = in_a.list(&ListParams::default()).await.unwrap();
        assert_eq!(
            all_a.items.iter().map(ResourceExt::name_any).collect::<Vec<_>>(),
            ["s1", "s2", "s9"]
        );

        // A continue token from before a compaction is 410 Gone.
        let first = services.list(&ListParams::default().limit(1)).await.unwrap();
        api.compact();
        let token = first.metadata.continue_.unwrap();
        let err = services
            .list(&ListParams::default().limit(1).continue_token(&token))
            .await
            .unwrap_err();
        assert_eq!(api_code(&err), 410);
        assert_eq!(api.stats().gone, 1);
    })
    .await;
}

#[tokio::test]
async fn watcher_lists_then_watches() {
    bounded(async {
        let api = TestApi::start().await.unwrap();
        api.apply(&svc("ns", "a", &[]));
        api.apply(&svc("ns", "b", &[]));
        let services: Api<Service> = Api::all(api.client().await);
        let mut stream = spawned(watcher(services, watcher::Config::default().page_size(1)));
        assert_eq!(
            events(&mut stream, 4).await,
            ["Init", "InitApply(ns/a)", "InitApply(ns/b)", "InitDone"]
        );
        api.apply(&svc("ns", "c", &[]));
        let rv = api.apply(&svc("ns", "a", &[("x", "y")]));
        assert!(api.delete::<Service>(Some("ns"), "b"));
        assert!(!api.delete::<Service>(Some("ns"), "b"), "already gone");
        let mut seen = Vec::new();
        while seen.len() < 3 {
            match next(&mut stream, "live changes").await.unwrap() {
                watcher::Event::Apply(s) if s.name_any() == "a" => {
                    assert_eq!(s.resource_version(), Some(rv.to_string()));
                    assert_eq!(s.labels().get("x").map(String::as_str), Some("y"));
                    seen.push("Apply(ns/a)".to_owned());
                }
                e => seen.push(describe(&e)),
            }
        }
        assert_eq!(seen, ["Apply(ns/c)", "Apply(ns/a)", "Delete(ns/b)"]);
        let stats = api.stats();
        assert_eq!(stats.list_count("services"), 1);
        assert_eq!(stats.list_page_count("services"), 2, "page_size 1 over two objects");
        assert_eq!(stats.watch_count("services"), 1);
    })
    .await;
}

type ServiceEvents =
    futures::channel::mpsc::UnboundedReceiver<Result<watcher::Event<Service>, watcher::Error>>;

/// A server holding Service `ns/a` and a watcher (with kube's default backoff) that has
/// listed it and has its watch open.
async fn watching_one_service() -> (TestApi, Api<Service>, ServiceEvents) {
    let api = TestApi::start().await.unwrap();
    api.apply(&svc("ns", "a", &[]));
    let services: Api<Service> = Api::all(api.client().await);
    let mut stream =
        spawned(watcher(services.clone(), watcher::Config::default()).default_backoff());
    assert_eq!(events(&mut stream, 3).await, ["Init", "InitApply(ns/a)", "InitDone"]);
    wait_until("the watch is open", || api.stats().watch_count("services") == 1).await;
    (api, services, stream)
}

#[tokio::test]
async fn dropped_connections_resume_without_a_relist() {
    bounded(async {
        // The watch is open, so the drop cuts an open stream.
        let (api, _, mut stream) = watching_one_service().await;
        api.drop_connections();
        api.apply(&svc("ns", "b", &[]));
        assert_eq!(events(&mut stream, 1).await, ["Apply(ns/b)"]);
        let stats = api.stats();
        assert_eq!(stats.list_count("services"), 1, "resumed from its resourceVersion");
        assert_eq!(stats.watch_count("services"), 2);
    })
    .await;
}

#[tokio::test]
async fn compaction_forces_a_relist_that_drops_silent_deletes() {
    bounded(async {
        let api = TestApi::start().await.unwrap();
        api.apply(&svc("ns", "a", &[]));
        api.apply(&svc("ns", "b", &[]));
        let services: Api<Service> = Api::all(api.client().await);
        let mut stream = spawned(watcher(services, watcher::Config::default()));
        assert_eq!(
            events(&mut stream, 4).await,
            ["Init", "InitApply(ns/a)", "InitApply(ns/b)", "InitDone"]
        );
        wait_until("the watch is open", || api.stats().watch_count("services") == 1).await;
        assert!(api.delete_silently::<Service>(Some("ns"), "a"));
        api.compact();
        api.drop_connections();
        // The resumed watch gets an ERROR 410 event, which the watcher reports, then relists.
        let err = match next(&mut stream, "the 410").await {
            Err(e) => e,
            Ok(e) => panic!("expected the 410 first, got {}", describe(&e)),
        };
        assert!(
            matches!(&err, watcher::Error::WatchError(s) if s.code == 410),
            "expected a 410 watch error, got {err:?}"
        );
        assert_eq!(events(&mut stream, 3).await, ["Init", "InitApply(ns/b)", "InitDone"]);
        let stats = api.stats();
        assert_eq!(stats.list_count("services"), 2);
        assert_eq!(stats.gone, 1);
    })
    .await;
}

#[tokio::test]
async fn unavailable_server_answers_503_and_the_watcher_recovers() {
    bounded(async {
        let (api, services, mut stream) = watching_one_service().await;

        api.set_unavailable(true);
        api.apply(&svc("ns", "b", &[]));
        // Without kube's retries the 503 is an error at once.
        let mut config = api.config().await;
        config.default_retry = false;
        let no_retry: Api<Service> = Api::all(kube::Client::try_from(config).unwrap());
        let err = no_retry.list(&ListParams::default()).await.unwrap_err();
        assert_eq!(api_code(&err), 503);
        // With them (the default) a request waits out the outage.
        let waiting = tokio::spawn(async move { services.list(&ListParams::default()).await });
        // The watch was cut and restarting it is refused (and retried by the client).
        wait_until("503s to the retrying client", || api.stats().unavailable >= 4).await;
        assert!(!waiting.is_finished());

        api.set_unavailable(false);
        assert_eq!(waiting.await.unwrap().unwrap().items.len(), 2);
        assert_eq!(events(&mut stream, 1).await, ["Apply(ns/b)"]);
        assert_eq!(api.stats().list_count("services"), 2, "the watcher resumed without a relist");
    })
    .await;
}

#[tokio::test]
async fn unreachable_server_fails_requests_and_the_watcher_recovers() {
    bounded(async {
        let (api, services, mut stream) = watching_one_service().await;

        api.set_unreachable(true);
        let err = tokio::time::timeout(STEP, services.list(&ListParams::default()))
            .await
            .expect("an unreachable server fails fast")
            .unwrap_err();
        assert!(!matches!(err, kube::Error::Api(_)), "a connection error, got {err:?}");
        api.apply(&svc("ns", "b", &[]));
        let err = next(&mut stream, "a watch error").await.unwrap_err();
        assert!(matches!(err, watcher::Error::WatchStartFailed(_)), "got {err:?}");
        assert!(api.stats().refused >= 1);

        api.set_unreachable(false);
        assert_eq!(events(&mut stream, 1).await, ["Apply(ns/b)"]);
        assert_eq!(api.stats().list_count("services"), 1, "the watcher resumed without a relist");
    })
    .await;
}

#[tokio::test]
async fn label_selectors_filter_lists_and_watches() {
    bounded(async {
        let api = TestApi::start().await.unwrap();
        api.apply(&svc("ns", "web", &[("app", "web")]));
        api.apply(&svc("ns", "db", &[("app", "db")]));
        api.apply(&svc("ns", "none", &[]));
        let services: Api<Service> = Api::all(api.client().await);
        let names = |list: kube::core::ObjectList<Service>| {
            list.items.iter().map(ResourceExt::name_any).collect::<Vec<_>>()
        };
        let list = |s: &'static str| {
            let services = services.clone();
            async move { services.list(&ListParams::default().labels(s)).await }
        };
        assert_eq!(names(list("app=web").await.unwrap()), ["web"]);
        assert_eq!(names(list("app!=web").await.unwrap()), ["db", "none"]);
        assert_eq!(names(list("app in (web,db),app notin (db)").await.unwrap()), ["web"]);
        assert_eq!(names(list("!app").await.unwrap()), ["none"]);
        assert_eq!(api_code(&list("app in web").await.unwrap_err()), 400);

        let config = watcher::Config::default().labels("app in (web)");
        let mut stream = spawned(watcher(services.clone(), config));
        assert_eq!(events(&mut stream, 3).await, ["Init", "InitApply(ns/web)", "InitDone"]);
        api.apply(&svc("ns", "none", &[("other", "x")])); // never matches
        api.apply(&svc("ns", "db", &[("app", "web")])); // moves in: ADDED
        api.apply(&svc("ns", "web", &[("app", "db")])); // moves out: DELETED
        assert_eq!(events(&mut stream, 2).await, ["Apply(ns/db)", "Delete(ns/web)"]);
        let mut raw = services.watch(&WatchParams::default().labels("app=="), "0").await;
        assert!(raw.as_mut().is_ok(), "an empty value is a valid selector");
        let err =
            services.watch(&WatchParams::default().labels("app=(x)"), "0").await.err().unwrap();
        assert_eq!(api_code(&err), 400);
    })
    .await;
}

#[tokio::test]
async fn field_selectors_on_node_names_and_pod_nodes() {
    bounded(async {
        let api = TestApi::start().await.unwrap();
        for name in ["n1", "n2", "n3"] {
            api.apply(&node(name));
        }
        let client = api.client().await;
        let nodes: Api<Node> = Api::all(client.clone());
        let only_n2 = nodes.list(&ListParams::default().fields("metadata.name=n2")).await.unwrap();
        assert_eq!(only_n2.items.iter().map(ResourceExt::name_any).collect::<Vec<_>>(), ["n2"]);
        let not_n2 = nodes.list(&ListParams::default().fields("metadata.name!=n2")).await.unwrap();
        assert_eq!(not_n2.items.len(), 2);
        let err = nodes.list(&ListParams::default().fields("spec.bogus=1")).await.unwrap_err();
        assert_eq!(api_code(&err), 400);
        assert_eq!(nodes.get("n3").await.unwrap().name_any(), "n3");

        let mut stream =
            spawned(watcher(nodes.clone(), watcher::Config::default().fields("metadata.name=n2")));
        assert_eq!(events(&mut stream, 3).await, ["Init", "InitApply(n2)", "InitDone"]);
        api.apply(&Node { metadata: meta(None, "n1", &[("a", "b")]), ..Default::default() });
        api.delete::<Node>(None, "n3");
        api.apply(&Node { metadata: meta(None, "n2", &[("a", "b")]), ..Default::default() });
        assert_eq!(events(&mut stream, 1).await, ["Apply(n2)"]);

        // The agent's own Pods: spec.nodeName.
        for (name, on) in [("p1", "n1"), ("p2", "n2"), ("p3", "n1")] {
            let spec = PodSpec { node_name: Some(on.into()), ..Default::default() };
            api.apply(&Pod {
                metadata: meta(Some("ns"), name, &[]),
                spec: Some(spec),
                ..Default::default()
            });
        }
        let pods: Api<Pod> = Api::all(client);
        let on_n1 = pods.list(&ListParams::default().fields("spec.nodeName=n1")).await.unwrap();
        assert_eq!(on_n1.items.iter().map(ResourceExt::name_any).collect::<Vec<_>>(), ["p1", "p3"]);
    })
    .await;
}

#[tokio::test]
async fn recorder_events_are_created_then_patched() {
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};

    bounded(async {
        let api = TestApi::start().await.unwrap();
        let client = api.client().await;
        let service = svc("ns", "web", &[]);
        api.apply(&service);
        let reporter =
            Reporter { controller: "nodeplane-agent".into(), instance: Some("node-1".into()) };
        let recorder = Recorder::new(client.clone(), reporter);
        let event = Event {
            type_: EventType::Warning,
            reason: "NoBackends".into(),
            note: Some("service has no ready endpoints".into()),
            action: "Program".into(),
            secondary: None,
        };
        let reference = service.object_ref(&());
        recorder.publish(&event, &reference).await.unwrap();
        let created = api.created("events");
        assert_eq!(created.len(), 1);
        let e = &created[0];
        assert_eq!(e["apiVersion"], "events.k8s.io/v1");
        assert_eq!(e["reason"], "NoBackends");
        assert_eq!(e["regarding"]["name"], "web");
        assert_eq!(e["reportingController"], "nodeplane-agent");
        assert_eq!(e["metadata"]["namespace"], "ns");
        assert!(e.get("series").is_none());

        // The same event again is a PATCH adding a series; created() shows the current state.
        recorder.publish(&event, &reference).await.unwrap();
        let created = api.created("events.events.k8s.io");
        assert_eq!(created.len(), 1);
        assert_eq!(created[0]["series"]["count"], 2);
        assert!(api.created("events.k8s.io").is_empty(), "not a resource name");
        let stats = api.stats();
        assert_eq!(stats.writes.get("events.events.k8s.io"), Some(&2));

        // Events are readable back through kube as well.
        let events: Api<K8sEvent> = Api::namespaced(client, "ns");
        let listed = events.list(&ListParams::default()).await.unwrap();
        assert_eq!(listed.items.len(), 1);
        assert_eq!(listed.items[0].note.as_deref(), Some("service has no ready endpoints"));
    })
    .await;
}

#[tokio::test]
async fn bookmarks_arrive_and_advance() {
    bounded(async {
        let api = TestApi::start().await.unwrap();
        api.set_bookmark_interval(Duration::from_millis(50));
        let rv = api.apply(&svc("ns", "a", &[]));
        let services: Api<Service> = Api::all(api.client().await);
        let mut stream =
            services.watch(&WatchParams::default(), &rv.to_string()).await.unwrap().boxed();
        match next(&mut stream, "a bookmark").await.unwrap() {
            WatchEvent::Bookmark(b) => assert_eq!(b.metadata.resource_version, rv.to_string()),
            other => panic!("expected a bookmark, got {other:?}"),
        }
        // Changes to other kinds move the bookmark on without sending anything else.
        let later = api.apply(&node("n1"));
        loop {
            match next(&mut stream, "a later bookmark").await.unwrap() {
                WatchEvent::Bookmark(b) if b.metadata.resource_version == later.to_string() => {
                    break;
                }
                WatchEvent::Bookmark(_) => {}
                other => panic!("expected only bookmarks, got {other:?}"),
            }
        }
        let quiet = services
            .watch(&WatchParams::default().disable_bookmarks(), &later.to_string())
            .await
            .unwrap()
            .boxed();
        let nothing = tokio::time::timeout(Duration::from_millis(300), quiet.into_future()).await;
        assert!(nothing.is_err(), "no bookmarks unless allowed");
    })
    .await;
}

#[tokio::test]
async fn raw_watch_replays_expires_and_times_out() {
    bounded(async {
        let api = TestApi::start().await.unwrap();
        api.apply(&node("n1"));
        let first = api.apply(&svc("ns", "a", &[]));
        api.apply(&svc("ns", "a", &[("v", "2")]));
        api.delete::<Service>(Some("ns"), "a");
        let services: Api<Service> = Api::all(api.client().await);
        let params = WatchParams::default().disable_bookmarks().timeout(1);

        // From before the first write: the whole history, then the server's timeout ends it.
        let stream = services.watch(&params, &(first - 1).to_string()).await.unwrap();
        let kinds: Vec<String> =
            tokio::time::timeout(STEP, stream.map_ok(|e| format!("{e:?}")).try_collect())
                .await
                .expect("timeoutSeconds ends the stream")
                .unwrap();
        assert_eq!(kinds, ["Added event", "Modified event", "Deleted event"]);

        // resourceVersion 0: the current state as ADDED.
        api.apply(&svc("ns", "b", &[]));
        let mut stream = services.watch(&params, "0").await.unwrap().boxed();
        match next(&mut stream, "the synthetic ADDED").await.unwrap() {
            WatchEvent::Added(s) => assert_eq!(s.name_any(), "b"),
            other => panic!("expected ADDED, got {other:?}"),
        }

        // After a compaction an old resourceVersion gets one ERROR 410 event, then the end.
        api.compact();
        let mut stream = services.watch(&params, &first.to_string()).await.unwrap().boxed();
        match next(&mut stream, "the 410").await.unwrap() {
            WatchEvent::Error(status) => {
                assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            }
            other => panic!("expected ERROR, got {other:?}"),
        }
        assert!(tokio::time::timeout(STEP, stream.next()).await.unwrap().is_none());
        let err = services.watch(&params, "not-a-number").await.err().unwrap();
        assert_eq!(api_code(&err), 400);
    })
    .await;
}

#[tokio::test]
async fn streaming_list_watcher() {
    bounded(async {
        let api = TestApi::start().await.unwrap();
        api.apply(&svc("ns", "a", &[]));
        api.apply(&svc("ns", "b", &[]));
        let services: Api<Service> = Api::all(api.client().await);
        let mut stream = spawned(watcher(services, watcher::Config::default().streaming_lists()));
        assert_eq!(
            events(&mut stream, 4).await,
            ["Init", "InitApply(ns/a)", "InitApply(ns/b)", "InitDone"]
        );
        api.delete::<Service>(Some("ns"), "a");
        assert_eq!(events(&mut stream, 1).await, ["Delete(ns/a)"]);
        assert_eq!(api.stats().list_count("services"), 0, "no list: a watch with initial events");
    })
    .await;
}

#[tokio::test]
async fn every_agent_kind_is_watchable() {
    bounded(async {
        let api = TestApi::start().await.unwrap();
        let client = api.client().await;
        let applied = [
            api.apply_value(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns"}})),
            api.apply_value(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "ns"}})),
            api.apply_value(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "ns"}})),
            api.apply_value(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}})),
            api.apply_value(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                "metadata": {"name": "s-abc", "namespace": "ns", "labels": {"kubernetes.io/service-name": "s"}},
                "endpoints": [{"addresses": ["10.0.0.1"]}],
            })),
            api.apply_value(json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "deny", "namespace": "ns"}, "spec": {"podSelector": {}},
            })),
        ];
        assert_eq!(applied.map(Result::unwrap), [1, 2, 3, 4, 5, 6]);
        assert!(matches!(
            api.apply_value(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}})),
            Err(nodeplane_testapi::Error::UnsupportedKind { .. })
        ));
        assert!(api.apply_value(json!({"apiVersion": "v1", "kind": "Node"})).is_err());

        async fn first_listed<K>(api: Api<K>) -> String
        where
            K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
        {
            let mut stream = spawned(watcher(api, watcher::Config::default()));
            let events = events(&mut stream, 3).await;
            assert_eq!(events[0], "Init");
            assert_eq!(events[2], "InitDone");
            events[1].clone()
        }
        assert_eq!(first_listed(Api::<Namespace>::all(client.clone())).await, "InitApply(ns)");
        assert_eq!(first_listed(Api::<Service>::namespaced(client.clone(), "ns")).await, "InitApply(ns/s)");
        assert_eq!(first_listed(Api::<Pod>::all(client.clone())).await, "InitApply(ns/p)");
        assert_eq!(first_listed(Api::<Node>::all(client.clone())).await, "InitApply(n)");
        let slices = Api::<EndpointSlice>::all(client.clone());
        assert_eq!(first_listed(slices.clone()).await, "InitApply(ns/s-abc)");
        assert_eq!(first_listed(Api::<NetworkPolicy>::all(client.clone())).await, "InitApply(ns/deny)");
        let slice = slices.list(&ListParams::default().labels("kubernetes.io/service-name=s")).await.unwrap();
        assert_eq!(slice.items[0].endpoints[0].addresses, ["10.0.0.1"]);
        assert_eq!(api.get::<EndpointSlice>(Some("ns"), "s-abc").unwrap().address_type, "IPv4");
        assert_eq!(api.get_value("endpointslices", Some("ns"), "s-abc").unwrap()["metadata"]["resourceVersion"], "5");
        assert_eq!(api.list_values("namespaces").len(), 1);
    })
    .await;
}

#[tokio::test]
async fn crud_over_http() {
    bounded(async {
        let api = TestApi::start().await.unwrap();
        let client = api.client().await;
        let services: Api<Service> = Api::namespaced(client.clone(), "ns");
        let created = services.create(&PostParams::default(), &svc("ns", "a", &[])).await.unwrap();
        assert_eq!(created.metadata.resource_version.as_deref(), Some("1"));
        assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
        let err = services.create(&PostParams::default(), &svc("ns", "a", &[])).await.unwrap_err();
        assert_eq!(api_code(&err), 409);
        let err =
            services.create(&PostParams::default(), &svc("other", "x", &[])).await.unwrap_err();
        assert_eq!(api_code(&err), 400, "namespace in the body must match the URL");

        let patch = json!({"metadata": {"labels": {"patched": "yes"}}});
        let patched =
            services.patch("a", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        assert_eq!(patched.labels().get("patched").map(String::as_str), Some("yes"));
        assert_eq!(patched.metadata.uid, created.metadata.uid);
        let err =
            services.patch("zz", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap_err();
        assert_eq!(api_code(&err), 404);
        let err = services
            .patch("a", &PatchParams::default(), &Patch::<()>::Json(Default::default()))
            .await
            .unwrap_err();
        assert_eq!(api_code(&err), 415);

        let err = services.replace("a", &PostParams::default(), &created).await.unwrap_err();
        assert_eq!(api_code(&err), 409, "stale resourceVersion");
        let replaced = services.replace("a", &PostParams::default(), &patched).await.unwrap();
        assert!(replaced.labels().contains_key("patched"));

        let applied = services
            .patch("ssa", &PatchParams::apply("test"), &Patch::Apply(&svc("ns", "ssa", &[])))
            .await
            .unwrap();
        assert_eq!(applied.name_any(), "ssa");

        assert_eq!(
            services.get("a").await.unwrap().metadata.resource_version,
            replaced.metadata.resource_version
        );
        services.delete("a", &Default::default()).await.unwrap();
        assert_eq!(api_code(&services.get("a").await.unwrap_err()), 404);
        assert!(services.get_opt("a").await.unwrap().is_none());
        assert!(api.created("services").len() == 1, "only the POST counts as created");

        let version = client.apiserver_version().await.unwrap();
        assert_eq!((version.major.as_str(), version.minor.as_str()), ("1", "33"));
        let request = |path: &str| axum::http::Request::get(path).body(Vec::new()).unwrap();
        assert_eq!(
            api_code(&client.request_text(request("/api/v1/configmaps")).await.unwrap_err()),
            404
        );
        assert_eq!(
            api_code(&client.request_text(request("/api/v1/services/a")).await.unwrap_err()),
            404
        );
        let delete_all =
            axum::http::Request::delete("/api/v1/namespaces/ns/services").body(Vec::new()).unwrap();
        assert_eq!(api_code(&client.request_text(delete_all).await.unwrap_err()), 405);
        let discovery = client.list_core_api_resources("v1").await.unwrap();
        assert!(discovery.resources.iter().any(|r| r.name == "services" && r.namespaced));
        let groups = client.list_api_groups().await.unwrap();
        assert!(groups.groups.iter().any(|g| g.name == "discovery.k8s.io"));
    })
    .await;
}

#[tokio::test]
async fn serves_a_caller_bound_listener_through_a_kubeconfig_file() {
    bounded(async {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let api = TestApi::serve(listener).unwrap();
        assert_eq!(api.addr(), addr);
        assert_eq!(api.url(), format!("http://{addr}"));
        api.apply(&node("n1"));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        api.write_kubeconfig(&path).unwrap();
        let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
        assert_eq!(kubeconfig.current_context.as_deref(), Some("testapi"));
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap();
        assert_eq!(config.default_namespace, "default");
        let client = kube::Client::try_from(config).unwrap();
        let nodes: Api<Node> = Api::all(client);
        assert_eq!(nodes.list(&ListParams::default()).await.unwrap().items.len(), 1);
    })
    .await;
}

#[test]
fn serve_outside_a_runtime_is_an_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    assert!(TestApi::serve(listener).is_err());
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_server() {
    bounded(async {
        let api = TestApi::start().await.unwrap();
        let url: axum::http::Uri = api.url().parse().unwrap();
        let services: Api<Service> = Api::all(api.client().await);
        let mut watch = services.watch(&WatchParams::default(), "0").await.unwrap().boxed();
        let clone = api.clone();
        drop(api);
        services.list(&ListParams::default()).await.expect("a clone keeps it serving");
        drop(clone);
        // The open watch is cut and new connections are refused.
        while next_or_end(&mut watch).await.is_some() {}
        let fresh: Api<Service> = Api::all(kube::Client::try_from(kube::Config::new(url)).unwrap());
        let mut refused = false;
        for _ in 0..100 {
            if fresh.list(&ListParams::default()).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(refused, "the server stopped accepting");
    })
    .await;
}

async fn next_or_end<S: Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    tokio::time::timeout(STEP, stream.next()).await.expect("the watch ended")
}

#[tokio::test]
async fn ten_thousand_services_relist_in_pages() {
    bounded(async {
        let api = TestApi::start().await.unwrap();
        for i in 0..10_000 {
            api.apply(&svc(&format!("ns{}", i % 100), &format!("svc{i:05}"), &[("app", "bench")]));
        }
        let services: Api<Service> = Api::all(api.client().await);
        let mut stream = spawned(watcher(services, watcher::Config::default()));
        let mut listed = 0;
        loop {
            match next(&mut stream, "the initial list").await.unwrap() {
                watcher::Event::InitApply(_) => listed += 1,
                watcher::Event::InitDone => break,
                _ => {}
            }
        }
        assert_eq!(listed, 10_000);
        assert_eq!(api.stats().list_page_count("services"), 20, "page_size 500");
    })
    .await;
}
