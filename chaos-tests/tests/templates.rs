//! End-to-end tests of cluster templates against the real binaries: a
//! template survives a leader SIGKILL and gives its sessions, pools and
//! batches their spec, allowing only the overrides it lists; a template's
//! image runs only on a node whose agent advertises it (a session waits,
//! saying why, until the image is loaded), in a Docker container of that
//! image, for single sessions, warm pools and batches alike; a template in
//! use is deleted only with force; bad templates are refused.
//!
//! How these tests run and what they need: see `common/mod.rs`.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use sandfleet::{proto, Client, CreateBatch, CreateSession};
use sandfleet_testkit::helpers::{eventually, exec_argv, expect_code, request_id, stdout};
use sandfleet_testkit::{ClusterBuilder, Target};
use tonic::Code;

use common::{cli, retrying_client, show, start, SHORT};

const ROOMY: [&str; 6] = ["--slots", "100", "--cpu", "1000", "--memory", "64Gi"];

fn template(name: &str, image: &str, allow: &[&str]) -> proto::Template {
    proto::Template {
        name: name.into(),
        spec: Some(proto::SessionSpec {
            template: "python".into(),
            memory_bytes: 64 << 20,
            cpu_millis: 100,
            ttl_seconds: 600,
            env: [("MODE".to_string(), name.to_string())].into(),
            labels: [("team".to_string(), "ml".to_string())].into(),
            ..Default::default()
        }),
        image: image.into(),
        allowed_overrides: allow.iter().map(ToString::to_string).collect(),
        ..Default::default()
    }
}

