//! End-to-end tests of tenants, API keys, roles and quotas against the real
//! binaries, on mutual-TLS clusters (the testkit's default), which refuse
//! calls without a credential: missing, wrong, revoked and expired
//! keys; user keys on admin calls; tenants that cannot see each other's
//! sessions (control plane and data plane); quotas under concurrent creates;
//! and a revocation reaching every coordinator.
//!
//! How these tests run and what they need: see `common/mod.rs`.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use sandfleet::{proto, Client, CreateSession};
use sandfleet_common::auth::IdentityKind;
use sandfleet_testkit::helpers::{create_running, exec_argv, expect_code, raw, request_id, small_session};
use sandfleet_testkit::{Cluster, ClusterBuilder};
use tonic::Code;

use common::{cli, show, start, SHORT};

/// A cluster of `coordinators` and `agents` that requires a credential.
async fn secured(coordinators: usize, agents: usize) -> Cluster {
    start(ClusterBuilder::new().coordinators(coordinators).agents(agents)).await
}

async fn keyed(cluster: &Cluster, key: &str) -> Client {
    cluster.try_client_with_key(Some(key)).await.unwrap()
}

/// Creates tenant `name` (with `max_sessions`) and a key of it with `role`; returns the whole key.
async fn tenant_with_key(admin: &Client, name: &str, max_sessions: u64, role: proto::ApiKeyRole) -> String {
    admin.create_tenant(name, proto::TenantQuota { max_sessions, ..Default::default() }).await.unwrap();
    admin.create_api_key(name, role, None).await.unwrap().secret
}