async fn session_count(client: &Client) -> usize {
    client.list_all_sessions(proto::ListSessionsRequest::default()).await.unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_survives_a_leader_kill_and_gives_sessions_pools_and_batches_their_spec() {
    require_facilities!();
    let builder = ClusterBuilder::new().coordinators(3).agents(1).agent_args(ROOMY);
    let mut cluster = start(builder).await;
    let client = retrying_client(&cluster).await;
    let made = client.create_template(template("small", "", &["env", "labels"])).await.unwrap();
    assert!(!made.builtin && made.created_at_ms > 0, "{made:?}");
    assert_eq!(made.spec.as_ref().unwrap().template, "python");

    // The leader dies; the template is in every member's state.
    let status = cluster.wait_converged(Duration::from_secs(30)).await.unwrap();
    let leader = cluster.coordinator_index(status.leader_id).expect("the leader is one of ours");
    cluster.kill(Target::Coordinator(leader)).await.unwrap();
    let client = retrying_client(&cluster).await;
    let listed = client.list_templates().await.unwrap();
    let names: Vec<&str> = listed.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["default", "python", "node", "bash", "small"], "built-ins first");

    // A session of it: the template's spec, with the env it may add.
    let s = client
        .create_session(CreateSession::new().request_id(request_id("tpl")).template("small").env("SEED", "7"))
        .await
        .unwrap();
    let spec = s.spec.clone().unwrap();
    assert_eq!((spec.template.as_str(), spec.memory_bytes, spec.cpu_millis), ("small", 64 << 20, 100));
    assert_eq!(spec.labels.get("team").map(String::as_str), Some("ml"));
    let s = client.wait_running(&s.id, Duration::from_secs(60)).await.unwrap();
    let out = exec_argv(&client, &s, ["sh", "-c", "echo $MODE:$SEED"], SHORT).await.unwrap();
    assert_eq!(stdout(&out).trim(), "small:7", "{out:?}");

    // What the template does not allow is refused, naming the field; nothing is created.
    let before = session_count(&client).await;
    let e = expect_code(
        "a memory override",
        client.create_session(CreateSession::new().template("small").memory_bytes(1 << 30)).await,
        Code::InvalidArgument,
    );
    assert!(e.to_string().contains("memory_bytes") && e.to_string().contains("env, labels"), "{e}");
    expect_code(
        "an unknown template",
        client.create_session(CreateSession::new().template("nosuch")).await,
        Code::InvalidArgument,
    );
    assert_eq!(session_count(&client).await, before);

    // A pool and a batch of it.
    let pool = proto::Pool {
        name: "small-pool".into(),
        spec: Some(proto::SessionSpec { template: "small".into(), ..Default::default() }),
        max: 4,
        buffer_min: 1,
        buffer_max: 2,
        ..Default::default()
    };
    let pool = client.create_pool(pool).await.unwrap();
    assert_eq!(pool.spec.as_ref().unwrap().memory_bytes, 64 << 20);
    let batch = CreateBatch::new(3, CreateSession::new().template("small")).request_id(request_id("tpl-batch")).patch(
        0,
        [("SHARD", "0")],
        Vec::<(String, String)>::new(),
    );
    let b = client.create_batch(batch).await.unwrap().batch.unwrap();
    let b = client.wait_batch(&b.id, Duration::from_secs(60), |_| {}).await.unwrap();
    let first = client.get_session(&b.session_ids[0]).await.unwrap();
    let out = exec_argv(&client, &first, ["sh", "-c", "echo $MODE:$SHARD"], SHORT).await.unwrap();
    assert_eq!(stdout(&out).trim(), "small:0", "{out:?}");

    // In use: deleting it is refused, naming what uses it; with force it goes,
    // and what was made from it keeps running with its spec.
    let got = client.get_template("small").await.unwrap();
    assert_eq!((got.live_sessions >= 4, got.pools.as_slice()), (true, ["default/small-pool".to_string()].as_slice()));
    let e = expect_code("delete in use", client.delete_template("small", false).await, Code::FailedPrecondition);
    assert!(e.to_string().contains("default/small-pool"), "{e}");
    client.delete_template("small", true).await.unwrap();
    expect_code("get a deleted template", client.get_template("small").await, Code::NotFound);
    let s = client.get_session(&s.id).await.unwrap();
    assert_eq!(s.state, proto::SessionState::Running as i32);
    expect_code(
        "a session of a deleted template",
        client.create_session(CreateSession::new().template("small")).await,
        Code::InvalidArgument,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_templates_are_refused_and_change_nothing() {
    require_facilities!();
    let cluster = start(ClusterBuilder::new().coordinators(1).agents(1)).await;
    let client = cluster.client().await;
    let ok = template("ok", "", &["env"]);
    let cases: Vec<(&str, proto::Template, Code)> = vec![
        ("a built-in name", proto::Template { name: "python".into(), ..ok.clone() }, Code::AlreadyExists),
        ("a bad name", proto::Template { name: "Bad_Name".into(), ..ok.clone() }, Code::InvalidArgument),
        ("a bad image", proto::Template { image: "Not An Image".into(), ..ok.clone() }, Code::InvalidArgument),
        ("an image too long", proto::Template { image: "a".repeat(600), ..ok.clone() }, Code::OutOfRange),
        ("an unknown override", template("ok", "", &["image"]), Code::InvalidArgument),
        (
            "a cluster template as base",
            proto::Template {
                spec: Some(proto::SessionSpec { template: "other".into(), ..Default::default() }),
                ..ok.clone()
            },
            Code::InvalidArgument,
        ),
        (
            "an image on the process runtime",
            proto::Template {
                image: "python:3.12".into(),
                spec: Some(proto::SessionSpec { runtime: "process".into(), ..Default::default() }),
                ..ok.clone()
            },
            Code::InvalidArgument,
        ),
        (
            "a memory limit out of range",
            proto::Template { spec: Some(proto::SessionSpec { memory_bytes: 1, ..Default::default() }), ..ok.clone() },
            Code::OutOfRange,
        ),
        (
            "a reserved label",
            proto::Template {
                spec: Some(proto::SessionSpec {
                    labels: [("sandfleet.io/pool".to_string(), "x".to_string())].into(),
                    ..Default::default()
                }),
                ..ok.clone()
            },
            Code::InvalidArgument,
        ),
    ];
    for (what, t, code) in cases {
        expect_code(what, client.create_template(t).await, code);
    }
    let listed = client.list_templates().await.unwrap();
    assert_eq!(listed.len(), 4, "only the built-ins: {listed:?}");
    client.create_template(ok.clone()).await.unwrap();
    expect_code("a taken name", client.create_template(ok.clone()).await, Code::AlreadyExists);
    expect_code("update a built-in", client.update_template(template("bash", "", &[])).await, Code::FailedPrecondition);
    expect_code("delete a built-in", client.delete_template("node", true).await, Code::FailedPrecondition);
    expect_code("update an unknown one", client.update_template(template("nope", "", &[])).await, Code::NotFound);
    expect_code("delete an unknown one", client.delete_template("nope", false).await, Code::NotFound);
    expect_code("get an unknown one", client.get_template("nope").await, Code::NotFound);
    expect_code("get a bad name", client.get_template("Bad Name").await, Code::InvalidArgument);
    let builtin = client.get_template("python").await.unwrap();
    assert!(builtin.builtin && builtin.allowed_overrides.len() == 13, "{builtin:?}");
    // A batch patch may set only what the template allows: env here, not labels.
    let batch = CreateBatch::new(2, CreateSession::new().template("ok")).patch(
        1,
        Vec::<(String, String)>::new(),
        [("shard", "1")],
    );
    let e = expect_code(
        "a label patch the template does not allow",
        client.create_batch(batch).await,
        Code::InvalidArgument,
    );
    assert!(e.to_string().contains("patches[1]"), "{e}");
    // A session may not set the read-only image.
    let mut c = CreateSession::new().template("ok");
    c.spec.image = "python:3.12".into();
    expect_code("a session's own image", client.create_session(c).await, Code::InvalidArgument);
    assert_eq!(session_count(&client).await, 0);

    // The CLI: create, list, get, delete.
    let create = ["template", "create", "cli-made", "--memory", "128Mi", "--env", "A=1", "--allow", "env"];
    let out = sandfleet(&cluster, &[&create[..], &["--template", "node"]].concat()).await;
    assert!(out.status.success(), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("base:     node") && text.contains("allows:   env"), "{text}");
    let out = sandfleet(&cluster, &["template", "list"]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("cli-made"), "{}", show(&out));
    let out = sandfleet(&cluster, &["-o", "json", "template", "get", "cli-made"]).await;
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&out)));
    assert_eq!(got["spec"]["memory_bytes"], serde_json::json!((128u64 << 20).to_string()), "{got}");
    let out = sandfleet(&cluster, &["template", "rm", "cli-made"]).await;
    assert!(out.status.success(), "{}", show(&out));
    let out = sandfleet(&cluster, &["template", "create", "x", "--allow", "image"]).await;
    assert!(!out.status.success(), "an unknown --allow field is refused: {}", show(&out));
}

/// The CLI against `cluster`'s endpoint, as its admin.
async fn sandfleet(cluster: &sandfleet_testkit::Cluster, args: &[&str]) -> std::process::Output {
    let endpoint = cluster.endpoint();
    let mut all = vec!["--endpoint", endpoint.as_str()];
    all.extend(args);
    cli(cluster, &all, None).await
}

/// Removes a Docker image tag when dropped.
struct RemoveTag(String);

impl Drop for RemoveTag {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker").args(["rmi", &self.0]).output();
    }
}

fn docker(args: &[&str]) -> String {
    let out = std::process::Command::new("docker").args(args).output().unwrap();
    assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// One process-runtime agent and one docker-runtime agent: a template's image
/// runs only on the docker node, and only once its engine holds the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_templates_image_runs_only_where_an_agent_advertises_it() {
    require_facilities!();
    if !sandfleet_testkit::require_docker() {
        return;
    }
    let base = sandfleet_testkit::facilities::sandbox_image();
    let tag = format!("sandfleet-test/tpl-{}:1", &request_id("x")[2..12]);
    let _untag = RemoveTag(tag.clone());
    let builder = ClusterBuilder::new()
        .coordinators(1)
        .agents(2)
        .agent_args(ROOMY)
        .agent_args_of(1, ["--runtime", "docker", "--template-image", &format!("default={base}")]);
    let cluster = start(builder).await;
    let client = cluster.client().await;
    let nodes = client.list_nodes().await.unwrap();
    let docker_node = nodes.iter().find(|n| n.runtimes == ["docker"]).expect("a docker node").id.clone();
    struct RemoveContainers(String);
    impl Drop for RemoveContainers {
        fn drop(&mut self) {
            let out = std::process::Command::new("docker")
                .args(["ps", "-aq", "--filter", &format!("label=sandfleet.node={}", self.0)])
                .output();
            for id in out.map(|o| String::from_utf8_lossy(&o.stdout).to_string()).unwrap_or_default().lines() {
                let _ = std::process::Command::new("docker").args(["rm", "-f", id]).output();
            }
        }
    }
    let _cleanup = RemoveContainers(docker_node.clone());

    let t = client.create_template(template("ml", &tag, &["env"])).await.unwrap();
    let normalized = format!("docker.io/{tag}");
    assert_eq!(t.image, normalized);

    // No engine holds the image yet: the session waits and says why.
    let s = client.create_session(CreateSession::new().request_id(request_id("img")).template("ml")).await.unwrap();
    assert_eq!(s.spec.as_ref().unwrap().image, normalized);
    let waiting = eventually("a pending reason naming the image", Duration::from_secs(30), || async {
        let got = client.get_session(&s.id).await?;
        anyhow::ensure!(got.pending_reason.contains(&format!("has image {normalized}")), "{got:?}");
        Ok(got)
    })
    .await
    .unwrap();
    assert_eq!(waiting.state, proto::SessionState::Pending as i32, "{waiting:?}");

    // Loaded into the Docker engine: the docker agent advertises it within
    // seconds, and the session runs there, in a container of that image.
    docker(&["tag", &base, &tag]);
    let s = client.wait_running(&s.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(s.node_id, docker_node);
    let node = client.list_nodes().await.unwrap().into_iter().find(|n| n.id == docker_node).unwrap();
    assert!(node.images.contains(&normalized), "{:?}", node.images);
    let process_node = client.list_nodes().await.unwrap().into_iter().find(|n| n.id != docker_node).unwrap();
    assert!(process_node.images.is_empty(), "a process agent advertises no images: {:?}", process_node.images);
    let image = docker(&["ps", "--filter", &format!("label=sandfleet.session={}", s.id), "--format", "{{.Image}}"]);
    assert!(image == tag || image == normalized, "the container runs {image:?}, not {tag}");
    let out = exec_argv(&client, &s, ["sh", "-c", "echo $MODE"], SHORT).await.unwrap();
    assert_eq!(stdout(&out).trim(), "ml", "{out:?}");

    // A runtime that cannot run the image is refused.
    let t2 = proto::Template { name: "ml-any".into(), ..template("ml-any", &tag, &["runtime"]) };
    client.create_template(t2).await.unwrap();
    expect_code(
        "the process runtime for an image",
        client.create_session(CreateSession::new().template("ml-any").runtime("process")).await,
        Code::InvalidArgument,
    );

    // A warm pool and a batch of the template: on the docker node, in containers of the image.
    let pool = proto::Pool {
        name: "ml".into(),
        spec: Some(proto::SessionSpec { template: "ml".into(), ..Default::default() }),
        max: 3,
        buffer_min: 2,
        buffer_max: 2,
        ..Default::default()
    };
    client.create_pool(pool).await.unwrap();
    let until = Instant::now() + Duration::from_secs(90);
    while client.get_pool("ml").await.unwrap().idle < 2 {
        assert!(Instant::now() < until, "the pool did not fill: {:?}", client.get_pool("ml").await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let claimed =
        client.create_session_full(CreateSession::new().request_id(request_id("claim")).pool("ml")).await.unwrap();
    assert!(claimed.claimed, "{claimed:?}");
    let c = claimed.session.unwrap();
    assert_eq!((c.node_id.as_str(), c.state), (docker_node.as_str(), proto::SessionState::Running as i32));
    let out = exec_argv(&client, &c, ["sh", "-c", "echo $MODE"], SHORT).await.unwrap();
    assert_eq!(stdout(&out).trim(), "ml", "{out:?}");
    let batch = CreateBatch::new(3, CreateSession::new().template("ml")).request_id(request_id("img-batch")).patch(
        2,
        [("SHARD", "2")],
        Vec::<(String, String)>::new(),
    );
    let b = client.create_batch(batch).await.unwrap().batch.unwrap();
    let b = client.wait_batch(&b.id, Duration::from_secs(90), |_| {}).await.unwrap();
    for id in &b.session_ids {
        let s = client.get_session(id).await.unwrap();
        assert_eq!(s.node_id, docker_node);
        let image = docker(&["ps", "--filter", &format!("label=sandfleet.session={id}"), "--format", "{{.Image}}"]);
        assert!(image == tag || image == normalized, "the container runs {image:?}, not {tag}");
    }
    let last = client.get_session(&b.session_ids[2]).await.unwrap();
    let out = exec_argv(&client, &last, ["sh", "-c", "echo $MODE:$SHARD"], SHORT).await.unwrap();
    assert_eq!(stdout(&out).trim(), "ml:2", "{out:?}");
    client.delete_batch(&b.id).await.unwrap();
    client.delete_pool("ml").await.unwrap();
}