fn tiny(prefix: &str) -> CreateSession {
    CreateSession::new()
        .request_id(request_id(prefix))
        .memory_bytes(32 << 20)
        .cpu_millis(50)
        .pids_limit(32)
        .ttl(Duration::from_secs(600))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_required_and_user_keys_are_not_admins() {
    require_facilities!();
    let cluster = secured(1, 0).await;

    // The bootstrap key file: written once, mode 0600, and it works as admin.
    let key_file = cluster.dir().join("admin.key");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key_file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the admin key file must be private");
    let admin_key = cluster.admin_key().expect("the bootstrap coordinator wrote an admin key").to_string();
    assert!(admin_key.starts_with("sfk_"));
    let admin = keyed(&cluster, &admin_key).await;
    admin.cluster_status().await.unwrap();

    // No credential at all.
    let anonymous = cluster.try_client_with_key(None).await.unwrap();
    let e = expect_code("list without a key", anonymous.list_sessions(Default::default()).await, Code::Unauthenticated);
    assert!(e.to_string().contains("no credential"), "{e}");
    expect_code("create without a key", anonymous.create_session(tiny("anon")).await, Code::Unauthenticated);
    expect_code("nodes without a key", anonymous.list_nodes().await, Code::Unauthenticated);

    // A wrong key (well formed, unknown id), and a known id with a wrong secret.
    let user_key = tenant_with_key(&admin, "team-a", 0, proto::ApiKeyRole::User).await;
    let unknown = format!("sfk_{}_{}", "0".repeat(16), "A".repeat(43));
    let e = expect_code(
        "unknown key",
        keyed(&cluster, &unknown).await.list_sessions(Default::default()).await,
        Code::Unauthenticated,
    );
    assert!(!e.to_string().contains(&"A".repeat(43)), "the key must not be echoed: {e}");
    let wrong_secret = format!("{}{}", &user_key[..user_key.len() - 43], "B".repeat(43));
    let e2 = expect_code(
        "wrong secret",
        keyed(&cluster, &wrong_secret).await.list_sessions(Default::default()).await,
        Code::Unauthenticated,
    );
    assert_eq!(e.to_string(), e2.to_string(), "an unknown and a wrong key must be refused alike");

    // A malformed bearer, sent raw (the SDK refuses to send one).
    let mut api = proto::session_service_client::SessionServiceClient::new(
        cluster.channel(&cluster.coordinators[0].addr, IdentityKind::Coordinator).unwrap(),
    );
    let mut req = tonic::Request::new(proto::ListSessionsRequest::default());
    req.metadata_mut().insert("authorization", "Bearer sfk_not-a-key".parse().unwrap());
    assert_eq!(api.list_sessions(req).await.unwrap_err().code(), Code::Unauthenticated);

    // A user key works on its own sessions and nothing else.
    let user = keyed(&cluster, &user_key).await;
    user.list_sessions(Default::default()).await.unwrap();
    expect_code("user: list nodes", user.list_nodes().await, Code::PermissionDenied);
    expect_code("user: cordon", user.cordon_node("n1", true).await, Code::PermissionDenied);
    expect_code("user: cluster status", user.cluster_status().await, Code::PermissionDenied);
    expect_code("user: pause", user.set_scheduler_paused(true).await, Code::PermissionDenied);
    expect_code("user: remove member", user.remove_member(1).await, Code::PermissionDenied);
    expect_code("user: list tenants", user.list_tenants().await, Code::PermissionDenied);
    expect_code("user: create tenant", user.create_tenant("x", Default::default()).await, Code::PermissionDenied);
    expect_code("user: delete tenant", user.delete_tenant("team-a").await, Code::PermissionDenied);
    expect_code(
        "user: create key",
        user.create_api_key("team-a", proto::ApiKeyRole::Admin, None).await,
        Code::PermissionDenied,
    );
    expect_code("user: list keys", user.list_api_keys(None).await, Code::PermissionDenied);
    // Templates: an admin's to write (they choose the images sessions run); anyone's to read.
    let template = proto::Template { name: "by-user".into(), ..Default::default() };
    expect_code("user: create template", user.create_template(template.clone()).await, Code::PermissionDenied);
    expect_code("user: update template", user.update_template(template).await, Code::PermissionDenied);
    expect_code("user: delete template", user.delete_template("python", true).await, Code::PermissionDenied);
    assert_eq!(user.list_templates().await.unwrap().len(), 4, "a user reads the built-in templates");
    let own_id = &user_key[4..20];
    expect_code("user: revoke", user.revoke_api_key(own_id).await, Code::PermissionDenied);
    assert!(!admin.cluster_status().await.unwrap().scheduler_paused, "a refused call changes nothing");

    // Expired and revoked keys.
    let short = admin.create_api_key("team-a", proto::ApiKeyRole::User, Some(Duration::from_secs(1))).await.unwrap();
    let short_client = keyed(&cluster, &short.secret).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    expect_code("expired key", short_client.list_sessions(Default::default()).await, Code::Unauthenticated);
    admin.revoke_api_key(own_id).await.unwrap();
    expect_code("revoked key", user.list_sessions(Default::default()).await, Code::Unauthenticated);
    let keys = admin.list_api_keys(Some("team-a")).await.unwrap();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(keys.iter().any(|k| k.id == own_id && k.revoked_at_ms > 0));

    // Tenant bad input: duplicate, bad name, unknown tenant for a key, delete refusals.
    expect_code("duplicate tenant", admin.create_tenant("team-a", Default::default()).await, Code::AlreadyExists);
    expect_code("bad tenant name", admin.create_tenant("Team_A", Default::default()).await, Code::InvalidArgument);
    expect_code(
        "key of an unknown tenant",
        admin.create_api_key("ghost", proto::ApiKeyRole::User, None).await,
        Code::NotFound,
    );
    expect_code("delete default", admin.delete_tenant("default").await, Code::FailedPrecondition);
    admin.create_tenant("team-z", Default::default()).await.unwrap();
    let z = admin.create_api_key("team-z", proto::ApiKeyRole::User, None).await.unwrap();
    expect_code("delete with an active key", admin.delete_tenant("team-z").await, Code::FailedPrecondition);
    admin.revoke_api_key(&z.key.unwrap().id).await.unwrap();
    admin.delete_tenant("team-z").await.unwrap();
    expect_code("get deleted", admin.get_tenant("team-z").await, Code::NotFound);

    // Audit: one event per mutating call, key ids but never secrets.
    let logs = coordinator_logs(&cluster);
    assert!(logs.contains("CreateApiKey") && logs.contains("RevokeApiKey"), "no audit events in the log");
    assert!(logs.contains(&format!("key:{own_id}")), "audit events name the key id");
    for secret in [&admin_key, &user_key, &short.secret, &z.secret] {
        assert!(!logs.contains(&secret[21..]), "a key secret appears in a coordinator log");
    }
}

fn coordinator_logs(cluster: &Cluster) -> String {
    let mut all = String::new();
    for entry in std::fs::read_dir(cluster.dir()).unwrap().flatten() {
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "log") {
            all.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_do_not_see_each_others_sessions() {
    require_facilities!();
    let cluster = secured(1, 1).await;
    let admin = cluster.client().await;
    let a = keyed(&cluster, &tenant_with_key(&admin, "tenant-a", 0, proto::ApiKeyRole::User).await).await;
    let b = keyed(&cluster, &tenant_with_key(&admin, "tenant-b", 0, proto::ApiKeyRole::User).await).await;

    let theirs = create_running(&b, small_session("b")).await.unwrap();
    let mine = create_running(&a, small_session("a")).await.unwrap();
    assert_eq!((theirs.tenant.as_str(), mine.tenant.as_str()), ("tenant-b", "tenant-a"));

    // Another tenant's session answers exactly like a missing one.
    let missing = "00000000-0000-4000-8000-000000000000";
    let want = expect_code("get missing", a.get_session(missing).await, Code::NotFound).to_string();
    let got = expect_code("get theirs", a.get_session(&theirs.id).await, Code::NotFound).to_string();
    assert_eq!(got, want.replace(missing, &theirs.id));
    expect_code("renew theirs", a.renew_session(&theirs.id, None).await, Code::NotFound);
    expect_code(
        "renew theirs with a ttl",
        a.renew_session(&theirs.id, Some(Duration::from_secs(60))).await,
        Code::NotFound,
    );
    expect_code("delete theirs", a.delete_session(&theirs.id).await, Code::NotFound);
    match a.watch_session(&theirs.id).await {
        Ok(_) => panic!("watching another tenant's session must fail"),
        Err(e) => assert_eq!(e.code(), Some(Code::NotFound), "{e}"),
    }
    let listed = a.list_all_sessions(Default::default()).await.unwrap();
    assert_eq!(listed.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), [mine.id.as_str()]);
    let named = proto::ListSessionsRequest { tenant: "tenant-b".into(), ..Default::default() };
    assert!(a.list_all_sessions(named.clone()).await.unwrap().is_empty(), "a user cannot list another tenant");
    // The admin sees both, or one tenant on request.
    let all = admin.list_all_sessions(Default::default()).await.unwrap();
    assert!(all.iter().any(|s| s.id == theirs.id) && all.iter().any(|s| s.id == mine.id));
    let only_b = admin.list_all_sessions(named).await.unwrap();
    assert_eq!(only_b.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), [theirs.id.as_str()]);

    // Data plane: A's valid token for A's session does not open B's session on the same agent.
    assert_eq!(mine.node_address, theirs.node_address, "one agent runs both");
    let node = cluster.channel(&theirs.node_address, IdentityKind::Agent).unwrap();
    let r = raw::exec(&node, &theirs.id, Some(&mine.token), &["true"]).await;
    let s = raw::expect_status("exec in theirs with my token", r, Code::NotFound);
    let r = raw::exec(&node, missing, Some(&mine.token), &["true"]).await;
    let not_here = raw::expect_status("exec in a missing session with my token", r, Code::NotFound);
    assert_eq!(s.message(), not_here.message().replace(missing, &theirs.id), "existence must not show");
    raw::expect_status(
        "files of theirs with my token",
        raw::list_files(&node, &theirs.id, Some(&mine.token), "").await,
        Code::NotFound,
    );
    // B's own token still works, and B's session survived A's attempts.
    let out = exec_argv(&b, &theirs, ["echo", "ok"], SHORT).await.unwrap();
    assert_eq!(out.stdout, b"ok\n");

    // Request ids are per tenant: the same one in A and B makes two sessions.
    let rid = request_id("shared");
    let sa = a.create_session(tiny("x").request_id(rid.clone())).await.unwrap();
    let sb = b.create_session(tiny("x").request_id(rid.clone())).await.unwrap();
    assert_ne!(sa.id, sb.id);
    let again = b.create_session_full(tiny("x").request_id(rid)).await.unwrap();
    assert!(again.existing && again.session.unwrap().id == sb.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_holds_under_32_concurrent_creates() {
    require_facilities!();
    let cluster = secured(1, 1).await;
    let admin = cluster.client().await;
    let user = keyed(&cluster, &tenant_with_key(&admin, "quota", 5, proto::ApiKeyRole::User).await).await;

    let creates = (0..32).map(|i| {
        let user = user.clone();
        async move { user.create_session(tiny(&format!("q{i}"))).await }
    });
    let results = futures::future::join_all(creates).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 5, "exactly the quota may be created: {results:?}");
    for r in results.into_iter().filter(|r| r.is_err()) {
        let e = expect_code("over quota", r, Code::ResourceExhausted);
        assert!(e.to_string().contains("tenant \"quota\" quota exceeded: sessions 5 of 5 in use"), "{e}");
    }
    let t = admin.list_tenants().await.unwrap().into_iter().find(|t| t.name == "quota").unwrap();
    assert_eq!(t.usage.unwrap().sessions, 5);
    assert_eq!(t.usage.unwrap().cpu_millis, 5 * 50);

    // Deleting one frees a place.
    let mine = user.list_all_sessions(Default::default()).await.unwrap();
    user.delete_session(&mine[0].id).await.unwrap();
    user.create_session(tiny("after")).await.unwrap();
    expect_code("still full", user.create_session(tiny("full")).await, Code::ResourceExhausted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_stops_working_on_every_coordinator_within_5s() {
    require_facilities!();
    let cluster = secured(3, 0).await;
    let admin = cluster.client().await;
    let created = {
        admin.create_tenant("rev", Default::default()).await.unwrap();
        admin.create_api_key("rev", proto::ApiKeyRole::User, None).await.unwrap()
    };
    let id = created.key.unwrap().id;
    // One client per coordinator, each talking to that coordinator only.
    let mut per_member = Vec::new();
    for addr in cluster.coordinator_addrs() {
        let c = cluster.client_for([addr.clone()]).api_key(Some(created.secret.clone())).connect().await.unwrap();
        // Each member has applied the key once it answers.
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = c.list_sessions(Default::default()).await {
            assert!(Instant::now() < deadline, "the key never worked on {addr}: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        per_member.push((addr, c));
    }
    let revoked_at = Instant::now();
    admin.revoke_api_key(&id).await.unwrap();
    for (addr, c) in &per_member {
        loop {
            let stale =
                proto::ListSessionsRequest { consistency: proto::ReadConsistency::Stale as i32, ..Default::default() };
            match c.list_sessions(stale).await {
                Err(e) if e.code() == Some(Code::Unauthenticated) => break,
                other => {
                    assert!(
                        revoked_at.elapsed() < Duration::from_secs(5),
                        "coordinator {addr} still accepts the revoked key after 5 s: {other:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    assert!(revoked_at.elapsed() < Duration::from_secs(5));

    // Membership changes sent to a follower are forwarded with the caller's key.
    let status = admin.cluster_status().await.unwrap();
    let follower_id = status.leader_id % 3 + 1;
    let follower = cluster.coordinator_addrs()[follower_id as usize - 1].clone();
    let via_follower = keyed_at(&cluster, &follower, cluster.admin_key().unwrap()).await;
    // Neither the leader nor the follower asked.
    let victim = 6 - status.leader_id - follower_id;
    let after = via_follower.remove_member(victim).await.unwrap();
    assert_eq!(after.members.iter().filter(|m| m.voter).count(), 2, "{after:?}");
}

/// A client of the coordinator at `addr` that authenticates with `key` alone.
async fn keyed_at(cluster: &Cluster, addr: &str, key: &str) -> Client {
    let tls = cluster.client_tls().map(|t| sandfleet::TlsOptions { ca: t.ca.clone(), cert_and_key: None });
    Client::builder([addr.to_string()]).tls(tls).api_key(Some(key)).connect().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_init_writes_the_first_admin_key_once_and_the_cli_uses_it() {
    require_facilities!();
    // No API key exists before InitCluster: the CLI calls it with the test's client certificate.
    let cluster = start(ClusterBuilder::new().coordinators(3).agents(0).bootstrap(false)).await;
    let addrs = cluster.coordinator_addrs();
    let members: Vec<String> = addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect();
    let key_file = cluster.dir().join("init-admin.key");
    let key_path = key_file.display().to_string();
    let mut args = vec!["--endpoint", &addrs[0], "cluster", "init"];
    args.extend(members.iter().map(String::as_str));
    args.extend(["--admin-key-file", &key_path]);

    let out = cli(&cluster, &args, None).await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key_file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let key = std::fs::read_to_string(&key_file).unwrap().trim().to_string();
    assert!(key.starts_with("sfk_"), "{key:?}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&key), "the key is written to the file, not printed");

    // The key is an admin of "default", through the CLI's SANDFLEET_API_KEY, on any member.
    let endpoint = cluster.endpoint();
    let out =
        cli(&cluster, &["--endpoint", &endpoint, "tenant", "create", "cli-t", "--max-sessions", "3"], Some(&key)).await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let out = cli(&cluster, &["--endpoint", &endpoint, "tenant", "list"], Some(&key)).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.lines().any(|l| l.split_whitespace().take(2).eq(["cli-t", "0/3"])), "{}", show(&out));
    let out = cli(
        &cluster,
        &["--endpoint", &endpoint, "apikey", "create", "--tenant", "cli-t", "--role", "user"],
        Some(&key),
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let user_key = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(user_key.starts_with("sfk_"), "{}", show(&out));
    let out = cli(&cluster, &["--endpoint", &endpoint, "--api-key", &user_key, "node", "list"], None).await;
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PERMISSION_DENIED"), "{}", show(&out));

    // A second init with the same file: refused before anything is sent, file untouched.
    let out = cli(&cluster, &args, None).await;
    assert_ne!(out.status.code(), Some(0), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("never overwritten"), "{}", show(&out));
    assert_eq!(std::fs::read_to_string(&key_file).unwrap().trim(), key);
    let admin = keyed(&cluster, &key).await;
    assert_eq!(admin.list_api_keys(Some("default")).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bootstrap_key_is_made_once_and_tenants_survive_restarts() {
    require_facilities!();
    let mut cluster = secured(1, 0).await;
    let admin = cluster.client().await;
    let key = cluster.admin_key().unwrap().to_string();
    admin.create_tenant("durable", proto::TenantQuota { max_sessions: 7, ..Default::default() }).await.unwrap();
    let user = admin.create_api_key("durable", proto::ApiKeyRole::User, None).await.unwrap();

    // Restarted with the same --bootstrap --admin-key-file: the file exists, so no second key.
    cluster.restart(sandfleet_testkit::Target::Coordinator(0)).await.unwrap();
    assert_eq!(std::fs::read_to_string(cluster.dir().join("admin.key")).unwrap().trim(), key);
    let admin = keyed(&cluster, &key).await;
    let defaults = admin.list_api_keys(Some("default")).await.unwrap();
    assert_eq!(defaults.len(), 1, "a restart must not create another admin key: {defaults:?}");
    let t = admin.get_tenant("durable").await.unwrap();
    assert_eq!(t.quota.unwrap().max_sessions, 7);
    keyed(&cluster, &user.secret).await.list_sessions(Default::default()).await.unwrap();
    assert!(coordinator_logs(&cluster).contains("the admin key file exists already"));
}
